//! Device-level tests: the shared driver-side queue mock
//! ([`crate::virtio::testing::DriverQueue`]) on one side, a fake ring on the
//! other, and a real temp file as the disk.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;

use libc::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::io::fake::{CountingLine, ExecutingIo, PanicIo, RecordingIo};
use crate::io::{IoOp, IoSubmit};
use crate::virtio::testing::{transport_event, DriverQueue};
use crate::virtio::{
    Activation, DeviceError, ProcessOutcome, QueueConfig, TransportEvent, VirtioDevice,
    VirtioDeviceInfo, INT_CONFIG, INT_VRING,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const QSIZE: u16 = 16;
const SECTORS: u64 = 64;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// Features the rig activates with: everything but EVENT_IDX, so every
/// used buffer interrupts.
const NO_EVENT_IDX: u64 = BASE_FEATURES & !crate::virtio::F_EVENT_IDX;

fn memory() -> GuestMemoryMmap {
    // Two regions, so buffers can straddle a region boundary at 0x8_0000.
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x8_0000),
        (GuestAddress(0x8_0000), 0x8_0000),
    ])
    .expect("guest memory")
}

fn hdr_addr(n: u64) -> u64 {
    0x1_0000 + n * 0x20
}
fn status_addr(n: u64) -> u64 {
    0x1_8000 + n
}
fn data_addr(n: u64) -> u64 {
    0x2_0000 + n * 0x4000
}

fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

/// The driver's view of the split queue at DESC/AVAIL/USED.
type Driver = DriverQueue<GuestMemoryMmap>;

fn info(dev: &BlockDevice) -> VirtioDeviceInfo {
    VirtioDevice::<GuestMemoryMmap>::info(dev)
}

struct Rig<'m> {
    mem: &'m GuestMemoryMmap,
    vq: Driver,
    dev: BlockDevice,
    line: CountingLine,
    disk: File,
    _tmp: TempFile,
    next_desc: u16,
}

impl<'m> Rig<'m> {
    fn new(mem: &'m GuestMemoryMmap, read_only: bool) -> Self {
        Self::with_features(mem, read_only, NO_EVENT_IDX)
    }

    fn with_features(mem: &'m GuestMemoryMmap, read_only: bool, feats: u64) -> Self {
        let tmp = TempFile::new().expect("temp file");
        let mut disk = tmp.as_file().try_clone().expect("clone");
        let bytes: Vec<u8> = (0..SECTORS * 512).map(pattern).collect();
        disk.write_all(&bytes).expect("fill disk");
        let line = CountingLine::default();
        let dev = BlockDevice::new(
            BlockConfig {
                file: disk.try_clone().expect("clone"),
                read_only,
                flush: true,
                id: "ringvm-disk".into(),
            },
            Box::new(line.clone()),
        )
        .expect("device");
        // Fresh rings: the memory may have served an earlier rig.
        let vq = DriverQueue::new(mem.clone(), DESC, QSIZE);
        let mut rig = Rig {
            mem,
            vq,
            dev,
            line,
            disk,
            _tmp: tmp,
            next_desc: 0,
        };
        let feats = feats & features(read_only, true);
        rig.dev
            .activate(mem, &rig.activation(feats))
            .expect("activate");
        rig
    }

    fn activation(&self, feats: u64) -> Activation {
        Activation {
            features: feats,
            queues: vec![QueueConfig {
                size: QSIZE,
                ready: true,
                desc_table: DESC,
                avail_ring: AVAIL,
                used_ring: USED,
            }],
        }
    }

    /// Driver reset and re-initialisation of the same rings.
    fn reset_and_reactivate(&mut self) {
        VirtioDevice::<GuestMemoryMmap>::reset(&mut self.dev);
        info(&self.dev).shared.clear();
        for i in 0..QSIZE {
            self.vq.set_avail_entry(i, 0);
        }
        self.vq.set_avail_idx(0);
        self.vq.set_used_idx(0);
        self.next_desc = 0;
        let a = self.activation(NO_EVENT_IDX);
        self.dev.activate(self.mem, &a).expect("reactivate");
    }

    fn publish(&self, head: u16) {
        let idx = self.vq.avail_idx();
        self.vq.set_avail_entry(idx, head);
        self.vq.set_avail_idx(idx.wrapping_add(1));
    }

    /// Puts a chain of `(addr, len, flags)` in the table (NEXT links are
    /// added) and publishes it; returns its head.
    fn push(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let (flags, next) = if last {
                (flags & !N, 0)
            } else {
                (flags | N, (idx + 1) % QSIZE)
            };
            self.store(idx, Descriptor::new(addr, len, flags, next));
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % QSIZE;
        self.publish(head);
        head
    }

    fn store(&self, idx: u16, d: Descriptor) {
        self.vq.store(idx, d);
    }

