//! Token buckets with Firecracker's rate-limiter semantics, as pure state:
//! no timer, no thread, no fd. A device asks [`RateLimiter::try_consume`]
//! before it serves a request or frame; when the answer is "not yet", it
//! gets the time until enough tokens will be there, arms one timer on the
//! VMM thread's ring for that long and stops draining the queue until the
//! timer fires. Nothing polls.
//!
//! Each bucket is described as Firecracker describes it:
//!
//! - `size`: tokens the bucket holds when full (bytes for a bandwidth
//!   bucket, requests for an ops bucket); it starts full.
//! - `refill_time` (ms): time to refill from empty to full, continuously
//!   (`size / refill_time` tokens per ms, with no rounding loss).
//! - `one_time_burst`: extra tokens spent before the bucket's own, which
//!   never come back.
//! - A size or refill time of 0 means "no limit" (no bucket).
//!
//! One request larger than the whole bucket is let through when the
//! bucket is not in debt, and leaves it in debt for as long as refilling
//! the excess takes, so the long-run rate still holds (Firecracker lets
//! it through and blocks the limiter for the same time).
//!
//! Time comes from a [`Clock`], so tests drive it by hand.
//!
//! ```
//! use std::time::Duration;
//! use devices::rate_limiter::{BucketConfig, ManualClock, RateLimiter};
//!
//! let clock = ManualClock::default();
//! // 1000 bytes per 100 ms, no ops limit.
//! let bw = BucketConfig { size: 1000, one_time_burst: 0, refill_time_ms: 100 };
//! let mut limiter = RateLimiter::new(Some(bw), None, clock.clone());
//! assert_eq!(limiter.try_consume(800, 1), Ok(()));
//! // 600 more need 400 more tokens: 40 ms of refill.
//! assert_eq!(limiter.try_consume(600, 1), Err(Duration::from_millis(40)));
//! clock.advance(Duration::from_millis(40));
//! assert_eq!(limiter.try_consume(600, 1), Ok(()));
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const NS_PER_MS: u64 = 1_000_000;

/// Upper bound of [`RateLimiter`]'s shortest wait (see `shortest_wait`).
const MAX_SHORTEST_WAIT: Duration = Duration::from_millis(1);

/// A monotonic time source in nanoseconds from an arbitrary start.
pub trait Clock: std::fmt::Debug {
    /// Nanoseconds since this clock's start; never goes backwards.
    fn now_ns(&self) -> u64;
}

impl<T: Clock + ?Sized> Clock for Arc<T> {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }
}

/// The clock a device's limiter reads: the host's in a running VMM, a
/// [`ManualClock`] in a test, behind one type so devices are not generic
/// over it.
pub type SharedClock = Arc<dyn Clock + Send + Sync>;

/// The limiter a device owns.
pub type DeviceRateLimiter = RateLimiter<SharedClock>;

/// The host's monotonic clock (what a running device uses).
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        static START: OnceLock<Instant> = OnceLock::new();
        let start = START.get_or_init(Instant::now);
        u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to: for tests and for benchmarks
/// that replay time. Clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// Moves time forward by `by` (saturating at the end of time).
    pub fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        // The closure never returns None, so the update always happens.
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                Some(now.saturating_add(ns))
            });
    }
}

impl ManualClock {
    /// A device limiter on this clock, for tests and benchmarks that move
    /// time by hand.
    pub fn limiter(
        &self,
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
    ) -> DeviceRateLimiter {
        RateLimiter::new(bandwidth, ops, Arc::new(self.clone()))
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// One bucket's settings, in Firecracker's units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketConfig {
    /// Tokens in a full bucket.
    pub size: u64,
    /// Extra tokens spent first, never refilled.
    pub one_time_burst: u64,
    /// Milliseconds to refill from empty to full.
    pub refill_time_ms: u64,
}

impl BucketConfig {
    /// `size` tokens refilled in `refill_time_ms`, no one-time burst.
    pub const fn new(size: u64, refill_time_ms: u64) -> Self {
        Self {
            size,
            one_time_burst: 0,
            refill_time_ms,
        }
    }

