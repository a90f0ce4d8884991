//! The virtio-mmio version 2 transport (VIRTIO 1.2 §4.2.2) as a
//! [`BusDevice`].
//!
//! This is the register file a driver talks to on MMIO exits. It lives on
//! vCPU threads behind the bus's mutex and does no device I/O: it
//! negotiates features, walks the status state machine, records the queue
//! layout, and at DRIVER_OK hands everything to the VMM thread as a
//! [`TransportEvent::Activate`] (a reset sends [`TransportEvent::Reset`]).
//! From then on the backend alone owns the queues.
//!
//! ```text
//!  0 ──ACK──► ACK ──DRIVER──► +DRIVER ──FEATURES_OK──► +FEATURES_OK ──DRIVER_OK──► live
//!                                       (refused: bit not latched     (queues checked,
//!                                        if features are bad)           Activate sent)
//!  any ──write 0──► 0 (every register back to its initial value; Reset sent if live)
//!  any ──FAILED──► +FAILED          backend ──NEEDS_RESET──► Status shows DEVICE_NEEDS_RESET
//! ```

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;

use log::{error, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, QueueConfig, TransportEvent, VirtioDeviceInfo, F_VERSION_1};
use crate::bus::{BusAccess, BusDevice};

/// Size of one virtio-mmio device window (registers plus config space).
pub const MMIO_SIZE: u64 = 0x1000;

/// Largest queue the virtio spec allows.
const MAX_QUEUE_SIZE: u16 = 32768;

/// "virt", little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// This transport implements only the modern (version 2) layout.
pub const MMIO_VERSION: u32 = 2;
/// VendorID reported to the driver: "RVMM".
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"RVMM");

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify's offset in the window: the VMM registers each queue's kick
/// EventFd as a KVM ioeventfd at `base + NOTIFY_REG_OFFSET` with the queue
/// index as datamatch (4 bytes).
pub const NOTIFY_REG_OFFSET: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_QUEUE_RESET: u64 = 0x0c0;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_START: u64 = 0x100;

const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

// One bit per kind of driver misbehaviour, so each is logged once at most.
const LOG_BAD_ACCESS: u32 = 1 << 0;
const LOG_READ_ONLY: u32 = 1 << 1;
const LOG_WRITE_ONLY: u32 = 1 << 2;
const LOG_LATE_WRITE: u32 = 1 << 3;
const LOG_BAD_STATUS: u32 = 1 << 4;
const LOG_BAD_FEATURES: u32 = 1 << 5;
const LOG_BAD_QUEUE: u32 = 1 << 6;
const LOG_CONFIG_WRITE: u32 = 1 << 7;
const LOG_SEND: u32 = 1 << 8;

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device declared no queues, or more than the transport can address.
    #[error("device declares {0} queues")]
    QueueCount(usize),
    /// One kick EventFd is needed per queue.
    #[error("{kicks} kick eventfds for {queues} queues")]
    KickCount {
        /// Kick eventfds given.
        kicks: usize,
        /// Queues declared.
        queues: usize,
    },
    /// A queue's maximum size is zero, not a power of two, or above 32768.
    #[error("queue {index} maximum size {max} is invalid")]
    QueueMax {
        /// Queue index.
        index: usize,
        /// Declared maximum.
        max: u16,
    },
}

/// Messages a transport may have queued for the VMM thread at once. A
/// driver following the spec has at most two outstanding (a reset, then an
/// activation); one that floods status writes past this bound gets its
/// device marked NEEDS_RESET instead of growing the VMM's memory.
pub const TRANSPORT_QUEUE_DEPTH: usize = 16;

/// Where activation and reset messages go, and how the VMM thread's ring
/// learns there is one to read.
#[derive(Debug)]
pub struct TransportEvents {
    /// The VMM thread receives from the other end; made with
    /// `sync_channel(TRANSPORT_QUEUE_DEPTH)`.
    pub sender: SyncSender<TransportEvent>,
    /// Written after each message; the VMM thread watches it on its ring.
    pub wake: EventFd,
}

