//! Device tests through the driver-side queue mock, with real Unix sockets
//! on the host side and an `ExecutingIo` playing the ring (polls complete
//! when their socket is ready; cancels are played from `stale_tags`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

use super::packet::*;
use super::*;
use crate::io::fake::{CountingLine, ExecutingIo, RecordingIo};
use crate::virtio::testing::DriverQueue;
use crate::virtio::{Activation, VirtioDevice};

type Dq = DriverQueue<GuestMemoryMmap>;
const W: u16 = Dq::WRITE;
const GUEST_CID: u64 = 3;
const RX_BUF: u32 = 4096;

struct Rig {
    _dir: TempDir,
    uds: PathBuf,
    mem: GuestMemoryMmap,
    rxq: Dq,
    txq: Dq,
    dev: VsockDevice,
    io: ExecutingIo,
    /// Next free guest address for buffers.
    next: u64,
    /// RX head → buffer address.
    rx_bufs: HashMap<u16, u64>,
}

fn hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..Header::default()
    }
}

impl Rig {
    fn new() -> Self {
        let dir = TempDir::new().expect("tempdir");
        let uds = dir.as_path().join("v.sock");
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).expect("mem");
        let rxq = DriverQueue::new(mem.clone(), 0, 256);
        let txq = DriverQueue::new(mem.clone(), 0x4000, 256);
        let evq = DriverQueue::new(mem.clone(), 0x8000, 256);
        let mut dev =
            VsockDevice::new(GUEST_CID, &uds, Box::new(CountingLine::default())).expect("device");
        let activation = Activation {
            features: FEATURES,
            queues: vec![rxq.config(), txq.config(), evq.config()],
        };
        VirtioDevice::activate(&mut dev, &mem, &activation).expect("activate");
        let mut rig = Self {
            _dir: dir,
            uds,
            mem,
            rxq,
            txq,
            dev,
            io: ExecutingIo::default(),
            next: 0x10_0000,
            rx_bufs: HashMap::new(),
        };
        rig.process(RX_QUEUE);
        rig
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next;
        self.next += (len + 0xfff) & !0xfff;
        assert!(self.next < 0x100_0000, "test ran out of guest memory");
        at
    }

    fn process(&mut self, q: usize) {
        self.dev
            .process_queue(q, &self.mem, &mut self.io)
            .expect("process");
        self.pump();
    }

    /// Delivers completions (and plays cancels) until nothing moves.
    fn pump(&mut self) {
        for _ in 0..200 {
            for t in VirtioDevice::<GuestMemoryMmap>::stale_tags(&self.dev) {
                self.io.cancel_poll(t);
            }
            let done = self.io.take_completions();
            if done.is_empty() {
                return;
            }
            for (tag, res) in done {
                self.dev.complete(tag, res, &self.mem, &mut self.io);
            }
        }
        panic!("the device never settled");
    }

    /// Waits (briefly) for host sockets to make progress, pumping.
    fn settle(&mut self) {
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(5));
            self.pump();
        }
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let at = self.alloc(u64::from(RX_BUF));
            let head = self.rxq.push(&[(at, RX_BUF, W)]);
            self.rx_bufs.insert(head, at);
        }
        self.process(RX_QUEUE);
    }

    /// Puts a packet on the TX queue (header and payload in their own
    /// descriptors) and kicks.
    fn send(&mut self, h: Header, data: &[u8]) -> u16 {
        let at = self.alloc(HDR_LEN as u64);
        self.mem
            .write_slice(&h.encode(), GuestAddress(at))
            .expect("hdr");
        let head = if data.is_empty() {
            self.txq.push(&[(at, HDR_LEN as u32, 0)])
        } else {
            let d = self.alloc(data.len() as u64);
            self.mem.write_slice(data, GuestAddress(d)).expect("data");
            self.txq
                .push(&[(at, HDR_LEN as u32, 0), (d, data.len() as u32, 0)])
        };
        self.process(TX_QUEUE);
        head
    }

    /// Packets the device put in RX buffers since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for (head, len) in self.rxq.take_used() {
            let at = self.rx_bufs[&(head as u16)];
            if (len as usize) < HDR_LEN {
                out.push((Header::default(), Vec::new()));
                continue;
            }
            let mut raw = [0u8; HDR_LEN];
            self.mem
                .read_slice(&mut raw, GuestAddress(at))
                .expect("read");
            let h = Header::parse(&raw);
            let mut data = vec![0u8; len as usize - HDR_LEN];
            self.mem
                .read_slice(&mut data, GuestAddress(at + HDR_LEN as u64))
                .expect("read");
            assert_eq!(h.len as usize, data.len(), "used length matches the header");
            out.push((h, data));
        }
        out
    }

    fn ops(&mut self) -> Vec<u16> {
        self.received().iter().map(|(h, _)| h.op).collect()
    }

    /// A host client through the CONNECT handshake to guest port `port`;
    /// returns it with the host port the device chose.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.uds).expect("connect");
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .expect("write");
        self.settle();
        let got = self.received();
        assert_eq!(got.len(), 1, "one REQUEST: {got:?}");
        let (req, _) = got[0];
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!(req.dst_port, port);
        assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
        self.send(hdr(port, req.src_port, OP_RESPONSE), &[]);
        let mut line = [0u8; 32];
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let n = client.read(&mut line).expect("OK line");
        assert_eq!(
            std::str::from_utf8(&line[..n]).expect("utf8"),
            format!("OK {}\n", req.src_port)
        );
        (client, req.src_port)
    }

    /// A guest connection from guest port `gport` to a host listener on
    /// `<uds>_<port>`; returns the host's end.
    fn guest_connect(&mut self, gport: u32, port: u32, listener: &UnixListener) -> UnixStream {
        self.send(hdr(gport, port, OP_REQUEST), &[]);
        let got = self.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0.op, OP_RESPONSE);
        assert_eq!(got[0].0.src_port, port);
        assert_eq!(got[0].0.dst_port, gport);
        let (s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        s
    }

    fn listen_port(&self, port: u32) -> UnixListener {
        UnixListener::bind(host::port_path(&self.uds, port)).expect("bind")
    }
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read");
    buf
}

