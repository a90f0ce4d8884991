//! The contract between a virtio device and the VMM thread that serves it.
//!
//! Every virtio device in ringvm is one type implementing [`VirtioDevice`].
//! The VMM owns one generic slot per device (`vmm/src/ring/slot.rs`) that
//! does everything that is the same for all devices: it places the
//! transport on the MMIO bus, arms each queue's doorbell on the ring,
//! applies the transport's activation and reset messages, routes the ring's
//! completions back to the device, re-runs drains that stopped early, asks
//! the device for its interrupt decision once per loop turn, cancels I/O a
//! reset left behind and reports the reset done only when the kernel no
//! longer holds any of the device's buffers, and exports the device's
//! counters as metrics. A device only answers the questions below.
//!
//! ```text
//!             activate(queues)             process_queue(q) ─► IoSubmit::submit(op, tag)
//!  inactive ─────────────────► active ───► complete(tag, res) ◄── the ring's CQE
//!     ▲                          │         end_turn(): one interrupt decision per turn
//!     └──── reset() ◄────────────┘         (driver reset; or NEEDS_RESET on a bad queue)
//!           then in_flight() == 0 before the driver sees Status == 0
//! ```
//!
//! To add a device: write one file (or folder) in `devices/src/virtio/`
//! implementing this trait on top of [`Virtqueues`] (queues, activation
//! checks, used ring and interrupt policy, which the trait's default
//! methods use), [`drain_queue`](super::drain_queue) (the bounded pop loop)
//! and, if it does host I/O, [`InFlight`](super::InFlight) (tagged slots that
//! keep iovecs alive); then add one `add_*` method to the VMM's machine
//! builder (`vmm/src/machine/builder.rs`). `rng.rs` is the smallest
//! complete example.

use std::any::Any;
use std::os::fd::RawFd;
use std::time::Duration;

use vm_memory::GuestMemory;

use super::{Activation, QueueConfigError, VirtioDeviceInfo, Virtqueues};
use crate::buf_ring::BufRing;
use crate::io::{IoSubmit, Selected};
use crate::rate_limiter::DeviceRateLimiter;

/// Errors the VMM thread sees from a device. Request-level problems never
/// surface here: they become status bytes or unused chains for the guest.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver negotiated features we did not offer, or not VERSION_1.
    #[error("driver features {0:#x} were not offered")]
    BadFeatures(u64),
    /// Activation named a different number of queues.
    #[error("activation has {got} queues, expected {want}")]
    QueueCount {
        /// Queues the driver set up.
        got: usize,
        /// Queues the device has.
        want: usize,
    },
    /// A required queue is not enabled.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// A queue's layout is invalid.
    #[error("queue {0}: {1}")]
    QueueConfig(usize, #[source] QueueConfigError),
    /// No such queue index.
    #[error("no queue {0}")]
    NoSuchQueue(usize),
    /// The queue is corrupt; the device asked the driver for a reset.
    #[error("queue {0} needs a reset: {1}")]
    QueueBroken(usize, String),
    /// Something on the host side refused (a tap's offloads, the ring).
    #[error("{0}")]
    Host(String),
}

/// What one [`VirtioDevice::process_queue`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessOutcome {
    /// Chains taken from the available ring (bad ones included).
    pub popped: u16,
    /// Ops handed to the ring.
    pub submitted: u16,
    /// Chains answered at once (written to the used ring).
    pub answered: u16,
    /// The drain stopped at its budget (the queue size) with chains
    /// possibly left: call `process_queue` again on the next loop turn.
    pub more: bool,
    /// No free slot or a full ring stopped the drain and the chain was put
    /// back: call `process_queue` again after completions are delivered.
    pub blocked: bool,
    /// The device's rate limiter stopped the drain and the chain was put
    /// back; [`VirtioDevice::take_throttle`] says when to resume.
    pub throttled: bool,
}

impl ProcessOutcome {
    /// Whether the slot must call `process_queue` again without a kick.
    pub fn wants_rerun(&self) -> bool {
        self.more || self.blocked
    }

    /// Adds another drain's figures to these.
    pub fn merge(&mut self, other: ProcessOutcome) {
        self.popped = self.popped.saturating_add(other.popped);
        self.submitted = self.submitted.saturating_add(other.submitted);
        self.answered = self.answered.saturating_add(other.answered);
        self.more |= other.more;
        self.blocked |= other.blocked;
        self.throttled |= other.throttled;
    }
}

/// A host fd the device waits on when it cannot use the ring's own poll
/// (e.g. a tap that answered EAGAIN): the slot arms a one-shot POLLIN on
/// `fd` and calls `process_queue(queue)` when it fires. A device that
/// watches many fds (virtio-vsock: a listener and one socket per
/// connection) submits [`IoOp::Poll`](crate::io::IoOp::Poll) ops with its
/// own tags instead, and hears of them in `complete`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollRequest {
    /// The fd to watch for readability.
    pub fd: RawFd,
    /// The queue to serve when it is readable.
    pub queue: usize,
}

/// A queue the device stopped serving because its rate limiter is out of
/// tokens: the slot arms one timer on the ring for `resume_after`, ignores
/// the queue's kicks meanwhile, and serves the queue when the timer fires.
/// Nothing polls and no thread sleeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttle {
    /// The queue to serve again.
    pub queue: usize,
    /// How long until the limiter has the tokens the refused work needs.
    pub resume_after: Duration,
}

/// Which of a device's rate limiters a live update (`PATCH /drives`,
/// `PATCH /network-interfaces`) names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimiterSide {
    /// A device with one limiter for its requests (block, rng).
    Requests,
    /// What the guest receives (net RX).
    Rx,
    /// What the guest sends (net TX).
    Tx,
}

