//! The machine the benchmarks run on: what it is (for the report header)
//! and how busy the rest of it was while they measured, since both
//! benchmarks share a small machine and other load skews their ratios.

use std::time::Instant;

use serde_json::{json, Value};

use super::Res;

/// Kernel, CPU model, CPU count and load average at the start, reported
/// with every result so figures from different machines are not mixed up.
#[derive(Clone, Debug)]
pub struct HostInfo {
    /// `/proc/sys/kernel/osrelease`.
    pub kernel: String,
    /// The first "model name" of /proc/cpuinfo.
    pub cpu: String,
    /// CPUs this process may use.
    pub cpus: usize,
    /// The three load averages of /proc/loadavg.
    pub loadavg: String,
}

impl HostInfo {
    /// Reads the host's description; "unknown" for what cannot be read.
    pub fn read() -> Self {
        Self {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            cpu: host_line("/proc/cpuinfo", "model name"),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            loadavg: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|_| "unknown".into()),
        }
    }

    /// The report's "host" object: this description plus whether the VMM
    /// thread's ring ran with DEFER_TASKRUN.
    pub fn json(&self, deferred_taskrun: bool) -> Value {
        json!({
            "kernel": self.kernel,
            "cpu": self.cpu,
            "cpus": self.cpus,
            "io_uring_defer_taskrun": deferred_taskrun,
            "loadavg_at_start": self.loadavg,
        })
    }
}

fn host_line(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Whose CPU time counts as the benchmark's own in [`HostCpu`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Own {
    /// This process only.
    Process,
    /// This process and its waited-for children (e.g. fio runs).
    ProcessAndChildren,
}

/// CPU the rest of the machine used while we measured: busy time from
/// /proc/stat minus this process's (and, if asked, its waited-for
/// children's) CPU time.
#[derive(Clone, Copy, Debug)]
pub struct HostCpu {
    at: Instant,
    busy_s: f64,
    own_s: f64,
}

impl HostCpu {
    /// Samples the machine's busy time and our own CPU time now.
    pub fn sample(own: Own) -> Res<Self> {
        let stat = std::fs::read_to_string("/proc/stat")
            .map_err(|e| format!("cannot read /proc/stat: {e}"))?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .ok_or("no cpu line in /proc/stat")?
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is
        // already inside user).
        let total: u64 = ticks.iter().take(8).sum();
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let usage = |who| -> f64 {
            // SAFETY: an all-zero rusage is a valid value of the plain C struct.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: `who` is RUSAGE_SELF or RUSAGE_CHILDREN and `ru` is a
            // valid out pointer.
            unsafe { libc::getrusage(who, &mut ru) };
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            tv(ru.ru_utime) + tv(ru.ru_stime)
        };
        let own_s = match own {
            Own::Process => usage(libc::RUSAGE_SELF),
            Own::ProcessAndChildren => usage(libc::RUSAGE_SELF) + usage(libc::RUSAGE_CHILDREN),
        };
        Ok(Self {
            at: Instant::now(),
            busy_s: total.saturating_sub(idle) as f64 / hz,
            own_s,
        })
    }

    /// Average number of CPUs others kept busy since `earlier`.
    pub fn others_since(&self, earlier: &Self) -> f64 {
        let wall = (self.at - earlier.at).as_secs_f64().max(1e-9);
        ((self.busy_s - earlier.busy_s) - (self.own_s - earlier.own_s)).max(0.0) / wall
    }
}
