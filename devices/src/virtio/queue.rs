//! A queue's driver-chosen layout as plain data, and its checked conversion
//! into a [`virtio_queue::Queue`] on the VMM thread.
//!
//! The transport records what the driver wrote into QueueNum/QueueDesc/...
//! without judging it; [`QueueConfig::check`] applies the rules that need
//! no guest memory (VIRTIO 1.2 §2.7: power-of-two size, ring alignment), and
//! [`QueueConfig::build`] adds the one that does (every ring inside guest
//! memory), so a bad layout becomes an error, never a wild access.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory};

/// One queue as the driver configured it through the transport registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// QueueNum: number of descriptors.
    pub size: u16,
    /// QueueReady: the driver enabled this queue.
    pub ready: bool,
    /// QueueDesc: guest address of the descriptor table.
    pub desc_table: u64,
    /// QueueDriver: guest address of the available ring.
    pub avail_ring: u64,
    /// QueueDevice: guest address of the used ring.
    pub used_ring: u64,
}

/// Why a queue layout was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueConfigError {
    /// Size zero, not a power of two, or above the device's maximum.
    #[error("queue size {size} is invalid (maximum {max}, power of two required)")]
    BadSize {
        /// Size the driver chose.
        size: u16,
        /// The device's maximum.
        max: u16,
    },
    /// A ring address breaks its alignment rule (16/2/4 bytes).
    #[error("queue {ring} address {addr:#x} is misaligned")]
    Misaligned {
        /// Which ring.
        ring: &'static str,
        /// The address the driver wrote.
        addr: u64,
    },
    /// A ring is not (entirely) inside guest memory, or the queue is not ready.
    #[error("queue rings are not inside guest memory")]
    OutsideMemory,
    /// virtio-queue refused the configuration.
    #[error("queue rejected: {0}")]
    Queue(String),
}

impl QueueConfig {
    /// Checks the memory-independent rules against `max` (QueueNumMax).
    pub fn check(&self, max: u16) -> Result<(), QueueConfigError> {
        if self.size == 0 || !self.size.is_power_of_two() || self.size > max {
            return Err(QueueConfigError::BadSize {
                size: self.size,
                max,
            });
        }
        for (ring, addr, align) in [
            ("descriptor table", self.desc_table, 16),
            ("available ring", self.avail_ring, 2),
            ("used ring", self.used_ring, 4),
        ] {
            if addr % align != 0 {
                return Err(QueueConfigError::Misaligned { ring, addr });
            }
        }
        Ok(())
    }

    /// Builds the live queue, checking every rule including that all three
    /// rings lie in `mem`.
    pub fn build<M: GuestMemory>(
        &self,
        max: u16,
        event_idx: bool,
        mem: &M,
    ) -> Result<Queue, QueueConfigError> {
        self.check(max)?;
        let err = |e: virtio_queue::Error| QueueConfigError::Queue(e.to_string());
        let mut q = Queue::new(max).map_err(err)?;
        q.try_set_size(self.size).map_err(err)?;
        q.try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(err)?;
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(err)?;
        q.try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(err)?;
        q.set_event_idx(event_idx);
        q.set_ready(self.ready);
        if !q.is_valid(mem) {
            return Err(QueueConfigError::OutsideMemory);
        }
        Ok(q)
    }
}

/// `VRING_AVAIL_F_NO_INTERRUPT`: without EVENT_IDX, the driver's way to say
/// "don't interrupt me" (virtio 1.2 §2.7.7).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether the driver wants an interrupt for the used buffers just added.
///
/// With EVENT_IDX this is virtio-queue's `needs_notification` (used_event);
/// without it, virtio-queue 0.18 always answers yes, so the avail ring's
/// NO_INTERRUPT flag is read here instead, as the spec asks a device to.
pub fn driver_wants_interrupt<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
) -> Result<bool, virtio_queue::Error> {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem);
    }
    // Order the used-ring writes before reading the driver's flags.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let mut flags = [0u8; 2];
    let addr = GuestAddress(queue.avail_ring());
    let ok = mem
        .get_slices(addr, 2, vm_memory::Permissions::Read)
        .ok()
        .and_then(|mut it| it.next())
        .and_then(Result::ok)
        .filter(|s| s.len() == 2)
        .map(|s| {
            use vm_memory::Bytes;
            s.read_slice(&mut flags, 0).is_ok()
        })
        .unwrap_or(false);
    if !ok {
        return Err(virtio_queue::Error::InvalidAvailRingIndex);
    }
    Ok(u16::from_le_bytes(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn good() -> QueueConfig {
        QueueConfig {
            size: 16,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        }
    }

    #[test]
    fn checks_size_and_alignment() {
        assert_eq!(good().check(16), Ok(()));
        for size in [0, 3, 32] {
            let c = QueueConfig { size, ..good() };
            assert!(matches!(c.check(16), Err(QueueConfigError::BadSize { .. })));
        }
        for c in [
            QueueConfig {
                desc_table: 0x1008,
                ..good()
            },
            QueueConfig {
                avail_ring: 0x2001,
                ..good()
            },
            QueueConfig {
                used_ring: 0x3002,
                ..good()
            },
        ] {
            assert!(matches!(
                c.check(16),
                Err(QueueConfigError::Misaligned { .. })
            ));
        }
    }

    #[test]
    fn build_requires_rings_in_memory_and_ready() -> Result<(), Box<dyn std::error::Error>> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)])?;
        let q = good().build(16, true, &mem)?;
        assert_eq!(q.size(), 16);
        assert!(q.event_idx_enabled());
        let far = QueueConfig {
            used_ring: 0x1_0000_0000,
            ..good()
        };
        assert_eq!(
            far.build(16, false, &mem).err(),
            Some(QueueConfigError::OutsideMemory)
        );
        let not_ready = QueueConfig {
            ready: false,
            ..good()
        };
        assert_eq!(
            not_ready.build(16, false, &mem).err(),
            Some(QueueConfigError::OutsideMemory)
        );
        Ok(())
    }
}