    fn header(&self, n: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&h, GuestAddress(hdr_addr(n)))
            .expect("header");
        self.mem
            .write_obj(0xeeu8, GuestAddress(status_addr(n)))
            .expect("status");
    }

    /// A read of `len` bytes at `sector` into `data_addr(n)`.
    fn read_req(&mut self, n: u64, sector: u64, len: u32) -> u16 {
        self.header(n, VIRTIO_BLK_T_IN, sector);
        self.push(&[
            (hdr_addr(n), 16, 0),
            (data_addr(n), len, W),
            (status_addr(n), 1, W),
        ])
    }

    /// A write of `len` bytes of `fill` at `sector` from `data_addr(n)`.
    fn write_req(&mut self, n: u64, sector: u64, len: u32, fill: u8) -> u16 {
        self.header(n, VIRTIO_BLK_T_OUT, sector);
        let buf = vec![fill; len as usize];
        self.mem
            .write_slice(&buf, GuestAddress(data_addr(n)))
            .expect("data");
        self.push(&[
            (hdr_addr(n), 16, 0),
            (data_addr(n), len, 0),
            (status_addr(n), 1, W),
        ])
    }

    fn range_req(&mut self, n: u64, kind: u32, sector: u64, count: u32, flags: u32) -> u16 {
        self.header(n, kind, 0);
        let mut r = [0u8; 16];
        r[0..8].copy_from_slice(&sector.to_le_bytes());
        r[8..12].copy_from_slice(&count.to_le_bytes());
        r[12..16].copy_from_slice(&flags.to_le_bytes());
        self.mem
            .write_slice(&r, GuestAddress(data_addr(n)))
            .expect("range");
        self.push(&[
            (hdr_addr(n), 16, 0),
            (data_addr(n), 16, 0),
            (status_addr(n), 1, W),
        ])
    }

    fn status(&self, n: u64) -> u8 {
        self.mem
            .read_obj(GuestAddress(status_addr(n)))
            .expect("status")
    }

    fn data(&self, n: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(data_addr(n)))
            .expect("data");
        v
    }

    /// Used ring entries so far as (head, len).
    fn used(&self) -> Vec<(u32, u32)> {
        (0..self.vq.used_idx())
            .map(|i| self.vq.used_entry(i))
            .collect()
    }

    /// One loop turn's worth: a drain, then the turn's interrupt decision.
    fn process(&mut self, io: &mut dyn IoSubmit) -> Result<ProcessOutcome, DeviceError> {
        let out = self.dev.process_queue(0, self.mem, io);
        self.dev.end_turn(self.mem);
        out
    }

    /// Delivers one completion and ends the turn.
    fn complete(&mut self, tag: u64, res: i32) {
        self.dev.complete(tag, res, self.mem, &mut PanicIo);
        self.dev.end_turn(self.mem);
    }

    fn in_flight(&self) -> usize {
        VirtioDevice::<GuestMemoryMmap>::in_flight(&self.dev)
    }

    /// Processes with a synchronous executor and delivers its completions
    /// (and those of ops they lead to, such as a FLUSH's later steps).
    fn run(&mut self) -> Result<ProcessOutcome, DeviceError> {
        let mut io = ExecutingIo::default();
        let out = self.process(&mut io)?;
        loop {
            let done = io.take_completions();
            if done.is_empty() {
                break;
            }
            for (tag, res) in done {
                self.dev.complete(tag, res, self.mem, &mut io);
            }
        }
        self.dev.end_turn(self.mem);
        Ok(out)
    }

    fn disk_bytes(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.disk.seek(SeekFrom::Start(offset)).expect("seek");
        self.disk.read_exact(&mut v).expect("read disk");
        v
    }

    fn needs_reset(&self) -> bool {
        info(&self.dev).shared.needs_reset()
    }

    fn isr(&self) -> u32 {
        info(&self.dev).shared.interrupt_status()
    }
}

#[test]
fn info_and_config_space_describe_the_drive() {
    let mem = memory();
    let rig = Rig::new(&mem, false);
    let i = info(&rig.dev);
    assert_eq!(i.device_type, 2);
    assert_eq!(i.queue_max_sizes, vec![QUEUE_MAX_SIZE]);
    assert_eq!(i.avail_features, BASE_FEATURES);
    assert_eq!(
        i.avail_features
            & crate::virtio::feature(virtio_bindings::virtio_config::VIRTIO_F_IN_ORDER),
        0
    );
    let mut cap = [0u8; 8];
    i.shared.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut word = [0u8; 4];
    i.shared.read_config(12, &mut word);
    assert_eq!(u32::from_le_bytes(word), SEG_MAX);
    i.shared.read_config(20, &mut word);
    assert_eq!(u32::from_le_bytes(word), 512);
    i.shared.read_config(40, &mut word);
    assert_eq!(u32::from_le_bytes(word), 1);
    assert_eq!(i.shared.config_len(), 60);
    let ro = Rig::new(&mem, true);
    assert_ne!(info(&ro.dev).avail_features & (1 << 5), 0);
}

#[test]
fn write_then_read_round_trips_through_the_file() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    let w = rig.write_req(0, 4, 1024, 0x5a);
    let out = rig.run()?;
    assert_eq!(out.submitted, 1);
    assert_eq!(rig.status(0), OK);
    assert_eq!(rig.used(), vec![(u32::from(w), 1)]);
    assert_eq!(rig.disk_bytes(4 * 512, 1024), vec![0x5a; 1024]);

    let r = rig.read_req(1, 3, 2048);
    rig.run()?;
    assert_eq!(rig.status(1), OK);
    assert_eq!(rig.used()[1], (u32::from(r), 2048 + 1));
    let got = rig.data(1, 2048);
    let want: Vec<u8> = (3 * 512..4 * 512)
        .map(pattern)
        .chain(std::iter::repeat_n(0x5a, 1024))
        .chain((6 * 512..7 * 512).map(pattern))
        .collect();
    assert_eq!(got, want);
    let c = rig.dev.counters();
    assert_eq!(
        (c.requests, c.write_bytes, c.read_bytes, c.errors),
        (2, 1024, 2048, 0)
    );
    assert_eq!(rig.line.count(), 2);
    assert_eq!(rig.isr() & INT_VRING, INT_VRING);
    Ok(())
}

#[test]
fn reads_into_buffers_straddling_memory_regions() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    rig.header(0, VIRTIO_BLK_T_IN, 0);
    rig.push(&[
        (hdr_addr(0), 16, 0),
        (0x7_ff00, 512, W),
        (status_addr(0), 1, W),
    ]);
    let mut io = RecordingIo::default();
    rig.process(&mut io)?;
    match io.ops.first() {
        Some((IoOp::Readv { iovcnt, .. }, _)) => assert_eq!(*iovcnt, 2),
        other => panic!("unexpected {other:?}"),
    }
    // Run it for real too.
    rig.reset_and_reactivate();
    rig.header(0, VIRTIO_BLK_T_IN, 0);
    rig.push(&[
        (hdr_addr(0), 16, 0),
        (0x7_ff00, 512, W),
        (status_addr(0), 1, W),
    ]);
    rig.run()?;
    assert_eq!(rig.status(0), OK);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(0x7_ff00))?;
    assert_eq!(got, (0..512).map(pattern).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn flush_submits_a_datasync() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    rig.header(0, VIRTIO_BLK_T_FLUSH, 0);
    rig.push(&[(hdr_addr(0), 16, 0), (status_addr(0), 1, W)]);
    let mut io = ExecutingIo::default();
    rig.process(&mut io)?;
    assert!(matches!(
        io.ops.as_slice(),
        [(IoOp::Fsync { datasync: true, fd }, _)] if *fd == rig.disk.as_raw_fd() || *fd > 0
    ));
    for (tag, res) in io.take_completions() {
        rig.complete(tag, res);
    }
    assert_eq!(rig.status(0), OK);
    assert_eq!(rig.used()[0].1, 1);
    assert_eq!(rig.dev.counters().flushes, 1);
    Ok(())
}

