//! virtio-net from a hostile driver and a hostile network: TX chains walked
//! into tap writes, RX buffers gathered into tap reads (with and without
//! MRG_RXBUF), frames of any length delivered into them, completions in
//! any order with any result, resets with reads parked in the kernel.
//!
//! Every op the device submits is audited before the harness plays the
//! kernel for it: buffers inside guest memory (an RX read may end with the
//! device's own overflow byte), TX frames within the protocol's bounds, at
//! most four tap reads in flight, and nothing left in flight at the end.

#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arbitrary::Arbitrary;
use devices::io::fake::{CountingLine, RecordingIo};
use devices::io::IoOp;
use devices::virtio::net::{
    MacAddr, NetConfig, NetDevice, FEATURES, MAX_BUFFER_LEN, MIN_TX_LEN, NUM_QUEUES, RX_QUEUE,
    TX_QUEUE,
};
use devices::virtio::testing::transport_event;
use devices::virtio::{Activation, TransportEvent, VirtioDevice, F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use ringvm_fuzz::driver::{Alloc, DriverQueue, FuzzDesc, UsedCounter, QUEUE_SLOT};
use ringvm_fuzz::ops::{Auditor, Outcome};
use ringvm_fuzz::{assert_unchanged, snapshot, with_guest_memory, NullTap, TAP_FD};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Most tap reads the device may have in the kernel at once.
const MAX_RX_READS: usize = 4;
#[derive(Arbitrary, Debug)]
struct Input {
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
            let before = self.after_reset.then(|| snapshot(self.mem));
            self.dev.complete(tag, res, self.mem, &mut self.io);
            if let Some(before) = before {
                assert_unchanged(self.mem, &before, "orphan completion");
            }
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
    };
    rig.activate(input.rx_log2, input.tx_log2, input.features);

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
