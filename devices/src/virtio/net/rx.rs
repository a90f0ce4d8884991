//! Receive: posted RX buffers become `readv`s from the tap straight into
//! guest memory, only while the driver has posted some (see the module
//! docs of [`super`] for how MRG_RXBUF gathers chains without a copy).
//!
//! A readv parked on an idle tap may stay in the kernel indefinitely, so a
//! reset cannot simply wait for it: it becomes *stale* and its tag is
//! offered for cancelling ([`NetDevice::stale_rx_tags`]); until every such
//! completion arrives no new readv is submitted, so frames are never read
//! into two buffer sets at once.

use std::collections::VecDeque;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use super::device::NetDevice;
use super::frame::{self, Direction, Segment};
use super::tap::Tap;
use super::{F_MRG_RXBUF, MAX_BUFFER_LEN, NUM_BUFFERS_OFFSET, RX_QUEUE, VNET_HDR_LEN};
use crate::io::{IoOp, IoSubmit, IoSubmitError, IOV_MAX};
use crate::virtio::{DeviceError, Iovecs, ProcessOutcome, Tag};

/// Tap reads in flight at most: with buffers for several, one loop turn
/// can complete several frames.
pub(super) const MAX_RX_READS: usize = 4;

/// What [`pop_chain`] took from the receive queue.
pub(super) enum Popped {
    /// Nothing: the driver posted no more chains.
    Empty,
    /// A chain walked into its iovecs and marked held.
    Chain(RxChain),
    /// A chain the walk refused, already returned unused (used length 0),
    /// counted and logged.
    Refused,
}

/// Pops the next receive chain and walks it, as both receive paths take
/// their buffers. `Err`: the driver broke the queue (a head outside it, or
/// one it already holds, or an unreadable ring), with why. Inlined into
/// both per-frame loops: called out of line it cost the no-GSO path about
/// 30 instructions per frame (callgrind).
#[inline(always)]
pub(super) fn pop_chain<M: GuestMemory>(
    queue: &mut virtio_queue::Queue,
    mem: &M,
    held: &mut [bool],
    pool: &mut Vec<RxChain>,
    counters: &mut super::NetCounters,
    log: &mut crate::guest_log::GuestLog,
) -> Result<Popped, String> {
    let chain = match queue.iter(mem) {
        Ok(mut it) => it.next(),
        Err(e) => return Err(e.to_string()),
    };
    let Some(chain) = chain else {
        return Ok(Popped::Empty);
    };
    let head = chain.head_index();
    let Some(held_flag) = held.get_mut(usize::from(head)) else {
        return Err(format!("head index {head} outside the queue"));
    };
    if *held_flag {
        return Err(format!("head index {head} posted twice"));
    }
    let mut c = pool.pop().unwrap_or_default();
    c.iov.0.clear();
    c.segs.clear();
    match frame::walk(mem, chain, Direction::Rx, &mut c.iov.0, Some(&mut c.segs)) {
        Ok(len) => {
            c.head = head;
            c.len = len;
            *held_flag = true;
            Ok(Popped::Chain(c))
        }
        Err(e) => {
            pool.push(c);
            counters.rx_errors += 1;
            log.warn(
                "rx-chain",
                format_args!("receive chain {head} refused: {e}"),
            );
            queue
                .add_used(mem, head, 0)
                .map_err(|e| format!("used ring: {e}"))?;
            Ok(Popped::Refused)
        }
    }
}

/// A receive chain popped from the available ring and walked once, kept
/// by the device until a frame fills it (or a reset drops it): later reads
/// reuse its iovecs instead of walking it again.
#[derive(Debug, Default)]
pub(super) struct RxChain {
    pub head: u16,
    /// Capacity in bytes.
    pub len: usize,
    pub iov: Iovecs,
    /// The chain's guest segments, where the header goes if a frame
    /// starts in it.
    pub segs: Vec<Segment>,
}

/// One tap read: the chains it fills and the iovecs the kernel writes
/// through.
#[derive(Debug, Default)]
pub(super) struct RxRead {
    tag: u64,
    /// The chains, in the order the frame fills them (delivered ones
    /// leave from the front, new ones join at the back).
    chains: VecDeque<RxChain>,
    /// The iovecs from `iov_start` on are the read's; those before it
    /// covered chains already delivered and are dropped once they are half
    /// the array, so a leftover read does not move its live iovecs on every
    /// frame.
    iov: Iovecs,
    iov_start: usize,
    /// Bytes the chains hold.
    capacity: usize,
    /// One byte after the guest's buffers: a frame that reaches it did
    /// not fit (a tap read returns at most the buffer space).
    overflow: Box<[u8; 1]>,
}

