//! `make bench-p9`: the virtio-9p share against the same file operations
//! done on the host directly, and `ringvm -- CMD`'s time to the command's
//! first output line.
//!
//! The data-plane part needs no KVM. A synthetic driver (this file) plays
//! the guest's 9P client: it brings the device up through the real
//! virtio-mmio register file, speaks 9P2000.L in guest memory the way
//! Linux's client does (one request in flight per reader, zero-copy reads
//! into a separate data buffer), kicks the doorbell eventfd and sleeps on
//! the irq eventfd. The device side is what `ringvm` runs: the real
//! `P9Device` over a real `HostFs` in the generic device slot, on its own
//! thread turning one io_uring ring. Each figure is set against the same
//! operation made by this process on the same files in the same run:
//! `pread` for reads, `statx` for a lookup-and-stat.
//!
//! The boot part runs the real binary under KVM (skipped, and said so,
//! without /dev/kvm): wall time from spawning `ringvm --kernel vmlinux --
//! echo` to the first line on its stdout, with the busybox root and with
//! the host's own root.
//!
//! Results: stdout and `target/bench/p9.{json,md}`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use clap::Parser;
use devices::virtio::p9::{HostFs, P9Device};
use devices::virtio::testing::DriverQueue;
use devices::virtio::NOTIFY_REG_OFFSET;
use ringvm_tests::bench::irq::wait_irq;
use ringvm_tests::bench::mmio::MmioRegs;
use ringvm_tests::bench::report;
use ringvm_tests::bench::vmm_thread::VmmHandle;
use ringvm_tests::bench::wiring::BenchWiring;
use ringvm_tests::bench::Res;
use serde_json::{json, Value};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_SEL};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::machine::builder::VirtioBuilder;
use vmm::machine::device_manager::DeviceManager;
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 64 << 20;
const QUEUE_SIZE: u16 = 64;
const QUEUE_BASE: u64 = 0x1000;
const REQ_ADDR: u64 = 0x10_0000;
const REPLY_ADDR: u64 = 0x11_0000;
const REPLY_ROOM: u32 = 64 << 10;
const DATA_ADDR: u64 = 0x20_0000;
/// Linux's 9P client over virtio negotiates at most this msize.
const MSIZE: u32 = 512_000;
/// Tversion/Tattach/Twalk message types.
const TVERSION: u8 = 100;
const TATTACH: u8 = 104;
const TWALK: u8 = 110;
const TLOPEN: u8 = 12;
const TGETATTR: u8 = 24;
const TREAD: u8 = 116;
const TCLUNK: u8 = 120;
const RLERROR: u8 = 7;
const W: u16 = DriverQueue::<GuestMemoryMmap>::WRITE;

/// `make bench-p9` options.
#[derive(Debug, Parser)]
struct Args {
    /// Measured seconds per point (ringvm and host each).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Size of the file read, MiB (in --dir).
    #[arg(long, default_value_t = 256)]
    file_mib: u64,
    /// Files in the lookup directory.
    #[arg(long, default_value_t = 2000)]
    files: usize,
    /// Where the shared directory is made (tmpfs by default: the device,
    /// not a disk, is measured).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Skip the boots (time to first output line).
    #[arg(long)]
    no_boot: bool,
    /// Where p9.json and p9.md go (default: <workspace>/target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn t(ty: u8, tag: u16, body: &[u8]) -> Vec<u8> {
    let mut m = ((7 + body.len()) as u32).to_le_bytes().to_vec();
    m.push(ty);
    m.extend_from_slice(&tag.to_le_bytes());
    m.extend_from_slice(body);
    m
}

fn s(v: &[u8]) -> Vec<u8> {
    let mut o = (v.len() as u16).to_le_bytes().to_vec();
    o.extend_from_slice(v);
    o
}

/// The synthetic 9P client and the device's VMM thread.
struct Client {
    mem: GuestMemoryMmap,
    vq: DriverQueue<GuestMemoryMmap>,
    regs: MmioRegs,
    kick: EventFd,
    irq: EventFd,
    vmm: Option<VmmHandle>,
    requests: u64,
}

