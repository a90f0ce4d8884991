//! The devices' share of the VMM thread loop: which ring completions belong
//! to virtio devices and what to do with them.
//!
//! Kept apart from [`crate::vmm::Vmm`] so the same code serves a booted
//! guest and the benchmark's synthetic driver (which has no KVM at all).

use std::io;

use vm_memory::GuestMemoryMmap;

use crate::event_loop::{Completion, EventLoop, Token};
use crate::virtio_block::Drive;

/// A drive's queue was kicked (its ioeventfd fired).
pub const KIND_BLK_KICK: u8 = 16;
/// A drive's transport sent an activation or reset message.
pub const KIND_BLK_WAKE: u8 = 17;
/// One of a drive's I/O operations completed.
pub const KIND_BLK_IO: u8 = 18;

/// The virtio devices the VMM thread serves.
#[derive(Debug, Default)]
pub struct DeviceLoop {
    // Boxed: the ring holds pointers into each drive's read buffers, so a
    // drive must never move, whatever happens to the vector.
    #[allow(clippy::vec_box)]
    drives: Vec<Box<Drive>>,
}

impl DeviceLoop {
    /// Serves `drives`; drive `i` gets ring index `i`.
    pub fn new(drives: Vec<Box<Drive>>) -> Self {
        Self { drives }
    }

    /// The drives, for metrics and management.
    pub fn drives(&self) -> &[Box<Drive>] {
        &self.drives
    }

    /// Whether a completion of `kind` is ours.
    pub fn owns(kind: u8) -> bool {
        matches!(kind, KIND_BLK_KICK | KIND_BLK_WAKE | KIND_BLK_IO)
    }

    /// Arms every device's eventfds; call once before the first turn.
    pub fn arm(&mut self, ring: &mut EventLoop) -> io::Result<()> {
        for index in 0..self.drives.len() {
            self.arm_drive(ring, index, KIND_BLK_KICK)?;
            self.arm_drive(ring, index, KIND_BLK_WAKE)?;
        }
        Ok(())
    }

    fn arm_drive(&mut self, ring: &mut EventLoop, index: usize, kind: u8) -> io::Result<()> {
        let Some(drive) = self.drives.get_mut(index) else {
            return Ok(());
        };
        let (fd, buf) = if kind == KIND_BLK_KICK {
            (drive.kick_fd(), &mut drive.kick_buf)
        } else {
            (drive.wake_fd(), &mut drive.wake_buf)
        };
        let token = Token::new(kind, index as u8, 0);
        // SAFETY: the buffer lives in the boxed Drive, which the owner of
        // this loop keeps until after the ring is dropped.
        unsafe { ring.arm_eventfd(fd, buf, token) }
    }

    /// Handles one completion the loop routed here (see [`Self::owns`]).
    pub fn dispatch(
        &mut self,
        c: Completion,
        ring: &mut EventLoop,
        mem: &GuestMemoryMmap,
    ) -> io::Result<()> {
        let index = usize::from(c.token.index);
        let Some(drive) = self.drives.get_mut(index) else {
            log::warn!("completion for unknown drive {index}");
            return Ok(());
        };
        match c.token.kind {
            KIND_BLK_KICK => {
                drive.on_kick(mem, ring, KIND_BLK_IO, c.token.index);
                self.arm_drive(ring, index, KIND_BLK_KICK)?;
            }
            KIND_BLK_WAKE => {
                drive.on_transport_message(mem);
                // Requests may already wait in a queue that just became ready.
                drive.on_kick(mem, ring, KIND_BLK_IO, c.token.index);
                self.arm_drive(ring, index, KIND_BLK_WAKE)?;
            }
            KIND_BLK_IO => drive.on_completion(c.token.tag, c.result, mem),
            _ => {}
        }
        Ok(())
    }

    /// Resumes drains that stopped at their budget or on a full ring; call
    /// after each batch of completions.
    pub fn resume(&mut self, ring: &mut EventLoop, mem: &GuestMemoryMmap) {
        for (index, drive) in self.drives.iter_mut().enumerate() {
            if drive.wants_rerun() {
                drive.on_kick(mem, ring, KIND_BLK_IO, index as u8);
            }
        }
    }
}
