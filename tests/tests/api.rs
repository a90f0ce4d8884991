//! The JSON API socket, driven the way Firecracker's clients drive it:
//! raw HTTP over the Unix socket, `curl --unix-socket`, and Python's
//! `requests-unixsocket`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use ringvm_tests::{guest_dir, kvm_available, net_available, pinger, ringvm_bin, NetNs, Scratch};

/// A ringvm process serving `sock`, with its console lines on a channel.
struct Served {
    child: Child,
    lines: Receiver<String>,
    console: Vec<String>,
}

impl Served {
    fn start(sock: &Path, extra: &[&str]) -> Self {
        Self::start_in(None, sock, extra)
    }

    /// Starts ringvm, inside network namespace `ns` when given.
    fn start_in(ns: Option<&NetNs>, sock: &Path, extra: &[&str]) -> Self {
        let bin = ringvm_bin();
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let mut child = cmd
            .arg("--api-sock")
            .arg(sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ringvm");
        let (tx, lines) = channel();
        let out = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(sock).is_err() {
            assert!(Instant::now() < deadline, "API socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            lines,
            console: Vec::new(),
        }
    }

    /// Waits for a console line containing `needle`.
    fn wait_for(&mut self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.console.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => return false,
            }
        }
        false
    }

    fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on its own connection; returns (status, body).
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
    read_response(&mut s)
}

fn read_response(s: &mut UnixStream) -> (u16, String) {
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

fn fault(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["fault_message"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn hostile_clients_get_400s_and_the_api_keeps_answering() {
    let scratch = Scratch::new("api-hostile");
    let sock = scratch.path.join("api.sock");
    let srv = Served::start(&sock, &["--id", "hostile-test"]);

    let (code, body) = request(&sock, "GET", "/", None);
    assert_eq!(code, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).expect("GET / is JSON");
    assert_eq!(info["id"], "hostile-test");
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["app_name"], "ringvm");

    let cases: [(&str, &str, Option<&str>, &str); 6] = [
        ("PUT", "/machine-config", Some("{not json"), "deserializ"),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":"two","mem_size_mib":128}"#),
            "invalid type",
        ),
        (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path":"/k","bogus":1}"#),
            "bogus",
        ),
        (
            "PUT",
            "/drives/a",
            Some(
                r#"{"drive_id":"b","path_on_host":"/x","is_root_device":false,"is_read_only":false}"#,
            ),
            "does not match",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
            "kernel",
        ),
        (
            "GET",
            "/no/such/path",
            None,
            "Invalid request method and/or path",
        ),
    ];
    for (method, path, body, needle) in cases {
        let (code, resp) = request(&sock, method, path, body);
        assert_eq!(code, 400, "{method} {path}: {resp}");
        assert!(fault(&resp).contains(needle), "{method} {path}: {resp}");
    }

    // A body over the limit is refused without being read.
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.write_all(
        b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n{",
    )
    .expect("send header");
    let (code, resp) = read_response(&mut s);
    assert_eq!(code, 400, "{resp}");
    assert!(fault(&resp).contains("larger than the limit"), "{resp}");

    // Garbage and half-closed connections.
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.write_all(b"\x00\x01garbage\r\n\r\n")
        .expect("send garbage");
    let (code, _) = read_response(&mut s);
    assert_eq!(code, 400);
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"ker")
        .expect("send partial");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let _ = read_response(&mut s);

    // Several requests on one connection.
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send two");
    let mut both = String::new();
    let _ = s.read_to_string(&mut both);
    assert_eq!(both.matches("HTTP/1.1 200").count(), 2, "{both}");

    // 200 concurrent connections, all answered.
    let handles: Vec<_> = (0..200)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || request(&sock, "GET", "/machine-config", None).0)
        })
        .collect();
    let ok = handles
        .into_iter()
        .map(|h| h.join().unwrap_or(0))
        .filter(|c| *c == 200)
        .count();
    assert_eq!(
        ok, 200,
        "only {ok} of 200 concurrent requests were answered"
    );

    let (code, _) = request(&sock, "GET", "/", None);
    assert_eq!(code, 200, "the API stopped answering");
    drop(srv);
}

