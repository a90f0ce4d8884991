//! The virtio-blk device: the thin queue loop that pops chains, has them
//! parsed and executed, answers completions, and owns the backing files.
//!
//! ```text
//!   new ──► inactive ──activate──► active ──process_queue / complete──► active
//!              ▲                     │  bad queue state: NEEDS_RESET, queue stops
//!              └──────── reset ◄─────┘  (in-flight ops orphaned; the VMM reports
//!                                        the reset done once they completed)
//! ```
//!
//! # Swapping the backing file (PATCH /drives)
//!
//! The old file is *retired*, not closed: ops that name it keep running, and
//! writes the guest was told are done may still sit in the host's page
//! cache. Each file carries an epoch; a retired file is closed once no op
//! names it and, on a flushing drive, once a FLUSH has synced it. A FLUSH
//! therefore syncs the current file and then every retired file not yet
//! synced, one op after the other in the FLUSH's own slot, before the
//! guest hears it is done: no acknowledged write is ever left behind.
//!
//! # FLUSH is a barrier
//!
//! Completions come back in any order, so an fsync submitted while an
//! earlier write is still in the kernel could finish first and leave that
//! write out. A FLUSH therefore waits, parked in the device (not in the
//! kernel), until every write submitted before it has completed; only then
//! is its fsync submitted. A guest that does not wait for its writes before
//! flushing is still safe. Writes that arrive after the FLUSH do not delay
//! it.

use std::any::Any;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::executor::{prepare, Pending, PendingKind};
use super::punt::Punt;
use super::request::{self, DiskLimits, Operation, Request};
use super::{
    config_bytes, features, set_capacity, BlockCounters, DEVICE_TYPE, ID_BYTES, NUM_QUEUES,
    QUEUE_MAX_SIZE, SECTOR_SHIFT,
};
use crate::guest_log::GuestLog;
use crate::io::{InterruptLine, IoHint, IoOp, IoSubmit, IoSubmitError};
use crate::rate_limiter::DeviceRateLimiter;
use crate::virtio::{
    drain_queue, ChainTaken, DeviceError, DeviceShared, Generation, InFlight, Interrupt,
    LimiterSide, ProcessOutcome, Taken, Throttle, VirtioDevice, Virtqueues,
};

/// Retired files kept at most; a further swap waits (SwapBusy) until the
/// guest's I/O or a FLUSH lets one go, so an API client cannot pile up fds.
pub const MAX_RETIRED_DISKS: usize = 8;

/// What a drive is made of.
#[derive(Debug)]
pub struct BlockConfig {
    /// The backing file (regular file or block device), opened by the VMM
    /// with the access mode `read_only` implies.
    pub file: File,
    /// Refuse writes (and offer VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Offer FLUSH and honour it with fdatasync; false for `cache=unsafe`.
    pub flush: bool,
    /// Serial returned by GET_ID; truncated to 20 bytes.
    pub id: String,
}

/// Errors building a drive or swapping its file. Request-level problems
/// never surface here: they become status bytes for the guest.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Too many swapped-out files still wait for their I/O or a FLUSH.
    #[error(
        "{MAX_RETIRED_DISKS} previous disk files still have I/O in flight or unflushed writes"
    )]
    SwapBusy,
    /// Reading the backing file's size failed.
    #[error("cannot size the backing file: {0}")]
    Size(#[source] io::Error),
}

/// A backing file and what still depends on it.
#[derive(Debug)]
struct Disk {
    file: File,
    epoch: u32,
    /// Ops in the kernel that name this file.
    ops: usize,
    /// Writes may have completed since its last successful sync.
    dirty: bool,
    /// Which of its reads and writes go straight to io-wq.
    punt: Punt,
}

/// The request a slot serves, and where a FLUSH is in its walk over the
/// retired files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockPending {
    req: Pending,
    /// Epoch of the file the op runs on.
    epoch: u32,
    /// For a write: its place in submission order.
    write_seq: Option<u64>,
}

/// A FLUSH waiting for the writes submitted before it.
#[derive(Debug)]
struct ParkedFlush {
    head: u16,
    req: Request,
    /// Every write with a smaller sequence number must complete first.
    barrier: u64,
}

