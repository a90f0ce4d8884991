//! The API thread: an event-manager (epoll) loop that owns the Unix
//! listener and one subscriber per connection, parses HTTP, routes, and
//! hands each request to the VMM thread.
//!
//! ```text
//!  client ──HTTP──► Connection (API thread)
//!                     │ routes::parse → ApiRequest
//!                     │ mpsc send (ApiRequest, Responder) + write requests eventfd
//!                     ▼
//!                   VMM thread: io_uring read on requests_fd completes,
//!                   ApiHandle::try_recv, Controller::handle, Responder::respond
//!                     │ oneshot send + write the connection's response eventfd
//!                     ▼
//!                   Connection wakes on its eventfd, writes the response
//! ```
//!
//! Why a response eventfd per connection: the VMM side can wake exactly
//! the connection that waits, the event manager dispatches that fd to that
//! subscriber, and no subscriber needs to reach into another. A connection
//! holds at most one request in flight (HTTP/1.1 answers in order), so a
//! pipelining client is served one request at a time, and while it waits
//! its socket is not read: a slow or greedy client costs one buffer, never
//! the loop's time.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::http::{self, HttpError, Parsed, Request, RequestParser};
use super::routes;
use super::types::{ApiRequest, ApiResponse};

/// Connections served at once; more are accepted, told 503 and closed.
pub const MAX_CONNECTIONS: usize = 256;

/// Bytes read from one connection per wake-up, so a client streaming data
/// cannot keep the loop from the others.
const READ_BUDGET: usize = 64 * 1024;

/// Connections accepted per wake-up of the listener, for the same reason.
const ACCEPT_BUDGET: usize = 64;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Something other than a socket sits at the socket path.
    #[error("API socket path {0} exists and is not a socket; not removing it")]
    NotASocket(PathBuf),
    /// A stale socket file could not be removed.
    #[error("cannot remove stale API socket {path}: {source}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `bind` or `listen` failed.
    #[error("cannot bind the API socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for the API: {0}")]
    EventFd(io::Error),
    /// The epoll loop could not be set up.
    #[error("cannot set up the API event loop: {0}")]
    EventManager(String),
    /// The thread could not be spawned.
    #[error("cannot start the API thread: {0}")]
    Thread(io::Error),
}

/// The one-shot way back for one request. Dropping it without answering
/// answers 500, so a client never waits forever on a VMM-side bug.
pub struct Responder {
    tx: Option<Sender<ApiResponse>>,
    ready: Arc<EventFd>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("answered", &self.tx.is_none())
            .finish()
    }
}

impl Responder {
    /// Sends the answer to the waiting connection. If the client has gone
    /// meanwhile the answer is dropped.
    pub fn respond(mut self, response: ApiResponse) {
        self.send(response);
    }

    fn send(&mut self, response: ApiResponse) {
        if let Some(tx) = self.tx.take() {
            if tx.send(response).is_ok() {
                // A full counter (2^64 - 2 wake-ups) is the only failure;
                // the connection is awake then anyway.
                let _ = self.ready.write(1);
            }
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.send(ApiResponse::fault(
            500,
            "The VMM dropped the request without answering it.",
        ));
    }
}

/// The VMM side's end of the API: requests come out of it, answers go
/// back through each request's [`Responder`]. Dropping it stops the API
/// thread.
#[derive(Debug)]
pub struct ApiHandle {
    rx: Receiver<(ApiRequest, Responder)>,
    requests: Arc<EventFd>,
    shutdown: Arc<EventFd>,
}

impl ApiHandle {
    /// A blocking eventfd the API thread writes after queueing requests:
    /// arm an 8-byte read of it on the ring (the read resets the counter),
    /// and on its completion drain [`ApiHandle::try_recv`] before re-arming.
    /// Reset first, drain second, and no request is ever missed.
    pub fn requests_fd(&self) -> RawFd {
        self.requests.as_raw_fd()
    }

    /// The next queued request and the way to answer it, if any.
    pub fn try_recv(&self) -> Option<(ApiRequest, Responder)> {
        self.rx.try_recv().ok()
    }

