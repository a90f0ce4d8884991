//! Places devices on the buses, hands out MMIO windows and IRQ lines, and
//! tells the kernel where its command-line virtio-mmio devices are.

use std::io::Stdout;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::bus::{Bus, BusError};
use devices::legacy::{BootTimer, Serial, I8042};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::BOOT_TIMER_START;
use crate::vstate::vm::{Vm, VmError};

/// COM1's ports and IRQ.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u32 = 4;
/// The i8042's first port (0x60; the command port is 0x64).
pub const I8042_PORT: u64 = 0x60;

/// Errors placing devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An address range was already taken.
    #[error("device placement: {0}")]
    Bus(#[from] BusError),
    /// An eventfd could not be created.
    #[error("cannot create eventfd: {0}")]
    EventFd(std::io::Error),
    /// KVM wiring failed.
    #[error("{0}")]
    Vm(#[from] VmError),
}

/// The console as the VMM thread sees it.
pub type SharedSerial = Arc<Mutex<Serial<Stdout>>>;

/// The buses and the legacy devices the VMM thread talks to directly.
#[derive(Debug)]
pub struct DeviceManager {
    /// Port I/O bus, cloned into every vCPU thread.
    pub pio: Bus,
    /// MMIO bus, cloned into every vCPU thread.
    pub mmio: Bus,
    /// COM1, so the VMM thread can feed it stdin.
    pub serial: Option<SharedSerial>,
    /// Written by the i8042 when the guest resets the CPU.
    pub reset_evt: EventFd,
}

fn new_eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

impl DeviceManager {
    /// Empty buses and a reset line.
    pub fn new() -> Result<Self, DeviceError> {
        Ok(Self {
            pio: Bus::new(),
            mmio: Bus::new(),
            serial: None,
            reset_evt: new_eventfd()?,
        })
    }

    /// COM1 at 0x3f8, IRQ 4, printing to stdout.
    pub fn add_serial(&mut self, vm: &Vm) -> Result<(), DeviceError> {
        let irq = new_eventfd()?;
        vm.register_irqfd(&irq, COM1_IRQ)?;
        let serial = Arc::new(Mutex::new(Serial::new(irq, std::io::stdout())));
        self.pio.insert(serial.clone(), COM1_PORT, 8)?;
        self.serial = Some(serial);
        Ok(())
    }

    /// The i8042 at 0x60..=0x64, its reset wired to `reset_evt`.
    pub fn add_i8042(&mut self) -> Result<(), DeviceError> {
        let reset = self.reset_evt.try_clone().map_err(DeviceError::EventFd)?;
        let dev = Arc::new(Mutex::new(I8042::new(reset)));
        self.pio.insert(dev, I8042_PORT, 5)?;
        Ok(())
    }

    /// The boot timer at the start of the MMIO hole.
    pub fn add_boot_timer(&mut self, start: Instant) -> Result<(), DeviceError> {
        let dev = Arc::new(Mutex::new(BootTimer::new(start)));
        self.mmio.insert(dev, BOOT_TIMER_START, 0x1000)?;
        Ok(())
    }
}
