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

use std::any::Any;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestMemory, Permissions};

use super::chain::{self, Segment, Streams};
use super::fs::Filesystem;
use super::server::{Action, Server};
use super::wire::{
    self, msg, parse_header, read_reply_header, Reply, Tmessage, HEADER_LEN, READ_REPLY_HEADER_LEN,
    WRITE_HEADER_LEN,
};
use super::{config_bytes, DEVICE_TYPE, F_MOUNT_TAG, MAX_MSIZE, QUEUE_MAX_SIZE};
use crate::guest_log::GuestLog;
use crate::io::{InterruptLine, IoOp, IoSubmit, IoSubmitError};
use crate::virtio::{
    drain_queue, ChainTaken, DeviceError, DeviceShared, Generation, InFlight, Interrupt,
    ProcessOutcome, Tag, Taken, VirtioDevice, Virtqueues, F_EVENT_IDX, F_INDIRECT_DESC,
    F_VERSION_1,
};

/// Features the device offers.
pub const FEATURES: u64 = F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC | F_MOUNT_TAG;

/// Largest non-Twrite message copied out of a chain: a Twalk of 16 names
/// of the longest string the parser takes, with room to spare.
const COPY_CAP: usize = 16 * (2 + wire::MAX_STRING) + 64;

/// The device's one queue.
const REQUEST_QUEUE: usize = 0;

/// Counters for metrics; the device only adds to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
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
    /// Guest-caused warnings not logged (rate limit).
    pub log_lines_suppressed: u64,
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
    tag: u16,
    kind: OpKind,
    writable: Vec<Segment>,
    /// The stream this transfer holds, released at completion.
    stream: Option<RawFd>,
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

/// A virtio-9p device serving one [`Filesystem`].
///
/// # Example
///
/// ```
/// use devices::virtio::p9::{HostFs, P9Device};
/// use devices::virtio::VirtioDevice;
/// use vm_memory::GuestMemoryMmap;
/// use vmm_sys_util::eventfd::EventFd;
///
/// let share = HostFs::new(std::path::Path::new("/tmp"), false).unwrap();
/// let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
/// let dev = P9Device::new(share, "share0", Box::new(irqfd));
/// let info = VirtioDevice::<GuestMemoryMmap>::info(&dev);
/// assert_eq!(info.device_type, 9);
/// // The config space carries the mount tag: length, then the bytes.
/// let mut cfg = [0u8; 8];
/// info.shared.read_config(0, &mut cfg);
/// assert_eq!(&cfg, b"\x06\x00share0");
/// ```
#[derive(Debug)]
pub struct P9Device<F: Filesystem> {
    server: Server<F>,
    queues: Virtqueues,
    inflight: InFlight<Pending>,
    generation: Generation,
    /// Host descriptors of ops in the kernel's hands, by slot: kept open
    /// until each op's completion, live or orphaned by a reset.
    files: Vec<Option<Arc<OwnedFd>>>,
    /// Heads held while deferred or flushing (in-flight ones are in
    /// `inflight`).
    parked: Vec<bool>,
    /// 9P tags of the ops in flight (a Tflush looks its target up here).
    pending_tags: Vec<u16>,
    /// Streams with a transfer in flight.
    streams_busy: Vec<RawFd>,
    deferred: VecDeque<Deferred>,
    /// A deferred transfer met a full ring: retry at the next drain.
    stalled: bool,
    flushes: Vec<FlushWait>,
    counters: P9Counters,
    log: GuestLog,
    reply: Vec<u8>,
}

/// Where an answer goes: the queue a drain holds, or the device's own.
enum Used<'q> {
    Drain(&'q mut Queue),
    Device,
}

