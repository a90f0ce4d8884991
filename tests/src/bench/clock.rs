//! Per-thread CPU clocks: how the benchmarks charge CPU time to the VMM
//! thread and to the synthetic driver separately, rather than to the
//! whole process.

use std::io;

use super::Res;

/// CPU time consumed so far by `thread` (user + system), in nanoseconds.
/// Used for the VMM thread, which is not the calling thread.
pub fn thread_cpu_ns(thread: libc::pthread_t) -> Res<u64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `thread` is alive (the caller holds its JoinHandle and it
    // only exits when told to) and `clock` is a valid out pointer.
    let rc = unsafe { libc::pthread_getcpuclockid(thread, &mut clock) };
    if rc != 0 {
        return Err(format!(
            "pthread_getcpuclockid: {}",
            io::Error::from_raw_os_error(rc)
        ));
    }
    clock_ns(clock)
}

/// CPU time consumed so far by the calling thread, in nanoseconds: the
/// synthetic driver's (the guest's) share.
pub fn own_cpu_ns() -> Res<u64> {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn clock_ns(clock: libc::clockid_t) -> Res<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(format!("clock_gettime: {}", io::Error::last_os_error()));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}
