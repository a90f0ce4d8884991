//! Places devices on the buses, hands out MMIO windows and IRQ lines, and
//! tells the kernel where its command-line virtio-mmio devices are.

use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::bus::{Bus, BusError};
use devices::legacy::{
    AcpiPm, BootTimer, DebugExit, ExitCell, Serial, ACPI_PM_PORT, ACPI_PM_PORTS, DEBUG_EXIT_LEN,
    DEBUG_EXIT_PORT, I8042,
};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{BOOT_TIMER_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::console::ConsoleOut;
use crate::kvm::vm::{Vm, VmError};
use devices::bus::SharedDevice;
use devices::virtio::mmio::{TransportEvents, TRANSPORT_QUEUE_DEPTH};
use devices::virtio::{MmioTransport, TransportEvent, VirtioDeviceInfo, NOTIFY_REG_OFFSET};
use std::sync::mpsc::{sync_channel, Receiver};

/// COM1's ports and IRQ.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u32 = 4;
/// The i8042's first port (0x60; the command port is 0x64).
pub const I8042_PORT: u64 = 0x60;
/// The keyboard's ISA IRQ.
pub const I8042_KBD_IRQ: u32 = 1;

/// First IRQ line for virtio-mmio devices (above the ISA lines in use).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IOAPIC pin.
pub const VIRTIO_IRQ_LAST: u32 = 23;

/// Where one virtio-mmio device lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Base of its 4 KiB register window.
    pub base: u64,
    /// Its IOAPIC pin.
    pub irq: u32,
}

/// How a device's eventfds reach the guest: an interrupt line (irqfd) and
/// a doorbell (ioeventfd). The VM implements it with KVM; the benchmark's
/// synthetic driver implements it by keeping the eventfds for itself, so
/// the same device and loop serve both.
pub trait EventWiring {
    /// Makes a write to `evt` raise interrupt line `gsi`.
    fn wire_irq(&self, evt: &EventFd, gsi: u32) -> Result<(), DeviceError>;
    /// Makes a 4-byte write of `value` to MMIO `addr` signal `evt`.
    fn wire_doorbell(&self, evt: &EventFd, addr: u64, value: u32) -> Result<(), DeviceError>;
}

impl EventWiring for Vm {
    fn wire_irq(&self, evt: &EventFd, gsi: u32) -> Result<(), DeviceError> {
        Ok(self.register_irqfd(evt, gsi)?)
    }

    fn wire_doorbell(&self, evt: &EventFd, addr: u64, value: u32) -> Result<(), DeviceError> {
        Ok(self.register_mmio_ioevent(evt, addr, Some(value))?)
    }
}

/// The VMM thread's ends of a virtio device placed on the machine.
#[derive(Debug)]
pub struct VirtioEndpoints {
    /// One doorbell per queue, in queue order, to arm on the ring.
    pub kicks: Vec<EventFd>,
    /// Written by the transport after each activation or reset message.
    pub wake: EventFd,
    /// The transport's activation and reset messages.
    pub messages: Receiver<TransportEvent>,
}

