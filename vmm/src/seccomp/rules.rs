//! How an allow-list is written: one [`Rule`] per syscall, with the reason
//! ringvm needs it and, where the syscall is a door to much more (ioctl,
//! mmap, openat, tgkill), the only argument values it may take. The lists
//! themselves are in `common.rs`, `vmm_thread.rs`, `vcpu.rs` and `api.rs`;
//! this file turns them into seccompiler filters.

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// Which calls of a syscall are allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Only {
    /// Any arguments.
    Any,
    /// Argument `index` (its low 32 bits, as the kernel reads ioctl numbers,
    /// signals and advice) is one of `values`, each with its reason.
    ArgIn {
        /// Argument position, 0-based.
        index: u8,
        /// The allowed values, each named and explained.
        values: Vec<Value>,
    },
    /// The call is never carried out: it fails with `errno` instead of
    /// trapping. For probes a library makes on its own and copes with
    /// failing (glibc's malloc reading a /proc file once), where a trap
    /// would end ringvm for nothing.
    Refused {
        /// The error the call returns.
        errno: u32,
    },
    /// Argument `index` has none of the bits in `mask` set.
    ArgLacks {
        /// Argument position, 0-based.
        index: u8,
        /// Bits that must be clear.
        mask: u64,
        /// What the bits are, for the reader.
        what: &'static str,
    },
}

/// One allowed argument value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    /// The value.
    pub value: u64,
    /// Its name (e.g. `KVM_RUN`).
    pub name: &'static str,
    /// Why ringvm passes it.
    pub why: &'static str,
}

/// One allowed syscall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The syscall number (x86_64).
    pub nr: i64,
    /// Its name, as `libc::SYS_*` spells it.
    pub name: &'static str,
    /// Why this thread makes it.
    pub why: &'static str,
    /// Which of its calls are allowed.
    pub only: Only,
}

/// `allow_call!(SYS_read, "why")` or `allow_call!(SYS_ioctl, "why", only)`: a rule
/// whose name is the `libc` constant's.
macro_rules! allow_call {
    ($sys:ident, $why:expr) => {
        $crate::seccomp::rules::Rule {
            nr: libc::$sys,
            name: stringify!($sys),
            why: $why,
            only: $crate::seccomp::rules::Only::Any,
        }
    };
    ($sys:ident, $why:expr, $only:expr) => {
        $crate::seccomp::rules::Rule {
            nr: libc::$sys,
            name: stringify!($sys),
            why: $why,
            only: $only,
        }
    };
}
pub(crate) use allow_call;

/// glibc's malloc opens `/proc/sys/vm/overcommit_memory` (and reads one
/// byte) the first time any thread shrinks its heap, and treats a failed
/// open as "no": a thread that may not open files gets `EACCES` for it
/// rather than a trap, which would end ringvm at a random moment.
pub fn malloc_probe_refused() -> Only {
    Only::Refused {
        errno: libc::EACCES as u32,
    }
}

/// Shorthand for an [`Only::ArgIn`] list: `arg_in(1, &[(v, "NAME", "why")])`.
pub fn arg_in(index: u8, values: &[(u64, &'static str, &'static str)]) -> Only {
    Only::ArgIn {
        index,
        values: values
            .iter()
            .map(|&(value, name, why)| Value { value, name, why })
            .collect(),
    }
}

/// The syscall name without the `SYS_` prefix.
pub fn short_name(rule: &Rule) -> &'static str {
    rule.name.strip_prefix("SYS_").unwrap_or(rule.name)
}

/// Linux ioctl number encoding (`_IOC` in asm-generic/ioctl.h), so the
/// lists can name KVM's ioctls as constants.
pub const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
/// `_IO`: no argument.
pub const IOC_NONE: u64 = 0;
/// `_IOW`: the kernel reads the argument.
pub const IOC_WRITE: u64 = 1;
/// `_IOR`: the kernel writes the argument.
pub const IOC_READ: u64 = 2;

/// Errors turning rules into a filter.
#[derive(Debug, thiserror::Error)]
#[error("seccomp rule for {name}: {source}")]
pub struct RuleError {
    name: &'static str,
    source: seccompiler::BackendError,
}

/// The filters of one thread, installed together. The kernel runs every
/// filter of a thread and takes the strictest answer (an errno beats an
/// allow), so a refused call passes `main` and is answered by `refusals`.
#[derive(Debug)]
pub struct Compiled {
    /// Allowed calls pass (refused ones too), anything else traps.
    pub main: SeccompFilter,
    /// Refused calls fail with their errno; anything else passes.
    pub refusals: Vec<SeccompFilter>,
}

/// Builds the filters for one thread: the allowed calls pass, refused ones
/// fail with their errno, anything else traps (SIGSYS, see `sigsys.rs`).
/// Rules for the same syscall add up: any one of them allowing a call
/// allows it.
pub fn compile(rules: &[Rule]) -> Result<Compiled, RuleError> {
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    let mut refused: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for rule in rules {
        let err = |source| RuleError {
            name: rule.name,
            source,
        };
        let conds = match &rule.only {
            Only::Any => None,
            Only::Refused { errno } => {
                refused
                    .entry(*errno)
                    .or_default()
                    .insert(rule.nr, Vec::new());
                None
            }
            Only::ArgIn { index, values } => Some(
                values
                    .iter()
                    .map(|v| {
                        let c = SeccompCondition::new(
                            *index,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::Eq,
                            v.value,
                        )?;
                        SeccompRule::new(vec![c])
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(err)?,
            ),
            Only::ArgLacks { index, mask, .. } => {
                let c = SeccompCondition::new(
                    *index,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(*mask),
                    0,
                )
                .map_err(err)?;
                Some(vec![SeccompRule::new(vec![c]).map_err(err)?])
            }
        };
        let entry = map.entry(rule.nr).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), conds) {
            // Already unconditional: stays so.
            (None, _) => {}
            (Some(_), None) => *entry = None,
            (Some(list), Some(more)) => list.extend(more),
        }
    }
    let rules = map
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect();
    let filter_err = |source| RuleError {
        name: "(filter)",
        source,
    };
    let main = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(filter_err)?;
    let refusals = refused
        .into_iter()
        .map(|(errno, rules)| {
            SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(errno),
                TargetArch::x86_64,
            )
            .map_err(filter_err)
        })
        .collect::<Result<_, _>>()?;
    Ok(Compiled { main, refusals })
}