/// One virtio device backend, owned by the VMM thread.
///
/// Generic over the guest memory type so devices are tested with any
/// [`GuestMemory`]; the VMM uses `dyn VirtioDevice<GuestMemoryMmap>`.
/// Every method runs on the VMM thread; none may block.
pub trait VirtioDevice<M: GuestMemory>: Send + std::fmt::Debug {
    /// Short name of the device kind for logs and metrics ("block", "net").
    fn kind(&self) -> &'static str;

    /// Virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;

    /// Feature bits the device offers (VERSION_1 always among them).
    fn features(&self) -> u64;

    /// The device's queues and interrupt.
    fn queues(&self) -> &Virtqueues;

    /// The device's queues and interrupt, to change.
    fn queues_mut(&mut self) -> &mut Virtqueues;

    /// What the transport presents to the driver: device type, offered
    /// features, queue sizes, and the state shared with the transport.
    fn info(&self) -> VirtioDeviceInfo {
        VirtioDeviceInfo {
            device_type: self.device_type(),
            avail_features: self.features(),
            queue_max_sizes: self.queues().max_sizes(),
            shared: self.queues().interrupt().shared().clone(),
        }
    }

    /// Takes the queues the driver set up at DRIVER_OK. Called only on an
    /// inactive device (the slot resets an active one first). On error the
    /// device stays inactive; the slot asks the driver for a reset.
    /// Devices with host state to set up (a tap's offloads) extend it.
    fn activate(&mut self, mem: &M, activation: &Activation) -> Result<(), DeviceError> {
        let offered = self.features();
        self.queues_mut().activate(mem, activation, offered)
    }

    /// Whether the queues are live.
    fn is_active(&self) -> bool {
        self.queues().is_active()
    }

    /// Device reset: drops the queues and orphans in-flight work, whose
    /// completions must still be delivered (and are then ignored). The
    /// slot reports the reset complete to the driver only once
    /// [`Self::in_flight`] reaches zero.
    fn reset(&mut self);

    /// Serves queue `queue`: after its kick, a resume the last
    /// [`ProcessOutcome`] asked for, or the [`PollRequest`] firing.
    /// [`drain_queue`](super::drain_queue) does the popping.
    fn process_queue(
        &mut self,
        queue: usize,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, DeviceError>;

    /// Delivers the completion of the op tagged `tag` (`result` is the
    /// CQE's: bytes, 0 or -errno), submitting whatever follows from it (the
    /// next tap read). Unknown and pre-reset tags are ignored. Drains that
    /// a full table held back are resumed by the slot, not from here.
    fn complete(&mut self, tag: u64, result: i32, mem: &M, io: &mut dyn IoSubmit);

    /// [`Self::complete`] with what the CQE said besides its result: the
    /// provided buffer it filled and whether the op stays armed. Only a
    /// device that submits [`IoOp::ReadMulti`](crate::io::IoOp::ReadMulti)
    /// needs it; the default forwards to `complete`.
    fn complete_selected(
        &mut self,
        tag: u64,
        result: i32,
        selected: Selected,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) {
        let _ = selected;
        self.complete(tag, result, mem, io);
    }

    /// The provided-buffer ring the device fills, for the VMM to register
    /// on its io_uring ring at setup (before the lockdown refuses any
    /// registration); `None` for devices that do not use one.
    fn buf_ring_mut(&mut self) -> Option<&mut BufRing> {
        None
    }

    /// Once per loop turn: raises the interrupt for the used buffers of
    /// this turn, if the driver wants one (one decision per device per
    /// turn, however many completions the turn had).
    fn end_turn(&mut self, mem: &M) {
        self.queues_mut().signal_used(mem);
    }

    /// Operations the kernel may still be working on (live or orphaned).
    /// The VMM never unmaps guest memory or drops a device before this is 0.
    fn in_flight(&self) -> usize;

    /// Tags of orphaned operations that may never complete on their own (a
    /// read parked on an idle tap); the slot cancels them on the ring.
    fn stale_tags(&self) -> Vec<u64> {
        Vec::new()
    }

    /// A host fd the device needs watched, if any (see [`PollRequest`]).
    fn poll_request(&self) -> Option<PollRequest> {
        None
    }

    /// Whether this device's completions are worth waiting a few
    /// microseconds for, to complete them in batches (disk I/O: yes; a tap
    /// read that may wait for a frame forever: no).
    fn batch_completions(&self) -> bool {
        false
    }

    /// The throttle the last serving of a queue ran into, taken once: the
    /// slot arms its timer. Devices with rate limiters record one when a
    /// [`ChainTaken::Throttled`](super::ChainTaken::Throttled) stopped a
    /// drain or a limiter held back a host read.
    fn take_throttle(&mut self) -> Option<Throttle> {
        None
    }

    /// The limiter a live update names, if the device has that one.
    fn rate_limiter_mut(&mut self, _side: LimiterSide) -> Option<&mut DeviceRateLimiter> {
        None
    }

    /// Stops (or resumes) taking new work from the queues while the VM is
    /// paused; work already handed to the host still completes.
    fn set_paused(&mut self, paused: bool) {
        self.queues_mut().set_paused(paused);
    }

    /// Sets DEVICE_NEEDS_RESET and raises the config interrupt.
    fn request_reset(&mut self) {
        self.queues_mut().request_reset();
    }

    /// The device's counters for metrics and the API, as one JSON object.
    fn metrics(&self) -> serde_json::Value;

    /// The concrete device, for management calls that only one kind has
    /// (PATCH /drives swaps a block device's file).
    fn as_any_mut(&mut self) -> &mut dyn Any;
}