#[test]
fn get_id_is_answered_at_once_and_zero_padded() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    mem.write_slice(&[0xffu8; 32], GuestAddress(data_addr(0)))?;
    rig.header(0, VIRTIO_BLK_T_GET_ID, 0);
    rig.push(&[
        (hdr_addr(0), 16, 0),
        (data_addr(0), 32, W),
        (status_addr(0), 1, W),
    ]);
    rig.process(&mut PanicIo)?;
    assert_eq!(rig.status(0), OK);
    let mut want = b"ringvm-disk".to_vec();
    want.resize(20, 0);
    want.extend_from_slice(&[0xff; 12]);
    assert_eq!(rig.data(0, 32), want);
    assert_eq!(rig.used()[0].1, 21);

    // A short buffer gets a prefix.
    rig.header(1, VIRTIO_BLK_T_GET_ID, 0);
    rig.push(&[
        (hdr_addr(1), 16, 0),
        (data_addr(1), 6, W),
        (status_addr(1), 1, W),
    ]);
    rig.process(&mut PanicIo)?;
    assert_eq!(rig.data(1, 6), b"ringvm");
    assert_eq!(rig.used()[1].1, 7);
    Ok(())
}

#[test]
fn completions_may_arrive_out_of_order() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    let a = rig.read_req(0, 0, 512);
    let b = rig.read_req(1, 1, 512);
    let mut io = RecordingIo::default();
    let out = rig.process(&mut io)?;
    assert_eq!(out.submitted, 2);
    assert_eq!(rig.in_flight(), 2);
    let (ta, tb) = (io.ops[0].1, io.ops[1].1);
    rig.complete(tb, 512);
    assert_eq!(rig.used(), vec![(u32::from(b), 513)]);
    assert_eq!(rig.status(1), OK);
    assert_eq!(rig.status(0), 0xee);
    rig.complete(ta, -libc::EIO);
    assert_eq!(rig.used(), vec![(u32::from(b), 513), (u32::from(a), 1)]);
    assert_eq!(rig.status(0), IOERR);
    // A duplicate or unknown completion is ignored.
    rig.complete(ta, 512);
    rig.complete(0xdead_beef, 0);
    assert_eq!(rig.used().len(), 2);
    assert_eq!(rig.in_flight(), 0);
    assert_eq!(rig.dev.counters().errors, 1);
    Ok(())
}

#[test]
fn short_transfers_are_io_errors() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    rig.read_req(0, 0, 1024);
    rig.write_req(1, 0, 1024, 1);
    let mut io = RecordingIo::default();
    rig.process(&mut io)?;
    rig.complete(io.ops[0].1, 512);
    rig.complete(io.ops[1].1, 512);
    assert_eq!(rig.status(0), IOERR);
    assert_eq!(rig.status(1), IOERR);
    assert_eq!(rig.used()[0].1, 513);
    assert_eq!(rig.used()[1].1, 1);
    Ok(())
}

#[test]
fn read_only_drive_refuses_changes_before_any_io() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, true);
    rig.write_req(0, 0, 512, 1);
    rig.range_req(1, VIRTIO_BLK_T_DISCARD, 0, 8, 0);
    rig.range_req(2, VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0);
    rig.process(&mut PanicIo)?;
    for n in 0..3 {
        assert_eq!(rig.status(n), IOERR);
    }
    assert_eq!(rig.used().len(), 3);
    assert_eq!(rig.dev.counters().errors, 3);
    // Reads still work.
    rig.read_req(3, 0, 512);
    rig.run()?;
    assert_eq!(rig.status(3), OK);
    Ok(())
}

#[test]
fn discard_and_write_zeroes_become_fallocate() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    rig.range_req(0, VIRTIO_BLK_T_DISCARD, 8, 16, 0);
    rig.range_req(1, VIRTIO_BLK_T_WRITE_ZEROES, 2, 4, 0);
    rig.range_req(
        2,
        VIRTIO_BLK_T_WRITE_ZEROES,
        2,
        4,
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    );
    let mut io = RecordingIo::default();
    rig.process(&mut io)?;
    let modes: Vec<_> = io
        .ops
        .iter()
        .map(|(op, _)| match op {
            IoOp::Fallocate {
                mode, offset, len, ..
            } => (*mode, *offset, *len),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        modes,
        vec![
            (
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                8 * 512,
                16 * 512
            ),
            (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 2 * 512, 4 * 512),
            (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * 512, 4 * 512),
        ]
    );
    // A filesystem without the op: UNSUPP.
    rig.complete(io.ops[0].1, -libc::EOPNOTSUPP);
    assert_eq!(rig.status(0), UNSUPP);
    Ok(())
}

#[test]
fn write_zeroes_really_zeroes() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    rig.range_req(0, VIRTIO_BLK_T_WRITE_ZEROES, 2, 4, 0);
    rig.run()?;
    // tmpfs and most filesystems support ZERO_RANGE; accept UNSUPP elsewhere.
    match rig.status(0) {
        OK => assert_eq!(rig.disk_bytes(2 * 512, 2048), vec![0; 2048]),
        s => assert_eq!(s, UNSUPP),
    }
    assert_eq!(rig.disk_bytes(6 * 512, 1), vec![pattern(6 * 512)]);
    Ok(())
}

#[test]
fn requests_past_the_end_fail_without_io() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    rig.read_req(0, SECTORS - 1, 1024);
    rig.write_req(1, SECTORS, 512, 0);
    rig.range_req(2, VIRTIO_BLK_T_DISCARD, SECTORS - 4, 8, 0);
    rig.read_req(3, u64::MAX >> 8, 512);
    rig.process(&mut PanicIo)?;
    for n in 0..4 {
        assert_eq!(rig.status(n), IOERR, "request {n}");
    }
    rig.read_req(4, SECTORS - 1, 512);
    rig.run()?;
    assert_eq!(rig.status(4), OK);
    Ok(())
}

