//! The API thread: an event-manager (epoll) loop that owns the Unix
//! listener ([`listener`]) and one subscriber per connection
//! ([`connection`]), parses HTTP, routes, and hands each request to the VMM
//! thread through the [`crate::api::channel`].
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
//! The thread installs its seccomp filter before it serves anything, and
//! closes connections that stall past their [`Timeouts`].

mod connection;
mod listener;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

pub use connection::Timeouts;

use super::channel::{self, ApiHandle, VmmLink};
use crate::seccomp::{Filters, ThreadKind};
use connection::Connection;
use listener::Listener;

/// Connections served at once; more are accepted, told 503 and closed.
pub const MAX_CONNECTIONS: usize = 256;

/// While out of file descriptors, how long the listener rests before it
/// tries to accept again.
const LISTENER_PAUSE: Duration = Duration::from_millis(100);

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Something other than a socket sits at the socket path.
    #[error("API socket path {0} exists and is not a socket; not removing it")]
    NotASocket(PathBuf),
    /// Another process serves the socket.
    #[error("{0} is in use: another process serves it (another ringvm?); not taking it over")]
    InUse(PathBuf),
    /// Whether the socket is live could not be told.
    #[error("cannot tell whether the API socket {path} is in use: {source}")]
    Probe {
        /// The socket path.
        path: PathBuf,
        /// The error from `connect`.
        source: io::Error,
    },
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
    /// The API thread's seccomp filter could not be installed.
    #[error("API thread: {0}")]
    Seccomp(String),
}

/// How the server treats its clients.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Largest request body accepted.
    pub max_payload: usize,
    /// Connections served at once.
    pub max_connections: usize,
    /// How long a stalled connection keeps its slot.
    pub timeouts: Timeouts,
    /// The API thread installs `filters`' API filter before serving.
    pub filters: Filters,
}

impl ServerOptions {
    /// The defaults, with `max_payload` and `filters`.
    pub fn new(max_payload: usize, filters: Filters) -> Self {
        Self {
            max_payload,
            max_connections: MAX_CONNECTIONS,
            timeouts: Timeouts::default(),
            filters,
        }
    }
}

/// Starts the API server.
#[derive(Debug)]
pub struct ApiServer;

impl ApiServer {
    /// Binds `path` (refusing a live socket, replacing a stale one left by
    /// a previous run, owner-only) and starts the API thread under the API
    /// filter of `filters`, accepting bodies up to `max_payload` bytes. The
    /// socket is unlinked when the thread exits.
    pub fn start(
        path: &Path,
        max_payload: usize,
        filters: Filters,
    ) -> Result<(ApiHandle, JoinHandle<()>), ApiError> {
        Self::start_with(path, ServerOptions::new(max_payload, filters))
    }

    /// [`ApiServer::start`] with every option chosen.
    pub fn start_with(
        path: &Path,
        options: ServerOptions,
    ) -> Result<(ApiHandle, JoinHandle<()>), ApiError> {
        let (listener, unlink) = listener::bind(path)?;
        let (handle, vmm, shutdown) = channel::channel().map_err(ApiError::EventFd)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("ringvm-api".into())
            .spawn(move || {
                let _unlink = unlink;
                let filters = options.filters.clone();
                let mut api = match ApiLoop::new(listener, shutdown, vmm, options) {
                    Ok(api) => api,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if let Err(e) = filters.install(ThreadKind::Api) {
                    let _ = ready_tx.send(Err(ApiError::Seccomp(e.to_string())));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                api.run();
            })
            .map_err(ApiError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok((handle, thread)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ApiError::EventManager(
                "the API thread died while starting".into(),
            )),
        }
    }
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
    /// When each connection wants to be woken to check its timeout.
    deadlines: HashMap<u64, Instant>,
    /// Connections currently registered.
    live: usize,
    /// The listener stopped listening (out of file descriptors).
    listener_paused: bool,
    stop: bool,
}

type Subscriber = Box<dyn MutEventSubscriber>;

/// A registered connection, as the loop knows it.
struct ConnectionSlot {
    id: event_manager::SubscriberId,
    wake: Arc<EventFd>,
}

struct ApiLoop {
    em: EventManager<Subscriber>,
    shared: Rc<RefCell<Shared>>,
    listener_fd: RawFd,
    listener_id: event_manager::SubscriberId,
    connections: HashMap<u64, ConnectionSlot>,
    next_token: u64,
    vmm: VmmLink,
    options: ServerOptions,
}

impl ApiLoop {
    fn new(
        listener: UnixListener,
        shutdown: Arc<EventFd>,
        vmm: VmmLink,
        options: ServerOptions,
    ) -> Result<Self, ApiError> {
        let mut em: EventManager<Subscriber> =
            EventManager::new().map_err(|e| ApiError::EventManager(e.to_string()))?;
        let shared = Rc::new(RefCell::new(Shared::default()));
        let listener_fd = listener.as_raw_fd();
        let listener_id = em.add_subscriber(Box::new(Listener {
            listener,
            shared: shared.clone(),
            max_connections: options.max_connections,
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
            options,
        })
    }

    /// How long the next wait may last: until the earliest connection
    /// deadline, and at most [`LISTENER_PAUSE`] while the listener rests.
    fn wait_ms(&self, paused: bool) -> i32 {
        let now = Instant::now();
        let mut wait = self
            .shared
            .borrow()
            .deadlines
            .values()
            .min()
            .map(|at| at.saturating_duration_since(now));
        if paused {
            wait = Some(wait.map_or(LISTENER_PAUSE, |w| w.min(LISTENER_PAUSE)));
        }
        match wait {
            // Round up, so the wake-up is never before the deadline.
            Some(w) => i32::try_from(w.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
            None => -1,
        }
    }

    /// Wakes every connection whose deadline has passed; each checks its
    /// own clock and closes itself (from its own `process`, where it can
    /// unregister its fds).
    fn wake_expired(&self) {
        let now = Instant::now();
        let shared = self.shared.borrow();
        for (token, at) in &shared.deadlines {
            if *at <= now {
                if let Some(slot) = self.connections.get(token) {
                    let _ = slot.wake.write(1);
                }
            }
        }
    }

    fn run(&mut self) {
        let mut paused_at: Option<Instant> = None;
        loop {
            self.housekeeping();
            if self.shared.borrow().stop {
                break;
            }
            let paused = self.shared.borrow().listener_paused;
            if let Err(e) = self.em.run_with_timeout(self.wait_ms(paused)) {
                log::error!("API event loop failed: {e}; the API socket is closing");
                break;
            }
            self.wake_expired();
            if paused {
                let since = *paused_at.get_or_insert_with(Instant::now);
                if since.elapsed() >= LISTENER_PAUSE {
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
                if let Some(slot) = self.connections.remove(&token) {
                    // Drops the connection, closing its socket and eventfd.
                    let _ = self.em.remove_subscriber(slot.id);
                }
            }
            for stream in accepted {
                let token = self.next_token;
                self.next_token = self.next_token.wrapping_add(1);
                match Connection::new(
                    token,
                    stream,
                    self.options.max_payload,
                    self.vmm.clone(),
                    self.shared.clone(),
                    self.options.timeouts,
                ) {
                    Ok(conn) => {
                        let wake = conn.wake_fd();
                        let id = self.em.add_subscriber(Box::new(conn));
                        self.connections.insert(token, ConnectionSlot { id, wake });
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
