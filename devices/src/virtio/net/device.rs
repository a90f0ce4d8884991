//! The virtio-net backend on the VMM thread: the queue loops that turn TX
//! chains into tap writes and posted RX buffers into tap reads, answer
//! their completions and interrupt the guest.
//!
//! ```text
//!   new ──► inactive ──activate──► active ──process_queue / complete──► active
//!              ▲                     │  bad queue state: NEEDS_RESET, queue stops
//!              └──────── reset ◄─────┘  (in-flight ops orphaned, results dropped)
//! ```
//!
//! TX: one `writev(tap, chain)` per chain, many in flight, each answered
//! with a used length of 0. RX: `readv(tap, buffers)` straight into the
//! guest's buffers, only while the driver has posted some: one in flight,
//! or up to `MAX_RX_READS` (4) while the buffers give each read room for the
//! largest frame, each on its own chains and answered in completion order
//! (see the module docs of [`super`] for how MRG_RXBUF gathers chains
//! without a copy). Chains a frame did not need stay popped and walked in
//! the device for the next read instead of going back to the available
//! ring; a reset forgets them.
//!
//! A readv parked on an idle tap may stay in the kernel indefinitely, so a
//! reset cannot simply wait for it: the device orphans it like any op and
//! names its tag in [`NetDevice::stale_rx_tag`] (one at a time), which the
//! VMM should cancel on its ring; until every such completion arrives no
//! new readv is submitted, so frames are never read into two buffer sets
//! at once.

use std::collections::VecDeque;
use std::mem::ManuallyDrop;
use std::os::fd::RawFd;
use std::sync::Arc;

use log::{error, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use super::frame::{self, Direction, Segment};
use super::tap::{Tap, TapError};
use super::{
    config_bytes, features, generate_mac, tap_offloads, MacAddr, NetCounters, DEVICE_TYPE,
    F_MRG_RXBUF, MAX_BUFFER_LEN, NUM_BUFFERS_OFFSET, NUM_QUEUES, QUEUE_MAX_SIZE, RX_QUEUE,
    TX_QUEUE, VNET_HDR_LEN,
};
use crate::io::{InterruptLine, IoOp, IoSubmit, IoSubmitError, IOV_MAX};
use crate::virtio::{
    Activation, DeviceShared, Interrupt, QueueConfigError, VirtioBackend, VirtioDeviceInfo,
    F_EVENT_IDX, F_VERSION_1,
};

const SLOT_BITS: u32 = 16;
const GEN_BITS: u32 = 24;
const QUEUE_SHIFT: u32 = SLOT_BITS + GEN_BITS;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;

/// Tap reads in flight at most: with buffers for several, one loop turn
/// can complete several frames.
const MAX_RX_READS: usize = 4;

/// Packs (queue, generation, slot) into a 48-bit tag.
fn encode_tag(queue: usize, generation: u32, slot: u16) -> u64 {
    ((queue as u64 & 0xff) << QUEUE_SHIFT)
        | (u64::from(generation & GEN_MASK) << SLOT_BITS)
        | u64::from(slot)
}

fn tag_queue(tag: u64) -> usize {
    ((tag >> QUEUE_SHIFT) & 0xff) as usize
}

fn tag_slot(tag: u64) -> usize {
    (tag & ((1 << SLOT_BITS) - 1)) as usize
}

/// What a network device is made of.
#[derive(Debug)]
pub struct NetConfig<T: Tap> {
    /// The host end, already open (see [`super::TapDevice::open`]).
    pub tap: T,
    /// The guest's MAC; `None` picks a random locally administered one.
    pub mac: Option<MacAddr>,
}

/// Errors the VMM thread sees from the network device. Frame-level
/// problems never surface here: they are counted and the chain returned.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The driver negotiated features we did not offer, or not VERSION_1.
    #[error("driver features {0:#x} were not offered")]
    BadFeatures(u64),
    /// Activation named a different number of queues.
    #[error("activation has {0} queues, expected {NUM_QUEUES}")]
    QueueCount(usize),
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
    /// The tap refused the negotiated offloads.
    #[error("{0}")]
    Offload(#[source] TapError),
    /// The ring refused a tap read for a reason other than being full; RX
    /// waits for the next [`NetDevice::process_queue`] on the RX queue.
    #[error("tap read could not be submitted: {0}")]
    Submit(#[source] IoSubmitError),
}

/// What one [`NetDevice::process_queue`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessOutcome {
    /// Chains taken from the available ring (bad ones included).
    pub popped: u16,
    /// Ops handed to the ring.
    pub submitted: u16,
    /// The drain stopped at its budget (the queue size) with chains
    /// possibly left: call `process_queue` again on the next loop turn.
    pub more: bool,
    /// A full ring stopped the drain and the chains were put back; call
    /// `process_queue` again on the next loop turn.
    pub blocked: bool,
}

/// iovecs into guest memory, owned by an op until its completion.
#[derive(Debug, Default)]
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the pointers only name guest memory, which is shared by every
// thread of the VMM anyway; this type never dereferences them, and a
// device is used by one thread at a time.
unsafe impl Send for Iovecs {}

#[derive(Debug)]
enum TxState {
    Free,
    Busy {
        head: u16,
        len: usize,
    },
    /// Submitted before a reset; waits only for its completion.
    Orphaned,
}

#[derive(Debug)]
struct TxSlot {
    tag: u64,
    state: TxState,
    iov: Iovecs,
}

#[derive(Debug)]
struct Tx {
    max: u16,
    queue: Option<Queue>,
    broken: bool,
    slots: Vec<TxSlot>,
    /// Heads in flight, to refuse a driver reusing one.
    heads: Vec<bool>,
    busy: usize,
    orphans: usize,
    /// The last drain stopped on a full ring; resume on a completion.
    blocked: bool,
}

/// A receive chain popped from the available ring and walked once, kept
/// by the device until a frame fills it (or a reset drops it): later reads
/// reuse its iovecs instead of walking it again.
#[derive(Debug, Default)]
struct RxChain {
    head: u16,
    /// Capacity in bytes.
    len: usize,
    iov: Iovecs,
    /// The chain's guest segments, where the header goes if a frame
    /// starts in it.
    segs: Vec<Segment>,
}

/// One tap read: the chains it fills and the iovecs the kernel writes
/// through.
#[derive(Debug, Default)]
struct RxRead {
    tag: u64,
    /// The chains, in the order the frame fills them.
    chains: Vec<RxChain>,
    iov: Iovecs,
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
        self.capacity = 0;
    }
}

