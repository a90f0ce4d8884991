//! The VMM thread's one io_uring ring.
//!
//! Every event source the VMM thread owns (eventfds from vCPUs and devices,
//! ioeventfd kicks, stdin, signals, timers) and every device I/O request is
//! an operation on this ring, tagged with a [`Token`]. One turn of the loop
//! is one `io_uring_enter`: it submits what the last turn queued and waits
//! for at least one completion. The ring is created `SINGLE_ISSUER |
//! DEFER_TASKRUN` where the kernel has them, so completions are only run
//! when this thread asks for them, in one batch, and is limited to the
//! opcodes ringvm uses (`ring_lockdown.rs`).

use std::io;
use std::os::fd::RawFd;

use devices::io::{IoOp, IoSubmit, IoSubmitError};
use io_uring::{opcode, squeue, types, IoUring};

/// Ring size; completions get twice as many slots so a burst of I/O never
/// overflows the completion queue.
pub const RING_ENTRIES: u32 = 256;

/// What a completion belongs to: a source kind, an index within that kind
/// (e.g. the device number), and a 48-bit tag the owner chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    /// Which kind of source.
    pub kind: u8,
    /// Which one of that kind.
    pub index: u8,
    /// The owner's own value (a request slot, a queue number, ...).
    pub tag: u64,
}

/// Largest tag a [`Token`] can carry.
pub const TAG_MAX: u64 = (1 << 48) - 1;

impl Token {
    /// Makes a token; `tag` is truncated to 48 bits.
    pub const fn new(kind: u8, index: u8, tag: u64) -> Self {
        Self {
            kind,
            index,
            tag: tag & TAG_MAX,
        }
    }

    /// The `user_data` carried through the ring.
    pub const fn to_u64(self) -> u64 {
        ((self.kind as u64) << 56) | ((self.index as u64) << 48) | self.tag
    }

    /// Recovers a token from a completion's `user_data`.
    pub const fn from_u64(v: u64) -> Self {
        Self {
            kind: (v >> 56) as u8,
            index: (v >> 48) as u8,
            tag: v & TAG_MAX,
        }
    }
}

/// One completed operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Whose operation it was.
    pub token: Token,
    /// The CQE result: bytes transferred, or a negative errno.
    pub result: i32,
}

/// The ring and the count of operations the kernel still holds.
pub struct EventLoop {
    ring: IoUring,
    in_flight: usize,
    deferred_taskrun: bool,
    /// The kernel can wait for a batch with a bounded delay (6.12+).
    min_timeout: bool,
    /// Token kinds whose operations are disk I/O, for batching.
    batch_kinds: u64,
    /// Disk I/O operations in the kernel.
    batch_in_flight: usize,
}

/// While this many disk operations are in flight, a turn waits up to
/// [`BATCH_WAIT_US`] for more of them to finish before returning.
pub const BATCH_THRESHOLD: usize = 4;
/// Longest extra wait for a batch: interrupt coalescing, traded for one
/// `io_uring_enter` (and one guest interrupt) per batch instead of per
/// completion. Below [`BATCH_THRESHOLD`] a turn returns at the first
/// completion, so light loads see no added latency.
pub const BATCH_WAIT_US: u32 = 10;

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("in_flight", &self.in_flight)
            .field("deferred_taskrun", &self.deferred_taskrun)
            .finish()
    }
}

