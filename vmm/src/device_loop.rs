//! The devices' share of the VMM thread loop: which ring completions belong
//! to virtio devices and what to do with them.
//!
//! Kept apart from [`crate::vmm::Vmm`] so the same code serves a booted
//! guest and the benchmarks' synthetic drivers (which have no KVM at all).

use std::io;

use vm_memory::GuestMemoryMmap;

use crate::event_loop::{Completion, DeviceIo, EventLoop, Token};
use crate::metrics::DeviceMetrics;
use crate::virtio_9p::Share;
use crate::virtio_block::Drive;
use crate::virtio_net::NetIface;

/// A drive's queue was kicked (its ioeventfd fired).
pub const KIND_BLK_KICK: u8 = 16;
/// A drive's transport sent an activation or reset message.
pub const KIND_BLK_WAKE: u8 = 17;
/// One of a drive's I/O operations completed.
pub const KIND_BLK_IO: u8 = 18;
/// An interface's queue was kicked; the tag is the queue.
pub const KIND_NET_KICK: u8 = 24;
/// An interface's transport sent an activation or reset message.
pub const KIND_NET_WAKE: u8 = 25;
/// One of an interface's tap reads or writes completed.
pub const KIND_NET_IO: u8 = 26;
/// An interface's tap became readable.
pub const KIND_NET_TAP_POLL: u8 = 27;
/// A cancel we asked for finished (nothing to do).
pub const KIND_CANCEL: u8 = 28;
/// A share's queue was kicked.
pub const KIND_P9_KICK: u8 = 32;
/// A share's transport sent an activation or reset message.
pub const KIND_P9_WAKE: u8 = 33;
/// One of a share's reads, writes or fsyncs completed.
pub const KIND_P9_IO: u8 = 34;

/// The virtio devices the VMM thread serves.
#[derive(Debug, Default)]
pub struct DeviceLoop {
    // Boxed: the ring holds pointers into each device's read buffers, so a
    // device must never move, whatever happens to the vectors.
    #[allow(clippy::vec_box)]
    drives: Vec<Box<Drive>>,
    #[allow(clippy::vec_box)]
    nets: Vec<Box<NetIface>>,
    #[allow(clippy::vec_box)]
    shares: Vec<Box<Share>>,
}

impl DeviceLoop {
    /// Serves `drives` and `nets`; device `i` of each gets ring index `i`.
    #[allow(clippy::vec_box)]
    pub fn new(drives: Vec<Box<Drive>>, nets: Vec<Box<NetIface>>) -> Self {
        Self {
            drives,
            nets,
            shares: Vec::new(),
        }
    }

    /// Adds the virtio-9p shares (`ringvm -- CMD`); share `i` gets ring
    /// index `i`.
    #[allow(clippy::vec_box)]
    pub fn with_shares(mut self, shares: Vec<Box<Share>>) -> Self {
        self.shares = shares;
        self
    }

    /// The drives, for metrics and management.
    pub fn drives(&self) -> &[Box<Drive>] {
        &self.drives
    }

    /// The drives, to change one (PATCH /drives).
    pub fn drives_mut(&mut self) -> &mut [Box<Drive>] {
        &mut self.drives
    }

    /// The network interfaces, for metrics.
    pub fn nets(&self) -> &[Box<NetIface>] {
        &self.nets
    }

