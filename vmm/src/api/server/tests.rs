//! The API server end to end over a real socket, against a fake VMM
//! thread that answers through a real controller.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown as NetShutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{ApiError, ApiServer, ServerOptions, Timeouts, MAX_CONNECTIONS};
use crate::api::controller::{CommandOutput, Controller, Decision, VmCommand};
use crate::api::http::{self, HttpError};
use crate::api::types::{ApiRequest, ApiResponse};
use crate::config::VmConfig;
use crate::seccomp::Filters;

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ringvm-api-{name}-{}.sock", std::process::id()))
}

/// What the fake VMM thread does with each request.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answer through a real controller.
    Controller,
    /// Drop the responder without answering.
    Drop,
}

/// A VMM thread that waits on `requests_fd` the way the ring does (a
/// blocking 8-byte read), then drains the queue.
struct FakeVmm {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    api: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl FakeVmm {
    fn start(name: &str, max_payload: usize, max_connections: usize, mode: Mode) -> Self {
        Self::start_with(
            name,
            max_payload,
            max_connections,
            Timeouts::default(),
            mode,
        )
    }

    /// The API thread runs under ringvm's own API seccomp filter, so
    /// every test here also checks that list: a syscall missing from it
    /// kills the test process with SIGSYS.
    fn start_with(
        name: &str,
        max_payload: usize,
        max_connections: usize,
        timeouts: Timeouts,
        mode: Mode,
    ) -> Self {
        let path = socket_path(name);
        let _ = std::fs::remove_file(&path);
        let options = ServerOptions {
            max_payload,
            max_connections,
            timeouts,
            filters: Filters::builtin().unwrap(),
        };
        let (handle, api) = ApiServer::start_with(&path, options).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut controller = Controller::new("test-vm", VmConfig::default())
                .with_host_check(Box::new(crate::api::host_check::AcceptAll));
            let mut pfd = libc::pollfd {
                fd: handle.requests_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            while !stop2.load(Ordering::Relaxed) {
                // SAFETY: `pfd` is one valid pollfd for the duration of the call.
                let n = unsafe { libc::poll(&mut pfd, 1, 20) };
                if n <= 0 {
                    continue;
                }
                // Reset the counter first, then drain: what the ring read does.
                let mut counter = [0u8; 8];
                // SAFETY: reads 8 bytes into `counter` from the readable eventfd.
                unsafe { libc::read(handle.requests_fd(), counter.as_mut_ptr().cast(), 8) };
                while let Some((request, responder)) = handle.try_recv() {
                    if mode == Mode::Drop {
                        drop(responder);
                        continue;
                    }
                    let answer = match controller.handle(request) {
                        Decision::Respond(r) => r,
                        Decision::Start(_) => controller.start_result::<String>(Ok(())),
                        Decision::Execute(VmCommand::GetVmConfig) => {
                            let live = controller.config().clone();
                            controller.complete::<String>(
                                VmCommand::GetVmConfig,
                                Ok(CommandOutput::VmConfig(Box::new(live))),
                            )
                        }
                        Decision::Execute(c) => {
                            controller.complete::<String>(c, Ok(CommandOutput::Done))
                        }
                    };
                    responder.respond(answer);
                }
            }
            // Dropping `handle` shuts the API thread down.
        });
        Self {
            stop,
            thread: Some(thread),
            api: Some(api),
            path,
        }
    }

    fn connect(&self) -> Client {
        Client::new(UnixStream::connect(&self.path).unwrap())
    }

    fn stop(mut self) -> PathBuf {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        if let Some(t) = self.api.take() {
            t.join().unwrap();
        }
        self.path.clone()
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<String>,
    body: String,
}

impl Resp {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn closes(&self) -> bool {
        self.headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case("connection: close"))
    }
}

impl Client {
    fn new(s: UnixStream) -> Self {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }

    fn send(&mut self, raw: &[u8]) {
        self.w.write_all(raw).unwrap();
    }

