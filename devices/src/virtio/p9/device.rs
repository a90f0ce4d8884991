//! The virtio-9p device on the VMM thread: the queue loop that turns each
//! chain into one 9P request, has the server answer it, and runs data
//! transfers on the ring straight between host descriptors and guest
//! memory.
//!
//! ```text
//!   new ──► inactive ──activate──► active ──process_queue / complete──► active
//!              ▲                     │  bad queue state: NEEDS_RESET, queue stops
//!              └──────── reset ◄─────┘  (in-flight ops orphaned, results dropped)
//! ```
//!
//! Per chain: the 7-byte header is copied out, then the message (for a
//! Twrite only its 23-byte header: the payload goes from guest memory to
//! the host file by `writev`). Metadata requests are answered at once; a
//! Tread becomes a `readv` into the reply buffers after the 11-byte Rread
//! header, a Twrite a `writev`, a Tfsync an `fsync`, each completed later
//! from its CQE. Transfers on a stream (ringvm's stdio) run one at a time
//! in arrival order, so two writers never interleave inside a write and
//! reads of stdin come back in order.
//!
//! Tflush follows what Linux's virtio transport needs: the flushed
//! request, if it is still in flight, is answered first and Rflush after
//! it (Linux frees a request it sees flushed, so a late reply to it would
//! reach freed memory); a flushed request still waiting for its stream is
//! answered at once with EINTR.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use log::{error, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory, Permissions};

use super::chain::{self, Segment, Streams};
use super::fs::Filesystem;
use super::server::{Action, Server};
use super::wire::{
    self, msg, parse_header, read_reply_header, Reply, Tmessage, HEADER_LEN, READ_REPLY_HEADER_LEN,
    WRITE_HEADER_LEN,
};
use super::{config_bytes, DEVICE_TYPE, F_MOUNT_TAG, MAX_MSIZE, QUEUE_MAX_SIZE};
use crate::io::{InterruptLine, IoOp, IoSubmit, IoSubmitError};
use crate::virtio::{
    Activation, DeviceShared, Interrupt, QueueConfigError, VirtioDeviceInfo, F_EVENT_IDX,
    F_INDIRECT_DESC, F_VERSION_1,
};

/// Features the device offers.
pub const FEATURES: u64 = F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC | F_MOUNT_TAG;

/// Largest non-Twrite message copied out of a chain: a Twalk of 16 names
/// of the longest string the parser takes, with room to spare.
const COPY_CAP: usize = 16 * (2 + wire::MAX_STRING) + 64;

const SLOT_BITS: u32 = 16;
const GEN_MASK: u32 = (1 << 24) - 1;

/// Counters for metrics; the device only adds to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct P9Counters {
    /// Requests popped (good or bad).
    pub requests: u64,
    /// Bytes read from host files into guest memory.
    pub read_bytes: u64,
    /// Bytes written from guest memory to host files.
    pub write_bytes: u64,
    /// Requests answered with Rlerror, or chains returned unanswered.
    pub errors: u64,
    /// Times the device asked the driver for a reset.
    pub needs_reset: u64,
}

/// Errors the VMM thread sees from the device. Request-level problems
/// never surface here: they become Rlerror replies.
#[derive(Debug, thiserror::Error)]
pub enum P9Error {
    /// The driver negotiated features we did not offer.
    #[error("driver features {0:#x} were not offered")]
    BadFeatures(u64),
    /// Activation named a different number of queues.
    #[error("activation has {0} queues, expected 1")]
    QueueCount(usize),
    /// The queue is not enabled.
    #[error("the request queue is not ready")]
    QueueNotReady,
    /// The queue's layout is invalid.
    #[error("request queue: {0}")]
    QueueConfig(#[source] QueueConfigError),
    /// The queue is corrupt; the device asked the driver for a reset.
    #[error("request queue needs a reset: {0}")]
    QueueBroken(String),
}

/// What one [`P9Device::process_queue`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessOutcome {
    /// Chains taken from the available ring.
    pub popped: u16,
    /// The drain stopped at its budget or on a full ring: call again after
    /// this loop turn's completions.
    pub rerun: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Read { count: u32 },
    Write { count: u32 },
    Fsync,
}

