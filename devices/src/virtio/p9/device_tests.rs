//! The device between a hand-written driver (chains laid out the way
//! Linux's 9P virtio transport lays them out) and a fake ring.

use std::fs;
use std::os::fd::AsRawFd;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::P9Device;
use super::tests::Scratch;
use super::wire::{msg, NOFID, NOTAG};
use super::{ControlFs, Filesystem, HostFs, FEATURES};
use crate::io::fake::{CountingLine, ExecutingIo, RecordingIo};
use crate::io::IoOp;
use crate::virtio::testing::{transport_event, DriverQueue};
use crate::virtio::{Activation, TransportEvent, VirtioDevice, F_EVENT_IDX};

const QSIZE: u16 = 16;
const W: u16 = DriverQueue::<GuestMemoryMmap>::WRITE;

struct Rig<F: Filesystem> {
    mem: GuestMemoryMmap,
    q: DriverQueue<GuestMemoryMmap>,
    dev: P9Device<F>,
    irq: CountingLine,
    /// Next free guest address for buffers.
    next_buf: u64,
}

fn s(v: &[u8]) -> Vec<u8> {
    let mut o = (v.len() as u16).to_le_bytes().to_vec();
    o.extend_from_slice(v);
    o
}

fn tmsg(ty: u8, tag: u16, body: &[u8]) -> Vec<u8> {
    let mut m = ((7 + body.len()) as u32).to_le_bytes().to_vec();
    m.push(ty);
    m.extend_from_slice(&tag.to_le_bytes());
    m.extend_from_slice(body);
    m
}

impl<F: Filesystem + Send + 'static> Rig<F>
where
    F::Node: Send,
{
    fn new(fs: F) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        let q = DriverQueue::new(mem.clone(), 0, QSIZE);
        let irq = CountingLine::default();
        let mut dev = P9Device::new(fs, "share0", Box::new(irq.clone()));
        let activation = Activation {
            features: FEATURES & !F_EVENT_IDX,
            queues: vec![q.config()],
        };
        transport_event(&mut dev, &mem, &TransportEvent::Activate(activation)).expect("activate");
        Self {
            mem,
            q,
            dev,
            irq,
            next_buf: 0x1_0000,
        }
    }

    fn buf(&mut self, data: &[u8], len: u32) -> u64 {
        let at = self.next_buf;
        self.next_buf += u64::from(len).next_multiple_of(0x1000).max(0x1000);
        self.mem
            .write_slice(data, GuestAddress(at))
            .expect("buffer");
        at
    }

    /// Publishes a chain of (addr, len, flags); returns its head.
    fn push(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        self.q.push(descs)
    }

    /// A request in one readable buffer and a reply buffer of `room`
    /// bytes; returns (head, reply address).
    fn request(&mut self, m: &[u8], room: u32) -> (u16, u64) {
        let out = self.buf(m, m.len() as u32);
        let reply = self.buf(&[], room);
        (
            self.push(&[(out, m.len() as u32, 0), (reply, room, W)]),
            reply,
        )
    }

    fn used(&self) -> Vec<(u32, u32)> {
        self.q.used_entries()
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(at)).expect("read");
        b
    }

    fn process(&mut self, io: &mut dyn crate::io::IoSubmit) {
        self.dev.process_queue(0, &self.mem, io).expect("process");
    }

    /// Sends one message, runs it to completion on real files, and
    /// returns the reply bytes.
    fn call(&mut self, m: &[u8]) -> Vec<u8> {
        let (head, reply) = self.request(m, 8192);
        let mut io = ExecutingIo::default();
        self.process(&mut io);
        for (tag, res) in io.take_completions() {
            self.dev.complete(tag, res, &self.mem, &mut io);
        }
        let (id, len) = *self.used().last().expect("answered");
        assert_eq!(id, u32::from(head));
        self.read(reply, len as usize)
    }

    fn handshake(&mut self) {
        let mut b = (1u32 << 20).to_le_bytes().to_vec();
        b.extend(s(b"9P2000.L"));
        let r = self.call(&tmsg(msg::TVERSION, NOTAG, &b));
        assert_eq!(r[4], msg::TVERSION + 1);
        let mut b = 0u32.to_le_bytes().to_vec();
        b.extend(NOFID.to_le_bytes());
        b.extend(s(b"root"));
        b.extend(s(b""));
        b.extend(0u32.to_le_bytes());
        let r = self.call(&tmsg(msg::TATTACH, 1, &b));
        assert_eq!(r[4], msg::TATTACH + 1, "{r:?}");
    }

    fn walk_open(&mut self, newfid: u32, name: &[u8], flags: i32) {
        let mut b = 0u32.to_le_bytes().to_vec();
        b.extend(newfid.to_le_bytes());
        b.extend(1u16.to_le_bytes());
        b.extend(s(name));
        assert_eq!(self.call(&tmsg(msg::TWALK, 2, &b))[4], msg::TWALK + 1);
        let mut b = newfid.to_le_bytes().to_vec();
        b.extend((flags as u32).to_le_bytes());
        assert_eq!(self.call(&tmsg(msg::TLOPEN, 3, &b))[4], msg::TLOPEN + 1);
    }
}

