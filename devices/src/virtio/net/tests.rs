//! Device-level tests: the shared driver-side queue mock on one side, a
//! socketpair standing in for the tap on the other, and a fake ring that
//! runs tap I/O the way io_uring does: writes at once, reads parked until
//! a frame is there, and a read reports a frame's full length even when
//! the buffers were shorter (as a tap does).

use std::os::fd::{AsRawFd, OwnedFd};

use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MQ};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::tap::fake::FakeTap;
use super::*;
use crate::io::fake::{CountingLine, PanicIo, RecordingIo};
use crate::io::{IoOp, IoSubmit, IoSubmitError, TAG_MAX};
use crate::virtio::testing::{transport_event, DriverQueue};
use crate::virtio::{
    feature, Activation, DeviceError, ProcessOutcome, TransportEvent, VirtioDevice,
    VirtioDeviceInfo, INT_CONFIG,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const QSIZE: u16 = 16;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;
const MAC: MacAddr = MacAddr([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
/// Everything but MRG_RXBUF and EVENT_IDX: one chain per frame, and every
/// used buffer interrupts.
const PLAIN: u64 = FEATURES & !F_MRG_RXBUF & !crate::virtio::F_EVENT_IDX;
const MRG: u64 = PLAIN | F_MRG_RXBUF;

/// Guest memory layout: rings, then buffer areas.
const RX_RINGS: u64 = 0x0;
const TX_RINGS: u64 = 0x4000;
fn rx_buf(n: u64) -> u64 {
    0x1_0000 + n * 0x1000
}
fn tx_buf(n: u64) -> u64 {
    0x3_0000 + n * 0x1000
}
/// Room for one 64 KiB-plus chain.
const BIG: u64 = 0x5_0000;

fn memory() -> GuestMemoryMmap {
    // Two regions, so buffers can straddle a region boundary at 0x8_0000.
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x8_0000),
        (GuestAddress(0x8_0000), 0x8_0000),
    ])
    .expect("guest memory")
}

/// The driver's side of one split queue (shared mock).
type Vq = DriverQueue<GuestMemoryMmap>;

fn info<T: Tap + 'static>(dev: &NetDevice<T>) -> VirtioDeviceInfo {
    VirtioDevice::<GuestMemoryMmap>::info(dev)
}

/// A ring stand-in with io_uring's behaviour on a tap.
#[derive(Debug, Default)]
struct TapIo {
    ops: Vec<(IoOp, u64)>,
    parked: Vec<(IoOp, u64)>,
    done: Vec<(u64, i32)>,
    full: bool,
}

fn errno_res(ret: isize) -> i32 {
    if ret < 0 {
        -std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        i32::try_from(ret).unwrap_or(i32::MAX)
    }
}

impl TapIo {
    /// Completes every parked read whose socket has a frame.
    fn pump(&mut self) {
        let parked = std::mem::take(&mut self.parked);
        for (op, tag) in parked {
            let IoOp::Readv {
                fd, iovecs, iovcnt, ..
            } = op
            else {
                continue;
            };
            // SAFETY: msghdr is plain old data.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iovecs.cast_mut();
            msg.msg_iovlen = iovcnt as usize;
            // SAFETY: the device keeps the iovecs and buffers alive until
            // the completion (submit's contract); MSG_TRUNC makes the call
            // report the whole frame's length, as a tap read does.
            let ret = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
            let res = errno_res(ret);
            if res == -libc::EAGAIN {
                self.parked.push((op, tag));
            } else {
                self.done.push((tag, res));
            }
        }
    }

    /// Cancels a parked op, as IORING_OP_ASYNC_CANCEL would.
    fn cancel(&mut self, tag: u64) -> bool {
        let before = self.parked.len();
        self.parked.retain(|&(_, t)| t != tag);
        let found = self.parked.len() != before;
        if found {
            self.done.push((tag, -libc::ECANCELED));
        }
        found
    }

    fn reads(&self) -> usize {
        self.ops
            .iter()
            .filter(|(op, _)| matches!(op, IoOp::Readv { .. }))
            .count()
    }
}

impl IoSubmit for TapIo {
    unsafe fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), IoSubmitError> {
        if tag > TAG_MAX {
            return Err(IoSubmitError::BadTag(tag));
        }
        if self.full {
            return Err(IoSubmitError::QueueFull);
        }
        self.ops.push((op, tag));
        match op {
            IoOp::Writev {
                fd,
                iovecs,
                iovcnt,
                offset,
            } => {
                assert_eq!(offset, u64::MAX, "tap writes are stream writes");
                // SAFETY: submit's contract keeps the iovecs valid.
                let ret = unsafe { libc::writev(fd, iovecs, iovcnt as i32) };
                self.done.push((tag, errno_res(ret)));
            }
            IoOp::Readv { offset, .. } => {
                assert_eq!(offset, u64::MAX, "tap reads are stream reads");
                self.parked.push((op, tag));
            }
            other => panic!("unexpected op {other:?}"),
        }
        Ok(())
    }
}

