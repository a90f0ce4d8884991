//! virtio-vsock with a real Linux guest driver, as Kata's and
//! firecracker-containerd's agents use it: Firecracker's hybrid host side
//! (`--vsock cid=3,uds=PATH`), both directions, with more data each way
//! than either side's credit, so the transfer lives on credit updates.
//!
//! The guest runs `resources/vsock/probe.c` (built here, static) with
//! `ringvm -- CMD` on the busybox root; the host side is this test: it
//! serves `<uds>_1234` for the guest's connection and connects to `<uds>`
//! with `CONNECT 52\n` for its own. The run has seccomp on (the default),
//! so a socket call missing from the VMM thread's list would kill ringvm.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ringvm_tests::command::{run_command, runner_root};
use ringvm_tests::{guest_dir, kvm_available, ringvm_bin, workspace_root, Scratch};

/// Bytes each way: above the 256 KiB of credit each side offers.
const BULK: usize = 320 * 1024;
const DEADLINE: Duration = Duration::from_secs(1200);

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3)) as u8
}

/// Builds the guest program, static, into `dir`.
fn build_probe(dir: &Path) -> PathBuf {
    let out = dir.join("vsock-probe");
    let src = workspace_root().join("resources/vsock/probe.c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc} (make deps installs build-essential): {e}"));
    assert!(status.success(), "{cc} -static {} failed", src.display());
    out
}

/// The host's side of the guest-initiated connection: everything the
/// guest sends (checked), then the answer.
fn serve_guest(listener: UnixListener) -> Result<usize, String> {
    let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).map_err(|e| format!("read: {e}"))?;
    let hello = b"hello from guest\n";
    if !got.starts_with(hello) {
        return Err(format!("guest sent {:?}...", &got[..got.len().min(32)]));
    }
    let body = &got[hello.len()..];
    if body.len() != BULK || body.iter().enumerate().any(|(i, b)| *b != pattern(i)) {
        return Err(format!("guest bulk: {} bytes or wrong content", body.len()));
    }
    let mut answer = b"hello from host\n".to_vec();
    answer.extend((0..BULK).map(pattern));
    s.write_all(&answer).map_err(|e| format!("write: {e}"))?;
    Ok(body.len())
}

/// The host-initiated connection: CONNECT, OK, then BULK bytes echoed.
fn connect_to_guest(uds: &Path) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = UnixStream::connect(uds).map_err(|e| format!("connect {uds:?}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    w.write_all(b"CONNECT 52\n").map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream);
    let mut ok = String::new();
    r.read_line(&mut ok).map_err(|e| format!("OK line: {e}"))?;
    if !ok.starts_with("OK ") || Instant::now() > deadline {
        return Err(format!("no OK line, got {ok:?}"));
    }
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..BULK).map(pattern).collect();
        let res = w.write_all(&data);
        let _ = w.shutdown(std::net::Shutdown::Write);
        res
    });
    let mut echoed = Vec::new();
    r.read_to_end(&mut echoed)
        .map_err(|e| format!("read echo: {e}"))?;
    writer
        .join()
        .map_err(|_| "writer panicked".to_string())?
        .map_err(|e| format!("write bulk: {e}"))?;
    if echoed.len() != BULK || echoed.iter().enumerate().any(|(i, b)| *b != pattern(i)) {
        return Err(format!("echo: {} bytes or wrong content", echoed.len()));
    }
    Ok(ok.trim().to_string())
}

#[test]
fn a_linux_guest_talks_to_the_host_over_hybrid_vsock() {
    if !kvm_available("a_linux_guest_talks_to_the_host_over_hybrid_vsock") {
        return;
    }
    let kernel = guest_dir().join("vmlinux");
    assert!(
        kernel.exists(),
        "{} missing: run `make guest`",
        kernel.display()
    );
    let s = Scratch::new("vsock");
    let bin = s.path.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    build_probe(&bin);
    let uds = s.path.join("v.sock");
    let metrics = s.path.join("metrics.json");
    let guest_listener =
        UnixListener::bind(format!("{}_1234", uds.display())).expect("bind uds_1234");
    let host = {
        let uds = uds.clone();
        std::thread::spawn(move || {
            let sent = serve_guest(guest_listener)?;
            let ok = connect_to_guest(&uds)?;
            Ok::<_, String>((sent, ok))
        })
    };
    let mut args: Vec<OsString> = vec!["--kernel".into(), kernel.into(), "--root-share".into()];
    args.push(runner_root().into());
    args.push("--share".into());
    args.push(format!("{}:/probe", bin.display()).into());
    args.push("--vsock".into());
    args.push(format!("cid=3,uds={}", uds.display()).into());
    args.push("--metrics-path".into());
    args.push(metrics.clone().into());
    for a in ["--", "/probe/vsock-probe", "1234", "52"] {
        args.push(a.into());
    }
    args.push(BULK.to_string().into());
    let run = run_command(&ringvm_bin(), &args, b"", DEADLINE);
    eprintln!("vsock: guest exit {:?} after {:?}", run.code, run.elapsed);
    let t = run.transcript();
    assert_eq!(run.code, Some(0), "the guest's probe failed\n{t}");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(out.contains("port 9 refused"), "{t}");
    assert!(out.contains("guest-initiated ok"), "{t}");
    assert!(out.contains("host-initiated ok"), "{t}");
    let (sent, ok) = host
        .join()
        .expect("host side panicked")
        .unwrap_or_else(|e| panic!("host side: {e}\n{t}"));
    assert_eq!(sent, BULK);
    assert!(ok.starts_with("OK "), "{ok}");
    assert!(!uds.exists(), "ringvm removes its socket at exit");
    let metrics = std::fs::read_to_string(&metrics).expect("metrics file");
    let last = metrics.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).expect("metrics JSON");
    let vsock = &v["vsock"]["vsock"];
    eprintln!("vsock metrics: {vsock}");
    assert_eq!(vsock["guest_connections"], 1, "{last}");
    assert_eq!(vsock["host_connections"], 1, "{last}");
    assert!(
        vsock["tx_bytes"].as_u64().unwrap_or(0) >= 2 * BULK as u64,
        "{last}"
    );
    assert!(
        vsock["rx_bytes"].as_u64().unwrap_or(0) >= 2 * BULK as u64,
        "{last}"
    );
    assert!(
        vsock["rst_sent"].as_u64().unwrap_or(0) >= 1,
        "port 9: {last}"
    );
}
