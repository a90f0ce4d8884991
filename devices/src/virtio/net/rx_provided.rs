//! Receive through io_uring provided buffers: each posted chain that is
//! one contiguous host range big enough for a whole frame is published in
//! the device's [`BufRing`] (buffer id = the chain's head), and one
//! multishot read on the tap (`IORING_OP_READ_MULTISHOT`) delivers frame
//! after frame into whichever buffer the kernel takes next — no read is
//! built, submitted or completed per frame beyond its CQE.
//!
//! The path is chosen per activation, on the first chain popped: it is
//! taken when the VMM registered the ring, the RX rate limiter is off and
//! that chain qualifies (`need` bytes: the header plus the largest frame,
//! 65550 bytes when the driver took GUEST_TSO4/6 or UFO, else the MTU plus
//! an Ethernet header and a VLAN tag). A later chain that does not
//! qualify, a limiter set meanwhile, or a frame too big for its buffer
//! switches the device to the readv path (`rx`) for the rest of the
//! activation: the multishot read is cancelled (it becomes *stale*, and
//! the slot cancels it like a parked readv), and only when its last
//! completion is in are the unconsumed entries withdrawn (the ring's tail
//! set back to the kernel's head, which the device counts: one entry per
//! completion carrying a buffer id) and their chains handed to the readv
//! path in the order they were posted. Frames therefore arrive in order
//! and never into two buffer sets at once. A reset does the same, but the
//! old driver's chains are forgotten and frames that still land in them
//! are counted as dropped.
//!
//! The multishot read ends by itself when the ring runs dry (`-ENOBUFS`:
//! the frame waits in the tap) or on an error; it is armed again as soon
//! as buffers are published (or, after an error, once the tap polls
//! readable).

use std::collections::VecDeque;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};
use virtio_queue::QueueT;
use vm_memory::GuestMemory;

use super::device::NetDevice;
use super::frame;
use super::rx::{pop_chain, write_in_first_iovec, Popped, RxChain};
use super::tap::Tap;
use super::{MAX_FRAME_LEN, QUEUE_MAX_SIZE, RX_QUEUE, VNET_HDR_LEN};
use crate::buf_ring::BufRing;
use crate::io::{IoOp, IoSubmit, IoSubmitError, Selected};
use crate::virtio::{feature, DeviceError, ProcessOutcome, Tag};

/// The `queue` field of the multishot read's tag: the device's own routing
/// (no virtqueue has this index).
pub(super) const MULTISHOT_QUEUE: u8 = 2;
/// An Ethernet header and one VLAN tag: what a frame adds to the MTU.
const ETH_VLAN_HLEN: usize = 18;
/// The MTU a tap has unless told otherwise.
const DEFAULT_MTU: usize = 1500;

/// Which RX path this activation uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// No chain popped yet.
    Undecided,
    /// Provided buffers and the multishot read.
    Provided,
    /// The readv path (`rx`), until the next activation.
    Readv,
}

/// The multishot read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Multishot {
    /// Not armed (never was, ended, or withdrawn).
    Idle,
    /// Armed with this tag.
    Armed(u64),
    /// Being cancelled; `live`: its frames are still the current driver's
    /// (a switch to readv), else they landed in buffers from before a
    /// reset and are dropped.
    Stale { tag: u64, live: bool },
}

/// The provided-buffer side of RX.
#[derive(Debug)]
pub(super) struct Provided {
    /// `None` when it could not be mapped.
    ring: Option<BufRing>,
    pub mode: Mode,
    read: Multishot,
    /// Published chains not yet consumed, in ring order (the kernel takes
    /// the front first).
    published: VecDeque<RxChain>,
    /// The kernel's head: entries consumed so far.
    head: u16,
    /// Bytes a chain needs to be published.
    need: usize,
    /// The MTU offered to the guest, if any.
    mtu: Option<u16>,
    /// Tells successive multishot reads' tags apart.
    next_slot: u16,
}

impl Provided {
    pub fn new(mtu: Option<u16>) -> Self {
        let ring = match BufRing::new(QUEUE_MAX_SIZE) {
            Ok(ring) => Some(ring),
            Err(e) => {
                log::debug!("virtio-net: no provided-buffer ring ({e}); RX reads only");
                None
            }
        };
        Self {
            ring,
            mode: Mode::Undecided,
            read: Multishot::Idle,
            published: VecDeque::new(),
            head: 0,
            need: usize::MAX,
            mtu,
            next_slot: 0,
        }
    }

