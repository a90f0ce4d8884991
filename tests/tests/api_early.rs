//! The API socket of a VM given on the command line answers while the VM
//! is still being built: reads at once, everything that needs the VM once
//! it exists, in the order it came.
//!
//! The build is held deterministically: ringvm's stderr is a pipe the test
//! has filled, so the main thread blocks in the first log line it writes
//! while building (on PVM-native KVM, the CPU-template line Vmm::new logs
//! before it loads the kernel) until the test drains the pipe.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringvm_tests::{guest_dir, kvm_available, ringvm_bin, Scratch};

/// A pipe whose write end is full: the first write to it blocks until the
/// read end is drained.
fn full_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out array of two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 returned two fresh descriptors we now own.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let set_nonblocking = |on: bool| {
        let fd = w.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }, 0);
    };
    set_nonblocking(true);
    let chunk = [b'.'; 4096];
    loop {
        // SAFETY: writes from a valid buffer to a descriptor we own.
        let n = unsafe { libc::write(w.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) };
        if n <= 0 {
            break;
        }
    }
    // The child shares this open file description: it must block, not fail.
    set_nonblocking(false);
    (r, w)
}

fn send(sock: &Path, method: &str, path: &str, body: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    s
}

/// The answer on `s` within `within`: (status, body), or None.
fn answer(s: &mut UnixStream, within: Duration) -> Option<(u16, String)> {
    s.set_read_timeout(Some(within)).ok();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(_) if text.is_empty() => return None,
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&text).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((status, body))
}

/// Names of the process's threads.
fn threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(|e| {
                std::fs::read_to_string(e.ok()?.path().join("comm"))
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_api_answers_reads_while_the_vm_is_built_and_the_rest_once_it_exists() {
    let name = "the_api_answers_reads_while_the_vm_is_built_and_the_rest_once_it_exists";
    if !kvm_available(name) {
        return;
    }
    if !vmm::kvm::vm::host_is_pvm_native() {
        // Elsewhere the build logs nothing at the default level, so there
        // is no write to hold it with.
        eprintln!("SKIPPED {name}: holds the build with the pvm-safe line, which only PVM-native KVM logs");
        return;
    }
    let scratch = Scratch::new("api-early");
    let sock = scratch.path.join("api.sock");
    let rootfs = scratch.file("rootfs.ext4");
    std::fs::copy(guest_dir().join("rootfs.ext4"), &rootfs).expect("copy rootfs");
    let kernel = guest_dir().join("vmlinux");
    let (stderr_r, stderr_w) = full_pipe();
    let mut child = Command::new(ringvm_bin())
        .arg("--kernel")
        .arg(&kernel)
        .arg("--disk")
        .arg(format!("path={rootfs},root"))
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr_w))
        .spawn()
        .expect("start ringvm");
    let pid = child.id();
    let mut drained = None;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "API socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        let get = |path: &str| {
            answer(&mut send(&sock, "GET", path, ""), Duration::from_secs(10))
                .unwrap_or_else(|| panic!("GET {path} not answered while the VM is built"))
        };
        let (code, body) = get("/");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(r#""state":"Running""#), "{body}");
        let (code, body) = get("/vm/config");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(&*kernel.to_string_lossy()), "{body}");
        assert!(body.contains(rootfs.as_str()), "{body}");
        let (code, body) = get("/machine-config");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(r#""mem_size_mib":128"#), "{body}");
        // Still being built: no vCPU thread yet.
        let names = threads(pid);
        assert!(
            !names.iter().any(|n| n.starts_with("vcpu")),
            "the VM was already built: {names:?}"
        );

        // A request that needs the VM waits for it, and so does every
        // request behind it.
        let mut pause = send(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#);
        assert_eq!(answer(&mut pause, Duration::from_millis(500)), None);
        let mut after = send(&sock, "GET", "/", "");
        assert_eq!(answer(&mut after, Duration::from_millis(300)), None);

        // Let the build go on.
        drained = Some(std::thread::spawn(move || {
            let mut r = std::fs::File::from(stderr_r);
            let mut all = Vec::new();
            let _ = r.read_to_end(&mut all);
            all
        }));
        let (code, body) = answer(&mut pause, Duration::from_secs(30)).expect("PATCH answered");
        assert_eq!(code, 204, "{body}");
        let (code, body) = answer(&mut after, Duration::from_secs(30)).expect("GET answered");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(r#""state":"Paused""#), "{body}");
        let names = threads(pid);
        assert!(names.iter().any(|n| n == "vcpu0"), "{names:?}");
    }));
    let _ = child.kill();
    let _ = child.wait();
    let log = drained
        .and_then(|t| t.join().ok())
        .map(|all| {
            String::from_utf8_lossy(&all)
                .trim_start_matches('.')
                .to_string()
        })
        .unwrap_or_default();
    if let Err(panic) = outcome {
        eprintln!("ringvm's log: {log}");
        std::panic::resume_unwind(panic);
    }
}
