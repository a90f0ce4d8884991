//! The narrow interface between devices and the VMM thread's io_uring ring.
//!
//! A device never owns the ring: it describes one operation as an [`IoOp`],
//! hands it to an [`IoSubmit`] with a tag it chose, and later receives the
//! operation's result back through its own `complete(tag, result)` method,
//! called by the VMM's event loop when the matching CQE arrives. Keeping the
//! ring behind this trait is what lets every device be tested with a fake
//! (see [`fake`]) on machines without io_uring, and proves in tests that a
//! rejected request never reaches the kernel.
//!
//! Interrupts leave devices the same way, through [`InterruptLine`], so this
//! crate never names KVM: the VMM registers the eventfd as an irqfd.

use std::io;
use std::os::fd::RawFd;

use vmm_sys_util::eventfd::EventFd;

/// Number of tag bits a device may use; the ring keeps the bits above for
/// its own routing (which device, which kind of event).
pub const TAG_BITS: u32 = 48;

/// Largest tag a device may pass to [`IoSubmit::submit`].
pub const TAG_MAX: u64 = (1 << TAG_BITS) - 1;

/// One host I/O operation, in the terms io_uring's opcodes take.
///
/// Pointer-carrying variants point into memory the *device* keeps alive (see
/// the contract on [`IoSubmit::submit`]); the op itself is plain data so it
/// can be recorded, compared and replayed by fakes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// `preadv(fd, iovecs, iovcnt, offset)`: fill guest buffers from a file.
    Readv {
        /// File to read.
        fd: RawFd,
        /// First element of an array of `iovcnt` iovecs.
        iovecs: *const libc::iovec,
        /// Number of iovecs; at most [`IOV_MAX`].
        iovcnt: u32,
        /// Byte offset in the file.
        offset: u64,
    },
    /// `pwritev(fd, iovecs, iovcnt, offset)`: store guest buffers in a file.
    Writev {
        /// File to write.
        fd: RawFd,
        /// First element of an array of `iovcnt` iovecs.
        iovecs: *const libc::iovec,
        /// Number of iovecs; at most [`IOV_MAX`].
        iovcnt: u32,
        /// Byte offset in the file.
        offset: u64,
    },
    /// `fsync`/`fdatasync`: make earlier completed writes durable.
    Fsync {
        /// File to sync.
        fd: RawFd,
        /// Use `fdatasync` semantics (skip metadata not needed to read the data back).
        datasync: bool,
    },
    /// `fallocate(fd, mode, offset, len)`: punch holes or zero ranges.
    Fallocate {
        /// File to change.
        fd: RawFd,
        /// `FALLOC_FL_*` flags.
        mode: i32,
        /// Byte offset in the file.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A one-shot `poll(fd, events)`: completes with the ready events
    /// (`revents`, never 0) once any of `events` is ready. Devices that
    /// serve many host sockets (virtio-vsock) wait for each one's
    /// readiness with it, tagged like any other op, instead of parking a
    /// read (and the guest buffer it would hold) on an idle socket.
    Poll {
        /// The fd to watch.
        fd: RawFd,
        /// `POLLIN`, `POLLOUT`, ... (`POLLERR`/`POLLHUP` always count).
        events: u32,
    },
    /// A multishot read (`IORING_OP_READ_MULTISHOT`): stays armed on
    /// `fd` and, each time it is readable, reads into a buffer the kernel
    /// takes from buffer group `group` (a [`crate::buf_ring::BufRing`]
    /// the VMM registered), completing once per read with the buffer's id
    /// and the "more" flag ([`Selected`]), until the group runs dry
    /// (`-ENOBUFS`), an error, or a cancel ends it.
    ReadMulti {
        /// The file to read (a tap: one frame per read).
        fd: RawFd,
        /// The buffer group.
        group: u16,
    },
}

/// What a completion says beyond its result, for ops that select their
/// buffer or complete more than once ([`IoOp::ReadMulti`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Selected {
    /// The id of the provided buffer the kernel filled (and consumed).
    pub buffer: Option<u16>,
    /// The op stays armed: more completions will follow.
    pub more: bool,
}

