//! virtio-rng, the entropy device (VIRTIO 1.2 §5.4): the smallest complete
//! [`VirtioDevice`], and so the one to read first.
//!
//! The driver posts device-writable buffers on its one queue; the device
//! fills each with bytes from the host's `getrandom(2)` (non-blocking)
//! straight into guest memory and returns it. A guest booted without a
//! boot-time seed (a PVH entry carries no `SETUP_RNG_SEED`) initialises
//! its crng from this device.
//!
//! Each request gets at most [`MAX_REQUEST_BYTES`], so one drain (at most a
//! queue's worth of chains) costs the VMM thread a bounded, short time; the
//! spec lets the device return fewer bytes than the buffer holds.

use std::any::Any;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestMemory, Permissions};

use crate::guest_log::GuestLog;
use crate::io::{InterruptLine, IoSubmit, IOV_MAX};
use crate::rate_limiter::DeviceRateLimiter;
use crate::virtio::{
    drain_queue, map_guest_buffer, ChainTaken, DeviceError, DeviceShared, Interrupt, LimiterSide,
    ProcessOutcome, Throttle, VirtioDevice, Virtqueues, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1,
};

/// virtio device ID of an entropy device.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
/// Maximum size of the request queue.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Most bytes one request is given.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// The device has no feature bits of its own.
pub const FEATURES: u64 = F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC;

const REQUEST_QUEUE: usize = 0;

/// Per-device counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RngCounters {
    /// Requests popped.
    pub requests: u64,
    /// Random bytes written into guest buffers.
    pub bytes: u64,
    /// Requests refused (a device-readable or zero-length buffer) or left
    /// empty because the host had no entropy to give.
    pub errors: u64,
    /// Times the device asked the driver for a reset.
    pub needs_reset: u64,
    /// Guest-caused warnings not logged (rate limit).
    pub log_lines_suppressed: u64,
    /// Times the device's rate limiter held requests back.
    pub rate_limiter_throttled_events: u64,
}

/// Why a request got no bytes.
#[derive(Debug, thiserror::Error)]
enum RefusedRequest {
    #[error("device-readable buffer in an entropy request")]
    Readable,
    #[error("zero-length buffer in an entropy request")]
    ZeroLength,
    #[error("broken descriptor chain")]
    Broken,
    #[error("{0}")]
    Map(#[from] crate::virtio::MapError),
}

/// Fills buffers with host randomness; `getrandom(2)` by default, a fake in
/// tests.
pub trait EntropySource: Send + std::fmt::Debug {
    /// Fills up to `buf.len()` bytes; returns how many, or an error if the
    /// host cannot give any now (it must not block).
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
}

/// The host kernel's CSPRNG, asked without blocking.
#[derive(Debug, Default)]
pub struct HostRandom;

impl EntropySource for HostRandom {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
}

/// A virtio-rng device, owned by the VMM thread.
///
/// # Example
///
/// ```
/// use devices::virtio::rng::{HostRandom, RngDevice};
/// use devices::virtio::VirtioDevice;
/// use vm_memory::GuestMemoryMmap;
/// use vmm_sys_util::eventfd::EventFd;
///
/// let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
/// let dev = RngDevice::new(Box::new(HostRandom), Box::new(irqfd));
/// assert_eq!(VirtioDevice::<GuestMemoryMmap>::info(&dev).device_type, 4);
/// ```
#[derive(Debug)]
pub struct RngDevice {
    source: Box<dyn EntropySource>,
    queues: Virtqueues,
    counters: RngCounters,
    log: GuestLog,
    /// Host views of one request's buffers, reused.
    iov: Vec<libc::iovec>,
    /// Bytes and requests the guest may draw (Firecracker's `entropy`
    /// `rate_limiter`).
    limiter: DeviceRateLimiter,
    /// A throttle for the slot to arm.
    throttle: Option<Throttle>,
}

// SAFETY: `iov` only ever holds pointers into guest memory for the span of
// one request, on the VMM thread that owns the device; nothing else is
// thread-bound.
unsafe impl Send for RngDevice {}

impl RngDevice {
    /// Builds an inactive device drawing from `source`; `line` is the irqfd
    /// the VMM wired to the device's interrupt.
    pub fn new(source: Box<dyn EntropySource>, line: Box<dyn InterruptLine>) -> Self {
        let shared = Arc::new(DeviceShared::new(Vec::new(), Vec::new()));
        Self {
            source,
            queues: Virtqueues::new(
                "virtio-rng",
                &[QUEUE_MAX_SIZE],
                Interrupt::new(shared, line),
            ),
            counters: RngCounters::default(),
            log: GuestLog::new("virtio-rng"),
            iov: Vec::new(),
            limiter: DeviceRateLimiter::default(),
            throttle: None,
        }
    }

    /// Limits the bytes and requests the guest may draw: each request takes
    /// one op and the bytes it asks for (up to the per-request cap).
    pub fn set_rate_limiter(&mut self, limiter: DeviceRateLimiter) {
        self.limiter = limiter;
    }