    /// Asks the API thread to close every connection, unlink the socket
    /// and exit; join its handle to wait for that.
    pub fn shutdown(&self) {
        let _ = self.shutdown.write(1);
    }
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts the API server.
#[derive(Debug)]
pub struct ApiServer;

impl ApiServer {
    /// Binds `path` (removing a stale socket left there by a previous run)
    /// and starts the API thread, accepting bodies up to `max_payload`
    /// bytes. The socket is unlinked when the thread exits.
    pub fn start(path: &Path, max_payload: usize) -> Result<(ApiHandle, JoinHandle<()>), ApiError> {
        Self::start_with_limits(path, max_payload, MAX_CONNECTIONS)
    }

    /// [`ApiServer::start`] with a chosen connection limit.
    pub fn start_with_limits(
        path: &Path,
        max_payload: usize,
        max_connections: usize,
    ) -> Result<(ApiHandle, JoinHandle<()>), ApiError> {
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let unlink = UnlinkOnDrop(path.to_path_buf());
        listener
            .set_nonblocking(true)
            .map_err(|source| ApiError::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        let requests = Arc::new(EventFd::new(0).map_err(ApiError::EventFd)?);
        let shutdown = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(ApiError::EventFd)?);
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let vmm = VmmLink {
            tx,
            wake: requests.clone(),
        };
        let stop = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("ringvm-api".into())
            .spawn(move || {
                let _unlink = unlink;
                let mut api = match ApiLoop::new(listener, stop, vmm, max_payload, max_connections)
                {
                    Ok(api) => api,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                api.run();
            })
            .map_err(ApiError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(ApiError::EventManager(
                    "the API thread died while starting".into(),
                ))
            }
        }
        Ok((
            ApiHandle {
                rx,
                requests,
                shutdown,
            },
            thread,
        ))
    }
}

/// Removes a socket left at `path` by a previous run; refuses to remove
/// anything that is not a socket.
fn remove_stale_socket(path: &Path) -> Result<(), ApiError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| ApiError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(ApiError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ApiError::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
    }
}

struct UnlinkOnDrop(PathBuf);

impl Drop for UnlinkOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How a connection reaches the VMM thread.
#[derive(Clone)]
struct VmmLink {
    tx: Sender<(ApiRequest, Responder)>,
    wake: Arc<EventFd>,
}

/// State the subscribers share with the loop that owns them (one thread,
/// hence `Rc<RefCell>`): subscribers cannot add or remove subscribers
/// from inside `process`, so they leave that work here.
#[derive(Default)]
struct Shared {
    /// Accepted connections waiting to be registered.
    accepted: Vec<UnixStream>,
    /// Tokens of connections that have removed their fds and can go.
    closed: Vec<u64>,
    /// Connections currently registered.
    live: usize,
    /// The listener stopped listening (out of file descriptors).
    listener_paused: bool,
    stop: bool,
}

type Subscriber = Box<dyn MutEventSubscriber>;

struct ApiLoop {
    em: EventManager<Subscriber>,
    shared: Rc<RefCell<Shared>>,
    listener_fd: RawFd,
    listener_id: event_manager::SubscriberId,
    connections: HashMap<u64, event_manager::SubscriberId>,
    next_token: u64,
    vmm: VmmLink,
    max_payload: usize,
}

impl ApiLoop {
    fn new(
        listener: UnixListener,
        shutdown: Arc<EventFd>,
        vmm: VmmLink,
        max_payload: usize,
        max_connections: usize,
    ) -> Result<Self, ApiError> {
        let mut em: EventManager<Subscriber> =
            EventManager::new().map_err(|e| ApiError::EventManager(e.to_string()))?;
        let shared = Rc::new(RefCell::new(Shared::default()));
        let listener_fd = listener.as_raw_fd();
        let listener_id = em.add_subscriber(Box::new(Listener {
            listener,
            shared: shared.clone(),
            max_connections,
        }));
        em.add_subscriber(Box::new(Shutdown {
            fd: shutdown,
            shared: shared.clone(),
        }));
        if shared.borrow().stop {
            return Err(ApiError::EventManager(
                "cannot register the listener".into(),
            ));
        }
        Ok(Self {
            em,
            shared,
            listener_fd,
            listener_id,
            connections: HashMap::new(),
            next_token: 0,
            vmm,
            max_payload,
        })
    }