impl Client {
    fn new(dir: &Path) -> Res<Self> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(|e| format!("guest memory: {e}"))?;
        let mut devices = DeviceManager::new().map_err(|e| e.to_string())?;
        let wiring = BenchWiring::default();
        let share = HostFs::new(dir, false).map_err(|e| e.to_string())?;
        let mut builder = VirtioBuilder::new();
        builder
            .add("bench", |line| {
                Ok::<_, std::convert::Infallible>(P9Device::new(share, "bench", line))
            })
            .map_err(|e| e.to_string())?;
        let virtio = builder
            .place(&mut devices, &wiring)
            .map_err(|e| e.to_string())?;
        let irq = wiring.take_irq().ok_or("the share wired no interrupt")?;
        let (kick, doorbell, _) = wiring
            .take_doorbells()
            .into_iter()
            .next()
            .ok_or("the share wired no doorbell")?;
        let vmm = VmmHandle::spawn(move || virtio, &mem)?;
        let regs = MmioRegs {
            bus: devices.mmio.clone(),
            base: doorbell - NOTIFY_REG_OFFSET,
        };
        let status = regs.probe(9, "9p")?;
        // VERSION_1 only: no EVENT_IDX, so every reply interrupts, as the
        // QD 1 client below waits for each.
        let status = regs.set_features(status, 1u64 << VIRTIO_F_VERSION_1)?;
        regs.write32(VIRTIO_MMIO_QUEUE_SEL, 0);
        regs.write32(VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
        let vq = DriverQueue::new(mem.clone(), QUEUE_BASE, QUEUE_SIZE);
        regs.set_queue_rings(vq.desc_table(), vq.avail_ring(), vq.used_ring());
        regs.driver_ok(status)?;
        Ok(Self {
            mem,
            vq,
            regs,
            kick,
            irq,
            vmm: Some(vmm),
            requests: 0,
        })
    }

    /// One request, waited for; `data` adds a zero-copy data buffer of that
    /// many bytes after an 11-byte reply header (a Tread). Returns the
    /// reply (header and body; for a read, only its header).
    fn call(&mut self, msg: &[u8], data: u32) -> Res<Vec<u8>> {
        self.mem
            .write_slice(msg, GuestAddress(REQ_ADDR))
            .map_err(|e| e.to_string())?;
        let head = if data > 0 {
            self.vq.push(&[
                (REQ_ADDR, msg.len() as u32, 0),
                (REPLY_ADDR, 11, W),
                (DATA_ADDR, data, W),
            ])
        } else {
            self.vq
                .push(&[(REQ_ADDR, msg.len() as u32, 0), (REPLY_ADDR, REPLY_ROOM, W)])
        };
        self.kick.write(1).map_err(|e| format!("kick: {e}"))?;
        self.requests += 1;
        let (id, len) = loop {
            if let Some(u) = self.vq.next_used() {
                break u;
            }
            if wait_irq(&self.irq, 5000)?.is_none() {
                return Err("no reply within 5 s".into());
            }
            self.regs.ack_interrupt();
        };
        if id != u32::from(head) {
            return Err(format!("reply for chain {id}, expected {head}"));
        }
        let want = if data > 0 { 11 } else { len.min(REPLY_ROOM) };
        let mut r = vec![0u8; want as usize];
        self.mem
            .read_slice(&mut r, GuestAddress(REPLY_ADDR))
            .map_err(|e| e.to_string())?;
        if r.get(4) == Some(&RLERROR) {
            return Err(format!("Rlerror {:?} for message type {}", &r[7..], msg[4]));
        }
        Ok(r)
    }

    fn handshake(&mut self) -> Res<()> {
        let mut b = MSIZE.to_le_bytes().to_vec();
        b.extend(s(b"9P2000.L"));
        self.call(&t(TVERSION, 0xffff, &b), 0)?;
        let mut b = 0u32.to_le_bytes().to_vec();
        b.extend(u32::MAX.to_le_bytes());
        b.extend(s(b"bench"));
        b.extend(s(b""));
        b.extend(0u32.to_le_bytes());
        self.call(&t(TATTACH, 1, &b), 0)?;
        Ok(())
    }

