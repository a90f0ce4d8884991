//! ringvm's own virtio test guest (`resources/testguest`, "vtest"): a
//! small kernel that drives the virtio-mmio devices directly, politely and
//! rudely, prints one line per case and a closing `N passed, N failed`,
//! and reports its verdict on the test-exit port (ringvm exits 0 only when
//! every case passed, 6 otherwise).

use std::path::PathBuf;
use std::time::Duration;

use ringvm_tests::{kvm_available, run_binary, run_ringvm, workspace_root, Scratch, VmRun};

const DEADLINE: Duration = Duration::from_secs(300);

fn vtest_elf() -> String {
    let p = std::env::var_os("RINGVM_TESTGUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/testguest/vtest.elf"));
    assert!(p.exists(), "{} missing: run `make testguest`", p.display());
    p.to_string_lossy().into_owned()
}

/// A 16 MiB drive image for `direct=on`, which vtest's
/// `hostile.reset_read_race` reads from: under the workspace's `target/`,
/// on the build disk, because from a tmpfs (a common /tmp) O_DIRECT reads
/// are memory copies that finish before ringvm sees the driver's reset.
/// Removed on drop.
struct DirectImage(PathBuf);

impl DirectImage {
    fn new(name: &str) -> Self {
        let dir = workspace_root().join("target");
        std::fs::create_dir_all(&dir).expect("create target/");
        let path = dir.join(format!("vtest-{name}-{}.img", std::process::id()));
        let f = std::fs::File::create(&path).expect("create direct drive image");
        f.set_len(16 << 20).expect("size direct drive image");
        Self(path)
    }

    /// The `--disk` value: with `direct=on` where the file system takes
    /// O_DIRECT (else ringvm would refuse the drive; the race case then
    /// reads a cached file and checks less, which the log says).
    fn disk_arg(&self) -> String {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.0)
            .is_ok();
        if !direct {
            eprintln!(
                "note: {} does not take O_DIRECT; hostile.reset_read_race reads a cached file",
                self.0.display()
            );
        }
        let path = self.0.display();
        if direct {
            format!("path={path},direct=on")
        } else {
            format!("path={path}")
        }
    }
}

impl Drop for DirectImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the whole suite against `bin` with a writable, a read-only and a
/// `direct=on` drive and an entropy device (`--rng`).
fn run_suite(bin: Option<&str>, scratch: &Scratch, name: &str) -> VmRun {
    let rw = scratch.file("vt.img");
    let ro = scratch.file("vt-ro.img");
    for p in [&rw, &ro] {
        let f = std::fs::File::create(p).expect("create drive image");
        f.set_len(16 << 20).expect("size drive image");
    }
    let direct = DirectImage::new(name);
    let elf = vtest_elf();
    let rw_disk = format!("path={rw}");
    let ro_disk = format!("path={ro},ro");
    let direct_disk = direct.disk_arg();
    // vtest finds its devices in `virtio_mmio.device=` words, not in ACPI
    // tables: it needs `--acpi off`.
    let args = [
        "--kernel",
        &elf,
        "--acpi",
        "off",
        "--disk",
        &rw_disk,
        "--disk",
        &ro_disk,
        "--disk",
        &direct_disk,
        "--rng",
        "--cmdline",
        "suite=all",
    ];
    match bin {
        Some(b) => run_binary(
            std::path::Path::new(b),
            &args,
            None,
            libc::SIGKILL,
            DEADLINE,
        ),
        None => run_ringvm(&args, DEADLINE),
    }
}

/// The closing `N passed, N failed` line.
fn tally(console: &str) -> Option<(u32, u32)> {
    let line = console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find(|l| l.contains(" passed, ") && l.contains(" failed"))?;
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().ok());
    Some((nums.next()??, nums.next()??))
}

/// Cases that need no network device: mmio, ring, blk, hostile, rng.
const CASES_WITHOUT_NET: u32 = 55;
/// The `net.*` cases.
const NET_CASES: u32 = 16;

#[test]
fn every_conformance_blk_hostile_and_rng_case_passes() {
    if !kvm_available("every_conformance_blk_hostile_and_rng_case_passes") {
        return;
    }
    let scratch = Scratch::new("vtest");
    let run = run_suite(None, &scratch, "all");
    let t = run.transcript();
    assert!(!run.timed_out, "{t}");
    let (passed, failed) = tally(&run.stdout).unwrap_or_else(|| panic!("no tally line\n{t}"));
    assert_eq!(failed, 0, "{t}");
    assert!(!run.stdout.contains("skip rng."), "no rng device seen\n{t}");
    assert!(
        !run.stdout.contains("skip blk.") && !run.stdout.contains("skip hostile."),
        "a drive was not seen\n{t}"
    );
    assert_eq!(
        passed, CASES_WITHOUT_NET,
        "expected every case but the net ones to run\n{t}"
    );
    assert!(!run.stdout.contains("FAIL "), "{t}");
    assert_eq!(run.code, Some(0), "{t}");
    eprintln!("vtest: {passed} cases passed in {:?}", run.elapsed);
}