/// Every hostile chain below is answered (with IOERR when it has a usable
/// status byte, used length 0 otherwise), never reaches the ring, and the
/// next good request still works.
#[test]
fn hostile_chains_are_returned_and_the_queue_keeps_working() -> TestResult {
    let mem = memory();
    type Build = fn(&mut Rig<'_>) -> u16;
    let cases: Vec<(&str, Build, Option<u8>)> = vec![
        (
            "descriptor loop",
            |r| {
                r.header(0, VIRTIO_BLK_T_IN, 0);
                r.store(0, Descriptor::new(hdr_addr(0), 16, N, 1));
                r.store(1, Descriptor::new(data_addr(0), 512, N | W, 0));
                r.publish(0);
                r.next_desc = 2;
                0
            },
            None,
        ),
        (
            "next index outside the table",
            |r| {
                r.header(0, VIRTIO_BLK_T_IN, 0);
                r.store(0, Descriptor::new(hdr_addr(0), 16, N, 200));
                r.publish(0);
                r.next_desc = 1;
                0
            },
            None,
        ),
        (
            "chain as long as the queue with no end",
            |r| {
                r.header(0, VIRTIO_BLK_T_IN, 0);
                for i in 0..QSIZE {
                    r.store(
                        i,
                        Descriptor::new(data_addr(0), 512, N | W, (i + 1) % QSIZE),
                    );
                }
                r.store(0, Descriptor::new(hdr_addr(0), 16, N, 1));
                r.publish(0);
                0
            },
            None,
        ),
        (
            "data outside memory",
            |r| {
                r.header(0, VIRTIO_BLK_T_IN, 0);
                r.push(&[
                    (hdr_addr(0), 16, 0),
                    (0x10_0000, 512, W),
                    (status_addr(0), 1, W),
                ])
            },
            Some(IOERR),
        ),
        (
            "header outside memory",
            |r| {
                r.header(0, VIRTIO_BLK_T_IN, 0);
                r.push(&[(0xffff_ffff_0000, 16, 0), (status_addr(0), 1, W)])
            },
            Some(IOERR),
        ),
        (
            "zero-length header",
            |r| {
                r.header(0, VIRTIO_BLK_T_IN, 0);
                r.push(&[(hdr_addr(0), 0, 0), (status_addr(0), 1, W)])
            },
            Some(IOERR),
        ),
        (
            "huge data length",
            |r| {
                r.header(0, VIRTIO_BLK_T_IN, 0);
                r.push(&[
                    (hdr_addr(0), 16, 0),
                    (data_addr(0), u32::MAX - 511, W),
                    (status_addr(0), 1, W),
                ])
            },
            Some(IOERR),
        ),
        (
            "read into a device-readable buffer",
            |r| {
                r.header(0, VIRTIO_BLK_T_IN, 0);
                r.push(&[
                    (hdr_addr(0), 16, 0),
                    (data_addr(0), 512, 0),
                    (status_addr(0), 1, W),
                ])
            },
            Some(IOERR),
        ),
        (
            "write from a device-writable buffer",
            |r| {
                r.header(0, VIRTIO_BLK_T_OUT, 0);
                r.push(&[
                    (hdr_addr(0), 16, 0),
                    (data_addr(0), 512, W),
                    (status_addr(0), 1, W),
                ])
            },
            Some(IOERR),
        ),
        (
            "zero-length status",
            |r| {
                r.header(0, VIRTIO_BLK_T_FLUSH, 0);
                r.push(&[(hdr_addr(0), 16, 0), (status_addr(0), 0, W)])
            },
            None,
        ),
        (
            "read-only status",
            |r| {
                r.header(0, VIRTIO_BLK_T_FLUSH, 0);
                r.push(&[(hdr_addr(0), 16, 0), (status_addr(0), 1, 0)])
            },
            None,
        ),
        (
            "no status at all",
            |r| {
                r.header(0, VIRTIO_BLK_T_FLUSH, 0);
                r.push(&[(hdr_addr(0), 16, 0)])
            },
            None,
        ),
        (
            "unknown request type",
            |r| {
                r.header(0, 0x7777, 0);
                r.push(&[(hdr_addr(0), 16, 0), (status_addr(0), 1, W)])
            },
            Some(UNSUPP),
        ),
        (
            "indirect table with a bad length",
            |r| {
                r.header(0, VIRTIO_BLK_T_FLUSH, 0);
                r.store(
                    0,
                    Descriptor::new(0x6_0000, 20, VRING_DESC_F_INDIRECT as u16, 0),
                );
                r.publish(0);
                r.next_desc = 1;
                0
            },
            None,
        ),
        (
            "nested indirect table",
            |r| {
                r.header(0, VIRTIO_BLK_T_FLUSH, 0);
                let inner = Descriptor::new(0x6_1000, 32, VRING_DESC_F_INDIRECT as u16, 0);
                r.mem
                    .write_obj(RawDescriptor::from(inner), GuestAddress(0x6_0000))
                    .expect("table");
                r.store(
                    0,
                    Descriptor::new(0x6_0000, 16, VRING_DESC_F_INDIRECT as u16, 0),
                );
                r.publish(0);
                r.next_desc = 1;
                0
            },
            None,
        ),
        (
            "indirect table outside memory",
            |r| {
                r.store(
                    0,
                    Descriptor::new(0x20_0000, 48, VRING_DESC_F_INDIRECT as u16, 0),
                );
                r.publish(0);
                r.next_desc = 1;
                0
            },
            None,
        ),
    ];
    for (name, build, want) in cases {
        let mut rig = Rig::new(&mem, false);
        let head = build(&mut rig);
        let out = rig.process(&mut PanicIo);
        assert!(out.is_ok(), "{name}: {out:?}");
        let used = rig.used();
        match want {
            Some(status) => {
                assert_eq!(rig.status(0), status, "{name}");
                assert_eq!(used, vec![(u32::from(head), 1)], "{name}");
            }
            None => {
                assert_eq!(rig.status(0), 0xee, "{name}: status written");
                assert_eq!(used, vec![(u32::from(head), 0)], "{name}");
            }
        }
        assert!(!rig.needs_reset(), "{name}");
        assert_eq!(rig.dev.counters().errors, 1, "{name}");
        // The queue still serves the next good request.
        rig.next_desc = 4;
        rig.read_req(5, 1, 512);
        rig.run()?;
        assert_eq!(rig.status(5), OK, "{name}: next request");
        assert_eq!(
            rig.data(5, 512),
            (512..1024).map(pattern).collect::<Vec<_>>()
        );
    }
    Ok(())
}

#[test]
fn indirect_descriptors_work() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    rig.header(0, VIRTIO_BLK_T_IN, 2);
    let table = [
        Descriptor::new(hdr_addr(0), 16, N, 1),
        Descriptor::new(data_addr(0), 512, N | W, 2),
        Descriptor::new(status_addr(0), 1, W, 0),
    ];
    for (i, d) in table.iter().enumerate() {
        mem.write_obj(
            RawDescriptor::from(*d),
            GuestAddress(0x6_0000 + 16 * i as u64),
        )?;
    }
    rig.store(
        0,
        Descriptor::new(0x6_0000, 48, VRING_DESC_F_INDIRECT as u16, 0),
    );
    rig.publish(0);
    rig.run()?;
    assert_eq!(rig.status(0), OK);
    assert_eq!(rig.used(), vec![(0, 513)]);
    assert_eq!(
        rig.data(0, 512),
        (1024..1536).map(pattern).collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn avail_index_jump_marks_needs_reset_and_stops_the_queue() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    rig.vq.set_avail_idx(QSIZE + 5);
    let err = rig.process(&mut PanicIo);
    assert!(
        matches!(err, Err(DeviceError::QueueBroken(0, _))),
        "{err:?}"
    );
    assert!(rig.needs_reset());
    assert_eq!(rig.isr() & INT_CONFIG, INT_CONFIG);
    assert_eq!(rig.line.count(), 1);
    assert_eq!(rig.dev.counters().needs_reset, 1);
    // Further kicks do nothing until reset.
    assert_eq!(rig.process(&mut PanicIo)?, ProcessOutcome::default());
    rig.reset_and_reactivate();
    assert!(!rig.needs_reset());
    rig.read_req(0, 0, 512);
    rig.run()?;
    assert_eq!(rig.status(0), OK);
    Ok(())
}

#[test]
fn a_head_already_in_flight_or_out_of_range_needs_reset() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    let head = rig.read_req(0, 0, 512);
    let mut io = RecordingIo::default();
    rig.process(&mut io)?;
    rig.publish(head);
    assert!(matches!(
        rig.process(&mut io),
        Err(DeviceError::QueueBroken(0, _))
    ));
    assert!(rig.needs_reset());
    assert_eq!(io.ops.len(), 1);

    let mut rig = Rig::new(&mem, false);
    rig.publish(QSIZE + 3);
    assert!(rig.process(&mut PanicIo).is_err());
    assert!(rig.needs_reset());
    Ok(())
}

