//! Helpers for the integration tests: find the `ringvm` binary and the test
//! guest, run a VM with a deadline, and capture what it printed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let start = Instant::now();
    let mut child = Command::new(ringvm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", ringvm_bin().display()));
    let out = drain(child.stdout.take().expect("piped stdout"));
    let err = drain(child.stderr.take().expect("piped stderr"));
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait on ringvm") {
            break status;
        }
        if start.elapsed() > deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait on killed ringvm");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    VmRun {
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
        timed_out,
    }
}