/// A virtio-mmio v2 register window for one device.
///
/// # Example
///
/// ```
/// use std::sync::{mpsc, Arc};
/// use devices::bus::{BusAccess, BusDevice};
/// use devices::virtio::{DeviceShared, MmioTransport, VirtioDeviceInfo, F_VERSION_1};
/// use devices::virtio::mmio::{TransportEvents, TRANSPORT_QUEUE_DEPTH};
/// use vmm_sys_util::eventfd::EventFd;
///
/// let info = VirtioDeviceInfo {
///     device_type: 2,
///     avail_features: F_VERSION_1,
///     queue_max_sizes: vec![256],
///     shared: Arc::new(DeviceShared::new(vec![0; 8], vec![])),
/// };
/// let (sender, _receiver) = mpsc::sync_channel(TRANSPORT_QUEUE_DEPTH);
/// let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
/// let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
/// let mut t = MmioTransport::new(info, TransportEvents { sender, wake }, vec![kick]).unwrap();
/// let mut magic = [0u8; 4];
/// t.read(BusAccess { offset: 0, vcpu: 0 }, &mut magic);
/// assert_eq!(&magic, b"virt");
/// ```
#[derive(Debug)]
pub struct MmioTransport {
    label: String,
    info: VirtioDeviceInfo,
    events: TransportEvents,
    kicks: Vec<EventFd>,
    logged: u32,
    regs: Registers,
    /// What Status reads while a reset waits for the backend.
    status_before_reset: u32,
}

/// Everything a reset puts back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Registers {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    shm_sel: u32,
    queues: Vec<QueueConfig>,
    activated: bool,
}

impl Registers {
    fn initial(max_sizes: &[u16]) -> Self {
        Self {
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            shm_sel: 0,
            queues: max_sizes
                .iter()
                .map(|&max| QueueConfig {
                    size: max,
                    ..QueueConfig::default()
                })
                .collect(),
            activated: false,
        }
    }
}

fn set_low(v: u64, low: u32) -> u64 {
    (v & !0xffff_ffff) | u64::from(low)
}

fn set_high(v: u64, high: u32) -> u64 {
    (v & 0xffff_ffff) | (u64::from(high) << 32)
}

impl MmioTransport {
    /// Presents `info` to the driver; `kicks[i]` is queue `i`'s notify
    /// EventFd (the same one the VMM registered as an ioeventfd), written
    /// here only when a QueueNotify write reaches us anyway.
    pub fn new(
        info: VirtioDeviceInfo,
        events: TransportEvents,
        kicks: Vec<EventFd>,
    ) -> Result<Self, TransportError> {
        let queues = info.queue_max_sizes.len();
        if queues == 0 || queues > usize::from(u16::MAX) {
            return Err(TransportError::QueueCount(queues));
        }
        if kicks.len() != queues {
            return Err(TransportError::KickCount {
                kicks: kicks.len(),
                queues,
            });
        }
        for (index, &max) in info.queue_max_sizes.iter().enumerate() {
            if max == 0 || !max.is_power_of_two() || max > MAX_QUEUE_SIZE {
                return Err(TransportError::QueueMax { index, max });
            }
        }
        Ok(Self {
            label: format!("virtio-mmio (type {})", info.device_type),
            regs: Registers::initial(&info.queue_max_sizes),
            info,
            events,
            kicks,
            logged: 0,
            status_before_reset: 0,
        })
    }

