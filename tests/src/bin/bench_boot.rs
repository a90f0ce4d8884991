//! `make bench-boot`: what ringvm itself costs to start and run a guest,
//! against QEMU's microvm machine on the same kernel, command line and
//! root image, side by side in one run.
//!
//! Guest code runs in KVM's instruction emulator on this project's hosts
//! (PVM-native KVM), so only what the VMM does is compared:
//!
//! - **start → first KVM_RUN**: from just before the process is started to
//!   its first `KVM_RUN` ioctl (the guest's first instruction can run), as
//!   seen by an `LD_PRELOAD` probe wrapping glibc's `ioctl` in both VMMs
//!   (`tests/probe/first_kvm_run.c`);
//! - **start → API socket answers**: ringvm's `--api-sock` answering
//!   `GET /`, QEMU's `-qmp` socket sending its greeting;
//! - **memory with the guest booted minus guest RAM**: RSS, PSS and USS
//!   from /proc/PID/smaps, without the guest-RAM mapping, when the guest's
//!   init prints its first line;
//! - **VMM CPU over a boot**: CPU time of every thread but the vCPUs, from
//!   the start to that same line.
//!
//! The first two are cheap: `--rounds` startups alternate ringvm and QEMU,
//! each stopped once both figures are in. The last two need a booted guest
//! (a minute or more in the emulator), so there are `--boot-rounds` of
//! them (default 1), again ringvm and QEMU in turn. (Booting both at once
//! was tried: on this loaded 2-CPU host both guests then stalled in the
//! same place of the kernel's boot for 10 minutes.)

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use ringvm_tests::bench::host::{HostInfo, Own};
use ringvm_tests::bench::interleave::{interleave, Round};
use ringvm_tests::bench::points::{Better, Point, PointRound, Target};
use ringvm_tests::bench::procfs::{read_cpu, read_memory, MemKib, Memory};
use ringvm_tests::bench::report;
use ringvm_tests::bench::stats::median;
use ringvm_tests::bench::summary::summary_json;
use ringvm_tests::bench::Res;
use serde_json::{json, Value};
use vmm::arch::x86_64::cpuid::CpuTemplate;
use vmm::kvm::vm::host_is_pvm_native;

#[derive(Parser, Debug)]
#[command(about = "ringvm vs QEMU microvm: startup, API socket, VMM memory and CPU over a boot")]
struct Args {
    /// Startup rounds (ringvm and QEMU each started once per round, the
    /// order alternating): start → first KVM_RUN and → API socket.
    #[arg(long, default_value_t = 8)]
    rounds: u32,
    /// Boot rounds (ringvm and QEMU each boot the guest to init, in turn):
    /// memory and VMM CPU. Each boot takes a minute or more here.
    #[arg(long, default_value_t = 1)]
    boot_rounds: u32,
    /// Give up on a boot after this many seconds.
    #[arg(long, default_value_t = 600)]
    boot_timeout: u64,
    /// The guest (vmlinux, rootfs.ext4) from `make guest`.
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// The ringvm binary (default: target/release/ringvm).
    #[arg(long)]
    ringvm: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Guest RAM in MiB (both).
    #[arg(long, default_value_t = 128)]
    mem: u64,
    /// Kernel command line given to both (each VMM adds its devices'
    /// virtio_mmio.device words; on PVM-native KVM ringvm adds its
    /// emulator-safe words, and they are given to QEMU too).
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    cmdline: String,
    /// Where boot.json and boot.md go (default: <workspace>/target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// What `/init` of the test guest prints first: the guest has booted.
const BOOTED: &str = "GUEST: init start";

/// CPU flags QEMU must hide on PVM-native KVM: what ringvm's pvm-safe
/// template hides from CPUID (see vmm/src/arch/x86_64/cpuid.rs), by QEMU's
/// names, KVM's paravirt features that need `vmcall` included.
const QEMU_PVM_SAFE_FLAGS: &[&str] = &[
    "xsave",
    "cx16",
    "popcnt",
    "smap",
    "smep",
    "fsgsbase",
    "pcid",
    "invpcid",
    "rdrand",
    "rdseed",
    "rdpid",
    "pku",
    "umip",
    "avx",
    "avx2",
    "avx512f",
    "movbe",
    "kvm-pv-unhalt",
    "kvm-pv-ipi",
    "kvm-pv-sched-yield",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Ringvm,
    Qemu,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Ringvm => "ringvm",
            Side::Qemu => "QEMU microvm",
        }
    }

    /// Whether a thread of this VMM is a vCPU, by its name (QEMU names
    /// them with `-name ...,debug-threads=on`).
    fn is_vcpu(self, thread: &str) -> bool {
        match self {
            Side::Ringvm => thread.starts_with("vcpu"),
            Side::Qemu => thread.starts_with("CPU ") && thread.ends_with("/KVM"),
        }
    }
}

