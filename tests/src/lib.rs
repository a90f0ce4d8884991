//! Helpers for the integration tests: find the `ringvm` binary and the test
//! guest, run a VM with a deadline, and capture what it printed.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod bench;
pub mod command;

/// The workspace root (this crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The `ringvm` binary under test: `$RINGVM_BIN`, else the release build.
pub fn ringvm_bin() -> PathBuf {
    std::env::var_os("RINGVM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/ringvm"))
}

/// Where `make guest` put the test guest: `$RINGVM_GUEST_DIR`, else
/// `target/guest`.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("RINGVM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/guest"))
}

/// Whether KVM tests can run here. When they cannot, the reason is printed
/// so the run says the test was skipped rather than passing quietly.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED {test}: /dev/kvm is not usable ({e})");
            false
        }
    }
}

/// What a finished VM left behind.
#[derive(Debug)]
pub struct VmRun {
    /// Exit code; `None` if it was killed at the deadline or by a signal.
    pub code: Option<i32>,
    /// The guest console.
    pub stdout: String,
    /// ringvm's own log.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
    /// True when the deadline killed it.
    pub timed_out: bool,
}

impl VmRun {
    /// Both streams, for assertion messages.
    pub fn transcript(&self) -> String {
        format!(
            "exit={:?} timed_out={} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.timed_out, self.elapsed, self.stdout, self.stderr
        )
    }
}

fn drain<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `ringvm ARGS` with stdin closed, killing it after `deadline`.
pub fn run_ringvm(args: &[&str], deadline: Duration) -> VmRun {
    run_ringvm_until(args, None, deadline)
}

/// Like [`run_ringvm`], but sends SIGKILL the moment the guest console
/// prints a line containing `kill_at` (if given): the way to prove that
/// what the guest was told is durable survives a crash of the VMM.
pub fn run_ringvm_until(args: &[&str], kill_at: Option<&str>, deadline: Duration) -> VmRun {
    run_ringvm_signal_at(args, kill_at, libc::SIGKILL, deadline)
}

/// Runs ringvm and sends `signal` when the console prints `marker`.
pub fn run_ringvm_signal_at(
    args: &[&str],
    marker: Option<&str>,
    signal: i32,
    deadline: Duration,
) -> VmRun {
    run_binary(&ringvm_bin(), args, marker, signal, deadline)
}

/// Runs `bin` (a ringvm build) with stdin closed; sends `signal` when the
/// console prints `marker`, and kills it after `deadline`.
pub fn run_binary(
    bin: &Path,
    args: &[&str],
    marker: Option<&str>,
    signal: i32,
    deadline: Duration,
) -> VmRun {
    let kill_at = marker;
    let start = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<()>();
    let marker = kill_at.map(str::to_string);
    let stdout = child.stdout.take().expect("piped stdout");
    let out = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut text = String::new();
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let l = String::from_utf8_lossy(&line).into_owned();
            if marker.as_deref().is_some_and(|m| l.contains(m)) {
                let _ = seen_tx.send(());
            }
            text.push_str(&l);
            line.clear();
        }
        text
    });
    let err = drain(child.stderr.take().expect("piped stderr"));
    let mut timed_out = false;
    let status = loop {
        if seen_rx.try_recv().is_ok() {
            // SAFETY: kill(2) on our own child's pid; no memory involved.
            unsafe { libc::kill(child.id() as i32, signal) };
            break child.wait().expect("wait on signalled ringvm");
        }
        if let Some(status) = child.try_wait().expect("wait on ringvm") {
            break status;
        }
        if start.elapsed() > deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait on killed ringvm");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    VmRun {
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
        timed_out,
    }
}

/// A scratch directory for one test, removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    /// Its path.
    pub path: PathBuf,
}

impl Scratch {
    /// Makes `$TMPDIR/ringvm-<name>-<pid>`, empty.
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ringvm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Self { path }
    }

    /// A path inside the directory, as a string for the command line.
    pub fn file(&self, name: &str) -> String {
        self.path.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `len` bytes of a repeatable pseudo-random pattern: a misplaced or
/// stale sector cannot match it by accident.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes a shell script for the test guest's `guest.script=/dev/vdX`
/// drive, padded to a whole number of sectors (the guest reads the raw
/// device; the script ends with `exit` so the padding is never read).
pub fn script_image(path: &str, script: &str) {
    let mut bytes = format!("{script}\nexit 0\n").into_bytes();
    bytes.resize(bytes.len().div_ceil(4096) * 4096, b'\n');
    std::fs::write(path, bytes).expect("write script image");
}

/// Values the guest printed as `T: key=value` lines.
pub fn guest_value<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("T: {key}=");
    console
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix.as_str()))
}

