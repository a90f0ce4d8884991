//! The virtio-net device: its queues, tap and counters, and the
//! [`VirtioDevice`] contract; the data paths are in `tx` and `rx`.
//!
//! ```text
//!   new ──► inactive ──activate──► active ──process_queue / complete──► active
//!              ▲                     │  bad queue state: NEEDS_RESET, queue stops
//!              └──────── reset ◄─────┘  (in-flight ops orphaned; the VMM cancels
//!                                        parked reads and reports the reset done
//!                                        once every op completed)
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

use std::any::Any;
use std::mem::ManuallyDrop;
use std::os::fd::RawFd;
use std::sync::Arc;

use vm_memory::GuestMemory;

use super::rx::Rx;
use super::rx_provided::{Provided, MULTISHOT_QUEUE};
use super::tap::Tap;
use super::tx_slots::TxSlots;
use super::{
    config_bytes, features, generate_mac, tap_offloads, MacAddr, NetCounters, DEVICE_TYPE,
    NUM_QUEUES, QUEUE_MAX_SIZE, RX_QUEUE, TX_QUEUE,
};
use crate::buf_ring::BufRing;
use crate::guest_log::GuestLog;
use crate::io::{InterruptLine, IoSubmit, Selected};
use crate::rate_limiter::DeviceRateLimiter;
use crate::virtio::{
    Activation, DeviceError, DeviceShared, Generation, Interrupt, LimiterSide, PollRequest,
    ProcessOutcome, Tag, Throttle, VirtioDevice, Virtqueues,
};

/// What a network device is made of.
#[derive(Debug)]
pub struct NetConfig<T: Tap> {
    /// The host end, already open (see [`super::TapDevice::open`]).
    pub tap: T,
    /// The guest's MAC; `None` picks a random locally administered one.
    pub mac: Option<MacAddr>,
}