    fn run(&mut self) {
        let mut paused_at: Option<Instant> = None;
        loop {
            self.housekeeping();
            if self.shared.borrow().stop {
                break;
            }
            // While out of fds, retry the listener every 100 ms instead of
            // spinning on it.
            let paused = self.shared.borrow().listener_paused;
            let timeout = if paused { 100 } else { -1 };
            if let Err(e) = self.em.run_with_timeout(timeout) {
                log::error!("API event loop failed: {e}; the API socket is closing");
                break;
            }
            if paused {
                let since = *paused_at.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_millis(100) {
                    paused_at = None;
                    self.shared.borrow_mut().listener_paused = false;
                    if let Ok(ops) = self.em.event_ops(self.listener_id) {
                        let _ = ops.modify(Events::new_raw(self.listener_fd, EventSet::IN));
                    }
                }
            }
        }
        // Dropping `em` closes every connection.
    }

    /// Registers accepted connections and drops closed ones, until there
    /// is nothing left to do (a registration can fail and close at once).
    fn housekeeping(&mut self) {
        loop {
            let (accepted, closed) = {
                let mut s = self.shared.borrow_mut();
                (
                    std::mem::take(&mut s.accepted),
                    std::mem::take(&mut s.closed),
                )
            };
            if accepted.is_empty() && closed.is_empty() {
                break;
            }
            for token in closed {
                if let Some(id) = self.connections.remove(&token) {
                    // Drops the connection, closing its socket and eventfd.
                    let _ = self.em.remove_subscriber(id);
                }
            }
            for stream in accepted {
                let token = self.next_token;
                self.next_token = self.next_token.wrapping_add(1);
                match Connection::new(
                    token,
                    stream,
                    self.max_payload,
                    self.vmm.clone(),
                    self.shared.clone(),
                ) {
                    Ok(conn) => {
                        let id = self.em.add_subscriber(Box::new(conn));
                        self.connections.insert(token, id);
                    }
                    Err(e) => {
                        log::warn!("API: dropping a connection: cannot create its eventfd: {e}")
                    }
                }
            }
        }
        self.shared.borrow_mut().live = self.connections.len();
    }
}

struct Shutdown {
    fd: Arc<EventFd>,
    shared: Rc<RefCell<Shared>>,
}

impl MutEventSubscriber for Shutdown {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.fd.read();
        self.shared.borrow_mut().stop = true;
    }

    fn init(&mut self, ops: &mut EventOps) {
        if ops.add(Events::new(&*self.fd, EventSet::IN)).is_err() {
            self.shared.borrow_mut().stop = true;
        }
    }
}

struct Listener {
    listener: UnixListener,
    shared: Rc<RefCell<Shared>>,
    max_connections: usize,
}

impl MutEventSubscriber for Listener {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let mut s = self.shared.borrow_mut();
                    if s.live + s.accepted.len() >= self.max_connections {
                        refuse(stream);
                    } else if stream.set_nonblocking(true).is_ok() {
                        s.accepted.push(stream);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::ECONNABORTED) =>
                {
                    continue
                }
                Err(e) => {
                    // EMFILE/ENFILE and the like: stop listening instead of
                    // spinning on a level-triggered listener; the loop
                    // re-arms it shortly.
                    log::warn!("API: accept failed: {e}");
                    let _ = ops.modify(Events::new(&self.listener, EventSet::empty()));
                    self.shared.borrow_mut().listener_paused = true;
                    break;
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if ops.add(Events::new(&self.listener, EventSet::IN)).is_err() {
            self.shared.borrow_mut().stop = true;
        }
    }
}