struct Rig<'m> {
    mem: &'m GuestMemoryMmap,
    rxq: Vq,
    txq: Vq,
    dev: NetDevice<FakeTap>,
    host: OwnedFd,
    line: CountingLine,
    io: TapIo,
    offload: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl<'m> Rig<'m> {
    fn new(mem: &'m GuestMemoryMmap, feats: u64) -> Self {
        let (tap, host) = FakeTap::new().expect("socketpair");
        let offload = tap.offload.clone();
        let line = CountingLine::default();
        let dev = NetDevice::new(
            NetConfig {
                tap,
                mac: Some(MAC),
            },
            Box::new(line.clone()),
        );
        let mut rig = Rig {
            mem,
            rxq: DriverQueue::new(mem.clone(), RX_RINGS, QSIZE),
            txq: DriverQueue::new(mem.clone(), TX_RINGS, QSIZE),
            dev,
            host,
            line,
            io: TapIo::default(),
            offload,
        };
        let a = rig.activation(feats);
        rig.dev.activate(mem, &a).expect("activate");
        rig
    }

    fn activation(&self, feats: u64) -> Activation {
        Activation {
            features: feats,
            queues: vec![self.rxq.config(), self.txq.config()],
        }
    }

    /// One loop turn's worth: a drain, then the turn's interrupt decision.
    fn kick(&mut self, q: usize) -> Result<ProcessOutcome, DeviceError> {
        let out = self.dev.process_queue(q, self.mem, &mut self.io);
        self.dev.end_turn(self.mem);
        out
    }

    fn reset(&mut self) {
        VirtioDevice::<GuestMemoryMmap>::reset(&mut self.dev);
    }

    fn is_active(&self) -> bool {
        VirtioDevice::<GuestMemoryMmap>::is_active(&self.dev)
    }

    fn in_flight(&self) -> usize {
        VirtioDevice::<GuestMemoryMmap>::in_flight(&self.dev)
    }

    fn wants_tap_poll(&self) -> bool {
        VirtioDevice::<GuestMemoryMmap>::poll_request(&self.dev).is_some()
    }

    fn stale_rx_tag(&self) -> Option<u64> {
        self.dev.stale_rx_tags().first().copied()
    }

    /// Lets the fake ring finish what it can and hands completions back
    /// until nothing moves.
    fn settle(&mut self) {
        for _ in 0..64 {
            self.io.pump();
            let done = std::mem::take(&mut self.io.done);
            if done.is_empty() {
                return;
            }
            for (tag, res) in done {
                self.dev.complete(tag, res, self.mem, &mut self.io);
            }
            self.dev.end_turn(self.mem);
        }
        panic!("the device kept completing");
    }

    fn host_send(&self, bytes: &[u8]) {
        // SAFETY: sends from a live slice.
        let n = unsafe { libc::send(self.host.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        assert_eq!(n, bytes.len() as isize, "host send");
    }

    fn host_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        // SAFETY: receives into a live buffer of the given length.
        let n = unsafe {
            libc::recv(
                self.host.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let n = usize::try_from(n).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read guest");
        v
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("write guest");
    }

    fn needs_reset(&self) -> bool {
        info(&self.dev).shared.needs_reset()
    }
}

/// A vnet header (all offloads off) and an Ethernet frame of `len` bytes
/// whose payload follows a pattern seeded by `seed`.
fn packet(len: usize, seed: u8) -> Vec<u8> {
    let mut p = vec![0u8; VNET_HDR_LEN];
    p.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    p
}

fn num_buffers(hdr: &[u8]) -> u16 {
    u16::from_le_bytes([hdr[NUM_BUFFERS_OFFSET], hdr[NUM_BUFFERS_OFFSET + 1]])
}

#[test]
fn info_features_and_config_space() {
    let mem = memory();
    let rig = Rig::new(&mem, PLAIN);
    let i = info(&rig.dev);
    assert_eq!(i.device_type, 1);
    assert_eq!(i.queue_max_sizes, vec![QUEUE_MAX_SIZE, QUEUE_MAX_SIZE]);
    assert_eq!(i.avail_features, FEATURES);
    for absent in [VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ] {
        assert_eq!(FEATURES & feature(absent), 0);
    }
    assert_eq!(i.shared.config_len(), CONFIG_LEN);
    let mut c = [0u8; CONFIG_LEN];
    i.shared.read_config(0, &mut c);
    assert_eq!(&c[..6], &MAC.bytes());
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1, "one queue pair");
    assert!(!i.shared.write_config(0, &[0; 6]), "mac is read-only");

    let (tap, _host) = FakeTap::new().expect("socketpair");
    let dev = NetDevice::new(
        NetConfig { tap, mac: None },
        Box::new(CountingLine::default()),
    );
    let mac = dev.mac();
    assert_eq!(mac.bytes()[0] & 0x03, 0x02, "locally administered unicast");
    let mut c = [0u8; 6];
    info(&dev).shared.read_config(0, &mut c);
    assert_eq!(c, mac.bytes());
}

#[test]
fn an_mtu_is_offered_in_features_and_config_space() {
    let mem = memory();
    let rig = Rig::new(&mem, PLAIN);
    let mtu_bit = feature(virtio_bindings::virtio_net::VIRTIO_NET_F_MTU);
    assert_eq!(
        info(&rig.dev).avail_features & mtu_bit,
        0,
        "no MTU unless given"
    );

    let (tap, _host) = FakeTap::new().expect("socketpair");
    let mut dev = NetDevice::with_mtu(
        NetConfig {
            tap,
            mac: Some(MAC),
        },
        Box::new(CountingLine::default()),
        Some(9000),
    );
    let i = info(&dev);
    assert_eq!(i.avail_features, FEATURES | mtu_bit);
    assert_eq!(i.shared.config_len(), CONFIG_LEN + 2);
    let mut mtu = [0u8; 2];
    i.shared.read_config(MTU_OFFSET as u64, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 9000);
    // A driver may negotiate it.
    assert!(dev.activate(&mem, &rig.activation(PLAIN | mtu_bit)).is_ok());
}

#[test]
fn offloads_follow_the_negotiated_guest_features() {
    assert_eq!(tap_offloads(PLAIN & !feature(VIRTIO_NET_F_GUEST_CSUM)), 0);
    assert_eq!(
        tap_offloads(FEATURES),
        libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO6
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_UFO
    );
    // ECN without TSO would make TUNSETOFFLOAD fail: left out.
    let ecn_only = F_VERSION_1
        | feature(VIRTIO_NET_F_GUEST_CSUM)
        | feature(virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_ECN);
    assert_eq!(tap_offloads(ecn_only), libc::TUN_F_CSUM);

    let mem = memory();
    let mut rig = Rig::new(&mem, FEATURES);
    let now = || rig.offload.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(now(), tap_offloads(FEATURES));
    rig.reset();
    assert_eq!(rig.offload.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn activation_refuses_bad_features_and_asks_for_reset() {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    rig.reset();
    let ctrl = rig.activation(PLAIN | feature(VIRTIO_NET_F_CTRL_VQ));
    assert!(matches!(
        transport_event(&mut rig.dev, &mem, &TransportEvent::Activate(ctrl)),
        Err(DeviceError::BadFeatures(_))
    ));
    assert!(rig.needs_reset());
    assert!(!rig.is_active());
    let legacy = rig.activation(PLAIN & !F_VERSION_1);
    assert!(rig.dev.activate(&mem, &legacy).is_err());
    let mut one_queue = rig.activation(PLAIN);
    one_queue.queues.pop();
    assert!(matches!(
        rig.dev.activate(&mem, &one_queue),
        Err(DeviceError::QueueCount { got: 1, want: 2 })
    ));
    // The tap refusing offloads fails activation too.
    let (tap, _host) = FakeTap::new().expect("socketpair");
    tap.refuse_offload
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut dev = NetDevice::new(
        NetConfig { tap, mac: None },
        Box::new(CountingLine::default()),
    );
    assert!(matches!(
        transport_event(
            &mut dev,
            &mem,
            &TransportEvent::Activate(rig.activation(FEATURES))
        ),
        Err(DeviceError::Host(_))
    ));
    assert!(!VirtioDevice::<GuestMemoryMmap>::is_active(&dev));
    assert!(info(&dev).shared.interrupt_status() & INT_CONFIG != 0);
}

#[test]
fn tx_frame_reaches_the_tap_byte_for_byte() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    let pkt = packet(1000, 3);
    // Header and frame split unevenly over three descriptors.
    rig.write(tx_buf(0), &pkt[..20]);
    rig.write(tx_buf(1), &pkt[20..600]);
    rig.write(tx_buf(2), &pkt[600..]);
    let head = rig.txq.push(&[
        (tx_buf(0), 20, 0),
        (tx_buf(1), 580, 0),
        (tx_buf(2), (pkt.len() - 600) as u32, 0),
    ]);
    let out = rig.kick(TX_QUEUE)?;
    assert_eq!((out.popped, out.submitted), (1, 1));
    rig.settle();
    assert_eq!(rig.host_recv(), Some(pkt));
    assert_eq!(rig.txq.used_entries(), vec![(u32::from(head), 0)]);
    let c = rig.dev.counters();
    assert_eq!((c.tx_packets, c.tx_bytes, c.tx_errors), (1, 1000, 0));
    assert_eq!(rig.line.count(), 1);
    assert_eq!(rig.in_flight(), 0);
    Ok(())
}

#[test]
fn tx_through_an_indirect_table_and_across_regions() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    let pkt = packet(300, 9);
    // The frame straddles the region boundary at 0x8_0000.
    let at = 0x8_0000 - 100;
    rig.write(at, &pkt);
    let table = 0x7_0000u64;
    let d0 = Descriptor::new(at, 50, N, 1);
    let d1 = Descriptor::new(at + 50, (pkt.len() - 50) as u32, 0, 0);
    mem.write_obj(RawDescriptor::from(d0), GuestAddress(table))?;
    mem.write_obj(RawDescriptor::from(d1), GuestAddress(table + 16))?;
    let head = rig.txq.push(&[(table, 32, VRING_DESC_F_INDIRECT as u16)]);
    rig.kick(TX_QUEUE)?;
    rig.settle();
    assert_eq!(rig.host_recv(), Some(pkt));
    assert_eq!(rig.txq.used_entries(), vec![(u32::from(head), 0)]);
    Ok(())
}

#[test]
fn hostile_tx_chains_are_returned_unsent() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    rig.write(tx_buf(0), &packet(100, 1));
    let mut heads = vec![
        // A device-writable descriptor.
        rig.txq.push(&[(tx_buf(0), 12, 0), (tx_buf(1), 100, W)]),
        // Outside guest memory.
        rig.txq.push(&[(0x10_0000 - 16, 112, 0)]),
        // Zero length.
        rig.txq.push(&[(tx_buf(0), 0, 0), (tx_buf(1), 100, 0)]),
        // Shorter than a header plus an Ethernet header.
        rig.txq.push(&[(tx_buf(0), 20, 0)]),
        // Longer than 64 KiB plus headers.
        rig.txq.push(&[(BIG, MAX_BUFFER_LEN as u32 + 1, 0)]),
    ];
    // A loop: a descriptor whose next is itself.
    let lp = rig.txq.take_desc();
    rig.txq.store(lp, Descriptor::new(tx_buf(0), 100, N, lp));
    rig.txq.publish(lp);
    heads.push(lp);
    // A next index outside the table.
    let bad = rig.txq.take_desc();
    rig.txq
        .store(bad, Descriptor::new(tx_buf(0), 100, N, QSIZE + 3));
    rig.txq.publish(bad);
    heads.push(bad);

    // PanicIo proves none of them reached the tap.
    let out = rig.dev.process_queue(TX_QUEUE, &mem, &mut PanicIo)?;
    assert_eq!((out.popped, out.submitted), (heads.len() as u16, 0));
    let want: Vec<(u32, u32)> = heads.iter().map(|&h| (u32::from(h), 0)).collect();
    assert_eq!(rig.txq.used_entries(), want);
    assert_eq!(rig.dev.counters().tx_errors, heads.len() as u64);
    assert!(!rig.needs_reset());

    // And the device keeps going.
    let pkt = packet(64, 5);
    rig.write(tx_buf(2), &pkt);
    rig.txq.push(&[(tx_buf(2), pkt.len() as u32, 0)]);
    rig.kick(TX_QUEUE)?;
    rig.settle();
    assert_eq!(rig.host_recv(), Some(pkt));
    assert_eq!(rig.dev.counters().tx_packets, 1);
    Ok(())
}

#[test]
fn tx_blocked_by_a_full_ring_resumes() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    let pkt = packet(80, 2);
    rig.write(tx_buf(0), &pkt);
    rig.txq.push(&[(tx_buf(0), pkt.len() as u32, 0)]);
    rig.io.full = true;
    let out = rig.kick(TX_QUEUE)?;
    assert!(out.blocked);
    assert_eq!((out.popped, out.submitted), (0, 0));
    assert!(rig.txq.used_entries().is_empty());
    rig.io.full = false;
    let out = rig.kick(TX_QUEUE)?;
    assert_eq!(out.submitted, 1);
    rig.settle();
    assert_eq!(rig.host_recv(), Some(pkt));
    Ok(())
}

