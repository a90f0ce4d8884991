//! `make bench-blk`: the virtio-blk data path against the host's own limit.
//!
//! No KVM is involved. A synthetic split-virtqueue driver (this file) plays
//! the guest: it brings the device up through the real virtio-mmio register
//! file on the real MMIO bus, puts requests in guest memory, kicks the
//! queue's doorbell eventfd (what KVM's ioeventfd does on a QueueNotify
//! write) and sleeps on the irq eventfd (what KVM's irqfd would inject).
//! The device side is exactly what `ringvm` runs for a booted guest:
//! the real `BlockDevice` in its generic device slot (`VirtioDevices`) on its
//! own thread, turning one `Ring` (io_uring).
//!
//! Each point is measured for ringvm and then for
//! `fio --ioengine=io_uring` on the same file in the same run; the ratio
//! ringvm / fio is the figure of merit. A file in /dev/shm (tmpfs) and one
//! on disk are measured, both buffered (through the host page cache, which
//! holds the whole file). Results go to stdout and to
//! `target/bench/blk.{json,md}`.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use devices::virtio::testing::DriverQueue;
use devices::virtio::NOTIFY_REG_OFFSET;
use ringvm_tests::bench::clock::own_cpu_ns;
use ringvm_tests::bench::host::{HostInfo, Own};
use ringvm_tests::bench::inline_vmm::{watchdog, InlineVmm};
use ringvm_tests::bench::interleave::{interleave, Round};
use ringvm_tests::bench::irq::wait_irq;
use ringvm_tests::bench::mmio::MmioRegs;
use ringvm_tests::bench::points::{Better, Point, PointRound, Target};
use ringvm_tests::bench::qemu_img::{self, BenchSpec, QemuRun};
use ringvm_tests::bench::report;
use ringvm_tests::bench::stats::{median, Spread};
use ringvm_tests::bench::summary::summary_json;
use ringvm_tests::bench::task::IoWorkers;
use ringvm_tests::bench::vmm_thread::{VmmHandle, VmmSnap};
use ringvm_tests::bench::wakeup::{eventfd_round_trip, floor_rate};
use ringvm_tests::bench::wiring::BenchWiring;
use ringvm_tests::bench::Res;
use serde_json::{json, Value};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_SEL,
};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::config::DriveConfig;
use vmm::machine::builder::VirtioBuilder;
use vmm::machine::device_manager::DeviceManager;
use vmm_sys_util::eventfd::EventFd;

// Guest memory layout of the synthetic driver.
const MEM_SIZE: usize = 256 << 20;
const QUEUE_SIZE: u16 = 256;
/// Where the queue's rings start (the shared driver mock's layout: table,
/// then avail ring at +0x1000, used ring at +0x2000).
const QUEUE_BASE: u64 = 0x1000;
/// One 3-entry indirect table per slot, 64 bytes apart.
const INDIRECT_BASE: u64 = 0x1_0000;
/// One 2-entry indirect table (header, status) per slot for FLUSH.
const FLUSH_TABLE_BASE: u64 = 0x1_8000;
/// One 16-byte request header per slot.
const HEADER_BASE: u64 = 0x2_0000;
/// One status byte per slot.
const STATUS_BASE: u64 = 0x2_8000;
/// One data buffer of [`MAX_BLOCK`] bytes per slot.
const DATA_BASE: u64 = 0x10_0000;
const MAX_BLOCK: u64 = 128 << 10;
const MAX_QD: usize = QUEUE_SIZE as usize;

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Parser, Debug)]
#[command(about = "virtio-blk data path (synthetic driver, real device and loop) vs fio io_uring")]
struct Args {
    /// Measured seconds per run (ringvm and fio each).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Rounds per point: each round runs ringvm and fio back to back
    /// (alternating which goes first) and gives one ratio; the report
    /// shows the median ratio and its spread.
    #[arg(long, alias = "repeats", default_value_t = 3)]
    rounds: u32,
    /// Unmeasured warm-up seconds before each run (fio: --ramp_time).
    #[arg(long, default_value_t = 0.3)]
    warmup: f64,
    /// Seconds of the eventfd round-trip measurement that makes the QD1
    /// floor, once per QD1 round.
    #[arg(long, default_value_t = 0.3)]
    floor_seconds: f64,
    /// Where blk.json and blk.md go (default: <workspace>/target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Directory of the tmpfs file.
    #[arg(long, default_value = "/dev/shm")]
    shm_dir: PathBuf,
    /// Directory of the on-disk file.
    #[arg(long, default_value = "/var/tmp")]
    disk_dir: PathBuf,
    /// Size of each test file in MiB.
    #[arg(long, default_value_t = 1024)]
    file_mib: u64,
    /// Keep the test files afterwards.
    #[arg(long)]
    keep_files: bool,
    /// Skip the on-disk file opened with O_DIRECT (by ringvm and fio).
    #[arg(long)]
    no_direct: bool,
    /// At QD >= 32, also run fio with --force_async=1 (IOSQE_ASYNC on every
    /// request) in each round: where io_uring punts requests to io-wq
    /// anyway (tmpfs, buffered ext4 writes), that is the host's limit, not
    /// fio's default.
    #[arg(long)]
    async_reference: bool,
    /// Leave out the second reference, QEMU's block layer (`qemu-img
    /// bench`, aio=io_uring) on the same file in the same rounds.
    #[arg(long)]
    no_qemu: bool,
    /// Run only the points whose "<file> <workload> QD<n>" label contains
    /// this text (e.g. "disk randwrite 4k QD32"); for investigating.
    #[arg(long)]
    only: Option<String>,
    /// --only must match the whole label ("tmpfs randread 4k QD1" then
    /// leaves out QD128).
    #[arg(long)]
    exact: bool,
    /// Instead of measuring: run the selected points with ringvm only,
    /// about this many requests each, the VMM loop turned by the driver's
    /// own thread (see `bench::inline_vmm`), and print one JSON line per
    /// point. What `make bench-callgrind` runs under valgrind.
    #[arg(long)]
    callgrind_requests: Option<u64>,
}

// ---------------------------------------------------------------------------
// Workloads

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    /// fio's --rw name.
    rw: &'static str,
    op: Op,
    random: bool,
    bs: u64,
    qd: usize,
    /// Report MiB/s instead of IOPS.
    bandwidth: bool,
    /// A FLUSH after every this many writes, submitted without waiting
    /// for them (fio: `--fsync=N`); 0: none. FLUSH is a barrier in ringvm
    /// (it completes only after every write submitted before it is
    /// durable), so this row shows what that costs.
    flush_every: u32,
}

impl Workload {
    fn label(&self) -> String {
        if self.flush_every > 0 {
            format!("{} {}k flush/{}", self.rw, self.bs >> 10, self.flush_every)
        } else {
            format!("{} {}k", self.rw, self.bs >> 10)
        }
    }
}

fn workloads() -> Vec<Workload> {
    let mut v = Vec::new();
    for (rw, op) in [("randread", Op::Read), ("randwrite", Op::Write)] {
        for qd in [1, 32, 128] {
            v.push(Workload {
                rw,
                op,
                random: true,
                bs: 4096,
                qd,
                bandwidth: false,
                flush_every: 0,
            });
        }
    }
    // Flush-heavy: a FLUSH after every 32 writes at QD32.
    v.push(Workload {
        rw: "randwrite",
        op: Op::Write,
        random: true,
        bs: 4096,
        qd: 32,
        bandwidth: false,
        flush_every: 32,
    });
    for (rw, op) in [("read", Op::Read), ("write", Op::Write)] {
        v.push(Workload {
            rw,
            op,
            random: false,
            bs: 128 << 10,
            qd: 32,
            bandwidth: true,
            flush_every: 0,
        });
    }
    v
}

// ---------------------------------------------------------------------------
// The synthetic guest driver.

fn indirect_table(slot: usize) -> u64 {
    INDIRECT_BASE + slot as u64 * 64
}

fn flush_table(slot: usize) -> u64 {
    FLUSH_TABLE_BASE + slot as u64 * 32
}

fn header_addr(slot: usize) -> u64 {
    HEADER_BASE + slot as u64 * 16
}

fn status_addr(slot: usize) -> u64 {
    STATUS_BASE + slot as u64
}

fn data_addr(slot: usize) -> u64 {
    DATA_BASE + slot as u64 * MAX_BLOCK
}

fn descriptor(addr: u64, len: u32, flags: u32, next: u16) -> Descriptor {
    Descriptor::new(addr, len, flags as u16, next)
}

/// What the driver saw, cumulative.
#[derive(Clone, Copy, Debug, Default)]
struct DriverStats {
    completed: u64,
    /// Doorbell writes (each one a guest exit on real KVM).
    kicks: u64,
    /// Times the driver slept on the irq line.
    waits: u64,
    /// Sum of the irq eventfd counter: the device's irq writes it consumed.
    irq_signals: u64,
    /// The driver thread's CPU time when the stats were taken.
    cpu_ns: u64,
    /// FLUSH requests completed (not in `completed`, which counts the
    /// workload's reads or writes).
    flushes: u64,
}

struct Driver {
    mem: GuestMemoryMmap,
    regs: MmioRegs,
    kick: EventFd,
    irq: EventFd,
    qsize: u16,
    /// The queue's rings, written and read as a guest driver does.
    vq: DriverQueue<GuestMemoryMmap>,
    /// Heads filled this round, published with one index update.
    staged: Vec<u16>,
    capacity: u64,
    free: Vec<usize>,
    busy: Vec<bool>,
    /// Slots whose ring descriptor points at their FLUSH table now.
    flushing: Vec<bool>,
    /// Writes submitted since the last FLUSH.
    writes_since_flush: u32,
    stats: DriverStats,
    rng: u64,
    next_seq: u64,
}