/// Tells a client over the connection limit why, then closes.
fn refuse(stream: UnixStream) {
    let mut out = Vec::new();
    let r = ApiResponse::fault(503, "Too many API connections; retry later.");
    http::write_response(&mut out, r.status, r.body.as_deref(), false);
    // Best effort: a fresh socket's send buffer takes these few bytes.
    let _ = stream.set_nonblocking(true);
    let _ = send_nosignal(stream.as_raw_fd(), &out);
}

/// `send(2)` with MSG_NOSIGNAL: a client that hung up must cost an EPIPE,
/// not a SIGPIPE that kills the VMM.
fn send_nosignal(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, initialized slice for `buf.len()` bytes and
    // `send` only reads from it; an invalid `fd` yields EBADF, not UB.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n.unsigned_abs())
    }
}

/// One client connection.
struct Connection {
    token: u64,
    stream: UnixStream,
    parser: RequestParser,
    /// Response bytes not yet written, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    /// The request handed to the VMM: its answer channel and whether to
    /// keep the connection open after answering.
    waiting: Option<(Receiver<ApiResponse>, bool)>,
    response_fd: Arc<EventFd>,
    vmm: VmmLink,
    shared: Rc<RefCell<Shared>>,
    /// The client shut down its sending side.
    eof: bool,
    /// Close once the queued output is written.
    closing: bool,
    closed: bool,
    interest: EventSet,
}

impl Connection {
    fn new(
        token: u64,
        stream: UnixStream,
        max_payload: usize,
        vmm: VmmLink,
        shared: Rc<RefCell<Shared>>,
    ) -> io::Result<Self> {
        Ok(Self {
            token,
            stream,
            parser: RequestParser::new(max_payload),
            out: Vec::new(),
            out_pos: 0,
            waiting: None,
            response_fd: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            vmm,
            shared,
            eof: false,
            closing: false,
            closed: false,
            interest: EventSet::IN,
        })
    }

    fn close(&mut self, ops: &mut EventOps) {
        if self.closed {
            return;
        }
        self.closed = true;
        // Unregister before the fds are closed (when the loop drops us), so
        // a reused fd number can never be mistaken for ours.
        let _ = ops.remove(Events::empty(&self.stream));
        let _ = ops.remove(Events::empty(&*self.response_fd));
        self.shared.borrow_mut().closed.push(self.token);
    }

    fn out_pending(&self) -> bool {
        self.out_pos < self.out.len()
    }

    fn queue(&mut self, response: &ApiResponse, keep_alive: bool) {
        http::write_response(
            &mut self.out,
            response.status,
            response.body.as_deref(),
            keep_alive,
        );
        if !keep_alive {
            self.closing = true;
        }
    }

    fn fail(&mut self, error: &HttpError) {
        log::debug!("API: bad request: {error}");
        self.queue(
            &ApiResponse::fault(error.status(), error.to_string()),
            false,
        );
    }