#[derive(Debug)]
struct Rx {
    max: u16,
    queue: Option<Queue>,
    broken: bool,
    /// The live reads (at most [`MAX_RX_READS`]), each on its own chains.
    reads: Vec<RxRead>,
    /// Reads from before a reset (no read is submitted while one is
    /// here).
    stale: Vec<RxRead>,
    /// A read failed (or the tap said EAGAIN): wait for the VMM to call
    /// `process_queue(RX_QUEUE)` when the tap is readable.
    stalled: bool,
    /// Finished reads' vectors, kept to avoid reallocating.
    spare: Vec<RxRead>,
    /// Tells concurrent reads' tags apart.
    next_slot: u16,
    /// Chains popped and walked but in no read yet.
    ready: VecDeque<RxChain>,
    /// Heads in `ready` or in a live read, to refuse a driver posting one
    /// twice.
    held: Vec<bool>,
    /// Used chains' vectors, kept to avoid reallocating.
    pool: Vec<RxChain>,
}

impl Rx {
    /// Forgets the chains held for the queue (which is gone).
    fn drop_ready(&mut self) {
        while let Some(c) = self.ready.pop_front() {
            self.pool.push(c);
        }
        self.held.fill(false);
    }

    /// Recycles a finished read; its chains must be gone already.
    fn recycle(&mut self, mut read: RxRead) {
        self.pool.append(&mut read.chains);
        read.clear();
        self.spare.push(read);
    }
}

