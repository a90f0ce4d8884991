//! The listening socket: created owner-only, never over a live socket of
//! another process, accepted from in bounded batches, and refusing clients
//! past the connection limit with a 503.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::connection::send_nosignal;
use super::{ApiError, Shared};
use crate::api::http;
use crate::api::types::ApiResponse;

/// Connections accepted per wake-up of the listener, so a flood of
/// connects cannot keep the loop from the connections it has.
const ACCEPT_BUDGET: usize = 64;

/// Pending connections the kernel queues before `accept`.
const BACKLOG: libc::c_int = 128;

/// Removes the socket file when the API thread ends.
#[derive(Debug)]
pub(super) struct UnlinkOnDrop(PathBuf);

impl Drop for UnlinkOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Makes `path` free for a new socket: nothing there, or a socket nobody
/// listens on any more (a previous run that died), which is removed. A
/// socket that answers belongs to a live process: refused, so a second
/// ringvm cannot cut the first off from its clients. Anything that is not
/// a socket is never removed.
fn clear_stale_socket(path: &Path) -> Result<(), ApiError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => Err(ApiError::InUse(path.to_path_buf())),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => std::fs::remove_file(path)
                .map_err(|source| ApiError::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                }),
            Err(source) => Err(ApiError::Probe {
                path: path.to_path_buf(),
                source,
            }),
        },
        Ok(_) => Err(ApiError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ApiError::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Creates, binds and listens on a Unix socket at `path` whose file is
/// mode 0600 whatever the umask: the socket's inode mode is set before
/// `bind`, which creates the file from it (Linux masks it with the umask,
/// which can only remove bits). No other thread's umask is touched and
/// there is no moment where the file is open to others.
fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: fchmod on our own socket fd.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) })?;
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` covers its family and
    // the NUL-terminated path within it.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            len as libc::socklen_t,
        )
    })?;
    // SAFETY: listen(2) on our bound socket.
    check(unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) })?;
    Ok(UnixListener::from(fd))
}

/// Binds the API socket at `path` (see [`clear_stale_socket`] and
/// [`bind_owner_only`]); the returned guard removes the file again.
pub(super) fn bind(path: &Path) -> Result<(UnixListener, UnlinkOnDrop), ApiError> {
    clear_stale_socket(path)?;
    let bind_err = |source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = bind_owner_only(path).map_err(bind_err)?;
    let unlink = UnlinkOnDrop(path.to_path_buf());
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok((listener, unlink))
}

/// The listener as an event-manager subscriber: it accepts, and leaves the
/// new connections in [`Shared`] for the loop to register.
pub(super) struct Listener {
    pub(super) listener: UnixListener,
    pub(super) shared: Rc<RefCell<Shared>>,
    pub(super) max_connections: usize,
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "ringvm-listener-{name}-{}.sock",
            std::process::id()
        ))
    }

    #[test]
    fn the_socket_file_is_owner_only() {
        let p = path("mode");
        let _ = std::fs::remove_file(&p);
        let (_listener, unlink) = bind(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        drop(unlink);
        assert!(!p.exists());
    }

    #[test]
    fn a_live_socket_is_refused_and_left_alone() {
        let p = path("live");
        let _ = std::fs::remove_file(&p);
        let (_first, _unlink) = bind(&p).unwrap();
        let err = bind(&p).unwrap_err();
        assert!(matches!(err, ApiError::InUse(_)), "{err}");
        assert!(err.to_string().contains(&p.display().to_string()), "{err}");
        // The first one still answers.
        assert!(UnixStream::connect(&p).is_ok());
    }

    #[test]
    fn a_stale_socket_is_replaced_and_other_files_are_not() {
        let p = path("stale");
        let _ = std::fs::remove_file(&p);
        drop(UnixListener::bind(&p).unwrap());
        assert!(p.exists(), "a dropped std listener leaves its file");
        let (_listener, _unlink) = bind(&p).unwrap();
        assert!(UnixStream::connect(&p).is_ok());
        drop(_unlink);

        std::fs::write(&p, b"not a socket").unwrap();
        let err = bind(&p).unwrap_err();
        assert!(matches!(err, ApiError::NotASocket(_)), "{err}");
        assert!(p.exists());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_path_too_long_for_a_socket_is_an_error() {
        let p = std::env::temp_dir().join("x".repeat(120));
        assert!(matches!(bind(&p), Err(ApiError::Bind { .. })));
    }
}
