//! virtio-vsock (VIRTIO 1.2 §5.10) against ringvm's Firecracker-style host
//! side, with the integration test's Unix sockets behind it: an echo
//! server on host port 5 (`<uds>_5`), nothing on port 6, and a host client
//! that connects to `<uds>` with `CONNECT 52` as soon as ringvm listens.
//! Connections both ways, data both ways with credit, CREDIT_REQUEST,
//! shutdown, RST on unknown ports, and hostile packets.

use super::Ctx;
use crate::mem;
use crate::msg::{Msg, R};
use crate::virtio::*;
use crate::vsock::*;
use crate::{ensure, fail};

fn what(w: &'static str) -> impl Fn(Msg) -> Msg {
    move |e| Msg::new(format_args!("{w}: {}", e.as_str()))
}

/// Device ID 19, VERSION_1 without SEQPACKET, three queues, the CID in
/// the config space.
pub fn identity(ctx: &mut Ctx) -> R {
    let d = ctx.vsock();
    let id = d.r(crate::virtio::DEVICE_ID);
    ensure!(id == crate::vsock::DEVICE_ID, "device id {id}, expected 19");
    d.reset()?;
    let f = d.device_features();
    ensure!(f & F_VERSION_1 != 0, "VERSION_1 not offered ({f:#x})");
    ensure!(f & F_SEQPACKET == 0, "SEQPACKET offered ({f:#x})");
    for q in 0..3 {
        d.w(QUEUE_SEL, q);
        ensure!(d.r(QUEUE_NUM_MAX) > 0, "queue {q}: QueueNumMax 0");
    }
    d.w(QUEUE_SEL, 3);
    ensure!(d.r(QUEUE_NUM_MAX) == 0, "a fourth queue");
    let cid = d.cfg64(0)?;
    ensure!(cid == GUEST_CID, "guest_cid {cid}, expected {GUEST_CID}");
    Ok(())
}

/// The host client's `CONNECT 52` arrives as a REQUEST from a host port;
/// after our RESPONSE the client gets `OK <port>` and sends "ping\n"; our
/// "pong\n" reaches it; SHUTDOWN both is answered with RST.
pub fn host_connect(ctx: &mut Ctx) -> R {
    let mut vs = Vs::up(&ctx.vsock())?;
    let req = vs.expect("the host's CONNECT 52").map_err(what("request"))?;
    ensure!(
        req.hdr.op == OP_REQUEST && req.hdr.dst_port == LISTEN_PORT,
        "expected a REQUEST to port {LISTEN_PORT}, got op {} to {}",
        req.hdr.op,
        req.hdr.dst_port
    );
    ensure!(
        req.hdr.buf_alloc == HOST_BUF_ALLOC,
        "host offers {} bytes",
        req.hdr.buf_alloc
    );
    let hp = req.hdr.src_port;
    let mut h = Hdr::to_host(LISTEN_PORT, hp, OP_RESPONSE);
    vs.send(h, &[])?;
    let p = vs.expect_op(OP_RW, hp, LISTEN_PORT, "the host's ping")?;
    ensure!(
        p.hdr.len == 5 && bytes_eq(p.data, b"ping\n"),
        "host sent {} bytes, not ping",
        p.hdr.len
    );
    h.op = OP_RW;
    h.len = 5;
    h.fwd_cnt = 5;
    vs.send(h, b"pong\n")?;
    h.op = OP_SHUTDOWN;
    h.len = 0;
    h.flags = SHUTDOWN_BOTH;
    vs.send(h, &[])?;
    vs.expect_op(OP_RST, hp, LISTEN_PORT, "close")?;
    Ok(())
}

