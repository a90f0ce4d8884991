//! Puts the host terminal in raw mode while the guest owns the console and
//! restores exactly the settings it found, on every way out.
//!
//! Written against termios directly rather than vmm-sys-util's `Terminal`,
//! whose canonical mode is a fixed set of flags rather than the user's own.

use std::os::fd::RawFd;

/// Restores the saved terminal settings when dropped.
#[derive(Debug)]
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Switches `fd` to raw mode if it is a terminal; `None` otherwise.
    pub fn enter(fd: RawFd) -> Option<Self> {
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; zeroed is a valid starting value.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into `saved`, which we own.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct we pass and nothing else.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so the guest's "\n" still returns
        // the carriage, as on a serial terminal.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: tcsetattr reads the struct we pass.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter` on the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
