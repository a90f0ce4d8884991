//! One 9P request's descriptor chain as two byte streams: the request in
//! the device-readable buffers, room for the reply in the device-writable
//! ones (VIRTIO 1.2 §5.8.6: "the request ... followed by the response").
//!
//! The Linux client lays a chain out in several ways (one buffer each way;
//! for large reads and writes a header buffer followed by the pinned pages
//! of the user's buffer), so everything here works on byte offsets within
//! a stream, never on descriptor boundaries. Walking the chain reads no
//! guest data; the descriptors are checked to lie in guest memory, come
//! readable-first, number at most [`MAX_SEGMENTS`] and total at most
//! [`MAX_STREAM`] bytes each way.

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::io::IOV_MAX;
use crate::virtio::{map_guest_buffer, MapError};

/// Most descriptors one request may use (one vectored host op's worth).
pub const MAX_SEGMENTS: usize = IOV_MAX;
/// Most bytes either direction of one chain may hold; larger chains are
/// refused (msize is far below this).
pub const MAX_STREAM: u64 = 16 << 20;

/// A run of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First byte.
    pub addr: GuestAddress,
    /// Length (never zero).
    pub len: u32,
}

/// Why a chain cannot carry a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A loop, a bad `next` or a bad indirect table ended the walk early.
    #[error("descriptor chain is broken")]
    Broken,
    /// A device-readable descriptor after a device-writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// More descriptors than one request may use.
    #[error("more than {MAX_SEGMENTS} descriptors")]
    TooManySegments,
    /// More bytes than one request may hold.
    #[error("more than {MAX_STREAM} bytes one way")]
    TooLarge,
    /// A buffer outside guest memory.
    #[error("buffer at {0:#x} is outside guest memory")]
    OutsideMemory(u64),
}

/// The two streams of a chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Streams {
    /// Device-readable buffers, in order: the request.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in order: room for the reply.
    pub writable: Vec<Segment>,
    /// Bytes in `readable`.
    pub readable_len: u32,
    /// Bytes in `writable`.
    pub writable_len: u32,
}

