//! Test-only (cargo feature `broken-seccomp`): a VMM thread that, once its
//! filter is in place, makes a syscall no list allows, so the integration
//! tests can watch a violation end the process with SIGSYS and its log
//! line. It fires only when `RINGVM_TEST_FORBIDDEN_SYSCALL=1` is set, so
//! the same test build can serve the other broken-build tests.

/// Opens an IPv4 socket (what a compromised VMM thread would try) if the
/// environment asks for it; without a filter the socket is closed again.
pub fn forbidden_call() {
    if std::env::var_os("RINGVM_TEST_FORBIDDEN_SYSCALL").is_none() {
        return;
    }
    log::warn!("test build: opening an AF_INET socket on the VMM thread");
    // SAFETY: socket(2) with constant arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd >= 0 {
        log::warn!("test build: the socket was allowed (no seccomp filter)");
        // SAFETY: `fd` is ours and closed once.
        unsafe { libc::close(fd) };
    }
}