/// A connection to the echo port: data there and back, CREDIT_REQUEST
/// answered with the bytes forwarded, clean close.
pub fn guest_connect(ctx: &mut Ctx) -> R {
    let mut vs = Vs::up(&ctx.vsock())?;
    vs.connect(1000)?;
    vs.write(1000, b"hello, host")?;
    let p = vs.expect_op(OP_RW, ECHO_PORT, 1000, "echo")?;
    ensure!(
        p.hdr.len == 11 && bytes_eq(p.data, b"hello, host"),
        "echo of {} bytes differs",
        p.hdr.len
    );
    vs.send(Hdr::to_host(1000, ECHO_PORT, OP_CREDIT_REQUEST), &[])?;
    let mut seen = false;
    for _ in 0..4 {
        let Some(p) = vs.recv(WAIT_MS)? else { break };
        if p.hdr.op == OP_CREDIT_UPDATE && p.hdr.fwd_cnt == 11 {
            ensure!(
                p.hdr.buf_alloc == HOST_BUF_ALLOC,
                "buf_alloc {}",
                p.hdr.buf_alloc
            );
            seen = true;
            break;
        }
    }
    ensure!(seen, "no CREDIT_UPDATE with fwd_cnt 11 after CREDIT_REQUEST");
    vs.close(1000)
}

/// The guest offers 4 bytes of buffer: 16 echoed bytes arrive 4 at a time,
/// each batch only after a CREDIT_UPDATE says the last one was consumed.
pub fn credit(ctx: &mut Ctx) -> R {
    let mut vs = Vs::up(&ctx.vsock())?;
    let mut h = Hdr::to_host(1001, ECHO_PORT, OP_REQUEST);
    h.buf_alloc = 4;
    vs.send(h, &[])?;
    vs.expect_op(OP_RESPONSE, ECHO_PORT, 1001, "connect")?;
    let mut w = h;
    w.op = OP_RW;
    w.len = 16;
    vs.send(w, b"0123456789abcdef")?;
    let mut got = 0u32;
    while got < 16 {
        let p = vs.expect_op(OP_RW, ECHO_PORT, 1001, "credit-limited data")?;
        ensure!(p.hdr.len <= 4, "{} bytes sent with 4 bytes of credit", p.hdr.len);
        ensure!(
            bytes_eq(p.data, &b"0123456789abcdef"[got as usize..(got + p.hdr.len) as usize]),
            "bytes {got}.. differ"
        );
        got += p.hdr.len;
        if got % 4 == 0 && got < 16 {
            vs.quiet(100, "credit exhausted")?;
        }
        let mut u = h;
        u.op = OP_CREDIT_UPDATE;
        u.fwd_cnt = got;
        vs.send(u, &[])?;
    }
    vs.close(1001)
}

/// Port 6 has no socket: RST. Data and SHUTDOWN on a connection that
/// does not exist: RST. An RST for one: no answer.
pub fn refused(ctx: &mut Ctx) -> R {
    let mut vs = Vs::up(&ctx.vsock())?;
    vs.send(Hdr::to_host(1002, DEAD_PORT, OP_REQUEST), &[])?;
    vs.expect_op(OP_RST, DEAD_PORT, 1002, "connect to a dead port")?;
    let mut h = Hdr::to_host(1003, ECHO_PORT, OP_RW);
    h.len = 2;
    vs.send(h, b"hi")?;
    vs.expect_op(OP_RST, ECHO_PORT, 1003, "data without a connection")?;
    vs.send(Hdr::to_host(1003, ECHO_PORT, OP_RST), &[])?;
    vs.quiet(100, "RST for nothing")?;
    vs.connect(1004)?;
    vs.close(1004)
}