/// A virtio-net device backend, owned by the VMM thread.
///
/// # Example
///
/// ```
/// use std::os::fd::{AsRawFd, RawFd};
/// use devices::virtio::net::{NetConfig, NetDevice, Tap, TapError};
/// use vmm_sys_util::eventfd::EventFd;
///
/// // Any fd with frame boundaries will do in place of a tap.
/// #[derive(Debug)]
/// struct NullTap(std::fs::File);
/// impl AsRawFd for NullTap {
///     fn as_raw_fd(&self) -> RawFd { self.0.as_raw_fd() }
/// }
/// impl Tap for NullTap {
///     fn set_offload(&self, _flags: u32) -> Result<(), TapError> { Ok(()) }
/// }
///
/// let tap = NullTap(std::fs::File::open("/dev/null").unwrap());
/// let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
/// let dev = NetDevice::new(
///     NetConfig { tap, mac: Some([2, 0, 0, 0, 0, 1]) },
///     Box::new(irqfd),
/// );
/// assert_eq!(dev.info().device_type, 1);
/// assert_eq!(dev.info().queue_max_sizes.len(), 2);
/// assert!(!dev.is_active());
/// ```
#[derive(Debug)]
pub struct NetDevice<T: Tap> {
    /// Not dropped while ops may still name its fd (see Drop).
    tap: ManuallyDrop<T>,
    mac: MacAddr,
    irq: Interrupt,
    /// What the device offers ([`features`]).
    features: u64,
    acked_features: u64,
    activated: bool,
    generation: u32,
    rx: Rx,
    tx: Tx,
    counters: NetCounters,
}

impl<T: Tap> NetDevice<T> {
    /// Builds an inactive device; `line` is the irqfd the VMM wired to the
    /// device's interrupt.
    pub fn new(config: NetConfig<T>, line: Box<dyn InterruptLine>) -> Self {
        Self::with_mtu(config, line, None)
    }

    /// As [`Self::new`], offering the guest `mtu` (VIRTIO_NET_F_MTU).
    pub fn with_mtu(config: NetConfig<T>, line: Box<dyn InterruptLine>, mtu: Option<u16>) -> Self {
        let mac = config.mac.unwrap_or_else(generate_mac);
        let shared = Arc::new(DeviceShared::new(config_bytes(mac, mtu), Vec::new()));
        let max = QUEUE_MAX_SIZE;
        Self {
            tap: ManuallyDrop::new(config.tap),
            mac,
            irq: Interrupt::new(shared, line),
            features: features(mtu),
            acked_features: 0,
            activated: false,
            generation: 0,
            rx: Rx {
                max,
                queue: None,
                broken: false,
                reads: Vec::new(),
                stale: Vec::new(),
                stalled: false,
                spare: Vec::new(),
                next_slot: 0,
                ready: VecDeque::new(),
                held: vec![false; usize::from(max)],
                pool: Vec::new(),
            },
            tx: Tx {
                max,
                queue: None,
                broken: false,
                slots: (0..max)
                    .map(|_| TxSlot {
                        tag: u64::MAX,
                        state: TxState::Free,
                        iov: Iovecs::default(),
                    })
                    .collect(),
                heads: vec![false; usize::from(max)],
                busy: 0,
                orphans: 0,
                blocked: false,
            },
            counters: NetCounters::default(),
        }
    }

    /// What the transport presents to the driver.
    pub fn info(&self) -> VirtioDeviceInfo {
        VirtioDeviceInfo {
            device_type: DEVICE_TYPE,
            avail_features: self.features,
            queue_max_sizes: vec![self.rx.max, self.tx.max],
            shared: self.irq.shared().clone(),
        }
    }

    /// The guest's MAC address (given or generated), for messages and the API.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The tap's fd, for the VMM to poll when [`Self::rx_needs_tap_poll`]
    /// says so.
    pub fn tap_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    /// Counters since the device was made.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Features the driver acknowledged at the last activation.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver activated the device and no reset followed.
    pub fn is_active(&self) -> bool {
        self.activated
    }

    /// Ops the kernel may still be working on. The VMM must not drop the
    /// device (or unmap guest memory) before this reaches 0; if it does,
    /// the device leaks its iovec arrays and its tap rather than free them.
    pub fn in_flight(&self) -> usize {
        self.tx.busy + self.tx.orphans + self.rx.reads.len() + self.rx.stale.len()
    }

    /// Whether a tap read failed or found nothing (EAGAIN) and RX now
    /// waits: the VMM should arm a one-shot POLLIN on [`Self::tap_fd`] and
    /// call `process_queue(RX_QUEUE, ..)` when it fires. Normally false:
    /// io_uring parks the readv in its own poll on the tap.
    pub fn rx_needs_tap_poll(&self) -> bool {
        self.activated && self.rx.stalled && !self.rx.broken
    }

