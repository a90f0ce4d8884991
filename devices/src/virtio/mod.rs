//! Virtio devices and the virtio-mmio transport that carries them.
//!
//! A virtio device here is split in two halves that live on different
//! threads, as DESIGN.md draws it:
//!
//! ```text
//!   vCPU threads (MMIO exits)            VMM thread (io_uring ring)
//!   ┌──────────────────────┐  Activate   ┌─────────────────────────────┐
//!   │ MmioTransport        │ ──────────► │ backend (e.g. BlockDevice)  │
//!   │  registers, features │  Reset      │  owns virtio_queue::Queue,  │
//!   │  status machine      │ ──────────► │  files, in-flight I/O       │
//!   └─────────┬────────────┘ (mpsc+evfd) └──────────────┬──────────────┘
//!             │         Arc<DeviceShared>: ISR bits,    │
//!             └──────── NEEDS_RESET, config bytes ──────┘
//! ```
//!
//! The transport never touches a queue or guest memory; the backend never
//! sees a register. What they share is deliberately small ([`DeviceShared`])
//! and never locked on the data path. A device plugs into the same
//! transport, and into the VMM thread's ring, by implementing
//! [`VirtioDevice`]; the pieces every device shares ([`Virtqueues`],
//! [`drain`], [`InFlight`]) live here so a device is only its own requests.

pub mod block;
mod device;
mod inflight;
pub mod mmio;
pub mod net;
pub mod p9;
mod queue;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
mod used_batch;
mod virtqueues;
pub mod vsock;

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::io::InterruptLine;

pub use device::{DeviceError, LimiterSide, PollRequest, ProcessOutcome, Throttle, VirtioDevice};
pub use inflight::{
    map_guest_buffer, Generation, InFlight, Iovecs, MapError, Reserved, Tag, Taken,
};
pub use mmio::{MmioTransport, TransportError, MMIO_SIZE, NOTIFY_REG_OFFSET};
pub use queue::{QueueConfig, QueueConfigError};
pub use virtqueues::{drain, drain_queue, ChainTaken, Virtqueues};

/// ISR bit: the device put buffers in a used ring.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// ISR bit: the device configuration (or NEEDS_RESET) changed.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The feature bit `bit` as a mask; `bit` must be below 64.
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// VIRTIO_F_VERSION_1: every device here is a modern (1.x) device only.
pub const F_VERSION_1: u64 = feature(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1);
/// VIRTIO_RING_F_EVENT_IDX: used/avail event suppression.
pub const F_EVENT_IDX: u64 = feature(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
/// VIRTIO_RING_F_INDIRECT_DESC: indirect descriptor tables.
pub const F_INDIRECT_DESC: u64 = feature(virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);

/// What the transport must know about a device to present it to a driver.
///
/// Everything here is fixed for the device's life except the config bytes,
/// which live in [`DeviceShared`] so the backend can change them (a resized
/// disk) while the transport serves them.
#[derive(Clone, Debug)]
pub struct VirtioDeviceInfo {
    /// Virtio device ID (`VIRTIO_ID_*`), e.g. 2 for block, 1 for net.
    pub device_type: u32,
    /// Feature bits the device offers.
    pub avail_features: u64,
    /// Maximum size of each queue; the number of entries is the queue count.
    pub queue_max_sizes: Vec<u16>,
    /// State shared with the backend.
    pub shared: Arc<DeviceShared>,
}

/// Device configuration space as the driver sees it at offset 0x100.
#[derive(Debug)]
struct ConfigSpace {
    bytes: Vec<u8>,
    writable: Vec<Range<usize>>,
    generation: u32,
}

/// The little state the transport (vCPU threads) and the backend (VMM
/// thread) both touch: interrupt status, the NEEDS_RESET request and the
/// config space.
///
/// The ISR and the flag are atomics so the data path takes no lock; the
/// config space is behind a mutex because only the driver's config reads
/// and rare backend updates (disk resize) touch it.
#[derive(Debug)]
pub struct DeviceShared {
    isr: AtomicU32,
    needs_reset: AtomicBool,
    reset_pending: AtomicBool,
    config: Mutex<ConfigSpace>,
}

impl DeviceShared {
    /// Makes the shared state with initial config bytes, of which only the
    /// `writable` byte ranges accept driver writes.
    pub fn new(config: Vec<u8>, writable: Vec<Range<usize>>) -> Self {
        Self {
            isr: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            reset_pending: AtomicBool::new(false),
            config: Mutex::new(ConfigSpace {
                bytes: config,
                writable,
                generation: 0,
            }),
        }
    }

    fn config(&self) -> MutexGuard<'_, ConfigSpace> {
        // A panic elsewhere while holding this lock leaves plain bytes
        // behind; they are still the best answer we have.
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Current InterruptStatus bits.
    pub fn interrupt_status(&self) -> u32 {
        self.isr.load(Ordering::Acquire)
    }

    /// ORs `bits` into InterruptStatus (before the irqfd is signalled).
    pub fn raise(&self, bits: u32) {
        self.isr.fetch_or(bits, Ordering::AcqRel);
    }

    /// Clears `bits` from InterruptStatus, as InterruptACK does.
    pub fn ack(&self, bits: u32) {
        self.isr.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Whether the backend asked the driver to reset the device.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Asks the driver to reset the device (DEVICE_NEEDS_RESET in Status).
    /// The caller raises the config interrupt (see [`Interrupt::needs_reset`]).
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
    }

    /// The driver reset a live device: until the backend on the VMM thread
    /// has dropped its queues ([`Self::finish_reset`]), Status must not read
    /// 0, or the driver would reuse rings the backend may still write
    /// (virtio 1.2 §4.2.2.1: reset is complete when Status reads 0).
    pub fn begin_reset(&self) {
        self.reset_pending.store(true, Ordering::Release);
    }

    /// Called by the backend once it has let go of the queues: clears
    /// what it may have raised meanwhile, then lets Status read 0.
    pub fn finish_reset(&self) {
        self.clear();
        self.reset_pending.store(false, Ordering::Release);
    }

    /// Whether a reset waits for the backend.
    pub fn reset_pending(&self) -> bool {
        self.reset_pending.load(Ordering::Acquire)
    }

    /// Forgets interrupt and NEEDS_RESET state, as a device reset does.
    pub fn clear(&self) {
        self.needs_reset.store(false, Ordering::Release);
        self.isr.store(0, Ordering::Release);
    }

    /// ConfigGeneration: changes whenever the device changes its config.
    pub fn config_generation(&self) -> u32 {
        self.config().generation
    }

    /// Length of the config space in bytes.
    pub fn config_len(&self) -> usize {
        self.config().bytes.len()
    }

    /// Fills `data` from config offset `offset`; bytes past the end read 0.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Applies a driver write; returns false (and changes nothing) unless
    /// every byte falls in a writable range.
    pub fn write_config(&self, offset: u64, data: &[u8]) -> bool {
        let mut cfg = self.config();
        let Some(start) = usize::try_from(offset).ok() else {
            return false;
        };
        let Some(end) = start.checked_add(data.len()) else {
            return false;
        };
        let allowed = end <= cfg.bytes.len()
            && cfg
                .writable
                .iter()
                .any(|r| r.start <= start && end <= r.end);
        if !allowed {
            return false;
        }
        cfg.bytes[start..end].copy_from_slice(data);
        true
    }

    /// Lets the device rewrite its config bytes and bumps the generation so
    /// a driver reading a multi-word field notices it changed underneath.
    pub fn update_config(&self, f: impl FnOnce(&mut [u8])) {
        let mut cfg = self.config();
        f(&mut cfg.bytes);
        cfg.generation = cfg.generation.wrapping_add(1);
    }
}

/// A device backend's way to interrupt the guest: sets the ISR bit the
/// driver will read, then signals the line (a KVM irqfd in the VMM).
pub struct Interrupt {
    shared: Arc<DeviceShared>,
    line: Box<dyn InterruptLine>,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt")
            .field("isr", &self.shared.interrupt_status())
            .finish_non_exhaustive()
    }
}

