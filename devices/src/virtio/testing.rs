//! The driver's side of a split virtqueue, for device tests and the
//! benchmarks' synthetic guests (feature `test-utils`).
//!
//! Written here rather than taken from virtio-queue 0.18's `MockSplitQueue`,
//! which places the used ring at `avail + 4 + len` (elements, not bytes):
//! for queues above 8 entries its used ring overlaps the available ring's
//! tail and `used_event`.
//!
//! Layout from a base address: descriptor table at `base`, available ring
//! at `base + 0x1000`, used ring at `base + 0x2000` (room for 256 entries
//! each), so a test picks one base per queue and knows where everything is.
//!
//! ```
//! use devices::virtio::testing::DriverQueue;
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
//! let mut q = DriverQueue::new(mem, 0, 16);
//! let head = q.push(&[(0x8000, 512, DriverQueue::<GuestMemoryMmap>::WRITE)]);
//! assert_eq!(head, 0);
//! assert_eq!(q.avail_idx(), 1);
//! assert!(q.used_entries().is_empty());
//! ```

use std::sync::atomic::{fence, Ordering};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{DeviceError, QueueConfig, TransportEvent, VirtioDevice};

/// Applies a transport message to `dev` the way the VMM's device slot does
/// (`vmm/src/ring/slot.rs`): an activation of a live device resets it
/// first, a refused activation asks the driver for a reset, and a reset
/// drops the queues. (The slot also waits for in-flight I/O before it
/// reports the reset done; device tests check `in_flight()` for that.)
pub fn transport_event<M: GuestMemory, D: VirtioDevice<M> + ?Sized>(
    dev: &mut D,
    mem: &M,
    event: &TransportEvent,
) -> Result<(), DeviceError> {
    match event {
        TransportEvent::Activate(activation) => {
            if dev.is_active() {
                dev.reset();
            }
            let result = dev.activate(mem, activation);
            if result.is_err() {
                dev.request_reset();
            }
            result
        }
        TransportEvent::Reset => {
            dev.reset();
            Ok(())
        }
    }
}

/// Offset of the available ring from the queue's base.
pub const AVAIL_OFFSET: u64 = 0x1000;
/// Offset of the used ring from the queue's base.
pub const USED_OFFSET: u64 = 0x2000;
/// Bytes a queue's rings take from its base.
pub const QUEUE_FOOTPRINT: u64 = 0x3000;

/// One split queue as a driver sees it, in guest memory `M`.
#[derive(Debug, Clone)]
pub struct DriverQueue<M: GuestMemory> {
    mem: M,
    base: u64,
    size: u16,
    next_desc: u16,
    /// Used entries already returned by [`Self::take_used`].
    seen_used: u16,
}

/// A descriptor as a test writes it: guest address, length, flags.
pub type Desc = (u64, u32, u16);

impl<M: GuestMemory> DriverQueue<M> {
    /// VRING_DESC_F_WRITE: the device writes this buffer.
    pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    /// VRING_DESC_F_NEXT.
    pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    /// VRING_DESC_F_INDIRECT.
    pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    /// A queue of `size` entries (at most 256) whose rings start at `base`;
    /// the rings are zeroed.
    pub fn new(mem: M, base: u64, size: u16) -> Self {
        let mut q = Self {
            mem,
            base,
            size: size.clamp(1, 256),
            next_desc: 0,
            seen_used: 0,
        };
        q.clear();
        q
    }

    /// The guest memory the queue lives in.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Address of the descriptor table.
    pub fn desc_table(&self) -> u64 {
        self.base
    }

    /// Address of the available ring.
    pub fn avail_ring(&self) -> u64 {
        self.base + AVAIL_OFFSET
    }

    /// Address of the used ring.
    pub fn used_ring(&self) -> u64 {
        self.base + USED_OFFSET
    }

    /// What a driver writes into the transport for this queue.
    pub fn config(&self) -> QueueConfig {
        QueueConfig {
            size: self.size,
            ready: true,
            desc_table: self.desc_table(),
            avail_ring: self.avail_ring(),
            used_ring: self.used_ring(),
        }
    }

    /// Zeroes the rings and starts over (a driver re-initialising the
    /// queue after a reset).
    pub fn clear(&mut self) {
        let zeros = vec![0u8; QUEUE_FOOTPRINT as usize];
        // A queue outside memory is the test's own mistake; the device
        // under test will say so when it builds the queue.
        let _ = self.mem.write_slice(&zeros, GuestAddress(self.base));
        self.next_desc = 0;
        self.seen_used = 0;
    }