    /// Counters since the device was made.
    pub fn counters(&self) -> RngCounters {
        RngCounters {
            needs_reset: self.queues.resets_requested(),
            log_lines_suppressed: self.log.suppressed() + self.queues.log_lines_suppressed(),
            rate_limiter_throttled_events: self.limiter.throttled(),
            ..self.counters
        }
    }

    /// Answers one request: fills its buffers (up to the cap) and returns
    /// the chain with the number of bytes written.
    fn take_chain<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        head: u16,
        chain: DescriptorChain<&M>,
    ) -> Result<ChainTaken, String> {
        self.counters.requests += 1;
        let written = match self.map_request(mem, chain) {
            Ok(()) if !self.limiter.is_unlimited() => {
                let bytes: usize = self.iov.iter().map(|v| v.iov_len).sum();
                if let Err(wait) = self.limiter.try_consume(bytes as u64, 1) {
                    self.iov.clear();
                    self.counters.requests -= 1;
                    self.throttle = Some(Throttle {
                        queue: REQUEST_QUEUE,
                        resume_after: wait,
                    });
                    return Ok(ChainTaken::Throttled);
                }
                self.fill_mapped()
            }
            Ok(()) => self.fill_mapped(),
            Err(e) => {
                self.counters.errors += 1;
                self.log
                    .warn("refused", format_args!("request refused: {e}"));
                0
            }
        };
        self.iov.clear();
        self.counters.bytes += written as u64;
        queue
            .add_used(mem, head, written as u32)
            .map_err(|e| format!("used ring: {e}"))?;
        Ok(ChainTaken::Answered)
    }

    /// Maps the chain's buffers, up to [`MAX_REQUEST_BYTES`], into `iov`.
    fn map_request<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> Result<(), RefusedRequest> {
        self.iov.clear();
        let mut room = MAX_REQUEST_BYTES;
        let mut last_had_next = false;
        for (count, desc) in chain.enumerate() {
            if count >= IOV_MAX {
                return Err(RefusedRequest::Broken);
            }
            if !desc.is_write_only() {
                return Err(RefusedRequest::Readable);
            }
            if desc.len() == 0 {
                return Err(RefusedRequest::ZeroLength);
            }
            last_had_next = desc.has_next();
            let len = (desc.len() as usize).min(room);
            if len > 0 {
                map_guest_buffer(mem, desc.addr(), len, Permissions::Write, &mut self.iov)?;
                room -= len;
            }
        }
        // The iterator stops early on a loop or a bad `next`: the last
        // descriptor it gave then still says NEXT.
        if last_had_next || self.iov.is_empty() && room == MAX_REQUEST_BYTES {
            return Err(RefusedRequest::Broken);
        }
        Ok(())
    }

    /// Fills the mapped buffers; returns the bytes written.
    fn fill_mapped(&mut self) -> usize {
        let mut written = 0usize;
        for iov in &self.iov {
            // SAFETY: `iov` was mapped just now from device-writable guest
            // memory inside the VM's mapping, which lives as long as the VM;
            // the driver gave these bytes to the device until it returns the
            // chain, so nothing else writes them meanwhile.
            let buf = unsafe { std::slice::from_raw_parts_mut(iov.iov_base.cast(), iov.iov_len) };
            match self.source.fill(buf) {
                Ok(n) => {
                    written += n;
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) => {
                    self.counters.errors += 1;
                    self.log
                        .warn("host", format_args!("host entropy unavailable: {e}"));
                    break;
                }
            }
        }
        written
    }
}

impl<M: GuestMemory> VirtioDevice<M> for RngDevice {
    fn kind(&self) -> &'static str {
        "rng"
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn queues(&self) -> &Virtqueues {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut Virtqueues {
        &mut self.queues
    }

    fn reset(&mut self) {
        // Requests are answered at once: nothing is ever in flight.
        self.queues.reset();
    }

    fn process_queue(
        &mut self,
        qidx: usize,
        mem: &M,
        _io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, DeviceError> {
        if qidx != REQUEST_QUEUE {
            return Err(DeviceError::NoSuchQueue(qidx));
        }
        drain_queue(
            self,
            |d| &mut d.queues,
            qidx,
            mem,
            |d, q, chain, head| d.take_chain(q, mem, head, chain),
        )
    }

    fn complete(&mut self, tag: u64, _res: i32, _mem: &M, _io: &mut dyn IoSubmit) {
        log::debug!("virtio-rng: completion for unknown tag {tag:#x}");
    }

    fn in_flight(&self) -> usize {
        0
    }

    fn take_throttle(&mut self) -> Option<Throttle> {
        self.throttle.take()
    }

    fn rate_limiter_mut(&mut self, side: LimiterSide) -> Option<&mut DeviceRateLimiter> {
        (side == LimiterSide::Requests).then_some(&mut self.limiter)
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.counters()).unwrap_or_default()
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests;
