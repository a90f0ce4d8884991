//! virtio-net from a hostile driver and a hostile network: TX chains walked
//! into tap writes, RX buffers gathered into tap reads (with and without
//! MRG_RXBUF), frames of any length delivered into them, completions in
//! any order with any result, resets with reads parked in the kernel.
//! When the input says so the device's provided-buffer ring counts as
//! registered, and the harness plays the kernel's side of it too: the
//! multishot read takes the next published buffer for each frame, runs dry
//! (-ENOBUFS), fails or ends at any point.
//!
//! Every op the device submits is audited before the harness plays the
//! kernel for it: buffers inside guest memory (an RX read may end with the
//! device's own overflow byte; every published provided buffer is checked
//! before the kernel would write it), TX frames within the protocol's
//! bounds, at most four tap reads and one multishot read in flight, and
//! nothing left in flight at the end.

#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arbitrary::Arbitrary;
use devices::io::fake::{CountingLine, RecordingIo};
use devices::io::{IoOp, Selected};
use devices::virtio::net::{
    MacAddr, NetConfig, NetDevice, FEATURES, MAX_BUFFER_LEN, MIN_TX_LEN, NUM_QUEUES, RX_QUEUE,
    TX_QUEUE,
};
use devices::virtio::testing::transport_event;
use devices::virtio::{Activation, TransportEvent, VirtioDevice, F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use ringvm_fuzz::driver::{
    Alloc, Buffer, DriverQueue, FuzzDesc, Len, Place, UsedCounter, QUEUE_SLOT,
};
use ringvm_fuzz::ops::{Auditor, Outcome, ERRNOS};
use ringvm_fuzz::{assert_unchanged, snapshot, with_guest_memory, NullTap, TAP_FD};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Most tap reads the device may have in the kernel at once.
const MAX_RX_READS: usize = 4;
/// The guest receive offloads that make a frame longer than the MTU: a
/// whole-frame buffer would then need 64 KiB, more than a region here.
const GUEST_GSO: u64 =
    (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6) | (1 << VIRTIO_NET_F_GUEST_UFO);
/// A receive buffer that holds any frame of a 1500-byte MTU.
const WHOLE_FRAME_BUF: u32 = 2048;
#[derive(Arbitrary, Debug)]
struct Input {
    /// The VMM registered the device's provided-buffer ring, and the
    /// driver starts politely: GSO off and this many (1 to 8) whole-frame
    /// receive buffers posted, so the device takes the provided-buffer path
    /// before the actions below turn on it.
    provided: Option<u8>,
    rx_log2: u8,
    tx_log2: u8,
    features: u64,
    skew: u16,
    actions: Vec<Action>,
}

#[derive(Arbitrary, Debug)]
enum Action {
    Chain(bool, Vec<FuzzDesc>),
    SetDesc(bool, u16, FuzzDesc),
    Publish(bool, Vec<u16>),
    BumpAvail(bool, u8),
    Suppress(bool, u16, u16),
    Poke(u32, Vec<u8>),
    Process(bool),
    Kick(u8),
    /// Completes an op; a tap read receives `frame` (its length is the
    /// result unless the outcome says otherwise).
    Complete(u8, Outcome, Vec<u8>),
    CompleteAll(Outcome),
    CancelStale,
    Bogus(u64, i32),
    Full(bool),
    RefuseOffload(bool),
    Reset,
    Reactivate(u8, u8, u64),
    EndTurn,
    /// The kernel's side of the multishot read: a frame into the next
    /// published buffer (`more`: the read stays armed), or with nothing
    /// published the read ends with -ENOBUFS.
    Deliver(bool, Vec<u8>),
    /// The multishot read ends with `errno` (from the harness's list) and
    /// no buffer.
    EndMultishot(u8),
}

struct Rig<'m> {
    mem: &'m GuestMemoryMmap,
    dev: NetDevice<NullTap>,
    refuse: Arc<AtomicBool>,
    queues: Vec<DriverQueue<'m>>,
    used: Vec<UsedCounter>,
    alloc: Alloc,
    io: RecordingIo,
    audit: Auditor,
    /// Set by a reset, cleared by the next activation: the device may not
    /// write guest memory in between (only the kernel finishing its ops).
    after_reset: bool,
    /// The kernel's head of the provided-buffer ring: entries consumed.
    kernel_head: u16,
}

