//! The virtio-blk backend on the VMM thread: the thin queue loop that
//! pops chains, has them parsed and executed, answers completions and
//! interrupts the guest.
//!
//! ```text
//!   new ──► inactive ──activate──► active ──process_queue / complete──► active
//!              ▲                     │  bad queue state: NEEDS_RESET, queue stops
//!              └──────── reset ◄─────┘  (in-flight ops orphaned, results dropped)
//! ```

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::{error, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::executor::{
    encode_tag, tag_queue, InFlight, NotSubmitted, PendingKind, Taken, GEN_MASK,
};
use super::request::{self, DiskLimits, Operation, Request};
use super::{
    config_bytes, features, set_capacity, BlockCounters, DEVICE_TYPE, ID_BYTES, NUM_QUEUES,
    QUEUE_MAX_SIZE, SECTOR_SHIFT,
};
use crate::io::{InterruptLine, IoSubmit};
use crate::virtio::{
    Activation, DeviceShared, Interrupt, QueueConfigError, VirtioBackend, VirtioDeviceInfo,
    F_EVENT_IDX, F_VERSION_1,
};

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

/// Errors the VMM thread sees from the block device. Request-level
/// problems never surface here: they become status bytes for the guest.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The driver negotiated features we did not offer.
    #[error("driver features {0:#x} were not offered")]
    BadFeatures(u64),
    /// Activation named a different number of queues.
    #[error("activation has {0} queues, expected {NUM_QUEUES}")]
    QueueCount(usize),
    /// A required queue is not enabled.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// A queue's layout is invalid.
    #[error("queue {0}: {1}")]
    QueueConfig(usize, #[source] QueueConfigError),
    /// No such queue index.
    #[error("no queue {0}")]
    NoSuchQueue(usize),
    /// The queue is corrupt; the device asked the driver for a reset.
    #[error("queue {0} needs a reset: {1}")]
    QueueBroken(usize, String),
    /// A backing file swap while the previous old file still has I/O in flight.
    #[error("previous disk still has I/O in flight")]
    SwapBusy,
    /// Reading the backing file's size failed.
    #[error("cannot size the backing file: {0}")]
    Size(#[source] io::Error),
}

/// What one [`BlockDevice::process_queue`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessOutcome {
    /// Chains taken from the available ring.
    pub popped: u16,
    /// Ops handed to the ring.
    pub submitted: u16,
    /// The drain stopped at its budget (the queue size) with requests
    /// possibly left: call `process_queue` again on the next loop turn.
    pub more: bool,
    /// No free slot or a full ring stopped the drain; the chain was put
    /// back. Call `process_queue` again after completions are delivered.
    pub blocked: bool,
}

#[derive(Debug)]
struct QueueState {
    max: u16,
    queue: Option<Queue>,
    inflight: InFlight,
    /// Corrupt; nothing more is popped until reset.
    broken: bool,
    /// Used entries were added since the last interrupt decision.
    signal_pending: bool,
}

/// A virtio-blk device backend, owned by the VMM thread.
///
/// # Example
///
/// ```
/// use devices::virtio::block::{BlockConfig, BlockDevice};
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
/// assert_eq!(dev.info().device_type, 2);
/// ```
#[derive(Debug)]
pub struct BlockDevice {
    disk: File,
    /// A swapped-out disk kept open until the ops that name it complete.
    retired: Option<File>,
    read_only: bool,
    flush: bool,
    batch_interrupts: bool,
    id: [u8; ID_BYTES],
    capacity_sectors: u64,
    irq: Interrupt,
    acked_features: u64,
    activated: bool,
    generation: u32,
    queues: Vec<QueueState>,
    counters: BlockCounters,
}

fn disk_sectors(file: &File) -> Result<u64, BlockError> {
    // Seeking works for block devices too, where metadata().len() is 0.
    let mut f = file;
    let size = f.seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
    Ok(size >> SECTOR_SHIFT)
}

/// Everything a request needs besides its queue.
struct Ctx<'a> {
    qidx: usize,
    generation: u32,
    fd: std::os::fd::RawFd,
    limits: DiskLimits,
    id: &'a [u8; ID_BYTES],
    counters: &'a mut BlockCounters,
}