fn rlerror(r: &[u8]) -> Option<u32> {
    (r.len() == 11 && r[4] == msg::RLERROR).then(|| u32::from_le_bytes([r[7], r[8], r[9], r[10]]))
}

fn share() -> (Scratch, std::path::PathBuf) {
    let s = Scratch::new("device");
    let dir = s.path().join("share");
    fs::create_dir_all(&dir).unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(dir.join("data"), &data).unwrap();
    (s, dir)
}

#[test]
fn a_zero_copy_read_lands_after_the_reply_header() {
    let (_s, dir) = share();
    let mut rig = Rig::new(HostFs::new(&dir, false).unwrap());
    rig.handshake();
    rig.walk_open(1, b"data", libc::O_RDONLY);
    // Linux's zero-copy read: the request in one buffer; the 11-byte
    // reply header, then the user's pages, as separate writable buffers.
    let mut b = 1u32.to_le_bytes().to_vec();
    b.extend(100u64.to_le_bytes());
    b.extend(10_000u32.to_le_bytes());
    let m = tmsg(msg::TREAD, 7, &b);
    let out = rig.buf(&m, m.len() as u32);
    let hdr = rig.buf(&[], 11);
    let page1 = rig.buf(&[], 4096);
    let page2 = rig.buf(&[], 8192);
    let head = rig.push(&[
        (out, m.len() as u32, 0),
        (hdr, 11, W),
        (page1, 4096, W),
        (page2, 8192, W),
    ]);
    let mut io = ExecutingIo::default();
    rig.process(&mut io);
    assert!(matches!(
        io.ops[0].0,
        IoOp::Readv {
            iovcnt: 2,
            offset: 100,
            ..
        }
    ));
    for (tag, res) in io.take_completions() {
        rig.dev.complete(tag, res, &rig.mem, &mut io);
    }
    assert_eq!(rig.used().last(), Some(&(u32::from(head), 11 + 10_000)));
    let h = rig.read(hdr, 11);
    assert_eq!(u32::from_le_bytes([h[0], h[1], h[2], h[3]]), 11 + 10_000);
    assert_eq!(h[4], msg::TREAD + 1);
    assert_eq!(u16::from_le_bytes([h[5], h[6]]), 7);
    assert_eq!(u32::from_le_bytes([h[7], h[8], h[9], h[10]]), 10_000);
    let mut got = rig.read(page1, 4096);
    got.extend(rig.read(page2, 10_000 - 4096));
    let want: Vec<u8> = (100..10_100u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(got, want);
    assert_eq!(VirtioDevice::<GuestMemoryMmap>::in_flight(&rig.dev), 0);
    // One interrupt decision per loop turn.
    let before = rig.irq.count();
    rig.dev.end_turn(&rig.mem);
    assert_eq!(rig.irq.count(), before + 1);
    rig.dev.end_turn(&rig.mem);
    assert_eq!(rig.irq.count(), before + 1);
}

#[test]
fn a_zero_copy_write_goes_from_guest_pages_to_the_file() {
    let (_s, dir) = share();
    let mut rig = Rig::new(HostFs::new(&dir, true).unwrap());
    rig.handshake();
    rig.walk_open(1, b"data", libc::O_WRONLY);
    let payload: Vec<u8> = (0..6000u32).map(|i| (i * 7) as u8).collect();
    // Twrite header in one buffer, the payload in two more.
    let mut h = ((23 + payload.len()) as u32).to_le_bytes().to_vec();
    h.push(msg::TWRITE);
    h.extend(9u16.to_le_bytes());
    h.extend(1u32.to_le_bytes());
    h.extend(5u64.to_le_bytes());
    h.extend((payload.len() as u32).to_le_bytes());
    let hdr = rig.buf(&h, 23);
    let p1 = rig.buf(&payload[..1000], 1000);
    let p2 = rig.buf(&payload[1000..], 5000);
    let reply = rig.buf(&[], 64);
    rig.push(&[(hdr, 23, 0), (p1, 1000, 0), (p2, 5000, 0), (reply, 64, W)]);
    let mut io = ExecutingIo::default();
    rig.process(&mut io);
    for (tag, res) in io.take_completions() {
        rig.dev.complete(tag, res, &rig.mem, &mut io);
    }
    let r = rig.read(reply, 11);
    assert_eq!(r[4], msg::TWRITE + 1);
    assert_eq!(u32::from_le_bytes([r[7], r[8], r[9], r[10]]), 6000);
    let file = fs::read(dir.join("data")).unwrap();
    assert_eq!(&file[5..6005], &payload[..]);
    assert_eq!(rig.dev.counters().write_bytes, 6000);
}

#[test]
fn hostile_chains_get_errors_or_nothing() {
    let (_s, dir) = share();
    let mut rig = Rig::new(HostFs::new(&dir, false).unwrap());
    rig.handshake();
    let before = rig.used().len();
    // No header at all: returned with nothing written.
    let reply = rig.buf(&[], 64);
    let out = rig.buf(&[1, 2, 3], 3);
    let head = rig.push(&[(out, 3, 0), (reply, 64, W)]);
    // A reply buffer before the request.
    let m = tmsg(msg::TCLUNK, 4, &0u32.to_le_bytes());
    let out2 = rig.buf(&m, m.len() as u32);
    let head2 = rig.push(&[(reply, 64, W), (out2, m.len() as u32, 0)]);
    // Outside guest memory.
    let head3 = rig.push(&[(0x10_0000 - 4, 64, 0), (reply, 64, W)]);
    let mut io = RecordingIo::default();
    rig.process(&mut io);
    let used = rig.used();
    assert_eq!(
        &used[before..],
        &[
            (u32::from(head), 0),
            (u32::from(head2), 0),
            (u32::from(head3), 0)
        ]
    );
    assert!(io.ops.is_empty());
    // A declared size beyond the chain: Rlerror with the request's tag.
    let mut m = tmsg(msg::TCLUNK, 4, &0u32.to_le_bytes());
    m[..4].copy_from_slice(&100u32.to_le_bytes());
    assert_eq!(rlerror(&rig.call(&m)), Some(libc::EINVAL as u32));
    // A message larger than msize.
    let mut m = tmsg(msg::TCLUNK, 4, &0u32.to_le_bytes());
    m[..4].copy_from_slice(&(1u32 << 30).to_le_bytes());
    assert_eq!(rlerror(&rig.call(&m)), Some(libc::EMSGSIZE as u32));
    // A reply that does not fit what the client offered.
    let m = tmsg(
        msg::TGETATTR,
        5,
        &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0],
    );
    let (_, reply) = rig.request(&m, 20);
    rig.process(&mut io);
    let (_, len) = *rig.used().last().unwrap();
    assert_eq!(len, 11);
    assert_eq!(rlerror(&rig.read(reply, 11)), Some(libc::ERANGE as u32));
    // Unknown types.
    assert_eq!(
        rlerror(&rig.call(&tmsg(200, 6, &[]))),
        Some(libc::EOPNOTSUPP as u32)
    );
}

