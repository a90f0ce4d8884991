//! virtio-blk from a hostile driver: descriptor chains (direct, indirect,
//! broken), request parsing and execution, completions in any order with
//! any result, resets, re-activation and disk swaps in between.
//!
//! The device runs against the recording fake ring; every op it submits
//! is audited (buffers in guest memory, inside the disk, no write on a
//! read-only drive, no flush the drive did not offer) before the harness
//! plays the kernel for it.

#![no_main]

use arbitrary::Arbitrary;
use devices::io::fake::{CountingLine, RecordingIo};
use devices::io::IoOp;
use devices::virtio::block::{self, BlockConfig, BlockDevice, MAX_REQUEST_BYTES, SECTOR_SIZE};
use devices::virtio::testing::transport_event;
use devices::virtio::{Activation, TransportEvent, VirtioDevice, F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use ringvm_fuzz::driver::{Alloc, DriverQueue, FuzzDesc, UsedCounter, QUEUE_SLOT};
use ringvm_fuzz::ops::{Auditor, Outcome};
use ringvm_fuzz::{assert_unchanged, fresh_disk, memfd, snapshot, with_guest_memory};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    flush: bool,
    /// Disk size in 512-byte sectors, plus a partial sector.
    sectors: u16,
    tail: u16,
    size_log2: u8,
    features: u64,
    skew: u16,
    actions: Vec<Action>,
}

#[derive(Arbitrary, Debug)]
enum Action {
    Chain(Vec<FuzzDesc>),
    SetDesc(u16, FuzzDesc),
    Publish(Vec<u16>),
    BumpAvail(u8),
    Suppress(u16, u16),
    Poke(u32, Vec<u8>),
    Process,
    Complete(u8, Outcome),
    CompleteAll(Outcome),
    Bogus(u64, i32),
    Full(bool),
    Reset,
    Reactivate(u8, u64),
    Swap(u16),
    EndTurn,
}

struct Rig<'m> {
    mem: &'m GuestMemoryMmap,
    dev: BlockDevice,
    vq: DriverQueue<'m>,
    used: UsedCounter,
    alloc: Alloc,
    io: RecordingIo,
    audit: Auditor,
    /// Set by a reset, cleared by the next activation: the device may not
    /// write guest memory in between (only the kernel finishing its ops).
    after_reset: bool,
    read_only: bool,
    flush: bool,
}

impl Rig<'_> {
    fn audit(&mut self) {
        let capacity = self.dev.capacity_sectors() * SECTOR_SIZE;
        let (read_only, flush) = (self.read_only, self.flush);
        self.audit.take(&mut self.io, false, |op, iov| {
            let total: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
            match *op {
                IoOp::Readv { offset, .. } | IoOp::Writev { offset, .. } => {
                    assert!(
                        matches!(op, IoOp::Readv { .. }) || !read_only,
                        "write submitted on a read-only drive"
                    );
                    assert_eq!(offset % SECTOR_SIZE, 0, "unaligned disk offset");
                    assert_eq!(total % SECTOR_SIZE, 0, "partial-sector transfer");
                    assert!(total <= MAX_REQUEST_BYTES, "request of {total} bytes");
                    assert!(
                        offset.checked_add(total).is_some_and(|e| e <= capacity),
                        "{total} bytes at {offset} past a disk of {capacity}"
                    );
                }
                IoOp::Fsync { .. } => assert!(flush, "flush on a drive without FLUSH"),
                IoOp::Fallocate { offset, len, .. } => {
                    assert!(!read_only, "discard/write-zeroes on a read-only drive");
                    assert!(
                        offset.checked_add(len).is_some_and(|e| e <= capacity),
                        "fallocate {len} bytes at {offset} past a disk of {capacity}"
                    );
                }
                IoOp::Poll { .. } => panic!("virtio-blk submitted a poll"),
                IoOp::ReadMulti { .. } => panic!("virtio-blk submitted a multishot read"),
            }
        });
        let (total, new) = self.used.update(self.vq.used_idx());
        if !self.alloc.tainted {
            self.vq.check_used(total, new);
        }
    }

    fn activate(&mut self, size_log2: u8, features: u64) {
        let size = 1u16 << (size_log2 % 9);
        self.vq = DriverQueue::new(self.mem, 0, size);
        self.audit.unprotect_all();
        let (used, len) = self.vq.used_range();
        self.audit.protect(self.mem, used, len);
        self.alloc.set_used_rings(vec![self.vq.used_span()]);
        self.used = UsedCounter::default();
        let offered = block::features(self.read_only, self.flush);
        let activation = Activation {
            features: (features & offered) | F_VERSION_1,
            queues: vec![self.vq.config()],
        };
        let _ = transport_event(
            &mut self.dev,
            self.mem,
            &TransportEvent::Activate(activation),
        );
        // A refused activation leaves the device as a reset left it.
        self.after_reset = !<BlockDevice as VirtioDevice<GuestMemoryMmap>>::is_active(&self.dev);
    }

    fn complete(&mut self, pick: usize, outcome: Outcome) {
        if let Some((tag, res)) = self.audit.finish(pick, outcome, &[]) {
            let before = self.after_reset.then(|| snapshot(self.mem));
            self.dev.complete(tag, res, self.mem, &mut self.io);
            if let Some(before) = before {
                assert_unchanged(self.mem, &before, "orphan completion");
            }
        }
    }

    fn complete_all(&mut self, outcome: Outcome) {
        // A completion may submit more (the flush of the next disk in a
        // FLUSH after a swap): audit as we go, a bounded number of rounds.
        for _ in 0..512 {
            if self.audit.pending.is_empty() {
                break;
            }
            self.complete(0, outcome);
            self.audit();
        }
    }

    fn reset(&mut self) {
        let _ = transport_event(&mut self.dev, self.mem, &TransportEvent::Reset);
        self.after_reset = true;
    }
}