    fn walk(&mut self, newfid: u32, name: &[u8]) -> Res<()> {
        let mut b = 0u32.to_le_bytes().to_vec();
        b.extend(newfid.to_le_bytes());
        b.extend(1u16.to_le_bytes());
        b.extend(s(name));
        self.call(&t(TWALK, 2, &b), 0).map(drop)
    }

    fn vmm_cpu_ns(&self) -> Res<u64> {
        Ok(self.vmm.as_ref().ok_or("no VMM thread")?.snap()?.cpu_ns)
    }

    fn stop(mut self) -> Res<()> {
        match self.vmm.take() {
            Some(v) => v.stop(),
            None => Ok(()),
        }
    }
}

/// One measured figure, ringvm and host.
struct Row {
    what: String,
    unit: &'static str,
    ringvm: f64,
    host: f64,
    vmm_us_per_request: f64,
}

fn read_point(c: &mut Client, file: &Path, size: u32, secs: f64) -> Res<Row> {
    let len = std::fs::metadata(file).map_err(|e| e.to_string())?.len();
    c.walk(10, b"data")?;
    c.call(&t(TLOPEN, 3, &[10, 0, 0, 0, 0, 0, 0, 0]), 0)?;
    let requests0 = c.requests;
    let cpu0 = c.vmm_cpu_ns()?;
    let (start, mut off, mut bytes) = (Instant::now(), 0u64, 0u64);
    while start.elapsed().as_secs_f64() < secs {
        let mut b = 10u32.to_le_bytes().to_vec();
        b.extend(off.to_le_bytes());
        b.extend(size.to_le_bytes());
        let r = c.call(&t(TREAD, 4, &b), size)?;
        let n = u64::from(u32::from_le_bytes([r[7], r[8], r[9], r[10]]));
        bytes += n;
        off = if off + n + u64::from(size) > len {
            0
        } else {
            off + n
        };
    }
    let elapsed = start.elapsed().as_secs_f64();
    let reqs = (c.requests - requests0).max(1);
    let vmm_us = (c.vmm_cpu_ns()? - cpu0) as f64 / 1000.0 / reqs as f64;
    c.call(&t(TCLUNK, 5, &10u32.to_le_bytes()), 0)?;
    // The host: pread of the same size, same file, one at a time.
    let f = std::fs::File::open(file).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; size as usize];
    let (start, mut off, mut host_bytes) = (Instant::now(), 0u64, 0u64);
    while start.elapsed().as_secs_f64() < secs {
        // SAFETY: pread into our own buffer of that size.
        let n = unsafe {
            libc::pread(
                f.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                off as i64,
            )
        };
        if n <= 0 {
            return Err(format!("pread: {}", std::io::Error::last_os_error()));
        }
        host_bytes += n as u64;
        off = if off + n as u64 + u64::from(size) > len {
            0
        } else {
            off + n as u64
        };
    }
    let host_elapsed = start.elapsed().as_secs_f64();
    let mib = |b: u64, s: f64| b as f64 / (1 << 20) as f64 / s;
    Ok(Row {
        what: format!("sequential read, {} KiB per request, QD 1", size / 1024),
        unit: "MiB/s",
        ringvm: mib(bytes, elapsed),
        host: mib(host_bytes, host_elapsed),
        vmm_us_per_request: vmm_us,
    })
}

