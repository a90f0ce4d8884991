//! virtio-vsock from a hostile driver: TX packets well formed and not
//! (any header field, lengths that lie, payloads across descriptors and the
//! region boundary), raw descriptor chains, RX buffers of any shape,
//! completions of socket polls, reads and writes in any order with any
//! result, resets with ops parked in the kernel.
//!
//! The host side is real Unix sockets in a scratch directory: a listener on
//! `<uds>_5` accepts the guest's connections to port 5 (port 6 has none and
//! is refused), so connections are really opened and closed. Every op the
//! device submits is audited before the harness plays the kernel for it:
//! polls only, or reads and writes whose buffers lie in guest memory and
//! carry at most one packet's payload; nothing is left in flight after
//! teardown, and the device never writes guest memory between a reset and
//! the next activation.

#![no_main]

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use devices::io::fake::{CountingLine, RecordingIo};
use devices::io::IoOp;
use devices::virtio::testing::transport_event;
use devices::virtio::vsock::packet::{Header, HDR_LEN};
use devices::virtio::vsock::{VsockDevice, FEATURES, HOST_CID, MAX_PKT_DATA, RX_QUEUE, TX_QUEUE};
use devices::virtio::{Activation, TransportEvent, VirtioDevice, F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use ringvm_fuzz::driver::{
    Alloc, Buffer, DriverQueue, FuzzDesc, Len, Place, UsedCounter, QUEUE_SLOT,
};
use ringvm_fuzz::ops::{Auditor, Outcome};
use ringvm_fuzz::{assert_unchanged, snapshot, with_guest_memory};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GUEST_CID: u64 = 3;
const QUEUES: usize = 3;

/// The scratch directory and the listener on `<uds>_5`, made once per
/// process and kept (the device's own `<uds>` is bound and removed by
/// each input).
struct Host {
    uds: PathBuf,
    port5: UnixListener,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ringvm-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("harness: cannot make {}: {e}", dir.display());
        }
        let uds = dir.join("v.sock");
        let port5 = match UnixListener::bind(format!("{}_5", uds.display())) {
            Ok(l) => l,
            Err(e) => panic!("harness: cannot listen on port 5's socket: {e}"),
        };
        let _ = port5.set_nonblocking(true);
        Host { uds, port5 }
    })
}

#[derive(Arbitrary, Debug)]
struct Input {
    log2: [u8; QUEUES],
    features: u64,
    skew: u16,
    actions: Vec<Action>,
}

/// A packet header, mostly plausible.
#[derive(Arbitrary, Debug)]
struct Pkt {
    /// Bit 0: src_cid is not the guest's; bit 1: dst_cid is not the host's.
    bad_cids: u8,
    cid: u64,
    src_port: u8,
    /// 0-2: port 5 (served), 3: port 6 (refused), else `raw_port`.
    dst: u8,
    raw_port: u32,
    op: u8,
    /// 0-5: stream; else this value.
    type_: u16,
    /// `None`: the payload's length; else this (a lie, or huge).
    len: Option<u32>,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    payload: Vec<u8>,
    /// Header and payload in one descriptor, or split at this byte.
    split: Option<u8>,
}

#[derive(Arbitrary, Debug)]
enum Action {
    Packet(Pkt),
    Chain(u8, Vec<FuzzDesc>),
    RxBuffers(u8, u16),
    SetDesc(u8, u16, FuzzDesc),
    Publish(u8, Vec<u16>),
    BumpAvail(u8, u8),
    Poke(u32, Vec<u8>),
    Kick(u8),
    Complete(u8, Outcome, Vec<u8>),
    CompleteAll(Outcome),
    CancelStale,
    Bogus(u64, i32),
    Full(bool),
    Reset,
    Reactivate([u8; QUEUES], u64),
    EndTurn,
}