#[test]
fn config_space_is_the_guest_cid() {
    let rig = Rig::new();
    let mut b = [0u8; 8];
    VirtioDevice::<GuestMemoryMmap>::info(&rig.dev)
        .shared
        .read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), GUEST_CID);
    assert_eq!(
        VirtioDevice::<GuestMemoryMmap>::info(&rig.dev).device_type,
        19
    );
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let mut rig = Rig::new();
    rig.post_rx(8);
    let (mut client, local) = rig.host_connect(52);
    // Guest → host, straight from the TX buffer.
    let mut h = hdr(52, local, OP_RW);
    h.len = 5;
    let head = rig.send(h, b"hello");
    assert_eq!(read_n(&mut client, 5), b"hello");
    assert!(
        rig.txq.used_entries().contains(&(u32::from(head), 0)),
        "the chain is returned once written"
    );
    // Host → guest, straight into the RX buffer.
    client.write_all(b"world").expect("write");
    rig.settle();
    let got = rig.received();
    let data: Vec<_> = got.iter().filter(|(h, _)| h.op == OP_RW).collect();
    assert_eq!(data.len(), 1, "{got:?}");
    assert_eq!(data[0].1, b"world");
    assert_eq!((data[0].0.src_port, data[0].0.dst_port), (local, 52));
    let c = rig.dev.counters();
    assert_eq!((c.host_connections, c.tx_bytes, c.rx_bytes), (1, 5, 5));
}