/// Errors placing devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An address range was already taken.
    #[error("device placement: {0}")]
    Bus(#[from] BusError),
    /// An eventfd could not be created.
    #[error("cannot create eventfd: {0}")]
    EventFd(std::io::Error),
    /// No IRQ line is left for another virtio device.
    #[error("no IRQ line left for another virtio device")]
    OutOfIrqs,
    /// The virtio transport refused the device description.
    #[error("virtio transport: {0}")]
    Transport(String),
    /// KVM wiring failed.
    #[error("{0}")]
    Vm(#[from] VmError),
}

/// The console as the VMM thread sees it.
pub type SharedSerial = Arc<Mutex<Serial<ConsoleOut>>>;

/// The buses and the legacy devices the VMM thread talks to directly.
#[derive(Debug)]
pub struct DeviceManager {
    /// Port I/O bus, cloned into every vCPU thread.
    pub pio: Bus,
    /// MMIO bus, cloned into every vCPU thread.
    pub mmio: Bus,
    /// COM1, so the VMM thread can feed it stdin.
    pub serial: Option<SharedSerial>,
    /// The i8042, so the VMM thread can press keys (Ctrl-Alt-Del) on it.
    pub i8042: Option<Arc<Mutex<I8042>>>,
    /// Written by the i8042 when the guest resets the CPU.
    pub reset_evt: EventFd,
    next_virtio: u32,
    virtio_slots: Vec<VirtioSlot>,
    virtio_cmdline: Vec<String>,
}

/// A non-blocking eventfd: the interrupt lines, doorbells and wake-ups
/// that tie devices to KVM and to the VMM thread's ring.
pub fn new_eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

impl DeviceManager {
    /// Empty buses and a reset line.
    pub fn new() -> Result<Self, DeviceError> {
        Ok(Self {
            pio: Bus::new(),
            mmio: Bus::new(),
            serial: None,
            i8042: None,
            reset_evt: new_eventfd()?,
            next_virtio: 0,
            virtio_slots: Vec::new(),
            virtio_cmdline: Vec::new(),
        })
    }

    /// COM1 at 0x3f8, IRQ 4, printing to `out` (stdout or `PUT /serial`'s
    /// file).
    pub fn add_serial(&mut self, vm: &Vm, out: ConsoleOut) -> Result<(), DeviceError> {
        let irq = new_eventfd()?;
        vm.register_irqfd(&irq, COM1_IRQ)?;
        let serial = Arc::new(Mutex::new(Serial::new(irq, out)));
        self.pio.insert(serial.clone(), COM1_PORT, 8)?;
        self.serial = Some(serial);
        Ok(())
    }

    /// The i8042 at 0x60..=0x64, its reset wired to `reset_evt` and its
    /// keyboard interrupt to IRQ 1.
    pub fn add_i8042(&mut self, vm: &Vm) -> Result<(), DeviceError> {
        let reset = self.reset_evt.try_clone().map_err(DeviceError::EventFd)?;
        let irq = new_eventfd()?;
        vm.register_irqfd(&irq, I8042_KBD_IRQ)?;
        let dev = Arc::new(Mutex::new(I8042::new(reset, irq)));
        self.pio.insert(dev.clone(), I8042_PORT, 5)?;
        self.i8042 = Some(dev);
        Ok(())
    }

    /// Places a virtio device on the machine: a virtio-mmio window and IRQ
    /// line, `irq` wired to that line, one doorbell per queue (a guest's
    /// QueueNotify write of the queue index signals it inside KVM), and the
    /// transport on the MMIO bus. Returns the VMM thread's ends.
    pub fn add_virtio_device(
        &mut self,
        wire: &dyn EventWiring,
        irq: &EventFd,
        info: VirtioDeviceInfo,
    ) -> Result<VirtioEndpoints, DeviceError> {
        let slot = self.allocate_virtio_slot()?;
        wire.wire_irq(irq, slot.irq)?;
        let mut kicks = Vec::with_capacity(info.queue_max_sizes.len());
        for queue in 0..info.queue_max_sizes.len() {
            let kick = new_eventfd()?;
            wire.wire_doorbell(&kick, slot.base + NOTIFY_REG_OFFSET, queue as u32)?;
            kicks.push(kick);
        }
        let wake = new_eventfd()?;
        let clone = |e: &EventFd| e.try_clone().map_err(DeviceError::EventFd);
        let (sender, messages) = sync_channel(TRANSPORT_QUEUE_DEPTH);
        let events = TransportEvents {
            sender,
            wake: clone(&wake)?,
        };
        let transport_kicks = kicks.iter().map(clone).collect::<Result<Vec<_>, _>>()?;
        let transport = MmioTransport::new(info, events, transport_kicks)
            .map_err(|e| DeviceError::Transport(e.to_string()))?;
        self.add_virtio_mmio(Arc::new(Mutex::new(transport)), slot)?;
        Ok(VirtioEndpoints {
            kicks,
            wake,
            messages,
        })
    }

    /// Reserves the next virtio-mmio window and IRQ line.
    fn allocate_virtio_slot(&mut self) -> Result<VirtioSlot, DeviceError> {
        let irq = VIRTIO_IRQ_BASE + self.next_virtio;
        if irq > VIRTIO_IRQ_LAST {
            return Err(DeviceError::OutOfIrqs);
        }
        let base = VIRTIO_MMIO_START + u64::from(self.next_virtio) * VIRTIO_MMIO_SIZE;
        self.next_virtio += 1;
        Ok(VirtioSlot { base, irq })
    }

    /// Puts a virtio-mmio transport at `slot` and records the
    /// `virtio_mmio.device=` parameter that tells Linux where it is.
    fn add_virtio_mmio(
        &mut self,
        transport: SharedDevice,
        slot: VirtioSlot,
    ) -> Result<(), DeviceError> {
        self.mmio.insert(transport, slot.base, VIRTIO_MMIO_SIZE)?;
        self.virtio_slots.push(slot);
        self.virtio_cmdline.push(format!(
            "virtio_mmio.device=4K@{:#x}:{}",
            slot.base, slot.irq
        ));
        Ok(())
    }

    /// Kernel parameters for every virtio-mmio device, in probe order.
    pub fn virtio_cmdline(&self) -> &[String] {
        &self.virtio_cmdline
    }

    /// Every virtio-mmio window and IRQ placed so far, in probe order: what
    /// the ACPI DSDT describes instead of the command-line words.
    pub fn virtio_slots(&self) -> &[VirtioSlot] {
        &self.virtio_slots
    }

    /// The ACPI sleep/reset registers at 0x600: the guest's power-off or
    /// reset request lands in the returned cell and `notify` wakes the VMM
    /// thread.
    pub fn add_acpi_pm(&mut self, notify: EventFd) -> Result<Arc<AtomicU8>, DeviceError> {
        let request = Arc::new(AtomicU8::new(0));
        let dev = Arc::new(Mutex::new(AcpiPm::new(request.clone(), notify)));
        self.pio.insert(dev, ACPI_PM_PORT, ACPI_PM_PORTS)?;
        Ok(request)
    }

    /// The exit ports (0x501 test verdict, 0x504 command status): the
    /// guest's report lands in the returned cell and `notify` wakes the
    /// VMM thread.
    pub fn add_debug_exit(&mut self, notify: EventFd) -> Result<Arc<ExitCell>, DeviceError> {
        let cell = Arc::new(ExitCell::default());
        let dev = Arc::new(Mutex::new(DebugExit::new(cell.clone(), notify)));
        self.pio.insert(dev, DEBUG_EXIT_PORT, DEBUG_EXIT_LEN)?;
        Ok(cell)
    }

    /// The boot timer at the start of the MMIO hole.
    pub fn add_boot_timer(&mut self, start: Instant) -> Result<(), DeviceError> {
        let dev = Arc::new(Mutex::new(BootTimer::new(start)));
        self.mmio.insert(dev, BOOT_TIMER_START, 0x1000)?;
        Ok(())
    }
}
