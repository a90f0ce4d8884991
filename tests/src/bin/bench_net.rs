//! `make bench-net`: the virtio-net data path against the host's own tap
//! limit.
//!
//! No KVM is involved. A synthetic split-virtqueue driver (this file) plays
//! the guest: it brings the network device up through the real virtio-mmio
//! register file on the real MMIO bus, puts frames (each behind a 12-byte
//! `virtio_net_hdr_v1`) in guest memory, kicks the queues' doorbell
//! eventfds (what KVM's ioeventfd does on a QueueNotify write) and sleeps on
//! the irq eventfd (what KVM's irqfd would inject). The device side is
//! exactly what `ringvm` runs for a booted guest: [`NetIface`] (the real
//! `NetDevice` on a real tap) in its generic device slot (`VirtioDevices`) on
//! its own thread, turning one `Ring` (io_uring).
//!
//! Everything runs in a private network namespace (`ringvm-bench-<pid>`)
//! with two taps, link-local addresses only:
//!
//! ```text
//!  tapb0 169.254.77.1 ◄── ringvm's device ◄── synthetic driver ("guest" 169.254.77.2)
//!  tapb1 169.254.78.1 ◄── this program's own read()/write() (the host limit, "peer" .78.2)
//! ```
//!
//! TX: the guest (or the direct writer) sends UDP frames (or 64 KiB TCP TSO
//! segments) to the tap's own address, which the namespace's kernel stack
//! takes in. RX: a host UDP socket on the tap's address sends datagrams to
//! the guest's (or the peer's) address, which a static neighbour entry
//! resolves to its MAC; the kernel writes them to the tap, and the device
//! (or the direct reader) reads them. Each point is measured for ringvm and
//! for the direct tap in the same run, in rounds that alternate which
//! side goes first; each round gives a ratio ringvm / direct, and the
//! report shows their median and spread.
//! Results go to stdout and to `target/bench/net.{json,md}`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Parser;
use devices::virtio::net::{tap_offloads, MacAddr, Tap, TapDevice, VNET_HDR_LEN};
use devices::virtio::testing::DriverQueue;
use devices::virtio::NOTIFY_REG_OFFSET;
use ringvm_tests::bench::clock::own_cpu_ns;
use ringvm_tests::bench::host::{HostCpu, HostInfo, Own};
use ringvm_tests::bench::inline_vmm::{watchdog, InlineVmm};
use ringvm_tests::bench::interleave::{interleave, Round};
use ringvm_tests::bench::irq::wait_irq;
use ringvm_tests::bench::mmio::MmioRegs;
use ringvm_tests::bench::netns::{format_mac, Netns};
use ringvm_tests::bench::points::{Better, Point, PointRound, Target};
use ringvm_tests::bench::report;
use ringvm_tests::bench::stats::{median, Spread};
use ringvm_tests::bench::summary::summary_json;
use ringvm_tests::bench::task::IoWorkers;
use ringvm_tests::bench::vmm_thread::{VmmHandle, VmmSnap};
use ringvm_tests::bench::wiring::BenchWiring;
use ringvm_tests::bench::Res;
use serde_json::{json, Value};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_STATUS,
};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::config::NetConfig;
use vmm::machine::builder::VirtioBuilder;
use vmm::machine::device_manager::DeviceManager;
use vmm_sys_util::eventfd::EventFd;

// ---------------------------------------------------------------------------
// Addresses. Link-local only; nothing leaves the private namespace.

/// One tap and the two ends of its link.
struct Lane {
    tap: &'static str,
    /// The tap's own address (the host side).
    host_ip: [u8; 4],
    /// The guest's (or, for the direct tap, the peer program's) address.
    peer_ip: [u8; 4],
    host_mac: [u8; 6],
    peer_mac: [u8; 6],
}

/// ringvm's tap.
const VM_LANE: Lane = Lane {
    tap: "tapb0",
    host_ip: [169, 254, 77, 1],
    peer_ip: [169, 254, 77, 2],
    host_mac: [0x02, 0xb0, 0, 0, 0, 0x01],
    peer_mac: [0x02, 0xb0, 0, 0, 0, 0x02],
};

/// The tap this program reads and writes itself: the host limit.
const DIRECT_LANE: Lane = Lane {
    tap: "tapb1",
    host_ip: [169, 254, 78, 1],
    peer_ip: [169, 254, 78, 2],
    host_mac: [0x02, 0xb1, 0, 0, 0, 0x01],
    peer_mac: [0x02, 0xb1, 0, 0, 0, 0x02],
};

/// UDP port of the guest/peer end (TX source, RX destination).
const PEER_PORT: u16 = 40000;
/// The host socket TX frames go to.
const SINK_PORT: u16 = 5001;
/// The host socket RX datagrams come from.
const SOURCE_PORT: u16 = 5002;
/// TCP ports of the TSO segments (no socket listens: see [`tso_frame`]).
const TSO_SRC_PORT: u16 = 40002;
const TSO_DST_PORT: u16 = 5003;

const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const TCP_HLEN: usize = 20;
const UDP_HDRS: usize = ETH_HLEN + IP_HLEN + UDP_HLEN;
const TSO_MSS: u16 = 1448;

/// Frame sizes (Ethernet header + payload, no FCS).
const FRAME_SMALL: usize = 64;
const FRAME_MTU: usize = 1514;
const FRAME_TSO: usize = 65536;

// ---------------------------------------------------------------------------
// Guest memory layout of the synthetic driver.

const MEM_SIZE: usize = 48 << 20;
const QUEUE_SIZE: u16 = 256;
/// Where each queue's rings start (the shared driver mock's layout).
const RX_RINGS: u64 = 0x1000;
const TX_RINGS: u64 = 0x6000;
/// TX buffers: header + frame in one descriptor, up to 64 KiB + header.
const TX_BUF_BASE: u64 = 0x10_0000;
const TX_BUF_STRIDE: u64 = 0x1_1000;
/// RX buffers, one descriptor each (after the TX buffers).
const RX_BUF_BASE: u64 = 0x120_0000;
/// Default RX buffer: Linux's mergeable-buffer size for a 1500-byte MTU
/// (header + 1518 bytes, rounded to a cache line).
const RX_BUF_LEN: u32 = 1536;
/// Largest RX buffer --rx-buffer takes: a whole 64 KiB frame and header.
const RX_BUF_MAX: u32 = 65562;

/// What Linux's virtio_net driver accepts of what a device offers (without
/// the control queue features this device does not offer).
const LINUX_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_STATUS)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_GUEST_UFO)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_ECN)
    | (1 << VIRTIO_NET_F_HOST_UFO);
/// What a driver with GSO off declines (Linux: `ethtool -K gro off` and
/// friends; the guest then never receives a frame above its MTU).
const GUEST_GSO_FEATURES: u64 = (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_GUEST_UFO);
/// What this benchmark cannot do without.
const NEEDED_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_MRG_RXBUF);

/// Frames the host sender may have in flight toward a receiver (below the
/// tap's 1000-frame txqueuelen, so a receiver that keeps up drops nothing).
const RX_WINDOW: u64 = 512;
/// Datagrams per sendmmsg.
const SEND_BATCH: usize = 32;

#[derive(Parser, Debug)]
#[command(
    about = "virtio-net data path (synthetic driver, real device and loop, real tap) vs the same traffic on a tap read and written directly"
)]
struct Args {
    /// Measured seconds per run.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Rounds per point: each round runs ringvm and the direct tap back to
    /// back (alternating which goes first) and gives one ratio; the report
    /// shows the median ratio and its spread.
    #[arg(long, alias = "repeats", default_value_t = 3)]
    rounds: u32,
    /// Unmeasured warm-up seconds at the start of each run.
    #[arg(long, default_value_t = 0.3)]
    warmup: f64,
    /// Where net.json and net.md go (default: <workspace>/target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only the points whose key (tx-64, tx-1514, tx-tso-65536,
    /// rx-64, rx-1514, rx-1514-nogso) contains this text.
    #[arg(long)]
    only: Option<String>,
    /// With --only: the key must be exactly that text.
    #[arg(long, requires = "only")]
    exact: bool,
    /// Skip the 64 KiB TSO point.
    #[arg(long)]
    no_tso: bool,
    /// Skip the diagnostic RX run with 64 KiB buffers.
    #[arg(long)]
    no_diagnostic: bool,
    /// Size of each posted RX buffer (Linux posts 1536 for a 1500 MTU).
    /// Larger buffers show what the device's per-read buffer gathering
    /// costs: at 65562 every read takes a single buffer.
    #[arg(long, default_value_t = RX_BUF_LEN, value_parser = clap::value_parser!(u32).range(1536..=65562))]
    rx_buffer: u32,
    /// Instead of measuring: run the selected points with ringvm only,
    /// about this many frames each, the VMM loop turned by the driver's
    /// own thread (see `bench::inline_vmm`), and print one JSON line per
    /// point. What `make bench-callgrind` runs under valgrind.
    #[arg(long)]
    callgrind_requests: Option<u64>,
}

impl Args {
    /// Whether --only (and --exact) select the point keyed `key`.
    fn selects(&self, key: &str) -> bool {
        match (self.only.as_deref(), self.exact) {
            (None, _) => true,
            (Some(o), true) => key == o,
            (Some(o), false) => key.contains(o),
        }
    }
}

// ---------------------------------------------------------------------------
// Workloads

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Tx,
    Rx,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    dir: Dir,
    frame_len: usize,
    tso: bool,
    /// A diagnostic RX run with posted buffers of this size instead of
    /// --rx-buffer.
    diag_buf: Option<u32>,
    /// The driver declines GUEST_TSO4/6, GUEST_UFO and GUEST_ECN, as Linux
    /// does with GSO off: no frame exceeds the MTU, so each RX buffer of
    /// the default size takes a whole frame.
    no_guest_gso: bool,
}

impl Workload {
    fn key(&self) -> String {
        match (self.dir, self.tso) {
            (Dir::Tx, true) => format!("tx-tso-{}", self.frame_len),
            (Dir::Tx, false) => format!("tx-{}", self.frame_len),
            (Dir::Rx, _) if self.no_guest_gso => format!("rx-{}-nogso", self.frame_len),
            (Dir::Rx, _) => match self.diag_buf {
                Some(b) => format!("rx-{}-buf{b}", self.frame_len),
                None => format!("rx-{}", self.frame_len),
            },
        }
    }

    fn label(&self) -> String {
        let dir = if self.dir == Dir::Tx {
            "TX guest→host"
        } else {
            "RX host→guest"
        };
        match (self.tso, self.diag_buf) {
            (true, _) => format!("{dir} TSO 64 KiB"),
            (false, Some(b)) if self.no_guest_gso => {
                format!(
                    "{dir} {} B, no guest GSO, {b}-B buffers (diagnostic)",
                    self.frame_len
                )
            }
            (false, Some(b)) => format!("{dir} {} B, {b}-B buffers (diagnostic)", self.frame_len),
            (false, None) => format!("{dir} {} B", self.frame_len),
        }
    }

    /// The points issue 14's target applies to: 1514-byte frames both
    /// ways, and TSO.
    fn is_target(&self) -> bool {
        (self.frame_len == FRAME_MTU || self.tso) && self.diag_buf.is_none()
    }
}

fn workloads(no_tso: bool) -> Vec<Workload> {
    let mut v = vec![
        Workload {
            dir: Dir::Tx,
            frame_len: FRAME_SMALL,
            tso: false,
            diag_buf: None,
            no_guest_gso: false,
        },
        Workload {
            dir: Dir::Tx,
            frame_len: FRAME_MTU,
            tso: false,
            diag_buf: None,
            no_guest_gso: false,
        },
    ];
    if !no_tso {
        v.push(Workload {
            dir: Dir::Tx,
            frame_len: FRAME_TSO,
            tso: true,
            diag_buf: None,
            no_guest_gso: false,
        });
    }
    v.push(Workload {
        dir: Dir::Rx,
        frame_len: FRAME_SMALL,
        tso: false,
        diag_buf: None,
        no_guest_gso: false,
    });
    v.push(Workload {
        dir: Dir::Rx,
        frame_len: FRAME_MTU,
        tso: false,
        diag_buf: None,
        no_guest_gso: false,
    });
    v
}

// ---------------------------------------------------------------------------
// Frames

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The UDP payload of datagram `seq`: its number, then a pattern.
fn payload(seq: u64, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seq as u8))
        .collect();
    let n = len.min(8);
    p[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
    p
}

/// Ethernet + IPv4 headers from `lane`'s peer to its host.
fn eth_ip(lane: &Lane, proto: u8, ip_total: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + ip_total);
    f.extend_from_slice(&lane.host_mac);
    f.extend_from_slice(&lane.peer_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; IP_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_total as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&lane.peer_ip);
    ip[16..20].copy_from_slice(&lane.host_ip);
    let c = !csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f
}

