//! Devices for ringvm guests, written with no KVM dependency so every one of
//! them can be driven and tested on any machine.
//!
//! `bus` carries vCPU register exits to devices; `legacy` holds the PC
//! devices a Linux guest needs to boot and stop; `virtio` holds the
//! virtio-mmio transport, the device contract and the devices; `io` is the
//! narrow interface through which devices submit work to the VMM thread's
//! io_uring ring; `guest_log` bounds the log lines a guest can cause.

pub mod buf_ring;
pub mod bus;
pub mod guest_log;
pub mod io;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;
