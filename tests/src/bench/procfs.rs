//! What /proc says about another process: its memory without the guest's
//! RAM, and the CPU time of its threads. `make bench-boot` reads both for
//! ringvm and QEMU, the same way.

use std::path::Path;

use super::Res;

/// Resident memory of a set of mappings, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemKib {
    /// Resident pages (shared ones counted in full).
    pub rss: u64,
    /// Proportional share: a page shared by N processes counts 1/N.
    pub pss: u64,
    /// Unique (private) pages: Private_Clean + Private_Dirty.
    pub uss: u64,
}

impl MemKib {
    /// `self` minus `other`, never below zero.
    pub fn minus(&self, other: &Self) -> Self {
        Self {
            rss: self.rss.saturating_sub(other.rss),
            pss: self.pss.saturating_sub(other.pss),
            uss: self.uss.saturating_sub(other.uss),
        }
    }

    fn add_field(&mut self, key: &str, kib: u64) {
        match key {
            "Rss" => self.rss += kib,
            "Pss" => self.pss += kib,
            "Private_Clean" | "Private_Dirty" => self.uss += kib,
            _ => {}
        }
    }
}

/// A process's memory: all of it, and the part in guest-RAM mappings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Every mapping (what smaps_rollup sums).
    pub total: MemKib,
    /// The mappings taken for guest RAM (see [`read_memory`]).
    pub guest_ram: MemKib,
    /// How many mappings were taken for guest RAM.
    pub guest_ram_mappings: usize,
}

impl Memory {
    /// What the VMM itself holds: everything but guest RAM.
    pub fn vmm(&self) -> MemKib {
        self.total.minus(&self.guest_ram)
    }
}

/// Parses /proc/PID/smaps text. A mapping counts as guest RAM when it is
/// anonymous, writable, and between `guest_kib` and `guest_kib` + 8 MiB
/// long: a VMM maps guest RAM in one piece of its size (QEMU may round it
/// up to an alignment), and nothing else a VMM maps is that large.
pub fn parse_smaps(text: &str, guest_kib: u64) -> Memory {
    let mut m = Memory::default();
    let mut in_guest = false;
    for line in text.lines() {
        if let Some((range, rest)) = header(line) {
            let mut f = rest.split_whitespace();
            let perms = f.next().unwrap_or("");
            let path = f.nth(3).unwrap_or("");
            let kib = range / 1024;
            in_guest = perms.starts_with("rw")
                && (path.is_empty() || path.starts_with("[anon") || path.starts_with("/memfd:"))
                && kib >= guest_kib
                && kib <= guest_kib + 8 * 1024;
            if in_guest {
                m.guest_ram_mappings += 1;
            }
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let Some(kib) = value
            .trim()
            .strip_suffix("kB")
            .and_then(|v| v.trim().parse().ok())
        else {
            continue;
        };
        m.total.add_field(key, kib);
        if in_guest {
            m.guest_ram.add_field(key, kib);
        }
    }
    m
}

/// A mapping's header line "start-end perms offset dev inode [path]":
/// (length in bytes, the rest after the range).
fn header(line: &str) -> Option<(u64, &str)> {
    let (range, rest) = line.split_once(' ')?;
    let (a, b) = range.split_once('-')?;
    let a = u64::from_str_radix(a, 16).ok()?;
    let b = u64::from_str_radix(b, 16).ok()?;
    Some((b.checked_sub(a)?, rest))
}

/// Reads `pid`'s memory (see [`parse_smaps`]).
pub fn read_memory(pid: u32, guest_kib: u64) -> Res<Memory> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    Ok(parse_smaps(&text, guest_kib))
}

/// One thread's name and CPU time.
#[derive(Clone, Debug, PartialEq)]
pub struct ThreadCpu {
    /// Its name (comm).
    pub name: String,
    /// Time it ran, ns (schedstat).
    pub cpu_ns: u64,
}

/// CPU time of a whole process, split by its threads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessCpu {
    /// The live threads.
    pub threads: Vec<ThreadCpu>,
    /// utime + stime of the whole process (exited threads included), ns,
    /// at clock-tick resolution.
    pub total_ns: u64,
}