impl Driver {
    /// Brings the device up exactly as a virtio-mmio v2 guest driver does.
    fn init(&mut self) -> Res<()> {
        let regs = &self.regs;
        let status = regs.probe(2, "block")?;
        let offered = regs.device_features();
        // Indirect descriptors, as Linux uses them: one ring slot per
        // request, so QD 128 fits a 256-entry queue.
        let want = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC);
        if offered & want != want {
            return Err(format!(
                "device offers features {offered:#x}, the driver needs {want:#x}"
            ));
        }
        let status = regs.set_features(status, want)?;
        regs.write32(VIRTIO_MMIO_QUEUE_SEL, 0);
        let max = regs.read32(VIRTIO_MMIO_QUEUE_NUM_MAX);
        self.qsize = u16::try_from(max.min(u32::from(QUEUE_SIZE))).unwrap_or(0);
        if usize::from(self.qsize) < 128 {
            return Err(format!("queue maximum {max} is below the QD 128 we need"));
        }
        regs.write32(VIRTIO_MMIO_QUEUE_NUM, u32::from(self.qsize));
        self.vq = DriverQueue::new(self.mem.clone(), QUEUE_BASE, self.qsize);
        let vq = &self.vq;
        regs.set_queue_rings(vq.desc_table(), vq.avail_ring(), vq.used_ring());
        regs.driver_ok(status)?;
        let sectors = u64::from(self.regs.read32(VIRTIO_MMIO_CONFIG))
            | (u64::from(self.regs.read32(VIRTIO_MMIO_CONFIG + 4)) << 32);
        self.capacity = sectors * 512;
        // Touch every data buffer once so page faults stay out of the runs.
        let zeros = vec![0u8; MAX_BLOCK as usize];
        for slot in 0..MAX_QD {
            self.mem
                .write_slice(&zeros, GuestAddress(data_addr(slot)))
                .map_err(|e| format!("guest memory: {e}"))?;
        }
        Ok(())
    }

    /// Points `qd` descriptors at their indirect tables for workload `w`.
    fn configure(&mut self, w: &Workload) -> Res<()> {
        let data_flags = VRING_DESC_F_NEXT
            | if w.op == Op::Read {
                VRING_DESC_F_WRITE
            } else {
                0
            };
        for slot in 0..w.qd {
            let table = indirect_table(slot);
            self.vq
                .store(slot as u16, descriptor(table, 48, VRING_DESC_F_INDIRECT, 0));
            let entries = [
                descriptor(header_addr(slot), 16, VRING_DESC_F_NEXT, 1),
                descriptor(data_addr(slot), w.bs as u32, data_flags, 2),
                descriptor(status_addr(slot), 1, VRING_DESC_F_WRITE, 0),
            ];
            for (i, d) in entries.into_iter().enumerate() {
                self.vq.store_indirect(table, i as u16, d);
            }
            let flush = [
                descriptor(header_addr(slot), 16, VRING_DESC_F_NEXT, 1),
                descriptor(status_addr(slot), 1, VRING_DESC_F_WRITE, 0),
            ];
            for (i, d) in flush.into_iter().enumerate() {
                self.vq.store_indirect(flush_table(slot), i as u16, d);
            }
        }
        self.free = (0..w.qd).rev().collect();
        self.busy = vec![false; w.qd];
        self.flushing = vec![false; w.qd];
        self.writes_since_flush = 0;
        Ok(())
    }

    fn next_offset(&mut self, w: &Workload) -> u64 {
        let blocks = (self.capacity / w.bs).max(1);
        if w.random {
            // xorshift64*
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
            (r % blocks) * w.bs
        } else {
            let off = self.next_seq;
            self.next_seq = (off + w.bs) % (blocks * w.bs);
            off
        }
    }

    /// Fills every free slot, publishes the avail index once, and kicks
    /// only if the device asked for it (EVENT_IDX).
    fn submit_all(&mut self, w: &Workload) -> Res<()> {
        if self.free.is_empty() {
            return Ok(());
        }
        let gm = |e: vm_memory::GuestMemoryError| format!("guest memory: {e}");
        let kind = if w.op == Op::Read {
            VIRTIO_BLK_T_IN
        } else {
            VIRTIO_BLK_T_OUT
        };
        while let Some(slot) = self.free.pop() {
            let flush = w.flush_every > 0 && self.writes_since_flush >= w.flush_every;
            if flush {
                self.writes_since_flush = 0;
            } else {
                self.writes_since_flush += 1;
            }
            if self.flushing.get(slot).copied() != Some(flush) {
                let (table, len) = if flush {
                    (flush_table(slot), 32)
                } else {
                    (indirect_table(slot), 48)
                };
                self.vq.store(
                    slot as u16,
                    descriptor(table, len, VRING_DESC_F_INDIRECT, 0),
                );
                if let Some(f) = self.flushing.get_mut(slot) {
                    *f = flush;
                }
            }
            let (kind, offset) = if flush {
                (VIRTIO_BLK_T_FLUSH, 0)
            } else {
                (kind, self.next_offset(w))
            };
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&kind.to_le_bytes());
            header[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
            self.mem
                .write_slice(&header, GuestAddress(header_addr(slot)))
                .map_err(gm)?;
            self.mem
                .write_obj(0xffu8, GuestAddress(status_addr(slot)))
                .map_err(gm)?;
            self.busy[slot] = true;
            self.staged.push(slot as u16);
        }
        let (old, new) = self.vq.publish_all(self.staged.drain(..));
        if self.vq.kick_wanted(old, new) {
            self.kick
                .write(1)
                .map_err(|e| format!("doorbell write: {e}"))?;
            self.stats.kicks += 1;
        }
        Ok(())
    }

    /// Takes every used element; checks id, length and status.
    fn harvest(&mut self, w: &Workload) -> Res<u64> {
        let gm = |e: vm_memory::GuestMemoryError| format!("guest memory: {e}");
        let mut n = 0;
        while let Some((id, len)) = self.vq.next_used() {
            let id = id as usize;
            if !self.busy.get(id).copied().unwrap_or(false) {
                return Err(format!(
                    "device returned descriptor {id}, which is not in flight"
                ));
            }
            let status: u8 = self
                .mem
                .read_obj(GuestAddress(status_addr(id)))
                .map_err(gm)?;
            if status != VIRTIO_BLK_S_OK as u8 {
                return Err(format!("request failed with virtio-blk status {status}"));
            }
            let flush = self.flushing.get(id).copied().unwrap_or(false);
            let expected = if w.op == Op::Read && !flush {
                w.bs as u32 + 1
            } else {
                1
            };
            if len != expected {
                return Err(format!("used length {len}, expected {expected}"));
            }
            self.busy[id] = false;
            self.free.push(id);
            if flush {
                self.stats.flushes += 1;
            } else {
                n += 1;
            }
        }
        self.stats.completed += n;
        Ok(n)
    }

    /// Re-arms the interrupt (used_event = what we have seen), and sleeps
    /// on the irq line unless something arrived meanwhile. On wake-up it
    /// does what Linux's virtio-mmio interrupt handler does: read and
    /// acknowledge InterruptStatus.
    fn wait_irq(&mut self) -> Res<()> {
        if self.arm_irq() {
            return Ok(());
        }
        let Some(signals) = wait_irq(&self.irq, 10_000)? else {
            return Err("no interrupt for 10 s with requests in flight: device stalled".into());
        };
        self.stats.waits += 1;
        self.stats.irq_signals += signals;
        self.regs.ack_interrupt();
        Ok(())
    }

    /// Re-arms the interrupt (used_event = what we have seen); true when
    /// completions arrived meanwhile, so there is no need to sleep.
    fn arm_irq(&mut self) -> bool {
        self.vq.set_used_event(self.vq.seen_used());
        self.vq.used_idx() != self.vq.seen_used()
    }

    /// Takes an interrupt the device already raised, without sleeping
    /// (the single-threaded run, where the loop turned on this thread).
    fn take_irq(&mut self) -> Res<()> {
        match self.irq.read() {
            Ok(n) => {
                self.stats.irq_signals += n;
                self.regs.ack_interrupt();
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(format!("irq eventfd read: {e}")),
        }
    }

    fn in_flight(&self) -> usize {
        self.busy.len() - self.free.len()
    }
}

// ---------------------------------------------------------------------------
// One file: a drive, its VMM thread, the driver.

struct Harness {
    driver: Driver,
    vmm: Vmm,
}

/// Where the device loop turns.
enum Vmm {
    /// On its own thread, as in ringvm: the measured runs.
    Thread(VmmHandle),
    /// On the driver's thread, one turn at a time: the callgrind runs.
    Inline(Box<InlineVmm>),
}

impl Vmm {
    fn thread(&self) -> Res<&VmmHandle> {
        match self {
            Vmm::Thread(h) => Ok(h),
            Vmm::Inline(_) => Err("this run turns the VMM loop inline".into()),
        }
    }

    fn deferred_taskrun(&self) -> bool {
        match self {
            Vmm::Thread(h) => h.deferred_taskrun(),
            Vmm::Inline(v) => v.deferred_taskrun(),
        }
    }

    fn stop(self) -> Res<()> {
        match self {
            Vmm::Thread(h) => h.stop(),
            Vmm::Inline(_) => Ok(()),
        }
    }
}

impl Harness {
    /// A drive on `path` (opened with O_DIRECT if `direct`), its VMM loop
    /// on its own thread, or turned inline by the driver if `inline`.
    fn new(path: &Path, direct: bool, inline: bool) -> Res<Self> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(|e| format!("guest memory: {e}"))?;
        let mut devices = DeviceManager::new().map_err(|e| e.to_string())?;
        let wiring = BenchWiring::default();
        let cfg = DriveConfig {
            drive_id: "bench".into(),
            path_on_host: path.to_path_buf(),
            direct,
            ..DriveConfig::default()
        };
        let mut builder = VirtioBuilder::new();
        builder.add_drive(&cfg).map_err(|e| e.to_string())?;
        let virtio = builder
            .place(&mut devices, &wiring)
            .map_err(|e| e.to_string())?;
        let irq = wiring
            .take_irq()
            .ok_or("the drive wired no interrupt line")?;
        let (kick, doorbell, _value) = wiring
            .take_doorbells()
            .into_iter()
            .next()
            .ok_or("the drive wired no doorbell")?;
        let vmm = if inline {
            Vmm::Inline(Box::new(InlineVmm::new(virtio, &mem)?))
        } else {
            Vmm::Thread(VmmHandle::spawn(move || virtio, &mem)?)
        };
        let mut driver = Driver {
            vq: DriverQueue::new(mem.clone(), QUEUE_BASE, QUEUE_SIZE),
            mem,
            regs: MmioRegs {
                bus: devices.mmio.clone(),
                base: doorbell - NOTIFY_REG_OFFSET,
            },
            kick,
            irq,
            qsize: 0,
            staged: Vec::with_capacity(MAX_QD),
            capacity: 0,
            free: Vec::new(),
            busy: Vec::new(),
            flushing: Vec::new(),
            writes_since_flush: 0,
            stats: DriverStats::default(),
            rng: 0x9e37_79b9_7f4a_7c15,
            next_seq: 0,
        };
        driver.init()?;
        Ok(Self { driver, vmm })
    }

    /// Runs `w` for about `requests` requests with the VMM loop turned on
    /// this thread (see `bench::inline_vmm`), from the first request to
    /// the last completion; what callgrind measures.
    fn run_inline(&mut self, w: &Workload, requests: u64) -> Res<Value> {
        let Vmm::Inline(vmm) = &mut self.vmm else {
            return Err("the inline run needs an inline VMM loop".into());
        };
        let d = &mut self.driver;
        d.configure(w)?;
        let (c0, k0, t0) = (d.stats.completed, d.stats.kicks, vmm.turns());
        loop {
            if d.stats.completed - c0 + (d.in_flight() as u64) < requests {
                d.submit_all(w)?;
            }
            let got = d.harvest(w)?;
            if d.stats.completed - c0 >= requests && d.in_flight() == 0 {
                break;
            }
            if got == 0 && !d.arm_irq() {
                watchdog(120);
                vmm.turn().map_err(|e| format!("VMM loop turn: {e}"))?;
                d.take_irq()?;
            }
        }
        watchdog(0);
        Ok(json!({
            "requests": d.stats.completed - c0,
            "turns": vmm.turns() - t0,
            "kicks": d.stats.kicks - k0,
        }))
    }

    /// Runs `w` for warm-up + `secs`, measuring only the second part, then
    /// drains the queue.
    fn run(&mut self, w: &Workload, warmup: f64, secs: f64) -> Res<RingvmResult> {
        let d = &mut self.driver;
        d.configure(w)?;
        let start = Instant::now();
        let t_measure = start + Duration::from_secs_f64(warmup);
        let t_end = t_measure + Duration::from_secs_f64(secs);
        let mut first: Option<(Instant, DriverStats, VmmSnap, IoWorkers)> = None;
        let mut result: Option<RingvmResult> = None;
        loop {
            if result.is_none() {
                d.submit_all(w)?;
            }
            let got = d.harvest(w)?;
            let now = Instant::now();
            match &first {
                None if now >= t_measure => {
                    d.stats.cpu_ns = own_cpu_ns()?;
                    first = Some((now, d.stats, self.vmm.thread()?.snap()?, IoWorkers::read()));
                }
                Some((t0, s0, v0, io0)) if result.is_none() && now >= t_end => {
                    d.stats.cpu_ns = own_cpu_ns()?;
                    let v1 = self.vmm.thread()?.snap()?;
                    let mut r = RingvmResult::new(w, now - *t0, s0, &d.stats, v0, &v1);
                    let io = IoWorkers::read().since(io0);
                    r.iowq_cpu_ns = io.cpu_ns;
                    r.iowq_wakeups = io.timeslices;
                    r.iowq_threads = io.threads;
                    result = Some(r);
                }
                _ => {}
            }
            if let Some(r) = result {
                if d.in_flight() == 0 {
                    return Ok(r);
                }
            }
            if got == 0 && (d.free.is_empty() || result.is_some()) {
                d.wait_irq()?;
            }
        }
    }
}

