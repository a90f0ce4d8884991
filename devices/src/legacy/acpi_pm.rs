//! The power registers a hardware-reduced ACPI machine names in its FADT:
//! sleep control, sleep status and reset. Linux powers off by writing
//! "sleep type S5, enable" to the control register and resets by writing
//! the reset value to the reset register; the device records which and
//! wakes the VMM thread, which ends ringvm at once (no halt probe, no
//! keyboard-controller detour).
//!
//! Three byte-wide I/O ports from [`ACPI_PM_PORT`]:
//!
//! | offset | register | guest write | guest read |
//! |---|---|---|---|
//! | 0 | sleep control | `SLP_TYP << 2 \| SLP_EN` | 0 |
//! | 1 | sleep status | `WAK_STS` to clear it (ignored) | 0: never woken |
//! | 2 | reset | [`RESET_VALUE`] resets | 0 |
//!
//! Only the sleep type the DSDT's `_S5` package names ([`S5_SLEEP_TYPE`])
//! powers off; other sleep states (S1-S4) are not offered, so a write of
//! them is ignored and the guest keeps running. Every byte value is
//! handled; nothing here panics.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAccess, BusDevice};

/// First port of the device (sleep control; status and reset follow). Free
/// on a PC, and the port Cloud Hypervisor uses for the same job.
pub const ACPI_PM_PORT: u64 = 0x600;
/// Number of ports the device claims.
pub const ACPI_PM_PORTS: u64 = 3;
/// Offset of the sleep control register.
pub const SLEEP_CONTROL: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS: u64 = 1;
/// Offset of the reset register.
pub const RESET: u64 = 2;
/// The value the FADT tells the guest to write to [`RESET`].
pub const RESET_VALUE: u8 = 1;
/// The sleep type the DSDT's `_S5` object hands the guest for soft-off.
pub const S5_SLEEP_TYPE: u8 = 5;

/// ACPI 6.5 section 4.8.3.7: SLP_TYP is bits 2-4, SLP_EN bit 5.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
const SLP_EN: u8 = 1 << 5;

/// What the guest asked for, as stored in the shared cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PowerRequest {
    /// Nothing yet.
    None = 0,
    /// Sleep state S5 (soft off).
    PowerOff = 1,
    /// A write of the reset value to the reset register.
    Reset = 2,
}

impl PowerRequest {
    /// Reads the cell the device writes.
    pub fn load(cell: &AtomicU8) -> Self {
        match cell.load(Ordering::Acquire) {
            1 => Self::PowerOff,
            2 => Self::Reset,
            _ => Self::None,
        }
    }
}

/// The sleep control, sleep status and reset registers.
#[derive(Debug)]
pub struct AcpiPm {
    request: Arc<AtomicU8>,
    notify: EventFd,
}

impl AcpiPm {
    /// A device that stores the guest's request in `request` and writes
    /// `notify` once per request.
    pub fn new(request: Arc<AtomicU8>, notify: EventFd) -> Self {
        request.store(PowerRequest::None as u8, Ordering::Release);
        Self { request, notify }
    }

    fn raise(&self, what: PowerRequest) {
        // The first request wins: a reset written after a power-off (or
        // by a second vCPU) must not change how ringvm ends.
        let first = self
            .request
            .compare_exchange(
                PowerRequest::None as u8,
                what as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if first {
            if let Err(e) = self.notify.write(1) {
                log::warn!("acpi-pm: cannot wake the VMM thread: {e}");
            }
        }
    }
}

impl BusDevice for AcpiPm {
    fn debug_label(&self) -> &str {
        "acpi-pm"
    }

    fn read(&mut self, _access: BusAccess, data: &mut [u8]) {
        // Status: WAK_STS never set (the machine never wakes from S5);
        // the other registers are write-only and read as zero.
        data.fill(0);
    }

    fn write(&mut self, access: BusAccess, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match access.offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if sleep_type == S5_SLEEP_TYPE {
                    self.raise(PowerRequest::PowerOff);
                } else {
                    log::warn!("acpi-pm: guest asked for sleep type {sleep_type}, not offered");
                }
            }
            RESET if value == RESET_VALUE => self.raise(PowerRequest::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (AcpiPm, Arc<AtomicU8>, EventFd) {
        let cell = Arc::new(AtomicU8::new(7));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = AcpiPm::new(cell.clone(), evt.try_clone().unwrap());
        (dev, cell, evt)
    }

    fn at(offset: u64) -> BusAccess {
        BusAccess { offset, vcpu: 0 }
    }

    #[test]
    fn s5_with_sleep_enable_powers_off_once() {
        let (mut dev, cell, evt) = device();
        assert_eq!(PowerRequest::load(&cell), PowerRequest::None);
        // What Linux's acpi_hw_extended_sleep writes for _S5 = 5.
        dev.write(at(SLEEP_CONTROL), &[(5 << 2) | SLP_EN]);
        assert_eq!(PowerRequest::load(&cell), PowerRequest::PowerOff);
        assert_eq!(evt.read().unwrap(), 1);
        // A later reset does not change the outcome or wake again.
        dev.write(at(RESET), &[RESET_VALUE]);
        assert_eq!(PowerRequest::load(&cell), PowerRequest::PowerOff);
        assert!(evt.read().is_err());
    }

    #[test]
    fn reset_value_resets() {
        let (mut dev, cell, evt) = device();
        dev.write(at(RESET), &[0]);
        assert!(evt.read().is_err());
        dev.write(at(RESET), &[RESET_VALUE]);
        assert_eq!(PowerRequest::load(&cell), PowerRequest::Reset);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn other_sleep_states_status_writes_and_empty_writes_do_nothing() {
        let (mut dev, cell, evt) = device();
        dev.write(at(SLEEP_CONTROL), &[5 << 2]); // type without SLP_EN
        dev.write(at(SLEEP_CONTROL), &[(3 << 2) | SLP_EN]); // S3
        dev.write(at(SLEEP_STATUS), &[0x80]); // clearing WAK_STS
        dev.write(at(SLEEP_CONTROL), &[]);
        for value in 0..=255u8 {
            dev.write(at(SLEEP_STATUS), &[value]);
        }
        assert_eq!(PowerRequest::load(&cell), PowerRequest::None);
        assert!(evt.read().is_err());
        let mut b = [0xffu8; 2];
        dev.read(at(SLEEP_STATUS), &mut b);
        assert_eq!(b, [0, 0]);
    }
}
