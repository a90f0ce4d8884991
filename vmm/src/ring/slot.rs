//! Any virtio device on the ring: the one generic slot that does, for every
//! device, what the device contract (`devices::virtio::VirtioDevice`)
//! leaves to the VMM thread.
//!
//! Per device a slot keeps the transport's ends (one doorbell eventfd per
//! queue, the wake eventfd and the message channel), the buffers the ring
//! reads those eventfds into, which queues want another drain, and the
//! reset hand-off:
//!
//! ```text
//!  Kick{q} ──► process_queue(q) ──► ops on the ring ──► DeviceIo{tag} ──► complete(tag)
//!  TransportMessage ──► Activate: reset if live, activate, serve every queue
//!                   └─► Reset:    reset(), cancel stale_tags(), and only when
//!                                 in_flight() == 0: finish_reset() (Status reads 0)
//!  end of every turn ──► re-run drains that stopped early, end_turn() (interrupts),
//!                        the raised interrupt's irqfd write queued on the ring
//!                        (`irq.rs`), arm the device's PollRequest if it has one
//!  take_throttle() ──► one Timeout on the ring; the queue's kicks are ignored
//!                      until it fires (Throttle{q}) and the queue is served again
//!  pause / resume  ──► set_paused() on every device; resume serves every queue,
//!                      since kicks while paused popped nothing
//! ```
//!
//! The slot never reports a reset complete while the kernel may still
//! write into buffers the driver handed the device: VIRTIO 1.2 §2.4 lets
//! the driver reuse them as soon as Status reads 0.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use devices::rate_limiter::BucketUpdate;
use devices::virtio::{LimiterSide, TransportEvent, VirtioDevice};
use io_uring::{opcode, types::Timespec};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::irq::RingInterrupt;
use super::poll::{AdaptivePoll, PollStats};
use super::{Completion, DeviceIo, Ring, Token};
use crate::metrics::DeviceMetrics;

/// A virtio device as the VMM thread serves it.
pub type DynDevice = dyn VirtioDevice<GuestMemoryMmap>;

/// When a queue's drain must run again without a kick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rerun {
    /// Not needed.
    No,
    /// After completions free room (no slot, full ring).
    AfterCompletions,
    /// On the next turn at once: it stopped at its budget with chains left.
    Now,
}

/// One virtio device and its ends of the transport, owned by the VMM
/// thread. Boxed by [`VirtioDevices`]: the ring holds pointers into its
/// read buffers, so a slot never moves.
#[derive(Debug)]
pub struct DeviceSlot {
    id: String,
    device: Box<DynDevice>,
    kicks: Vec<EventFd>,
    wake: EventFd,
    messages: Receiver<TransportEvent>,
    /// Where the ring reads each doorbell's counter.
    kick_bufs: Vec<[u8; 8]>,
    /// Where the ring reads the wake counter.
    wake_buf: [u8; 8],
    /// Queues whose last drain asked to be resumed, and when.
    rerun: Vec<Rerun>,
    /// A POLLIN for the device's [`devices::virtio::PollRequest`] is armed.
    poll_armed: bool,
    /// Stale tags already asked to be cancelled.
    cancelled: Vec<u64>,
    /// The driver reset the device and waits for Status to read 0, which
    /// it may only once the kernel holds none of the device's buffers.
    reset_waiting: bool,
    batched: bool,
    /// Queues held back by the device's rate limiter until their timer fires.
    throttled: Vec<bool>,
    /// Each queue's throttle timer; read by the kernel when the Timeout is
    /// submitted, so it lives in this boxed slot.
    throttle_time: Vec<Timespec>,
    /// The device's interrupt, when it was built with the other end
    /// ([`RingInterrupt::new`]); `None`: the device signals on its own.
    interrupt: Option<RingInterrupt>,
}

impl DeviceSlot {
    /// A slot for `device` (named `id` in logs and metrics) with the
    /// transport's ends: one doorbell per queue, the wake eventfd and the
    /// message channel, and the interrupt the slot sends through the ring
    /// for it (when the device was built with its [`super::irq::RaisedLine`]).
    pub fn new(
        id: String,
        device: Box<DynDevice>,
        kicks: Vec<EventFd>,
        wake: EventFd,
        messages: Receiver<TransportEvent>,
        interrupt: Option<RingInterrupt>,
    ) -> Self {
        let queues = kicks.len();
        let batched = device.batch_completions();
        Self {
            id,
            device,
            kicks,
            wake,
            messages,
            kick_bufs: vec![[0; 8]; queues],
            wake_buf: [0; 8],
            rerun: vec![Rerun::No; queues],
            poll_armed: false,
            cancelled: Vec::new(),
            reset_waiting: false,
            batched,
            throttled: vec![false; queues],
            throttle_time: vec![Timespec::new(); queues],
            interrupt,
        }
    }

