//! Turning a checked request into one ring operation, and keeping what the
//! kernel may still be using until its completion comes back.
//!
//! Every operation in flight owns a slot. The slot holds the iovec array
//! the kernel reads, so the array never moves or dies before the CQE
//! arrives, even across a device reset: a reset only *orphans* busy slots,
//! which are freed when their (now ignored) completion comes in. Tags carry
//! the queue, the slot and the device's reset generation, so a completion
//! always finds the slot it belongs to and a stale one cannot be mistaken
//! for a live request.

use std::os::fd::RawFd;

use libc::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::request::{Operation, Request, Segment};
use crate::io::{IoOp, IoSubmit, IoSubmitError, IOV_MAX};

const SLOT_BITS: u32 = 16;
const GEN_BITS: u32 = 24;
const QUEUE_SHIFT: u32 = SLOT_BITS + GEN_BITS;
/// Generations wrap within the 24 bits a tag has room for.
pub(crate) const GEN_MASK: u32 = (1 << GEN_BITS) - 1;

/// Packs (queue, generation, slot) into a 48-bit tag.
pub(crate) fn encode_tag(queue: u8, generation: u32, slot: u16) -> u64 {
    (u64::from(queue) << QUEUE_SHIFT)
        | (u64::from(generation & GEN_MASK) << SLOT_BITS)
        | u64::from(slot)
}

/// Recovers the queue index from a tag; the rest is matched exactly.
pub(crate) fn tag_queue(tag: u64) -> usize {
    ((tag >> QUEUE_SHIFT) & 0xff) as usize
}

fn tag_slot(tag: u64) -> usize {
    (tag & ((1 << SLOT_BITS) - 1)) as usize
}

/// Why a request could not be submitted; each earns IOERR.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// A buffer could not be mapped to host memory.
    #[error("guest buffer at {0:#x} cannot be mapped")]
    Map(u64),
    /// The buffers map to more host pieces than one vectored op takes.
    #[error("request needs more than {IOV_MAX} iovecs")]
    TooManyIovecs,
    /// The request has no host operation (answered by the device itself).
    #[error("request has no host operation")]
    NoHostOp,
    /// The ring refused the operation.
    #[error("submission failed: {0}")]
    Submit(#[source] IoSubmitError),
}

/// What kind of op a slot waits for, and how to judge its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PendingKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// A request whose op is in the kernel's hands.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pending {
    pub head: u16,
    pub status: GuestAddress,
    pub kind: PendingKind,
    /// Bytes the op must transfer to count as a success.
    pub expected: u64,
}

#[derive(Debug)]
enum SlotState {
    Free,
    Busy(Pending),
    /// Submitted before a reset; waits only for its completion to be freed.
    Orphaned,
}

/// iovecs into guest memory, owned by a slot.
#[derive(Debug, Default)]
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the pointers only name guest memory, which is shared by every
// thread of the VMM anyway; this type never dereferences them, and a
// device (with its slots) is used by one thread at a time.
unsafe impl Send for Iovecs {}

#[derive(Debug)]
struct Slot {
    tag: u64,
    state: SlotState,
    iovecs: Iovecs,
}

/// What a completion turned out to be.
#[derive(Debug)]
pub(crate) enum Taken {
    /// A live request: answer it.
    Live(Pending),
    /// A request from before a reset: drop the result.
    Stale,
}

/// Why `submit` did not submit.
#[derive(Debug)]
pub(crate) enum NotSubmitted {
    /// No free slot or no room in the ring: try this request again later.
    Blocked,
    /// The request cannot be executed: answer IOERR.
    Failed(ExecuteError),
}

/// The in-flight table of one queue, bounded by the queue's maximum size.
#[derive(Debug)]
pub(crate) struct InFlight {
    slots: Vec<Slot>,
    /// Head indices currently in flight, to refuse a driver reusing one.
    heads: Vec<bool>,
    busy: usize,
    orphans: usize,
}