impl RxRead {
    fn clear(&mut self) {
        self.tag = u64::MAX;
        self.chains.clear();
        self.iov.0.clear();
        self.iov_start = 0;
        self.capacity = 0;
    }

    /// The iovecs the kernel fills.
    fn live_iov(&self) -> &[libc::iovec] {
        self.iov.0.get(self.iov_start..).unwrap_or(&[])
    }
}

/// The receive side's state besides its queue.
#[derive(Debug)]
pub(super) struct Rx {
    /// The live reads (at most [`MAX_RX_READS`]), each on its own chains.
    reads: Vec<RxRead>,
    /// Reads from before a reset (no read is submitted while one is
    /// here).
    stale: Vec<RxRead>,
    /// A read failed (or the tap said EAGAIN): wait for the VMM's poll of
    /// the tap (or a kick) before reading again.
    pub stalled: bool,
    /// Finished reads' vectors, kept to avoid reallocating.
    spare: Vec<RxRead>,
    /// Tells concurrent reads' tags apart.
    next_slot: u16,
    /// Chains popped and walked but in no read yet.
    pub ready: VecDeque<RxChain>,
    /// Heads in `ready`, in a live read or published as provided
    /// buffers, to refuse a driver posting one twice.
    pub held: Vec<bool>,
    /// Used chains' vectors, kept to avoid reallocating.
    pub pool: Vec<RxChain>,
    /// Finished reads whose frame did not need all their chains: the
    /// chains left, with the iovecs already built for them, which the next
    /// read starts from instead of gathering them again (at most
    /// [`MAX_RX_READS`]).
    leftovers: Vec<RxRead>,
}

impl Rx {
    pub fn new(max: u16) -> Self {
        Self {
            reads: Vec::new(),
            stale: Vec::new(),
            stalled: false,
            spare: Vec::new(),
            next_slot: 0,
            ready: VecDeque::new(),
            held: vec![false; usize::from(max)],
            pool: Vec::new(),
            leftovers: Vec::new(),
        }
    }

    /// Reads the kernel may still be working on.
    pub fn in_flight(&self) -> usize {
        self.reads.len() + self.stale.len()
    }

    /// Whether reads from before the last reset are still in the kernel.
    pub fn has_stale(&self) -> bool {
        !self.stale.is_empty()
    }

    /// Tags of reads from before the last reset.
    pub fn stale_tags(&self) -> impl Iterator<Item = u64> + '_ {
        self.stale.iter().map(|r| r.tag)
    }

    /// Forgets the chains held for the queue (which is gone).
    fn drop_ready(&mut self) {
        while let Some(c) = self.ready.pop_front() {
            self.pool.push(c);
        }
        while let Some(read) = self.leftovers.pop() {
            self.recycle(read);
        }
        self.held.fill(false);
    }

    /// Device reset: live reads become stale (their buffers are the old
    /// driver's) and held chains are forgotten.
    pub fn reset(&mut self) {
        self.stalled = false;
        self.drop_ready();
        for mut read in std::mem::take(&mut self.reads) {
            // Only the iovec array matters until the completion.
            self.pool.extend(read.chains.drain(..));
            self.stale.push(read);
        }
    }

    /// After activation: nothing held from before.
    pub fn activated(&mut self) {
        self.drop_ready();
        self.stalled = false;
    }

    /// Keeps what a finished read did not use for the next read: its
    /// chains after the first `consumed` bytes, and its iovecs advanced past
    /// them (without the overflow byte, which the next read appends again).
    fn keep_leftover(&mut self, mut read: RxRead, consumed: usize) {
        let overflow = read.overflow.as_mut_ptr().cast::<libc::c_void>();
        if read
            .live_iov()
            .last()
            .is_some_and(|v| v.iov_base == overflow)
        {
            read.iov.0.pop();
        }
        let mut skip = consumed;
        let mut whole = 0usize;
        let start = read.iov_start.min(read.iov.0.len());
        for v in &mut read.iov.0[start..] {
            if skip == 0 {
                break;
            }
            if v.iov_len <= skip {
                skip -= v.iov_len;
                whole += 1;
            } else {
                v.iov_base = (v.iov_base as usize).wrapping_add(skip) as *mut libc::c_void;
                v.iov_len -= skip;
                skip = 0;
            }
        }
        read.iov_start = start + whole;
        if read.iov_start * 2 >= read.iov.0.len() {
            read.iov.0.drain(..read.iov_start);
            read.iov_start = 0;
        }
        read.capacity = read.capacity.saturating_sub(consumed);
        read.tag = u64::MAX;
        if skip == 0 && !read.chains.is_empty() && self.leftovers.len() < MAX_RX_READS {
            self.leftovers.push(read);
        } else {
            // Not expected (the iovecs cover the chains exactly): gather
            // the chains again from scratch.
            for c in read.chains.drain(..).rev() {
                self.ready.push_front(c);
            }
            self.recycle(read);
        }
    }

    /// Recycles a finished read; its chains must be gone already.
    fn recycle(&mut self, mut read: RxRead) {
        self.pool.extend(read.chains.drain(..));
        read.clear();
        self.spare.push(read);
    }

    /// Leaks every read's iovecs: the kernel may still write through them.
    pub fn leak_in_flight(&mut self) {
        std::mem::forget(std::mem::take(&mut self.reads));
        std::mem::forget(std::mem::take(&mut self.stale));
    }
}

