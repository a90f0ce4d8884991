//! A vsock packet's descriptor chain seen as header + payload, in either
//! direction, with no assumption about how the driver split it (Linux
//! before 6.2 uses one descriptor for the header and one for the data,
//! later ones a single descriptor, zero-copy sends one per page).
//!
//! Only the 44 header bytes are copied; the payload stays in guest memory
//! and is described as host iovecs, so the host socket reads or writes it
//! in place.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::packet::{Header, HDR_LEN};
use crate::virtio::{map_guest_buffer, MapError};

/// Most descriptors one packet may have: a header, and one per page of a
/// 64 KiB payload with room to spare. A longer chain is refused rather
/// than given an unbounded iovec array.
pub const MAX_DESCRIPTORS: usize = 64;

/// Why a chain is not a usable packet or buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A TX chain with a device-writable descriptor, or an RX chain with a
    /// device-readable one.
    #[error("descriptor of the wrong direction")]
    WrongDirection,
    /// Not even a whole header.
    #[error("chain shorter than a packet header")]
    NoHeader,
    /// The header's `len` is more than the chain carries.
    #[error("header says {len} payload bytes, the chain holds {have}")]
    Truncated {
        /// Bytes the header announced.
        len: u32,
        /// Payload bytes the chain has.
        have: usize,
    },
    /// The header's `len` is above the largest packet we take.
    #[error("payload of {0} bytes is over the limit")]
    TooLong(u32),
    /// More than [`MAX_DESCRIPTORS`] descriptors, a loop, or a bad `next`.
    #[error("broken or overlong descriptor chain")]
    Broken,
    /// A buffer outside guest memory.
    #[error("{0}")]
    Map(#[from] MapError),
}

/// Guest buffer pieces of one chain, in order.
type Segments = Vec<(GuestAddress, usize)>;

/// Walks `chain`, checking every descriptor's direction; returns its
/// pieces and their total length.
fn segments<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    writable: bool,
) -> Result<(Segments, usize), ChainError> {
    let mut segs = Segments::new();
    let mut total = 0usize;
    let mut last_had_next = false;
    for (count, desc) in chain.enumerate() {
        if count >= MAX_DESCRIPTORS {
            return Err(ChainError::Broken);
        }
        if desc.is_write_only() != writable {
            return Err(ChainError::WrongDirection);
        }
        last_had_next = desc.has_next();
        let len = desc.len() as usize;
        if len > 0 {
            segs.push((desc.addr(), len));
            total = total.saturating_add(len);
        }
    }
    // The iterator stops early on a loop or a bad `next`: the last
    // descriptor it gave then still says NEXT.
    if last_had_next {
        return Err(ChainError::Broken);
    }
    Ok((segs, total))
}

/// Splits `segs` at byte `at`: the pieces before and from it (`None` if a
/// piece's address range wraps, which no guest memory has).
fn split(segs: &[(GuestAddress, usize)], at: usize) -> Option<(Segments, Segments)> {
    let (mut head, mut tail) = (Segments::new(), Segments::new());
    let mut left = at;
    for &(addr, len) in segs {
        if left == 0 {
            tail.push((addr, len));
        } else if len <= left {
            head.push((addr, len));
            left -= len;
        } else {
            head.push((addr, left));
            tail.push((addr.checked_add(left as u64)?, len - left));
            left = 0;
        }
    }
    Some((head, tail))
}

/// Maps up to `limit` bytes of `segs` to host iovecs appended to `out`;
/// returns the bytes mapped.
fn map(
    mem: &impl GuestMemory,
    segs: &[(GuestAddress, usize)],
    limit: usize,
    access: Permissions,
    out: &mut Vec<libc::iovec>,
) -> Result<usize, ChainError> {
    let mut mapped = 0usize;
    for &(addr, len) in segs {
        let take = len.min(limit - mapped);
        if take == 0 {
            break;
        }
        map_guest_buffer(mem, addr, take, access, out)?;
        mapped += take;
    }
    Ok(mapped)
}

/// A packet the guest sent: its header and its payload in place.
#[derive(Debug)]
pub struct TxPacket {
    /// The header.
    pub hdr: Header,
    /// Host views of exactly `hdr.len` payload bytes.
    pub data: Vec<libc::iovec>,
}

