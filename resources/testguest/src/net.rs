//! virtio-net (VIRTIO 1.2 §5.1) by hand: both queues, RX buffers, TX
//! chains in any layout, and the few packets the cases need (ARP, ICMP
//! echo over IPv4) built and checked in software.
//!
//! The peer is the host end of the tap, which answers ARP and pings by
//! itself: the guest is [`GUEST_IP`], the host [`PEER_IP`] (link-local).
//! Frames nobody asked for (IPv6 neighbour discovery, replies to earlier
//! cases) are skipped, never failed on.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::mem::{self, r16, r32, r64, w8};
use crate::msg::{Msg, R};
use crate::virtio::*;
use crate::{ensure, fail};

pub const DEVICE_ID: u32 = 1;

pub const F_MAC: u64 = 1 << 5;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;

pub const S_LINK_UP: u16 = 1;

/// `struct virtio_net_hdr_v1` (VERSION_1: always with num_buffers).
pub const HDR_LEN: usize = 12;
pub const NUM_BUFFERS: usize = 10;
pub const RXQ: u32 = 0;
pub const TXQ: u32 = 1;
/// What a driver without MRG_RXBUF or GUEST_TSO must post at least
/// (§5.1.6.3.1): the header and a 1514-byte Ethernet frame.
pub const BUF_LEN: u32 = 1526;
pub const QSIZE: u16 = 32;
/// Receive buffers posted by [`Net::post_plain`].
pub const NBUFS: u16 = 16;

pub const GUEST_IP: [u8; 4] = [169, 254, 88, 2];
pub const PEER_IP: [u8; 4] = [169, 254, 88, 1];
/// ICMP echo identifier of every ping ("vt").
pub const ECHO_ID: u16 = 0x7674;
/// Largest frame [`Net::recv`] reassembles.
const SCRATCH: usize = 16384;

/// The peer's MAC once ARP found it (bit 63 = known).
static PEER_MAC: AtomicU64 = AtomicU64::new(0);
/// The next echo sequence number: unique over the whole run, so a late
/// reply from an earlier case is never taken for this one's.
static SEQ: AtomicU32 = AtomicU32::new(1);

pub fn next_seq() -> u16 {
    SEQ.fetch_add(1, Ordering::Relaxed) as u16
}

/// The features a polite driver takes: no offloads, so both sides send
/// complete checksums.
pub fn polite_features(dev: &Dev) -> u64 {
    F_VERSION_1 | (dev.offered & (F_MAC | F_STATUS))
}

/// A device brought up with both queues.
pub struct Net {
    pub dev: Dev,
    pub features: u64,
    pub mac: [u8; 6],
    pub rx: Vq,
    pub tx: Vq,
    /// Where received frames are put together (header included).
    scratch: u64,
    /// An RX head the device should hand back empty (hostile cases).
    pub bad_head: Option<u16>,
    pub bad_returned: bool,
}

/// A received frame, copied out of its buffers.
pub struct Frame {
    /// Header then frame, in the scratch area.
    pub addr: u64,
    /// Bytes after the header.
    pub len: usize,
    pub num_buffers: u16,
    /// Used entries it came in.
    pub chains: u16,
}

impl Frame {
    pub fn bytes(&self) -> &'static [u8] {
        // SAFETY: the scratch area is arena memory the device no longer
        // writes (it was copied there from used buffers).
        unsafe { core::slice::from_raw_parts((self.addr + HDR_LEN as u64) as *const u8, self.len) }
    }
}

