//! Pausing the guest (`PATCH /vm` `{"state":"Paused"}`): the VMM thread
//! closes a gate, kicks every vCPU out of `KVM_RUN`, and each vCPU thread
//! parks at the gate before it would enter `KVM_RUN` again, until the gate
//! opens (`Resumed`) or the VM stops.
//!
//! The gate is also the flag the rest of the VMM reads to know the guest
//! is paused ([`PauseGate::is_paused`]): a device slot that must not drain
//! its queues while paused reads it on the VMM thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    /// Set once the VM stops: nobody parks any more.
    released: bool,
    /// vCPU threads waiting at the gate now.
    parked: usize,
}

/// Shared by the VMM thread and every vCPU thread.
#[derive(Debug, Default)]
pub struct PauseGate {
    /// Read by each vCPU before each `KVM_RUN` without taking the lock.
    closed: AtomicBool,
    state: Mutex<GateState>,
    /// Signalled when the gate opens or a vCPU parks.
    changed: Condvar,
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the guest is paused (or being paused).
    pub fn is_paused(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// vCPU side: if the gate is closed, waits there until it opens or the
    /// VM is released. Cheap (one atomic load) when the gate is open.
    pub fn wait_if_closed(&self) {
        if !self.is_paused() {
            return;
        }
        let mut state = self.lock();
        if !state.closed || state.released {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.closed && !state.released {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked -= 1;
    }

    /// VMM side: closes the gate, then calls `kick` (which must pull every
    /// vCPU out of `KVM_RUN`) every 10 ms until `expected()` vCPUs are
    /// parked or `within` passed. On timeout the gate is opened again and
    /// `false` returned: the guest was not paused.
    pub fn close(&self, expected: impl Fn() -> usize, kick: impl Fn(), within: Duration) -> bool {
        {
            let mut state = self.lock();
            if state.released {
                return false;
            }
            state.closed = true;
            self.closed.store(true, Ordering::Release);
        }
        let deadline = Instant::now() + within;
        loop {
            kick();
            let state = self.lock();
            if state.parked >= expected() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(state);
                self.open();
                return false;
            }
            let step = (deadline - now).min(Duration::from_millis(10));
            let _ = self
                .changed
                .wait_timeout(state, step)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// VMM side: opens the gate; parked vCPUs go back into `KVM_RUN`.
    pub fn open(&self) {
        let mut state = self.lock();
        state.closed = false;
        self.closed.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// VMM side, when the VM stops: lets every parked vCPU go (to see the
    /// stop flag and end) and keeps any from parking again.
    pub fn release(&self) {
        let mut state = self.lock();
        state.released = true;
        state.closed = false;
        self.closed.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// vCPU threads parked now.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// Threads standing in for vCPUs: they count "runs" while the gate is
    /// open and park when it closes.
    fn spawn_vcpus(
        gate: &Arc<PauseGate>,
        n: usize,
        stop: &Arc<AtomicBool>,
    ) -> (Vec<std::thread::JoinHandle<()>>, Arc<AtomicUsize>) {
        let runs = Arc::new(AtomicUsize::new(0));
        let threads = (0..n)
            .map(|_| {
                let (gate, stop, runs) = (gate.clone(), stop.clone(), runs.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        gate.wait_if_closed();
                        runs.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                })
            })
            .collect();
        (threads, runs)
    }

    #[test]
    fn closing_parks_every_vcpu_and_opening_lets_them_run() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (threads, runs) = spawn_vcpus(&gate, 3, &stop);
        assert!(gate.close(|| 3, || {}, Duration::from_secs(5)));
        assert!(gate.is_paused());
        assert_eq!(gate.parked(), 3);
        let frozen = runs.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(runs.load(Ordering::Relaxed), frozen, "a parked vCPU ran");

        gate.open();
        assert!(!gate.is_paused());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            runs.load(Ordering::Relaxed) > frozen,
            "nothing ran after resume"
        );

        // Paused when the VM stops: release lets them see the stop flag.
        assert!(gate.close(|| 3, || {}, Duration::from_secs(5)));
        stop.store(true, Ordering::Release);
        gate.release();
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            !gate.close(|| 0, || {}, Duration::from_secs(1)),
            "released gates stay open"
        );
    }

    #[test]
    fn a_vcpu_that_never_parks_times_the_pause_out() {
        let gate = PauseGate::default();
        let kicks = AtomicUsize::new(0);
        let paused = gate.close(
            || 1,
            || {
                kicks.fetch_add(1, Ordering::Relaxed);
            },
            Duration::from_millis(100),
        );
        assert!(!paused);
        assert!(!gate.is_paused(), "a failed pause leaves the guest running");
        assert!(
            kicks.load(Ordering::Relaxed) >= 5,
            "the stuck vCPU was kicked again and again"
        );
    }
}