#[test]
fn completions_from_before_a_reset_are_dropped() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    rig.read_req(0, 0, 512);
    let mut io = RecordingIo::default();
    rig.process(&mut io)?;
    let old = io.ops[0].1;
    rig.reset_and_reactivate();
    assert_eq!(rig.in_flight(), 1, "orphan kept until its CQE");
    rig.read_req(1, 1, 512);
    let mut io2 = RecordingIo::default();
    rig.process(&mut io2)?;
    let new = io2.ops[0].1;
    assert_ne!(old, new);
    rig.complete(old, 512);
    assert!(rig.used().is_empty(), "stale completion reached the ring");
    assert_eq!(rig.status(0), 0xee);
    rig.complete(new, 512);
    assert_eq!(rig.used(), vec![(0, 513)]);
    assert_eq!(rig.in_flight(), 0);
    Ok(())
}

#[test]
fn a_full_ring_puts_the_request_back() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    rig.read_req(0, 0, 512);
    let mut io = RecordingIo {
        full: true,
        ..RecordingIo::default()
    };
    let out = rig.process(&mut io)?;
    assert!(out.blocked);
    assert_eq!(out.popped, 0);
    assert!(rig.used().is_empty());
    io.full = false;
    let out = rig.process(&mut io)?;
    assert_eq!(out.submitted, 1);
    assert_eq!(rig.dev.counters().requests, 1);
    Ok(())
}

#[test]
fn a_drain_is_bounded_by_the_queue_size() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    for n in 0..u64::from(QSIZE) {
        rig.header(n, VIRTIO_BLK_T_GET_ID, 0);
        rig.push(&[(hdr_addr(n), 16, 0), (status_addr(n), 1, W)]);
    }
    let out = rig.process(&mut PanicIo)?;
    assert_eq!(out.popped, QSIZE);
    assert!(out.more);
    assert_eq!(rig.used().len(), usize::from(QSIZE));
    Ok(())
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() -> TestResult {
    let mem = memory();
    let mut rig = Rig::with_features(&mem, false, BASE_FEATURES);
    let used_event = rig.vq.used_event_addr();
    mem.write_obj(100u16, used_event)?;
    rig.read_req(0, 0, 512);
    rig.run()?;
    assert_eq!(rig.line.count(), 0);
    mem.write_obj(1u16, used_event)?;
    rig.read_req(1, 0, 512);
    rig.run()?;
    assert_eq!(rig.line.count(), 1);
    Ok(())
}

#[test]
fn swapping_the_disk_updates_capacity_and_interrupts() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    let shared = info(&rig.dev).shared;
    let gen = shared.config_generation();
    // An op in flight on the old disk keeps it open, and does not stop a
    // swap (PATCH /drives is never refused for the guest's I/O).
    rig.read_req(0, 0, 512);
    let mut io = RecordingIo::default();
    rig.process(&mut io)?;
    let tmp = TempFile::new()?;
    let f = tmp.as_file().try_clone()?;
    f.set_len(128 * 512)?;
    rig.dev.swap_disk(f.try_clone()?)?;
    assert_eq!(rig.dev.capacity_sectors(), 128);
    assert_eq!(shared.config_generation(), gen.wrapping_add(1));
    let mut cap = [0u8; 8];
    shared.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 128);
    assert_eq!(rig.isr() & INT_CONFIG, INT_CONFIG);
    assert_eq!(rig.line.count(), 1);
    assert_eq!(rig.dev.retired_disks(), 1);
    rig.dev.swap_disk(f.try_clone()?)?;
    rig.complete(io.ops[0].1, 512);
    assert_eq!(rig.status(0), OK);
    // Nothing written to the swapped-out files: no FLUSH owed, both closed.
    assert_eq!(rig.dev.retired_disks(), 0);
    rig.read_req(1, 100, 512);
    rig.run()?;
    assert_eq!(rig.status(1), OK);
    Ok(())
}