    /// The bucket these settings describe, full at `now_ns`; `None` when
    /// they mean "no limit" (size or refill time 0).
    pub fn build(&self, now_ns: u64) -> Option<TokenBucket> {
        TokenBucket::new(*self, now_ns)
    }
}

/// A token bucket. All methods take the current time, so the bucket
/// itself has no clock and every outcome is reproducible.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    config: BucketConfig,
    /// `refill_time_ms` in ns, saturated: a refill time over 584 years
    /// refills at most once in the life of the process.
    refill_ns: u64,
    burst: u64,
    /// Tokens in the bucket; negative after an over-size request.
    level: i128,
    /// Fraction of a token earned but not yet credited, in units of
    /// 1/`refill_ns` token.
    remainder: u128,
    /// When `level` was last brought up to date.
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket, or `None` for "no limit".
    pub fn new(config: BucketConfig, now_ns: u64) -> Option<Self> {
        if config.size == 0 || config.refill_time_ms == 0 {
            return None;
        }
        Some(Self {
            config,
            refill_ns: config.refill_time_ms.saturating_mul(NS_PER_MS),
            burst: config.one_time_burst,
            level: i128::from(config.size),
            remainder: 0,
            last_ns: now_ns,
        })
    }

    /// The settings this bucket was made from.
    pub fn config(&self) -> BucketConfig {
        self.config
    }

    /// Tokens available now, burst included (0 while in debt).
    pub fn available(&mut self, now_ns: u64) -> u64 {
        self.refill(now_ns);
        let level = u64::try_from(self.level.max(0)).unwrap_or(u64::MAX);
        level.saturating_add(self.burst)
    }

    /// Unspent one-time burst.
    pub fn burst_left(&self) -> u64 {
        self.burst
    }

    fn size(&self) -> i128 {
        i128::from(self.config.size)
    }

    /// Credits the tokens earned since the last update.
    fn refill(&mut self, now_ns: u64) {
        if now_ns <= self.last_ns {
            return;
        }
        let elapsed = now_ns - self.last_ns;
        self.last_ns = now_ns;
        if self.level >= self.size() {
            self.remainder = 0;
            return;
        }
        let earned = u128::from(elapsed)
            .saturating_mul(u128::from(self.config.size))
            .saturating_add(self.remainder);
        let refill_ns = u128::from(self.refill_ns);
        let tokens = earned / refill_ns;
        self.remainder = earned % refill_ns;
        // The room is at most 2 * u64::MAX, so it fits both i128 and u128.
        let room = (self.size() - self.level) as u128;
        if tokens >= room {
            self.level = self.size();
            self.remainder = 0;
        } else {
            self.level += tokens as i128;
        }
    }

    /// The level `tokens` (after the burst) need: the tokens themselves,
    /// or for a request bigger than the bucket, only "not in debt".
    fn needed_level(&self, rest: u64) -> i128 {
        if rest > self.config.size {
            0
        } else {
            i128::from(rest)
        }
    }

    /// Takes `tokens` if they are there now; otherwise takes nothing.
    pub fn try_consume(&mut self, tokens: u64, now_ns: u64) -> bool {
        self.refill(now_ns);
        if self.burst >= tokens {
            self.burst -= tokens;
            return true;
        }
        let rest = tokens - self.burst;
        if self.level < self.needed_level(rest) {
            return false;
        }
        self.burst = 0;
        self.level -= i128::from(rest);
        true
    }

    /// Takes `tokens` whether or not they are there, leaving the bucket in
    /// debt if they are not: for work whose size is known only once it is
    /// done (a received frame). The debt is paid by refilling.
    pub fn consume_anyway(&mut self, tokens: u64, now_ns: u64) {
        self.refill(now_ns);
        let from_burst = self.burst.min(tokens);
        self.burst -= from_burst;
        self.level -= i128::from(tokens - from_burst);
    }