/// A virtio-net device, owned by the VMM thread.
///
/// # Example
///
/// ```
/// use std::os::fd::{AsRawFd, RawFd};
/// use devices::virtio::net::{MacAddr, NetConfig, NetDevice, Tap, TapError};
/// use devices::virtio::VirtioDevice;
/// use vm_memory::GuestMemoryMmap;
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
/// let mac: MacAddr = "02:00:00:00:00:01".parse().unwrap();
/// let dev = NetDevice::new(NetConfig { tap, mac: Some(mac) }, Box::new(irqfd));
/// let info = VirtioDevice::<GuestMemoryMmap>::info(&dev);
/// assert_eq!(info.device_type, 1);
/// assert_eq!(info.queue_max_sizes.len(), 2);
/// ```
#[derive(Debug)]
pub struct NetDevice<T: Tap> {
    /// Not dropped while ops may still name its fd (see Drop).
    pub(super) tap: ManuallyDrop<T>,
    mac: MacAddr,
    /// What the device offers ([`features`]: MTU when given one).
    offered: u64,
    pub(super) queues: Virtqueues,
    pub(super) generation: Generation,
    pub(super) rx: Rx,
    /// RX through provided buffers and a multishot read (`rx_provided`).
    pub(super) pbuf: Provided,
    pub(super) tx: TxSlots,
    pub(super) counters: NetCounters,
    pub(super) log: GuestLog,
    /// Limits on what the guest receives: a read is admitted by the ops
    /// bucket and a bandwidth bucket out of debt; the frame's bytes are
    /// charged when it arrives.
    pub(super) rx_limiter: DeviceRateLimiter,
    /// Limits on what the guest sends, taken per frame before its write.
    pub(super) tx_limiter: DeviceRateLimiter,
    /// RX waits for the slot's throttle timer: no tap read is started.
    pub(super) rx_throttled: bool,
    /// Throttles for the slot to arm, per queue.
    pub(super) throttles: [Option<Throttle>; NUM_QUEUES],
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
        Self {
            tap: ManuallyDrop::new(config.tap),
            mac,
            offered: features(mtu),
            queues: Virtqueues::new(
                "virtio-net",
                &[QUEUE_MAX_SIZE; NUM_QUEUES],
                Interrupt::new(shared, line),
            ),
            generation: Generation::default(),
            rx: Rx::new(QUEUE_MAX_SIZE),
            pbuf: Provided::new(mtu),
            tx: TxSlots::new(TX_QUEUE as u8, QUEUE_MAX_SIZE),
            counters: NetCounters::default(),
            log: GuestLog::new("virtio-net"),
            rx_limiter: DeviceRateLimiter::default(),
            tx_limiter: DeviceRateLimiter::default(),
            rx_throttled: false,
            throttles: [None; NUM_QUEUES],
        }
    }

    /// Limits what the guest receives and sends (Firecracker's
    /// `rx_rate_limiter` / `tx_rate_limiter`): one op per frame and its
    /// bytes without the vnet header.
    pub fn set_rate_limiters(&mut self, rx: DeviceRateLimiter, tx: DeviceRateLimiter) {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
    }

    /// Records that `queue` stopped for its limiter, for the slot.
    pub(super) fn throttle(&mut self, queue: usize, resume_after: std::time::Duration) {
        if let Some(t) = self.throttles.get_mut(queue) {
            *t = Some(Throttle {
                queue,
                resume_after,
            });
        }
    }

    /// The guest's MAC address (given or generated), for messages and the API.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The tap's fd.
    pub fn tap_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    /// Counters since the device was made.
    pub fn counters(&self) -> NetCounters {
        NetCounters {
            needs_reset: self.queues.resets_requested(),
            log_lines_suppressed: self.log.suppressed() + self.queues.log_lines_suppressed(),
            rx_rate_limiter_throttled: self.rx_limiter.throttled(),
            tx_rate_limiter_throttled: self.tx_limiter.throttled(),
            ..self.counters
        }
    }

    /// Features the driver acknowledged at the last activation.
    pub fn acked_features(&self) -> u64 {
        self.queues.acked_features()
    }

    /// Tags of tap reads submitted before the last reset and still in the
    /// kernel: they may wait for a frame indefinitely, so the VMM cancels
    /// them on its ring.
    pub fn stale_rx_tags(&self) -> Vec<u64> {
        let provided = self.pbuf.stale_tag();
        if !self.rx.has_stale() && provided.is_none() {
            // The usual case, asked after every event: no iterator to
            // collect (that cost ~70 instructions per TX frame).
            return Vec::new();
        }
        self.rx.stale_tags().chain(provided).collect()
    }
}

impl<T: Tap> Drop for NetDevice<T> {
    fn drop(&mut self) {
        if self.ops_in_flight() > 0 {
            // At VMM exit the ring is dropped first and has already waited for
            // (cancelled) every op, e.g. the RX read parked on the tap.
            log::debug!("virtio-net: dropped with I/O in flight; leaking its tap and buffers");
            // The kernel may still read these iovec arrays and write
            // through them, and queued ops name the tap's fd number:
            // closing it could redirect I/O to a file opened later. The TX
            // table leaks its own arrays when dropped with ops in flight.
            self.rx.leak_in_flight();
            self.pbuf.leak_in_flight();
            return;
        }
        // SAFETY: the tap is dropped exactly once, here, and never used
        // again; no op names its fd any more.
        unsafe { ManuallyDrop::drop(&mut self.tap) };
    }
}