/// A ringvm built with the test-only `broken-status` feature answers
/// refused requests with OK; the hostile and blk cases must catch it and
/// ringvm must exit 6. `make test` builds that binary and names it in
/// RINGVM_BROKEN_BIN.
#[test]
fn a_deliberately_broken_device_fails_the_matching_cases() {
    if !kvm_available("a_deliberately_broken_device_fails_the_matching_cases") {
        return;
    }
    let Some(broken) = std::env::var_os("RINGVM_BROKEN_BIN") else {
        eprintln!(
            "SKIPPED a_deliberately_broken_device_fails_the_matching_cases: \
             RINGVM_BROKEN_BIN not set (make test sets it)"
        );
        return;
    };
    let broken = broken.to_string_lossy().into_owned();
    let scratch = Scratch::new("vtest-broken");
    let run = run_suite(Some(&broken), &scratch, "broken");
    let t = run.transcript();
    let (_, failed) = tally(&run.stdout).unwrap_or_else(|| panic!("no tally line\n{t}"));
    assert!(failed >= 5, "the broken device passed too many cases\n{t}");
    for case in [
        "hostile.wrong_direction",
        "hostile.data_outside_ram",
        "blk.past_end",
        "blk.read_only",
    ] {
        assert!(
            run.stdout.contains(&format!("FAIL {case}")),
            "{case} did not catch the broken device\n{t}"
        );
    }
    assert_eq!(run.code, Some(6), "{t}");
}

#[test]
fn tally_line_is_parsed() {
    assert_eq!(tally("ok a\n48 passed, 0 failed\n"), Some((48, 0)));
    assert_eq!(tally("47 passed, 1 failed, 2 skipped\r\n"), Some((47, 1)));
    assert_eq!(tally("nothing"), None);
}

/// vtest's `net.*` cases against a tap in a private network namespace
/// (`ringvm-vtnet-<pid>`, deleted at the end, also on failure), whose host
/// end 169.254.88.1 answers the guest's ARP and pings by itself (MTU 9000
/// so a 4 KiB reply is one frame); the guest is 169.254.88.2 with a static
/// neighbour entry. Then ringvm's counters must show the frames that did
/// not fit dropped and the bad chains refused.
#[test]
fn net_cases_pass_through_a_tap_in_a_namespace() {
    const TEST: &str = "net_cases_pass_through_a_tap_in_a_namespace";
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {TEST}: needs root (network namespace and tap)");
        return;
    }
    if !kvm_available(TEST) {
        return;
    }
    let ip_works = std::process::Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ip_works || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED {TEST}: needs iproute2 (`ip`) and /dev/net/tun");
        return;
    }

    /// Deletes the namespace (and the tap in it) when the test ends.
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "exec", &self.0, "ip", "link", "del", "vt0"])
                .output();
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .output();
        }
    }
    let ns = Netns(format!("ringvm-vtnet-{}", std::process::id()));
    let sh = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ns.0])
        .output();
    sh(&["netns", "add", &ns.0]);
    let exec = |cmd: &str| {
        let mut args = vec!["netns", "exec", &ns.0];
        args.extend(cmd.split(' '));
        sh(&args);
    };
    exec("ip tuntap add dev vt0 mode tap");
    exec("ip link set vt0 mtu 9000 up");
    exec("ip addr add 169.254.88.1/24 dev vt0");
    exec("ip neigh add 169.254.88.2 lladdr 02:00:00:00:88:02 dev vt0 nud permanent");

    let scratch = Scratch::new("vtnet");
    let disk = scratch.file("vt.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create drive image");
    let metrics = scratch.file("metrics.json");
    let elf = vtest_elf();
    let bin = ringvm_tests::ringvm_bin().to_string_lossy().into_owned();
    let disk_arg = format!("path={disk}");
    let args = [
        "netns",
        "exec",
        &ns.0,
        &bin,
        "--kernel",
        &elf,
        "--acpi",
        "off",
        "--disk",
        &disk_arg,
        "--net",
        "tap=vt0,mac=02:00:00:00:88:02",
        "--metrics-path",
        &metrics,
        "--cmdline",
        "suite=net",
    ];
    let run = run_binary(
        std::path::Path::new("ip"),
        &args,
        None,
        libc::SIGKILL,
        DEADLINE,
    );
    let t = run.transcript();
    assert!(!run.timed_out, "{t}");
    assert!(!run.stdout.contains("skip net."), "no net device seen\n{t}");
    let (passed, failed) = tally(&run.stdout).unwrap_or_else(|| panic!("no tally line\n{t}"));
    assert_eq!(failed, 0, "{t}");
    assert_eq!(passed, NET_CASES, "expected every net case to run\n{t}");
    assert_eq!(run.code, Some(0), "{t}");

    let text = std::fs::read_to_string(&metrics).unwrap_or_default();
    let last = text
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no metrics\n{t}"));
    let m: serde_json::Value = serde_json::from_str(last).expect("metrics JSON");
    let eth = &m["net"]["eth0"];
    let count = |k: &str| eth[k].as_u64().unwrap_or(0);
    // big_frame_dropped sends three frames that cannot fit.
    assert!(
        count("rx_dropped") >= 3,
        "frames too big not counted: {eth}\n{t}"
    );
    assert!(
        count("tx_errors") >= 10,
        "bad TX chains not counted: {eth}\n{t}"
    );
    assert!(
        count("rx_errors") >= 4,
        "bad RX chains not counted: {eth}\n{t}"
    );
    // provided_buffers' 24 replies came through the provided-buffer path.
    assert!(
        count("rx_provided_packets") >= 24,
        "frames into whole-frame buffers did not take the provided-buffer path: {eth}\n{t}"
    );
    eprintln!(
        "vtest: {passed} net cases passed in {:?} ({eth})",
        run.elapsed
    );
}

