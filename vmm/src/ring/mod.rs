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

use devices::io::{IoHint, IoOp, IoSubmit, IoSubmitError, TAG_MAX};
use io_uring::{opcode, squeue, types, IoUring};

pub mod batch;
pub mod irq;
pub mod lockdown;
pub mod poll;
pub mod slot;
mod token;

use batch::{BatchWait, BATCH_TIMEOUT_NS};
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
    /// The kernel can wait with a timeout (IORING_FEAT_EXT_ARG, 5.11+).
    timed_wait: bool,
    /// Disk operations in the kernel (`batch.rs`).
    batch: BatchWait,
    /// The kernel posts no completion for a successful operation flagged
    /// `IOSQE_CQE_SKIP_SUCCESS` (IORING_FEAT_CQE_SKIP, 5.17+), so an
    /// interrupt write can ride along a waiting enter (`irq.rs`).
    skip_success: bool,
}

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
            .setup_taskrun_flag()
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
        let timed_wait = ring.params().is_feature_ext_arg();
        let skip_success = ring.params().is_feature_skip_cqe_on_success();
        Ok(Self {
            ring,
            in_flight: 0,
            deferred_taskrun,
            timed_wait,
            batch: BatchWait::default(),
            skip_success,
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

    /// Whether successful operations can be submitted without a completion
    /// (see [`Self::signal_eventfd`]).
    pub fn skips_success(&self) -> bool {
        self.skip_success
    }

    /// Queues an 8-byte write of `value` to eventfd `fd` for the next
    /// enter, posting a completion (tagged `token`) only if it fails, and
    /// not counted in [`Self::in_flight`]: nothing of the caller's is
    /// borrowed and a successful one is never seen again. `false`: not
    /// queued (the kernel cannot skip completions, or the submission
    /// queue is full), write the eventfd directly.
    pub fn signal_eventfd(&mut self, fd: RawFd, value: &'static u64, token: Token) -> bool {
        if !self.skip_success {
            return false;
        }
        let entry = opcode::Write::new(types::Fd(fd), std::ptr::from_ref(value).cast::<u8>(), 8)
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(token.encode());
        // SAFETY: the one buffer is `value`, which is 'static.
        unsafe { self.ring.submission().push(&entry) }.is_ok()
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

    /// Whether a turn would find completions without sleeping: the kernel
    /// posted some, or holds finished work for this thread that posts
    /// some on the next enter (DEFER_TASKRUN's `IORING_SQ_TASKRUN`). Read
    /// from the shared ring memory: no syscall.
    pub fn completions_ready(&mut self) -> bool {
        !self.ring.completion().is_empty() || self.ring.submission().taskrun()
    }

    /// Whether operations are queued that no `io_uring_enter` handed to
    /// the kernel yet.
    pub fn has_queued(&mut self) -> bool {
        !self.ring.submission().is_empty()
    }

    /// Whether the next sleeping turn waits for a batch of disk
    /// completions (`batch.rs`): many slow operations are in flight, and
    /// collecting them together beats reacting to each one.
    pub fn waits_for_batch(&self) -> bool {
        self.wait_plan().is_some()
    }

    /// Hands the queued operations to the kernel now, without waiting.
    pub fn flush(&mut self) -> io::Result<()> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// How many completions the next turn waits for (at most
    /// [`BATCH_TIMEOUT_NS`]); `None`: the first one.
    fn wait_plan(&self) -> Option<usize> {
        self.batch.want().filter(|_| self.timed_wait)
    }

    /// One loop turn: submits everything queued, waits for at least one
    /// completion (for a batch when much disk I/O is in flight, see
    /// `batch.rs`) unless `wait` is false (work is pending without any op
    /// to wait for), and appends all available completions to `out`.
    pub fn turn(&mut self, out: &mut Vec<Completion>, wait: bool) -> io::Result<()> {
        let entered = match self.wait_plan() {
            // Nothing to hand over and no deferred work to run: the
            // completions already posted are read without a syscall.
            _ if !wait && !self.has_queued() && !self.ring.submission().taskrun() => Ok(0),
            _ if !wait => self.ring.submit(),
            Some(want) => {
                let timeout = types::Timespec::new().nsec(BATCH_TIMEOUT_NS);
                let args = types::SubmitArgs::new().timespec(&timeout);
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
            let token = Token::decode(cqe.user_data());
            if counted(token, cqe.flags()) {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            out.push(Completion {
                token,
                result: cqe.result(),
            });
        }
        let done = out[first..].iter().filter(|c| c.token.is_batched()).count();
        self.batch.completed(done);
        Ok(())
    }
}

/// Whether a completion ends an operation [`Ring::in_flight`] counts: not
/// a multishot's intermediate one, and not a failed interrupt write, which
/// was never counted ([`Ring::signal_eventfd`]).
fn counted(token: Token, flags: u32) -> bool {
    !io_uring::cqueue::more(flags) && !matches!(token, Token::Interrupt { .. })
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

/// The one buffer of a one-element iovec array, when its length fits the
/// non-vectored opcodes' `u32`. A 4 KiB block request or a 1514-byte frame
/// is usually one buffer, and `IORING_OP_READ`/`WRITE` skip the kernel's
/// import of the iovec array (a copy from user memory and its checks) that
/// `READV`/`WRITEV` pay on every operation; the result is the same.
fn single_buffer(iovecs: *const libc::iovec, iovcnt: u32) -> Option<(*mut libc::c_void, u32)> {
    if iovcnt != 1 || iovecs.is_null() {
        return None;
    }
    // SAFETY: the submitter guarantees `iovecs` points at `iovcnt` (here
    // one) valid iovecs until the operation completes (IoSubmit::submit's
    // contract); it is read here, before submission.
    let iov = unsafe { iovecs.read() };
    let len = u32::try_from(iov.iov_len).ok()?;
    Some((iov.iov_base, len))
}

/// Builds the SQE for one device operation. The iovec arrays and guest
/// buffers are used in place: io_uring reads and writes guest memory
/// directly. [`IoHint::Async`] sets `IOSQE_ASYNC` (the one SQE flag the
/// lockdown allows).
fn sqe_for(op: IoOp, hint: IoHint) -> squeue::Entry {
    let entry = match op {
        IoOp::Readv {
            fd,
            iovecs,
            iovcnt,
            offset,
        } => match single_buffer(iovecs, iovcnt) {
            Some((buf, len)) => opcode::Read::new(types::Fd(fd), buf.cast::<u8>(), len)
                .offset(offset)
                .build(),
            None => opcode::Readv::new(types::Fd(fd), iovecs, iovcnt)
                .offset(offset)
                .build(),
        },
        IoOp::Writev {
            fd,
            iovecs,
            iovcnt,
            offset,
        } => match single_buffer(iovecs, iovcnt) {
            Some((buf, len)) => {
                opcode::Write::new(types::Fd(fd), buf.cast::<u8>().cast_const(), len)
                    .offset(offset)
                    .build()
            }
            None => opcode::Writev::new(types::Fd(fd), iovecs, iovcnt)
                .offset(offset)
                .build(),
        },
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
    };
    match hint {
        IoHint::Inline => entry,
        IoHint::Async => entry.flags(squeue::Flags::ASYNC),
    }
}

impl IoSubmit for DeviceIo<'_> {
    unsafe fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), IoSubmitError> {
        // SAFETY: the caller keeps submit's contract.
        unsafe { self.submit_hinted(op, tag, IoHint::Inline) }
    }

    unsafe fn submit_hinted(
        &mut self,
        op: IoOp,
        tag: u64,
        hint: IoHint,
    ) -> Result<(), IoSubmitError> {
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
        unsafe { self.ring.push(sqe_for(op, hint), token) }.map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                IoSubmitError::QueueFull
            } else {
                IoSubmitError::Io(e)
            }
        })?;
        if self.batched {
            self.ring.batch.submitted();
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
                if cqe.user_data() != u64::MAX
                    && counted(Token::decode(cqe.user_data()), cqe.flags())
                {
                    self.in_flight = self.in_flight.saturating_sub(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    use io_uring::{opcode, types};
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn batching_waits_only_under_disk_load() {
        let mut ring = Ring::new().unwrap();
        for _ in 0..batch::BATCH_THRESHOLD - 1 {
            ring.batch.submitted();
        }
        assert_eq!(
            ring.wait_plan(),
            None,
            "light load: first completion ends the turn"
        );
        for _ in 0..29 {
            ring.batch.submitted();
        }
        assert_eq!(ring.wait_plan(), Some(8));
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

    /// Runs one device op through `DeviceIo` and returns its result.
    fn device_op(ring: &mut Ring, op: IoOp) -> i32 {
        let mut io = DeviceIo::new(ring, 0, false);
        // SAFETY: the caller's iovecs and buffers outlive this call, which
        // waits for the op's completion.
        unsafe { io.submit(op, 7) }.unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            ring.turn(&mut out, true).unwrap();
        }
        out[0].result
    }

    #[test]
    fn one_and_many_buffer_ops_read_and_write_at_their_offsets() {
        let file = tempfile_with(&[0u8; 64]);
        let fd = file.as_raw_fd();
        let mut ring = Ring::new().unwrap();
        let mut one = *b"abcd";
        let (mut a, mut b) = (*b"xy", *b"z");
        let single = [iov(&mut one)];
        let pair = [iov(&mut a), iov(&mut b)];
        let w1 = IoOp::Writev {
            fd,
            iovecs: single.as_ptr(),
            iovcnt: 1,
            offset: 8,
        };
        assert_eq!(device_op(&mut ring, w1), 4);
        let w2 = IoOp::Writev {
            fd,
            iovecs: pair.as_ptr(),
            iovcnt: 2,
            offset: 20,
        };
        assert_eq!(device_op(&mut ring, w2), 3);
        let mut back = [0u8; 16];
        let whole = [iov(&mut back)];
        let r = IoOp::Readv {
            fd,
            iovecs: whole.as_ptr(),
            iovcnt: 1,
            offset: 8,
        };
        assert_eq!(device_op(&mut ring, r), 16);
        assert_eq!(&back, b"abcd\0\0\0\0\0\0\0\0xyz\0");
        let (mut c, mut d) = ([0u8; 2], [0u8; 2]);
        let split = [iov(&mut c), iov(&mut d)];
        let r2 = IoOp::Readv {
            fd,
            iovecs: split.as_ptr(),
            iovcnt: 2,
            offset: 9,
        };
        assert_eq!(device_op(&mut ring, r2), 4);
        assert_eq!((&c, &d), (b"bc", b"d\0"));
    }

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    fn tempfile_with(bytes: &[u8]) -> std::fs::File {
        use std::io::Write;
        let dir = std::env::temp_dir();
        let path = dir.join(format!("ringvm-ring-test-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f.write_all(bytes).unwrap();
        f
    }

    fn evt_fd(e: &EventFd) -> i32 {
        use std::os::fd::AsRawFd;
        e.as_raw_fd()
    }
}
