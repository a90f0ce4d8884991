//! What the VMM thread may add when it serves a virtio-vsock device:
//! Firecracker's hybrid vsock host side, Unix sockets only. Only a VM
//! with a vsock device gets these. Readiness, reads and writes go through
//! the ring (poll, readv, writev); these are the socket calls around them.

use super::rules::{allow_call, arg_in, Rule};

/// The VMM thread's extra rules while it serves a vsock device.
pub fn rules() -> Vec<Rule> {
    vec![
        allow_call!(
            SYS_accept4,
            "take a host client from the vsock listener (uds_path)"
        ),
        allow_call!(
            SYS_socket,
            "a guest connection to host port P: a Unix socket to <uds_path>_P",
            arg_in(0, &[(libc::AF_UNIX as u64, "AF_UNIX", "Unix sockets only")])
        ),
        allow_call!(SYS_connect, "connect it to <uds_path>_P (non-blocking)"),
        allow_call!(
            SYS_shutdown,
            "the guest's SHUTDOWN SEND ends the host socket's write side",
            arg_in(
                1,
                &[(libc::SHUT_WR as u64, "SHUT_WR", "the guest sends no more")]
            )
        ),
        allow_call!(SYS_unlink, "remove the listener's socket file at exit"),
    ]
}
