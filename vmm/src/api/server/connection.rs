//! One client connection: read what the socket has (within a budget),
//! parse HTTP, route, hand the request to the VMM thread, write the answer.
//!
//! A connection holds at most one request in flight (HTTP/1.1 answers in
//! order), so a pipelining client is served one request at a time, and
//! while it waits its socket is not read: a slow or greedy client costs one
//! buffer, never the loop's time. A client that stalls costs its slot only
//! for a while: see [`Timeouts`].

use std::cell::RefCell;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::Shared;
use crate::api::channel::VmmLink;
use crate::api::http::{self, HttpError, Parsed, Request, RequestParser};
use crate::api::routes;
use crate::api::types::ApiResponse;

/// Bytes read from one connection per wake-up, so a client streaming data
/// cannot keep the loop from the others.
const READ_BUDGET: usize = 64 * 1024;

/// How long a connection may hold its slot without moving on. Without
/// them, clients that connect and never finish (or never read their
/// answers) fill every slot, and everyone else gets 503 for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From a request's first byte to its last (header and body): a
    /// request not complete by then is answered 408 and the connection
    /// closed.
    pub request: Duration,
    /// A connection with no request under way (just accepted, or answered
    /// and kept alive) is closed after this long.
    pub idle: Duration,
    /// An answer the client does not read is given up (and the connection
    /// closed) after this long without progress.
    pub write: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            request: Duration::from_secs(10),
            idle: Duration::from_secs(15),
            write: Duration::from_secs(10),
        }
    }
}

/// What the connection is doing, which decides its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No request under way.
    Idle,
    /// Part of a request has arrived.
    Reading,
    /// The VMM thread has the request: no deadline, the VMM decides.
    Waiting,
    /// An answer is being written.
    Writing,
}

/// `send(2)` with MSG_NOSIGNAL: a client that hung up must cost an EPIPE,
/// not a SIGPIPE that kills the VMM.
pub(super) fn send_nosignal(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
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
pub(super) struct Connection {
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
    timeouts: Timeouts,
    phase: Phase,
    /// When the current phase began (for writing: the last progress).
    phase_since: Instant,
    /// The client shut down its sending side.
    eof: bool,
    /// Close once the queued output is written.
    closing: bool,
    closed: bool,
    interest: EventSet,
}

impl Connection {
    pub(super) fn new(
        token: u64,
        stream: UnixStream,
        max_payload: usize,
        vmm: VmmLink,
        shared: Rc<RefCell<Shared>>,
        timeouts: Timeouts,
    ) -> io::Result<Self> {
        let conn = Self {
            token,
            stream,
            parser: RequestParser::new(max_payload),
            out: Vec::new(),
            out_pos: 0,
            waiting: None,
            response_fd: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            vmm,
            shared,
            timeouts,
            phase: Phase::Idle,
            phase_since: Instant::now(),
            eof: false,
            closing: false,
            closed: false,
            interest: EventSet::IN,
        };
        conn.publish_deadline();
        Ok(conn)
    }

    /// The eventfd the VMM writes when the answer is ready; the loop writes
    /// it too when the connection's deadline has passed.
    pub(super) fn wake_fd(&self) -> Arc<EventFd> {
        self.response_fd.clone()
    }

    fn deadline(&self) -> Option<Instant> {
        let limit = match self.phase {
            Phase::Idle => self.timeouts.idle,
            Phase::Reading => self.timeouts.request,
            Phase::Writing => self.timeouts.write,
            Phase::Waiting => return None,
        };
        Some(self.phase_since + limit)
    }

    /// Tells the loop when to wake this connection up.
    fn publish_deadline(&self) {
        let mut shared = self.shared.borrow_mut();
        match self.deadline() {
            Some(at) if !self.closed => shared.deadlines.insert(self.token, at),
            _ => shared.deadlines.remove(&self.token),
        };
    }

    /// Moves to the phase the state says, restarting its clock on a change.
    fn update_phase(&mut self) {
        let phase = if self.out_pending() {
            Phase::Writing
        } else if self.waiting.is_some() {
            Phase::Waiting
        } else if self.parser.in_request() || self.parser.buffered() > 0 {
            Phase::Reading
        } else {
            Phase::Idle
        };
        if phase != self.phase {
            self.phase = phase;
            self.phase_since = Instant::now();
        }
        self.publish_deadline();
    }

    /// The deadline passed: a half-sent request is answered 408 (best
    /// effort), and the connection closes.
    fn expire(&mut self, ops: &mut EventOps) {
        log::debug!("API: closing a connection stalled while {:?}", self.phase);
        if self.phase == Phase::Reading {
            let limit = self.timeouts.request.as_secs();
            self.out.clear();
            self.out_pos = 0;
            self.queue(
                &ApiResponse::fault(
                    408,
                    format!("The request was not complete within {limit} s; closing."),
                ),
                false,
            );
            let _ = self.flush();
        }
        self.close(ops);
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
        let mut shared = self.shared.borrow_mut();
        shared.closed.push(self.token);
        shared.deadlines.remove(&self.token);
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
                Ok(n) => {
                    self.out_pos += n;
                    // Progress: the write clock starts again.
                    self.phase_since = Instant::now();
                }
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
        let rx = self.vmm.send(api_request, self.response_fd.clone());
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
                return;
            }
        }
        self.update_phase();
    }
}

impl MutEventSubscriber for Connection {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.closed {
            return;
        }
        if events.fd() == self.response_fd.as_raw_fd() {
            let _ = self.response_fd.read();
            // The loop wakes us when our deadline passed; the state may
            // have moved on since, so look at the clock ourselves.
            if self.deadline().is_some_and(|at| at <= Instant::now()) {
                self.expire(ops);
                return;
            }
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
