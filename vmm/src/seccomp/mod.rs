//! seccomp filters, one per thread kind, so that a bug a guest or a client
//! exploits in a device model or the HTTP parser reaches only the syscalls
//! that thread needs.
//!
//! The allow-lists live here and nowhere else, each syscall with the reason
//! ringvm makes it:
//! - [`common`]: what every thread needs (allocator, locks, logging, exit);
//! - [`vmm_thread`]: the VMM thread once the guest runs (the ring, API
//!   answers, `PATCH /drives`, shutdown);
//! - [`vcpu`]: a vCPU thread (`KVM_RUN` and the bus devices);
//! - [`api`]: the API thread (the socket's epoll loop).
//!
//! Each thread installs its own filter before it does its job: the API
//! thread before it serves the first request, each vCPU thread before its
//! first `KVM_RUN`, the VMM thread before it lets the vCPUs start. A call
//! outside the list traps: [`sigsys`] logs one line naming the thread and
//! the syscall number and the process dies of SIGSYS.
//!
//! `--no-seccomp` installs nothing; `--seccomp-filter FILE` replaces the
//! three lists with seccompiler JSON (keys `vmm`, `api`, `vcpu`).

pub mod api;
#[cfg(feature = "broken-seccomp")]
pub mod broken;
pub mod common;
pub mod rules;
pub mod shares;
pub mod sigsys;
pub mod vcpu;
pub mod vmm_thread;
pub mod vsock;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use seccompiler::{BpfProgram, TargetArch};

use rules::Rule;

/// The kinds of thread ringvm runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread: the io_uring loop, devices, API answers.
    Vmm,
    /// One per guest CPU.
    Vcpu,
    /// The API socket's thread.
    Api,
}

impl ThreadKind {
    /// Every kind, in the order the lists are documented.
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vmm, ThreadKind::Api, ThreadKind::Vcpu];

    /// The name Firecracker's filter files use for this kind (and the
    /// violation line).
    pub const fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
        }
    }
}

/// What the user asked for on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SeccompChoice {
    /// ringvm's own lists (the default).
    #[default]
    Builtin,
    /// `--no-seccomp`: no filter at all.
    Off,
    /// `--seccomp-filter FILE`: seccompiler JSON.
    File(PathBuf),
}

