//! virtio-vsock (VIRTIO 1.2 §5.10) by hand: the rx, tx and event queues,
//! packet headers written and read field by field, and the helpers the
//! `vsock.*` cases share. The host side is ringvm's hybrid Unix-socket
//! muxer with the integration test's sockets behind it (see
//! `tests/tests/testguest.rs`).

use crate::mem::{self, r16, r32, r64, w16, w32, w64};
use crate::msg::{Msg, R};
use crate::time::Deadline;
use crate::virtio::{Dev, Vq, D_WRITE, F_VERSION_1, WAIT_MS};
use crate::{ensure, fail};

pub const DEVICE_ID: u32 = 19;
pub const HOST_CID: u64 = 2;
/// The CID the integration test gives the guest (`--vsock cid=3,...`).
pub const GUEST_CID: u64 = 3;
pub const HDR_LEN: usize = 44;
pub const TYPE_STREAM: u16 = 1;
pub const TYPE_SEQPACKET: u16 = 2;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_BOTH: u32 = 3;
/// VIRTIO_VSOCK_F_SEQPACKET: ringvm does not offer it.
pub const F_SEQPACKET: u64 = 1 << 1;
/// Host port with an echo server behind `<uds>_5`.
pub const ECHO_PORT: u32 = 5;
/// Host port with no socket behind it.
pub const DEAD_PORT: u32 = 6;
/// Guest port the test's host client asks for with `CONNECT 52`.
pub const LISTEN_PORT: u32 = 52;
/// What ringvm offers each connection (its documented credit).
pub const HOST_BUF_ALLOC: u32 = 256 * 1024;

const QSIZE: u16 = 32;
const RX_BUF: u32 = 4096;

/// A packet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    /// A stream packet from guest port `src` to host port `dst`, offering
    /// 64 KiB of buffer.
    pub fn to_host(src: u32, dst: u32, op: u16) -> Hdr {
        Hdr {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Hdr::default()
        }
    }

    pub fn write(&self, at: u64) {
        w64(at, self.src_cid);
        w64(at + 8, self.dst_cid);
        w32(at + 16, self.src_port);
        w32(at + 20, self.dst_port);
        w32(at + 24, self.len);
        w16(at + 28, self.type_);
        w16(at + 30, self.op);
        w32(at + 32, self.flags);
        w32(at + 36, self.buf_alloc);
        w32(at + 40, self.fwd_cnt);
    }

    pub fn read(at: u64) -> Hdr {
        Hdr {
            src_cid: r64(at),
            dst_cid: r64(at + 8),
            src_port: r32(at + 16),
            dst_port: r32(at + 20),
            len: r32(at + 24),
            type_: r16(at + 28),
            op: r16(at + 30),
            flags: r32(at + 32),
            buf_alloc: r32(at + 36),
            fwd_cnt: r32(at + 40),
        }
    }
}

/// A received packet: its header and where its payload lies (valid until
/// the next [`Vs::recv`]).
#[derive(Clone, Copy, Debug)]
pub struct Pkt {
    pub hdr: Hdr,
    pub data: u64,
}

/// The device, up, with RX buffers posted.
pub struct Vs {
    pub dev: Dev,
    pub rx: Vq,
    pub tx: Vq,
    _ev: Vq,
    rx_bufs: u64,
    /// The RX buffer handed out last, reposted on the next `recv`.
    lent: Option<u16>,
    tx_next: u16,
}

impl Vs {
    /// Bring-up with VERSION_1, three queues, every RX descriptor posted.
    pub fn up(dev: &Dev) -> Result<Vs, Msg> {
        dev.negotiate(F_VERSION_1)?;
        let (rx, tx, ev) = (Vq::new(QSIZE), Vq::new(QSIZE), Vq::new(4));
        for (q, vq) in [(0u32, &rx), (1, &tx), (2, &ev)] {
            dev.w(crate::virtio::QUEUE_SEL, q);
            let max = dev.r(crate::virtio::QUEUE_NUM_MAX);
            ensure!(u32::from(vq.size) <= max, "queue {q}: QueueNumMax {max}");
            dev.setup_queue(q, vq);
        }
        dev.driver_ok()?;
        let rx_bufs = mem::alloc(usize::from(QSIZE) * RX_BUF as usize, 4096);
        let mut vs = Vs {
            dev: *dev,
            rx,
            tx,
            _ev: ev,
            rx_bufs,
            lent: None,
            tx_next: 0,
        };
        for i in 0..QSIZE {
            vs.post_rx(i);
        }
        vs.dev.notify(0);
        Ok(vs)
    }

    fn post_rx(&mut self, i: u16) {
        let buf = self.rx_bufs + u64::from(i) * u64::from(RX_BUF);
        self.rx.set_desc(i, buf, RX_BUF, D_WRITE, 0);
        self.rx.publish(i);
    }