    /// How long until [`Self::try_consume`] of `tokens` succeeds, if no
    /// one else takes tokens meanwhile; zero when it would now. Saturates
    /// at `u64::MAX` ns for absurd settings.
    pub fn time_until(&mut self, tokens: u64, now_ns: u64) -> Duration {
        self.refill(now_ns);
        if self.burst >= tokens {
            return Duration::ZERO;
        }
        let needed = self.needed_level(tokens - self.burst);
        if self.level >= needed {
            return Duration::ZERO;
        }
        // Smallest t with (t * size + remainder) / refill_ns >= missing.
        let missing = (needed - self.level) as u128;
        let size = u128::from(self.config.size);
        let ns = missing
            .checked_mul(u128::from(self.refill_ns))
            .map(|work| work.saturating_sub(self.remainder).div_ceil(size))
            .unwrap_or(u128::MAX);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Gives back tokens taken for work that was not done (e.g. a request
    /// the device could not submit). While the one-time burst lasts they
    /// return to it; afterwards to the bucket, which never overfills.
    pub fn refund(&mut self, tokens: u64) {
        if self.burst > 0 {
            self.burst = self
                .burst
                .saturating_add(tokens)
                .min(self.config.one_time_burst);
            return;
        }
        self.level = (self.level + i128::from(tokens)).min(self.size());
    }
}

/// How a live update changes one bucket (`PATCH /drives`,
/// `PATCH /network-interfaces`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketUpdate {
    /// The update does not mention this bucket: keep it as it is.
    Keep,
    /// Replace it with a new, full bucket with these settings (size or
    /// refill time 0 removes the limit).
    Set(BucketConfig),
}

/// A device's limiter: a bandwidth bucket (bytes) and an ops bucket
/// (requests or frames), either of which may be absent (no limit).
#[derive(Clone, Debug)]
pub struct RateLimiter<C: Clock = MonotonicClock> {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    clock: C,
    throttled: u64,
}

impl Default for RateLimiter<MonotonicClock> {
    fn default() -> Self {
        Self::unlimited()
    }
}

impl RateLimiter<MonotonicClock> {
    /// A limiter that never says no.
    pub fn unlimited() -> Self {
        Self::new(None, None, MonotonicClock)
    }
}

impl Default for RateLimiter<SharedClock> {
    /// A device's limiter before any limit is set: unlimited, on the
    /// host's clock.
    fn default() -> Self {
        Self::new(None, None, Arc::new(MonotonicClock))
    }
}

impl<C: Clock> RateLimiter<C> {
    /// A limiter with full buckets; `None` (or a zero size or refill time)
    /// leaves that dimension unlimited.
    pub fn new(bandwidth: Option<BucketConfig>, ops: Option<BucketConfig>, clock: C) -> Self {
        let now = clock.now_ns();
        Self {
            bandwidth: bandwidth.and_then(|b| b.build(now)),
            ops: ops.and_then(|b| b.build(now)),
            clock,
            throttled: 0,
        }
    }

    /// Whether neither dimension is limited (a device may skip the
    /// limiter entirely then).
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Takes `bytes` from the bandwidth bucket and `ops` from the ops
    /// bucket, both or neither. When either is short, takes nothing and
    /// returns how long to wait before trying again: the device arms a
    /// timer for that and stops draining until it fires. Each refusal
    /// counts as one throttle event.
    pub fn try_consume(&mut self, bytes: u64, ops: u64) -> Result<(), Duration> {
        let now = self.wait_for(bytes, ops)?;
        // Both buckets said yes at this same instant, so both take.
        if let Some(b) = self.bandwidth.as_mut() {
            b.try_consume(bytes, now);
        }
        if let Some(b) = self.ops.as_mut() {
            b.try_consume(ops, now);
        }
        Ok(())
    }

