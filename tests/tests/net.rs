//! virtio-net end to end: real Linux guests under KVM on a tap, through
//! the `ringvm` binary.
//!
//! Network rules: every test makes its own network namespace
//! (`ringvm-<test>-<pid>`), creates its tap inside it, runs ringvm inside
//! it (`ip netns exec`), and uses link-local addresses only (169.254.10.0/24
//! here; never 169.254.169.254). Host-side sockets are opened by a thread
//! that entered the namespace with setns(2), so they live there too. The
//! namespace is deleted when the test ends, also when it fails (a guard),
//! after ringvm has been killed (so the tap goes with it). No packet of
//! these tests can leave the namespace: it has no other interface.
//!
//! The tests need root (taps, namespaces), `ip` (iproute2) and, for the
//! host-side ping, busybox; without them they say SKIPPED. Guests boot
//! slowly on PVM-native KVM (a minute or so), so each boot checks many
//! things; run them one at a time (`--test-threads=1`).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringvm_tests::{
    guest_dir, guest_value, kvm_available, net_available, pattern, pinger, ringvm_bin,
    run_command_until, script_image, text, NetNs, Running, Scratch,
};

const BOOT_DEADLINE: Duration = Duration::from_secs(900);
const HOST_IP: &str = "169.254.10.1";
const GUEST_IP: &str = "169.254.10.2";
const GUEST_MAC: &str = "02:00:00:0a:0b:0c";
/// Kernel IP autoconfiguration of eth0: guest, no server, gateway (the
/// host end), netmask, no hostname, eth0, no DHCP.
const IP_PARAM: &str = "ip=169.254.10.2::169.254.10.1:255.255.255.0::eth0:off";
/// The size of the file moved each way over TCP.
const XFER_BYTES: usize = 256 * 1024;
const PORT_FROM_GUEST: u16 = 5000;
const PORT_TO_GUEST: u16 = 5001;

fn guest_file(name: &str) -> String {
    let p = guest_dir().join(name);
    assert!(p.exists(), "{} missing: run `make guest`", p.display());
    p.to_string_lossy().into_owned()
}

/// Root, iproute2 and /dev/net/tun: what every test here needs. Says
/// SKIPPED with the reason when something is missing.
/// Binds a listener on the host end of the tap, inside the namespace.
fn listen(ns: &NetNs, port: u16) -> TcpListener {
    let l = ns
        .enter(move || TcpListener::bind((HOST_IP, port)))
        .unwrap_or_else(|e| panic!("bind {HOST_IP}:{port} in {}: {e}", ns.name));
    l.set_nonblocking(true).expect("non-blocking listener");
    l
}

/// Set when the VM has ended: host-side servers stop waiting for it.
type Stop = Arc<AtomicBool>;