    /// The Status register as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.info.shared.reset_pending() {
            // The backend has not let go of the queues yet: the reset is
            // not complete, so Status does not read 0.
            return self.status_before_reset;
        }
        if self.info.shared.needs_reset() {
            self.regs.status | S_NEEDS_RESET
        } else {
            self.regs.status
        }
    }

    fn log_once(&mut self, kind: u32, msg: std::fmt::Arguments<'_>) {
        if self.logged & kind == 0 {
            self.logged |= kind;
            warn!("{}: {} (further ones not logged)", self.label, msg);
        }
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.regs.queues.get(self.regs.queue_sel as usize)
    }

    fn queue_max(&self) -> u16 {
        self.info
            .queue_max_sizes
            .get(self.regs.queue_sel as usize)
            .copied()
            .unwrap_or(0)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let features = self.info.avail_features;
        match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.info.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.regs.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => u32::from(self.queue_max()),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.info.shared.interrupt_status(),
            REG_STATUS => self.status(),
            // No shared memory regions: length and base read as all ones.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_QUEUE_RESET => 0,
            REG_CONFIG_GENERATION => self.info.shared.config_generation(),
            REG_DEVICE_FEATURES_SEL
            | REG_DRIVER_FEATURES
            | REG_DRIVER_FEATURES_SEL
            | REG_QUEUE_SEL
            | REG_QUEUE_NUM
            | NOTIFY_REG_OFFSET
            | REG_INTERRUPT_ACK
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
            | REG_SHM_SEL => {
                self.log_once(
                    LOG_WRITE_ONLY,
                    format_args!("read of write-only register {offset:#x}"),
                );
                0
            }
            _ => {
                self.log_once(
                    LOG_BAD_ACCESS,
                    format_args!("read of unknown register {offset:#x}"),
                );
                0
            }
        }
    }

    /// Queue registers may change only while the driver is setting up,
    /// before DRIVER_OK and while the selected queue is not yet enabled.
    fn queue_for_write(&mut self, offset: u64) -> Option<&mut QueueConfig> {
        let live = self.regs.status & S_DRIVER_OK != 0;
        let sel = self.regs.queue_sel as usize;
        let ready = self.regs.queues.get(sel).map(|q| q.ready);
        match ready {
            Some(false) if !live => self.regs.queues.get_mut(sel),
            Some(true) if !live && offset == REG_QUEUE_READY => self.regs.queues.get_mut(sel),
            Some(_) => {
                self.log_once(
                    LOG_LATE_WRITE,
                    format_args!("queue register {offset:#x} written after the queue went live"),
                );
                None
            }
            None => {
                self.log_once(
                    LOG_BAD_QUEUE,
                    format_args!("queue register {offset:#x} written for absent queue {sel}"),
                );
                None
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.regs.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.regs.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                if self.regs.status & (S_FEATURES_OK | S_DRIVER_OK | S_FAILED) != 0 {
                    self.log_once(
                        LOG_LATE_WRITE,
                        format_args!("driver features written after FEATURES_OK"),
                    );
                    return;
                }
                let f = self.regs.driver_features;
                self.regs.driver_features = match self.regs.driver_features_sel {
                    0 => set_low(f, v),
                    1 => set_high(f, v),
                    _ => f,
                };
            }
            REG_QUEUE_SEL => self.regs.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.queue_for_write(offset) {
                    // Truncation is harmless: check() refuses any size
                    // the device did not allow before activation.
                    q.size = u16::try_from(v).unwrap_or(0);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.queue_for_write(offset) {
                    q.ready = v & 1 == 1;
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.queue_for_write(offset) {
                    match offset {
                        REG_QUEUE_DESC_LOW => q.desc_table = set_low(q.desc_table, v),
                        REG_QUEUE_DESC_HIGH => q.desc_table = set_high(q.desc_table, v),
                        REG_QUEUE_DRIVER_LOW => q.avail_ring = set_low(q.avail_ring, v),
                        REG_QUEUE_DRIVER_HIGH => q.avail_ring = set_high(q.avail_ring, v),
                        REG_QUEUE_DEVICE_LOW => q.used_ring = set_low(q.used_ring, v),
                        _ => q.used_ring = set_high(q.used_ring, v),
                    }
                }
            }
            NOTIFY_REG_OFFSET => self.notify(v),
            REG_INTERRUPT_ACK => self.info.shared.ack(v),
            REG_STATUS => self.write_status(v),
            REG_SHM_SEL => self.regs.shm_sel = v,
            REG_QUEUE_RESET => self.log_once(
                LOG_BAD_ACCESS,
                format_args!("QueueReset written but VIRTIO_F_RING_RESET is not offered"),
            ),
            REG_MAGIC
            | REG_VERSION
            | REG_DEVICE_ID
            | REG_VENDOR_ID
            | REG_DEVICE_FEATURES
            | REG_QUEUE_NUM_MAX
            | REG_INTERRUPT_STATUS
            | REG_SHM_LEN_LOW
            | REG_SHM_LEN_HIGH
            | REG_SHM_BASE_LOW
            | REG_SHM_BASE_HIGH
            | REG_CONFIG_GENERATION => self.log_once(
                LOG_READ_ONLY,
                format_args!("write of {v:#x} to read-only register {offset:#x} ignored"),
            ),
            _ => self.log_once(
                LOG_BAD_ACCESS,
                format_args!("write of {v:#x} to unknown register {offset:#x} ignored"),
            ),
        }
    }

    /// The fallback path for a QueueNotify that no ioeventfd caught.
    fn notify(&mut self, v: u32) {
        let Some(kick) = self.kicks.get(v as usize) else {
            self.log_once(LOG_BAD_QUEUE, format_args!("notify for absent queue {v}"));
            return;
        };
        if let Err(e) = kick.write(1) {
            error!("{}: queue {v} kick failed: {e}", self.label);
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.regs.status;
        // NEEDS_RESET is the device's bit; a driver writing it back (e.g. a
        // read-modify-write) changes nothing.
        let new = v & !S_NEEDS_RESET;
        if new & old != old {
            self.log_once(
                LOG_BAD_STATUS,
                format_args!("status {new:#x} clears bits of {old:#x}; ignored"),
            );
            return;
        }
        let mut status = old;
        let added = new & !old;
        if added & S_FAILED != 0 {
            status |= S_FAILED;
        }
        if added & S_ACK != 0 {
            status |= S_ACK;
        }
        if added & S_DRIVER != 0 && status & S_ACK != 0 {
            status |= S_DRIVER;
        }
        if added & S_FEATURES_OK != 0 && status & S_DRIVER != 0 {
            if self.features_acceptable() {
                status |= S_FEATURES_OK;
            } else {
                let (acked, offered) = (self.regs.driver_features, self.info.avail_features);
                self.log_once(
                    LOG_BAD_FEATURES,
                    format_args!(
                        "FEATURES_OK refused for driver features {acked:#x} (offered {offered:#x})"
                    ),
                );
            }
        }
        if added & S_DRIVER_OK != 0 && status & S_FEATURES_OK != 0 && status & S_FAILED == 0 {
            if self.activate() {
                status |= S_DRIVER_OK;
            } else {
                self.info.shared.set_needs_reset();
            }
        }
        let unknown = added & !(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK | S_FAILED);
        if status | unknown != new {
            self.log_once(
                LOG_BAD_STATUS,
                format_args!("status {new:#x} not reachable from {old:#x}; now {status:#x}"),
            );
        }
        self.regs.status = status;
    }

    fn features_acceptable(&self) -> bool {
        let acked = self.regs.driver_features;
        acked & !self.info.avail_features == 0 && acked & F_VERSION_1 != 0
    }

    /// Checks the queue layout and hands it to the VMM thread.
    fn activate(&mut self) -> bool {
        for (i, q) in self.regs.queues.iter().enumerate() {
            let max = self.info.queue_max_sizes.get(i).copied().unwrap_or(0);
            if let (true, Err(e)) = (q.ready, q.check(max)) {
                self.log_once(
                    LOG_BAD_QUEUE,
                    format_args!("queue {i} refused at DRIVER_OK: {e}"),
                );
                return false;
            }
        }
        let activation = Activation {
            features: self.regs.driver_features,
            queues: self.regs.queues.clone(),
        };
        if !self.send(TransportEvent::Activate(activation)) {
            return false;
        }
        self.regs.activated = true;
        true
    }

    fn send(&mut self, event: TransportEvent) -> bool {
        match self.events.sender.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.info.shared.set_needs_reset();
                self.log_once(
                    LOG_SEND,
                    format_args!("the driver queued more resets and activations than the VMM thread took; device needs reset"),
                );
                return false;
            }
            Err(TrySendError::Disconnected(_)) => {
                self.log_once(
                    LOG_SEND,
                    format_args!("the VMM thread no longer listens for transport events"),
                );
                return false;
            }
        }
        if let Err(e) = self.events.wake.write(1) {
            error!("{}: waking the VMM thread failed: {e}", self.label);
        }
        true
    }

    /// Device reset (Status ← 0): every register back to its initial
    /// value, and the backend told to drop its queues if it had them.
    fn reset(&mut self) {
        if self.regs.activated {
            self.status_before_reset = self.regs.status.max(1);
            self.info.shared.begin_reset();
            self.send(TransportEvent::Reset);
        }
        self.regs = Registers::initial(&self.info.queue_max_sizes);
        self.info.shared.clear();
    }
}