fn queue_index(tx: bool) -> usize {
    if tx {
        TX_QUEUE
    } else {
        RX_QUEUE
    }
}

impl Rig<'_> {
    fn audit(&mut self) {
        self.audit.take(&mut self.io, true, |op, iov| {
            let total: usize = iov.iter().map(|v| v.iov_len).sum();
            match *op {
                IoOp::Writev { fd, .. } => {
                    assert_eq!(fd, TAP_FD, "tap write on another fd");
                    assert!(
                        (MIN_TX_LEN..=MAX_BUFFER_LEN).contains(&total),
                        "transmit of {total} bytes"
                    );
                }
                IoOp::Readv { fd, .. } => assert_eq!(fd, TAP_FD, "tap read on another fd"),
                IoOp::ReadMulti { fd, group } => {
                    assert_eq!(fd, TAP_FD, "multishot read on another fd");
                    assert_eq!(group, 0, "multishot read on another buffer group");
                }
                other => panic!("virtio-net submitted {other:?}"),
            }
        });
        let reads = self
            .audit
            .pending
            .iter()
            .filter(|p| matches!(p.op, IoOp::Readv { .. }))
            .count();
        assert!(reads <= MAX_RX_READS, "{reads} tap reads in flight");
        let multishots = self
            .audit
            .pending
            .iter()
            .filter(|p| matches!(p.op, IoOp::ReadMulti { .. }))
            .count();
        assert!(multishots <= 1, "{multishots} multishot reads in flight");
        self.audit_published();
        for (q, used) in self.queues.iter().zip(&mut self.used) {
            let (total, new) = used.update(q.used_idx());
            if !self.alloc.tainted {
                q.check_used(total, new);
            }
        }
    }

    fn activate(&mut self, rx_log2: u8, tx_log2: u8, features: u64) {
        self.queues = [rx_log2, tx_log2]
            .iter()
            .enumerate()
            .map(|(i, l)| DriverQueue::new(self.mem, i as u64, 1u16 << (l % 9)))
            .collect();
        self.used = (0..NUM_QUEUES).map(|_| UsedCounter::default()).collect();
        self.audit.unprotect_all();
        for q in &self.queues {
            let (used, len) = q.used_range();
            self.audit.protect(self.mem, used, len);
        }
        self.alloc
            .set_used_rings(self.queues.iter().map(|q| q.used_span()).collect());
        let activation = Activation {
            features: (features & FEATURES) | F_VERSION_1,
            queues: self.queues.iter().map(|q| q.config()).collect(),
        };
        let _ = transport_event(
            &mut self.dev,
            self.mem,
            &TransportEvent::Activate(activation),
        );
        // A refused activation leaves the device as a reset left it.
        self.after_reset =
            !<NetDevice<NullTap> as VirtioDevice<GuestMemoryMmap>>::is_active(&self.dev);
    }

    fn complete(&mut self, pick: usize, outcome: Outcome, frame: &[u8]) {
        if let Some((tag, res)) = self.audit.finish(pick, outcome, frame) {
            self.complete_with(tag, res, Selected::default());
        }
    }

    /// Hands the device a completion as the VMM's dispatch does.
    fn complete_with(&mut self, tag: u64, res: i32, selected: Selected) {
        let before = self.after_reset.then(|| snapshot(self.mem));
        self.dev
            .complete_selected(tag, res, selected, self.mem, &mut self.io);
        if let Some(before) = before {
            assert_unchanged(self.mem, &before, "orphan completion");
        }
    }

    /// Every entry the kernel could take next must be a non-empty buffer
    /// inside guest memory, named by a head within the largest queue.
    fn audit_published(&mut self) {
        let Some(ring) = VirtioDevice::<GuestMemoryMmap>::buf_ring_mut(&mut self.dev) else {
            return;
        };
        let tail = ring.published_tail();
        let count = tail.wrapping_sub(self.kernel_head);
        assert!(
            count <= ring.entries(),
            "{count} entries published in a ring of {}",
            ring.entries()
        );
        for i in 0..count {
            let (addr, len, bid) = ring.entry(self.kernel_head.wrapping_add(i));
            assert!(bid < 256, "buffer id {bid} is no queue head");
            // Checks the range without writing it.
            self.audit.fill_provided(addr, len, &[]);
        }
    }

    /// The multishot read's op in flight, if one is.
    fn multishot(&self) -> Option<usize> {
        self.audit
            .pending
            .iter()
            .position(|p| matches!(p.op, IoOp::ReadMulti { .. }))
    }

    /// The kernel's side of the multishot read: see [`Action::Deliver`].
    fn deliver(&mut self, more: bool, frame: &[u8]) {
        let Some(at) = self.multishot() else {
            return;
        };
        let tag = self.audit.pending[at].tag;
        let next = VirtioDevice::<GuestMemoryMmap>::buf_ring_mut(&mut self.dev).and_then(|ring| {
            (ring.published_tail() != self.kernel_head).then(|| ring.entry(self.kernel_head))
        });
        let Some((addr, len, bid)) = next else {
            self.audit.pending.remove(at);
            self.complete_with(tag, -libc::ENOBUFS, Selected::default());
            return;
        };
        self.kernel_head = self.kernel_head.wrapping_add(1);
        if !more {
            self.audit.pending.remove(at);
        }
        // The kernel writes the frame (into a buffer of the driver before a
        // reset, too: the device must then write nothing more).
        let n = self.audit.fill_provided(addr, len, frame);
        let selected = Selected {
            buffer: Some(bid),
            more,
        };
        self.complete_with(tag, n as i32, selected);
    }

    /// See [`Action::EndMultishot`].
    fn end_multishot(&mut self, errno: u8) {
        if let Some(at) = self.multishot() {
            let p = self.audit.pending.remove(at);
            let res = -ERRNOS[usize::from(errno) % ERRNOS.len()];
            self.complete_with(p.tag, res, Selected::default());
        }
    }

    fn reset(&mut self) {
        let _ = transport_event(&mut self.dev, self.mem, &TransportEvent::Reset);
        self.after_reset = true;
    }

    fn complete_all(&mut self, outcome: Outcome) {
        // Each completion may submit more (the next read, held-back TX):
        // audit as we go, and stop after a bounded number of rounds.
        for _ in 0..64 {
            if self.audit.pending.is_empty() {
                break;
            }
            self.complete(0, outcome, &[]);
            self.audit();
        }
    }
}