/// Writes the status byte and returns the chain to the driver.
fn answer<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    head: u16,
    status: Option<(GuestAddress, u8)>,
    used_len: u32,
) -> Result<(), virtio_queue::Error> {
    if let Some((addr, byte)) = status {
        // The address was checked at parse time; a failure here means the
        // memory map changed, and the used entry still must go back.
        if let Err(e) = mem.write_obj(byte, addr) {
            warn!("virtio-blk: status write at {:#x} failed: {e}", addr.0);
        }
    }
    queue.add_used(mem, head, used_len)
}

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
            disk: config.file,
            retired: None,
            read_only: config.read_only,
            flush: config.flush,
            batch_interrupts: false,
            id,
            capacity_sectors,
            irq: Interrupt::new(shared, line),
            acked_features: 0,
            activated: false,
            generation: 0,
            queues: (0..NUM_QUEUES)
                .map(|_| QueueState {
                    max: QUEUE_MAX_SIZE,
                    queue: None,
                    inflight: InFlight::new(QUEUE_MAX_SIZE),
                    broken: false,
                    signal_pending: false,
                })
                .collect(),
            counters: BlockCounters::default(),
        })
    }

    /// What the transport presents to the driver.
    pub fn info(&self) -> VirtioDeviceInfo {
        VirtioDeviceInfo {
            device_type: DEVICE_TYPE,
            avail_features: features(self.read_only, self.flush),
            queue_max_sizes: self.queues.iter().map(|q| q.max).collect(),
            shared: self.irq.shared().clone(),
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Counters since the device was made.
    pub fn counters(&self) -> BlockCounters {
        self.counters
    }

    /// Features the driver acknowledged at the last activation.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver activated the device and no reset followed.
    pub fn is_active(&self) -> bool {
        self.activated
    }

    /// Ops the kernel may still be working on. The VMM must not drop the
    /// device (or unmap guest memory) before this reaches 0; if it does,
    /// the device leaks its iovec arrays and files rather than free them.
    pub fn in_flight(&self) -> usize {
        self.queues.iter().map(|q| q.inflight.outstanding()).sum()
    }

    fn limits(&self) -> DiskLimits {
        DiskLimits {
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
            flush: self.flush,
        }
    }

    fn activate_queues<M: GuestMemory>(
        &mut self,
        mem: &M,
        activation: &Activation,
    ) -> Result<(), BlockError> {
        let f = activation.features;
        if f & !features(self.read_only, self.flush) != 0 || f & F_VERSION_1 == 0 {
            return Err(BlockError::BadFeatures(f));
        }
        if activation.queues.len() != self.queues.len() {
            return Err(BlockError::QueueCount(activation.queues.len()));
        }
        let event_idx = f & F_EVENT_IDX != 0;
        let mut built = Vec::with_capacity(self.queues.len());
        for (i, (cfg, state)) in activation.queues.iter().zip(&self.queues).enumerate() {
            if !cfg.ready {
                return Err(BlockError::QueueNotReady(i));
            }
            let q = cfg
                .build(state.max, event_idx, mem)
                .map_err(|e| BlockError::QueueConfig(i, e))?;
            built.push(q);
        }
        for (state, q) in self.queues.iter_mut().zip(built) {
            state.queue = Some(q);
            state.broken = false;
        }
        self.acked_features = f;
        self.activated = true;
        Ok(())
    }

    /// Device reset: drops the queues and forgets in-flight requests,
    /// whose completions will be ignored when they arrive.
    pub fn reset(&mut self) {
        for q in &mut self.queues {
            q.queue = None;
            q.broken = false;
            q.inflight.orphan_all();
        }
        self.generation = self.generation.wrapping_add(1) & GEN_MASK;
        self.acked_features = 0;
        self.activated = false;
    }

    fn ask_for_reset(&mut self) {
        self.counters.needs_reset += 1;
        if let Err(e) = self.irq.needs_reset() {
            error!("virtio-blk: raising the config interrupt failed: {e}");
        }
    }

    /// Marks queue `qidx` corrupt and asks the driver for a reset.
    fn break_queue(&mut self, qidx: usize, why: String) -> BlockError {
        if let Some(q) = self.queues.get_mut(qidx) {
            q.broken = true;
        }
        error!("virtio-blk: queue {qidx} is corrupt, device needs reset: {why}");
        self.ask_for_reset();
        BlockError::QueueBroken(qidx, why)
    }

    fn signal_used<M: GuestMemory>(&mut self, qidx: usize, mem: &M) {
        let Some(queue) = self.queues.get_mut(qidx).and_then(|q| q.queue.as_mut()) else {
            return;
        };
        match crate::virtio::queue::driver_wants_interrupt(queue, mem) {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = self.irq.used_buffer() {
                    error!("virtio-blk: interrupt failed: {e}");
                }
            }
            Err(e) => warn!("virtio-blk: reading used_event failed: {e}"),
        }
    }

    /// Drains up to one queue's worth of requests from queue `qidx`:
    /// answers what can be answered at once (errors, GET_ID) and submits
    /// one op per remaining request to `io`. Call it when the queue's kick
    /// fires, and again as [`ProcessOutcome`] asks.
    pub fn process_queue<M: GuestMemory>(
        &mut self,
        qidx: usize,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, BlockError> {
        let limits = self.limits();
        let Some(state) = self.queues.get_mut(qidx) else {
            return Err(BlockError::NoSuchQueue(qidx));
        };
        let mut out = ProcessOutcome::default();
        let mut used = 0u32;
        let QueueState {
            queue: Some(queue),
            inflight,
            broken: false,
            ..
        } = state
        else {
            return Ok(out);
        };
        let mut ctx = Ctx {
            qidx,
            generation: self.generation,
            fd: self.disk.as_raw_fd(),
            limits,
            id: &self.id,
            counters: &mut self.counters,
        };
        let budget = queue.size();
        let broken: Option<String> = 'drain: loop {
            if let Err(e) = queue.disable_notification(mem) {
                break 'drain Some(format!("disabling notifications: {e}"));
            }
            while out.popped < budget {
                let chain = match queue.iter(mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => break 'drain Some(e.to_string()),
                };
                let Some(chain) = chain else {
                    break;
                };
                out.popped += 1;
                ctx.counters.requests += 1;
                let head = chain.head_index();
                if head >= queue.size() {
                    break 'drain Some(format!("head index {head} outside the queue"));
                }
                if inflight.head_in_flight(head) {
                    break 'drain Some(format!("head index {head} is already in flight"));
                }
                match handle_chain(&mut ctx, queue, inflight, mem, io, head, chain) {
                    Ok(Handled::Submitted) => out.submitted += 1,
                    Ok(Handled::Answered) => used += 1,
                    Ok(Handled::Blocked) => {
                        queue.go_to_previous_position();
                        ctx.counters.requests -= 1;
                        out.popped -= 1;
                        out.blocked = true;
                        break 'drain None;
                    }
                    Err(e) => break 'drain Some(format!("used ring: {e}")),
                }
            }
            if out.popped >= budget {
                out.more = true;
                break 'drain None;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break 'drain None,
                Err(e) => break 'drain Some(format!("enabling notifications: {e}")),
            }
        };
        if used > 0 {
            self.signal_used(qidx, mem);
        }
        match broken {
            Some(why) => Err(self.break_queue(qidx, why)),
            None => Ok(out),
        }
    }

    /// Answers the op tagged `tag` with the CQE result `res` (bytes, or
    /// -errno). Unknown and pre-reset tags are ignored.
    pub fn complete<M: GuestMemory>(&mut self, tag: u64, res: i32, mem: &M) {
        let qidx = tag_queue(tag);
        let Some(state) = self.queues.get_mut(qidx) else {
            warn!("virtio-blk: completion for unknown queue (tag {tag:#x})");
            return;
        };
        let pending = match state.inflight.take(tag) {
            None => {
                warn!("virtio-blk: completion for unknown tag {tag:#x}");
                return;
            }
            Some(Taken::Stale) => {
                self.drop_retired_if_idle();
                return;
            }
            Some(Taken::Live(p)) => p,
        };
        let done = u64::try_from(res).ok();
        let ok = match pending.kind {
            PendingKind::Read | PendingKind::Write => done == Some(pending.expected),
            PendingKind::Flush | PendingKind::Discard | PendingKind::WriteZeroes => res == 0,
        };
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
            warn!("virtio-blk: {:?} failed: result {res}", pending.kind);
        }
        // Bytes the device wrote into device-writable buffers, plus status.
        let written = if pending.kind == PendingKind::Read {
            transferred as u32
        } else {
            0
        };
        let answered = match state.queue.as_mut() {
            Some(queue) => answer(
                queue,
                mem,
                pending.head,
                Some((pending.status, status)),
                written.saturating_add(1),
            ),
            None => Ok(()),
        };
        self.drop_retired_if_idle();
        match answered {
            Ok(()) if self.batch_interrupts => {
                if let Some(q) = self.queues.get_mut(qidx) {
                    q.signal_pending = true;
                }
            }
            Ok(()) => self.signal_used(qidx, mem),
            Err(e) => {
                let _ = self.break_queue(qidx, format!("used ring: {e}"));
            }
        }
    }

    /// Completions no longer decide on an interrupt one by one: the VMM
    /// calls [`Self::flush_interrupts`] once per loop turn, so a batch of
    /// completions costs at most one irqfd write per queue.
    pub fn set_batch_interrupts(&mut self, on: bool) {
        self.batch_interrupts = on;
    }

    /// Signals every queue that got used entries since the last call, if
    /// the driver wants it (EVENT_IDX / NO_INTERRUPT).
    pub fn flush_interrupts<M: GuestMemory>(&mut self, mem: &M) {
        for qidx in 0..self.queues.len() {
            let pending = self
                .queues
                .get_mut(qidx)
                .map(|q| std::mem::take(&mut q.signal_pending))
                .unwrap_or(false);
            if pending {
                self.signal_used(qidx, mem);
            }
        }
    }

    fn drop_retired_if_idle(&mut self) {
        if self.retired.is_some() && self.in_flight() == 0 {
            self.retired = None;
        }
    }

    /// Replaces the backing file (e.g. PATCH /drives): updates capacity,
    /// bumps the config generation and raises a config-change interrupt.
    /// The old file stays open until the ops that use it complete.
    pub fn swap_disk(&mut self, file: File) -> Result<(), BlockError> {
        self.drop_retired_if_idle();
        if self.retired.is_some() {
            return Err(BlockError::SwapBusy);
        }
        let sectors = disk_sectors(&file)?;
        let old = std::mem::replace(&mut self.disk, file);
        if self.in_flight() > 0 {
            self.retired = Some(old);
        }
        self.capacity_sectors = sectors;
        self.irq
            .shared()
            .update_config(|c| set_capacity(c, sectors));
        if let Err(e) = self.irq.config_changed() {
            error!("virtio-blk: config interrupt failed: {e}");
        }
        Ok(())
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        if self.in_flight() > 0 {
            // At VMM exit the ring is dropped first and has already waited for
            // (cancelled) every op, so this is expected there and harmless.
            log::debug!("virtio-blk: dropped with I/O in flight; leaking its files");
            // The kernel may still use these fds' numbers via queued ops;
            // closing them could redirect I/O to a file opened later.
            if let Ok(f) = self.disk.try_clone() {
                std::mem::forget(std::mem::replace(&mut self.disk, f));
            }
            std::mem::forget(self.retired.take());
        }
    }
}