/// Totals of one or more measured ringvm windows of the same point.
#[derive(Clone, Copy, Debug, Default)]
struct RingvmResult {
    seconds: f64,
    requests: u64,
    bytes: u64,
    vmm_cpu_ns: u64,
    driver_cpu_ns: u64,
    turns: u64,
    irq_writes: u64,
    other_rw_syscalls: u64,
    vmm_sleeps: u64,
    kicks: u64,
    driver_waits: u64,
    irq_signals_seen: u64,
    /// CPU of the ring's io-wq workers (work that did not complete inline).
    iowq_cpu_ns: u64,
    /// Times those workers were scheduled in: their wake-ups.
    iowq_wakeups: u64,
    /// Most io-wq workers seen in one window.
    iowq_threads: u64,
}

impl RingvmResult {
    fn new(
        w: &Workload,
        elapsed: Duration,
        s0: &DriverStats,
        s1: &DriverStats,
        v0: &VmmSnap,
        v1: &VmmSnap,
    ) -> Self {
        let requests = s1.completed - s0.completed;
        let syscw = v1.syscw - v0.syscw;
        // The VMM thread's only write(2)s are irq eventfd signals; its
        // read(2)s should be zero (the ring reads the eventfds).
        let syscr = v1.syscr - v0.syscr;
        Self {
            seconds: elapsed.as_secs_f64(),
            requests,
            bytes: requests * w.bs,
            vmm_cpu_ns: v1.cpu_ns - v0.cpu_ns,
            driver_cpu_ns: s1.cpu_ns - s0.cpu_ns,
            turns: v1.turns - v0.turns,
            irq_writes: syscw,
            other_rw_syscalls: syscr,
            vmm_sleeps: v1.voluntary_switches - v0.voluntary_switches,
            kicks: s1.kicks - s0.kicks,
            driver_waits: s1.waits - s0.waits,
            irq_signals_seen: s1.irq_signals - s0.irq_signals,
            ..Self::default()
        }
    }

    fn add(&mut self, o: &Self) {
        self.seconds += o.seconds;
        self.requests += o.requests;
        self.bytes += o.bytes;
        self.vmm_cpu_ns += o.vmm_cpu_ns;
        self.driver_cpu_ns += o.driver_cpu_ns;
        self.turns += o.turns;
        self.irq_writes += o.irq_writes;
        self.other_rw_syscalls += o.other_rw_syscalls;
        self.vmm_sleeps += o.vmm_sleeps;
        self.kicks += o.kicks;
        self.driver_waits += o.driver_waits;
        self.irq_signals_seen += o.irq_signals_seen;
        self.iowq_cpu_ns += o.iowq_cpu_ns;
        self.iowq_wakeups += o.iowq_wakeups;
        self.iowq_threads = self.iowq_threads.max(o.iowq_threads);
    }

    /// Cross-thread wake-ups per request: the VMM thread's, the driver's
    /// and the io-wq workers'.
    fn wakeups(&self) -> u64 {
        self.vmm_sleeps + self.driver_waits + self.iowq_wakeups
    }

    fn iops(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }

    fn mib_s(&self) -> f64 {
        self.bytes as f64 / MIB / self.seconds.max(1e-9)
    }

    fn cpu_us_per_req(&self) -> f64 {
        self.per_req(self.vmm_cpu_ns) / 1000.0
    }

    fn driver_cpu_us_per_req(&self) -> f64 {
        self.per_req(self.driver_cpu_ns) / 1000.0
    }

    fn syscalls(&self) -> u64 {
        self.turns + self.irq_writes + self.other_rw_syscalls
    }

    fn per_req(&self, v: u64) -> f64 {
        v as f64 / self.requests.max(1) as f64
    }
}

// ---------------------------------------------------------------------------
// fio, the host limit.

#[derive(Clone, Debug)]
struct FioResult {
    iops: f64,
    mib_s: f64,
    cpu_us_per_req: f64,
    command: String,
}

fn fio_version() -> Res<String> {
    match Command::new("fio").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(format!("fio --version failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Err(format!(
            "fio is not available ({e}); this benchmark compares against fio --ioengine=io_uring and cannot run without it (apt-get install fio, or `make deps`)"
        )),
    }
}

/// How fio hands its requests to io_uring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FioMode {
    /// fio's default: each request first tried inline.
    Default,
    /// `--force_async=1`: every request with IOSQE_ASYNC, straight to
    /// io-wq workers (skips the inline attempt, several workers at once).
    Async,
}

fn run_fio(
    file: &Path,
    direct: bool,
    w: &Workload,
    warmup: f64,
    secs: f64,
    mode: FioMode,
) -> Res<FioResult> {
    let mut args = vec![
        "--name=host".to_string(),
        "--ioengine=io_uring".into(),
        format!("--filename={}", file.display()),
        format!("--rw={}", w.rw),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.qd),
        "--numjobs=1".into(),
        format!("--direct={}", u8::from(direct)),
        // Keep the page cache the ringvm run used.
        "--invalidate=0".into(),
        "--norandommap".into(),
        "--time_based".into(),
        format!("--ramp_time={}ms", (warmup * 1000.0).round() as u64),
        format!("--runtime={}ms", (secs * 1000.0).round() as u64),
        "--output-format=json".into(),
    ];
    if mode == FioMode::Async {
        args.push("--force_async=1".into());
    }
    if w.flush_every > 0 {
        args.push(format!("--fsync={}", w.flush_every));
    }
    let command = format!("fio {}", args.join(" "));
    let out = Command::new("fio")
        .args(&args)
        .output()
        .map_err(|e| format!("cannot run fio: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{command}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let json_start = text
        .find('{')
        .ok_or_else(|| format!("`{command}` printed no JSON"))?;
    let v: Value = serde_json::from_str(&text[json_start..])
        .map_err(|e| format!("`{command}` output is not JSON: {e}"))?;
    let job = &v["jobs"][0];
    let side = if w.op == Op::Read { "read" } else { "write" };
    let num = |v: &Value, what: &str| v.as_f64().ok_or_else(|| format!("fio JSON has no {what}"));
    let iops = num(&job[side]["iops"], "iops")?;
    let bw = num(&job[side]["bw_bytes"], "bw_bytes")?;
    let ios = num(&job[side]["total_ios"], "total_ios")?;
    let runtime_ms = num(&job["job_runtime"], "job_runtime")?;
    let cpu_pct = num(&job["usr_cpu"], "usr_cpu")? + num(&job["sys_cpu"], "sys_cpu")?;
    Ok(FioResult {
        iops,
        mib_s: bw / MIB,
        cpu_us_per_req: cpu_pct / 100.0 * runtime_ms * 1000.0 / ios.max(1.0),
        command,
    })
}

// ---------------------------------------------------------------------------
// Files.

struct TestFile {
    kind: &'static str,
    path: PathBuf,
    fs: String,
    /// Opened with O_DIRECT (ringvm's `direct=on`, fio's --direct=1).
    direct: bool,
}

/// The file system type of the mount holding `dir` (longest mount-point
/// prefix in /proc/self/mounts).
fn fs_type(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mnt, fs) = (f.next()?, f.next()?, f.next()?);
            dir.starts_with(mnt).then(|| (mnt.len(), fs.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".into(), |(_, fs)| fs)
}

/// Writes `mib` MiB of non-zero data (no holes: every read hits real
/// pages), and syncs it so writeback does not run during the first point.
fn prepare_file(path: &Path, mib: u64) -> Res<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&(x ^ i).to_le_bytes());
        }
        f.write_all(&chunk)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    f.sync_all()
        .map_err(|e| format!("cannot sync {}: {e}", path.display()))
}