#[test]
fn guest_initiated_connection_reaches_the_port_socket() {
    let mut rig = Rig::new();
    rig.post_rx(8);
    let listener = rig.listen_port(1234);
    let mut host = rig.guest_connect(40_000, 1234, &listener);
    let mut h = hdr(40_000, 1234, OP_RW);
    h.len = 3;
    rig.send(h, b"abc");
    assert_eq!(read_n(&mut host, 3), b"abc");
    host.write_all(b"xyz").expect("write");
    rig.settle();
    let got: Vec<_> = rig
        .received()
        .into_iter()
        .filter(|(h, _)| h.op == OP_RW)
        .collect();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, b"xyz");
    assert_eq!(rig.dev.counters().guest_connections, 1);
}

#[test]
fn payloads_split_over_many_descriptors_are_written_whole() {
    let mut rig = Rig::new();
    rig.post_rx(4);
    let listener = rig.listen_port(7);
    let mut host = rig.guest_connect(1, 7, &listener);
    let mut h = hdr(1, 7, OP_RW);
    h.len = 10;
    let mut raw = h.encode().to_vec();
    raw.extend_from_slice(b"0123456789");
    // Header split at byte 20, payload split at 3: five descriptors.
    let at = rig.alloc(4096);
    rig.mem.write_slice(&raw, GuestAddress(at)).expect("write");
    rig.txq.push(&[
        (at, 20, 0),
        (at + 20, 24, 0),
        (at + 44, 3, 0),
        (at + 47, 6, 0),
        (at + 53, 1, 0),
    ]);
    rig.process(TX_QUEUE);
    assert_eq!(read_n(&mut host, 10), b"0123456789");
}

#[test]
fn we_never_send_the_guest_more_than_its_credit() {
    let mut rig = Rig::new();
    rig.post_rx(8);
    let listener = rig.listen_port(5);
    let mut req = hdr(9, 5, OP_REQUEST);
    req.buf_alloc = 8;
    rig.send(req, &[]);
    assert_eq!(rig.ops(), vec![OP_RESPONSE]);
    let (mut host, _) = listener.accept().expect("accept");
    host.write_all(&[7u8; 20]).expect("write");
    rig.settle();
    let got = rig.received();
    let total: usize = got.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(total, 8, "only the 8 bytes of credit: {got:?}");
    // The guest consumed them and says so.
    let mut upd = hdr(9, 5, OP_CREDIT_UPDATE);
    upd.buf_alloc = 8;
    upd.fwd_cnt = 8;
    rig.send(upd, &[]);
    rig.settle();
    let total: usize = rig.received().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(total, 8);
    // A guest claiming to have consumed bytes it never got earns nothing.
    upd.fwd_cnt = 1_000_000;
    upd.buf_alloc = u32::MAX;
    rig.send(upd, &[]);
    rig.settle();
    assert!(rig.received().is_empty());
}

#[test]
fn credit_requests_are_answered_and_forwarded_bytes_announced() {
    let mut rig = Rig::new();
    rig.post_rx(8);
    let listener = rig.listen_port(5);
    let mut host = rig.guest_connect(9, 5, &listener);
    let mut h = hdr(9, 5, OP_RW);
    h.len = 4;
    rig.send(h, b"data");
    assert_eq!(read_n(&mut host, 4), b"data");
    let got = rig.received();
    // All held data written: the guest hears of the freed space.
    assert!(
        got.iter()
            .any(|(h, _)| h.op == OP_CREDIT_UPDATE && h.fwd_cnt == 4),
        "{got:?}"
    );
    rig.send(hdr(9, 5, OP_CREDIT_REQUEST), &[]);
    let got = rig.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, OP_CREDIT_UPDATE);
    assert_eq!((got[0].0.buf_alloc, got[0].0.fwd_cnt), (CONN_BUF_ALLOC, 4));
}

