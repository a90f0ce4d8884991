//! The TX in-flight table, indexed by the chain's head index.
//!
//! A driver never has one head in two chains at once, so the head itself
//! names the op's slot: taking a chain is one index, not a search for a
//! free slot (the generic [`InFlight`](crate::virtio::InFlight) scans its
//! table, which for a queue of 256 cost a few hundred instructions per
//! frame once a batch of frames was in flight). The table is bounded by
//! the queue's maximum size, so a guest cannot make it grow.
//!
//! As in the generic table, a reset only *orphans* busy slots: their iovec
//! arrays stay untouched until the (ignored) completion, because the
//! kernel may still read them. A new driver reusing an orphaned head waits
//! for that completion ([`TxSlots::reserve`] says `Busy`).

use crate::virtio::{Generation, Iovecs, Tag, Taken};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Busy,
    /// Submitted before a reset; waits only for its completion.
    Orphaned,
}

#[derive(Debug)]
struct Slot {
    tag: u64,
    state: State,
    /// Chain length, header included.
    len: usize,
    iovecs: Iovecs,
}

/// Why a head cannot take a slot now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// The driver posted a head that is still in flight: its ring is
    /// corrupt.
    InFlight,
    /// A write from before the last reset still uses the slot: try again
    /// after completions.
    Orphaned,
    /// The head is outside the table.
    OutOfRange,
}

/// What a TX completion turned out to be: the chain's length (header
/// included) for a live one.
pub(super) type TxTaken = Taken<usize>;

/// In-flight tap writes of the TX queue, one slot per head index.
#[derive(Debug)]
pub(super) struct TxSlots {
    queue: u8,
    slots: Vec<Slot>,
    busy: usize,
    orphans: usize,
}

impl TxSlots {
    /// A table for queue `queue` of at most `max` entries.
    pub fn new(queue: u8, max: u16) -> Self {
        Self {
            queue,
            slots: (0..max)
                .map(|_| Slot {
                    tag: u64::MAX,
                    state: State::Free,
                    len: 0,
                    iovecs: Iovecs::default(),
                })
                .collect(),
            busy: 0,
            orphans: 0,
        }
    }

    /// Writes the kernel may still be working on (live or orphaned).
    pub fn outstanding(&self) -> usize {
        self.busy + self.orphans
    }

    /// The slot of chain `head`, its iovecs cleared for the op to fill,
    /// and the op's tag.
    pub fn reserve(
        &mut self,
        head: u16,
        generation: Generation,
    ) -> Result<(u64, &mut Iovecs), Refused> {
        let queue = self.queue;
        let slot = self
            .slots
            .get_mut(usize::from(head))
            .ok_or(Refused::OutOfRange)?;
        match slot.state {
            State::Free => {}
            State::Busy => return Err(Refused::InFlight),
            State::Orphaned => return Err(Refused::Orphaned),
        }
        let tag = Tag {
            queue,
            generation: generation.get(),
            slot: head,
        }
        .encode();
        slot.iovecs.0.clear();
        Ok((tag, &mut slot.iovecs))
    }

    /// Records that the write for `head` (reserved with `tag`) was
    /// submitted; `len` is the chain's length.
    pub fn commit(&mut self, head: u16, tag: u64, len: usize) {
        if let Some(slot) = self.slots.get_mut(usize::from(head)) {
            slot.tag = tag;
            slot.state = State::Busy;
            slot.len = len;
            self.busy += 1;
        }
    }

    /// Gives back a reserved slot whose write was not submitted.
    pub fn release(&mut self, head: u16) {
        if let Some(slot) = self.slots.get_mut(usize::from(head)) {
            slot.iovecs.0.clear();
        }
    }

    /// Claims the slot a completion belongs to; `None` for a tag that
    /// matches nothing (never issued, or already completed).
    pub fn take(&mut self, tag: u64) -> Option<TxTaken> {
        let head = Tag::decode(tag).slot;
        let slot = self.slots.get_mut(usize::from(head))?;
        if slot.tag != tag {
            return None;
        }
        let taken = match slot.state {
            State::Free => return None,
            State::Busy => {
                self.busy -= 1;
                Taken::Live {
                    head,
                    pending: slot.len,
                }
            }
            State::Orphaned => {
                self.orphans -= 1;
                Taken::Stale { pending: slot.len }
            }
        };
        slot.state = State::Free;
        slot.tag = u64::MAX;
        // The iovecs are cleared when the slot is reserved again.
        Some(taken)
    }

    /// Forgets live writes (their results will be dropped) but keeps their
    /// iovecs until the kernel is done with them.
    pub fn orphan_all(&mut self) {
        for s in &mut self.slots {
            if s.state == State::Busy {
                s.state = State::Orphaned;
                self.busy -= 1;
                self.orphans += 1;
            }
        }
    }
}

impl Drop for TxSlots {
    fn drop(&mut self) {
        // The kernel may still read these arrays; leaking them is the only
        // safe end.
        for s in &mut self.slots {
            if s.state != State::Free {
                std::mem::forget(std::mem::take(&mut s.iovecs));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_its_own_slot_and_a_tag_completes_once() {
        let mut t = TxSlots::new(1, 4);
        let g = Generation::default();
        let (tag, iov) = t.reserve(2, g).unwrap();
        iov.0.push(libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 1,
        });
        t.commit(2, tag, 100);
        assert_eq!(t.outstanding(), 1);
        assert_eq!(t.reserve(2, g).unwrap_err(), Refused::InFlight);
        assert_eq!(t.reserve(4, g).unwrap_err(), Refused::OutOfRange);
        assert_eq!(
            t.take(tag),
            Some(Taken::Live {
                head: 2,
                pending: 100
            })
        );
        assert_eq!(t.take(tag), None);
        assert_eq!(t.outstanding(), 0);
        let (_, iov) = t.reserve(2, g).unwrap();
        assert!(iov.0.is_empty());
    }

    #[test]
    fn after_a_reset_an_orphaned_head_waits_for_its_completion() {
        let mut t = TxSlots::new(1, 4);
        let mut g = Generation::default();
        let (tag, _) = t.reserve(0, g).unwrap();
        t.commit(0, tag, 60);
        t.orphan_all();
        g.bump();
        assert_eq!(t.reserve(0, g).unwrap_err(), Refused::Orphaned);
        assert_eq!(t.outstanding(), 1);
        // A forged tag of the new generation does not free it.
        let forged = Tag {
            queue: 1,
            generation: g.get(),
            slot: 0,
        }
        .encode();
        assert_eq!(t.take(forged), None);
        assert_eq!(t.take(tag), Some(Taken::Stale { pending: 60 }));
        assert_eq!(t.outstanding(), 0);
        assert!(t.reserve(0, g).is_ok());
    }

    #[test]
    fn released_slots_are_free_again() {
        let mut t = TxSlots::new(1, 2);
        let g = Generation::default();
        let (_, iov) = t.reserve(1, g).unwrap();
        iov.0.push(libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 1,
        });
        t.release(1);
        assert_eq!(t.outstanding(), 0);
        let (_, iov) = t.reserve(1, g).unwrap();
        assert!(iov.0.is_empty());
    }
}