/// Flushes dirty pages left by the previous point, so each run starts
/// from the same clean, fully cached file.
fn settle(path: &Path) -> Res<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_data())
        .map_err(|e| format!("cannot sync {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Report.

/// The reference side of one round: fio's run and, at QD1, the wake-up
/// round trip measured right after it, and QEMU's block layer.
#[derive(Clone, Debug)]
struct Reference {
    fio: FioResult,
    rtt_s: Option<f64>,
    /// With --async-reference at QD >= 32: fio again with IOSQE_ASYNC.
    fio_async: Option<FioResult>,
    /// `qemu-img bench` on the same file, or why there is no figure.
    qemu: QemuSide,
}

/// QEMU's side of one round: its run, or why it did not run (never a
/// made-up figure).
type QemuSide = Result<QemuRun, String>;

/// The reference every "vs QEMU" point names.
const QEMU_REFERENCE: &str = "QEMU block layer (qemu-img bench, io_uring)";

/// The one line the reports carry to say what the QEMU figures are.
const QEMU_LINE: &str = "QEMU column: QEMU's own block layer driven by `qemu-img bench` (aio=io_uring, cache=none for O_DIRECT, writeback for buffered) on the same file in the same rounds, without virtio or a guest: a bound on what QEMU's data plane could reach, so ringvm / QEMU >= 1 means ringvm, virtio included, beats QEMU's block layer alone.";

/// How QEMU's block layer is run on one file.
struct QemuFile {
    /// The file's size (qemu-img wraps its offsets there).
    bytes: u64,
    /// Why QEMU cannot run on this file (no qemu-img, no io_uring in it,
    /// the probe run failed); `None` when it can.
    unavailable: Option<String>,
    /// CPU of the probe run (start-up, image open, 64 requests), ms: what
    /// every run's CPU figure carries besides its requests.
    startup_cpu_ms: Option<f64>,
}

impl QemuFile {
    /// Probes `qemu-img bench` on `f` (64 reads at depth 1, with f's cache
    /// mode and aio=io_uring), unless `why_not` already says QEMU cannot run.
    fn probe(f: &TestFile, bytes: u64, why_not: Option<&str>) -> Self {
        let unavailable = |why: String| Self {
            bytes,
            unavailable: Some(why),
            startup_cpu_ms: None,
        };
        if let Some(why) = why_not {
            return unavailable(why.to_string());
        }
        let spec = BenchSpec {
            file: f.path.display().to_string(),
            direct: f.direct,
            block: 4096,
            depth: 1,
            write: false,
            step: 4096,
            count: 64,
            flush_every: 0,
        };
        match qemu_img::run(&spec) {
            Ok(r) => Self {
                bytes,
                unavailable: None,
                startup_cpu_ms: Some(r.cpu_ns as f64 / 1e6),
            },
            Err(e) => {
                eprintln!("bench-blk: no QEMU figures for {}: {e}", f.kind);
                unavailable(format!("qemu-img bench cannot run here: {e}"))
            }
        }
    }

    /// The qemu-img bench run of `w` with `count` requests.
    fn spec(&self, f: &TestFile, w: &Workload, count: u64) -> Res<BenchSpec> {
        let step = if w.random {
            qemu_img::full_cycle_step(self.bytes, w.bs).ok_or_else(|| {
                format!(
                    "no stride of whole {}-byte blocks fits a {}-byte file in qemu-img's range",
                    w.bs, self.bytes
                )
            })?
        } else {
            w.bs
        };
        Ok(BenchSpec {
            file: f.path.display().to_string(),
            direct: f.direct,
            block: w.bs,
            depth: w.qd,
            write: w.op == Op::Write,
            step,
            count,
            flush_every: w.flush_every,
        })
    }

    /// One round of QEMU on `w`: an unmeasured warm-up run of about
    /// `warmup` seconds (fio's --ramp_time), then the measured run of
    /// about `secs`. Both are sized by `last_rate` (requests/s: QEMU's
    /// measured rate on this point in an earlier round) when there is one;
    /// in the first round `fio_rate` sizes the warm-up and the warm-up's
    /// rate the measured run.
    fn run(
        &self,
        f: &TestFile,
        w: &Workload,
        (warmup, secs): (f64, f64),
        last_rate: Option<f64>,
        fio_rate: f64,
    ) -> QemuSide {
        if let Some(why) = &self.unavailable {
            return Err(why.clone());
        }
        settle(&f.path)?;
        let mut rate = last_rate.unwrap_or(fio_rate);
        if warmup > 0.0 {
            let count = qemu_img::count_for(rate, Duration::from_secs_f64(warmup), w.qd);
            let warm = qemu_img::run(&self.spec(f, w, count)?)?;
            rate = last_rate.unwrap_or(warm.iops());
        }
        let count = qemu_img::count_for(rate, Duration::from_secs_f64(secs), w.qd);
        qemu_img::run(&self.spec(f, w, count)?)
    }
}

/// The QD1 floor target: ringvm's latency within 1.2x of the floor's.
const FLOOR_TARGET: f64 = 1.0 / 1.2;
/// The throughput target at QD >= 32 (issue 14).
const RATIO_TARGET: f64 = 0.9;
/// The syscall target at QD >= 32 (issue 14).
const SYSCALL_TARGET: f64 = 0.1;

struct Row {
    file_kind: &'static str,
    w: Workload,
    /// ringvm's windows of all rounds summed, for the breakdown tables.
    ringvm: RingvmResult,
    rounds: Vec<Round<RingvmResult, Reference>>,
}

impl Row {
    fn new(
        file_kind: &'static str,
        w: Workload,
        rounds: Vec<Round<RingvmResult, Reference>>,
    ) -> Self {
        let mut ringvm = RingvmResult::default();
        for r in &rounds {
            ringvm.add(&r.ringvm);
        }
        Self {
            file_kind,
            w,
            ringvm,
            rounds,
        }
    }

    /// What --only matches and the report's point name.
    fn key(&self) -> String {
        format!("{} {} QD{}", self.file_kind, self.w.label(), self.w.qd)
    }

    fn unit(&self) -> &'static str {
        if self.w.bandwidth {
            "MiB/s"
        } else {
            "IOPS"
        }
    }

    fn value(&self, r: &RingvmResult) -> f64 {
        if self.w.bandwidth {
            r.mib_s()
        } else {
            r.iops()
        }
    }

    fn fio_value(&self, f: &FioResult) -> f64 {
        if self.w.bandwidth {
            f.mib_s
        } else {
            f.iops
        }
    }

    /// ringvm against fio, round by round.
    fn point(&self) -> Point {
        Point {
            bench: "blk".into(),
            key: self.key(),
            unit: self.unit().into(),
            reference: "fio io_uring".into(),
            better: Better::Higher,
            rounds: self
                .rounds
                .iter()
                .map(|r| PointRound {
                    ringvm: self.value(&r.ringvm),
                    reference: self.fio_value(&r.reference.fio),
                    others_cpus: r.others_cpus,
                })
                .collect(),
            target: (self.w.qd >= 32).then(|| Target {
                ratio: RATIO_TARGET,
                source: "issue 14".into(),
            }),
            note: None,
        }
    }

    fn qemu_value(&self, q: &QemuRun) -> f64 {
        if self.w.bandwidth {
            q.mib_s()
        } else {
            q.iops()
        }
    }

    /// ringvm against QEMU's block layer, round by round, over the rounds
    /// QEMU ran in (no target: issue 14's targets are against the host).
    fn qemu_point(&self) -> Option<Point> {
        let rounds: Vec<PointRound> = self
            .rounds
            .iter()
            .filter_map(|r| {
                r.reference.qemu.as_ref().ok().map(|q| PointRound {
                    ringvm: self.value(&r.ringvm),
                    reference: self.qemu_value(q),
                    others_cpus: r.others_cpus,
                })
            })
            .collect();
        (!rounds.is_empty()).then(|| Point {
            bench: "blk".into(),
            key: format!("{} vs QEMU", self.key()),
            unit: self.unit().into(),
            reference: QEMU_REFERENCE.into(),
            better: Better::Higher,
            rounds,
            target: None,
            note: None,
        })
    }

    /// QEMU's runs of this row (the rounds where it ran).
    fn qemu_runs(&self) -> impl Iterator<Item = &QemuRun> {
        self.rounds
            .iter()
            .filter_map(|r| r.reference.qemu.as_ref().ok())
    }

    /// Why a round has no QEMU figure (the first such reason), if any.
    fn qemu_missing(&self) -> Option<&str> {
        self.rounds
            .iter()
            .find_map(|r| r.reference.qemu.as_ref().err().map(String::as_str))
    }

    fn qemu_median(&self) -> f64 {
        median(
            &self
                .qemu_runs()
                .map(|q| self.qemu_value(q))
                .collect::<Vec<_>>(),
        )
    }

    fn qemu_cpu_us_per_req(&self) -> f64 {
        median(
            &self
                .qemu_runs()
                .map(QemuRun::cpu_us_per_req)
                .collect::<Vec<_>>(),
        )
    }

    /// "0.93x (0.88–1.01)", or what stands in for a missing figure.
    fn qemu_ratio_text(&self) -> String {
        match self.qemu_point().and_then(|p| p.ratio()) {
            Some(r) if r.n == self.rounds.len() => {
                format!("{:.2}x ({:.2}–{:.2})", r.median, r.min, r.max)
            }
            Some(r) => format!(
                "{:.2}x ({:.2}–{:.2}; {} of {} rounds)",
                r.median,
                r.min,
                r.max,
                r.n,
                self.rounds.len()
            ),
            None if self.qemu_missing().is_some() => "not measured".into(),
            None => "-".into(),
        }
    }

    /// With --async-reference: ringvm against fio with IOSQE_ASYNC on every
    /// request, round by round (no target: it shows where the host's limit
    /// lies when io-wq workers run requests in parallel).
    fn async_point(&self) -> Option<Point> {
        let rounds: Vec<PointRound> = self
            .rounds
            .iter()
            .filter_map(|r| {
                r.reference.fio_async.as_ref().map(|f| PointRound {
                    ringvm: self.value(&r.ringvm),
                    reference: self.fio_value(f),
                    others_cpus: r.others_cpus,
                })
            })
            .collect();
        (!rounds.is_empty()).then(|| Point {
            bench: "blk".into(),
            key: format!("{} vs fio async", self.key()),
            unit: self.unit().into(),
            reference: "fio io_uring --force_async=1".into(),
            better: Better::Higher,
            rounds,
            target: None,
            note: None,
        })
    }

    /// At QD1: ringvm against the floor (fio's latency plus one eventfd
    /// round trip), round by round.
    fn floor_point(&self) -> Option<Point> {
        if self.w.qd != 1 {
            return None;
        }
        let rounds = self
            .rounds
            .iter()
            .map(|r| PointRound {
                ringvm: self.value(&r.ringvm),
                reference: floor_rate(
                    self.fio_value(&r.reference.fio),
                    r.reference.rtt_s.unwrap_or(0.0),
                ),
                others_cpus: r.others_cpus,
            })
            .collect();
        Some(Point {
            bench: "blk".into(),
            key: format!("{} vs floor", self.key()),
            unit: self.unit().into(),
            reference: "fio + eventfd round trip".into(),
            better: Better::Higher,
            rounds,
            target: Some(Target {
                ratio: FLOOR_TARGET,
                source: "issue 14 (within 1.2x of the floor latency)".into(),
            }),
            note: self.rtt_us().map(|rtt| {
                format!("eventfd round trip between two threads: {rtt:.1} µs (median of rounds)")
            }),
        })
    }

    fn ratio(&self) -> Option<Spread> {
        self.point().ratio()
    }

    fn ringvm_median(&self) -> f64 {
        median(
            &self
                .rounds
                .iter()
                .map(|r| self.value(&r.ringvm))
                .collect::<Vec<_>>(),
        )
    }

    fn fio_median(&self) -> f64 {
        median(
            &self
                .rounds
                .iter()
                .map(|r| self.fio_value(&r.reference.fio))
                .collect::<Vec<_>>(),
        )
    }

    fn fio_cpu_us_per_req(&self) -> f64 {
        median(
            &self
                .rounds
                .iter()
                .map(|r| r.reference.fio.cpu_us_per_req)
                .collect::<Vec<_>>(),
        )
    }

    fn rtt_us(&self) -> Option<f64> {
        let rtts: Vec<f64> = self
            .rounds
            .iter()
            .filter_map(|r| r.reference.rtt_s.map(|s| s * 1e6))
            .collect();
        Spread::of(&rtts).map(|s| s.median)
    }

    fn others(&self) -> Option<Spread> {
        self.point().others()
    }

    fn fmt_value(&self, v: f64) -> String {
        if self.w.bandwidth {
            format!("{v:.0} MiB/s")
        } else if v >= 10_000.0 {
            format!("{:.1}k IOPS", v / 1000.0)
        } else {
            format!("{v:.0} IOPS")
        }
    }
}

fn fmt_spread(s: Option<Spread>) -> (String, String) {
    s.map_or(("-".into(), "-".into()), |s| {
        (
            format!("{:.2}x", s.median),
            format!("{:.2}–{:.2}", s.min, s.max),
        )
    })
}

struct Context {
    host: HostInfo,
    fio: String,
    deferred_taskrun: bool,
    files: Vec<(String, String, String)>,
    /// qemu-img's version, or why QEMU's figures are missing everywhere.
    qemu: Result<String, String>,
    /// Per file kind: why QEMU could not run on it, and the CPU its
    /// start-up took (ms).
    qemu_files: Vec<(String, Option<String>, Option<f64>)>,
}

const METHOD: &[&str] = &[
    "Device side: the real virtio-blk `BlockDevice` + virtio-mmio transport on the MMIO bus, in the real generic device slot (`VirtioDevices`), on its own thread turning one `Ring` (io_uring), as `Vmm::run` does for a booted guest. No KVM.",
    "Driver side: a split-virtqueue driver on the main thread (queue size 256, VERSION_1 + EVENT_IDX + INDIRECT_DESC, one indirect 3-descriptor chain per request: 16-byte header, data, 1-byte status), set up through the virtio-mmio v2 registers. It kicks by writing the doorbell eventfd (KVM's ioeventfd) only when vring_need_event says so, and sleeps on the irq eventfd (KVM's irqfd) only when it has nothing to submit or reap, after re-arming used_event; on wake it reads and acks InterruptStatus like Linux's vm_interrupt.",
    "Files: 1 GiB (default) of non-zero data. `tmpfs` and `disk`: buffered I/O through the host page cache for both ringvm and fio (drive opened without O_DIRECT; fio --direct=0 --invalidate=0); `disk-direct`: the same on-disk file opened with O_DIRECT by both (ringvm's direct=on, fio --direct=1). The file is fdatasync'ed before every run so dirty pages of a previous write run do not carry over.",
    "Host limit: fio --ioengine=io_uring, numjobs=1, same file, same rw/bs/iodepth, --norandommap, same warm-up (--ramp_time) and duration. Rounds: each round runs ringvm and fio back to back (ringvm first in even rounds, fio first in odd ones) and gives one ratio ringvm / fio; the point's ratio is the median over rounds, with min–max and IQR beside it, so one round hit by a neighbour's burst does not move it.",
    "With --async-reference, QD >= 32 rounds also run fio --force_async=1 (IOSQE_ASYNC on every SQE): where io_uring would punt the request to io-wq anyway (tmpfs; buffered ext4 writes), this skips the failed inline attempt on the submitting thread and lets several io-wq workers run at once, so it is the host's higher limit there (and a lower one where requests complete inline, e.g. ext4 page-cache reads).",
    "QEMU's block layer: `qemu-img bench -f raw -i io_uring -t none|writeback -d <QD> -s <bs> -S <step> [-w] [--flush-interval=32 --no-drain]` on the same file, in the same rounds (QEMU last in even rounds, first in odd ones), with its own unmeasured warm-up run of --warmup seconds whose rate sizes the measured run's request count (-c) to about --seconds; its rate is requests over the time it prints (first submission to last completion, start-up excluded). qemu-img bench has no random mode: request k goes to offset k x step mod file size, so the random rows use a step of whole blocks coprime with the file's block count near 0.618 of the file: every block once per pass in a scattered order (no two consecutive requests near each other), against fio's and ringvm's random offsets; for files in the page cache the order does not matter, for O_DIRECT neither side's requests are adjacent. Sequential rows use step = block size, as fio and ringvm do. The flush row sends a flush after every 32 writes without draining (--no-drain); QEMU's flushes come on top of its 32 writes in flight, ringvm's take a queue slot. QEMU CPU per request: getrusage(RUSAGE_CHILDREN) across the measured run, user + system, divided by its requests: the whole process, its io-wq workers and its start-up included (the probe run's CPU, given per file, is that start-up); compare it with ringvm's VMM + io-wq CPU.",
    "Flush-heavy row (randwrite 4k flush/32 QD32): the driver sends a FLUSH after every 32 writes without waiting for them, as a guest that does not drain its queue before flushing may; ringvm's FLUSH is a barrier (its fdatasync is submitted only once every write submitted before it has completed), so the row's cost against the plain randwrite 4k QD32 row is the barrier's and the sync's. fio runs the same with --fsync=32. IOPS count the writes only, on both sides.",
    "QD1 floor: after fio's QD1 run in each round, two threads bounce an eventfd (each blocking in read(2)) for --floor-seconds; floor rate = 1 / (1/fio rate + one round trip). That is what ringvm's QD1 path cannot avoid on top of the I/O: the doorbell wakes the VMM thread, the interrupt wakes the driver. Target: ringvm within 1.2x of the floor's latency, i.e. ratio ringvm / floor >= 0.83.",
    "ringvm figures per point (rate, CPU, syscalls, breakdown): all rounds' measured windows summed, so rates are requests over seconds of all rounds; the ratio columns are the per-round medians.",
    "VMM CPU: CLOCK_THREAD_CPUTIME of the VMM thread (pthread_getcpuclockid) over the measured window, divided by requests completed in it. Work io_uring hands to io-wq kernel workers (e.g. buffered writes that cannot complete inline) is not in that thread's time; fio's figure is (usr_cpu+sys_cpu) x runtime / ios of its job thread, with the same blind spot.",
    "VMM syscalls: io_uring_enter calls counted around `Ring::turn` (one per turn) + read/write syscalls from /proc/self/task/<tid>/io (syscr+syscw; the only write(2)s are irq eventfd signals the ring could not take, normally none: interrupts are written through the ring, ring/irq.rs). The loop takes no locks and makes no other syscalls on the data path; SQ-full submits inside `Ring::push` are not counted (cannot happen at QD <= 128 with a 256-entry SQ).",
    "VMM sleeps: voluntary context switches of the VMM thread (/proc/self/task/<tid>/status), i.e. turns that blocked in io_uring_enter. Driver CPU: CLOCK_THREAD_CPUTIME of the synthetic driver thread (the guest's share, not ringvm's). io-wq: the ring's worker threads (iou-wrk-*), where io_uring runs what cannot complete inline (here: every tmpfs read and write, and buffered ext4 writes); their wake-ups are schedstat timeslices, their CPU schedstat run time, summed over the workers alive at the window's edges. Wake-ups in all = VMM sleeps + driver sleeps + io-wq wake-ups: the cross-thread hand-offs per request.",
    "Others' CPUs: how many CPUs other processes kept busy on average during each round (/proc/stat busy time minus the CPU time of this process, fio and qemu-img). This benchmark shares the machine; with 2 CPUs, ringvm needs one for the VMM thread and one for the guest driver, fio one for itself, so anything else running skews ringvm more.",
    "Method cross-check (done once by hand): `perf stat -e raw_syscalls:sys_enter -t <vmm tid>` over a tmpfs randread QD32 run counted only io_uring_enter and write, at the same rate as the counters above.",
];

/// What bounds the figures, as the breakdown table shows it.
const BOUNDS: &[&str] = &[
    "Syscalls per request = (io_uring_enter + irq write(2)s) / requests. Interrupts now ride the next io_uring_enter as an irqfd WRITE with IOSQE_CQE_SKIP_SUCCESS (ring/irq.rs), so the irq column is 0 and staying under 0.1 needs about 10 requests per turn: at QD 32 a turn waits for a quarter of the operations in flight (8), plus what polling and the drain add.",
    "Requests per turn: a turn ends at the first completion unless 4 or more disk operations are in flight, when it waits for a quarter of them (2..64), at most 1 ms (vmm/src/ring/batch.rs). Where io_uring completes inline (ext4 page-cache reads), a kick's whole drain completes in one turn. Where it punts to io-wq (tmpfs, buffered ext4 writes), completions come back one io-wq worker's op at a time (about 2-3 µs each here), so at QD 32 a turn collects about 8 and syscalls per request stay near 0.17-0.2: under 0.1 would need waiting for half the queue, which measured no faster.",
    "VMM CPU per request at QD >= 32 on tmpfs is now close to fio's (about 1.1-2.4 µs against 1.1-1.3 µs); what is left between ringvm and fio there is the machine: ringvm needs three busy threads (guest driver, VMM thread, io-wq workers) on 2 CPUs shared with other jobs (the others' CPUs column), fio two.",
    "O_DIRECT 4 KiB (disk-direct) QD32: 0.6-0.8x with the VMM thread at 4-5 µs/request against fio's 2.6-3.5. perf record -g -t <vmm tid> over a 2 s window (disk-direct randread 4k QD32): 22% in iowrite16 under io_submit_sqes (the host disk's own virtio doorbell, a hypervisor exit per submitted batch: this host is itself a VM), 25% in finish_task_switch (15% coming back from io_cqring_wait's sleep, 9% from a preemption right after the irq eventfd write wakes the driver), 10% in eventfd_write's wake-up, and only about 10% in ringvm's own user-space code (to_region_addr, parse, push, complete). So the VMM's time there is sleeps, wake-ups and the host disk's doorbell; fewer of them per request needs more requests per turn (the batch rule in ring/batch.rs, or the lead's avail-ring polling so the VMM catches refills without a kick), not less user-space work.",
    "ext4 page-cache randread 4k QD32: the driver posts 32 and kicks once, the VMM completes all 32 inline in one io_uring_enter and interrupts once (16 requests per turn, 0.094 syscalls/request), and the two sides run in lock-step: with idle CPUs each hand-off wakes a halted vCPU of this host (0.31x in an idle-machine run), with busy CPUs the same code reaches 0.67-0.91x. Answering in smaller pieces did not pay (changes: tried and dropped); catching the refill without a kick (polling) is what is left.",
    "Interrupts: at most one per drive per turn (`VirtioDevices::end_turn` raises each device's interrupt once for the batch), written to the irqfd by the ring in the next io_uring_enter, not by a write(2).",
    "io-wq: on this kernel io_uring punts every tmpfs read and write and every buffered ext4 write to an io-wq worker (an iou-wrk thread appears, for fio too): tried inline first, each such request fails and is handed over. ringvm now submits those with IOSQE_ASYNC (block/punt.rs), which skips the failed attempt and lets several workers read at once (the io-wq column shows 4-7 workers), so on those rows ringvm beats fio's default and fio --force_async=1 (--async-reference) is the host's real limit there: it gave 3x fio's default IOPS on tmpfs randread QD32 and 4x on buffered ext4 randwrite QD32, but 0.4x on ext4 page-cache randread QD1 (which is why reads of ext4 files stay inline). Writes to one file are serialised by io-wq (hashed by inode) whatever the flag.",
    "VMM instructions per request (bench-callgrind, deterministic): about 3450-3700 at QD32, most of it guest-memory address translation and slice copies (to_region_addr, read_slice, write_slice, the descriptor walk, about 40%) and the request's parse and submission; no heap allocation per request. They are a small part of the VMM thread's time: perf showed most of it in the kernel (io_uring_enter's submission, task work and waiting).",
    "QD 1: three syscalls per request on the VMM thread (strace -c -p <vmm tid>: exactly 2 io_uring_enter + 1 irq write per request before interrupts went through the ring; 2 io_uring_enter since), and every request costs two cross-thread wake-ups (doorbell -> VMM thread, irqfd -> guest), three or more where io-wq runs the I/O. fio does one syscall with an inline completion. On this nested VM a cross-CPU wake-up costs several µs, which is why the VMM thread's CPU per request is high there. A real guest pays those two hops too (ioeventfd exit, irq injection).",
    "Throughput ratio: on 2 CPUs the VMM thread and the guest driver take one CPU each, plus io-wq workers, while fio's single thread has the machine to itself. Whatever else runs (the others' CPUs column) costs ringvm more than fio. Ratios vary by ±20-30% between runs on this shared machine, so treat single points as rough.",
];

/// Changes kept for issue 14, with their before/after (the commits carry
/// the full figures).
const CHANGES: &[&str] = &[
    "Interrupts through the ring (vmm/src/ring/irq.rs): a device's raise is latched and the slot queues an 8-byte WRITE to its irqfd with IOSQE_CQE_SKIP_SUCCESS at the end of the turn, so the next io_uring_enter (the one that submits and waits anyway) carries it and a successful write posts no completion to wake that wait; kernels without IORING_FEAT_CQE_SKIP keep write(2). VMM syscalls/request at QD32, same binary pair back to back (3 rounds each): tmpfs randread 0.189 -> 0.101, randwrite 0.164 -> 0.145, ext4 randread 0.094 -> 0.062, ext4 randwrite 0.206 -> 0.129, O_DIRECT randread 0.176 -> 0.106, O_DIRECT randwrite 0.225 -> 0.150 (irq writes 0.03-0.10 -> 0); callgrind tmpfs QD32 3692 -> 3474 instructions/request (-6%), QD1 5326 -> 5100. Throughput ratios moved within their noise (loaded machine).",
    "The VMM thread polls the request queues before it sleeps (vmm/src/ring/poll.rs, --poll-max-us, adaptive window up to 100 µs; drains leave EVENT_IDX notifications off while it polls; not while a batch of slow disk completions is awaited). Same quiet hour, 3 rounds each, RINGVM_BENCH_POLL_MAX_US=0 (off) against the default: ext4 page-cache randread 4k QD1 17.1k -> 53.0k IOPS (2.996 -> 2.001 syscalls/request: the doorbell is gone), QD32 0.30x -> 0.50x of fio (VMM sleeps 0.031 -> 0 per request), tmpfs randread 4k QD32 0.42x -> 0.68x. A 32 µs maximum (QEMU's default) rarely engaged on this VM (QD1 15.5k, QD32 0.31x): one idle-CPU wake-up costs 7-15 µs here and the driver's refill as much again; 200 µs measured the same as 100.",
    "Request parse without heap allocations (request::Parser keeps its vectors): VMM instructions/request (callgrind) tmpfs randread 4k QD32 4107 -> 3456, randwrite 4119 -> 3439, QD1 5523 -> 4903.",
    "A turn waits for its disk batch by count with a 1 ms bound instead of a 10 µs min-wait timer (ring/batch.rs): perf had ~1/3 of the VMM thread in io_cqring_wait's hrtimer arming (a hypervisor exit each in a VM) and the extra timer wake-ups. tmpfs 4k ratio medians, 2 runs x 3 rounds each, same hour: randread QD32 0.55x/0.49x -> 0.89x/0.85x, randwrite QD32 0.43x/0.48x -> 0.80x/0.85x, randread QD128 0.99x/0.70x -> 1.05x/1.23x, randwrite QD128 0.67x/0.64x -> 1.12x/0.96x; VMM CPU 3.3-5.2 -> 1.0-2.0 µs/request; syscalls/request at QD128 0.10-0.17 -> 0.06-0.08.",
    "IOSQE_ASYNC where io_uring punts anyway (devices/src/virtio/block/punt.rs, decided per file from fstatfs and O_DIRECT: tmpfs reads and writes, buffered ext4 writes; the lockdown allows that one SQE flag): the submitting thread skips the failed non-blocking attempt and several io-wq workers run reads side by side. Full `bench_blk --rounds 3`, main's binary then this one, back to back on a loaded machine (load average 4-6, others' CPUs 1.3-1.5), ratio median (min-max), syscalls/request, VMM µs/request: tmpfs randread 4k QD32 0.43x (0.40-0.88) -> 0.61x (0.59-0.65), 0.200 -> 0.159, 2.97 -> 2.35; QD128 0.92x -> 1.17x, 0.067 -> 0.063, 1.57 -> 1.10; tmpfs randwrite 4k QD32 0.49x (0.46-2.08) -> 1.03x (0.91-1.69), 0.236 -> 0.171, 2.89 -> 1.75; QD128 0.87x -> 1.89x, 0.073 -> 0.063, 2.06 -> 1.23; tmpfs read 128k 0.89x -> 1.90x, 0.276 -> 0.222, 10.7 -> 7.2; tmpfs write 128k 0.93x -> 1.16x, 0.275 -> 0.201, 7.5 -> 4.7; ext4 randwrite 4k QD32 0.61x -> 1.36x, 0.300 -> 0.199, 11.7 -> 4.4; QD128 0.55x -> 1.55x, 0.084 -> 0.066, 15.8 -> 2.6; ext4 write 128k 1.17x -> 2.14x, 0.280 -> 0.198, 10.3 -> 4.1. Alternated A/B runs of single points (3 rounds each, two runs): tmpfs randread QD32 174k/161k -> 222k/284k IOPS, tmpfs randwrite QD32 139k/148k -> 246k/186k, ext4 randwrite QD32 19k/21k -> 36k/31k. QD1 (tmpfs, 3 alternated runs each): bimodal on this loaded machine (0.02-0.07x or 0.3-0.7x per run for both binaries), no difference either way, so the hint is not limited by depth. Rows the hint does not touch (ext4 page-cache reads, O_DIRECT) moved by up to ±40% between the two full runs: the noise level of these figures. Again after main's avail-ring polling landed (full runs, polling alone vs polling + hint): tmpfs randread 4k QD32 0.53x (0.49-0.96) -> 0.93x (0.89-0.99), 0.217 -> 0.171 syscalls/request, 2.23 -> 1.58 µs/request; QD128 0.61x -> 2.10x (165k -> 405k IOPS), 2.29 -> 0.98 µs; tmpfs randwrite 4k QD32 0.48x -> 0.81x, 0.263 -> 0.160, 2.24 -> 1.76 µs; tmpfs read 128k 0.73x -> 1.48x, 0.333 -> 0.242. Writes (one io-wq worker per file: io-wq serialises buffered writes to one inode), alternated A/B, two runs each: throughput unchanged (ext4 randwrite 4k QD32 23.5k/27.3k -> 25.3k/27.2k IOPS, ext4 write 128k 4927/4024 -> 4501/4842 MiB/s, tmpfs write 128k 3704/2977 -> 3739/3087 MiB/s) but less VMM work: 13.9/10.9 -> 6.0/9.1, 10.6/7.3 -> 7.0/5.0 and 13.8/12.2 -> 5.2/9.9 µs/request, and 0.36/0.34 -> 0.25/0.26, 0.40/0.28 -> 0.27/0.20 and 0.39/0.32 -> 0.24/0.26 syscalls/request; kept for writes for that.",
];

/// What was tried for issue 14 and measured no better, with the figures.
const TRIED: &[&str] = &[
    "With interrupts through the ring, a turn waiting for a half or a third of the operations in flight instead of a quarter. Half (2 runs each, 4k QD32, loaded machine): syscalls/request 0.062-0.169 against the quarter's 0.062-0.130 on the same rows, throughput within the noise. A third (quiet machine, every QD32 row, 2 runs each interleaved with the quarter): O_DIRECT 4k 0.095 against 0.104-0.124 syscalls/request and ext4 buffered writes 0.128-0.131 against 0.145-0.163, but tmpfs unchanged (0.15-0.18 either way: polling ends those turns first) and O_DIRECT read 128k 0.63x/0.80x against 0.99x/1.00x of fio (a longer wait idles the disk). Kept the quarter.",
    "With the count-and-bound batch wait (same runs): no batching (want 1, as fio): VMM CPU as low but 0.17-0.55 syscalls/request; a 5 ms bound: no better than 1 ms; waiting for half the queue: no clear gain; a 20 µs user-space spin on the completion queue before sleeping: no gain at QD1, and it takes the CPU the io-wq worker needs on this 2-CPU machine.",
    "Answering in smaller pieces so the driver refills while the VMM works (ext4 page-cache randread 4k QD32, where a kick's 32 requests complete inline in one io_uring_enter and the driver and VMM run in lock-step): a drain limited to 8 chains per turn, the rest taken on the next turn, 0.67x/0.80x (unlimited, 0.094 syscalls/request) -> 0.57x/0.67x (0.21-0.24 syscalls/request: an io_uring_enter and an interrupt per 8); 16 chains per turn: 0.87x/0.27x, the same 16 requests per turn as unlimited, no gain.",
];

const QEMU_NOTE: &str = "A QEMU guest is not run: this machine's KVM is PVM-native (guest code runs in KVM's instruction emulator at ~1.6 us/instruction), so a QEMU guest would measure the emulator, not QEMU's data plane. Instead, every round also runs QEMU's own block layer without a guest (`qemu-img bench`, see the section above): the BlockBackend AIO path (blk_aio_preadv/pwritev) that QEMU's virtio-blk and IOThread data plane submit to, on the same file with the settings a QEMU user would pick (raw, aio=io_uring, cache=none for O_DIRECT, cache=writeback for buffered). It leaves out virtio, the guest and its notifications, so it is a bound on QEMU's data plane, not a measurement of it: ringvm / QEMU >= 1 means ringvm, virtio included, beats QEMU's block layer alone.";

fn settings(ctx: &Context, args: &Args) -> String {
    format!(
        "Kernel {}, {} x {}, {}, {}, io_uring DEFER_TASKRUN: {}. Each point: {} rounds of ringvm, fio and QEMU's block layer back to back ({} s measured per side after {} s warm-up), the order alternating (ringvm, fio, QEMU in even rounds, QEMU, fio, ringvm in odd ones); QD1 rounds add {} s of eventfd round trips for the floor. Load average at the start: {}.",
        ctx.host.kernel,
        ctx.host.cpus,
        ctx.host.cpu,
        ctx.fio,
        match &ctx.qemu {
            Ok(v) => v.clone(),
            Err(why) => format!("no QEMU figures ({why})"),
        },
        if ctx.deferred_taskrun { "yes" } else { "no" },
        args.rounds,
        args.seconds,
        args.warmup,
        args.floor_seconds,
        ctx.host.loadavg,
    )
}

fn markdown(rows: &[Row], ctx: &Context, args: &Args) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# ringvm virtio-blk vs host io_uring (fio) and QEMU's block layer, same file, same run\n"
    );
    let _ = writeln!(s, "{}\n", settings(ctx, args));
    for (kind, path, fs) in &ctx.files {
        let _ = writeln!(s, "- {kind}: `{path}` ({fs})");
    }
    let _ = writeln!(
        s,
        "\n| file | workload | QD | ringvm | fio io_uring | ratio (median) | min–max | ringvm / QEMU (min–max) | others' CPUs | VMM CPU µs/req | fio CPU µs/req | VMM syscalls/req |"
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let (ratio, range) = fmt_spread(r.ratio());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.3} |",
            r.file_kind,
            r.w.label(),
            r.w.qd,
            r.fmt_value(r.ringvm_median()),
            r.fmt_value(r.fio_median()),
            ratio,
            range,
            r.qemu_ratio_text(),
            r.others()
                .map_or("-".into(), |o| format!("{:.2}", o.median)),
            r.ringvm.cpu_us_per_req(),
            r.fio_cpu_us_per_req(),
            r.ringvm.per_req(r.ringvm.syscalls()),
        );
    }
    qemu_markdown(&mut s, rows, ctx);
    let floors: Vec<(&Row, Point)> = rows
        .iter()
        .filter_map(|r| r.floor_point().map(|p| (r, p)))
        .collect();
    if !floors.is_empty() {
        let _ = writeln!(
            s,
            "\n## QD1 against its floor (fio's latency + one eventfd round trip, same rounds)\n"
        );
        let _ = writeln!(
            s,
            "| file | workload | ringvm | fio | eventfd round trip µs | floor | ringvm / floor (median) | min–max | target ≥{FLOOR_TARGET:.2} |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---|---|");
        for (r, p) in floors {
            let (ratio, range) = fmt_spread(p.ratio());
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.1} | {} | {} | {} | {} |",
                r.file_kind,
                r.w.label(),
                r.fmt_value(r.ringvm_median()),
                r.fmt_value(r.fio_median()),
                r.rtt_us().unwrap_or(f64::NAN),
                r.fmt_value(p.reference_spread().map_or(f64::NAN, |x| x.median)),
                ratio,
                range,
                match p.target_met() {
                    Some(true) => "met",
                    Some(false) => "MISSED",
                    None => "-",
                },
            );
        }
    }
    let asyncs: Vec<(&Row, Point)> = rows
        .iter()
        .filter_map(|r| r.async_point().map(|p| (r, p)))
        .collect();
    if !asyncs.is_empty() {
        let _ = writeln!(
            s,
            "\n## Against fio with IOSQE_ASYNC on every request (--force_async=1), same rounds\n"
        );
        let _ = writeln!(
            s,
            "| file | workload | QD | ringvm | fio default | fio force_async | ringvm / fio force_async (median) | min–max |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---|");
        for (r, p) in asyncs {
            let (ratio, range) = fmt_spread(p.ratio());
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.file_kind,
                r.w.label(),
                r.w.qd,
                r.fmt_value(r.ringvm_median()),
                r.fmt_value(r.fio_median()),
                r.fmt_value(p.reference_spread().map_or(f64::NAN, |x| x.median)),
                ratio,
                range,
            );
        }
    }
    let _ = writeln!(
        s,
        "\n## Where the VMM thread's syscalls and wake-ups go (per request)\n"
    );
    let _ = writeln!(
        s,
        "| file | workload | QD | requests/turn | io_uring_enter | irq writes | other r/w | VMM sleeps | driver kicks | driver sleeps | io-wq wake-ups | wake-ups in all | driver CPU µs/req | io-wq CPU µs/req (workers) |"
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let g = &r.ringvm;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} ({}) |",
            r.file_kind,
            r.w.label(),
            r.w.qd,
            g.requests as f64 / g.turns.max(1) as f64,
            g.per_req(g.turns),
            g.per_req(g.irq_writes),
            g.per_req(g.other_rw_syscalls),
            g.per_req(g.vmm_sleeps),
            g.per_req(g.kicks),
            g.per_req(g.driver_waits),
            g.per_req(g.iowq_wakeups),
            g.per_req(g.wakeups()),
            g.driver_cpu_us_per_req(),
            g.per_req(g.iowq_cpu_ns) / 1000.0,
            g.iowq_threads,
        );
    }
    let _ = writeln!(
        s,
        "\n## Targets (issue 14): at QD >= 32, median ratio >= {RATIO_TARGET} and < {SYSCALL_TARGET} syscalls/request\n"
    );
    let _ = writeln!(
        s,
        "| file | workload | QD | ratio | syscalls/req | ratio target | syscall target |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---|---|");
    for r in rows.iter().filter(|r| r.w.qd >= 32) {
        let sc = r.ringvm.per_req(r.ringvm.syscalls());
        let ratio = r.ratio().map_or(f64::NAN, |x| x.median);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2}x | {:.3} | {} | {} |",
            r.file_kind,
            r.w.label(),
            r.w.qd,
            ratio,
            sc,
            if ratio >= RATIO_TARGET {
                "met"
            } else {
                "MISSED"
            },
            if sc < SYSCALL_TARGET { "met" } else { "MISSED" },
        );
    }
    let _ = writeln!(s, "## Changes kept (issue 14)\n");
    for c in CHANGES {
        let _ = writeln!(s, "- {c}");
    }
    let _ = writeln!(s, "\n## Tried and dropped (issue 14)\n");
    for t in TRIED {
        let _ = writeln!(s, "- {t}");
    }
    let _ = writeln!(s);
    report::notes_markdown(&mut s, BOUNDS, METHOD, QEMU_NOTE);
    s
}