/// Bug: a FLUSH after PATCH /drives skipped the old file, so writes the
/// guest was told were done never became durable.
#[test]
fn a_flush_after_a_swap_syncs_the_swapped_out_file_too() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    rig.write_req(0, 2, 512, 0x77);
    rig.run()?;
    assert_eq!(rig.status(0), OK);
    let tmp = TempFile::new()?;
    tmp.as_file().set_len(SECTORS * 512)?;
    let new_file = tmp.as_file().try_clone()?;
    rig.dev.swap_disk(new_file)?;
    assert_eq!(rig.dev.retired_disks(), 1, "unflushed writes keep it open");
    rig.header(1, VIRTIO_BLK_T_FLUSH, 0);
    rig.push(&[(hdr_addr(1), 16, 0), (status_addr(1), 1, W)]);
    let mut io = RecordingIo::default();
    rig.process(&mut io)?;
    let (first, tag) = io.ops[0];
    let IoOp::Fsync { fd: new_fd, .. } = first else {
        panic!("unexpected {first:?}");
    };
    rig.dev.complete(tag, 0, &mem, &mut io);
    assert_eq!(
        rig.status(1),
        0xee,
        "not answered before the old file is synced"
    );
    let (second, tag) = io.ops[1];
    assert!(matches!(second, IoOp::Fsync { fd, datasync: true } if fd != new_fd));
    rig.dev.complete(tag, 0, &mem, &mut io);
    assert_eq!(rig.status(1), OK);
    assert_eq!(rig.dev.retired_disks(), 0, "synced and idle: closed");
    Ok(())
}

#[test]
fn a_failed_sync_of_a_swapped_out_file_fails_the_flush() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    rig.write_req(0, 2, 512, 0x77);
    rig.run()?;
    let tmp = TempFile::new()?;
    rig.dev.swap_disk(tmp.as_file().try_clone()?)?;
    rig.header(1, VIRTIO_BLK_T_FLUSH, 0);
    rig.push(&[(hdr_addr(1), 16, 0), (status_addr(1), 1, W)]);
    let mut io = RecordingIo::default();
    rig.process(&mut io)?;
    rig.dev.complete(io.ops[0].1, 0, &mem, &mut io);
    rig.dev.complete(io.ops[1].1, -libc::EIO, &mem, &mut io);
    assert_eq!(rig.status(1), IOERR);
    assert_eq!(rig.dev.retired_disks(), 1, "still owed a flush");
    Ok(())
}

#[test]
fn swapped_out_files_are_bounded() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    rig.write_req(0, 2, 512, 0x77);
    rig.run()?;
    let tmp = TempFile::new()?;
    tmp.as_file().set_len(SECTORS * 512)?;
    for _ in 0..MAX_RETIRED_DISKS {
        rig.dev.swap_disk(tmp.as_file().try_clone()?)?;
        rig.write_req(0, 2, 512, 0x77);
        rig.run()?;
    }
    assert!(matches!(
        rig.dev.swap_disk(tmp.as_file().try_clone()?),
        Err(BlockError::SwapBusy)
    ));
    // A FLUSH lets them go.
    rig.header(1, VIRTIO_BLK_T_FLUSH, 0);
    rig.push(&[(hdr_addr(1), 16, 0), (status_addr(1), 1, W)]);
    rig.run()?;
    assert_eq!(rig.status(1), OK);
    assert_eq!(rig.dev.retired_disks(), 0);
    rig.dev.swap_disk(tmp.as_file().try_clone()?)?;
    Ok(())
}

#[test]
fn activation_refuses_bad_features_and_queues() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    let good = rig.activation(NO_EVENT_IDX);
    let cases = [
        Activation {
            features: good.features | (1 << 35),
            ..good.clone()
        },
        Activation {
            features: good.features & !crate::virtio::F_VERSION_1,
            ..good.clone()
        },
        Activation {
            queues: vec![],
            ..good.clone()
        },
        Activation {
            queues: vec![QueueConfig {
                used_ring: 0x10_0000,
                ..good.queues[0]
            }],
            ..good.clone()
        },
        Activation {
            queues: vec![QueueConfig {
                ready: false,
                ..good.queues[0]
            }],
            ..good.clone()
        },
    ];
    for a in cases {
        info(&rig.dev).shared.clear();
        let refused = transport_event(&mut rig.dev, &mem, &TransportEvent::Activate(a.clone()));
        assert!(refused.is_err(), "{a:?}");
        assert!(!VirtioDevice::<GuestMemoryMmap>::is_active(&rig.dev));
        assert!(rig.needs_reset());
        assert!(rig.process(&mut PanicIo).is_ok());
    }
    transport_event(&mut rig.dev, &mem, &TransportEvent::Activate(good))?;
    assert!(VirtioDevice::<GuestMemoryMmap>::is_active(&rig.dev));
    transport_event(&mut rig.dev, &mem, &TransportEvent::Reset)?;
    assert!(!VirtioDevice::<GuestMemoryMmap>::is_active(&rig.dev));
    assert!(matches!(
        rig.dev.process_queue(3, &mem, &mut PanicIo),
        Err(DeviceError::NoSuchQueue(3))
    ));
    Ok(())
}