    /// The name the user gave the device.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The device, for management calls (PATCH /drives).
    pub fn device_mut(&mut self) -> &mut DynDevice {
        self.device.as_mut()
    }

    fn io<'r>(&self, ring: &'r mut Ring, index: u8) -> DeviceIo<'r> {
        DeviceIo::new(ring, index, self.batched)
    }

    fn arm_kick(&mut self, ring: &mut Ring, index: u8, queue: usize) -> io::Result<()> {
        let (Some(kick), Some(buf)) = (self.kicks.get(queue), self.kick_bufs.get_mut(queue)) else {
            return Ok(());
        };
        let token = Token::Kick {
            device: index,
            queue: queue as u16,
        };
        // SAFETY: the buffer lives in this boxed slot, which the owner of
        // the ring keeps until after the ring is dropped.
        unsafe { ring.arm_eventfd(kick.as_raw_fd(), buf, token) }
    }

    fn arm_wake(&mut self, ring: &mut Ring, index: u8) -> io::Result<()> {
        let fd: RawFd = self.wake.as_raw_fd();
        // SAFETY: as for the kicks.
        unsafe {
            ring.arm_eventfd(
                fd,
                &mut self.wake_buf,
                Token::TransportMessage { device: index },
            )
        }
    }

    fn serve(&mut self, queue: usize, ring: &mut Ring, mem: &GuestMemoryMmap, index: u8) {
        let Some(rerun) = self.rerun.get_mut(queue) else {
            return;
        };
        *rerun = Rerun::No;
        // A throttled queue waits for its timer, whatever the driver kicks.
        if !self.device.is_active() || self.throttled.get(queue).copied().unwrap_or(false) {
            return;
        }
        let mut io = DeviceIo::new(ring, index, self.batched);
        match self.device.process_queue(queue, mem, &mut io) {
            Ok(outcome) => {
                if let Some(r) = self.rerun.get_mut(queue) {
                    *r = if outcome.more {
                        Rerun::Now
                    } else if outcome.blocked {
                        Rerun::AfterCompletions
                    } else {
                        Rerun::No
                    };
                }
            }
            // A broken queue already asked the driver for a reset and
            // logged why; anything else is the host's and worth a line.
            Err(e) => log::debug!("{} {}: queue {queue}: {e}", self.device.kind(), self.id),
        }
    }

    /// Applies every pending activation or reset message.
    fn on_transport_message(&mut self, ring: &mut Ring, mem: &GuestMemoryMmap, index: u8) {
        while let Ok(event) = self.messages.try_recv() {
            match event {
                TransportEvent::Activate(activation) => {
                    if self.device.is_active() {
                        self.device.reset();
                    }
                    match self.device.activate(mem, &activation) {
                        Ok(()) => {
                            // A driver may kick before DRIVER_OK: serve
                            // whatever already waits.
                            for queue in 0..self.kicks.len() {
                                self.serve(queue, ring, mem, index);
                            }
                        }
                        Err(e) => {
                            log::warn!(
                                "{} {}: activation refused: {e}",
                                self.device.kind(),
                                self.id
                            );
                            self.device.request_reset();
                        }
                    }
                }
                TransportEvent::Reset => {
                    self.device.reset();
                    self.rerun.fill(Rerun::No);
                    // A timer still armed fires into an idle queue: harmless.
                    self.throttled.fill(false);
                    self.reset_waiting = true;
                }
            }
        }
    }

    /// What follows any event: cancelling ops a reset left behind,
    /// reporting the reset done once none is left, and watching the fd the
    /// device waits on.
    fn settle(&mut self, ring: &mut Ring, index: u8) -> io::Result<()> {
        for tag in self.device.stale_tags() {
            if self.cancelled.contains(&tag) {
                continue;
            }
            let target = Token::DeviceIo {
                device: index,
                tag,
                batched: self.batched,
            };
            ring.cancel(target, Token::Cancel)?;
            self.cancelled.push(tag);
        }
        if self.reset_waiting && self.device.in_flight() == 0 {
            self.reset_waiting = false;
            self.cancelled.clear();
            // No used-ring write or interrupt can come from the device now,
            // and the kernel holds none of its buffers.
            self.device.info().shared.finish_reset();
        }
        if !self.poll_armed {
            if let Some(poll) = self.device.poll_request() {
                self.poll_armed = true;
                ring.poll_readable(poll.fd, Token::DevicePoll { device: index })?;
            }
        }
        while let Some(throttle) = self.device.take_throttle() {
            self.arm_throttle(ring, index, throttle.queue, throttle.resume_after)?;
        }
        Ok(())
    }

    /// Holds `queue` back for `after` (the device's limiter said when it
    /// will have the tokens) with one Timeout on the ring.
    fn arm_throttle(
        &mut self,
        ring: &mut Ring,
        index: u8,
        queue: usize,
        after: std::time::Duration,
    ) -> io::Result<()> {
        let (Some(throttled), Some(time)) = (
            self.throttled.get_mut(queue),
            self.throttle_time.get_mut(queue),
        ) else {
            return Ok(());
        };
        if *throttled {
            return Ok(());
        }
        *throttled = true;
        // At least 1 µs: a zero Timeout completes at once and would spin.
        let after = after.max(std::time::Duration::from_micros(1));
        *time = Timespec::new()
            .sec(after.as_secs())
            .nsec(after.subsec_nanos());
        let timeout = opcode::Timeout::new(time as *const Timespec).build();
        let token = Token::Throttle {
            device: index,
            queue: queue as u16,
        };
        // SAFETY: the timespec lives in this boxed slot, which outlives the
        // ring; a Timeout reads it when submitted and points at nothing else.
        unsafe { ring.push(timeout, token) }
    }

    /// Ends `queue`'s throttle (its timer fired, or a live update may
    /// have lifted the limit) and serves it.
    fn unthrottle(&mut self, queue: usize, ring: &mut Ring, mem: &GuestMemoryMmap, index: u8) {
        if let Some(t) = self.throttled.get_mut(queue) {
            *t = false;
        }
        self.serve(queue, ring, mem, index);
    }

    fn wants_rerun(&self) -> bool {
        self.rerun.iter().any(|r| *r != Rerun::No)
    }
}