#[test]
fn a_guest_over_its_credit_is_reset() {
    let mut rig = Rig::new();
    rig.post_rx(8);
    let listener = rig.listen_port(5);
    let _host = rig.guest_connect(9, 5, &listener);
    // A ring that never completes: every payload stays held.
    let mut io = RecordingIo::default();
    let chunk = vec![1u8; MAX_PKT_DATA as usize];
    for _ in 0..(CONN_BUF_ALLOC / MAX_PKT_DATA) {
        let mut h = hdr(9, 5, OP_RW);
        h.len = MAX_PKT_DATA;
        let at = rig.alloc(HDR_LEN as u64 + u64::from(MAX_PKT_DATA));
        rig.mem
            .write_slice(&h.encode(), GuestAddress(at))
            .expect("w");
        rig.mem
            .write_slice(&chunk, GuestAddress(at + HDR_LEN as u64))
            .expect("w");
        rig.txq
            .push(&[(at, HDR_LEN as u32, 0), (at + 44, MAX_PKT_DATA, 0)]);
    }
    rig.dev
        .process_queue(TX_QUEUE, &rig.mem, &mut io)
        .expect("process");
    assert_eq!(rig.rxq.take_used().len(), 0);
    let mut h = hdr(9, 5, OP_RW);
    h.len = 1;
    let at = rig.alloc(64);
    rig.mem
        .write_slice(&h.encode(), GuestAddress(at))
        .expect("w");
    rig.txq.push(&[(at, 45, 0)]);
    rig.dev
        .process_queue(TX_QUEUE, &rig.mem, &mut io)
        .expect("process");
    let got = rig.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, OP_RST);
    assert!(rig.dev.counters().bad_packets >= 1);
}

#[test]
fn unknown_ports_and_connections_get_an_rst() {
    let mut rig = Rig::new();
    rig.post_rx(8);
    rig.send(hdr(1000, 99, OP_REQUEST), &[]);
    let got = rig.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, OP_RST);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (99, 1000));
    // Data on a connection that does not exist.
    let mut h = hdr(1000, 99, OP_RW);
    h.len = 2;
    rig.send(h, b"hi");
    assert_eq!(rig.ops(), vec![OP_RST]);
    // An RST for an unknown connection is not answered.
    rig.send(hdr(1000, 99, OP_RST), &[]);
    assert!(rig.received().is_empty());
    assert_eq!(rig.dev.counters().connections_refused, 1);
}

#[test]
fn hostile_packets_are_refused_without_harm() {
    let mut rig = Rig::new();
    rig.post_rx(32);
    let listener = rig.listen_port(5);
    let mut host = rig.guest_connect(9, 5, &listener);
    // Wrong addresses: dropped, no answer.
    let mut h = hdr(9, 5, OP_RW);
    h.src_cid = 7;
    rig.send(h, &[]);
    h.src_cid = GUEST_CID;
    h.dst_cid = 0xffff_ffff_ffff_ffff;
    rig.send(h, &[]);
    assert!(rig.received().is_empty());
    // Seqpacket: RST.
    let mut h = hdr(9, 77, OP_REQUEST);
    h.type_ = TYPE_SEQPACKET;
    rig.send(h, &[]);
    assert_eq!(rig.ops(), vec![OP_RST]);
    // A header that does not fit: dropped.
    let at = rig.alloc(64);
    rig.txq.push(&[(at, 10, 0)]);
    rig.process(TX_QUEUE);
    // A device-writable TX descriptor: dropped.
    rig.txq.push(&[(at, 64, W)]);
    rig.process(TX_QUEUE);
    // A descriptor outside guest memory: dropped.
    rig.txq.push(&[(0xffff_ffff_0000, 64, 0)]);
    rig.process(TX_QUEUE);
    assert!(rig.received().is_empty());
    // A length over the chain's bytes resets the connection it names.
    let mut h = hdr(9, 5, OP_RW);
    h.len = 1000;
    rig.send(h, b"short");
    assert_eq!(rig.ops(), vec![OP_RST]);
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).expect("eof"), 0, "host socket closed");
    // A length over the packet limit, and an unknown op, on fresh
    // connections: RST each.
    let mut host2 = rig.guest_connect(10, 5, &listener);
    let mut h = hdr(10, 5, OP_RW);
    h.len = MAX_PKT_DATA + 1;
    rig.send(h, &[]);
    assert_eq!(rig.ops(), vec![OP_RST]);
    assert_eq!(host2.read(&mut buf).expect("eof"), 0);
    let mut host3 = rig.guest_connect(11, 5, &listener);
    rig.send(hdr(11, 5, 0x4242), &[]);
    assert_eq!(rig.ops(), vec![OP_RST]);
    assert_eq!(host3.read(&mut buf).expect("eof"), 0);
    // Huge credit values neither panic nor send what was not offered.
    let _host4 = rig.guest_connect(12, 5, &listener);
    let mut h = hdr(12, 5, OP_CREDIT_UPDATE);
    h.buf_alloc = u32::MAX;
    h.fwd_cnt = u32::MAX;
    rig.send(h, &[]);
    rig.settle();
    assert!(rig.received().is_empty());
    // The TX chains all came back and the device still works.
    assert!(VirtioDevice::<GuestMemoryMmap>::queues(&rig.dev).is_live(TX_QUEUE));
    assert!(rig.dev.counters().bad_packets >= 6);
}

