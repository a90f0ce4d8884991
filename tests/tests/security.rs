//! ringvm in front of a hostile guest and a hostile local client: seccomp
//! on every thread, an unprivileged run, stop signals, paths that would
//! block (FIFOs), the API socket's ownership and its stalled clients.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringvm_tests::{
    guest_dir, kvm_available, net_available, pinger, ringvm_bin, run_ringvm, workspace_root, NetNs,
    Running, Scratch,
};

const QUICK: Duration = Duration::from_secs(20);
/// A Linux boot on PVM-native KVM under a loaded CI machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(900);
/// The user the unprivileged run takes.
const NOBODY: u32 = 65534;

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn wait_for_socket(sock: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "API socket {} never appeared",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 request on its own connection: (status, body).
fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    parse_response(&text)
}

fn parse_response(text: &str) -> (u16, String) {
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// `ringvm --api-sock SOCK EXTRA...` with its output discarded.
fn serve(sock: &Path, extra: &[&str]) -> Child {
    let child = Command::new(ringvm_bin())
        .arg("--api-sock")
        .arg(sock)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ringvm");
    wait_for_socket(sock, Duration::from_secs(10));
    child
}

fn exit_within(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// `PF_USER_WORKER`: a kernel worker living in the process (io_uring's
/// `iou-wrk`, KVM's NX-recovery task). They run no user code and make no
/// syscalls; whether they show the filter depends on which thread the
/// kernel created them from.
const PF_USER_WORKER: u64 = 0x4000;

/// Every user thread of `pid` as (name, Seccomp value, real uid).
fn tasks(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let Ok(entry) = entry else { continue };
        let flags = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| {
                // Fields after the parenthesised name: state is field 3,
                // flags field 9.
                let rest = stat.rsplit_once(") ")?.1.to_string();
                rest.split_whitespace().nth(6)?.parse::<u64>().ok()
            })
            .unwrap_or(0);
        if flags & PF_USER_WORKER != 0 {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue; // the task ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let uid = field("Uid:")
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        out.push((field("Name:"), field("Seccomp:"), uid));
    }
    out
}

/// Fills a FIFO's pipe and keeps it open without ever reading: a stalled
/// reader, as a wedged log collector would be.
fn stall_fifo(path: &Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .expect("open FIFO");
    let chunk = [b'#'; 4096];
    while (&f).write(&chunk).is_ok() {}
    f
}

/// One boot of a real guest, run as an unprivileged user when the test
/// runs as root (root only prepares /dev/kvm, /dev/net/tun and the tap for
/// it, in private namespaces), with a root drive, a data drive, a NIC, the
/// API socket, a log FIFO whose reader has stalled and a metrics file.
/// While the guest runs: every thread of ringvm is under seccomp
/// (`Seccomp: 2`), none runs as root, the socket is owner-only, a second
/// ringvm refuses the socket, `PATCH /drives` to a FIFO is answered 400 at
/// once, the stalled log costs dropped lines (counted), not a stall, and
/// the guest answers pings. Then SIGTERM: exit 143, a final metrics line,
/// no socket file left.
#[test]
fn a_guest_runs_unprivileged_under_seccomp_and_sigterm_ends_it_cleanly() {
    let name = "a_guest_runs_unprivileged_under_seccomp_and_sigterm_ends_it_cleanly";
    if !kvm_available(name) {
        return;
    }
    let scratch = Scratch::new("sec-guest");
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let with_net = net_available(&format!("{name}: the NIC part"));
    let rootfs = scratch.path.join("rootfs.ext4");
    std::fs::copy(guest_dir().join("rootfs.ext4"), &rootfs).expect("copy rootfs");
    let data = scratch.path.join("data.img");
    std::fs::write(&data, vec![0u8; 1 << 20]).expect("data image");
    let ro = scratch.path.join("ro.img");
    std::fs::write(&ro, vec![0u8; 1 << 20]).expect("read-only image");
    let drive_fifo = scratch.path.join("drive.fifo");
    mkfifo(&drive_fifo);
    let log_fifo = scratch.path.join("log.fifo");
    mkfifo(&log_fifo);
    let metrics = scratch.path.join("metrics.json");
    let sock = scratch.path.join("api.sock");
    let nodes = scratch.path.join("nodes");
    if root {
        for p in [&scratch.path, &rootfs, &data, &ro, &drive_fifo, &log_fifo] {
            chown(p, NOBODY);
        }
        // Device nodes the unprivileged user may open, bound over /dev in
        // a private mount namespace: the host's own nodes stay untouched.
        std::fs::create_dir(&nodes).expect("nodes dir");
        for (node, minor) in [("kvm", 232), ("tun", 200)] {
            let p = nodes.join(node);
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
            // SAFETY: mknod with a valid path for a character device.
            let rc =
                unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, minor)) };
            assert_eq!(rc, 0, "mknod {}", p.display());
            chown(&p, NOBODY);
        }
    }
    let _stalled = stall_fifo(&log_fifo);
    let ns = with_net.then(|| {
        let ns = NetNs::new("sec");
        // A persistent tap its unprivileged user may attach to.
        ns.run(&[
            "ip",
            "tuntap",
            "add",
            "dev",
            "tap0",
            "mode",
            "tap",
            "user",
            &NOBODY.to_string(),
        ]);
        ns.run(&["ip", "link", "set", "tap0", "up"]);
        ns.run(&["ip", "addr", "add", "169.254.40.1/24", "dev", "tap0"]);
        ns
    });

    let bin = ringvm_bin().to_string_lossy().into_owned();
    let kernel = guest_dir().join("vmlinux").to_string_lossy().into_owned();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let cmdline = if with_net {
        "console=ttyS0 reboot=k panic=-1 ip=169.254.40.2::169.254.40.1:255.255.255.0::eth0:off -- sleep 600"
    } else {
        "console=ttyS0 reboot=k panic=-1 -- sleep 600"
    };
    let mut vm_args: Vec<String> = vec![
        bin.clone(),
        "--api-sock".into(),
        s(&sock),
        "--metrics-path".into(),
        s(&metrics),
        "--log-path".into(),
        s(&log_fifo),
        "--log-level".into(),
        "debug".into(),
        "--kernel".into(),
        kernel,
        "--disk".into(),
        format!("path={},id=rootfs,root", s(&rootfs)),
        "--disk".into(),
        format!("path={},id=data", s(&data)),
        "--disk".into(),
        format!("path={},id=ro,ro", s(&ro)),
        "--cmdline".into(),
        cmdline.into(),
    ];
    if with_net {
        vm_args.extend(["--net".into(), "tap=tap0,mac=02:00:00:00:40:02".into()]);
    }
    let mut argv: Vec<String> = Vec::new();
    if let Some(ns) = &ns {
        argv.extend(["ip", "netns", "exec", &ns.name].map(String::from));
    }
    if root {
        let script = format!(
            "mount --bind {n}/kvm /dev/kvm && mount --bind {n}/tun /dev/net/tun && \
             exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups \"$@\"",
            n = s(&nodes)
        );
        argv.extend(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
                "sh",
            ]
            .map(String::from),
        );
    }
    argv.extend(vm_args);
    let program = PathBuf::from(&argv[0]);
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let mut vm = Running::spawn(&program, &args);
    // `ip netns exec`, `unshare`, `sh -c exec` and `setpriv` all exec in
    // place: the child's pid is ringvm's.
    let pid = vm.pid();

    assert!(
        vm.wait_for("GUEST: run: sleep 600", BOOT_DEADLINE),
        "the guest never reached its command\n{}",
        vm.console()
    );

    // Every thread under its filter, none as root.
    let threads = tasks(pid);
    assert!(threads.len() >= 3, "{threads:?}");
    for (task, seccomp, uid) in &threads {
        assert_eq!(seccomp, "2", "thread {task} is not filtered: {threads:?}");
        if root {
            assert_eq!(uid, &NOBODY.to_string(), "thread {task} runs as uid {uid}");
        }
    }
    let names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
    assert!(
        names.contains(&"vcpu0") && names.contains(&"ringvm-api"),
        "{names:?}"
    );

    // The socket is the unprivileged user's alone.
    let meta = std::fs::metadata(&sock).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    if root {
        assert_eq!(meta.uid(), NOBODY);
    }

    // A second ringvm refuses the live socket, in one line, and leaves it.
    let second = run_ringvm(&["--api-sock", &s(&sock)], QUICK);
    let t = second.transcript();
    assert_eq!(second.code, Some(3), "{t}");
    assert!(second.stderr.contains("in use"), "{t}");
    assert_eq!(second.stderr.trim().lines().count(), 1, "{t}");
    assert_eq!(request(&sock, "GET", "/", None).0, 200);

    // PATCH /drives to a FIFO: refused at once, the VMM keeps serving. (A
    // read-only open of a FIFO without a writer would wait forever.)
    let patch = serde_json::json!({"drive_id": "ro", "path_on_host": drive_fifo});
    let started = Instant::now();
    let (code, body) = request(&sock, "PATCH", "/drives/ro", Some(&patch.to_string()));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("FIFO"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let (code, body) = request(&sock, "GET", "/vm/config", None);
    assert_eq!(code, 200);
    assert!(
        body.contains("ro.img") && !body.contains("drive.fifo"),
        "{body}"
    );

    // The stalled log reader cost log lines, counted in metrics.
    let (code, _) = request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"FlushMetrics"}"#),
    );
    assert_eq!(code, 204);
    let text = std::fs::read_to_string(&metrics).expect("metrics file");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a line")).expect("JSON line");
    assert!(
        last["logger"]["missed_log_count"].as_u64().unwrap_or(0) > 0,
        "{last}"
    );
    let lines_before = text.lines().count();

    if let Some(ns) = &ns {
        let mut ping = pinger().expect("a ping program (iputils or busybox)");
        ping.extend(["-c", "2", "-W", "5", "169.254.40.2"]);
        let out = ns.exec(&ping);
        assert!(
            out.status.success(),
            "the guest did not answer pings: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    vm.signal(libc::SIGTERM);
    let run = vm.finish(Duration::from_secs(120) + BOOT_DEADLINE);
    let t = run.transcript();
    assert_eq!(run.code, Some(143), "{t}");
    let text = std::fs::read_to_string(&metrics).expect("metrics file");
    assert!(
        text.lines().count() > lines_before,
        "no final metrics line\n{text}"
    );
    assert!(!sock.exists(), "the socket file was left behind");
}

/// The socket is created 0600 whatever the umask; a second ringvm on a
/// live socket refuses to start (one line, exit 3) and leaves it to the
/// first; a socket left by a killed ringvm is replaced.
#[test]
fn a_live_api_socket_is_refused_and_a_stale_one_replaced() {
    let scratch = Scratch::new("sec-sock");
    let sock = scratch.path.join("api.sock");
    let mut first = serve(&sock, &[]);
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    let second = run_ringvm(&["--api-sock", &sock.to_string_lossy()], QUICK);
    let t = second.transcript();
    assert_eq!(second.code, Some(3), "{t}");
    assert!(second.stderr.contains("in use"), "{t}");
    assert_eq!(second.stderr.trim().lines().count(), 1, "{t}");
    assert!(second.elapsed < Duration::from_secs(5), "{t}");
    assert_eq!(
        request(&sock, "GET", "/", None).0,
        200,
        "the first lost its socket"
    );

    // SIGKILL leaves the file behind: stale, so the next run takes it.
    let _ = first.kill();
    let _ = first.wait();
    assert!(sock.exists());
    let mut third = serve(&sock, &[]);
    assert_eq!(request(&sock, "GET", "/", None).0, 200);
    let _ = third.kill();
    let _ = third.wait();
}

/// With `--api-sock` and no VM yet, SIGTERM and SIGINT end ringvm through
/// its own exit path (128 + signal, socket removed), not the kernel's
/// default action on whichever thread the signal landed.
#[test]
fn stop_signals_end_a_waiting_api_server_cleanly() {
    let scratch = Scratch::new("sec-signals");
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let sock = scratch.path.join(format!("api-{sig}.sock"));
        let mut child = serve(&sock, &[]);
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = exit_within(&mut child, Duration::from_secs(10)).expect("did not stop");
        assert_eq!(status.code(), Some(code), "{status:?}");
        assert!(!sock.exists(), "socket left behind after signal {sig}");
    }
}