/// An op in the kernel's hands, and how to answer it.
#[derive(Debug)]
struct Pending {
    head: u16,
    tag: u16,
    kind: OpKind,
    writable: Vec<Segment>,
    /// The stream this transfer holds, released at completion.
    stream: Option<RawFd>,
}

/// iovecs into guest memory, owned by a slot.
#[derive(Debug, Default)]
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the pointers only name guest memory, shared by every thread of
// the VMM anyway; this type never dereferences them, and the device is
// used by one thread at a time.
unsafe impl Send for Iovecs {}

#[derive(Debug)]
enum SlotState {
    Free,
    Busy(Pending),
    /// Submitted before a reset; waits only for its completion.
    Orphaned,
}

#[derive(Debug)]
struct Slot {
    tag: u64,
    state: SlotState,
    iovecs: Iovecs,
    /// Keeps the host descriptor open until the kernel is done with it.
    file: Option<Arc<OwnedFd>>,
}

/// A transfer waiting for its stream to be free.
#[derive(Debug)]
struct Deferred {
    head: u16,
    tag: u16,
    stream: RawFd,
    streams: Streams,
    action: Action,
}

/// A Tflush waiting for the request it flushes to be answered.
#[derive(Debug)]
struct FlushWait {
    head: u16,
    tag: u16,
    oldtag: u16,
    writable: Vec<Segment>,
}

/// What happened to one chain.
enum Handled {
    Answered,
    Submitted,
    /// No room in the ring: put the chain back, try again later.
    Blocked,
}

/// A virtio-9p device serving one [`Filesystem`].
#[derive(Debug)]
pub struct P9Device<F: Filesystem> {
    server: Server<F>,
    irq: Interrupt,
    queue: Option<Queue>,
    broken: bool,
    used_pending: bool,
    active: bool,
    generation: u32,
    slots: Vec<Slot>,
    /// Heads the device holds (in flight, deferred or flushing).
    heads: Vec<bool>,
    busy: usize,
    orphans: usize,
    /// Streams with a transfer in flight.
    streams_busy: Vec<RawFd>,
    deferred: VecDeque<Deferred>,
    /// A deferred transfer met a full ring: retry at the next drain.
    stalled: bool,
    flushes: Vec<FlushWait>,
    counters: P9Counters,
    reply: Vec<u8>,
}

impl<F: Filesystem> P9Device<F> {
    /// An inactive device serving `fs` under mount tag `tag`; `line` is
    /// the irqfd the VMM wired to the device's interrupt.
    pub fn new(fs: F, tag: &str, line: Box<dyn InterruptLine>) -> Self {
        let shared = Arc::new(DeviceShared::new(config_bytes(tag), Vec::new()));
        let max = usize::from(QUEUE_MAX_SIZE);
        Self {
            server: Server::new(fs, MAX_MSIZE),
            irq: Interrupt::new(shared, line),
            queue: None,
            broken: false,
            used_pending: false,
            active: false,
            generation: 0,
            slots: (0..max)
                .map(|_| Slot {
                    tag: u64::MAX,
                    state: SlotState::Free,
                    iovecs: Iovecs::default(),
                    file: None,
                })
                .collect(),
            heads: vec![false; max],
            busy: 0,
            orphans: 0,
            streams_busy: Vec::new(),
            deferred: VecDeque::new(),
            stalled: false,
            flushes: Vec::new(),
            counters: P9Counters::default(),
            reply: Vec::new(),
        }
    }

    /// What the transport presents to the driver.
    pub fn info(&self) -> VirtioDeviceInfo {
        VirtioDeviceInfo {
            device_type: DEVICE_TYPE,
            avail_features: FEATURES,
            queue_max_sizes: vec![QUEUE_MAX_SIZE],
            shared: self.irq.shared().clone(),
        }
    }

    /// Bounds the fids the guest may hold (each may hold a host
    /// descriptor); past it, walks fail with ENFILE.
    pub fn set_max_fids(&mut self, max: usize) {
        self.server.set_max_fids(max);
    }

    /// The protocol server (for counters and tests).
    pub fn server(&self) -> &Server<F> {
        &self.server
    }

    /// Counters since the device was made.
    pub fn counters(&self) -> P9Counters {
        self.counters
    }