#[test]
fn a_head_reused_while_in_flight_breaks_the_queue() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    rig.write(tx_buf(0), &packet(80, 2));
    let head = rig.txq.push(&[(tx_buf(0), 92, 0)]);
    let mut rec = RecordingIo::default();
    rig.dev.process_queue(TX_QUEUE, &mem, &mut rec)?;
    rig.txq.publish(head);
    let err = rig.dev.process_queue(TX_QUEUE, &mem, &mut rec);
    assert!(matches!(err, Err(DeviceError::QueueBroken(TX_QUEUE, _))));
    assert!(rig.needs_reset());
    Ok(())
}

#[test]
fn rx_frame_lands_in_the_posted_buffer() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    // Garbage where num_buffers goes: the tap does not write those bytes.
    rig.write(rx_buf(0), &[0xee; 2048]);
    let head = rig.rxq.push(&[(rx_buf(0), 2048, W)]);
    let out = rig.kick(RX_QUEUE)?;
    assert_eq!(out.submitted, 1);
    assert_eq!(rig.io.parked.len(), 1, "the read waits for a frame");
    let pkt = packet(60, 4);
    rig.host_send(&pkt);
    rig.settle();
    let used = rig.rxq.used_entries();
    assert_eq!(used, vec![(u32::from(head), pkt.len() as u32)]);
    let got = rig.read(rx_buf(0), pkt.len());
    assert_eq!(num_buffers(&got), 1);
    assert_eq!(&got[VNET_HDR_LEN..], &pkt[VNET_HDR_LEN..]);
    let c = rig.dev.counters();
    assert_eq!((c.rx_packets, c.rx_bytes, c.rx_dropped), (1, 60, 0));
    assert_eq!(rig.line.count(), 1);
    // No buffers left: no read in flight.
    assert!(rig.io.parked.is_empty());
    assert_eq!(rig.in_flight(), 0);
    Ok(())
}

#[test]
fn rx_header_may_span_descriptors() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    let head = rig
        .rxq
        .push(&[(rx_buf(0), 11, W), (rx_buf(1), 1, W), (rx_buf(2), 2000, W)]);
    rig.kick(RX_QUEUE)?;
    let pkt = packet(100, 8);
    rig.host_send(&pkt);
    rig.settle();
    assert_eq!(rig.rxq.used_entries(), vec![(u32::from(head), 112)]);
    let lo = rig.read(rx_buf(0) + 10, 1)[0];
    let hi = rig.read(rx_buf(1), 1)[0];
    assert_eq!(u16::from_le_bytes([lo, hi]), 1);
    assert_eq!(rig.read(rx_buf(2), 100), &pkt[12..]);
    Ok(())
}