/// A FIFO (or device) where an image belongs is refused at once with one
/// line and exit 3, instead of blocking in `open`; so is a log or metrics
/// path that is neither a regular file nor a FIFO.
#[test]
fn paths_that_would_block_are_refused_at_once() {
    let scratch = Scratch::new("sec-fifo");
    let fifo = scratch.path.join("image.fifo");
    mkfifo(&fifo);
    let fifo = fifo.to_string_lossy().into_owned();
    let kernel = scratch.file("kernel");
    std::fs::write(&kernel, b"not looked at yet").expect("kernel file");
    let drive = format!("path={fifo},id=data");
    for args in [
        vec!["--kernel", fifo.as_str()],
        vec!["--kernel", kernel.as_str(), "--initrd", fifo.as_str()],
        vec!["--kernel", kernel.as_str(), "--disk", drive.as_str()],
    ] {
        let run = run_ringvm(&args, QUICK);
        let t = run.transcript();
        assert_eq!(run.code, Some(3), "{args:?}\n{t}");
        assert!(run.stderr.contains("is a FIFO"), "{args:?}\n{t}");
        assert_eq!(run.stderr.trim().lines().count(), 1, "{args:?}\n{t}");
        assert!(run.elapsed < Duration::from_secs(5), "{args:?}\n{t}");
    }
    let run = run_ringvm(&["--kernel", &kernel, "--log-path", "/dev/null"], QUICK);
    let t = run.transcript();
    assert_eq!(run.code, Some(3), "{t}");
    assert!(run.stderr.contains("character device"), "{t}");
}