    pub fn ring_mut(&mut self) -> Option<&mut BufRing> {
        self.ring.as_mut()
    }

    /// Whether a multishot read may still be in the kernel.
    pub fn in_flight(&self) -> usize {
        usize::from(self.read != Multishot::Idle)
    }

    /// Whether the readv path must wait (a multishot read is being cancelled).
    pub fn busy(&self) -> bool {
        self.read != Multishot::Idle
    }

    /// The read to cancel, if one is stale.
    pub fn stale_tag(&self) -> Option<u64> {
        match self.read {
            Multishot::Stale { tag, .. } => Some(tag),
            _ => None,
        }
    }

    /// Chooses afresh for a new activation with `features`.
    pub fn activated(&mut self, features: u64) {
        let gso = feature(VIRTIO_NET_F_GUEST_TSO4)
            | feature(VIRTIO_NET_F_GUEST_TSO6)
            | feature(VIRTIO_NET_F_GUEST_UFO);
        let frame = if features & gso != 0 {
            MAX_FRAME_LEN
        } else {
            usize::from(self.mtu.unwrap_or(0)).max(DEFAULT_MTU) + ETH_VLAN_HLEN
        };
        self.need = VNET_HDR_LEN + frame;
        self.mode = Mode::Undecided;
    }

    /// Device reset: an armed read becomes stale (its frames are dropped);
    /// with none, the entries are withdrawn now. Returns the chains
    /// withdrawn (the old driver's).
    pub fn reset(&mut self) -> Vec<RxChain> {
        self.mode = Mode::Undecided;
        match self.read {
            Multishot::Armed(tag) | Multishot::Stale { tag, .. } => {
                self.read = Multishot::Stale { tag, live: false };
                Vec::new()
            }
            Multishot::Idle => self.withdraw(),
        }
    }

    /// Takes every unconsumed entry back (only with no read in flight).
    fn withdraw(&mut self) -> Vec<RxChain> {
        if let Some(ring) = self.ring.as_mut() {
            ring.rewind(self.head);
        }
        self.published.drain(..).collect()
    }

    /// Leaks the published chains' vectors: the kernel may still write
    /// into their buffers (the buffers are guest memory; nothing of ours).
    pub fn leak_in_flight(&mut self) {
        std::mem::forget(std::mem::take(&mut self.published));
    }
}

