//! A test-exit port: a guest that runs a test suite (our own `vtest`
//! kernel) writes its verdict here and ringvm exits with it, so a script
//! can tell "every case passed" from "the guest shut down" by exit code
//! alone. Port 0x501, QEMU's isa-debug-exit default, so the same guests
//! work under both; Linux never touches it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAccess, BusDevice};

/// The port the device answers at.
pub const DEBUG_EXIT_PORT: u64 = 0x501;

/// Records the first verdict and wakes the VMM thread.
#[derive(Debug)]
pub struct DebugExit {
    verdict: Arc<AtomicU32>,
    notify: EventFd,
    fired: bool,
}

/// "No verdict yet" in the shared cell (verdicts are one byte).
pub const NO_VERDICT: u32 = u32::MAX;

impl DebugExit {
    /// A device that stores the verdict in `verdict` and writes `notify`.
    pub fn new(verdict: Arc<AtomicU32>, notify: EventFd) -> Self {
        verdict.store(NO_VERDICT, Ordering::Release);
        Self {
            verdict,
            notify,
            fired: false,
        }
    }
}

impl BusDevice for DebugExit {
    fn debug_label(&self) -> &str {
        "debug-exit"
    }

    fn read(&mut self, _access: BusAccess, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, access: BusAccess, data: &[u8]) {
        // Any width; the low byte is the verdict. Only the first counts.
        let Some(&value) = data.first() else {
            return;
        };
        if access.offset != 0 || self.fired {
            return;
        }
        self.fired = true;
        self.verdict.store(u32::from(value), Ordering::Release);
        if let Err(e) = self.notify.write(1) {
            log::warn!("debug-exit: cannot wake the VMM thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_write_is_the_verdict() {
        let cell = Arc::new(AtomicU32::new(0));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = DebugExit::new(cell.clone(), evt.try_clone().unwrap());
        assert_eq!(cell.load(Ordering::Acquire), NO_VERDICT);
        let at = BusAccess { offset: 0, vcpu: 0 };
        dev.write(at, &[3, 0, 0, 0]);
        dev.write(at, &[0]);
        assert_eq!(cell.load(Ordering::Acquire), 3);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn other_offsets_and_empty_writes_are_ignored() {
        let cell = Arc::new(AtomicU32::new(0));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = DebugExit::new(cell.clone(), evt.try_clone().unwrap());
        dev.write(BusAccess { offset: 1, vcpu: 0 }, &[0]);
        dev.write(BusAccess { offset: 0, vcpu: 0 }, &[]);
        assert_eq!(cell.load(Ordering::Acquire), NO_VERDICT);
        assert!(evt.read().is_err());
    }
}