    fn request(&mut self, method: &str, path: &str, body: &str) -> Resp {
        let raw = if body.is_empty() {
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
        } else {
            format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        self.send(raw.as_bytes());
        self.read()
    }

    fn read(&mut self) -> Resp {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = vec![];
        let mut len = 0;
        loop {
            let mut h = String::new();
            self.r.read_line(&mut h).unwrap();
            let h = h.trim_end().to_string();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.strip_prefix("Content-Length: ") {
                len = v.parse().unwrap();
            }
            headers.push(h);
        }
        let mut body = vec![0; len];
        self.r.read_exact(&mut body).unwrap();
        Resp {
            status,
            headers,
            body: String::from_utf8(body).unwrap(),
        }
    }

    /// True when the server closed the connection: end of file, or a
    /// reset when it closed with our unread bytes in its queue (Linux
    /// flags ECONNRESET on the peer of an AF_UNIX socket closed so).
    fn at_eof(&mut self) -> bool {
        let mut rest = vec![];
        match self.r.read_to_end(&mut rest) {
            Ok(0) => true,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset && rest.is_empty(),
            Ok(_) => false,
        }
    }
}

#[test]
fn a_firecracker_boot_sequence_on_one_connection() {
    let vmm = FakeVmm::start(
        "sequence",
        http::DEFAULT_MAX_PAYLOAD,
        MAX_CONNECTIONS,
        Mode::Controller,
    );
    let mut c = vmm.connect();
    let r = c.request("GET", "/", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "Not started");
    assert_eq!(r.json()["id"], "test-vm");
    assert!(r
        .headers
        .iter()
        .any(|h| h == "Content-Type: application/json"));
    let r = c.request(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":2,"mem_size_mib":256}"#,
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert!(r.body.is_empty());
    assert_eq!(
        c.request(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path":"/vmlinux","boot_args":"console=ttyS0"}"#
        )
        .status,
        204
    );
    let r = c.request(
        "PUT",
        "/drives/rootfs",
        r#"{"drive_id":"rootfs","path_on_host":"/img","is_root_device":true,"is_read_only":false}"#,
    );
    assert_eq!(r.status, 204);
    let r = c.request(
        "PUT",
        "/drives/rootfs",
        r#"{"drive_id":"other","path_on_host":"/img","is_root_device":false}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        "The id from the path does not match the id from the body!"
    );
    assert!(!r.closes());
    let r = c.request("GET", "/machine-config", "");
    assert_eq!(r.json()["vcpu_count"], 2);
    assert_eq!(
        c.request("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#)
            .status,
        204
    );
    assert_eq!(c.request("GET", "/", "").json()["state"], "Running");
    let r = c.request("PUT", "/boot-source", r#"{"kernel_image_path":"/k"}"#);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        "The requested operation is not supported after starting the microVM."
    );
    let r = c.request("GET", "/vm/config", "");
    assert_eq!(r.json()["drives"][0]["drive_id"], "rootfs");
    assert_eq!(
        c.request(
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/new"}"#
        )
        .status,
        204
    );
    assert_eq!(
        c.request("PUT", "/actions", r#"{"action_type":"SendCtrlAltDel"}"#)
            .status,
        204
    );
    let r = c.request("DELETE", "/drives/rootfs", "");
    assert_eq!(
        r.fault(),
        "Invalid request method and/or path: DELETE drives/rootfs."
    );
    let r = c.request("GET", "/nowhere", "");
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        "Invalid request method and/or path: GET nowhere."
    );
    let r = c.request(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":2,"mem_size_mib":256,"bogus":1}"#,
    );
    assert!(r.fault().contains("unknown field `bogus`"), "{r:?}");
    drop(c);
    let path = vmm.stop();
    assert!(!path.exists(), "the socket is unlinked on shutdown");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let vmm = FakeVmm::start(
        "pipeline",
        http::DEFAULT_MAX_PAYLOAD,
        MAX_CONNECTIONS,
        Mode::Controller,
    );
    let mut c = vmm.connect();
    let body = r#"{"vcpu_count":3,"mem_size_mib":128}"#;
    c.send(
        format!(
            "PUT /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}\
             GET /machine-config HTTP/1.1\r\n\r\n\
             GET /bogus HTTP/1.1\r\n\r\n\
             GET /version HTTP/1.1\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(c.read().status, 204);
    assert_eq!(c.read().json()["vcpu_count"], 3);
    assert_eq!(c.read().status, 400);
    assert_eq!(
        c.read().json()["firecracker_version"],
        crate::api::controller::VMM_VERSION
    );
    vmm.stop();
}

#[test]
fn requests_split_into_pieces() {
    let vmm = FakeVmm::start(
        "pieces",
        http::DEFAULT_MAX_PAYLOAD,
        MAX_CONNECTIONS,
        Mode::Controller,
    );
    let mut c = vmm.connect();
    let body = r#"{"kernel_image_path":"/vmlinux"}"#;
    let raw = format!(
        "PUT /boot-source HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for piece in raw.as_bytes().chunks(7) {
        c.send(piece);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(c.read().status, 204);
    vmm.stop();
}

#[test]
fn expect_100_continue() {
    let vmm = FakeVmm::start(
        "continue",
        http::DEFAULT_MAX_PAYLOAD,
        MAX_CONNECTIONS,
        Mode::Controller,
    );
    let mut c = vmm.connect();
    let body = r#"{"kernel_image_path":"/k"}"#;
    c.send(
        format!(
            "PUT /boot-source HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(c.read().status, 100);
    c.send(body.as_bytes());
    assert_eq!(c.read().status, 204);
    vmm.stop();
}

#[test]
fn huge_content_length_is_refused_without_reading_the_body() {
    let vmm = FakeVmm::start(
        "huge",
        http::DEFAULT_MAX_PAYLOAD,
        MAX_CONNECTIONS,
        Mode::Controller,
    );
    let mut c = vmm.connect();
    c.send(b"PUT /drives/x HTTP/1.1\r\nContent-Length: 1000000000000\r\n\r\n");
    // Keep sending body bytes from another thread: the server must
    // answer and close, not buffer them.
    let mut w = c.w.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 65536];
        let mut sent = 0usize;
        while sent < (64 << 20) {
            match w.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    });
    let r = c.read();
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        "Request payload with size 1000000000000 is larger than the limit of 51200 allowed by server."
    );
    assert!(r.closes());
    assert!(c.at_eof());
    let sent = writer.join().unwrap();
    assert!(sent < (64 << 20), "the server kept reading a refused body");
    // The server is fine afterwards.
    assert_eq!(vmm.connect().request("GET", "/version", "").status, 200);
    vmm.stop();
}

#[test]
fn custom_payload_limit() {
    let vmm = FakeVmm::start("limit", 16, MAX_CONNECTIONS, Mode::Controller);
    let r = vmm
        .connect()
        .request("PUT", "/boot-source", r#"{"kernel_image_path":"/vmlinux"}"#);
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("larger than the limit of 16"), "{r:?}");
    vmm.stop();
}

#[test]
fn garbage_and_bad_framing_get_400_and_close() {
    let vmm = FakeVmm::start(
        "garbage",
        http::DEFAULT_MAX_PAYLOAD,
        MAX_CONNECTIONS,
        Mode::Controller,
    );
    for raw in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello TLS\r\n\r\n"[..],
        b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\n\n",
        b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    ] {
        let mut c = vmm.connect();
        c.send(raw);
        let r = c.read();
        assert_eq!(r.status, 400, "{raw:?}");
        assert!(!r.fault().is_empty());
        assert!(r.closes());
        assert!(c.at_eof());
    }
    let mut c = vmm.connect();
    c.send(&vec![b'A'; http::MAX_HEADER_BYTES + 10]);
    let r = c.read();
    assert!(r.fault().contains("header section is larger"), "{r:?}");
    vmm.stop();
}

#[test]
fn half_closed_connections() {
    let vmm = FakeVmm::start(
        "halfclose",
        http::DEFAULT_MAX_PAYLOAD,
        MAX_CONNECTIONS,
        Mode::Controller,
    );
    // A complete request, then shutdown(WR): still answered.
    let mut c = vmm.connect();
    c.send(b"GET /version HTTP/1.1\r\n\r\n");
    c.w.shutdown(NetShutdown::Write).unwrap();
    assert_eq!(c.read().status, 200);
    assert!(c.at_eof());
    // Hanging up mid-request: 400 and close.
    let mut c = vmm.connect();
    c.send(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"kern");
    c.w.shutdown(NetShutdown::Write).unwrap();
    let r = c.read();
    assert_eq!(r.status, 400);
    assert_eq!(r.fault(), HttpError::Truncated.to_string());
    assert!(c.at_eof());
    // Closing outright while the VMM works on a request: nothing breaks.
    let mut c = vmm.connect();
    c.send(b"GET / HTTP/1.1\r\n\r\n");
    drop(c);
    assert_eq!(vmm.connect().request("GET", "/", "").status, 200);
    vmm.stop();
}

#[test]
fn a_slow_client_does_not_block_others() {
    let vmm = FakeVmm::start(
        "slow",
        http::DEFAULT_MAX_PAYLOAD,
        MAX_CONNECTIONS,
        Mode::Controller,
    );
    let mut slow = vmm.connect();
    slow.send(b"PUT /boot-source HTTP/1.1\r\nContent-Len");
    // A client that pipelines and never reads its answers.
    // One write, so the test thread cannot block on its own send buffer.
    let mut deaf = vmm.connect();
    deaf.send(&b"GET /machine-config HTTP/1.1\r\n\r\n".repeat(1500));
    let mut fast = vmm.connect();
    for _ in 0..20 {
        assert_eq!(fast.request("GET", "/version", "").status, 200);
    }
    slow.send(b"gth: 26\r\n\r\n{\"kernel_image_path\":\"/k\"}");
    assert_eq!(slow.read().status, 204);
    assert_eq!(deaf.read().status, 200);
    vmm.stop();
}

#[test]
fn two_hundred_concurrent_connections() {
    let vmm = FakeVmm::start(
        "many",
        http::DEFAULT_MAX_PAYLOAD,
        MAX_CONNECTIONS,
        Mode::Controller,
    );
    let mut clients: Vec<Client> = (0..200).map(|_| vmm.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let body =
            format!(r#"{{"drive_id":"d{i}","path_on_host":"/img{i}","is_root_device":false}}"#);
        c.send(
            format!(
                "PUT /drives/d{i} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    let mut ok = 0;
    let mut too_many = 0;
    for c in &mut clients {
        match c.read().status {
            204 => ok += 1,
            // More drives than virtio slots: refused by validation.
            400 => too_many += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(ok, crate::config::MAX_VIRTIO_DEVICES);
    assert_eq!(ok + too_many, 200);
    vmm.stop();
    drop(clients);

    // And from 200 threads at once.
    let vmm = FakeVmm::start(
        "threads",
        http::DEFAULT_MAX_PAYLOAD,
        MAX_CONNECTIONS,
        Mode::Controller,
    );
    let path = vmm.path.clone();
    let threads: Vec<_> = (0..200)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut c = Client::new(UnixStream::connect(&path).unwrap());
                (0..3)
                    .map(|_| c.request("GET", "/", "").status)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), [200, 200, 200]);
    }
    vmm.stop();
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    let vmm = FakeVmm::start("maxconn", http::DEFAULT_MAX_PAYLOAD, 4, Mode::Controller);
    let mut held: Vec<Client> = (0..4).map(|_| vmm.connect()).collect();
    for c in &mut held {
        assert_eq!(c.request("GET", "/", "").status, 200);
    }
    let mut extra = vmm.connect();
    let r = extra.read();
    assert_eq!(r.status, 503);
    assert!(extra.at_eof());
    drop(held.pop());
    // The freed slot is usable once the server has noticed the close.
    let mut status = 0;
    for _ in 0..100 {
        let mut c = vmm.connect();
        c.send(b"GET / HTTP/1.1\r\n\r\n");
        status = c.read().status;
        if status == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(status, 200);
    vmm.stop();
}

#[test]
fn a_dropped_responder_answers_500() {
    let vmm = FakeVmm::start(
        "dropped",
        http::DEFAULT_MAX_PAYLOAD,
        MAX_CONNECTIONS,
        Mode::Drop,
    );
    let mut c = vmm.connect();
    let r = c.request("GET", "/", "");
    assert_eq!(r.status, 500);
    // The connection stays usable.
    assert_eq!(c.request("GET", "/", "").status, 500);
    // Routing errors never reach the VMM.
    assert_eq!(c.request("GET", "/nope", "").status, 400);
    vmm.stop();
}

#[test]
fn stale_sockets_are_replaced_but_other_files_are_not() {
    let path = socket_path("stale");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let (handle, thread) =
        ApiServer::start(&path, http::DEFAULT_MAX_PAYLOAD, Filters::none()).unwrap();
    let mut c = Client::new(UnixStream::connect(&path).unwrap());
    c.send(b"GET / HTTP/1.1\r\n\r\n");
    // Nobody serves the VMM side here: the request waits in the queue.
    let (request, responder) = loop {
        if let Some(x) = handle.try_recv() {
            break x;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(request, ApiRequest::GetInstanceInfo);
    responder.respond(ApiResponse::ok(&serde_json::json!({"hand": "made"})));
    assert_eq!(c.read().json()["hand"], "made");
    drop(handle);
    thread.join().unwrap();
    assert!(!path.exists());

    std::fs::write(&path, b"not a socket").unwrap();
    let err = ApiServer::start(&path, http::DEFAULT_MAX_PAYLOAD, Filters::none()).unwrap_err();
    assert!(matches!(err, ApiError::NotASocket(_)), "{err}");
    assert!(path.exists());
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn stalled_connections_give_their_slots_back() {
    let timeouts = Timeouts {
        request: Duration::from_millis(300),
        idle: Duration::from_millis(400),
        write: Duration::from_millis(300),
    };
    let vmm = FakeVmm::start_with(
        "timeouts",
        http::DEFAULT_MAX_PAYLOAD,
        4,
        timeouts,
        Mode::Controller,
    );
    // Two connections that say nothing, two that never finish a header.
    let mut silent: Vec<Client> = (0..2).map(|_| vmm.connect()).collect();
    let mut partial: Vec<Client> = (0..2).map(|_| vmm.connect()).collect();
    for c in &mut partial {
        c.send(b"PUT /boot-source HTTP/1.1\r\nContent-Len");
    }
    // Every slot is taken: a fifth client is turned away at once.
    let mut extra = vmm.connect();
    assert_eq!(extra.read().status, 503);
    std::thread::sleep(Duration::from_millis(700));
    // The half-sent requests were answered 408 and closed; the silent
    // connections were closed.
    for c in &mut partial {
        let r = c.read();
        assert_eq!(r.status, 408, "{r:?}");
        assert!(r.fault().contains("not complete"), "{r:?}");
        assert!(c.at_eof());
    }
    for c in &mut silent {
        assert!(c.at_eof());
    }
    // And the slots are free again.
    let mut fresh = vmm.connect();
    assert_eq!(fresh.request("GET", "/", "").status, 200);
    // A kept-alive connection that keeps asking is not idle.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(fresh.request("GET", "/", "").status, 200);
    }
    vmm.stop();
}

#[test]
fn a_client_that_never_reads_its_answers_is_let_go() {
    let timeouts = Timeouts {
        request: Duration::from_secs(10),
        idle: Duration::from_secs(10),
        write: Duration::from_millis(300),
    };
    let vmm = FakeVmm::start_with(
        "deaf",
        http::DEFAULT_MAX_PAYLOAD,
        2,
        timeouts,
        Mode::Controller,
    );
    let mut deaf = vmm.connect();
    // Far more answers than a socket buffer holds; it reads none.
    deaf.send(&b"GET /machine-config HTTP/1.1\r\n\r\n".repeat(3000));
    std::thread::sleep(Duration::from_millis(900));
    // Its connection is gone: after what was already buffered, EOF.
    let mut rest = Vec::new();
    let _ = deaf.r.read_to_end(&mut rest);
    assert!(!rest.is_empty());
    let mut c = vmm.connect();
    assert_eq!(c.request("GET", "/", "").status, 200);
    let mut c2 = vmm.connect();
    assert_eq!(c2.request("GET", "/", "").status, 200);
    vmm.stop();
}
