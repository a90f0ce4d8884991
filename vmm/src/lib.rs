//! ringvm: a micro-VMM that boots a Linux guest with KVM and serves its
//! devices from one io_uring ring on one VMM thread.
//!
//! `main.rs` turns the command line into a [`config::VmConfig`];
//! [`vmm::Vmm`] builds the machine from it and runs the VMM thread loop
//! ([`event_loop`]); [`vstate`] is the only module that talks to KVM.

pub mod api;
pub mod arch;
pub mod boot;
pub mod cmdline;
pub mod config;
pub mod device_loop;
pub mod device_manager;
pub mod event_loop;
pub mod exit_code;
pub mod launcher;
pub mod logger;
pub mod metrics;
pub mod runner;
pub mod terminal;
pub mod virtio_9p;
pub mod virtio_block;
pub mod virtio_net;
pub mod vmm;
pub mod vstate;
