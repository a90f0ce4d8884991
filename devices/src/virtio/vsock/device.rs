//! The virtio-vsock device: the guest's packets in, the host sockets'
//! readiness and data out, all as ops on the VMM thread's ring.
//!
//! Every host wait is a tagged ring op ([`IoOp::Poll`] on the listener and
//! on each socket, `readv`/`writev` between sockets and guest buffers), so
//! one thread serves any number of connections without blocking and
//! without a loop of its own. After each kick or completion the device
//! runs one `service` pass: arm what each connection needs, fill the
//! guest's RX buffers (RSTs first, then control packets, then data, round
//! robin), and free connections whose ops all came back.
//!
//! A tag is `kind << 40 | slot << 24 | generation`: a completion for a
//! slot reused since is recognised and ignored.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use super::chain::{read_tx, RxBuffer, TxPacket};
use super::conn::{advance, ctrl, iov_len, Conn, HeldTx, State};
use super::host;
use super::packet::*;
use super::*;
use crate::guest_log::GuestLog;
use crate::io::{InterruptLine, IoOp, IoSubmit};
use crate::virtio::{
    drain_queue, ChainTaken, DeviceError, DeviceShared, Interrupt, ProcessOutcome, VirtioDevice,
    Virtqueues,
};

/// Per-device counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VsockCounters {
    /// Host clients whose `CONNECT` reached the guest.
    pub host_connections: u64,
    /// Guest connections connected to `<uds_path>_<port>`.
    pub guest_connections: u64,
    /// Connections refused: over the cap, no listener at `<uds_path>_<port>`,
    /// a bad `CONNECT` line, or the guest's RST to a `CONNECT`.
    pub connections_refused: u64,
    /// Connections open now (including ones being torn down).
    pub active_connections: u64,
    /// Packets sent to the guest.
    pub rx_packets: u64,
    /// Payload bytes sent to the guest.
    pub rx_bytes: u64,
    /// Packets taken from the guest.
    pub tx_packets: u64,
    /// Payload bytes written to host sockets.
    pub tx_bytes: u64,
    /// RSTs sent to the guest.
    pub rst_sent: u64,
    /// RSTs not sent: the guest posted no RX buffers and too many waited.
    pub rst_dropped: u64,
    /// Guest packets dropped as malformed (bad chain, length, address).
    pub bad_packets: u64,
    /// Host socket failures (a connection reset on the host side).
    pub host_errors: u64,
    /// Times the device asked the driver for a reset.
    pub needs_reset: u64,
    /// Guest-caused warnings not logged (rate limit).
    pub log_lines_suppressed: u64,
}

/// What a ring op of ours was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Listen = 1,
    Poll = 2,
    Read = 3,
    Write = 4,
    LineRead = 5,
    LineWrite = 6,
}

const GEN_MASK: u32 = 0xff_ffff;

fn tag(kind: Kind, slot: usize, generation: u32) -> u64 {
    ((kind as u64) << 40) | (((slot as u64) & 0xffff) << 24) | u64::from(generation & GEN_MASK)
}

fn untag(tag: u64) -> Option<(Kind, usize, u32)> {
    let kind = match tag >> 40 {
        1 => Kind::Listen,
        2 => Kind::Poll,
        3 => Kind::Read,
        4 => Kind::Write,
        5 => Kind::LineRead,
        6 => Kind::LineWrite,
        _ => return None,
    };
    Some((
        kind,
        ((tag >> 24) & 0xffff) as usize,
        (tag as u32) & GEN_MASK,
    ))
}

/// The next packet the guest should get.
#[derive(Clone, Copy, Debug)]
enum Job {
    /// An RST for a connection we do not (or no longer) have.
    Rst(u32, u32),
    /// A control packet connection `.0` owes (`ctrl::*` bit `.1`).
    Ctrl(usize, u8),
    /// Data from connection `.0`'s readable socket.
    Data(usize),
}

/// A virtio-vsock device with Firecracker's Unix-socket host side, owned
/// by the VMM thread.
#[derive(Debug)]
pub struct VsockDevice {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    queues: Virtqueues,
    /// Fixed-size connection table; a slot is `None` when free.
    conns: Vec<Option<Conn>>,
    /// Generation of each slot, bumped when it is reused.
    gens: Vec<u32>,
    /// Live connections by (host port, guest port).
    by_key: HashMap<(u32, u32), usize>,
    /// RSTs owed for connections we have no state for.
    rsts: VecDeque<(u32, u32)>,
    /// A poll on the listener is in the kernel.
    listen_op: bool,
    /// Generation of the listener's poll, so a stray completion is told
    /// from the real one.
    listen_gen: u32,
    /// The listener failed; no more host-initiated connections.
    listen_broken: bool,
    /// Next host port to try for a host-initiated connection.
    next_port: u32,
    /// TX heads held (their payload not yet written).
    tx_held: Vec<bool>,
    /// RX heads held (a read into them in the kernel).
    rx_held: Vec<bool>,
    /// Where the next round-robin scan for data starts.
    rr: usize,
    counters: VsockCounters,
    log: GuestLog,
}

