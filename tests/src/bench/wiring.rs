//! The benchmarks' stand-in for KVM's irqfd/ioeventfd wiring.

use std::cell::RefCell;

use vmm::machine::device_manager::{DeviceError, EventWiring};
use vmm_sys_util::eventfd::EventFd;

/// Keeps the eventfds a device wires instead of registering them with KVM,
/// so the synthetic driver writes the doorbells itself (what KVM's
/// ioeventfd does on a QueueNotify write) and reads the interrupt line
/// (what KVM's irqfd would inject).
#[derive(Default)]
pub struct BenchWiring {
    irq: RefCell<Option<EventFd>>,
    /// (eventfd, MMIO address, queue index written to QueueNotify).
    doorbells: RefCell<Vec<(EventFd, u64, u32)>>,
}

impl BenchWiring {
    /// The interrupt line the device wired, if any (taken out).
    pub fn take_irq(&self) -> Option<EventFd> {
        self.irq.borrow_mut().take()
    }

    /// The doorbells the device wired, as (eventfd, MMIO address, queue
    /// index), ordered by queue index (taken out).
    pub fn take_doorbells(&self) -> Vec<(EventFd, u64, u32)> {
        let mut doorbells = std::mem::take(&mut *self.doorbells.borrow_mut());
        doorbells.sort_by_key(|d| d.2);
        doorbells
    }
}

impl EventWiring for BenchWiring {
    fn wire_irq(&self, evt: &EventFd, _gsi: u32) -> Result<(), DeviceError> {
        *self.irq.borrow_mut() = Some(evt.try_clone().map_err(DeviceError::EventFd)?);
        Ok(())
    }

    fn wire_doorbell(&self, evt: &EventFd, addr: u64, value: u32) -> Result<(), DeviceError> {
        let evt = evt.try_clone().map_err(DeviceError::EventFd)?;
        self.doorbells.borrow_mut().push((evt, addr, value));
        Ok(())
    }
}
