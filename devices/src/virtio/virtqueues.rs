//! A device's queues and interrupt, with the rules every device shares:
//! activation checks, the bounded drain of an available ring, used-ring
//! writes, and one interrupt decision per loop turn.
//!
//! Written once here so that a device is only its own request handling:
//! block, net and rng all keep a [`Virtqueues`] and call [`drain`].

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use super::used_batch::{UsedBatch, UsedRingHost};

use super::device::{DeviceError, ProcessOutcome};
use super::queue::driver_wants_interrupt;
use super::{Activation, Interrupt, F_EVENT_IDX, F_VERSION_1};
use crate::guest_log::GuestLog;

#[derive(Debug)]
struct QueueSlot {
    max: u16,
    queue: Option<Queue>,
    /// Corrupt: nothing more is popped until reset.
    broken: bool,
    /// Used entries were added since the last interrupt decision.
    used_pending: bool,
    /// Used entries written without their used.idx store (see
    /// [`Virtqueues::add_used_batched`]).
    batch: UsedBatch,
    /// A polling drain left the driver's notifications off: the VMM
    /// thread watches this queue's available ring itself until it turns
    /// them back on ([`Virtqueues::notify_again`]) before sleeping.
    quiet: bool,
}

/// The queues of one device, its interrupt and the features the driver
/// acknowledged.
#[derive(Debug)]
pub struct Virtqueues {
    kind: &'static str,
    queues: Vec<QueueSlot>,
    irq: Interrupt,
    acked_features: u64,
    active: bool,
    /// Times the device asked the driver for a reset.
    resets_requested: u64,
    /// A driver can break its queue, reset and break it again at will.
    log: GuestLog,
    /// The VM is paused: nothing is popped (completions are still
    /// answered), so a paused guest's queues stay as it left them.
    paused: bool,
    /// The VMM thread is polling: drains leave notifications off.
    polling: bool,
    /// A drain took a chain since [`Self::take_drained`] last asked.
    drained: bool,
}

impl Virtqueues {
    /// Queues of the given maximum sizes (their count is the device's queue
    /// count), signalling through `irq`; `kind` names the device in logs
    /// ("virtio-blk").
    pub fn new(kind: &'static str, max_sizes: &[u16], irq: Interrupt) -> Self {
        Self {
            kind,
            queues: max_sizes
                .iter()
                .map(|&max| QueueSlot {
                    max,
                    queue: None,
                    broken: false,
                    used_pending: false,
                    batch: UsedBatch::default(),
                    quiet: false,
                })
                .collect(),
            irq,
            acked_features: 0,
            active: false,
            resets_requested: 0,
            log: GuestLog::new(kind),
            paused: false,
            polling: false,
            drained: false,
        }
    }

    /// QueueNumMax of each queue, for the transport.
    pub fn max_sizes(&self) -> Vec<u16> {
        self.queues.iter().map(|q| q.max).collect()
    }

    /// The device's interrupt (and the state it shares with the transport).
    pub fn interrupt(&self) -> &Interrupt {
        &self.irq
    }

    /// Features the driver acknowledged at the last activation.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver activated the device and no reset followed.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Times the device asked the driver for a reset.
    pub fn resets_requested(&self) -> u64 {
        self.resets_requested
    }

    /// Warnings about broken queues not logged (rate limit).
    pub fn log_lines_suppressed(&self) -> u64 {
        self.log.suppressed()
    }

    /// Checks what the driver negotiated against `offered` and builds
    /// every queue; on error nothing changes.
    pub fn activate<M: GuestMemory>(
        &mut self,
        mem: &M,
        activation: &Activation,
        offered: u64,
    ) -> Result<(), DeviceError> {
        let f = activation.features;
        if f & !offered != 0 || f & F_VERSION_1 == 0 {
            return Err(DeviceError::BadFeatures(f));
        }
        if activation.queues.len() != self.queues.len() {
            return Err(DeviceError::QueueCount {
                got: activation.queues.len(),
                want: self.queues.len(),
            });
        }
        let event_idx = f & F_EVENT_IDX != 0;
        let mut built = Vec::with_capacity(self.queues.len());
        for (i, (cfg, slot)) in activation.queues.iter().zip(&self.queues).enumerate() {
            if !cfg.ready {
                return Err(DeviceError::QueueNotReady(i));
            }
            let q = cfg
                .build(slot.max, event_idx, mem)
                .map_err(|e| DeviceError::QueueConfig(i, e))?;
            built.push(q);
        }
        for (slot, q) in self.queues.iter_mut().zip(built) {
            slot.batch = UsedBatch::new(UsedRingHost::find(&q, mem), q.next_used());
            slot.queue = Some(q);
            slot.broken = false;
            slot.used_pending = false;
            slot.quiet = false;
        }
        self.acked_features = f;
        self.active = true;
        Ok(())
    }