    /// Every device's counters, for a metrics line or the API.
    pub fn metrics(&self) -> Vec<DeviceMetrics> {
        let nets = self.nets.iter().map(|n| {
            let c = n.counters();
            DeviceMetrics {
                kind: "net",
                id: n.id.clone(),
                fields: serde_json::json!({
                    "rx_packets": c.rx_packets,
                    "rx_bytes": c.rx_bytes,
                    "rx_errors": c.rx_errors,
                    "rx_dropped": c.rx_dropped,
                    "tx_packets": c.tx_packets,
                    "tx_bytes": c.tx_bytes,
                    "tx_errors": c.tx_errors,
                    "tx_dropped": c.tx_dropped,
                }),
            }
        });
        let shares = self.shares.iter().map(|s| {
            let c = s.counters();
            DeviceMetrics {
                kind: "9p",
                id: s.tag.clone(),
                fields: serde_json::json!({
                    "requests": c.requests,
                    "read_bytes": c.read_bytes,
                    "write_bytes": c.write_bytes,
                    "errors": c.errors,
                    "needs_reset": c.needs_reset,
                }),
            }
        });
        self.drives
            .iter()
            .map(|d| {
                let c = d.counters();
                DeviceMetrics {
                    kind: "block",
                    id: d.id.clone(),
                    fields: serde_json::json!({
                        "requests": c.requests,
                        "read_bytes": c.read_bytes,
                        "write_bytes": c.write_bytes,
                        "flushes": c.flushes,
                        "errors": c.errors,
                        "needs_reset": c.needs_reset,
                    }),
                }
            })
            .chain(nets)
            .chain(shares)
            .collect()
    }

    /// Whether a completion of `kind` is ours.
    pub fn owns(kind: u8) -> bool {
        matches!(
            kind,
            KIND_BLK_KICK
                | KIND_BLK_WAKE
                | KIND_BLK_IO
                | KIND_NET_KICK
                | KIND_NET_WAKE
                | KIND_NET_IO
                | KIND_NET_TAP_POLL
                | KIND_CANCEL
                | KIND_P9_KICK
                | KIND_P9_WAKE
                | KIND_P9_IO
        )
    }

    /// Arms every device's eventfds; call once before the first turn.
    pub fn arm(&mut self, ring: &mut EventLoop) -> io::Result<()> {
        // Disk completions are worth batching; tap reads may wait forever
        // for a frame, so they are not.
        ring.batch_kind(KIND_BLK_IO);
        for index in 0..self.drives.len() {
            self.arm_drive(ring, index, KIND_BLK_KICK)?;
            self.arm_drive(ring, index, KIND_BLK_WAKE)?;
        }
        for index in 0..self.nets.len() {
            self.arm_net(ring, index, KIND_NET_KICK, 0)?;
            self.arm_net(ring, index, KIND_NET_KICK, 1)?;
            self.arm_net(ring, index, KIND_NET_WAKE, 0)?;
        }
        for index in 0..self.shares.len() {
            self.arm_share(ring, index, KIND_P9_KICK)?;
            self.arm_share(ring, index, KIND_P9_WAKE)?;
        }
        Ok(())
    }

    fn arm_share(&mut self, ring: &mut EventLoop, index: usize, kind: u8) -> io::Result<()> {
        let Some(share) = self.shares.get_mut(index) else {
            return Ok(());
        };
        let (fd, buf) = if kind == KIND_P9_KICK {
            (share.kick_fd(), &mut share.kick_buf)
        } else {
            (share.wake_fd(), &mut share.wake_buf)
        };
        let token = Token::new(kind, index as u8, 0);
        // SAFETY: the buffer lives in the boxed Share, kept as the drives'.
        unsafe { ring.arm_eventfd(fd, buf, token) }
    }