// SAFETY: the raw pointers (iovecs into guest memory and into the
// connections' boxed line buffers) are only used on the VMM thread that
// owns the device; the memory they point at lives as long as the VM.
unsafe impl Send for VsockDevice {}

/// First host port given to host-initiated connections (high, as
/// Firecracker's, so they never collide with ports guests listen on).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

impl VsockDevice {
    /// A device for guest context id `cid` listening on `uds_path` (which
    /// must not exist yet); `line` is its interrupt.
    pub fn new(cid: u64, uds_path: &Path, line: Box<dyn InterruptLine>) -> std::io::Result<Self> {
        let listener = host::listen(uds_path)?;
        Ok(Self::with_listener(cid, uds_path, listener, line))
    }

    /// A device on an already bound, non-blocking listener.
    pub fn with_listener(
        cid: u64,
        uds_path: &Path,
        listener: UnixListener,
        line: Box<dyn InterruptLine>,
    ) -> Self {
        let config = cid.to_le_bytes().to_vec();
        let shared = Arc::new(DeviceShared::new(config, Vec::new()));
        let sizes = [QUEUE_MAX_SIZE; 3];
        Self {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            queues: Virtqueues::new("virtio-vsock", &sizes, Interrupt::new(shared, line)),
            conns: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            gens: vec![0; MAX_CONNECTIONS],
            by_key: HashMap::new(),
            rsts: VecDeque::new(),
            listen_op: false,
            listen_gen: 0,
            listen_broken: false,
            next_port: FIRST_LOCAL_PORT,
            tx_held: vec![false; usize::from(QUEUE_MAX_SIZE)],
            rx_held: vec![false; usize::from(QUEUE_MAX_SIZE)],
            rr: 0,
            counters: VsockCounters::default(),
            log: GuestLog::new("virtio-vsock"),
        }
    }

    /// The guest's context id.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Counters since the device was made.
    pub fn counters(&self) -> VsockCounters {
        VsockCounters {
            active_connections: self.conns.iter().flatten().count() as u64,
            needs_reset: self.queues.resets_requested(),
            log_lines_suppressed: self.log.suppressed() + self.queues.log_lines_suppressed(),
            ..self.counters
        }
    }

    fn conn(&mut self, i: usize) -> Option<&mut Conn> {
        self.conns.get_mut(i).and_then(Option::as_mut)
    }

    fn gen(&self, i: usize) -> u32 {
        self.gens.get(i).copied().unwrap_or(0)
    }

    /// Takes a free slot for `conn`; `None` (and `conn` dropped, closing
    /// its socket) at the cap.
    fn insert(&mut self, conn: Conn) -> Option<usize> {
        let i = self.conns.iter().position(Option::is_none)?;
        if let Some(g) = self.gens.get_mut(i) {
            *g = g.wrapping_add(1);
        }
        if let Some(slot) = self.conns.get_mut(i) {
            *slot = Some(conn);
        }
        Some(i)
    }

    fn queue_rst(&mut self, local: u32, peer: u32) {
        if self.rsts.len() >= MAX_PENDING_RST {
            self.counters.rst_dropped += 1;
            return;
        }
        self.rsts.push_back((local, peer));
    }

    /// Starts tearing connection `i` down, owing the guest an RST if `rst`.
    fn close(&mut self, i: usize, rst: bool) {
        let Some(c) = self.conn(i) else {
            return;
        };
        if c.closing {
            return;
        }
        c.closing = true;
        c.ctrl = 0;
        let key = (c.local_port, c.peer_port);
        let known = c.state != State::Connecting;
        if known && self.by_key.get(&key) == Some(&i) {
            self.by_key.remove(&key);
        }
        if rst && known {
            self.queue_rst(key.0, key.1);
        }
    }

    fn host_failure(&mut self, i: usize, what: &str, res: i32) {
        self.counters.host_errors += 1;
        log::debug!(
            "virtio-vsock: connection {i}: {what} failed: errno {}",
            -res
        );
        self.close(i, true);
    }

