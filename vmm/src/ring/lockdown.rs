//! The io_uring ring may only do what ringvm's devices and event sources
//! ask of it.
//!
//! io_uring operations are carried out by the kernel, out of seccomp's
//! sight: a VMM thread that seccomp keeps from `openat` with `O_CREAT`,
//! `socket` or `connect` could still submit `IORING_OP_OPENAT`,
//! `IORING_OP_SOCKET` or `IORING_OP_CONNECT`. So the ring is created
//! disabled (`IORING_SETUP_R_DISABLED`), given the list below with
//! `IORING_REGISTER_RESTRICTIONS`, and only then enabled; from then on any
//! other opcode, any SQE flag but those in [`ALLOWED_SQE_FLAGS`], and every
//! `io_uring_register` operation fail with `-EACCES`, and the list can
//! never be changed.
//!
//! Fixed files only (`IOSQE_FIXED_FILE` required) would add nothing here:
//! every allowed opcode works on a descriptor the thread already holds and
//! could use with the same plain syscall, which the VMM thread's seccomp
//! list allows. Registered files would also have to be re-registered on
//! every `PATCH /drives`.
//!
//! To add an opcode for a new device, add a line to [`ALLOWED_OPS`] with
//! the reason, and check the VMM thread's seccomp list does not already
//! forbid what the opcode would do.

use std::io;

use io_uring::opcode;
use io_uring::register::Restriction;
use io_uring::{squeue, IoUring};

/// One opcode the ring may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowedOp {
    /// The `IORING_OP_*` code.
    pub code: u8,
    /// Its name.
    pub name: &'static str,
    /// Who submits it, and why.
    pub why: &'static str,
}

/// Every opcode ringvm submits.
pub const ALLOWED_OPS: [AllowedOp; 9] = [
    AllowedOp {
        code: opcode::Read::CODE,
        name: "READ",
        why: "eventfd counters (vCPU events, queue kicks, transport wake-ups, API requests), \
              stdin for the serial console, the stop signals' signalfd; the one-buffer case \
              of READV",
    },
    AllowedOp {
        code: opcode::Readv::CODE,
        name: "READV",
        why: "virtio-blk reads into guest buffers; virtio-net frames from the tap",
    },
    AllowedOp {
        code: opcode::Writev::CODE,
        name: "WRITEV",
        why: "virtio-blk writes from guest buffers; virtio-net frames to the tap",
    },
    AllowedOp {
        code: opcode::Write::CODE,
        name: "WRITE",
        why: "the one-buffer case of WRITEV (a 4 KiB block write, one frame to the tap): \
              the kernel skips importing a one-element iovec array",
    },
    AllowedOp {
        code: opcode::Fsync::CODE,
        name: "FSYNC",
        why: "virtio-blk FLUSH (fdatasync of the drive file)",
    },
    AllowedOp {
        code: opcode::Fallocate::CODE,
        name: "FALLOCATE",
        why: "virtio-blk DISCARD and WRITE_ZEROES (punch hole, zero range)",
    },
    AllowedOp {
        code: opcode::PollAdd::CODE,
        name: "POLL_ADD",
        why: "virtio-net: wait for the tap to have a frame; virtio-vsock: wait for its \
              listener and host sockets to be readable or writable",
    },
    AllowedOp {
        code: opcode::AsyncCancel::CODE,
        name: "ASYNC_CANCEL",
        why: "virtio-net drops a stale tap read; virtio-vsock drops the polls and reads \
              of a closed connection; the ring cancels all at teardown",
    },
    AllowedOp {
        code: opcode::Timeout::CODE,
        name: "TIMEOUT",
        why: "timers: stdin retry, halt probe, periodic metrics",
    },
];

/// The SQE flags ringvm sets, each with who sets it and why. Links,
/// drains, fixed files, buffer selection and the rest stay refused.
pub const ALLOWED_SQE_FLAGS: [(squeue::Flags, &str); 2] = [
    (
        squeue::Flags::ASYNC,
        "IOSQE_ASYNC: virtio-blk sends reads and writes of files io_uring would hand \
         to io-wq anyway (tmpfs, buffered ext4 writes) straight there, skipping a failed \
         non-blocking attempt on the VMM thread (devices/src/virtio/block/punt.rs); it \
         changes how an allowed op runs, not what it may do",
    ),
    (
        squeue::Flags::SKIP_SUCCESS,
        "IOSQE_CQE_SKIP_SUCCESS: interrupt writes to a device's irqfd ride along the \
         next enter and post a completion only on failure, so a waiting enter is not \
         woken by its own interrupt write (ring/irq.rs); it only withholds a \
         completion, and lets no op do more",
    ),
];

