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
use ringvm_tests::bench::host::{HostCpu, HostInfo, Own};
use ringvm_tests::bench::irq::wait_irq;
use ringvm_tests::bench::mmio::MmioRegs;
use ringvm_tests::bench::report;
use ringvm_tests::bench::vmm_thread::{VmmHandle, VmmSnap};
use ringvm_tests::bench::wiring::BenchWiring;
use ringvm_tests::bench::Res;
use serde_json::{json, Value};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
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
    /// Measured seconds per point (ringvm and fio each).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Measurements per point and side, alternating which side goes first.
    #[arg(long, default_value_t = 2)]
    repeats: u32,
    /// Unmeasured warm-up seconds before each point (fio: --ramp_time).
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
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
    /// Run only the points whose "<file> <workload> QD<n>" label contains
    /// this text (e.g. "disk randwrite 4k QD32"); for investigating.
    #[arg(long)]
    only: Option<String>,
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
}

impl Workload {
    fn label(&self) -> String {
        format!("{} {}k", self.rw, self.bs >> 10)
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
            });
        }
    }
    v.push(Workload {
        rw: "read",
        op: Op::Read,
        random: false,
        bs: 128 << 10,
        qd: 32,
        bandwidth: true,
    });
    v
}

// ---------------------------------------------------------------------------
// The synthetic guest driver.

fn indirect_table(slot: usize) -> u64 {
    INDIRECT_BASE + slot as u64 * 64
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
        }
        self.free = (0..w.qd).rev().collect();
        self.busy = vec![false; w.qd];
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
            let offset = self.next_offset(w);
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
            let expected = if w.op == Op::Read { w.bs as u32 + 1 } else { 1 };
            if len != expected {
                return Err(format!("used length {len}, expected {expected}"));
            }
            self.busy[id] = false;
            self.free.push(id);
            n += 1;
        }
        self.stats.completed += n;
        Ok(n)
    }

    /// Re-arms the interrupt (used_event = what we have seen), and sleeps
    /// on the irq line unless something arrived meanwhile. On wake-up it
    /// does what Linux's virtio-mmio interrupt handler does: read and
    /// acknowledge InterruptStatus.
    fn wait_irq(&mut self) -> Res<()> {
        self.vq.set_used_event(self.vq.seen_used());
        if self.vq.used_idx() != self.vq.seen_used() {
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

    fn in_flight(&self) -> usize {
        self.busy.len() - self.free.len()
    }
}

// ---------------------------------------------------------------------------
// One file: a drive, its VMM thread, the driver.

struct Harness {
    driver: Driver,
    vmm: VmmHandle,
}

impl Harness {
    fn new(path: &Path) -> Res<Self> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(|e| format!("guest memory: {e}"))?;
        let mut devices = DeviceManager::new().map_err(|e| e.to_string())?;
        let wiring = BenchWiring::default();
        let cfg = DriveConfig {
            drive_id: "bench".into(),
            path_on_host: path.to_path_buf(),
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
        let vmm = VmmHandle::spawn(move || virtio, &mem)?;
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
            stats: DriverStats::default(),
            rng: 0x9e37_79b9_7f4a_7c15,
            next_seq: 0,
        };
        driver.init()?;
        Ok(Self { driver, vmm })
    }

    /// Runs `w` for warm-up + `secs`, measuring only the second part, then
    /// drains the queue.
    fn run(&mut self, w: &Workload, warmup: f64, secs: f64) -> Res<RingvmResult> {
        let d = &mut self.driver;
        d.configure(w)?;
        let start = Instant::now();
        let t_measure = start + Duration::from_secs_f64(warmup);
        let t_end = t_measure + Duration::from_secs_f64(secs);
        let mut first: Option<(Instant, DriverStats, VmmSnap)> = None;
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
                    first = Some((now, d.stats, self.vmm.snap()?));
                }
                Some((t0, s0, v0)) if result.is_none() && now >= t_end => {
                    d.stats.cpu_ns = own_cpu_ns()?;
                    let v1 = self.vmm.snap()?;
                    result = Some(RingvmResult::new(w, now - *t0, s0, &d.stats, v0, &v1));
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

fn run_fio(file: &Path, w: &Workload, warmup: f64, secs: f64) -> Res<FioResult> {
    let args = vec![
        "--name=host".to_string(),
        "--ioengine=io_uring".into(),
        format!("--filename={}", file.display()),
        format!("--rw={}", w.rw),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.qd),
        "--numjobs=1".into(),
        "--direct=0".into(),
        // Keep the page cache the ringvm run used.
        "--invalidate=0".into(),
        "--norandommap".into(),
        "--time_based".into(),
        format!("--ramp_time={}ms", (warmup * 1000.0).round() as u64),
        format!("--runtime={}ms", (secs * 1000.0).round() as u64),
        "--output-format=json".into(),
    ];
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

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0u32), |(s, n), v| (s + v, n + 1));
    sum / f64::from(n.max(1))
}