    /// Returns TX chain `head` to the driver.
    fn return_tx<M: GuestMemory>(&mut self, mem: &M, head: u16) {
        if let Some(h) = self.tx_held.get_mut(usize::from(head)) {
            *h = false;
        }
        let _ = self.queues.add_used(TX_QUEUE, mem, head, 0);
    }

    /// Returns RX chain `head` to the driver with `len` bytes written.
    fn return_rx<M: GuestMemory>(&mut self, mem: &M, head: u16, len: u32) {
        if let Some(h) = self.rx_held.get_mut(usize::from(head)) {
            *h = false;
        }
        if self.queues.add_used(RX_QUEUE, mem, head, len).is_ok() && len > 0 {
            self.counters.rx_packets += 1;
        }
    }

    /// Frees torn-down connections whose ops all came back: held guest
    /// data goes back to the driver (unless a reset took the queues), the
    /// socket is closed.
    fn reap<M: GuestMemory>(&mut self, mem: &M) {
        for i in 0..self.conns.len() {
            let done = self
                .conns
                .get(i)
                .and_then(Option::as_ref)
                .is_some_and(|c| c.closing && c.ops.count() == 0);
            if !done {
                continue;
            }
            let Some(conn) = self.conns.get_mut(i).and_then(Option::take) else {
                continue;
            };
            if !conn.orphaned {
                for held in &conn.tx {
                    self.return_tx(mem, held.head);
                }
            }
        }
    }

    /// A guest connection to host port `h.dst_port`: connect to
    /// `<uds_path>_<port>` now (never waiting), RESPONSE or RST.
    fn guest_connect(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        let free = self.conns.iter().any(Option::is_none);
        if !free {
            self.counters.connections_refused += 1;
            self.log.warn(
                "cap",
                format_args!(
                    "connection to port {} refused: {MAX_CONNECTIONS} open",
                    h.dst_port
                ),
            );
            self.queue_rst(key.0, key.1);
            return;
        }
        let path = host::port_path(&self.uds_path, h.dst_port);
        match host::connect(&path) {
            Ok(fd) => {
                let mut conn = Conn::new(fd, key.0, key.1, State::Established, CONN_BUF_ALLOC);
                conn.credit.update_peer(h.buf_alloc, h.fwd_cnt);
                conn.ctrl |= ctrl::RESPONSE;
                if let Some(i) = self.insert(conn) {
                    self.by_key.insert(key, i);
                    self.counters.guest_connections += 1;
                }
            }
            Err(e) => {
                self.counters.connections_refused += 1;
                log::debug!("virtio-vsock: guest connect to {}: {e}", path.display());
                self.queue_rst(key.0, key.1);
            }
        }
    }

    /// Acts on one well-formed guest packet; true if its chain is now held
    /// (payload queued for the host socket).
    fn on_packet(&mut self, pkt: TxPacket, head: u16) -> bool {
        let h = pkt.hdr;
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            self.counters.bad_packets += 1;
            self.log.warn(
                "address",
                format_args!("packet from cid {} to cid {} dropped", h.src_cid, h.dst_cid),
            );
            return false;
        }
        let key = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM {
            self.counters.bad_packets += 1;
            if h.op != OP_RST {
                self.queue_rst(key.0, key.1);
            }
            return false;
        }
        let found = self.by_key.get(&key).copied();
        let Some(i) = found else {
            match h.op {
                OP_REQUEST => self.guest_connect(&h),
                OP_RST => {}
                _ => self.queue_rst(key.0, key.1),
            }
            return false;
        };
        let Some(c) = self.conn(i) else {
            return false;
        };
        c.credit.update_peer(h.buf_alloc, h.fwd_cnt);
        match h.op {
            OP_RST => {
                if c.state == State::Requested {
                    self.counters.connections_refused += 1;
                }
                self.close(i, false);
            }
            OP_RESPONSE if c.state == State::Requested => {
                c.state = State::Established;
                let port = c.local_port;
                c.line.len = host::ok_line(port, &mut c.line.bytes);
                c.line.sent = 0;
                c.line_out = true;
                self.counters.host_connections += 1;
            }
            OP_RW if c.state == State::Established && c.guest_shut & SHUTDOWN_SEND == 0 => {
                if h.len == 0 {
                    return false;
                }
                if let Err(e) = c.credit.receive(h.len) {
                    self.counters.bad_packets += 1;
                    self.log
                        .warn("credit", format_args!("connection reset: {e}"));
                    self.close(i, true);
                    return false;
                }
                c.tx.push_back(HeldTx {
                    head,
                    data: pkt.data,
                });
                if let Some(held) = self.tx_held.get_mut(usize::from(head)) {
                    *held = true;
                }
                return true;
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => c.ctrl |= ctrl::CREDIT_UPDATE,
            OP_SHUTDOWN if c.state == State::Established => c.guest_shut |= h.flags & SHUTDOWN_BOTH,
            // A second REQUEST, a RESPONSE out of turn, data before the
            // connection is up or after the guest said it would send no
            // more, an unknown op: the connection is reset.
            _ => {
                self.counters.bad_packets += 1;
                self.close(i, true);
            }
        }
        false
    }

