//! The driver's side of split virtqueues, from fuzz input.
//!
//! Each queue sits in its own slot at the bottom of guest memory, laid out
//! by the devices crate's driver-side mock (`virtio::testing`). Buffers go
//! into the data area above the rings, placed by a bump allocator unless
//! the input names an address itself.

use arbitrary::Arbitrary;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use devices::virtio::{testing, QueueConfig};

use crate::{MEM_END, REGION_SIZE};

/// Bytes of guest memory each queue's rings occupy.
pub const QUEUE_SLOT: u64 = testing::QUEUE_FOOTPRINT;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// A buffer length, biased towards the sizes devices care about.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Len {
    /// A few bytes (headers, status bytes).
    Bytes(u8),
    /// Whole 512-byte sectors.
    Sectors(u8),
    /// Up to 64 KiB.
    Big(u16),
    /// Anything a guest can write.
    Raw(u32),
}

impl Len {
    /// The length in bytes.
    pub fn get(self) -> u32 {
        match self {
            Len::Bytes(b) => u32::from(b),
            Len::Sectors(s) => u32::from(s % 130) * 512,
            Len::Big(b) => u32::from(b),
            Len::Raw(r) => r,
        }
    }
}

/// Where a buffer lies.
#[derive(Arbitrary, Clone, Debug)]
pub enum Place {
    /// Next free bytes of the data area, filled with `content`.
    Data(Vec<u8>),
    /// Right at a region edge (`which`: 0 the start of memory, 1 the
    /// boundary between the regions, 2 the end), moved by `delta`.
    Edge(u8, i16),
    /// Any guest address at all.
    At(u64),
}

/// One descriptor inside an indirect table.
#[derive(Arbitrary, Clone, Debug)]
pub struct Leaf {
    /// Its buffer.
    pub place: Place,
    /// Its length.
    pub len: Len,
    /// Bit 1: device-writable; bit 2: INDIRECT (forbidden here); bit 3:
    /// toggle the NEXT link the harness sets for a chain.
    pub flags: u8,
    /// Overrides the link to the next entry when bit 3 of `flags` is set.
    pub next: u16,
}

/// What a descriptor points at.
#[derive(Arbitrary, Clone, Debug)]
pub enum Buffer {
    /// A plain buffer.
    Plain(Place, Len),
    /// An indirect table built from these entries, linked in order.
    Indirect(Vec<Leaf>),
}

/// One descriptor of the queue's table.
#[derive(Arbitrary, Clone, Debug)]
pub struct FuzzDesc {
    /// What it points at.
    pub buffer: Buffer,
    /// Bit 1: device-writable; bit 2: INDIRECT; bit 3: toggle the NEXT
    /// link the harness sets for a chain (in a raw store, bit 0 is NEXT).
    pub flags: u8,
    /// The `next` field for raw stores and toggled links.
    pub next: u16,
}

/// Hands out data-area addresses, wrapping around when full, and notes
/// when the guest aimed a buffer at a used ring.
#[derive(Debug)]
pub struct Alloc {
    start: u64,
    cursor: u64,
    /// The used rings, as guest ranges.
    used_rings: Vec<(u64, u64)>,
    /// A buffer (or a descriptor the harness cannot follow: raw bytes
    /// behind an INDIRECT flag, a poke) may let the device write into a
    /// used ring on the guest's behalf (a status byte, a vnet header):
    /// the used-ring checks no longer hold, by the guest's own doing.
    pub tainted: bool,
}

impl Alloc {
    /// An allocator over `[start, MEM_END)`, beginning at `start + skew`
    /// so inputs can make buffers straddle the region boundary.
    pub fn new(start: u64, skew: u16) -> Self {
        let cursor = start + u64::from(skew) % (MEM_END - start);
        Self {
            start,
            cursor,
            used_rings: Vec::new(),
            tainted: false,
        }
    }

    /// Sets the used rings buffers must not overlap for the checks to hold.
    pub fn set_used_rings(&mut self, rings: Vec<(u64, u64)>) {
        self.used_rings = rings;
        self.tainted = false;
    }

    fn note(&mut self, addr: u64, len: u32) {
        let end = addr.saturating_add(u64::from(len));
        if self.used_rings.iter().any(|&(s, e)| addr < e && end > s) {
            self.tainted = true;
        }
    }

