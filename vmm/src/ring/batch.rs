//! How long one turn of the ring waits for disk completions to pile up:
//! interrupt coalescing, traded for one `io_uring_enter` (and one guest
//! interrupt) per batch instead of per completion.
//!
//! While [`BATCH_THRESHOLD`] or more disk operations are in the kernel, a turn asks for a quarter of them at once (at least 2, at most
//! 64) and sleeps until they are there, or [`BATCH_TIMEOUT_NS`] passed.
//! Below the threshold a turn returns at the first completion, so light
//! loads see no added latency.
//!
//! Why a count and a long safety timeout, not a short timer: io_uring
//! wakes a waiter of N completions only at the N-th (reads and writes
//! that io-wq finishes are posted with a lazy wake-up), so the thread
//! sleeps once per batch. A short bound (the previous design: up to 10 µs
//! with `IORING_ENTER` min-wait) arms a high-resolution timer that is the
//! CPU's earliest on every turn; in a VM each arming and cancelling is a
//! timer-register write that exits to the hypervisor, and the timer firing
//! is one more wake-up. Measured on this project's 2-vCPU VM (tmpfs 4 KiB
//! QD32/QD128, `make bench-blk`), that cost the VMM thread 3.3-5.2 µs per
//! request against 0.9-1.9 µs with the count. A timeout longer than the
//! scheduler tick (250 Hz: 4 ms) is rarely the earliest timer, so arming it
//! costs nothing; 1 ms, shorter, was measured to keep most of the gain.
//!
//! Every op of a device whose completions are worth batching counts
//! (`VirtioDevice::batch_completions`: virtio-blk). While a batch is
//! incomplete, other completions (a kick, a tap frame, a slow disk's
//! fsync's company) are collected when it is, at the latest after the
//! timeout: the bound of what disk load on a slow disk can add to another
//! request's latency.

/// While this many disk operations are in flight, a turn waits for a
/// quarter of them.
pub const BATCH_THRESHOLD: usize = 4;
/// Longest a turn waits for its batch before taking what is there.
pub const BATCH_TIMEOUT_NS: u32 = 1_000_000;

/// The disk operations in the kernel, and the batch a turn waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchWait {
    in_flight: usize,
}

impl BatchWait {
    /// One disk op went to the kernel.
    pub fn submitted(&mut self) {
        self.in_flight += 1;
    }

    /// `n` disk ops came back.
    pub fn completed(&mut self, n: usize) {
        self.in_flight = self.in_flight.saturating_sub(n);
    }

    /// How many completions the next turn waits for (with the timeout);
    /// `None`: return at the first.
    pub fn want(&self) -> Option<usize> {
        (self.in_flight >= BATCH_THRESHOLD).then(|| (self.in_flight / 4).clamp(2, 64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_waits_for_a_quarter_only_under_load() {
        let mut b = BatchWait::default();
        for _ in 0..BATCH_THRESHOLD - 1 {
            b.submitted();
        }
        assert_eq!(
            b.want(),
            None,
            "light load: the first completion ends the turn"
        );
        b.submitted();
        assert_eq!(b.want(), Some(2));
        for _ in 0..28 {
            b.submitted();
        }
        assert_eq!(b.want(), Some(8));
        for _ in 0..1000 {
            b.submitted();
        }
        assert_eq!(b.want(), Some(64));
        b.completed(10_000);
        assert_eq!(b.want(), None);
    }
}
