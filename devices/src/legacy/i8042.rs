//! The i8042 keyboard controller, kept for the one thing a micro-VM needs
//! from it: Linux's `reboot=k` pulses the CPU reset line through it.
//!
//! vm-superio implements the controller; here it is placed on the bus at
//! 0x60..=0x64 (offsets 0 and 4) and its reset line is an eventfd the VMM
//! thread waits on.

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAccess, BusDevice};
use crate::legacy::EventFdTrigger;

/// Offset of the data port (0x60) from the device's base.
pub const DATA_PORT: u64 = 0;
/// Offset of the command/status port (0x64) from the device's base.
pub const COMMAND_PORT: u64 = 4;

/// An i8042 whose CPU-reset command writes `reset`.
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// Makes a controller that signals `reset` when the guest resets the CPU.
    pub fn new(reset: EventFd) -> Self {
        Self {
            inner: I8042Device::new(EventFdTrigger(reset)),
        }
    }
}

impl BusDevice for I8042 {
    fn debug_label(&self) -> &str {
        "i8042"
    }

    fn read(&mut self, access: BusAccess, data: &mut [u8]) {
        match (access.offset, data.len()) {
            (DATA_PORT | COMMAND_PORT, 1) => data[0] = self.inner.read(access.offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, access: BusAccess, data: &[u8]) {
        if !matches!(access.offset, DATA_PORT | COMMAND_PORT) || data.len() != 1 {
            return;
        }
        if let Err(e) = self.inner.write(access.offset as u8, data[0]) {
            log::warn!("i8042: could not signal reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CMD_RESET_CPU: u8 = 0xfe;

    #[test]
    fn reset_command_signals_the_reset_line() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(reset.try_clone().unwrap());
        assert!(reset.read().is_err(), "no reset before the command");
        dev.write(
            BusAccess {
                offset: COMMAND_PORT,
                vcpu: 0,
            },
            &[CMD_RESET_CPU],
        );
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn other_ports_do_not_reset() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(reset.try_clone().unwrap());
        dev.write(BusAccess { offset: 2, vcpu: 0 }, &[CMD_RESET_CPU]);
        dev.write(
            BusAccess {
                offset: DATA_PORT,
                vcpu: 0,
            },
            &[CMD_RESET_CPU],
        );
        assert!(reset.read().is_err());
    }
}