impl<F: Filesystem> P9Device<F> {
    /// An inactive device serving `fs` under mount tag `tag`; `line` is
    /// the irqfd the VMM wired to the device's interrupt.
    pub fn new(fs: F, tag: &str, line: Box<dyn InterruptLine>) -> Self {
        let shared = Arc::new(DeviceShared::new(config_bytes(tag), Vec::new()));
        let max = usize::from(QUEUE_MAX_SIZE);
        Self {
            server: Server::new(fs, MAX_MSIZE),
            queues: Virtqueues::new("virtio-9p", &[QUEUE_MAX_SIZE], Interrupt::new(shared, line)),
            inflight: InFlight::new(REQUEST_QUEUE as u8, QUEUE_MAX_SIZE),
            generation: Generation::default(),
            files: vec![None; max],
            parked: vec![false; max],
            pending_tags: Vec::new(),
            streams_busy: Vec::new(),
            deferred: VecDeque::new(),
            stalled: false,
            flushes: Vec::new(),
            counters: P9Counters::default(),
            log: GuestLog::new("virtio-9p"),
            reply: Vec::new(),
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
        P9Counters {
            needs_reset: self.queues.resets_requested(),
            log_lines_suppressed: self.log.suppressed() + self.queues.log_lines_suppressed(),
            ..self.counters
        }
    }

    fn held(&self, head: u16) -> bool {
        self.inflight.head_in_flight(head)
            || self.parked.get(usize::from(head)).copied().unwrap_or(true)
    }

    fn park(&mut self, head: u16, parked: bool) {
        if let Some(p) = self.parked.get_mut(usize::from(head)) {
            *p = parked;
        }
    }

    /// Returns chain `head` with `len` reply bytes.
    fn add_used<M: GuestMemory>(
        &mut self,
        to: &mut Used<'_>,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), String> {
        match to {
            Used::Drain(queue) => queue
                .add_used(mem, head, len)
                .map_err(|e| format!("used ring: {e}"))?,
            Used::Device => {
                let Some(queue) = self.queues.queue(REQUEST_QUEUE) else {
                    // Reset meanwhile: the driver took the chain back.
                    return Ok(());
                };
                queue
                    .add_used(mem, head, len)
                    .map_err(|e| format!("used ring: {e}"))?;
            }
        }
        self.queues.mark_used(REQUEST_QUEUE);
        Ok(())
    }

    /// Writes `reply` into the chain's reply buffers and returns the chain.
    fn answer<M: GuestMemory>(
        &mut self,
        to: &mut Used<'_>,
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
        self.add_used(to, mem, head, len)
    }

    /// One chain from the drain: copy the request out, parse it, act.
    fn take_chain<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        io: &mut dyn IoSubmit,
        head: u16,
        chain: DescriptorChain<&M>,
    ) -> Result<ChainTaken, String> {
        if self.held(head) {
            return Err(format!("head index {head} is already in use"));
        }
        self.counters.requests += 1;
        let mut to = Used::Drain(queue);
        let descs = chain.map(|d| (d.addr(), d.len(), d.is_write_only(), d.has_next()));
        let streams = match chain::streams(descs, mem) {
            Ok(s) => s,
            Err(e) => {
                self.counters.errors += 1;
                self.log.warn("chain", format_args!("chain refused: {e}"));
                self.add_used(&mut to, mem, head, 0)?;
                return Ok(ChainTaken::Answered);
            }
        };
        self.handle_request(&mut to, mem, io, head, streams)
    }

