//! virtio-net (VIRTIO 1.2 §5.1) served through the VMM thread's ring, over
//! a host tap interface.
//!
//! The rooms, as STYLE.md asks:
//! - [`tap`] opens an existing tap (never creates one) and sets its vnet
//!   header size and offloads; [`Tap`] lets tests use a socketpair instead;
//! - `frame` walks descriptor chains into checked guest segments and maps
//!   them to host iovecs, with no host I/O at all;
//! - [`NetDevice`] is the queue loop: TX chains become one `writev` each
//!   on the tap, posted RX buffers become one `readv` from it, both straight
//!   from and into guest memory.
//!
//! # RX buffering
//!
//! Zero-copy in every case. Reads are only in flight while the driver has
//! posted buffers: io_uring parks each in its internal poll on the tap
//! until a frame arrives, so a frame waits in the tap's kernel queue (not
//! in our memory) while the guest has no room. Up to four `readv`s are in
//! flight, each on its own chains, so one loop turn can complete several
//! frames. Without VIRTIO_NET_F_MRG_RXBUF a read covers one chain; with it,
//! a read gathers chains until they cover [`MAX_BUFFER_LEN`] (neighbouring
//! buffers share one iovec). On completion the device uses as many chains
//! as the frame filled, in completion order, and writes `num_buffers`;
//! chains a frame did not fill stay popped in the device, in the finished
//! read with their iovecs, and the next read starts from them (never walked
//! or gathered twice); a reset drops them. One byte of device memory
//! after the guest's buffers tells a frame too big for them: it is dropped
//! (counted), and the buffers are reused.

mod device;
mod frame;
mod rx;
mod rx_provided;
pub mod tap;
mod tx;
mod tx_slots;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};

use super::{feature, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1};

pub use device::{NetConfig, NetDevice};
pub use frame::ChainError;
pub use tap::{Tap, TapDevice, TapError};

/// virtio device ID of a network device.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Index of the receive queue (receiveq1).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (transmitq1).
pub const TX_QUEUE: usize = 1;
/// One queue pair, no control queue.
pub const NUM_QUEUES: usize = 2;
/// Maximum (and default) size of each queue.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Size of `struct virtio_net_hdr_v1` (with `num_buffers`): VERSION_1 is
/// always negotiated, so the header is always this long, on both queues
/// and on the tap (TUNSETVNETHDRSZ).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest frame after the header: a 64 KiB GSO packet plus its Ethernet
/// header, as the spec sizes "big" receive buffers.
pub const MAX_FRAME_LEN: usize = 65550;
/// Largest header plus frame a TX chain may carry, and the receive space
/// the device gathers before reading (65562).
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Shortest TX chain worth sending: the header and an Ethernet header (a
/// tap refuses anything shorter).
pub const MIN_TX_LEN: usize = VNET_HDR_LEN + 14;
/// Bytes of `struct virtio_net_config` we expose: mac, status and
/// max_virtqueue_pairs; two more (`mtu`) when an MTU is offered.
pub const CONFIG_LEN: usize = 10;
/// Offset of `mtu` in the config space (VIRTIO_NET_F_MTU).
pub const MTU_OFFSET: usize = 10;

/// A NIC's MAC address: always unicast, as a NIC cannot own a multicast
/// address. The one parser and printer the CLI, the config file and the
/// API share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

/// Why a MAC address was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MacAddrError {
    /// Not six two-digit hex bytes separated by colons.
    #[error("bad MAC address {0:?} (want 6 hex bytes like 02:00:00:00:00:01)")]
    Syntax(String),
    /// Bit 0 of the first byte is set.
    #[error("MAC address {0} is multicast; a NIC needs a unicast address")]
    Multicast(String),
}

impl MacAddr {
    /// Checks that `bytes` is a unicast address.
    pub fn from_bytes(bytes: [u8; 6]) -> Result<Self, MacAddrError> {
        if bytes[0] & 1 == 1 {
            return Err(MacAddrError::Multicast(Self(bytes).to_string()));
        }
        Ok(Self(bytes))
    }

    /// The six bytes, as the config space and frames carry them.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }
}

impl std::str::FromStr for MacAddr {
    type Err = MacAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || MacAddrError::Syntax(s.chars().take(64).collect());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(syntax)?;
            if part.len() != 2 {
                return Err(syntax());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        Self::from_bytes(mac)
    }
}