/// The transport and the backend wired the way the VMM does it.
#[test]
fn transport_activation_drives_the_device() -> TestResult {
    use crate::bus::{BusAccess, BusDevice};
    use crate::virtio::mmio::TransportEvents;
    use crate::virtio::MmioTransport;
    use vmm_sys_util::eventfd::EventFd;

    let mem = memory();
    let vq = Driver::new(mem.clone(), DESC, QSIZE);
    let tmp = TempFile::new()?;
    tmp.as_file().set_len(SECTORS * 512)?;
    let line = CountingLine::default();
    let mut dev = BlockDevice::new(
        BlockConfig {
            file: tmp.as_file().try_clone()?,
            read_only: false,
            flush: true,
            id: String::new(),
        },
        Box::new(line.clone()),
    )?;
    let (sender, rx) = std::sync::mpsc::sync_channel(crate::virtio::mmio::TRANSPORT_QUEUE_DEPTH);
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    let mut t = MmioTransport::new(
        info(&dev),
        TransportEvents {
            sender,
            wake: wake.try_clone()?,
        },
        vec![EventFd::new(libc::EFD_NONBLOCK)?],
    )?;
    let mut w = |off: u64, v: u32| {
        t.write(
            BusAccess {
                offset: off,
                vcpu: 0,
            },
            &v.to_le_bytes(),
        )
    };
    w(0x70, 1);
    w(0x70, 3);
    w(0x24, 0);
    w(0x20, BASE_FEATURES as u32);
    w(0x24, 1);
    w(0x20, (BASE_FEATURES >> 32) as u32);
    w(0x70, 0xb);
    w(0x38, u32::from(QSIZE));
    w(0x80, DESC as u32);
    w(0x90, AVAIL as u32);
    w(0xa0, USED as u32);
    w(0x44, 1);
    w(0x70, 0xf);
    assert_eq!(wake.read()?, 1);
    let event = rx.try_recv()?;
    transport_event(&mut dev, &mem, &event)?;
    assert!(VirtioDevice::<GuestMemoryMmap>::is_active(&dev));
    assert_eq!(dev.acked_features(), BASE_FEATURES);

    // A backend NEEDS_RESET shows in the transport's Status register.
    vq.set_avail_idx(QSIZE + 1);
    assert!(dev.process_queue(0, &mem, &mut PanicIo).is_err());
    let mut s = [0u8; 4];
    t.read(
        BusAccess {
            offset: 0x70,
            vcpu: 0,
        },
        &mut s,
    );
    assert_eq!(u32::from_le_bytes(s) & 0x40, 0x40);
    t.read(
        BusAccess {
            offset: 0x60,
            vcpu: 0,
        },
        &mut s,
    );
    assert_eq!(u32::from_le_bytes(s) & INT_CONFIG, INT_CONFIG);
    t.write(
        BusAccess {
            offset: 0x70,
            vcpu: 0,
        },
        &[0, 0, 0, 0],
    );
    assert_eq!(rx.try_recv()?, TransportEvent::Reset);
    transport_event(&mut dev, &mem, &TransportEvent::Reset)?;
    assert!(!VirtioDevice::<GuestMemoryMmap>::is_active(&dev));
    Ok(())
}

#[test]
fn device_halves_can_move_to_their_threads() {
    fn is_send<T: Send>() {}
    is_send::<BlockDevice>();
    is_send::<crate::virtio::MmioTransport>();
}

/// Bug: each bad request logged a warning, so a guest could flood the
/// host's log. Now a few lines per kind get through; all are counted.
#[test]
fn a_flood_of_bad_requests_is_counted_but_logged_at_a_bounded_rate() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    let lines = u64::from(crate::guest_log::LINES_PER_WINDOW);
    for round in 0..10u64 {
        for n in 0..10 {
            // Past the end of the disk: refused with IOERR, no host I/O.
            rig.read_req(n, SECTORS + round, 512);
        }
        rig.process(&mut PanicIo)?;
        rig.vq.set_used_idx(0);
        rig.vq.set_avail_idx(0);
        rig.reset_and_reactivate();
    }
    let c = rig.dev.counters();
    assert_eq!(c.errors, 100);
    assert_eq!(c.log_lines_suppressed, 100 - lines);
    Ok(())
}

/// FLUSH is a barrier: its fsync is not submitted while a write submitted
/// before it is still in the kernel (completions come back in any order),
/// and writes that arrive after it do not hold it back.
#[test]
fn a_flush_waits_for_the_writes_before_it_only() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    let mut io = RecordingIo::default();
    rig.write_req(0, 2, 512, 0x11);
    rig.process(&mut io)?;
    rig.header(1, VIRTIO_BLK_T_FLUSH, 0);
    rig.push(&[(hdr_addr(1), 16, 0), (status_addr(1), 1, W)]);
    rig.write_req(2, 4, 512, 0x22);
    rig.process(&mut io)?;
    assert_eq!(io.ops.len(), 2, "two writes submitted, the flush held");
    assert!(io
        .ops
        .iter()
        .all(|(op, _)| matches!(op, IoOp::Writev { .. })));
    // The later write completing does not release the flush...
    rig.dev.complete(io.ops[1].1, 512, &mem, &mut io);
    assert_eq!(io.ops.len(), 2);
    // ...the earlier one does.
    rig.dev.complete(io.ops[0].1, 512, &mem, &mut io);
    assert_eq!(io.ops.len(), 3);
    assert!(matches!(io.ops[2].0, IoOp::Fsync { datasync: true, .. }));
    assert_eq!(rig.status(1), 0xee, "not answered before its fsync");
    rig.dev.complete(io.ops[2].1, 0, &mem, &mut io);
    assert_eq!(rig.status(1), OK);
    assert_eq!(rig.dev.counters().flushes, 1);
    assert_eq!(rig.in_flight(), 0);
    Ok(())
}

#[test]
fn a_parked_flush_is_dropped_by_a_reset_and_its_head_refused_meanwhile() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    let mut io = RecordingIo::default();
    rig.write_req(0, 2, 512, 0x11);
    let flush = {
        rig.header(1, VIRTIO_BLK_T_FLUSH, 0);
        rig.push(&[(hdr_addr(1), 16, 0), (status_addr(1), 1, W)])
    };
    rig.process(&mut io)?;
    // The driver publishing the parked flush's head again is corrupt.
    rig.vq.publish(flush);
    assert!(matches!(
        rig.process(&mut io),
        Err(DeviceError::QueueBroken(0, _))
    ));
    rig.reset_and_reactivate();
    // The orphaned write completes; nothing is submitted for the old flush.
    rig.dev.complete(io.ops[0].1, 512, &mem, &mut io);
    assert_eq!(io.ops.len(), 1);
    assert_eq!(rig.in_flight(), 0);
    Ok(())
}

mod rate_limits {
    //! The drive's rate limiter on the request path: held-back requests stay
    //! in the available ring, the slot is told when to come back, and every
    //! request is eventually served.

    use std::time::Duration;

    use super::*;
    use crate::rate_limiter::{BucketConfig, ManualClock};
    use crate::virtio::{LimiterSide, Throttle};

