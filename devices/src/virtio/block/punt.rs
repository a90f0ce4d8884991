//! Which of a drive's reads and writes go straight to io-wq.
//!
//! io_uring starts a read or write on the submitting thread with
//! `IOCB_NOWAIT`; a file that cannot serve it without blocking answers
//! `-EAGAIN` and io_uring hands the op to an io-wq worker. On the files
//! below that always happens, so the VMM thread's first attempt is wasted
//! and the ops queue behind whichever worker picked them up.
//! `IOSQE_ASYNC` ([`IoHint::Async`]) skips the attempt and lets several
//! workers run reads side by side. Where the first attempt succeeds (page
//! cache hits on ext4, O_DIRECT, which completes through the block layer
//! without io-wq) the hint would only add a thread hop, so it stays off.
//!
//! Decided once per file, when the drive gets it (`BlockDevice::new`,
//! `swap_disk`), from `fstatfs` and the open flags: two syscalls, never
//! on the data path. Measured with `make bench-blk` (its notes carry the
//! figures): tmpfs reads and writes and buffered ext4 writes gain, ext4
//! page-cache reads lose (fio --force_async gives 0.4x at QD1 there).

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::io::IoHint;

/// `TMPFS_MAGIC` (linux/magic.h): tmpfs and /dev/shm.
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// `EXT4_SUPER_MAGIC` (also ext2 and ext3).
const EXT4_SUPER_MAGIC: i64 = 0xEF53;

/// How a drive's reads and writes are started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Punt {
    /// Reads go straight to io-wq.
    pub reads: bool,
    /// Writes go straight to io-wq.
    pub writes: bool,
}

impl Punt {
    /// The policy for `file`; all inline when the file cannot be asked
    /// (a wrong guess only costs speed).
    pub fn for_file(file: &File) -> Self {
        let fd = file.as_raw_fd();
        // SAFETY: F_GETFL on an open descriptor reads no memory.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 || flags & libc::O_DIRECT != 0 {
            return Self::default();
        }
        // SAFETY: an all-zero statfs is a valid value to be overwritten.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `fs` is a valid, writable statfs for the call.
        if unsafe { libc::fstatfs(fd, &mut fs) } != 0 {
            return Self::default();
        }
        // f_type's width differs between architectures.
        #[allow(clippy::unnecessary_cast)]
        let f_type = fs.f_type as i64;
        Self::for_fs(f_type, is_regular(file))
    }

    /// The policy for a buffered file of file system `f_type`.
    fn for_fs(f_type: i64, regular: bool) -> Self {
        match f_type {
            TMPFS_MAGIC if regular => Self {
                reads: true,
                writes: true,
            },
            EXT4_SUPER_MAGIC if regular => Self {
                reads: false,
                writes: true,
            },
            _ => Self::default(),
        }
    }

    /// The hint for a read (`write` false) or a write.
    pub fn hint(self, write: bool) -> IoHint {
        let punt = if write { self.writes } else { self.reads };
        if punt {
            IoHint::Async
        } else {
            IoHint::Inline
        }
    }
}

/// Block devices on these file systems (a /dev node on tmpfs) are served
/// by their driver, not the file system.
fn is_regular(file: &File) -> bool {
    file.metadata().is_ok_and(|m| m.file_type().is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmpfs_punts_both_ext4_only_writes_others_nothing() {
        let tmpfs = Punt::for_fs(TMPFS_MAGIC, true);
        assert_eq!(
            (tmpfs.hint(false), tmpfs.hint(true)),
            (IoHint::Async, IoHint::Async)
        );
        let ext4 = Punt::for_fs(EXT4_SUPER_MAGIC, true);
        assert_eq!(
            (ext4.hint(false), ext4.hint(true)),
            (IoHint::Inline, IoHint::Async)
        );
        let xfs = Punt::for_fs(0x5846_5342, true);
        assert_eq!(xfs, Punt::default());
        assert_eq!(Punt::for_fs(TMPFS_MAGIC, false), Punt::default());
    }

    #[test]
    fn a_file_in_dev_shm_is_tmpfs() -> std::io::Result<()> {
        let shm = std::path::Path::new("/dev/shm");
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        if !mounts
            .lines()
            .any(|l| l.starts_with("tmpfs /dev/shm tmpfs "))
        {
            eprintln!("/dev/shm is not a tmpfs mount here: skipped");
            return Ok(());
        }
        let path = shm.join(format!("ringvm-punt-test-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        assert_eq!(
            Punt::for_file(&file),
            Punt {
                reads: true,
                writes: true
            }
        );
        Ok(())
    }
}