impl Net {
    /// Reset, `features`, both queues of [`QSIZE`], DRIVER_OK. No receive
    /// buffers are posted.
    pub fn up(dev: Dev, features: u64) -> Result<Net, Msg> {
        dev.negotiate(features)?;
        for q in [RXQ, TXQ] {
            dev.w(QUEUE_SEL, q);
            let max = dev.r(QUEUE_NUM_MAX);
            ensure!(
                max >= u32::from(QSIZE),
                "queue {q}: QueueNumMax {max}, need {QSIZE}"
            );
        }
        let rx = Vq::new(QSIZE);
        let tx = Vq::new(QSIZE);
        dev.setup_queue(RXQ, &rx);
        dev.setup_queue(TXQ, &tx);
        dev.driver_ok()?;
        let mut mac = [0u8; 6];
        if features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = dev.cfg8(i as u64);
            }
        } else {
            mac = [0x02, 0, 0, 0, 0x88, 0x02];
        }
        Ok(Net {
            dev,
            features,
            mac,
            rx,
            tx,
            scratch: mem::alloc(SCRATCH, 64),
            bad_head: None,
            bad_returned: false,
        })
    }

    /// Up with the polite features plus `extra` (if offered).
    pub fn polite(dev: Dev, extra: u64) -> Result<Net, Msg> {
        let f = polite_features(&dev) | (dev.offered & extra);
        ensure!(
            f & extra == extra,
            "the device does not offer {:#x}",
            extra & !f
        );
        Net::up(dev, f)
    }

    pub fn mrg(&self) -> bool {
        self.features & F_MRG_RXBUF != 0
    }

    /// Writes `count` receive chains made of buffers of `sizes` bytes into
    /// descriptors `first..`, publishes them, notifies.
    pub fn post_chains(&mut self, first: u16, count: u16, sizes: &[u32]) {
        let n = sizes.len() as u16;
        for c in 0..count {
            let head = first + c * n;
            for (i, &len) in sizes.iter().enumerate() {
                let i = i as u16;
                let buf = mem::alloc(len as usize, 64);
                let last = i + 1 == n;
                let (flags, next) = if last {
                    (D_WRITE, 0)
                } else {
                    (D_WRITE | D_NEXT, head + i + 1)
                };
                self.rx.set_desc(head + i, buf, len, flags, next);
            }
            self.rx.publish(head);
        }
        self.dev.notify(RXQ);
    }

    /// [`NBUFS`] one-descriptor buffers of [`BUF_LEN`] at descriptors 0...
    pub fn post_plain(&mut self) {
        self.post_chains(0, NBUFS, &[BUF_LEN]);
    }

    /// Sends `frame` (a [`Pkt`]) laid out as `layout`, waits for the chain
    /// to come back (used len 0: the device writes nothing).
    pub fn send(&mut self, p: &Pkt, layout: Layout) -> R {
        let total = (HDR_LEN + p.len) as u32;
        let b = p.base;
        let head = match layout {
            Layout::Split => self
                .tx
                .chain(0, &[(b, HDR_LEN as u32, 0), (b + 12, p.len as u32, 0)]),
            Layout::Joined => self.tx.chain(0, &[(b, total, 0)]),
            Layout::Scattered => self.tx.chain(
                0,
                &[
                    (b, 5, 0),
                    (b + 5, 7 + 20, 0),
                    (b + 32, 1, 0),
                    (b + 33, total - 33, 0),
                ],
            ),
        };
        self.tx.publish(head);
        self.dev.notify(TXQ);
        match self.tx.wait(&self.dev, WAIT_MS) {
            Wait::Used { id, len } => {
                ensure!(id == u32::from(head), "TX used id {id}, expected {head}");
                ensure!(len == 0, "TX used len {len}: the device wrote nothing");
                Ok(())
            }
            Wait::NeedsReset => fail!("NEEDS_RESET after a good TX chain"),
            Wait::Timeout => fail!("TX chain not returned within {WAIT_MS} ms"),
        }
    }

    /// Copies the chain at `head` (walking our own descriptor table) into
    /// the scratch area at `at`, at most `len` bytes; returns the bytes
    /// copied.
    fn copy_chain(&self, head: u16, len: usize, at: usize) -> Result<usize, Msg> {
        let mut i = head;
        let mut left = len;
        let mut out = at;
        for _ in 0..QSIZE {
            let d = self.rx.desc_addr(i);
            let (addr, dlen, flags, next) = (r64(d), r32(d + 8), r16(d + 12), r16(d + 14));
            let n = (dlen as usize).min(left);
            ensure!(out + n <= SCRATCH, "frame longer than {SCRATCH} bytes");
            // SAFETY: both ranges are arena memory: the posted buffer and
            // the scratch area.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    addr as *const u8,
                    (self.scratch + out as u64) as *mut u8,
                    n,
                )
            };
            out += n;
            left -= n;
            if flags & D_NEXT == 0 || left == 0 {
                break;
            }
            i = next;
        }
        ensure!(
            left == 0,
            "used len {len} is longer than chain {head} ({} bytes)",
            len - left
        );
        Ok(out - at)
    }

    /// The next used RX entry that is not the expected return of
    /// `bad_head`; `None` at the timeout.
    fn next_used(&mut self, ms: u64) -> Result<Option<(u16, u32)>, Msg> {
        loop {
            match self.rx.wait(&self.dev, ms) {
                Wait::Used { id, len } => {
                    ensure!(id < u32::from(QSIZE), "RX used id {id} outside the queue");
                    let id = id as u16;
                    if Some(id) == self.bad_head {
                        ensure!(len == 0, "bad RX chain {id} came back with used len {len}");
                        self.bad_returned = true;
                        continue;
                    }
                    return Ok(Some((id, len)));
                }
                Wait::NeedsReset => fail!("device set NEEDS_RESET while receiving"),
                Wait::Timeout => return Ok(None),
            }
        }
    }

    /// Receives one frame (all its buffers with MRG_RXBUF), copies it to
    /// the scratch area, and posts its buffers again. `None` when nothing
    /// came within `ms`.
    pub fn recv(&mut self, ms: u64) -> Result<Option<Frame>, Msg> {
        let Some((id, len)) = self.next_used(ms)? else {
            return Ok(None);
        };
        ensure!(
            len as usize > HDR_LEN,
            "RX used len {len} (chain {id}): not more than the header"
        );
        let mut got = self.copy_chain(id, len as usize, 0)?;
        let num_buffers = r16(self.scratch + NUM_BUFFERS as u64);
        let mut heads = [0u16; QSIZE as usize];
        heads[0] = id;
        let mut chains = 1u16;
        if self.mrg() {
            ensure!(
                (1..=QSIZE).contains(&num_buffers),
                "num_buffers {num_buffers}"
            );
            while chains < num_buffers {
                let Some((id, len)) = self.next_used(WAIT_MS)? else {
                    fail!("buffer {} of {num_buffers} never came", chains + 1);
                };
                ensure!(len > 0, "buffer {} of a frame has used len 0", chains + 1);
                got += self.copy_chain(id, len as usize, got)?;
                heads[usize::from(chains)] = id;
                chains += 1;
            }
        }
        for &h in &heads[..usize::from(chains)] {
            self.rx.publish(h);
        }
        self.dev.notify(RXQ);
        Ok(Some(Frame {
            addr: self.scratch,
            len: got - HDR_LEN,
            num_buffers,
            chains,
        }))
    }

    /// Receives until `want` says a frame is the awaited one; skips the
    /// rest. `want` returns Ok(true) to take, Ok(false) to skip, Err to fail.
    pub fn recv_until(
        &mut self,
        ms: u64,
        mut want: impl FnMut(&Frame) -> Result<bool, Msg>,
    ) -> Result<Frame, Msg> {
        let d = crate::time::Deadline::after_ms(ms);
        let mut skipped = 0u32;
        loop {
            if d.passed() {
                fail!("nothing awaited within {ms} ms ({skipped} other frames skipped)");
            }
            match self.recv(ms)? {
                Some(f) => {
                    if want(&f)? {
                        return Ok(f);
                    }
                    skipped += 1;
                }
                None => fail!("no frame within {ms} ms ({skipped} other frames skipped)"),
            }
        }
    }

    /// The peer's MAC: ARP for it the first time.
    pub fn peer_mac(&mut self) -> Result<[u8; 6], Msg> {
        let v = PEER_MAC.load(Ordering::Relaxed);
        if v >> 63 != 0 {
            return Ok(from_u64(v));
        }
        let mac = self.arp()?;
        Ok(mac)
    }

    /// Asks who has [`PEER_IP`] and waits for the answer (receive buffers
    /// must be posted).
    pub fn arp(&mut self) -> Result<[u8; 6], Msg> {
        let p = Pkt::new(42);
        p.put(0, &[0xff; 6]);
        p.put(6, &self.mac);
        p.put(12, &[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        p.put(22, &self.mac);
        p.put(28, &GUEST_IP);
        p.put(32, &[0; 6]);
        p.put(38, &PEER_IP);
        self.send(&p, Layout::Split)?;
        let me = self.mac;
        let f = self.recv_until(WAIT_MS, |f| {
            let b = f.bytes();
            Ok(b.len() >= 42
                && b[12..14] == [0x08, 0x06]
                && b[20..22] == [0, 2]
                && b[28..32] == PEER_IP
                && b[38..42] == GUEST_IP
                && b[0..6] == me)
        })?;
        let b = f.bytes();
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[22..28]);
        ensure!(
            b[6..12] == mac && b[32..38] == me,
            "ARP reply: Ethernet source or target MAC wrong"
        );
        PEER_MAC.store(to_u64(mac) | 1 << 63, Ordering::Relaxed);
        Ok(mac)
    }

    /// An echo request of `payload` bytes with sequence `seq` to the peer.
    pub fn echo_request(&mut self, seq: u16, payload: usize) -> Result<Pkt, Msg> {
        let peer = self.peer_mac()?;
        let ip_len = 20 + 8 + payload;
        let p = Pkt::new(14 + ip_len);
        p.put(0, &peer);
        p.put(6, &self.mac);
        p.put(12, &[0x08, 0x00]);
        // IPv4: no options, DF clear (never fragmented on this link).
        let ip = 14;
        p.put(ip, &[0x45, 0]);
        p.put(ip + 2, &(ip_len as u16).to_be_bytes());
        p.put(ip + 4, &seq.to_be_bytes());
        p.put(ip + 6, &[0, 0, 64, 1, 0, 0]);
        p.put(ip + 12, &GUEST_IP);
        p.put(ip + 16, &PEER_IP);
        let c = csum(p.frame(ip, 20));
        p.put(ip + 10, &c.to_be_bytes());
        let icmp = ip + 20;
        p.put(icmp, &[8, 0, 0, 0]);
        p.put(icmp + 4, &ECHO_ID.to_be_bytes());
        p.put(icmp + 6, &seq.to_be_bytes());
        for i in 0..payload {
            w8(
                p.base + (HDR_LEN + icmp + 8 + i) as u64,
                payload_byte(seq, i),
            );
        }
        let c = csum(p.frame(icmp, 8 + payload));
        p.put(icmp + 2, &c.to_be_bytes());
        Ok(p)
    }

    /// Sends an echo request.
    pub fn ping(&mut self, seq: u16, payload: usize, layout: Layout) -> R {
        let p = self.echo_request(seq, payload)?;
        self.send(&p, layout)
    }

    /// Waits for the echo reply to `seq`, checks it entirely, skipping
    /// other frames; a reply to a seq in `forbidden` fails.
    pub fn expect_reply(
        &mut self,
        seq: u16,
        payload: usize,
        forbidden: &[u16],
    ) -> Result<Frame, Msg> {
        let me = self.mac;
        let peer = self.peer_mac()?;
        let f = self.recv_until(WAIT_MS, |f| match classify(f.bytes(), &me, &peer) {
            Echo::Other => Ok(false),
            Echo::Fragment => fail!(
                "the echo reply came fragmented: the tap's MTU is below the frame \
                     (set it to 9000)"
            ),
            Echo::Reply(s) if forbidden.contains(&s) => {
                let b = f.bytes();
                let ip_len = u16::from_be_bytes([b[16], b[17]]);
                fail!(
                    "got a {}-byte frame (used len {}) replying to seq {s} (IP length \
                         {ip_len}), which must not arrive",
                    f.len,
                    f.len + HDR_LEN
                )
            }
            Echo::Reply(s) => Ok(s == seq),
        })?;
        check_reply(f.bytes(), seq, payload)?;
        Ok(f)
    }

    /// One ping and its reply.
    pub fn round_trip(&mut self, payload: usize, layout: Layout) -> Result<Frame, Msg> {
        let seq = next_seq();
        self.ping(seq, payload, layout)?;
        self.expect_reply(seq, payload, &[])
    }
}

