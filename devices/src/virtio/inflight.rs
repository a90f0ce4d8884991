//! Operations in the kernel's hands: tagged slots that keep each op's
//! iovec array alive until its completion, across device resets, and the
//! mapping of guest buffers to host iovecs.
//!
//! Every op in flight owns a slot. A reset only *orphans* busy slots, which
//! are freed when their (then ignored) completion comes in, so the kernel
//! never reads an iovec array that was freed or reused. A tag packs the
//! queue, the device's reset generation and the slot, so a completion
//! always finds its slot and one from before a reset is never mistaken for
//! a live request.

use vm_memory::{GuestAddress, GuestMemory, Permissions};

use crate::io::{IOV_MAX, TAG_MAX};

const SLOT_BITS: u32 = 16;
const GEN_BITS: u32 = 24;
const QUEUE_SHIFT: u32 = SLOT_BITS + GEN_BITS;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;

/// The identity of one op: which queue, which reset generation, which slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    /// Queue index the op serves.
    pub queue: u8,
    /// The device's reset generation when the op was submitted.
    pub generation: u32,
    /// Slot (or read) number within the queue.
    pub slot: u16,
}

impl Tag {
    /// Packs the tag into the 48 bits a device may use.
    pub fn encode(self) -> u64 {
        (u64::from(self.queue) << QUEUE_SHIFT)
            | (u64::from(self.generation & GEN_MASK) << SLOT_BITS)
            | u64::from(self.slot)
    }

    /// Unpacks a tag; every 48-bit value decodes (matching is the slot's
    /// business).
    pub fn decode(tag: u64) -> Self {
        let tag = tag & TAG_MAX;
        Self {
            queue: (tag >> QUEUE_SHIFT) as u8,
            generation: ((tag >> SLOT_BITS) as u32) & GEN_MASK,
            slot: tag as u16,
        }
    }
}

/// A reset generation counter that wraps inside what a [`Tag`] holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Generation(u32);

impl Generation {
    /// The current generation.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Moves to the next generation (on every reset).
    pub fn bump(&mut self) {
        self.0 = self.0.wrapping_add(1) & GEN_MASK;
    }
}

/// iovecs into guest memory, owned by an op until its completion.
#[derive(Debug, Default)]
pub struct Iovecs(pub Vec<libc::iovec>);

// SAFETY: the pointers only name guest memory, which is shared by every
// thread of the VMM anyway; this type never dereferences them, and a
// device (with its slots) is used by one thread at a time.
unsafe impl Send for Iovecs {}

impl Iovecs {
    /// Pointer and count for an [`IoOp`](crate::io::IoOp).
    pub fn as_raw(&self) -> (*const libc::iovec, u32) {
        (self.0.as_ptr(), self.0.len() as u32)
    }
}

#[derive(Debug)]
enum SlotState<T> {
    Free,
    Busy {
        head: u16,
        pending: T,
    },
    /// Submitted before a reset; waits only for its completion.
    Orphaned {
        pending: T,
    },
}

#[derive(Debug)]
struct Slot<T> {
    tag: u64,
    state: SlotState<T>,
    iovecs: Iovecs,
}

/// What a completion turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken<T> {
    /// A live request: answer chain `head`.
    Live {
        /// The chain the op serves.
        head: u16,
        /// What the device recorded at submission.
        pending: T,
    },
    /// A request from before a reset: drop the result (what was recorded
    /// is still handed back, for the device's own bookkeeping).
    Stale {
        /// What the device recorded at submission.
        pending: T,
    },
}

/// The in-flight table of one queue, bounded by the queue's maximum size:
/// a guest can never make it grow.
#[derive(Debug)]
pub struct InFlight<T> {
    queue: u8,
    slots: Vec<Slot<T>>,
    /// Head indices in flight, to refuse a driver reusing one.
    heads: Vec<bool>,
    busy: usize,
    orphans: usize,
}

/// A free slot, reserved while the device builds its op.
#[derive(Debug)]
pub struct Reserved {
    index: usize,
    /// The op's tag.
    pub tag: u64,
}

