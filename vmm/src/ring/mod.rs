//! The VMM thread's one io_uring ring.
//!
//! Every event source the VMM thread owns (eventfds from vCPUs and devices,
//! ioeventfd kicks, stdin, signals, timers) and every device I/O request is
//! an operation on this ring, tagged with a [`Token`] (`token.rs`, the one
//! list of sources); `slot.rs` serves any virtio device on it. One turn of the loop
//! is one `io_uring_enter`: it submits what the last turn queued and waits
//! for at least one completion. The ring is created `SINGLE_ISSUER |
//! DEFER_TASKRUN` where the kernel has them, so completions are only run
//! when this thread asks for them, in one batch, and is limited to the
//! opcodes ringvm uses (`lockdown.rs`).

use std::io;
use std::os::fd::RawFd;

use devices::io::{IoOp, IoSubmit, IoSubmitError, TAG_MAX};
use io_uring::{opcode, squeue, types, IoUring};

pub mod lockdown;
pub mod slot;
mod token;

pub use slot::{DeviceSlot, VirtioDevices};
pub use token::Token;

/// Ring size; completions get twice as many slots so a burst of I/O never
/// overflows the completion queue.
pub const RING_ENTRIES: u32 = 256;

/// One completed operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Whose operation it was.
    pub token: Token,
    /// The CQE result: bytes transferred, or a negative errno.
    pub result: i32,
}

/// The ring and the count of operations the kernel still holds.
pub struct Ring {
    ring: IoUring,
    in_flight: usize,
    deferred_taskrun: bool,
    /// The kernel can wait for a batch with a bounded delay (6.12+).
    min_timeout: bool,
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

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.in_flight)
            .field("deferred_taskrun", &self.deferred_taskrun)
            .finish()
    }
}

impl Ring {
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
        lockdown::restrict_and_enable(&ring)?;
        let min_timeout = ring.params().is_feature_min_timeout();
        Ok(Self {
            ring,
            in_flight: 0,
            deferred_taskrun,
            min_timeout,
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
    /// unmoved until its completion is returned by [`Ring::turn`] (or
    /// the ring is dropped, which waits for all of them).
    pub unsafe fn push(&mut self, entry: squeue::Entry, token: Token) -> io::Result<()> {
        let entry = entry.user_data(token.encode());
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

    /// How many completions the next turn waits for, and how long at most
    /// before it settles for one.
    fn wait_plan(&self) -> Option<(usize, u32)> {
        if !self.min_timeout || self.batch_in_flight < BATCH_THRESHOLD {
            return None;
        }
        Some(((self.batch_in_flight / 4).clamp(2, 64), BATCH_WAIT_US))
    }

    /// One loop turn: submits everything queued, waits for at least one
    /// completion (for a batch, briefly, when much disk I/O is in flight)
    /// unless `wait` is false (work is pending without any op to wait
    /// for), and appends all available completions to `out`.
    pub fn turn(&mut self, out: &mut Vec<Completion>, wait: bool) -> io::Result<()> {
        let entered = match self.wait_plan() {
            _ if !wait => self.ring.submit(),
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
                token: Token::decode(cqe.user_data()),
                result: cqe.result(),
            });
        }
        let done = out[first..].iter().filter(|c| c.token.is_batched()).count();
        self.batch_in_flight = self.batch_in_flight.saturating_sub(done);
        Ok(())
    }
}

impl Ring {
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

impl Ring {
    /// Asks the kernel to cancel the operation tagged `target`; the
    /// cancel's own completion comes back tagged `token`.
    pub fn cancel(&mut self, target: Token, token: Token) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target.encode()).build();
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

/// A device's view of the ring: its operations are tagged with its slot
/// index, so their completions find their way back to it.
#[derive(Debug)]
pub struct DeviceIo<'a> {
    ring: &'a mut Ring,
    device: u8,
    batched: bool,
}

impl<'a> DeviceIo<'a> {
    /// Submissions from the device in slot `device`; `batched` counts them
    /// as disk I/O (see [`devices::virtio::VirtioDevice::batch_completions`]).
    pub fn new(ring: &'a mut Ring, device: u8, batched: bool) -> Self {
        Self {
            ring,
            device,
            batched,
        }
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
        IoOp::Poll { fd, events } => opcode::PollAdd::new(types::Fd(fd), events).build(),
    }
}

impl IoSubmit for DeviceIo<'_> {
    unsafe fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), IoSubmitError> {
        if tag > TAG_MAX {
            return Err(IoSubmitError::BadTag(tag));
        }
        let token = Token::DeviceIo {
            device: self.device,
            tag,
            batched: self.batched,
        };
        // SAFETY: the device's contract (IoSubmit::submit is unsafe) is that
        // the iovecs and buffers stay valid until this tag completes.
        unsafe { self.ring.push(sqe_for(op), token) }.map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                IoSubmitError::QueueFull
            } else {
                IoSubmitError::Io(e)
            }
        })?;
        if self.batched {
            self.ring.batch_in_flight += 1;
        }
        Ok(())
    }
}

impl Drop for Ring {
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
        let mut ring = Ring::new().unwrap();
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
    fn an_eventfd_read_completes_with_its_token() {
        let mut ring = Ring::new().unwrap();
        let evt = EventFd::new(0).unwrap();
        let mut buf = [0u8; 8];
        let read = opcode::Read::new(types::Fd(evt_fd(&evt)), buf.as_mut_ptr(), 8).build();
        // SAFETY: `buf` outlives the operation: we wait for its completion below.
        unsafe { ring.push(read, Token::Stdin) }.unwrap();
        evt.write(5).unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            ring.turn(&mut out, true).unwrap();
        }
        assert_eq!(out[0].token, Token::Stdin);
        assert_eq!(out[0].result, 8);
        assert_eq!(u64::from_ne_bytes(buf), 5);
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn dropping_the_ring_cancels_pending_reads() {
        let mut ring = Ring::new().unwrap();
        let evt = EventFd::new(0).unwrap();
        let mut buf = [0u8; 8];
        let read = opcode::Read::new(types::Fd(evt_fd(&evt)), buf.as_mut_ptr(), 8).build();
        // SAFETY: the ring is dropped (and waits for the cancel) before `buf`.
        unsafe { ring.push(read, Token::Stdin) }.unwrap();
        let mut out = Vec::new();
        // Submit without blocking forever: a timeout completes the turn.
        let ts = types::Timespec::new().nsec(1_000_000);
        let timeout = opcode::Timeout::new(&ts).build();
        // SAFETY: `ts` outlives the turn below, which completes the timeout.
        unsafe { ring.push(timeout, Token::HaltProbe) }.unwrap();
        ring.turn(&mut out, true).unwrap();
        assert_eq!(ring.in_flight(), 1);
        drop(ring);
    }

    fn evt_fd(e: &EventFd) -> i32 {
        use std::os::fd::AsRawFd;
        e.as_raw_fd()
    }
}
