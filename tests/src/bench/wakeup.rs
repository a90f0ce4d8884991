//! The price of one cross-thread wake-up pair on this machine, measured in
//! the same run as the figures it bounds.
//!
//! A QD1 request through ringvm pays what fio pays for the I/O plus one
//! round trip between two threads: the guest's doorbell wakes the VMM
//! thread, the VMM thread's interrupt wakes the guest. fio completes the
//! same request on its own thread. So the best ringvm can do at QD1 is
//! fio's latency plus one eventfd round trip, and that floor is measured
//! here with two plain threads blocking in read(2) on two eventfds.

use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::Res;

/// Mean time of one round trip (main → helper → main) over `window`, in
/// seconds. Each side blocks in read(2) on its eventfd until the other
/// writes it: two wake-ups per trip, the least two threads can do.
pub fn eventfd_round_trip(window: Duration) -> Res<f64> {
    let ping = EventFd::new(0).map_err(|e| format!("eventfd: {e}"))?;
    let pong = EventFd::new(0).map_err(|e| format!("eventfd: {e}"))?;
    let (their_ping, their_pong) = (
        ping.try_clone().map_err(|e| format!("eventfd: {e}"))?,
        pong.try_clone().map_err(|e| format!("eventfd: {e}"))?,
    );
    // The helper answers every ping until it reads the value 2 (stop).
    let helper = std::thread::Builder::new()
        .name("rtt-echo".into())
        .spawn(move || -> Res<()> {
            loop {
                let v = their_ping
                    .read()
                    .map_err(|e| format!("eventfd read: {e}"))?;
                their_pong
                    .write(1)
                    .map_err(|e| format!("eventfd write: {e}"))?;
                if v >= 2 {
                    return Ok(());
                }
            }
        })
        .map_err(|e| format!("cannot start the echo thread: {e}"))?;
    let trip = |v: u64| -> Res<()> {
        ping.write(v).map_err(|e| format!("eventfd write: {e}"))?;
        pong.read().map_err(|e| format!("eventfd read: {e}"))?;
        Ok(())
    };
    // A few unmeasured trips so both threads are scheduled in.
    let mut outcome = (0..100).try_for_each(|_| trip(1));
    let start = Instant::now();
    let mut trips = 0u64;
    while outcome.is_ok() && start.elapsed() < window {
        outcome = trip(1);
        trips += 1;
    }
    let elapsed = start.elapsed();
    // Stop the helper whatever happened, then report the first error.
    let stopped = trip(2);
    let joined = helper
        .join()
        .map_err(|_| "the echo thread panicked".to_string())?;
    outcome.and(stopped).and(joined)?;
    Ok(elapsed.as_secs_f64() / trips.max(1) as f64)
}

/// The best rate a driver can reach at QD1 when each of its requests costs
/// `reference_rate`'s latency plus one wake-up round trip of `rtt_s`.
pub fn floor_rate(reference_rate: f64, rtt_s: f64) -> f64 {
    if reference_rate <= 0.0 {
        return 0.0;
    }
    1.0 / (1.0 / reference_rate + rtt_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_takes_some_time_but_not_forever() {
        let rtt = eventfd_round_trip(Duration::from_millis(20)).unwrap();
        assert!(rtt > 0.0 && rtt < 0.01, "round trip {rtt} s");
    }

    #[test]
    fn floor_adds_the_round_trip_to_each_request() {
        // 100k IOPS = 10 µs per request; + 10 µs round trip = 50k IOPS.
        assert!((floor_rate(100_000.0, 10e-6) - 50_000.0).abs() < 1e-6);
        assert_eq!(floor_rate(0.0, 1e-6), 0.0);
    }
}
