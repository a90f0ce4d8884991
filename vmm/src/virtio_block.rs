//! A virtio-blk drive as the VMM thread serves it: the device backend, the
//! eventfds that wake the ring (queue kick, transport messages) and the
//! buffers those reads land in.
//!
//! The transport (register file) lives on the MMIO bus for the vCPU
//! threads; everything here is owned by the VMM thread alone.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;

use devices::virtio::block::{BlockConfig, BlockCounters, BlockDevice, BlockError};
use devices::virtio::{TransportEvent, VirtioBackend};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{CacheType, DriveConfig};
use crate::device_manager::{new_eventfd, DeviceError, DeviceManager, EventWiring};
use crate::event_loop::{DeviceIo, EventLoop};
use crate::host_file::{open_image, ImageAccess};

/// Errors setting up a drive; all are found before the guest starts.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The backing file cannot be opened as asked.
    #[error("drive {id}: cannot open {path}: {source}")]
    Open {
        /// The drive.
        id: String,
        /// Its backing file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The device refused the file (e.g. an unreadable size).
    #[error("drive {id}: {source}")]
    Device {
        /// The drive.
        id: String,
        /// Why.
        source: BlockError,
    },
    /// Placement or KVM wiring failed.
    #[error("drive {id}: {source}")]
    Wiring {
        /// The drive.
        id: String,
        /// Why.
        source: DeviceError,
    },
}

/// Opens a drive's backing file as its config asks (read-only, O_DIRECT):
/// a regular file or block device, without ever blocking in `open`.
pub fn open_backing_file(cfg: &DriveConfig) -> Result<File, DriveError> {
    let access = ImageAccess {
        write: !cfg.is_read_only,
        direct: cfg.direct,
    };
    open_image(&cfg.path_on_host, access).map_err(|source| DriveError::Open {
        id: cfg.drive_id.clone(),
        path: cfg.path_on_host.clone(),
        source,
    })
}

/// One drive on the VMM thread.
#[derive(Debug)]
pub struct Drive {
    /// The name the user gave.
    pub id: String,
    device: BlockDevice,
    kick: EventFd,
    wake: EventFd,
    messages: Receiver<TransportEvent>,
    /// Set when the last drain stopped early and must be resumed.
    rerun: bool,
    /// Where the ring reads the kick counter.
    pub kick_buf: [u8; 8],
    /// Where the ring reads the wake counter.
    pub wake_buf: [u8; 8],
}

impl Drive {
    /// Builds the device on `file` (from [`open_backing_file`]) and its
    /// transport, puts the transport on the MMIO bus and wires its IRQ and
    /// queue kick.
    pub fn new(
        cfg: &DriveConfig,
        file: File,
        wire: &dyn EventWiring,
        devices: &mut DeviceManager,
    ) -> Result<Box<Self>, DriveError> {
        let id = cfg.drive_id.clone();
        let wiring = |source| DriveError::Wiring {
            id: id.clone(),
            source,
        };
        let irq = new_eventfd().map_err(wiring)?;
        let line = irq
            .try_clone()
            .map_err(|e| wiring(DeviceError::EventFd(e)))?;
        let mut device = BlockDevice::new(
            BlockConfig {
                file,
                read_only: cfg.is_read_only,
                flush: cfg.cache_type == CacheType::Writeback,
                id: cfg.drive_id.clone(),
            },
            Box::new(line),
        )
        .map_err(|source| DriveError::Device {
            id: id.clone(),
            source,
        })?;
        // One interrupt decision per loop turn, not per completion.
        device.set_batch_interrupts(true);
        let ends = devices
            .add_virtio_device(wire, &irq, device.info())
            .map_err(wiring)?;
        let Some(kick) = ends.kicks.into_iter().next() else {
            return Err(wiring(DeviceError::Transport("no queue to kick".into())));
        };
        let (wake, messages) = (ends.wake, ends.messages);
        Ok(Box::new(Self {
            id,
            device,
            kick,
            wake,
            messages,
            rerun: false,
            kick_buf: [0; 8],
            wake_buf: [0; 8],
        }))
    }

    /// The queue-kick eventfd, to arm on the ring.
    pub fn kick_fd(&self) -> RawFd {
        self.kick.as_raw_fd()
    }

    /// The transport-message eventfd, to arm on the ring.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Applies every pending activation/reset message from the transport.
    pub fn on_transport_message(&mut self, mem: &GuestMemoryMmap) {
        while let Ok(event) = self.messages.try_recv() {
            if let Err(e) = self.device.handle_event(mem, &event) {
                log::warn!("drive {}: {e}", self.id);
            }
        }
    }

    /// Drains the queue into the ring; remembers to come back when the
    /// drain stopped at its budget or on a full ring.
    pub fn on_kick(&mut self, mem: &GuestMemoryMmap, ring: &mut EventLoop, kind: u8, index: u8) {
        self.rerun = false;
        if !self.device.is_active() {
            return;
        }
        let mut io = DeviceIo::new(ring, kind, index);
        match self.device.process_queue(0, mem, &mut io) {
            Ok(outcome) => self.rerun = outcome.more || outcome.blocked,
            Err(e) => log::warn!("drive {}: queue stopped: {e}", self.id),
        }
    }

    /// Hands one completion back to the device.
    pub fn on_completion(&mut self, tag: u64, result: i32, mem: &GuestMemoryMmap) {
        self.device.complete(tag, result, mem);
    }

    /// Re-opens the drive on `path` (PATCH /drives: the host replaced or
    /// resized the file) and tells the guest its capacity may have changed.
    pub fn swap_backing_file(&mut self, cfg: &DriveConfig) -> Result<(), DriveError> {
        let file = open_backing_file(cfg)?;
        self.device
            .swap_disk(file)
            .map_err(|source| DriveError::Device {
                id: self.id.clone(),
                source,
            })
    }

    /// Raises the interrupt for this turn's completions, if the guest
    /// wants one; call once per loop turn.
    pub fn flush_interrupts(&mut self, mem: &GuestMemoryMmap) {
        self.device.flush_interrupts(mem);
    }

    /// Whether the last drain asked to be resumed.
    pub fn wants_rerun(&self) -> bool {
        self.rerun
    }

    /// Request, byte and error counts for metrics.
    pub fn counters(&self) -> BlockCounters {
        self.device.counters()
    }
}