    /// The tag of a tap read submitted before the last reset and still in
    /// the kernel, if any (one at a time: the next once it completed). It may wait for a frame indefinitely and would
    /// then write into buffers the driver has taken back: the VMM should
    /// cancel it on its ring (IORING_OP_ASYNC_CANCEL on this device's
    /// token with this tag) and deliver the completion as usual.
    pub fn stale_rx_tag(&self) -> Option<u64> {
        self.rx.stale.first().map(|r| r.tag)
    }

    fn activate_queues<M: GuestMemory>(
        &mut self,
        mem: &M,
        activation: &Activation,
    ) -> Result<(), NetError> {
        let f = activation.features;
        if f & !self.features != 0 || f & F_VERSION_1 == 0 {
            return Err(NetError::BadFeatures(f));
        }
        if activation.queues.len() != NUM_QUEUES {
            return Err(NetError::QueueCount(activation.queues.len()));
        }
        let event_idx = f & F_EVENT_IDX != 0;
        let mut built = Vec::with_capacity(NUM_QUEUES);
        for (i, (cfg, max)) in activation
            .queues
            .iter()
            .zip([self.rx.max, self.tx.max])
            .enumerate()
        {
            if !cfg.ready {
                return Err(NetError::QueueNotReady(i));
            }
            let q = cfg
                .build(max, event_idx, mem)
                .map_err(|e| NetError::QueueConfig(i, e))?;
            built.push(q);
        }
        self.tap
            .set_offload(tap_offloads(f))
            .map_err(NetError::Offload)?;
        let mut built = built.into_iter();
        self.rx.queue = built.next();
        self.rx.drop_ready();
        self.tx.queue = built.next();
        self.rx.broken = false;
        self.rx.stalled = false;
        self.tx.broken = false;
        self.tx.blocked = false;
        self.acked_features = f;
        self.activated = true;
        Ok(())
    }

    /// Device reset: drops the queues and forgets in-flight work, whose
    /// completions will be ignored when they arrive (see
    /// [`Self::stale_rx_tag`] for the one that may never come by itself).
    pub fn reset(&mut self) {
        self.rx.queue = None;
        self.rx.broken = false;
        self.rx.stalled = false;
        self.rx.drop_ready();
        for mut read in std::mem::take(&mut self.rx.reads) {
            // Only the iovec array matters until the completion.
            self.rx.pool.append(&mut read.chains);
            self.rx.stale.push(read);
        }
        self.tx.queue = None;
        self.tx.broken = false;
        self.tx.blocked = false;
        for s in &mut self.tx.slots {
            if let TxState::Busy { .. } = s.state {
                s.state = TxState::Orphaned;
                self.tx.busy -= 1;
                self.tx.orphans += 1;
            }
        }
        self.tx.heads.fill(false);
        self.generation = self.generation.wrapping_add(1) & GEN_MASK;
        self.acked_features = 0;
        self.activated = false;
        // The next driver has not said it takes offloaded frames.
        if let Err(e) = self.tap.set_offload(0) {
            warn!("virtio-net: clearing tap offloads failed: {e}");
        }
    }

    fn ask_for_reset(&mut self) {
        self.counters.needs_reset += 1;
        if let Err(e) = self.irq.needs_reset() {
            error!("virtio-net: raising the config interrupt failed: {e}");
        }
    }

    /// Marks queue `qidx` corrupt and asks the driver for a reset.
    fn break_queue(&mut self, qidx: usize, why: String) -> NetError {
        match qidx {
            RX_QUEUE => self.rx.broken = true,
            _ => self.tx.broken = true,
        }
        error!("virtio-net: queue {qidx} is corrupt, device needs reset: {why}");
        self.ask_for_reset();
        NetError::QueueBroken(qidx, why)
    }