impl<T: Tap + 'static, M: GuestMemory> VirtioDevice<M> for NetDevice<T> {
    fn kind(&self) -> &'static str {
        "net"
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn queues(&self) -> &Virtqueues {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut Virtqueues {
        &mut self.queues
    }

    fn activate(&mut self, mem: &M, activation: &Activation) -> Result<(), DeviceError> {
        self.queues.activate(mem, activation, self.offered)?;
        if let Err(e) = self.tap.set_offload(tap_offloads(activation.features)) {
            self.queues.reset();
            return Err(DeviceError::Host(e.to_string()));
        }
        self.rx.activated();
        self.pbuf.activated(activation.features);
        Ok(())
    }

    fn reset(&mut self) {
        self.queues.reset();
        self.rx.reset();
        let withdrawn = self.pbuf.reset();
        self.rx.pool.extend(withdrawn);
        self.tx.orphan_all();
        self.generation.bump();
        self.rx_throttled = false;
        self.throttles = [None; NUM_QUEUES];
        // The next driver has not said it takes offloaded frames.
        if let Err(e) = self.tap.set_offload(0) {
            log::warn!("virtio-net: clearing tap offloads failed: {e}");
        }
    }

    /// TX sends up to one queue's worth of chains; RX starts tap reads
    /// into the posted buffers (also the call to make when the tap polled
    /// readable).
    fn process_queue(
        &mut self,
        qidx: usize,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, DeviceError> {
        match qidx {
            RX_QUEUE => {
                self.rx.stalled = false;
                self.rx_throttled = false;
                self.rx_fill(mem, io)
            }
            TX_QUEUE => self.tx_drain(mem, io),
            _ => Err(DeviceError::NoSuchQueue(qidx)),
        }
    }

    fn complete(&mut self, tag: u64, res: i32, mem: &M, io: &mut dyn IoSubmit) {
        match usize::from(Tag::decode(tag).queue) {
            RX_QUEUE => {
                if let Err(e) = self.rx_complete(tag, res, mem, io) {
                    log::debug!("virtio-net: {e}");
                }
            }
            TX_QUEUE => self.tx_complete(tag, res, mem),
            q if q == usize::from(MULTISHOT_QUEUE) => {
                self.complete_selected(tag, res, Selected::default(), mem, io);
            }
            _ => log::debug!("virtio-net: completion for unknown queue (tag {tag:#x})"),
        }
    }

    fn complete_selected(
        &mut self,
        tag: u64,
        res: i32,
        selected: Selected,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) {
        if Tag::decode(tag).queue != MULTISHOT_QUEUE {
            return self.complete(tag, res, mem, io);
        }
        if let Err(e) = self.pbuf_complete(tag, res, selected, mem, io) {
            log::debug!("virtio-net: {e}");
        }
    }

    fn buf_ring_mut(&mut self) -> Option<&mut BufRing> {
        self.pbuf.ring_mut()
    }

    fn in_flight(&self) -> usize {
        self.ops_in_flight()
    }

    fn stale_tags(&self) -> Vec<u64> {
        self.stale_rx_tags()
    }

    /// A tap read failed or found nothing (EAGAIN) and RX now waits for the
    /// tap to become readable. Normally not needed: io_uring parks the
    /// readv in its own poll on the tap.
    fn poll_request(&self) -> Option<PollRequest> {
        (self.queues.is_active() && self.rx.stalled && self.queues_live(RX_QUEUE)).then(|| {
            PollRequest {
                fd: self.tap.as_raw_fd(),
                queue: RX_QUEUE,
            }
        })
    }

    fn take_throttle(&mut self) -> Option<Throttle> {
        self.throttles.iter_mut().find_map(Option::take)
    }

    fn rate_limiter_mut(&mut self, side: LimiterSide) -> Option<&mut DeviceRateLimiter> {
        match side {
            LimiterSide::Rx => Some(&mut self.rx_limiter),
            LimiterSide::Tx => Some(&mut self.tx_limiter),
            LimiterSide::Requests => None,
        }
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.counters()).unwrap_or_default()
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl<T: Tap> NetDevice<T> {
    fn queues_live(&self, qidx: usize) -> bool {
        self.queues.is_live(qidx)
    }

    /// Tap reads and writes the kernel may still be working on.
    pub fn ops_in_flight(&self) -> usize {
        self.tx.outstanding() + self.rx.in_flight() + self.pbuf.in_flight()
    }
}