/// How the ring should start an op. io_uring first tries a read or write
/// on the submitting thread without blocking and, when the file cannot do
/// it that way (tmpfs, buffered ext4 writes), hands it to an io-wq worker:
/// for such files the first attempt is wasted work on the VMM thread, and
/// the op then waits behind the one worker that picked it up. `Async`
/// (`IOSQE_ASYNC`) sends it to io-wq at once, where several workers can
/// run ops side by side. Only the device knows its file well enough to
/// choose (see `virtio::block`); a wrong hint costs speed, never
/// correctness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoHint {
    /// Let io_uring try it on the submitting thread first.
    #[default]
    Inline,
    /// Go straight to an io-wq worker.
    Async,
}

/// Largest iovec count the kernel accepts in one vectored operation
/// (`UIO_MAXIOV`); devices must split or refuse above it.
pub const IOV_MAX: usize = 1024;

/// Why an operation could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum IoSubmitError {
    /// No room in the submission queue right now; the device should stop
    /// popping requests and try again after completions arrive.
    #[error("io submission queue is full")]
    QueueFull,
    /// The tag does not fit in [`TAG_BITS`].
    #[error("io tag {0:#x} does not fit in 48 bits")]
    BadTag(u64),
    /// The op itself is malformed (e.g. too many iovecs).
    #[error("io operation refused: {0}")]
    BadOp(&'static str),
    /// The ring refused the operation for another reason.
    #[error("io submission failed: {0}")]
    Io(#[source] io::Error),
}

/// Somewhere to send host I/O: the VMM's ring, or a fake in tests.
///
/// The submitter later calls the device's `complete(tag, result)` exactly
/// once per accepted operation, where `result` is the CQE's `res` (bytes
/// transferred, `0`, or `-errno`). Completions may arrive in any order.
pub trait IoSubmit {
    /// Queues `op`; its completion will carry `tag` (`tag <= TAG_MAX`).
    ///
    /// # Safety
    ///
    /// The kernel reads the iovec array and reads or writes the buffers it
    /// describes asynchronously, after this call returns. The caller must
    /// keep the iovec array (`iovecs`, `iovcnt` elements) and every buffer it
    /// points to valid, unmoved and otherwise unaliased for writing until the
    /// completion for `tag` has been delivered, and must keep `fd` open until
    /// then. If this returns an error the operation was not queued and
    /// nothing is retained.
    unsafe fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), IoSubmitError>;

    /// [`Self::submit`] with a hint on how to start the op; submitters
    /// that have no choice to make (fakes, tests) ignore it.
    ///
    /// # Safety
    ///
    /// As for [`Self::submit`].
    unsafe fn submit_hinted(
        &mut self,
        op: IoOp,
        tag: u64,
        hint: IoHint,
    ) -> Result<(), IoSubmitError> {
        let _ = hint;
        // SAFETY: the caller keeps submit's contract.
        unsafe { self.submit(op, tag) }
    }
}

/// An interrupt wire from a device to the guest.
///
/// Implemented for [`EventFd`], which the VMM registers with KVM as an
/// irqfd; devices only ever see this trait.
pub trait InterruptLine: Send {
    /// Asserts the interrupt (edge: one signal, one guest interrupt).
    fn signal(&self) -> io::Result<()>;
}

impl InterruptLine for EventFd {
    fn signal(&self) -> io::Result<()> {
        self.write(1)
    }
}

/// Fakes for tests of devices and of the VMM: an [`IoSubmit`] that records,
/// one that executes synchronously on real files, one that panics, and an
/// [`InterruptLine`] that counts.
#[cfg(any(test, feature = "test-utils"))]
pub mod fake {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Records every operation and never completes any; the test decides
    /// when (and in which order) to deliver completions.
    #[derive(Debug, Default)]
    pub struct RecordingIo {
        /// Submitted ops with their tags, oldest first.
        pub ops: Vec<(IoOp, u64)>,
        /// When set, the next submit fails with [`IoSubmitError::QueueFull`].
        pub full: bool,
        /// Tags submitted with [`IoHint::Async`], oldest first.
        pub async_tags: Vec<u64>,
    }

    impl IoSubmit for RecordingIo {
        unsafe fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), IoSubmitError> {
            if tag > TAG_MAX {
                return Err(IoSubmitError::BadTag(tag));
            }
            if self.full {
                return Err(IoSubmitError::QueueFull);
            }
            self.ops.push((op, tag));
            Ok(())
        }