/// Everything both VMMs are started with.
struct Setup {
    ringvm: PathBuf,
    qemu: PathBuf,
    kernel: PathBuf,
    rootfs: PathBuf,
    probe: PathBuf,
    scratch: PathBuf,
    mem: u64,
    cmdline: String,
    /// Words ringvm adds on this host, given to QEMU as well.
    pvm_words: Option<&'static str>,
}

impl Setup {
    /// The command that starts `side` with its own copy of the root image,
    /// API socket `sock` and first-KVM_RUN file `stamp`.
    fn command(&self, side: Side, root: &Path, sock: &Path, stamp: &Path) -> Command {
        let mut cmd = match side {
            Side::Ringvm => {
                let mut c = Command::new(&self.ringvm);
                c.arg("--kernel")
                    .arg(&self.kernel)
                    .args(["--mem", &self.mem.to_string(), "--cpus", "1"])
                    .arg("--disk")
                    .arg(format!("path={},root", root.display()))
                    .args(["--cmdline", &self.cmdline])
                    .arg("--api-sock")
                    .arg(sock);
                c
            }
            Side::Qemu => {
                let mut cpu = String::from("host");
                if self.pvm_words.is_some() {
                    for f in QEMU_PVM_SAFE_FLAGS {
                        cpu.push_str(",-");
                        cpu.push_str(f);
                    }
                }
                let mut append = format!("{} root=/dev/vda rw", self.cmdline);
                if let Some(w) = self.pvm_words {
                    append.push(' ');
                    append.push_str(w);
                }
                let mut c = Command::new(&self.qemu);
                c.args(["-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", &cpu])
                    .args(["-m", &self.mem.to_string(), "-smp", "1"])
                    .args(["-nodefaults", "-no-user-config", "-display", "none"])
                    .args(["-serial", "stdio", "-name", "bench,debug-threads=on"])
                    .arg("-kernel")
                    .arg(&self.kernel)
                    .args(["-append", &append])
                    .arg("-drive")
                    .arg(format!(
                        "id=root,file={},format=raw,if=none",
                        root.display()
                    ))
                    .args(["-device", "virtio-blk-device,drive=root"])
                    .arg("-qmp")
                    .arg(format!("unix:{},server=on,wait=off", sock.display()));
                c
            }
        };
        cmd.env("LD_PRELOAD", &self.probe)
            .env("RINGVM_BENCH_FIRST_KVM_RUN", stamp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

/// CLOCK_MONOTONIC now, in seconds: the clock the probe stamps with.
fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// One started VMM: the process, when it started, and its files.
struct Started {
    side: Side,
    child: Child,
    t0: f64,
    sock: PathBuf,
    stamp: PathBuf,
    root: PathBuf,
    /// The console's lines arrive here with their CLOCK_MONOTONIC time.
    console: mpsc::Receiver<(f64, String)>,
    /// Its stderr, collected until it exits.
    stderr: std::thread::JoinHandle<String>,
    /// Console lines seen so far (kept for error messages).
    seen: Vec<String>,
}

fn start(setup: &Setup, side: Side, tag: &str) -> Res<Started> {
    let base = setup.scratch.join(format!("{}-{tag}", side_slug(side)));
    let (root, sock, stamp) = (
        base.with_extension("ext4"),
        base.with_extension("sock"),
        base.with_extension("kvmrun"),
    );
    std::fs::copy(&setup.rootfs, &root)
        .map_err(|e| format!("cannot copy the root image to {}: {e}", root.display()))?;
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&stamp);
    let mut cmd = setup.command(side, &root, &sock, &stamp);
    let t0 = monotonic();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", side.name()))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut stderr_pipe = child.stderr.take().ok_or("no stderr pipe")?;
    let (tx, console) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = Vec::new();
        while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if tx.send((monotonic(), text)).is_err() {
                break;
            }
            line.clear();
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });
    Ok(Started {
        side,
        child,
        t0,
        sock,
        stamp,
        root,
        console,
        stderr,
        seen: Vec::new(),
    })
}

