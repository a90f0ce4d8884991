//! COM1 (8250) output by polling: wait for THR empty, write the byte.

use core::fmt;

use crate::arch::{inb, outb};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Puts one byte out, turning `\n` into `\r\n`.
pub fn putb(b: u8) {
    if b == b'\n' {
        raw(b'\r');
    }
    raw(b);
}

fn raw(b: u8) {
    // ringvm's 8250 is always ready; the bound only guards a stuck UART.
    for _ in 0..10_000 {
        if inb(LSR) & LSR_THR_EMPTY != 0 {
            break;
        }
    }
    outb(COM1, b);
}

/// Waits until the transmitter drained (nothing is buffered here, so this
/// is a last LSR check before the VM stops).
pub fn flush() {
    for _ in 0..10_000 {
        if inb(LSR) & LSR_THR_EMPTY != 0 {
            break;
        }
    }
}

/// `core::fmt` sink for the console.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            putb(b);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Console, format_args!($($arg)*));
    }};
}

#[macro_export]
macro_rules! println {
    () => { $crate::serial::putb(b'\n') };
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::serial::putb(b'\n');
    }};
}

/// Prints a string without going through `core::fmt` (cheaper under the
/// emulator).
pub fn puts(s: &str) {
    for b in s.bytes() {
        putb(b);
    }
}
