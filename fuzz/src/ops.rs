//! The auditor of host I/O: what a device submitted to the (fake) ring.
//!
//! A device hands `IoOp`s with raw iovec pointers to its ring; the kernel
//! would then read and write through them. Before the harness plays the
//! kernel, it checks each op: tag within 48 bits and not already in use,
//! 1..=IOV_MAX iovecs, every buffer inside guest memory (or, where the
//! target allows it, one device-owned byte at the end). When the op
//! completes, the iovec array must still be the one submitted.

use arbitrary::Arbitrary;
use devices::io::fake::RecordingIo;
use devices::io::{IoOp, IOV_MAX, TAG_MAX};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// An op the device submitted and the harness has not completed yet.
#[derive(Debug)]
pub struct Pending {
    /// The op as submitted.
    pub op: IoOp,
    /// Its tag.
    pub tag: u64,
    /// The iovec array as it was at submission.
    pub iov: Vec<libc::iovec>,
}

impl Pending {
    /// Total bytes the op's iovecs cover.
    pub fn total(&self) -> usize {
        self.iov.iter().map(|v| v.iov_len).sum()
    }
}

/// How a completion answers an op.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Outcome {
    /// As a healthy kernel would: every byte moved, or 0.
    Full,
    /// Fewer bytes than asked.
    Short(u16),
    /// A common errno (EIO, EAGAIN, EOPNOTSUPP, ECANCELED, ENOSPC, EINVAL).
    Errno(u8),
    /// Any result at all (a frame length larger than the buffers, too).
    Raw(i32),
}

/// The errnos [`Outcome::Errno`] picks from (positive; negated in a result).
pub const ERRNOS: [i32; 6] = [
    libc::EIO,
    libc::EAGAIN,
    libc::EOPNOTSUPP,
    libc::ECANCELED,
    libc::ENOSPC,
    libc::EINVAL,
];

/// Host address ranges of guest memory, to check iovecs against.
#[derive(Debug)]
pub struct Auditor {
    regions: Vec<(usize, usize)>,
    /// Host ranges the harness never writes when it plays a read: the used
    /// rings. A driver may post buffers over its own used ring, and the
    /// kernel would then write there; skipping those bytes keeps the used
    /// ring the device's alone, so the used-ring checks stay sound.
    protected: Vec<(usize, usize)>,
    /// Ops in flight, oldest first.
    pub pending: Vec<Pending>,
}