/// Every virtio device the VMM thread serves; device `i` is slot `i`.
#[derive(Debug, Default)]
pub struct VirtioDevices {
    // Boxed: the ring holds pointers into each slot's read buffers, so a
    // slot must never move, whatever happens to the vector.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<DeviceSlot>>,
    /// How long to watch the request queues before sleeping (`poll.rs`).
    poll: AdaptivePoll,
    /// What the devices were last told by [`Self::set_polling`].
    polling: bool,
    /// A request queue was drained since polling last ran out: the guest
    /// is sending requests.
    requests_seen: bool,
}

impl VirtioDevices {
    /// Adds a slot; it gets the next index (at most 256 devices, far more
    /// than the machine has IRQ lines for).
    pub fn push(&mut self, mut slot: DeviceSlot) {
        slot.device.queues_mut().set_polling(self.polling);
        self.slots.push(Box::new(slot));
    }

    /// The slots, in index order.
    pub fn slots(&self) -> impl Iterator<Item = &DeviceSlot> {
        self.slots.iter().map(|s| s.as_ref())
    }

    /// The device named `id` as its concrete type `T`, for management
    /// calls only one kind has.
    pub fn device_mut<T: 'static>(&mut self, id: &str) -> Option<&mut T> {
        self.slots
            .iter_mut()
            .find(|s| s.id == id)
            .and_then(|s| s.device.as_any_mut().downcast_mut::<T>())
    }

    /// Applies a live limiter update (`PATCH /drives`,
    /// `PATCH /network-interfaces`) to device `id`'s limiter `side`, and
    /// serves its throttled queues at once: the new limits may let them go.
    /// `false` when the device has no such limiter.
    pub fn update_rate_limiter(
        &mut self,
        id: &str,
        side: LimiterSide,
        update: (BucketUpdate, BucketUpdate),
        ring: &mut Ring,
        mem: &GuestMemoryMmap,
    ) -> io::Result<bool> {
        let Some((index, slot)) = self.slots.iter_mut().enumerate().find(|(_, s)| s.id == id)
        else {
            return Ok(false);
        };
        let index = index as u8;
        let Some(limiter) = slot.device.rate_limiter_mut(side) else {
            return Ok(false);
        };
        limiter.update(update.0, update.1);
        for queue in 0..slot.throttled.len() {
            if slot.throttled.get(queue).copied().unwrap_or(false) {
                slot.unthrottle(queue, ring, mem, index);
            }
        }
        slot.settle(ring, index)?;
        Ok(true)
    }

    /// Stops every device from taking new work while the VM is paused
    /// (`PATCH /vm`), or lets them go on, serving every queue: kicks that
    /// came while paused popped nothing.
    pub fn set_paused(
        &mut self,
        paused: bool,
        ring: &mut Ring,
        mem: &GuestMemoryMmap,
    ) -> io::Result<()> {
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let index = index as u8;
            slot.device.set_paused(paused);
            if !paused {
                for queue in 0..slot.kicks.len() {
                    slot.serve(queue, ring, mem, index);
                }
            }
            slot.settle(ring, index)?;
        }
        Ok(())
    }

    /// Every device's counters, for a metrics line or the API.
    pub fn metrics(&self) -> Vec<DeviceMetrics> {
        self.slots
            .iter()
            .map(|s| DeviceMetrics {
                kind: s.device.kind(),
                id: s.id.clone(),
                fields: s.device.metrics(),
            })
            .collect()
    }

    /// Arms every doorbell and wake eventfd; call once before the first turn.
    pub fn arm(&mut self, ring: &mut Ring) -> io::Result<()> {
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let index = index as u8;
            for queue in 0..slot.kicks.len() {
                slot.arm_kick(ring, index, queue)?;
            }
            slot.arm_wake(ring, index)?;
        }
        Ok(())
    }

    /// Whether a completion with `token` is a device's.
    pub fn owns(token: Token) -> bool {
        matches!(
            token,
            Token::Kick { .. }
                | Token::TransportMessage { .. }
                | Token::DeviceIo { .. }
                | Token::DevicePoll { .. }
                | Token::Throttle { .. }
                | Token::Interrupt { .. }
                | Token::Cancel
        )
    }

    /// Handles one completion [`Self::owns`] said is a device's.
    pub fn dispatch(
        &mut self,
        token: Token,
        result: i32,
        ring: &mut Ring,
        mem: &GuestMemoryMmap,
    ) -> io::Result<()> {
        let (index, slot) = match token {
            Token::Kick { device, .. }
            | Token::TransportMessage { device }
            | Token::DeviceIo { device, .. }
            | Token::DevicePoll { device }
            | Token::Throttle { device, .. }
            | Token::Interrupt { device } => match self.slots.get_mut(usize::from(device)) {
                Some(slot) => (device, slot),
                None => {
                    log::warn!("completion for unknown device {device}");
                    return Ok(());
                }
            },
            _ => return Ok(()),
        };
        match token {
            Token::Kick { queue, .. } => {
                slot.serve(usize::from(queue), ring, mem, index);
                slot.arm_kick(ring, index, usize::from(queue))?;
            }
            Token::TransportMessage { .. } => {
                slot.on_transport_message(ring, mem, index);
                slot.arm_wake(ring, index)?;
            }
            Token::DevicePoll { .. } => {
                slot.poll_armed = false;
                if let Some(poll) = slot.device.poll_request() {
                    slot.serve(poll.queue, ring, mem, index);
                }
            }
            Token::Throttle { queue, .. } => {
                slot.unthrottle(usize::from(queue), ring, mem, index);
            }
            Token::DeviceIo { tag, .. } => {
                slot.cancelled.retain(|t| *t != tag);
                let mut io = slot.io(ring, index);
                slot.device.complete(tag, result, mem, &mut io);
            }
            Token::Interrupt { .. } => {
                log::warn!(
                    "{}: interrupt write on the ring failed ({}), writing it directly",
                    slot.id,
                    io::Error::from_raw_os_error(-result)
                );
                if let Some(Err(e)) = slot.interrupt.as_ref().map(RingInterrupt::retry) {
                    log::error!("{}: interrupt failed: {e}", slot.id);
                }
                return Ok(());
            }
            _ => {}
        }
        slot.settle(ring, index)
    }

    /// Once per loop turn, after its completions: resumes drains that
    /// stopped at their budget or on a full table, and lets every device
    /// make its one interrupt decision for the turn.
    pub fn end_turn(&mut self, ring: &mut Ring, mem: &GuestMemoryMmap) -> io::Result<()> {
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let index = index as u8;
            if slot.wants_rerun() {
                for queue in 0..slot.rerun.len() {
                    if slot.rerun.get(queue).is_some_and(|r| *r != Rerun::No) {
                        slot.serve(queue, ring, mem, index);
                    }
                }
                slot.settle(ring, index)?;
            }
            slot.device.end_turn(mem);
            if let Some(irq) = &slot.interrupt {
                if let Err(e) = irq.deliver(ring, index) {
                    log::error!("{}: interrupt failed: {e}", slot.id);
                }
            }
        }
        Ok(())
    }

    /// Sets the largest polling window (`--poll-max-us`); zero: the VMM
    /// thread never polls and the driver notifies every time.
    pub fn set_poll_max(&mut self, max: Duration) {
        self.poll = AdaptivePoll::new(max);
    }

    /// What polling did so far.
    pub fn poll_stats(&self) -> PollStats {
        self.poll.stats()
    }

    /// One turn of `ring` for the VMM thread's loop: unless work is
    /// pending, first polls the request queues the last drains left quiet
    /// (and the ring's completions) for the adaptive window, serving what
    /// the driver adds there without its notification; sleeps only once
    /// every queue notifies again; then turns the ring, appending its
    /// completions to `out` for the caller to dispatch. How long a sleep
    /// lasted adapts the window.
    pub fn turn(
        &mut self,
        ring: &mut Ring,
        mem: &GuestMemoryMmap,
        out: &mut Vec<Completion>,
    ) -> io::Result<()> {
        if !self.ready_to_sleep(ring, mem)? {
            return ring.turn(out, false);
        }
        if self.poll.max().is_zero() {
            return ring.turn(out, true);
        }
        let from = Instant::now();
        ring.turn(out, true)?;
        self.poll.slept(from.elapsed());
        Ok(())
    }

    /// Whether the next turn may sleep: nothing is pending, polling found
    /// nothing, and every queue notifies again (chains that raced in
    /// before that are served first, and the turn then does not sleep).
    fn ready_to_sleep(&mut self, ring: &mut Ring, mem: &GuestMemoryMmap) -> io::Result<bool> {
        if self.has_work_now() {
            return Ok(false);
        }
        // With a batch of slow disk operations in flight the turn waits
        // for a share of them (`batch.rs`); polling would end at the first
        // one and cut the batch into pieces (tmpfs 4 KiB QD32: 8 requests
        // per turn without polling, 2.5 with it, 0.24 -> 0.59 syscalls per
        // request).
        let window = if ring.waits_for_batch() {
            Duration::ZERO
        } else {
            self.poll.window()
        };
        self.set_polling(!window.is_zero());
        // Polling pays only while the guest sends requests (a queue left
        // quiet, or drained since the last miss: its next notification is
        // near); spinning for completions alone, say a tap's frames, is
        // what the sleeping turn does anyway and takes a CPU the other
        // threads need (net RX 1514 B: 0.66x -> 0.57x of the tap with a
        // 100 µs window).
        for slot in &mut self.slots {
            self.requests_seen |= slot.device.queues_mut().take_drained();
        }
        let watched =
            self.requests_seen || self.slots.iter().any(|s| s.device.queues().any_quiet());
        if !window.is_zero() && watched {
            if self.poll_for_work(ring, mem, window)? {
                self.poll.hit();
                return Ok(false);
            }
            self.poll.miss();
            self.requests_seen = false;
        }
        self.set_polling(false);
        let mut served = false;
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let index = index as u8;
            let mut served_here = false;
            // Each drain below notifies again (polling is off), so this
            // ends once no quiet queue is left.
            while let Some(queue) = slot.device.queues_mut().notify_again(mem) {
                slot.serve(queue, ring, mem, index);
                served_here = true;
            }
            if served_here {
                slot.settle(ring, index)?;
                served = true;
            }
        }
        // Drains after the sleep (a kick) leave their queue quiet again,
        // so the next turn has a queue to watch.
        self.set_polling(!window.is_zero());
        Ok(!served)
    }

    /// Tells every device whether its drains leave notifications off.
    fn set_polling(&mut self, polling: bool) {
        if polling == self.polling {
            return;
        }
        self.polling = polling;
        for slot in &mut self.slots {
            slot.device.queues_mut().set_polling(polling);
        }
    }

    /// Watches, for up to `window`, the ring's completions and the quiet
    /// request queues; serves the first queue found with chains. Operations
    /// the last turn queued go to the kernel first, so they run meanwhile.
    /// `true`: something was found, the next turn must not sleep.
    fn poll_for_work(
        &mut self,
        ring: &mut Ring,
        mem: &GuestMemoryMmap,
        window: Duration,
    ) -> io::Result<bool> {
        if ring.has_queued() {
            ring.flush()?;
        }
        let start = Instant::now();
        loop {
            if ring.completions_ready() {
                return Ok(true);
            }
            for (index, slot) in self.slots.iter_mut().enumerate() {
                let throttled = &slot.throttled;
                let found = slot
                    .device
                    .queues()
                    .quiet_with_chains(mem, |q| throttled.get(q).copied().unwrap_or(false));
                if let Some(queue) = found {
                    let index = index as u8;
                    slot.serve(queue, ring, mem, index);
                    slot.settle(ring, index)?;
                    return Ok(true);
                }
            }
            if start.elapsed() >= window {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Whether a device has work pending that no completion will wake the
    /// loop for (a drain that stopped at its budget): the next turn must
    /// not sleep.
    pub fn has_work_now(&self) -> bool {
        self.slots.iter().any(|s| s.rerun.contains(&Rerun::Now))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::mpsc::{channel, Sender};

    use devices::io::fake::CountingLine;
    use devices::rate_limiter::{
        BucketConfig, DeviceRateLimiter, MonotonicClock, RateLimiter, SharedClock,
    };
    use devices::virtio::net::tap::fake::FakeTap;
    use devices::virtio::net::{NetConfig, NetDevice, FEATURES, F_MRG_RXBUF, RX_QUEUE};
    use devices::virtio::testing::DriverQueue;
    use devices::virtio::{Activation, DeviceShared, F_EVENT_IDX};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    struct Rig {
        mem: GuestMemoryMmap,
        ring: Ring,
        devices: VirtioDevices,
        shared: std::sync::Arc<DeviceShared>,
        messages: Sender<TransportEvent>,
        wake: EventFd,
        kicks: Vec<EventFd>,
        host: std::os::fd::OwnedFd,
        rxq: DriverQueue<GuestMemoryMmap>,
    }

    impl Rig {
        fn new() -> Self {
            Self::with_tx_limiter(DeviceRateLimiter::default())
        }

        fn with_tx_limiter(tx: DeviceRateLimiter) -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
            let (tap, host) = FakeTap::new().expect("socketpair");
            let mut dev = NetDevice::new(
                NetConfig { tap, mac: None },
                Box::new(CountingLine::default()),
            );
            dev.set_rate_limiters(DeviceRateLimiter::default(), tx);
            let shared = VirtioDevice::<GuestMemoryMmap>::info(&dev).shared;
            let kicks: Vec<EventFd> = (0..2)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
                .collect();
            let wake = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            let (tx, rx) = channel();
            let slot = DeviceSlot::new(
                "eth0".into(),
                Box::new(dev),
                kicks
                    .iter()
                    .map(|k| k.try_clone().expect("clone"))
                    .collect(),
                wake.try_clone().expect("clone"),
                rx,
                None,
            );
            let mut devices = VirtioDevices::default();
            devices.push(slot);
            let mut ring = Ring::new().expect("ring");
            devices.arm(&mut ring).expect("arm");
            let rxq = DriverQueue::new(mem.clone(), 0x1_0000, 16);
            Self {
                mem,
                ring,
                devices,
                shared,
                messages: tx,
                wake,
                kicks,
                host,
                rxq,
            }
        }

        /// Turns the ring until nothing more arrives within a few turns.
        fn settle(&mut self) {
            for _ in 0..8 {
                self.turn();
            }
        }

        /// One loop turn, woken by a completion or after 20 ms.
        fn turn(&mut self) {
            let mut out = Vec::new();
            {
                out.clear();
                let ts = io_uring::types::Timespec::new().nsec(20_000_000);
                let timeout = io_uring::opcode::Timeout::new(&ts).build();
                // SAFETY: `ts` outlives the turn below, which waits for the
                // timeout (or an earlier completion; the timeout is then
                // cancelled with the ring at the end of the test).
                unsafe { self.ring.push(timeout, Token::HaltProbe) }.expect("timeout");
                self.ring.turn(&mut out, true).expect("turn");
                for c in out.iter().copied() {
                    if VirtioDevices::owns(c.token) {
                        self.devices
                            .dispatch(c.token, c.result, &mut self.ring, &self.mem)
                            .expect("dispatch");
                    }
                }
                self.devices
                    .end_turn(&mut self.ring, &self.mem)
                    .expect("end turn");
            }
        }

        /// One turn as the VMM thread's loop takes it, polling included
        /// ([`VirtioDevices::turn`]), woken by a completion or after 20 ms.
        fn poll_turn(&mut self) {
            let mut out = Vec::new();
            let ts = io_uring::types::Timespec::new().nsec(20_000_000);
            let timeout = io_uring::opcode::Timeout::new(&ts).build();
            // SAFETY: the kernel copies `ts` when the timeout is submitted,
            // which `turn` does before it returns.
            unsafe { self.ring.push(timeout, Token::HaltProbe) }.expect("timeout");
            self.devices
                .turn(&mut self.ring, &self.mem, &mut out)
                .expect("turn");
            for c in out.iter().copied() {
                if VirtioDevices::owns(c.token) {
                    self.devices
                        .dispatch(c.token, c.result, &mut self.ring, &self.mem)
                        .expect("dispatch");
                }
            }
            self.devices
                .end_turn(&mut self.ring, &self.mem)
                .expect("end turn");
        }

        /// Opens the polling window at `window` (as a run of short sleeps
        /// would).
        fn open_poll_window(&mut self, window: std::time::Duration) {
            self.devices.set_poll_max(window);
            for _ in 0..32 {
                self.devices.poll.slept(std::time::Duration::ZERO);
            }
            assert_eq!(self.devices.poll.window(), window);
        }

        fn send(&self, event: TransportEvent) {
            self.messages.send(event).expect("send");
            self.wake.write(1).expect("wake");
        }
    }

    /// Bug: a reset was reported done (Status read 0) while a tap read the
    /// kernel still held could write into the driver's buffers.
    #[test]
    fn a_reset_is_reported_done_only_after_the_kernel_let_go_of_the_buffers() {
        let mut rig = Rig::new();
        let txq = DriverQueue::new(rig.mem.clone(), 0x2_0000, 16);
        rig.send(TransportEvent::Activate(Activation {
            features: FEATURES & !F_MRG_RXBUF & !F_EVENT_IDX,
            queues: vec![rig.rxq.config(), txq.config()],
        }));
        rig.settle();
        // A posted buffer: the device parks a read on the idle tap.
        rig.mem
            .write_slice(&[0xaa; 2048], GuestAddress(0x8_0000))
            .expect("fill");
        rig.rxq
            .push(&[(0x8_0000, 2048, DriverQueue::<GuestMemoryMmap>::WRITE)]);
        rig.kicks[RX_QUEUE].write(1).expect("kick");
        rig.settle();
        assert!(rig.ring.in_flight() >= 1, "a read is parked on the tap");

        // The driver resets; the transport marks the reset pending.
        rig.shared.begin_reset();
        rig.messages.send(TransportEvent::Reset).expect("send");
        rig.devices
            .dispatch(
                Token::TransportMessage { device: 0 },
                8,
                &mut rig.ring,
                &rig.mem,
            )
            .expect("dispatch");
        assert!(
            rig.shared.reset_pending(),
            "Status must not read 0 while the parked read may still land"
        );
        // The slot cancelled the read; once its completion is in, the reset
        // is done, and a frame sent now reaches no guest buffer.
        rig.settle();
        assert!(!rig.shared.reset_pending(), "the reset never completed");
        // SAFETY: sends from a live buffer.
        let sent = unsafe { libc::send(rig.host.as_raw_fd(), [0x55u8; 64].as_ptr().cast(), 64, 0) };
        assert_eq!(sent, 64);
        rig.settle();
        let mut page = [0u8; 2048];
        rig.mem
            .read_slice(&mut page, GuestAddress(0x8_0000))
            .expect("read");
        assert!(
            page.iter().all(|b| *b == 0xaa),
            "a frame landed after the reset"
        );
        assert!(rig.rxq.used_entries().is_empty());
    }

    fn recv(host: &std::os::fd::OwnedFd) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        // SAFETY: receives into a live buffer of the given length.
        let n = unsafe {
            libc::recv(
                host.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let n = usize::try_from(n).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    fn activate_plain(rig: &mut Rig, txq: &DriverQueue<GuestMemoryMmap>) {
        rig.send(TransportEvent::Activate(Activation {
            features: FEATURES & !F_MRG_RXBUF & !F_EVENT_IDX,
            queues: vec![rig.rxq.config(), txq.config()],
        }));
        rig.settle();
    }

    /// Three frames through a TX limit of one frame per 60 ms: the slot's
    /// timer on the ring releases them, never faster than the limit, with
    /// no kick from the driver after the first.
    #[test]
    fn a_throttled_queue_is_served_again_by_its_timer_not_faster() {
        let ops = BucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time_ms: 60,
        };
        let clock: SharedClock = std::sync::Arc::new(MonotonicClock);
        let limiter = RateLimiter::new(None, Some(ops), clock);
        let mut rig = Rig::with_tx_limiter(limiter);
        let mut txq = DriverQueue::new(rig.mem.clone(), 0x2_0000, 16);
        activate_plain(&mut rig, &txq);
        for n in 0..3u64 {
            let frame = vec![n as u8; 12 + 60];
            rig.mem
                .write_slice(&frame, GuestAddress(0x8_0000 + n * 0x1000))
                .expect("frame");
            txq.push(&[(0x8_0000 + n * 0x1000, frame.len() as u32, 0)]);
        }
        let start = std::time::Instant::now();
        rig.kicks[1].write(1).expect("kick");
        let mut arrived = Vec::new();
        while arrived.len() < 3 && start.elapsed() < std::time::Duration::from_secs(10) {
            rig.turn();
            while let Some(f) = recv(&rig.host) {
                arrived.push((f[12], start.elapsed()));
            }
        }
        let order: Vec<u8> = arrived.iter().map(|(n, _)| *n).collect();
        assert_eq!(order, vec![0, 1, 2], "frames lost or out of order");
        // The third frame needs two refills of 60 ms each.
        assert!(
            arrived[2].1 >= std::time::Duration::from_millis(119),
            "the limit was exceeded: {arrived:?}"
        );
        assert_eq!(txq.used_entries().len(), 3);
        let metrics = &rig.devices.metrics()[0].fields;
        assert!(metrics["tx_rate_limiter_throttled"].as_u64() >= Some(2));
    }

    /// Polling: after a drain the queue is left quiet (EVENT_IDX tells the
    /// driver not to notify) and the next frame is sent without a kick;
    /// once the window runs out, the driver is asked to notify again before
    /// the thread sleeps, so nothing added while it sleeps can be missed.
    #[test]
    fn polling_serves_frames_without_kicks_and_sleeps_only_with_notifications_on() {
        let mut rig = Rig::new();
        let mut txq = DriverQueue::new(rig.mem.clone(), 0x2_0000, 16);
        rig.send(TransportEvent::Activate(Activation {
            features: FEATURES & !F_MRG_RXBUF,
            queues: vec![rig.rxq.config(), txq.config()],
        }));
        rig.settle();
        rig.open_poll_window(std::time::Duration::from_millis(50));
        let frame = |n: u64| (0x8_0000 + n * 0x1000, 72u32, 0u16);
        let mut send_frame = |rig: &mut Rig, n: u64| -> bool {
            rig.mem
                .write_slice(&[n as u8; 72], GuestAddress(frame(n).0))
                .expect("frame");
            let old = txq.avail_idx();
            txq.push(&[frame(n)]);
            txq.kick_wanted(old, txq.avail_idx())
        };
        let arrives = |rig: &mut Rig, n: u8| {
            let start = std::time::Instant::now();
            while start.elapsed() < std::time::Duration::from_secs(5) {
                rig.poll_turn();
                if let Some(f) = recv(&rig.host) {
                    assert_eq!(f[0], n, "frame {n} expected");
                    return;
                }
            }
            panic!("frame {n} never sent");
        };

        assert!(send_frame(&mut rig, 0), "an idle queue wants a kick");
        rig.kicks[1].write(1).expect("kick");
        arrives(&mut rig, 0);
        let hits_before = rig.devices.poll_stats().hits;
        assert!(
            !send_frame(&mut rig, 1),
            "the driver was asked to notify while the VMM thread polls"
        );
        arrives(&mut rig, 1);
        assert!(rig.devices.poll_stats().hits > hits_before);

        // A window too short to see anything: the thread sleeps, and only
        // after turning notifications back on.
        rig.open_poll_window(std::time::Duration::from_micros(2));
        let misses_before = rig.devices.poll_stats().misses;
        rig.poll_turn();
        assert!(rig.devices.poll_stats().misses > misses_before);
        assert!(
            send_frame(&mut rig, 2),
            "the thread slept with the driver's notifications off"
        );
        rig.kicks[1].write(1).expect("kick");
        arrives(&mut rig, 2);
        assert_eq!(txq.used_entries().len(), 3);
    }

    /// With polling off (`--poll-max-us 0`) every drain leaves the queue
    /// notifying, so each frame the driver adds asks for a kick.
    #[test]
    fn with_polling_off_every_frame_is_kicked_for() {
        let mut rig = Rig::new();
        let mut txq = DriverQueue::new(rig.mem.clone(), 0x2_0000, 16);
        rig.send(TransportEvent::Activate(Activation {
            features: FEATURES & !F_MRG_RXBUF,
            queues: vec![rig.rxq.config(), txq.config()],
        }));
        rig.settle();
        rig.devices.set_poll_max(std::time::Duration::ZERO);
        for n in 0..3u8 {
            rig.mem
                .write_slice(&[n; 72], GuestAddress(0x8_0000))
                .expect("frame");
            let old = txq.avail_idx();
            txq.push(&[(0x8_0000, 72, 0)]);
            assert!(txq.kick_wanted(old, txq.avail_idx()), "frame {n}");
            rig.kicks[1].write(1).expect("kick");
            rig.poll_turn();
            rig.poll_turn();
            assert_eq!(recv(&rig.host).map(|f| f[0]), Some(n));
        }
        assert_eq!(rig.devices.poll_stats().hits, 0);
    }

    /// While paused, kicks pop nothing; resuming serves what waited.
    #[test]
    fn a_paused_vm_takes_no_new_requests_until_resumed() {
        let mut rig = Rig::new();
        let mut txq = DriverQueue::new(rig.mem.clone(), 0x2_0000, 16);
        activate_plain(&mut rig, &txq);
        rig.devices
            .set_paused(true, &mut rig.ring, &rig.mem)
            .expect("pause");
        rig.mem
            .write_slice(&[7u8; 72], GuestAddress(0x8_0000))
            .expect("frame");
        txq.push(&[(0x8_0000, 72, 0)]);
        rig.kicks[1].write(1).expect("kick");
        rig.settle();
        assert_eq!(recv(&rig.host), None, "a paused VM sent a frame");
        assert!(txq.used_entries().is_empty());
        rig.devices
            .set_paused(false, &mut rig.ring, &rig.mem)
            .expect("resume");
        rig.settle();
        assert_eq!(recv(&rig.host).map(|f| f.len()), Some(72));
        assert_eq!(txq.used_entries().len(), 1);
    }
}
