//! A ring of provided buffers (io_uring's `IORING_REGISTER_PBUF_RING`):
//! buffers published to the kernel ahead of the data, so a read picks one
//! itself when data arrives instead of being given its buffer at submit.
//!
//! The device owns the ring's memory and fills its entries; the VMM
//! registers it on its io_uring ring before the ring is locked down
//! (registration is an `io_uring_register` call the lockdown refuses
//! afterwards) and tells the device the buffer group it got. A device
//! whose ring was never registered ([`BufRing::group`] is `None`) simply
//! does not use it.
//!
//! The layout is the kernel's ABI (`struct io_uring_buf`, 16 bytes: addr,
//! len, bid, and a reserved field that in entry 0 is the ring's tail). The
//! kernel keeps its head to itself and advances it by one for every
//! completion that carries a buffer id (`IORING_CQE_F_BUFFER`); the owner
//! counts those to know which entries are still published.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

/// Bytes of one `struct io_uring_buf`.
const ENTRY_LEN: usize = 16;
/// Offset of the tail (entry 0's reserved field).
const TAIL_OFFSET: usize = 14;

/// Why a ring could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BufRingError {
    /// The kernel takes a power of two up to 32768 entries.
    #[error("a buffer ring needs a power-of-two entry count up to 32768, not {0}")]
    BadSize(u16),
    /// The anonymous mapping failed.
    #[error("mapping the buffer ring: {0}")]
    Map(#[source] io::Error),
}

/// The ring's memory and the owner's view of it.
#[derive(Debug)]
pub struct BufRing {
    base: NonNull<u8>,
    bytes: usize,
    entries: u16,
    /// The buffer group the VMM registered the ring under.
    group: Option<u16>,
    /// Entries written (published or not yet): the next one goes at
    /// `tail & (entries - 1)`.
    tail: u16,
}

// SAFETY: the mapping is owned by this value alone; the kernel only reads
// it. Moving the owner to another thread moves the sole access with it.
unsafe impl Send for BufRing {}

impl BufRing {
    /// Maps a zeroed, page-aligned ring of `entries` entries.
    pub fn new(entries: u16) -> Result<Self, BufRingError> {
        if !entries.is_power_of_two() || entries > 32768 {
            return Err(BufRingError::BadSize(entries));
        }
        let bytes = usize::from(entries) * ENTRY_LEN;
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched and the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(BufRingError::Map(io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| BufRingError::Map(io::Error::other("mmap returned null")))?;
        Ok(Self {
            base,
            bytes,
            entries,
            group: None,
            tail: 0,
        })
    }

    /// The ring's address, for `IORING_REGISTER_PBUF_RING`.
    pub fn addr(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// Its entry count.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// The buffer group it is registered under, if the VMM registered it.
    pub fn group(&self) -> Option<u16> {
        self.group
    }

    /// Records that the VMM registered the ring as buffer group `group`.
    pub fn set_registered(&mut self, group: u16) {
        self.group = Some(group);
    }

    /// The tail as written so far (published or not).
    pub fn tail(&self) -> u16 {
        self.tail
    }

    fn tail_cell(&self) -> &AtomicU16 {
        // SAFETY: the tail lies inside the mapping (entry 0), is 2-byte
        // aligned (the mapping is page-aligned, the offset even), and is
        // only ever accessed atomically (here and by the kernel).
        unsafe { &*self.base.as_ptr().add(TAIL_OFFSET).cast::<AtomicU16>() }
    }

    /// Writes buffer `bid` (`len` bytes at host address `addr`) into the
    /// next entry. The kernel does not see it before [`Self::publish`].
    ///
    /// # Safety
    ///
    /// Once published, the kernel may write up to `len` bytes at `addr`
    /// at any time until the entry is consumed (a completion carries
    /// `bid`) or withdrawn ([`Self::rewind`], with no op on the group
    /// in flight): the caller keeps that memory valid and writable and
    /// does not use it meanwhile.
    pub unsafe fn push(&mut self, addr: u64, len: u32, bid: u16) {
        let index = usize::from(self.tail & (self.entries - 1));
        // SAFETY: `index < entries`, so the entry lies inside the mapping;
        // the fields are written separately so entry 0's tail (its reserved
        // field) is left alone. The kernel reads entries only below the
        // published tail, which this one is not yet.
        unsafe {
            let entry = self.base.as_ptr().add(index * ENTRY_LEN);
            entry.cast::<u64>().write_volatile(addr);
            entry.add(8).cast::<u32>().write_volatile(len);
            entry.add(12).cast::<u16>().write_volatile(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every entry pushed so far visible to the kernel.
    pub fn publish(&self) {
        self.tail_cell().store(self.tail, Ordering::Release);
    }

    /// Withdraws every published entry from `head` on (`head` being the
    /// kernel's head: the entries consumed so far), so the ring is empty.
    ///
    /// Only sound while no operation on the group is in flight: the kernel
    /// picks buffers only for a read it is running.
    pub fn rewind(&mut self, head: u16) {
        self.tail = head;
        self.publish();
    }

    /// The entry at ring position `pos` as `(addr, len, bid)`: what the
    /// kernel would take there (used by fakes that play the kernel).
    pub fn entry(&self, pos: u16) -> (u64, u32, u16) {
        let index = usize::from(pos & (self.entries - 1));
        // SAFETY: `index < entries`: inside the mapping, fields aligned.
        unsafe {
            let entry = self.base.as_ptr().add(index * ENTRY_LEN);
            (
                entry.cast::<u64>().read_volatile(),
                entry.add(8).cast::<u32>().read_volatile(),
                entry.add(12).cast::<u16>().read_volatile(),
            )
        }
    }

    /// The tail the kernel sees.
    pub fn published_tail(&self) -> u16 {
        self.tail_cell().load(Ordering::Acquire)
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and unmapped once. A registration
        // keeps its own pin on the pages, so a ring dropped while still
        // registered leaves the kernel nothing dangling.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_tail_share_entry_zero_without_clobbering() {
        assert!(matches!(BufRing::new(3), Err(BufRingError::BadSize(3))));
        let mut ring = BufRing::new(4).unwrap();
        assert_eq!(ring.addr() % 4096, 0);
        // SAFETY: nothing reads these addresses (no kernel registration).
        unsafe {
            ring.push(0x1000, 1536, 7);
            ring.push(0x2000, 1536, 9);
        }
        assert_eq!(ring.published_tail(), 0, "not visible before publish");
        ring.publish();
        assert_eq!(ring.published_tail(), 2);
        assert_eq!(ring.entry(0), (0x1000, 1536, 7));
        assert_eq!(ring.entry(1), (0x2000, 1536, 9));
        for i in 0..4u16 {
            // SAFETY: as above.
            unsafe { ring.push(u64::from(i), 1, i) };
        }
        ring.publish();
        assert_eq!(ring.published_tail(), 6, "entry 0 rewritten, tail intact");
        assert_eq!(ring.entry(4), (2, 1, 2), "wraps at the entry count");
        ring.rewind(3);
        assert_eq!((ring.tail(), ring.published_tail()), (3, 3));
        assert_eq!(ring.group(), None);
        ring.set_registered(5);
        assert_eq!(ring.group(), Some(5));
    }
}
