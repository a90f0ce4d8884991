//! A virtio-net interface as the VMM thread serves it: the device on its
//! tap, the queue-kick and transport eventfds that wake the ring, and the
//! buffers those reads land in. TX frames are io_uring writev calls from
//! guest memory to the tap and RX frames are readv calls from the tap into
//! the guest's posted buffers, on the same ring as the drives.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::Receiver;

use devices::virtio::net::{
    NetConfig as DeviceNetConfig, NetCounters, NetDevice, TapDevice, TapError, RX_QUEUE, TX_QUEUE,
};
use devices::virtio::{TransportEvent, VirtioBackend};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::NetConfig;
use crate::device_manager::{new_eventfd, DeviceError, DeviceManager, EventWiring};
use crate::event_loop::DeviceIo;

/// Errors setting up an interface; all are found before the guest starts.
#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
    /// The tap cannot be used: missing, busy, not a tap, no permission.
    #[error("network interface {id}: {source}")]
    Tap {
        /// The interface.
        id: String,
        /// The tap name.
        tap: String,
        /// Why.
        source: TapError,
    },
    /// The MAC address is malformed or not unicast.
    #[error("network interface {id}: bad MAC address {mac:?} (want 6 hex bytes like 02:00:00:00:00:01, unicast)")]
    Mac {
        /// The interface.
        id: String,
        /// What was given.
        mac: String,
    },
    /// Placement or KVM wiring failed.
    #[error("network interface {id}: {source}")]
    Wiring {
        /// The interface.
        id: String,
        /// Why.
        source: DeviceError,
    },
}

/// Parses "aa:bb:cc:dd:ee:ff"; refuses multicast addresses (bit 0 of the
/// first byte), which a NIC cannot own.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 == 1 {
        return None;
    }
    Some(mac)
}

/// Formats a MAC the way `ip link` shows it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Opens the tap and checks the MAC, before anything touches KVM.
pub fn open_tap(cfg: &NetConfig) -> Result<(TapDevice, Option<[u8; 6]>), NetSetupError> {
    let mac = match &cfg.guest_mac {
        Some(text) => Some(parse_mac(text).ok_or_else(|| NetSetupError::Mac {
            id: cfg.iface_id.clone(),
            mac: text.clone(),
        })?),
        None => None,
    };
    let tap = TapDevice::open(&cfg.host_dev_name).map_err(|source| NetSetupError::Tap {
        id: cfg.iface_id.clone(),
        tap: cfg.host_dev_name.clone(),
        source,
    })?;
    if let Some(mtu) = cfg.mtu {
        tap.set_mtu(mtu).map_err(|source| NetSetupError::Tap {
            id: cfg.iface_id.clone(),
            tap: cfg.host_dev_name.clone(),
            source,
        })?;
    }
    Ok((tap, mac))
}

/// One network interface on the VMM thread.
#[derive(Debug)]
pub struct NetIface {
    /// The name the user gave.
    pub id: String,
    device: NetDevice<TapDevice>,
    kicks: [EventFd; 2],
    wake: EventFd,
    messages: Receiver<TransportEvent>,
    rerun: [bool; 2],
    /// The stale RX read already asked to be cancelled.
    cancelled: Option<u64>,
    /// Whether a POLLIN on the tap is armed.
    pub tap_poll_armed: bool,
    /// Where the ring reads each queue's kick counter.
    pub kick_bufs: [[u8; 8]; 2],
    /// Where the ring reads the wake counter.
    pub wake_buf: [u8; 8],
}

impl NetIface {
    /// Builds the device on `tap`, its transport on the MMIO bus, and wires
    /// its IRQ and both queue kicks.
    pub fn new(
        cfg: &NetConfig,
        tap: TapDevice,
        mac: Option<[u8; 6]>,
        wire: &dyn EventWiring,
        devices: &mut DeviceManager,
    ) -> Result<Box<Self>, NetSetupError> {
        let id = cfg.iface_id.clone();
        let wiring = |source| NetSetupError::Wiring {
            id: id.clone(),
            source,
        };
        let irq = new_eventfd().map_err(wiring)?;
        let line = irq
            .try_clone()
            .map_err(|e| wiring(DeviceError::EventFd(e)))?;
        let device = NetDevice::with_mtu(DeviceNetConfig { tap, mac }, Box::new(line), cfg.mtu);
        log::info!(
            "network interface {id}: tap {} guest MAC {}",
            cfg.host_dev_name,
            format_mac(&device.mac())
        );
        let ends = devices
            .add_virtio_device(wire, &irq, device.info())
            .map_err(wiring)?;
        let kicks: [EventFd; 2] = ends
            .kicks
            .try_into()
            .map_err(|_| wiring(DeviceError::Transport("expected 2 queues".into())))?;
        let (wake, messages) = (ends.wake, ends.messages);
        Ok(Box::new(Self {
            id,
            device,
            kicks,
            wake,
            messages,
            rerun: [false; 2],
            cancelled: None,
            tap_poll_armed: false,
            kick_bufs: [[0; 8]; 2],
            wake_buf: [0; 8],
        }))
    }

