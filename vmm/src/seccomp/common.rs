//! Syscalls every ringvm thread makes once it runs: what the Rust runtime,
//! glibc's allocator and locks, logging, and dying cleanly need. Each
//! thread kind's own file adds what its job needs.

use super::rules::{allow_call, arg_in, Only, Rule};

/// mmap/mprotect may never make memory executable: no thread of ringvm
/// loads code after start.
fn no_exec() -> Only {
    Only::ArgLacks {
        index: 2,
        mask: libc::PROT_EXEC as u64,
        what: "PROT_EXEC",
    }
}

/// The signals any thread may send itself (see `tgkill` below).
pub(super) fn own_signals() -> Vec<(u64, &'static str, &'static str)> {
    vec![
        (
            libc::SIGABRT as u64,
            "SIGABRT",
            "abort() after a panic (panic = abort) raises it with tgkill",
        ),
        (
            libc::SIGSYS as u64,
            "SIGSYS",
            "the seccomp violation handler re-raises it to end the process",
        ),
    ]
}

/// The rules shared by every thread kind.
pub fn rules() -> Vec<Rule> {
    vec![
        allow_call!(
            SYS_futex,
            "Mutex, Condvar, channel and thread-join waits (std on glibc)"
        ),
        allow_call!(
            SYS_sched_yield,
            "std's mpsc channels back off with yield_now when contended"
        ),
        allow_call!(
            SYS_mmap,
            "glibc malloc: large blocks and per-thread arenas",
            no_exec()
        ),
        allow_call!(
            SYS_mprotect,
            "glibc malloc grows a thread arena inside its reservation",
            no_exec()
        ),
        allow_call!(
            SYS_munmap,
            "free of large blocks; thread stacks and guest memory at exit"
        ),
        allow_call!(
            SYS_madvise,
            "glibc hands freed arena and stack pages back",
            arg_in(
                2,
                &[(
                    libc::MADV_DONTNEED as u64,
                    "MADV_DONTNEED",
                    "the only advice glibc's malloc and thread exit give"
                )]
            )
        ),
        allow_call!(SYS_brk, "glibc malloc grows the main arena"),
        allow_call!(
            SYS_write,
            "log lines, the guest console, eventfd signals (interrupts, wake-ups)"
        ),
        allow_call!(
            SYS_clock_gettime,
            "time where the vDSO cannot answer (CPU-time clocks, some clocksources)"
        ),
        allow_call!(SYS_close, "dropping files, eventfds and connections"),
        allow_call!(
            SYS_fcntl,
            "std checks a descriptor is open before closing it",
            arg_in(
                1,
                &[(
                    libc::F_GETFD as u64,
                    "F_GETFD",
                    "OwnedFd's drop asserts the fd is open (debug assertions)"
                )]
            )
        ),
        allow_call!(
            SYS_rt_sigreturn,
            "return from a signal handler (the vCPU kick, SIGSYS)"
        ),
        allow_call!(
            SYS_rt_sigprocmask,
            "raise() and pthread_kill() mask signals around tgkill"
        ),
        allow_call!(
            SYS_getpid,
            "raise() and pthread_kill() pass the pid to tgkill"
        ),
        allow_call!(
            SYS_tgkill,
            "die by the right signal (see the values)",
            arg_in(2, &own_signals())
        ),
        allow_call!(
            SYS_sigaltstack,
            "Rust removes a thread's signal stack as the thread ends"
        ),
        allow_call!(SYS_exit, "a thread ends"),
        allow_call!(SYS_exit_group, "the process ends"),
    ]
}