/// A virtio-blk device, owned by the VMM thread.
///
/// # Example
///
/// ```
/// use devices::virtio::block::{BlockConfig, BlockDevice};
/// use devices::virtio::VirtioDevice;
/// use vm_memory::GuestMemoryMmap;
/// use vmm_sys_util::{eventfd::EventFd, tempfile::TempFile};
///
/// let file = TempFile::new().unwrap().into_file();
/// file.set_len(1 << 20).unwrap();
/// let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
/// let dev = BlockDevice::new(
///     BlockConfig { file, read_only: false, flush: true, id: "disk0".into() },
///     Box::new(irqfd),
/// )
/// .unwrap();
/// assert_eq!(dev.capacity_sectors(), 2048);
/// assert_eq!(VirtioDevice::<GuestMemoryMmap>::info(&dev).device_type, 2);
/// ```
#[derive(Debug)]
pub struct BlockDevice {
    disk: Disk,
    /// Swapped-out files kept open until their ops complete and (when the
    /// drive flushes) a FLUSH has synced them.
    retired: Vec<Disk>,
    next_epoch: u32,
    read_only: bool,
    flush: bool,
    id: [u8; ID_BYTES],
    capacity_sectors: u64,
    queues: Virtqueues,
    generation: Generation,
    inflight: InFlight<BlockPending>,
    /// Sequence number the next write gets.
    next_write_seq: u64,
    /// FLUSHes waiting for earlier writes, oldest first (at most a queue's
    /// worth: each holds a chain).
    parked_flushes: std::collections::VecDeque<ParkedFlush>,
    /// Keeps the parser's vectors from one request to the next.
    parser: request::Parser,
    counters: BlockCounters,
    log: GuestLog,
    /// Bandwidth (bytes read or written) and ops (requests) limits.
    limiter: DeviceRateLimiter,
    /// A throttle for the slot to arm (see [`VirtioDevice::take_throttle`]).
    throttle: Option<Throttle>,
}

fn disk_sectors(file: &File) -> Result<u64, BlockError> {
    // Seeking works for block devices too, where metadata().len() is 0.
    let mut f = file;
    let size = f.seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
    Ok(size >> SECTOR_SHIFT)
}

/// The one request queue.
const REQUEST_QUEUE: usize = 0;

impl BlockDevice {
    /// Builds an inactive device; `line` is the irqfd the VMM wired to the
    /// device's interrupt.
    pub fn new(config: BlockConfig, line: Box<dyn InterruptLine>) -> Result<Self, BlockError> {
        let capacity_sectors = disk_sectors(&config.file)?;
        let shared = Arc::new(DeviceShared::new(
            config_bytes(capacity_sectors),
            Vec::new(),
        ));
        let mut id = [0u8; ID_BYTES];
        let src = config.id.as_bytes();
        let n = src.len().min(ID_BYTES);
        id[..n].copy_from_slice(&src[..n]);
        Ok(Self {
            disk: Disk {
                punt: Punt::for_file(&config.file),
                file: config.file,
                epoch: 0,
                ops: 0,
                dirty: false,
            },
            retired: Vec::new(),
            next_epoch: 1,
            read_only: config.read_only,
            flush: config.flush,
            id,
            capacity_sectors,
            queues: Virtqueues::new(
                "virtio-blk",
                &[QUEUE_MAX_SIZE; NUM_QUEUES],
                Interrupt::new(shared, line),
            ),
            generation: Generation::default(),
            inflight: InFlight::new(REQUEST_QUEUE as u8, QUEUE_MAX_SIZE),
            next_write_seq: 0,
            parked_flushes: std::collections::VecDeque::new(),
            parser: request::Parser::default(),
            counters: BlockCounters::default(),
            log: GuestLog::new("virtio-blk"),
            limiter: DeviceRateLimiter::default(),
            throttle: None,
        })
    }