    #[test]
    fn an_ops_limit_holds_requests_in_the_ring_until_the_timer() -> TestResult {
        let mem = memory();
        let mut rig = Rig::new(&mem, false);
        let clock = ManualClock::default();
        rig.dev
            .set_rate_limiter(clock.limiter(None, Some(BucketConfig::new(2, 100))));
        for n in 0..5 {
            rig.read_req(n, n, 512);
        }
        let out = rig.run()?;
        assert_eq!((out.popped, out.answered), (2, 0));
        assert!(out.throttled && !out.blocked && !out.more);
        assert_eq!(rig.used().len(), 2);
        // Two ops per 100 ms: the third is 50 ms away.
        let t = VirtioDevice::<GuestMemoryMmap>::take_throttle(&mut rig.dev);
        assert_eq!(
            t,
            Some(Throttle {
                queue: 0,
                resume_after: Duration::from_millis(50)
            })
        );
        assert_eq!(
            VirtioDevice::<GuestMemoryMmap>::take_throttle(&mut rig.dev),
            None
        );
        // Served before its time (a kick the slot did not hold back):
        // nothing more, and a new throttle.
        rig.run()?;
        assert_eq!(rig.used().len(), 2);
        assert!(VirtioDevice::<GuestMemoryMmap>::take_throttle(&mut rig.dev).is_some());
        clock.advance(Duration::from_millis(100));
        rig.run()?;
        assert_eq!(rig.used().len(), 4);
        clock.advance(Duration::from_millis(50));
        rig.run()?;
        assert_eq!(rig.used().len(), 5);
        for n in 0..5 {
            assert_eq!(rig.status(n), OK);
            assert_eq!(rig.data(n, 512), rig.disk_bytes(n * 512, 512));
        }
        let c = rig.dev.counters();
        assert_eq!(c.requests, 5, "held-back requests are counted once");
        assert_eq!(c.rate_limiter_throttled_events, 3);
        Ok(())
    }

    #[test]
    fn a_bandwidth_limit_counts_data_bytes_and_lets_an_oversize_request_through() -> TestResult {
        let mem = memory();
        let mut rig = Rig::new(&mem, false);
        let clock = ManualClock::default();
        // 4 KiB per 100 ms.
        rig.dev
            .set_rate_limiter(clock.limiter(Some(BucketConfig::new(4096, 100)), None));
        rig.write_req(0, 0, 8192, 0x11); // bigger than the bucket: passes, debt
        rig.write_req(1, 16, 512, 0x22);
        rig.run()?;
        assert_eq!(rig.used().len(), 1);
        let t = VirtioDevice::<GuestMemoryMmap>::take_throttle(&mut rig.dev).expect("throttle");
        // 4096 in debt plus 512 needed: 4608 bytes of refill, 112.5 ms.
        assert_eq!(t.resume_after, Duration::from_micros(112_500));
        clock.advance(t.resume_after);
        rig.run()?;
        assert_eq!(rig.used().len(), 2);
        assert_eq!(rig.disk_bytes(0, 8192), vec![0x11; 8192]);
        assert_eq!(rig.disk_bytes(16 * 512, 512), vec![0x22; 512]);
        Ok(())
    }

    #[test]
    fn a_live_update_replaces_the_bucket_and_zero_lifts_it() -> TestResult {
        let mem = memory();
        let mut rig = Rig::new(&mem, false);
        let clock = ManualClock::default();
        rig.dev
            .set_rate_limiter(clock.limiter(None, Some(BucketConfig::new(1, 100))));
        for n in 0..4 {
            rig.read_req(n, n, 512);
        }
        rig.run()?;
        assert_eq!(rig.used().len(), 1);
        let limiter =
            VirtioDevice::<GuestMemoryMmap>::rate_limiter_mut(&mut rig.dev, LimiterSide::Requests)
                .expect("a drive has a requests limiter");
        let off = BucketConfig {
            size: 0,
            one_time_burst: 0,
            refill_time_ms: 0,
        };
        limiter.update(
            crate::rate_limiter::BucketUpdate::Keep,
            crate::rate_limiter::BucketUpdate::Set(off),
        );
        rig.run()?;
        assert_eq!(rig.used().len(), 4, "no limit left: everything is served");
        assert!(
            VirtioDevice::<GuestMemoryMmap>::rate_limiter_mut(&mut rig.dev, LimiterSide::Rx)
                .is_none()
        );
        Ok(())
    }

    #[test]
    fn a_paused_drive_pops_nothing_and_completes_what_is_in_flight() -> TestResult {
        let mem = memory();
        let mut rig = Rig::new(&mem, false);
        rig.read_req(0, 0, 512);
        let mut io = RecordingIo::default();
        rig.process(&mut io)?;
        assert_eq!(io.ops.len(), 1);
        VirtioDevice::<GuestMemoryMmap>::set_paused(&mut rig.dev, true);
        rig.read_req(1, 1, 512);
        let out = rig.process(&mut io)?;
        assert_eq!(out.popped, 0, "a paused device took a request");
        assert_eq!(io.ops.len(), 1);
        // The op from before the pause still completes into the used ring.
        rig.complete(io.ops[0].1, 512);
        assert_eq!(rig.used().len(), 1);
        VirtioDevice::<GuestMemoryMmap>::set_paused(&mut rig.dev, false);
        rig.run()?;
        assert_eq!(rig.used().len(), 2);
        assert_eq!(rig.status(1), OK);
        Ok(())
    }
}

#[test]
fn reads_and_writes_of_a_tmpfs_file_go_straight_to_io_wq_flushes_do_not() -> TestResult {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.starts_with("tmpfs /dev/shm tmpfs "))
    {
        eprintln!("/dev/shm is not a tmpfs mount here: skipped");
        return Ok(());
    }
    let mem = memory();
    let mut rig = Rig::new(&mem, false);
    let path = format!("/dev/shm/ringvm-blk-punt-{}", std::process::id());
    let shm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    shm.set_len(SECTORS * 512)?;
    rig.dev.swap_disk(shm)?;
    rig.read_req(0, 0, 512);
    rig.write_req(1, 1, 512, 0xab);
    let mut io = RecordingIo::default();
    rig.process(&mut io)?;
    let tags: Vec<u64> = io.ops.iter().map(|(_, tag)| *tag).collect();
    assert_eq!(tags.len(), 2);
    assert_eq!(io.async_tags, tags, "both ops carry IOSQE_ASYNC");
    for tag in tags {
        rig.complete(tag, 512);
    }
    rig.header(2, VIRTIO_BLK_T_FLUSH, 0);
    rig.push(&[(hdr_addr(2), 16, 0), (status_addr(2), 1, W)]);
    let mut io = RecordingIo::default();
    rig.process(&mut io)?;
    assert!(matches!(io.ops.as_slice(), [(IoOp::Fsync { .. }, _)]));
    assert!(io.async_tags.is_empty(), "a flush is submitted as before");
    Ok(())
}