    /// Whether the queue is live.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Ops the kernel may still be working on (live or orphaned). The VMM
    /// must not unmap guest memory before this is 0.
    pub fn in_flight(&self) -> usize {
        self.busy + self.orphans
    }

    /// Takes the queue the driver set up at DRIVER_OK. On error the device
    /// stays inactive and asks the driver for a reset.
    pub fn activate<M: GuestMemory>(
        &mut self,
        mem: &M,
        activation: &Activation,
    ) -> Result<(), P9Error> {
        if self.active {
            self.reset();
        }
        let result = self.try_activate(mem, activation);
        if result.is_err() {
            self.request_reset();
        }
        result
    }

    fn try_activate<M: GuestMemory>(
        &mut self,
        mem: &M,
        activation: &Activation,
    ) -> Result<(), P9Error> {
        let f = activation.features;
        if f & !FEATURES != 0 || f & F_VERSION_1 == 0 {
            return Err(P9Error::BadFeatures(f));
        }
        let [cfg] = activation.queues.as_slice() else {
            return Err(P9Error::QueueCount(activation.queues.len()));
        };
        if !cfg.ready {
            return Err(P9Error::QueueNotReady);
        }
        let q = cfg
            .build(QUEUE_MAX_SIZE, f & F_EVENT_IDX != 0, mem)
            .map_err(P9Error::QueueConfig)?;
        self.queue = Some(q);
        self.broken = false;
        self.used_pending = false;
        self.active = true;
        Ok(())
    }

    /// Device reset: drops the queue, forgets every fid and request; ops
    /// in flight are orphaned and their completions ignored.
    pub fn reset(&mut self) {
        for s in &mut self.slots {
            if let SlotState::Busy(_) = s.state {
                s.state = SlotState::Orphaned;
                self.busy -= 1;
                self.orphans += 1;
            }
        }
        self.heads.fill(false);
        self.deferred.clear();
        self.stalled = false;
        self.flushes.clear();
        self.streams_busy.clear();
        self.server.reset();
        self.queue = None;
        self.broken = false;
        self.used_pending = false;
        self.active = false;
        self.generation = self.generation.wrapping_add(1) & GEN_MASK;
    }

    /// Sets DEVICE_NEEDS_RESET and raises the config interrupt.
    pub fn request_reset(&mut self) {
        self.counters.needs_reset += 1;
        if let Err(e) = self.irq.needs_reset() {
            error!("virtio-9p: raising the config interrupt failed: {e}");
        }
    }

    fn break_queue(&mut self, why: String) -> P9Error {
        self.broken = true;
        error!("virtio-9p: request queue is corrupt, device needs reset: {why}");
        self.request_reset();
        P9Error::QueueBroken(why)
    }

