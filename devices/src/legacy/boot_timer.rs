//! The boot timer: one MMIO byte the guest writes when it is about to run
//! init, so boot time is measured by the guest's own progress and not by
//! scraping its console.

use std::time::Instant;

use crate::bus::{BusAccess, BusDevice};

/// The value the guest writes to say "init starts now" (Firecracker's
/// convention, kept so the same guest images measure the same way).
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Logs the wall-clock and CPU time since the VMM process started.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    fired: bool,
}

impl BootTimer {
    /// Makes a timer that counts from `start` (the process start).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            fired: false,
        }
    }
}

fn process_cpu_time_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass, which
    // lives on this stack frame for the whole call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

impl BusDevice for BootTimer {
    fn debug_label(&self) -> &str {
        "boot-timer"
    }

    fn read(&mut self, _access: BusAccess, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, access: BusAccess, data: &[u8]) {
        if access.offset != 0 || data.first() != Some(&BOOT_TIMER_MAGIC) || self.fired {
            return;
        }
        self.fired = true;
        let wall = self.start.elapsed();
        let cpu_us = process_cpu_time_us();
        log::info!(
            "boot-timer: guest reached init {} ms after ringvm started ({} us wall, {} us VMM CPU)",
            wall.as_millis(),
            wall.as_micros(),
            cpu_us
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_on_the_magic_value_only() {
        let mut t = BootTimer::new(Instant::now());
        let at = BusAccess { offset: 0, vcpu: 0 };
        t.write(at, &[1]);
        assert!(!t.fired);
        t.write(BusAccess { offset: 4, vcpu: 0 }, &[BOOT_TIMER_MAGIC]);
        assert!(!t.fired);
        t.write(at, &[BOOT_TIMER_MAGIC]);
        assert!(t.fired);
    }
}