/// The `vsock.*` cases.
const VSOCK_CASES: u32 = 6;

/// vtest's `vsock.*` cases against `--vsock cid=3,uds=...` with this
/// test's Unix sockets behind it: an echo server on `<uds>_5` (every
/// connection echoed until end of file), nothing on `<uds>_6`, and a host
/// client that connects to `<uds>` as soon as ringvm listens, sends
/// `CONNECT 52\n`, and after `OK <port>\n` sends "ping\n" and must get
/// "pong\n" and then end of file (the guest's `vsock.host_connect`).
#[test]
fn vsock_cases_pass_against_host_unix_sockets() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    if !kvm_available("vsock_cases_pass_against_host_unix_sockets") {
        return;
    }
    let scratch = Scratch::new("vtvsock");
    let uds = scratch.path.join("v.sock");
    let echo = UnixListener::bind(format!("{}_5", uds.display())).expect("bind <uds>_5");
    std::thread::spawn(move || {
        for conn in echo.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let client = {
        let uds = uds.clone();
        std::thread::spawn(move || -> Result<String, String> {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            let stream = loop {
                match UnixStream::connect(&uds) {
                    Ok(s) => break s,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => return Err(format!("connect: {e}")),
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(120)))
                .map_err(|e| e.to_string())?;
            let mut w = stream.try_clone().map_err(|e| e.to_string())?;
            w.write_all(b"CONNECT 52\n").map_err(|e| e.to_string())?;
            let mut r = BufReader::new(stream);
            let mut ok = String::new();
            r.read_line(&mut ok).map_err(|e| format!("OK line: {e}"))?;
            if !ok.starts_with("OK ") {
                return Err(format!("expected OK, got {ok:?}"));
            }
            w.write_all(b"ping\n").map_err(|e| e.to_string())?;
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).map_err(|e| format!("read: {e}"))?;
            if rest != b"pong\n" {
                return Err(format!("expected pong then EOF, got {rest:?}"));
            }
            Ok(ok)
        })
    };
    let elf = vtest_elf();
    let vsock = format!("cid=3,uds={}", uds.display());
    let args = [
        "--kernel",
        &elf,
        "--acpi",
        "off",
        "--vsock",
        &vsock,
        "--cmdline",
        "suite=vsock",
    ];
    let run = run_ringvm(&args, DEADLINE);
    let t = run.transcript();
    assert!(!run.timed_out, "{t}");
    assert!(
        !run.stdout.contains("skip vsock."),
        "no vsock device seen\n{t}"
    );
    let (passed, failed) = tally(&run.stdout).unwrap_or_else(|| panic!("no tally line\n{t}"));
    assert_eq!(failed, 0, "{t}");
    assert_eq!(passed, VSOCK_CASES, "expected every vsock case to run\n{t}");
    assert_eq!(run.code, Some(0), "{t}");
    assert!(!uds.exists(), "ringvm removes its socket at exit\n{t}");
    let ok = client
        .join()
        .expect("host client panicked")
        .unwrap_or_else(|e| panic!("host client: {e}\n{t}"));
    eprintln!(
        "vtest: {passed} vsock cases passed in {:?} (host client got {})",
        run.elapsed,
        ok.trim()
    );
}
