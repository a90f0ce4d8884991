//! Descriptor chains as checked guest segments and host iovecs, with no
//! host I/O.
//!
//! A TX chain (VIRTIO 1.2 §5.1.6.2) is device-readable only: the 12-byte
//! header and the frame, in any arrangement of descriptors. An RX chain
//! (§5.1.6.3) is device-writable only and must hold at least the header.
//! Every rule the guest can break is a [`ChainError`]: nothing panics, and
//! the work per chain is bounded by [`IOV_MAX`] descriptors.
//!
//! virtio-queue's chain iterator simply stops on a broken link (a loop
//! that exhausts its TTL, a `next` outside the table, a nested indirect
//! table); [`walk`] tells that apart from a proper end by checking that the
//! last descriptor it saw had no NEXT flag.

use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress, Permissions,
};

use super::{MAX_BUFFER_LEN, MIN_TX_LEN, VNET_HDR_LEN};
use crate::io::IOV_MAX;
use crate::virtio::{map_guest_buffer, MapError};

/// Why a chain was returned unused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A TX chain has a device-writable descriptor.
    #[error("device-writable descriptor in a transmit chain")]
    WritableInTx,
    /// An RX chain has a device-readable descriptor.
    #[error("device-readable descriptor in a receive chain")]
    ReadableInRx,
    /// A descriptor of length zero.
    #[error("zero-length descriptor")]
    ZeroLength,
    /// A TX chain longer than the header plus the largest frame.
    #[error("transmit chain longer than {MAX_BUFFER_LEN} bytes")]
    TooLong,
    /// A TX chain shorter than the header plus an Ethernet header, or an RX
    /// chain shorter than the header.
    #[error("chain too short ({0} bytes)")]
    TooShort(usize),
    /// The chain ends in a broken link: a loop, a `next` outside the table
    /// or a bad indirect table.
    #[error("descriptor chain is broken (loop, bad next or bad indirect table)")]
    Broken,
    /// More pieces than one vectored op takes.
    #[error("chain needs more than {IOV_MAX} iovecs")]
    TooManyIovecs,
    /// A buffer is not (entirely) inside guest memory.
    #[error("buffer at {0:#x} is outside guest memory")]
    OutsideMemory(u64),
}

/// A run of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address of the first byte.
    pub addr: GuestAddress,
    /// Length in bytes (never zero).
    pub len: u32,
}

/// Which way the device uses a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// TX: the device reads.
    Tx,
    /// RX: the device writes.
    Rx,
}

/// Walks `chain`, checks every descriptor for `dir`, maps it to host
/// iovecs appended to `iov` (which may already hold other chains' iovecs)
/// and, when `segs` is given, records the guest segments too. Returns the
/// chain's length in bytes. On error
/// `iov` and `segs` are truncated back to where they were.
pub fn walk<T: GuestMemory>(
    mem: &T,
    chain: DescriptorChain<&T>,
    dir: Direction,
    iov: &mut Vec<libc::iovec>,
    mut segs: Option<&mut Vec<Segment>>,
) -> Result<usize, ChainError> {
    let iov_start = iov.len();
    let seg_start = segs.as_ref().map_or(0, |s| s.len());
    let result = walk_inner(mem, chain, dir, iov, segs.as_deref_mut());
    if result.is_err() {
        iov.truncate(iov_start);
        if let Some(s) = segs {
            s.truncate(seg_start);
        }
    }
    result
}

fn walk_inner<T: GuestMemory>(
    mem: &T,
    chain: DescriptorChain<&T>,
    dir: Direction,
    iov: &mut Vec<libc::iovec>,
    mut segs: Option<&mut Vec<Segment>>,
) -> Result<usize, ChainError> {
    let access = match dir {
        Direction::Tx => Permissions::Read,
        Direction::Rx => Permissions::Write,
    };
    let mut total = 0usize;
    let mut ended = false;
    let mut count = 0usize;
    for desc in chain {
        count += 1;
        if count > IOV_MAX {
            return Err(ChainError::TooManyIovecs);
        }
        match (dir, desc.is_write_only()) {
            (Direction::Tx, true) => return Err(ChainError::WritableInTx),
            (Direction::Rx, false) => return Err(ChainError::ReadableInRx),
            _ => {}
        }
        if desc.len() == 0 {
            return Err(ChainError::ZeroLength);
        }
        let len = desc.len() as usize;
        total = total.saturating_add(len);
        if dir == Direction::Tx && total > MAX_BUFFER_LEN {
            return Err(ChainError::TooLong);
        }
        if !map_in_one_region(mem, desc.addr(), len, iov) {
            map_guest_buffer(mem, desc.addr(), len, access, iov).map_err(|e| match e {
                MapError::OutsideMemory(addr) => ChainError::OutsideMemory(addr),
                MapError::TooManyIovecs => ChainError::TooManyIovecs,
            })?;
        }
        if let Some(s) = segs.as_deref_mut() {
            s.push(Segment {
                addr: desc.addr(),
                len: desc.len(),
            });
        }
        ended = !desc.has_next();
    }
    if !ended {
        return Err(ChainError::Broken);
    }
    let min = match dir {
        Direction::Tx => MIN_TX_LEN,
        Direction::Rx => VNET_HDR_LEN,
    };
    if total < min {
        return Err(ChainError::TooShort(total));
    }
    Ok(total)
}

/// The common case of [`map_guest_buffer`] without its slice iterator: a
/// buffer inside one region of plain guest memory (no IOMMU) becomes one
/// iovec, found with one region lookup. False, with `iov` unchanged, when
/// the buffer needs the general path (several regions, outside memory, no
/// host address, a full iovec array), which then decides.
fn map_in_one_region<T: GuestMemory>(
    mem: &T,
    addr: GuestAddress,
    len: usize,
    iov: &mut Vec<libc::iovec>,
) -> bool {
    if iov.len() >= IOV_MAX || len == 0 {
        return false;
    }
    let Some(region) = mem
        .physical_memory()
        .and_then(|phys| phys.find_region(addr))
    else {
        return false;
    };
    let Some(offset) = addr.checked_offset_from(region.start_addr()) else {
        return false;
    };
    let fits = offset
        .checked_add(len as u64)
        .is_some_and(|end| end <= region.len());
    if !fits {
        return false;
    }
    let Ok(base) = region.get_host_address(MemoryRegionAddress(offset)) else {
        return false;
    };
    iov.push(libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    });
    true
}

/// Writes `bytes` at byte `offset` of the buffer the segments describe
/// (the header may span descriptors); false if it does not fit.
pub fn write_at<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    mut offset: usize,
    mut bytes: &[u8],
) -> bool {
    for seg in segs {
        if bytes.is_empty() {
            break;
        }
        let len = seg.len as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(bytes.len());
        let Some(addr) = seg.addr.0.checked_add(offset as u64) else {
            return false;
        };
        let (now, rest) = bytes.split_at(n);
        if mem.write_slice(now, GuestAddress(addr)).is_err() {
            return false;
        }
        bytes = rest;
        offset = 0;
    }
    bytes.is_empty()
}