    /// Queue `queue`'s kick eventfd, to arm on the ring.
    pub fn kick_fd(&self, queue: usize) -> RawFd {
        self.kicks[queue.min(1)].as_raw_fd()
    }

    /// The transport-message eventfd, to arm on the ring.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The tap, for the POLLIN the device may ask for.
    pub fn tap_fd(&self) -> RawFd {
        self.device.tap_fd()
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.device.mac()
    }

    /// Applies pending activation/reset messages; after an activation both
    /// queues are served at once (a driver may kick before DRIVER_OK).
    pub fn on_transport_message(&mut self, mem: &GuestMemoryMmap, io: &mut DeviceIo<'_>) {
        let mut activated = false;
        while let Ok(event) = self.messages.try_recv() {
            activated = matches!(event, TransportEvent::Activate(_));
            if let Err(e) = self.device.handle_event(mem, &event) {
                log::warn!("network interface {}: {e}", self.id);
                activated = false;
            }
        }
        if activated {
            self.on_kick(RX_QUEUE, mem, io);
            self.on_kick(TX_QUEUE, mem, io);
        }
    }

    /// Serves queue `queue` after a kick (or a resume, or a tap POLLIN).
    pub fn on_kick(&mut self, queue: usize, mem: &GuestMemoryMmap, io: &mut DeviceIo<'_>) {
        let Some(rerun) = self.rerun.get_mut(queue) else {
            return;
        };
        *rerun = false;
        if !self.device.is_active() {
            return;
        }
        match self.device.process_queue(queue, mem, io) {
            Ok(outcome) => *rerun = outcome.more || outcome.blocked,
            Err(e) => log::warn!("network interface {}: queue {queue} stopped: {e}", self.id),
        }
    }

    /// Hands one completion back to the device.
    pub fn on_completion(
        &mut self,
        tag: u64,
        result: i32,
        mem: &GuestMemoryMmap,
        io: &mut DeviceIo<'_>,
    ) {
        if self.cancelled == Some(tag) {
            self.cancelled = None;
        }
        self.device.complete(tag, result, mem, io);
    }

    /// A read submitted before a reset that must be cancelled, if not yet.
    pub fn take_stale_read(&mut self) -> Option<u64> {
        let tag = self.device.stale_rx_tag()?;
        if self.cancelled == Some(tag) {
            return None;
        }
        self.cancelled = Some(tag);
        Some(tag)
    }

    /// Whether RX waits for the tap to become readable.
    pub fn wants_tap_poll(&self) -> bool {
        self.device.rx_needs_tap_poll()
    }

    /// Queues whose last drain asked to be resumed.
    pub fn queues_to_resume(&self) -> impl Iterator<Item = usize> + '_ {
        self.rerun
            .iter()
            .enumerate()
            .filter(|(_, r)| **r)
            .map(|(q, _)| q)
    }

    /// Packet, byte and error counts for metrics.
    pub fn counters(&self) -> NetCounters {
        self.device.counters()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        assert_eq!(
            parse_mac("02:00:00:aa:bb:0c"),
            Some([2, 0, 0, 0xaa, 0xbb, 0x0c])
        );
        assert_eq!(
            format_mac(&[2, 0, 0, 0xaa, 0xbb, 0x0c]),
            "02:00:00:aa:bb:0c"
        );
        for bad in [
            "",
            "02:00:00:aa:bb",
            "02:00:00:aa:bb:0c:01",
            "0g:00:00:00:00:00",
            "2:0:0:0:0:0",
            "01:00:5e:00:00:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