#[test]
fn no_tap_read_without_posted_buffers() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    let pkt = packet(200, 6);
    rig.host_send(&pkt);
    let out = rig.kick(RX_QUEUE)?;
    assert_eq!(out, ProcessOutcome::default());
    rig.settle();
    assert_eq!(rig.io.reads(), 0, "no read without buffers");
    assert_eq!(rig.dev.counters().rx_dropped, 0);
    // The frame waited in the tap; buffers plus a kick bring it in.
    let head = rig.rxq.push(&[(rx_buf(0), 4096, W)]);
    rig.kick(RX_QUEUE)?;
    assert_eq!(rig.io.reads(), 1);
    rig.settle();
    assert_eq!(rig.rxq.used_entries(), vec![(u32::from(head), 212)]);
    assert_eq!(rig.read(rx_buf(0) + 12, 200), &pkt[12..]);
    // A second kick while a read is in flight submits nothing more.
    rig.rxq.push(&[(rx_buf(1), 4096, W)]);
    rig.kick(RX_QUEUE)?;
    rig.kick(RX_QUEUE)?;
    assert_eq!(rig.io.reads(), 2);
    Ok(())
}

#[test]
fn mrg_rxbuf_frame_spans_chains_without_a_copy() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, MRG);
    let heads: Vec<u16> = (0..8)
        .map(|i| rig.rxq.push(&[(rx_buf(i), 1536, W)]))
        .collect();
    rig.kick(RX_QUEUE)?;
    // One read gathers every posted chain, plus the device's overflow byte
    // that tells a frame too big for them.
    match rig.io.parked.first() {
        Some((IoOp::Readv { iovcnt, .. }, _)) => assert_eq!(*iovcnt, 9),
        other => panic!("unexpected {other:?}"),
    }
    let big = packet(4000, 1);
    rig.host_send(&big);
    rig.settle();
    let used = rig.rxq.used_entries();
    assert_eq!(
        used,
        vec![
            (u32::from(heads[0]), 1536),
            (u32::from(heads[1]), 1536),
            (u32::from(heads[2]), 4012 - 2 * 1536),
        ]
    );
    let mut got = rig.read(rx_buf(0), 1536);
    got.extend(rig.read(rx_buf(1), 1536));
    got.extend(rig.read(rx_buf(2), 4012 - 2 * 1536));
    assert_eq!(num_buffers(&got), 3);
    assert_eq!(&got[12..], &big[12..]);
    // The five unused chains went back and are in the next read (with
    // the overflow byte).
    match rig.io.parked.first() {
        Some((IoOp::Readv { iovcnt, .. }, _)) => assert_eq!(*iovcnt, 6),
        other => panic!("unexpected {other:?}"),
    }
    let small = packet(100, 2);
    rig.host_send(&small);
    rig.settle();
    let used = rig.rxq.used_entries();
    assert_eq!(used[3], (u32::from(heads[3]), 112));
    let got = rig.read(rx_buf(3), 112);
    assert_eq!(num_buffers(&got), 1);
    assert_eq!(&got[12..], &small[12..]);
    let c = rig.dev.counters();
    assert_eq!((c.rx_packets, c.rx_bytes), (2, 4100));
    Ok(())
}

#[test]
fn mrg_rxbuf_uses_one_big_chain_alone() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, MRG);
    let head = rig.rxq.push(&[(BIG, MAX_BUFFER_LEN as u32, W)]);
    rig.rxq.push(&[(rx_buf(0), 1536, W)]);
    rig.kick(RX_QUEUE)?;
    match rig.io.parked.first() {
        // The big chain alone, and the overflow byte.
        Some((IoOp::Readv { iovcnt, .. }, _)) => assert_eq!(*iovcnt, 2),
        other => panic!("unexpected {other:?}"),
    }
    let pkt = packet(MAX_FRAME_LEN, 3);
    rig.host_send(&pkt);
    rig.settle();
    assert_eq!(
        rig.rxq.used_entries(),
        vec![(u32::from(head), MAX_BUFFER_LEN as u32)]
    );
    let got = rig.read(BIG, MAX_BUFFER_LEN);
    assert_eq!(num_buffers(&got), 1);
    assert_eq!(&got[12..], &pkt[12..]);
    Ok(())
}

#[test]
fn oversized_frame_without_mrg_is_dropped_and_the_buffer_reused() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    let head = rig.rxq.push(&[(rx_buf(0), 1024, W)]);
    rig.kick(RX_QUEUE)?;
    rig.host_send(&packet(2000, 1));
    let small = packet(500, 7);
    rig.host_send(&small);
    rig.settle();
    assert_eq!(rig.dev.counters().rx_dropped, 1);
    assert_eq!(rig.rxq.used_entries(), vec![(u32::from(head), 512)]);
    assert_eq!(rig.read(rx_buf(0) + 12, 500), &small[12..]);
    assert_eq!(rig.dev.counters().rx_packets, 1);
    Ok(())
}

#[test]
fn hostile_rx_chains_are_returned_unused() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    let bad = [
        rig.rxq.push(&[(rx_buf(0), 1024, 0)]),
        rig.rxq.push(&[(rx_buf(0), 8, W)]),
        rig.rxq.push(&[(0x10_0000 - 8, 1024, W)]),
    ];
    let good = rig.rxq.push(&[(rx_buf(1), 1024, W)]);
    rig.kick(RX_QUEUE)?;
    assert_eq!(rig.dev.counters().rx_errors, 3);
    let pkt = packet(70, 2);
    rig.host_send(&pkt);
    rig.settle();
    let mut want: Vec<(u32, u32)> = bad.iter().map(|&h| (u32::from(h), 0)).collect();
    want.push((u32::from(good), 82));
    assert_eq!(rig.rxq.used_entries(), want);
    assert!(!rig.needs_reset());
    Ok(())
}

#[test]
fn rx_eagain_waits_for_the_tap_poll() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    let head = rig.rxq.push(&[(rx_buf(0), 2048, W)]);
    rig.kick(RX_QUEUE)?;
    let tag = rig.io.parked[0].1;
    rig.io.parked.clear();
    rig.dev.complete(tag, -libc::EAGAIN, &mem, &mut rig.io);
    assert!(rig.wants_tap_poll());
    assert!(rig.io.parked.is_empty(), "no spinning on the tap");
    // The VMM's poll fired: RX resumes with the same buffer.
    rig.kick(RX_QUEUE)?;
    assert!(!rig.wants_tap_poll());
    rig.host_send(&packet(40, 1));
    rig.settle();
    assert_eq!(rig.rxq.used_entries(), vec![(u32::from(head), 52)]);
    Ok(())
}

