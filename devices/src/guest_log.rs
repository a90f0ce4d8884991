//! Log lines a guest can cause, at a bounded rate.
//!
//! A guest decides how often its device sees a bad chain or a failed host
//! op, so logging each one would let it flood the host's log (and slow the
//! VMM thread down writing it). Each device keeps a [`GuestLog`]: per kind
//! of message, a few lines per window get through; the rest are counted,
//! and the count is logged when the window reopens and exported in the
//! device's metrics.

use std::time::{Duration, Instant};

/// Lines of one kind logged per window.
pub const LINES_PER_WINDOW: u32 = 5;
/// Length of a window.
pub const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct KindState {
    kind: &'static str,
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

/// Rate-limited warnings of one device, keyed by message kind.
#[derive(Debug)]
pub struct GuestLog {
    prefix: &'static str,
    kinds: Vec<KindState>,
    suppressed_total: u64,
}

impl GuestLog {
    /// Lines start with `prefix` (e.g. "virtio-blk").
    pub fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            kinds: Vec::new(),
            suppressed_total: 0,
        }
    }

    /// Lines suppressed since the device was made.
    pub fn suppressed(&self) -> u64 {
        self.suppressed_total
    }

    /// Logs a warning of `kind` unless this kind already used its window.
    pub fn warn(&mut self, kind: &'static str, args: std::fmt::Arguments<'_>) {
        self.warn_at(Instant::now(), kind, args);
    }

    fn warn_at(&mut self, now: Instant, kind: &'static str, args: std::fmt::Arguments<'_>) {
        let index = match self.kinds.iter().position(|k| k.kind == kind) {
            Some(i) => i,
            None => {
                // Kinds are a device's own constants: a handful at most.
                self.kinds.push(KindState {
                    kind,
                    window_start: now,
                    logged: 0,
                    suppressed: 0,
                });
                self.kinds.len() - 1
            }
        };
        let Some(state) = self.kinds.get_mut(index) else {
            return;
        };
        if now.saturating_duration_since(state.window_start) >= WINDOW {
            if state.suppressed > 0 {
                log::warn!(
                    "{}: {} more {kind:?} messages suppressed in the last {}s",
                    self.prefix,
                    state.suppressed,
                    WINDOW.as_secs()
                );
            }
            state.window_start = now;
            state.logged = 0;
            state.suppressed = 0;
        }
        if state.logged < LINES_PER_WINDOW {
            state.logged += 1;
            log::warn!("{}: {args}", self.prefix);
        } else {
            state.suppressed += 1;
            self.suppressed_total += 1;
            log::debug!("{}: {args}", self.prefix);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_gets_a_few_lines_per_window_and_the_rest_are_counted() {
        let mut log = GuestLog::new("test");
        let t0 = Instant::now();
        for _ in 0..100 {
            log.warn_at(t0, "a", format_args!("x"));
        }
        assert_eq!(log.suppressed(), 100 - u64::from(LINES_PER_WINDOW));
        // Another kind has its own allowance.
        log.warn_at(t0, "b", format_args!("y"));
        assert_eq!(log.suppressed(), 100 - u64::from(LINES_PER_WINDOW));
        // A new window lets lines through again.
        log.warn_at(t0 + WINDOW, "a", format_args!("x"));
        assert_eq!(log.suppressed(), 100 - u64::from(LINES_PER_WINDOW));
    }
}
