//! The host side of Firecracker's hybrid vsock: plain Unix sockets.
//!
//! - Host-initiated: ringvm listens on `uds_path`; a client connects and
//!   writes `CONNECT <port>\n`; once the guest accepts, ringvm answers
//!   `OK <host_port>\n` and the socket carries the stream.
//! - Guest-initiated: a guest connection to host port P is connected to
//!   the Unix socket `<uds_path>_<P>`, which host software listens on.
//!
//! The listener is non-blocking (accepted on readiness); connection
//! sockets are left blocking, so the ring's reads and writes on them wait
//! for readiness in the kernel instead of failing with EAGAIN.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Longest `CONNECT <port>\n` line read from a host client.
pub const MAX_CONNECT_LINE: usize = 32;

/// Binds and listens on `path` (which must not exist yet, as in
/// Firecracker), non-blocking.
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Takes one pending client, if any (`None` when none waits). The socket
/// is blocking and close-on-exec.
pub fn accept(listener: &UnixListener) -> io::Result<Option<OwnedFd>> {
    match listener.accept() {
        Ok((stream, _)) => Ok(Some(OwnedFd::from(stream))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// The Unix socket a guest connection to host port `port` goes to.
pub fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = OsString::from(uds.as_os_str());
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Connects to `path` without ever waiting: a listener whose backlog is
/// full refuses (EAGAIN) like one that is absent. The socket is then made
/// blocking for the ring (see the module doc).
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall; the returned fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    set_blocking(sock.as_raw_fd())?;
    Ok(sock)
}

/// Clears O_NONBLOCK with fcntl (the VMM thread's seccomp list has it;
/// std's `set_nonblocking` uses an ioctl it does not).
fn set_blocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Ends the host socket's write side: the guest will send no more.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: a plain syscall on an fd the caller owns.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The guest port of a `CONNECT <port>\n` line (with its newline), or
/// `None` if the line is anything else.
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let rest = line.strip_prefix(b"CONNECT ")?.strip_suffix(b"\n")?;
    let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
    let text = std::str::from_utf8(rest).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Writes `OK <port>\n` into `buf`; returns its length.
pub fn ok_line(port: u32, buf: &mut [u8; MAX_CONNECT_LINE]) -> usize {
    let text = format!("OK {port}\n");
    let n = text.len().min(buf.len());
    if let (Some(dst), Some(src)) = (buf.get_mut(..n), text.as_bytes().get(..n)) {
        dst.copy_from_slice(src);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse_strictly() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 52\r\n"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967296\n"), None);
        assert_eq!(parse_connect(b"CONNECT -1\n"), None);
        assert_eq!(parse_connect(b"CONNECT \n"), None);
        assert_eq!(parse_connect(b"CONNECT 52"), None);
        assert_eq!(parse_connect(b"connect 52\n"), None);
        assert_eq!(parse_connect(b"CONNECT 5x\n"), None);
        assert_eq!(parse_connect(b"\xff\xfe\n"), None);
    }

    #[test]
    fn ok_lines_and_port_paths() {
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let n = ok_line(1_073_741_824, &mut buf);
        assert_eq!(&buf[..n], b"OK 1073741824\n");
        assert_eq!(
            port_path(Path::new("/run/v.sock"), 52),
            PathBuf::from("/run/v.sock_52")
        );
    }

    #[test]
    fn connecting_to_a_missing_or_full_socket_fails_at_once() -> io::Result<()> {
        let dir = vmm_sys_util::tempdir::TempDir::new()?;
        let missing = dir.as_path().join("none");
        assert!(connect(&missing).is_err());
        let path = dir.as_path().join("l");
        let l = UnixListener::bind(&path)?;
        // SAFETY: a plain syscall on the listener's fd: a backlog of 1.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 1) }, 0);
        // Fill the backlog: later connects must not block.
        let mut held = Vec::new();
        let mut refused = false;
        for _ in 0..64 {
            match connect(&path) {
                Ok(s) => held.push(s),
                Err(_) => {
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused, "a full backlog must refuse, not block");
        drop(l);
        Ok(())
    }
}
