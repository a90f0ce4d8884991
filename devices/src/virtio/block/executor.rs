//! Turning a checked request into one ring operation.
//!
//! The op's iovecs live in the queue's [`InFlight`](crate::virtio::InFlight)
//! slot until its completion; this module only decides what the op is and
//! how its result will be judged.

use std::os::fd::RawFd;

use libc::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::request::{Operation, Request, Segment};
use crate::io::{IoOp, IoSubmitError};
use crate::virtio::{map_guest_buffer, Iovecs, MapError};

/// Why a request could not be submitted; each earns IOERR.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// A buffer could not be mapped to host iovecs.
    #[error("{0}")]
    Map(#[from] MapError),
    /// The request has no host operation (answered by the device itself).
    #[error("request has no host operation")]
    NoHostOp,
    /// The ring refused the operation.
    #[error("submission failed: {0}")]
    Submit(#[source] IoSubmitError),
}

/// What kind of op a slot waits for, and how to judge its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PendingKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl PendingKind {
    /// Whether the op changes the disk (and so a later FLUSH waits for it).
    pub fn writes(self) -> bool {
        matches!(self, Self::Write | Self::Discard | Self::WriteZeroes)
    }
}

/// What the device remembers of a request whose op is in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pending {
    pub status: GuestAddress,
    pub kind: PendingKind,
    /// Bytes the op must transfer to count as a success.
    pub expected: u64,
}

/// Builds the op for `req` on `fd`, mapping its buffers into `iovecs`
/// (which must stay alive until the op completes).
pub(crate) fn prepare<M: GuestMemory>(
    mem: &M,
    fd: RawFd,
    req: &Request,
    iovecs: &mut Iovecs,
) -> Result<(IoOp, Pending), ExecuteError> {
    let pending = |kind, expected| Pending {
        status: req.status,
        kind,
        expected,
    };
    Ok(match req.op {
        Operation::Read { offset } => {
            map_segments(mem, &req.data, Permissions::Write, iovecs)?;
            let (iovecs, iovcnt) = iovecs.as_raw();
            (
                IoOp::Readv {
                    fd,
                    iovecs,
                    iovcnt,
                    offset,
                },
                pending(PendingKind::Read, req.data_len),
            )
        }
        Operation::Write { offset } => {
            map_segments(mem, &req.data, Permissions::Read, iovecs)?;
            let (iovecs, iovcnt) = iovecs.as_raw();
            (
                IoOp::Writev {
                    fd,
                    iovecs,
                    iovcnt,
                    offset,
                },
                pending(PendingKind::Write, req.data_len),
            )
        }
        Operation::Flush => (
            IoOp::Fsync { fd, datasync: true },
            pending(PendingKind::Flush, 0),
        ),
        Operation::Discard { offset, len } => (
            IoOp::Fallocate {
                fd,
                mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            },
            pending(PendingKind::Discard, 0),
        ),
        Operation::WriteZeroes { offset, len, unmap } => {
            let mode = if unmap {
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            } else {
                FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            };
            (
                IoOp::Fallocate {
                    fd,
                    mode,
                    offset,
                    len,
                },
                pending(PendingKind::WriteZeroes, 0),
            )
        }
        // Answered synchronously by the device; never reaches here.
        Operation::GetId => return Err(ExecuteError::NoHostOp),
    })
}

/// Maps guest segments to host iovecs, splitting at region boundaries.
fn map_segments<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    access: Permissions,
    out: &mut Iovecs,
) -> Result<(), MapError> {
    out.0.clear();
    out.0.reserve(segs.len());
    for seg in segs {
        map_guest_buffer(mem, seg.addr, seg.len as usize, access, &mut out.0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    #[test]
    fn segments_split_at_region_boundaries() -> Result<(), Box<dyn std::error::Error>> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])?;
        let mut out = Iovecs::default();
        let seg = Segment {
            addr: GuestAddress(0xf00),
            len: 0x200,
        };
        map_segments(&mem, &[seg], Permissions::Write, &mut out)?;
        assert_eq!(out.0.len(), 2);
        assert_eq!(out.0[0].iov_len, 0x100);
        assert_eq!(out.0[1].iov_len, 0x100);
        let outside = Segment {
            addr: GuestAddress(0x1f00),
            len: 0x200,
        };
        assert!(map_segments(&mem, &[outside], Permissions::Read, &mut out).is_err());
        Ok(())
    }
}