    /// Admits work whose size is not known yet (a tap read: the frame's
    /// length is known when it arrives): takes `ops` from the ops bucket and
    /// needs the bandwidth bucket out of debt, else takes nothing and
    /// returns the wait, like [`Self::try_consume`]. The bytes are taken
    /// afterwards with [`Self::charge`], which may put the bucket in debt;
    /// the next admission then waits until it is paid, so the long-run rate
    /// holds.
    pub fn try_admit(&mut self, ops: u64) -> Result<(), Duration> {
        let now = self.wait_for(1, ops)?;
        if let Some(b) = self.ops.as_mut() {
            b.try_consume(ops, now);
        }
        Ok(())
    }

    /// The time now if both buckets have what is asked, else how long until
    /// they will (counted as a throttle event).
    fn wait_for(&mut self, bytes: u64, ops: u64) -> Result<u64, Duration> {
        let now = self.clock.now_ns();
        let wait_bw = self
            .bandwidth
            .as_mut()
            .map_or(Duration::ZERO, |b| b.time_until(bytes, now));
        let wait_ops = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.time_until(ops, now));
        let wait = wait_bw.max(wait_ops);
        if wait.is_zero() {
            return Ok(now);
        }
        self.throttled = self.throttled.saturating_add(1);
        Err(wait.max(self.shortest_wait()))
    }

    /// The shortest wait a refusal names: the exact wait for the next
    /// request's tokens is often a few microseconds, and waking the VMM
    /// thread for every request or two costs more CPU than the requests.
    /// Waiting a sixteenth of the quickest refill time (at most 1 ms) lets
    /// a batch through per wake-up, well before the bucket could fill and
    /// lose tokens.
    fn shortest_wait(&self) -> Duration {
        let refill = |b: &Option<TokenBucket>| b.as_ref().map_or(u64::MAX, |b| b.refill_ns);
        let quickest = refill(&self.bandwidth).min(refill(&self.ops));
        Duration::from_nanos(quickest / 16).min(MAX_SHORTEST_WAIT)
    }

    /// Takes `bytes` for work [`Self::try_admit`] let through and that
    /// turned out this big.
    pub fn charge(&mut self, bytes: u64) {
        let now = self.clock.now_ns();
        if let Some(b) = self.bandwidth.as_mut() {
            b.consume_anyway(bytes, now);
        }
    }

    /// Gives back what [`Self::try_consume`] took for work not done.
    pub fn refund(&mut self, bytes: u64, ops: u64) {
        if let Some(b) = self.bandwidth.as_mut() {
            b.refund(bytes);
        }
        if let Some(b) = self.ops.as_mut() {
            b.refund(ops);
        }
    }

    /// Applies a live update; a replaced bucket starts full.
    pub fn update(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        let now = self.clock.now_ns();
        if let BucketUpdate::Set(cfg) = bandwidth {
            self.bandwidth = cfg.build(now);
        }
        if let BucketUpdate::Set(cfg) = ops {
            self.ops = cfg.build(now);
        }
    }

    /// Refusals so far, for the device's metrics.
    pub fn throttled(&self) -> u64 {
        self.throttled
    }

    /// The bandwidth bucket's settings, if limited.
    pub fn bandwidth(&self) -> Option<BucketConfig> {
        self.bandwidth.as_ref().map(TokenBucket::config)
    }