struct Row {
    file_kind: &'static str,
    w: Workload,
    /// All repetitions summed.
    ringvm: RingvmResult,
    /// Each repetition, to show the spread.
    ringvm_runs: Vec<RingvmResult>,
    fio: Vec<FioResult>,
    /// CPUs other processes kept busy during the point (both runs).
    others_cpus: f64,
}

impl Row {
    fn ringvm_value(&self) -> f64 {
        if self.w.bandwidth {
            self.ringvm.mib_s()
        } else {
            self.ringvm.iops()
        }
    }

    fn fio_value(&self) -> f64 {
        if self.w.bandwidth {
            mean(self.fio.iter().map(|f| f.mib_s))
        } else {
            mean(self.fio.iter().map(|f| f.iops))
        }
    }

    fn fio_cpu_us_per_req(&self) -> f64 {
        mean(self.fio.iter().map(|f| f.cpu_us_per_req))
    }

    fn ratio(&self) -> f64 {
        self.ringvm_value() / self.fio_value().max(f64::MIN_POSITIVE)
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

struct Context {
    host: HostInfo,
    fio: String,
    deferred_taskrun: bool,
    files: Vec<(String, String, String)>,
}

const METHOD: &[&str] = &[
    "Device side: the real virtio-blk `BlockDevice` + virtio-mmio transport on the MMIO bus, in the real generic device slot (`VirtioDevices`), on its own thread turning one `Ring` (io_uring), as `Vmm::run` does for a booted guest. No KVM.",
    "Driver side: a split-virtqueue driver on the main thread (queue size 256, VERSION_1 + EVENT_IDX + INDIRECT_DESC, one indirect 3-descriptor chain per request: 16-byte header, data, 1-byte status), set up through the virtio-mmio v2 registers. It kicks by writing the doorbell eventfd (KVM's ioeventfd) only when vring_need_event says so, and sleeps on the irq eventfd (KVM's irqfd) only when it has nothing to submit or reap, after re-arming used_event; on wake it reads and acks InterruptStatus like Linux's vm_interrupt.",
    "Files: 1 GiB (default) of non-zero data, buffered I/O through the host page cache for both ringvm and fio (drive opened without O_DIRECT; fio --direct=0 --invalidate=0); the file is fdatasync'ed before every run so dirty pages of a previous write run do not carry over.",
    "Host limit: fio --ioengine=io_uring, numjobs=1, same file, same rw/bs/iodepth, --norandommap, same warm-up (--ramp_time) and duration, alternating with the ringvm runs of the same point (ABBA). ratio = ringvm rate over all its runs / mean fio rate.",
    "VMM CPU: CLOCK_THREAD_CPUTIME of the VMM thread (pthread_getcpuclockid) over the measured window, divided by requests completed in it. Work io_uring hands to io-wq kernel workers (e.g. buffered writes that cannot complete inline) is not in that thread's time; fio's figure is (usr_cpu+sys_cpu) x runtime / ios of its job thread, with the same blind spot.",
    "VMM syscalls: io_uring_enter calls counted around `Ring::turn` (one per turn) + read/write syscalls from /proc/self/task/<tid>/io (syscr+syscw; the only write(2)s are irq eventfd signals, cross-checked against the counter values the driver read from the irq eventfd). The loop takes no locks and makes no other syscalls on the data path; SQ-full submits inside `Ring::push` are not counted (cannot happen at QD <= 128 with a 256-entry SQ).",
    "VMM sleeps: voluntary context switches of the VMM thread (/proc/self/task/<tid>/status), i.e. turns that blocked in io_uring_enter. Driver CPU: CLOCK_THREAD_CPUTIME of the synthetic driver thread (the guest's share, not ringvm's).",
    "Others' CPUs: how many CPUs other processes kept busy on average during the point (/proc/stat busy time minus this process's and fio's CPU time). This benchmark shares the machine; with 2 CPUs, ringvm needs one for the VMM thread and one for the guest driver, fio one for itself, so anything else running skews ringvm more.",
    "Method cross-check (done once by hand): `perf stat -e raw_syscalls:sys_enter -t <vmm tid>` over a tmpfs randread QD32 run counted only io_uring_enter and write, at the same rate as the counters above.",
];

/// What bounds the figures, as the breakdown table shows it.
const BOUNDS: &[&str] = &[
    "Syscalls per request = (io_uring_enter + irq writes) / requests, so staying under 0.1 needs about 20 requests per turn and at most one irq write per turn. At QD 32 that means nearly the whole queue must be popped in one drain and completed in one turn.",
    "Requests per turn: `Ring::turn` is `submit_and_wait(1)`, so a turn ends at the first completion. Where io_uring completes inline (ext4 page-cache reads), a kick's whole drain completes in one turn. Where it punts to io-wq (every tmpfs request here: an iou-wrk thread shows up, and buffered ext4 writes), completions come back one or two at a time, and each one wakes the thread for a turn of its own. Waiting for more (min_complete > 1 with a short IORING_ENTER_EXT_ARG timeout / min-wait) or leaving the queue's notifications off while I/O is in flight (popping new requests on each completion turn instead of taking a kick) would make batches bigger.",
    "Irq writes: `BlockDevice::complete` runs `needs_notification` after every completion. While the VMM thread works through a batch, the guest (on the other CPU) can wake up, reap, and re-arm used_event, and then the next completion in the same batch signals again. So irq writes per turn can go above 1 (see the disk randread rows). Signalling once per queue at the end of a turn's batch would cap them at one per turn.",
    "QD 1: every request costs two cross-thread wake-ups (doorbell -> VMM thread, irqfd -> guest). fio does one syscall with an inline completion. On this nested VM a cross-CPU wake-up costs several µs, which is why the VMM thread's CPU per request is high there. A real guest pays those two hops too (ioeventfd exit, irq injection).",
    "Throughput ratio: on 2 CPUs the VMM thread and the guest driver take one CPU each, plus io-wq workers, while fio's single thread has the machine to itself. Whatever else runs (the others' CPUs column) costs ringvm more than fio. Ratios vary by ±20-30% between runs on this shared machine, so treat single points as rough.",
];

const QEMU_NOTE: &str = "QEMU side-by-side: not run. This machine's KVM is PVM-native (guest code runs in KVM's instruction emulator at ~1.6 us/instruction), so a QEMU guest would measure the emulator, not QEMU's block layer; a fake figure would be worse than none. The comparison here is against the host limit (fio io_uring on the same file) instead.";

fn markdown(rows: &[Row], ctx: &Context, args: &Args) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# ringvm virtio-blk vs host io_uring (fio), same file, same run\n"
    );
    let _ = writeln!(
        s,
        "Kernel {}, {} x {}, {}, io_uring DEFER_TASKRUN: {}. Each point: {} x {} s measured per side (after {} s warm-up each), ringvm and fio alternating ABBA; buffered I/O (host page cache) on both sides. Load average at the start: {}.\n",
        ctx.host.kernel,
        ctx.host.cpus,
        ctx.host.cpu,
        ctx.fio,
        if ctx.deferred_taskrun { "yes" } else { "no" },
        args.repeats,
        args.seconds,
        args.warmup,
        ctx.host.loadavg,
    );
    for (kind, path, fs) in &ctx.files {
        let _ = writeln!(s, "- {kind}: `{path}` ({fs})");
    }
    let _ = writeln!(
        s,
        "\n| file | workload | QD | ringvm | fio io_uring | ratio | VMM CPU µs/req | fio CPU µs/req | VMM syscalls/req |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.2}x | {:.2} | {:.2} | {:.3} |",
            r.file_kind,
            r.w.label(),
            r.w.qd,
            r.fmt_value(r.ringvm_value()),
            r.fmt_value(r.fio_value()),
            r.ratio(),
            r.ringvm.cpu_us_per_req(),
            r.fio_cpu_us_per_req(),
            r.ringvm.per_req(r.ringvm.syscalls()),
        );
    }
    let _ = writeln!(
        s,
        "\n## Where the VMM thread's syscalls and wake-ups go (per request)\n"
    );
    let _ = writeln!(
        s,
        "| file | workload | QD | requests/turn | io_uring_enter | irq writes | other r/w | VMM sleeps | driver kicks | driver sleeps | driver CPU µs/req | others' CPUs |"
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let g = &r.ringvm;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} |",
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
            g.driver_cpu_us_per_req(),
            r.others_cpus,
        );
    }
    let _ = writeln!(
        s,
        "\n## Targets (issue #3): at QD 32, ratio >= 0.9 and < 0.1 syscalls/request\n"
    );
    let _ = writeln!(
        s,
        "| file | workload | ratio | syscalls/req | ratio target | syscall target |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---|---|");
    for r in rows.iter().filter(|r| r.w.qd == 32) {
        let sc = r.ringvm.per_req(r.ringvm.syscalls());
        let _ = writeln!(
            s,
            "| {} | {} | {:.2}x | {:.3} | {} | {} |",
            r.file_kind,
            r.w.label(),
            r.ratio(),
            sc,
            if r.ratio() >= 0.9 { "met" } else { "MISSED" },
            if sc < 0.1 { "met" } else { "MISSED" },
        );
    }
    report::notes_markdown(&mut s, BOUNDS, METHOD, QEMU_NOTE);
    s
}