fuzz_target!(|input: Input| with_guest_memory(|mem| run(mem, &input)));

fn run(mem: &GuestMemoryMmap, input: &Input) {
    let tap = NullTap::default();
    let refuse = tap.refuse.clone();
    let dev = NetDevice::new(
        NetConfig {
            tap,
            mac: MacAddr::from_bytes([2, 0, 0, 0, 0, 1]).ok(),
        },
        Box::new(CountingLine::default()),
    );
    let mut rig = Rig {
        mem,
        dev,
        refuse,
        queues: Vec::new(),
        used: Vec::new(),
        alloc: Alloc::new(NUM_QUEUES as u64 * QUEUE_SLOT, input.skew),
        io: RecordingIo::default(),
        audit: Auditor::new(mem),
        after_reset: false,
        kernel_head: 0,
    };

    let mut features = input.features;
    if let Some(n) = input.provided {
        if let Some(ring) = VirtioDevice::<GuestMemoryMmap>::buf_ring_mut(&mut rig.dev) {
            ring.set_registered(0);
        }
        features &= !GUEST_GSO;
        rig.activate(input.rx_log2, input.tx_log2, features);
        // Whole-frame buffers inside the second region, one per chain, no
        // more than the queue holds.
        let rx_size = 1u16 << (input.rx_log2 % 9);
        for k in 0..(u16::from(n % 8) + 1).min(rx_size) {
            let at = i16::try_from(u32::from(k) * WHOLE_FRAME_BUF).unwrap_or(0);
            let desc = FuzzDesc {
                buffer: Buffer::Plain(Place::Edge(1, at), Len::Raw(WHOLE_FRAME_BUF)),
                flags: 2,
                next: 0,
            };
            rig.queues[RX_QUEUE].push_chain(&mut rig.alloc, &[desc]);
        }
        let _ = rig.dev.process_queue(RX_QUEUE, mem, &mut rig.io);
        rig.audit();
        if <NetDevice<NullTap> as VirtioDevice<GuestMemoryMmap>>::is_active(&rig.dev) {
            assert!(
                rig.multishot().is_some(),
                "whole-frame buffers did not arm the multishot read"
            );
        }
    } else {
        rig.activate(input.rx_log2, input.tx_log2, features);
    }

    for action in input.actions.iter().take(256) {
        match action {
            Action::Chain(tx, descs) => {
                rig.queues[queue_index(*tx)].push_chain(&mut rig.alloc, descs)
            }
            Action::SetDesc(tx, i, d) => {
                rig.queues[queue_index(*tx)].set_desc(&mut rig.alloc, *i, d)
            }
            Action::Publish(tx, heads) => rig.queues[queue_index(*tx)].publish(heads),
            Action::BumpAvail(tx, n) => rig.queues[queue_index(*tx)].bump_avail_idx(u16::from(*n)),
            Action::Suppress(tx, flags, event) => {
                rig.queues[queue_index(*tx)].set_suppression(*flags, *event)
            }
            Action::Poke(addr, bytes) => {
                let addr = u64::from(*addr);
                let len = bytes.len() as u64;
                if rig.queues.iter().all(|q| !q.overlaps_used(addr, len)) {
                    let _ = mem.write_slice(bytes, GuestAddress(addr));
                }
                // The bytes may be descriptors the harness does not follow.
                rig.alloc.tainted = true;
            }
            Action::Process(tx) => {
                let _ = rig.dev.process_queue(queue_index(*tx), mem, &mut rig.io);
            }
            Action::Kick(q) => {
                let _ = rig.dev.process_queue(usize::from(*q), mem, &mut rig.io);
            }
            Action::Complete(pick, outcome, frame) => {
                rig.complete(usize::from(*pick), *outcome, frame)
            }
            Action::CompleteAll(outcome) => rig.complete_all(*outcome),
            Action::CancelStale => {
                // What the VMM does for a read parked across a reset.
                let stale =
                    <NetDevice<NullTap> as VirtioDevice<GuestMemoryMmap>>::stale_tags(&rig.dev);
                for tag in stale {
                    let at = rig.audit.pending.iter().position(|p| p.tag == tag);
                    let at = at.expect("stale tag names no op in flight");
                    rig.complete(at, Outcome::Errno(3), &[]);
                }
            }
            Action::Bogus(tag, res) => {
                if rig.audit.pending.iter().all(|p| p.tag != *tag) {
                    rig.dev.complete(*tag, *res, mem, &mut rig.io);
                }
            }
            Action::Full(full) => rig.io.full = *full,
            Action::RefuseOffload(on) => rig.refuse.store(*on, Ordering::Relaxed),
            Action::Reset => rig.reset(),
            Action::Reactivate(rx, tx, features) => {
                rig.reset();
                rig.activate(*rx, *tx, *features);
            }
            Action::EndTurn => rig.dev.end_turn(mem),
            Action::Deliver(more, frame) => rig.deliver(*more, frame),
            Action::EndMultishot(errno) => rig.end_multishot(*errno),
        }
        rig.audit();
        rig.audit.verify_in_flight();
    }

    // Teardown as the VMM does it: reset, cancel parked reads, let every
    // op complete; nothing may be left in flight.
    rig.io.full = false;
    rig.complete_all(Outcome::Full);
    rig.reset();
    rig.complete_all(Outcome::Errno(3));
    assert!(
        rig.audit.pending.is_empty(),
        "ops keep coming after a reset"
    );
    assert_eq!(
        <NetDevice<NullTap> as VirtioDevice<GuestMemoryMmap>>::in_flight(&rig.dev),
        0,
        "ops still counted in flight"
    );
}