/// Errors building or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// ringvm's own rules did not compile (a bug, caught by unit tests).
    #[error("built-in seccomp rules: {0}")]
    Rules(#[from] rules::RuleError),
    /// The BPF backend refused a filter.
    #[error("seccomp filter for the {kind} thread: {source}")]
    Backend {
        /// Which filter.
        kind: &'static str,
        /// Why.
        source: seccompiler::BackendError,
    },
    /// A `--seccomp-filter` file cannot be read or compiled.
    #[error("seccomp filter file {path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The kernel refused the filter.
    #[error("installing the {kind} thread's seccomp filter: {source}")]
    Install {
        /// Which thread.
        kind: &'static str,
        /// Why.
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// The compiled filters, one per thread kind (none with `--no-seccomp`).
/// Cheap to clone: threads take their own copy.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    programs: Option<Arc<HashMap<&'static str, Vec<BpfProgram>>>>,
}

/// Key of the VMM thread's built-in list widened for a vsock device.
const VMM_WITH_VSOCK: &str = "vmm+vsock";

/// The allow-list of `kind`, common rules first; `shares`: the VMM thread
/// also serves shared host directories (`ringvm -- CMD`).
pub fn builtin_rules(kind: ThreadKind, shares: bool) -> Vec<Rule> {
    let mut list = common::rules();
    list.extend(match kind {
        ThreadKind::Vmm => vmm_thread::rules(crate::kvm::vcpu::kick_signal()),
        ThreadKind::Vcpu => vcpu::rules(),
        ThreadKind::Api => api::rules(),
    });
    if shares && kind == ThreadKind::Vmm {
        list.extend(shares::rules());
    }
    list
}

impl Filters {
    /// No filtering (`--no-seccomp`).
    pub fn none() -> Self {
        Self { programs: None }
    }

    /// ringvm's own lists.
    pub fn builtin() -> Result<Self, SeccompError> {
        Self::builtin_with(false)
    }

    /// ringvm's own lists, the VMM thread's widened for shared directories
    /// when `shares`.
    pub fn builtin_with(shares: bool) -> Result<Self, SeccompError> {
        let mut programs = HashMap::new();
        for kind in ThreadKind::ALL {
            let compiled = rules::compile(&builtin_rules(kind, shares))?;
            let bpf = |filter: seccompiler::SeccompFilter| -> Result<BpfProgram, SeccompError> {
                filter.try_into().map_err(|source| SeccompError::Backend {
                    kind: kind.name(),
                    source,
                })
            };
            let mut list = vec![bpf(compiled.main)?];
            for refusal in compiled.refusals {
                list.push(bpf(refusal)?);
            }
            programs.insert(kind.name(), list);
        }
        let mut with_vsock = builtin_rules(ThreadKind::Vmm, shares);
        with_vsock.extend(vsock::rules());
        let compiled = rules::compile(&with_vsock)?;
        let mut list = Vec::new();
        for filter in std::iter::once(compiled.main).chain(compiled.refusals) {
            list.push(filter.try_into().map_err(|source| SeccompError::Backend {
                kind: VMM_WITH_VSOCK,
                source,
            })?);
        }
        programs.insert(VMM_WITH_VSOCK, list);
        Ok(Self {
            programs: Some(Arc::new(programs)),
        })
    }

    /// The filters with the VMM thread's list widened by [`vsock::rules`]
    /// when `vsock` (a VM with a vsock device). A `--seccomp-filter` file
    /// is used as written.
    pub fn for_vmm_thread(&self, vsock: bool) -> Self {
        let Some(programs) = self.programs.as_ref() else {
            return self.clone();
        };
        match programs.get(VMM_WITH_VSOCK) {
            Some(widened) if vsock => {
                let mut map = (**programs).clone();
                map.insert(ThreadKind::Vmm.name(), widened.clone());
                Self {
                    programs: Some(Arc::new(map)),
                }
            }
            _ => self.clone(),
        }
    }

    /// Filters from a seccompiler JSON file with exactly the keys `vmm`,
    /// `api` and `vcpu`.
    pub fn from_json_file(path: &Path) -> Result<Self, SeccompError> {
        let err = |why: String| SeccompError::File {
            path: path.to_path_buf(),
            why,
        };
        let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        let mut map =
            seccompiler::compile_from_json(std::io::BufReader::new(file), TargetArch::x86_64)
                .map_err(|e| err(e.to_string().replace('\n', " ")))?;
        let mut programs = HashMap::new();
        for kind in ThreadKind::ALL {
            let program = map
                .remove(kind.name())
                .ok_or_else(|| err(format!("no filter for the \"{}\" thread", kind.name())))?;
            programs.insert(kind.name(), vec![program]);
        }
        if let Some(extra) = map.keys().next() {
            return Err(err(format!(
                "unknown thread kind \"{extra}\" (expected vmm, api, vcpu)"
            )));
        }
        Ok(Self {
            programs: Some(Arc::new(programs)),
        })
    }

    /// The filters `choice` asks for.
    pub fn load(choice: &SeccompChoice, shares: bool) -> Result<Self, SeccompError> {
        match choice {
            SeccompChoice::Builtin => Self::builtin_with(shares),
            SeccompChoice::Off => Ok(Self::none()),
            SeccompChoice::File(path) => Self::from_json_file(path),
        }
    }

    /// Whether any filter will be installed.
    pub fn enabled(&self) -> bool {
        self.programs.is_some()
    }

    /// Installs the filters of `kind` on the calling thread (and names the
    /// thread for the violation line). Irreversible, and inherited by any
    /// thread it spawns later.
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        sigsys::set_thread_kind(kind);
        let Some(list) = self.programs.as_ref().and_then(|p| p.get(kind.name())) else {
            return Ok(());
        };
        // The refusal filters first: the main one forbids seccomp(2).
        for program in list.iter().rev() {
            seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
                kind: kind.name(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Installs the process-wide SIGSYS handler; call once, before any thread
/// is spawned.
pub fn install_violation_handler() -> Result<(), SeccompError> {
    sigsys::install_handler().map_err(SeccompError::Handler)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn the_vmm_thread_gets_the_socket_calls_only_with_a_vsock_device() {
        let filters = Filters::builtin().unwrap();
        let vmm = |f: &Filters| f.programs.as_ref().and_then(|p| p.get("vmm")).cloned();
        assert_eq!(vmm(&filters.for_vmm_thread(false)), vmm(&filters));
        assert_ne!(vmm(&filters.for_vmm_thread(true)), vmm(&filters));
        assert!(!Filters::none().for_vmm_thread(true).enabled());
        let names: Vec<&str> = vsock::rules().iter().map(rules::short_name).collect();
        assert!(names.contains(&"accept4") && names.contains(&"connect"));
        assert!(builtin_rules(ThreadKind::Vmm, false)
            .iter()
            .all(|r| rules::short_name(r) != "accept4"));
    }

    #[test]
    fn builtin_lists_compile_and_are_smaller_than_firecrackers() {
        Filters::builtin().unwrap();
        // Firecracker v1.x x86_64: 50 syscalls on the VMM thread, 31 on the
        // API thread, 27 on a vCPU thread.
        for (kind, firecracker) in [
            (ThreadKind::Vmm, 50),
            (ThreadKind::Api, 31),
            (ThreadKind::Vcpu, 27),
        ] {
            // Carried out, that is: refused calls never run.
            let list = builtin_rules(kind, false);
            let mut names: Vec<&str> = list
                .iter()
                .filter(|r| !matches!(r.only, rules::Only::Refused { .. }))
                .map(rules::short_name)
                .collect();
            names.sort_unstable();
            names.dedup();
            // `cargo test -p vmm seccomp -- --nocapture` shows the lists.
            println!(
                "{}: {} syscalls: {}",
                kind.name(),
                names.len(),
                names.join(" ")
            );
            assert!(
                names.len() < firecracker,
                "{}: {} syscalls",
                kind.name(),
                names.len()
            );
        }
    }

    #[test]
    fn every_rule_says_why() {
        for kind in ThreadKind::ALL {
            for rule in builtin_rules(kind, true) {
                assert!(rule.why.len() > 10, "{}: {}", kind.name(), rule.name);
                if let rules::Only::ArgIn { values, .. } = &rule.only {
                    assert!(!values.is_empty(), "{}", rule.name);
                    assert!(values.iter().all(|v| v.why.len() > 10), "{}", rule.name);
                }
            }
        }
    }

    #[test]
    fn the_vcpu_and_api_threads_cannot_open_files_or_run_kvm_ioctls_they_do_not_need() {
        let carried_out = |kind| -> HashSet<i64> {
            builtin_rules(kind, false)
                .iter()
                .filter(|r| !matches!(r.only, rules::Only::Refused { .. }))
                .map(|r| r.nr)
                .collect()
        };
        let vcpu = carried_out(ThreadKind::Vcpu);
        let api = carried_out(ThreadKind::Api);
        for forbidden in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_io_uring_setup,
            libc::SYS_ptrace,
        ] {
            assert!(!vcpu.contains(&forbidden), "vcpu allows {forbidden}");
            assert!(!api.contains(&forbidden), "api allows {forbidden}");
        }
    }

    /// glibc's malloc opens /proc/sys/vm/overcommit_memory the first time
    /// a thread heap shrinks, whichever thread that is: threads that may
    /// not open files get EACCES (and live), the VMM thread reads it.
    #[test]
    fn mallocs_overcommit_probe_never_ends_the_process() {
        let filters = Filters::builtin().unwrap();
        for kind in ThreadKind::ALL {
            let filters = filters.clone();
            let opened = std::thread::spawn(move || {
                filters.install(kind).unwrap();
                match std::fs::read("/proc/sys/vm/overcommit_memory") {
                    Ok(_) => Ok(()),
                    Err(e) => Err(e.kind()),
                }
            })
            .join()
            .unwrap();
            match kind {
                ThreadKind::Vmm => assert_eq!(opened, Ok(()), "vmm"),
                _ => assert_eq!(
                    opened,
                    Err(std::io::ErrorKind::PermissionDenied),
                    "{}",
                    kind.name()
                ),
            }
        }
    }

    fn write_json(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ringvm-seccomp-{name}-{}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_json_filter_file_needs_the_three_thread_kinds() {
        let one =
            r#"{"mismatch_action":"trap","match_action":"allow","filter":[{"syscall":"read"}]}"#;
        let p = write_json(
            "good",
            &format!(r#"{{"vmm":{one},"api":{one},"vcpu":{one}}}"#),
        );
        let f = Filters::from_json_file(&p).unwrap();
        assert!(f.enabled());
        std::fs::remove_file(&p).unwrap();

        let p = write_json("missing", &format!(r#"{{"vmm":{one},"api":{one}}}"#));
        let e = Filters::from_json_file(&p).unwrap_err().to_string();
        assert!(e.contains("\"vcpu\""), "{e}");
        std::fs::remove_file(&p).unwrap();

        let p = write_json(
            "extra",
            &format!(r#"{{"vmm":{one},"api":{one},"vcpu":{one},"jailer":{one}}}"#),
        );
        let e = Filters::from_json_file(&p).unwrap_err().to_string();
        assert!(e.contains("jailer"), "{e}");
        std::fs::remove_file(&p).unwrap();

        let p = write_json("garbage", "{nope");
        let e = Filters::from_json_file(&p).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && !e.contains('\n'),
            "{e}"
        );
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_filtered_thread_does_its_work_and_ends_cleanly() {
        let filters = Filters::builtin().unwrap();
        for kind in ThreadKind::ALL {
            let filters = filters.clone();
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                filters.install(kind).unwrap();
                // Allowed everywhere: allocate and free (large: mmap), lock,
                // send on a channel, wait on one, end the thread.
                let big = vec![7u8; 4 << 20];
                let m = std::sync::Mutex::new(big.len());
                *m.lock().unwrap() += 1;
                drop(big);
                tid_tx.send(tid).unwrap();
                go_rx.recv().unwrap();
                let n = *m.lock().unwrap();
                n
            });
            let tid = tid_rx.recv().unwrap();
            let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
            assert!(status.contains("Seccomp:\t2"), "{}: {status}", kind.name());
            go_tx.send(()).unwrap();
            assert_eq!(thread.join().unwrap(), (4 << 20) + 1);
        }
        // The test thread itself stays unfiltered.
        let me = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert!(me.contains("Seccomp:\t0"), "{me}");
    }
}