/// A lookup and stat of one name, as a 9P client does it (Twalk, Tgetattr,
/// Tclunk) against `statx` on the host.
fn stat_point(c: &mut Client, dir: &Path, files: usize, secs: f64) -> Res<Row> {
    let names: Vec<String> = (0..files).map(|i| format!("f{i:05}")).collect();
    let requests0 = c.requests;
    let cpu0 = c.vmm_cpu_ns()?;
    let (start, mut ops) = (Instant::now(), 0u64);
    while start.elapsed().as_secs_f64() < secs {
        let name = &names[(ops as usize) % files];
        c.walk(20, name.as_bytes())?;
        let mut b = 20u32.to_le_bytes().to_vec();
        b.extend(0x7ffu64.to_le_bytes());
        c.call(&t(TGETATTR, 6, &b), 0)?;
        c.call(&t(TCLUNK, 7, &20u32.to_le_bytes()), 0)?;
        ops += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let reqs = (c.requests - requests0).max(1);
    let vmm_us = (c.vmm_cpu_ns()? - cpu0) as f64 / 1000.0 / reqs as f64;
    let d = std::fs::File::open(dir.join("meta")).map_err(|e| e.to_string())?;
    let cnames: Vec<std::ffi::CString> = names
        .iter()
        .map(|n| std::ffi::CString::new(n.as_str()).unwrap_or_default())
        .collect();
    let (start, mut host_ops) = (Instant::now(), 0u64);
    while start.elapsed().as_secs_f64() < secs {
        // SAFETY: statx is plain data; zeroes are valid.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        let name = &cnames[(host_ops as usize) % files];
        // SAFETY: a NUL-terminated name, our directory fd, a valid buffer.
        let r = unsafe {
            libc::statx(
                d.as_raw_fd(),
                name.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                libc::STATX_BASIC_STATS,
                &mut st,
            )
        };
        if r < 0 {
            return Err(format!("statx: {}", std::io::Error::last_os_error()));
        }
        host_ops += 1;
    }
    let host_elapsed = start.elapsed().as_secs_f64();
    Ok(Row {
        what: format!("lookup + stat of one of {files} names (Twalk, Tgetattr, Tclunk vs statx)"),
        unit: "ops/s",
        ringvm: ops as f64 / elapsed,
        host: host_ops as f64 / host_elapsed,
        vmm_us_per_request: vmm_us,
    })
}

fn prepare(dir: &Path, file_mib: u64, files: usize) -> Res<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("meta")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let chunk = ringvm_tests::pattern(7, 1 << 20);
    let mut f = std::fs::File::create(dir.join("data")).map_err(|e| e.to_string())?;
    for _ in 0..file_mib {
        std::io::Write::write_all(&mut f, &chunk).map_err(|e| e.to_string())?;
    }
    for i in 0..files {
        std::fs::write(dir.join(format!("meta/f{i:05}")), b"x").map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Seconds from spawning `ringvm ARGS` to its first stdout line, and its
/// exit code.
fn first_line(args: &[String]) -> Res<(f64, Option<i32>, String)> {
    let start = Instant::now();
    let mut child = Command::new(ringvm_tests::ringvm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start ringvm: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let secs = start.elapsed().as_secs_f64();
    let status = child.wait().map_err(|e| e.to_string())?;
    Ok((secs, status.code(), line.trim_end().to_string()))
}

fn boots(args: &Args) -> Vec<Value> {
    let kernel = ringvm_tests::guest_dir().join("vmlinux");
    let root = ringvm_tests::workspace_root().join("target/runner-root");
    let mut out = Vec::new();
    if args.no_boot {
        return out;
    }
    if !ringvm_tests::kvm_available("bench-p9 time to first output") {
        out.push(json!({"skipped": "/dev/kvm is not usable"}));
        return out;
    }
    let k = kernel.to_string_lossy().into_owned();
    let cases = [
        (
            "busybox root (--root-share target/runner-root), `echo`",
            vec![
                "--kernel".into(),
                k.clone(),
                "--root-share".into(),
                root.to_string_lossy().into_owned(),
                "--".into(),
                "echo".into(),
                "first line".into(),
            ],
        ),
        (
            "the host's root, `/bin/echo`",
            vec![
                "--kernel".into(),
                k,
                "--".into(),
                "/bin/echo".into(),
                "first line".into(),
            ],
        ),
    ];
    for (name, a) in cases {
        match first_line(&a) {
            Ok((secs, code, line)) => out.push(json!({
                "case": name, "seconds": secs, "exit": code, "line": line,
            })),
            Err(e) => out.push(json!({"case": name, "error": e})),
        }
    }
    out
}

fn run(args: &Args) -> Res<()> {
    let dir = args
        .dir
        .join(format!("ringvm-bench-p9-{}", std::process::id()));
    prepare(&dir, args.file_mib, args.files)?;
    let outcome = (|| {
        let mut c = Client::new(&dir)?;
        c.handshake()?;
        let mut rows = Vec::new();
        for size in [4096u32, 128 << 10, MSIZE - 24] {
            rows.push(read_point(&mut c, &dir.join("data"), size, args.seconds)?);
        }
        let mut sub = Client::new(&dir.join("meta"))?;
        c.stop()?;
        sub.handshake()?;
        // The lookups run in the directory of names (attached at it).
        let row = stat_point(&mut sub, &dir, args.files, args.seconds)?;
        sub.stop()?;
        rows.push(row);
        Ok::<_, String>(rows)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let rows = outcome?;
    let boot = boots(args);
    let mut md = String::from("# virtio-9p: ringvm's share against the host's own calls\n\n");
    let _ = writeln!(
        md,
        "| operation | ringvm | host | ringvm / host | VMM thread CPU per 9P request |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {:.0} {} | {:.0} {} | {:.2} | {:.1} µs |",
            r.what,
            r.ringvm,
            r.unit,
            r.host,
            r.unit,
            r.ringvm / r.host.max(f64::MIN_POSITIVE),
            r.vmm_us_per_request
        );
    }
    let _ = writeln!(
        md,
        "\n## Time from `ringvm` to the command's first output line\n"
    );
    for b in &boot {
        let line = match (
            b.get("case"),
            b.get("seconds"),
            b.get("skipped"),
            b.get("error"),
        ) {
            (Some(c), Some(secs), _, _) => format!(
                "{}: {:.1} s (exit {}, printed {})",
                c.as_str().unwrap_or_default(),
                secs.as_f64().unwrap_or_default(),
                b.get("exit").map(Value::to_string).unwrap_or_default(),
                b.get("line").map(Value::to_string).unwrap_or_default()
            ),
            (_, _, Some(why), _) => format!("skipped: {}", why.as_str().unwrap_or_default()),
            (Some(c), _, _, Some(e)) => format!(
                "{}: failed: {}",
                c.as_str().unwrap_or_default(),
                e.as_str().unwrap_or_default()
            ),
            _ => b.to_string(),
        };
        let _ = writeln!(md, "- {line}");
    }
    if boot.is_empty() {
        let _ = writeln!(md, "- not run (--no-boot)");
    }
    report::notes_markdown(
        &mut md,
        &[
            "The ringvm column is one request in flight, as Linux's 9P client issues them for one reader: every figure includes a doorbell write, a ring turn, the device's work, an io_uring op or syscall, and an interrupt the driver sleeps on. The host column is the bare call, in this process, with no guest and no transport.",
            "A lookup + stat is three 9P requests (Twalk, Tgetattr, Tclunk) against one statx: the server resolves the name with openat2 (O_PATH, RESOLVE_BENEATH), stats it and closes it.",
            "Under PVM-native KVM a booted guest runs every instruction in KVM's emulator: the boot times are dominated by the kernel's own start-up and say little about the device.",
        ],
        &[
            "The shared directory is in --dir (tmpfs by default), read-only; the file and the names are made fresh for the run.",
            "Reads cycle through the file at the request size; lookups cycle through the names.",
        ],
        "QEMU's 9p server cannot be run side by side here (this host's KVM emulates guests), and no figure is invented for it.",
    );
    let report_json = json!({
        "rows": rows.iter().map(|r| json!({
            "operation": r.what, "unit": r.unit, "ringvm": r.ringvm, "host": r.host,
            "ratio": r.ringvm / r.host.max(f64::MIN_POSITIVE),
            "vmm_cpu_us_per_request": r.vmm_us_per_request,
        })).collect::<Vec<_>>(),
        "time_to_first_output": boot,
        "seconds_per_point": args.seconds,
    });
    let out = report::out_dir(args.out.as_deref())?;
    report::write(&out, "p9", "bench-p9", &md, &report_json)
}

fn main() -> ExitCode {
    let args = Args::parse();
    report::exit("bench-p9", run(&args))
}
