//! x86_64: the guest physical layout and everything written into it before
//! the first vCPU runs.

pub mod acpi;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