    fn take(&mut self, len: u64) -> u64 {
        let len = len.min(MEM_END - self.start);
        if self.cursor + len > MEM_END {
            self.cursor = self.start;
        }
        let at = self.cursor;
        self.cursor += len;
        at
    }
}

fn edge(which: u8, delta: i16) -> u64 {
    let base = match which % 3 {
        0 => 0,
        1 => REGION_SIZE,
        _ => MEM_END,
    };
    base.wrapping_add_signed(i64::from(delta))
}

/// Places a buffer of `len` bytes as `place` says; returns its address.
fn place(mem: &GuestMemoryMmap, alloc: &mut Alloc, place: &Place, len: u32) -> u64 {
    let at = place_inner(mem, alloc, place, len);
    alloc.note(at, len);
    at
}

fn place_inner(mem: &GuestMemoryMmap, alloc: &mut Alloc, place: &Place, len: u32) -> u64 {
    match place {
        Place::Data(content) => {
            let at = alloc.take(u64::from(len));
            let room = (MEM_END - at).min(u64::from(len)) as usize;
            let n = content.len().min(room);
            // Inside memory by construction; a failure would be harmless.
            let _ = mem.write_slice(&content[..n], GuestAddress(at));
            at
        }
        Place::Edge(which, delta) => edge(*which, *delta),
        Place::At(addr) => *addr,
    }
}

/// Flags for entry `i` of `n` linked in order, from the input's bits.
fn chain_flags(bits: u8, i: usize, n: usize, next_raw: u16) -> (u16, u16) {
    let mut flags = u16::from(bits) & (WRITE | INDIRECT);
    let mut next = (i + 1) as u16;
    let linked = i + 1 < n;
    let toggle = bits & 8 != 0;
    if linked != toggle {
        flags |= NEXT;
    }
    if toggle {
        next = next_raw;
    }
    (flags, next)
}

/// Writes `d` (a chain member when `link` is `Some((i, n, first))`) and
/// returns the raw descriptor to store.
fn build(
    mem: &GuestMemoryMmap,
    alloc: &mut Alloc,
    d: &FuzzDesc,
    link: Option<(usize, usize, u16)>,
) -> Descriptor {
    let (mut flags, next) = match link {
        Some((i, n, first)) => {
            let (f, nx) = chain_flags(d.flags, i, n, d.next);
            let nx = if d.flags & 8 != 0 {
                nx
            } else {
                first.wrapping_add(nx)
            };
            (f, nx)
        }
        None => (u16::from(d.flags) & (NEXT | WRITE | INDIRECT), d.next),
    };
    match &d.buffer {
        Buffer::Plain(p, len) => {
            let len = len.get();
            let addr = place(mem, alloc, p, len);
            if flags & INDIRECT != 0 {
                // A table of raw input bytes: descriptors not followed here.
                alloc.tainted = true;
            }
            Descriptor::new(addr, len, flags, next)
        }
        Buffer::Indirect(leaves) => {
            let leaves = &leaves[..leaves.len().min(300)];
            let table = alloc.take(16 * leaves.len() as u64);
            for (i, leaf) in leaves.iter().enumerate() {
                let (lf, lnext) = chain_flags(leaf.flags, i, leaves.len(), leaf.next);
                let len = leaf.len.get();
                let addr = place(mem, alloc, &leaf.place, len);
                let raw = RawDescriptor::from(Descriptor::new(addr, len, lf, lnext));
                let _ = mem.write_obj(raw, GuestAddress(table + 16 * i as u64));
            }
            flags |= INDIRECT;
            Descriptor::new(table, 16 * leaves.len() as u32, flags, next)
        }
    }
}

/// The driver's view of one queue: the devices crate's driver-side mock
/// (`devices::virtio::testing::DriverQueue`) fed from fuzz input.
pub struct DriverQueue<'m> {
    mem: &'m GuestMemoryMmap,
    q: testing::DriverQueue<GuestMemoryMmap>,
    /// Available entries published so far (forward moves of avail.idx).
    published: u64,
    next_desc: u16,
}

impl<'m> DriverQueue<'m> {
    /// Lays out queue `index` of `size` entries (a power of two up to 256)
    /// with fresh, zeroed rings.
    pub fn new(mem: &'m GuestMemoryMmap, index: u64, size: u16) -> Self {
        Self {
            mem,
            q: testing::DriverQueue::new(mem.clone(), index * QUEUE_SLOT, size),
            published: 0,
            next_desc: 0,
        }
    }