fn side_slug(side: Side) -> &'static str {
    match side {
        Side::Ringvm => "ringvm",
        Side::Qemu => "qemu",
    }
}

impl Started {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Seconds from the start to the first KVM_RUN, once the probe wrote it.
    fn first_kvm_run(&self) -> Option<f64> {
        let text = std::fs::read_to_string(&self.stamp).ok()?;
        let t: f64 = text.trim().parse().ok()?;
        Some(t - self.t0)
    }

    /// One attempt at the API socket: connected and answered.
    fn api_answers(&self) -> bool {
        let Ok(mut s) = UnixStream::connect(&self.sock) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = [0u8; 256];
        match self.side {
            Side::Ringvm => {
                if s.write_all(
                    b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n",
                )
                .is_err()
                {
                    return false;
                }
                matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"HTTP/1.1 200"))
            }
            Side::Qemu => {
                matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"{\"QMP\""))
            }
        }
    }

    /// Whether the process has exited (an error with its stderr if so).
    fn check_alive(&mut self) -> Res<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited ({status}) before the measurement; last console lines: {:?}",
                self.side.name(),
                self.seen.iter().rev().take(5).rev().collect::<Vec<_>>()
            )),
            Err(e) => Err(format!("wait on {}: {e}", self.side.name())),
        }
    }

    /// Takes console lines until one holds `needle`: its time, if it came.
    fn poll_console(&mut self, needle: &str) -> Option<f64> {
        while let Ok((t, line)) = self.console.try_recv() {
            let hit = line.contains(needle);
            self.seen.push(line);
            if self.seen.len() > 200 {
                self.seen.remove(0);
            }
            if hit {
                return Some(t);
            }
        }
        None
    }

    /// Kills the VMM, reaps it and removes its files; returns its stderr.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.root);
        let _ = std::fs::remove_file(&self.sock);
        let _ = std::fs::remove_file(&self.stamp);
        self.stderr.join().unwrap_or_default()
    }
}

/// One startup: seconds to the first KVM_RUN and to the API answering.
#[derive(Clone, Copy, Debug)]
struct Startup {
    first_kvm_run_s: f64,
    api_ready_s: f64,
}