impl ProcessCpu {
    /// CPU time of the threads `is_vcpu` does not pick, plus whatever
    /// exited threads used (the process total minus the live threads).
    pub fn non_vcpu_ns(&self, is_vcpu: impl Fn(&str) -> bool) -> u64 {
        let live: u64 = self.threads.iter().map(|t| t.cpu_ns).sum();
        let exited = self.total_ns.saturating_sub(live);
        self.threads
            .iter()
            .filter(|t| !is_vcpu(&t.name))
            .map(|t| t.cpu_ns)
            .sum::<u64>()
            + exited
    }

    /// CPU time of the threads `is_vcpu` picks.
    pub fn vcpu_ns(&self, is_vcpu: impl Fn(&str) -> bool) -> u64 {
        self.threads
            .iter()
            .filter(|t| is_vcpu(&t.name))
            .map(|t| t.cpu_ns)
            .sum()
    }
}

/// utime + stime from /proc/.../stat text (fields 14 and 15, counted
/// after the parenthesised name, which may hold spaces), in clock ticks.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // After ")" the fields start at #3 (state): utime is #14, stime #15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Reads the CPU time of `pid` and of each of its threads.
pub fn read_cpu(pid: u32) -> Res<ProcessCpu> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    let total_ns = stat_ticks(&stat).ok_or("unreadable /proc/PID/stat")? * 1_000_000_000 / hz;
    let dir = format!("/proc/{pid}/task");
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("cannot list {dir}: {e}"))? {
        let Ok(entry) = entry else { continue };
        let task = entry.path();
        let read = |f: &str| std::fs::read_to_string(Path::new(&task).join(f)).ok();
        let (Some(name), Some(sched)) = (read("comm"), read("schedstat")) else {
            continue;
        };
        let cpu_ns = sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        threads.push(ThreadCpu {
            name: name.trim().to_string(),
            cpu_ns,
        });
    }
    Ok(ProcessCpu { threads, total_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fe:01 123   /usr/bin/vmm
Rss:                 800 kB
Pss:                 400 kB
Private_Clean:         0 kB
Private_Dirty:         0 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 
Rss:               20000 kB
Pss:               20000 kB
Private_Clean:         0 kB
Private_Dirty:     20000 kB
7f1000000000-7f1000200000 rw-p 00000000 00:00 0 
Rss:                 300 kB
Pss:                 300 kB
Private_Clean:        10 kB
Private_Dirty:       290 kB
";

    #[test]
    fn guest_ram_is_the_mapping_of_its_size() {
        let m = parse_smaps(SMAPS, 128 * 1024);
        assert_eq!(m.guest_ram_mappings, 1);
        assert_eq!(
            m.total,
            MemKib {
                rss: 21100,
                pss: 20700,
                uss: 20300
            }
        );
        assert_eq!(
            m.vmm(),
            MemKib {
                rss: 1100,
                pss: 700,
                uss: 300
            }
        );
    }

    #[test]
    fn a_smaller_guest_takes_no_mapping() {
        let m = parse_smaps(SMAPS, 256 * 1024);
        assert_eq!(m.guest_ram_mappings, 0);
        assert_eq!(m.vmm(), m.total);
    }

    #[test]
    fn stat_ticks_skips_a_name_with_spaces() {
        let stat = "1234 (CPU 0/KVM) S 1 2 3 4 5 6 7 8 9 10 70 30 0 0";
        assert_eq!(stat_ticks(stat), Some(100));
        assert_eq!(stat_ticks("garbage"), None);
    }

    #[test]
    fn vmm_cpu_leaves_out_vcpus_and_keeps_exited_threads() {
        let cpu = ProcessCpu {
            threads: vec![
                ThreadCpu {
                    name: "ringvm".into(),
                    cpu_ns: 5,
                },
                ThreadCpu {
                    name: "vcpu0".into(),
                    cpu_ns: 100,
                },
            ],
            total_ns: 120,
        };
        let is_vcpu = |n: &str| n.starts_with("vcpu");
        assert_eq!(cpu.non_vcpu_ns(is_vcpu), 5 + 15);
        assert_eq!(cpu.vcpu_ns(is_vcpu), 100);
    }

    #[test]
    fn reads_this_process() {
        let cpu = read_cpu(std::process::id()).unwrap();
        assert!(!cpu.threads.is_empty());
        let m = read_memory(std::process::id(), 1 << 40).unwrap();
        assert!(m.total.rss > 0 && m.total.uss <= m.total.rss);
    }
}
