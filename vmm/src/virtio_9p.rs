//! A virtio-9p share as the VMM thread serves it: the device, the eventfds
//! that wake the ring (queue kick, transport messages) and the buffers
//! those reads land in. Shaped like a drive (`virtio_block.rs`).

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::mpsc::Receiver;

use devices::virtio::p9::{ControlFs, Filesystem, HostFs, HostFsError, P9Counters, P9Device};
use devices::virtio::TransportEvent;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::{new_eventfd, DeviceError, DeviceManager, EventWiring};
use crate::event_loop::{DeviceIo, EventLoop};

/// Errors setting up a share; all are found before the guest starts.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The host directory cannot be served.
    #[error("share {tag}: {source}")]
    Host {
        /// The mount tag.
        tag: String,
        /// Why.
        source: HostFsError,
    },
    /// The control tree cannot be built.
    #[error("control tree: {0}")]
    Control(#[from] devices::virtio::p9::ControlFsError),
    /// Placement or KVM wiring failed.
    #[error("share {tag}: {source}")]
    Wiring {
        /// The mount tag.
        tag: String,
        /// Why.
        source: DeviceError,
    },
}

/// The two kinds of tree a share serves.
#[derive(Debug)]
enum Served {
    Host(P9Device<HostFs>),
    Control(P9Device<ControlFs>),
}

macro_rules! with_device {
    ($served:expr, $d:ident => $body:expr) => {
        match $served {
            Served::Host($d) => $body,
            Served::Control($d) => $body,
        }
    };
}

/// One virtio-9p device on the VMM thread.
#[derive(Debug)]
pub struct Share {
    /// The mount tag.
    pub tag: String,
    device: Served,
    kick: EventFd,
    wake: EventFd,
    messages: Receiver<TransportEvent>,
    rerun: bool,
    /// Where the ring reads the kick counter.
    pub kick_buf: [u8; 8],
    /// Where the ring reads the wake counter.
    pub wake_buf: [u8; 8],
}

fn place<F: Filesystem>(
    fs: F,
    tag: &str,
    max_fids: usize,
    wire: &dyn EventWiring,
    devices: &mut DeviceManager,
) -> Result<(P9Device<F>, EventFd, EventFd, Receiver<TransportEvent>), ShareError> {
    let wiring = |source| ShareError::Wiring {
        tag: tag.to_string(),
        source,
    };
    let irq = new_eventfd().map_err(wiring)?;
    let line = irq
        .try_clone()
        .map_err(|e| wiring(DeviceError::EventFd(e)))?;
    let mut device = P9Device::new(fs, tag, Box::new(line));
    device.set_max_fids(max_fids);
    let ends = devices
        .add_virtio_device(wire, &irq, device.info())
        .map_err(wiring)?;
    let Some(kick) = ends.kicks.into_iter().next() else {
        return Err(wiring(DeviceError::Transport("no queue to kick".into())));
    };
    Ok((device, kick, ends.wake, ends.messages))
}

impl Share {
    /// Serves host directory `dir` under `tag` (read-only unless
    /// `writable`), placed on the MMIO bus and wired.
    pub fn host(
        dir: &Path,
        writable: bool,
        tag: &str,
        max_fids: usize,
        wire: &dyn EventWiring,
        devices: &mut DeviceManager,
    ) -> Result<Box<Self>, ShareError> {
        let fs = HostFs::new(dir, writable).map_err(|source| ShareError::Host {
            tag: tag.into(),
            source,
        })?;
        let (d, kick, wake, messages) = place(fs, tag, max_fids, wire, devices)?;
        Ok(Self::boxed(tag, Served::Host(d), kick, wake, messages))
    }

    /// Serves ringvm's control tree under `tag`.
    pub fn control(
        fs: ControlFs,
        tag: &str,
        wire: &dyn EventWiring,
        devices: &mut DeviceManager,
    ) -> Result<Box<Self>, ShareError> {
        let (d, kick, wake, messages) = place(fs, tag, 1024, wire, devices)?;
        Ok(Self::boxed(tag, Served::Control(d), kick, wake, messages))
    }

    fn boxed(
        tag: &str,
        device: Served,
        kick: EventFd,
        wake: EventFd,
        messages: Receiver<TransportEvent>,
    ) -> Box<Self> {
        Box::new(Self {
            tag: tag.into(),
            device,
            kick,
            wake,
            messages,
            rerun: false,
            kick_buf: [0; 8],
            wake_buf: [0; 8],
        })
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
            with_device!(&mut self.device, d => match event {
                TransportEvent::Activate(a) => {
                    if let Err(e) = d.activate(mem, &a) {
                        log::warn!("share {}: {e}", self.tag);
                    }
                }
                TransportEvent::Reset => {
                    d.reset();
                    d.info().shared.finish_reset();
                }
            });
        }
    }

    /// Drains the queue into the ring.
    pub fn on_kick(&mut self, mem: &GuestMemoryMmap, ring: &mut EventLoop, kind: u8, index: u8) {
        self.rerun = false;
        let mut io = DeviceIo::new(ring, kind, index);
        let result = with_device!(&mut self.device, d => {
            if !d.is_active() {
                return;
            }
            d.process_queue(mem, &mut io)
        });
        match result {
            Ok(outcome) => self.rerun = outcome.rerun,
            Err(e) => log::warn!("share {}: queue stopped: {e}", self.tag),
        }
    }

    /// Hands one completion back to the device.
    pub fn on_completion(
        &mut self,
        tag: u64,
        result: i32,
        mem: &GuestMemoryMmap,
        ring: &mut EventLoop,
        kind: u8,
        index: u8,
    ) {
        let mut io = DeviceIo::new(ring, kind, index);
        with_device!(&mut self.device, d => d.complete(tag, result, mem, &mut io));
    }

    /// Raises the interrupt for this turn's replies; call once per turn.
    pub fn end_turn(&mut self, mem: &GuestMemoryMmap) {
        with_device!(&mut self.device, d => d.end_turn(mem));
    }

    /// Whether the last drain asked to be resumed.
    pub fn wants_rerun(&self) -> bool {
        self.rerun
    }

    /// Request, byte and error counts for metrics.
    pub fn counters(&self) -> P9Counters {
        with_device!(&self.device, d => d.counters())
    }
}