/// A guest configured entirely over the socket (curl and Python
/// `requests-unixsocket`, as Firecracker's users do) boots from its root
/// drive and answers pings on the NIC the API gave it (in a private
/// namespace, link-local addresses only); the running VM answers GET
/// /vm/config, FlushMetrics, PATCH /drives, refuses pre-boot requests, and
/// reboots on SendCtrlAltDel.
#[test]
fn a_guest_configured_over_the_socket_boots_and_is_managed_while_running() {
    if !kvm_available("a_guest_configured_over_the_socket_boots_and_is_managed_while_running") {
        return;
    }
    let scratch = Scratch::new("api-boot");
    let sock = scratch.path.join("api.sock");
    let rootfs = scratch.file("rootfs.ext4");
    std::fs::copy(guest_dir().join("rootfs.ext4"), &rootfs).expect("copy rootfs");
    let data = scratch.file("data.img");
    std::fs::write(&data, vec![0u8; 1 << 20]).expect("data image");
    let data2 = scratch.file("data2.img");
    std::fs::write(&data2, vec![0u8; 2 << 20]).expect("second data image");
    // The guest reads the data drive for ever, two O_DIRECT requests per
    // round, so its requests can be held back and let go from the host.
    let script = scratch.file("script.img");
    ringvm_tests::script_image(
        &script,
        "while :; do dd if=/dev/vdb of=/dev/null bs=4096 count=2 iflag=direct 2>/dev/null; done",
    );
    let metrics = scratch.file("metrics.json");
    let kernel = guest_dir().join("vmlinux");
    let with_net = net_available("api boot: the NIC part");
    let ns = with_net.then(|| {
        let ns = NetNs::new("api");
        ns.add_tap("tap0", "169.254.20.1/24");
        ns
    });
    let mut srv = Served::start_in(ns.as_ref(), &sock, &[]);
    let sock_s = sock.to_string_lossy().into_owned();

    let curl = |method: &str, path: &str, body: &str| -> (u16, String) {
        let out = Command::new("curl")
            .args(["-s", "-i", "--unix-socket", &sock_s, "-X", method])
            .args(["-H", "Content-Type: application/json", "-d", body])
            .arg(format!("http://localhost{path}"))
            .output()
            .expect("run curl");
        parse_response(&String::from_utf8_lossy(&out.stdout))
    };
    let boot_args = if with_net {
        "console=ttyS0 reboot=k panic=-1 ip=169.254.20.2::169.254.20.1:255.255.255.0::eth0:off guest.script=/dev/vdc"
    } else {
        "console=ttyS0 reboot=k panic=-1 guest.script=/dev/vdc"
    };
    let boot = serde_json::json!({ "kernel_image_path": kernel, "boot_args": boot_args });
    assert_eq!(curl("PUT", "/boot-source", &boot.to_string()).0, 204);
    assert_eq!(
        curl(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":128}"#
        )
        .0,
        204
    );
    let root = serde_json::json!({"drive_id":"rootfs","path_on_host":rootfs,"is_root_device":true,"is_read_only":false});
    assert_eq!(curl("PUT", "/drives/rootfs", &root.to_string()).0, 204);
    let d = serde_json::json!({"drive_id":"data","path_on_host":data,"is_root_device":false,"is_read_only":false});
    assert_eq!(curl("PUT", "/drives/data", &d.to_string()).0, 204);
    let sd = serde_json::json!({"drive_id":"script","path_on_host":script,"is_root_device":false,"is_read_only":true});
    assert_eq!(curl("PUT", "/drives/script", &sd.to_string()).0, 204);
    if with_net {
        let nic = r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"02:00:00:00:20:02"}"#;
        assert_eq!(curl("PUT", "/network-interfaces/eth0", nic).0, 204);
    }
    let m = serde_json::json!({ "metrics_path": metrics });
    assert_eq!(curl("PUT", "/metrics", &m.to_string()).0, 204);

    // Python's requests-unixsocket, as Firecracker's Python clients use it.
    let py = format!(
        "import requests_unixsocket,sys\n\
         s=requests_unixsocket.Session()\n\
         u='http+unix://{}'\n\
         r=s.get(u+'/machine-config'); assert r.status_code==200, r.text\n\
         assert r.json()['mem_size_mib']==128, r.text\n\
         r=s.put(u+'/actions', json={{'action_type':'InstanceStart'}})\n\
         print(r.status_code, r.text)\n",
        sock_s.replace('/', "%2F")
    );
    let out = Command::new("python3")
        .args(["-c", &py])
        .output()
        .expect("python3");
    let py_out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && py_out.starts_with("204"),
        "InstanceStart from Python: {py_out} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (code, body) = request(&sock, "GET", "/", None);
    assert_eq!(code, 200);
    assert!(body.contains("\"Running\""), "{body}");
    assert!(
        srv.wait_for("GUEST: script /dev/vdc", Duration::from_secs(600)),
        "the guest never reached its script: {:?}",
        srv.console.last()
    );

    // The NIC configured over the API answers pings from the host side.
    if let Some(ns) = &ns {
        let mut ping = pinger().expect("a ping program (iputils or busybox)");
        ping.extend(["-c", "2", "-W", "3", "169.254.20.2"]);
        let out = ns.exec(&ping);
        assert!(
            out.status.success(),
            "the guest did not answer pings: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // The running VM.
    let (code, body) = request(&sock, "GET", "/vm/config", None);
    assert_eq!(code, 200, "{body}");
    let cfg: serde_json::Value = serde_json::from_str(&body).expect("vm/config is JSON");
    assert_eq!(cfg["drives"][0]["drive_id"], "rootfs");
    assert_eq!(cfg["machine-config"]["vcpu_count"], 1);
    if with_net {
        assert_eq!(
            cfg["network-interfaces"][0]["host_dev_name"], "tap0",
            "{body}"
        );
    }
    assert!(cfg["boot-source"]["kernel_image_path"].is_string());

    let (code, body) = request(&sock, "PUT", "/boot-source", Some(&boot.to_string()));
    assert_eq!(code, 400, "{body}");
    assert!(fault(&body).contains("after starting"), "{body}");

    let (code, body) = request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"FlushMetrics"}"#),
    );
    assert_eq!(code, 204, "{body}");
    let text = std::fs::read_to_string(&metrics).expect("metrics file");
    let line: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a metrics line")).expect("JSON line");
    assert!(
        line["block"]["rootfs"]["requests"].as_u64().unwrap_or(0) > 0,
        "{line}"
    );
    assert_eq!(
        line["block"]["rootfs"]["rate_limiter_throttled_events"].as_u64(),
        Some(0),
        "{line}"
    );

    let patch = serde_json::json!({"drive_id":"data","path_on_host":data2});
    let (code, body) = request(&sock, "PATCH", "/drives/data", Some(&patch.to_string()));
    assert_eq!(code, 204, "{body}");
    let (_, body) = request(&sock, "GET", "/vm/config", None);
    assert!(body.contains("data2.img"), "{body}");

    // A live limit on the data drive the guest keeps reading: one request
    // per hour. The guest's next request is held back...
    let data_metrics = || -> serde_json::Value {
        let (code, body) = request(
            &sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type":"FlushMetrics"}"#),
        );
        assert_eq!(code, 204, "{body}");
        let text = std::fs::read_to_string(&metrics).expect("metrics file");
        let line: serde_json::Value =
            serde_json::from_str(text.lines().last().expect("a metrics line")).expect("JSON line");
        line["block"]["data"].clone()
    };
    let field = |m: &serde_json::Value, name: &str| m[name].as_u64().unwrap_or(0);
    let hour = r#"{"drive_id":"data","rate_limiter":{"ops":{"size":1,"refill_time":3600000}}}"#;
    let (code, body) = request(&sock, "PATCH", "/drives/data", Some(hour));
    assert_eq!(code, 204, "{body}");
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut held = data_metrics();
    while field(&held, "rate_limiter_throttled_events") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        held = data_metrics();
    }
    assert!(
        field(&held, "rate_limiter_throttled_events") > 0,
        "the one-per-hour limit never held a request back: {held}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let still = data_metrics();
    assert_eq!(
        field(&still, "requests"),
        field(&held, "requests"),
        "requests were served through a one-per-hour limit: {held} then {still}"
    );
    // ...until the limit is lifted (size 0 removes the bucket): the held
    // request is served at once and the guest's loop goes on.
    let lift = r#"{"drive_id":"data","rate_limiter":{"ops":{"size":0,"refill_time":0}}}"#;
    let (code, body) = request(&sock, "PATCH", "/drives/data", Some(lift));
    assert_eq!(code, 204, "{body}");
    let (_, body) = request(&sock, "GET", "/vm/config", None);
    assert!(
        !body.contains("rate_limiter"),
        "the lifted limit is still reported: {body}"
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut after = data_metrics();
    while field(&after, "requests") < field(&still, "requests") + 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        after = data_metrics();
    }
    assert!(
        field(&after, "requests") >= field(&still, "requests") + 4,
        "the guest's reads did not resume after the limit was lifted: {still} then {after}"
    );

    let (code, body) = request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"SendCtrlAltDel"}"#),
    );
    assert_eq!(code, 204, "{body}");
    assert_eq!(
        srv.exit_code(Duration::from_secs(300)),
        Some(0),
        "Ctrl-Alt-Del should reboot the guest and end ringvm with 0; console tail: {:?}",
        srv.console.iter().rev().take(5).collect::<Vec<_>>()
    );
    assert!(!sock.exists(), "the socket file was left behind");
}