    /// Reads what the socket has, within the read budget and the parser's
    /// buffer limit. Returns false on a hard error.
    fn read_some(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let mut budget = READ_BUDGET;
        while budget > 0 && !self.eof {
            let room = self
                .parser
                .buffer_limit()
                .saturating_sub(self.parser.buffered());
            let want = room.min(chunk.len()).min(budget);
            if want == 0 {
                break;
            }
            match (&self.stream).read(&mut chunk[..want]) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.parser.push(&chunk[..n]);
                    budget = budget.saturating_sub(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Writes queued output. Returns false on a hard error.
    fn flush(&mut self) -> bool {
        while self.out_pending() {
            match send_nosignal(self.stream.as_raw_fd(), &self.out[self.out_pos..]) {
                Ok(0) => return false,
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.out.clear();
        self.out_pos = 0;
        true
    }

    fn dispatch(&mut self, request: Request) {
        log::debug!("API: {} {}", request.method, request.path);
        let api_request = match routes::parse(&request.method, &request.path, &request.body) {
            Ok(r) => r,
            Err(e) => {
                self.queue(&ApiResponse::from(e), request.keep_alive);
                return;
            }
        };
        let (tx, rx) = mpsc::channel();
        let responder = Responder {
            tx: Some(tx),
            ready: self.response_fd.clone(),
        };
        match self.vmm.tx.send((api_request, responder)) {
            Ok(()) => {
                let _ = self.vmm.wake.write(1);
            }
            Err(mpsc::SendError((_, responder))) => responder.respond(ApiResponse::fault(
                503,
                "The VMM is not accepting API requests.",
            )),
        }
        self.waiting = Some((rx, request.keep_alive));
    }

    fn poll_response(&mut self) {
        let Some((rx, keep_alive)) = &self.waiting else {
            return;
        };
        let keep_alive = *keep_alive;
        let response = match rx.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Disconnected) => {
                ApiResponse::fault(500, "The VMM dropped the request without answering it.")
            }
        };
        self.waiting = None;
        self.queue(&response, keep_alive);
    }

    /// Writes, parses and dispatches as far as possible, then sets the
    /// socket's interest to what the connection waits for.
    fn advance(&mut self, ops: &mut EventOps) {
        loop {
            if !self.flush() {
                self.close(ops);
                return;
            }
            if self.out_pending() {
                break;
            }
            if self.closing {
                self.close(ops);
                return;
            }
            if self.waiting.is_some() {
                break;
            }
            match self.parser.next_request() {
                Ok(Some(Parsed::SendContinue)) => http::write_continue(&mut self.out),
                Ok(Some(Parsed::Request(request))) => self.dispatch(request),
                Ok(None) if self.eof => {
                    if self.parser.in_request() {
                        self.fail(&HttpError::Truncated);
                    } else {
                        self.close(ops);
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => self.fail(&e),
            }
        }
        let mut want = EventSet::empty();
        if self.out_pending() {
            want |= EventSet::OUT;
        } else if self.waiting.is_none()
            && !self.closing
            && !self.eof
            && self.parser.buffered() < self.parser.buffer_limit()
        {
            want |= EventSet::IN;
        }
        if want != self.interest {
            self.interest = want;
            if ops.modify(Events::new(&self.stream, want)).is_err() {
                self.close(ops);
            }
        }
    }
}

impl MutEventSubscriber for Connection {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.closed {
            return;
        }
        if events.fd() == self.response_fd.as_raw_fd() {
            let _ = self.response_fd.read();
            self.poll_response();
        } else {
            let set = events.event_set();
            // HUP on a Unix stream means the peer closed both directions:
            // nobody is left to read an answer.
            if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                self.close(ops);
                return;
            }
            if set.contains(EventSet::IN) && !self.read_some() {
                self.close(ops);
                return;
            }
        }
        self.advance(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let ok = ops.add(Events::new(&self.stream, self.interest)).is_ok()
            && ops
                .add(Events::new(&*self.response_fd, EventSet::IN))
                .is_ok();
        if !ok {
            log::warn!("API: cannot register a connection with epoll");
            self.close(ops);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::Shutdown as NetShutdown;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::api::controller::{CommandOutput, Controller, Decision, VmCommand};
    use crate::config::VmConfig;

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
            let path = socket_path(name);
            let (handle, api) =
                ApiServer::start_with_limits(&path, max_payload, max_connections).unwrap();
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
                    handle.requests.read().unwrap();
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
        let r = c.request("PUT", "/drives/rootfs", r#"{"drive_id":"rootfs","path_on_host":"/img","is_root_device":true,"is_read_only":false}"#);
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
    fn the_vmm_side_types_can_move_to_the_vmm_thread() {
        fn send<T: Send>() {}
        send::<ApiHandle>();
        send::<Responder>();
        send::<ApiRequest>();
    }

    #[test]
    fn stale_sockets_are_replaced_but_other_files_are_not() {
        let path = socket_path("stale");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (handle, thread) = ApiServer::start(&path, http::DEFAULT_MAX_PAYLOAD).unwrap();
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
        let err = ApiServer::start(&path, http::DEFAULT_MAX_PAYLOAD).unwrap_err();
        assert!(matches!(err, ApiError::NotASocket(_)), "{err}");
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();
    }
}