    /// Drops every queue, as a device reset does.
    pub fn reset(&mut self) {
        for slot in &mut self.queues {
            slot.queue = None;
            slot.broken = false;
            slot.used_pending = false;
            slot.batch = UsedBatch::default();
            slot.quiet = false;
        }
        self.acked_features = 0;
        self.active = false;
    }

    /// Stops (or resumes) popping from every queue while the VM is paused
    /// (`PATCH /vm`). A reset does not end a pause.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// While `polling`, drains leave the driver's notifications off when
    /// they empty a queue (the VMM thread watches the available ring
    /// itself, so the driver need not kick: a VM exit on real KVM, a
    /// syscall and a cross-thread wake-up here). The VMM thread turns them
    /// back on with [`Self::notify_again`] before it sleeps.
    pub fn set_polling(&mut self, polling: bool) {
        self.polling = polling;
    }

    /// The first queue a polling drain left quiet that has chains waiting
    /// and may be popped now, `held` ones (throttled) aside: the VMM
    /// thread's poll of the available rings.
    pub fn quiet_with_chains<M: GuestMemory>(
        &self,
        mem: &M,
        held: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        if self.paused {
            return None;
        }
        self.queues.iter().enumerate().position(|(i, s)| {
            s.quiet && !s.broken && !held(i) && s.queue.as_ref().is_some_and(|q| has_chains(q, mem))
        })
    }

    /// Whether a polling drain left any queue quiet: a request queue for
    /// the VMM thread to watch.
    pub fn any_quiet(&self) -> bool {
        self.queues.iter().any(|s| s.quiet)
    }

    /// Whether a drain took any chain since the last call: the driver is
    /// sending requests, so its next one (or its notification) is worth
    /// polling for.
    pub fn take_drained(&mut self) -> bool {
        std::mem::take(&mut self.drained)
    }

    /// Turns notifications back on for every queue a polling drain left
    /// quiet, so the driver kicks again once the VMM thread sleeps.
    /// Returns a queue whose driver added chains meanwhile (they would not
    /// be kicked for): serve it before sleeping, and call again until
    /// `None`. A corrupt ring breaks its queue.
    pub fn notify_again<M: GuestMemory>(&mut self, mem: &M) -> Option<usize> {
        let mut found = None;
        for i in 0..self.queues.len() {
            let Some(slot) = self.queues.get_mut(i) else {
                continue;
            };
            if !std::mem::take(&mut slot.quiet) {
                continue;
            }
            let Some(queue) = slot.queue.as_mut() else {
                continue;
            };
            match queue.enable_notification(mem) {
                Ok(true) if found.is_none() && !slot.broken => found = Some(i),
                Ok(_) => {}
                Err(e) => {
                    let _ = self.break_queue(i, format!("enabling notifications: {e}"));
                }
            }
        }
        found
    }

    /// Whether the VM is paused and the queues are not to be popped.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Queue `qidx` if it is live, not broken and the VM is not paused: the
    /// one to pop from.
    pub fn live(&mut self, qidx: usize) -> Option<&mut Queue> {
        if self.paused {
            return None;
        }
        self.queues
            .get_mut(qidx)
            .filter(|s| !s.broken)
            .and_then(|s| s.queue.as_mut())
    }

    /// Whether queue `qidx` may be popped now (see [`Self::live`]).
    pub fn is_live(&self, qidx: usize) -> bool {
        !self.paused
            && self
                .queues
                .get(qidx)
                .is_some_and(|s| !s.broken && s.queue.is_some())
    }

    /// Takes live queue `qidx` out, so a drain can hold it while the
    /// device's other fields are in use; give it back with [`Self::restore`].
    /// `None` while paused, like [`Self::live`].
    pub fn take_live(&mut self, qidx: usize) -> Option<Queue> {
        if self.paused {
            return None;
        }
        self.queues
            .get_mut(qidx)
            .filter(|s| !s.broken)
            .and_then(|s| s.queue.take())
    }

    /// Puts back a queue [`Self::take_live`] took.
    pub fn restore(&mut self, qidx: usize, queue: Queue) {
        if let Some(s) = self.queues.get_mut(qidx) {
            s.queue = Some(queue);
        }
    }