enum Handled {
    Submitted,
    Answered,
    Blocked,
}

/// Parses, checks and executes one chain.
fn handle_chain<M: GuestMemory>(
    ctx: &mut Ctx<'_>,
    queue: &mut Queue,
    inflight: &mut InFlight,
    mem: &M,
    io: &mut dyn IoSubmit,
    head: u16,
    chain: virtio_queue::DescriptorChain<&M>,
) -> Result<Handled, virtio_queue::Error> {
    let req = match request::parse(chain, mem, &ctx.limits).and_then(|r| {
        match request::check_request(&r, &ctx.limits) {
            Ok(()) => Ok(r),
            Err(error) => Err(request::ParseError {
                status: Some(r.status),
                error,
            }),
        }
    }) {
        Ok(r) => r,
        Err(e) => {
            ctx.counters.errors += 1;
            // A guest can send bad requests as fast as it likes: they are
            // counted, and logged only at debug level.
            log::debug!("virtio-blk: request refused: {}", e.error);
            let status = e.status.map(|a| (a, e.error.status()));
            let len = u32::from(status.is_some());
            answer(queue, mem, head, status, len)?;
            return Ok(Handled::Answered);
        }
    };
    match req.op {
        Operation::GetId => {
            let written = write_id(mem, &req, ctx.id);
            answer(
                queue,
                mem,
                head,
                Some((req.status, VIRTIO_BLK_S_OK as u8)),
                written + 1,
            )?;
            return Ok(Handled::Answered);
        }
        Operation::Read { .. } | Operation::Write { .. } if req.data_len == 0 => {
            answer(
                queue,
                mem,
                head,
                Some((req.status, VIRTIO_BLK_S_OK as u8)),
                1,
            )?;
            return Ok(Handled::Answered);
        }
        _ => {}
    }
    let (qidx, generation) = (ctx.qidx as u8, ctx.generation);
    match inflight.submit(mem, io, ctx.fd, head, &req, |slot| {
        encode_tag(qidx, generation, slot)
    }) {
        Ok(()) => Ok(Handled::Submitted),
        Err(NotSubmitted::Blocked) => Ok(Handled::Blocked),
        Err(NotSubmitted::Failed(e)) => {
            ctx.counters.errors += 1;
            warn!("virtio-blk: request failed before I/O: {e}");
            answer(
                queue,
                mem,
                head,
                Some((req.status, VIRTIO_BLK_S_IOERR as u8)),
                1,
            )?;
            Ok(Handled::Answered)
        }
    }
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

impl VirtioBackend for BlockDevice {
    type Error = BlockError;

    fn is_active(&self) -> bool {
        self.activated
    }

    fn try_activate<M: GuestMemory>(
        &mut self,
        mem: &M,
        activation: &Activation,
    ) -> Result<(), BlockError> {
        self.activate_queues(mem, activation)
    }

    fn drop_queues(&mut self) {
        self.reset();
    }

    fn request_reset(&mut self) {
        self.ask_for_reset();
    }

    fn interrupt(&self) -> &Interrupt {
        &self.irq
    }
}