impl BusDevice for MmioTransport {
    fn debug_label(&self) -> &str {
        &self.label
    }

    fn read(&mut self, access: BusAccess, data: &mut [u8]) {
        let offset = access.offset;
        if offset >= CONFIG_START {
            self.info.shared.read_config(offset - CONFIG_START, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.log_once(
                LOG_BAD_ACCESS,
                format_args!("{}-byte read at {offset:#x}", data.len()),
            );
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, access: BusAccess, data: &[u8]) {
        let offset = access.offset;
        if offset >= CONFIG_START {
            if !self.info.shared.write_config(offset - CONFIG_START, data) {
                self.log_once(
                    LOG_CONFIG_WRITE,
                    format_args!("{}-byte config write at {offset:#x} ignored", data.len()),
                );
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.log_once(
                LOG_BAD_ACCESS,
                format_args!("{}-byte write at {offset:#x}", data.len()),
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            self.log_once(
                LOG_BAD_ACCESS,
                format_args!("unaligned write at {offset:#x}"),
            );
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

/// Shares the register file with the bus.
pub type SharedTransport = Arc<std::sync::Mutex<MmioTransport>>;

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{self, Receiver};

    use super::*;
    use crate::virtio::{DeviceShared, F_EVENT_IDX, INT_CONFIG, INT_VRING};

    const FEATURES: u64 = F_VERSION_1 | F_EVENT_IDX | 1;

    struct Rig {
        t: MmioTransport,
        rx: Receiver<TransportEvent>,
        wake: EventFd,
        kicks: Vec<EventFd>,
        shared: Arc<DeviceShared>,
    }

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")
    }

    fn rig() -> Rig {
        let shared = Arc::new(DeviceShared::new(
            vec![0x11, 0x22, 0x33, 0x44, 0x55, 0x66],
            vec![std::ops::Range { start: 4, end: 6 }],
        ));
        let info = VirtioDeviceInfo {
            device_type: 2,
            avail_features: FEATURES,
            queue_max_sizes: vec![256, 64],
            shared: shared.clone(),
        };
        let (sender, rx) = mpsc::sync_channel(TRANSPORT_QUEUE_DEPTH);
        let wake = evt();
        let kicks = vec![evt(), evt()];
        let t = MmioTransport::new(
            info,
            TransportEvents {
                sender,
                wake: wake.try_clone().expect("clone"),
            },
            kicks
                .iter()
                .map(|k| k.try_clone().expect("clone"))
                .collect(),
        )
        .expect("transport");
        Rig {
            t,
            rx,
            wake,
            kicks,
            shared,
        }
    }

    impl Rig {
        fn r(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.t.read(BusAccess { offset, vcpu: 0 }, &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, offset: u64, v: u32) {
            self.t
                .write(BusAccess { offset, vcpu: 0 }, &v.to_le_bytes());
        }
        fn negotiate(&mut self, features: u64) {
            self.w(REG_STATUS, S_ACK);
            self.w(REG_STATUS, S_ACK | S_DRIVER);
            self.w(REG_DRIVER_FEATURES_SEL, 0);
            self.w(REG_DRIVER_FEATURES, features as u32);
            self.w(REG_DRIVER_FEATURES_SEL, 1);
            self.w(REG_DRIVER_FEATURES, (features >> 32) as u32);
            self.w(REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        }
        fn setup_queue0(&mut self) {
            self.w(REG_QUEUE_SEL, 0);
            self.w(REG_QUEUE_NUM, 128);
            self.w(REG_QUEUE_DESC_LOW, 0x1000);
            self.w(REG_QUEUE_DESC_HIGH, 1);
            self.w(REG_QUEUE_DRIVER_LOW, 0x2000);
            self.w(REG_QUEUE_DEVICE_LOW, 0x3000);
            self.w(REG_QUEUE_READY, 1);
        }
        fn drive_ok(&mut self) {
            self.w(REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        }
    }

    #[test]
    fn identifies_as_a_version_2_device() {
        let mut r = rig();
        assert_eq!(r.r(REG_MAGIC), MMIO_MAGIC);
        assert_eq!(r.r(REG_VERSION), 2);
        assert_eq!(r.r(REG_DEVICE_ID), 2);
        assert_eq!(r.r(REG_VENDOR_ID), VENDOR_ID);
        assert_eq!(r.r(REG_SHM_LEN_LOW), u32::MAX);
        assert_eq!(r.r(REG_SHM_BASE_HIGH), u32::MAX);
        assert_eq!(r.t.debug_label(), "virtio-mmio (type 2)");
    }

    #[test]
    fn device_features_are_paged_by_select() {
        let mut r = rig();
        assert_eq!(r.r(REG_DEVICE_FEATURES), FEATURES as u32);
        r.w(REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r.r(REG_DEVICE_FEATURES), (FEATURES >> 32) as u32);
        r.w(REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r.r(REG_DEVICE_FEATURES), 0);
    }

    #[test]
    fn features_ok_is_latched_for_a_valid_subset() {
        let mut r = rig();
        r.negotiate(F_VERSION_1 | 1);
        assert_eq!(r.r(REG_STATUS), S_ACK | S_DRIVER | S_FEATURES_OK);
        // Features are frozen once accepted.
        r.w(REG_DRIVER_FEATURES_SEL, 0);
        r.w(REG_DRIVER_FEATURES, 0);
        r.setup_queue0();
        r.drive_ok();
        match r.rx.try_recv() {
            Ok(TransportEvent::Activate(a)) => assert_eq!(a.features, F_VERSION_1 | 1),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn features_ok_is_refused_for_unoffered_bits_or_no_version_1() {
        for bad in [F_VERSION_1 | 1 << 5, 1, 0] {
            let mut r = rig();
            r.negotiate(bad);
            assert_eq!(r.r(REG_STATUS), S_ACK | S_DRIVER, "features {bad:#x}");
            // DRIVER_OK without FEATURES_OK does nothing either.
            r.setup_queue0();
            r.drive_ok();
            assert_eq!(r.r(REG_STATUS) & S_DRIVER_OK, 0);
            assert!(r.rx.try_recv().is_err());
        }
    }

    #[test]
    fn status_bits_must_follow_the_sequence() {
        let mut r = rig();
        r.w(REG_STATUS, S_DRIVER);
        assert_eq!(r.r(REG_STATUS), 0);
        r.w(REG_STATUS, S_ACK);
        r.w(REG_STATUS, S_ACK | S_FEATURES_OK);
        assert_eq!(r.r(REG_STATUS), S_ACK);
        r.w(REG_STATUS, S_ACK | S_DRIVER);
        // Clearing a bit is not allowed.
        r.w(REG_STATUS, S_DRIVER);
        assert_eq!(r.r(REG_STATUS), S_ACK | S_DRIVER);
        r.w(REG_STATUS, S_ACK | S_DRIVER | S_FAILED);
        assert_eq!(r.r(REG_STATUS), S_ACK | S_DRIVER | S_FAILED);
    }

    #[test]
    fn queue_registers_follow_queue_sel() {
        let mut r = rig();
        assert_eq!(r.r(REG_QUEUE_NUM_MAX), 256);
        r.w(REG_QUEUE_SEL, 1);
        assert_eq!(r.r(REG_QUEUE_NUM_MAX), 64);
        r.w(REG_QUEUE_READY, 1);
        assert_eq!(r.r(REG_QUEUE_READY), 1);
        r.w(REG_QUEUE_SEL, 0);
        assert_eq!(r.r(REG_QUEUE_READY), 0);
        r.w(REG_QUEUE_SEL, 2);
        assert_eq!(r.r(REG_QUEUE_NUM_MAX), 0);
        assert_eq!(r.r(REG_QUEUE_READY), 0);
        r.w(REG_QUEUE_NUM, 8); // absent queue: ignored, no panic
    }

    #[test]
    fn activation_carries_features_and_queue_layout() -> std::io::Result<()> {
        let mut r = rig();
        r.negotiate(FEATURES);
        r.setup_queue0();
        r.drive_ok();
        assert_eq!(r.r(REG_STATUS) & S_DRIVER_OK, S_DRIVER_OK);
        assert_eq!(r.wake.read()?, 1);
        let expected = Activation {
            features: FEATURES,
            queues: vec![
                QueueConfig {
                    size: 128,
                    ready: true,
                    desc_table: 0x1_0000_1000,
                    avail_ring: 0x2000,
                    used_ring: 0x3000,
                },
                QueueConfig {
                    size: 64,
                    ..QueueConfig::default()
                },
            ],
        };
        assert_eq!(
            r.rx.try_recv().ok(),
            Some(TransportEvent::Activate(expected))
        );
        // Queue registers are frozen once live.
        r.w(REG_QUEUE_NUM, 16);
        r.w(REG_QUEUE_READY, 0);
        assert_eq!(r.r(REG_QUEUE_READY), 1);
        Ok(())
    }

    #[test]
    fn a_bad_queue_layout_refuses_driver_ok_and_asks_for_reset() {
        let mut r = rig();
        r.negotiate(FEATURES);
        r.setup_queue0();
        r.w(REG_QUEUE_READY, 0);
        r.w(REG_QUEUE_NUM, 100); // not a power of two
        r.w(REG_QUEUE_READY, 1);
        r.drive_ok();
        assert_eq!(r.r(REG_STATUS) & S_DRIVER_OK, 0);
        assert_ne!(r.r(REG_STATUS) & S_NEEDS_RESET, 0);
        assert!(r.rx.try_recv().is_err());
    }

    #[test]
    fn reset_restores_every_register_and_tells_the_backend() {
        let mut r = rig();
        let initial = r.t.regs.clone();
        r.negotiate(FEATURES);
        r.setup_queue0();
        r.w(REG_QUEUE_SEL, 1);
        r.w(REG_DEVICE_FEATURES_SEL, 1);
        r.w(REG_SHM_SEL, 3);
        r.drive_ok();
        r.shared.raise(INT_VRING);
        r.shared.set_needs_reset();
        assert!(matches!(r.rx.try_recv(), Ok(TransportEvent::Activate(_))));
        r.w(REG_STATUS, 0);
        assert_eq!(r.t.regs, initial);
        // The reset is not complete until the backend lets go of the
        // queues: Status must not read 0 before that.
        assert_ne!(r.r(REG_STATUS), 0);
        assert_eq!(r.rx.try_recv().ok(), Some(TransportEvent::Reset));
        r.shared.raise(INT_VRING); // a late completion on the VMM thread
        r.shared.finish_reset();
        assert_eq!(r.r(REG_STATUS), 0);
        assert_eq!(r.r(REG_INTERRUPT_STATUS), 0);
        assert_eq!(r.r(REG_QUEUE_NUM_MAX), 256);
        // A second reset of an idle device sends nothing.
        r.w(REG_STATUS, 0);
        assert!(r.rx.try_recv().is_err());
    }

    /// Bug: the transport → VMM channel was unbounded, so a driver looping
    /// DRIVER_OK / reset faster than the VMM thread ran could grow it.
    #[test]
    fn a_driver_flooding_activations_gets_needs_reset_not_an_unbounded_queue() {
        let mut r = rig();
        for _ in 0..TRANSPORT_QUEUE_DEPTH {
            r.negotiate(FEATURES);
            r.setup_queue0();
            r.drive_ok();
            r.w(REG_STATUS, 0);
            // The VMM thread never answers; the hostile driver does not
            // wait for Status to read 0 either.
        }
        r.negotiate(FEATURES);
        r.setup_queue0();
        r.drive_ok();
        assert!(r.shared.needs_reset(), "the device gave up on the driver");
        let queued = std::iter::from_fn(|| r.rx.try_recv().ok()).count();
        assert_eq!(queued, TRANSPORT_QUEUE_DEPTH, "bounded");
    }

    #[test]
    fn needs_reset_shows_in_status_and_survives_driver_writes() {
        let mut r = rig();
        r.negotiate(FEATURES);
        r.setup_queue0();
        r.drive_ok();
        r.shared.set_needs_reset();
        let s = r.r(REG_STATUS);
        assert_ne!(s & S_NEEDS_RESET, 0);
        r.w(REG_STATUS, s); // read-modify-write echo
        assert_ne!(r.r(REG_STATUS) & S_DRIVER_OK, 0);
    }

    #[test]
    fn interrupt_ack_clears_only_acked_bits() {
        let mut r = rig();
        r.shared.raise(INT_VRING | INT_CONFIG);
        assert_eq!(r.r(REG_INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        r.w(REG_INTERRUPT_ACK, INT_VRING);
        assert_eq!(r.r(REG_INTERRUPT_STATUS), INT_CONFIG);
        r.w(REG_INTERRUPT_STATUS, 0); // read-only: ignored
        assert_eq!(r.r(REG_INTERRUPT_STATUS), INT_CONFIG);
    }

    #[test]
    fn config_space_is_byte_granular_and_generation_tracks_changes() {
        let mut r = rig();
        let mut b = [0u8; 2];
        r.t.read(
            BusAccess {
                offset: 0x101,
                vcpu: 0,
            },
            &mut b,
        );
        assert_eq!(b, [0x22, 0x33]);
        let mut big = [0u8; 8];
        r.t.read(
            BusAccess {
                offset: 0x100,
                vcpu: 0,
            },
            &mut big,
        );
        assert_eq!(big, [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0, 0]);
        r.t.write(
            BusAccess {
                offset: 0x100,
                vcpu: 0,
            },
            &[0xaa],
        );
        r.t.write(
            BusAccess {
                offset: 0x104,
                vcpu: 0,
            },
            &[0xbb, 0xcc],
        );
        r.t.read(
            BusAccess {
                offset: 0x100,
                vcpu: 0,
            },
            &mut big,
        );
        assert_eq!(big, [0x11, 0x22, 0x33, 0x44, 0xbb, 0xcc, 0, 0]);
        let g = r.r(REG_CONFIG_GENERATION);
        r.shared.update_config(|c| c[0] = 1);
        assert_eq!(r.r(REG_CONFIG_GENERATION), g.wrapping_add(1));
    }

    #[test]
    fn notify_fallback_kicks_the_queue_eventfd() -> std::io::Result<()> {
        let mut r = rig();
        r.w(NOTIFY_REG_OFFSET, 1);
        assert_eq!(r.kicks[1].read()?, 1);
        assert!(r.kicks[0].read().is_err());
        r.w(NOTIFY_REG_OFFSET, 9); // absent queue: ignored
        Ok(())
    }

    #[test]
    fn odd_accesses_and_read_only_writes_never_panic() {
        let mut r = rig();
        let mut b = [0xffu8; 2];
        r.t.read(BusAccess { offset: 0, vcpu: 0 }, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b4 = [0u8; 4];
        r.t.read(BusAccess { offset: 2, vcpu: 0 }, &mut b4);
        r.t.write(
            BusAccess {
                offset: 0x70,
                vcpu: 0,
            },
            &[1],
        );
        r.t.write(
            BusAccess {
                offset: 0x72,
                vcpu: 0,
            },
            &[1, 0, 0, 0],
        );
        assert_eq!(r.r(REG_STATUS), 0);
        r.w(REG_MAGIC, 0);
        assert_eq!(r.r(REG_MAGIC), MMIO_MAGIC);
        r.w(0xf0, 1);
        assert_eq!(r.r(0xf0), 0);
        assert_eq!(r.r(REG_QUEUE_SEL), 0);
        r.t.read(
            BusAccess {
                offset: u64::MAX,
                vcpu: 0,
            },
            &mut b4,
        );
        r.t.write(
            BusAccess {
                offset: u64::MAX,
                vcpu: 0,
            },
            &b4,
        );
    }

    #[test]
    fn construction_checks_queues_and_kicks() {
        let shared = Arc::new(DeviceShared::new(vec![], vec![]));
        let info = |q: Vec<u16>| VirtioDeviceInfo {
            device_type: 1,
            avail_features: F_VERSION_1,
            queue_max_sizes: q,
            shared: shared.clone(),
        };
        let ev = || {
            let (sender, _rx) = mpsc::sync_channel(TRANSPORT_QUEUE_DEPTH);
            TransportEvents {
                sender,
                wake: evt(),
            }
        };
        assert!(matches!(
            MmioTransport::new(info(vec![]), ev(), vec![]),
            Err(TransportError::QueueCount(0))
        ));
        assert!(matches!(
            MmioTransport::new(info(vec![256]), ev(), vec![]),
            Err(TransportError::KickCount { .. })
        ));
        assert!(matches!(
            MmioTransport::new(info(vec![100]), ev(), vec![evt()]),
            Err(TransportError::QueueMax { .. })
        ));
    }
}