fuzz_target!(|input: Input| with_guest_memory(|mem| run(mem, &input)));

fn run(mem: &GuestMemoryMmap, input: &Input) {
    let disk_len = u64::from(input.sectors) * SECTOR_SIZE + u64::from(input.tail % 512);
    let dev = BlockDevice::new(
        BlockConfig {
            file: memfd(disk_len),
            read_only: input.read_only,
            flush: input.flush,
            id: "fuzz-disk".into(),
        },
        Box::new(CountingLine::default()),
    )
    .expect("harness: device");
    let mut rig = Rig {
        mem,
        dev,
        vq: DriverQueue::new(mem, 0, 1),
        used: UsedCounter::default(),
        alloc: Alloc::new(QUEUE_SLOT, input.skew),
        io: RecordingIo::default(),
        audit: Auditor::new(mem),
        after_reset: false,
        read_only: input.read_only,
        flush: input.flush,
    };
    rig.activate(input.size_log2, input.features);

    for action in input.actions.iter().take(256) {
        match action {
            Action::Chain(descs) => rig.vq.push_chain(&mut rig.alloc, descs),
            Action::SetDesc(i, d) => rig.vq.set_desc(&mut rig.alloc, *i, d),
            Action::Publish(heads) => rig.vq.publish(heads),
            Action::BumpAvail(n) => rig.vq.bump_avail_idx(u16::from(*n)),
            Action::Suppress(flags, event) => rig.vq.set_suppression(*flags, *event),
            Action::Poke(addr, bytes) => {
                let addr = u64::from(*addr);
                if !rig.vq.overlaps_used(addr, bytes.len() as u64) {
                    let _ = mem.write_slice(bytes, GuestAddress(addr));
                }
                // The bytes may be descriptors the harness does not follow.
                rig.alloc.tainted = true;
            }
            Action::Process => {
                let _ = rig.dev.process_queue(0, mem, &mut rig.io);
            }
            Action::Complete(pick, outcome) => {
                rig.complete(usize::from(*pick), *outcome);
            }
            Action::CompleteAll(outcome) => rig.complete_all(*outcome),
            Action::Bogus(tag, res) => {
                // A tag no op of this device carries (beyond the slots).
                if rig.audit.pending.iter().all(|p| p.tag != *tag) {
                    rig.dev.complete(*tag, *res, mem, &mut rig.io);
                }
            }
            Action::Full(full) => rig.io.full = *full,
            Action::Reset => rig.reset(),
            Action::Reactivate(size_log2, features) => {
                rig.reset();
                rig.activate(*size_log2, *features);
            }
            Action::Swap(sectors) => {
                let _ = rig
                    .dev
                    .swap_disk(fresh_disk(u64::from(*sectors) * SECTOR_SIZE));
            }
            Action::EndTurn => rig.dev.end_turn(mem),
        }
        rig.audit();
        rig.audit.verify_in_flight();
    }

    // Teardown as the VMM does it: answer everything, then reset and let
    // every orphan complete; nothing may be left in flight.
    rig.io.full = false;
    for _ in 0..4 {
        rig.complete_all(Outcome::Full);
        let _ = rig.dev.process_queue(0, mem, &mut rig.io);
        rig.audit();
    }
    rig.reset();
    rig.complete_all(Outcome::Full);
    rig.audit();
    assert!(
        rig.audit.pending.is_empty(),
        "ops keep coming after a reset"
    );
    assert_eq!(
        <BlockDevice as VirtioDevice<GuestMemoryMmap>>::in_flight(&rig.dev),
        0,
        "ops still counted in flight"
    );
}
