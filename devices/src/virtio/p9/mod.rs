//! virtio-9p (VIRTIO 1.2 §5.8, the 9P2000.L protocol): host directories
//! served to the guest from the VMM thread's ring, for `ringvm -- CMD`.
//!
//! Why 9P and not virtio-fs: a 9P request is one self-describing message
//! in one descriptor chain (the request in the readable part, the reply
//! written to the writable part), so it parses like a block request, with
//! no FUSE session, no DAX window and no second queue; Linux's client has
//! been built into test kernels for years (vmtest and virtme use it).
//!
//! The rooms, as for the block device:
//! - [`wire`]: bytes ↔ messages, pure and bounded (the fuzz target);
//! - [`server`]: the protocol (session, fids, what each request means) over
//!   a [`Filesystem`], with no guest memory and no data I/O;
//! - [`HostFs`]: a host directory, confined with `openat2`;
//!   [`ControlFs`]: ringvm's synthetic control tree (init, config, stdio);
//! - the device: the queue loop that copies each request out of its chain,
//!   asks the server, and runs reads, writes and fsyncs on the ring
//!   straight between the host descriptor and guest memory.

mod chain;
pub mod control;
mod device;
pub mod fs;
pub mod hostfs;
pub mod server;
pub mod wire;

#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod tests;

pub use control::{ControlFs, ControlFsError};
pub use device::{P9Counters, P9Device, FEATURES};
pub use fs::{Errno, Filesystem, OpenFile};
pub use hostfs::{HostFs, HostFsError};
pub use server::{Action, Server};

/// virtio device ID of a 9P transport.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_9P;
/// VIRTIO_9P_MOUNT_TAG: the config space holds the tag the guest mounts by.
pub const F_MOUNT_TAG: u64 = super::feature(0);
/// Longest mount tag we hand out (Linux reads the tag's u16 length).
pub const MAX_TAG_LEN: usize = 64;
/// Largest message the device negotiates: Linux's virtio transport takes
/// up to 128 pages per request less its headers (`VIRTQUEUE_NUM - 3`).
pub const MAX_MSIZE: u32 = 500 * 1024;
/// Maximum size of the request queue.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// The config space for mount tag `tag`: `tag_len[2] tag[tag_len]`.
pub fn config_bytes(tag: &str) -> Vec<u8> {
    let tag = &tag.as_bytes()[..tag.len().min(MAX_TAG_LEN)];
    let mut c = (tag.len() as u16).to_le_bytes().to_vec();
    c.extend_from_slice(tag);
    c
}

/// The parser's fuzz entry point (see [`wire::fuzz_entry`]).
pub fn fuzz_entry(data: &[u8]) {
    wire::fuzz_entry(data);
}
