//! virtio-blk (VIRTIO 1.2 §5.2) served through the VMM thread's ring.
//!
//! Three rooms, as STYLE.md asks:
//! - [`request`] turns a descriptor chain into plain data and checks it
//!   against the disk and the spec, with no host I/O at all;
//! - `executor` turns a checked request into one [`IoOp`](crate::io::IoOp)
//!   with its guest buffers mapped to host iovecs;
//! - [`BlockDevice`] is the thin queue loop around them: pop, parse,
//!   execute, complete, interrupt;
//! - `punt` decides, once per backing file, which ops skip io_uring's
//!   inline attempt (`IOSQE_ASYNC`).

mod device;
mod executor;
mod punt;
pub mod request;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};

use super::{feature, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1};

pub use device::{BlockConfig, BlockDevice, BlockError, MAX_RETIRED_DISKS};

/// virtio device ID of a block device.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// The block device has one request queue.
pub const NUM_QUEUES: usize = 1;
/// Maximum (and default) size of the request queue.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Sector size the protocol counts in (always 512, whatever the host's).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Most data segments per request we advertise (seg_max). Two descriptors
/// more (header, status) still fit in a queue of [`QUEUE_MAX_SIZE`]
/// without indirect descriptors.
pub const SEG_MAX: u32 = 126;
/// Largest single data segment we advertise (size_max).
pub const SIZE_MAX: u32 = 1 << 20;
/// Bound on one request's data, so a request's memory is always bounded.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Largest discard / write-zeroes range in sectors (advertised).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 22) - 1;
/// Discard granularity in sectors (advertised as discard_sector_alignment).
pub const DISCARD_ALIGNMENT_SECTORS: u32 = 8;
/// Length of the serial number GET_ID returns (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// Bytes of `struct virtio_blk_config` we expose: up to and including
/// `write_zeroes_may_unmap` and its padding (no secure erase, no zones).
pub const CONFIG_LEN: usize = std::mem::offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// Features every block device offers; [`features`] adds RO.
pub const BASE_FEATURES: u64 = F_VERSION_1
    | F_EVENT_IDX
    | F_INDIRECT_DESC
    | feature(VIRTIO_BLK_F_SEG_MAX)
    | feature(VIRTIO_BLK_F_SIZE_MAX)
    | feature(VIRTIO_BLK_F_BLK_SIZE)
    | feature(VIRTIO_BLK_F_FLUSH)
    | feature(VIRTIO_BLK_F_DISCARD)
    | feature(VIRTIO_BLK_F_WRITE_ZEROES);

/// Features offered for a drive: read-only adds RO, and a drive whose
/// flushes are not honoured (`cache=unsafe`) does not offer FLUSH, so the
/// guest never believes a write is durable when it is not.
/// VIRTIO_F_IN_ORDER is never offered: completions come back in whatever
/// order the ring gives.
pub const fn features(read_only: bool, flush: bool) -> u64 {
    let mut f = BASE_FEATURES;
    if read_only {
        f |= feature(VIRTIO_BLK_F_RO);
    }
    if !flush {
        f &= !feature(VIRTIO_BLK_F_FLUSH);
    }
    f
}

fn put(bytes: &mut [u8], offset: usize, value: &[u8]) {
    if let Some(dst) = bytes.get_mut(offset..offset + value.len()) {
        dst.copy_from_slice(value);
    }
}

/// Writes the capacity field (in 512-byte sectors) of a config space.
pub fn set_capacity(config: &mut [u8], sectors: u64) {
    put(
        config,
        std::mem::offset_of!(virtio_blk_config, capacity),
        &sectors.to_le_bytes(),
    );
}

/// The config space a drive of `sectors` sectors presents.
pub fn config_bytes(sectors: u64) -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_LEN];
    set_capacity(&mut c, sectors);
    let u32s = [
        (std::mem::offset_of!(virtio_blk_config, size_max), SIZE_MAX),
        (std::mem::offset_of!(virtio_blk_config, seg_max), SEG_MAX),
        (std::mem::offset_of!(virtio_blk_config, blk_size), 512),
        (
            std::mem::offset_of!(virtio_blk_config, max_discard_sectors),
            MAX_DISCARD_SECTORS,
        ),
        (std::mem::offset_of!(virtio_blk_config, max_discard_seg), 1),
        (
            std::mem::offset_of!(virtio_blk_config, discard_sector_alignment),
            DISCARD_ALIGNMENT_SECTORS,
        ),
        (
            std::mem::offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            MAX_DISCARD_SECTORS,
        ),
        (
            std::mem::offset_of!(virtio_blk_config, max_write_zeroes_seg),
            1,
        ),
    ];
    for (offset, value) in u32s {
        put(&mut c, offset, &value.to_le_bytes());
    }
    put(
        &mut c,
        std::mem::offset_of!(virtio_blk_config, write_zeroes_may_unmap),
        &[1],
    );
    c
}

/// Per-device counters for metrics; the device only ever adds to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlockCounters {
    /// Requests popped from the queue (good or bad).
    pub requests: u64,
    /// Bytes read from the disk into guest memory.
    pub read_bytes: u64,
    /// Bytes written from guest memory to the disk.
    pub write_bytes: u64,
    /// FLUSH requests completed successfully.
    pub flushes: u64,
    /// Requests answered with a status other than OK, or returned unanswered.
    pub errors: u64,
    /// Times the device asked the driver for a reset.
    pub needs_reset: u64,
    /// Guest-caused warnings not logged (rate limit); each was counted above.
    pub log_lines_suppressed: u64,
    /// Times the drive's rate limiter held requests back (Firecracker's
    /// name for it).
    pub rate_limiter_throttled_events: u64,
}

#[cfg(test)]
mod tests;