/// How a TX chain lays out the header and the frame.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Header, then the frame, in two descriptors.
    Split,
    /// Header and frame in one descriptor.
    Joined,
    /// Four descriptors cutting through the header and the frame.
    Scattered,
}

/// A frame to send, with room for the header in front (zeroed: no
/// offloads asked for).
pub struct Pkt {
    /// The header's address; the frame follows at `base + HDR_LEN`.
    pub base: u64,
    pub len: usize,
}

impl Pkt {
    pub fn new(len: usize) -> Pkt {
        Pkt {
            base: mem::alloc(HDR_LEN + len, 64),
            len,
        }
    }

    /// Writes `b` at frame offset `off`.
    pub fn put(&self, off: usize, b: &[u8]) {
        for (i, &x) in b.iter().enumerate() {
            w8(self.base + (HDR_LEN + off + i) as u64, x);
        }
    }

    pub fn frame(&self, off: usize, len: usize) -> &'static [u8] {
        // SAFETY: arena memory we own; nobody writes it while we read.
        unsafe {
            core::slice::from_raw_parts((self.base + (HDR_LEN + off) as u64) as *const u8, len)
        }
    }
}

pub fn payload_byte(seq: u16, i: usize) -> u8 {
    (seq as u8).wrapping_mul(31) ^ (i as u8) ^ ((i >> 8) as u8).wrapping_mul(7)
}