fn control_rig(out: &fs::File) -> Rig<ControlFs> {
    let fs = ControlFs::new(b"init", b"cfg", [0, out.as_raw_fd(), out.as_raw_fd()]).unwrap();
    let mut rig = Rig::new(fs);
    rig.handshake();
    rig.walk_open(1, b"stdout", libc::O_WRONLY);
    rig
}

fn twrite(fid: u32, tag: u16, data: &[u8]) -> Vec<u8> {
    let mut b = fid.to_le_bytes().to_vec();
    b.extend(0u64.to_le_bytes());
    b.extend((data.len() as u32).to_le_bytes());
    b.extend_from_slice(data);
    tmsg(msg::TWRITE, tag, &b)
}

#[test]
fn stream_writes_run_one_at_a_time_in_order() {
    let s_ = Scratch::new("streams");
    let out = fs::File::create(s_.path().join("out")).unwrap();
    let mut rig = control_rig(&out);
    let (h1, _) = rig.request(&twrite(1, 10, b"first "), 64);
    let (h2, _) = rig.request(&twrite(1, 11, b"second "), 64);
    let (h3, _) = rig.request(&twrite(1, 12, b"third"), 64);
    let mut io = RecordingIo::default();
    rig.process(&mut io);
    // One transfer on the stream at a time, at the stream's own position.
    assert_eq!(io.ops.len(), 1);
    assert!(matches!(
        io.ops[0].0,
        IoOp::Writev {
            offset: u64::MAX,
            ..
        }
    ));
    let before = rig.used().len();
    for (want_head, len) in [(h1, 6), (h2, 7), (h3, 5)] {
        let (op, tag) = io.ops.remove(0);
        let IoOp::Writev {
            fd, iovecs, iovcnt, ..
        } = op
        else {
            panic!("{op:?}")
        };
        // SAFETY: the device keeps the iovecs alive until completion.
        let n = unsafe { libc::writev(fd, iovecs, iovcnt as i32) };
        assert_eq!(n, len);
        rig.dev.complete(tag, n as i32, &rig.mem, &mut io);
        assert_eq!(rig.used().last().map(|u| u.0), Some(u32::from(want_head)));
    }
    assert_eq!(rig.used().len(), before + 3);
    assert_eq!(
        fs::read(s_.path().join("out")).unwrap(),
        b"first second third"
    );
}