/// A `frame_len`-byte UDP frame from the peer to the host's sink socket.
fn udp_frame(lane: &Lane, frame_len: usize, seq: u64) -> Vec<u8> {
    let data = payload(seq, frame_len - UDP_HDRS);
    let mut f = eth_ip(lane, 17, frame_len - ETH_HLEN);
    f.extend_from_slice(&PEER_PORT.to_be_bytes());
    f.extend_from_slice(&SINK_PORT.to_be_bytes());
    f.extend_from_slice(&((UDP_HLEN + data.len()) as u16).to_be_bytes());
    // Checksum 0: none (allowed for UDP over IPv4).
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&data);
    f
}

/// A `frame_len`-byte TCP segment for TSO (the tap's kernel side builds a
/// GSO skb of it). It carries RST|ACK and goes to a port nobody listens
/// on, so the host's TCP layer takes it in (ip_rcv, tcp_v4_rcv, socket
/// lookup) and discards it without answering: a RST is never answered.
/// The checksum field holds the pseudo-header sum, as for
/// CHECKSUM_PARTIAL (VIRTIO_NET_HDR_F_NEEDS_CSUM).
fn tso_frame(lane: &Lane, frame_len: usize) -> Vec<u8> {
    let tcp_len = frame_len - ETH_HLEN - IP_HLEN;
    let mut f = eth_ip(lane, 6, frame_len - ETH_HLEN);
    let mut tcp = [0u8; TCP_HLEN];
    tcp[0..2].copy_from_slice(&TSO_SRC_PORT.to_be_bytes());
    tcp[2..4].copy_from_slice(&TSO_DST_PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x14; // RST | ACK
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&lane.peer_ip);
    pseudo.extend_from_slice(&lane.host_ip);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    let partial = csum_fold(csum_add(0, &pseudo));
    tcp[16..18].copy_from_slice(&partial.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend_from_slice(&payload(0, tcp_len - TCP_HLEN));
    f
}

/// `virtio_net_hdr_v1` for a plain frame, or for a TCPv4 TSO segment.
fn vnet_hdr(tso: bool) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    if tso {
        h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        h[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        h[2..4].copy_from_slice(&((ETH_HLEN + IP_HLEN + TCP_HLEN) as u16).to_le_bytes());
        h[4..6].copy_from_slice(&TSO_MSS.to_le_bytes());
        h[6..8].copy_from_slice(&((ETH_HLEN + IP_HLEN) as u16).to_le_bytes());
        h[8..10].copy_from_slice(&16u16.to_le_bytes());
    }
    h
}

/// Header + frame, as a TX chain carries it and as the tap takes it.
fn tx_chain(lane: &Lane, w: &Workload, seq: u64) -> Vec<u8> {
    let mut c = vnet_hdr(w.tso).to_vec();
    if w.tso {
        c.extend_from_slice(&tso_frame(lane, w.frame_len));
    } else {
        c.extend_from_slice(&udp_frame(lane, w.frame_len, seq));
    }
    c
}

/// Whether `buf` (vnet header + frame) is one of our RX datagrams of
/// `frame_len` bytes.
fn is_rx_frame(buf: &[u8], n: usize, frame_len: usize) -> bool {
    let f = VNET_HDR_LEN;
    n == f + frame_len
        && buf.len() >= f + UDP_HDRS
        && buf[f + 12..f + 14] == [0x08, 0x00]
        && buf[f + ETH_HLEN + 9] == 17
        && buf[f + 36..f + 38] == PEER_PORT.to_be_bytes()
}

// ---------------------------------------------------------------------------
// The private network namespace.

fn ip4(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

/// Both taps, up, with their addresses and the peers' static neighbours.
fn setup_namespace(ns: &Netns) -> Res<()> {
    // No IPv6: no router solicitations or DAD frames on the taps.
    for conf in ["all", "default"] {
        let path = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
        if let Err(e) = std::fs::write(&path, "1") {
            eprintln!("bench-net: note: cannot write {path}: {e}");
        }
    }
    ns.ip(&["link", "set", "lo", "up"])?;
    for lane in [&VM_LANE, &DIRECT_LANE] {
        let host = format!("{}/24", ip4(lane.host_ip));
        let peer = ip4(lane.peer_ip).to_string();
        ns.ip(&["tuntap", "add", "dev", lane.tap, "mode", "tap"])?;
        ns.ip(&[
            "link",
            "set",
            "dev",
            lane.tap,
            "address",
            &format_mac(lane.host_mac),
        ])?;
        ns.ip(&["addr", "add", &host, "dev", lane.tap])?;
        ns.ip(&["link", "set", "dev", lane.tap, "up"])?;
        ns.ip(&[
            "neigh",
            "replace",
            &peer,
            "lladdr",
            &format_mac(lane.peer_mac),
            "dev",
            lane.tap,
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

/// The host's two sockets of one lane.
struct HostSockets {
    /// Bound to host_ip:SINK_PORT; TX frames arrive here.
    sink: UdpSocket,
    /// Bound to host_ip:SOURCE_PORT, connected to peer_ip:PEER_PORT.
    source: UdpSocket,
}

impl HostSockets {
    fn new(lane: &Lane) -> Res<Self> {
        let host = ip4(lane.host_ip);
        let sink = UdpSocket::bind(SocketAddrV4::new(host, SINK_PORT))
            .map_err(|e| format!("cannot bind {host}:{SINK_PORT}: {e}"))?;
        let source = UdpSocket::bind(SocketAddrV4::new(host, SOURCE_PORT))
            .map_err(|e| format!("cannot bind {host}:{SOURCE_PORT}: {e}"))?;
        source
            .connect(SocketAddrV4::new(ip4(lane.peer_ip), PEER_PORT))
            .map_err(|e| format!("cannot connect the RX source socket: {e}"))?;
        Ok(Self { sink, source })
    }

    /// Discards whatever earlier runs left in the sink.
    fn drain_sink(&self) -> Res<()> {
        self.sink
            .set_nonblocking(true)
            .map_err(|e| format!("sink socket: {e}"))?;
        let mut buf = vec![0u8; 65536];
        while self.sink.recv(&mut buf).is_ok() {}
        self.sink
            .set_nonblocking(false)
            .map_err(|e| format!("sink socket: {e}"))
    }

    /// Receives `n` datagrams and checks they are `payload(seq)` for
    /// `seqs`, in any order.
    fn expect_sink(&self, seqs: &[u64], len: usize) -> Res<()> {
        self.sink
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| format!("sink socket: {e}"))?;
        let mut left: Vec<u64> = seqs.to_vec();
        let mut buf = vec![0u8; 65536];
        while !left.is_empty() {
            let n = self.sink.recv(&mut buf).map_err(|e| {
                format!(
                    "the host socket got {} of {} datagrams: {e}",
                    seqs.len() - left.len(),
                    seqs.len()
                )
            })?;
            let Some(pos) = left.iter().position(|&s| buf[..n] == payload(s, len)[..]) else {
                return Err(format!(
                    "the host socket got an unexpected {n}-byte datagram"
                ));
            };
            left.swap_remove(pos);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Kernel-side counters of the namespace, to check where frames went.

#[derive(Clone, Debug, Default)]
struct KernelSnap {
    snmp: HashMap<String, u64>,
    /// Per interface: rx_packets, rx_errs, rx_drop, tx_packets, tx_drop
    /// (the tap's "rx" is what programs wrote to it).
    dev: HashMap<String, [u64; 5]>,
}

impl KernelSnap {
    fn read() -> Res<Self> {
        let snmp_text = std::fs::read_to_string("/proc/thread-self/net/snmp")
            .map_err(|e| format!("cannot read /proc/thread-self/net/snmp: {e}"))?;
        let mut snmp = HashMap::new();
        let lines: Vec<&str> = snmp_text.lines().collect();
        for pair in lines.chunks_exact(2) {
            let mut names = pair[0].split_whitespace();
            let mut values = pair[1].split_whitespace();
            let (Some(proto), Some(_)) = (names.next(), values.next()) else {
                continue;
            };
            let proto = proto.trim_end_matches(':');
            for (n, v) in names.zip(values) {
                if let Ok(v) = v.parse() {
                    snmp.insert(format!("{proto}.{n}"), v);
                }
            }
        }
        let dev_text = std::fs::read_to_string("/proc/thread-self/net/dev")
            .map_err(|e| format!("cannot read /proc/thread-self/net/dev: {e}"))?;
        let mut dev = HashMap::new();
        for line in dev_text.lines().skip(2) {
            let Some((name, rest)) = line.split_once(':') else {
                continue;
            };
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if v.len() >= 12 {
                dev.insert(name.trim().to_string(), [v[1], v[2], v[3], v[9], v[11]]);
            }
        }
        Ok(Self { snmp, dev })
    }

    fn get(&self, key: &str) -> u64 {
        self.snmp.get(key).copied().unwrap_or(0)
    }

    fn tap(&self, tap: &str) -> [u64; 5] {
        self.dev.get(tap).copied().unwrap_or_default()
    }
}

/// What the kernel saw of one run (warm-up included).
#[derive(Clone, Copy, Debug, Default)]
struct KernelDelta {
    /// TX: datagrams that reached the UDP layer (InDatagrams +
    /// RcvbufErrors), or TCP segments counted in (InSegs). RX: frames the
    /// kernel queued to the tap.
    delivered: u64,
    /// TX: frames the tap refused (rx_errors + rx_dropped). RX: frames the
    /// tap dropped with its queue full (tx_dropped).
    tap_dropped: u64,
}

impl KernelDelta {
    fn between(a: &KernelSnap, b: &KernelSnap, lane: &Lane, w: &Workload) -> Self {
        let d = |k: &str| b.get(k).saturating_sub(a.get(k));
        let (ta, tb) = (a.tap(lane.tap), b.tap(lane.tap));
        let td = |i: usize| tb[i].saturating_sub(ta[i]);
        match (w.dir, w.tso) {
            (Dir::Tx, true) => Self {
                delivered: d("Tcp.InSegs"),
                tap_dropped: td(1) + td(2),
            },
            (Dir::Tx, false) => Self {
                delivered: d("Udp.InDatagrams") + d("Udp.RcvbufErrors"),
                tap_dropped: td(1) + td(2),
            },
            (Dir::Rx, _) => Self {
                delivered: td(3),
                tap_dropped: td(4),
            },
        }
    }
}

// ---------------------------------------------------------------------------
// Other threads' CPU time.

/// CPU time of thread `tid` of this process (schedstat's run time, ns);
/// 0 if it is gone.
fn task_cpu_ns(tid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU time of this process's io_uring worker threads (iou-wrk-*), which
/// do the ring's work that cannot complete inline; and how many there are.
fn iowq_cpu_ns() -> (u64, u64) {
    let w = IoWorkers::read();
    (w.cpu_ns, w.threads)
}

// ---------------------------------------------------------------------------
// Host traffic source for RX, with a window so it never overruns the tap.

/// Shared between the host sender and whoever receives its datagrams.
struct Flow {
    received: AtomicU64,
    waiting: AtomicBool,
    credit: EventFd,
    stop: AtomicBool,
    sent: AtomicU64,
    /// Datagrams given up on (sent, never counted in within 20 ms).
    forgiven: AtomicU64,
    tid: AtomicI32,
}

impl Flow {
    fn new() -> Res<Self> {
        Ok(Self {
            received: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            credit: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?,
            stop: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            forgiven: AtomicU64::new(0),
            tid: AtomicI32::new(0),
        })
    }

    /// The receiver took `n` more datagrams: open the window.
    fn delivered(&self, n: u64) {
        self.received.fetch_add(n, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) && self.waiting.swap(false, Ordering::SeqCst) {
            let _ = self.credit.write(1);
        }
    }
}

/// Sends `payload_len`-byte datagrams on `sock` (connected to the peer)
/// in sendmmsg batches, keeping at most [`RX_WINDOW`] not yet received.
fn sender(sock: UdpSocket, payload_len: usize, flow: Arc<Flow>) -> Res<()> {
    // SAFETY: gettid has no preconditions and cannot fail.
    flow.tid.store(unsafe { libc::gettid() }, Ordering::Release);
    let data = payload(0, payload_len);
    let mut iov: Vec<libc::iovec> = (0..SEND_BATCH)
        .map(|_| libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|v| {
            // SAFETY: mmsghdr is a plain C struct; all zeroes is valid.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let fd = sock.as_raw_fd();
    let mut sent = 0u64;
    let mut forgiven = 0u64;
    while !flow.stop.load(Ordering::Relaxed) {
        let received = flow.received.load(Ordering::SeqCst);
        let outstanding = sent.saturating_sub(received + forgiven);
        if outstanding + SEND_BATCH as u64 > RX_WINDOW {
            flow.waiting.store(true, Ordering::SeqCst);
            if flow.received.load(Ordering::SeqCst) == received {
                let mut pfd = libc::pollfd {
                    fd: flow.credit.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, count 1.
                let rc = unsafe { libc::poll(&mut pfd, 1, 20) };
                if rc == 0 && flow.received.load(Ordering::SeqCst) == received {
                    // Nothing came in for 20 ms: those were lost.
                    forgiven += outstanding;
                    flow.forgiven.store(forgiven, Ordering::Relaxed);
                }
                let _ = flow.credit.read();
            }
            flow.waiting.store(false, Ordering::SeqCst);
            continue;
        }
        // SAFETY: `msgs` holds SEND_BATCH initialised headers whose iovecs
        // point into `iov` and `data`, all alive for the call.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), SEND_BATCH as u32, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN | libc::ENOBUFS) => continue,
                _ => return Err(format!("sendmmsg: {e}")),
            }
        }
        sent += n as u64;
        flow.sent.store(sent, Ordering::Relaxed);
    }
    Ok(())
}

struct SenderHandle {
    flow: Arc<Flow>,
    thread: Option<JoinHandle<Res<()>>>,
}

impl SenderHandle {
    fn start(sockets: &HostSockets, payload_len: usize) -> Res<Self> {
        let flow = Arc::new(Flow::new()?);
        let sock = sockets
            .source
            .try_clone()
            .map_err(|e| format!("cannot clone the source socket: {e}"))?;
        let thread = {
            let flow = flow.clone();
            std::thread::Builder::new()
                .name("host-sender".into())
                .spawn(move || sender(sock, payload_len, flow))
                .map_err(|e| format!("cannot start the sender thread: {e}"))?
        };
        while flow.tid.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        Ok(Self {
            flow,
            thread: Some(thread),
        })
    }

    fn tid(&self) -> i32 {
        self.flow.tid.load(Ordering::Acquire)
    }

    fn stop(mut self) -> Res<(u64, u64)> {
        self.flow.stop.store(true, Ordering::Relaxed);
        let _ = self.flow.credit.write(1);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Ok(()))) | None => Ok((
                self.flow.sent.load(Ordering::Relaxed),
                self.flow.forgiven.load(Ordering::Relaxed),
            )),
            Some(Ok(Err(e))) => Err(format!("host sender failed: {e}")),
            Some(Err(_)) => Err("host sender panicked".into()),
        }
    }
}

impl Drop for SenderHandle {
    fn drop(&mut self) {
        self.flow.stop.store(true, Ordering::Relaxed);
        let _ = self.flow.credit.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Measurement windows.

/// Counters a side keeps while it runs, cumulative.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    packets: u64,
    /// Frame bytes (no vnet header).
    bytes: u64,
    /// RX frames that were not ours.
    other: u64,
    /// Doorbell writes (each one a guest exit on real KVM).
    kicks: u64,
    /// Times the driver slept on the irq line.
    waits: u64,
    /// Sum of the irq eventfd counter: the device's irq writes consumed.
    irq_signals: u64,
    /// The direct program's read/write/poll syscalls.
    syscalls: u64,
}

#[derive(Clone, Copy, Debug)]
struct Snap {
    at: Instant,
    c: Counts,
    main_cpu: u64,
    peer_cpu: u64,
    vmm: VmmSnap,
    iowq_cpu: u64,
    iowq_threads: u64,
}

fn take_snap(c: Counts, vmm: Option<&VmmHandle>, peer: Option<i32>) -> Res<Snap> {
    let (iowq_cpu, iowq_threads) = iowq_cpu_ns();
    Ok(Snap {
        at: Instant::now(),
        c,
        main_cpu: own_cpu_ns()?,
        peer_cpu: peer.map_or(0, task_cpu_ns),
        vmm: vmm.map(VmmHandle::snap).transpose()?.unwrap_or_default(),
        iowq_cpu,
        iowq_threads,
    })
}

/// One measured window (or several summed).
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    seconds: f64,
    packets: u64,
    bytes: u64,
    other: u64,
    /// The driver thread (ringvm) or the direct program's thread.
    main_cpu_ns: u64,
    /// The host sender thread (RX).
    peer_cpu_ns: u64,
    vmm_cpu_ns: u64,
    iowq_cpu_ns: u64,
    iowq_threads: u64,
    turns: u64,
    syscr: u64,
    syscw: u64,
    vmm_sleeps: u64,
    kicks: u64,
    driver_waits: u64,
    irq_signals: u64,
    direct_syscalls: u64,
    // Whole runs, warm-up included.
    run_packets: u64,
    kernel: KernelDelta,
    sender_sent: u64,
    sender_forgiven: u64,
}

impl Sample {
    fn between(a: &Snap, b: &Snap) -> Self {
        Self {
            seconds: (b.at - a.at).as_secs_f64(),
            packets: b.c.packets - a.c.packets,
            bytes: b.c.bytes - a.c.bytes,
            other: b.c.other - a.c.other,
            main_cpu_ns: b.main_cpu.saturating_sub(a.main_cpu),
            peer_cpu_ns: b.peer_cpu.saturating_sub(a.peer_cpu),
            vmm_cpu_ns: b.vmm.cpu_ns.saturating_sub(a.vmm.cpu_ns),
            iowq_cpu_ns: b.iowq_cpu.saturating_sub(a.iowq_cpu),
            iowq_threads: b.iowq_threads.max(a.iowq_threads),
            turns: b.vmm.turns - a.vmm.turns,
            syscr: b.vmm.syscr.saturating_sub(a.vmm.syscr),
            syscw: b.vmm.syscw.saturating_sub(a.vmm.syscw),
            vmm_sleeps: b
                .vmm
                .voluntary_switches
                .saturating_sub(a.vmm.voluntary_switches),
            kicks: b.c.kicks - a.c.kicks,
            driver_waits: b.c.waits - a.c.waits,
            irq_signals: b.c.irq_signals - a.c.irq_signals,
            direct_syscalls: b.c.syscalls - a.c.syscalls,
            ..Self::default()
        }
    }

    fn add(&mut self, o: &Self) {
        self.seconds += o.seconds;
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.other += o.other;
        self.main_cpu_ns += o.main_cpu_ns;
        self.peer_cpu_ns += o.peer_cpu_ns;
        self.vmm_cpu_ns += o.vmm_cpu_ns;
        self.iowq_cpu_ns += o.iowq_cpu_ns;
        self.iowq_threads = self.iowq_threads.max(o.iowq_threads);
        self.turns += o.turns;
        self.syscr += o.syscr;
        self.syscw += o.syscw;
        self.vmm_sleeps += o.vmm_sleeps;
        self.kicks += o.kicks;
        self.driver_waits += o.driver_waits;
        self.irq_signals += o.irq_signals;
        self.direct_syscalls += o.direct_syscalls;
        self.run_packets += o.run_packets;
        self.kernel.delivered += o.kernel.delivered;
        self.kernel.tap_dropped += o.kernel.tap_dropped;
        self.sender_sent += o.sender_sent;
        self.sender_forgiven += o.sender_forgiven;
    }

    fn pps(&self) -> f64 {
        self.packets as f64 / self.seconds.max(1e-9)
    }

    fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds.max(1e-9) / 1e9
    }

    fn per_pkt(&self, v: u64) -> f64 {
        v as f64 / self.packets.max(1) as f64
    }

    fn us_per_pkt(&self, ns: u64) -> f64 {
        self.per_pkt(ns) / 1000.0
    }

    fn vmm_syscalls(&self) -> u64 {
        self.turns + self.syscr + self.syscw
    }
}

/// Takes the snapshots at the edges of the measured window.
struct Timer {
    t_measure: Instant,
    t_end: Instant,
    first: Option<Snap>,
    result: Option<Sample>,
}

impl Timer {
    fn new(warmup: f64, secs: f64) -> Self {
        let t_measure = Instant::now() + Duration::from_secs_f64(warmup);
        Self {
            t_measure,
            t_end: t_measure + Duration::from_secs_f64(secs),
            first: None,
            result: None,
        }
    }

    /// Call often; true once the window has closed.
    fn tick(&mut self, snap: impl FnOnce() -> Res<Snap>) -> Res<bool> {
        if self.result.is_some() {
            return Ok(true);
        }
        let now = Instant::now();
        match &self.first {
            None if now >= self.t_measure => self.first = Some(snap()?),
            Some(first) if now >= self.t_end => {
                self.result = Some(Sample::between(first, &snap()?));
                return Ok(true);
            }
            _ => {}
        }
        Ok(false)
    }

    fn take(self) -> Res<Sample> {
        self.result
            .ok_or_else(|| "the run ended before its window".into())
    }
}

// ---------------------------------------------------------------------------
// The synthetic guest driver.

fn gm(e: vm_memory::GuestMemoryError) -> String {
    format!("guest memory: {e}")
}

/// The driver's side of one split virtqueue: the shared mock for the
/// rings, plus which descriptors are free (one buffer per descriptor).
struct Vq {
    index: u32,
    vq: DriverQueue<GuestMemoryMmap>,
    /// Descriptors staged since the last publish.
    staged: Vec<u16>,
    free: Vec<u16>,
    busy: Vec<bool>,
}

impl Vq {
    fn new(mem: &GuestMemoryMmap, index: u32, base: u64) -> Self {
        Self {
            index,
            vq: DriverQueue::new(mem.clone(), base, QUEUE_SIZE),
            staged: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            free: (0..QUEUE_SIZE).rev().collect(),
            busy: vec![false; usize::from(QUEUE_SIZE)],
        }
    }

    fn qsize(&self) -> u16 {
        self.vq.size()
    }

    fn in_flight(&self) -> usize {
        usize::from(self.qsize()) - self.free.len()
    }

    /// Used entries seen so far.
    fn last_used(&self) -> u16 {
        self.vq.seen_used()
    }

    fn set_desc(&self, id: u16, addr: u64, len: u32, flags: u32) {
        self.vq
            .store(id, Descriptor::new(addr, len, flags as u16, 0));
    }

    /// Stages a free descriptor for the available ring (not yet published).
    fn push(&mut self) -> Option<u16> {
        let id = self.free.pop()?;
        self.busy[usize::from(id)] = true;
        self.staged.push(id);
        Some(id)
    }

    /// Publishes the staged descriptors and kicks if the device asked for
    /// it (EVENT_IDX).
    fn publish(&mut self, kick: &EventFd, c: &mut Counts) -> Res<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let (old, new) = self.vq.publish_all(self.staged.drain(..));
        if self.vq.kick_wanted(old, new) {
            kick.write(1).map_err(|e| format!("doorbell write: {e}"))?;
            c.kicks += 1;
        }
        Ok(())
    }

    /// The next used element, if any: (id, len).
    fn pop_used(&mut self) -> Res<Option<(u16, u32)>> {
        let Some((id, len)) = self.vq.next_used() else {
            return Ok(None);
        };
        let id = u16::try_from(id)
            .ok()
            .filter(|&i| self.busy.get(usize::from(i)).copied().unwrap_or(false))
            .ok_or_else(|| {
                format!(
                    "queue {}: device returned descriptor {id}, which is not in flight",
                    self.index
                )
            })?;
        self.busy[usize::from(id)] = false;
        self.free.push(id);
        Ok(Some((id, len)))
    }
}

fn tx_buf(id: u16) -> u64 {
    TX_BUF_BASE + u64::from(id) * TX_BUF_STRIDE
}

/// RX buffer `id` of `len` bytes each (page-aligned strides).
fn rx_buf(id: u16, len: u32) -> u64 {
    RX_BUF_BASE + u64::from(id) * u64::from(len).next_multiple_of(4096)
}

struct Driver {
    mem: GuestMemoryMmap,
    regs: MmioRegs,
    /// Doorbell eventfd per queue index.
    kicks: Vec<EventFd>,
    irq: EventFd,
    rx: Vq,
    tx: Vq,
    features: u64,
    mac: [u8; 6],
    c: Counts,
    tx_frame_len: u64,
    rx_buf_len: u32,
    /// Features this driver declines on top of what Linux would.
    declined: u64,
}

impl Driver {
    /// Brings the device up as Linux's virtio-mmio + virtio_net do, and
    /// posts every RX buffer.
    fn init(&mut self) -> Res<()> {
        let status = self.regs.probe(1, "network")?;
        let offered = self.regs.device_features();
        if offered & NEEDED_FEATURES != NEEDED_FEATURES {
            return Err(format!(
                "device offers features {offered:#x}, the driver needs {NEEDED_FEATURES:#x}"
            ));
        }
        let want = offered & LINUX_FEATURES & !self.declined;
        self.features = want;
        let status = self.regs.set_features(status, want)?;
        for vq in [&mut self.rx, &mut self.tx] {
            // Fresh rings, as a driver allocates them (a re-init must not
            // see the used index of the device's previous life).
            vq.vq.clear();
            self.regs.write32(VIRTIO_MMIO_QUEUE_SEL, vq.index);
            let max = self.regs.read32(VIRTIO_MMIO_QUEUE_NUM_MAX);
            if max < u32::from(vq.qsize()) {
                return Err(format!(
                    "queue {} maximum {max} is below {}",
                    vq.index,
                    vq.qsize()
                ));
            }
            self.regs
                .write32(VIRTIO_MMIO_QUEUE_NUM, u32::from(vq.qsize()));
            let q = &vq.vq;
            self.regs
                .set_queue_rings(q.desc_table(), q.avail_ring(), q.used_ring());
        }
        self.regs.driver_ok(status)?;
        let mut mac = [0u8; 6];
        self.regs.read_config(&mut mac);
        self.mac = mac;
        // Touch every buffer once so page faults stay out of the runs.
        let len = self.rx_buf_len;
        let zeros = vec![0u8; TX_BUF_STRIDE.max(u64::from(len)) as usize];
        for id in 0..QUEUE_SIZE {
            self.mem
                .write_slice(&zeros[..TX_BUF_STRIDE as usize], GuestAddress(tx_buf(id)))
                .map_err(gm)?;
            self.mem
                .write_slice(&zeros[..len as usize], GuestAddress(rx_buf(id, len)))
                .map_err(gm)?;
            self.rx
                .set_desc(id, rx_buf(id, len), len, VRING_DESC_F_WRITE);
        }
        self.rx_refill()
    }

    /// Stops the device (status 0) and waits for the reset to finish, so
    /// the VMM thread cancels its parked tap read before it stops.
    fn reset(&self) {
        self.regs.write32(VIRTIO_MMIO_STATUS, 0);
        let until = Instant::now() + Duration::from_secs(1);
        while self.regs.read32(VIRTIO_MMIO_STATUS) != 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    /// Re-arms the interrupt of `rx` or `tx` (used_event = `event`) and
    /// sleeps on the irq line unless something arrived meanwhile; false if
    /// `timeout_ms` passed with nothing. On wake-up it reads and acks
    /// InterruptStatus like Linux's vm_interrupt.
    fn wait_irq(&mut self, rx: bool, event: u16, timeout_ms: i32) -> Res<bool> {
        if self.arm_irq(rx, event) {
            return Ok(true);
        }
        let Some(signals) = wait_irq(&self.irq, timeout_ms)? else {
            return Ok(false);
        };
        self.c.waits += 1;
        self.c.irq_signals += signals;
        self.regs.ack_interrupt();
        Ok(true)
    }

    /// Re-arms the interrupt of `rx` or `tx` (used_event = `event`); true
    /// when used buffers arrived meanwhile, so there is no need to sleep.
    fn arm_irq(&mut self, rx: bool, event: u16) -> bool {
        let vq = if rx { &self.rx.vq } else { &self.tx.vq };
        vq.set_used_event(event);
        vq.used_idx() != vq.seen_used()
    }

    /// Takes an interrupt the device already raised, without sleeping
    /// (the single-threaded run, where the loop turned on this thread).
    fn take_irq(&mut self) -> Res<()> {
        match self.irq.read() {
            Ok(n) => {
                self.c.irq_signals += n;
                self.regs.ack_interrupt();
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(format!("irq eventfd read: {e}")),
        }
    }

    // ---- TX ----

    /// Loads `chains` into the TX slots (slot i gets chains[i % n]); TX
    /// must be idle.
    fn load_tx(&mut self, chains: &[Vec<u8>], frame_len: usize) -> Res<()> {
        if self.tx.in_flight() != 0 || chains.is_empty() {
            return Err("TX reloaded while busy".into());
        }
        for id in 0..self.tx.qsize() {
            let chain = &chains[usize::from(id) % chains.len()];
            self.mem
                .write_slice(chain, GuestAddress(tx_buf(id)))
                .map_err(gm)?;
            self.tx.set_desc(id, tx_buf(id), chain.len() as u32, 0);
        }
        self.tx.free = (0..self.tx.qsize()).rev().collect();
        self.tx_frame_len = frame_len as u64;
        Ok(())
    }

    /// Puts up to `limit` free TX slots in the ring and publishes them.
    fn tx_fill(&mut self, limit: usize) -> Res<()> {
        let mut n = 0;
        while n < limit && self.tx.push().is_some() {
            n += 1;
        }
        let kick = &self.kicks[self.tx.index as usize];
        self.tx.publish(kick, &mut self.c)
    }

    fn tx_reap(&mut self) -> Res<u64> {
        let mut n = 0;
        while let Some((_id, len)) = self.tx.pop_used()? {
            if len != 0 {
                return Err(format!("TX used length {len}, expected 0"));
            }
            n += 1;
        }
        self.c.packets += n;
        self.c.bytes += n * self.tx_frame_len;
        Ok(n)
    }

    /// Sleeps until about 3/4 of the TX frames in flight are done, as
    /// Linux's virtqueue_enable_cb_delayed asks.
    fn tx_wait(&mut self, timeout_ms: i32) -> Res<bool> {
        let bufs = (self.tx.in_flight() * 3 / 4) as u16;
        let event = self.tx.last_used().wrapping_add(bufs);
        self.wait_irq(false, event, timeout_ms)
    }

    /// Sends exactly the loaded chains of slots 0..n and waits for them.
    fn tx_send_once(&mut self, n: usize) -> Res<()> {
        self.tx_fill(n)?;
        let mut done = 0;
        while done < n as u64 {
            done += self.tx_reap()?;
            if done < n as u64 && !self.tx_wait(5000)? {
                return Err("TX frames not completed within 5 s: device stalled".into());
            }
        }
        Ok(())
    }

    // ---- RX ----

    /// Posts every free RX buffer and publishes them.
    fn rx_refill(&mut self) -> Res<()> {
        while self.rx.push().is_some() {}
        let kick = &self.kicks[self.rx.index as usize];
        self.rx.publish(kick, &mut self.c)
    }

    /// Takes every received frame; counts ours of `frame_len` bytes, and
    /// copies them out into `keep` if given.
    fn rx_reap(&mut self, frame_len: usize, mut keep: Option<&mut Vec<Vec<u8>>>) -> Res<u64> {
        let mut n = 0;
        let mut head = [0u8; VNET_HDR_LEN + UDP_HDRS];
        while let Some((id, len)) = self.rx.pop_used()? {
            n += 1;
            let len = len as usize;
            self.mem
                .read_slice(&mut head, GuestAddress(rx_buf(id, self.rx_buf_len)))
                .map_err(gm)?;
            let num_buffers = u16::from_le_bytes([head[10], head[11]]);
            if num_buffers != 1 {
                return Err(format!(
                    "a {len}-byte frame spans {num_buffers} buffers; expected 1"
                ));
            }
            if is_rx_frame(&head, len, frame_len) {
                self.c.packets += 1;
                self.c.bytes += frame_len as u64;
                if let Some(k) = keep.as_deref_mut() {
                    let mut f = vec![0u8; len];
                    self.mem
                        .read_slice(&mut f, GuestAddress(rx_buf(id, self.rx_buf_len)))
                        .map_err(gm)?;
                    k.push(f);
                }
            } else {
                self.c.other += 1;
            }
        }
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// One benchmark: the interface, its VMM thread, the driver, the direct tap.

struct Harness {
    driver: Driver,
    vmm: Vmm,
    vm_socks: HostSockets,
    direct: TapDevice,
    direct_socks: HostSockets,
}

/// Where the device loop turns.
enum Vmm {
    /// On its own thread, as in ringvm: the measured runs.
    Thread(VmmHandle),
    /// On the driver's thread, one turn at a time: the callgrind runs.
    Inline(Box<InlineVmm>),
}

impl Vmm {
    fn thread(&self) -> Res<&VmmHandle> {
        match self {
            Vmm::Thread(h) => Ok(h),
            Vmm::Inline(_) => Err("this run turns the VMM loop inline".into()),
        }
    }

    fn deferred_taskrun(&self) -> bool {
        match self {
            Vmm::Thread(h) => h.deferred_taskrun(),
            Vmm::Inline(v) => v.deferred_taskrun(),
        }
    }

    fn stop(self) -> Res<()> {
        match self {
            Vmm::Thread(h) => h.stop(),
            Vmm::Inline(_) => Ok(()),
        }
    }
}

/// Frames the single-threaded RX run keeps on their way to the guest: well
/// below the tap's 1000-frame queue and the 256 posted buffers, so none is
/// dropped and every turn has a frame to complete.
const INLINE_RX_BURST: u64 = 64;

impl Harness {
    /// The interface, its VMM loop (on its own thread, or turned inline by
    /// the driver if `inline`), the direct tap and both lanes' sockets; the
    /// driver declines the features in `declined`.
    fn new(rx_buf_len: u32, inline: bool, declined: u64) -> Res<Self> {
        // The direct tap first: same flags (TapDevice::open) and vnet
        // header size as ringvm's; its offloads follow the guest's below.
        let direct = TapDevice::open(DIRECT_LANE.tap).map_err(|e| e.to_string())?;
        let vm_socks = HostSockets::new(&VM_LANE)?;
        let direct_socks = HostSockets::new(&DIRECT_LANE)?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(|e| format!("guest memory: {e}"))?;
        let mut devices = DeviceManager::new().map_err(|e| e.to_string())?;
        let wiring = BenchWiring::default();
        let cfg = NetConfig {
            iface_id: "bench0".into(),
            host_dev_name: VM_LANE.tap.into(),
            guest_mac: Some(MacAddr::from_bytes(VM_LANE.peer_mac).map_err(|e| e.to_string())?),
            ..NetConfig::default()
        };
        let mut builder = VirtioBuilder::new();
        builder.add_net(&cfg).map_err(|e| e.to_string())?;
        let virtio = builder
            .place(&mut devices, &wiring)
            .map_err(|e| e.to_string())?;
        let irq = wiring
            .take_irq()
            .ok_or("the interface wired no interrupt line")?;
        let doorbells = wiring.take_doorbells();
        if doorbells.iter().map(|d| d.2).collect::<Vec<_>>() != [0, 1] {
            return Err("the interface did not wire one doorbell per queue".into());
        }
        let base = doorbells[0].1 - NOTIFY_REG_OFFSET;
        let kicks: Vec<EventFd> = doorbells.into_iter().map(|d| d.0).collect();
        let vmm = if inline {
            Vmm::Inline(Box::new(InlineVmm::new(virtio, &mem)?))
        } else {
            Vmm::Thread(VmmHandle::spawn(move || virtio, &mem)?)
        };
        let mut driver = Driver {
            rx: Vq::new(&mem, 0, RX_RINGS),
            tx: Vq::new(&mem, 1, TX_RINGS),
            mem,
            regs: MmioRegs {
                bus: devices.mmio.clone(),
                base,
            },
            kicks,
            irq,
            features: 0,
            mac: [0; 6],
            c: Counts::default(),
            tx_frame_len: 0,
            rx_buf_len,
            declined,
        };
        if let Err(e) = driver.init() {
            let _ = vmm.stop();
            return Err(e);
        }
        if driver.mac != VM_LANE.peer_mac {
            let _ = vmm.stop();
            return Err(format!(
                "the device's config space has MAC {}, configured {}",
                format_mac(driver.mac),
                format_mac(VM_LANE.peer_mac)
            ));
        }
        if let Err(e) = direct.set_offload(tap_offloads(driver.features)) {
            let _ = vmm.stop();
            return Err(e.to_string());
        }
        Ok(Self {
            driver,
            vmm,
            vm_socks,
            direct,
            direct_socks,
        })
    }

    /// Resets the device and brings it up again with RX buffers of
    /// `rx_buf_len` bytes.
    fn rebuffer(&mut self, rx_buf_len: u32) -> Res<()> {
        self.rebuffer_declining(rx_buf_len, 0)
    }

    /// [`Self::rebuffer`] with a driver that declines `declined` features.
    fn rebuffer_declining(&mut self, rx_buf_len: u32, declined: u64) -> Res<()> {
        let d = &mut self.driver;
        d.declined = declined;
        d.reset();
        d.rx = Vq::new(&d.mem, 0, RX_RINGS);
        d.tx = Vq::new(&d.mem, 1, TX_RINGS);
        d.rx_buf_len = rx_buf_len;
        d.c = Counts::default();
        d.init()
    }

    fn shutdown(self) -> Res<()> {
        if let Vmm::Thread(_) = self.vmm {
            self.driver.reset();
        }
        self.vmm.stop()
    }

    // ---- single-threaded runs, for callgrind ----

    /// Sends about `frames` frames of `w` with the VMM loop turned on this
    /// thread; TX as [`Self::ringvm_tx`] does it, RX from the host socket
    /// in bursts of [`INLINE_RX_BURST`].
    fn run_inline(&mut self, w: &Workload, frames: u64) -> Res<Value> {
        let Vmm::Inline(vmm) = &mut self.vmm else {
            return Err("the inline run needs an inline VMM loop".into());
        };
        let d = &mut self.driver;
        d.c = Counts::default();
        let t0 = vmm.turns();
        let mut turn = |d: &mut Driver| -> Res<()> {
            watchdog(120);
            vmm.turn().map_err(|e| format!("VMM loop turn: {e}"))?;
            d.take_irq()
        };
        match w.dir {
            Dir::Tx => {
                d.load_tx(&[tx_chain(&VM_LANE, w, 0)], w.frame_len)?;
                let qsize = usize::from(d.tx.qsize());
                loop {
                    if d.c.packets + (d.tx.in_flight() as u64) < frames {
                        d.tx_fill(qsize)?;
                    }
                    let got = d.tx_reap()?;
                    if d.c.packets >= frames && d.tx.in_flight() == 0 {
                        break;
                    }
                    if got == 0 {
                        let event =
                            d.tx.last_used()
                                .wrapping_add((d.tx.in_flight() * 3 / 4) as u16);
                        if !d.arm_irq(false, event) {
                            turn(d)?;
                        }
                    }
                }
            }
            Dir::Rx => {
                d.rx_refill()?;
                let data = payload(0, w.frame_len - UDP_HDRS);
                let mut sent = 0u64;
                while d.c.packets < frames {
                    while sent < (d.c.packets + d.c.other + INLINE_RX_BURST).min(frames) {
                        self.vm_socks
                            .source
                            .send(&data)
                            .map_err(|e| format!("RX send: {e}"))?;
                        sent += 1;
                    }
                    if d.rx_reap(w.frame_len, None)? > 0 {
                        d.rx_refill()?;
                    } else if !d.arm_irq(true, d.rx.last_used()) {
                        turn(d)?;
                    }
                }
            }
        }
        watchdog(0);
        Ok(json!({
            "point": w.key(),
            "requests": d.c.packets,
            "stray_frames": d.c.other,
            "turns": vmm.turns() - t0,
            "kicks": d.c.kicks,
        }))
    }

    // ---- correctness, before any measurement ----

    /// Eight UDP frames each way with distinct payloads, and four TSO
    /// segments (if asked), on both sides. Returns why TSO does not work,
    /// if it does not.
    fn verify(&mut self, tso: bool) -> Res<Option<String>> {
        const N: u64 = 8;
        let seqs: Vec<u64> = (1..=N).collect();
        let w = Workload {
            dir: Dir::Tx,
            frame_len: FRAME_MTU,
            tso: false,
            diag_buf: None,
            no_guest_gso: false,
        };
        // TX, ringvm.
        self.vm_socks.drain_sink()?;
        let chains: Vec<Vec<u8>> = seqs.iter().map(|&s| tx_chain(&VM_LANE, &w, s)).collect();
        self.driver.load_tx(&chains, w.frame_len)?;
        self.driver.tx_send_once(chains.len())?;
        self.vm_socks
            .expect_sink(&seqs, FRAME_MTU - UDP_HDRS)
            .map_err(|e| format!("ringvm TX check: {e}"))?;
        // TX, direct.
        self.direct_socks.drain_sink()?;
        for &s in &seqs {
            write_frame(self.direct.as_raw_fd(), &tx_chain(&DIRECT_LANE, &w, s))?;
        }
        self.direct_socks
            .expect_sink(&seqs, FRAME_MTU - UDP_HDRS)
            .map_err(|e| format!("direct TX check: {e}"))?;
        // RX, ringvm: datagrams from the host socket into guest buffers.
        let plen = FRAME_MTU - UDP_HDRS;
        for &s in &seqs {
            self.vm_socks
                .source
                .send(&payload(s, plen))
                .map_err(|e| format!("RX check send: {e}"))?;
        }
        let mut got = Vec::new();
        let until = Instant::now() + Duration::from_secs(2);
        while got.len() < seqs.len() && Instant::now() < until {
            if self.driver.rx_reap(FRAME_MTU, Some(&mut got))? > 0 {
                self.driver.rx_refill()?;
            } else {
                self.driver
                    .wait_irq(true, self.driver.rx.last_used(), 100)?;
            }
        }
        check_rx_frames(&got, &seqs, plen).map_err(|e| format!("ringvm RX check: {e}"))?;
        // RX, direct.
        for &s in &seqs {
            self.direct_socks
                .source
                .send(&payload(s, plen))
                .map_err(|e| format!("RX check send: {e}"))?;
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; VNET_HDR_LEN + 65550];
        let until = Instant::now() + Duration::from_secs(2);
        while got.len() < seqs.len() && Instant::now() < until {
            match read_frame(self.direct.as_raw_fd(), &mut buf, 100)? {
                Some(n) if is_rx_frame(&buf, n, FRAME_MTU) => got.push(buf[..n].to_vec()),
                _ => {}
            }
        }
        check_rx_frames(&got, &seqs, plen).map_err(|e| format!("direct RX check: {e}"))?;
        if !tso {
            return Ok(None);
        }
        // TSO: four 64 KiB segments each side; the host's TCP layer must
        // count them in, and the tap must not refuse them.
        let w = Workload {
            dir: Dir::Tx,
            frame_len: FRAME_TSO,
            tso: true,
            diag_buf: None,
            no_guest_gso: false,
        };
        let k0 = KernelSnap::read()?;
        self.driver
            .load_tx(&[tx_chain(&VM_LANE, &w, 0)], w.frame_len)?;
        self.driver.tx_send_once(4)?;
        std::thread::sleep(Duration::from_millis(50));
        let k1 = KernelSnap::read()?;
        let d = KernelDelta::between(&k0, &k1, &VM_LANE, &w);
        if d.tap_dropped > 0 || d.delivered < 4 {
            return Ok(Some(format!(
                "ringvm: of 4 TSO segments the tap refused {} and TCP counted {} in",
                d.tap_dropped, d.delivered
            )));
        }
        let chain = tx_chain(&DIRECT_LANE, &w, 0);
        for _ in 0..4 {
            if let Err(e) = write_frame(self.direct.as_raw_fd(), &chain) {
                return Ok(Some(format!("direct tap refused a TSO segment: {e}")));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        let k2 = KernelSnap::read()?;
        let d = KernelDelta::between(&k1, &k2, &DIRECT_LANE, &w);
        if d.delivered < 4 {
            return Ok(Some(format!(
                "direct: TCP counted {} of 4 TSO segments in",
                d.delivered
            )));
        }
        Ok(None)
    }

    // ---- measured runs ----

    fn ringvm_tx(&mut self, w: &Workload, warmup: f64, secs: f64) -> Res<Sample> {
        let d = &mut self.driver;
        d.load_tx(&[tx_chain(&VM_LANE, w, 0)], w.frame_len)?;
        d.c = Counts::default();
        let k0 = KernelSnap::read()?;
        let mut timer = Timer::new(warmup, secs);
        let qsize = usize::from(d.tx.qsize());
        loop {
            let closed = timer.result.is_some();
            if !closed {
                d.tx_fill(qsize)?;
            }
            let got = d.tx_reap()?;
            let closed = timer.tick(|| take_snap(d.c, Some(self.vmm.thread()?), None))?;
            if closed && d.tx.in_flight() == 0 {
                break;
            }
            if got == 0 && (d.tx.free.is_empty() || closed) && !d.tx_wait(10_000)? {
                return Err(
                    "no TX interrupt for 10 s with frames in flight: device stalled".into(),
                );
            }
        }
        // Let the last frames' softirq work finish before counting.
        std::thread::sleep(Duration::from_millis(20));
        let k1 = KernelSnap::read()?;
        let mut s = timer.take()?;
        s.run_packets = d.c.packets;
        s.kernel = KernelDelta::between(&k0, &k1, &VM_LANE, w);
        Ok(s)
    }

    fn ringvm_rx(&mut self, w: &Workload, warmup: f64, secs: f64) -> Res<Sample> {
        let d = &mut self.driver;
        d.c = Counts::default();
        d.rx_refill()?;
        let k0 = KernelSnap::read()?;
        let sender = SenderHandle::start(&self.vm_socks, w.frame_len - UDP_HDRS)?;
        let peer = sender.tid();
        let mut timer = Timer::new(warmup, secs);
        loop {
            let got = d.rx_reap(w.frame_len, None)?;
            if got > 0 {
                d.rx_refill()?;
                sender.flow.delivered(got);
            }
            if timer.tick(|| take_snap(d.c, Some(self.vmm.thread()?), Some(peer)))? {
                break;
            }
            if got == 0 && !d.wait_irq(true, d.rx.last_used(), 10_000)? {
                return Err("no RX interrupt for 10 s while the host was sending".into());
            }
        }
        let (sent, forgiven) = sender.stop()?;
        // Take what is still on its way, so it does not spill into the
        // next run.
        loop {
            if d.rx_reap(w.frame_len, None)? > 0 {
                d.rx_refill()?;
            } else if !d.wait_irq(true, d.rx.last_used(), 100)? {
                break;
            }
        }
        let k1 = KernelSnap::read()?;
        let mut s = timer.take()?;
        s.run_packets = d.c.packets;
        s.kernel = KernelDelta::between(&k0, &k1, &VM_LANE, w);
        s.sender_sent = sent;
        s.sender_forgiven = forgiven;
        Ok(s)
    }

    fn direct_tx(&mut self, w: &Workload, warmup: f64, secs: f64) -> Res<Sample> {
        let fd = self.direct.as_raw_fd();
        // As many separate frame buffers as the guest has TX slots, so
        // both sides touch the same amount of memory.
        let chains: Vec<Vec<u8>> = (0..QUEUE_SIZE)
            .map(|_| tx_chain(&DIRECT_LANE, w, 0))
            .collect();
        let mut next = 0usize;
        let mut c = Counts::default();
        let k0 = KernelSnap::read()?;
        let mut timer = Timer::new(warmup, secs);
        loop {
            for _ in 0..16 {
                let chain = &chains[next];
                next = (next + 1) % chains.len();
                // SAFETY: writes `chain.len()` bytes from a live buffer to
                // the tap fd we own.
                let n = unsafe { libc::write(fd, chain.as_ptr().cast(), chain.len()) };
                c.syscalls += 1;
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(format!("direct tap write: {e}"));
                    }
                    continue;
                }
                c.packets += 1;
                c.bytes += w.frame_len as u64;
            }
            if timer.tick(|| take_snap(c, None, None))? {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
        let k1 = KernelSnap::read()?;
        let mut s = timer.take()?;
        s.run_packets = c.packets;
        s.kernel = KernelDelta::between(&k0, &k1, &DIRECT_LANE, w);
        Ok(s)
    }

    fn direct_rx(&mut self, w: &Workload, warmup: f64, secs: f64) -> Res<Sample> {
        let fd = self.direct.as_raw_fd();
        // As many receive buffers as the guest posts, used in turn.
        let mut bufs: Vec<Vec<u8>> = (0..QUEUE_SIZE)
            .map(|_| vec![0u8; RX_BUF_MAX as usize])
            .collect();
        let mut next = 0usize;
        let mut c = Counts::default();
        let k0 = KernelSnap::read()?;
        let sender = SenderHandle::start(&self.direct_socks, w.frame_len - UDP_HDRS)?;
        let peer = sender.tid();
        let mut timer = Timer::new(warmup, secs);
        loop {
            let buf = &mut bufs[next];
            // SAFETY: reads at most `buf.len()` bytes into a live buffer
            // from the tap fd we own.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            c.syscalls += 1;
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        c.waits += 1;
                        c.syscalls += 1;
                        if !poll_in(fd, 10_000)? {
                            return Err("the direct tap got nothing for 10 s".into());
                        }
                    }
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(format!("direct tap read: {e}")),
                }
            } else if is_rx_frame(buf, n as usize, w.frame_len) {
                next = (next + 1) % usize::from(QUEUE_SIZE);
                c.packets += 1;
                c.bytes += w.frame_len as u64;
                sender.flow.delivered(1);
            } else {
                c.other += 1;
            }
            if timer.tick(|| take_snap(c, None, Some(peer)))? {
                break;
            }
        }
        let (sent, forgiven) = sender.stop()?;
        while read_frame(fd, &mut bufs[0], 100)?.is_some() {}
        let k1 = KernelSnap::read()?;
        let mut s = timer.take()?;
        s.run_packets = c.packets;
        s.kernel = KernelDelta::between(&k0, &k1, &DIRECT_LANE, w);
        s.sender_sent = sent;
        s.sender_forgiven = forgiven;
        Ok(s)
    }
}

fn poll_in(fd: RawFd, timeout_ms: i32) -> Res<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(true);
        }
        return Err(format!("poll: {e}"));
    }
    Ok(rc > 0)
}

/// One frame from a non-blocking tap, waiting up to `timeout_ms`.
fn read_frame(fd: RawFd, buf: &mut [u8], timeout_ms: i32) -> Res<Option<usize>> {
    loop {
        // SAFETY: reads at most `buf.len()` bytes into `buf` from `fd`.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => {
                if !poll_in(fd, timeout_ms)? {
                    return Ok(None);
                }
            }
            io::ErrorKind::Interrupted => {}
            _ => return Err(format!("tap read: {e}")),
        }
    }
}

fn write_frame(fd: RawFd, chain: &[u8]) -> Res<()> {
    // SAFETY: writes `chain.len()` bytes from a live slice to `fd`.
    let n = unsafe { libc::write(fd, chain.as_ptr().cast(), chain.len()) };
    if n < 0 {
        return Err(format!("tap write: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Checks received frames (vnet header + frame) carry exactly the
/// payloads of `seqs`.
fn check_rx_frames(got: &[Vec<u8>], seqs: &[u64], plen: usize) -> Res<()> {
    if got.len() != seqs.len() {
        return Err(format!("got {} of {} frames", got.len(), seqs.len()));
    }
    let mut left = seqs.to_vec();
    for f in got {
        let body = f.get(VNET_HDR_LEN + UDP_HDRS..).unwrap_or_default();
        let Some(pos) = left.iter().position(|&s| body == &payload(s, plen)[..]) else {
            return Err("a frame's payload does not match what the host sent".into());
        };
        left.swap_remove(pos);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The rest of the machine.

// ---------------------------------------------------------------------------
// Report.

/// The issue-14 target for 1514-byte frames both ways and TSO.
const RATIO_TARGET: f64 = 0.9;

struct Row {
    w: Workload,
    /// All rounds summed, for the breakdown tables.
    ringvm: Sample,
    direct: Sample,
    rounds: Vec<Round<Sample, Sample>>,
}

impl Row {
    fn new(w: Workload, rounds: Vec<Round<Sample, Sample>>) -> Self {
        let mut ringvm = Sample::default();
        let mut direct = Sample::default();
        for r in &rounds {
            ringvm.add(&r.ringvm);
            direct.add(&r.reference);
        }
        Self {
            w,
            ringvm,
            direct,
            rounds,
        }
    }

    /// ringvm against the direct tap, round by round, in packets/s.
    fn point(&self) -> Point {
        Point {
            bench: "net".into(),
            key: self.w.key(),
            unit: "pkt/s".into(),
            reference: "direct tap".into(),
            better: Better::Higher,
            rounds: self
                .rounds
                .iter()
                .map(|r| PointRound {
                    ringvm: r.ringvm.pps(),
                    reference: r.reference.pps(),
                    others_cpus: r.others_cpus,
                })
                .collect(),
            target: self.w.is_target().then(|| Target {
                ratio: RATIO_TARGET,
                source: "issue 14".into(),
            }),
            note: self
                .w
                .diag_buf
                .map(|_| if self.w.no_guest_gso {
                    "diagnostic: ringvm with a driver that declines guest GSO (Linux with GSO off) and posts 1536-byte buffers, each taking a whole frame; the direct figures are the RX 1514 B row's rounds".into()
                } else {
                    "diagnostic: ringvm with 64 KiB RX buffers; the direct figures are the RX 1514 B row's rounds".into()
                }),
        }
    }

    fn ratio(&self) -> Option<Spread> {
        self.point().ratio()
    }

    fn median_pps(&self, ringvm: bool) -> f64 {
        median(
            &self
                .rounds
                .iter()
                .map(|r| {
                    if ringvm {
                        r.ringvm.pps()
                    } else {
                        r.reference.pps()
                    }
                })
                .collect::<Vec<_>>(),
        )
    }

    /// The direct program's CPU per packet: its thread (plus, for RX, not
    /// the sender, shown apart).
    fn direct_cpu_us(&self) -> f64 {
        self.direct.us_per_pkt(self.direct.main_cpu_ns)
    }
}

/// "min–max" of the rounds' packet rates of one side.
fn spread(rates: impl Iterator<Item = f64>) -> String {
    let rates: Vec<f64> = rates.collect();
    Spread::of(&rates).map_or("-".into(), |s| {
        format!("{}–{}", fmt_pps(s.min), fmt_pps(s.max))
    })
}

fn fmt_ratio(s: Option<Spread>) -> (String, String) {
    s.map_or(("-".into(), "-".into()), |s| {
        (
            format!("{:.2}x", s.median),
            format!("{:.2}–{:.2}", s.min, s.max),
        )
    })
}

fn fmt_pps(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

struct Context {
    host: HostInfo,
    deferred_taskrun: bool,
    features: u64,
    tso_skipped: Option<String>,
    namespace: String,
}

const METHOD: &[&str] = &[
    "Device side: the real virtio-net `NetDevice` on a real tap (opened by `TapDevice::open` with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) + the virtio-mmio transport on the MMIO bus, in the real generic device slot (`VirtioDevices`), on its own thread turning one `Ring` (io_uring), as `Vmm::run` does for a booted guest. No KVM.",
    "Driver side: a split-virtqueue driver on the main thread, set up through the virtio-mmio v2 registers, negotiating what Linux's virtio_net takes (VERSION_1, EVENT_IDX, INDIRECT_DESC, MAC, STATUS, MRG_RXBUF, CSUM, GUEST_CSUM/TSO4/TSO6/ECN/UFO, HOST_TSO4/TSO6/ECN/UFO). Queues of 256. TX: one descriptor per frame holding the 12-byte virtio_net_hdr_v1 and the frame; all free slots are posted each round, kicks only when vring_need_event says so, and the driver sleeps on the irq eventfd with used_event set 3/4 of the in-flight frames ahead (virtqueue_enable_cb_delayed). RX: 256 posted buffers of 1536 bytes (Linux's mergeable-buffer size for a 1500 MTU), refilled after each harvest, used_event = last seen (interrupt on the next frame). On wake the driver reads and acks InterruptStatus like vm_interrupt.",
    "Network: a private namespace `ringvm-bench-<pid>` (ip netns add; deleted at the end, also on error), IPv6 off, two taps made with `ip tuntap add`: tapb0 169.254.77.1/24 (ringvm's; guest 169.254.77.2) and tapb1 169.254.78.1/24 (the direct program's; peer 169.254.78.2); static permanent neighbour entries for the guest/peer MACs; txqueuelen 1000. Only link-local addresses; nothing leaves the namespace.",
    "TX: UDP frames (checksum 0) from the guest/peer to the tap's own address, port 5001, where a UDP socket is bound and not read: the kernel runs the whole receive path (tap write -> netif_receive_skb -> IP -> UDP socket lookup -> enqueue, or drop with RcvbufErrors once the buffer is full). Frames are counted when the device answers the chain (ringvm) or write(2) returns (direct); the check column compares with the namespace's Udp InDatagrams + RcvbufErrors.",
    "TSO: one 65536-byte TCP/IPv4 frame (IP length 65522, MSS 1448) behind a header with NEEDS_CSUM + GSO_TCPV4, after HOST_TSO4 was negotiated. The tap builds one GSO skb of it; it is delivered locally, so nothing segments it in software (segmentation would only happen on forwarding). The segment carries RST|ACK to a port with no socket, so TCP takes it in (Tcp InSegs) and drops it without answering.",
    "RX: a host UDP socket on the tap's address sends datagrams (sendmmsg, 32 per call) to the guest/peer address; the kernel writes them to the tap with a vnet header (offloads set as the guest negotiated, via TUNSETOFFLOAD; the direct tap gets the same flags). The sender keeps at most 512 datagrams not yet received (below the tap's 1000-frame queue) and sleeps on an eventfd the receiver signals, so it never floods the tap and drops stay near zero; frames counted = frames of the right length and UDP port in guest buffers (ringvm) or from read(2) (direct).",
    "Host limit (direct): the same program, same namespace, same traffic, on tapb1 opened by TapDevice::open (same flags and vnet header size), one plain write(2) per TX frame and one read(2) per RX frame (poll when EAGAIN), on one thread. Each round runs both sides back to back (ringvm first in even rounds, direct first in odd ones) and gives one ratio ringvm packets/s / direct packets/s; the point's ratio is the median over rounds, with min–max beside it. The other columns sum all rounds' measured windows.",
    "VMM CPU: CLOCK_THREAD_CPUTIME of the VMM thread over the measured window / frames. io-wq CPU: schedstat run time of this process's iou-wrk threads over the window (work io_uring punts off the VMM thread; 0 means every tap read/write completed inline). Driver CPU: the synthetic guest's thread (the guest's share, not ringvm's). Sender CPU (RX): the host thread generating the traffic, on both sides.",
    "VMM syscalls: io_uring_enter calls counted around `Ring::turn` (one per turn) + read/write syscalls from /proc/self/task/<tid>/io (syscr+syscw; interrupts are written to the irqfd by the ring inside io_uring_enter, ring/irq.rs, so normally none). io_uring's own tap reads and writes are not syscalls. The direct side's syscalls are its write/read/poll calls.",
    "Gbit/s counts Ethernet frame bytes (header + payload, no FCS, no vnet header). Frame sizes: 64 B (UDP payload 22) and 1514 B (a full 1500-byte-MTU IP packet, UDP payload 1472).",
];

const BOUNDS: &[&str] = &[
    "This machine has 2 CPUs and is shared. ringvm needs two busy threads for TX (the guest driver and the VMM thread) and three for RX (host sender, VMM thread, guest driver), the direct program one for TX and two for RX; when the threads outnumber the CPUs, ringvm is bounded by scheduling, not by its own CPU per frame. The 'others' CPUs' column shows how much the rest of the machine took meanwhile.",
    "TX: the device pops the whole avail ring on a kick and submits one writev per frame, about 100 frames per io_uring_enter, and the kernel runs each tap write inline (io-wq CPU 0) up to the UDP socket, the same work the direct write(2) does. Where 'VMM thread busy' is near 1 CPU, the ratio is the ratio of CPU per frame: the VMM thread spends more per frame than write(2) (compare VMM CPU µs/pkt with direct CPU µs/pkt) on io_uring's per-op cost, the chain walk and the used-ring update. Where it is clearly below 1, the rest is idle time: the VMM thread sleeps after sending everything posted until the guest driver, woken once 3/4 of its frames are done, refills; that cross-CPU wake-up costs tens of µs on this nested VM, and a real guest pays it too (interrupt, then a QueueNotify exit).",
    "RX: the device keeps up to 4 readvs in flight, each on its own posted chains (with MRG_RXBUF, enough to cover a 65562-byte frame; neighbouring buffers share one iovec); chains a frame did not fill stay popped in the device for the next read, so each frame walks about one new chain. What remains per frame is rebuilding the iovec array for the next read, the chain walk and guest-memory lookup for the new chain, io_uring's iovec import and the used-ring update and interrupt; with 3 busy threads on 2 CPUs (host sender, VMM, guest driver) scheduling takes its share too.",
    "VMM instructions per frame (bench-callgrind, deterministic, user space only): TX 1514 B about 1160: the avail-ring and descriptor reads through virtio-queue and vm-memory about 250, the chain walk about 150, the drain and take about 190, the ring's submit, turn, dispatch and settle about 290, the batched used entry about 40. RX 1514 B about 2200: rx_fill about 600 of straight-line code (no hot loop: some 650 instructions each run about once per frame), the completion about 300, the chain walk and its descriptor reads about 400; with MRG_RXBUF a read covers posted chains worth a 65562-byte frame (about 43 buffers of 1536 bytes), and the chains a 1514-byte frame did not use stay in the finished read, iovecs and all, for the next read (Rx::leftovers), which appends only the chain(s) it needs. The diagnostic row (one 64 KiB buffer per read) is the no-gathering reference. Most of the VMM's CPU per frame is the kernel's tap write or read inside io_uring (the same work the direct program does): TX about 0.6-0.7 us/frame against write(2)'s 0.46-0.52.",
    "TX on a quiet machine: the direct writer reaches about 2.1M frames/s while ringvm's VMM thread is busy only about 0.7 of a CPU and the driver about 0.2: neither is saturated; the rest is the sleep/wake round trip per ring of frames (the VMM sleeps once everything posted is sent, the driver once 3/4 of its frames are in flight), about 1 sleep per 250-330 frames on each side. Polling the queue for a while before sleeping (the adaptive polling being added to the loop) is what would remove it; fewer instructions per frame do not.",
    "Wake-ups: each side of a virtqueue sleeps when idle; when the guest's and the VMM's threads take turns on the same CPU, each frame batch costs a cross-thread wake-up (doorbell eventfd -> io_uring, irqfd -> driver), which a real guest pays as well (ioeventfd exit, interrupt injection).",
];

/// Changes kept for issue 14, with their before/after (the commits carry
/// the full figures).
const CHANGES: &[&str] = &[
    "The VMM thread polls the request queues (here TX) before it sleeps (vmm/src/ring/poll.rs, --poll-max-us, adaptive up to 100 µs; not for RX-only traffic, where spinning for the tap's completions took the CPU the sender and the driver need: RX 1514 B 0.66x -> 0.57x when it did). Same quiet hour, 3 rounds each, RINGVM_BENCH_POLL_MAX_US=0 against the default: TX 1514 B 0.46x (0.46-0.47) -> 0.54x (0.52-0.57), 0.012 -> 0.008 syscalls/frame; RX 1514 B 0.60x (0.59-0.63) -> 0.61x (0.59-0.61), unchanged. With QEMU's 32 µs maximum TX stayed at 0.45x.",
    "RX keeps a finished read's unused chains and their iovecs for the next read instead of gathering ~43 chains again per frame: VMM instructions/frame (callgrind) rx-1514 9341 -> 3066; RX 1514 B ratio median 0.52x (main) -> 0.81x (0.67-0.85, 3 rounds), the no-gathering diagnostic row 1.01x in the same run.",
    "a4cc4ba (one-buffer tap reads and writes as IORING_OP_READ/WRITE, no iovec import) against its parent c5f9c8a: user-space instructions/frame unchanged (tx-1514 2301 -> 2312, rx-1514 3172 -> 3188: what it saves is kernel work, which callgrind does not count); bench-net, 5 rounds each, back to back with others' CPUs at 1.5 of 2: TX 1514 B 0.64x (0.34-0.68) -> 0.63x (0.61-0.66), VMM CPU 0.71 -> 0.64 us/frame; RX 1514 B 0.71x (0.68-1.12) -> 0.64x (0.62-1.13), VMM CPU 0.97 -> 1.01 us/frame: the ratios move within their noise, TX CPU per frame drops ~10%.",
    "TX in-flight table indexed by the chain's head (net/tx_slots.rs) instead of the generic table's scan for a free slot (about a hundred slots scanned per frame with a batch in flight): callgrind tx-1514 2312 -> 1445; bench-net TX 1514 B (3 rounds, loaded machine) VMM CPU 0.85 -> 0.64 us/frame, ratio 0.54x (0.52-0.69), VMM thread busy 0.70 (the ratio is bounded by wake-ups and the other threads here, see below).",
    "RX leftover reads drop delivered chains from the front of a VecDeque and skip spent iovecs by an index, with the capacity kept by subtraction (the Vec drain moved ~40 chains and their iovecs per frame, and the capacity was summed again): callgrind rx-1514 3087 -> 2673.",
    "frame::walk maps a buffer inside one region of plain guest memory with one region lookup, without vm-memory's slice iterator: callgrind tx-1514 1445 -> 1400, rx-1514 2673 -> 2621.",
    "Used entries batched (Virtqueues::add_used_batched, virtio/used_batch.rs; net's TX and RX completions use it): each entry is two stores through the used ring's host mapping found at activation, used.idx is stored once per turn before the interrupt decision, and the EVENT_IDX decision covers every entry since the last decision (virtio-queue's own count misses batched ones): callgrind tx-1514 1400 -> 1151, rx-1514 2621 -> 2387. A first version that read used_event through vm-memory's load measured tx 1318 / rx 2667 (RX worse: the extra generic instantiation changed the inlining of vm-memory's shared paths) and was replaced by the host-mapping read.",
    "RX num_buffers written through the first chain's host iovec (vm-memory's write path only as a fallback): callgrind rx-1514 2387 -> 2203.",
    "All of the above together, against a4cc4ba: callgrind tx-1514 2312 -> 1161 (-50%), rx-1514 3188 -> 2203 (-31%), tx-tso-65536 2312 -> 1161. bench-net, 5 rounds each, back to back: loaded machine (others' CPUs 1.5) TX 0.63x (0.61-0.66) -> 0.69x (0.60-0.72), VMM CPU 0.64 -> 0.58 us/frame, RX 0.64x (0.62-1.13) -> 0.67x (0.60-0.76), 1.01 -> 0.91 us/frame (before the num_buffers change); quieter machine (others' CPUs 0.0-0.7) TX 0.45x (0.43-0.46) -> 0.47x (0.45-0.54), VMM CPU 0.77 -> 0.69 us/frame with the VMM thread busy 0.71 of a CPU, RX 0.61x (0.57-0.65) -> 0.61x (0.54-0.71), 1.27 -> 0.94 us/frame. TSO 64 KiB (3 rounds): 0.95x (0.92-0.98) -> 0.82x (0.74-0.95), VMM CPU 4.06 -> 3.67 us/frame against direct 4.07 / 3.69: at parity on CPU, the ratio moved with the load.",
    "After merging main's adaptive polling (17f0db3), against that main: callgrind tx-1514 2203 -> 1190, rx-1514 3087 -> 2286; bench-net 5 rounds each, back to back, others' CPUs 1.1: TX 1514 B 0.63x (0.52-0.79) -> 0.61x (0.35-0.84), RX 1514 B 0.70x (0.37-1.11) -> 0.78x (0.58-1.05); VMM CPU 0.63 -> 0.62 (TX) and 1.02 -> 1.02 (RX) us/frame, which with polling includes the thread's spinning and no longer measures work per frame alone. On this shared 2-CPU machine the ratios' spread is wider than what the instructions saved can move.",
    "RX through io_uring provided buffers and one multishot tap read (devices/src/virtio/net/rx_provided.rs, devices/src/buf_ring.rs; kept, and the path a device takes when the guest's RX chains each hold a whole frame): posted chains that are one host range of at least 12 + MTU + 18 bytes (12 + 65550 with guest GSO) are published in the device's buffer ring (buffer id = head), registered before the lockdown, and the kernel picks the buffer per frame: no read built or submitted per frame. A tap read fills exactly one provided buffer, so a guest with MRG_RXBUF and guest GSO (Linux's default: 1536-byte mergeable buffers, frames up to 64 KiB) keeps the readv path, which gathers several chains per read. Measured on the diagnostic row rx-1514-nogso (a driver without guest GSO posting 1536-byte buffers), 4 interleaved pairs, RINGVM_BENCH_NET_PBUF=0 (rings not registered: readv) against the default: ratio 0.625x (0.57-0.72) -> 0.835x (0.75-1.01), VMM CPU 1.54 -> 0.855 us/frame, syscalls 0.39 -> 0.014/frame, 110-124 frames per turn; 65562-byte buffers 0.595x -> 0.815x. callgrind: rx-1514-nogso 1552 instructions/frame against 2290 on the readv path (rx-1514). The readv path itself costs +1.6% (2254 -> 2290) and TX +1.2% (1171 -> 1185) for the CQE flags carried to the device, after the readv path learned to skip the provided path's bookkeeping (2475 -> 2290, 1257 -> 1185). A real guest (vtest's net.provided_buffers, 2048-byte buffers) takes the path: every one of its 24 replies counted in rx_provided_packets.",
];

const QEMU_NOTE: &str = "QEMU side-by-side: not run. This machine's KVM is PVM-native (guest code runs in KVM's instruction emulator at ~1.6 us/instruction), so a QEMU guest's network figures would measure the emulator, not QEMU's virtio-net/vhost path; a fake figure would be worse than none. The comparison here is against the host limit (the same frames on a tap read and written directly) instead.";

fn settings(ctx: &Context, args: &Args) -> String {
    format!(
        "Kernel {}, {} x {}, io_uring DEFER_TASKRUN: {}. Namespace `{}`. Each point: {} rounds of ringvm and the direct tap back to back ({} s measured per side after {} s warm-up), the order alternating. Negotiated features {:#x}; RX buffers posted: {} B. Load average at the start: {}.",
        ctx.host.kernel,
        ctx.host.cpus,
        ctx.host.cpu,
        if ctx.deferred_taskrun { "yes" } else { "no" },
        ctx.namespace,
        args.rounds,
        args.seconds,
        args.warmup,
        ctx.features,
        args.rx_buffer,
        ctx.host.loadavg,
    )
}

fn markdown(rows: &[Row], ctx: &Context, args: &Args) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# ringvm virtio-net vs the same traffic on a tap, direct, same run\n"
    );
    let _ = writeln!(s, "{}\n", settings(ctx, args));
    let _ = writeln!(
        s,
        "| point | ringvm pkt/s | ringvm Gbit/s | direct tap pkt/s | direct Gbit/s | ratio (median) | min–max | others' CPUs | VMM CPU µs/pkt | VMM syscalls/pkt | direct CPU µs/pkt | direct syscalls/pkt |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let (ratio, range) = fmt_ratio(r.ratio());
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {} | {:.2} | {} | {} | {} | {:.2} | {:.3} | {:.2} | {:.2} |",
            r.w.label(),
            fmt_pps(r.median_pps(true)),
            r.ringvm.gbps(),
            fmt_pps(r.median_pps(false)),
            r.direct.gbps(),
            ratio,
            range,
            r.point()
                .others()
                .map_or("-".into(), |o| format!("{:.2}", o.median)),
            r.ringvm.us_per_pkt(r.ringvm.vmm_cpu_ns),
            r.ringvm.per_pkt(r.ringvm.vmm_syscalls()),
            r.direct_cpu_us(),
            r.direct.per_pkt(r.direct.direct_syscalls),
        );
    }
    if let Some(why) = &ctx.tso_skipped {
        let _ = writeln!(s, "\nTSO 64 KiB: skipped. {why}");
    }
    let _ = writeln!(
        s,
        "\nRound-to-round spread (pkt/s, each run alone); this machine is shared, so single runs move by tens of percent:\n"
    );
    let _ = writeln!(s, "| point | ringvm runs | direct runs |");
    let _ = writeln!(s, "|---|---|---|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            r.w.label(),
            spread(r.rounds.iter().map(|x| x.ringvm.pps())),
            spread(r.rounds.iter().map(|x| x.reference.pps()))
        );
    }
    if rows.iter().any(|r| r.w.diag_buf.is_some()) {
        let _ = writeln!(
            s,
            "\nThe diagnostic row is ringvm only, with the device reset and brought up again with {RX_BUF_MAX}-byte RX buffers (one per tap read); its direct figures are the RX 1514 B row's (the direct reader does not depend on the guest's buffers). It shows what the device's buffer gathering costs; Linux posts MTU-sized mergeable buffers, as the main rows do."
        );
    }
    let _ = writeln!(s, "\n## Where ringvm's time and wake-ups go (per frame)\n");
    let _ = writeln!(
        s,
        "| point | VMM thread busy (CPUs) | frames/turn | io_uring_enter | irq writes | other r/w | VMM sleeps | io-wq CPU µs | driver kicks | driver sleeps | driver CPU µs | host sender CPU µs (ringvm / direct) |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let g = &r.ringvm;
        let sender = if r.w.dir == Dir::Rx {
            format!(
                "{:.2} / {:.2}",
                g.us_per_pkt(g.peer_cpu_ns),
                r.direct.us_per_pkt(r.direct.peer_cpu_ns)
            )
        } else {
            "-".into()
        };
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.1} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.3} | {:.3} | {:.2} | {} |",
            r.w.label(),
            g.vmm_cpu_ns as f64 / 1e9 / g.seconds.max(1e-9),
            g.packets as f64 / g.turns.max(1) as f64,
            g.per_pkt(g.turns),
            g.per_pkt(g.syscw),
            g.per_pkt(g.syscr),
            g.per_pkt(g.vmm_sleeps),
            g.us_per_pkt(g.iowq_cpu_ns),
            g.per_pkt(g.kicks),
            g.per_pkt(g.driver_waits),
            g.us_per_pkt(g.main_cpu_ns),
            sender,
        );
    }
    let _ = writeln!(
        s,
        "\n## Where the frames went (whole runs, warm-up included)\n"
    );
    let _ = writeln!(
        s,
        "| point | side | frames counted | kernel saw | tap drops | sender sent | sender gave up on | stray frames |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        for (side, g) in [("ringvm", &r.ringvm), ("direct", &r.direct)] {
            let (sent, gave_up) = if r.w.dir == Dir::Rx {
                (g.sender_sent.to_string(), g.sender_forgiven.to_string())
            } else {
                ("-".into(), "-".into())
            };
            let _ = writeln!(
                s,
                "| {} | {side} | {} | {} | {} | {sent} | {gave_up} | {} |",
                r.w.label(),
                g.run_packets,
                g.kernel.delivered,
                g.kernel.tap_dropped,
                g.other,
            );
        }
    }
    let _ = writeln!(
        s,
        "\nkernel saw: TX = Udp InDatagrams + RcvbufErrors (TSO: Tcp InSegs, one per 64 KiB GSO segment: nothing segments it on local delivery); RX = frames the kernel queued to the tap."
    );
    let _ = writeln!(
        s,
        "\n## Target (issue 14): median ratio >= {RATIO_TARGET} for 1514-byte frames both ways and for TSO\n"
    );
    let _ = writeln!(s, "| point | ratio (median) | min–max | target |");
    let _ = writeln!(s, "|---|---:|---|---|");
    for r in rows.iter().filter(|r| r.w.is_target()) {
        let (ratio, range) = fmt_ratio(r.ratio());
        let _ = writeln!(
            s,
            "| {} | {ratio} | {range} | {} |",
            r.w.label(),
            if r.point().target_met() == Some(true) {
                "met"
            } else {
                "MISSED"
            }
        );
    }
    let _ = writeln!(s, "## Changes kept (issue 14)\n");
    for c in CHANGES {
        let _ = writeln!(s, "- {c}");
    }
    let _ = writeln!(s);
    report::notes_markdown(&mut s, BOUNDS, METHOD, QEMU_NOTE);
    s
}

fn sample_json(g: &Sample) -> Value {
    json!({
        "seconds": g.seconds,
        "packets": g.packets,
        "frame_bytes": g.bytes,
        "packets_per_s": g.pps(),
        "gbit_per_s": g.gbps(),
        "main_thread_cpu_us_per_pkt": g.us_per_pkt(g.main_cpu_ns),
        "host_sender_cpu_us_per_pkt": g.us_per_pkt(g.peer_cpu_ns),
        "vmm_cpu_us_per_pkt": g.us_per_pkt(g.vmm_cpu_ns),
        "iowq_cpu_us_per_pkt": g.us_per_pkt(g.iowq_cpu_ns),
        "iowq_threads": g.iowq_threads,
        "vmm_syscalls_per_pkt": g.per_pkt(g.vmm_syscalls()),
        "io_uring_enter": g.turns,
        "irq_writes": g.syscw,
        "other_read_syscalls": g.syscr,
        "vmm_sleeps": g.vmm_sleeps,
        "driver_kicks": g.kicks,
        "driver_sleeps": g.driver_waits,
        "irq_signals_seen_by_driver": g.irq_signals,
        "direct_syscalls": g.direct_syscalls,
        "direct_syscalls_per_pkt": g.per_pkt(g.direct_syscalls),
        "stray_frames": g.other,
        "whole_runs": {
            "frames_counted": g.run_packets,
            "kernel_saw": g.kernel.delivered,
            "tap_dropped": g.kernel.tap_dropped,
            "sender_sent": g.sender_sent,
            "sender_gave_up_on": g.sender_forgiven,
        },
    })
}

fn json_report(rows: &[Row], ctx: &Context, args: &Args) -> Value {
    let results: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "point": r.w.key(),
                "label": r.w.label(),
                "direction": if r.w.dir == Dir::Tx { "tx" } else { "rx" },
                "frame_bytes": r.w.frame_len,
                "tso": r.w.tso,
                "ratio": r.ratio().map(|x| x.json()),
                "ringvm": sample_json(&r.ringvm),
                "direct": sample_json(&r.direct),
                "rounds": r.rounds.iter().map(|x| json!({
                    "ringvm_first": x.ringvm_first,
                    "others_cpus": x.others_cpus,
                    "ringvm": sample_json(&x.ringvm),
                    "direct": sample_json(&x.reference),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let targets: Vec<Value> = rows
        .iter()
        .filter(|r| r.w.is_target())
        .map(|r| json!({"point": r.w.key(), "ratio": r.ratio().map(|x| x.median), "met": r.point().target_met()}))
        .collect();
    json!({
        "benchmark": "bench-net",
        "summary": summary_json(
            "virtio-net vs the same frames on a tap, direct",
            &settings(ctx, args),
            &CHANGES.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        ),
        "host": ctx.host.json(ctx.deferred_taskrun),
        "points": rows.iter().map(|r| r.point().json()).collect::<Vec<_>>(),
        "config": {
            "seconds_per_run": args.seconds,
            "rounds": args.rounds,
            "warmup_seconds": args.warmup,
            "namespace": ctx.namespace,
            "negotiated_features": format!("{:#x}", ctx.features),
            "queue_size": QUEUE_SIZE,
            "rx_buffer_bytes": args.rx_buffer,
            "rx_window": RX_WINDOW,
            "ringvm_tap": {"name": VM_LANE.tap, "host": ip4(VM_LANE.host_ip).to_string(), "guest": ip4(VM_LANE.peer_ip).to_string()},
            "direct_tap": {"name": DIRECT_LANE.tap, "host": ip4(DIRECT_LANE.host_ip).to_string(), "peer": ip4(DIRECT_LANE.peer_ip).to_string()},
        },
        "tso_skipped": ctx.tso_skipped,
        "targets": {"ratio_min": RATIO_TARGET, "points": targets},
        "results": results,
        "method": METHOD,
        "bounds": BOUNDS,
        "changes": CHANGES,
        "qemu": QEMU_NOTE,
    })
}

// ---------------------------------------------------------------------------

fn measure(h: &mut Harness, args: &Args, ctx: &mut Context) -> Res<Vec<Row>> {
    let tso_skipped = h.verify(!args.no_tso)?;
    eprintln!("bench-net: frames checked both ways on both taps");
    if let Some(why) = &tso_skipped {
        eprintln!("bench-net: TSO point skipped: {why}");
    }
    let points: Vec<Workload> = workloads(args.no_tso || tso_skipped.is_some())
        .into_iter()
        .filter(|w| args.selects(&w.key()))
        .collect();
    ctx.tso_skipped = tso_skipped;
    let mut rows = Vec::new();
    for w in points {
        // Both sides are methods of the one harness.
        let cell = RefCell::new(&mut *h);
        let rounds = interleave(
            args.rounds,
            Own::Process,
            |_| {
                let mut h = cell.borrow_mut();
                match w.dir {
                    Dir::Tx => h.ringvm_tx(&w, args.warmup, args.seconds),
                    Dir::Rx => h.ringvm_rx(&w, args.warmup, args.seconds),
                }
            },
            |_| {
                let mut h = cell.borrow_mut();
                match w.dir {
                    Dir::Tx => h.direct_tx(&w, args.warmup, args.seconds),
                    Dir::Rx => h.direct_rx(&w, args.warmup, args.seconds),
                }
            },
        )?;
        let row = Row::new(w, rounds);
        let (ratio, range) = fmt_ratio(row.ratio());
        eprintln!(
            "  {:22} ringvm {:>8} pkt/s {:6.2} Gbit/s  direct {:>8} pkt/s {:6.2} Gbit/s  {} ({})  VMM {:.2} µs/pkt {:.3} syscalls/pkt",
            row.w.label(),
            fmt_pps(row.median_pps(true)),
            row.ringvm.gbps(),
            fmt_pps(row.median_pps(false)),
            row.direct.gbps(),
            ratio,
            range,
            row.ringvm.us_per_pkt(row.ringvm.vmm_cpu_ns),
            row.ringvm.per_pkt(row.ringvm.vmm_syscalls()),
        );
        rows.push(row);
    }
    // Diagnostic: the same RX traffic into buffers that each hold a whole
    // 64 KiB frame, so every tap read takes one buffer instead of the
    // dozens the device gathers with MTU-sized ones. The direct side does
    // not depend on the guest's buffers: its figures are the RX row's,
    // round by round.
    let base = rows
        .iter()
        .position(|r| r.w.dir == Dir::Rx && r.w.frame_len == FRAME_MTU);
    if let (Some(base), false, true) = (base, args.no_diagnostic, args.rx_buffer < RX_BUF_MAX) {
        h.rebuffer(RX_BUF_MAX)?;
        let w = Workload {
            diag_buf: Some(RX_BUF_MAX),
            ..rows[base].w
        };
        let row = diagnostic_rx_row(h, &rows[base], w, args)?;
        eprintln!(
            "  {} ringvm {} pkt/s {:.2} Gbit/s, VMM {:.2} µs/pkt",
            row.w.label(),
            fmt_pps(row.median_pps(true)),
            row.ringvm.gbps(),
            row.ringvm.us_per_pkt(row.ringvm.vmm_cpu_ns),
        );
        rows.push(row);
    }
    // Diagnostic: a driver without guest GSO (Linux with GSO off) posting
    // 1536-byte buffers: every buffer holds a whole frame, the case the
    // device's provided-buffer RX path serves.
    if let (Some(base), false) = (base, args.no_diagnostic) {
        h.rebuffer_declining(RX_BUF_LEN, GUEST_GSO_FEATURES)?;
        let w = Workload {
            diag_buf: Some(RX_BUF_LEN),
            no_guest_gso: true,
            ..rows[base].w
        };
        let row = diagnostic_rx_row(h, &rows[base], w, args)?;
        let (ratio, range) = fmt_ratio(row.ratio());
        eprintln!(
            "  {} ringvm {} pkt/s {:.2} Gbit/s, VMM {:.2} µs/pkt {:.3} syscalls/pkt, {} ({})",
            row.w.label(),
            fmt_pps(row.median_pps(true)),
            row.ringvm.gbps(),
            row.ringvm.us_per_pkt(row.ringvm.vmm_cpu_ns),
            row.ringvm.per_pkt(row.ringvm.vmm_syscalls()),
            ratio,
            range,
        );
        rows.push(row);
    }
    Ok(rows)
}

fn run(args: &Args) -> Res<()> {
    if args.seconds <= 0.0 || args.warmup < 0.0 || args.rounds == 0 {
        return Err("--seconds must be > 0, --warmup >= 0 and --rounds > 0".into());
    }
    let out_dir = report::out_dir(args.out.as_deref())?;
    if !std::path::Path::new(devices::virtio::net::tap::TUN_PATH).exists() {
        return Err(format!(
            "{} is missing: this kernel has no tun/tap support",
            devices::virtio::net::tap::TUN_PATH
        ));
    }
    let ns = Netns::create("ringvm-bench-")?;
    let mut ctx = Context {
        host: HostInfo::read(),
        deferred_taskrun: false,
        features: 0,
        tso_skipped: None,
        namespace: ns.name.clone(),
    };
    // Single-threaded until here: every thread started from now on
    // (VMM, sender, io-wq workers) and every `ip` child inherits the
    // namespace.
    ns.enter()?;
    setup_namespace(&ns)?;
    eprintln!(
        "bench-net: namespace {} with {} ({}/24) for ringvm and {} ({}/24) for the direct host limit",
        ns.name,
        VM_LANE.tap,
        ip4(VM_LANE.host_ip),
        DIRECT_LANE.tap,
        ip4(DIRECT_LANE.host_ip)
    );
    if let Some(frames) = args.callgrind_requests {
        let outcome = callgrind_runs(args, frames);
        drop(ns);
        return outcome;
    }
    let mut h = Harness::new(args.rx_buffer, false, 0)?;
    ctx.features = h.driver.features;
    let measured = measure(&mut h, args, &mut ctx);
    ctx.deferred_taskrun = h.vmm.deferred_taskrun();
    let stopped = h.shutdown();
    let rows = measured?;
    stopped?;
    drop(ns);
    let md = markdown(&rows, &ctx, args);
    let report = json_report(&rows, &ctx, args);
    report::write(&out_dir, "net", "bench-net", &md, &report)
}

/// A diagnostic RX row: ringvm alone with `w`'s buffers, one run per
/// round of `base` (the RX row), whose direct figures it reuses: the
/// direct reader does not depend on the guest's buffers.
fn diagnostic_rx_row(h: &mut Harness, base: &Row, w: Workload, args: &Args) -> Res<Row> {
    let mut rounds = Vec::new();
    for r in &base.rounds {
        let cpu0 = HostCpu::sample(Own::Process)?;
        let ringvm = h.ringvm_rx(&w, args.warmup, args.seconds)?;
        rounds.push(Round {
            ringvm,
            reference: r.reference,
            ringvm_first: true,
            others_cpus: HostCpu::sample(Own::Process)?.others_since(&cpu0),
        });
    }
    Ok(Row::new(w, rounds))
}

/// The selected points, each run inline for about `frames` frames, one
/// JSON line each (what `make bench-callgrind` runs under valgrind). The
/// no-GSO RX point gets an interface of its own, activated by a driver
/// that declines guest GSO from the start (the inline loop cannot serve a
/// reset while the driver waits for it).
fn callgrind_runs(args: &Args, frames: u64) -> Res<()> {
    let main: Vec<Workload> = workloads(args.no_tso)
        .into_iter()
        .filter(|w| args.selects(&w.key()))
        .collect();
    if !main.is_empty() {
        let mut h = Harness::new(args.rx_buffer, true, 0)?;
        let outcome = main.iter().try_for_each(|w| {
            println!("{}", h.run_inline(w, frames)?);
            Ok(())
        });
        let stopped = h.shutdown();
        outcome.and(stopped)?;
    }
    let nogso = Workload {
        dir: Dir::Rx,
        frame_len: FRAME_MTU,
        tso: false,
        diag_buf: Some(RX_BUF_LEN),
        no_guest_gso: true,
    };
    if args.selects(&nogso.key()) {
        let mut h = Harness::new(RX_BUF_LEN, true, GUEST_GSO_FEATURES)?;
        let outcome = h.run_inline(&nogso, frames).map(|v| println!("{v}"));
        let stopped = h.shutdown();
        outcome.and(stopped)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "bench-net: must run as root: it creates a network namespace (ip netns add) and taps in it, and opens them with TUNSETIFF (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
        );
        return ExitCode::from(1);
    }
    report::exit("bench-net", run(&args))
}
