//! Interrupts sent through the ring instead of a `write(2)` each.
//!
//! A device raises its interrupt at most once per loop turn (the one
//! decision `end_turn` makes). Writing the irqfd directly costs a syscall
//! per raise, and the turn that follows enters the kernel anyway, to
//! submit and to wait. So a device's [`InterruptLine`] here only latches
//! the raise ([`RaisedLine`]); at the end of the turn the slot hands the
//! irqfd write to the ring ([`RingInterrupt::deliver`]) and the next
//! `io_uring_enter` carries it with everything else. An eventfd write never
//! blocks, so the kernel performs it inline during that enter: the guest
//! is told no later than it would be by a write at the end of the turn,
//! and a wait that follows in the same enter is not cut short, because
//! the write is submitted with `IOSQE_CQE_SKIP_SUCCESS` (only a failure
//! posts a completion, tagged [`Token::Interrupt`]).
//!
//! Kernels without `IORING_FEAT_CQE_SKIP` (before 5.17) get the plain
//! `write(2)`, as does a write the submission queue has no room for.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use devices::io::InterruptLine;
use vmm_sys_util::eventfd::EventFd;

use super::{Ring, Token};

/// What the kernel adds to the irqfd's counter per interrupt. The ring
/// reads it when it performs the write, so it must outlive any write in
/// flight: a static does.
static ONE: u64 = 1;

/// The device's end: raising the interrupt only latches it until the
/// slot delivers it at the end of the turn.
#[derive(Debug)]
pub struct RaisedLine {
    raised: Arc<AtomicBool>,
}

impl InterruptLine for RaisedLine {
    fn signal(&self) -> io::Result<()> {
        self.raised.store(true, Ordering::Release);
        Ok(())
    }
}

/// The slot's end: the irqfd (registered with KVM, which injects the
/// interrupt when its counter moves) and the latch its device raises.
#[derive(Debug)]
pub struct RingInterrupt {
    irqfd: EventFd,
    raised: Arc<AtomicBool>,
}

impl RingInterrupt {
    /// Splits `irqfd` into the slot's end and the line the device is
    /// built with.
    pub fn new(irqfd: EventFd) -> (Self, RaisedLine) {
        let raised = Arc::new(AtomicBool::new(false));
        let line = RaisedLine {
            raised: raised.clone(),
        };
        (Self { irqfd, raised }, line)
    }

    /// Sends the interrupt if the device raised it since the last call:
    /// queued on `ring` for its next enter when the kernel can skip the
    /// write's completion, else written at once. `device` tags a failed
    /// write's completion.
    pub fn deliver(&self, ring: &mut Ring, device: u8) -> io::Result<()> {
        if !self.raised.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let fd = self.irqfd.as_raw_fd();
        if ring.signal_eventfd(fd, &ONE, Token::Interrupt { device }) {
            return Ok(());
        }
        self.irqfd.write(1)
    }

    /// Sends a failed ring write again with `write(2)`, so a guest is never
    /// left without an interrupt it was owed.
    pub fn retry(&self) -> io::Result<()> {
        self.irqfd.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(evt: &EventFd) -> u64 {
        evt.read().unwrap_or(0)
    }

    #[test]
    fn a_raise_reaches_the_irqfd_only_when_the_ring_enters() -> io::Result<()> {
        let mut ring = Ring::new()?;
        if !ring.skips_success() {
            eprintln!("SKIPPED: this kernel's io_uring cannot skip successful completions");
            return Ok(());
        }
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
        let guest_side = irqfd.try_clone()?;
        let (irq, line) = RingInterrupt::new(irqfd);

        irq.deliver(&mut ring, 3)?;
        assert!(!ring.has_queued(), "nothing raised, nothing queued");

        // Two raises in one turn are one interrupt.
        line.signal()?;
        line.signal()?;
        irq.deliver(&mut ring, 3)?;
        assert!(ring.has_queued(), "the write waits for the next enter");
        assert_eq!(counter(&guest_side), 0, "no write(2) was made");

        let mut out = Vec::new();
        ring.turn(&mut out, false)?;
        assert_eq!(counter(&guest_side), 1, "the enter performed the write");
        assert!(out.is_empty(), "a successful write posts no completion");
        assert_eq!(ring.in_flight(), 0, "and is not counted as in flight");

        // Nothing raised since: nothing sent.
        irq.deliver(&mut ring, 3)?;
        ring.turn(&mut out, false)?;
        assert_eq!(counter(&guest_side), 0);
        Ok(())
    }

    #[test]
    fn a_failed_ring_write_comes_back_tagged_and_can_be_retried() -> io::Result<()> {
        let mut ring = Ring::new()?;
        if !ring.skips_success() {
            eprintln!("SKIPPED: this kernel's io_uring cannot skip successful completions");
            return Ok(());
        }
        // A write end that is not an eventfd: an O_RDONLY /dev/null makes
        // the ring's write fail with EBADF.
        let null = std::fs::File::open("/dev/null")?;
        assert!(ring.signal_eventfd(null.as_raw_fd(), &ONE, Token::Interrupt { device: 9 }));
        let mut out = Vec::new();
        ring.turn(&mut out, true)?;
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].token, Token::Interrupt { device: 9 });
        assert_eq!(out[0].result, -libc::EBADF);
        assert_eq!(ring.in_flight(), 0);

        let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
        let guest_side = irqfd.try_clone()?;
        let (irq, _line) = RingInterrupt::new(irqfd);
        irq.retry()?;
        assert_eq!(counter(&guest_side), 1);
        Ok(())
    }
}
