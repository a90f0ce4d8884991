//! One connection between a guest port and a host Unix socket: its state
//! machine, the control packets it owes the guest, and the ring ops it has
//! in the kernel.
//!
//! ```text
//!  host client ─accept─► Connecting ─"CONNECT p\n"─► Requested ─RESPONSE─► Established
//!                        (line read)   (REQUEST to the guest)  (OK line to the host)
//!  guest REQUEST ─connect(uds_P)─► Established (RESPONSE to the guest)
//!  any state ─RST, error, reset─► closing: no new ops; freed (fd closed) when none is left
//! ```

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::chain::RxBuffer;
use super::credit::Credit;
use super::host::MAX_CONNECT_LINE;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// A host client connected; its `CONNECT <port>\n` line is being read.
    Connecting,
    /// The guest was sent (or owes) a REQUEST; waiting for its RESPONSE.
    Requested,
    /// Data flows.
    Established,
}

/// Control packets a connection owes the guest (bits).
pub mod ctrl {
    /// REQUEST (host-initiated connection).
    pub const REQUEST: u8 = 1;
    /// RESPONSE (guest-initiated connection accepted).
    pub const RESPONSE: u8 = 2;
    /// CREDIT_UPDATE (buffer freed, or the guest asked).
    pub const CREDIT_UPDATE: u8 = 4;
}

/// A guest packet's payload held until the host socket took all of it.
#[derive(Debug)]
pub struct HeldTx {
    /// TX chain head, returned once written.
    pub head: u16,
    /// The bytes still to write (advanced past partial writes).
    pub data: Vec<libc::iovec>,
}

/// A byte line to or from the host client (`CONNECT`/`OK`), boxed so its
/// iovec and bytes never move while the kernel holds them.
#[derive(Debug)]
pub struct Line {
    /// The bytes.
    pub bytes: [u8; MAX_CONNECT_LINE],
    /// Bytes read (CONNECT) or to write (OK).
    pub len: usize,
    /// Bytes of the OK line written so far.
    pub sent: usize,
    /// The iovec the ring uses.
    pub iov: libc::iovec,
}

/// Ring ops a connection has in the kernel (at most one of each).
#[derive(Debug, Default)]
pub struct Ops {
    /// A POLLIN on the socket.
    pub poll: bool,
    /// A read into a guest RX buffer.
    pub read: Option<RxBuffer>,
    /// A write of guest data (the front of `tx`).
    pub write: bool,
    /// A one-byte read of the CONNECT line.
    pub line_read: bool,
    /// A write of the OK line.
    pub line_write: bool,
}

impl Ops {
    /// How many ops are in the kernel.
    pub fn count(&self) -> usize {
        usize::from(self.poll)
            + usize::from(self.read.is_some())
            + usize::from(self.write)
            + usize::from(self.line_read)
            + usize::from(self.line_write)
    }
}

/// One connection.
#[derive(Debug)]
pub struct Conn {
    /// The host socket.
    pub fd: OwnedFd,
    /// The host-side port (the guest's `dst_port`).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// Its state.
    pub state: State,
    /// Flow control both ways.
    pub credit: Credit,
    /// Control packets owed to the guest (`ctrl::*`).
    pub ctrl: u8,
    /// The CONNECT line read or the OK line written.
    pub line: Box<Line>,
    /// The OK line waits to be written (before any guest data).
    pub line_out: bool,
    /// Guest data waiting for (or in) a write, oldest first.
    pub tx: VecDeque<HeldTx>,
    /// Ops in the kernel.
    pub ops: Ops,
    /// The last poll said the socket has something to read.
    pub readable: bool,
    /// SHUTDOWN flags the guest sent.
    pub guest_shut: u32,
    /// The host side's write end was shut after the guest's SHUTDOWN SEND.
    pub host_write_shut: bool,
    /// The host socket reached end of file (the guest was told).
    pub host_eof: bool,
    /// Being torn down: no new ops; freed when `ops` is empty.
    pub closing: bool,
    /// Torn down by a device reset: its guest buffers belong to the driver
    /// again and must not be written or returned.
    pub orphaned: bool,
}

impl Conn {
    /// A connection on `fd` between host port `local_port` and guest port
    /// `peer_port`, offering the guest `buf_alloc` bytes of buffer.
    pub fn new(fd: OwnedFd, local_port: u32, peer_port: u32, state: State, buf_alloc: u32) -> Self {
        let mut line = Box::new(Line {
            bytes: [0; MAX_CONNECT_LINE],
            len: 0,
            sent: 0,
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
        });
        line.iov.iov_base = line.bytes.as_mut_ptr().cast();
        Self {
            fd,
            local_port,
            peer_port,
            state,
            credit: Credit::new(buf_alloc),
            ctrl: 0,
            line,
            line_out: false,
            tx: VecDeque::new(),
            ops: Ops::default(),
            readable: false,
            guest_shut: 0,
            host_write_shut: false,
            host_eof: false,
            closing: false,
            orphaned: false,
        }
    }

    /// The socket's fd.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether host data should flow to the guest now.
    pub fn wants_data(&self) -> bool {
        self.state == State::Established
            && !self.closing
            && !self.host_eof
            && self.guest_shut & super::packet::SHUTDOWN_RCV == 0
            && self.credit.peer_credit() > 0
            && self.ops.read.is_none()
    }

    /// Points the line iovec at the next byte of the CONNECT line.
    pub fn line_read_iov(&mut self) -> Option<*const libc::iovec> {
        let base = self.line.bytes.get_mut(self.line.len..)?.as_mut_ptr();
        if self.line.len >= MAX_CONNECT_LINE {
            return None;
        }
        self.line.iov = libc::iovec {
            iov_base: base.cast(),
            iov_len: 1,
        };
        Some(&self.line.iov)
    }

    /// Points the line iovec at the unsent rest of the OK line.
    pub fn line_write_iov(&mut self) -> Option<*const libc::iovec> {
        let rest = self.line.bytes.get_mut(self.line.sent..self.line.len)?;
        if rest.is_empty() {
            return None;
        }
        let (base, len) = (rest.as_mut_ptr(), rest.len());
        self.line.iov = libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        };
        Some(&self.line.iov)
    }
}

/// Drops the first `n` bytes from `iov` (after a partial write).
pub fn advance(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop = 0usize;
    for v in iov.iter_mut() {
        if n == 0 {
            break;
        }
        if n >= v.iov_len {
            n -= v.iov_len;
            drop += 1;
        } else {
            // SAFETY: `n < iov_len`, so the new base is inside the same
            // guest buffer the iovec described.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    iov.drain(..drop.min(iov.len()));
}

/// Bytes an iovec array describes.
pub fn iov_len(iov: &[libc::iovec]) -> usize {
    iov.iter()
        .map(|v| v.iov_len)
        .fold(0usize, usize::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_drops_written_bytes() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut iov = vec![
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        advance(&mut iov, 3);
        assert_eq!(iov_len(&iov), 13);
        assert_eq!(iov[0].iov_base, a[3..].as_mut_ptr().cast());
        advance(&mut iov, 5);
        assert_eq!(iov.len(), 1);
        assert_eq!(iov[0].iov_base, b.as_mut_ptr().cast());
        advance(&mut iov, 100);
        assert!(iov.is_empty());
    }
}