        unsafe fn submit_hinted(
            &mut self,
            op: IoOp,
            tag: u64,
            hint: IoHint,
        ) -> Result<(), IoSubmitError> {
            // SAFETY: the caller keeps submit's contract.
            unsafe { self.submit(op, tag) }?;
            if hint == IoHint::Async {
                self.async_tags.push(tag);
            }
            Ok(())
        }
    }

    /// Runs each operation at once with the matching blocking syscall and
    /// keeps `(tag, result)` for the test to hand back, so data really moves
    /// between a file and guest memory.
    #[derive(Debug, Default)]
    pub struct ExecutingIo {
        /// Ops as submitted, with their tags.
        pub ops: Vec<(IoOp, u64)>,
        /// Completions not yet delivered, oldest first.
        pub done: Vec<(u64, i32)>,
        /// Polls whose fd was not ready yet: `(fd, events, tag)`, checked
        /// again by every [`Self::take_completions`].
        pub parked_polls: Vec<(RawFd, u32, u64)>,
    }

    impl ExecutingIo {
        /// Takes every pending completion, oldest first, after checking
        /// the parked polls once more (a poll completes when its fd is
        /// ready, as on the ring).
        pub fn take_completions(&mut self) -> Vec<(u64, i32)> {
            let parked = std::mem::take(&mut self.parked_polls);
            for (fd, events, tag) in parked {
                match poll_now(fd, events) {
                    0 => self.parked_polls.push((fd, events, tag)),
                    r => self.done.push((tag, r)),
                }
            }
            std::mem::take(&mut self.done)
        }

        /// Drops a parked poll, as a cancel on the ring would (its
        /// completion is `-ECANCELED`); false if no poll has that tag.
        pub fn cancel_poll(&mut self, tag: u64) -> bool {
            let before = self.parked_polls.len();
            self.parked_polls.retain(|p| p.2 != tag);
            let found = self.parked_polls.len() != before;
            if found {
                self.done.push((tag, -libc::ECANCELED));
            }
            found
        }
    }

    /// `poll(2)` without waiting: the ready events, 0 if none, or -errno.
    fn poll_now(fd: RawFd, events: u32) -> i32 {
        let mut p = libc::pollfd {
            fd,
            events: events as i16,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack, no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n < 0 {
            res(n as isize)
        } else if n == 0 {
            0
        } else {
            i32::from(p.revents as u16)
        }
    }

    fn res(ret: isize) -> i32 {
        if ret < 0 {
            -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            i32::try_from(ret).unwrap_or(i32::MAX)
        }
    }

    impl IoSubmit for ExecutingIo {
        unsafe fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), IoSubmitError> {
            if tag > TAG_MAX {
                return Err(IoSubmitError::BadTag(tag));
            }
            let ret = match op {
                IoOp::Readv {
                    fd,
                    iovecs,
                    iovcnt,
                    offset,
                } => {
                    // SAFETY: the caller guarantees `iovecs` holds `iovcnt`
                    // valid iovecs over writable buffers (submit's contract).
                    let r = res(unsafe { libc::preadv(fd, iovecs, iovcnt as i32, offset as i64) });
                    if r == -libc::ESPIPE {
                        // A socket or pipe: the ring ignores the offset.
                        // SAFETY: as above.
                        res(unsafe { libc::readv(fd, iovecs, iovcnt as i32) })
                    } else {
                        r
                    }
                }
                IoOp::Writev {
                    fd,
                    iovecs,
                    iovcnt,
                    offset,
                } => {
                    // SAFETY: as above, over readable buffers.
                    let r = res(unsafe { libc::pwritev(fd, iovecs, iovcnt as i32, offset as i64) });
                    if r == -libc::ESPIPE {
                        // SAFETY: as above.
                        res(unsafe { libc::writev(fd, iovecs, iovcnt as i32) })
                    } else {
                        r
                    }
                }
                IoOp::Fsync { fd, datasync } => {
                    // SAFETY: plain syscalls on an fd; no memory is passed.
                    let r = unsafe {
                        if datasync {
                            libc::fdatasync(fd)
                        } else {
                            libc::fsync(fd)
                        }
                    };
                    res(r as isize)
                }
                IoOp::Fallocate {
                    fd,
                    mode,
                    offset,
                    len,
                } => {
                    // SAFETY: a plain syscall on an fd; no memory is passed.
                    let r = unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) };
                    res(r as isize)
                }
                IoOp::ReadMulti { .. } => -libc::EINVAL,
                IoOp::Poll { fd, events } => match poll_now(fd, events) {
                    0 => {
                        self.ops.push((op, tag));
                        self.parked_polls.push((fd, events, tag));
                        return Ok(());
                    }
                    r => r,
                },
            };
            self.ops.push((op, tag));
            self.done.push((tag, ret));
            Ok(())
        }
    }

    /// Panics on any submission: a test that passes with it proves the code
    /// under test refused the request before any host I/O.
    #[derive(Debug, Default)]
    pub struct PanicIo;

    impl IoSubmit for PanicIo {
        unsafe fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), IoSubmitError> {
            panic!("PanicIo: unexpected submission of {op:?} with tag {tag:#x}");
        }
    }

    /// Counts signals; clones share the count.
    #[derive(Clone, Debug, Default)]
    pub struct CountingLine(pub Arc<AtomicUsize>);

    impl CountingLine {
        /// Signals so far.
        pub fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl InterruptLine for CountingLine {
        fn signal(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;

    use vmm_sys_util::tempfile::TempFile;

    use super::fake::*;
    use super::*;

    #[test]
    fn eventfd_is_an_interrupt_line() -> io::Result<()> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        evt.signal()?;
        evt.signal()?;
        assert_eq!(evt.read()?, 2);
        Ok(())
    }

    #[test]
    fn recording_io_refuses_wide_tags_and_full_queues() {
        let mut io = RecordingIo::default();
        let op = IoOp::Fsync {
            fd: 0,
            datasync: true,
        };
        // SAFETY: Fsync carries no pointers.
        let wide = unsafe { io.submit(op, TAG_MAX + 1) };
        assert!(matches!(wide, Err(IoSubmitError::BadTag(_))));
        io.full = true;
        // SAFETY: as above.
        let full = unsafe { io.submit(op, 1) };
        assert!(matches!(full, Err(IoSubmitError::QueueFull)));
        io.full = false;
        // SAFETY: as above.
        let ok = unsafe { io.submit(op, 7) };
        assert!(ok.is_ok());
        assert_eq!(io.ops, vec![(op, 7)]);
    }

    #[test]
    fn executing_io_reads_and_writes_files() -> Result<(), Box<dyn std::error::Error>> {
        let tmp = TempFile::new()?;
        let mut file = tmp.as_file().try_clone()?;
        file.write_all(b"hello world")?;
        file.seek(SeekFrom::Start(0))?;
        let mut buf = [0u8; 5];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let mut io = ExecutingIo::default();
        // SAFETY: `iov` and `buf` outlive the synchronous fake's submit.
        unsafe {
            io.submit(
                IoOp::Readv {
                    fd: file.as_raw_fd(),
                    iovecs: iov.as_ptr(),
                    iovcnt: 1,
                    offset: 6,
                },
                3,
            )?;
        }
        assert_eq!(io.take_completions(), vec![(3, 5)]);
        assert_eq!(&buf, b"world");
        // SAFETY: Fsync on a bad fd carries no pointers.
        unsafe {
            io.submit(
                IoOp::Fsync {
                    fd: -1,
                    datasync: true,
                },
                4,
            )?;
        }
        assert_eq!(io.take_completions(), vec![(4, -libc::EBADF)]);
        Ok(())
    }

    #[test]
    fn executing_io_completes_a_poll_when_its_fd_is_ready() -> io::Result<()> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let mut io = ExecutingIo::default();
        let poll = IoOp::Poll {
            fd: evt.as_raw_fd(),
            events: libc::POLLIN as u32,
        };
        // SAFETY: Poll carries no pointers.
        unsafe { io.submit(poll, 9) }.map_err(io::Error::other)?;
        assert!(io.take_completions().is_empty(), "not readable yet");
        evt.write(1)?;
        assert_eq!(io.take_completions(), vec![(9, libc::POLLIN as i32)]);
        // SAFETY: as above.
        unsafe { io.submit(poll, 10) }.map_err(io::Error::other)?;
        assert_eq!(io.take_completions(), vec![(10, libc::POLLIN as i32)]);
        evt.read()?;
        // SAFETY: as above.
        unsafe { io.submit(poll, 11) }.map_err(io::Error::other)?;
        assert!(io.cancel_poll(11));
        assert_eq!(io.take_completions(), vec![(11, -libc::ECANCELED)]);
        Ok(())
    }

    #[test]
    #[should_panic(expected = "PanicIo")]
    fn panic_io_panics() {
        let mut io = PanicIo;
        // SAFETY: no pointers.
        let _ = unsafe {
            io.submit(
                IoOp::Fsync {
                    fd: 0,
                    datasync: false,
                },
                0,
            )
        };
    }
}