impl<T: Tap> NetDevice<T> {
    /// Starts tap reads into the posted buffers: one if none is in flight,
    /// more (up to [`MAX_RX_READS`]) while the buffers give each its full
    /// size. Chains popped for an earlier read that its frame did not need
    /// are kept walked in `Rx::ready` and come first; the available ring is
    /// only walked for what they lack.
    pub(super) fn rx_fill<M: GuestMemory>(
        &mut self,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, DeviceError> {
        if let Some(out) = self.pbuf_fill(mem, io)? {
            return Ok(out);
        }
        let mut out = ProcessOutcome::default();
        while self.queues.is_active()
            && self.rx.reads.len() < MAX_RX_READS
            && self.rx.stale.is_empty()
            && !self.pbuf.busy()
            && !self.rx_throttled
        {
            let one = self.rx_fill_one(mem, io)?;
            out.merge(one);
            if one.submitted == 0 {
                break;
            }
        }
        Ok(out)
    }

    fn rx_fill_one<M: GuestMemory>(
        &mut self,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, DeviceError> {
        let mut out = ProcessOutcome::default();
        let mrg = self.queues.acked_features() & F_MRG_RXBUF != 0;
        let fd = self.tap.as_raw_fd();
        let tag = Tag {
            queue: RX_QUEUE as u8,
            generation: self.generation.get(),
            slot: self.rx.next_slot,
        }
        .encode();
        let counters = &mut self.counters;
        let log = &mut self.log;
        let limiter = &mut self.rx_limiter;
        let mut throttled = None;
        let Some(queue) = self.queues.live(RX_QUEUE) else {
            return Ok(out);
        };
        let Rx {
            reads,
            spare,
            ready,
            held,
            pool,
            next_slot,
            leftovers,
            ..
        } = &mut self.rx;
        // What a read gathers: one chain, or with MRG_RXBUF chains up to
        // the largest frame. Only the first read in flight may have less.
        let want = if mrg { MAX_BUFFER_LEN } else { 1 };
        let need_full = !reads.is_empty();
        // A leftover read's chains come first, with their iovecs built.
        let base = leftovers.last().map_or(0, |r| r.capacity);
        let mut have = base;
        for c in ready.iter() {
            if have >= want {
                break;
            }
            have += c.len;
        }
        let budget = queue.size();
        let broken: Option<String> = 'fill: loop {
            if have >= want {
                break 'fill None;
            }
            if let Err(e) = queue.disable_notification(mem) {
                break 'fill Some(format!("disabling notifications: {e}"));
            }
            while out.popped < budget && have < want {
                match pop_chain(queue, mem, held, pool, counters, log) {
                    Ok(Popped::Empty) => break,
                    Ok(Popped::Chain(c)) => {
                        out.popped += 1;
                        have = have.saturating_add(c.len);
                        ready.push_back(c);
                    }
                    Ok(Popped::Refused) => {
                        out.popped += 1;
                        out.answered += 1;
                    }
                    Err(broken) => break 'fill Some(broken),
                }
            }
            if !ready.is_empty() || base > 0 || need_full {
                // A read in flight comes back to the ring when it ends.
                break 'fill None;
            }
            if out.popped >= budget {
                out.more = true;
                break 'fill None;
            }
            // No buffers: ask for a kick when the driver posts some. The
            // tap keeps its frames meanwhile.
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break 'fill None,
                Err(e) => break 'fill Some(format!("enabling notifications: {e}")),
            }
        };
        let mut submit_error = None;
        let mut admitted =
            broken.is_none() && (!ready.is_empty() || base > 0) && (!need_full || have >= want);
        if admitted && !limiter.is_unlimited() {
            // The chains wait in `ready` (or the leftover read) until the
            // limiter's timer fires; the tap keeps the frames meanwhile (and
            // drops what overflows its queue, as a slow receiver's would).
            if let Err(wait) = limiter.try_admit(1) {
                throttled = Some(wait);
                admitted = false;
            }
        }
        if admitted {
            let mut read = match leftovers.pop() {
                Some(read) => read,
                None => {
                    let mut read = spare.pop().unwrap_or_default();
                    read.clear();
                    read
                }
            };
            while let Some(c) = ready.front() {
                // The overflow byte needs one iovec too.
                if !read.chains.is_empty()
                    && (read.capacity >= want || read.live_iov().len() + c.iov.0.len() >= IOV_MAX)
                {
                    break;
                }
                let Some(c) = ready.pop_front() else {
                    break;
                };
                // Buffers a driver carved one after another out of a page
                // are contiguous in guest (and so host) memory: one iovec
                // covers them, and the kernel fills it the same way.
                let mut iovs = c.iov.0.iter();
                let live = read.iov.0.len() > read.iov_start;
                if let (true, Some(last), Some(next)) =
                    (live, read.iov.0.last_mut(), c.iov.0.first())
                {
                    if (last.iov_base as usize).wrapping_add(last.iov_len) == next.iov_base as usize
                    {
                        last.iov_len += next.iov_len;
                        iovs.next();
                    }
                }
                read.iov.0.extend(iovs);
                read.capacity = read.capacity.saturating_add(c.len);
                read.chains.push_back(c);
            }
            if read.live_iov().len() < IOV_MAX {
                let ov = read.overflow.as_mut_ptr();
                read.iov.0.push(libc::iovec {
                    iov_base: ov.cast(),
                    iov_len: 1,
                });
            }
            let live = read.live_iov();
            let (iovecs, iovcnt) = (live.as_ptr(), live.len() as u32);
            let op = IoOp::Readv {
                fd,
                iovecs,
                iovcnt,
                offset: u64::MAX,
            };
            // SAFETY: the iovec array lives in `read`, which moves into
            // `self.rx.reads` below (the Vec's heap buffer does not move)
            // and is neither touched nor dropped until this tag's
            // completion: a reset moves it to `stale`, and dropping the
            // device with it in flight leaks it (see Drop). The buffers are
            // guest memory, mapped for the VM's life and checked by `walk`
            // to lie inside it and be device-writable. The tap fd stays
            // open while ops are in flight.
            match unsafe { io.submit(op, tag) } {
                Ok(()) => {
                    read.tag = tag;
                    *next_slot = next_slot.wrapping_add(1);
                    out.submitted = 1;
                    reads.push(read);
                }
                Err(e) => {
                    // The chains wait in `ready` for the next attempt.
                    while let Some(c) = read.chains.pop_back() {
                        ready.push_front(c);
                    }
                    read.clear();
                    spare.push(read);
                    match e {
                        IoSubmitError::QueueFull => out.blocked = true,
                        e => {
                            counters.rx_errors += 1;
                            submit_error = Some(e);
                        }
                    }
                }
            }
        }
        if out.answered > 0 {
            self.queues.mark_used(RX_QUEUE);
        }
        if let Some(wait) = throttled {
            self.rx_throttled = true;
            out.throttled = true;
            self.throttle(RX_QUEUE, wait);
        }
        if let Some(why) = broken {
            return Err(self.queues.break_queue(RX_QUEUE, why));
        }
        if let Some(e) = submit_error {
            self.rx.stalled = true;
            return Err(DeviceError::Host(format!(
                "tap read could not be submitted: {e}"
            )));
        }
        Ok(out)
    }