#[test]
fn a_flushed_read_is_answered_before_its_flush() {
    let s_ = Scratch::new("flush");
    let out = fs::File::create(s_.path().join("out")).unwrap();
    let mut rig = control_rig(&out);
    rig.walk_open(2, b"stdin", libc::O_RDONLY);
    let mut b = 2u32.to_le_bytes().to_vec();
    b.extend(0u64.to_le_bytes());
    b.extend(100u32.to_le_bytes());
    let (read_head, _) = rig.request(&tmsg(msg::TREAD, 20, &b), 200);
    let mut io = RecordingIo::default();
    rig.process(&mut io);
    assert_eq!(io.ops.len(), 1);
    // A second read waits behind the first; flushing it answers it at once.
    let (queued_head, queued_reply) = rig.request(&tmsg(msg::TREAD, 21, &b), 200);
    let (f1, _) = rig.request(&tmsg(msg::TFLUSH, 22, &21u16.to_le_bytes()), 64);
    // The in-flight one: Rflush waits for it.
    let (f2, f2_reply) = rig.request(&tmsg(msg::TFLUSH, 23, &20u16.to_le_bytes()), 64);
    let before = rig.used().len();
    rig.process(&mut io);
    let used = rig.used();
    assert_eq!(
        &used[before..],
        &[(u32::from(queued_head), 11), (u32::from(f1), 7)]
    );
    assert_eq!(
        rlerror(&rig.read(queued_reply, 11)),
        Some(libc::EINTR as u32)
    );
    assert_eq!(io.ops.len(), 1, "the flushed read never reached the ring");
    let (_, tag) = io.ops[0];
    rig.dev.complete(tag, -libc::ECANCELED, &rig.mem, &mut io);
    let used = rig.used();
    assert_eq!(
        &used[before + 2..],
        &[(u32::from(read_head), 11), (u32::from(f2), 7)]
    );
    assert_eq!(rig.read(f2_reply, 7)[4], msg::TFLUSH + 1);
}

#[test]
fn a_reset_orphans_transfers_and_forgets_fids() {
    let (_s, dir) = share();
    let mut rig = Rig::new(HostFs::new(&dir, false).unwrap());
    rig.handshake();
    rig.walk_open(1, b"data", libc::O_RDONLY);
    let mut b = 1u32.to_le_bytes().to_vec();
    b.extend(0u64.to_le_bytes());
    b.extend(100u32.to_le_bytes());
    rig.request(&tmsg(msg::TREAD, 30, &b), 200);
    let mut io = RecordingIo::default();
    rig.process(&mut io);
    assert_eq!(VirtioDevice::<GuestMemoryMmap>::in_flight(&rig.dev), 1);
    let used = rig.used().len();
    VirtioDevice::<GuestMemoryMmap>::reset(&mut rig.dev);
    assert_eq!(
        VirtioDevice::<GuestMemoryMmap>::in_flight(&rig.dev),
        1,
        "the kernel still holds the buffers"
    );
    assert_eq!(rig.dev.server().fid_count(), 0);
    let (_, tag) = io.ops[0];
    rig.dev.complete(tag, 100, &rig.mem, &mut io);
    assert_eq!(VirtioDevice::<GuestMemoryMmap>::in_flight(&rig.dev), 0);
    assert_eq!(rig.used().len(), used, "nothing is written after a reset");
}