    /// Limits the drive's requests (Firecracker's `rate_limiter`): every
    /// request takes one op, reads and writes also their bytes.
    pub fn set_rate_limiter(&mut self, limiter: DeviceRateLimiter) {
        self.limiter = limiter;
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Counters since the device was made.
    pub fn counters(&self) -> BlockCounters {
        BlockCounters {
            needs_reset: self.queues.resets_requested(),
            log_lines_suppressed: self.log.suppressed() + self.queues.log_lines_suppressed(),
            rate_limiter_throttled_events: self.limiter.throttled(),
            ..self.counters
        }
    }

    /// Features the driver acknowledged at the last activation.
    pub fn acked_features(&self) -> u64 {
        self.queues.acked_features()
    }

    /// Swapped-out files still open.
    pub fn retired_disks(&self) -> usize {
        self.retired.len()
    }

    fn limits(&self) -> DiskLimits {
        DiskLimits {
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
            flush: self.flush,
        }
    }

    fn disk_mut(&mut self, epoch: u32) -> Option<&mut Disk> {
        if self.disk.epoch == epoch {
            return Some(&mut self.disk);
        }
        self.retired.iter_mut().find(|d| d.epoch == epoch)
    }

    /// Closes retired files nothing depends on any more.
    fn release_retired(&mut self) {
        let flush = self.flush;
        self.retired.retain(|d| d.ops > 0 || (flush && d.dirty));
    }

    /// The next retired file a FLUSH that just synced file `epoch` must
    /// sync, walking from the current file through the retired ones in the
    /// order they were retired.
    fn next_to_sync(&self, after_epoch: u32) -> Option<(u32, RawFd)> {
        let start = if after_epoch == self.disk.epoch {
            0
        } else {
            self.retired.iter().position(|d| d.epoch == after_epoch)? + 1
        };
        self.retired
            .iter()
            .skip(start)
            .find(|d| d.dirty)
            .map(|d| (d.epoch, d.file.as_raw_fd()))
    }

    /// Replaces the backing file (e.g. PATCH /drives): updates capacity,
    /// bumps the config generation and raises a config-change interrupt.
    /// The old file stays open until the ops that use it complete and the
    /// writes it took are flushed (see the module docs).
    pub fn swap_disk(&mut self, file: File) -> Result<(), BlockError> {
        self.release_retired();
        if self.retired.len() >= MAX_RETIRED_DISKS {
            return Err(BlockError::SwapBusy);
        }
        let sectors = disk_sectors(&file)?;
        let epoch = self.next_epoch;
        self.next_epoch = self.next_epoch.wrapping_add(1);
        let old = std::mem::replace(
            &mut self.disk,
            Disk {
                punt: Punt::for_file(&file),
                file,
                epoch,
                ops: 0,
                dirty: false,
            },
        );
        self.retired.push(old);
        self.release_retired();
        self.capacity_sectors = sectors;
        let irq = self.queues.interrupt();
        irq.shared().update_config(|c| set_capacity(c, sectors));
        if let Err(e) = irq.config_changed() {
            log::error!("virtio-blk: config interrupt failed: {e}");
        }
        Ok(())
    }

    /// Parses, checks and executes one chain.
    fn take_chain<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        io: &mut dyn IoSubmit,
        head: u16,
        chain: DescriptorChain<&M>,
    ) -> Result<ChainTaken, String> {
        if self.inflight.head_in_flight(head) || self.parked_flushes.iter().any(|p| p.head == head)
        {
            return Err(format!("head index {head} is already in flight"));
        }
        self.counters.requests += 1;
        let limits = self.limits();
        let parsed = match self.parser.parse(chain, mem, &limits) {
            Ok(r) => match request::check_request(&r, &limits) {
                Ok(()) => Ok(r),
                Err(error) => {
                    let status = Some(r.status);
                    self.parser.recycle(r);
                    Err(request::ParseError { status, error })
                }
            },
            Err(e) => Err(e),
        };
        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                self.counters.errors += 1;
                // A guest can send bad requests as fast as it likes: they
                // are counted, and logged at a bounded rate.
                self.log
                    .warn("refused", format_args!("request refused: {}", e.error));
                let status = e.status.map(|a| (a, e.error.status()));
                let len = u32::from(status.is_some());
                answer(queue, mem, head, status, len)?;
                return Ok(ChainTaken::Answered);
            }
        };
        // Bandwidth counts the data moved, not its position on the disk.
        let bytes = match req.op {
            Operation::Read { .. } | Operation::Write { .. } => req.data_len,
            _ => 0,
        };
        if !self.limiter.is_unlimited() {
            if let Err(wait) = self.limiter.try_consume(bytes, 1) {
                self.counters.requests -= 1;
                self.throttle = Some(Throttle {
                    queue: REQUEST_QUEUE,
                    resume_after: wait,
                });
                return Ok(ChainTaken::Throttled);
            }
        }
        let ok = VIRTIO_BLK_S_OK as u8;
        match req.op {
            Operation::GetId => {
                let written = write_id(mem, &req, &self.id);
                let status = req.status;
                self.parser.recycle(req);
                answer(queue, mem, head, Some((status, ok)), written + 1)?;
                return Ok(ChainTaken::Answered);
            }
            Operation::Read { .. } | Operation::Write { .. } if req.data_len == 0 => {
                let status = req.status;
                self.parser.recycle(req);
                answer(queue, mem, head, Some((status, ok)), 1)?;
                return Ok(ChainTaken::Answered);
            }
            Operation::Flush if self.must_wait(self.next_write_seq) => {
                // Held in the device until the writes before it complete;
                // bounded, as each holds one of the queue's heads.
                let barrier = self.next_write_seq;
                self.parked_flushes
                    .push_back(ParkedFlush { head, req, barrier });
                return Ok(ChainTaken::Submitted);
            }
            _ => {}
        }
        let submitted = self.submit(mem, io, head, &req);
        let status = req.status;
        self.parser.recycle(req);
        match submitted {
            Ok(true) => Ok(ChainTaken::Submitted),
            Ok(false) => {
                self.counters.requests -= 1;
                self.limiter.refund(bytes, 1);
                Ok(ChainTaken::PutBack)
            }
            Err(e) => {
                self.counters.errors += 1;
                self.log.warn(
                    "not-submitted",
                    format_args!("request failed before I/O: {e}"),
                );
                let status = Some((status, VIRTIO_BLK_S_IOERR as u8));
                answer(queue, mem, head, status, 1)?;
                Ok(ChainTaken::Answered)
            }
        }
    }

    /// Submits `req`'s op; `Ok(false)` when there is no room now.
    fn submit<M: GuestMemory>(
        &mut self,
        mem: &M,
        io: &mut dyn IoSubmit,
        head: u16,
        req: &Request,
    ) -> Result<bool, super::executor::ExecuteError> {
        let fd = self.disk.file.as_raw_fd();
        let epoch = self.disk.epoch;
        let Some((slot, iovecs)) = self.inflight.reserve(self.generation) else {
            return Ok(false);
        };
        let (op, pending) = match prepare(mem, fd, req, iovecs) {
            Ok(v) => v,
            Err(e) => {
                self.inflight.release(slot);
                return Err(e);
            }
        };
        let hint = match pending.kind {
            PendingKind::Read => self.disk.punt.hint(false),
            PendingKind::Write => self.disk.punt.hint(true),
            _ => IoHint::Inline,
        };
        // SAFETY: the iovec array lives in this slot of the in-flight
        // table, which is neither touched nor freed until `take` sees this
        // tag's completion (a reset only orphans the slot, and dropping the
        // table with ops in flight leaks the arrays). The buffers are guest
        // memory, mapped for the VM's life and checked by `prepare` to lie
        // inside it. `fd` is a file of this device, kept open while any op
        // names its epoch.
        match unsafe { io.submit_hinted(op, slot.tag, hint) } {
            Ok(()) => {
                let write_seq = pending.kind.writes().then(|| {
                    let seq = self.next_write_seq;
                    self.next_write_seq += 1;
                    seq
                });
                self.inflight.commit(
                    slot,
                    head,
                    BlockPending {
                        req: pending,
                        epoch,
                        write_seq,
                    },
                );
                self.disk.ops += 1;
                Ok(true)
            }
            Err(IoSubmitError::QueueFull) => {
                self.inflight.release(slot);
                Ok(false)
            }
            Err(e) => {
                self.inflight.release(slot);
                Err(super::executor::ExecuteError::Submit(e))
            }
        }
    }

    /// Whether a FLUSH with this barrier must wait: a write submitted
    /// before it is still in the kernel. A scan of the in-flight table
    /// (bounded by the queue size), made only when a FLUSH arrives or one
    /// is parked, so writes themselves pay nothing for the barrier.
    fn must_wait(&self, barrier: u64) -> bool {
        self.inflight
            .pending()
            .any(|p| p.write_seq.is_some_and(|seq| seq < barrier))
    }

    /// Submits the parked FLUSHes whose earlier writes have all completed,
    /// oldest first; one that finds no room waits for the next completion.
    fn release_flushes<M: GuestMemory>(&mut self, mem: &M, io: &mut dyn IoSubmit) {
        while let Some(front) = self.parked_flushes.front() {
            if self.must_wait(front.barrier) {
                return;
            }
            let Some(flush) = self.parked_flushes.pop_front() else {
                return;
            };
            match self.submit(mem, io, flush.head, &flush.req) {
                Ok(true) => {}
                Ok(false) => {
                    self.parked_flushes.push_front(flush);
                    return;
                }
                Err(e) => {
                    self.counters.errors += 1;
                    self.log.warn(
                        "not-submitted",
                        format_args!("flush failed before I/O: {e}"),
                    );
                    let pending = Pending {
                        status: flush.req.status,
                        kind: PendingKind::Flush,
                        expected: 0,
                    };
                    self.respond(flush.head, pending, VIRTIO_BLK_S_IOERR as u8, 0, mem);
                }
            }
        }
    }

    /// A FLUSH that synced file `epoch` moves on to the next retired file
    /// that needs it; returns true if it did (the request stays in flight).
    fn continue_flush(
        &mut self,
        io: &mut dyn IoSubmit,
        head: u16,
        pending: BlockPending,
    ) -> Result<bool, IoSubmitError> {
        let Some((epoch, fd)) = self.next_to_sync(pending.epoch) else {
            return Ok(false);
        };
        let Some((slot, _)) = self.inflight.reserve(self.generation) else {
            return Err(IoSubmitError::QueueFull);
        };
        let op = IoOp::Fsync { fd, datasync: true };
        // SAFETY: an fsync carries no buffer; `fd` is a retired file kept
        // open while an op names its epoch (counted below).
        match unsafe { io.submit(op, slot.tag) } {
            Ok(()) => {
                self.inflight.commit(
                    slot,
                    head,
                    BlockPending {
                        req: pending.req,
                        epoch,
                        write_seq: None,
                    },
                );
                if let Some(d) = self.disk_mut(epoch) {
                    d.ops += 1;
                }
                Ok(true)
            }
            Err(e) => {
                self.inflight.release(slot);
                Err(e)
            }
        }
    }

    /// Judges a completed op and answers its chain.
    fn finish<M: GuestMemory>(
        &mut self,
        head: u16,
        p: BlockPending,
        res: i32,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) {
        let pending = p.req;
        let done = u64::try_from(res).ok();
        let ok = match pending.kind {
            PendingKind::Read | PendingKind::Write => done == Some(pending.expected),
            PendingKind::Flush | PendingKind::Discard | PendingKind::WriteZeroes => res == 0,
        };
        if let Some(d) = self.disk_mut(p.epoch) {
            match pending.kind {
                PendingKind::Write | PendingKind::WriteZeroes | PendingKind::Discard => {
                    d.dirty = true
                }
                PendingKind::Flush if ok => d.dirty = false,
                _ => {}
            }
        }
        if ok && pending.kind == PendingKind::Flush {
            match self.continue_flush(io, head, p) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    // Not durable: the guest must hear it failed.
                    self.counters.errors += 1;
                    self.log
                        .warn("flush", format_args!("flushing a retired file failed: {e}"));
                    self.respond(head, pending, VIRTIO_BLK_S_IOERR as u8, 0, mem);
                    return;
                }
            }
        }
        let status = if ok {
            VIRTIO_BLK_S_OK
        } else if res == -libc::EOPNOTSUPP
            && matches!(
                pending.kind,
                PendingKind::Discard | PendingKind::WriteZeroes
            )
        {
            VIRTIO_BLK_S_UNSUPP
        } else {
            VIRTIO_BLK_S_IOERR
        } as u8;
        let transferred = done.unwrap_or(0).min(pending.expected);
        let c = &mut self.counters;
        match pending.kind {
            PendingKind::Read => c.read_bytes += transferred,
            PendingKind::Write if ok => c.write_bytes += transferred,
            PendingKind::Flush if ok => c.flushes += 1,
            _ => {}
        }
        if !ok {
            c.errors += 1;
            self.log.warn(
                "io-failed",
                format_args!("{:?} failed: result {res}", pending.kind),
            );
        }
        // Bytes the device wrote into device-writable buffers.
        let written = if pending.kind == PendingKind::Read {
            transferred as u32
        } else {
            0
        };
        self.respond(head, pending, status, written, mem);
    }

    /// Writes the status byte and returns the chain to the driver.
    fn respond<M: GuestMemory>(
        &mut self,
        head: u16,
        pending: Pending,
        status: u8,
        written: u32,
        mem: &M,
    ) {
        let Some(queue) = self.queues.queue(REQUEST_QUEUE) else {
            return;
        };
        let answered = answer(
            queue,
            mem,
            head,
            Some((pending.status, status)),
            written.saturating_add(1),
        );
        match answered {
            Ok(()) => self.queues.mark_used(REQUEST_QUEUE),
            Err(why) => {
                let _ = self.queues.break_queue(REQUEST_QUEUE, why);
            }
        }
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        if self.inflight.outstanding() > 0 {
            // At VMM exit the ring is dropped first and has already waited
            // for (cancelled) every op, so this is not expected there.
            log::debug!("virtio-blk: dropped with I/O in flight; leaking its files");
            // Queued ops name these fds' numbers: closing them could
            // redirect I/O to a file opened later.
            if let Ok(f) = self.disk.file.try_clone() {
                std::mem::forget(std::mem::replace(&mut self.disk.file, f));
            }
            std::mem::forget(std::mem::take(&mut self.retired));
        }
    }
}