/// Reads the packet in TX chain `chain`, refusing payloads over `max_len`.
/// On error the header is returned too when it could be read, so the
/// device can reset the connection it names.
pub fn read_tx<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    max_len: u32,
) -> Result<TxPacket, (Option<Header>, ChainError)> {
    let (segs, total) = segments(chain, false).map_err(|e| (None, e))?;
    if total < HDR_LEN {
        return Err((None, ChainError::NoHeader));
    }
    let (hdr_segs, data_segs) = split(&segs, HDR_LEN).ok_or((None, ChainError::Broken))?;
    let mut raw = [0u8; HDR_LEN];
    let mut at = 0usize;
    for (addr, len) in hdr_segs {
        let Some(dst) = raw.get_mut(at..at + len) else {
            return Err((None, ChainError::NoHeader));
        };
        mem.read_slice(dst, addr)
            .map_err(|_| (None, ChainError::Map(MapError::OutsideMemory(addr.0))))?;
        at += len;
    }
    let hdr = Header::parse(&raw);
    if hdr.len > max_len {
        return Err((Some(hdr), ChainError::TooLong(hdr.len)));
    }
    let have = total - HDR_LEN;
    if hdr.len as usize > have {
        return Err((Some(hdr), ChainError::Truncated { len: hdr.len, have }));
    }
    let mut data = Vec::new();
    map(
        mem,
        &data_segs,
        hdr.len as usize,
        Permissions::Read,
        &mut data,
    )
    .map_err(|e| (Some(hdr), e))?;
    Ok(TxPacket { hdr, data })
}

/// A buffer the guest posted for packets to it, mapped and ready.
#[derive(Debug)]
pub struct RxBuffer {
    /// The chain's head index, to return it.
    pub head: u16,
    hdr: Segments,
    /// Host views of the payload space after the header.
    pub data: Vec<libc::iovec>,
    /// Bytes `data` describes.
    pub data_len: usize,
}

impl RxBuffer {
    /// Maps RX chain `chain` (head `head`): a header's worth of space and
    /// at most `max_data` bytes of payload space after it.
    pub fn map<M: GuestMemory>(
        mem: &M,
        chain: DescriptorChain<&M>,
        head: u16,
        max_data: usize,
    ) -> Result<Self, ChainError> {
        let (segs, total) = segments(chain, true)?;
        if total < HDR_LEN {
            return Err(ChainError::NoHeader);
        }
        let (hdr, data_segs) = split(&segs, HDR_LEN).ok_or(ChainError::Broken)?;
        // The header is written with `write_slice`, which checks bounds;
        // check them now so a bad buffer is refused before it is used.
        for &(addr, len) in &hdr {
            let mut scratch = Vec::new();
            map_guest_buffer(mem, addr, len, Permissions::Write, &mut scratch)?;
        }
        let mut data = Vec::new();
        let data_len = map(mem, &data_segs, max_data, Permissions::Write, &mut data)?;
        Ok(Self {
            head,
            hdr,
            data,
            data_len,
        })
    }

    /// Cuts the payload space to `n` bytes (a read must not outrun the
    /// guest's credit).
    pub fn limit(&mut self, n: usize) {
        let mut left = n;
        let mut keep = 0usize;
        for iov in &mut self.data {
            if left == 0 {
                break;
            }
            iov.iov_len = iov.iov_len.min(left);
            left -= iov.iov_len;
            keep += 1;
        }
        self.data.truncate(keep);
        self.data_len = n.min(self.data_len);
    }

    /// Writes `hdr` into the header space.
    pub fn write_header<M: GuestMemory>(&self, mem: &M, hdr: &Header) -> Result<(), MapError> {
        let bytes = hdr.encode();
        let mut at = 0usize;
        for &(addr, len) in &self.hdr {
            let src = bytes.get(at..at + len).unwrap_or(&[]);
            mem.write_slice(src, addr)
                .map_err(|_| MapError::OutsideMemory(addr.0))?;
            at += len;
        }
        Ok(())
    }
}