impl Auditor {
    /// Learns where `mem` is mapped.
    pub fn new(mem: &GuestMemoryMmap) -> Self {
        let regions = mem
            .iter()
            .map(|r| {
                let host = mem
                    .get_host_address(GuestAddress(r.start_addr().0))
                    .expect("harness: region host address") as usize;
                (host, host + r.len() as usize)
            })
            .collect();
        Self {
            regions,
            protected: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// Keeps the harness from writing guest bytes `[addr, addr + len)`
    /// when it plays a read (see `protected`).
    pub fn protect(&mut self, mem: &GuestMemoryMmap, addr: u64, len: usize) {
        if let Ok(host) = mem.get_host_address(GuestAddress(addr)) {
            let host = host as usize;
            self.protected.push((host, host + len));
        }
    }

    /// Forgets every protected range (the rings moved).
    pub fn unprotect_all(&mut self) {
        self.protected.clear();
    }

    /// Plays the kernel filling a provided buffer (`addr`, `len` as the
    /// device published it in its buffer ring) with up to `len` bytes of
    /// `fill`: checks the buffer lies in guest memory first, since the
    /// kernel would write there whatever it is. Returns the bytes stored.
    pub fn fill_provided(&self, addr: u64, len: u32, fill: &[u8]) -> usize {
        let v = libc::iovec {
            iov_base: addr as usize as *mut libc::c_void,
            iov_len: len as usize,
        };
        assert!(len > 0, "empty provided buffer at {addr:#x}");
        assert!(
            self.in_guest(&v),
            "provided buffer {addr:#x}+{len:#x} is outside guest memory"
        );
        let p = Pending {
            op: IoOp::Readv {
                fd: -1,
                iovecs: std::ptr::null(),
                iovcnt: 1,
                offset: 0,
            },
            tag: 0,
            iov: vec![v],
        };
        let n = fill.len().min(len as usize);
        // SAFETY: checked above to lie in guest memory, which outlives the
        // harness's use of it.
        unsafe { play(&p, n, fill, &self.protected) };
        n
    }

    fn in_guest(&self, v: &libc::iovec) -> bool {
        let start = v.iov_base as usize;
        let Some(end) = start.checked_add(v.iov_len) else {
            return false;
        };
        self.regions.iter().any(|&(s, e)| s <= start && end <= e)
    }

    /// Moves what `io` recorded into `pending`, checking each op; `extra`
    /// says whether a Readv may end with one byte outside guest memory
    /// (net's overflow byte), `check` adds the target's own rules.
    pub fn take(
        &mut self,
        io: &mut RecordingIo,
        extra: bool,
        mut check: impl FnMut(&IoOp, &[libc::iovec]),
    ) {
        for (op, tag) in std::mem::take(&mut io.ops) {
            assert!(tag <= TAG_MAX, "tag {tag:#x} wider than 48 bits");
            assert!(
                self.pending.iter().all(|p| p.tag != tag),
                "tag {tag:#x} submitted while an op with that tag is in flight"
            );
            let iov = match op {
                IoOp::Readv { iovecs, iovcnt, .. } | IoOp::Writev { iovecs, iovcnt, .. } => {
                    let n = iovcnt as usize;
                    assert!((1..=IOV_MAX).contains(&n), "{n} iovecs in one op");
                    assert!(!iovecs.is_null(), "null iovec array");
                    // SAFETY: the device promised (IoSubmit::submit) that
                    // `iovecs` holds `iovcnt` iovecs and stays valid until
                    // completion; reading them is what the kernel would do
                    // (and what ASan watches).
                    let iov = unsafe { std::slice::from_raw_parts(iovecs, n) }.to_vec();
                    let readv = matches!(op, IoOp::Readv { .. });
                    for (i, v) in iov.iter().enumerate() {
                        let overflow_byte = extra && readv && i + 1 == n && v.iov_len == 1;
                        assert!(
                            self.in_guest(v) || overflow_byte,
                            "iovec {i} of {op:?} ({:p}+{:#x}) is outside guest memory",
                            v.iov_base,
                            v.iov_len
                        );
                        assert!(v.iov_len > 0, "empty iovec {i} in {op:?}");
                    }
                    iov
                }
                IoOp::Fsync { .. }
                | IoOp::Fallocate { .. }
                | IoOp::Poll { .. }
                | IoOp::ReadMulti { .. } => Vec::new(),
            };
            check(&op, &iov);
            self.pending.push(Pending { op, tag, iov });
        }
    }

    /// Checks that every op in flight still has its iovec array unchanged.
    pub fn verify_in_flight(&self) {
        for p in &self.pending {
            let (IoOp::Readv { iovecs, iovcnt, .. } | IoOp::Writev { iovecs, iovcnt, .. }) = p.op
            else {
                continue;
            };
            // SAFETY: as in `take`: valid until completion by contract.
            let now = unsafe { std::slice::from_raw_parts(iovecs, iovcnt as usize) };
            let same = now
                .iter()
                .zip(&p.iov)
                .all(|(a, b)| a.iov_base == b.iov_base && a.iov_len == b.iov_len);
            assert!(same, "iovec array of in-flight op tag {:#x} changed", p.tag);
        }
    }

    /// Takes the in-flight op number `pick` (modulo their count), plays the
    /// kernel for it as `outcome` says, and returns `(tag, result)` for
    /// the device's `complete`. `fill` supplies bytes a read stores (a
    /// frame, for a tap read).
    pub fn finish(&mut self, pick: usize, outcome: Outcome, fill: &[u8]) -> Option<(u64, i32)> {
        if self.pending.is_empty() {
            return None;
        }
        self.verify_in_flight();
        let p = self.pending.remove(pick % self.pending.len());
        let total = p.total();
        let res = match outcome {
            Outcome::Full => {
                let n = match p.op {
                    IoOp::Readv { .. } if !fill.is_empty() => fill.len(),
                    IoOp::Readv { .. } | IoOp::Writev { .. } => total,
                    _ => 0,
                };
                n.min(i32::MAX as usize) as i32
            }
            Outcome::Short(n) => (usize::from(n) % total.max(1)) as i32,
            Outcome::Errno(e) => -ERRNOS[usize::from(e) % ERRNOS.len()],
            Outcome::Raw(r) => r,
        };
        if res > 0 {
            let moved = (res as usize).min(total);
            // SAFETY: the iovecs were checked at submission to lie in guest
            // memory (or be the device's own byte) and are unchanged.
            unsafe { play(&p, moved, fill, &self.protected) };
        }
        Some((p.tag, res))
    }
}

/// Moves `n` bytes through the op's iovecs, as the kernel would.
///
/// # Safety
/// The iovecs must point at live memory of their length.
unsafe fn play(p: &Pending, mut n: usize, fill: &[u8], protected: &[(usize, usize)]) {
    let read = matches!(p.op, IoOp::Readv { .. });
    let mut k = 0usize;
    let mut sink = 0u8;
    for v in &p.iov {
        if n == 0 {
            break;
        }
        let len = v.iov_len.min(n);
        let base = v.iov_base.cast::<u8>();
        for i in 0..len {
            // SAFETY: `i < v.iov_len`, inside the buffer the caller vouches for.
            unsafe {
                let at = base.add(i) as usize;
                if read && protected.iter().all(|&(s, e)| at < s || at >= e) {
                    let b = fill.get(k).copied().unwrap_or(k as u8);
                    base.add(i).write_volatile(b);
                } else if !read {
                    sink ^= base.add(i).read_volatile();
                }
            }
            k += 1;
        }
        n -= len;
    }
    std::hint::black_box(sink);
}
