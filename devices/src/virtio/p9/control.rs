//! ringvm's control tree: a tiny synthetic file system the kernel mounts
//! as its first root when ringvm runs a command (`ringvm -- CMD`).
//!
//! ```text
//!   /init     the guest init (static executable), read-only
//!   /config   what init should do (shares, cwd, command), read-only
//!   /stdin    ringvm's stdin   } streams: every transfer goes to the
//!   /stdout   ringvm's stdout  } host descriptor at its own position,
//!   /stderr   ringvm's stderr  } one at a time, byte for byte
//!   /mnt      an empty directory where init mounts a tmpfs
//!   /dev      an empty directory where the kernel mounts devtmpfs
//! ```
//!
//! The files are host descriptors (two sealed memfds and duplicates of
//! ringvm's stdio), so their data moves on the ring exactly like a shared
//! file's: the command's stdout is a 9P file whose writes become writes to
//! ringvm's fd 1, with no console, no line discipline and no copy through
//! a buffer of ours.

use std::ffi::CStr;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::fs::{errno, Errno, Filesystem, OpenFile};
use super::wire::{push_dirent, qid_type, Attr, Qid, StatFs, STATS_BASIC};

/// What one node of the tree is.
#[derive(Debug)]
enum Kind {
    Dir,
    /// A read-only file with fixed contents.
    File {
        fd: Arc<OwnedFd>,
        len: u64,
        mode: u32,
    },
    /// A host stream, readable or writable.
    Stream {
        fd: Arc<OwnedFd>,
        write: bool,
    },
}

#[derive(Debug)]
struct Entry {
    name: &'static [u8],
    kind: Kind,
}

/// Index of the root directory.
const ROOT: usize = 0;
/// `V9FS_MAGIC`, what statfs reports.
const V9FS_MAGIC: u32 = 0x0102_1997;

/// The control tree.
#[derive(Debug)]
pub struct ControlFs {
    entries: Vec<Entry>,
    born: u64,
}

/// Why the tree cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ControlFsError {
    /// A memfd or a descriptor duplicate failed.
    #[error("control file system: {0}")]
    Io(#[from] io::Error),
}

fn sealed_memfd(name: &CStr, data: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd);
    file.write_all(data)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on our own descriptor.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

/// A duplicate of `fd`, or `/dev/null` when `fd` is closed (ringvm
/// started with `<&-`): the guest then reads EOF or writes into nothing,
/// as a program started that way would.
fn dup(fd: RawFd, write: bool) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor number; checked below.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new >= 0 {
        // SAFETY: a descriptor the kernel just gave us.
        return Ok(unsafe { OwnedFd::from_raw_fd(new) });
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EBADF) {
        return Err(err);
    }
    let null = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open("/dev/null")?;
    Ok(OwnedFd::from(null))
}

impl ControlFs {
    /// The tree serving `init` (the executable) and `config`, with stdin,
    /// stdout and stderr duplicated from `stdio` (normally 0, 1, 2).
    pub fn new(init: &[u8], config: &[u8], stdio: [RawFd; 3]) -> Result<Self, ControlFsError> {
        let file = |name: &CStr, data: &[u8], mode: u32| -> io::Result<Kind> {
            Ok(Kind::File {
                fd: Arc::new(sealed_memfd(name, data)?),
                len: data.len() as u64,
                mode,
            })
        };
        let stream = |fd: RawFd, write: bool| -> io::Result<Kind> {
            Ok(Kind::Stream {
                fd: Arc::new(dup(fd, write)?),
                write,
            })
        };
        let entries = vec![
            Entry {
                name: b"/",
                kind: Kind::Dir,
            },
            Entry {
                name: b"init",
                kind: file(c"ringvm-init", init, 0o555)?,
            },
            Entry {
                name: b"config",
                kind: file(c"ringvm-config", config, 0o444)?,
            },
            Entry {
                name: b"stdin",
                kind: stream(stdio[0], false)?,
            },
            Entry {
                name: b"stdout",
                kind: stream(stdio[1], true)?,
            },
            Entry {
                name: b"stderr",
                kind: stream(stdio[2], true)?,
            },
            Entry {
                name: b"mnt",
                kind: Kind::Dir,
            },
            Entry {
                name: b"dev",
                kind: Kind::Dir,
            },
        ];
        let born = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Self { entries, born })
    }

    fn qid(&self, index: usize) -> Qid {
        let ty = match self.entries.get(index).map(|e| &e.kind) {
            Some(Kind::Dir) => qid_type::DIR,
            _ => qid_type::FILE,
        };
        Qid {
            ty,
            version: 0,
            path: index as u64 + 1,
        }
    }

    fn entry(&self, index: usize) -> Result<&Entry, Errno> {
        self.entries.get(index).ok_or(errno(libc::EBADF))
    }
}

