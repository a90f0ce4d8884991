//! The only place that talks to KVM: the VM (memory, interrupt controller,
//! irqfds and ioeventfds) and the vCPU threads.

pub mod emulation;
pub mod pause;
pub mod sample;
pub mod vcpu;
pub mod vm;