    /// The ops bucket's settings, if limited.
    pub fn ops(&self) -> Option<BucketConfig> {
        self.ops.as_ref().map(TokenBucket::config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = NS_PER_MS;

    fn bucket(size: u64, burst: u64, refill_ms: u64) -> TokenBucket {
        TokenBucket::new(
            BucketConfig {
                size,
                one_time_burst: burst,
                refill_time_ms: refill_ms,
            },
            0,
        )
        .expect("a limited bucket")
    }

    #[test]
    fn zero_size_or_refill_time_means_no_limit() {
        for (size, refill) in [(0, 100), (100, 0), (0, 0)] {
            let cfg = BucketConfig {
                size,
                one_time_burst: 5,
                refill_time_ms: refill,
            };
            assert_eq!(cfg.build(0), None);
        }
        let mut rl = RateLimiter::new(Some(BucketConfig::default()), None, ManualClock::default());
        assert!(rl.is_unlimited());
        for _ in 0..1000 {
            assert_eq!(rl.try_consume(u64::MAX, u64::MAX), Ok(()));
        }
        assert_eq!(rl.throttled(), 0);
    }

    #[test]
    fn starts_full_and_refills_continuously() {
        let mut b = bucket(1000, 0, 1000); // 1 token per ms
        assert!(b.try_consume(1000, 0));
        assert!(!b.try_consume(1, 0));
        assert_eq!(b.time_until(1, 0), Duration::from_millis(1));
        assert_eq!(b.time_until(250, 0), Duration::from_millis(250));
        assert!(!b.try_consume(250, 249 * MS));
        assert!(b.try_consume(250, 250 * MS));
        // Refilling stops at the size.
        assert_eq!(b.available(10_000 * MS), 1000);
    }

    #[test]
    fn fractions_of_tokens_are_not_lost() {
        // 3 tokens per 10 ms: one every 3.33 ms.
        let mut b = bucket(3, 0, 10);
        assert!(b.try_consume(3, 0));
        let mut got = 0;
        // Ask every 1 ms for 1 s: exactly 300 tokens must come out.
        for ms in 1..=1000 {
            if b.try_consume(1, ms * MS) {
                got += 1;
            }
        }
        assert_eq!(got, 300);
    }

    #[test]
    fn the_wait_it_names_is_exact() {
        let mut b = bucket(3, 0, 10);
        assert!(b.try_consume(3, 0));
        let wait = b.time_until(2, MS);
        let at = MS + u64::try_from(wait.as_nanos()).unwrap();
        assert!(!b.try_consume(2, at - 1), "one ns early must still fail");
        assert!(b.try_consume(2, at));
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refills() {
        let mut b = bucket(100, 500, 100);
        assert!(b.try_consume(400, 0));
        assert_eq!(b.burst_left(), 100);
        // 150: 100 from the burst, 50 from the bucket.
        assert!(b.try_consume(150, 0));
        assert_eq!(b.burst_left(), 0);
        assert_eq!(b.available(0), 50);
        // After a long time only the bucket is full again.
        assert_eq!(b.available(3_600_000 * MS), 100);
        assert_eq!(b.burst_left(), 0);
    }

    #[test]
    fn a_refused_request_takes_nothing() {
        let mut b = bucket(100, 30, 100);
        assert!(b.try_consume(90, 0)); // 30 burst + 60 bucket
        assert!(!b.try_consume(50, 0));
        assert_eq!(b.available(0), 40);
    }

    #[test]
    fn refunds_return_tokens_without_overfilling() {
        let mut b = bucket(100, 0, 100);
        assert!(b.try_consume(80, 0));
        b.refund(30);
        assert_eq!(b.available(0), 50);
        b.refund(1000);
        assert_eq!(b.available(0), 100);
        let mut b = bucket(100, 50, 100);
        assert!(b.try_consume(20, 0));
        b.refund(500);
        assert_eq!(b.burst_left(), 50, "a refund never grows the burst");
    }

    #[test]
    fn an_oversize_request_passes_then_the_debt_is_paid() {
        // 100 tokens per 100 ms; one request of 350.
        let mut b = bucket(100, 0, 100);
        assert!(b.try_consume(350, 0));
        // 250 in debt: 250 ms before the bucket is back at 0.
        assert_eq!(b.time_until(1, 0), Duration::from_millis(251));
        assert_eq!(b.time_until(350, 0), Duration::from_millis(250));
        assert!(!b.try_consume(350, 249 * MS));
        assert!(b.try_consume(350, 250 * MS));
        // Over 10 s of back-to-back oversize requests the rate holds.
        let mut now = 250 * MS;
        let mut bytes = 0u64;
        while now < 10_250 * MS {
            let wait = u64::try_from(b.time_until(350, now).as_nanos()).unwrap();
            now += wait;
            assert!(b.try_consume(350, now));
            bytes += 350;
        }
        // 1000 tokens per second: ~10000 in 10 s, plus one request in flight.
        assert!((10_000..=10_350).contains(&bytes), "{bytes}");
    }

    #[test]
    fn huge_sizes_and_times_do_not_overflow() {
        let mut b = bucket(u64::MAX, u64::MAX, u64::MAX);
        assert!(b.try_consume(u64::MAX, 0)); // the burst
        assert!(b.try_consume(u64::MAX, 0)); // the bucket
        assert!(!b.try_consume(1, 0));
        assert_eq!(b.time_until(u64::MAX, 0), Duration::from_nanos(u64::MAX));
        b.refund(u64::MAX);
        assert_eq!(b.available(0), u64::MAX);

        let mut b = bucket(u64::MAX, 0, 1);
        assert!(b.try_consume(u64::MAX, 0));
        assert_eq!(b.available(MS), u64::MAX);

        let mut b = bucket(1, 0, u64::MAX);
        assert!(b.try_consume(u64::MAX, 0)); // oversize: passes, deep debt
        assert_eq!(b.time_until(1, 0), Duration::from_nanos(u64::MAX));
        assert!(!b.try_consume(1, u64::MAX - 1));
    }

    #[test]
    fn time_going_backwards_changes_nothing() {
        let mut b = bucket(100, 0, 100);
        assert!(b.try_consume(100, 50 * MS));
        assert_eq!(b.available(10 * MS), 0);
        assert_eq!(b.available(60 * MS), 10);
    }

    #[test]
    fn the_limiter_takes_from_both_buckets_or_neither() {
        let clock = ManualClock::default();
        let bw = BucketConfig {
            size: 1 << 20,
            one_time_burst: 0,
            refill_time_ms: 1000,
        };
        let ops = BucketConfig {
            size: 10,
            one_time_burst: 0,
            refill_time_ms: 1000,
        };
        let mut rl = RateLimiter::new(Some(bw), Some(ops), clock.clone());
        for _ in 0..10 {
            assert_eq!(rl.try_consume(4096, 1), Ok(()));
        }
        // Ops are out (100 ms to the next), bandwidth is not.
        assert_eq!(rl.try_consume(4096, 1), Err(Duration::from_millis(100)));
        assert_eq!(rl.throttled(), 1);
        clock.advance(Duration::from_millis(100));
        // Drain the bandwidth: now it is short and the ops bucket is not.
        assert_eq!(rl.try_consume((1 << 20) - 1000, 0), Ok(()));
        let wait = rl.try_consume(4096, 1).unwrap_err();
        assert!(wait > Duration::from_millis(2), "{wait:?}");
        assert_eq!(
            rl.try_consume(1000, 1),
            Ok(()),
            "the refused call took no op"
        );
        rl.refund(1000, 1);
        assert_eq!(rl.try_consume(1000, 1), Ok(()));
        assert_eq!(rl.throttled(), 2);
    }

    #[test]
    fn admitted_work_of_unknown_size_pays_its_debt_before_the_next() {
        let clock = ManualClock::default();
        // 1000 bytes per 100 ms, 2 frames per 100 ms.
        let bw = BucketConfig {
            size: 1000,
            one_time_burst: 0,
            refill_time_ms: 100,
        };
        let ops = BucketConfig {
            size: 2,
            one_time_burst: 0,
            refill_time_ms: 100,
        };
        let mut rl = clock.limiter(Some(bw), Some(ops));
        assert_eq!(rl.try_admit(1), Ok(()));
        // The frame was 3000 bytes: 2000 in debt, 300 ms to be back at 1.
        rl.charge(3000);
        let wait = rl.try_admit(1).unwrap_err();
        assert_eq!(wait, Duration::from_nanos(200_100_000));
        clock.advance(wait);
        assert_eq!(rl.try_admit(1), Ok(()));
        // Ops: two per 100 ms, refilled by now; the third waits.
        assert_eq!(rl.try_admit(1), Ok(()));
        assert!(rl.try_admit(1).is_err());
        assert_eq!(rl.throttled(), 2);
        // Over 10 s of 1500-byte frames the rate is the bucket's.
        let mut bytes = 0u64;
        let mut now = Duration::ZERO;
        while now < Duration::from_secs(10) {
            match rl.try_admit(1) {
                Ok(()) => {
                    rl.charge(1500);
                    bytes += 1500;
                }
                Err(wait) => {
                    clock.advance(wait);
                    now += wait;
                }
            }
        }
        assert!((100_000..=103_000).contains(&bytes), "{bytes}");
    }

    #[test]
    fn a_refusal_waits_long_enough_to_let_a_batch_through() {
        let clock = ManualClock::default();
        // 1000 ops per second: the next op is 10 us away, but a refusal
        // names a sixteenth of the refill time, capped at 1 ms.
        let mut rl = clock.limiter(None, Some(BucketConfig::new(1000, 1000)));
        assert_eq!(rl.try_consume(0, 1000), Ok(()));
        clock.advance(Duration::from_micros(990));
        assert_eq!(rl.try_consume(0, 1), Err(Duration::from_millis(1)));
        // A 1 ms bucket: a sixteenth of it, not a whole millisecond (the
        // bucket would fill and lose tokens meanwhile).
        let mut rl = clock.limiter(Some(BucketConfig::new(4096, 1)), None);
        assert_eq!(rl.try_consume(4096, 1), Ok(()));
        assert_eq!(rl.try_consume(1, 1), Err(Duration::from_nanos(62_500)));
        // Long waits are exact.
        let mut rl = clock.limiter(Some(BucketConfig::new(100, 1000)), None);
        assert_eq!(rl.try_consume(100, 1), Ok(()));
        assert_eq!(rl.try_consume(50, 1), Err(Duration::from_millis(500)));
    }

    #[test]
    fn a_one_time_burst_pays_for_admitted_work_first() {
        let mut b = bucket(100, 50, 100);
        b.consume_anyway(80, 0);
        assert_eq!(b.burst_left(), 0);
        assert_eq!(b.available(0), 70);
        b.consume_anyway(u64::MAX, 0);
        assert_eq!(b.available(0), 0);
        assert_eq!(b.time_until(1, 0), Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn updates_replace_keep_or_remove_buckets() {
        let clock = ManualClock::default();
        let cfg = |size| BucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms: 1000,
        };
        let mut rl = RateLimiter::new(Some(cfg(100)), Some(cfg(5)), clock.clone());
        assert_eq!(rl.try_consume(100, 5), Ok(()));
        rl.update(BucketUpdate::Set(cfg(1000)), BucketUpdate::Keep);
        assert_eq!(rl.bandwidth(), Some(cfg(1000)));
        assert!(rl.try_consume(500, 0).is_ok(), "the new bucket starts full");
        assert!(
            rl.try_consume(0, 1).is_err(),
            "the ops bucket was kept, empty"
        );
        rl.update(BucketUpdate::Keep, BucketUpdate::Set(cfg(0)));
        assert_eq!(rl.ops(), None);
        assert_eq!(rl.try_consume(0, 1_000_000), Ok(()));
        rl.update(
            BucketUpdate::Set(BucketConfig::default()),
            BucketUpdate::Keep,
        );
        assert!(rl.is_unlimited());
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let a = MonotonicClock.now_ns();
        std::thread::sleep(Duration::from_millis(2));
        assert!(MonotonicClock.now_ns() >= a + 2 * MS);
    }
}