/// A newc cpio archive holding one regular file: the smallest initramfs
/// that makes the kernel run its initramfs unpacking path.
pub fn tiny_initramfs(name: &str, contents: &[u8]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    entry(&mut out, 1, 0o100644, name, contents);
    entry(&mut out, 0, 0, "TRAILER!!!", &[]);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// A program running under a test, its stdout (the guest console) read
/// line by line as it comes, so the test can act on what the guest printed
/// while the program keeps running (ping a guest once its network is up,
/// then stop it). Dropping it kills the program if it is still running.
#[derive(Debug)]
pub struct Running {
    child: std::process::Child,
    start: Instant,
    console: std::sync::Arc<std::sync::Mutex<String>>,
    out: Option<std::thread::JoinHandle<()>>,
    err: Option<std::thread::JoinHandle<String>>,
}

impl Running {
    /// Starts `program ARGS` with stdin closed and both streams captured.
    pub fn spawn(program: &Path, args: &[&str]) -> Self {
        let start = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let console = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = console.clone();
        let stdout = child.stdout.take().expect("piped stdout");
        let out = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                let l = String::from_utf8_lossy(&line);
                if let Ok(mut c) = sink.lock() {
                    c.push_str(&l);
                }
                line.clear();
            }
        });
        let err = drain(child.stderr.take().expect("piped stderr"));
        Self {
            child,
            start,
            console,
            out: Some(out),
            err: Some(err),
        }
    }

    /// What the program printed on stdout so far.
    pub fn console(&self) -> String {
        self.console.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// The program's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Whether the program is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until stdout holds `needle`: true when it does; false when
    /// the program exited without printing it or `timeout` passed.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut scanned: usize = 0;
        loop {
            let exited = !self.is_running();
            if let Ok(c) = self.console.lock() {
                // Only the new part (and a needle's length before it).
                let mut from = scanned.saturating_sub(needle.len());
                while !c.is_char_boundary(from) {
                    from -= 1;
                }
                if c[from..].contains(needle) {
                    return true;
                }
                scanned = c.len();
            }
            if exited {
                // The reader may still be catching up with the last lines.
                if let Some(out) = self.out.take() {
                    let _ = out.join();
                    return self.console().contains(needle);
                }
                return false;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the program (nothing if it already ended).
    pub fn signal(&mut self, signal: i32) {
        if self.is_running() {
            // SAFETY: kill(2) on our own, not yet reaped, child's pid.
            unsafe { libc::kill(self.child.id() as i32, signal) };
        }
    }

    /// Waits for the program to end, killing it when `deadline` (counted
    /// from the start) passes, and returns what it left behind.
    pub fn finish(mut self, deadline: Duration) -> VmRun {
        let mut timed_out = false;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait on child") {
                break status;
            }
            if self.start.elapsed() > deadline {
                timed_out = true;
                let _ = self.child.kill();
                break self.child.wait().expect("wait on killed child");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if let Some(out) = self.out.take() {
            let _ = out.join();
        }
        let stderr = self
            .err
            .take()
            .map(|e| e.join().unwrap_or_default())
            .unwrap_or_default();
        VmRun {
            code: status.code(),
            stdout: self.console(),
            stderr,
            elapsed: self.start.elapsed(),
            timed_out,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `program ARGS` (e.g. `ip netns exec NS ringvm ...`) with stdin
/// closed; sends `signal` when stdout prints `marker` (if given), and kills
/// it after `deadline`: [`run_binary`] for any program.
pub fn run_command_until(
    program: &Path,
    args: &[&str],
    marker: Option<&str>,
    signal: i32,
    deadline: Duration,
) -> VmRun {
    let mut running = Running::spawn(program, args);
    if let Some(m) = marker {
        if running.wait_for(m, deadline.saturating_sub(running.elapsed())) {
            running.signal(signal);
        }
    }
    running.finish(deadline)
}

/// Whether network tests can run here (root, iproute2, /dev/net/tun);
/// when not, says why so the test is reported as skipped.
pub fn net_available(test: &str) -> bool {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {test}: needs root (network namespaces and taps)");
        return false;
    }
    let ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !ip.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED {test}: `ip` (iproute2) is not available");
        return false;
    }
    if !Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED {test}: /dev/net/tun is missing");
        return false;
    }
    true
}

/// The host-side pinger: iproute2 hosts often lack `ping`, Debian's
/// busybox-static has one.
pub fn pinger() -> Option<Vec<&'static str>> {
    let works = |prog: &str, args: &[&str]| {
        Command::new(prog)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works("ping", &["-V"]) {
        return Some(vec!["ping"]);
    }
    let applets = Command::new("busybox").arg("--list").output().ok()?;
    String::from_utf8_lossy(&applets.stdout)
        .lines()
        .any(|l| l == "ping")
        .then(|| vec!["busybox", "ping"])
}

/// Exit status and output of a finished command, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "status={:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A network namespace of our own, deleted on drop (with everything in
/// it, the tap included, once no process holds it).
pub struct NetNs {
    /// Its name under /run/netns.
    pub name: String,
}

impl NetNs {
    /// Makes `ringvm-<test>-<pid>`.
    pub fn new(test: &str) -> Self {
        let name = format!("ringvm-{test}-{}", std::process::id());
        // A leftover from a crashed run with the same pid.
        let _ = Command::new("ip")
            .args(["netns", "delete", &name])
            .stderr(Stdio::null())
            .status();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(out.status.success(), "ip netns add {name}: {}", text(&out));
        Self { name }
    }

    /// Runs `program ARGS` inside the namespace and waits for it.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {args:?}: {e}", self.name))
    }

    /// Like [`NetNs::exec`], and the command must succeed.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in {}: {args:?} failed: {}",
            self.name,
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates tap `dev`, brings it up and gives it `cidr`.
    pub fn add_tap(&self, dev: &str, cidr: &str) {
        self.run(&["ip", "tuntap", "add", "dev", dev, "mode", "tap"]);
        self.run(&["ip", "link", "set", dev, "up"]);
        self.run(&["ip", "addr", "add", cidr, "dev", dev]);
    }

    /// The arguments that run ringvm inside the namespace, for `ip`.
    pub fn ringvm_args<'a>(&'a self, bin: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["netns", "exec", self.name.as_str(), bin];
        v.extend_from_slice(args);
        v
    }

    /// Runs `f` on a thread that entered the namespace: sockets it
    /// creates live in the namespace (and stay there when handed out).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        std::thread::spawn(move || {
            // SAFETY: setns(2) on a namespace fd we hold open; it changes
            // this thread's network namespace only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in the namespace")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("warning: ip netns delete {}: {}", self.name, text(&o)),
            Err(e) => eprintln!("warning: ip netns delete {}: {e}", self.name),
        }
    }
}
