//! The synthetic driver's access to a device's virtio-mmio v2 register
//! file on the real MMIO bus, and the steps of bringing a device up that
//! every virtio-mmio driver takes in the same order.

use devices::bus::Bus;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VERSION,
};

use super::Res;

/// One device's register window on the MMIO bus, accessed as vCPU 0 would.
pub struct MmioRegs {
    /// The VMM's MMIO bus (the same one a vCPU exit would go through).
    pub bus: Bus,
    /// The device's window base address.
    pub base: u64,
}

impl MmioRegs {
    /// Reads 32-bit register `reg`.
    pub fn read32(&self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.bus.read(0, self.base + u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes `v` to 32-bit register `reg`.
    pub fn write32(&self, reg: u32, v: u32) {
        self.bus
            .write(0, self.base + u64::from(reg), &v.to_le_bytes());
    }

    /// Reads the device's config space from its start into `buf`.
    pub fn read_config(&self, buf: &mut [u8]) {
        self.bus
            .read(0, self.base + u64::from(VIRTIO_MMIO_CONFIG), buf);
    }

    /// Checks that a virtio-mmio v2 device of type `device_id` (`what`, for
    /// the error) is there, resets it and sets ACKNOWLEDGE and DRIVER.
    /// Returns the status written so far.
    pub fn probe(&self, device_id: u32, what: &str) -> Res<u32> {
        if self.read32(VIRTIO_MMIO_MAGIC_VALUE) != u32::from_le_bytes(*b"virt")
            || self.read32(VIRTIO_MMIO_VERSION) != 2
            || self.read32(VIRTIO_MMIO_DEVICE_ID) != device_id
        {
            return Err(format!(
                "no virtio-mmio v2 {what} device at {:#x}",
                self.base
            ));
        }
        self.write32(VIRTIO_MMIO_STATUS, 0);
        let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        self.write32(VIRTIO_MMIO_STATUS, status);
        status |= VIRTIO_CONFIG_S_DRIVER;
        self.write32(VIRTIO_MMIO_STATUS, status);
        Ok(status)
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        self.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = self.read32(VIRTIO_MMIO_DEVICE_FEATURES);
        self.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = self.read32(VIRTIO_MMIO_DEVICE_FEATURES);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// Acknowledges features `want` and sets FEATURES_OK on top of
    /// `status`; fails if the device refuses. Returns the new status.
    pub fn set_features(&self, status: u32, want: u64) -> Res<u32> {
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES, want as u32);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES, (want >> 32) as u32);
        let status = status | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write32(VIRTIO_MMIO_STATUS, status);
        if self.read32(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return Err("the device refused FEATURES_OK".into());
        }
        Ok(status)
    }

    /// Gives the selected queue its three ring addresses and marks it
    /// ready.
    pub fn set_queue_rings(&self, desc: u64, avail: u64, used: u64) {
        for (lo, hi, addr) in [
            (
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                desc,
            ),
            (
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                avail,
            ),
            (
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
                used,
            ),
        ] {
            self.write32(lo, addr as u32);
            self.write32(hi, (addr >> 32) as u32);
        }
        self.write32(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// Sets DRIVER_OK on top of `status`; fails if the device then asks
    /// for a reset.
    pub fn driver_ok(&self, status: u32) -> Res<()> {
        self.write32(VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
        if self.read32(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return Err("the device asks for a reset right after DRIVER_OK".into());
        }
        Ok(())
    }

    /// Reads and acknowledges InterruptStatus, as Linux's vm_interrupt does
    /// on every interrupt.
    pub fn ack_interrupt(&self) {
        let isr = self.read32(VIRTIO_MMIO_INTERRUPT_STATUS);
        if isr != 0 {
            self.write32(VIRTIO_MMIO_INTERRUPT_ACK, isr);
        }
    }
}