fn json_report(rows: &[Row], ctx: &Context, args: &Args) -> Value {
    let results: Vec<Value> = rows
        .iter()
        .map(|r| {
            let g = &r.ringvm;
            json!({
                "file_kind": r.file_kind,
                "workload": r.w.rw,
                "block_size": r.w.bs,
                "queue_depth": r.w.qd,
                "unit": if r.w.bandwidth { "MiB/s" } else { "IOPS" },
                "ringvm_value": r.ringvm_value(),
                "fio_value": r.fio_value(),
                "ratio": r.ratio(),
                "others_cpus_busy": r.others_cpus,
                "ringvm": {
                    "seconds": g.seconds,
                    "requests": g.requests,
                    "iops": g.iops(),
                    "mib_s": g.mib_s(),
                    "vmm_cpu_us_per_req": g.cpu_us_per_req(),
                    "driver_cpu_us_per_req": g.driver_cpu_us_per_req(),
                    "runs": r.ringvm_runs.iter().map(|x| json!({
                        "seconds": x.seconds,
                        "iops": x.iops(),
                        "mib_s": x.mib_s(),
                        "vmm_cpu_us_per_req": x.cpu_us_per_req(),
                        "vmm_syscalls_per_req": x.per_req(x.syscalls()),
                    })).collect::<Vec<_>>(),
                    "vmm_syscalls_per_req": g.per_req(g.syscalls()),
                    "io_uring_enter": g.turns,
                    "irq_writes": g.irq_writes,
                    "irq_signals_seen_by_driver": g.irq_signals_seen,
                    "other_read_write_syscalls": g.other_rw_syscalls,
                    "vmm_sleeps": g.vmm_sleeps,
                    "requests_per_turn": g.requests as f64 / g.turns.max(1) as f64,
                    "driver_kicks": g.kicks,
                    "driver_sleeps": g.driver_waits,
                },
                "fio": {
                    "iops": mean(r.fio.iter().map(|f| f.iops)),
                    "mib_s": mean(r.fio.iter().map(|f| f.mib_s)),
                    "cpu_us_per_req": r.fio_cpu_us_per_req(),
                    "command": r.fio.first().map(|f| f.command.clone()),
                    "runs": r.fio.iter().map(|f| json!({
                        "iops": f.iops,
                        "mib_s": f.mib_s,
                        "cpu_us_per_req": f.cpu_us_per_req,
                    })).collect::<Vec<_>>(),
                },
            })
        })
        .collect();
    let targets: Vec<Value> = rows
        .iter()
        .filter(|r| r.w.qd == 32)
        .map(|r| {
            let sc = r.ringvm.per_req(r.ringvm.syscalls());
            json!({
                "file_kind": r.file_kind,
                "workload": r.w.label(),
                "ratio": r.ratio(),
                "ratio_target_met": r.ratio() >= 0.9,
                "syscalls_per_req": sc,
                "syscall_target_met": sc < 0.1,
            })
        })
        .collect();
    let mut host = ctx.host.json(ctx.deferred_taskrun);
    host["fio"] = json!(ctx.fio);
    json!({
        "benchmark": "bench-blk",
        "host": host,
        "config": {
            "seconds_per_run": args.seconds,
            "runs_per_side": args.repeats,
            "warmup_seconds": args.warmup,
            "file_mib": args.file_mib,
            "caching": "buffered (host page cache) for ringvm and fio",
            "files": ctx.files.iter().map(|(k, p, f)| json!({"kind": k, "path": p, "fs": f})).collect::<Vec<_>>(),
        },
        "targets": {"qd": 32, "ratio_min": 0.9, "syscalls_per_req_max": 0.1, "points": targets},
        "results": results,
        "method": METHOD,
        "bounds": BOUNDS,
        "qemu": QEMU_NOTE,
    })
}

