//! Used-ring entries written straight through the ring's host mapping,
//! published with one used.idx store per loop turn.
//!
//! virtio-queue's `add_used` finds the guest memory region twice per
//! entry (the element, then used.idx) and stores used.idx with Release
//! each time; a network queue answering a hundred frames a turn pays that
//! a hundred times. Here the used ring's host address is found once, at
//! activation, each entry is two plain stores, and used.idx is stored once
//! when the turn's interrupt decision is made. The driver may see the
//! turn's entries a little later (at the end of the turn, before its
//! interrupt), never before they are written.
//!
//! virtio-queue counts the entries added since its last EVENT_IDX decision
//! only in its own `add_used`; batched entries are not in that count, so
//! [`UsedBatch::decide`] makes the decision for the whole window since the
//! last one (batched and unbatched entries alike), which the caller ORs
//! with virtio-queue's.

use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

/// Offset of used.idx in the used ring.
const USED_IDX_OFFSET: usize = 2;
/// Offset of the first element in the used ring.
const USED_ELEMS_OFFSET: usize = 4;
/// Bytes per used element (id, len).
const USED_ELEM_SIZE: usize = 8;
/// Offset of the first element in the avail ring.
const AVAIL_ELEMS_OFFSET: u64 = 4;

/// The host address of a used ring that lies whole in one region of plain
/// guest memory (no IOMMU), 4-byte aligned as the split ring requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedRingHost {
    /// Host address of the ring's first byte (flags). An address, not a
    /// pointer, so the queues stay `Send`; guest memory stays mapped for
    /// the VM's life.
    base: usize,
    /// Host address of used_event, 2-byte aligned.
    used_event: usize,
    size: u16,
}

impl UsedRingHost {
    /// Finds `queue`'s used ring in `mem`; `None` sends every entry the
    /// ordinary way.
    pub fn find<M: GuestMemory>(queue: &Queue, mem: &M) -> Option<Self> {
        let size = queue.size();
        let used_bytes = USED_ELEMS_OFFSET + usize::from(size) * USED_ELEM_SIZE + 2;
        let base = host_range(mem, queue.used_ring(), used_bytes)?;
        let used_event_addr = queue
            .avail_ring()
            .checked_add(AVAIL_ELEMS_OFFSET + 2 * u64::from(size))?;
        let used_event = host_range(mem, used_event_addr, 2)?;
        (base % 4 == 0 && used_event % 2 == 0 && size > 0).then_some(Self {
            base,
            used_event,
            size,
        })
    }
}

/// The host address of guest range `[addr, addr + len)` if it lies in one
/// region of plain guest memory.
fn host_range<M: GuestMemory>(mem: &M, addr: u64, len: usize) -> Option<usize> {
    let addr = GuestAddress(addr);
    let region = mem.physical_memory()?.find_region(addr)?;
    let offset = addr.checked_offset_from(region.start_addr())?;
    let end = offset.checked_add(len as u64)?;
    if end > region.len() {
        return None;
    }
    region
        .get_host_address(MemoryRegionAddress(offset))
        .ok()
        .map(|p| p as usize)
}

/// A queue's batched used entries and the state of its EVENT_IDX window.
#[derive(Debug, Default)]
pub struct UsedBatch {
    ring: Option<UsedRingHost>,
    /// Entries were written whose used.idx store is still to come.
    unpublished: bool,
    /// Entries were batched since the last decision.
    batched: bool,
    /// next_used at the last interrupt decision.
    decided_at: Wrapping<u16>,
}

impl UsedBatch {
    /// A batch for a queue just built (`next_used` is its used index).
    pub fn new(ring: Option<UsedRingHost>, next_used: u16) -> Self {
        Self {
            ring,
            unpublished: false,
            batched: false,
            decided_at: Wrapping(next_used),
        }
    }

    /// Whether entries can be written straight through the ring.
    pub fn is_direct(&self) -> bool {
        self.ring.is_some()
    }

    /// Writes the used entry (`head`, `len`) at the queue's next used
    /// index and advances it, without publishing it. False for a head
    /// outside the queue (or no direct ring): nothing was written.
    pub fn add(&mut self, queue: &mut Queue, head: u16, len: u32) -> bool {
        let Some(ring) = self.ring else {
            return false;
        };
        if head >= ring.size || queue.size() != ring.size {
            return false;
        }
        let next = queue.next_used();
        let slot = usize::from(next % ring.size);
        let elem = ring.base + USED_ELEMS_OFFSET + slot * USED_ELEM_SIZE;
        // SAFETY: `find` checked that the whole used ring of `ring.size`
        // elements lies in one mapped region of guest memory, which stays
        // mapped for the VM's life, and that it is 4-byte aligned; `slot`
        // is below the ring's size, so both u32s are inside it. The guest
        // may race on these bytes (volatile stores, no references made).
        unsafe {
            std::ptr::write_volatile(elem as *mut u32, u32::from(head).to_le());
            std::ptr::write_volatile((elem + 4) as *mut u32, len.to_le());
        }
        queue.set_next_used(next.wrapping_add(1));
        self.unpublished = true;
        self.batched = true;
        true
    }