    fn handle_request<M: GuestMemory>(
        &mut self,
        to: &mut Used<'_>,
        mem: &M,
        io: &mut dyn IoSubmit,
        head: u16,
        streams: Streams,
    ) -> Result<ChainTaken, String> {
        let mut hdr = [0u8; HEADER_LEN];
        let Some(h) = (chain::read_prefix(mem, &streams.readable, &mut hdr) == HEADER_LEN)
            .then(|| parse_header(&hdr))
            .flatten()
        else {
            // Not even a header: nobody to answer.
            self.counters.errors += 1;
            self.log
                .warn("request", format_args!("request without a header"));
            self.add_used(to, mem, head, 0)?;
            return Ok(ChainTaken::Answered);
        };
        if h.size > self.server.msize() && h.ty != msg::TVERSION {
            let e = Reply::Lerror(libc::EMSGSIZE as u32);
            self.answer(to, mem, head, h.tag, &streams.writable, &e)?;
            return Ok(ChainTaken::Answered);
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
                let r = Reply::Lerror(e.errno());
                self.answer(to, mem, head, h.tag, &streams.writable, &r)?;
                return Ok(ChainTaken::Answered);
            }
        };
        if let Tmessage::Flush { oldtag } = req.body {
            return self.flush(to, mem, head, req.tag, &streams, oldtag);
        }
        let action = self.server.handle(&req.body, streams.writable_len);
        self.execute(to, mem, io, head, req.tag, streams, action, false)
    }

    /// Answers or submits what the server decided; `waited` marks a
    /// transfer that already waited for its stream (it cannot go back to
    /// the available ring, so a full ring makes it wait again).
    #[allow(clippy::too_many_arguments)]
    fn execute<M: GuestMemory>(
        &mut self,
        to: &mut Used<'_>,
        mem: &M,
        io: &mut dyn IoSubmit,
        head: u16,
        tag: u16,
        streams: Streams,
        action: Action,
        waited: bool,
    ) -> Result<ChainTaken, String> {
        let (file, offset, kind) = match action {
            Action::Reply(r) => {
                self.answer(to, mem, head, tag, &streams.writable, &r)?;
                return Ok(ChainTaken::Answered);
            }
            Action::Flush { oldtag } => return self.flush(to, mem, head, tag, &streams, oldtag),
            Action::Read {
                ref file,
                offset,
                count,
            } => {
                if streams.writable_len < READ_REPLY_HEADER_LEN {
                    self.counters.errors += 1;
                    self.add_used(to, mem, head, 0)?;
                    return Ok(ChainTaken::Answered);
                }
                if count == 0 {
                    let h = read_reply_header(tag, 0);
                    let fits = chain::write_prefix(mem, &streams.writable, &h);
                    let len = if fits { READ_REPLY_HEADER_LEN } else { 0 };
                    self.add_used(to, mem, head, len)?;
                    return Ok(ChainTaken::Answered);
                }
                (file.clone(), offset, OpKind::Read { count })
            }
            Action::Write {
                ref file,
                offset,
                count,
            } => {
                if count == 0 {
                    self.answer(to, mem, head, tag, &streams.writable, &Reply::Write(0))?;
                    return Ok(ChainTaken::Answered);
                }
                (file.clone(), offset, OpKind::Write { count })
            }
            Action::Fsync { ref file, .. } => (file.clone(), 0, OpKind::Fsync),
        };
        let stream = file.stream.then(|| file.fd.as_raw_fd());
        if let Some(fd) = stream {
            if self.streams_busy.contains(&fd) {
                self.defer(head, tag, fd, streams, action, false);
                return Ok(ChainTaken::Submitted);
            }
        }
        let datasync = matches!(action, Action::Fsync { datasync: true, .. });
        let op = Op {
            head,
            tag,
            fd: file.fd,
            stream,
            offset,
            kind,
            datasync,
        };
        match self.submit(to, mem, io, &streams, op)? {
            ChainTaken::PutBack if waited => match stream {
                Some(fd) => {
                    self.defer(head, tag, fd, streams, action, true);
                    self.stalled = true;
                    Ok(ChainTaken::Submitted)
                }
                None => Ok(ChainTaken::PutBack),
            },
            taken => Ok(taken),
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
        self.park(head, true);
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

    /// Maps the op's guest buffers and hands it to the ring.
    fn submit<M: GuestMemory>(
        &mut self,
        to: &mut Used<'_>,
        mem: &M,
        io: &mut dyn IoSubmit,
        streams: &Streams,
        op: Op,
    ) -> Result<ChainTaken, String> {
        let Some((slot, iovecs)) = self.inflight.reserve(self.generation) else {
            return Ok(ChainTaken::PutBack);
        };
        let mapped = match op.kind {
            OpKind::Read { count } => chain::map_range(
                mem,
                &streams.writable,
                READ_REPLY_HEADER_LEN,
                count,
                Permissions::Write,
                &mut iovecs.0,
            ),
            OpKind::Write { count } => chain::map_range(
                mem,
                &streams.readable,
                WRITE_HEADER_LEN,
                count,
                Permissions::Read,
                &mut iovecs.0,
            ),
            OpKind::Fsync => Ok(()),
        };
        let (ptr, iovcnt) = iovecs.as_raw();
        if let Err(e) = mapped {
            self.inflight.release(slot);
            self.log
                .warn("buffers", format_args!("request buffers refused: {e}"));
            let r = Reply::Lerror(libc::EFAULT as u32);
            self.answer(to, mem, op.head, op.tag, &streams.writable, &r)?;
            return Ok(ChainTaken::Answered);
        }
        let fd = op.fd.as_raw_fd();
        // Streams go at their own position (-1): offsets mean nothing there.
        let offset = if op.stream.is_some() {
            u64::MAX
        } else {
            op.offset
        };
        let ring_op = match op.kind {
            OpKind::Read { .. } => IoOp::Readv {
                fd,
                iovecs: ptr,
                iovcnt,
                offset,
            },
            OpKind::Write { .. } => IoOp::Writev {
                fd,
                iovecs: ptr,
                iovcnt,
                offset,
            },
            OpKind::Fsync => IoOp::Fsync {
                fd,
                datasync: op.datasync,
            },
        };
        // SAFETY: the iovec array lives in the reserved slot, untouched
        // until `complete` takes this tag (a reset only orphans the slot;
        // dropping the table with ops in flight leaks the arrays). The
        // buffers are guest memory, mapped for the VM's life and checked
        // to lie inside it above. The descriptor stays open in `files`
        // until the completion arrives, live or orphaned.
        match unsafe { io.submit(ring_op, slot.tag) } {
            Ok(()) => {}
            Err(IoSubmitError::QueueFull) => {
                self.inflight.release(slot);
                return Ok(ChainTaken::PutBack);
            }
            Err(e) => {
                self.inflight.release(slot);
                self.log
                    .warn("host", format_args!("submission failed: {e}"));
                let r = Reply::Lerror(libc::EIO as u32);
                self.answer(to, mem, op.head, op.tag, &streams.writable, &r)?;
                return Ok(ChainTaken::Answered);
            }
        }
        if let Some(f) = self.files.get_mut(usize::from(Tag::decode(slot.tag).slot)) {
            *f = Some(op.fd);
        }
        self.inflight.commit(
            slot,
            op.head,
            Pending {
                tag: op.tag,
                kind: op.kind,
                writable: streams.writable.clone(),
                stream: op.stream,
            },
        );
        self.pending_tags.push(op.tag);
        if let Some(fd) = op.stream {
            self.streams_busy.push(fd);
        }
        Ok(ChainTaken::Submitted)
    }

    /// Tflush: answers at once unless `oldtag` is still being worked on.
    fn flush<M: GuestMemory>(
        &mut self,
        to: &mut Used<'_>,
        mem: &M,
        head: u16,
        tag: u16,
        streams: &Streams,
        oldtag: u16,
    ) -> Result<ChainTaken, String> {
        if let Some(i) = self.deferred.iter().position(|d| d.tag == oldtag) {
            if let Some(d) = self.deferred.remove(i) {
                self.park(d.head, false);
                let r = Reply::Lerror(libc::EINTR as u32);
                self.answer(to, mem, d.head, d.tag, &d.streams.writable, &r)?;
            }
        } else if self.pending_tags.contains(&oldtag) {
            self.park(head, true);
            self.flushes.push(FlushWait {
                head,
                tag,
                oldtag,
                writable: streams.writable.clone(),
            });
            return Ok(ChainTaken::Submitted);
        }
        self.answer(to, mem, head, tag, &streams.writable, &Reply::Flush)?;
        Ok(ChainTaken::Answered)
    }

    fn answer_op<M: GuestMemory>(
        &mut self,
        mem: &M,
        head: u16,
        p: &Pending,
        res: i32,
    ) -> Result<(), String> {
        let to = &mut Used::Device;
        if res < 0 {
            let e = res.unsigned_abs();
            return self.answer(to, mem, head, p.tag, &p.writable, &Reply::Lerror(e));
        }
        let done = res as u32;
        match p.kind {
            OpKind::Read { count } => {
                let n = done.min(count);
                self.counters.read_bytes += u64::from(n);
                let h = read_reply_header(p.tag, n);
                if !chain::write_prefix(mem, &p.writable, &h) {
                    return self.add_used(to, mem, head, 0);
                }
                self.add_used(to, mem, head, READ_REPLY_HEADER_LEN + n)
            }
            OpKind::Write { count } => {
                let n = done.min(count);
                self.counters.write_bytes += u64::from(n);
                self.answer(to, mem, head, p.tag, &p.writable, &Reply::Write(n))
            }
            OpKind::Fsync => self.answer(to, mem, head, p.tag, &p.writable, &Reply::Fsync),
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
        self.park(d.head, false);
        let to = &mut Used::Device;
        if let Err(why) = self.execute(to, mem, io, d.head, d.tag, d.streams, d.action, true) {
            let _ = self.queues.break_queue(REQUEST_QUEUE, why);
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

/// One transfer to submit.
struct Op {
    head: u16,
    tag: u16,
    fd: Arc<OwnedFd>,
    stream: Option<RawFd>,
    offset: u64,
    kind: OpKind,
    datasync: bool,
}

fn chain_len(segs: &[Segment]) -> usize {
    segs.iter().map(|s| s.len as usize).sum()
}

impl<F: Filesystem + Send + 'static, M: GuestMemory> VirtioDevice<M> for P9Device<F>
where
    F::Node: Send,
{
    fn kind(&self) -> &'static str {
        "9p"
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn queues(&self) -> &Virtqueues {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut Virtqueues {
        &mut self.queues
    }

    /// Drops the queue, forgets every fid and waiting request; ops in
    /// flight are orphaned (their descriptors stay open until their
    /// completions) and their results ignored.
    fn reset(&mut self) {
        self.queues.reset();
        self.inflight.orphan_all();
        self.generation.bump();
        self.parked.fill(false);
        self.deferred.clear();
        self.stalled = false;
        self.flushes.clear();
        self.pending_tags.clear();
        self.streams_busy.clear();
        self.server.reset();
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
        self.retry_deferred(mem, io);
        drain_queue(
            self,
            |d| &mut d.queues,
            qidx,
            mem,
            |d, q, chain, head| d.take_chain(q, mem, io, head, chain),
        )
    }

    fn complete(&mut self, tag: u64, res: i32, mem: &M, io: &mut dyn IoSubmit) {
        let taken = self.inflight.take(tag);
        if taken.is_some() {
            if let Some(f) = self.files.get_mut(usize::from(Tag::decode(tag).slot)) {
                *f = None;
            }
        }
        let (head, p) = match taken {
            None => {
                log::debug!("virtio-9p: completion for unknown tag {tag:#x}");
                return;
            }
            Some(Taken::Stale { .. }) => return,
            Some(Taken::Live { head, pending }) => (head, pending),
        };
        if let Some(i) = self.pending_tags.iter().position(|&t| t == p.tag) {
            self.pending_tags.swap_remove(i);
        }
        if let Err(why) = self.answer_op(mem, head, &p, res) {
            let _ = self.queues.break_queue(REQUEST_QUEUE, why);
            return;
        }
        if let Some(fd) = p.stream {
            self.streams_busy.retain(|&s| s != fd);
            self.start_deferred(mem, io, fd);
        }
        while let Some(i) = self.flushes.iter().position(|f| f.oldtag == p.tag) {
            let f = self.flushes.swap_remove(i);
            self.park(f.head, false);
            let to = &mut Used::Device;
            if let Err(why) = self.answer(to, mem, f.head, f.tag, &f.writable, &Reply::Flush) {
                let _ = self.queues.break_queue(REQUEST_QUEUE, why);
                return;
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.inflight.outstanding()
    }

    /// A read of ringvm's stdin may wait forever: every orphaned op is
    /// cancelled on reset.
    fn stale_tags(&self) -> Vec<u64> {
        self.inflight.orphaned_tags().collect()
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.counters()).unwrap_or_default()
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl<F: Filesystem> Drop for P9Device<F> {
    fn drop(&mut self) {
        if self.inflight.outstanding() > 0 {
            // Queued ops name these descriptors' numbers: closing them
            // could redirect I/O to a file opened later. (At VMM exit the
            // ring has already waited for, and cancelled, every op.)
            log::debug!("virtio-9p: dropped with I/O in flight; leaking its descriptors");
            for f in &mut self.files {
                std::mem::forget(f.take());
            }
        }
    }
}
