//! The VMM loop turned by the synthetic driver's own thread, one turn at a
//! time: how the benchmarks count the VMM's instructions per request under
//! callgrind.
//!
//! Under valgrind only one thread runs at a time, and valgrind 3.19 (Debian
//! 12) keeps that lock through `io_uring_enter`: a VMM thread waiting for
//! the driver's doorbell would hold it forever and the driver could never
//! ring. Turning the loop from the driver's thread instead removes the
//! wait on the other side: the driver submits and kicks, then turns the
//! loop until its completions are back. The loop body is the one
//! [`super::vmm_thread`] runs (one `Ring::turn`, dispatch, end of turn), in
//! [`InlineVmm::turn`], the one function callgrind is told to collect
//! (`--toggle-collect`), so the count is the VMM's own work and nothing
//! else. It is also deterministic: the batching no longer depends on how
//! two threads happen to be scheduled.

use std::io;

use vm_memory::GuestMemoryMmap;
use vmm::ring::{Completion, Ring, VirtioDevices};

use super::vmm_thread::buf_rings_unless_off;
use super::Res;

/// The symbol callgrind collects (`--toggle-collect`), as valgrind
/// demangles it.
pub const TURN_SYMBOL: &str = "ringvm_tests::bench::inline_vmm::InlineVmm::turn";

/// The device loop and its ring, owned by the caller's thread.
pub struct InlineVmm {
    // Dropped first: the ring holds pointers into the devices' buffers and
    // cancels its in-flight operations when dropped.
    ring: Ring,
    devices: VirtioDevices,
    mem: GuestMemoryMmap,
    done: Vec<Completion>,
    turns: u64,
}

impl InlineVmm {
    /// Creates the ring and arms the devices on it, as the VMM thread does
    /// before its first turn.
    pub fn new(mut devices: VirtioDevices, mem: &GuestMemoryMmap) -> Res<Self> {
        // Polling waits for another thread's work; here the one thread
        // would only spin out its window, which is wall-clock time and not
        // the per-request work counted.
        devices.set_poll_max(std::time::Duration::ZERO);
        let mut ring = Ring::with_buf_rings(buf_rings_unless_off(&mut devices))
            .map_err(|e| format!("io_uring: {e}"))?;
        devices
            .arm(&mut ring)
            .map_err(|e| format!("cannot arm the devices: {e}"))?;
        Ok(Self {
            ring,
            devices,
            mem: mem.clone(),
            done: Vec::with_capacity(1024),
            turns: 0,
        })
    }

    /// One turn of the VMM loop: submit, wait for at least one completion,
    /// dispatch them all, resume the devices. Blocks until the kernel
    /// completes something, so call it only with work in flight or a
    /// doorbell rung.
    #[inline(never)]
    pub fn turn(&mut self) -> io::Result<()> {
        self.devices
            .turn(&mut self.ring, &self.mem, &mut self.done)?;
        self.turns += 1;
        for c in self.done.drain(..) {
            if VirtioDevices::owns(c.token) {
                self.devices.dispatch_selected(
                    c.token,
                    c.result,
                    c.selected(),
                    &mut self.ring,
                    &self.mem,
                )?;
            }
        }
        self.devices.end_turn(&mut self.ring, &self.mem)
    }

    /// Turns taken so far (one `io_uring_enter` each).
    pub fn turns(&self) -> u64 {
        self.turns
    }

    /// Whether the ring runs with DEFER_TASKRUN.
    pub fn deferred_taskrun(&self) -> bool {
        self.ring.deferred_taskrun()
    }
}

/// Kills the process after `secs` (SIGALRM's default action) unless called
/// again: the guard of a single-threaded run, where a turn waiting for
/// something that never comes would otherwise hang forever.
pub fn watchdog(secs: u32) {
    // SAFETY: alarm(2) has no memory arguments and cannot fail.
    unsafe { libc::alarm(secs) };
}