impl Interrupt {
    /// Ties the ISR in `shared` to `line`.
    pub fn new(shared: Arc<DeviceShared>, line: Box<dyn InterruptLine>) -> Self {
        Self { shared, line }
    }

    /// Tells the driver a used ring moved.
    pub fn used_buffer(&self) -> io::Result<()> {
        self.shared.raise(INT_VRING);
        self.line.signal()
    }

    /// Tells the driver the config space changed.
    pub fn config_changed(&self) -> io::Result<()> {
        self.shared.raise(INT_CONFIG);
        self.line.signal()
    }

    /// Sets DEVICE_NEEDS_RESET and raises the config interrupt that the
    /// spec pairs with it.
    pub fn needs_reset(&self) -> io::Result<()> {
        self.shared.set_needs_reset();
        self.config_changed()
    }

    /// The shared state this interrupt writes.
    pub fn shared(&self) -> &Arc<DeviceShared> {
        &self.shared
    }
}

/// What the driver negotiated, handed to the backend at DRIVER_OK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activation {
    /// Features the driver acknowledged (a subset of the offered ones,
    /// including VERSION_1).
    pub features: u64,
    /// One entry per device queue, in queue index order.
    pub queues: Vec<QueueConfig>,
}

/// A message from the transport to the backend's owner on the VMM thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransportEvent {
    /// The driver set DRIVER_OK: build the queues and start serving.
    Activate(Activation),
    /// The driver reset the device: drop the queues, forget in-flight work.
    Reset,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::fake::CountingLine;

    #[test]
    fn config_reads_past_the_end_are_zero_and_writes_need_permission() {
        let shared = DeviceShared::new(vec![1, 2, 3, 4], vec![Range { start: 2, end: 4 }]);
        let mut b = [0xffu8; 6];
        shared.read_config(1, &mut b);
        assert_eq!(b, [2, 3, 4, 0, 0, 0]);
        shared.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 6]);
        assert!(!shared.write_config(1, &[9, 9]));
        assert!(!shared.write_config(3, &[9, 9]));
        assert!(!shared.write_config(u64::MAX, &[9]));
        assert!(shared.write_config(2, &[7, 8]));
        shared.read_config(0, &mut b[..4]);
        assert_eq!(&b[..4], &[1, 2, 7, 8]);
        assert_eq!(shared.config_generation(), 0);
        shared.update_config(|c| c[0] = 5);
        assert_eq!(shared.config_generation(), 1);
    }

    #[test]
    fn interrupts_set_isr_bits_before_signalling() -> io::Result<()> {
        let shared = Arc::new(DeviceShared::new(Vec::new(), Vec::new()));
        let line = CountingLine::default();
        let irq = Interrupt::new(shared.clone(), Box::new(line.clone()));
        irq.used_buffer()?;
        assert_eq!(shared.interrupt_status(), INT_VRING);
        irq.needs_reset()?;
        assert_eq!(shared.interrupt_status(), INT_VRING | INT_CONFIG);
        assert!(shared.needs_reset());
        assert_eq!(line.count(), 2);
        shared.ack(INT_VRING);
        assert_eq!(shared.interrupt_status(), INT_CONFIG);
        shared.clear();
        assert_eq!(shared.interrupt_status(), 0);
        assert!(!shared.needs_reset());
        Ok(())
    }
}
