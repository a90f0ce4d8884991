//! The signals that ask ringvm to stop (SIGINT, SIGTERM, SIGHUP, SIGQUIT)
//! are never delivered to a handler: every thread blocks them and the VMM
//! thread reads them from a signalfd, so a stop is an ordinary event of its
//! loop (final metrics, terminal restored, socket removed).
//!
//! The mask is inherited by every thread created after it is set, so
//! [`block`] runs first thing in `main`, before the API or vCPU threads
//! exist: a thread spawned earlier would leave the signals deliverable
//! there, and the kernel would end the process at once.

use std::os::fd::{FromRawFd, OwnedFd};

/// The stop signals.
pub const STOP_SIGNALS: [libc::c_int; 4] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both calls take a pointer to `set`, which we own.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in STOP_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
    }
    set
}

/// Blocks the stop signals in the calling thread and every thread it
/// spawns from now on.
pub fn block() {
    let set = stop_set();
    // SAFETY: `set` is initialised; the old mask is not asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// A non-blocking signalfd that reads the (blocked) stop signals.
pub fn signal_fd() -> std::io::Result<OwnedFd> {
    block();
    let set = stop_set();
    // SAFETY: `set` is initialised; signalfd returns a new fd or -1.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending stop signal from `fd` (from [`signal_fd`]), if any.
pub fn take_pending(fd: &OwnedFd) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut info = std::mem::MaybeUninit::<libc::signalfd_siginfo>::uninit();
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`, which has that room.
    let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
    if n != size as isize {
        return None;
    }
    // SAFETY: the kernel filled the whole struct.
    Some(unsafe { info.assume_init() }.ssi_signo as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_stop_signal_waits_in_the_signalfd() {
        // On a thread of its own: the mask stays there.
        std::thread::spawn(|| {
            let fd = signal_fd().unwrap();
            assert_eq!(take_pending(&fd), None);
            // SAFETY: signals this thread only; SIGHUP is blocked here.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) };
            assert_eq!(take_pending(&fd), Some(libc::SIGHUP));
            assert_eq!(take_pending(&fd), None);
        })
        .join()
        .unwrap();
    }
}