#[test]
fn reset_mid_flight_ignores_late_completions() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    // Two writes held by a ring that has not run them, one read parked.
    let pkt = packet(100, 1);
    rig.write(tx_buf(0), &pkt);
    rig.txq.push(&[(tx_buf(0), 112, 0)]);
    rig.txq.push(&[(tx_buf(0), 112, 0)]);
    let mut held = RecordingIo::default();
    rig.dev.process_queue(TX_QUEUE, &mem, &mut held)?;
    assert_eq!(held.ops.len(), 2);
    rig.rxq.push(&[(rx_buf(0), 2048, W)]);
    rig.kick(RX_QUEUE)?;
    let rx_tag = rig.io.parked[0].1;
    assert_eq!(rig.in_flight(), 3);

    rig.reset();
    info(&rig.dev).shared.clear();
    assert_eq!(rig.stale_rx_tag(), Some(rx_tag));
    rig.rxq.clear();
    rig.txq.clear();
    let a = rig.activation(PLAIN);
    rig.dev.activate(&mem, &a)?;

    // The old writes complete late: nothing reaches the new rings.
    for &(_, tag) in &held.ops {
        rig.dev.complete(tag, 112, &mem, &mut rig.io);
    }
    assert!(rig.txq.used_entries().is_empty());
    assert_eq!(rig.dev.counters().tx_packets, 0);

    // No new read while the old one may still land.
    let head = rig.rxq.push(&[(rx_buf(1), 2048, W)]);
    rig.kick(RX_QUEUE)?;
    assert_eq!(rig.io.parked.len(), 1);
    // The VMM cancels it; its completion frees the way.
    assert!(rig.io.cancel(rx_tag));
    rig.settle();
    assert_eq!(rig.stale_rx_tag(), None);
    assert_eq!(rig.io.parked.len(), 1, "a fresh read for the new buffers");
    assert_ne!(rig.io.parked[0].1, rx_tag);
    let pkt = packet(50, 9);
    rig.host_send(&pkt);
    rig.settle();
    assert_eq!(rig.rxq.used_entries(), vec![(u32::from(head), 62)]);
    assert_eq!(rig.read(rx_buf(1) + 12, 50), &pkt[12..]);
    assert!(rig.line.count() >= 1);
    assert_eq!(rig.in_flight(), 0, "no buffers left, so no read");
    Ok(())
}

#[test]
fn unknown_tags_and_queues_are_ignored() {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    rig.dev.complete(0xffff_ffff_ffff, 0, &mem, &mut rig.io);
    rig.dev.complete(1 << 40, 0, &mem, &mut rig.io);
    assert!(matches!(
        rig.dev.process_queue(2, &mem, &mut rig.io),
        Err(DeviceError::NoSuchQueue(2))
    ));
    assert_eq!(rig.in_flight(), 0);
    assert!(rig.txq.used_entries().is_empty());
}

#[test]
fn handle_event_resets_and_activates() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    transport_event(&mut rig.dev, &mem, &TransportEvent::Reset)?;
    assert!(!rig.is_active());
    let out = rig.kick(TX_QUEUE)?;
    assert_eq!(out, ProcessOutcome::default());
    let a = rig.activation(FEATURES);
    transport_event(&mut rig.dev, &mem, &TransportEvent::Activate(a))?;
    assert!(rig.is_active());
    assert_eq!(rig.dev.acked_features(), FEATURES);
    Ok(())
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN | crate::virtio::F_EVENT_IDX);
    // used_event (after the avail ring) = 1: interrupt only once the used
    // index moves past 1, i.e. on the second used buffer.
    let used_event = rig.txq.avail_ring() + 4 + 2 * u64::from(QSIZE);
    mem.write_obj(1u16, GuestAddress(used_event))?;
    let pkt = packet(64, 1);
    rig.write(tx_buf(0), &pkt);
    rig.txq.push(&[(tx_buf(0), 76, 0)]);
    rig.kick(TX_QUEUE)?;
    rig.settle();
    assert_eq!(rig.line.count(), 0);
    rig.txq.push(&[(tx_buf(0), 76, 0)]);
    rig.kick(TX_QUEUE)?;
    rig.settle();
    assert_eq!(rig.line.count(), 1);
    Ok(())
}

#[test]
fn plain_rx_keeps_several_reads_in_flight_each_on_its_own_buffer() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, PLAIN);
    let heads: Vec<u16> = (0..6)
        .map(|i| rig.rxq.push(&[(rx_buf(i), 2048, W)]))
        .collect();
    rig.kick(RX_QUEUE)?;
    assert_eq!(rig.io.parked.len(), 4, "several reads while buffers last");
    assert_eq!(rig.in_flight(), 4);
    let pkts: Vec<Vec<u8>> = (0..5).map(|i| packet(100 + i, i as u8)).collect();
    for p in &pkts {
        rig.host_send(p);
    }
    rig.settle();
    // Every frame in its own buffer, in the order the tap gave them, each
    // buffer used once.
    let used = rig.rxq.used_entries();
    assert_eq!(used.len(), 5);
    let mut seen = Vec::new();
    for (i, &(id, len)) in used.iter().enumerate() {
        let n = heads
            .iter()
            .position(|&h| u32::from(h) == id)
            .expect("a posted head");
        assert!(!seen.contains(&n), "head {id} used twice");
        seen.push(n);
        assert_eq!(len as usize, pkts[i].len());
        assert_eq!(
            rig.read(rx_buf(n as u64) + 12, pkts[i].len() - 12),
            &pkts[i][12..]
        );
    }
    assert_eq!(rig.dev.counters().rx_packets, 5);
    assert_eq!(rig.in_flight(), 1, "one buffer left, one read");
    Ok(())
}

#[test]
fn mrg_rxbuf_coalesces_contiguous_buffers_into_one_iovec() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, MRG);
    // Eight 1536-byte buffers one after another, as a driver carves them
    // out of a page.
    let heads: Vec<u16> = (0..8)
        .map(|i| rig.rxq.push(&[(rx_buf(0) + i * 1536, 1536, W)]))
        .collect();
    rig.kick(RX_QUEUE)?;
    match rig.io.parked.first() {
        Some((IoOp::Readv { iovcnt, .. }, _)) => assert_eq!(*iovcnt, 2),
        other => panic!("unexpected {other:?}"),
    }
    let big = packet(4000, 4);
    rig.host_send(&big);
    rig.settle();
    assert_eq!(
        rig.rxq.used_entries(),
        vec![
            (u32::from(heads[0]), 1536),
            (u32::from(heads[1]), 1536),
            (u32::from(heads[2]), 4012 - 2 * 1536),
        ]
    );
    let got = rig.read(rx_buf(0), 4012);
    assert_eq!(num_buffers(&got), 3);
    assert_eq!(&got[12..], &big[12..]);
    // The next read starts from the five chains left, its one iovec
    // advanced past the three used (plus the overflow byte).
    match rig.io.parked.first() {
        Some((IoOp::Readv { iovcnt, .. }, _)) => assert_eq!(*iovcnt, 2),
        other => panic!("unexpected {other:?}"),
    }
    let next = packet(2000, 5);
    rig.host_send(&next);
    rig.settle();
    assert_eq!(
        rig.rxq.used_entries()[3..],
        [
            (u32::from(heads[3]), 1536),
            (u32::from(heads[4]), 2012 - 1536),
        ]
    );
    let got = rig.read(rx_buf(0) + 3 * 1536, 2012);
    assert_eq!(num_buffers(&got), 2);
    assert_eq!(&got[12..], &next[12..]);
    Ok(())
}