fn would_block(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Accepts one connection from the guest, until the VM ends.
fn accept(l: &TcpListener, stop: &Stop) -> Result<TcpStream, String> {
    loop {
        match l.accept() {
            Ok((s, peer)) => {
                if peer.ip().to_string() != GUEST_IP {
                    return Err(format!("connection from {peer}, not the guest"));
                }
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                // Short timeouts, so a guest that went away mid-transfer
                // is noticed through `stop`.
                let tick = Some(Duration::from_millis(500));
                s.set_read_timeout(tick).map_err(|e| e.to_string())?;
                s.set_write_timeout(tick).map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) if would_block(&e) => {
                if stop.load(Ordering::Relaxed) {
                    return Err("the guest never connected".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// Reads until the guest closes (or the VM ends).
fn read_all(s: &mut TcpStream, stop: &Stop) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if would_block(&e) || e.kind() == std::io::ErrorKind::Interrupted => {
                if stop.load(Ordering::Relaxed) {
                    return Err(format!("VM ended, no EOF after {} bytes", got.len()));
                }
            }
            Err(e) => return Err(format!("read after {} bytes: {e}", got.len())),
        }
    }
}

/// Takes one connection and reads what the guest sends until it closes.
fn receive_one(l: TcpListener, stop: Stop) -> JoinHandle<Result<Vec<u8>, String>> {
    std::thread::spawn(move || {
        let mut s = accept(&l, &stop)?;
        read_all(&mut s, &stop)
    })
}

/// Takes one connection, sends `data` and closes gracefully (our FIN,
/// then the guest's, so no reset can cut the tail).
fn send_one(l: TcpListener, data: Vec<u8>, stop: Stop) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let mut s = accept(&l, &stop)?;
        let mut off = 0;
        while off < data.len() {
            match s.write(&data[off..]) {
                Ok(n) => off += n,
                Err(e) if would_block(&e) || e.kind() == std::io::ErrorKind::Interrupted => {
                    if stop.load(Ordering::Relaxed) {
                        return Err(format!("VM ended after {off} bytes were sent"));
                    }
                }
                Err(e) => return Err(format!("write after {off} bytes: {e}")),
            }
        }
        s.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        read_all(&mut s, &stop).map(|_| ())
    })
}

/// The last metrics line's counters of NIC `id`.
fn nic_metrics(path: &str, id: &str) -> Option<serde_json::Value> {
    let t = std::fs::read_to_string(path).ok()?;
    let last: serde_json::Value = serde_json::from_str(t.lines().last()?).ok()?;
    let nic = last.get("net")?.get(id)?.clone();
    Some(nic)
}

fn counter(nic: &serde_json::Value, key: &str) -> u64 {
    nic.get(key).and_then(|v| v.as_u64()).unwrap_or(u64::MAX)
}

/// A healthy guest on a healthy tap: nothing refused, cut or dropped.
fn assert_clean_counters(nic: &serde_json::Value, t: &str) {
    for key in ["rx_errors", "rx_dropped", "tx_errors", "tx_dropped"] {
        assert_eq!(counter(nic, key), 0, "{key} in {nic}\n{t}");
    }
}

fn md5_of(path: &str) -> String {
    let out = Command::new("md5sum")
        .arg(path)
        .output()
        .expect("run md5sum");
    assert!(out.status.success(), "md5sum {path}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// ringvm's warnings and errors, for the summary line of a passing test.
fn log_problems(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| l.contains(" WARN") || l.contains(" ERROR"))
        .map(|l| format!("\n  ringvm said: {l}"))
        .collect()
}

/// One more minute for a VM from now, as a deadline from its start.
fn vm_deadline_from_now(vm: &Running) -> Duration {
    vm.elapsed() + Duration::from_secs(60)
}

/// Stops a VM that is still running and panics with everything seen.
fn fail(mut vm: Running, metrics: &str, why: &str) -> ! {
    vm.signal(libc::SIGTERM);
    let deadline = vm_deadline_from_now(&vm);
    let run = vm.finish(deadline);
    let m = std::fs::read_to_string(metrics).unwrap_or_else(|e| format!("(no metrics: {e})"));
    panic!("{why}\nmetrics: {m}\n{}", run.transcript());
}

/// The kernel alone (no user space, no drive): it configures eth0 itself
/// from `ip=`, and while it waits for a root device that never comes the
/// host pings it through the tap from inside the namespace. The host's
/// neighbour entry carries the MAC given on the command line; a second
/// ringvm on the same tap is refused at once (exit 3, "in use"); SIGTERM
/// ends the VM with 143 and the metrics count the frames each way.
#[test]
fn kernel_ip_config_answers_pings_with_the_given_mac() {
    let name = "kernel_ip_config_answers_pings_with_the_given_mac";
    if !kvm_available(name) || !net_available(name) {
        return;
    }
    let Some(ping) = pinger() else {
        eprintln!("SKIPPED {name}: no ping (iputils or busybox) on the host");
        return;
    };
    let scratch = Scratch::new("net-kernel");
    let ns = NetNs::new("net-kernel");
    ns.add_tap("tap0", &format!("{HOST_IP}/24"));
    let kernel = guest_file("vmlinux");
    let metrics = scratch.file("metrics.json");
    let bin = ringvm_bin().to_string_lossy().into_owned();
    let net = format!("tap=tap0,mac={GUEST_MAC}");
    // `root=/dev/vda rootwait` with no drive: the kernel waits for its root
    // forever, with its network up, and never needs user space.
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {IP_PARAM} root=/dev/vda rootwait");
    let args = ns.ringvm_args(
        &bin,
        &[
            "--kernel",
            &kernel,
            "--net",
            &net,
            "--metrics-path",
            &metrics,
            "--cmdline",
            &cmdline,
        ],
    );
    let mut vm = Running::spawn(Path::new("ip"), &args);

    if !vm.wait_for("IP-Config: Complete", BOOT_DEADLINE) {
        fail(vm, &metrics, "the guest kernel never configured eth0");
    }
    let configured_at = vm.elapsed();
    // The kernel's own view: its eth0 has our MAC and address.
    if !vm.wait_for(
        &format!("device=eth0, hwaddr={GUEST_MAC}, ipaddr={GUEST_IP}"),
        Duration::from_secs(30),
    ) {
        fail(vm, &metrics, "IP-Config does not show our MAC and address");
    }

    // Ping until three of three come back (the first round may lose one
    // to ARP while the emulated guest is busy booting).
    let mut ping_args: Vec<&str> = ping.clone();
    ping_args.extend(["-c", "3", "-W", "2", GUEST_IP]);
    let mut attempts = Vec::new();
    let ping_deadline = Instant::now() + Duration::from_secs(180);
    let ok = loop {
        let out = ns.exec(&ping_args);
        let t = text(&out);
        // busybox: "3 packets received, 0% packet loss"; iputils: "3
        // received, 0% packet loss".
        let all = out.status.success() && t.contains(", 0% packet loss");
        attempts.push(t);
        if all {
            break true;
        }
        if Instant::now() >= ping_deadline || !vm.is_running() {
            break false;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    if !ok {
        fail(
            vm,
            &metrics,
            &format!(
                "host could not ping the guest ({} attempts):\n{}",
                attempts.len(),
                attempts.join("\n")
            ),
        );
    }
    let pinged_at = vm.elapsed();

    let neigh = ns.run(&["ip", "neigh", "show", GUEST_IP, "dev", "tap0"]);
    if !neigh.contains(&format!("lladdr {GUEST_MAC}")) {
        fail(
            vm,
            &metrics,
            &format!("host neighbour entry for {GUEST_IP} lacks {GUEST_MAC}: {neigh:?}"),
        );
    }

    // A second VMM on the same tap: refused before any guest starts.
    let second_args = ns.ringvm_args(&bin, &["--kernel", &kernel, "--net", "tap=tap0"]);
    let second = run_command_until(
        Path::new("ip"),
        &second_args,
        None,
        libc::SIGKILL,
        Duration::from_secs(60),
    );
    if second.code != Some(3)
        || !second.stderr.contains("tap0")
        || !second.stderr.contains("in use")
        || second.stdout.contains("Linux version")
    {
        fail(
            vm,
            &metrics,
            &format!(
                "a second ringvm on the busy tap was not refused with 3:\n{}",
                second.transcript()
            ),
        );
    }

    vm.signal(libc::SIGTERM);
    let deadline = vm_deadline_from_now(&vm);
    let run = vm.finish(deadline);
    let t = run.transcript();
    assert_eq!(run.code, Some(143), "SIGTERM must end ringvm with 143\n{t}");
    let nic = nic_metrics(&metrics, "eth0").unwrap_or_else(|| {
        panic!(
            "no net.eth0 in the metrics: {:?}\n{t}",
            std::fs::read_to_string(&metrics)
        )
    });
    // At least the echo requests and one ARP request in, the replies and
    // one ARP reply out.
    assert!(counter(&nic, "rx_packets") >= 4, "metrics {nic}\n{t}");
    assert!(counter(&nic, "tx_packets") >= 4, "metrics {nic}\n{t}");
    assert_clean_counters(&nic, &t);
    eprintln!(
        "{name}: eth0 up at {configured_at:?}, pinged at {pinged_at:?} ({} ping rounds), \
         ended at {:?}; metrics {nic}{}",
        attempts.len(),
        run.elapsed,
        log_problems(&run.stderr)
    );
}

/// The busybox root, driven by a script drive: the guest (eth0 set up by
/// the kernel's `ip=`) pings the host, sends a 256 KiB pattern drive to the
/// host over TCP with busybox nc, and receives a different 256 KiB file
/// from the host the same way; the host compares the bytes it got and the
/// guest's md5 of what it got. init then reboots and ringvm exits 0.
#[test]
fn busybox_guest_pings_the_host_and_moves_256k_each_way_over_tcp() {
    let name = "busybox_guest_pings_the_host_and_moves_256k_each_way_over_tcp";
    if !kvm_available(name) || !net_available(name) {
        return;
    }
    let scratch = Scratch::new("net-user");
    let ns = NetNs::new("net-user");
    ns.add_tap("tap0", &format!("{HOST_IP}/24"));

    let rootfs = scratch.file("rootfs.ext4");
    std::fs::copy(guest_file("rootfs.ext4"), &rootfs).expect("copy rootfs");
    // vdb: exactly 256 KiB, so `nc < /dev/vdb` sends the whole drive.
    let outbound = scratch.file("outbound.img");
    let outbound_bytes = pattern(0x6e65_7401, XFER_BYTES);
    std::fs::write(&outbound, &outbound_bytes).expect("outbound image");
    let inbound_bytes = pattern(0x6e65_7402, XFER_BYTES);
    let inbound = scratch.file("inbound.bin");
    std::fs::write(&inbound, &inbound_bytes).expect("inbound file");
    let inbound_md5 = md5_of(&inbound);
    let script = scratch.file("script.img");
    script_image(
        &script,
        &format!(
            "read -r MTU < /sys/class/net/eth0/mtu\n\
             echo \"T: mtu=$MTU\"\n\
             ping -c 2 -w 30 {HOST_IP}\n\
             echo \"T: ping_rc=$?\"\n\
             nc -w 30 {HOST_IP} {PORT_FROM_GUEST} < /dev/vdb\n\
             echo \"T: send_rc=$?\"\n\
             nc -w 30 {HOST_IP} {PORT_TO_GUEST} < /dev/null > /tmp/in\n\
             echo \"T: recv_rc=$?\"\n\
             md5sum /tmp/in"
        ),
    );

    let stop = Stop::default();
    let from_guest = receive_one(listen(&ns, PORT_FROM_GUEST), stop.clone());
    let to_guest = send_one(listen(&ns, PORT_TO_GUEST), inbound_bytes, stop.clone());

    let kernel = guest_file("vmlinux");
    let metrics = scratch.file("metrics.json");
    let bin = ringvm_bin().to_string_lossy().into_owned();
    // mtu=9000: offered to the guest (VIRTIO_NET_F_MTU) and set on the tap.
    let net = format!("tap=tap0,mac={GUEST_MAC},id=eth0,mtu=9000");
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {IP_PARAM} guest.script=/dev/vdc");
    let root = format!("path={rootfs},root");
    let out_disk = format!("path={outbound},ro");
    let script_disk = format!("path={script},ro");
    let args = ns.ringvm_args(
        &bin,
        &[
            "--kernel",
            &kernel,
            "--mem",
            "256",
            "--net",
            &net,
            "--disk",
            &root,
            "--disk",
            &out_disk,
            "--disk",
            &script_disk,
            "--metrics-path",
            &metrics,
            "--cmdline",
            &cmdline,
        ],
    );
    let run = Running::spawn(Path::new("ip"), &args).finish(BOOT_DEADLINE);
    stop.store(true, Ordering::Relaxed);
    let t = run.transcript();
    let from_guest = from_guest.join().expect("receiver thread");
    let to_guest = to_guest.join().expect("sender thread");
    assert!(!run.timed_out, "guest did not finish in time\n{t}");

    assert_eq!(
        guest_value(&run.stdout, "mtu"),
        Some("9000"),
        "the guest's eth0 did not take the offered MTU\n{t}"
    );
    assert_eq!(
        ns.run(&["cat", "/sys/class/net/tap0/mtu"]).trim(),
        "9000",
        "the tap's MTU was not set"
    );
    assert_eq!(
        guest_value(&run.stdout, "ping_rc"),
        Some("0"),
        "guest could not ping the host\n{t}"
    );
    assert!(
        run.stdout
            .contains("2 packets transmitted, 2 packets received"),
        "{t}"
    );

    assert_eq!(guest_value(&run.stdout, "send_rc"), Some("0"), "{t}");
    let got = from_guest.unwrap_or_else(|e| panic!("host receiver: {e}\n{t}"));
    assert_eq!(
        got.len(),
        XFER_BYTES,
        "bytes the host got from the guest\n{t}"
    );
    assert!(
        got == outbound_bytes,
        "the bytes the host got differ from the guest's drive (first difference at {:?})\n{t}",
        got.iter().zip(&outbound_bytes).position(|(a, b)| a != b)
    );

    to_guest.unwrap_or_else(|e| panic!("host sender: {e}\n{t}"));
    assert_eq!(guest_value(&run.stdout, "recv_rc"), Some("0"), "{t}");
    let guest_md5 = run
        .stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find_map(|l| l.strip_suffix("  /tmp/in"))
        .unwrap_or_else(|| panic!("no md5sum line from the guest\n{t}"));
    assert_eq!(
        guest_md5, inbound_md5,
        "md5 of what the guest received vs the file the host sent\n{t}"
    );

    assert!(run.stdout.contains("GUEST: DONE"), "{t}");
    assert_eq!(run.code, Some(0), "reboot must exit 0\n{t}");
    let nic =
        nic_metrics(&metrics, "eth0").unwrap_or_else(|| panic!("no net.eth0 in the metrics\n{t}"));
    assert!(
        counter(&nic, "tx_bytes") >= XFER_BYTES as u64,
        "metrics {nic}\n{t}"
    );
    assert!(
        counter(&nic, "rx_bytes") >= XFER_BYTES as u64,
        "metrics {nic}\n{t}"
    );
    assert_clean_counters(&nic, &t);
    eprintln!(
        "{name}: finished in {:?}; guest md5 {guest_md5}; metrics {nic}{}",
        run.elapsed,
        log_problems(&run.stderr)
    );
}

/// A tap that does not exist: ringvm exits 3 at once with one line naming
/// it, before any guest starts, and creates no interface (run in a fresh
/// namespace, which must still hold only `lo` afterwards; nothing of that
/// name appears in the host's namespace either).
#[test]
fn a_missing_tap_exits_3_at_once_and_creates_nothing() {
    let name = "a_missing_tap_exits_3_at_once_and_creates_nothing";
    if !net_available(name) {
        return;
    }
    let ns = NetNs::new("net-missing");
    let tap = "rvm-missing0";
    let before_root = Command::new("ip")
        .args(["link", "show", tap])
        .stderr(Stdio::null())
        .output()
        .expect("ip link show");
    assert!(
        !before_root.status.success(),
        "{tap} already exists on the host; cannot test"
    );
    // The kernel is opened, never loaded: the tap is checked first.
    let kernel = guest_dir().join("vmlinux");
    let kernel = if kernel.exists() {
        kernel
    } else {
        ringvm_bin()
    };
    let kernel = kernel.to_string_lossy().into_owned();
    let bin = ringvm_bin().to_string_lossy().into_owned();
    let net = format!("tap={tap}");
    let args = ns.ringvm_args(&bin, &["--kernel", &kernel, "--net", &net]);
    let run = run_command_until(
        Path::new("ip"),
        &args,
        None,
        libc::SIGKILL,
        Duration::from_secs(60),
    );
    let t = run.transcript();
    assert_eq!(run.code, Some(3), "{t}");
    assert!(
        run.elapsed < Duration::from_secs(10),
        "a missing tap must fail at once\n{t}"
    );
    assert!(run.stdout.is_empty(), "no guest may start\n{t}");
    let naming: Vec<&str> = run.stderr.lines().filter(|l| l.contains(tap)).collect();
    assert_eq!(naming.len(), 1, "one line naming the tap\n{t}");
    assert!(naming[0].contains("no such interface"), "{t}");

    let links = ns.run(&["ip", "-o", "link", "show"]);
    let names: Vec<&str> = links.lines().filter_map(|l| l.split(": ").nth(1)).collect();
    assert_eq!(names, ["lo"], "interfaces in the namespace after:\n{links}");
    let after_root = Command::new("ip")
        .args(["link", "show", tap])
        .stderr(Stdio::null())
        .output()
        .expect("ip link show");
    assert!(
        !after_root.status.success(),
        "{tap} appeared in the host namespace: {}",
        text(&after_root)
    );
}