/// The Internet checksum of `b` (0 over a region holding a valid one).
pub fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    let mut i = 0;
    while i + 1 < b.len() {
        s += u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    if i < b.len() {
        s += u32::from(b[i]) << 8;
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

enum Echo {
    Other,
    /// An IPv4 fragment from the peer to us.
    Fragment,
    /// An echo reply with our identifier and this sequence number.
    Reply(u16),
}

fn classify(b: &[u8], me: &[u8; 6], peer: &[u8; 6]) -> Echo {
    if b.len() < 14 + 20 || b[12..14] != [0x08, 0x00] || b[0..6] != *me || b[6..12] != *peer {
        return Echo::Other;
    }
    let ip = &b[14..];
    if ip[9] != 1 || ip[12..16] != PEER_IP || ip[16..20] != GUEST_IP {
        return Echo::Other;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x3fff != 0 {
        return Echo::Fragment;
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    if ip.len() < ihl + 8 || ip[ihl] != 0 || ip[ihl + 4..ihl + 6] != ECHO_ID.to_be_bytes() {
        return Echo::Other;
    }
    Echo::Reply(u16::from_be_bytes([ip[ihl + 6], ip[ihl + 7]]))
}

/// The sequence number if `b` is an echo reply to us from the peer.
pub fn reply_seq(b: &[u8], me: &[u8; 6], peer: &[u8; 6]) -> Option<u16> {
    match classify(b, me, peer) {
        Echo::Reply(s) => Some(s),
        _ => None,
    }
}

/// Every byte of an echo reply: lengths, both checksums, payload.
pub fn check_reply(b: &[u8], seq: u16, payload: usize) -> R {
    let ip = &b[14..];
    ensure!(ip[0] >> 4 == 4, "reply: IP version {}", ip[0] >> 4);
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    ensure!(
        total == ihl + 8 + payload,
        "reply: IP total length {total}, expected {}",
        ihl + 8 + payload
    );
    ensure!(
        b.len() >= 14 + total,
        "reply: frame of {} bytes holds an IP packet of {total}",
        b.len()
    );
    ensure!(csum(&ip[..ihl]) == 0, "reply: bad IP header checksum");
    let icmp = &ip[ihl..total];
    ensure!(icmp[1] == 0, "reply: ICMP code {}", icmp[1]);
    ensure!(
        csum(icmp) == 0,
        "reply: bad ICMP checksum ({} bytes)",
        icmp.len()
    );
    for (i, &x) in icmp[8..].iter().enumerate() {
        let want = payload_byte(seq, i);
        ensure!(
            x == want,
            "reply: payload byte {i} is {x:#x}, sent {want:#x}"
        );
    }
    Ok(())
}

fn to_u64(m: [u8; 6]) -> u64 {
    m.iter().fold(0, |a, &b| (a << 8) | u64::from(b))
}

fn from_u64(v: u64) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, b) in m.iter_mut().enumerate() {
        *b = (v >> (8 * (5 - i))) as u8;
    }
    m
}
