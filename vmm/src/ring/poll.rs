//! How long the VMM thread polls the request queues before it sleeps.
//!
//! Sleeping costs twice: the driver must notify (a VM exit on real KVM, a
//! syscall and a cross-thread wake-up here) and the VMM thread must be
//! woken. When the guest's next request is only microseconds away, watching
//! the available rings (and the ring's completions) for a short window
//! instead catches it with neither; QEMU's IOThreads (`poll-max-ns`) and
//! vhost's busy-poll do the same. The window adapts to what the sleeps it
//! could not avoid say: a sleep shorter than the largest window means
//! polling longer would have caught the event, so the window doubles; a
//! longer sleep means the guest went quiet, so it halves, down to not
//! polling at all. An idle guest therefore costs a few short polls and
//! then nothing, and a busy one never sleeps.
//!
//! Written here rather than taken from a crate: none of the rust-vmm crates
//! (event-manager included) polls, and the rule is a few lines.

use std::time::Duration;

/// The largest window by default. QEMU's IOThreads default to 32 µs; on
/// this project's nested 2-vCPU VM one cross-CPU wake-up of an idle CPU
/// costs 7-15 µs and a synthetic driver's refill of 32 requests about as
/// much again, so 32 µs rarely caught anything there, while 100 µs did
/// (bench-blk ext4 page-cache randread 4 KiB QD1 17k -> 53k IOPS, QD32 0.30x
/// -> 0.50x of fio; bench-net TX 1514 B 0.46x -> 0.54x of the tap; 200 µs
/// measured no better). The window only grows while sleeps are that
/// short, so an idle guest costs at most a few windows.
pub const DEFAULT_POLL_MAX: Duration = Duration::from_micros(100);

/// The first window after not polling; below it polling stops.
const SMALLEST_WINDOW: Duration = Duration::from_micros(2);

/// The polling window and its adaptation, with counters for metrics and
/// benchmarks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdaptivePoll {
    max: Duration,
    window: Duration,
    stats: PollStats,
}

/// What polling did, since the VMM thread started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollStats {
    /// Polls that found work (a request or a completion) in the window.
    pub hits: u64,
    /// Polls whose window ran out: the thread slept after all.
    pub misses: u64,
    /// Sleeps the window was grown after.
    pub grown: u64,
    /// Sleeps the window was shrunk after.
    pub shrunk: u64,
}

impl Default for AdaptivePoll {
    fn default() -> Self {
        Self::new(DEFAULT_POLL_MAX)
    }
}

impl AdaptivePoll {
    /// Polls for at most `max` per sleep; zero never polls.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            window: Duration::ZERO,
            stats: PollStats::default(),
        }
    }

    /// How long to poll before the next sleep (zero: sleep at once).
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The largest window.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The counters.
    pub fn stats(&self) -> PollStats {
        self.stats
    }

    /// A poll found work within the window.
    pub fn hit(&mut self) {
        self.stats.hits += 1;
    }

    /// A poll's window ran out.
    pub fn miss(&mut self) {
        self.stats.misses += 1;
    }

    /// The thread slept for `slept` (polled or not): adapts the window.
    pub fn slept(&mut self, slept: Duration) {
        if slept > self.max {
            if self.window > Duration::ZERO {
                self.stats.shrunk += 1;
                self.window /= 2;
                if self.window < SMALLEST_WINDOW {
                    self.window = Duration::ZERO;
                }
            }
        } else if self.window < self.max {
            self.stats.grown += 1;
            self.window = if self.window.is_zero() {
                SMALLEST_WINDOW
            } else {
                self.window * 2
            }
            .min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn short_sleeps_grow_the_window_up_to_the_largest() {
        let mut p = AdaptivePoll::new(32 * US);
        assert_eq!(p.window(), Duration::ZERO);
        let mut seen = Vec::new();
        for _ in 0..7 {
            p.slept(5 * US);
            seen.push(p.window().as_micros());
        }
        assert_eq!(seen, [2, 4, 8, 16, 32, 32, 32]);
        assert_eq!(p.stats().grown, 5);
    }

    #[test]
    fn long_sleeps_halve_it_down_to_not_polling() {
        let mut p = AdaptivePoll::new(32 * US);
        for _ in 0..5 {
            p.slept(US);
        }
        assert_eq!(p.window(), 32 * US);
        let mut seen = Vec::new();
        for _ in 0..6 {
            p.slept(Duration::from_millis(3));
            seen.push(p.window().as_micros());
        }
        assert_eq!(seen, [16, 8, 4, 2, 0, 0]);
        assert_eq!(p.stats().shrunk, 5);
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let mut p = AdaptivePoll::new(Duration::ZERO);
        for slept in [Duration::ZERO, US, Duration::from_secs(1)] {
            p.slept(slept);
            assert_eq!(p.window(), Duration::ZERO);
        }
    }

    #[test]
    fn a_sleep_of_exactly_the_maximum_still_grows() {
        let mut p = AdaptivePoll::new(32 * US);
        p.slept(32 * US);
        assert_eq!(p.window(), SMALLEST_WINDOW);
    }
}