    /// Stores used.idx (Release, after every entry written) if entries
    /// are waiting for it.
    pub fn publish(&mut self, queue: &Queue) {
        if !std::mem::take(&mut self.unpublished) {
            return;
        }
        let Some(ring) = self.ring else {
            return;
        };
        // SAFETY: used.idx is inside the ring `find` checked, 2-byte
        // aligned (the ring is 4-aligned); an AtomicU16 has u16's layout,
        // and the guest only reads this field.
        let idx = unsafe { &*((ring.base + USED_IDX_OFFSET) as *const AtomicU16) };
        idx.store(queue.next_used().to_le(), Ordering::Release);
    }

    /// The EVENT_IDX decision for every entry since the last decision,
    /// when some were batched (virtio-queue's count misses them): true if
    /// the driver's used_event lies in that window. Call after
    /// [`Self::publish`]; false without EVENT_IDX (the flags decide) or
    /// with nothing batched.
    pub fn decide(&mut self, queue: &Queue) -> bool {
        let new = Wrapping(queue.next_used());
        let old = std::mem::replace(&mut self.decided_at, new);
        let Some(ring) = self.ring else {
            return false;
        };
        if !std::mem::take(&mut self.batched) || !queue.event_idx_enabled() {
            return false;
        }
        // The used.idx store before this comes before the read of
        // used_event.
        fence(Ordering::SeqCst);
        // SAFETY: `find` checked that used_event lies in a mapped region
        // of guest memory (mapped for the VM's life) and is 2-byte
        // aligned; an AtomicU16 has u16's layout; the guest may write it
        // at any time (an atomic load, no plain reference to the bytes).
        let used_event = unsafe { &*(ring.used_event as *const AtomicU16) };
        let used_event = Wrapping(u16::from_le(used_event.load(Ordering::Relaxed)));
        new - used_event - Wrapping(1) < new - old
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;

    const SIZE: u16 = 8;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    fn queue(mem: &GuestMemoryMmap, event_idx: bool) -> Queue {
        let mut q = Queue::new(SIZE).unwrap();
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn set_used_event(mem: &GuestMemoryMmap, v: u16) {
        mem.write_obj(v, GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE)))
            .unwrap();
    }

    #[test]
    fn entries_are_written_at_once_and_published_together() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = queue(&mem, true);
        let mut b = UsedBatch::new(UsedRingHost::find(&q, &mem), q.next_used());
        assert!(b.is_direct());
        assert!(b.add(&mut q, 5, 60));
        assert!(b.add(&mut q, 2, 0));
        // A head outside the queue is refused and writes nothing.
        assert!(!b.add(&mut q, SIZE, 1));
        assert_eq!(used_idx(&mem), 0, "not visible before the turn ends");
        b.publish(&q);
        assert_eq!(used_idx(&mem), 2);
        assert_eq!(q.next_used(), 2);
        let id: u32 = mem.read_obj(GuestAddress(USED + 4)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(USED + 8)).unwrap();
        assert_eq!((id, len), (5, 60));
        let id: u32 = mem.read_obj(GuestAddress(USED + 12)).unwrap();
        assert_eq!(id, 2);
        // Entries wrap around the ring.
        for i in 0..SIZE {
            assert!(b.add(&mut q, i, u32::from(i)));
        }
        b.publish(&q);
        assert_eq!(used_idx(&mem), SIZE + 2);
        let id: u32 = mem.read_obj(GuestAddress(USED + 4)).unwrap();
        assert_eq!(id, u32::from(SIZE - 2));
    }

    #[test]
    fn the_event_idx_window_covers_every_entry_since_the_last_decision() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = queue(&mem, true);
        let mut b = UsedBatch::new(UsedRingHost::find(&q, &mem), q.next_used());
        // The driver wants to hear when entry 1 (used_event 1 -> idx 2) is used.
        set_used_event(&mem, 1);
        for h in 0..3 {
            assert!(b.add(&mut q, h, 0));
        }
        b.publish(&q);
        assert!(b.decide(&q), "used_event inside the three entries");
        // Nothing new: no interrupt.
        assert!(!b.decide(&q));
        // Two more (3, 4): used_event 10 is not reached, 3 is.
        assert!(b.add(&mut q, 3, 0));
        assert!(b.add(&mut q, 4, 0));
        b.publish(&q);
        set_used_event(&mem, 10);
        assert!(!b.decide(&q));
        assert!(b.add(&mut q, 5, 0));
        b.publish(&q);
        set_used_event(&mem, 5);
        assert!(b.decide(&q), "entry 5 is the one the driver waits for");
        // An unbatched entry (virtio-queue's add_used) moves the window too.
        q.add_used(&mem, 6, 0).unwrap();
        set_used_event(&mem, 6);
        assert!(
            !b.decide(&q),
            "nothing batched: virtio-queue's count decides"
        );
    }

    #[test]
    fn without_event_idx_the_flags_decide() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = queue(&mem, false);
        let mut b = UsedBatch::new(UsedRingHost::find(&q, &mem), q.next_used());
        assert!(b.add(&mut q, 1, 0));
        b.publish(&q);
        assert!(!b.decide(&q));
    }

    #[test]
    fn a_ring_outside_memory_is_not_direct() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2010)]).unwrap();
        let q = Queue::new(SIZE).unwrap();
        let mut q = q;
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        assert_eq!(UsedRingHost::find(&q, &mem), None);
        let mut b = UsedBatch::new(None, 0);
        assert!(!b.is_direct());
        assert!(!b.add(&mut q, 0, 0));
    }
}