struct Rig<'m> {
    mem: &'m GuestMemoryMmap,
    dev: VsockDevice,
    queues: Vec<DriverQueue<'m>>,
    used: Vec<UsedCounter>,
    alloc: Alloc,
    io: RecordingIo,
    audit: Auditor,
    after_reset: bool,
    listener_fd: i32,
}

fn q(i: u8) -> usize {
    usize::from(i) % QUEUES
}

impl Rig<'_> {
    fn audit(&mut self) {
        let listener = self.listener_fd;
        self.audit.take(&mut self.io, false, |op, iov| {
            let total: usize = iov.iter().map(|v| v.iov_len).sum();
            match *op {
                IoOp::Poll { fd, events } => {
                    assert!(fd >= 0, "poll on fd {fd}");
                    assert_eq!(events, libc::POLLIN as u32, "poll for {events:#x}");
                    let _ = listener;
                }
                IoOp::Readv { .. } | IoOp::Writev { .. } => {
                    assert!(
                        (1..=MAX_PKT_DATA as usize).contains(&total),
                        "socket op of {total} bytes"
                    );
                }
                other => panic!("virtio-vsock submitted {other:?}"),
            }
        });
        for (q, used) in self.queues.iter().zip(&mut self.used) {
            let (total, new) = used.update(q.used_idx());
            if !self.alloc.tainted {
                q.check_used(total, new);
            }
        }
    }

    fn activate(&mut self, log2: [u8; QUEUES], features: u64) {
        self.queues = log2
            .iter()
            .enumerate()
            .map(|(i, l)| DriverQueue::new(self.mem, i as u64, 1u16 << (l % 9)))
            .collect();
        self.used = (0..QUEUES).map(|_| UsedCounter::default()).collect();
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
        self.after_reset = !<VsockDevice as VirtioDevice<GuestMemoryMmap>>::is_active(&self.dev);
        // The slot serves every queue after an activation: the listener
        // gets its poll.
        let _ = self.dev.process_queue(RX_QUEUE, self.mem, &mut self.io);
        self.audit();
    }

    fn complete(&mut self, pick: usize, outcome: Outcome, fill: &[u8]) {
        if let Some((tag, res)) = self.audit.finish(pick, outcome, fill) {
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
        for _ in 0..256 {
            if self.audit.pending.is_empty() {
                break;
            }
            self.complete(0, outcome, &[]);
            self.audit();
        }
    }

    fn packet(&mut self, p: &Pkt) {
        let len = p.len.unwrap_or(p.payload.len() as u32);
        let h = Header {
            src_cid: if p.bad_cids & 1 != 0 {
                p.cid
            } else {
                GUEST_CID
            },
            dst_cid: if p.bad_cids & 2 != 0 { p.cid } else { HOST_CID },
            src_port: u32::from(p.src_port % 8),
            dst_port: match p.dst % 5 {
                0..=2 => 5,
                3 => 6,
                _ => p.raw_port,
            },
            len,
            type_: if p.type_ < 6 { 1 } else { p.type_ },
            op: u16::from(p.op % 9),
            flags: p.flags,
            buf_alloc: p.buf_alloc,
            fwd_cnt: p.fwd_cnt,
        };
        let mut bytes = h.encode().to_vec();
        let payload = &p.payload[..p.payload.len().min(MAX_PKT_DATA as usize + 16)];
        bytes.extend_from_slice(payload);
        let plain = |b: &[u8]| FuzzDesc {
            buffer: Buffer::Plain(Place::Data(b.to_vec()), Len::Raw(b.len() as u32)),
            flags: 0,
            next: 0,
        };
        let descs = match p.split {
            None => vec![plain(&bytes)],
            Some(at) => {
                let at = (usize::from(at) % (HDR_LEN + 8)).min(bytes.len());
                let (a, b) = bytes.split_at(at);
                vec![plain(a), plain(b)]
            }
        };
        self.queues[TX_QUEUE].push_chain(&mut self.alloc, &descs);
        let _ = self.dev.process_queue(TX_QUEUE, self.mem, &mut self.io);
    }

    fn rx_buffers(&mut self, n: u8, size: u16) {
        for _ in 0..(n % 8) {
            let d = FuzzDesc {
                buffer: Buffer::Plain(Place::Data(Vec::new()), Len::Raw(u32::from(size))),
                flags: 2,
                next: 0,
            };
            self.queues[RX_QUEUE].push_chain(&mut self.alloc, &[d]);
        }
        let _ = self.dev.process_queue(RX_QUEUE, self.mem, &mut self.io);
    }
}

