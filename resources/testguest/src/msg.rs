//! A failure reason: a short line formatted into a fixed buffer.

use core::fmt;

pub struct Msg {
    buf: [u8; 200],
    len: usize,
}

impl Msg {
    pub fn new(args: fmt::Arguments<'_>) -> Msg {
        let mut m = Msg {
            buf: [0; 200],
            len: 0,
        };
        let _ = fmt::Write::write_fmt(&mut m, args);
        m
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("(bad utf-8)")
    }
}

impl fmt::Write for Msg {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

/// What a case returns.
pub type R = Result<(), Msg>;

/// Returns a failure from the current function.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::msg::Msg::new(format_args!($($arg)*)))
    };
}

/// Fails unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::fail!($($arg)*);
        }
    };
}