impl Filesystem for ControlFs {
    type Node = usize;

    fn root(&mut self) -> Result<(usize, Qid), Errno> {
        Ok((ROOT, self.qid(ROOT)))
    }

    fn lookup(&mut self, dir: &usize, name: &[u8]) -> Result<(usize, Qid), Errno> {
        match self.entry(*dir)?.kind {
            Kind::Dir if *dir == ROOT => {}
            Kind::Dir => return Err(errno(libc::ENOENT)),
            _ => return Err(errno(libc::ENOTDIR)),
        }
        let index = self
            .entries
            .iter()
            .skip(1)
            .position(|e| e.name == name)
            .map(|i| i + 1)
            .ok_or(errno(libc::ENOENT))?;
        Ok((index, self.qid(index)))
    }

    fn duplicate(&mut self, node: &usize) -> Result<usize, Errno> {
        Ok(*node)
    }

    fn getattr(&mut self, node: &usize) -> Result<Attr, Errno> {
        let (mode, size, nlink) = match &self.entry(*node)?.kind {
            Kind::Dir => (libc::S_IFDIR | 0o755, 0, 2),
            Kind::File { len, mode, .. } => (libc::S_IFREG | mode, *len, 1),
            Kind::Stream { write: false, .. } => (libc::S_IFREG | 0o444, 0, 1),
            Kind::Stream { write: true, .. } => (libc::S_IFREG | 0o222, 0, 1),
        };
        let t = (self.born, 0);
        Ok(Attr {
            valid: STATS_BASIC,
            qid: self.qid(*node),
            mode,
            uid: 0,
            gid: 0,
            nlink,
            rdev: 0,
            size,
            blksize: 4096,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            btime: t,
        })
    }

    fn open(&mut self, node: &usize, flags: u32) -> Result<OpenFile, Errno> {
        let acc = flags as i32 & libc::O_ACCMODE;
        let wants_write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        let wants_read = acc == libc::O_RDONLY || acc == libc::O_RDWR;
        match &self.entry(*node)?.kind {
            Kind::Dir => {
                if wants_write {
                    return Err(errno(libc::EISDIR));
                }
                // Readdir lists the table and never touches a descriptor;
                // the init file's stands in as the handle.
                let fd = match &self.entries.get(1).map(|e| &e.kind) {
                    Some(Kind::File { fd, .. }) => fd.clone(),
                    _ => return Err(errno(libc::EIO)),
                };
                Ok(OpenFile {
                    fd,
                    stream: false,
                    readable: true,
                    writable: false,
                    directory: true,
                })
            }
            Kind::File { fd, .. } => {
                if wants_write || flags as i32 & libc::O_TRUNC != 0 {
                    return Err(errno(libc::EROFS));
                }
                Ok(OpenFile {
                    fd: fd.clone(),
                    stream: false,
                    readable: true,
                    writable: false,
                    directory: false,
                })
            }
            Kind::Stream { fd, write } => {
                if (wants_write && !write) || (wants_read && *write) {
                    return Err(errno(libc::EACCES));
                }
                Ok(OpenFile {
                    fd: fd.clone(),
                    stream: true,
                    readable: !write,
                    writable: *write,
                    directory: false,
                })
            }
        }
    }

    fn readdir(
        &mut self,
        node: &usize,
        _file: &OpenFile,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, Errno> {
        // Cookies: 1 ".", 2 "..", then 3 + i for entry i (root only).
        let mut names: Vec<(&[u8], Qid, u8)> = vec![
            (b".", self.qid(*node), libc::DT_DIR),
            (b"..", self.qid(ROOT), libc::DT_DIR),
        ];
        if *node == ROOT {
            for (i, e) in self.entries.iter().enumerate().skip(1) {
                let dt = match e.kind {
                    Kind::Dir => libc::DT_DIR,
                    _ => libc::DT_REG,
                };
                names.push((e.name, self.qid(i), dt));
            }
        }
        let mut out = Vec::new();
        for (i, (name, qid, dt)) in names.into_iter().enumerate() {
            let cookie = i as u64 + 1;
            if cookie <= offset {
                continue;
            }
            if !push_dirent(&mut out, max, &qid, cookie, dt, name) {
                break;
            }
        }
        Ok(out)
    }

    fn statfs(&mut self, _node: &usize) -> Result<StatFs, Errno> {
        Ok(StatFs {
            fs_type: V9FS_MAGIC,
            bsize: 4096,
            namelen: 255,
            ..StatFs::default()
        })
    }

    fn readlink(&mut self, _node: &usize) -> Result<Vec<u8>, Errno> {
        Err(errno(libc::EINVAL))
    }
}