#[test]
fn a_flood_of_requests_is_capped() {
    let mut rig = Rig::new();
    rig.post_rx(200);
    let listener = rig.listen_port(5);
    listener.set_nonblocking(true).expect("nonblocking");
    let mut refused = 0;
    let mut accepted = 0;
    let mut hosts = Vec::new();
    for p in 0..(MAX_CONNECTIONS as u32 + 20) {
        rig.send(hdr(p, 5, OP_REQUEST), &[]);
        for (h, _) in rig.received() {
            match h.op {
                OP_RESPONSE => accepted += 1,
                OP_RST => refused += 1,
                op => panic!("unexpected op {op}"),
            }
        }
        // Keep the host listener's backlog drained.
        while let Ok((s, _)) = listener.accept() {
            hosts.push(s);
        }
    }
    assert_eq!(accepted, MAX_CONNECTIONS);
    assert_eq!(refused, 20);
    assert_eq!(
        rig.dev.counters().active_connections,
        MAX_CONNECTIONS as u64
    );
}

#[test]
fn rsts_owed_to_a_guest_without_buffers_are_bounded() {
    let mut rig = Rig::new();
    for p in 0..(MAX_PENDING_RST as u32 + 10) {
        rig.send(hdr(p, 99, OP_REQUEST), &[]);
    }
    assert_eq!(rig.dev.counters().rst_dropped, 10);
    rig.post_rx(100);
    assert_eq!(rig.received().len(), MAX_PENDING_RST);
}

#[test]
fn shutdowns_pass_both_ways_and_close_the_connection() {
    let mut rig = Rig::new();
    rig.post_rx(8);
    let listener = rig.listen_port(5);
    let mut host = rig.guest_connect(9, 5, &listener);
    let mut h = hdr(9, 5, OP_RW);
    h.len = 2;
    rig.send(h, b"by");
    let mut sd = hdr(9, 5, OP_SHUTDOWN);
    sd.flags = SHUTDOWN_SEND;
    rig.send(sd, &[]);
    let mut all = Vec::new();
    host.read_to_end(&mut all).expect("read to EOF");
    assert_eq!(all, b"by", "data, then end of stream");
    // The host closes: the guest hears SHUTDOWN.
    drop(host);
    rig.settle();
    let ops = rig.ops();
    assert!(ops.contains(&OP_SHUTDOWN), "{ops:?}");
    // The guest finishes: RST, connection freed.
    sd.flags = SHUTDOWN_BOTH;
    rig.send(sd, &[]);
    assert!(rig.ops().contains(&OP_RST));
    assert_eq!(rig.dev.counters().active_connections, 0);
}