/// Firecracker's answers to pre-boot requests, over the real socket: files
/// opened at PUT, limits, typed rate limiters, refused shapes. No guest.
#[test]
fn pre_boot_requests_get_firecrackers_answers() {
    let scratch = Scratch::new("api-semantics");
    let sock = scratch.path.join("api.sock");
    let srv = Served::start(&sock, &[]);
    let img = scratch.file("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("disk image");
    let kernel = guest_dir().join("vmlinux");
    let kernel = kernel.to_string_lossy();
    let missing = scratch.file("missing");

    let refused: Vec<(&str, &str, String, &str)> = vec![
        (
            "PUT",
            "/boot-source",
            format!(r#"{{"kernel_image_path":"{missing}"}}"#),
            "Boot source error: The kernel file cannot be opened: No such file or directory",
        ),
        (
            "PUT",
            "/boot-source",
            format!(
                r#"{{"kernel_image_path":"{kernel}","boot_args":"{}"}}"#,
                "x".repeat(2048)
            ),
            "The kernel command line is invalid",
        ),
        (
            "PUT",
            "/drives/data",
            format!(r#"{{"drive_id":"data","path_on_host":"{missing}","is_root_device":false}}"#),
            "Error manipulating the backing file: No such file or directory",
        ),
        (
            "PUT",
            "/drives/data",
            format!(r#"{{"drive_id":"data","path_on_host":"{img}"}}"#),
            "missing field `is_root_device`",
        ),
        (
            "PUT",
            "/drives/data",
            format!(
                r#"{{"drive_id":"data","path_on_host":"{img}","is_root_device":false,"io_engine":"Turbo"}}"#
            ),
            "unknown variant `Turbo`",
        ),
        (
            "PUT",
            "/drives/data",
            format!(r#"{{"drive_id":"data","socket":"{missing}","is_root_device":false}}"#),
            "no vhost-user",
        ),
        (
            "PUT",
            "/drives/data",
            format!(
                r#"{{"drive_id":"data","path_on_host":"{img}","is_root_device":false,"rate_limiter":{{"bandwidth":{{"size":-1,"refill_time":100}}}}}}"#
            ),
            "invalid value: integer `-1`",
        ),
        (
            "PUT",
            "/drives/data",
            format!(
                r#"{{"drive_id":"data","path_on_host":"{img}","is_root_device":false,"rate_limiter":{{"ops":{{"size":100}}}}}}"#
            ),
            "missing field `refill_time`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":33,"mem_size_mib":128}"#.into(),
            "The number of vCPUs must be greater than 0, less than 32",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":3,"mem_size_mib":128,"smt":true}"#.into(),
            "must be 1 or an even number if SMT is enabled",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":129,"huge_pages":"2M"}"#.into(),
            "not a multiple of the configured page size",
        ),
        (
            "PUT",
            "/machine-config",
            r#"[2, 128]"#.into(),
            "expected a JSON object",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type":"FlushMetrics"}"#.into(),
            "not supported before starting",
        ),
        (
            "PATCH",
            "/vm",
            r#"{"state":"Paused"}"#.into(),
            "not supported before starting",
        ),
    ];
    for (method, path, body, needle) in &refused {
        let (code, resp) = request(&sock, method, path, Some(body));
        assert_eq!(code, 400, "{method} {path} {body}: {resp}");
        assert!(
            fault(&resp).contains(needle),
            "{method} {path} {body}: {resp}"
        );
    }

    let accepted: Vec<(&str, String)> = vec![
        (
            "/boot-source",
            format!(r#"{{"kernel_image_path":"{kernel}","boot_args":"console=ttyS0"}}"#),
        ),
        (
            "/drives/a_drive_id_longer_than_twenty_bytes",
            format!(
                r#"{{"drive_id":"a_drive_id_longer_than_twenty_bytes","path_on_host":"{img}","is_root_device":false,
                    "io_engine":"Async","rate_limiter":{{"bandwidth":{{"size":1048576,"refill_time":100,"one_time_burst":4096}}}}}}"#
            ),
        ),
        (
            "/metrics",
            format!(
                r#"{{"metrics_path":"{}","emit_id":true}}"#,
                scratch.file("m.json")
            ),
        ),
        (
            "/serial",
            format!(r#"{{"serial_out_path":"{}"}}"#, scratch.file("console.log")),
        ),
        (
            "/machine-config",
            r#"{"vcpu_count":32,"mem_size_mib":256,"smt":true}"#.into(),
        ),
    ];
    for (path, body) in &accepted {
        let (code, resp) = request(&sock, "PUT", path, Some(body));
        assert_eq!(code, 204, "PUT {path} {body}: {resp}");
    }
    let (code, body) = request(&sock, "GET", "/vm/config", None);
    assert_eq!(code, 200, "{body}");
    let cfg: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let drive = &cfg["drives"][0];
    assert_eq!(drive["io_engine"], "Async", "{body}");
    assert_eq!(
        drive["cache_type"], "Unsafe",
        "Firecracker's default: {body}"
    );
    assert_eq!(
        drive["rate_limiter"]["bandwidth"]["size"], 1048576,
        "{body}"
    );
    assert_eq!(
        drive["rate_limiter"]["bandwidth"]["one_time_burst"], 4096,
        "{body}"
    );
    drop(srv);
}

/// Pause and resume a real guest over the socket, with its console in a
/// file (`PUT /serial`): a guest loop prints a tick a second; while paused
/// no tick is printed, after resume they continue.
#[test]
fn a_paused_guest_stops_and_a_resumed_one_continues() {
    if !kvm_available("a_paused_guest_stops_and_a_resumed_one_continues") {
        return;
    }
    let scratch = Scratch::new("api-pause");
    let sock = scratch.path.join("api.sock");
    let rootfs = scratch.file("rootfs.ext4");
    std::fs::copy(guest_dir().join("rootfs.ext4"), &rootfs).expect("copy rootfs");
    let script = scratch.file("script.img");
    // Builtins only (a fork costs most of a second under PVM): `read -t 1`
    // on the console, which gets no input, is a one-second sleep.
    ringvm_tests::script_image(
        &script,
        "i=0\nwhile [ $i -lt 100000 ]; do echo \"TICK $i\"; i=$((i+1)); read -t 1 _; done",
    );
    let console = scratch.path.join("console.log");
    let mut srv = Served::start(&sock, &[]);
    let kernel = guest_dir().join("vmlinux");
    let put = |path: &str, body: serde_json::Value| {
        let (code, resp) = request(&sock, "PUT", path, Some(&body.to_string()));
        assert_eq!(code, 204, "PUT {path}: {resp}");
    };
    put(
        "/boot-source",
        serde_json::json!({"kernel_image_path": kernel,
            "boot_args": "console=ttyS0 reboot=k panic=-1 guest.script=/dev/vdb"}),
    );
    put(
        "/drives/rootfs",
        serde_json::json!({"drive_id":"rootfs","path_on_host":rootfs,"is_root_device":true}),
    );
    put(
        "/drives/script",
        serde_json::json!({"drive_id":"script","path_on_host":script,"is_root_device":false,"is_read_only":true}),
    );
    put("/serial", serde_json::json!({ "serial_out_path": console }));
    let (code, body) = request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    );
    assert_eq!(code, 204, "{body}");

    let ticks = || -> Vec<u64> {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("TICK ")?.parse().ok())
            .collect()
    };
    let wait_tick = |above: Option<u64>, within: Duration| -> Option<u64> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let last = ticks().last().copied();
            if last.is_some() && last > above {
                return last;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    };
    let first = wait_tick(Some(1), Duration::from_secs(900)).unwrap_or_else(|| {
        panic!(
            "no guest ticks in the serial file: {:?}",
            std::fs::read_to_string(&console).unwrap_or_default()
        )
    });
    // The console went to the file, not to stdout.
    assert!(
        !srv.wait_for("TICK", Duration::from_millis(500)),
        "console output reached stdout: {:?}",
        srv.console
    );

    let (code, body) = request(&sock, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(code, 204, "{body}");
    let (_, body) = request(&sock, "GET", "/", None);
    assert!(body.contains(r#""state":"Paused""#), "{body}");
    let at_pause = std::fs::read(&console).expect("console file").len();
    std::thread::sleep(Duration::from_secs(6));
    let after = std::fs::read(&console).expect("console file").len();
    assert_eq!(
        at_pause,
        after,
        "the guest printed while paused: {:?}",
        &String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default())[at_pause..]
    );
    // A paused VM still answers runtime requests; configuration stays refused.
    let (code, body) = request(
        &sock,
        "PATCH",
        "/drives/script",
        Some(r#"{"drive_id":"script","rate_limiter":{"ops":{"size":1000,"refill_time":1000}}}"#),
    );
    assert_eq!(code, 204, "{body}");
    let (_, body) = request(&sock, "GET", "/vm/config", None);
    assert!(
        body.contains(r#""ops":{"size":1000,"refill_time":1000}"#),
        "{body}"
    );

    let last_before = ticks().last().copied();
    let (code, body) = request(&sock, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
    assert_eq!(code, 204, "{body}");
    let (_, body) = request(&sock, "GET", "/", None);
    assert!(body.contains(r#""state":"Running""#), "{body}");
    let resumed = wait_tick(last_before, Duration::from_secs(300));
    assert!(
        resumed.is_some(),
        "no tick after resume (last {last_before:?}, first {first})"
    );
    drop(srv);
}