impl InFlight {
    pub fn new(max: u16) -> Self {
        Self {
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

    /// Whether `head` is already in flight.
    pub fn head_in_flight(&self, head: u16) -> bool {
        self.heads.get(usize::from(head)).copied().unwrap_or(true)
    }

    /// Forgets live requests (their results will be dropped) but keeps
    /// their iovecs until the kernel is done with them.
    pub fn orphan_all(&mut self) {
        for s in &mut self.slots {
            if let SlotState::Busy(_) = s.state {
                s.state = SlotState::Orphaned;
                self.busy -= 1;
                self.orphans += 1;
            }
        }
        self.heads.fill(false);
    }

    /// Maps `req`'s buffers and submits its single op, tagged.
    pub fn submit<M: GuestMemory>(
        &mut self,
        mem: &M,
        io: &mut dyn IoSubmit,
        fd: RawFd,
        head: u16,
        req: &Request,
        tag_of: impl Fn(u16) -> u64,
    ) -> Result<(), NotSubmitted> {
        let Some(index) = self
            .slots
            .iter()
            .position(|s| matches!(s.state, SlotState::Free))
        else {
            return Err(NotSubmitted::Blocked);
        };
        let slot_id = u16::try_from(index).map_err(|_| NotSubmitted::Blocked)?;
        let tag = tag_of(slot_id);
        let slot = self.slots.get_mut(index).ok_or(NotSubmitted::Blocked)?;
        let (op, kind, expected) = match req.op {
            Operation::Read { offset } => {
                map_segments(mem, &req.data, Permissions::Write, &mut slot.iovecs.0)
                    .map_err(NotSubmitted::Failed)?;
                let op = IoOp::Readv {
                    fd,
                    iovecs: slot.iovecs.0.as_ptr(),
                    iovcnt: slot.iovecs.0.len() as u32,
                    offset,
                };
                (op, PendingKind::Read, req.data_len)
            }
            Operation::Write { offset } => {
                map_segments(mem, &req.data, Permissions::Read, &mut slot.iovecs.0)
                    .map_err(NotSubmitted::Failed)?;
                let op = IoOp::Writev {
                    fd,
                    iovecs: slot.iovecs.0.as_ptr(),
                    iovcnt: slot.iovecs.0.len() as u32,
                    offset,
                };
                (op, PendingKind::Write, req.data_len)
            }
            Operation::Flush => (IoOp::Fsync { fd, datasync: true }, PendingKind::Flush, 0),
            Operation::Discard { offset, len } => (
                IoOp::Fallocate {
                    fd,
                    mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                },
                PendingKind::Discard,
                0,
            ),
            Operation::WriteZeroes { offset, len, unmap } => {
                let mode = if unmap {
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                } else {
                    FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
                };
                (
                    IoOp::Fallocate {
                        fd,
                        mode,
                        offset,
                        len,
                    },
                    PendingKind::WriteZeroes,
                    0,
                )
            }
            // Answered synchronously by the device; never reaches here.
            Operation::GetId => return Err(NotSubmitted::Failed(ExecuteError::NoHostOp)),
        };
        // SAFETY: the iovec array lives in this slot's Vec, which is neither
        // touched nor dropped until `take` sees this tag's completion (a
        // reset only orphans the slot; dropping the table with ops in flight
        // leaks the arrays, see Drop). The buffers are guest memory, mapped
        // for the VM's life and checked above to lie inside it. `fd` is the
        // device's disk, which the device keeps open while ops are in flight.
        match unsafe { io.submit(op, tag) } {
            Ok(()) => {
                slot.tag = tag;
                slot.state = SlotState::Busy(Pending {
                    head,
                    status: req.status,
                    kind,
                    expected,
                });
                if let Some(h) = self.heads.get_mut(usize::from(head)) {
                    *h = true;
                }
                self.busy += 1;
                Ok(())
            }
            Err(IoSubmitError::QueueFull) => Err(NotSubmitted::Blocked),
            Err(e) => Err(NotSubmitted::Failed(ExecuteError::Submit(e))),
        }
    }

    /// Claims the slot a completion belongs to; `None` for a tag that
    /// matches nothing (never issued, or already completed).
    pub fn take(&mut self, tag: u64) -> Option<Taken> {
        let slot = self.slots.get_mut(tag_slot(tag))?;
        if slot.tag != tag {
            return None;
        }
        let taken = match std::mem::replace(&mut slot.state, SlotState::Free) {
            SlotState::Free => return None,
            SlotState::Busy(p) => {
                self.busy -= 1;
                if let Some(h) = self.heads.get_mut(usize::from(p.head)) {
                    *h = false;
                }
                Taken::Live(p)
            }
            SlotState::Orphaned => {
                self.orphans -= 1;
                Taken::Stale
            }
        };
        slot.tag = u64::MAX;
        slot.iovecs.0.clear();
        Some(taken)
    }
}

impl Drop for InFlight {
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

/// Maps guest segments to host iovecs, splitting at region boundaries.
fn map_segments<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    access: Permissions,
    out: &mut Vec<libc::iovec>,
) -> Result<(), ExecuteError> {
    out.clear();
    out.reserve(segs.len());
    for seg in segs {
        let addr = seg.addr.0;
        let slices = mem
            .get_slices(seg.addr, seg.len as usize, access)
            .map_err(|_| ExecuteError::Map(addr))?;
        let mut mapped = 0usize;
        for slice in slices {
            let slice = slice.map_err(|_| ExecuteError::Map(addr))?;
            if out.len() == IOV_MAX {
                return Err(ExecuteError::TooManyIovecs);
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
        if mapped != seg.len as usize {
            return Err(ExecuteError::Map(addr));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    #[test]
    fn tags_round_trip_and_fit_48_bits() {
        let t = encode_tag(0xff, u32::MAX, 0xffff);
        assert!(t <= crate::io::TAG_MAX);
        assert_eq!(tag_queue(t), 0xff);
        assert_eq!(tag_slot(t), 0xffff);
        assert_ne!(encode_tag(0, 1, 3), encode_tag(0, 2, 3));
    }

    #[test]
    fn segments_split_at_region_boundaries() -> Result<(), Box<dyn std::error::Error>> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])?;
        let mut out = Vec::new();
        let seg = Segment {
            addr: GuestAddress(0xf00),
            len: 0x200,
        };
        map_segments(&mem, &[seg], Permissions::Write, &mut out)?;
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].iov_len, 0x100);
        assert_eq!(out[1].iov_len, 0x100);
        let outside = Segment {
            addr: GuestAddress(0x1f00),
            len: 0x200,
        };
        assert!(map_segments(&mem, &[outside], Permissions::Read, &mut out).is_err());
        Ok(())
    }
}