impl<T> InFlight<T> {
    /// `max` slots for queue `queue` (its maximum size).
    pub fn new(queue: u8, max: u16) -> Self {
        Self {
            queue,
            slots: (0..max)
                .map(|_| Slot {
                    tag: u64::MAX,
                    state: SlotState::Free,
                    iovecs: Iovecs::default(),
                })
                .collect(),
            heads: vec![false; usize::from(max)],
            busy: 0,
            orphans: 0,
        }
    }

    /// Operations the kernel may still be working on (live or orphaned).
    pub fn outstanding(&self) -> usize {
        self.busy + self.orphans
    }

    /// Live operations (not orphaned).
    pub fn busy(&self) -> usize {
        self.busy
    }

    /// Whether `head` is already in flight (out-of-range heads count as in
    /// flight, so they are refused).
    pub fn head_in_flight(&self, head: u16) -> bool {
        self.heads.get(usize::from(head)).copied().unwrap_or(true)
    }

    /// Finds a free slot and clears its iovecs for the op to fill; `None`
    /// when every slot is busy or orphaned.
    pub fn reserve(&mut self, generation: Generation) -> Option<(Reserved, &mut Iovecs)> {
        let index = self
            .slots
            .iter()
            .position(|s| matches!(s.state, SlotState::Free))?;
        let tag = Tag {
            queue: self.queue,
            generation: generation.get(),
            slot: u16::try_from(index).ok()?,
        }
        .encode();
        let slot = self.slots.get_mut(index)?;
        slot.iovecs.0.clear();
        Some((Reserved { index, tag }, &mut slot.iovecs))
    }

    /// Records that the op for `reserved` was submitted for chain `head`.
    pub fn commit(&mut self, reserved: Reserved, head: u16, pending: T) {
        let Some(slot) = self.slots.get_mut(reserved.index) else {
            return;
        };
        slot.tag = reserved.tag;
        slot.state = SlotState::Busy { head, pending };
        if let Some(h) = self.heads.get_mut(usize::from(head)) {
            *h = true;
        }
        self.busy += 1;
    }

    /// Gives back a reserved slot whose op was not submitted.
    pub fn release(&mut self, reserved: Reserved) {
        if let Some(slot) = self.slots.get_mut(reserved.index) {
            slot.iovecs.0.clear();
        }
    }

    /// Claims the slot a completion belongs to; `None` for a tag that
    /// matches nothing (never issued, or already completed).
    pub fn take(&mut self, tag: u64) -> Option<Taken<T>> {
        let slot = self.slots.get_mut(usize::from(Tag::decode(tag).slot))?;
        if slot.tag != tag {
            return None;
        }
        let taken = match std::mem::replace(&mut slot.state, SlotState::Free) {
            SlotState::Free => return None,
            SlotState::Busy { head, pending } => {
                self.busy -= 1;
                if let Some(h) = self.heads.get_mut(usize::from(head)) {
                    *h = false;
                }
                Taken::Live { head, pending }
            }
            SlotState::Orphaned { pending } => {
                self.orphans -= 1;
                Taken::Stale { pending }
            }
        };
        slot.tag = u64::MAX;
        slot.iovecs.0.clear();
        Some(taken)
    }

    /// Forgets live requests (their results will be dropped) but keeps
    /// their iovecs until the kernel is done with them.
    pub fn orphan_all(&mut self) {
        for s in &mut self.slots {
            s.state = match std::mem::replace(&mut s.state, SlotState::Free) {
                SlotState::Busy { pending, .. } => {
                    self.busy -= 1;
                    self.orphans += 1;
                    SlotState::Orphaned { pending }
                }
                other => other,
            };
        }
        self.heads.fill(false);
    }

    /// What every op still in the kernel (live or orphaned) recorded; a
    /// scan of the bounded table, for rare questions (a FLUSH's barrier).
    pub fn pending(&self) -> impl Iterator<Item = &T> + '_ {
        self.slots.iter().filter_map(|s| match &s.state {
            SlotState::Busy { pending, .. } | SlotState::Orphaned { pending } => Some(pending),
            SlotState::Free => None,
        })
    }

    /// Tags of orphaned ops, for a caller that must cancel them.
    pub fn orphaned_tags(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots
            .iter()
            .filter(|s| matches!(s.state, SlotState::Orphaned { .. }))
            .map(|s| s.tag)
    }
}