    /// One TX chain: parse, act, and answer it now unless its payload is
    /// held for the host socket.
    fn take_tx<M: GuestMemory>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        chain: DescriptorChain<&M>,
        head: u16,
    ) -> Result<ChainTaken, String> {
        if self.tx_held.get(usize::from(head)).copied().unwrap_or(true) {
            return Err(format!("TX head {head} reused while the device holds it"));
        }
        self.counters.tx_packets += 1;
        let held = match read_tx(mem, chain, MAX_PKT_DATA) {
            Ok(pkt) => self.on_packet(pkt, head),
            Err((hdr, e)) => {
                self.counters.bad_packets += 1;
                self.log.warn("packet", format_args!("packet dropped: {e}"));
                // A packet naming a connection of ours resets it.
                if let Some(h) = hdr.filter(|h| h.src_cid == self.cid) {
                    if let Some(&i) = self.by_key.get(&(h.dst_port, h.src_port)) {
                        self.close(i, true);
                    }
                }
                false
            }
        };
        if held {
            return Ok(ChainTaken::Submitted);
        }
        q.add_used(mem, head, 0)
            .map_err(|e| format!("used ring: {e}"))?;
        Ok(ChainTaken::Answered)
    }

    /// Accepts the host clients waiting on the listener (a few per
    /// readiness, so a flood cannot hold the VMM thread).
    fn accept_clients(&mut self) {
        for _ in 0..16 {
            match host::accept(&self.listener) {
                Ok(Some(fd)) => {
                    let conn = Conn::new(fd, 0, 0, State::Connecting, CONN_BUF_ALLOC);
                    if self.insert(conn).is_none() {
                        self.counters.connections_refused += 1;
                        log::warn!(
                            "virtio-vsock: host client refused: {MAX_CONNECTIONS} connections open"
                        );
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::warn!("virtio-vsock: accept on {}: {e}", self.uds_path.display());
                    break;
                }
            }
        }
    }

    /// A host port for a host-initiated connection to guest port `peer`,
    /// not used by another connection to it.
    fn alloc_port(&mut self, peer: u32) -> u32 {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.by_key.contains_key(&(port, peer)) {
                return port;
            }
        }
        // At most MAX_CONNECTIONS keys exist, so one of the
        // MAX_CONNECTIONS + 1 ports tried was free.
        self.next_port
    }

    fn on_line_read(&mut self, i: usize, res: i32) {
        let Some(c) = self.conn(i) else {
            return;
        };
        if c.closing {
            return;
        }
        if res != 1 {
            self.counters.connections_refused += 1;
            self.close(i, false);
            return;
        }
        let at = c.line.len;
        c.line.len += 1;
        let byte = c.line.bytes.get(at).copied().unwrap_or(0);
        if byte != b'\n' {
            if c.line.len >= host::MAX_CONNECT_LINE {
                self.counters.connections_refused += 1;
                self.close(i, false);
            }
            return;
        }
        let line = c.line.bytes.get(..c.line.len).unwrap_or(&[]);
        let Some(peer) = host::parse_connect(line) else {
            self.counters.connections_refused += 1;
            log::debug!("virtio-vsock: host client sent a bad CONNECT line");
            self.close(i, false);
            return;
        };
        let local = self.alloc_port(peer);
        if let Some(c) = self.conn(i) {
            c.local_port = local;
            c.peer_port = peer;
            c.state = State::Requested;
            c.ctrl |= ctrl::REQUEST;
            self.by_key.insert((local, peer), i);
        }
    }

    fn on_read<M: GuestMemory>(&mut self, mem: &M, i: usize, res: i32) {
        let cid = self.cid;
        let Some(c) = self.conn(i) else {
            return;
        };
        let Some(rx) = c.ops.read.take() else {
            return;
        };
        if c.orphaned {
            // The reset gave the buffer back to the driver already.
            return;
        }
        if c.closing {
            self.return_rx(mem, rx.head, 0);
            return;
        }
        c.readable = false;
        let mut hdr = Header::to_guest(HOST_CID, c.local_port, cid, c.peer_port, OP_RW);
        match res {
            n if n > 0 => {
                let n = (n as u32).min(rx.data_len as u32);
                hdr.len = n;
                c.credit.sent(n);
                (hdr.buf_alloc, hdr.fwd_cnt) = c.credit.stamp();
                self.counters.rx_bytes += u64::from(n);
                let len = (HDR_LEN as u32).saturating_add(n);
                match rx.write_header(mem, &hdr) {
                    Ok(()) => self.return_rx(mem, rx.head, len),
                    Err(_) => self.return_rx(mem, rx.head, 0),
                }
            }
            0 => {
                // End of file: the host will send no more.
                c.host_eof = true;
                hdr.op = OP_SHUTDOWN;
                hdr.flags = SHUTDOWN_SEND;
                (hdr.buf_alloc, hdr.fwd_cnt) = c.credit.stamp();
                match rx.write_header(mem, &hdr) {
                    Ok(()) => self.return_rx(mem, rx.head, HDR_LEN as u32),
                    Err(_) => self.return_rx(mem, rx.head, 0),
                }
            }
            e => {
                self.return_rx(mem, rx.head, 0);
                if e != -libc::EAGAIN && e != -libc::EINTR {
                    self.host_failure(i, "read", e);
                }
            }
        }
    }

    fn on_write<M: GuestMemory>(&mut self, mem: &M, i: usize, res: i32) {
        let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        if c.closing {
            return;
        }
        if res == -libc::EAGAIN || res == -libc::EINTR {
            return;
        }
        if res <= 0 {
            self.host_failure(i, "write", res);
            return;
        }
        let n = res as usize;
        c.credit.forwarded(n as u32);
        self.counters.tx_bytes += n as u64;
        let Some(front) = c.tx.front_mut() else {
            return;
        };
        advance(&mut front.data, n);
        if iov_len(&front.data) == 0 {
            if let Some(done) = c.tx.pop_front() {
                self.return_tx(mem, done.head);
            }
        }
    }

    fn on_line_write(&mut self, i: usize, res: i32) {
        let Some(c) = self.conn(i) else {
            return;
        };
        if c.closing {
            return;
        }
        if res <= 0 {
            if res != -libc::EAGAIN && res != -libc::EINTR {
                self.host_failure(i, "write of the OK line", res);
            }
            return;
        }
        c.line.sent = c.line.sent.saturating_add(res as usize);
        if c.line.sent >= c.line.len {
            c.line_out = false;
        }
    }

    /// Whether the op a completion's tag names is one we have in the
    /// kernel (a stray or repeated completion is ignored).
    fn op_in_flight(&self, kind: Kind, i: usize, g: u32) -> bool {
        if kind == Kind::Listen {
            return self.listen_op && self.listen_gen & GEN_MASK == g;
        }
        if self.gen(i) & GEN_MASK != g {
            return false;
        }
        let Some(c) = self.conns.get(i).and_then(Option::as_ref) else {
            return false;
        };
        match kind {
            Kind::Poll => c.ops.poll,
            Kind::Read => c.ops.read.is_some(),
            Kind::Write => c.ops.write,
            Kind::LineRead => c.ops.line_read,
            Kind::LineWrite => c.ops.line_write,
            Kind::Listen => false,
        }
    }

    /// Submits `op` tagged `t`; false if the ring refused it (retried on
    /// the next pass).
    ///
    /// # Safety
    /// As [`IoSubmit::submit`]: what `op` points at stays valid until its
    /// completion.
    unsafe fn submit(&mut self, io: &mut dyn IoSubmit, op: IoOp, t: u64) -> bool {
        // SAFETY: forwarded from the caller.
        match unsafe { io.submit(op, t) } {
            Ok(()) => true,
            Err(e) => {
                log::debug!("virtio-vsock: ring refused an op: {e}");
                false
            }
        }
    }

    fn arm_listener(&mut self, io: &mut dyn IoSubmit) {
        if self.listen_op || self.listen_broken {
            return;
        }
        let op = IoOp::Poll {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN as u32,
        };
        let g = self.listen_gen.wrapping_add(1);
        // SAFETY: a poll points at no memory; the listener outlives the
        // device's ops (the VMM drops the ring first).
        self.listen_op = unsafe { self.submit(io, op, tag(Kind::Listen, 0, g)) };
        if self.listen_op {
            self.listen_gen = g;
        }
    }

    /// Submits what connection `i` needs next: its CONNECT line read, the
    /// OK line or guest data to write, a poll for host data; and notes a
    /// credit update or a finished shutdown.
    fn arm_conn(&mut self, i: usize, io: &mut dyn IoSubmit) {
        let g = self.gen(i);
        let Some(c) = self.conn(i) else {
            return;
        };
        if c.closing {
            return;
        }
        let fd = c.raw_fd();
        if c.state == State::Connecting {
            if c.ops.line_read {
                return;
            }
            let Some(iov) = c.line_read_iov() else {
                self.close(i, false);
                return;
            };
            let op = IoOp::Readv {
                fd,
                iovecs: iov,
                iovcnt: 1,
                offset: 0,
            };
            // SAFETY: the iovec and the byte it names are in the
            // connection's boxed line, kept until the op completes (a
            // connection is freed only when its ops are all back).
            if unsafe { self.submit(io, op, tag(Kind::LineRead, i, g)) } {
                if let Some(c) = self.conn(i) {
                    c.ops.line_read = true;
                }
            }
            return;
        }
        let mut op = None;
        if !c.ops.write && !c.ops.line_write {
            if c.line_out {
                match c.line_write_iov() {
                    Some(iov) => op = Some((Kind::LineWrite, iov, 1)),
                    None => c.line_out = false,
                }
            }
            if op.is_none() && !c.line_out && c.state == State::Established {
                if let Some(front) = c.tx.front() {
                    op = Some((Kind::Write, front.data.as_ptr(), front.data.len() as u32));
                } else if c.guest_shut == SHUTDOWN_BOTH {
                    // Everything the guest sent before it finished is
                    // written: the connection is over (RST completes the
                    // guest's close).
                    self.close(i, true);
                    return;
                } else if c.guest_shut & SHUTDOWN_SEND != 0 && !c.host_write_shut {
                    // Everything the guest sent before its SHUTDOWN is
                    // written: pass the end of stream on.
                    c.host_write_shut = true;
                    if let Err(e) = host::shutdown_write(fd) {
                        log::debug!("virtio-vsock: shutdown of a host socket: {e}");
                    }
                }
            }
        }
        if let Some((kind, iovecs, iovcnt)) = op {
            let op = IoOp::Writev {
                fd,
                iovecs,
                iovcnt,
                offset: 0,
            };
            // SAFETY: the iovecs are the connection's boxed line or the
            // front held TX packet's (heap, unmoved until the op
            // completes), over the OK line or guest TX buffers the device
            // holds until then.
            if unsafe { self.submit(io, op, tag(kind, i, g)) } {
                if let Some(c) = self.conn(i) {
                    match kind {
                        Kind::LineWrite => c.ops.line_write = true,
                        _ => c.ops.write = true,
                    }
                }
            }
        }
        let Some(c) = self.conn(i) else {
            return;
        };
        if c.state == State::Established && c.credit.update_due() {
            c.ctrl |= ctrl::CREDIT_UPDATE;
        }
        if c.wants_data() && !c.readable && !c.ops.poll {
            let op = IoOp::Poll {
                fd,
                events: libc::POLLIN as u32,
            };
            // SAFETY: a poll points at no memory.
            if unsafe { self.submit(io, op, tag(Kind::Poll, i, g)) } {
                if let Some(c) = self.conn(i) {
                    c.ops.poll = true;
                }
            }
        }
    }

    fn next_job(&self) -> Option<Job> {
        if let Some(&(l, p)) = self.rsts.front() {
            return Some(Job::Rst(l, p));
        }
        let n = self.conns.len();
        let order = (0..n).map(|k| (self.rr + k) % n.max(1));
        let live = |i: usize| {
            self.conns
                .get(i)
                .and_then(Option::as_ref)
                .filter(|c| !c.closing)
        };
        for i in order.clone() {
            if let Some(c) = live(i) {
                if c.ctrl != 0 {
                    return Some(Job::Ctrl(i, c.ctrl & c.ctrl.wrapping_neg()));
                }
            }
        }
        order
            .filter(|&i| live(i).is_some_and(|c| c.readable && c.wants_data()))
            .map(Job::Data)
            .next()
    }

    /// Pops one RX chain, re-enabling notifications when the ring is
    /// empty (so the driver kicks when it posts more).
    fn pop_rx<'m, M: GuestMemory>(&mut self, mem: &'m M) -> Option<DescriptorChain<&'m M>> {
        let mut broken = None;
        let mut chain = None;
        if let Some(q) = self.queues.live(RX_QUEUE) {
            for _ in 0..2 {
                match q.iter(mem) {
                    Ok(mut it) => chain = it.next(),
                    Err(e) => {
                        broken = Some(e.to_string());
                        break;
                    }
                }
                if chain.is_some() {
                    break;
                }
                match q.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        broken = Some(format!("enabling notifications: {e}"));
                        break;
                    }
                }
            }
            if let Some(c) = &chain {
                if c.head_index() >= q.size() {
                    broken = Some(format!("head index {} outside the queue", c.head_index()));
                }
            }
        }
        if let Some(why) = broken {
            let _ = self.queues.break_queue(RX_QUEUE, why);
            return None;
        }
        chain
    }

    /// Gives the guest what it is owed, as long as it posted RX buffers.
    fn fill_rx<M: GuestMemory>(&mut self, mem: &M, io: &mut dyn IoSubmit) {
        for _ in 0..usize::from(QUEUE_MAX_SIZE) * 2 {
            let Some(job) = self.next_job() else {
                return;
            };
            let Some(chain) = self.pop_rx(mem) else {
                return;
            };
            let head = chain.head_index();
            if self.rx_held.get(usize::from(head)).copied().unwrap_or(true) {
                let why = format!("RX head {head} reused while the device holds it");
                let _ = self.queues.break_queue(RX_QUEUE, why);
                return;
            }
            let mut rx = match RxBuffer::map(mem, chain, head, MAX_PKT_DATA as usize) {
                Ok(rx) => rx,
                Err(e) => {
                    self.counters.bad_packets += 1;
                    self.log
                        .warn("rx-buffer", format_args!("RX buffer refused: {e}"));
                    self.return_rx(mem, head, 0);
                    continue;
                }
            };
            match job {
                Job::Rst(local, peer) => {
                    self.rsts.pop_front();
                    let hdr = Header::to_guest(HOST_CID, local, self.cid, peer, OP_RST);
                    self.counters.rst_sent += 1;
                    self.send_header(mem, &rx, &hdr);
                }
                Job::Ctrl(i, bit) => {
                    let cid = self.cid;
                    let Some(c) = self.conn(i) else { continue };
                    c.ctrl &= !bit;
                    let op = match bit {
                        ctrl::REQUEST => OP_REQUEST,
                        ctrl::RESPONSE => OP_RESPONSE,
                        _ => OP_CREDIT_UPDATE,
                    };
                    let mut hdr = Header::to_guest(HOST_CID, c.local_port, cid, c.peer_port, op);
                    (hdr.buf_alloc, hdr.fwd_cnt) = c.credit.stamp();
                    self.send_header(mem, &rx, &hdr);
                }
                Job::Data(i) => {
                    self.rr = (i + 1) % self.conns.len().max(1);
                    let g = self.gen(i);
                    let Some(c) = self.conn(i) else { continue };
                    let n = (c.credit.peer_credit() as usize).min(rx.data_len);
                    if n == 0 {
                        // A buffer with no room after the header.
                        self.return_rx(mem, head, 0);
                        continue;
                    }
                    rx.limit(n);
                    let fd = c.raw_fd();
                    let op = IoOp::Readv {
                        fd,
                        iovecs: rx.data.as_ptr(),
                        iovcnt: rx.data.len() as u32,
                        offset: 0,
                    };
                    // SAFETY: the iovecs live in `rx.data` (heap, moved
                    // with `rx` into the connection below without moving
                    // its buffer) over a guest RX buffer the device holds
                    // until the read completes.
                    if unsafe { self.submit(io, op, tag(Kind::Read, i, g)) } {
                        if let Some(h) = self.rx_held.get_mut(usize::from(head)) {
                            *h = true;
                        }
                        if let Some(c) = self.conn(i) {
                            c.ops.read = Some(rx);
                        }
                    } else {
                        if let Some(q) = self.queues.live(RX_QUEUE) {
                            q.go_to_previous_position();
                        }
                        return;
                    }
                }
            }
        }
    }

    fn send_header<M: GuestMemory>(&mut self, mem: &M, rx: &RxBuffer, hdr: &Header) {
        match rx.write_header(mem, hdr) {
            Ok(()) => self.return_rx(mem, rx.head, HDR_LEN as u32),
            Err(_) => self.return_rx(mem, rx.head, 0),
        }
    }

    /// One pass after any event: arm, fill the guest's buffers, arm what
    /// filling made possible, fill again, free what is finished.
    fn service<M: GuestMemory>(&mut self, mem: &M, io: &mut dyn IoSubmit) {
        if self.queues.is_active() {
            self.arm_listener(io);
            for _ in 0..2 {
                for i in 0..self.conns.len() {
                    self.arm_conn(i, io);
                }
                self.fill_rx(mem, io);
            }
        }
        self.reap(mem);
    }
}

