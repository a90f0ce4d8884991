//! The register buses vCPU exits land on.
//!
//! A vCPU thread that exits on a port or MMIO access asks the bus which
//! device owns the address and calls it with the offset inside that
//! device's range. Devices never see absolute addresses, so one device type
//! can sit at any base without knowing it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Where an access came from, handed to every device call.
///
/// Devices get the offset into their own range (so they are placement-free)
/// and the vCPU index (for per-CPU state and for logs that say who did it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusAccess {
    /// Offset of the access from the start of the device's range.
    pub offset: u64,
    /// Index of the vCPU that made the access.
    pub vcpu: usize,
}

/// A device reachable through register reads and writes.
///
/// Kept to the two calls every register file needs, so devices stay easy to
/// drive from tests. The default bodies make a write-only or read-only
/// device a few lines long; an unhandled read returns all ones, as an
/// unclaimed bus would.
pub trait BusDevice: Send {
    /// A short name for logs.
    fn debug_label(&self) -> &str;

    /// Fills `data` from the register at `access.offset`.
    fn read(&mut self, access: BusAccess, data: &mut [u8]) {
        let _ = access;
        data.fill(0xff);
    }

    /// Applies `data` to the register at `access.offset`.
    fn write(&mut self, access: BusAccess, data: &[u8]) {
        let _ = (access, data);
    }
}

/// A range claimed on a bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BusRange {
    /// First address of the range.
    pub base: u64,
    /// Length of the range in bytes; never zero.
    pub len: u64,
}

impl BusRange {
    fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }
}

/// Errors from placing devices on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already claimed.
    #[error("bus range {base:#x}+{len:#x} overlaps a device already there")]
    Overlap {
        /// Base of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
    /// A zero-length range, or one that wraps past the end of the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange {
        /// Base of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
}

/// One shared handle to a device, as vCPU threads hold it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// An address space (port I/O or MMIO) of non-overlapping device ranges.
///
/// Cloned into every vCPU thread: it is immutable once the VM starts, so a
/// lookup takes no lock; only the device found is locked for the access.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<BusRange, SharedDevice>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.devices.keys()).finish()
    }
}

impl Bus {
    /// Makes an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `base..base+len` for `device`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let new = BusRange { base, len };
        let overlaps = self
            .devices
            .keys()
            .any(|r| r.contains(base) || new.contains(r.base));
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(new, device);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(BusRange, &SharedDevice)> {
        let probe = BusRange {
            base: addr,
            len: u64::MAX,
        };
        self.devices
            .range(..=probe)
            .next_back()
            .filter(|(r, _)| r.contains(addr))
            .map(|(r, d)| (*r, d))
    }

    /// Routes a read; returns false when no device owns `addr`.
    pub fn read(&self, vcpu: usize, addr: u64, data: &mut [u8]) -> bool {
        let Some((range, dev)) = self.find(addr) else {
            return false;
        };
        let access = BusAccess {
            offset: addr - range.base,
            vcpu,
        };
        // A device that panicked while holding its lock is still the
        // best state we have; keep serving it rather than crash the vCPU.
        let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
        dev.read(access, data);
        true
    }

    /// Routes a write; returns false when no device owns `addr`.
    pub fn write(&self, vcpu: usize, addr: u64, data: &[u8]) -> bool {
        let Some((range, dev)) = self.find(addr) else {
            return false;
        };
        let access = BusAccess {
            offset: addr - range.base,
            vcpu,
        };
        let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
        dev.write(access, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo {
        last: Vec<(u64, u8)>,
    }

    impl BusDevice for Echo {
        fn debug_label(&self) -> &str {
            "echo"
        }
        fn read(&mut self, access: BusAccess, data: &mut [u8]) {
            data.fill(access.offset as u8);
        }
        fn write(&mut self, access: BusAccess, data: &[u8]) {
            self.last.push((access.offset, data[0]));
        }
    }

    fn echo() -> Arc<Mutex<Echo>> {
        Arc::new(Mutex::new(Echo { last: Vec::new() }))
    }

    #[test]
    fn routes_by_offset_inside_the_range() {
        let mut bus = Bus::new();
        let dev = echo();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0, 0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(1, 0x3f8, &[7]));
        assert_eq!(dev.lock().unwrap().last, vec![(0, 7)]);
    }

    #[test]
    fn unclaimed_addresses_are_reported() {
        let mut bus = Bus::new();
        bus.insert(echo(), 0x60, 1).unwrap();
        let mut b = [0u8; 1];
        assert!(!bus.read(0, 0x61, &mut b));
        assert!(!bus.read(0, 0x5f, &mut b));
        assert!(!bus.write(0, 0, &[0]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(echo(), 0x1000, 0x100).unwrap();
        assert!(matches!(
            bus.insert(echo(), 0x10ff, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(echo(), 0xf00, 0x101),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(echo(), 0x0, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(echo(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(echo(), 0x1100, 0x100).unwrap();
    }
}