/// Writes the status byte (if any) and returns the chain to the driver.
fn answer<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    head: u16,
    status: Option<(GuestAddress, u8)>,
    used_len: u32,
) -> Result<(), String> {
    if let Some((addr, byte)) = status {
        // The address was checked at parse time; a failure here means the
        // memory map changed, and the used entry still must go back.
        if let Err(e) = mem.write_obj(byte, addr) {
            log::debug!("virtio-blk: status write at {:#x} failed: {e}", addr.0);
        }
    }
    queue
        .add_used(mem, head, used_len)
        .map_err(|e| format!("used ring: {e}"))
}

/// Copies the zero-padded serial into the request's buffers; returns the
/// bytes written (at most 20).
fn write_id<M: GuestMemory>(mem: &M, req: &Request, id: &[u8; ID_BYTES]) -> u32 {
    let mut done = 0usize;
    for seg in &req.data {
        if done == ID_BYTES {
            break;
        }
        let n = (ID_BYTES - done).min(seg.len as usize);
        let Some(src) = id.get(done..done + n) else {
            break;
        };
        if mem.write_slice(src, seg.addr).is_err() {
            break;
        }
        done += n;
    }
    done as u32
}

impl<M: GuestMemory> VirtioDevice<M> for BlockDevice {
    fn kind(&self) -> &'static str {
        "block"
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        features(self.read_only, self.flush)
    }

    fn queues(&self) -> &Virtqueues {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut Virtqueues {
        &mut self.queues
    }

    fn reset(&mut self) {
        self.queues.reset();
        self.inflight.orphan_all();
        // Parked FLUSHes never reached the kernel; their chains are the old
        // driver's. Orphaned writes still count for later FLUSHes' barriers
        // until they complete.
        self.parked_flushes.clear();
        self.generation.bump();
    }

    fn process_queue(
        &mut self,
        qidx: usize,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, DeviceError> {
        if qidx != REQUEST_QUEUE {
            return Err(DeviceError::NoSuchQueue(qidx));
        }
        drain_queue(
            self,
            |d| &mut d.queues,
            qidx,
            mem,
            |d, q, chain, head| d.take_chain(q, mem, io, head, chain),
        )
    }

    fn complete(&mut self, tag: u64, res: i32, mem: &M, io: &mut dyn IoSubmit) {
        let (head, pending) = match self.inflight.take(tag) {
            None => {
                log::debug!("virtio-blk: completion for unknown tag {tag:#x}");
                return;
            }
            Some(Taken::Live { head, pending }) => (Some(head), pending),
            Some(Taken::Stale { pending }) => (None, pending),
        };
        if let Some(d) = self.disk_mut(pending.epoch) {
            d.ops = d.ops.saturating_sub(1);
        }
        if let Some(head) = head {
            self.finish(head, pending, res, mem, io);
        }
        if !self.parked_flushes.is_empty() {
            self.release_flushes(mem, io);
        }
        self.release_retired();
    }

    fn in_flight(&self) -> usize {
        self.inflight.outstanding()
    }

    fn batch_completions(&self) -> bool {
        true
    }

    fn take_throttle(&mut self) -> Option<Throttle> {
        self.throttle.take()
    }

    fn rate_limiter_mut(&mut self, side: LimiterSide) -> Option<&mut DeviceRateLimiter> {
        (side == LimiterSide::Requests).then_some(&mut self.limiter)
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.counters()).unwrap_or_default()
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