#[test]
fn a_host_client_is_closed_when_the_guest_refuses() {
    let mut rig = Rig::new();
    rig.post_rx(8);
    let mut client = UnixStream::connect(&rig.uds).expect("connect");
    client.write_all(b"CONNECT 52\n").expect("write");
    rig.settle();
    let got = rig.received();
    assert_eq!(got[0].0.op, OP_REQUEST);
    rig.send(hdr(52, got[0].0.src_port, OP_RST), &[]);
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).expect("eof"), 0);
    // A bad line is closed without bothering the guest.
    let mut bad = UnixStream::connect(&rig.uds).expect("connect");
    bad.write_all(b"HELLO\n").expect("write");
    rig.settle();
    assert!(rig.received().is_empty());
    bad.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    assert_eq!(bad.read(&mut buf).expect("eof"), 0);
    assert_eq!(rig.dev.counters().connections_refused, 2);
}

#[test]
fn a_reset_closes_every_host_socket_and_leaves_nothing_in_flight() {
    let mut rig = Rig::new();
    rig.post_rx(8);
    let listener = rig.listen_port(5);
    let mut host = rig.guest_connect(9, 5, &listener);
    let (mut client, _) = rig.host_connect(52);
    assert!(
        VirtioDevice::<GuestMemoryMmap>::in_flight(&rig.dev) > 0,
        "polls wait on the sockets and the listener"
    );
    VirtioDevice::<GuestMemoryMmap>::reset(&mut rig.dev);
    let stale = VirtioDevice::<GuestMemoryMmap>::stale_tags(&rig.dev);
    assert!(!stale.is_empty());
    rig.pump();
    assert_eq!(VirtioDevice::<GuestMemoryMmap>::in_flight(&rig.dev), 0);
    assert_eq!(rig.dev.counters().active_connections, 0);
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).expect("eof"), 0);
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    assert_eq!(client.read(&mut buf).expect("eof"), 0);
}

#[test]
fn the_socket_file_is_removed_with_the_device() {
    let rig = Rig::new();
    let path = rig.uds.clone();
    assert!(path.exists());
    let Rig { dev, _dir, .. } = rig;
    drop(dev);
    assert!(!path.exists());
    // A path that already exists is refused, as in Firecracker.
    std::fs::write(&path, b"").expect("file");
    assert!(VsockDevice::new(3, &path, Box::new(CountingLine::default())).is_err());
}

#[test]
fn stray_completions_change_nothing() {
    let mut rig = Rig::new();
    rig.post_rx(4);
    let listener = rig.listen_port(5);
    let _host = rig.guest_connect(9, 5, &listener);
    let before = VirtioDevice::<GuestMemoryMmap>::in_flight(&rig.dev);
    assert!(before >= 2, "the listener and the connection are polled");
    let kinds = [0u64, 1, 2, 3, 4, 5, 6, 7, 0xff];
    for kind in kinds {
        for slot in [0u64, 1, 0xffff] {
            for gen in [0u64, 1, 2, 0xff_ffff] {
                let tag = (kind << 40) | (slot << 24) | gen;
                if rig.io.parked_polls.iter().any(|p| p.2 == tag) {
                    continue;
                }
                for res in [0, 1, -libc::ECANCELED, i32::MAX, i32::MIN] {
                    rig.dev.complete(tag, res, &rig.mem, &mut rig.io);
                }
            }
        }
    }
    rig.dev.complete(u64::MAX, 0, &rig.mem, &mut rig.io);
    assert_eq!(VirtioDevice::<GuestMemoryMmap>::in_flight(&rig.dev), before);
    assert!(rig.received().is_empty());
    assert_eq!(rig.dev.counters().active_connections, 1);
}