    /// Takes a finished read: delivers its frame, then reads again.
    pub(super) fn rx_complete<M: GuestMemory>(
        &mut self,
        tag: u64,
        res: i32,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, DeviceError> {
        if let Some(i) = self.rx.stale.iter().position(|r| r.tag == tag) {
            let old = self.rx.stale.swap_remove(i);
            if res > 0 {
                // A frame went into buffers from before the reset (before
                // the driver saw the reset complete, so it was still ours).
                self.counters.rx_dropped += 1;
            }
            self.rx.recycle(old);
            return self.rx_fill(mem, io);
        }
        let Some(i) = self.rx.reads.iter().position(|r| r.tag == tag) else {
            log::debug!("virtio-net: completion for unknown tag {tag:#x}");
            return Ok(ProcessOutcome::default());
        };
        let mut read = self.rx.reads.swap_remove(i);
        let delivered = self.rx_deliver(&mut read, res, mem);
        match delivered {
            Ok(Some(consumed)) if !read.chains.is_empty() => self.rx.keep_leftover(read, consumed),
            _ => self.rx.recycle(read),
        }
        delivered?;
        if self.rx.stalled {
            return Ok(ProcessOutcome::default());
        }
        self.rx_fill(mem, io)
    }

    /// Answers a finished read: the chains the frame filled go to the used
    /// ring and leave `read`; the rest stay in it for the next read, and the
    /// bytes of the chains used are returned. On a failed or dropped frame
    /// every chain goes back to `Rx::ready` instead.
    fn rx_deliver<M: GuestMemory>(
        &mut self,
        read: &mut RxRead,
        res: i32,
        mem: &M,
    ) -> Result<Option<usize>, DeviceError> {
        let Rx { ready, .. } = &mut self.rx;
        let mut give_back = |read: &mut RxRead, keep: usize| {
            for c in read.chains.drain(keep..).rev() {
                ready.push_front(c);
            }
        };
        if self.queues.queue(RX_QUEUE).is_none() {
            return Ok(None);
        }
        let n = match usize::try_from(res) {
            Err(_) => {
                give_back(read, 0);
                // No frame came: the admission's op is not spent.
                self.rx_limiter.refund(0, 1);
                if res != -libc::EAGAIN {
                    self.counters.rx_errors += 1;
                    self.log
                        .warn("rx-failed", format_args!("tap read failed: errno {}", -res));
                }
                // Do not spin on the tap: wait for the VMM's poll (or a kick).
                self.rx.stalled = true;
                return Ok(None);
            }
            Ok(n) if n <= VNET_HDR_LEN || n > read.capacity => {
                // A tap reports a frame's full length even when it had to
                // cut it short; a frame that did not fit is dropped and the
                // buffers are reused.
                give_back(read, 0);
                self.counters.rx_dropped += 1;
                self.log.warn(
                    "rx-dropped",
                    format_args!(
                        "dropped a {n}-byte frame ({} bytes of buffers posted)",
                        read.capacity
                    ),
                );
                return Ok(None);
            }
            Ok(n) => n,
        };
        // How many chains the n bytes span (each filled before the next).
        let mut left = n;
        let mut chains_used = 0usize;
        for c in &read.chains {
            if left == 0 {
                break;
            }
            left -= c.len.min(left);
            chains_used += 1;
        }
        let num_buffers = chains_used as u16;
        // num_buffers first: the driver may read the frame as soon as the
        // first used entry is published.
        let first = read.chains.front();
        let written = first.is_some_and(|c| write_in_first_iovec(c, num_buffers));
        let hdr = first.map_or(&[][..], |c| &c.segs[..]);
        if !written && !frame::write_at(mem, hdr, NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes()) {
            log::debug!("virtio-net: writing num_buffers failed");
        }
        let mut left = n;
        let mut consumed = 0usize;
        let Rx { held, pool, .. } = &mut self.rx;
        for c in read.chains.drain(..chains_used) {
            let len = c.len.min(left);
            left -= len;
            consumed += c.len;
            if let Some(h) = held.get_mut(usize::from(c.head)) {
                *h = false;
            }
            let used = self
                .queues
                .add_used_batched(RX_QUEUE, mem, c.head, len as u32);
            pool.push(c);
            used?;
        }
        self.counters.rx_packets += 1;
        self.counters.rx_bytes += (n - VNET_HDR_LEN) as u64;
        self.rx_limiter.charge((n - VNET_HDR_LEN) as u64);
        Ok(Some(consumed))
    }
}

/// Writes num_buffers into the header through the host iovec `walk` made
/// for the chain's first descriptor, when the header's field lies in it
/// (the usual case: Linux puts the header at the start of each buffer);
/// false leaves it to [`frame::write_at`]'s guest-memory path.
pub(super) fn write_in_first_iovec(chain: &RxChain, num_buffers: u16) -> bool {
    let bytes = num_buffers.to_le_bytes();
    let Some(v) = chain.iov.0.first() else {
        return false;
    };
    if v.iov_len < NUM_BUFFERS_OFFSET + bytes.len() {
        return false;
    }
    // SAFETY: `walk` checked that this iovec lies inside guest memory,
    // device-writable, and guest memory stays mapped for the VM's life;
    // the two bytes are inside it (checked above). The kernel's read into
    // it has completed; the driver does not read it before the used entry
    // is published. A byte copy, so no alignment is assumed.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            v.iov_base.cast::<u8>().add(NUM_BUFFERS_OFFSET),
            bytes.len(),
        );
    }
    true
}