/// Registers [`ALLOWED_OPS`] and [`ALLOWED_SQE_FLAGS`] on `ring` (created with `setup_r_disabled`)
/// and enables it. Call on the thread that will submit: a `SINGLE_ISSUER`
/// ring takes its submitter task at enable time.
pub fn restrict_and_enable(ring: &IoUring) -> io::Result<()> {
    let mut restrictions: Vec<Restriction> = ALLOWED_OPS
        .iter()
        .map(|op| Restriction::sqe_op(op.code))
        .collect();
    let flags = ALLOWED_SQE_FLAGS
        .iter()
        .fold(squeue::Flags::empty(), |all, (flag, _)| all | *flag);
    restrictions.push(Restriction::sqe_flags_allowed(flags.bits()));
    ring.submitter().register_restrictions(&mut restrictions)?;
    ring.submitter().register_enable_rings()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use io_uring::{opcode, types};

    use super::*;
    use crate::ring::{Ring, Token};

    #[test]
    fn each_opcode_is_listed_once_with_a_reason() {
        let codes: HashSet<u8> = ALLOWED_OPS.iter().map(|op| op.code).collect();
        assert_eq!(codes.len(), ALLOWED_OPS.len());
        assert!(ALLOWED_OPS.iter().all(|op| op.why.len() > 10));
        // AsyncCancel2 (cancel-all at teardown) is the same opcode.
        assert_eq!(opcode::AsyncCancel::CODE, opcode::AsyncCancel2::CODE);
    }

    /// Submits `entry` on a fresh ringvm ring and returns its result.
    fn result_of(entry: io_uring::squeue::Entry) -> i32 {
        let mut ring = Ring::new().unwrap();
        // SAFETY: the entries below point at buffers that outlive the turn
        // that completes them (statics or locals of the caller's frame).
        unsafe { ring.push(entry, Token::Stdin) }.unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            ring.turn(&mut out, true).unwrap();
        }
        out[0].result
    }

    #[test]
    fn opcodes_off_the_list_are_refused_with_eacces() {
        static PATH: &[u8] = b"/etc/hostname\0";
        let openat = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), PATH.as_ptr().cast())
            .flags(libc::O_RDONLY)
            .build();
        assert_eq!(result_of(openat), -libc::EACCES);
        let socket = opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0).build();
        assert_eq!(result_of(socket), -libc::EACCES);
        let send = opcode::Send::new(types::Fd(2), b"x".as_ptr(), 1).build();
        assert_eq!(result_of(send), -libc::EACCES);
        let nop = opcode::Nop::new().build();
        assert_eq!(result_of(nop), -libc::EACCES);
    }

    #[test]
    fn listed_opcodes_run_with_async_or_skip_success_but_no_other_sqe_flag() {
        use io_uring::squeue::Flags;
        let ts = types::Timespec::new().nsec(1_000);
        let timeout = opcode::Timeout::new(&ts).build();
        assert_eq!(result_of(timeout), -libc::ETIME);
        let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        evt.write(3).unwrap();
        let mut buf = [0u8; 8];
        let fd = std::os::fd::AsRawFd::as_raw_fd(&evt);
        let read = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), 8)
            .build()
            .flags(Flags::ASYNC);
        assert_eq!(result_of(read), 8, "IOSQE_ASYNC is allowed");
        assert_eq!(u64::from_ne_bytes(buf), 3);
        evt.write(3).unwrap();
        // A read (which takes every flag, BUFFER_SELECT included) of a
        // ready eventfd: refused with EACCES, or it would complete with 8.
        for flag in [
            Flags::FIXED_FILE,
            Flags::IO_DRAIN,
            Flags::IO_LINK,
            Flags::IO_HARDLINK,
            Flags::BUFFER_SELECT,
        ] {
            for flags in [flag, flag | Flags::ASYNC] {
                let read = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), 8)
                    .build()
                    .flags(flags);
                assert_eq!(result_of(read), -libc::EACCES, "{flags:?} must be refused");
            }
        }
    }

    #[test]
    fn every_allowed_flag_has_a_reason() {
        assert!(ALLOWED_SQE_FLAGS.iter().all(|(_, why)| why.len() > 10));
        assert_eq!(
            ALLOWED_SQE_FLAGS.len(),
            2,
            "only IOSQE_ASYNC and IOSQE_CQE_SKIP_SUCCESS"
        );
    }

    #[test]
    fn the_restrictions_cannot_be_replaced() {
        let ring = IoUring::builder().setup_r_disabled().build(8).unwrap();
        restrict_and_enable(&ring).unwrap();
        let mut more = [Restriction::sqe_op(opcode::OpenAt::CODE)];
        assert!(ring.submitter().register_restrictions(&mut more).is_err());
    }
}