impl EventLoop {
    /// Creates the ring, with `SINGLE_ISSUER | DEFER_TASKRUN` when the
    /// kernel supports them (6.1+), plain otherwise.
    pub fn new() -> io::Result<Self> {
        let tuned = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 2)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_r_disabled()
            .build(RING_ENTRIES);
        let (ring, deferred_taskrun) = match tuned {
            Ok(ring) => (ring, true),
            Err(e) => {
                log::debug!("io_uring without DEFER_TASKRUN ({e})");
                (
                    IoUring::builder()
                        .setup_cqsize(RING_ENTRIES * 2)
                        .setup_r_disabled()
                        .build(RING_ENTRIES)?,
                    false,
                )
            }
        };
        crate::ring_lockdown::restrict_and_enable(&ring)?;
        let min_timeout = ring.params().is_feature_min_timeout();
        Ok(Self {
            ring,
            in_flight: 0,
            deferred_taskrun,
            min_timeout,
            batch_kinds: 0,
            batch_in_flight: 0,
        })
    }

    /// Whether completions run only when this thread waits (DEFER_TASKRUN).
    pub fn deferred_taskrun(&self) -> bool {
        self.deferred_taskrun
    }

    /// How many operations the kernel still holds.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues `entry` tagged with `token`; it is submitted on the next turn
    /// (or now, if the submission queue is full).
    ///
    /// # Safety
    ///
    /// Every buffer and iovec array `entry` points at must stay valid and
    /// unmoved until its completion is returned by [`EventLoop::turn`] (or
    /// the ring is dropped, which waits for all of them).
    pub unsafe fn push(&mut self, entry: squeue::Entry, token: Token) -> io::Result<()> {
        let entry = entry.user_data(token.to_u64());
        loop {
            // SAFETY: the caller guarantees the entry's buffers outlive it.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.in_flight += 1;
                return Ok(());
            }
            // Full: hand what is queued to the kernel and try again.
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full: drain it into the
                    // caller's next turn by waiting is not possible here,
                    // so report back-pressure.
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Counts operations of token `kind` (below 64) as disk I/O: while
    /// many are in flight, turns wait briefly to complete them in batches.
    pub fn batch_kind(&mut self, kind: u8) {
        if kind < 64 {
            self.batch_kinds |= 1 << kind;
        }
    }

    fn is_batched(&self, token: Token) -> bool {
        token.kind < 64 && self.batch_kinds & (1 << token.kind) != 0
    }

    /// How many completions the next turn waits for, and how long at most
    /// before it settles for one.
    fn wait_plan(&self) -> Option<(usize, u32)> {
        if !self.min_timeout || self.batch_in_flight < BATCH_THRESHOLD {
            return None;
        }
        Some(((self.batch_in_flight / 4).clamp(2, 64), BATCH_WAIT_US))
    }

    /// One loop turn: submits everything queued, waits for at least one
    /// completion (for a batch, briefly, when much disk I/O is in flight),
    /// and appends all available completions to `out`.
    pub fn turn(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        let entered = match self.wait_plan() {
            Some((want, wait_us)) => {
                let args = types::SubmitArgs::new().min_wait_usec(wait_us);
                self.ring.submitter().submit_with_args(want, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match entered {
            Ok(_) => {}
            // A signal interrupted the wait, or the completion queue is
            // full: either way, collect what is there below.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::ETIME)
                ) => {}
            Err(e) => return Err(e),
        }
        let first = out.len();
        for cqe in self.ring.completion() {
            if io_uring::cqueue::more(cqe.flags()) {
                // Multishot: the operation stays armed.
            } else {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            out.push(Completion {
                token: Token::from_u64(cqe.user_data()),
                result: cqe.result(),
            });
        }
        let done = out[first..]
            .iter()
            .filter(|c| self.is_batched(c.token))
            .count();
        self.batch_in_flight = self.batch_in_flight.saturating_sub(done);
        Ok(())
    }
}

impl EventLoop {
    /// Arms an 8-byte read of eventfd `fd` into `buf`: its completion says
    /// the counter was non-zero (and resets it), with no extra syscall.
    ///
    /// # Safety
    ///
    /// `buf` must stay valid and unmoved until the read completes or the
    /// ring is dropped.
    pub unsafe fn arm_eventfd(
        &mut self,
        fd: RawFd,
        buf: *mut [u8; 8],
        token: Token,
    ) -> io::Result<()> {
        let read = opcode::Read::new(types::Fd(fd), buf.cast::<u8>(), 8).build();
        // SAFETY: the caller keeps `buf` alive until completion.
        unsafe { self.push(read, token) }
    }
}

impl EventLoop {
    /// Asks the kernel to cancel the operation tagged `target`; the
    /// cancel's own completion comes back tagged `token`.
    pub fn cancel(&mut self, target: Token, token: Token) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target.to_u64()).build();
        // SAFETY: a cancel points at no buffer.
        unsafe { self.push(entry, token) }
    }

    /// Arms a one-shot POLLIN on `fd`.
    pub fn poll_readable(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
        // SAFETY: a poll points at no buffer.
        unsafe { self.push(entry, token) }
    }
}

/// A device's view of the ring: its operations are tagged with its source
/// kind and index, so their completions find their way back to it.
#[derive(Debug)]
pub struct DeviceIo<'a> {
    ring: &'a mut EventLoop,
    kind: u8,
    index: u8,
}

impl<'a> DeviceIo<'a> {
    /// Submissions from device `index` of `kind`.
    pub fn new(ring: &'a mut EventLoop, kind: u8, index: u8) -> Self {
        Self { ring, kind, index }
    }
}

/// Builds the SQE for one device operation. The iovec arrays and guest
/// buffers are used in place: io_uring reads and writes guest memory
/// directly.
fn sqe_for(op: IoOp) -> squeue::Entry {
    match op {
        IoOp::Readv {
            fd,
            iovecs,
            iovcnt,
            offset,
        } => opcode::Readv::new(types::Fd(fd), iovecs, iovcnt)
            .offset(offset)
            .build(),
        IoOp::Writev {
            fd,
            iovecs,
            iovcnt,
            offset,
        } => opcode::Writev::new(types::Fd(fd), iovecs, iovcnt)
            .offset(offset)
            .build(),
        IoOp::Fsync { fd, datasync } => {
            let flags = if datasync {
                types::FsyncFlags::DATASYNC
            } else {
                types::FsyncFlags::empty()
            };
            opcode::Fsync::new(types::Fd(fd)).flags(flags).build()
        }
        IoOp::Fallocate {
            fd,
            mode,
            offset,
            len,
        } => opcode::Fallocate::new(types::Fd(fd), len)
            .offset(offset)
            .mode(mode)
            .build(),
    }
}

