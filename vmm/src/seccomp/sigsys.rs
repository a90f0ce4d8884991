//! What a seccomp violation looks like from outside: one log line naming
//! the thread and the syscall number, then death by SIGSYS.
//!
//! The filters answer a forbidden syscall with `SECCOMP_RET_TRAP`, which
//! raises SIGSYS in the offending thread with the syscall number in
//! `si_syscall`. `SECCOMP_RET_KILL_PROCESS` would end the process just as
//! surely, but silently (the kernel only tells the audit log); the trap
//! lets ringvm say what happened first. The handler runs in a thread that
//! may be compromised, so it does the least: format into a stack buffer,
//! one `write(2)`, then re-raise SIGSYS with the default action, which
//! kills the whole process.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};

use super::ThreadKind;

thread_local! {
    /// The kind of the current thread, set as its filter is installed so
    /// the handler can name it. A const-initialised `Cell` with no
    /// destructor: reading it is a plain TLS load, safe in a handler.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Where the line goes besides stderr: the log file, when one is
/// configured (the logger keeps this current).
static LOG_FD: AtomicI32 = AtomicI32::new(libc::STDERR_FILENO);

/// Remembers the current thread's kind for the violation line.
pub(super) fn set_thread_kind(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
}

/// Sends violation lines to `fd` (the log file) instead of stderr; `None`
/// goes back to stderr.
pub fn set_log_fd(fd: Option<i32>) {
    LOG_FD.store(fd.unwrap_or(libc::STDERR_FILENO), Ordering::Relaxed);
}

/// Installs the SIGSYS handler for the whole process. Call before any
/// filter is installed (and before threads start, like every sigaction).
pub fn install_handler() -> std::io::Result<()> {
    // SAFETY: sigaction is plain data; zeroed is a valid empty value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    // SA_RESETHAND: the handler runs once, and the SIGSYS it raises at the
    // end meets the default action (dump core = end the process).
    // SA_NODEFER: that SIGSYS is not held back while the handler runs.
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
    // SAFETY: sa_mask is ours; sigemptyset initialises it.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs a handler that only does async-signal-safe work.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The `si_syscall` field of a SIGSYS siginfo (libc's `siginfo_t` does not
/// name the `_sigsys` union member): after the signal number, errno, code
/// and padding to 8 bytes, `_sigsys` holds `void *call_addr; int syscall;
/// unsigned int arch`.
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: usize,
    syscall: i32,
    arch: u32,
}

/// Formats the violation line into `buf`; returns its length. No
/// allocation, no locks: safe in a signal handler.
pub(super) fn format_line(buf: &mut [u8; 160], kind: Option<ThreadKind>, nr: i32) -> usize {
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if len < buf.len() {
                buf[len] = b;
                len += 1;
            }
        }
    };
    put(b"[ringvm ERROR] seccomp: the ");
    put(kind.map_or("unfiltered", ThreadKind::name).as_bytes());
    put(b" thread made forbidden syscall ");
    let mut digits = [0u8; 12];
    let mut n = i64::from(nr).unsigned_abs();
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if nr < 0 {
        put(b"-");
    }
    put(&digits[at..]);
    put(b" (see `ausyscall` or the syscall table); ringvm stops with SIGSYS\n");
    len
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers;
    // for SIGSYS its layout after the common head is SigsysInfo's.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let kind = KIND.with(Cell::get);
    let mut buf = [0u8; 160];
    let len = format_line(&mut buf, kind, nr);
    let fd = LOG_FD.load(Ordering::Relaxed);
    // SAFETY: write(2) from a stack buffer of `len` initialised bytes;
    // async-signal-safe.
    unsafe { libc::write(fd, buf.as_ptr().cast(), len) };
    if fd != libc::STDERR_FILENO {
        // SAFETY: as above, to stderr as well.
        unsafe { libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len) };
    }
    // SAFETY: raise(3) is async-signal-safe. SIGSYS is back at its default
    // action (SA_RESETHAND) and not blocked (SA_NODEFER), so this ends the
    // process. Should the filter forbid the calls raise makes, the kernel
    // forces the default action on that new SIGSYS all the same.
    unsafe { libc::raise(libc::SIGSYS) };
    // Only reached if a custom filter answered raise's calls with an error.
    // SAFETY: _exit is async-signal-safe and ends every thread.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_thread_and_the_number() {
        let mut buf = [0u8; 160];
        let n = format_line(&mut buf, Some(ThreadKind::Vcpu), 41);
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(
            line.starts_with("[ringvm ERROR] seccomp: the vcpu thread made forbidden syscall 41 "),
            "{line}"
        );
        assert!(line.ends_with("SIGSYS\n"));
        let n = format_line(&mut buf, None, 0);
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .contains("unfiltered thread made forbidden syscall 0 "));
        let n = format_line(&mut buf, Some(ThreadKind::Api), -7);
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .contains("syscall -7 "));
    }

    #[test]
    fn the_siginfo_layout_matches_the_kernel() {
        // si_syscall sits at offset 24 on x86_64 (after the 16-byte head
        // and the 8-byte call address).
        assert_eq!(std::mem::offset_of!(SigsysInfo, syscall), 24);
        assert_eq!(std::mem::offset_of!(SigsysInfo, call_addr), 16);
    }
}