/// Log and metrics FIFOs nobody reads yet are accepted at once over the
/// API (opened without waiting for a reader), and the API keeps answering.
#[test]
fn log_and_metrics_fifos_without_a_reader_do_not_block_the_api() {
    let scratch = Scratch::new("sec-sinks");
    let sock = scratch.path.join("api.sock");
    let log = scratch.path.join("log.fifo");
    let metrics = scratch.path.join("metrics.fifo");
    mkfifo(&log);
    mkfifo(&metrics);
    let mut child = serve(&sock, &[]);
    let started = Instant::now();
    let body = serde_json::json!({ "metrics_path": metrics }).to_string();
    let (code, resp) = request(&sock, "PUT", "/metrics", Some(&body));
    assert_eq!(code, 204, "{resp}");
    let body = serde_json::json!({ "log_path": log, "level": "Debug" }).to_string();
    let (code, resp) = request(&sock, "PUT", "/logger", Some(&body));
    assert_eq!(code, 204, "{resp}");
    // Debug lines for every request now go to a FIFO nobody reads.
    for _ in 0..300 {
        assert_eq!(request(&sock, "GET", "/machine-config", None).0, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Clients that connect and never finish a request (or never send one)
/// hold every connection slot only until their timeout: then they are
/// closed (a half-sent request is answered 408) and others are served.
#[test]
fn stalled_api_clients_give_their_slots_back() {
    let scratch = Scratch::new("sec-slots");
    let sock = scratch.path.join("api.sock");
    let mut child = serve(&sock, &[]);
    let mut silent = Vec::new();
    let mut partial = Vec::new();
    for i in 0..256 {
        let mut s = UnixStream::connect(&sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        if i % 2 == 0 {
            s.write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Len")
                .expect("send");
            partial.push(s);
        } else {
            silent.push(s);
        }
    }
    // Every slot is taken: the next client is turned away.
    let (code, _) = request(&sock, "GET", "/", None);
    assert_eq!(code, 503);
    // Past the request (10 s) and idle (15 s) timeouts.
    std::thread::sleep(Duration::from_secs(17));
    let (code, body) = request(&sock, "GET", "/", None);
    assert_eq!(code, 200, "{body}");
    for s in partial.iter_mut().take(8) {
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        assert_eq!(parse_response(&text).0, 408, "{text}");
    }
    for s in silent.iter_mut().take(8) {
        let mut buf = [0u8; 16];
        assert_eq!(
            s.read(&mut buf).unwrap_or(0),
            0,
            "a silent connection is still open"
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn vtest_elf() -> Option<String> {
    let p = std::env::var_os("RINGVM_TESTGUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/testguest/vtest.elf"));
    p.exists().then(|| p.to_string_lossy().into_owned())
}

/// Runs the test build (RINGVM_BROKEN_BIN, feature `broken-seccomp`) with
/// its VMM thread opening a socket once its filter is in place.
fn run_forbidden(broken: &str, vtest: &str, extra: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new(broken)
        .env("RINGVM_TEST_FORBIDDEN_SYSCALL", "1")
        .args([
            "--kernel",
            vtest,
            "--acpi",
            "off",
            "--cmdline",
            "suite=mmio",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run the broken build");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A syscall outside the VMM thread's list ends the process with SIGSYS
/// and a line naming the thread and the syscall (41, socket); with
/// `--no-seccomp` the same call goes through; a `--seccomp-filter` file
/// replaces the built-in lists, and a bad one is a one-line config error.
#[test]
fn a_forbidden_syscall_ends_ringvm_with_sigsys_and_says_which() {
    let name = "a_forbidden_syscall_ends_ringvm_with_sigsys_and_says_which";
    if !kvm_available(name) {
        return;
    }
    let Some(broken) = std::env::var_os("RINGVM_BROKEN_BIN") else {
        eprintln!("SKIPPED {name}: RINGVM_BROKEN_BIN not set (make test sets it)");
        return;
    };
    let broken = broken.to_string_lossy().into_owned();
    let vtest = vtest_elf().expect("vtest.elf missing: run `make testguest`");

    let (status, stderr) = run_forbidden(&broken, &vtest, &[]);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}\n{stderr}");
    assert!(
        stderr.contains("seccomp: the vmm thread made forbidden syscall 41 "),
        "{stderr}"
    );

    let (status, stderr) = run_forbidden(&broken, &vtest, &["--no-seccomp"]);
    assert_eq!(status.signal(), None, "{status:?}\n{stderr}");
    assert!(stderr.contains("the socket was allowed"), "{stderr}");

    // A filter file that allows everything but socket on the VMM thread.
    let scratch = Scratch::new("sec-filter");
    let open = r#"{"mismatch_action":"allow","match_action":"trap","filter":[]}"#;
    let vmm =
        r#"{"mismatch_action":"allow","match_action":"trap","filter":[{"syscall":"socket"}]}"#;
    let file = scratch.file("filter.json");
    std::fs::write(
        &file,
        format!(r#"{{"vmm":{vmm},"api":{open},"vcpu":{open}}}"#),
    )
    .expect("filter file");
    let (status, stderr) = run_forbidden(&broken, &vtest, &["--seccomp-filter", &file]);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}\n{stderr}");
    assert!(stderr.contains("forbidden syscall 41 "), "{stderr}");

    std::fs::write(&file, r#"{"vmm":{}}"#).expect("bad filter file");
    let run = run_ringvm(&["--kernel", &vtest, "--seccomp-filter", &file], QUICK);
    let t = run.transcript();
    assert_eq!(run.code, Some(3), "{t}");
    assert!(run.stderr.contains("seccomp filter file"), "{t}");
    assert_eq!(run.stderr.trim().lines().count(), 1, "{t}");
}