/// The QEMU section of blk.md: what the column is, then each row's
/// figures, or why there are none.
fn qemu_markdown(s: &mut String, rows: &[Row], ctx: &Context) {
    let _ = writeln!(
        s,
        "\n## Against QEMU's block layer (qemu-img bench), same rounds\n\n{QEMU_LINE}\n"
    );
    if let Err(why) = &ctx.qemu {
        let _ = writeln!(s, "Not measured: {why}.");
        return;
    }
    for (kind, why, startup) in &ctx.qemu_files {
        match (why, startup) {
            (Some(why), _) => {
                let _ = writeln!(s, "- {kind}: not measured: {why}");
            }
            (None, Some(ms)) => {
                let _ = writeln!(
                    s,
                    "- {kind}: qemu-img's start-up (probe run of 64 reads) took {ms:.1} ms of CPU, included in its CPU per request below"
                );
            }
            (None, None) => {}
        }
    }
    let _ = writeln!(
        s,
        "\n| file | workload | QD | ringvm | QEMU block layer | ringvm / QEMU (median) | min–max | QEMU CPU µs/req (process, io-wq included) | ringvm VMM + io-wq CPU µs/req |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---|---:|---:|");
    for r in rows {
        let g = &r.ringvm;
        let vmm_cpu = g.per_req(g.vmm_cpu_ns + g.iowq_cpu_ns) / 1000.0;
        let Some(p) = r.qemu_point() else {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | not measured | - | - | - | {vmm_cpu:.2} |",
                r.file_kind,
                r.w.label(),
                r.w.qd,
                r.fmt_value(r.ringvm_median()),
            );
            continue;
        };
        let (ratio, range) = fmt_spread(p.ratio());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {vmm_cpu:.2} |",
            r.file_kind,
            r.w.label(),
            r.w.qd,
            r.fmt_value(r.ringvm_median()),
            r.fmt_value(r.qemu_median()),
            ratio,
            range,
            r.qemu_cpu_us_per_req(),
        );
    }
    // Rounds that failed on a file where QEMU otherwise runs (the files
    // where it cannot run at all are listed above the table).
    let file_level: Vec<&str> = ctx
        .qemu_files
        .iter()
        .filter_map(|(_, why, _)| why.as_deref())
        .collect();
    for r in rows {
        if let Some(m) = r.qemu_missing().filter(|m| !file_level.contains(m)) {
            let _ = writeln!(s, "- {}: a round without a QEMU figure: {m}", r.key());
        }
    }
}