impl std::fmt::Display for MacAddr {
    /// The way `ip link` shows it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Features every network device offers. No CTRL_VQ (and so nothing that
/// depends on it), no MQ: one queue pair of plain Ethernet. [`features`]
/// adds MTU for a device given one.
pub const FEATURES: u64 = F_VERSION_1
    | F_EVENT_IDX
    | F_INDIRECT_DESC
    | feature(VIRTIO_NET_F_MAC)
    | feature(VIRTIO_NET_F_STATUS)
    | feature(VIRTIO_NET_F_MRG_RXBUF)
    | feature(VIRTIO_NET_F_CSUM)
    | feature(VIRTIO_NET_F_GUEST_CSUM)
    | feature(VIRTIO_NET_F_GUEST_TSO4)
    | feature(VIRTIO_NET_F_GUEST_TSO6)
    | feature(VIRTIO_NET_F_GUEST_ECN)
    | feature(VIRTIO_NET_F_GUEST_UFO)
    | feature(VIRTIO_NET_F_HOST_TSO4)
    | feature(VIRTIO_NET_F_HOST_TSO6)
    | feature(VIRTIO_NET_F_HOST_ECN)
    | feature(VIRTIO_NET_F_HOST_UFO);

/// What a device with `mtu` offers: [`FEATURES`], plus VIRTIO_NET_F_MTU
/// when the user gave an MTU.
pub fn features(mtu: Option<u16>) -> u64 {
    match mtu {
        Some(_) => FEATURES | feature(virtio_bindings::virtio_net::VIRTIO_NET_F_MTU),
        None => FEATURES,
    }
}

/// VIRTIO_NET_F_MRG_RXBUF as a mask.
pub const F_MRG_RXBUF: u64 = feature(VIRTIO_NET_F_MRG_RXBUF);

/// The TUN_F_* offloads a tap may use for frames it hands *to* the guest,
/// from what the driver accepted (GUEST_*).
///
/// The kernel refuses TSO and UFO without checksum offload and ECN
/// without TSO (TUNSETOFFLOAD fails with EINVAL), and the spec makes the
/// same dependencies, so a driver that broke them gets the subset that
/// still makes sense rather than a failed activation.
pub fn tap_offloads(features: u64) -> u32 {
    let has = |bit: u32| features & feature(bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

/// The config space a device with `mac` presents: the link is always up
/// (the tap's carrier is the host's business), there is one queue pair,
/// and the MTU follows when one is offered.
pub fn config_bytes(mac: MacAddr, mtu: Option<u16>) -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_LEN];
    c[0..6].copy_from_slice(&mac.bytes());
    c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c[8..10].copy_from_slice(&1u16.to_le_bytes());
    if let Some(mtu) = mtu {
        c.extend_from_slice(&mtu.to_le_bytes());
    }
    c
}

/// A random locally administered unicast MAC, for a device the user gave
/// none; it stays the device's for the whole run.
pub fn generate_mac() -> MacAddr {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most `mac.len()` bytes into `mac`.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if usize::try_from(n).ok() != Some(mac.len()) {
        // No entropy source: fall back to something per-process.
        let seed = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        mac.copy_from_slice(&seed.to_le_bytes()[..6]);
    }
    // Locally administered (bit 1), unicast (bit 0 clear).
    mac[0] = (mac[0] & 0xfc) | 0x02;
    MacAddr(mac)
}

/// Per-device counters for metrics; the device only ever adds to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Of those, frames the kernel read into a buffer the device had
    /// published ahead (provided buffers, `rx_provided.rs`): shows which
    /// RX path a guest's buffers select.
    pub rx_provided_packets: u64,
    /// Frame bytes (without the vnet header) delivered to the guest.
    pub rx_bytes: u64,
    /// Bad RX chains returned unused, and failed tap reads.
    pub rx_errors: u64,
    /// Frames read from the tap but not delivered (larger than the buffers).
    pub rx_dropped: u64,
    /// Frames the tap accepted from the guest.
    pub tx_packets: u64,
    /// Frame bytes (without the vnet header) the tap accepted.
    pub tx_bytes: u64,
    /// Bad TX chains returned unsent.
    pub tx_errors: u64,
    /// Good TX chains the tap refused (the write failed).
    pub tx_dropped: u64,
    /// Times the device asked the driver for a reset.
    pub needs_reset: u64,
    /// Guest-caused warnings not logged (rate limit); each was counted above.
    pub log_lines_suppressed: u64,
    /// Times the RX rate limiter held tap reads back.
    pub rx_rate_limiter_throttled: u64,
    /// Times the TX rate limiter held frames back.
    pub tx_rate_limiter_throttled: u64,
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod mac_tests {
    use super::*;

    #[test]
    fn macs_parse_print_and_refuse_multicast_in_one_place() {
        let mac: MacAddr = "06:00:AC:10:00:02".parse().expect("mac");
        assert_eq!(mac.bytes(), [6, 0, 0xac, 0x10, 0, 2]);
        assert_eq!(mac.to_string(), "06:00:ac:10:00:02");
        for bad in [
            "",
            "02:00:00:aa:bb",
            "02:00:00:aa:bb:0c:01",
            "0g:00:00:00:00:00",
            "2:0:0:0:0:0",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(MacAddrError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(MacAddrError::Multicast(_))
        ));
        let json: MacAddr = serde_json::from_str("\"02:00:00:00:00:01\"").expect("json");
        assert_eq!(
            serde_json::to_string(&json).ok().as_deref(),
            Some("\"02:00:00:00:00:01\"")
        );
        assert!(serde_json::from_str::<MacAddr>("\"03:00:00:00:00:01\"").is_err());
        assert_eq!(generate_mac().bytes()[0] & 3, 2, "local, unicast");
    }
}
