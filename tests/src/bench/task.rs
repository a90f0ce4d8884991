//! Kernel counters of one thread of this process, from
//! `/proc/self/task/<tid>/{io,status}`: how the benchmarks count the VMM
//! thread's read/write syscalls and its sleeps without tracing it.

use super::Res;

/// Syscall and context-switch counters of one thread at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct TaskCounters {
    /// read(2)-family syscalls (`syscr` in the task's io file).
    pub syscr: u64,
    /// write(2)-family syscalls (`syscw`).
    pub syscw: u64,
    /// Times the thread blocked (`voluntary_ctxt_switches` in its status).
    pub voluntary_switches: u64,
}

impl TaskCounters {
    /// Reads the counters of thread `tid` of this process.
    pub fn read(tid: i32) -> Res<Self> {
        let task = format!("/proc/self/task/{tid}");
        let io = std::fs::read_to_string(format!("{task}/io"))
            .map_err(|e| format!("cannot read {task}/io: {e}"))?;
        let status = std::fs::read_to_string(format!("{task}/status"))
            .map_err(|e| format!("cannot read {task}/status: {e}"))?;
        Ok(Self {
            syscr: proc_field(&io, "syscr:")?,
            syscw: proc_field(&io, "syscw:")?,
            voluntary_switches: proc_field(&status, "voluntary_ctxt_switches:")?,
        })
    }
}

fn proc_field(text: &str, key: &str) -> Res<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no {key} in /proc task file"))
}