    /// Raises the interrupt for this turn's replies, if the driver wants
    /// one; call once per loop turn.
    pub fn end_turn<M: GuestMemory>(&mut self, mem: &M) {
        if !std::mem::take(&mut self.used_pending) {
            return;
        }
        let Some(queue) = self.queue.as_mut() else {
            return;
        };
        match crate::virtio::queue::driver_wants_interrupt(queue, mem) {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = self.irq.used_buffer() {
                    error!("virtio-9p: interrupt failed: {e}");
                }
            }
            Err(e) => warn!("virtio-9p: reading used_event failed: {e}"),
        }
    }

    /// Returns chain `head` with `len` reply bytes.
    fn add_used<M: GuestMemory>(&mut self, mem: &M, head: u16, len: u32) -> Result<(), String> {
        let Some(queue) = self.queue.as_mut() else {
            return Ok(());
        };
        queue
            .add_used(mem, head, len)
            .map_err(|e| format!("used ring: {e}"))?;
        self.used_pending = true;
        Ok(())
    }

    /// Writes `reply` into the chain's reply buffers and returns the chain.
    fn answer<M: GuestMemory>(
        &mut self,
        mem: &M,
        head: u16,
        tag: u16,
        writable: &[Segment],
        reply: &Reply,
    ) -> Result<(), String> {
        if matches!(reply, Reply::Lerror(_)) {
            self.counters.errors += 1;
        }
        self.reply.clear();
        let mut len = reply.encode(tag, &mut self.reply);
        let room = chain_len(writable).min(self.server.msize() as usize);
        if len > room {
            // The reply does not fit what the client offered.
            self.reply.clear();
            len = Reply::Lerror(libc::ERANGE as u32).encode(tag, &mut self.reply);
            self.counters.errors += 1;
        }
        let len = if len <= room && chain::write_prefix(mem, writable, &self.reply) {
            len as u32
        } else {
            0
        };
        self.add_used(mem, head, len)
    }

    /// Drains up to one queue's worth of requests. Call when the queue's
    /// kick fires, and again when [`ProcessOutcome::rerun`] says so.
    pub fn process_queue<M: GuestMemory>(
        &mut self,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, P9Error> {
        let mut out = ProcessOutcome::default();
        if self.broken {
            return Ok(out);
        }
        self.retry_deferred(mem, io);
        let Some(mut queue) = self.queue.take() else {
            return Ok(out);
        };
        let budget = queue.size();
        let result: Result<(), String> = 'drain: loop {
            if let Err(e) = queue.disable_notification(mem) {
                break 'drain Err(format!("disabling notifications: {e}"));
            }
            while out.popped < budget {
                let chain = match queue.iter(mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => break 'drain Err(e.to_string()),
                };
                let Some(chain) = chain else {
                    break;
                };
                out.popped += 1;
                let head = chain.head_index();
                if head >= queue.size() || self.head_held(head) {
                    break 'drain Err(format!("head index {head} is outside the queue or in use"));
                }
                let descs = chain.map(|d| (d.addr(), d.len(), d.is_write_only(), d.has_next()));
                let parsed = chain::streams(descs, mem);
                // The queue goes back while the chain is handled (answers
                // write its used ring).
                self.queue = Some(queue);
                let handled = match parsed {
                    Ok(streams) => self.handle_chain(mem, io, head, streams),
                    Err(e) => {
                        log::debug!("virtio-9p: chain refused: {e}");
                        self.counters.requests += 1;
                        self.counters.errors += 1;
                        self.add_used(mem, head, 0).map(|()| Handled::Answered)
                    }
                };
                let Some(q) = self.queue.take() else {
                    return Ok(out);
                };
                queue = q;
                match handled {
                    Ok(Handled::Answered | Handled::Submitted) => {}
                    Ok(Handled::Blocked) => {
                        queue.go_to_previous_position();
                        out.popped -= 1;
                        out.rerun = true;
                        break 'drain Ok(());
                    }
                    Err(e) => break 'drain Err(e),
                }
            }
            if out.popped >= budget {
                out.rerun = true;
                break 'drain Ok(());
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break 'drain Ok(()),
                Err(e) => break 'drain Err(format!("enabling notifications: {e}")),
            }
        };
        self.queue = Some(queue);
        match result {
            Ok(()) => Ok(out),
            Err(why) => Err(self.break_queue(why)),
        }
    }

    fn head_held(&self, head: u16) -> bool {
        self.heads.get(usize::from(head)).copied().unwrap_or(true)
    }

    fn hold(&mut self, head: u16, held: bool) {
        if let Some(h) = self.heads.get_mut(usize::from(head)) {
            *h = held;
        }
    }

    /// Copies the request out, parses it and acts on it.
    fn handle_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        io: &mut dyn IoSubmit,
        head: u16,
        streams: Streams,
    ) -> Result<Handled, String> {
        self.counters.requests += 1;
        let mut hdr = [0u8; HEADER_LEN];
        let Some(h) = (chain::read_prefix(mem, &streams.readable, &mut hdr) == HEADER_LEN)
            .then(|| parse_header(&hdr))
            .flatten()
        else {
            // Not even a header: nobody to answer.
            self.counters.errors += 1;
            self.add_used(mem, head, 0)?;
            return Ok(Handled::Answered);
        };
        if h.size > self.server.msize() && h.ty != msg::TVERSION {
            self.answer(
                mem,
                head,
                h.tag,
                &streams.writable,
                &Reply::Lerror(libc::EMSGSIZE as u32),
            )?;
            return Ok(Handled::Answered);
        }
        let want = if h.ty == msg::TWRITE {
            WRITE_HEADER_LEN as usize
        } else {
            (h.size as usize).min(COPY_CAP)
        };
        let mut buf = vec![0u8; want.min(streams.readable_len as usize)];
        let got = chain::read_prefix(mem, &streams.readable, &mut buf);
        buf.truncate(got);
        let req = match wire::parse(&buf, streams.readable_len) {
            Ok(req) => req,
            Err(e) => {
                log::debug!("virtio-9p: request refused: {e}");
                self.answer(
                    mem,
                    head,
                    h.tag,
                    &streams.writable,
                    &Reply::Lerror(e.errno()),
                )?;
                return Ok(Handled::Answered);
            }
        };
        if let Tmessage::Flush { oldtag } = req.body {
            return self.flush(mem, head, req.tag, &streams, oldtag);
        }
        let action = self.server.handle(&req.body, streams.writable_len);
        self.execute(mem, io, head, req.tag, streams, action, false)
    }

    /// Answers or submits what the server decided; `waited` marks a
    /// transfer that already waited for its stream (it cannot go back to
    /// the available ring, so a full ring makes it wait again).
    #[allow(clippy::too_many_arguments)]
    fn execute<M: GuestMemory>(
        &mut self,
        mem: &M,
        io: &mut dyn IoSubmit,
        head: u16,
        tag: u16,
        streams: Streams,
        action: Action,
        waited: bool,
    ) -> Result<Handled, String> {
        let (file, offset, kind) = match action {
            Action::Reply(r) => {
                self.answer(mem, head, tag, &streams.writable, &r)?;
                return Ok(Handled::Answered);
            }
            Action::Flush { oldtag } => return self.flush(mem, head, tag, &streams, oldtag),
            Action::Read {
                ref file,
                offset,
                count,
            } => {
                if streams.writable_len < READ_REPLY_HEADER_LEN {
                    self.counters.errors += 1;
                    self.add_used(mem, head, 0)?;
                    return Ok(Handled::Answered);
                }
                if count == 0 {
                    let h = read_reply_header(tag, 0);
                    let len = u32::from(chain::write_prefix(mem, &streams.writable, &h))
                        * READ_REPLY_HEADER_LEN;
                    self.add_used(mem, head, len)?;
                    return Ok(Handled::Answered);
                }
                (file.clone(), offset, OpKind::Read { count })
            }
            Action::Write {
                ref file,
                offset,
                count,
            } => {
                if count == 0 {
                    self.answer(mem, head, tag, &streams.writable, &Reply::Write(0))?;
                    return Ok(Handled::Answered);
                }
                (file.clone(), offset, OpKind::Write { count })
            }
            Action::Fsync { ref file, .. } => (file.clone(), 0, OpKind::Fsync),
        };
        let stream = file.stream.then(|| file.fd.as_raw_fd());
        if let Some(fd) = stream {
            if self.streams_busy.contains(&fd) {
                self.defer(head, tag, fd, streams, action, false);
                return Ok(Handled::Submitted);
            }
        }
        let datasync = matches!(action, Action::Fsync { datasync: true, .. });
        let handled = self.submit(
            mem, io, head, tag, &streams, file.fd, stream, offset, kind, datasync,
        )?;
        match (handled, stream) {
            (Handled::Blocked, Some(fd)) if waited => {
                self.defer(head, tag, fd, streams, action, true);
                self.stalled = true;
                Ok(Handled::Submitted)
            }
            (h, _) => Ok(h),
        }
    }

    /// Queues a transfer behind the one its stream is busy with (`first`:
    /// at the front, it already waited its turn).
    fn defer(
        &mut self,
        head: u16,
        tag: u16,
        stream: RawFd,
        streams: Streams,
        action: Action,
        first: bool,
    ) {
        self.hold(head, true);
        let d = Deferred {
            head,
            tag,
            stream,
            streams,
            action,
        };
        if first {
            self.deferred.push_front(d);
        } else {
            self.deferred.push_back(d);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn submit<M: GuestMemory>(
        &mut self,
        mem: &M,
        io: &mut dyn IoSubmit,
        head: u16,
        tag: u16,
        streams: &Streams,
        fd: Arc<OwnedFd>,
        stream: Option<RawFd>,
        offset: u64,
        kind: OpKind,
        datasync: bool,
    ) -> Result<Handled, String> {
        let Some(index) = self
            .slots
            .iter()
            .position(|s| matches!(s.state, SlotState::Free))
        else {
            return Ok(Handled::Blocked);
        };
        let ring_tag = (u64::from(self.generation) << SLOT_BITS) | index as u64;
        let raw = fd.as_raw_fd();
        // Streams go at their own position (-1): offsets mean nothing there.
        let offset = if stream.is_some() { u64::MAX } else { offset };
        let Some(slot) = self.slots.get_mut(index) else {
            return Ok(Handled::Blocked);
        };
        slot.iovecs.0.clear();
        let mapped = match kind {
            OpKind::Read { count } => chain::map_range(
                mem,
                &streams.writable,
                READ_REPLY_HEADER_LEN,
                count,
                Permissions::Write,
                &mut slot.iovecs.0,
            ),
            OpKind::Write { count } => chain::map_range(
                mem,
                &streams.readable,
                WRITE_HEADER_LEN,
                count,
                Permissions::Read,
                &mut slot.iovecs.0,
            ),
            OpKind::Fsync => Ok(()),
        };
        if let Err(e) = mapped {
            slot.iovecs.0.clear();
            log::debug!("virtio-9p: request buffers refused: {e}");
            self.answer(
                mem,
                head,
                tag,
                &streams.writable,
                &Reply::Lerror(libc::EFAULT as u32),
            )?;
            return Ok(Handled::Answered);
        }
        let (iovecs, iovcnt) = (slot.iovecs.0.as_ptr(), slot.iovecs.0.len() as u32);
        let op = match kind {
            OpKind::Read { .. } => IoOp::Readv {
                fd: raw,
                iovecs,
                iovcnt,
                offset,
            },
            OpKind::Write { .. } => IoOp::Writev {
                fd: raw,
                iovecs,
                iovcnt,
                offset,
            },
            OpKind::Fsync => IoOp::Fsync { fd: raw, datasync },
        };
        // SAFETY: the iovec array lives in this slot's Vec, untouched until
        // `complete` takes this tag (a reset only orphans the slot; dropping
        // the device with ops in flight leaks the arrays, see Drop). The
        // buffers are guest memory, mapped for the VM's life and checked to
        // lie inside it above. The descriptor is kept open by the slot's
        // Arc until the completion arrives.
        match unsafe { io.submit(op, ring_tag) } {
            Ok(()) => {}
            Err(IoSubmitError::QueueFull) => {
                slot.iovecs.0.clear();
                return Ok(Handled::Blocked);
            }
            Err(e) => {
                slot.iovecs.0.clear();
                warn!("virtio-9p: submission failed: {e}");
                self.answer(
                    mem,
                    head,
                    tag,
                    &streams.writable,
                    &Reply::Lerror(libc::EIO as u32),
                )?;
                return Ok(Handled::Answered);
            }
        }
        slot.tag = ring_tag;
        slot.file = Some(fd);
        slot.state = SlotState::Busy(Pending {
            head,
            tag,
            kind,
            writable: streams.writable.clone(),
            stream,
        });
        self.busy += 1;
        self.hold(head, true);
        if let Some(fd) = stream {
            self.streams_busy.push(fd);
        }
        Ok(Handled::Submitted)
    }

    /// Tflush: answers at once unless `oldtag` is still being worked on.
    fn flush<M: GuestMemory>(
        &mut self,
        mem: &M,
        head: u16,
        tag: u16,
        streams: &Streams,
        oldtag: u16,
    ) -> Result<Handled, String> {
        if let Some(i) = self.deferred.iter().position(|d| d.tag == oldtag) {
            if let Some(d) = self.deferred.remove(i) {
                self.hold(d.head, false);
                self.answer(
                    mem,
                    d.head,
                    d.tag,
                    &d.streams.writable,
                    &Reply::Lerror(libc::EINTR as u32),
                )?;
            }
        } else if self
            .slots
            .iter()
            .any(|s| matches!(&s.state, SlotState::Busy(p) if p.tag == oldtag))
        {
            self.hold(head, true);
            self.flushes.push(FlushWait {
                head,
                tag,
                oldtag,
                writable: streams.writable.clone(),
            });
            return Ok(Handled::Submitted);
        }
        self.answer(mem, head, tag, &streams.writable, &Reply::Flush)?;
        Ok(Handled::Answered)
    }

    /// Answers the op tagged `tag` with the CQE result `res` (bytes, or
    /// -errno), then starts what waited for it. Unknown and pre-reset tags
    /// are ignored.
    pub fn complete<M: GuestMemory>(&mut self, tag: u64, res: i32, mem: &M, io: &mut dyn IoSubmit) {
        let index = (tag & ((1 << SLOT_BITS) - 1)) as usize;
        let Some(slot) = self.slots.get_mut(index) else {
            warn!("virtio-9p: completion for unknown tag {tag:#x}");
            return;
        };
        if slot.tag != tag {
            warn!("virtio-9p: completion for unknown tag {tag:#x}");
            return;
        }
        let state = std::mem::replace(&mut slot.state, SlotState::Free);
        slot.tag = u64::MAX;
        slot.iovecs.0.clear();
        slot.file = None;
        let p = match state {
            SlotState::Free => return,
            SlotState::Orphaned => {
                self.orphans -= 1;
                return;
            }
            SlotState::Busy(p) => p,
        };
        self.busy -= 1;
        self.hold(p.head, false);
        if let Err(why) = self.answer_op(mem, &p, res) {
            let _ = self.break_queue(why);
            return;
        }
        if let Some(fd) = p.stream {
            self.streams_busy.retain(|&s| s != fd);
            self.start_deferred(mem, io, fd);
        }
        while let Some(i) = self.flushes.iter().position(|f| f.oldtag == p.tag) {
            let f = self.flushes.swap_remove(i);
            self.hold(f.head, false);
            if let Err(why) = self.answer(mem, f.head, f.tag, &f.writable, &Reply::Flush) {
                let _ = self.break_queue(why);
                return;
            }
        }
    }

    fn answer_op<M: GuestMemory>(&mut self, mem: &M, p: &Pending, res: i32) -> Result<(), String> {
        if res < 0 {
            let e = res.unsigned_abs();
            return self.answer(mem, p.head, p.tag, &p.writable, &Reply::Lerror(e));
        }
        let done = res as u32;
        match p.kind {
            OpKind::Read { count } => {
                let n = done.min(count);
                self.counters.read_bytes += u64::from(n);
                let h = read_reply_header(p.tag, n);
                if !chain::write_prefix(mem, &p.writable, &h) {
                    return self.add_used(mem, p.head, 0);
                }
                self.add_used(mem, p.head, READ_REPLY_HEADER_LEN + n)
            }
            OpKind::Write { count } => {
                let n = done.min(count);
                self.counters.write_bytes += u64::from(n);
                self.answer(mem, p.head, p.tag, &p.writable, &Reply::Write(n))
            }
            OpKind::Fsync => self.answer(mem, p.head, p.tag, &p.writable, &Reply::Fsync),
        }
    }

    /// Submits the oldest transfer that waited for stream `fd`.
    fn start_deferred<M: GuestMemory>(&mut self, mem: &M, io: &mut dyn IoSubmit, fd: RawFd) {
        let Some(i) = self.deferred.iter().position(|d| d.stream == fd) else {
            return;
        };
        let Some(d) = self.deferred.remove(i) else {
            return;
        };
        self.hold(d.head, false);
        if let Err(why) = self.execute(mem, io, d.head, d.tag, d.streams, d.action, true) {
            let _ = self.break_queue(why);
        }
    }

    /// Starts transfers that a full ring held back, on streams now free.
    fn retry_deferred<M: GuestMemory>(&mut self, mem: &M, io: &mut dyn IoSubmit) {
        if !std::mem::take(&mut self.stalled) {
            return;
        }
        let mut waiting: Vec<RawFd> = self.deferred.iter().map(|d| d.stream).collect();
        waiting.dedup();
        for fd in waiting {
            if !self.streams_busy.contains(&fd) {
                self.start_deferred(mem, io, fd);
            }
        }
    }
}

fn chain_len(segs: &[Segment]) -> usize {
    segs.iter().map(|s| s.len as usize).sum()
}

impl<F: Filesystem> Drop for P9Device<F> {
    fn drop(&mut self) {
        // The kernel may still use these iovec arrays and descriptors;
        // leaking them is the only safe end (at VMM exit the ring has
        // already waited for, and cancelled, every op).
        for s in &mut self.slots {
            if !matches!(s.state, SlotState::Free) {
                std::mem::forget(std::mem::take(&mut s.iovecs));
                std::mem::forget(s.file.take());
            }
        }
    }
}