    fn signal_used<M: GuestMemory>(&mut self, qidx: usize, mem: &M) {
        let queue = match qidx {
            RX_QUEUE => self.rx.queue.as_mut(),
            _ => self.tx.queue.as_mut(),
        };
        let Some(queue) = queue else {
            return;
        };
        match crate::virtio::queue::driver_wants_interrupt(queue, mem) {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = self.irq.used_buffer() {
                    error!("virtio-net: interrupt failed: {e}");
                }
            }
            Err(e) => warn!("virtio-net: reading used_event failed: {e}"),
        }
    }

    /// Serves a kick of queue `qidx`: TX sends up to one queue's worth of
    /// chains; RX starts a tap read into the posted buffers if none is in
    /// flight (also the call to make when the tap polled readable). Call
    /// it again as [`ProcessOutcome`] asks.
    pub fn process_queue<M: GuestMemory>(
        &mut self,
        qidx: usize,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, NetError> {
        match qidx {
            RX_QUEUE => {
                self.rx.stalled = false;
                self.rx_fill(mem, io)
            }
            TX_QUEUE => self.tx_drain(mem, io),
            _ => Err(NetError::NoSuchQueue(qidx)),
        }
    }

    /// Answers the op tagged `tag` with the CQE result `res` (bytes, or
    /// -errno), and submits what follows from it: the next tap read, or
    /// TX chains a full ring held back. Unknown and pre-reset tags are
    /// ignored.
    pub fn complete<M: GuestMemory>(&mut self, tag: u64, res: i32, mem: &M, io: &mut dyn IoSubmit) {
        let result = match tag_queue(tag) {
            RX_QUEUE => self.rx_complete(tag, res, mem, io),
            TX_QUEUE => self.tx_complete(tag, res, mem, io),
            _ => {
                warn!("virtio-net: completion for unknown queue (tag {tag:#x})");
                Ok(ProcessOutcome::default())
            }
        };
        if let Err(e) = result {
            warn!("virtio-net: {e}");
        }
    }

    // ---- TX -------------------------------------------------------------

    fn tx_drain<M: GuestMemory>(
        &mut self,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, NetError> {
        let mut out = ProcessOutcome::default();
        if !self.activated {
            return Ok(out);
        }
        let fd = self.tap.as_raw_fd();
        let generation = self.generation;
        let counters = &mut self.counters;
        let Tx {
            queue: Some(queue),
            broken: false,
            slots,
            heads,
            busy,
            blocked,
            ..
        } = &mut self.tx
        else {
            return Ok(out);
        };
        *blocked = false;
        let mut used = 0u32;
        let budget = queue.size();
        let broken: Option<String> = 'drain: loop {
            if let Err(e) = queue.disable_notification(mem) {
                break 'drain Some(format!("disabling notifications: {e}"));
            }
            while out.popped < budget {
                let chain = match queue.iter(mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => break 'drain Some(e.to_string()),
                };
                let Some(chain) = chain else {
                    break;
                };
                out.popped += 1;
                let head = chain.head_index();
                if head >= queue.size() {
                    break 'drain Some(format!("head index {head} outside the queue"));
                }
                if heads.get(usize::from(head)).copied().unwrap_or(true) {
                    break 'drain Some(format!("head index {head} is already in flight"));
                }
                let Some((index, slot)) = slots
                    .iter_mut()
                    .enumerate()
                    .find(|(_, s)| matches!(s.state, TxState::Free))
                else {
                    // Orphans from before a reset fill the table.
                    queue.go_to_previous_position();
                    out.popped -= 1;
                    out.blocked = true;
                    break 'drain None;
                };
                slot.iov.0.clear();
                let len = match frame::walk(mem, chain, Direction::Tx, &mut slot.iov.0, None) {
                    Ok(len) => len,
                    Err(e) => {
                        counters.tx_errors += 1;
                        warn!("virtio-net: transmit chain {head} refused: {e}");
                        if let Err(e) = queue.add_used(mem, head, 0) {
                            break 'drain Some(format!("used ring: {e}"));
                        }
                        used += 1;
                        continue;
                    }
                };
                let tag = encode_tag(TX_QUEUE, generation, index as u16);
                let op = IoOp::Writev {
                    fd,
                    iovecs: slot.iov.0.as_ptr(),
                    iovcnt: slot.iov.0.len() as u32,
                    offset: u64::MAX,
                };
                // SAFETY: the iovec array lives in this slot, which is
                // neither touched nor dropped until this tag's completion
                // (a reset only orphans the slot; dropping the device with
                // ops in flight leaks the slots, see Drop). The buffers are
                // guest memory, mapped for the VM's life and checked by
                // `walk` to lie inside it. The tap fd stays open while ops
                // are in flight (see Drop).
                match unsafe { io.submit(op, tag) } {
                    Ok(()) => {
                        slot.tag = tag;
                        slot.state = TxState::Busy { head, len };
                        if let Some(h) = heads.get_mut(usize::from(head)) {
                            *h = true;
                        }
                        *busy += 1;
                        out.submitted += 1;
                    }
                    Err(IoSubmitError::QueueFull) => {
                        slot.iov.0.clear();
                        queue.go_to_previous_position();
                        out.popped -= 1;
                        out.blocked = true;
                        break 'drain None;
                    }
                    Err(e) => {
                        slot.iov.0.clear();
                        counters.tx_dropped += 1;
                        warn!("virtio-net: tap write could not be submitted: {e}");
                        if let Err(e) = queue.add_used(mem, head, 0) {
                            break 'drain Some(format!("used ring: {e}"));
                        }
                        used += 1;
                    }
                }
            }
            if out.popped >= budget {
                out.more = true;
                break 'drain None;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break 'drain None,
                Err(e) => break 'drain Some(format!("enabling notifications: {e}")),
            }
        };
        *blocked = out.blocked;
        if used > 0 {
            self.signal_used(TX_QUEUE, mem);
        }
        match broken {
            Some(why) => Err(self.break_queue(TX_QUEUE, why)),
            None => Ok(out),
        }
    }

    fn tx_complete<M: GuestMemory>(
        &mut self,
        tag: u64,
        res: i32,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, NetError> {
        let Some(slot) = self
            .tx
            .slots
            .get_mut(tag_slot(tag))
            .filter(|s| s.tag == tag)
        else {
            warn!("virtio-net: completion for unknown tag {tag:#x}");
            return Ok(ProcessOutcome::default());
        };
        slot.tag = u64::MAX;
        slot.iov.0.clear();
        let (head, len) = match std::mem::replace(&mut slot.state, TxState::Free) {
            TxState::Busy { head, len } => (head, len),
            TxState::Orphaned => {
                self.tx.orphans -= 1;
                return self.resume_tx(mem, io);
            }
            TxState::Free => {
                warn!("virtio-net: completion for idle tag {tag:#x}");
                return Ok(ProcessOutcome::default());
            }
        };
        self.tx.busy -= 1;
        if let Some(h) = self.tx.heads.get_mut(usize::from(head)) {
            *h = false;
        }
        if res >= 0 {
            self.counters.tx_packets += 1;
            self.counters.tx_bytes += len.saturating_sub(VNET_HDR_LEN) as u64;
        } else {
            self.counters.tx_dropped += 1;
            warn!("virtio-net: tap write failed: errno {}", -res);
        }
        let answered = match self.tx.queue.as_mut() {
            Some(queue) => queue.add_used(mem, head, 0),
            None => Ok(()),
        };
        if let Err(e) = answered {
            return Err(self.break_queue(TX_QUEUE, format!("used ring: {e}")));
        }
        self.signal_used(TX_QUEUE, mem);
        self.resume_tx(mem, io)
    }

    fn resume_tx<M: GuestMemory>(
        &mut self,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, NetError> {
        if self.tx.blocked {
            self.tx_drain(mem, io)
        } else {
            Ok(ProcessOutcome::default())
        }
    }

    // ---- RX -------------------------------------------------------------

    /// Starts tap reads into the posted buffers: one if none is in flight,
    /// more (up to [`MAX_RX_READS`]) while the buffers give each its full
    /// size. Chains popped for an earlier read that its frame did not need
    /// are kept walked in `Rx::ready` and come first; the available ring is
    /// only walked for what they lack.
    fn rx_fill<M: GuestMemory>(
        &mut self,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, NetError> {
        let mut out = ProcessOutcome::default();
        while self.activated && self.rx.reads.len() < MAX_RX_READS && self.rx.stale.is_empty() {
            let one = self.rx_fill_one(mem, io)?;
            out.popped = out.popped.saturating_add(one.popped);
            out.submitted += one.submitted;
            out.more |= one.more;
            out.blocked |= one.blocked;
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
    ) -> Result<ProcessOutcome, NetError> {
        let mut out = ProcessOutcome::default();
        let mrg = self.acked_features & F_MRG_RXBUF != 0;
        let fd = self.tap.as_raw_fd();
        let tag = encode_tag(RX_QUEUE, self.generation, self.rx.next_slot);
        let counters = &mut self.counters;
        let Rx {
            queue: Some(queue),
            broken: false,
            reads,
            spare,
            ready,
            held,
            pool,
            next_slot,
            ..
        } = &mut self.rx
        else {
            return Ok(out);
        };
        // What a read gathers: one chain, or with MRG_RXBUF chains up to
        // the largest frame. Only the first read in flight may have less.
        let want = if mrg { MAX_BUFFER_LEN } else { 1 };
        let need_full = !reads.is_empty();
        let mut have = 0usize;
        for c in ready.iter() {
            if have >= want {
                break;
            }
            have += c.len;
        }
        let mut used = 0u32;
        let budget = queue.size();
        let broken: Option<String> = 'fill: loop {
            if have >= want {
                break 'fill None;
            }
            if let Err(e) = queue.disable_notification(mem) {
                break 'fill Some(format!("disabling notifications: {e}"));
            }
            while out.popped < budget && have < want {
                let chain = match queue.iter(mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => break 'fill Some(e.to_string()),
                };
                let Some(chain) = chain else {
                    break;
                };
                out.popped += 1;
                let head = chain.head_index();
                if head >= queue.size() {
                    break 'fill Some(format!("head index {head} outside the queue"));
                }
                if held[usize::from(head)] {
                    break 'fill Some(format!("head index {head} posted twice"));
                }
                let mut c = pool.pop().unwrap_or_default();
                c.iov.0.clear();
                c.segs.clear();
                match frame::walk(mem, chain, Direction::Rx, &mut c.iov.0, Some(&mut c.segs)) {
                    Ok(len) => {
                        c.head = head;
                        c.len = len;
                        held[usize::from(head)] = true;
                        ready.push_back(c);
                        have = have.saturating_add(len);
                    }
                    Err(e) => {
                        pool.push(c);
                        counters.rx_errors += 1;
                        warn!("virtio-net: receive chain {head} refused: {e}");
                        if let Err(e) = queue.add_used(mem, head, 0) {
                            break 'fill Some(format!("used ring: {e}"));
                        }
                        used += 1;
                    }
                }
            }
            if !ready.is_empty() || need_full {
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
        if broken.is_none() && !ready.is_empty() && (!need_full || have >= want) {
            let mut read = spare.pop().unwrap_or_default();
            read.clear();
            while let Some(c) = ready.front() {
                // The overflow byte needs one iovec too.
                if !read.chains.is_empty()
                    && (read.capacity >= want || read.iov.0.len() + c.iov.0.len() >= IOV_MAX)
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
                if let (Some(last), Some(next)) = (read.iov.0.last_mut(), c.iov.0.first()) {
                    if (last.iov_base as usize).wrapping_add(last.iov_len) == next.iov_base as usize
                    {
                        last.iov_len += next.iov_len;
                        iovs.next();
                    }
                }
                read.iov.0.extend(iovs);
                read.capacity = read.capacity.saturating_add(c.len);
                read.chains.push(c);
            }
            if read.iov.0.len() < IOV_MAX {
                let ov = read.overflow.as_mut_ptr();
                read.iov.0.push(libc::iovec {
                    iov_base: ov.cast(),
                    iov_len: 1,
                });
            }
            let op = IoOp::Readv {
                fd,
                iovecs: read.iov.0.as_ptr(),
                iovcnt: read.iov.0.len() as u32,
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
                    while let Some(c) = read.chains.pop() {
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
        if used > 0 {
            self.signal_used(RX_QUEUE, mem);
        }
        if let Some(why) = broken {
            return Err(self.break_queue(RX_QUEUE, why));
        }
        if let Some(e) = submit_error {
            self.rx.stalled = true;
            return Err(NetError::Submit(e));
        }
        Ok(out)
    }

    fn rx_complete<M: GuestMemory>(
        &mut self,
        tag: u64,
        res: i32,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, NetError> {
        if let Some(i) = self.rx.stale.iter().position(|r| r.tag == tag) {
            let old = self.rx.stale.swap_remove(i);
            if res > 0 {
                // A frame went into buffers from before the reset.
                self.counters.rx_dropped += 1;
            }
            self.rx.recycle(old);
            return self.rx_fill(mem, io);
        }
        let Some(i) = self.rx.reads.iter().position(|r| r.tag == tag) else {
            warn!("virtio-net: completion for unknown tag {tag:#x}");
            return Ok(ProcessOutcome::default());
        };
        let mut read = self.rx.reads.swap_remove(i);
        let delivered = self.rx_deliver(&mut read, res, mem);
        self.rx.recycle(read);
        delivered?;
        if self.rx.stalled {
            return Ok(ProcessOutcome::default());
        }
        self.rx_fill(mem, io)
    }

    /// Answers a finished read: the chains the frame filled go to the used
    /// ring, the rest back to `Rx::ready` for the next read.
    fn rx_deliver<M: GuestMemory>(
        &mut self,
        read: &mut RxRead,
        res: i32,
        mem: &M,
    ) -> Result<(), NetError> {
        let Rx {
            queue: Some(queue),
            ready,
            held,
            ..
        } = &mut self.rx
        else {
            return Ok(());
        };
        let mut give_back = |read: &mut RxRead, keep: usize| {
            for c in read.chains.drain(keep..).rev() {
                ready.push_front(c);
            }
        };
        let n = match usize::try_from(res) {
            Err(_) => {
                give_back(read, 0);
                if res != -libc::EAGAIN {
                    self.counters.rx_errors += 1;
                    warn!("virtio-net: tap read failed: errno {}", -res);
                }
                // Do not spin on the tap: wait for the VMM's poll (or a kick).
                self.rx.stalled = true;
                return Ok(());
            }
            Ok(n) if n <= VNET_HDR_LEN || n > read.capacity => {
                // A tap reports a frame's full length even when it had to
                // cut it short; a frame that did not fit is dropped and the
                // buffers are reused.
                give_back(read, 0);
                self.counters.rx_dropped += 1;
                warn!(
                    "virtio-net: dropped a {n}-byte frame ({} bytes of buffers posted)",
                    read.capacity
                );
                return Ok(());
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
        give_back(read, chains_used);
        let num_buffers = chains_used as u16;
        // num_buffers first: the driver may read the frame as soon as the
        // first used entry is published.
        let hdr = read.chains.first().map_or(&[][..], |c| &c.segs[..]);
        if !frame::write_at(mem, hdr, NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes()) {
            warn!("virtio-net: writing num_buffers failed");
        }
        let mut left = n;
        let mut failed = None;
        for c in &read.chains {
            let len = c.len.min(left);
            left -= len;
            held[usize::from(c.head)] = false;
            if let Err(e) = queue.add_used(mem, c.head, len as u32) {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            return Err(self.break_queue(RX_QUEUE, format!("used ring: {e}")));
        }
        self.counters.rx_packets += 1;
        self.counters.rx_bytes += (n - VNET_HDR_LEN) as u64;
        self.signal_used(RX_QUEUE, mem);
        Ok(())
    }
}

impl<T: Tap> Drop for NetDevice<T> {
    fn drop(&mut self) {
        if self.in_flight() > 0 {
            // At VMM exit the ring is dropped first and has already waited for
            // (cancelled) every op, e.g. the RX read parked on the tap.
            log::debug!("virtio-net: dropped with I/O in flight; leaking its tap and buffers");
            // The kernel may still read these iovec arrays and write
            // through them, and queued ops name the tap's fd number:
            // closing it could redirect I/O to a file opened later.
            std::mem::forget(std::mem::take(&mut self.tx.slots));
            std::mem::forget(std::mem::take(&mut self.rx.reads));
            std::mem::forget(std::mem::take(&mut self.rx.stale));
            return;
        }
        // SAFETY: the tap is dropped exactly once, here, and never used
        // again; no op names its fd any more.
        unsafe { ManuallyDrop::drop(&mut self.tap) };
    }
}

impl<T: Tap> VirtioBackend for NetDevice<T> {
    type Error = NetError;

    fn is_active(&self) -> bool {
        self.activated
    }

    fn try_activate<M: GuestMemory>(
        &mut self,
        mem: &M,
        activation: &Activation,
    ) -> Result<(), NetError> {
        self.activate_queues(mem, activation)
    }

    fn drop_queues(&mut self) {
        self.reset();
    }

    fn request_reset(&mut self) {
        self.ask_for_reset();
    }

    fn interrupt(&self) -> &Interrupt {
        &self.irq
    }
}