    fn dispatch_share(
        &mut self,
        c: Completion,
        ring: &mut EventLoop,
        mem: &GuestMemoryMmap,
    ) -> io::Result<()> {
        let index = usize::from(c.token.index);
        let Some(share) = self.shares.get_mut(index) else {
            log::warn!("completion for unknown share {index}");
            return Ok(());
        };
        match c.token.kind {
            KIND_P9_KICK => {
                share.on_kick(mem, ring, KIND_P9_IO, c.token.index);
                self.arm_share(ring, index, KIND_P9_KICK)?;
            }
            KIND_P9_WAKE => {
                share.on_transport_message(mem);
                share.on_kick(mem, ring, KIND_P9_IO, c.token.index);
                self.arm_share(ring, index, KIND_P9_WAKE)?;
            }
            _ => share.on_completion(c.token.tag, c.result, mem, ring, KIND_P9_IO, c.token.index),
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

    fn arm_net(
        &mut self,
        ring: &mut EventLoop,
        index: usize,
        kind: u8,
        queue: usize,
    ) -> io::Result<()> {
        let Some(net) = self.nets.get_mut(index) else {
            return Ok(());
        };
        let (fd, buf) = if kind == KIND_NET_KICK {
            let q = queue.min(1);
            (net.kick_fd(q), &mut net.kick_bufs[q])
        } else {
            (net.wake_fd(), &mut net.wake_buf)
        };
        let token = Token::new(kind, index as u8, queue as u64);
        // SAFETY: the buffer lives in the boxed NetIface, kept as above.
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
        match c.token.kind {
            KIND_BLK_KICK | KIND_BLK_WAKE | KIND_BLK_IO => self.dispatch_drive(c, ring, mem),
            KIND_P9_KICK | KIND_P9_WAKE | KIND_P9_IO => self.dispatch_share(c, ring, mem),
            KIND_CANCEL => Ok(()),
            _ => {
                self.dispatch_net(c, ring, mem)?;
                self.after_net_event(index, ring)
            }
        }
    }

    fn dispatch_drive(
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
            _ => drive.on_completion(c.token.tag, c.result, mem),
        }
        Ok(())
    }

    fn dispatch_net(
        &mut self,
        c: Completion,
        ring: &mut EventLoop,
        mem: &GuestMemoryMmap,
    ) -> io::Result<()> {
        let index = usize::from(c.token.index);
        let Some(net) = self.nets.get_mut(index) else {
            log::warn!("completion for unknown network interface {index}");
            return Ok(());
        };
        let mut io = DeviceIo::new(ring, KIND_NET_IO, c.token.index);
        match c.token.kind {
            KIND_NET_KICK => {
                let queue = c.token.tag as usize;
                net.on_kick(queue, mem, &mut io);
                self.arm_net(ring, index, KIND_NET_KICK, queue)?;
            }
            KIND_NET_WAKE => {
                net.on_transport_message(mem, &mut io);
                self.arm_net(ring, index, KIND_NET_WAKE, 0)?;
            }
            KIND_NET_TAP_POLL => {
                net.tap_poll_armed = false;
                net.on_kick(devices::virtio::net::RX_QUEUE, mem, &mut io);
            }
            _ => net.on_completion(c.token.tag, c.result, mem, &mut io),
        }
        Ok(())
    }

    /// What an interface may ask for after any event: cancelling a read
    /// left over from before a reset, or a POLLIN on its tap.
    fn after_net_event(&mut self, index: usize, ring: &mut EventLoop) -> io::Result<()> {
        let Some(net) = self.nets.get_mut(index) else {
            return Ok(());
        };
        if let Some(tag) = net.take_stale_read() {
            let target = Token::new(KIND_NET_IO, index as u8, tag);
            ring.cancel(target, Token::new(KIND_CANCEL, index as u8, 0))?;
        }
        if net.wants_tap_poll() && !net.tap_poll_armed {
            net.tap_poll_armed = true;
            ring.poll_readable(net.tap_fd(), Token::new(KIND_NET_TAP_POLL, index as u8, 0))?;
        }
        Ok(())
    }

    /// Resumes drains that stopped at their budget or on a full ring, and
    /// raises each drive's interrupt once for the whole batch; call after
    /// each batch of completions.
    pub fn resume(&mut self, ring: &mut EventLoop, mem: &GuestMemoryMmap) {
        for (index, drive) in self.drives.iter_mut().enumerate() {
            if drive.wants_rerun() {
                drive.on_kick(mem, ring, KIND_BLK_IO, index as u8);
            }
            drive.flush_interrupts(mem);
        }
        for (index, share) in self.shares.iter_mut().enumerate() {
            if share.wants_rerun() {
                share.on_kick(mem, ring, KIND_P9_IO, index as u8);
            }
            share.end_turn(mem);
        }
        for (index, net) in self.nets.iter_mut().enumerate() {
            let queues: Vec<usize> = net.queues_to_resume().collect();
            let mut io = DeviceIo::new(ring, KIND_NET_IO, index as u8);
            for queue in queues {
                net.on_kick(queue, mem, &mut io);
            }
        }
    }
}