#[test]
fn mrg_rxbuf_chains_held_for_later_frames_stay_the_devices() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, MRG);
    let heads: Vec<u16> = (0..4)
        .map(|i| rig.rxq.push(&[(rx_buf(i), 1536, W)]))
        .collect();
    rig.kick(RX_QUEUE)?;
    let small = packet(60, 1);
    rig.host_send(&small);
    rig.settle();
    assert_eq!(rig.rxq.used_entries(), vec![(u32::from(heads[0]), 72)]);
    // The other three wait in the device for the next frames.
    let next = packet(70, 2);
    rig.host_send(&next);
    rig.settle();
    assert_eq!(rig.rxq.used_entries()[1], (u32::from(heads[1]), 82));
    assert_eq!(rig.read(rx_buf(1) + 12, 70), &next[12..]);
    // A driver posting a head the device still holds is broken.
    rig.rxq.publish(heads[3]);
    rig.rxq.push(&[(rx_buf(5), 1536, W)]);
    rig.host_send(&packet(80, 3));
    rig.settle();
    assert!(rig.needs_reset(), "head posted twice");
    Ok(())
}

#[test]
fn mrg_rxbuf_reset_forgets_held_chains() -> TestResult {
    let mem = memory();
    let mut rig = Rig::new(&mem, MRG);
    for i in 0..4 {
        rig.rxq.push(&[(rx_buf(i), 1536, W)]);
    }
    rig.kick(RX_QUEUE)?;
    rig.host_send(&packet(60, 1));
    rig.settle();
    assert_eq!(rig.rxq.used_entries().len(), 1);
    let stale = rig.io.parked[0].1;
    rig.reset();
    info(&rig.dev).shared.clear();
    rig.rxq.clear();
    let a = rig.activation(MRG);
    rig.dev.activate(&mem, &a)?;
    assert!(rig.io.cancel(stale));
    rig.settle();
    // Only what the new driver posts takes frames.
    let head = rig.rxq.push(&[(rx_buf(8), 1536, W)]);
    rig.kick(RX_QUEUE)?;
    let pkt = packet(90, 5);
    rig.host_send(&pkt);
    rig.settle();
    assert_eq!(rig.rxq.used_entries(), vec![(u32::from(head), 102)]);
    assert_eq!(rig.read(rx_buf(8) + 12, 90), &pkt[12..]);
    assert!(!rig.needs_reset());
    Ok(())
}

mod rate_limits {
    //! The interface's RX and TX limiters: frames held back stay where the
    //! guest or the tap left them and move again when the slot's timer
    //! (here: the test) says so.

    use std::time::Duration;

    use super::*;
    use crate::rate_limiter::{BucketConfig, DeviceRateLimiter, ManualClock};
    use crate::virtio::Throttle;

    fn take_throttle(rig: &mut Rig) -> Option<Throttle> {
        VirtioDevice::<GuestMemoryMmap>::take_throttle(&mut rig.dev)
    }

    #[test]
    fn tx_frames_over_the_limit_wait_in_the_ring() -> TestResult {
        let mem = memory();
        let mut rig = Rig::new(&mem, PLAIN);
        let clock = ManualClock::default();
        // 1000 bytes per 100 ms.
        rig.dev.set_rate_limiters(
            DeviceRateLimiter::default(),
            clock.limiter(Some(BucketConfig::new(1000, 100)), None),
        );
        for n in 0..3 {
            let pkt = packet(600, n as u8);
            rig.write(tx_buf(n), &pkt);
            rig.txq.push(&[(tx_buf(n), pkt.len() as u32, 0)]);
        }
        let out = rig.kick(TX_QUEUE)?;
        assert_eq!((out.popped, out.submitted), (1, 1));
        assert!(out.throttled);
        rig.settle();
        assert_eq!(rig.host_recv(), Some(packet(600, 0)));
        assert_eq!(rig.host_recv(), None);
        // 400 left, 600 needed: 20 ms.
        let t = take_throttle(&mut rig).expect("throttle");
        assert_eq!(
            (t.queue, t.resume_after),
            (TX_QUEUE, Duration::from_millis(20))
        );
        clock.advance(Duration::from_millis(20));
        rig.kick(TX_QUEUE)?;
        rig.settle();
        assert_eq!(rig.host_recv(), Some(packet(600, 1)));
        assert_eq!(rig.host_recv(), None);
        clock.advance(Duration::from_millis(60));
        rig.kick(TX_QUEUE)?;
        rig.settle();
        assert_eq!(rig.host_recv(), Some(packet(600, 2)));
        let c = rig.dev.counters();
        assert_eq!((c.tx_packets, c.tx_bytes), (3, 1800));
        assert_eq!(c.tx_rate_limiter_throttled, 2);
        assert_eq!(c.rx_rate_limiter_throttled, 0);
        Ok(())
    }

    #[test]
    fn rx_reads_wait_while_the_bucket_is_in_debt() -> TestResult {
        let mem = memory();
        let mut rig = Rig::new(&mem, PLAIN);
        let clock = ManualClock::default();
        // 1000 bytes per 100 ms.
        rig.dev.set_rate_limiters(
            clock.limiter(Some(BucketConfig::new(1000, 100)), None),
            DeviceRateLimiter::default(),
        );
        for n in 0..6 {
            rig.rxq.push(&[(rx_buf(n), 2048, W)]);
        }
        rig.kick(RX_QUEUE)?;
        // Plain RX keeps up to four reads in flight, all admitted while the
        // bucket is not in debt.
        assert_eq!(rig.io.reads(), 4);
        for n in 0..6 {
            rig.host_send(&packet(1500, n));
        }
        rig.settle();
        // Each read took a frame; the 6000 bytes put the bucket 5000 in
        // debt, so no further read was started.
        assert_eq!(rig.rxq.used_entries().len(), 4);
        assert_eq!(rig.io.reads(), 4, "a read was started while in debt");
        assert!(rig.io.parked.is_empty());
        // The slot's timers (here: this loop) wait until the debt is paid:
        // back to one token at 10 bytes per ms, 500.1 ms in all.
        let mut waited = Duration::ZERO;
        while let Some(t) = take_throttle(&mut rig) {
            assert_eq!(t.queue, RX_QUEUE);
            assert_eq!(
                rig.rxq.used_entries().len(),
                4,
                "read before the debt was paid"
            );
            waited += t.resume_after;
            clock.advance(t.resume_after);
            rig.kick(RX_QUEUE)?;
        }
        assert_eq!(waited, Duration::from_micros(5001 * 100));
        rig.settle();
        assert_eq!(rig.rxq.used_entries().len(), 6);
        let c = rig.dev.counters();
        assert!(c.rx_rate_limiter_throttled >= 2);
        assert_eq!((c.rx_packets, c.rx_bytes), (6, 9000));
        Ok(())
    }