impl<M: GuestMemory> VirtioDevice<M> for VsockDevice {
    fn kind(&self) -> &'static str {
        "vsock"
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn queues(&self) -> &Virtqueues {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut Virtqueues {
        &mut self.queues
    }

    fn reset(&mut self) {
        self.queues.reset();
        // Every connection goes: its guest buffers are the driver's again,
        // its socket is closed once the kernel gave back its ops (the
        // slot cancels them through `stale_tags`).
        for c in self.conns.iter_mut().flatten() {
            c.closing = true;
            c.orphaned = true;
            c.ctrl = 0;
            c.tx.clear();
        }
        for slot in &mut self.conns {
            if slot.as_ref().is_some_and(|c| c.ops.count() == 0) {
                *slot = None;
            }
        }
        self.by_key.clear();
        self.rsts.clear();
        self.tx_held.fill(false);
        self.rx_held.fill(false);
    }

    fn process_queue(
        &mut self,
        qidx: usize,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, DeviceError> {
        let out = match qidx {
            TX_QUEUE => drain_queue(
                self,
                |d| &mut d.queues,
                qidx,
                mem,
                |d, q, chain, head| d.take_tx(q, mem, chain, head),
            ),
            RX_QUEUE | EVENT_QUEUE => Ok(ProcessOutcome::default()),
            _ => return Err(DeviceError::NoSuchQueue(qidx)),
        };
        self.service(mem, io);
        out
    }

    fn complete(&mut self, tag: u64, res: i32, mem: &M, io: &mut dyn IoSubmit) {
        let Some((kind, i, g)) = untag(tag) else {
            log::debug!("virtio-vsock: completion for unknown tag {tag:#x}");
            return;
        };
        if !self.op_in_flight(kind, i, g) {
            log::debug!("virtio-vsock: completion for no op in flight {tag:#x}");
            return;
        }
        if kind == Kind::Listen {
            self.listen_op = false;
            if res < 0 && res != -libc::ECANCELED {
                self.listen_broken = true;
                log::warn!(
                    "virtio-vsock: polling {} failed (errno {}); no more host connections",
                    self.uds_path.display(),
                    -res
                );
            } else if res > 0 && self.queues.is_active() {
                self.accept_clients();
            }
        } else {
            match kind {
                Kind::Poll => {
                    if let Some(c) = self.conn(i) {
                        c.ops.poll = false;
                        if res > 0 {
                            c.readable = true;
                        } else if res != -libc::ECANCELED && !c.closing {
                            self.host_failure(i, "poll", res);
                        }
                    }
                }
                Kind::Read => self.on_read(mem, i, res),
                Kind::Write => {
                    if let Some(c) = self.conn(i) {
                        c.ops.write = false;
                    }
                    self.on_write(mem, i, res);
                }
                Kind::LineRead => {
                    if let Some(c) = self.conn(i) {
                        c.ops.line_read = false;
                    }
                    self.on_line_read(i, res);
                }
                Kind::LineWrite => {
                    if let Some(c) = self.conn(i) {
                        c.ops.line_write = false;
                    }
                    self.on_line_write(i, res);
                }
                Kind::Listen => {}
            }
        }
        self.service(mem, io);
    }

    fn in_flight(&self) -> usize {
        usize::from(self.listen_op)
            + self
                .conns
                .iter()
                .flatten()
                .map(|c| c.ops.count())
                .sum::<usize>()
    }

    fn stale_tags(&self) -> Vec<u64> {
        let mut tags = Vec::new();
        for (i, c) in self.conns.iter().enumerate() {
            let Some(c) = c.as_ref().filter(|c| c.closing) else {
                continue;
            };
            let g = self.gen(i);
            let ops = [
                (c.ops.poll, Kind::Poll),
                (c.ops.read.is_some(), Kind::Read),
                (c.ops.write, Kind::Write),
                (c.ops.line_read, Kind::LineRead),
                (c.ops.line_write, Kind::LineWrite),
            ];
            tags.extend(ops.iter().filter(|o| o.0).map(|o| tag(o.1, i, g)));
        }
        if self.listen_op && !self.queues.is_active() {
            tags.push(tag(Kind::Listen, 0, self.listen_gen));
        }
        tags
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.counters()).unwrap_or_default()
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Drop for VsockDevice {
    /// Removes the listening socket's file, as the VMM made it.
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            log::debug!("virtio-vsock: removing {}: {e}", self.uds_path.display());
        }
    }
}
