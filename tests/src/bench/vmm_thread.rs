//! The VMM thread of a benchmark: the real device loop on its own thread,
//! turning one io_uring ring exactly as `Vmm::run` does for a booted guest,
//! plus a stop eventfd and a count of ring turns, so the benchmarks measure
//! the code a guest would run and can still stop it and attribute its work.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use devices::buf_ring::BufRing;
use vm_memory::GuestMemoryMmap;
use vmm::ring::{Ring, Token, VirtioDevices};
use vmm_sys_util::eventfd::EventFd;

use super::clock::thread_cpu_ns;
use super::task::TaskCounters;
use super::Res;

/// The bench's stop eventfd plays the part a stop signal plays in
/// `Vmm::run`, under the same token.
const STOP: Token = Token::Signal;

/// What the VMM thread publishes for the measurements.
#[derive(Default)]
struct VmmShared {
    tid: AtomicI32,
    turns: AtomicU64,
    deferred_taskrun: AtomicBool,
}

/// The VMM thread loop, as `Vmm::run` runs it for the devices, plus a stop
/// eventfd and a counter of ring turns (one `io_uring_enter` each).
fn vmm_thread(
    devices: impl FnOnce() -> VirtioDevices,
    mem: GuestMemoryMmap,
    stop: EventFd,
    shared: Arc<VmmShared>,
) -> io::Result<()> {
    // SAFETY: gettid has no preconditions and cannot fail.
    shared
        .tid
        .store(unsafe { libc::gettid() }, Ordering::Release);
    let mut stop_buf = [0u8; 8];
    let mut devices = devices();
    if let Some(max) = poll_max_from_env() {
        devices.set_poll_max(max);
    }
    // Declared after the buffers it reads into, so it is dropped (and its
    // in-flight operations cancelled) before them.
    let mut ring = Ring::with_buf_rings(buf_rings_unless_off(&mut devices))?;
    shared
        .deferred_taskrun
        .store(ring.deferred_taskrun(), Ordering::Release);
    devices.arm(&mut ring)?;
    // SAFETY: `stop_buf` lives on this frame until after `ring` is dropped.
    unsafe { ring.arm_eventfd(stop.as_raw_fd(), &mut stop_buf, STOP) }?;
    let mut done = Vec::with_capacity(1024);
    let mut stopping = false;
    while !stopping {
        devices.turn(&mut ring, &mem, &mut done)?;
        shared.turns.fetch_add(1, Ordering::Relaxed);
        for c in done.drain(..) {
            if VirtioDevices::owns(c.token) {
                devices.dispatch_selected(c.token, c.result, c.selected(), &mut ring, &mem)?;
            } else if c.token == STOP {
                stopping = true;
            }
        }
        devices.end_turn(&mut ring, &mem)?;
    }
    drop(ring);
    Ok(())
}

/// `RINGVM_BENCH_POLL_MAX_US`: the VMM thread's largest polling window for
/// this run (ringvm's `--poll-max-us`), to compare with polling off (0);
/// unset, ringvm's default.
/// The devices' provided-buffer rings for the ring to register (RX
/// through them), or none when `RINGVM_BENCH_NET_PBUF=0` asks for the
/// plain-read RX path: an A/B of the two paths from one binary.
pub fn buf_rings_unless_off(devices: &mut VirtioDevices) -> Vec<&mut BufRing> {
    if std::env::var("RINGVM_BENCH_NET_PBUF").as_deref() == Ok("0") {
        return Vec::new();
    }
    devices.buf_rings()
}

fn poll_max_from_env() -> Option<Duration> {
    std::env::var("RINGVM_BENCH_POLL_MAX_US")
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_micros)
}

/// Counters of the VMM thread at one instant; the benchmarks subtract two
/// of them to get a measured window's figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct VmmSnap {
    /// The thread's CPU time, ns.
    pub cpu_ns: u64,
    /// Ring turns (io_uring_enter calls).
    pub turns: u64,
    /// read(2)-family syscalls.
    pub syscr: u64,
    /// write(2)-family syscalls (irq eventfd signals).
    pub syscw: u64,
    /// Times the thread blocked.
    pub voluntary_switches: u64,
}

/// The running VMM thread: counters to sample, and the way to stop it.
pub struct VmmHandle {
    thread: Option<JoinHandle<io::Result<()>>>,
    shared: Arc<VmmShared>,
    stop: EventFd,
}

impl VmmHandle {
    /// Starts the VMM thread ("vmm") on `mem`; `devices` builds its device
    /// loop on that thread. Returns once the thread has published its tid.
    pub fn spawn(
        devices: impl FnOnce() -> VirtioDevices + Send + 'static,
        mem: &GuestMemoryMmap,
    ) -> Res<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let shared = Arc::new(VmmShared::default());
        let thread = {
            let (mem, shared) = (mem.clone(), shared.clone());
            let stop = stop.try_clone().map_err(|e| format!("eventfd: {e}"))?;
            std::thread::Builder::new()
                .name("vmm".into())
                .spawn(move || vmm_thread(devices, mem, stop, shared))
                .map_err(|e| format!("cannot start the VMM thread: {e}"))?
        };
        while shared.tid.load(Ordering::Acquire) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Self {
            thread: Some(thread),
            shared,
            stop,
        })
    }

    fn tid(&self) -> i32 {
        self.shared.tid.load(Ordering::Acquire)
    }

    /// Whether the thread's ring runs with IORING_SETUP_DEFER_TASKRUN
    /// (reported with the results).
    pub fn deferred_taskrun(&self) -> bool {
        self.shared.deferred_taskrun.load(Ordering::Acquire)
    }

    /// The thread's counters now.
    pub fn snap(&self) -> Res<VmmSnap> {
        let thread = self
            .thread
            .as_ref()
            .ok_or("the VMM thread is gone")?
            .as_pthread_t();
        let task = TaskCounters::read(self.tid())?;
        Ok(VmmSnap {
            cpu_ns: thread_cpu_ns(thread)?,
            turns: self.shared.turns.load(Ordering::Relaxed),
            syscr: task.syscr,
            syscw: task.syscw,
            voluntary_switches: task.voluntary_switches,
        })
    }

    /// Tells the thread to stop and waits for it; its error, if it failed.
    pub fn stop(mut self) -> Res<()> {
        self.stop
            .write(1)
            .map_err(|e| format!("cannot signal the VMM thread to stop: {e}"))?;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(format!("VMM thread failed: {e}")),
            Some(Err(_)) => Err("VMM thread panicked".into()),
        }
    }
}