    #[test]
    fn a_paused_interface_neither_sends_nor_starts_reads() -> TestResult {
        let mem = memory();
        let mut rig = Rig::new(&mem, PLAIN);
        VirtioDevice::<GuestMemoryMmap>::set_paused(&mut rig.dev, true);
        let pkt = packet(100, 9);
        rig.write(tx_buf(0), &pkt);
        rig.txq.push(&[(tx_buf(0), pkt.len() as u32, 0)]);
        rig.rxq.push(&[(rx_buf(0), 2048, W)]);
        assert_eq!(rig.kick(TX_QUEUE)?.popped, 0);
        assert_eq!(rig.kick(RX_QUEUE)?.popped, 0);
        rig.settle();
        assert_eq!(rig.host_recv(), None);
        assert_eq!(rig.io.reads(), 0);
        assert!(!rig.wants_tap_poll(), "a paused RX must not watch the tap");
        VirtioDevice::<GuestMemoryMmap>::set_paused(&mut rig.dev, false);
        rig.kick(TX_QUEUE)?;
        rig.kick(RX_QUEUE)?;
        rig.settle();
        assert_eq!(rig.host_recv(), Some(pkt));
        assert_eq!(rig.io.reads(), 1);
        Ok(())
    }
}

/// RX through provided buffers and a multishot read, with a fake ring that
/// plays the kernel's part: it takes the published entries in ring order,
/// reads one frame into each (reporting a frame's full length, as a tap
/// does), completes with the buffer id and "more", and ends the read with
/// `-ENOBUFS` when a frame finds the ring empty.
mod provided {
    use super::*;
    use crate::io::Selected;

    /// Big enough for a whole 1500-MTU frame with its header.
    const BUF: u32 = 2048;
    /// MRG_RXBUF without guest GSO (Linux with GSO off): frames never
    /// exceed the MTU, so a 2048-byte buffer takes any of them.
    const NOGSO: u64 = MRG
        & !(feature(virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_TSO4)
            | feature(virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_TSO6)
            | feature(virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_UFO)
            | feature(virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_ECN));

    #[derive(Debug, Default)]
    struct PbufIo {
        tap: TapIo,
        /// The ring's address, as registered.
        ring: u64,
        entries: u16,
        /// The kernel's head.
        head: u16,
        /// The armed multishot read: `(fd, tag)`.
        multi: Option<(i32, u64)>,
        done: Vec<(u64, i32, Selected)>,
        multishots: usize,
    }

    impl PbufIo {
        fn published_tail(&self) -> u16 {
            // SAFETY: the ring is the device's live mapping; its tail (entry
            // 0's last two bytes) is only accessed atomically.
            let tail = unsafe { &*((self.ring + 14) as *const std::sync::atomic::AtomicU16) };
            tail.load(std::sync::atomic::Ordering::Acquire)
        }

        fn entry(&self, pos: u16) -> (u64, u32, u16) {
            let at = self.ring + u64::from(pos & (self.entries - 1)) * 16;
            // SAFETY: inside the device's live mapping, fields aligned.
            unsafe {
                (
                    (at as *const u64).read_volatile(),
                    ((at + 8) as *const u32).read_volatile(),
                    ((at + 12) as *const u16).read_volatile(),
                )
            }
        }

        fn pump(&mut self) {
            self.tap.pump();
            for (tag, res) in self.tap.done.drain(..) {
                self.done.push((tag, res, Selected::default()));
            }
            let Some((fd, tag)) = self.multi else {
                return;
            };
            loop {
                let mut probe = 0u8;
                // SAFETY: peeks one byte into a local.
                let waiting = unsafe {
                    libc::recv(
                        fd,
                        (&mut probe as *mut u8).cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                if waiting < 0 {
                    return;
                }
                if self.published_tail() == self.head {
                    self.multi = None;
                    let end = Selected::default();
                    self.done.push((tag, -libc::ENOBUFS, end));
                    return;
                }
                let (addr, len, bid) = self.entry(self.head);
                self.head = self.head.wrapping_add(1);
                // SAFETY: the entry is a published guest buffer the device
                // keeps valid until this completion.
                let n = unsafe {
                    libc::recv(
                        fd,
                        addr as *mut libc::c_void,
                        len as usize,
                        libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    )
                };
                let sel = Selected {
                    buffer: Some(bid),
                    more: true,
                };
                self.done.push((tag, errno_res(n), sel));
            }
        }

        fn cancel(&mut self, tag: u64) -> bool {
            if self.multi.is_some_and(|(_, t)| t == tag) {
                self.multi = None;
                self.done.push((tag, -libc::ECANCELED, Selected::default()));
                return true;
            }
            self.tap.cancel(tag)
        }
    }

    impl IoSubmit for PbufIo {
        unsafe fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), IoSubmitError> {
            if let IoOp::ReadMulti { fd, group } = op {
                assert_eq!(group, 0);
                assert!(self.multi.is_none(), "one multishot read at a time");
                self.multi = Some((fd, tag));
                self.multishots += 1;
                return Ok(());
            }
            // SAFETY: the caller keeps submit's contract.
            unsafe { self.tap.submit(op, tag) }
        }
    }

    struct PRig<'m> {
        mem: &'m GuestMemoryMmap,
        rxq: Vq,
        txq: Vq,
        dev: NetDevice<FakeTap>,
        host: OwnedFd,
        io: PbufIo,
    }

    impl<'m> PRig<'m> {
        fn new(mem: &'m GuestMemoryMmap, feats: u64) -> Self {
            let (tap, host) = FakeTap::new().expect("socketpair");
            let mut dev = NetDevice::new(
                NetConfig {
                    tap,
                    mac: Some(MAC),
                },
                Box::new(CountingLine::default()),
            );
            let ring = VirtioDevice::<GuestMemoryMmap>::buf_ring_mut(&mut dev).expect("ring");
            ring.set_registered(0);
            let io = PbufIo {
                ring: ring.addr(),
                entries: ring.entries(),
                ..PbufIo::default()
            };
            let mut rig = PRig {
                mem,
                rxq: DriverQueue::new(mem.clone(), RX_RINGS, QSIZE),
                txq: DriverQueue::new(mem.clone(), TX_RINGS, QSIZE),
                dev,
                host,
                io,
            };
            rig.activate(feats);
            rig
        }

        fn activate(&mut self, feats: u64) {
            let a = Activation {
                features: feats,
                queues: vec![self.rxq.config(), self.txq.config()],
            };
            self.dev.activate(self.mem, &a).expect("activate");
        }

        fn kick(&mut self) -> Result<ProcessOutcome, DeviceError> {
            let out = self.dev.process_queue(RX_QUEUE, self.mem, &mut self.io);
            self.dev.end_turn(self.mem);
            out
        }

        fn settle(&mut self) {
            for _ in 0..64 {
                self.io.pump();
                let done = std::mem::take(&mut self.io.done);
                if done.is_empty() {
                    return;
                }
                for (tag, res, sel) in done {
                    self.dev
                        .complete_selected(tag, res, sel, self.mem, &mut self.io);
                }
                self.dev.end_turn(self.mem);
            }
            panic!("the device kept completing");
        }

