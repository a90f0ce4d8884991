//! The API thread: an epoll loop over the listening Unix socket, its
//! connections and one eventfd per connection. It parses HTTP and hands
//! requests to the VMM thread over a channel; it opens no file and
//! touches no VM state, so it needs only socket and epoll calls.

use super::rules::{allow_call, arg_in, malloc_probe_refused, Rule};

/// The API thread's own rules (added to `common.rs`'s).
pub fn rules() -> Vec<Rule> {
    vec![
        allow_call!(SYS_epoll_wait, "wait for sockets, eventfds, or a timeout"),
        allow_call!(SYS_epoll_ctl, "register, re-arm and drop connection fds"),
        allow_call!(SYS_accept4, "accept a client connection"),
        allow_call!(
            SYS_recvfrom,
            "read a request (std's UnixStream::read is recv)"
        ),
        allow_call!(
            SYS_sendto,
            "write a response (send with MSG_NOSIGNAL: no SIGPIPE)"
        ),
        allow_call!(
            SYS_read,
            "reset a connection's response eventfd and the shutdown eventfd"
        ),
        allow_call!(SYS_eventfd2, "one response eventfd per new connection"),
        allow_call!(
            SYS_ioctl,
            "std's set_nonblocking on an accepted connection",
            arg_in(
                1,
                &[(libc::FIONBIO, "FIONBIO", "make the connection non-blocking")]
            )
        ),
        allow_call!(SYS_unlink, "remove the socket file as the API stops"),
        allow_call!(
            SYS_openat,
            "refused (EACCES): glibc malloc's one-time overcommit probe",
            malloc_probe_refused()
        ),
    ]
}
