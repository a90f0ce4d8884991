//! One `add_*` per virtio device kind: open what the configuration names,
//! build the device, and queue it for placement. Adding a device kind to
//! ringvm is one `add_*` method here plus its configuration type.
//!
//! Building happens in two steps so every user-given file and tap is
//! opened (and a typo reported as a configuration error) before KVM is
//! touched: [`VirtioBuilder::add_drive`] and friends build devices with
//! their interrupt eventfd but no wiring; [`VirtioBuilder::place`] then puts
//! each on the machine (MMIO window, IRQ, doorbells, transport) and hands
//! back the [`VirtioDevices`] the VMM thread serves.

use std::fs::File;
use std::path::PathBuf;

use devices::io::InterruptLine;
use devices::virtio::block::{BlockConfig, BlockDevice};
use devices::virtio::net::{NetConfig as NetDeviceConfig, NetDevice, TapDevice, TapError};
use devices::virtio::p9::{ControlFs, HostFs, HostFsError, P9Device};
use devices::virtio::rng::{HostRandom, RngDevice};
use devices::virtio::vsock::VsockDevice;
use vmm_sys_util::eventfd::EventFd;

use super::device_manager::{new_eventfd, DeviceError, DeviceManager, EventWiring};
use crate::config::{CacheType, DriveConfig, EntropyConfig, NetConfig, RateLimiterConfig};
use crate::exit_code;
use crate::host_file::{open_image, ImageAccess};
use crate::ring::irq::RingInterrupt;
use crate::ring::slot::DynDevice;
use crate::ring::{DeviceSlot, VirtioDevices};
use crate::runner::{self, RunnerConfig};

/// Why a virtio device could not be set up; all are found before the guest
/// starts.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    /// A drive's backing file cannot be opened as asked.
    #[error("drive {id}: cannot open {path}: {source}")]
    OpenDrive {
        /// The drive.
        id: String,
        /// Its backing file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The device refused to be built (e.g. a disk whose size is unreadable).
    #[error("{id}: {source}")]
    Device {
        /// The device.
        id: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The tap cannot be used: missing, busy, not a tap, no permission.
    #[error("network interface {id}: {source}")]
    Tap {
        /// The interface.
        id: String,
        /// Why.
        source: TapError,
    },
    /// A shared directory cannot be served (`ringvm -- CMD`).
    #[error("share {tag}: {source}")]
    Share {
        /// Its mount tag.
        tag: String,
        /// Why.
        source: HostFsError,
    },
    /// The vsock device's Unix socket cannot be listened on.
    #[error("vsock: cannot listen on {path}: {source}")]
    Vsock {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An interrupt eventfd could not be made, or placement failed.
    #[error("{id}: {source}")]
    Wiring {
        /// The device.
        id: String,
        /// Why.
        source: DeviceError,
    },
}

impl DeviceSetupError {
    /// The documented exit code: the user's configuration (a file, a tap)
    /// or ringvm's own failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            DeviceSetupError::OpenDrive { .. }
            | DeviceSetupError::Tap { .. }
            | DeviceSetupError::Share { .. }
            | DeviceSetupError::Vsock { .. } => exit_code::BAD_CONFIG,
            DeviceSetupError::Device { .. } | DeviceSetupError::Wiring { .. } => {
                exit_code::INTERNAL
            }
        }
    }
}

/// Opens a drive's backing file as its config asks (read-only, O_DIRECT):
/// a regular file or block device, without ever blocking in `open`.
pub fn open_backing_file(cfg: &DriveConfig) -> Result<File, DeviceSetupError> {
    let access = ImageAccess {
        write: !cfg.is_read_only,
        direct: cfg.direct,
    };
    open_image(&cfg.path_on_host, access).map_err(|source| DeviceSetupError::OpenDrive {
        id: cfg.drive_id.clone(),
        path: cfg.path_on_host.clone(),
        source,
    })
}

/// A device built but not yet on the machine.
#[derive(Debug)]
struct Unplaced {
    id: String,
    device: Box<DynDevice>,
    /// Registered with KVM as the device's irqfd.
    irq: EventFd,
    /// The same irqfd, written through the ring when the device raises it.
    interrupt: RingInterrupt,
}

/// Virtio devices being built, in the order the guest will find them.
#[derive(Debug, Default)]
pub struct VirtioBuilder {
    devices: Vec<Unplaced>,
}