// ---------------------------------------------------------------------------

fn run(args: &Args) -> Res<()> {
    let fio = fio_version()?;
    if args.seconds <= 0.0 || args.warmup < 0.0 || args.file_mib == 0 || args.repeats == 0 {
        return Err("--seconds must be > 0, --warmup >= 0, --file-mib and --repeats > 0".into());
    }
    let out_dir = report::out_dir(args.out.as_deref())?;
    let pid = std::process::id();
    let files = [
        TestFile {
            kind: "tmpfs",
            path: args.shm_dir.join(format!("ringvm-bench-blk-{pid}.img")),
            fs: fs_type(&args.shm_dir),
        },
        TestFile {
            kind: "disk",
            path: args.disk_dir.join(format!("ringvm-bench-blk-{pid}.img")),
            fs: fs_type(&args.disk_dir),
        },
    ];
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
    };
    eprintln!(
        "bench-blk: {} points x 2 files, {} x ({} s + {} s warm-up) per side, ringvm and fio alternating ABBA",
        workloads().len(),
        args.repeats,
        args.seconds,
        args.warmup
    );
    let mut rows = Vec::new();
    let mut outcome = Ok(());
    for f in &files {
        let points: Vec<Workload> = workloads()
            .into_iter()
            .filter(|w| {
                let label = format!("{} {} QD{}", f.kind, w.label(), w.qd);
                args.only.as_deref().is_none_or(|o| label.contains(o))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        eprintln!(
            "bench-blk: writing {} MiB to {}",
            args.file_mib,
            f.path.display()
        );
        outcome = prepare_file(&f.path, args.file_mib).and_then(|()| {
            let mut h = Harness::new(&f.path)?;
            let result: Res<()> = (|| {
                for w in points {
                    let cpu0 = HostCpu::sample(Own::ProcessAndChildren)?;
                    let mut ringvm_runs = Vec::new();
                    let mut fio = Vec::new();
                    // ABBA order (ringvm, fio, fio, ringvm, ...) so a drift
                    // in the machine's state favours neither side.
                    for rep in 0..args.repeats {
                        for ringvm_turn in [rep % 2 == 0, rep % 2 != 0] {
                            settle(&f.path)?;
                            if ringvm_turn {
                                ringvm_runs.push(h.run(&w, args.warmup, args.seconds)?);
                            } else {
                                fio.push(run_fio(&f.path, &w, args.warmup, args.seconds)?);
                            }
                        }
                    }
                    let others_cpus = HostCpu::sample(Own::ProcessAndChildren)?.others_since(&cpu0);
                    let mut ringvm = RingvmResult::default();
                    for r in &ringvm_runs {
                        ringvm.add(r);
                    }
                    let row = Row {
                        file_kind: f.kind,
                        w,
                        ringvm,
                        ringvm_runs,
                        fio,
                        others_cpus,
                    };
                    eprintln!(
                        "  {:5} {:14} QD{:<3} ringvm {:>14}  fio {:>14}  {:.2}x  {:.2} µs/req  {:.3} syscalls/req",
                        row.file_kind,
                        row.w.label(),
                        row.w.qd,
                        row.fmt_value(row.ringvm_value()),
                        row.fmt_value(row.fio_value()),
                        row.ratio(),
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
        if !args.keep_files {
            let _ = std::fs::remove_file(&f.path);
        }
        if outcome.is_err() {
            break;
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
