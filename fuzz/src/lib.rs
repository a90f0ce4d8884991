//! What the fuzz targets share: a small guest memory, the driver's side of
//! split virtqueues laid out in it (with virtio-queue's mock rings), and an
//! auditor for the host I/O a device hands to its ring.
//!
//! The targets never trust a device: every op it submits is checked against
//! guest memory and the device's own limits *before* the harness touches
//! the buffers it names, and the iovec arrays are checked again, unchanged,
//! when the op completes (the device promised to keep them in place).

pub mod api;
pub mod driver;
pub mod json;
pub mod ops;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Size of each of the two guest memory regions.
pub const REGION_SIZE: u64 = 0x1_0000;
/// First byte after guest memory (two adjacent regions, so buffers can
/// straddle the boundary between them at [`REGION_SIZE`]).
pub const MEM_END: u64 = 2 * REGION_SIZE;

/// Two adjacent 64 KiB regions at guest address 0.
fn new_guest_memory() -> GuestMemoryMmap {
    match GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION_SIZE as usize),
        (GuestAddress(REGION_SIZE), REGION_SIZE as usize),
    ]) {
        Ok(m) => m,
        Err(e) => panic!("harness: cannot map guest memory: {e}"),
    }
}

thread_local! {
    static MEMORY: GuestMemoryMmap = new_guest_memory();
}

/// Runs `f` with the guest memory, zeroed: one mapping serves every fuzz
/// input (mapping it anew each time would cost more than most inputs).
pub fn with_guest_memory<R>(f: impl FnOnce(&GuestMemoryMmap) -> R) -> R {
    MEMORY.with(|mem| {
        for region in mem.iter() {
            let Ok(slice) = region.as_volatile_slice() else {
                continue;
            };
            let _ = slice.write_slice(&ZEROES, 0);
            let _ = slice.write_slice(&ZEROES, ZEROES.len());
        }
        f(mem)
    })
}

static ZEROES: [u8; (REGION_SIZE / 2) as usize] = [0; (REGION_SIZE / 2) as usize];

thread_local! {
    static DISK: std::fs::File = new_memfd();
}

/// A disk image of `len` bytes: a new handle on one in-memory file kept
/// for every input (its size is set anew each time).
pub fn memfd(len: u64) -> std::fs::File {
    DISK.with(|f| {
        f.set_len(len).expect("harness: sizing the memfd");
        f.try_clone().expect("harness: dup of the memfd")
    })
}

/// A disk image of `len` bytes in a file of its own (for a disk swap,
/// where the old and the new disk must differ).
pub fn fresh_disk(len: u64) -> std::fs::File {
    let file = new_memfd();
    file.set_len(len).expect("harness: sizing the memfd");
    file
}

fn new_memfd() -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: the name is a NUL-terminated literal; memfd_create returns a
    // fresh fd or -1.
    let fd = unsafe { libc::memfd_create(c"ringvm-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "harness: memfd_create failed");
    // SAFETY: the fd was just created and is owned by nobody else.
    unsafe { std::fs::File::from_raw_fd(fd) }
}

/// The fd [`NullTap`] reports; a device's tap ops must name it.
pub const TAP_FD: std::os::fd::RawFd = 1000;

/// A tap that is never read or written (the fake ring plays the kernel),
/// and that refuses offloads on demand.
#[derive(Debug, Default)]
pub struct NullTap {
    /// When set, [`Tap::set_offload`](devices::virtio::net::Tap::set_offload) fails.
    pub refuse: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::os::fd::AsRawFd for NullTap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        TAP_FD
    }
}

impl devices::virtio::net::Tap for NullTap {
    fn set_offload(&self, flags: u32) -> Result<(), devices::virtio::net::TapError> {
        if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(devices::virtio::net::TapError::Offload {
                flags,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        Ok(())
    }
}

/// A copy of all guest memory, to prove a device wrote nothing (after a
/// reset, a device may not touch the driver's memory any more).
pub fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut copy = vec![0u8; MEM_END as usize];
    mem.read_slice(&mut copy, GuestAddress(0))
        .expect("harness: reading guest memory");
    copy
}

/// Panics with the first changed address if memory differs from `before`.
pub fn assert_unchanged(mem: &GuestMemoryMmap, before: &[u8], what: &str) {
    let now = snapshot(mem);
    if let Some(at) = now.iter().zip(before).position(|(a, b)| a != b) {
        panic!("{what}: guest memory at {at:#x} written after a reset");
    }
}
