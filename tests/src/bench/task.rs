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

/// This process's io_uring worker threads (`iou-wrk-*`, `iou-sqp-*`),
/// summed: the ring's work that could not complete inline runs there, and
/// each hand-off to them is one more cross-thread wake-up per request.
/// Workers come and go (an idle one exits), so a window's difference is a
/// lower bound when one exited inside it.
#[derive(Clone, Copy, Debug, Default)]
pub struct IoWorkers {
    /// Their CPU time, ns (schedstat).
    pub cpu_ns: u64,
    /// Times they were scheduled in (schedstat's timeslices): about how
    /// often they were woken.
    pub timeslices: u64,
    /// How many there are now.
    pub threads: u64,
}

impl IoWorkers {
    /// Sums the workers alive now.
    pub fn read() -> Self {
        let mut w = Self::default();
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
            return w;
        };
        for entry in dir.flatten() {
            let task = entry.path();
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            if !(comm.starts_with("iou-wrk") || comm.starts_with("iou-sqp")) {
                continue;
            }
            let sched = std::fs::read_to_string(task.join("schedstat")).unwrap_or_default();
            let mut f = sched
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap_or(0));
            w.cpu_ns += f.next().unwrap_or(0);
            w.timeslices += f.nth(1).unwrap_or(0);
            w.threads += 1;
        }
        w
    }

    /// What happened between `earlier` and `self` (never negative).
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            timeslices: self.timeslices.saturating_sub(earlier.timeslices),
            threads: self.threads.max(earlier.threads),
        }
    }
}