    /// Puts `parts` (already written) on the TX queue as one chain and
    /// waits until the device returned it.
    pub fn send_raw(&mut self, parts: &[crate::virtio::Part]) -> R {
        let first = self.tx_next;
        ensure!(usize::from(first) + parts.len() <= usize::from(QSIZE), "tx ring");
        let head = self.tx.chain(first, parts);
        self.tx_next = (first + parts.len() as u16) % (QSIZE - 8);
        self.tx.publish(head);
        self.dev.notify(1);
        let d = Deadline::after_ms(WAIT_MS);
        loop {
            if let Some((id, _)) = self.tx.poll() {
                ensure!(id == u32::from(head), "tx used id {id}, expected {head}");
                return Ok(());
            }
            if self.dev.needs_reset() {
                fail!("NEEDS_RESET after a TX packet");
            }
            if d.passed() {
                fail!("TX packet not returned within {WAIT_MS} ms");
            }
        }
    }

    /// Sends `hdr` (its `len` as given) with `data` after it, in one
    /// descriptor.
    pub fn send(&mut self, hdr: Hdr, data: &[u8]) -> R {
        let b = mem::alloc(HDR_LEN + data.len(), 8);
        hdr.write(b);
        for (i, v) in data.iter().enumerate() {
            mem::w8(b + (HDR_LEN + i) as u64, *v);
        }
        self.send_raw(&[(b, (HDR_LEN + data.len()) as u32, 0)])
    }

    /// The next packet to the guest within `ms`, or `None`.
    pub fn recv(&mut self, ms: u64) -> Result<Option<Pkt>, Msg> {
        if let Some(i) = self.lent.take() {
            self.post_rx(i);
            self.dev.notify(0);
        }
        let d = Deadline::after_ms(ms);
        loop {
            if let Some((id, len)) = self.rx.poll() {
                ensure!(id < u32::from(QSIZE), "rx used id {id}");
                ensure!(len as usize >= HDR_LEN, "rx used len {len} < header");
                let at = self.rx_bufs + u64::from(id) * u64::from(RX_BUF);
                let hdr = Hdr::read(at);
                ensure!(
                    hdr.len as usize + HDR_LEN == len as usize,
                    "header len {} but used len {len}",
                    hdr.len
                );
                ensure!(
                    hdr.src_cid == HOST_CID && hdr.dst_cid == GUEST_CID,
                    "packet from cid {} to {}",
                    hdr.src_cid,
                    hdr.dst_cid
                );
                ensure!(hdr.type_ == TYPE_STREAM, "packet of type {}", hdr.type_);
                self.lent = Some(id as u16);
                return Ok(Some(Pkt {
                    hdr,
                    data: at + HDR_LEN as u64,
                }));
            }
            if self.dev.needs_reset() {
                fail!("NEEDS_RESET while waiting for an RX packet");
            }
            if d.passed() {
                return Ok(None);
            }
        }
    }

    /// The next packet that is not a CREDIT_UPDATE (those may come at any
    /// time), or a failure naming `what`.
    pub fn expect(&mut self, what: &str) -> Result<Pkt, Msg> {
        loop {
            match self.recv(WAIT_MS)? {
                Some(p) if p.hdr.op == OP_CREDIT_UPDATE => continue,
                Some(p) => return Ok(p),
                None => fail!("{what}: nothing within {WAIT_MS} ms"),
            }
        }
    }

    /// Waits for a packet with `op` on (host port, guest port), skipping
    /// credit updates.
    pub fn expect_op(&mut self, op: u16, host: u32, guest: u32, what: &str) -> Result<Pkt, Msg> {
        let p = self.expect(what)?;
        ensure!(
            p.hdr.op == op && p.hdr.src_port == host && p.hdr.dst_port == guest,
            "{what}: got op {} {}->{}, expected op {op} {host}->{guest}",
            p.hdr.op,
            p.hdr.src_port,
            p.hdr.dst_port
        );
        Ok(p)
    }

    /// Nothing but credit updates arrives for `ms`.
    pub fn quiet(&mut self, ms: u64, what: &str) -> R {
        while let Some(p) = self.recv(ms)? {
            ensure!(
                p.hdr.op == OP_CREDIT_UPDATE,
                "{what}: unexpected op {} {}->{}",
                p.hdr.op,
                p.hdr.src_port,
                p.hdr.dst_port
            );
        }
        Ok(())
    }

    /// Opens guest port `gport` to the echo server.
    pub fn connect(&mut self, gport: u32) -> R {
        self.send(Hdr::to_host(gport, ECHO_PORT, OP_REQUEST), &[])?;
        self.expect_op(OP_RESPONSE, ECHO_PORT, gport, "connect to the echo port")?;
        Ok(())
    }

    /// Data `bytes` from guest port `gport` to the echo port.
    pub fn write(&mut self, gport: u32, bytes: &[u8]) -> R {
        let mut h = Hdr::to_host(gport, ECHO_PORT, OP_RW);
        h.len = bytes.len() as u32;
        self.send(h, bytes)
    }

    /// Finishes connection `gport` cleanly: SHUTDOWN both, answered RST.
    pub fn close(&mut self, gport: u32) -> R {
        let mut h = Hdr::to_host(gport, ECHO_PORT, OP_SHUTDOWN);
        h.flags = SHUTDOWN_BOTH;
        self.send(h, &[])?;
        self.expect_op(OP_RST, ECHO_PORT, gport, "close")?;
        Ok(())
    }
}

/// Whether `len` bytes at `at` equal `want`.
pub fn bytes_eq(at: u64, want: &[u8]) -> bool {
    want.iter()
        .enumerate()
        .all(|(i, b)| mem::r8(at + i as u64) == *b)
}