    /// The layout the driver writes into the transport's registers.
    pub fn config(&self) -> QueueConfig {
        self.q.config()
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.q.size()
    }

    /// This queue's used ring as (guest address, length).
    pub fn used_range(&self) -> (u64, usize) {
        (self.q.used_ring(), 6 + 8 * usize::from(self.size()))
    }

    /// This queue's used ring as a guest range `(start, end)`.
    pub fn used_span(&self) -> (u64, u64) {
        let (at, len) = self.used_range();
        (at, at + len as u64)
    }

    /// Whether `[addr, addr + len)` touches this queue's used ring, which
    /// only the device writes.
    pub fn overlaps_used(&self, addr: u64, len: u64) -> bool {
        let start = self.q.used_ring();
        let end = start + 6 + 8 * u64::from(self.size());
        addr < end && addr.saturating_add(len) > start
    }

    /// Stores `d` raw at table index `index % size`.
    pub fn set_desc(&mut self, alloc: &mut Alloc, index: u16, d: &FuzzDesc) {
        let raw = build(self.mem, alloc, d, None);
        self.q.store(index, raw);
    }

    /// Stores `descs` as one chain in consecutive table entries (wrapping)
    /// and publishes its head.
    pub fn push_chain(&mut self, alloc: &mut Alloc, descs: &[FuzzDesc]) {
        if descs.is_empty() {
            return;
        }
        let size = self.size();
        let head = self.next_desc;
        let n = descs.len().min(usize::from(size));
        for (i, d) in descs[..n].iter().enumerate() {
            let index = (head as usize + i) % usize::from(size);
            let mut raw = build(self.mem, alloc, d, Some((i, n, head)));
            if raw.has_next() && d.flags & 8 == 0 {
                raw = Descriptor::new(raw.addr().0, raw.len(), raw.flags(), raw.next() % size);
            }
            self.q.store(index as u16, raw);
        }
        self.next_desc = ((head as usize + n) % usize::from(size)) as u16;
        self.publish(&[head]);
    }

    /// Appends `heads` to the available ring and moves its index.
    pub fn publish(&mut self, heads: &[u16]) {
        let mut idx = self.q.avail_idx();
        for &h in heads {
            self.q.set_avail_entry(idx, h);
            idx = idx.wrapping_add(1);
            self.published += 1;
        }
        self.q.set_avail_idx(idx);
    }

    /// Moves the available index by `delta` without writing entries
    /// (whatever the ring holds is offered again, or the index jumps).
    pub fn bump_avail_idx(&mut self, delta: u16) {
        let idx = self.q.avail_idx();
        self.q.set_avail_idx(idx.wrapping_add(delta));
        self.published += u64::from(delta);
    }

    /// Writes the available ring's flags (NO_INTERRUPT) and used_event.
    pub fn set_suppression(&mut self, flags: u16, used_event: u16) {
        self.q.set_avail_flags(flags);
        self.q.set_used_event(used_event);
    }

    /// How many entries the device has put in the used ring.
    pub fn used_idx(&self) -> u16 {
        self.q.used_idx()
    }

    /// Available entries offered since the queue was laid out.
    pub fn published(&self) -> u64 {
        self.published
    }

    /// Checks the device's used ring: it never returns more chains than
    /// the driver offered, and the `new` latest ids are table indexes.
    /// Only meaningful while no buffer overlaps a used ring (see
    /// [`Alloc::tainted`]).
    pub fn check_used(&self, used_total: u64, new: u64) {
        assert!(
            used_total <= self.published,
            "device used {used_total} chains but only {} were offered",
            self.published
        );
        let size = self.size();
        let idx = self.used_idx();
        for k in 0..new.min(u64::from(size)) {
            let (id, _) = self.q.used_entry(idx.wrapping_sub(1 + k as u16));
            assert!(
                id < u32::from(size),
                "used ring names descriptor {id} outside a queue of {size}"
            );
        }
    }
}

/// Counts used entries across the device's wrapping used index.
#[derive(Debug, Default)]
pub struct UsedCounter {
    last: u16,
    total: u64,
}

impl UsedCounter {
    /// Adds the entries the device used since the last call; returns the
    /// total and how many are new.
    pub fn update(&mut self, idx: u16) -> (u64, u64) {
        let new = u64::from(idx.wrapping_sub(self.last));
        self.total += new;
        self.last = idx;
        (self.total, new)
    }
}
