//! ringvm: a micro-VMM that boots a Linux guest with KVM and serves its
//! devices from one io_uring ring on one VMM thread.
//!
//! `main.rs` turns the command line into a [`config::VmConfig`];
//! [`vmm::Vmm`] builds the machine from it ([`machine`]) and runs the VMM
//! thread loop on the [`ring`], where each virtio device sits in a generic
//! [`ring::slot::DeviceSlot`]; [`kvm`] is the only module that talks to KVM.
//! `ARCHITECTURE.md` at the repository root draws the whole picture.

pub mod api;
pub mod arch;
pub mod boot;
pub mod cmdline;
pub mod config;
pub mod console;
pub mod exit_code;
pub mod host_file;
pub mod kvm;
pub mod launcher;
pub mod logger;
pub mod machine;
pub mod metrics;
pub mod ring;
pub mod runner;
pub mod seccomp;
pub mod stop_signals;
pub mod terminal;
pub mod vmm;
pub mod vsock;