        fn send(&self, bytes: &[u8]) {
            // SAFETY: sends from a live slice.
            let n =
                unsafe { libc::send(self.host.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
            assert_eq!(n, bytes.len() as isize, "host send");
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem
                .read_slice(&mut v, GuestAddress(addr))
                .expect("read guest");
            v
        }

        fn in_flight(&self) -> usize {
            VirtioDevice::<GuestMemoryMmap>::in_flight(&self.dev)
        }
    }

    #[test]
    fn frames_land_in_the_published_buffers_in_order() -> TestResult {
        let mem = memory();
        let mut rig = PRig::new(&mem, NOGSO);
        let heads: Vec<u16> = (0..4)
            .map(|i| rig.rxq.push(&[(rx_buf(i), BUF, W)]))
            .collect();
        rig.kick()?;
        assert_eq!(rig.io.multishots, 1, "one multishot read");
        assert_eq!(rig.io.tap.reads(), 0, "no readv");
        assert_eq!(rig.io.published_tail(), 4);
        let pkts: Vec<Vec<u8>> = (0..3).map(|i| packet(100 + i * 10, i as u8)).collect();
        for p in &pkts {
            rig.send(p);
        }
        rig.settle();
        let want: Vec<(u32, u32)> = pkts
            .iter()
            .zip(&heads)
            .map(|(p, h)| (u32::from(*h), p.len() as u32))
            .collect();
        assert_eq!(rig.rxq.used_entries(), want);
        for (i, p) in pkts.iter().enumerate() {
            let got = rig.read(rx_buf(i as u64), p.len());
            assert_eq!(num_buffers(&got), 1);
            assert_eq!(&got[VNET_HDR_LEN..], &p[VNET_HDR_LEN..]);
        }
        assert_eq!(rig.dev.counters().rx_packets, 3);
        assert_eq!(rig.in_flight(), 1, "still armed on the fourth buffer");
        assert_eq!(rig.io.multishots, 1);
        Ok(())
    }

    #[test]
    fn a_dry_ring_ends_the_read_and_new_buffers_rearm_it() -> TestResult {
        let mem = memory();
        let mut rig = PRig::new(&mem, NOGSO);
        let h0 = rig.rxq.push(&[(rx_buf(0), BUF, W)]);
        rig.kick()?;
        let (a, b) = (packet(200, 1), packet(300, 2));
        rig.send(&a);
        rig.send(&b);
        rig.settle();
        // The second frame found no buffer: ENOBUFS ended the read and the
        // frame waits in the tap.
        assert_eq!(rig.rxq.used_entries(), vec![(u32::from(h0), 212)]);
        assert_eq!(rig.in_flight(), 0);
        assert_eq!(rig.dev.counters().rx_dropped, 0);
        let h1 = rig.rxq.push(&[(rx_buf(1), BUF, W)]);
        rig.kick()?;
        assert_eq!(rig.io.multishots, 2, "armed again");
        rig.settle();
        assert_eq!(
            rig.rxq.used_entries(),
            vec![(u32::from(h0), 212), (u32::from(h1), 312)]
        );
        assert_eq!(rig.read(rx_buf(1) + 12, 300), &b[12..]);
        Ok(())
    }

    #[test]
    fn a_chain_too_small_hands_everything_to_readv_in_order() -> TestResult {
        let mem = memory();
        let mut rig = PRig::new(&mem, NOGSO);
        let h0 = rig.rxq.push(&[(rx_buf(0), BUF, W)]);
        let h1 = rig.rxq.push(&[(rx_buf(1), BUF, W)]);
        rig.kick()?;
        let tag = rig.io.multi.map(|m| m.1).expect("armed");
        let a = packet(100, 1);
        rig.send(&a);
        rig.settle();
        // A chain split in two descriptors: not one buffer for a frame.
        let h2 = rig.rxq.push(&[(rx_buf(2), 1000, W), (rx_buf(3), 1000, W)]);
        rig.kick()?;
        // The multishot read is cancelled first; no readv meanwhile.
        assert_eq!(rig.dev.stale_rx_tags(), vec![tag]);
        assert_eq!(rig.io.tap.reads(), 0);
        assert!(rig.io.cancel(tag));
        rig.settle();
        assert_eq!(rig.io.published_tail(), rig.io.head, "entries withdrawn");
        assert!(rig.io.tap.reads() >= 1, "readv serves the rest");
        let (b, c) = (packet(1400, 2), packet(1400, 3));
        rig.send(&b);
        rig.send(&c);
        rig.settle();
        let used = rig.rxq.used_entries();
        assert_eq!(used[0], (u32::from(h0), 112));
        // The withdrawn h1 comes before h2, as posted.
        assert_eq!(used[1], (u32::from(h1), 1412));
        assert_eq!(used[2].0, u32::from(h2));
        assert_eq!(rig.read(rx_buf(1) + 12, 1400), &b[12..]);
        assert_eq!(rig.dev.counters().rx_packets, 3);
        Ok(())
    }

    #[test]
    fn with_guest_gso_only_chains_for_a_64k_frame_are_published() -> TestResult {
        let mem = memory();
        // GUEST_TSO4 negotiated: a 2048-byte chain cannot take a 64 KiB
        // frame, so the readv path serves (and gathers chains).
        let mut rig = PRig::new(&mem, MRG);
        rig.rxq.push(&[(rx_buf(0), BUF, W)]);
        rig.kick()?;
        assert_eq!((rig.io.multishots, rig.io.tap.reads()), (0, 1));
        let mut rig = PRig::new(&mem, MRG);
        let big = rig.rxq.push(&[(BIG, 65562, W)]);
        rig.kick()?;
        assert_eq!((rig.io.multishots, rig.io.tap.reads()), (1, 0));
        let p = packet(5000, 4);
        rig.send(&p);
        rig.settle();
        assert_eq!(rig.rxq.used_entries(), vec![(u32::from(big), 5012)]);
        Ok(())
    }

    #[test]
    fn reset_with_entries_published_waits_for_the_cancel_and_drops_late_frames() -> TestResult {
        let mem = memory();
        let mut rig = PRig::new(&mem, NOGSO);
        rig.rxq.push(&[(rx_buf(0), BUF, W)]);
        rig.rxq.push(&[(rx_buf(1), BUF, W)]);
        rig.kick()?;
        let tag = rig.io.multi.map(|m| m.1).expect("armed");
        VirtioDevice::<GuestMemoryMmap>::reset(&mut rig.dev);
        assert_eq!(rig.in_flight(), 1, "the reset waits for the read");
        assert_eq!(rig.dev.stale_rx_tags(), vec![tag]);
        // A frame lands in an old buffer before the cancel: dropped.
        rig.send(&packet(80, 5));
        rig.io.pump();
        assert!(rig.io.cancel(tag));
        rig.settle();
        assert_eq!(rig.in_flight(), 0);
        assert_eq!(rig.dev.counters().rx_dropped, 1);
        assert_eq!(
            rig.io.published_tail(),
            rig.io.head,
            "nothing left published"
        );
        assert!(rig.rxq.used_entries().is_empty());
        // The next driver's buffers are published afresh.
        rig.rxq.clear();
        rig.txq.clear();
        rig.activate(NOGSO);
        let h = rig.rxq.push(&[(rx_buf(4), BUF, W)]);
        rig.kick()?;
        let p = packet(90, 6);
        rig.send(&p);
        rig.settle();
        assert_eq!(rig.rxq.used_entries(), vec![(u32::from(h), 102)]);
        assert_eq!(rig.read(rx_buf(4) + 12, 90), &p[12..]);
        Ok(())
    }
}