fn points(rows: &[Row]) -> Vec<Point> {
    rows.iter()
        .flat_map(|r| {
            std::iter::once(r.point())
                .chain(r.floor_point())
                .chain(r.async_point())
                .chain(r.qemu_point())
        })
        .collect()
}

/// The QEMU line of the report's notes: what the column is, or why it is
/// empty.
fn qemu_summary_line(ctx: &Context) -> String {
    let missing: Vec<String> = ctx
        .qemu_files
        .iter()
        .filter_map(|(k, why, _)| why.as_ref().map(|w| format!("{k}: {w}")))
        .collect();
    match &ctx.qemu {
        Err(why) => format!("{QEMU_LINE} Not measured in this run: {why}."),
        Ok(_) if !missing.is_empty() => {
            format!("{QEMU_LINE} Not measured on {}.", missing.join("; "))
        }
        Ok(_) => QEMU_LINE.to_string(),
    }
}

fn json_report(rows: &[Row], ctx: &Context, args: &Args) -> Value {
    let results: Vec<Value> = rows
        .iter()
        .map(|r| {
            let g = &r.ringvm;
            json!({
                "key": r.key(),
                "file_kind": r.file_kind,
                "workload": r.w.rw,
                "block_size": r.w.bs,
                "queue_depth": r.w.qd,
                "unit": r.unit(),
                "ratio": r.ratio().map(|x| x.json()),
                "qemu_ratio": r.qemu_point().and_then(|p| p.ratio()).map(|x| x.json()),
                "ringvm": {
                    "seconds": g.seconds,
                    "requests": g.requests,
                    "iops": g.iops(),
                    "mib_s": g.mib_s(),
                    "vmm_cpu_us_per_req": g.cpu_us_per_req(),
                    "driver_cpu_us_per_req": g.driver_cpu_us_per_req(),
                    "vmm_syscalls_per_req": g.per_req(g.syscalls()),
                    "io_uring_enter": g.turns,
                    "irq_writes": g.irq_writes,
                    "irq_signals_seen_by_driver": g.irq_signals_seen,
                    "other_read_write_syscalls": g.other_rw_syscalls,
                    "vmm_sleeps": g.vmm_sleeps,
                    "requests_per_turn": g.requests as f64 / g.turns.max(1) as f64,
                    "driver_kicks": g.kicks,
                    "driver_sleeps": g.driver_waits,
                    "iowq_cpu_us_per_req": g.per_req(g.iowq_cpu_ns) / 1000.0,
                    "iowq_wakeups": g.iowq_wakeups,
                    "iowq_threads": g.iowq_threads,
                    "wakeups_per_req": g.per_req(g.wakeups()),
                },
                "fio_command": r.rounds.first().map(|x| x.reference.fio.command.clone()),
                "rounds": r.rounds.iter().map(|x| json!({
                    "ringvm_first": x.ringvm_first,
                    "others_cpus": x.others_cpus,
                    "ringvm": {
                        "seconds": x.ringvm.seconds,
                        "iops": x.ringvm.iops(),
                        "mib_s": x.ringvm.mib_s(),
                        "vmm_cpu_us_per_req": x.ringvm.cpu_us_per_req(),
                        "vmm_syscalls_per_req": x.ringvm.per_req(x.ringvm.syscalls()),
                    },
                    "fio": {
                        "iops": x.reference.fio.iops,
                        "mib_s": x.reference.fio.mib_s,
                        "cpu_us_per_req": x.reference.fio.cpu_us_per_req,
                    },
                    "eventfd_round_trip_us": x.reference.rtt_s.map(|s| s * 1e6),
                    "qemu": match &x.reference.qemu {
                        Ok(q) => json!({
                            "requests": q.requests,
                            "seconds": q.seconds,
                            "iops": q.iops(),
                            "mib_s": q.mib_s(),
                            "cpu_us_per_req": q.cpu_us_per_req(),
                            "command": q.command,
                        }),
                        Err(why) => json!({"error": why}),
                    },
                    "fio_force_async": x.reference.fio_async.as_ref().map(|f| json!({
                        "iops": f.iops,
                        "mib_s": f.mib_s,
                        "cpu_us_per_req": f.cpu_us_per_req,
                    })),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut host = ctx.host.json(ctx.deferred_taskrun);
    host["fio"] = json!(ctx.fio);
    host["qemu_img"] = match &ctx.qemu {
        Ok(v) => json!(v),
        Err(why) => json!({"error": why}),
    };
    json!({
        "benchmark": "bench-blk",
        "summary": summary_json(
            "virtio-blk vs fio io_uring and QEMU's block layer on the same file",
            &settings(ctx, args),
            &std::iter::once(format!("QD >= 32 also has a syscall target (< {SYSCALL_TARGET} per request): see blk.md."))
                .chain(std::iter::once(qemu_summary_line(ctx)))
                .chain(CHANGES.iter().map(|c| c.to_string()))
                .collect::<Vec<_>>(),
        ),
        "host": host,
        "config": {
            "seconds_per_run": args.seconds,
            "rounds": args.rounds,
            "warmup_seconds": args.warmup,
            "floor_seconds": args.floor_seconds,
            "file_mib": args.file_mib,
            "files": ctx.files.iter().map(|(k, p, f)| json!({"kind": k, "path": p, "fs": f})).collect::<Vec<_>>(),
        },
        "points": points(rows).iter().map(Point::json).collect::<Vec<_>>(),
        "results": results,
        "method": METHOD,
        "bounds": BOUNDS,
        "changes": CHANGES,
        "tried_and_dropped": TRIED,
        "qemu": QEMU_NOTE,
    })
}

// ---------------------------------------------------------------------------

fn test_files(args: &Args) -> Vec<TestFile> {
    let pid = std::process::id();
    let disk = args.disk_dir.join(format!("ringvm-bench-blk-{pid}.img"));
    let mut files = vec![
        TestFile {
            kind: "tmpfs",
            path: args.shm_dir.join(format!("ringvm-bench-blk-{pid}.img")),
            fs: fs_type(&args.shm_dir),
            direct: false,
        },
        TestFile {
            kind: "disk",
            path: disk.clone(),
            fs: fs_type(&args.disk_dir),
            direct: false,
        },
    ];
    if !args.no_direct {
        files.push(TestFile {
            kind: "disk-direct",
            path: disk,
            fs: format!("{}, O_DIRECT", fs_type(&args.disk_dir)),
            direct: true,
        });
    }
    files
}

/// The points of `f` that --only selects.
fn selected(f: &TestFile, args: &Args) -> Vec<Workload> {
    workloads()
        .into_iter()
        .filter(|w| {
            let label = format!("{} {} QD{}", f.kind, w.label(), w.qd);
            args.only.as_deref().is_none_or(|o| {
                if args.exact {
                    label == o
                } else {
                    label.contains(o)
                }
            })
        })
        .collect()
}

/// Prepares `f`'s file unless an earlier kind on the same path did.
fn prepare_once(f: &TestFile, args: &Args, prepared: &mut Vec<PathBuf>) -> Res<()> {
    if prepared.contains(&f.path) {
        return Ok(());
    }
    eprintln!(
        "bench-blk: writing {} MiB to {}",
        args.file_mib,
        f.path.display()
    );
    prepared.push(f.path.clone());
    prepare_file(&f.path, args.file_mib)
}

/// The callgrind run: ringvm only, a fixed number of requests per point,
/// the loop turned on this thread; one JSON line per point on stdout.
fn run_inline(args: &Args, requests: u64) -> Res<()> {
    let mut prepared = Vec::new();
    let mut outcome = Ok(());
    for f in test_files(args) {
        let points = selected(&f, args);
        if points.is_empty() {
            continue;
        }
        outcome = prepare_once(&f, args, &mut prepared).and_then(|()| {
            let mut h = Harness::new(&f.path, f.direct, true)?;
            for w in points {
                let mut v = h.run_inline(&w, requests)?;
                v["point"] = json!(format!("{} {} QD{}", f.kind, w.label(), w.qd));
                println!("{v}");
            }
            Ok(())
        });
        if outcome.is_err() {
            break;
        }
    }
    if !args.keep_files {
        for p in &prepared {
            let _ = std::fs::remove_file(p);
        }
    }
    outcome
}

fn run(args: &Args) -> Res<()> {
    if args.seconds <= 0.0
        || args.warmup < 0.0
        || args.floor_seconds <= 0.0
        || args.file_mib == 0
        || args.rounds == 0
    {
        return Err(
            "--seconds and --floor-seconds must be > 0, --warmup >= 0, --file-mib and --rounds > 0"
                .into(),
        );
    }
    if let Some(n) = args.callgrind_requests {
        return run_inline(args, n);
    }
    let fio = fio_version()?;
    let qemu = if args.no_qemu {
        Err("left out (--no-qemu)".to_string())
    } else {
        qemu_img::version()
    };
    let out_dir = report::out_dir(args.out.as_deref())?;
    let files = test_files(args);
    let mut ctx = Context {
        host: HostInfo::read(),
        fio,
        deferred_taskrun: false,
        files: files
            .iter()
            .map(|f| {
                (
                    f.kind.to_string(),
                    f.path.display().to_string(),
                    f.fs.clone(),
                )
            })
            .collect(),
        qemu,
        qemu_files: Vec::new(),
    };
    eprintln!(
        "bench-blk: {} points x {} files, {} rounds of ringvm, fio and QEMU ({} s + {} s warm-up each)",
        workloads().len(),
        files.len(),
        args.rounds,
        args.seconds,
        args.warmup
    );
    let mut rows = Vec::new();
    let mut prepared = Vec::new();
    let mut outcome = Ok(());
    for f in &files {
        let points = selected(f, args);
        if points.is_empty() {
            continue;
        }
        outcome = prepare_once(f, args, &mut prepared).and_then(|()| {
            let mut h = Harness::new(&f.path, f.direct, false)?;
            let qemu = QemuFile::probe(f, args.file_mib << 20, ctx.qemu.as_ref().err().map(String::as_str));
            ctx.qemu_files.push((
                f.kind.to_string(),
                qemu.unavailable.clone(),
                qemu.startup_cpu_ms,
            ));
            let result: Res<()> = (|| {
                for w in points {
                    // QEMU's last rate on this point sizes its next runs.
                    let mut qemu_rate: Option<f64> = None;
                    let rounds = interleave(
                        args.rounds,
                        Own::ProcessAndChildren,
                        |_| {
                            settle(&f.path)?;
                            h.run(&w, args.warmup, args.seconds)
                        },
                        |round| {
                            // QEMU runs last in even rounds (ringvm, fio,
                            // QEMU) and first in odd ones (QEMU, fio,
                            // ringvm), so no side always follows another.
                            let mut run_qemu = |fio_rate: f64| {
                                let q = qemu.run(
                                    f,
                                    &w,
                                    (args.warmup, args.seconds),
                                    qemu_rate,
                                    fio_rate,
                                );
                                match &q {
                                    Ok(r) => qemu_rate = Some(r.iops()),
                                    Err(e) if qemu.unavailable.is_none() => {
                                        eprintln!("bench-blk: QEMU round failed: {e}");
                                    }
                                    Err(_) => {}
                                }
                                q
                            };
                            let qemu_first = (round % 2 == 1).then(|| run_qemu(10_000.0));
                            settle(&f.path)?;
                            let fio = run_fio(
                                &f.path,
                                f.direct,
                                &w,
                                args.warmup,
                                args.seconds,
                                FioMode::Default,
                            )?;
                            let fio_async = if args.async_reference && w.qd >= 32 {
                                settle(&f.path)?;
                                Some(run_fio(
                                    &f.path,
                                    f.direct,
                                    &w,
                                    args.warmup,
                                    args.seconds,
                                    FioMode::Async,
                                )?)
                            } else {
                                None
                            };
                            let rtt_s = if w.qd == 1 {
                                Some(eventfd_round_trip(Duration::from_secs_f64(
                                    args.floor_seconds,
                                ))?)
                            } else {
                                None
                            };
                            let qemu = match qemu_first {
                                Some(q) => q,
                                None => run_qemu(fio.iops),
                            };
                            Ok(Reference {
                                fio,
                                rtt_s,
                                fio_async,
                                qemu,
                            })
                        },
                    )?;
                    let row = Row::new(f.kind, w, rounds);
                    let (ratio, range) = fmt_spread(row.ratio());
                    eprintln!(
                        "  {:11} {:14} QD{:<3} ringvm {:>14}  fio {:>14}  {} ({})  QEMU {:>14}  {}  {:.2} µs/req  {:.3} syscalls/req",
                        row.file_kind,
                        row.w.label(),
                        row.w.qd,
                        row.fmt_value(row.ringvm_median()),
                        row.fmt_value(row.fio_median()),
                        ratio,
                        range,
                        if row.qemu_point().is_some() {
                            row.fmt_value(row.qemu_median())
                        } else {
                            "-".into()
                        },
                        row.qemu_ratio_text(),
                        row.ringvm.cpu_us_per_req(),
                        row.ringvm.per_req(row.ringvm.syscalls())
                    );
                    rows.push(row);
                }
                Ok(())
            })();
            ctx.deferred_taskrun = h.vmm.deferred_taskrun();
            let stopped = h.vmm.stop();
            result.and(stopped)
        });
        if outcome.is_err() {
            break;
        }
    }
    if !args.keep_files {
        for p in &prepared {
            let _ = std::fs::remove_file(p);
        }
    }
    outcome?;
    let md = markdown(&rows, &ctx, args);
    let report = json_report(&rows, &ctx, args);
    report::write(&out_dir, "blk", "bench-blk", &md, &report)
}

fn main() -> ExitCode {
    let args = Args::parse();
    report::exit("bench-blk", run(&args))
}
