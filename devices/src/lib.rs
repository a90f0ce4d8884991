//! Devices for ringvm guests, written with no KVM dependency so every one of
//! them can be driven and tested on any machine.
//!
//! `bus` carries vCPU register exits to devices; `legacy` holds the PC
//! devices a Linux guest needs to boot and stop; `virtio` holds the
//! virtio-mmio transport and the block device; `io` is the narrow interface
//! through which devices submit work to the VMM thread's io_uring ring.

pub mod bus;
pub mod io;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;
