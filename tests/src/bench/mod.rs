//! What the `bench_blk` and `bench_net` binaries share: both drive a real
//! virtio device inside the real device loop without KVM, measure the VMM
//! thread the same way and report the same way, so those parts live here
//! once and the binaries keep only what is specific to their device.

pub mod callgrind;
pub mod clock;
pub mod host;
pub mod inline_vmm;
pub mod interleave;
pub mod irq;
pub mod mmio;
pub mod netns;
pub mod points;
pub mod procfs;
pub mod qemu_img;
pub mod report;
pub mod stats;
pub mod summary;
pub mod task;
pub mod vmm_thread;
pub mod wakeup;
pub mod wiring;

/// Result of the benchmarks' fallible steps: the error is a message meant
/// for the person running the benchmark, printed as is.
pub type Res<T> = Result<T, String>;