impl<T> Drop for InFlight<T> {
    fn drop(&mut self) {
        // The kernel may still write through these arrays' pointers and
        // read the arrays themselves; leaking them is the only safe end.
        for s in &mut self.slots {
            if !matches!(s.state, SlotState::Free) {
                std::mem::forget(std::mem::take(&mut s.iovecs));
            }
        }
    }
}

/// Why a guest buffer could not become host iovecs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The buffer is not (entirely) inside guest memory.
    #[error("guest buffer at {0:#x} is outside guest memory")]
    OutsideMemory(u64),
    /// More pieces than one vectored op takes.
    #[error("buffers need more than {IOV_MAX} iovecs")]
    TooManyIovecs,
}

/// Appends the host iovecs for guest buffer `[addr, addr+len)` to `out`,
/// split at memory-region boundaries; `access` is how the kernel will use
/// it (the device reads: `Read`; the device writes: `Write`). On error
/// `out` may hold part of the buffer: callers drop the whole op.
pub fn map_guest_buffer<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    access: Permissions,
    out: &mut Vec<libc::iovec>,
) -> Result<(), MapError> {
    let slices = mem
        .get_slices(addr, len, access)
        .map_err(|_| MapError::OutsideMemory(addr.0))?;
    let mut mapped = 0usize;
    for slice in slices {
        let slice = slice.map_err(|_| MapError::OutsideMemory(addr.0))?;
        if out.len() >= IOV_MAX {
            return Err(MapError::TooManyIovecs);
        }
        // The pointer stays valid after the guard drops for the mmap
        // backends the VMM uses (the guard only matters for Xen maps).
        let base = if access == Permissions::Write {
            slice.ptr_guard_mut().as_ptr()
        } else {
            slice.ptr_guard().as_ptr().cast_mut()
        };
        out.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: slice.len(),
        });
        mapped += slice.len();
    }
    if mapped != len {
        return Err(MapError::OutsideMemory(addr.0));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    #[test]
    fn tags_round_trip_and_fit_48_bits() {
        let t = Tag {
            queue: 0xff,
            generation: u32::MAX,
            slot: 0xffff,
        };
        assert!(t.encode() <= TAG_MAX);
        let back = Tag::decode(t.encode());
        assert_eq!((back.queue, back.slot), (0xff, 0xffff));
        let a = Tag {
            queue: 0,
            generation: 1,
            slot: 3,
        };
        let b = Tag { generation: 2, ..a };
        assert_ne!(a.encode(), b.encode());
    }

    #[test]
    fn slots_are_bounded_and_orphans_wait_for_their_completion() {
        let mut t: InFlight<u32> = InFlight::new(0, 2);
        t.heads = vec![false; 8];
        let gen = Generation::default();
        let (a, _) = t.reserve(gen).expect("slot");
        let ta = a.tag;
        t.commit(a, 5, 50);
        let (b, _) = t.reserve(gen).expect("slot");
        let tb = b.tag;
        t.commit(b, 6, 60);
        assert!(t.reserve(gen).is_none(), "bounded by the queue size");
        assert!(t.head_in_flight(5));
        assert!(t.head_in_flight(999));
        assert_eq!(
            t.take(ta),
            Some(Taken::Live {
                head: 5,
                pending: 50
            })
        );
        assert_eq!(t.take(ta), None, "a completion is taken once");
        t.orphan_all();
        assert_eq!(t.outstanding(), 1);
        assert_eq!(t.busy(), 0);
        assert_eq!(t.orphaned_tags().collect::<Vec<_>>(), vec![tb]);
        assert!(
            !t.head_in_flight(6),
            "the driver may reuse heads after reset"
        );
        assert_eq!(t.take(tb), Some(Taken::Stale { pending: 60 }));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn buffers_split_at_region_boundaries() -> Result<(), Box<dyn std::error::Error>> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])?;
        let mut out = Vec::new();
        map_guest_buffer(
            &mem,
            GuestAddress(0xf00),
            0x200,
            Permissions::Write,
            &mut out,
        )?;
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].iov_len, 0x100);
        assert_eq!(out[1].iov_len, 0x100);
        out.clear();
        assert_eq!(
            map_guest_buffer(
                &mem,
                GuestAddress(0x1f00),
                0x200,
                Permissions::Read,
                &mut out
            ),
            Err(MapError::OutsideMemory(0x1f00))
        );
        Ok(())
    }
}