/// Walks a chain's descriptors (`(addr, len, writable, has_next)`) into
/// [`Streams`], checking each buffer lies in `mem`.
pub fn streams<M, I>(descs: I, mem: &M) -> Result<Streams, ChainError>
where
    M: GuestMemory,
    I: IntoIterator<Item = (GuestAddress, u32, bool, bool)>,
{
    let mut s = Streams::default();
    let (mut rlen, mut wlen) = (0u64, 0u64);
    let mut last_had_next = false;
    for (count, (addr, len, writable, has_next)) in descs.into_iter().enumerate() {
        if count >= MAX_SEGMENTS {
            return Err(ChainError::TooManySegments);
        }
        last_had_next = has_next;
        if len == 0 {
            continue;
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(addr, len as usize, access) {
            return Err(ChainError::OutsideMemory(addr.0));
        }
        let seg = Segment { addr, len };
        if writable {
            wlen += u64::from(len);
            s.writable.push(seg);
        } else {
            if !s.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            rlen += u64::from(len);
            s.readable.push(seg);
        }
        if rlen > MAX_STREAM || wlen > MAX_STREAM {
            return Err(ChainError::TooLarge);
        }
    }
    // The iterator stops early on a loop or a bad `next`: the last
    // descriptor it gave then still says NEXT.
    if last_had_next {
        return Err(ChainError::Broken);
    }
    s.readable_len = rlen as u32;
    s.writable_len = wlen as u32;
    Ok(s)
}

/// The pieces of `segs` covering stream bytes `[offset, offset + len)`,
/// clipped to what the stream holds.
pub fn range(segs: &[Segment], offset: u32, len: u32) -> Vec<Segment> {
    let mut out = Vec::new();
    let (start, end) = (u64::from(offset), u64::from(offset) + u64::from(len));
    let mut pos = 0u64;
    for seg in segs {
        let seg_end = pos + u64::from(seg.len);
        let lo = start.max(pos);
        let hi = end.min(seg_end);
        if lo < hi {
            out.push(Segment {
                addr: GuestAddress(seg.addr.0 + (lo - pos)),
                len: (hi - lo) as u32,
            });
        }
        pos = seg_end;
        if pos >= end {
            break;
        }
    }
    out
}

/// Copies up to `buf.len()` bytes from the start of the stream; returns
/// how many were copied.
pub fn read_prefix<M: GuestMemory>(mem: &M, segs: &[Segment], buf: &mut [u8]) -> usize {
    let mut done = 0usize;
    for seg in range(segs, 0, buf.len() as u32) {
        let n = seg.len as usize;
        let Some(dst) = buf.get_mut(done..done + n) else {
            break;
        };
        if mem.read_slice(dst, seg.addr).is_err() {
            break;
        }
        done += n;
    }
    done
}

/// Writes `data` at the start of the stream; returns whether all of it fit.
pub fn write_prefix<M: GuestMemory>(mem: &M, segs: &[Segment], data: &[u8]) -> bool {
    let mut done = 0usize;
    for seg in range(segs, 0, data.len() as u32) {
        let n = seg.len as usize;
        let Some(src) = data.get(done..done + n) else {
            return false;
        };
        if mem.write_slice(src, seg.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == data.len()
}

/// Host iovecs for stream bytes `[offset, offset + len)`, appended to
/// `out`; `access` is what the host does with them.
pub fn map_range<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    offset: u32,
    len: u32,
    access: Permissions,
    out: &mut Vec<libc::iovec>,
) -> Result<(), ChainError> {
    for seg in range(segs, offset, len) {
        map_guest_buffer(mem, seg.addr, seg.len as usize, access, out).map_err(|e| match e {
            MapError::OutsideMemory(addr) => ChainError::OutsideMemory(addr),
            MapError::TooManyIovecs => ChainError::TooManySegments,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn d(addr: u64, len: u32, w: bool, next: bool) -> (GuestAddress, u32, bool, bool) {
        (GuestAddress(addr), len, w, next)
    }

    #[test]
    fn streams_split_by_direction() {
        let m = mem();
        let s = streams(
            [
                d(0x100, 7, false, true),
                d(0x200, 16, false, true),
                d(0x400, 11, true, true),
                d(0x800, 100, true, false),
            ],
            &m,
        )
        .unwrap();
        assert_eq!((s.readable_len, s.writable_len), (23, 111));
        assert_eq!(
            range(&s.readable, 5, 4),
            vec![
                Segment {
                    addr: GuestAddress(0x105),
                    len: 2
                },
                Segment {
                    addr: GuestAddress(0x200),
                    len: 2
                },
            ]
        );
        assert_eq!(
            range(&s.writable, 11, 1000),
            vec![Segment {
                addr: GuestAddress(0x800),
                len: 100
            }]
        );
        assert!(range(&s.writable, 200, 5).is_empty());
    }

    #[test]
    fn hostile_chains_are_refused() {
        let m = mem();
        assert_eq!(
            streams([d(0x100, 7, true, true), d(0x200, 7, false, false)], &m),
            Err(ChainError::ReadableAfterWritable)
        );
        assert_eq!(
            streams([d(0x100, 7, false, true)], &m),
            Err(ChainError::Broken)
        );
        assert_eq!(
            streams([d(0xfff0, 0x20, false, false)], &m),
            Err(ChainError::OutsideMemory(0xfff0))
        );
        let many = (0..=MAX_SEGMENTS).map(|_| d(0x100, 1, false, true));
        assert_eq!(streams(many, &m), Err(ChainError::TooManySegments));
    }

    #[test]
    fn prefixes_cross_descriptor_boundaries() {
        let m = mem();
        let segs = [
            Segment {
                addr: GuestAddress(0x100),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x200),
                len: 10,
            },
        ];
        assert!(write_prefix(&m, &segs, b"hello world"));
        let mut buf = [0u8; 20];
        assert_eq!(read_prefix(&m, &segs, &mut buf), 13);
        assert_eq!(&buf[..11], b"hello world");
        assert!(!write_prefix(&m, &segs, &[0u8; 14]));
    }
}