fn startup(setup: &Setup, side: Side, round: u32) -> Res<Startup> {
    let mut vm = start(setup, side, &format!("s{round}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut api = None;
    let outcome = loop {
        if api.is_none() && vm.api_answers() {
            api = Some(monotonic() - vm.t0);
        }
        if let (Some(api_ready_s), Some(first_kvm_run_s)) = (api, vm.first_kvm_run()) {
            break Ok(Startup {
                first_kvm_run_s,
                api_ready_s,
            });
        }
        if let Err(e) = vm.check_alive() {
            break Err(e);
        }
        if Instant::now() > deadline {
            break Err(format!(
                "{}: no first KVM_RUN or API answer within 30 s",
                side.name()
            ));
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    let stderr = vm.stop();
    outcome.map_err(|e| format!("{e}\n{stderr}"))
}

/// One boot to init: the VMM's memory without guest RAM and its own CPU.
#[derive(Clone, Debug)]
struct Boot {
    booted_s: f64,
    memory: Memory,
    /// Of the USS, what sits in file mappings (the executable, libraries):
    /// pages of files only this process maps, shared as soon as a second
    /// process maps the same file.
    uss_file_kib: u64,
    vmm_cpu_s: f64,
    vcpu_cpu_s: f64,
    threads: Vec<(String, f64)>,
}

/// Boots `side` to the guest's init and measures it when its guest
/// prints [`BOOTED`].
fn boot_one(setup: &Setup, side: Side, round: u32, timeout: Duration) -> Res<Boot> {
    let mut vm = start(setup, side, &format!("b{round}"))?;
    let deadline = Instant::now() + timeout;
    let outcome = loop {
        if let Some(t) = vm.poll_console(BOOTED) {
            break measure_booted(setup, &vm, t);
        }
        if let Err(e) = vm.check_alive() {
            break Err(e);
        }
        if Instant::now() > deadline {
            break Err(format!(
                "{}: no '{BOOTED}' within {} s (last console lines: {:?})",
                side.name(),
                timeout.as_secs(),
                vm.seen.iter().rev().take(3).rev().collect::<Vec<_>>()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = vm.stop();
    outcome.map_err(|e| format!("{e}\n{} stderr: {stderr}", side.name()))
}

fn measure_booted(setup: &Setup, vm: &Started, at: f64) -> Res<Boot> {
    let memory = read_memory(vm.pid(), setup.mem * 1024)?;
    if memory.guest_ram_mappings != 1 {
        return Err(format!(
            "{}: found {} mappings the size of guest RAM, expected 1",
            vm.side.name(),
            memory.guest_ram_mappings
        ));
    }
    let uss_file_kib = file_uss_kib(vm.pid())?;
    let cpu = read_cpu(vm.pid())?;
    let side = vm.side;
    Ok(Boot {
        booted_s: at - vm.t0,
        memory,
        uss_file_kib,
        vmm_cpu_s: cpu.non_vcpu_ns(|n| side.is_vcpu(n)) as f64 / 1e9,
        vcpu_cpu_s: cpu.vcpu_ns(|n| side.is_vcpu(n)) as f64 / 1e9,
        threads: cpu
            .threads
            .iter()
            .map(|t| (t.name.clone(), t.cpu_ns as f64 / 1e9))
            .collect(),
    })
}

/// Private_Clean + Private_Dirty of `pid`'s mappings of files (path
/// starting with `/`, but not memfd or /dev, which hold anonymous memory),
/// KiB.
fn file_uss_kib(pid: u32) -> Res<u64> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut in_file = false;
    let mut kib = 0;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range perms offset dev inode [path].
            let name = f.nth(4).unwrap_or("");
            in_file =
                name.starts_with('/') && !name.starts_with("/dev/") && !name.starts_with("/memfd:");
            continue;
        }
        if in_file && (first == "Private_Clean:" || first == "Private_Dirty:") {
            kib += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Ok(kib)
}

/// Builds the LD_PRELOAD probe into `dir`.
fn build_probe(dir: &Path) -> Res<PathBuf> {
    let src = ringvm_tests::workspace_root().join("tests/probe/first_kvm_run.c");
    let out = dir.join("first_kvm_run.so");
    let o = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .output()
        .map_err(|e| format!("cannot run cc (build-essential): {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "cc {} failed: {}",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Report.

/// The targets: each figure at most half of QEMU's.
const HALF_OF_QEMU: f64 = 0.5;
/// Firecracker's private memory per VM quoted by issue 14, KiB.
const FIRECRACKER_USS_KIB: f64 = 2048.0;

fn target(ratio: f64, source: &str) -> Option<Target> {
    Some(Target {
        ratio,
        source: source.into(),
    })
}

fn point(
    key: &str,
    unit: &str,
    reference: &str,
    rounds: Vec<PointRound>,
    target: Option<Target>,
    note: Option<String>,
) -> Point {
    Point {
        bench: "boot".into(),
        key: key.into(),
        unit: unit.into(),
        reference: reference.into(),
        better: Better::Lower,
        rounds,
        target,
        note,
    }
}

fn points(starts: &[Round<Startup, Startup>], boots: &[Round<Boot, Boot>]) -> Vec<Point> {
    let pr = |a: f64, b: f64, others: f64| PointRound {
        ringvm: a,
        reference: b,
        others_cpus: others,
    };
    let q = Side::Qemu.name();
    let half = || target(HALF_OF_QEMU, "issue 14 (at most half of QEMU's)");
    let mem = |f: fn(&MemKib) -> u64| -> Vec<PointRound> {
        boots
            .iter()
            .map(|r| {
                pr(
                    f(&r.ringvm.memory.vmm()) as f64,
                    f(&r.reference.memory.vmm()) as f64,
                    r.others_cpus,
                )
            })
            .collect()
    };
    let mut v = vec![
        point(
            "start → first KVM_RUN",
            "ms",
            q,
            starts
                .iter()
                .map(|r| {
                    pr(
                        r.ringvm.first_kvm_run_s * 1e3,
                        r.reference.first_kvm_run_s * 1e3,
                        r.others_cpus,
                    )
                })
                .collect(),
            half(),
            None,
        ),
        point(
            "start → API socket answers",
            "ms",
            q,
            starts
                .iter()
                .map(|r| {
                    pr(
                        r.ringvm.api_ready_s * 1e3,
                        r.reference.api_ready_s * 1e3,
                        r.others_cpus,
                    )
                })
                .collect(),
            half(),
            Some("ringvm: GET / answered 200; QEMU: QMP greeting received".into()),
        ),
    ];
    if !boots.is_empty() {
        v.extend([
            point(
                "RSS − guest RAM, booted",
                "KiB",
                q,
                mem(|m| m.rss),
                half(),
                None,
            ),
            point(
                "PSS − guest RAM, booted",
                "KiB",
                q,
                mem(|m| m.pss),
                half(),
                None,
            ),
            point(
                "USS − guest RAM, booted",
                "KiB",
                q,
                mem(|m| m.uss),
                half(),
                None,
            ),
            point(
                "USS − guest RAM, booted: in file mappings",
                "KiB",
                q,
                boots
                    .iter()
                    .map(|r| {
                        pr(
                            r.ringvm.uss_file_kib as f64,
                            r.reference.uss_file_kib as f64,
                            r.others_cpus,
                        )
                    })
                    .collect(),
                None,
                Some("the executable's and libraries' pages no other process maps: shared as soon as a second VM runs the same binary".into()),
            ),
            point(
                "USS − guest RAM, booted: anonymous",
                "KiB",
                q,
                boots
                    .iter()
                    .map(|r| {
                        pr(
                            r.ringvm.memory.vmm().uss.saturating_sub(r.ringvm.uss_file_kib) as f64,
                            r.reference.memory.vmm().uss.saturating_sub(r.reference.uss_file_kib) as f64,
                            r.others_cpus,
                        )
                    })
                    .collect(),
                None,
                Some("heap, stacks, rings, relocated data: private to each VM".into()),
            ),
            point(
                "USS − guest RAM vs Firecracker",
                "KiB",
                "Firecracker's 2 MiB (issue 14)",
                boots
                    .iter()
                    .map(|r| {
                        pr(
                            r.ringvm.memory.vmm().uss as f64,
                            FIRECRACKER_USS_KIB,
                            r.others_cpus,
                        )
                    })
                    .collect(),
                target(1.0, "issue 14 (below Firecracker's 2 MiB)"),
                Some("the reference is the figure the issue quotes, not measured here".into()),
            ),
            point(
                "VMM CPU over a boot (non-vCPU threads)",
                "ms",
                q,
                boots
                    .iter()
                    .map(|r| {
                        pr(
                            r.ringvm.vmm_cpu_s * 1e3,
                            r.reference.vmm_cpu_s * 1e3,
                            r.others_cpus,
                        )
                    })
                    .collect(),
                half(),
                None,
            ),
            point(
                "start → guest init (emulator-bound)",
                "ms",
                q,
                boots
                    .iter()
                    .map(|r| {
                        pr(
                            r.ringvm.booted_s * 1e3,
                            r.reference.booted_s * 1e3,
                            r.others_cpus,
                        )
                    })
                    .collect(),
                None,
                Some("guest time in KVM's instruction emulator: context, not a VMM figure".into()),
            ),
        ]);
    }
    v
}

const METHOD: &[&str] = &[
    "Both VMMs: the same kernel (`make guest`'s vmlinux, PVH entry), the same root image (a fresh copy each start, virtio-blk over virtio-mmio), guest RAM and 1 vCPU, the same command line. ringvm adds `virtio_mmio.device=` and, on PVM-native KVM, its emulator-safe words (which are given to QEMU too, with the matching `-cpu host,-flag...` CPUID masks); QEMU's microvm (acpi=off) adds its own `virtio_mmio.device=`. QEMU: `-M microvm,acpi=off -accel kvm -nodefaults -no-user-config -display none -serial stdio -qmp unix:...`; ringvm: `--kernel --disk path=...,root --api-sock`.",
    "start: CLOCK_MONOTONIC just before the benchmark spawns the process (fork + exec included, as a user sees it).",
    "first KVM_RUN: an LD_PRELOAD probe (tests/probe/first_kvm_run.c, built with cc) wraps glibc's ioctl() in both VMMs and stamps CLOCK_MONOTONIC at the first KVM_RUN: one compare per ioctl, no tracer. For QEMU that is its firmware's (qboot's) first instruction; for ringvm, the kernel's entry.",
    "API socket: polled every 0.5 ms from the benchmark; ready when ringvm answers `GET /` with 200 or QEMU sends its QMP greeting. Startup rounds alternate which VMM starts first; each VMM is killed once both figures are in.",
    "Booted: the guest's /init prints `GUEST: init start`; at that moment /proc/PID/smaps is read (RSS, PSS, USS = Private_Clean + Private_Dirty) and the one anonymous writable mapping the size of guest RAM (+ up to 8 MiB alignment) is subtracted; VMM CPU = CPU time of every thread except the vCPUs (ringvm `vcpuN`, QEMU `CPU N/KVM`; schedstat), plus whatever exited threads used (process utime+stime minus the live threads). Boot rounds boot ringvm and QEMU in turn (the order alternating between rounds), each alone with the machine's other load.",
    "Firecracker (issue 14, v1.16.1 on this machine, ratios ringvm / Firecracker): start → API socket 0.72x, start → first KVM_RUN ≈0.83x, USS idle 0.74x, RSS idle 1.50x (shared glibc), booted RSS − guest RAM 1.26x. Not re-measured here: its build takes ~10 minutes (see /work/shared/peers/README.md); only its 2 MiB private memory per VM is a target row.",
];

/// Changes measured with this benchmark, before → after (medians, min–max;
/// each pair from runs on the same machine within minutes of each other).
const CHANGES: &[&str] = &[
    "API reads answered while the VM is built (vmm/src/api/early.rs, issue 14): start → API socket answers, ringvm 21.2 ms (14.7–33.9) → 2.6 ms (2.4–3.9); ratio to QEMU 0.54x (0.29–1.05) → 0.08x (0.05–0.10) (8 startup rounds each, the machine loaded by other work: QEMU's own figure moved 24–126 ms). start → first KVM_RUN is unchanged: 21.4 → 19.8 ms median. strace of the old start (`strace -f -tt`): the socket was bound 8 ms after exec, but `GET /` waited for the whole VM build on the main thread (KVM_SET_USER_MEMORY_REGION of 128 MiB 12 ms, the 9 MB kernel read into guest memory 17 ms, vCPU setup), then for the run loop's first turn. Cost: a thread that lives as long as the build: anonymous USS booted 228 → 248 KiB (its cached stack, 12 KiB touched, and an 8 KiB malloc arena, as smaps shows at idle).",
    "Tried, not kept: malloc_trim(0) before the run loop (heap 84 → 80 KiB); opt-level \"z\" for clap_builder, seccompiler and serde_json (text 2 905 579 → 2 867 243 bytes): each within the run-to-run spread of the USS.",
    "What bounds USS against Firecracker's 2 MiB: ringvm's own executable. Its file pages that no other process maps count as private: 2164–2380 KiB of the booted USS (2392–2628 KiB) in the runs above, more than 2 MiB by itself and varying with the page cache and with which shared libraries other processes happen to map (the 1.7 MiB .text is almost wholly resident: the kernel maps 64 KiB around each text fault from the page cache), against 228–248 KiB of anonymous memory (heap ~84, main stack ~30, io_uring rings 28, thread stacks, relocated data). A second ringvm VM running the same binary at the same time has a USS of 332 KiB (104 KiB in files + 228 anonymous; smaps 1 s after start, two started together): per-VM private memory with two or more VMs is ~0.3 MiB.",
];

fn settings(args: &Args, setup: &Setup, qemu_version: &str, host: &HostInfo) -> String {
    format!(
        "Kernel {}, {} x {}. {qemu_version}. {} startup rounds (alternating), {} boot round(s) (in turn). Guest: {} MiB, 1 vCPU, command line `{}`{}. Load average at the start: {}.",
        host.kernel,
        host.cpus,
        host.cpu,
        args.rounds,
        args.boot_rounds,
        setup.mem,
        setup.cmdline,
        setup
            .pvm_words
            .map_or(String::new(), |w| format!(" + `{w}` (PVM-native KVM)")),
        host.loadavg
    )
}

fn markdown(points: &[Point], boots: &[Round<Boot, Boot>], settings: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# ringvm vs QEMU microvm: what the VMM itself costs\n\n{settings}\n"
    );
    let _ = writeln!(
        s,
        "| figure | ringvm (median) | QEMU / reference (median) | ratio (median) | min–max | rounds | target |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---|---:|---|");
    for p in points {
        let r = p.ratio();
        let _ = writeln!(
            s,
            "| {} | {:.1} {} | {:.1} {} | {} | {} | {} | {} |",
            p.key,
            p.ringvm().map_or(f64::NAN, |x| x.median),
            p.unit,
            p.reference_spread().map_or(f64::NAN, |x| x.median),
            p.unit,
            r.map_or("-".into(), |r| format!("{:.2}x", r.median)),
            r.map_or("-".into(), |r| format!("{:.2}–{:.2}", r.min, r.max)),
            p.rounds.len(),
            match (&p.target, p.target_met()) {
                (Some(t), Some(true)) => format!("≤{:.2}x: met", t.ratio),
                (Some(t), _) => format!("≤{:.2}x: MISSED", t.ratio),
                (None, _) => "-".into(),
            }
        );
    }
    for (i, r) in boots.iter().enumerate() {
        let _ = writeln!(s, "\n## Boot round {i}: memory and threads\n");
        let _ = writeln!(
            s,
            "| VMM | RSS KiB (all / guest RAM / rest) | PSS KiB (rest) | USS KiB (rest: files + anonymous) | VMM CPU ms | vCPU CPU s | threads (CPU s) |"
        );
        let _ = writeln!(s, "|---|---|---:|---|---:|---:|---|");
        for (side, b) in [(Side::Ringvm, &r.ringvm), (Side::Qemu, &r.reference)] {
            let _ = writeln!(
                s,
                "| {} | {} / {} / {} | {} | {} ({} + {}) | {:.1} | {:.1} | {} |",
                side.name(),
                b.memory.total.rss,
                b.memory.guest_ram.rss,
                b.memory.vmm().rss,
                b.memory.vmm().pss,
                b.memory.vmm().uss,
                b.uss_file_kib,
                b.memory.vmm().uss.saturating_sub(b.uss_file_kib),
                b.vmm_cpu_s * 1e3,
                b.vcpu_cpu_s,
                b.threads
                    .iter()
                    .map(|(n, c)| format!("{n} {c:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let _ = writeln!(s, "\n## Changes (before → after)\n");
    for c in CHANGES {
        let _ = writeln!(s, "- {c}");
    }
    let _ = writeln!(s, "\n## Method\n");
    for m in METHOD {
        let _ = writeln!(s, "- {m}");
    }
    s
}

fn boot_json(b: &Boot) -> Value {
    let m = |k: &MemKib| json!({"rss": k.rss, "pss": k.pss, "uss": k.uss});
    json!({
        "booted_s": b.booted_s,
        "memory_kib": {"total": m(&b.memory.total), "guest_ram": m(&b.memory.guest_ram), "vmm": m(&b.memory.vmm()), "vmm_uss_in_files": b.uss_file_kib},
        "vmm_cpu_s": b.vmm_cpu_s,
        "vcpu_cpu_s": b.vcpu_cpu_s,
        "threads": b.threads.iter().map(|(n, c)| json!({"name": n, "cpu_s": c})).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------

fn qemu_version(qemu: &Path) -> Res<String> {
    let o = Command::new(qemu).arg("--version").output().map_err(|e| {
        format!(
            "{} is not available ({e}); make bench-deps installs qemu-system-x86",
            qemu.display()
        )
    })?;
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap_or("QEMU")
        .trim()
        .to_string())
}

fn run(args: &Args) -> Res<()> {
    if args.rounds == 0 || args.mem == 0 {
        return Err("--rounds and --mem must be > 0".into());
    }
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm is missing: this benchmark starts real VMs".into());
    }
    let root = ringvm_tests::workspace_root();
    let guest = args
        .guest_dir
        .clone()
        .unwrap_or_else(|| root.join("target/guest"));
    let (kernel, rootfs) = (guest.join("vmlinux"), guest.join("rootfs.ext4"));
    for f in [&kernel, &rootfs] {
        if !f.exists() {
            return Err(format!("{} is missing: run `make guest`", f.display()));
        }
    }
    let ringvm = args
        .ringvm
        .clone()
        .unwrap_or_else(|| root.join("target/release/ringvm"));
    if !ringvm.exists() {
        return Err(format!("{} is missing: run `make build`", ringvm.display()));
    }
    let qemu_version = qemu_version(&args.qemu)?;
    let out_dir = report::out_dir(args.out.as_deref())?;
    // Root-image copies and sockets: in memory where there is a tmpfs, so
    // the starts do not wait on the disk.
    let tmp = Some(PathBuf::from("/dev/shm"))
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let scratch = tmp.join(format!("ringvm-bench-boot-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)
        .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
    let outcome = (|| {
        let setup = Setup {
            ringvm,
            qemu: args.qemu.clone(),
            kernel,
            rootfs,
            probe: build_probe(&scratch)?,
            scratch: scratch.clone(),
            mem: args.mem,
            cmdline: args.cmdline.clone(),
            pvm_words: if host_is_pvm_native() {
                CpuTemplate::PvmSafe.kernel_params()
            } else {
                None
            },
        };
        let host = HostInfo::read();
        eprintln!(
            "bench-boot: {} startup rounds, then {} boot round(s) of ringvm and {qemu_version}",
            args.rounds, args.boot_rounds
        );
        let starts = interleave(
            args.rounds,
            Own::ProcessAndChildren,
            |r| startup(&setup, Side::Ringvm, r),
            |r| startup(&setup, Side::Qemu, r),
        )?;
        for (i, r) in starts.iter().enumerate() {
            eprintln!(
                "  startup {i}: first KVM_RUN {:.1} / {:.1} ms, API {:.1} / {:.1} ms (ringvm / QEMU)",
                r.ringvm.first_kvm_run_s * 1e3,
                r.reference.first_kvm_run_s * 1e3,
                r.ringvm.api_ready_s * 1e3,
                r.reference.api_ready_s * 1e3
            );
        }
        eprintln!(
            "bench-boot: {} boot round(s): each VMM boots the guest to init in turn (a minute or more each here)",
            args.boot_rounds
        );
        let timeout = Duration::from_secs(args.boot_timeout);
        let boots = interleave(
            args.boot_rounds,
            Own::ProcessAndChildren,
            |r| boot_one(&setup, Side::Ringvm, r, timeout),
            |r| boot_one(&setup, Side::Qemu, r, timeout),
        )?;
        for (i, r) in boots.iter().enumerate() {
            eprintln!(
                "  boot {i}: init after {:.1} / {:.1} s; USS − guest RAM {} / {} KiB; VMM CPU {:.1} / {:.1} ms (ringvm / QEMU)",
                r.ringvm.booted_s,
                r.reference.booted_s,
                r.ringvm.memory.vmm().uss,
                r.reference.memory.vmm().uss,
                r.ringvm.vmm_cpu_s * 1e3,
                r.reference.vmm_cpu_s * 1e3
            );
        }
        let pts = points(&starts, &boots);
        let settings = settings(args, &setup, &qemu_version, &host);
        let md = markdown(&pts, &boots, &settings);
        let doc = json!({
            "benchmark": "bench-boot",
            "summary": summary_json(
                "VMM costs: ringvm vs QEMU microvm, same kernel and command line",
                &settings,
                &["Firecracker v1.16.1 (issue 14, ratios ringvm / Firecracker): API socket 0.72x, first KVM_RUN ≈0.83x, USS idle 0.74x, booted RSS − guest RAM 1.26x; not re-measured here.".to_string()],
            ),
            "host": host.json(false),
            "qemu": qemu_version,
            "points": pts.iter().map(Point::json).collect::<Vec<_>>(),
            "startups": starts.iter().map(|r| json!({
                "ringvm_first": r.ringvm_first,
                "others_cpus": r.others_cpus,
                "ringvm": {"first_kvm_run_ms": r.ringvm.first_kvm_run_s * 1e3, "api_ready_ms": r.ringvm.api_ready_s * 1e3},
                "qemu": {"first_kvm_run_ms": r.reference.first_kvm_run_s * 1e3, "api_ready_ms": r.reference.api_ready_s * 1e3},
            })).collect::<Vec<_>>(),
            "boots": boots.iter().map(|r| json!({
                "others_cpus": r.others_cpus,
                "ringvm": boot_json(&r.ringvm),
                "qemu": boot_json(&r.reference),
            })).collect::<Vec<_>>(),
            "medians": {
                "ringvm_first_kvm_run_ms": median(&starts.iter().map(|r| r.ringvm.first_kvm_run_s * 1e3).collect::<Vec<_>>()),
                "qemu_first_kvm_run_ms": median(&starts.iter().map(|r| r.reference.first_kvm_run_s * 1e3).collect::<Vec<_>>()),
            },
            "method": METHOD,
            "changes": CHANGES,
        });
        report::write(&out_dir, "boot", "bench-boot", &md, &doc)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    outcome
}

fn main() -> ExitCode {
    let args = Args::parse();
    report::exit("bench-boot", run(&args))
}
