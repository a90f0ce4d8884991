//! Time for timeouts: the TSC, calibrated once against the in-kernel PIT.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{inb, outb, rdtsc};

const PIT_CH0: u16 = 0x40;
const PIT_CMD: u16 = 0x43;
const PIT_HZ: u64 = 1_193_182;
/// TSC ticks per millisecond when calibration fails (a slow guess makes
/// timeouts longer, never shorter).
const FALLBACK_TSC_PER_MS: u64 = 4_000_000;

static TSC_PER_MS: AtomicU64 = AtomicU64::new(FALLBACK_TSC_PER_MS);

fn pit_read() -> u16 {
    outb(PIT_CMD, 0x00); // latch channel 0
    let lo = inb(PIT_CH0);
    let hi = inb(PIT_CH0);
    u16::from_le_bytes([lo, hi])
}

/// Measures the TSC over about 10 ms of PIT channel 0 (mode 0, one-shot
/// from 0xffff; its IRQ is masked at the PIC and the IOAPIC). Returns
/// TSC ticks per millisecond, or None when the PIT did not count.
pub fn calibrate() -> Option<u64> {
    outb(PIT_CMD, 0x30); // channel 0, lo/hi byte, mode 0, binary
    outb(PIT_CH0, 0xff);
    outb(PIT_CH0, 0xff);
    let c0 = pit_read();
    let t0 = rdtsc();
    let want: u16 = (PIT_HZ / 100) as u16; // 10 ms
    for _ in 0..200_000 {
        let c = pit_read();
        let gone = c0.wrapping_sub(c);
        if gone >= want && gone < 0x8000 {
            let t1 = rdtsc();
            let per_ms = (t1 - t0) * PIT_HZ / u64::from(gone) / 1000;
            if per_ms == 0 {
                return None;
            }
            TSC_PER_MS.store(per_ms, Ordering::Relaxed);
            return Some(per_ms);
        }
    }
    None
}

/// Milliseconds since an arbitrary start, for reports.
pub fn now_ms() -> u64 {
    rdtsc() / TSC_PER_MS.load(Ordering::Relaxed)
}

/// A point in time to give up at.
#[derive(Clone, Copy)]
pub struct Deadline(u64);

impl Deadline {
    pub fn after_ms(ms: u64) -> Self {
        Deadline(rdtsc() + ms * TSC_PER_MS.load(Ordering::Relaxed))
    }

    pub fn passed(&self) -> bool {
        rdtsc() >= self.0
    }
}

/// Busy-waits about `ms` milliseconds.
pub fn sleep_ms(ms: u64) {
    let d = Deadline::after_ms(ms);
    while !d.passed() {}
}