fuzz_target!(|input: Input| with_guest_memory(|mem| run(mem, &input)));

fn run(mem: &GuestMemoryMmap, input: &Input) {
    let host = host();
    let _ = std::fs::remove_file(&host.uds);
    let dev = match VsockDevice::new(GUEST_CID, &host.uds, Box::new(CountingLine::default())) {
        Ok(d) => d,
        Err(e) => panic!("harness: cannot listen on {}: {e}", host.uds.display()),
    };
    let mut rig = Rig {
        mem,
        dev,
        queues: Vec::new(),
        used: Vec::new(),
        alloc: Alloc::new(QUEUES as u64 * QUEUE_SLOT, input.skew),
        io: RecordingIo::default(),
        audit: Auditor::new(mem),
        after_reset: false,
        listener_fd: host.port5.as_raw_fd(),
    };
    rig.activate(input.log2, input.features);

    for action in input.actions.iter().take(256) {
        match action {
            Action::Packet(p) => rig.packet(p),
            Action::Chain(i, descs) => rig.queues[q(*i)].push_chain(&mut rig.alloc, descs),
            Action::RxBuffers(n, size) => rig.rx_buffers(*n, *size),
            Action::SetDesc(i, at, d) => rig.queues[q(*i)].set_desc(&mut rig.alloc, *at, d),
            Action::Publish(i, heads) => rig.queues[q(*i)].publish(heads),
            Action::BumpAvail(i, n) => rig.queues[q(*i)].bump_avail_idx(u16::from(*n)),
            Action::Poke(addr, bytes) => {
                let addr = u64::from(*addr);
                let len = bytes.len() as u64;
                if rig.queues.iter().all(|q| !q.overlaps_used(addr, len)) {
                    let _ = mem.write_slice(bytes, GuestAddress(addr));
                }
                rig.alloc.tainted = true;
            }
            Action::Kick(i) => {
                let _ = rig.dev.process_queue(usize::from(*i), mem, &mut rig.io);
            }
            Action::Complete(pick, outcome, fill) => {
                rig.complete(usize::from(*pick), *outcome, fill)
            }
            Action::CompleteAll(outcome) => rig.complete_all(*outcome),
            Action::CancelStale => {
                let stale = <VsockDevice as VirtioDevice<GuestMemoryMmap>>::stale_tags(&rig.dev);
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
            Action::Reset => rig.reset(),
            Action::Reactivate(log2, features) => {
                rig.reset();
                rig.activate(*log2, *features);
            }
            Action::EndTurn => rig.dev.end_turn(mem),
        }
        rig.audit();
        rig.audit.verify_in_flight();
        // The host side takes (and drops) the guest's connections.
        while let Ok((s, _)) = host.port5.accept() {
            drop(s);
        }
    }

    rig.io.full = false;
    rig.audit();
    rig.complete_all(Outcome::Full);
    rig.reset();
    rig.complete_all(Outcome::Errno(3));
    assert!(
        rig.audit.pending.is_empty(),
        "ops keep coming after a reset"
    );
    assert_eq!(
        <VsockDevice as VirtioDevice<GuestMemoryMmap>>::in_flight(&rig.dev),
        0,
        "ops still counted in flight"
    );
    assert_eq!(
        rig.dev.counters().active_connections,
        0,
        "connections outlive a reset"
    );
}