    /// Reserves the next free descriptor index for a hand-built entry.
    pub fn take_desc(&mut self) -> u16 {
        let idx = self.next_desc;
        self.next_desc = (self.next_desc + 1) % self.size;
        idx
    }

    /// Writes descriptor `idx` of the table as it is (no link added).
    pub fn store(&self, idx: u16, d: Descriptor) {
        let at = self.desc_table() + 16 * u64::from(idx % self.size);
        let _ = self.mem.write_obj(RawDescriptor::from(d), GuestAddress(at));
    }

    /// Writes descriptor `idx` of an indirect table at `table`.
    pub fn store_indirect(&self, table: u64, idx: u16, d: Descriptor) {
        let at = table + 16 * u64::from(idx);
        let _ = self.mem.write_obj(RawDescriptor::from(d), GuestAddress(at));
    }

    /// The available ring's index.
    pub fn avail_idx(&self) -> u16 {
        self.mem
            .load(GuestAddress(self.avail_ring() + 2), Ordering::Acquire)
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// Sets the available ring's index, after every entry written before
    /// (release): a device on another thread may read it at once.
    pub fn set_avail_idx(&self, v: u16) {
        let _ = self.mem.store(
            v.to_le(),
            GuestAddress(self.avail_ring() + 2),
            Ordering::Release,
        );
    }

    /// Makes every head of `heads` available with one index update, as a
    /// driver batching requests does; returns the index before and after,
    /// for [`Self::kick_wanted`].
    pub fn publish_all(&self, heads: impl IntoIterator<Item = u16>) -> (u16, u16) {
        let old = self.avail_idx();
        let mut idx = old;
        for head in heads {
            self.set_avail_entry(idx, head);
            idx = idx.wrapping_add(1);
        }
        self.set_avail_idx(idx);
        (old, idx)
    }

    /// `avail_event` (EVENT_IDX: the device wants a kick once the avail
    /// index passes it), after the driver's own writes (full fence).
    pub fn avail_event(&self) -> u16 {
        fence(Ordering::SeqCst);
        let at = GuestAddress(self.used_ring() + 4 + 8 * u64::from(self.size));
        self.mem
            .load(at, Ordering::Acquire)
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// Whether a driver that moved the avail index from `old` to `new` must
    /// kick (VIRTIO 1.2 §2.7.10: `vring_need_event` on `avail_event`).
    pub fn kick_wanted(&self, old: u16, new: u16) -> bool {
        let event = self.avail_event();
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// Writes entry `i` (mod size) of the available ring.
    pub fn set_avail_entry(&self, i: u16, head: u16) {
        let at = self.avail_ring() + 4 + 2 * u64::from(i % self.size);
        let _ = self.mem.write_obj(head, GuestAddress(at));
    }

    /// Sets the available ring's flags (1 = VRING_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags(&self, flags: u16) {
        let _ = self.mem.write_obj(flags, GuestAddress(self.avail_ring()));
    }

    /// Where `used_event` lives (after the available ring's entries).
    pub fn used_event_addr(&self) -> GuestAddress {
        GuestAddress(self.avail_ring() + 4 + 2 * u64::from(self.size))
    }

    /// Sets `used_event` (EVENT_IDX: interrupt me when used idx passes
    /// it), visible to the device before the driver reads the used index
    /// again (full fence).
    pub fn set_used_event(&self, v: u16) {
        let _ = self
            .mem
            .store(v.to_le(), self.used_event_addr(), Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// Makes chain `head` available.
    pub fn publish(&self, head: u16) {
        let idx = self.avail_idx();
        self.set_avail_entry(idx, head);
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// Puts a chain of `(addr, len, flags)` in the table at the next free
    /// descriptors (NEXT links are added) and publishes it; returns its head.
    pub fn push(&mut self, descs: &[Desc]) -> u16 {
        let head = self.add_chain(descs);
        self.publish(head);
        head
    }

    /// Like [`Self::push`] without publishing.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let (flags, next) = if last {
                (flags & !Self::NEXT, 0)
            } else {
                (flags | Self::NEXT, (idx + 1) % self.size)
            };
            self.store(idx, Descriptor::new(addr, len, flags, next));
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % self.size;
        head
    }

    /// Publishes one descriptor pointing at an indirect table at `table`
    /// holding `descs` (linked in order); returns its head.
    pub fn push_indirect(&mut self, table: u64, descs: &[Desc]) -> u16 {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let (flags, next) = if last {
                (flags & !Self::NEXT, 0)
            } else {
                (flags | Self::NEXT, i as u16 + 1)
            };
            self.store_indirect(table, i as u16, Descriptor::new(addr, len, flags, next));
        }
        let len = (descs.len() * 16) as u32;
        self.push(&[(table, len, Self::INDIRECT)])
    }

    /// The used ring's index (acquire: the entries before it are visible).
    pub fn used_idx(&self) -> u16 {
        self.mem
            .load(GuestAddress(self.used_ring() + 2), Ordering::Acquire)
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// Sets the used ring's index (a test rewinding the rings).
    pub fn set_used_idx(&self, v: u16) {
        let _ = self.mem.write_obj(v, GuestAddress(self.used_ring() + 2));
    }

    /// Used entry `i` (mod size) as (head, len).
    pub fn used_entry(&self, i: u16) -> (u32, u32) {
        let at = self.used_ring() + 4 + 8 * u64::from(i % self.size);
        let id = self.mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX);
        let len = self.mem.read_obj(GuestAddress(at + 4)).unwrap_or(u32::MAX);
        (id, len)
    }

    /// Every used entry so far (up to one ring's worth) as (head, len).
    pub fn used_entries(&self) -> Vec<(u32, u32)> {
        (0..self.used_idx()).map(|i| self.used_entry(i)).collect()
    }

    /// Used entries the device added since the last call, as (head, len).
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        std::iter::from_fn(|| self.next_used()).collect()
    }

    /// The next used entry not yet seen, as (head, len), without
    /// allocating (for a driver's hot loop).
    pub fn next_used(&mut self) -> Option<(u32, u32)> {
        if self.seen_used == self.used_idx() {
            return None;
        }
        let entry = self.used_entry(self.seen_used);
        self.seen_used = self.seen_used.wrapping_add(1);
        Some(entry)
    }

    /// Used entries seen so far by [`Self::next_used`] (the value a driver
    /// writes to `used_event` to hear of the next one).
    pub fn seen_used(&self) -> u16 {
        self.seen_used
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    #[test]
    fn chains_and_indirect_tables_are_laid_out_as_the_spec_says() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        let mut q = DriverQueue::new(mem.clone(), 0x4000, 8);
        let h = q.push(&[
            (0x9000, 16, 0),
            (0x9100, 1, DriverQueue::<GuestMemoryMmap>::WRITE),
        ]);
        assert_eq!(h, 0);
        let d0: RawDescriptor = mem.read_obj(GuestAddress(0x4000)).expect("desc");
        let d0 = Descriptor::from(d0);
        assert_eq!((d0.addr().0, d0.len(), d0.next()), (0x9000, 16, 1));
        assert_ne!(d0.flags() & DriverQueue::<GuestMemoryMmap>::NEXT, 0);
        let i = q.push_indirect(0xa000, &[(0x9200, 8, 0)]);
        assert_eq!(i, 2);
        assert_eq!(q.avail_idx(), 2);
        assert_eq!(q.config().avail_ring, 0x5000);
        assert_eq!(q.used_event_addr(), GuestAddress(0x5000 + 4 + 16));
        assert!(q.take_used().is_empty());
        // A device that used one entry and asks for a kick after index 2.
        mem.write_obj(7u32, GuestAddress(0x6000 + 4)).expect("id");
        mem.write_obj(3u32, GuestAddress(0x6000 + 8)).expect("len");
        mem.write_obj(1u16, GuestAddress(0x6000 + 2))
            .expect("used idx");
        assert_eq!(q.next_used(), Some((7, 3)));
        assert_eq!(q.next_used(), None);
        assert_eq!(q.seen_used(), 1);
        mem.write_obj(2u16, GuestAddress(0x6000 + 4 + 8 * 8))
            .expect("avail_event");
        let (old, new) = q.publish_all([0, 1]);
        assert_eq!((old, new), (2, 4));
        assert!(q.kick_wanted(old, new), "index passed avail_event 2");
        assert!(!q.kick_wanted(4, 4));
    }
}