impl VirtioBuilder {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds one device with `make`, which receives the device's
    /// interrupt line, and queues it for placement under the name `id`.
    pub fn add<D, E>(
        &mut self,
        id: &str,
        make: impl FnOnce(Box<dyn InterruptLine>) -> Result<D, E>,
    ) -> Result<(), DeviceSetupError>
    where
        D: devices::virtio::VirtioDevice<vm_memory::GuestMemoryMmap> + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let wiring = |source| DeviceSetupError::Wiring {
            id: id.to_string(),
            source,
        };
        let irq = new_eventfd().map_err(wiring)?;
        let (interrupt, line) = RingInterrupt::new(
            irq.try_clone()
                .map_err(|e| wiring(DeviceError::EventFd(e)))?,
        );
        let device = make(Box::new(line)).map_err(|e| DeviceSetupError::Device {
            id: id.to_string(),
            source: e.into(),
        })?;
        self.devices.push(Unplaced {
            id: id.to_string(),
            device: Box::new(device),
            irq,
            interrupt,
        });
        Ok(())
    }

    /// A virtio-blk drive on its backing file.
    pub fn add_drive(&mut self, cfg: &DriveConfig) -> Result<(), DeviceSetupError> {
        let file = open_backing_file(cfg)?;
        self.add(&cfg.drive_id, |line| {
            let mut drive = BlockDevice::new(
                BlockConfig {
                    file,
                    read_only: cfg.is_read_only,
                    flush: cfg.cache_type == CacheType::Writeback,
                    id: cfg.drive_id.clone(),
                },
                line,
            )?;
            drive.set_rate_limiter(RateLimiterConfig::limiter_for(cfg.rate_limiter.as_ref()));
            Ok::<_, devices::virtio::block::BlockError>(drive)
        })
    }

    /// A virtio-net interface on an existing tap; with an `mtu`, the tap is
    /// set to it and the guest is offered it.
    pub fn add_net(&mut self, cfg: &NetConfig) -> Result<(), DeviceSetupError> {
        let tap_error = |source| DeviceSetupError::Tap {
            id: cfg.iface_id.clone(),
            source,
        };
        let tap = TapDevice::open(&cfg.host_dev_name).map_err(tap_error)?;
        if let Some(mtu) = cfg.mtu {
            tap.set_mtu(mtu).map_err(tap_error)?;
        }
        self.add(&cfg.iface_id, |line| {
            let mut device = NetDevice::with_mtu(
                NetDeviceConfig {
                    tap,
                    mac: cfg.guest_mac,
                },
                line,
                cfg.mtu,
            );
            device.set_rate_limiters(
                RateLimiterConfig::limiter_for(cfg.rx_rate_limiter.as_ref()),
                RateLimiterConfig::limiter_for(cfg.tx_rate_limiter.as_ref()),
            );
            log::info!(
                "network interface {}: tap {} guest MAC {}",
                cfg.iface_id,
                cfg.host_dev_name,
                device.mac()
            );
            Ok::<_, std::convert::Infallible>(device)
        })
    }

    /// The virtio-rng entropy device, fed by the host's getrandom.
    pub fn add_rng(&mut self, cfg: &EntropyConfig) -> Result<(), DeviceSetupError> {
        self.add("rng0", |line| {
            let mut rng = RngDevice::new(Box::new(HostRandom), line);
            rng.set_rate_limiter(RateLimiterConfig::limiter_for(cfg.rate_limiter.as_ref()));
            Ok::<_, std::convert::Infallible>(rng)
        })
    }

    /// The virtio-vsock device: listens on `uds_path` now (a path in use
    /// is a configuration error before the guest starts).
    pub fn add_vsock(&mut self, cfg: &crate::vsock::VsockConfig) -> Result<(), DeviceSetupError> {
        let listener = devices::virtio::vsock::host::listen(&cfg.uds_path).map_err(|source| {
            DeviceSetupError::Vsock {
                path: cfg.uds_path.clone(),
                source,
            }
        })?;
        self.add("vsock", |line| {
            Ok::<_, std::convert::Infallible>(VsockDevice::with_listener(
                u64::from(cfg.guest_cid),
                &cfg.uds_path,
                listener,
                line,
            ))
        })
    }

    /// The virtio-9p devices of `ringvm -- CMD`: ringvm's control tree
    /// (the kernel's first root), the guest's root (always read-only) and
    /// every `--share`, each bounded to a share of the open-file limit.
    pub fn add_runner(&mut self, r: &RunnerConfig) -> Result<(), DeviceSetupError> {
        runner::raise_fd_limit();
        let max_fids = runner::max_fids_per_share(1 + r.shares.len());
        self.add(runner::CONTROL_TAG, |line| {
            let fs = ControlFs::new(runner::GUEST_INIT, &r.init_config(), [0, 1, 2])?;
            Ok::<_, devices::virtio::p9::ControlFsError>(P9Device::new(
                fs,
                runner::CONTROL_TAG,
                line,
            ))
        })?;
        self.add_share(runner::ROOT_TAG, &r.root, false, max_fids)?;
        for (i, share) in r.shares.iter().enumerate() {
            self.add_share(&runner::share_tag(i), &share.host, share.writable, max_fids)?;
        }
        Ok(())
    }

    /// One host directory over virtio-9p under mount tag `tag`.
    fn add_share(
        &mut self,
        tag: &str,
        dir: &std::path::Path,
        writable: bool,
        max_fids: usize,
    ) -> Result<(), DeviceSetupError> {
        let fs = HostFs::new(dir, writable).map_err(|source| DeviceSetupError::Share {
            tag: tag.into(),
            source,
        })?;
        self.add(tag, |line| {
            let mut device = P9Device::new(fs, tag, line);
            device.set_max_fids(max_fids);
            Ok::<_, std::convert::Infallible>(device)
        })
    }

    /// Puts every device on the machine, in the order added: a
    /// virtio-mmio window and IRQ, its interrupt wired, one doorbell per
    /// queue, the transport on the MMIO bus. Returns the slots the VMM
    /// thread serves.
    pub fn place(
        self,
        machine: &mut DeviceManager,
        wire: &dyn EventWiring,
    ) -> Result<VirtioDevices, DeviceSetupError> {
        let mut out = VirtioDevices::default();
        for Unplaced {
            id,
            device,
            irq,
            interrupt,
        } in self.devices
        {
            let ends = machine
                .add_virtio_device(wire, &irq, device.info())
                .map_err(|source| DeviceSetupError::Wiring {
                    id: id.clone(),
                    source,
                })?;
            out.push(DeviceSlot::new(
                id,
                device,
                ends.kicks,
                ends.wake,
                ends.messages,
                Some(interrupt),
            ));
        }
        Ok(out)
    }
}
