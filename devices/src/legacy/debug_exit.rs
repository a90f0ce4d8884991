//! The exit ports: how a guest tells ringvm how it ended, so ringvm's exit
//! code says it rather than "the guest shut down".
//!
//! - Port 0x501 (one byte): a test guest (our own `vtest` kernel) writes
//!   its verdict, 0 for "every case passed". QEMU's isa-debug-exit default
//!   port, so the same guests work under both; Linux never touches it.
//! - Port 0x504 (one 32-bit write): ringvm's guest init reports the status
//!   of the command it ran (`ringvm -- CMD`): bits 0-7 a code, bits 8-15
//!   a kind (0 exited with the code, 1 killed by signal code, 2 init failed
//!   at stage code before the command ran), bits 16-31 the errno of that
//!   failure.
//!
//! Only the first report counts; it wakes the VMM thread, which ends the VM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAccess, BusDevice};

/// The first port the device answers at (the verdict byte).
pub const DEBUG_EXIT_PORT: u64 = 0x501;
/// Ports the device covers: 0x501 through 0x507.
pub const DEBUG_EXIT_LEN: u64 = 7;
/// Offset of the 32-bit command-status register (port 0x504).
pub const STATUS_OFFSET: u64 = 3;

/// How the command of `ringvm -- CMD` ended, as init reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandStatus {
    /// It exited with this status.
    Exited(u8),
    /// A signal killed it.
    Signaled(u8),
    /// Init failed before running it, at `stage`, with `errno`.
    SetupFailed {
        /// Init's stage number (see `resources/runner/init.c`).
        stage: u8,
        /// The errno of the failed call.
        errno: u16,
    },
}

impl CommandStatus {
    /// Decodes init's 32-bit status word; `None` for an unknown kind.
    pub fn from_word(word: u32) -> Option<Self> {
        let code = word as u8;
        match (word >> 8) as u8 {
            0 => Some(Self::Exited(code)),
            1 => Some(Self::Signaled(code)),
            2 => Some(Self::SetupFailed {
                stage: code,
                errno: (word >> 16) as u16,
            }),
            _ => None,
        }
    }
}

/// What the guest reported on an exit port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReport {
    /// A test guest's verdict byte (0: every case passed).
    TestVerdict(u8),
    /// The status of the command ringvm ran.
    Command(CommandStatus),
}

const NOTHING: u64 = u64::MAX;
const VERDICT_TAG: u64 = 1 << 32;
const COMMAND_TAG: u64 = 2 << 32;

/// The first report, shared between the device (vCPU threads) and the VMM
/// thread.
#[derive(Debug)]
pub struct ExitCell(AtomicU64);

impl Default for ExitCell {
    fn default() -> Self {
        Self(AtomicU64::new(NOTHING))
    }
}

impl ExitCell {
    /// The report, if any came.
    pub fn get(&self) -> Option<ExitReport> {
        let v = self.0.load(Ordering::Acquire);
        match v & !0xffff_ffff {
            VERDICT_TAG => Some(ExitReport::TestVerdict(v as u8)),
            COMMAND_TAG => CommandStatus::from_word(v as u32).map(ExitReport::Command),
            _ => None,
        }
    }

    /// Keeps `value` if nothing was reported yet; returns whether it did.
    fn set_first(&self, value: u64) -> bool {
        self.0
            .compare_exchange(NOTHING, value, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Records the first report and wakes the VMM thread.
#[derive(Debug)]
pub struct DebugExit {
    cell: Arc<ExitCell>,
    notify: EventFd,
}

impl DebugExit {
    /// A device that stores the first report in `cell` and writes `notify`.
    pub fn new(cell: Arc<ExitCell>, notify: EventFd) -> Self {
        Self { cell, notify }
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
        let value = match (access.offset, data) {
            // Any width; the low byte is the verdict.
            (0, [v, ..]) => VERDICT_TAG | u64::from(*v),
            (STATUS_OFFSET, [a, b, c, d]) => {
                let word = u32::from_le_bytes([*a, *b, *c, *d]);
                if CommandStatus::from_word(word).is_none() {
                    return;
                }
                COMMAND_TAG | u64::from(word)
            }
            _ => return,
        };
        if !self.cell.set_first(value) {
            return;
        }
        if let Err(e) = self.notify.write(1) {
            log::warn!("debug-exit: cannot wake the VMM thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (DebugExit, Arc<ExitCell>, EventFd) {
        let cell = Arc::new(ExitCell::default());
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = DebugExit::new(cell.clone(), evt.try_clone().unwrap());
        (dev, cell, evt)
    }

    #[test]
    fn first_write_is_the_verdict() {
        let (mut dev, cell, evt) = device();
        assert_eq!(cell.get(), None);
        let at = BusAccess { offset: 0, vcpu: 0 };
        dev.write(at, &[3, 0, 0, 0]);
        dev.write(at, &[0]);
        assert_eq!(cell.get(), Some(ExitReport::TestVerdict(3)));
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn the_status_register_reports_the_command() {
        let (mut dev, cell, evt) = device();
        let at = BusAccess {
            offset: STATUS_OFFSET,
            vcpu: 0,
        };
        // 2-byte writes to the status register are not a report.
        dev.write(at, &[7, 0]);
        assert_eq!(cell.get(), None);
        dev.write(at, &0x0000_0109u32.to_le_bytes());
        assert_eq!(
            cell.get(),
            Some(ExitReport::Command(CommandStatus::Signaled(9)))
        );
        // Later reports, on either port, are ignored.
        dev.write(at, &7u32.to_le_bytes());
        dev.write(BusAccess { offset: 0, vcpu: 0 }, &[1]);
        assert_eq!(
            cell.get(),
            Some(ExitReport::Command(CommandStatus::Signaled(9)))
        );
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn status_words_decode() {
        assert_eq!(CommandStatus::from_word(7), Some(CommandStatus::Exited(7)));
        assert_eq!(
            CommandStatus::from_word(0x0002_0203),
            Some(CommandStatus::SetupFailed { stage: 3, errno: 2 })
        );
        assert_eq!(CommandStatus::from_word(0x0300), None);
    }

    #[test]
    fn other_offsets_and_empty_writes_are_ignored() {
        let (mut dev, cell, evt) = device();
        dev.write(BusAccess { offset: 1, vcpu: 0 }, &[0]);
        dev.write(BusAccess { offset: 0, vcpu: 0 }, &[]);
        assert_eq!(cell.get(), None);
        assert!(evt.read().is_err());
    }
}