impl<T: Tap> NetDevice<T> {
    /// The provided-buffer path's fill: pops chains and publishes those
    /// that qualify, arming the multishot read. `None` when the readv path
    /// is to serve the queue instead.
    pub(super) fn pbuf_fill<M: GuestMemory>(
        &mut self,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<Option<ProcessOutcome>, DeviceError> {
        if self.pbuf.mode == Mode::Readv
            && self.pbuf.read == Multishot::Idle
            && self.pbuf.published.is_empty()
        {
            // Switched for good this activation, nothing left to withdraw:
            // the readv path's every fill comes through here.
            return Ok(None);
        }
        let mut out = ProcessOutcome::default();
        if let Multishot::Stale { .. } = self.pbuf.read {
            // Wait for its last completion (the slot cancels it).
            return Ok(Some(out));
        }
        let registered = self.pbuf.ring.as_ref().is_some_and(|r| r.group().is_some());
        if self.pbuf.mode == Mode::Readv || !registered || !self.rx_limiter.is_unlimited() {
            return Ok(self.pbuf_switch_to_readv());
        }
        if !self.queues.is_active() || self.rx_throttled {
            return Ok(Some(out));
        }
        let need = self.pbuf.need;
        let counters = &mut self.counters;
        let log = &mut self.log;
        let Some(queue) = self.queues.live(RX_QUEUE) else {
            return Ok(Some(out));
        };
        let super::rx::Rx {
            ready, held, pool, ..
        } = &mut self.rx;
        let pbuf = &mut self.pbuf;
        let Some(ring) = pbuf.ring.as_mut() else {
            return Ok(None);
        };
        let budget = queue.size();
        let mut switch = false;
        let broken: Option<String> = 'fill: loop {
            if let Err(e) = queue.disable_notification(mem) {
                break 'fill Some(format!("disabling notifications: {e}"));
            }
            while out.popped < budget {
                let c = match pop_chain(queue, mem, held, pool, counters, log) {
                    Ok(Popped::Empty) => break,
                    Ok(Popped::Chain(c)) => c,
                    Ok(Popped::Refused) => {
                        out.popped += 1;
                        out.answered += 1;
                        continue;
                    }
                    Err(broken) => break 'fill Some(broken),
                };
                out.popped += 1;
                let one = match c.iov.0.as_slice() {
                    [v] => u32::try_from(v.iov_len).ok().map(|l| (v.iov_base, l)),
                    _ => None,
                };
                match one {
                    Some((base, l)) if c.len >= need => {
                        // SAFETY: `walk` checked the range lies in guest
                        // memory (mapped for the VM's life) and is
                        // device-writable; the chain is ours (held) until
                        // the kernel consumes the entry or it is withdrawn
                        // with no read in flight, and we do not touch it
                        // meanwhile.
                        unsafe { ring.push(base as u64, l, c.head) };
                        pbuf.published.push_back(c);
                        pbuf.mode = Mode::Provided;
                    }
                    _ => {
                        // Not one buffer for a whole frame: the readv path
                        // serves this activation.
                        ready.push_back(c);
                        switch = true;
                        break 'fill None;
                    }
                }
            }
            if !pbuf.published.is_empty() {
                // Completions come back here and pop what was posted since.
                break 'fill None;
            }
            if out.popped >= budget {
                out.more = true;
                break 'fill None;
            }
            // No buffers: ask for a kick when the driver posts some.
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break 'fill None,
                Err(e) => break 'fill Some(format!("enabling notifications: {e}")),
            }
        };
        ring.publish();
        if out.answered > 0 {
            self.queues.mark_used(RX_QUEUE);
        }
        if let Some(why) = broken {
            return Err(self.queues.break_queue(RX_QUEUE, why));
        }
        if switch {
            return Ok(self.pbuf_switch_to_readv().map(|mut o| {
                o.merge(out);
                o
            }));
        }
        self.pbuf_arm(io, &mut out)?;
        Ok(Some(out))
    }

    /// Arms the multishot read when buffers are published and none is.
    fn pbuf_arm(
        &mut self,
        io: &mut dyn IoSubmit,
        out: &mut ProcessOutcome,
    ) -> Result<(), DeviceError> {
        let group = self.pbuf.ring.as_ref().and_then(BufRing::group);
        let (Multishot::Idle, false, false, Some(group)) = (
            self.pbuf.read,
            self.pbuf.published.is_empty(),
            self.rx.stalled,
            group,
        ) else {
            return Ok(());
        };
        let tag = Tag {
            queue: MULTISHOT_QUEUE,
            generation: self.generation.get(),
            slot: self.pbuf.next_slot,
        }
        .encode();
        let op = IoOp::ReadMulti {
            fd: self.tap.as_raw_fd(),
            group,
        };
        // SAFETY: the op carries no pointer; the buffers it fills are the
        // published entries, kept valid as `pbuf_fill` says. The tap fd
        // stays open while it is in flight (see the device's Drop).
        match unsafe { io.submit(op, tag) } {
            Ok(()) => {
                self.pbuf.read = Multishot::Armed(tag);
                self.pbuf.next_slot = self.pbuf.next_slot.wrapping_add(1);
                out.submitted += 1;
                Ok(())
            }
            Err(IoSubmitError::QueueFull) => {
                out.blocked = true;
                Ok(())
            }
            Err(e) => {
                self.counters.rx_errors += 1;
                self.rx.stalled = true;
                Err(DeviceError::Host(format!(
                    "multishot tap read could not be submitted: {e}"
                )))
            }
        }
    }

    /// Leaves the provided path for this activation: cancels the armed
    /// read (the readv path waits for its end), or withdraws the entries
    /// at once and hands their chains to the readv path first. `None`
    /// (the readv path may serve now) or an empty outcome (wait).
    fn pbuf_switch_to_readv(&mut self) -> Option<ProcessOutcome> {
        self.pbuf.mode = Mode::Readv;
        match self.pbuf.read {
            Multishot::Armed(tag) => {
                self.pbuf.read = Multishot::Stale { tag, live: true };
                Some(ProcessOutcome::default())
            }
            Multishot::Stale { .. } => Some(ProcessOutcome::default()),
            Multishot::Idle => {
                let back = self.pbuf.withdraw();
                for c in back.into_iter().rev() {
                    self.rx.ready.push_front(c);
                }
                None
            }
        }
    }

    /// One completion of the multishot read: delivers its frame (one
    /// buffer, `num_buffers` = 1), and when the read ended, re-arms it or
    /// finishes a switch or a reset.
    pub(super) fn pbuf_complete<M: GuestMemory>(
        &mut self,
        tag: u64,
        res: i32,
        selected: Selected,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, DeviceError> {
        let (ours, live) = match self.pbuf.read {
            Multishot::Armed(t) => (t == tag, true),
            Multishot::Stale { tag: t, live } => (t == tag, live),
            Multishot::Idle => (false, false),
        };
        let mut result = Ok(());
        if let Some(bid) = selected.buffer {
            // Whatever became of the frame, the kernel consumed the entry.
            self.pbuf.head = self.pbuf.head.wrapping_add(1);
            let chain = match self.pbuf.published.front() {
                Some(c) if c.head == bid => self.pbuf.published.pop_front(),
                _ => {
                    let at = self.pbuf.published.iter().position(|c| c.head == bid);
                    at.and_then(|i| self.pbuf.published.remove(i))
                }
            };
            match chain {
                Some(c) if ours && live => result = self.pbuf_deliver(c, res, mem),
                Some(c) => {
                    if res > 0 {
                        self.counters.rx_dropped += 1;
                    }
                    self.rx.pool.push(c);
                }
                None => log::debug!("virtio-net: completion for unknown buffer {bid}"),
            }
        }
        if !ours {
            log::debug!("virtio-net: completion for unknown multishot tag {tag:#x}");
            return result.map(|()| ProcessOutcome::default());
        }
        if !selected.more {
            let was = self.pbuf.read;
            self.pbuf.read = Multishot::Idle;
            if res < 0 && !matches!(-res, libc::ENOBUFS | libc::ECANCELED | libc::EAGAIN) {
                self.counters.rx_errors += 1;
                self.log.warn(
                    "rx-failed",
                    format_args!("multishot tap read failed: errno {}", -res),
                );
                // Do not spin on the tap: wait for the VMM's poll (or a kick).
                self.rx.stalled = true;
            }
            match was {
                Multishot::Stale { live: false, .. } => {
                    for c in self.pbuf.withdraw() {
                        self.rx.pool.push(c);
                    }
                }
                Multishot::Stale { live: true, .. } => {
                    let _ = self.pbuf_switch_to_readv();
                }
                _ if self.pbuf.mode == Mode::Readv => {
                    let _ = self.pbuf_switch_to_readv();
                }
                _ => {}
            }
        }
        result?;
        if self.rx.stalled {
            return Ok(ProcessOutcome::default());
        }
        self.rx_fill(mem, io)
    }

    /// Puts one frame's chain on the used ring, or (a frame that did not
    /// fit, a runt) publishes the chain again.
    fn pbuf_deliver<M: GuestMemory>(
        &mut self,
        c: RxChain,
        res: i32,
        mem: &M,
    ) -> Result<(), DeviceError> {
        let n = usize::try_from(res).unwrap_or(0);
        if n <= VNET_HDR_LEN || n > c.len {
            // A tap reports a frame's full length even when it cut it
            // short. A frame bigger than the buffers means the tap's MTU
            // is above what the buffers were sized for: the readv path,
            // which gathers chains (MRG_RXBUF), takes the rest.
            self.counters.rx_dropped += 1;
            self.log.warn(
                "rx-dropped",
                format_args!("dropped a {n}-byte frame ({}-byte buffer)", c.len),
            );
            // The chain goes to the readv path (the next `pbuf_fill`
            // cancels the multishot read): a runt is not worth a path of
            // its own either.
            self.rx.ready.push_back(c);
            self.pbuf.mode = Mode::Readv;
            return Ok(());
        }
        // num_buffers first: the driver may read the frame as soon as the
        // used entry is published.
        if !write_in_first_iovec(&c, 1)
            && !frame::write_at(mem, &c.segs, super::NUM_BUFFERS_OFFSET, &1u16.to_le_bytes())
        {
            log::debug!("virtio-net: writing num_buffers failed");
        }
        if let Some(h) = self.rx.held.get_mut(usize::from(c.head)) {
            *h = false;
        }
        let head = c.head;
        self.rx.pool.push(c);
        self.queues
            .add_used_batched(RX_QUEUE, mem, head, n as u32)?;
        self.counters.rx_packets += 1;
        self.counters.rx_provided_packets += 1;
        self.counters.rx_bytes += (n - VNET_HDR_LEN) as u64;
        self.rx_limiter.charge((n - VNET_HDR_LEN) as u64);
        Ok(())
    }
}