/// Hostile packets: each is refused (RST for a connection it names, or
/// dropped), none is answered with data, and the device keeps serving.
pub fn hostile(ctx: &mut Ctx) -> R {
    let mut vs = Vs::up(&ctx.vsock())?;
    // Wrong source CID, wrong destination CID: dropped.
    let mut h = Hdr::to_host(1010, ECHO_PORT, OP_REQUEST);
    h.src_cid = 77;
    vs.send(h, &[])?;
    h.src_cid = GUEST_CID;
    h.dst_cid = 0xffff_ffff_ffff_ffff;
    vs.send(h, &[])?;
    vs.quiet(100, "packets with wrong CIDs")?;
    // SEQPACKET, and a type that does not exist: RST.
    for t in [TYPE_SEQPACKET, 0x4242] {
        let mut h = Hdr::to_host(1011, ECHO_PORT, OP_REQUEST);
        h.type_ = t;
        vs.send(h, &[])?;
        vs.expect_op(OP_RST, ECHO_PORT, 1011, "a non-stream request")?;
    }
    // A length beyond the buffer on a live connection: RST.
    vs.connect(1012)?;
    let mut h = Hdr::to_host(1012, ECHO_PORT, OP_RW);
    h.len = 4000;
    vs.send(h, b"short")?;
    vs.expect_op(OP_RST, ECHO_PORT, 1012, "length over the buffer")?;
    // A length over 64 KiB: RST.
    vs.connect(1013)?;
    let b = mem::alloc(HDR_LEN, 8);
    let mut h = Hdr::to_host(1013, ECHO_PORT, OP_RW);
    h.len = 0x1_0001;
    h.write(b);
    let data = mem::alloc(0x1_0001, 4096);
    vs.send_raw(&[(b, HDR_LEN as u32, 0), (data, 0x1_0001, 0)])?;
    vs.expect_op(OP_RST, ECHO_PORT, 1013, "length over 64 KiB")?;
    // An operation that does not exist: RST.
    vs.connect(1014)?;
    vs.send(Hdr::to_host(1014, ECHO_PORT, 99), &[])?;
    vs.expect_op(OP_RST, ECHO_PORT, 1014, "unknown op")?;
    // A header split over descriptors and a writable TX descriptor.
    let b = mem::alloc(64, 8);
    Hdr::to_host(1015, DEAD_PORT, OP_REQUEST).write(b);
    vs.send_raw(&[(b, 20, 0), (b + 20, 24, 0)])?;
    vs.expect_op(OP_RST, DEAD_PORT, 1015, "a split header")?;
    vs.send_raw(&[(b, 44, D_WRITE)])?;
    vs.quiet(100, "a writable TX descriptor")?;
    // A huge buffer with a fwd_cnt ahead of what was sent is no credit:
    // the echo waits until an honest update.
    vs.connect(1016)?;
    let mut u = Hdr::to_host(1016, ECHO_PORT, OP_CREDIT_UPDATE);
    u.buf_alloc = u32::MAX;
    u.fwd_cnt = 1000;
    vs.send(u, &[])?;
    // Every header carries the sender's credit: the data packet lies too.
    let mut w = u;
    w.op = OP_RW;
    w.len = 1;
    vs.send(w, b"x")?;
    vs.quiet(200, "data beyond a lying credit")?;
    u.buf_alloc = 64;
    u.fwd_cnt = 0;
    vs.send(u, &[])?;
    let p = vs.expect_op(OP_RW, ECHO_PORT, 1016, "echo after honest credit")?;
    ensure!(p.hdr.len == 1, "{} bytes echoed", p.hdr.len);
    vs.close(1016)?;
    // Over the connection cap: RSTs, and the device still serves.
    let mut responses = 0u32;
    let mut rsts = 0u32;
    for i in 0..140u32 {
        vs.send(Hdr::to_host(2000 + i, ECHO_PORT, OP_REQUEST), &[])?;
        let p = vs.expect("a flood REQUEST").map_err(what("flood"))?;
        match p.hdr.op {
            OP_RESPONSE => responses += 1,
            OP_RST => rsts += 1,
            op => fail!("flood: op {op}"),
        }
    }
    ensure!(
        responses <= 128 && rsts >= 12,
        "flood of 140: {responses} accepted, {rsts} refused"
    );
    crate::note!("vsock flood: {responses} accepted, {rsts} refused");
    Ok(())
}