impl IoSubmit for DeviceIo<'_> {
    unsafe fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), IoSubmitError> {
        if tag > TAG_MAX {
            return Err(IoSubmitError::BadTag(tag));
        }
        let token = Token::new(self.kind, self.index, tag);
        // SAFETY: the device's contract (IoSubmit::submit is unsafe) is that
        // the iovecs and buffers stay valid until this tag completes.
        unsafe { self.ring.push(sqe_for(op), token) }.map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                IoSubmitError::QueueFull
            } else {
                IoSubmitError::Io(e)
            }
        })?;
        if self.ring.is_batched(token) {
            self.ring.batch_in_flight += 1;
        }
        Ok(())
    }
}

impl Drop for EventLoop {
    /// Cancels everything still in the kernel and waits for it, so no
    /// operation can write into a buffer after its owner freed it.
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        let cancel = io_uring::opcode::AsyncCancel2::new(io_uring::types::CancelBuilder::any())
            .build()
            .user_data(u64::MAX);
        // SAFETY: the cancel operation points at no buffer.
        if unsafe { self.ring.submission().push(&cancel) }.is_err() {
            let _ = self.ring.submit();
            // SAFETY: as above.
            let _ = unsafe { self.ring.submission().push(&cancel) };
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.in_flight > 0 && std::time::Instant::now() < deadline {
            let ts = io_uring::types::Timespec::new().nsec(50_000_000);
            let args = io_uring::types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            for cqe in self.ring.completion() {
                if cqe.user_data() != u64::MAX && !io_uring::cqueue::more(cqe.flags()) {
                    self.in_flight = self.in_flight.saturating_sub(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{opcode, types};
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn batching_waits_only_under_load() {
        let mut ring = EventLoop::new().unwrap();
        ring.batch_kind(7);
        assert!(ring.is_batched(Token::new(7, 0, 1)));
        assert!(!ring.is_batched(Token::new(8, 0, 1)));
        ring.batch_in_flight = BATCH_THRESHOLD - 1;
        assert_eq!(
            ring.wait_plan(),
            None,
            "light load: first completion ends the turn"
        );
        ring.batch_in_flight = 32;
        if ring.min_timeout {
            assert_eq!(ring.wait_plan(), Some((8, BATCH_WAIT_US)));
        } else {
            assert_eq!(ring.wait_plan(), None, "kernel without min-timeout");
        }
    }

    #[test]
    fn tokens_round_trip() {
        let t = Token::new(3, 200, 0xdead_beef_cafe);
        assert_eq!(Token::from_u64(t.to_u64()), t);
        assert_eq!(Token::new(1, 1, u64::MAX).tag, TAG_MAX);
    }

    #[test]
    fn an_eventfd_read_completes_with_its_token() {
        let mut ring = EventLoop::new().unwrap();
        let evt = EventFd::new(0).unwrap();
        let mut buf = [0u8; 8];
        let read = opcode::Read::new(types::Fd(evt_fd(&evt)), buf.as_mut_ptr(), 8).build();
        // SAFETY: `buf` outlives the operation: we wait for its completion below.
        unsafe { ring.push(read, Token::new(1, 2, 3)) }.unwrap();
        evt.write(5).unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            ring.turn(&mut out).unwrap();
        }
        assert_eq!(out[0].token, Token::new(1, 2, 3));
        assert_eq!(out[0].result, 8);
        assert_eq!(u64::from_ne_bytes(buf), 5);
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn dropping_the_ring_cancels_pending_reads() {
        let mut ring = EventLoop::new().unwrap();
        let evt = EventFd::new(0).unwrap();
        let mut buf = [0u8; 8];
        let read = opcode::Read::new(types::Fd(evt_fd(&evt)), buf.as_mut_ptr(), 8).build();
        // SAFETY: the ring is dropped (and waits for the cancel) before `buf`.
        unsafe { ring.push(read, Token::new(1, 0, 0)) }.unwrap();
        let mut out = Vec::new();
        // Submit without blocking forever: a timeout completes the turn.
        let ts = types::Timespec::new().nsec(1_000_000);
        let timeout = opcode::Timeout::new(&ts).build();
        // SAFETY: `ts` outlives the turn below, which completes the timeout.
        unsafe { ring.push(timeout, Token::new(2, 0, 0)) }.unwrap();
        ring.turn(&mut out).unwrap();
        assert_eq!(ring.in_flight(), 1);
        drop(ring);
    }

    fn evt_fd(e: &EventFd) -> i32 {
        use std::os::fd::AsRawFd;
        e.as_raw_fd()
    }
}
