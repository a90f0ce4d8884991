//! Running `ringvm -- COMMAND` from a test: arguments as raw bytes, stdin
//! fed from a buffer, stdout and stderr kept as bytes (the command's
//! output is binary-exact, not console text).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a finished `ringvm -- COMMAND` left behind.
#[derive(Debug)]
pub struct CommandRun {
    /// Exit code; `None` if killed at the deadline.
    pub code: Option<i32>,
    /// ringvm's stdout: the command's stdout.
    pub stdout: Vec<u8>,
    /// ringvm's stderr: the command's stderr (and ringvm's own errors).
    pub stderr: Vec<u8>,
    /// Wall time.
    pub elapsed: Duration,
    /// True when the deadline killed it.
    pub timed_out: bool,
}

impl CommandRun {
    /// A summary for assertion messages (streams cut to 2 KiB each).
    pub fn transcript(&self) -> String {
        let cut = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(2048)]).into_owned();
        format!(
            "exit={:?} timed_out={} after {:?}\n--- stdout ({} bytes) ---\n{}\n--- stderr ({} bytes) ---\n{}",
            self.code,
            self.timed_out,
            self.elapsed,
            self.stdout.len(),
            cut(&self.stdout),
            self.stderr.len(),
            cut(&self.stderr)
        )
    }
}

/// The busybox root the runner tests boot (`make runner-root`):
/// `$RINGVM_RUNNER_ROOT`, else `target/runner-root`.
pub fn runner_root() -> PathBuf {
    let p = std::env::var_os("RINGVM_RUNNER_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::workspace_root().join("target/runner-root"));
    assert!(
        p.join("bin/busybox").exists(),
        "{} missing: run `make runner-root`",
        p.display()
    );
    p
}

/// Runs `bin ARGS` with `stdin` fed and then closed; kills it after
/// `deadline`.
pub fn run_command(bin: &Path, args: &[OsString], stdin: &[u8], deadline: Duration) -> CommandRun {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let mut input = child.stdin.take().expect("piped stdin");
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
        // Dropping `input` closes the pipe: the command sees EOF.
    });
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
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
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = feeder.join();
    CommandRun {
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
        timed_out,
    }
}