    /// Queue `qidx` if it exists (even broken): completions of requests
    /// popped before it broke are still returned to the driver.
    pub fn queue(&mut self, qidx: usize) -> Option<&mut Queue> {
        self.queues.get_mut(qidx).and_then(|s| s.queue.as_mut())
    }

    /// Remembers that queue `qidx` got used entries this turn.
    pub fn mark_used(&mut self, qidx: usize) {
        if let Some(s) = self.queues.get_mut(qidx) {
            s.used_pending = true;
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written; a
    /// corrupt used ring breaks the queue.
    pub fn add_used<M: GuestMemory>(
        &mut self,
        qidx: usize,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), DeviceError> {
        let Some(queue) = self.queue(qidx) else {
            // Reset meanwhile: the driver took the chain back already.
            return Ok(());
        };
        match queue.add_used(mem, head, len) {
            Ok(()) => {
                self.mark_used(qidx);
                Ok(())
            }
            Err(e) => Err(self.break_queue(qidx, format!("used ring: {e}"))),
        }
    }

    /// As [`Self::add_used`], but the used.idx store that publishes the
    /// entry waits for the turn's interrupt decision ([`Self::signal_used`]),
    /// which stores it once for every entry of the turn; the entry itself
    /// is written straight through the used ring's host mapping. For a
    /// device that answers many chains per turn (a network queue); falls
    /// back to [`Self::add_used`] when the used ring is not in one region
    /// of plain guest memory.
    pub fn add_used_batched<M: GuestMemory>(
        &mut self,
        qidx: usize,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), DeviceError> {
        let Some(slot) = self.queues.get_mut(qidx) else {
            return Ok(());
        };
        let Some(queue) = slot.queue.as_mut() else {
            // Reset meanwhile: the driver took the chain back already.
            return Ok(());
        };
        if !slot.batch.is_direct() {
            return self.add_used(qidx, mem, head, len);
        }
        if !slot.batch.add(queue, head, len) {
            return Err(self.break_queue(
                qidx,
                format!("used ring: head index {head} outside the queue"),
            ));
        }
        slot.used_pending = true;
        Ok(())
    }

    /// Marks queue `qidx` corrupt and asks the driver for a reset.
    pub fn break_queue(&mut self, qidx: usize, why: String) -> DeviceError {
        if let Some(s) = self.queues.get_mut(qidx) {
            s.broken = true;
        }
        self.log.warn(
            "queue-broken",
            format_args!("queue {qidx} is corrupt, device needs reset: {why}"),
        );
        self.request_reset();
        DeviceError::QueueBroken(qidx, why)
    }

    /// Sets DEVICE_NEEDS_RESET and raises the config interrupt.
    pub fn request_reset(&mut self) {
        self.resets_requested += 1;
        if let Err(e) = self.irq.needs_reset() {
            log::error!("{}: raising the config interrupt failed: {e}", self.kind);
        }
    }

    /// Raises the interrupt once if any queue with used entries since the
    /// last call has a driver that wants to hear of them (EVENT_IDX /
    /// NO_INTERRUPT): the one decision per device per loop turn.
    pub fn signal_used<M: GuestMemory>(&mut self, mem: &M) {
        let mut wanted = false;
        for slot in &mut self.queues {
            if !std::mem::take(&mut slot.used_pending) {
                continue;
            }
            let Some(queue) = slot.queue.as_mut() else {
                continue;
            };
            // Entries batched this turn become visible first.
            slot.batch.publish(queue);
            match driver_wants_interrupt(queue, mem) {
                Ok(w) => wanted |= w,
                Err(e) => log::debug!("{}: reading used_event failed: {e}", self.kind),
            }
            // virtio-queue's own count misses the batched entries.
            wanted |= slot.batch.decide(queue);
        }
        if wanted {
            if let Err(e) = self.irq.used_buffer() {
                log::error!("{}: interrupt failed: {e}", self.kind);
            }
        }
    }
}

/// Whether the driver made chains available that the device has not
/// popped: one acquire load of the available index from guest memory.
fn has_chains<M: GuestMemory>(queue: &Queue, mem: &M) -> bool {
    queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != queue.next_avail())
}

/// Serves queue `qidx` of `dev` with [`drain`]: takes the live queue out of
/// the device's [`Virtqueues`] (reached through `queues`) so `take` may use
/// the whole device, puts it back, records used entries for the turn's
/// interrupt decision, and breaks the queue on a corrupt ring. The body of
/// most devices' `process_queue`.
pub fn drain_queue<D, M, F>(
    dev: &mut D,
    queues: fn(&mut D) -> &mut Virtqueues,
    qidx: usize,
    mem: &M,
    mut take: F,
) -> Result<ProcessOutcome, DeviceError>
where
    D: ?Sized,
    M: GuestMemory,
    F: FnMut(&mut D, &mut Queue, DescriptorChain<&M>, u16) -> Result<ChainTaken, String>,
{
    let Some(mut queue) = queues(dev).take_live(qidx) else {
        return Ok(ProcessOutcome::default());
    };
    let leave_quiet = queues(dev).polling;
    let (out, result, quiet) = drain_notifying(&mut queue, mem, !leave_quiet, |q, chain, head| {
        take(dev, q, chain, head)
    });
    let qs = queues(dev);
    qs.restore(qidx, queue);
    if out.popped > 0 {
        qs.drained = true;
    }
    if quiet {
        if let Some(s) = qs.queues.get_mut(qidx) {
            s.quiet = true;
        }
    }
    if out.answered > 0 {
        qs.mark_used(qidx);
    }
    match result {
        Ok(()) => Ok(out),
        Err(why) => Err(qs.break_queue(qidx, why)),
    }
}

/// What a device did with one chain [`drain`] handed it.
#[derive(Debug)]
pub enum ChainTaken {
    /// An op was submitted for it; its completion answers it.
    Submitted,
    /// It was answered at once (added to the used ring).
    Answered,
    /// No room to take it now (no free slot, full ring): put it back and
    /// stop; the slot resumes the drain after completions.
    PutBack,
    /// The device's rate limiter refused it: put it back and stop; the
    /// device tells the slot when to resume ([`VirtioDevice::take_throttle`]).
    ///
    /// [`VirtioDevice::take_throttle`]: super::VirtioDevice::take_throttle
    Throttled,
}

/// Pops up to one queue's worth of chains from `queue` and hands each to
/// `take` with its head index, turning notifications off while it works
/// and back on when the ring is empty (checking once more for chains that
/// raced in). Refuses a head index outside the queue; `take` refuses one
/// the device still holds (a driver that reuses a head corrupts its own
/// ring). An error string means the queue is corrupt: break it.
pub fn drain<M, F>(queue: &mut Queue, mem: &M, take: F) -> (ProcessOutcome, Result<(), String>)
where
    M: GuestMemory,
    F: FnMut(&mut Queue, DescriptorChain<&M>, u16) -> Result<ChainTaken, String>,
{
    let (out, result, _) = drain_notifying(queue, mem, true, take);
    (out, result)
}

/// [`drain`], except that with `notify` false an emptied queue keeps the
/// driver's notifications off (the VMM thread polls it); the third value
/// says that happened.
fn drain_notifying<M, F>(
    queue: &mut Queue,
    mem: &M,
    notify: bool,
    mut take: F,
) -> (ProcessOutcome, Result<(), String>, bool)
where
    M: GuestMemory,
    F: FnMut(&mut Queue, DescriptorChain<&M>, u16) -> Result<ChainTaken, String>,
{
    let mut out = ProcessOutcome::default();
    let mut quiet = false;
    let budget = queue.size();
    let result = 'drain: loop {
        if let Err(e) = queue.disable_notification(mem) {
            break 'drain Err(format!("disabling notifications: {e}"));
        }
        while out.popped < budget {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => break 'drain Err(e.to_string()),
            };
            let Some(chain) = chain else {
                break;
            };
            out.popped += 1;
            let head = chain.head_index();
            if head >= queue.size() {
                break 'drain Err(format!("head index {head} outside the queue"));
            }
            match take(queue, chain, head) {
                Ok(ChainTaken::Submitted) => out.submitted += 1,
                Ok(ChainTaken::Answered) => out.answered += 1,
                Ok(ChainTaken::PutBack) => {
                    queue.go_to_previous_position();
                    out.popped -= 1;
                    out.blocked = true;
                    break 'drain Ok(());
                }
                Ok(ChainTaken::Throttled) => {
                    // Notifications stay off: the limiter's timer resumes
                    // the drain, whatever the driver adds meanwhile.
                    queue.go_to_previous_position();
                    out.popped -= 1;
                    out.throttled = true;
                    break 'drain Ok(());
                }
                Err(e) => break 'drain Err(e),
            }
        }
        if out.popped >= budget {
            out.more = true;
            break 'drain Ok(());
        }
        if !notify {
            quiet = true;
            break 'drain Ok(());
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break 'drain Ok(()),
            Err(e) => break 'drain Err(format!("enabling notifications: {e}")),
        }
    };
    (out, result, quiet)
}
