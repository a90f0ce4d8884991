//! A host directory as a 9P file system, confined to that directory.
//!
//! Confinement rests on two rules, both enforced by the kernel rather than
//! by string checks:
//!
//! 1. Every fid holds an `O_PATH` descriptor, and every lookup is one
//!    component resolved with `openat2(dir, name, O_PATH | O_NOFOLLOW,
//!    RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` from
//!    the parent's descriptor. `..` can never leave the starting directory
//!    (RESOLVE_BENEATH; the server refuses `..` before that anyway) and no
//!    symbolic link is ever followed on the host: a link is a node of its
//!    own, which the guest reads with Treadlink and resolves in its own
//!    namespace.
//! 2. Every other `*at` call (mkdir, unlink, rename, symlink, link, mknod)
//!    takes a parent descriptor and one checked component, and none of
//!    them follows a final symbolic link.
//!
//! Opening a walked node for I/O reopens its `O_PATH` descriptor through
//! `/proc/self/fd/N` (the inode the fid already holds, so a rename on the
//! host cannot redirect it), and refuses symbolic links before doing so.
//!
//! A share is read-only unless built writable: then every open for
//! writing and every change answers EROFS before any syscall.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use super::fs::{errno, Errno, Filesystem, OpenFile};
use super::wire::{push_dirent, qid_type, Attr, Qid, SetAttr, StatFs, STATS_BASIC, STATS_BTIME};

/// Why a share cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum HostFsError {
    /// The directory cannot be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The directory.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// It is not a directory.
    #[error("{0} is not a directory")]
    NotADirectory(String),
    /// `/proc/self/fd` is needed to reopen files and is not mounted.
    #[error("cannot open /proc/self/fd (is /proc mounted?): {0}")]
    Proc(io::Error),
    /// This kernel has no openat2 (Linux 5.6+), without which lookups
    /// cannot be confined.
    #[error("openat2 is unavailable (Linux 5.6 or later is needed): {0}")]
    NoOpenat2(io::Error),
}

/// A node: an `O_PATH` descriptor and its file type.
#[derive(Debug)]
pub struct HostNode {
    fd: OwnedFd,
    mode: u32,
}

/// A host directory served to the guest.
#[derive(Debug)]
pub struct HostFs {
    root: OwnedFd,
    proc_fds: OwnedFd,
    writable: bool,
    /// Host device numbers seen, each given a qid-path prefix so that
    /// inode numbers from different file systems never collide.
    devices: HashMap<u64, u64>,
}

/// Flags a guest may pass to open: the access mode and those with a
/// meaning for a file served over 9P. Creation goes through Tlcreate;
/// O_DIRECT, O_NOATIME, O_ASYNC and friends are dropped.
const OPEN_FLAGS_KEPT: i32 = libc::O_ACCMODE
    | libc::O_TRUNC
    | libc::O_APPEND
    | libc::O_DSYNC
    | libc::O_SYNC
    | libc::O_DIRECTORY
    | libc::O_EXCL;

/// The `open_how` of `openat2(2)` (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_CONFINED: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

fn last_errno() -> Errno {
    io::Error::last_os_error()
        .raw_os_error()
        .map(errno)
        .unwrap_or(errno(libc::EIO))
}

fn cstring(name: &[u8]) -> Result<CString, Errno> {
    CString::new(name).map_err(|_| errno(libc::EINVAL))
}

/// `openat2(dirfd, name, how)` returning an owned descriptor.
fn openat2(
    dirfd: RawFd,
    name: &CString,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> Result<OwnedFd, Errno> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u32 as u64,
        mode: u64::from(mode),
        resolve,
    };
    // SAFETY: `name` is NUL-terminated and `how` a valid open_how of the
    // size passed; the kernel only reads both.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            name.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(last_errno());
    }
    // SAFETY: the kernel just returned this descriptor to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn statx_fd(fd: RawFd) -> Result<libc::statx, Errno> {
    // SAFETY: statx is plain data; zeroes are a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is an empty C string and `st` a valid out-pointer.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_BASIC_STATS | libc::STATX_BTIME,
            &mut st,
        )
    };
    if r < 0 {
        return Err(last_errno());
    }
    Ok(st)
}

fn check(r: libc::c_int) -> Result<(), Errno> {
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

fn qid_type_of(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => qid_type::DIR,
        libc::S_IFLNK => qid_type::SYMLINK,
        _ => qid_type::FILE,
    }
}

impl HostFs {
    /// Serves the directory at `path`; `writable` allows changes.
    pub fn new(path: &Path, writable: bool) -> Result<Self, HostFsError> {
        let shown = path.display().to_string();
        let name = CString::new(path.as_os_str().as_bytes()).map_err(|_| HostFsError::Open {
            path: shown.clone(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let root = openat2(
            libc::AT_FDCWD,
            &name,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            0,
        )
        .map_err(|e| {
            let source = io::Error::from_raw_os_error(e as i32);
            match e as i32 {
                libc::ENOSYS => HostFsError::NoOpenat2(source),
                libc::ENOTDIR => HostFsError::NotADirectory(shown.clone()),
                _ => HostFsError::Open {
                    path: shown.clone(),
                    source,
                },
            }
        })?;
        let proc_fds = openat2(
            libc::AT_FDCWD,
            &CString::from(c"/proc/self/fd"),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            0,
        )
        .map_err(|e| HostFsError::Proc(io::Error::from_raw_os_error(e as i32)))?;
        Ok(Self {
            root,
            proc_fds,
            writable,
            devices: HashMap::new(),
        })
    }

    /// Whether the guest may change the share.
    pub fn writable(&self) -> bool {
        self.writable
    }

    fn qid(&mut self, st: &libc::statx) -> Qid {
        let dev = libc::makedev(st.stx_dev_major, st.stx_dev_minor);
        let next = self.devices.len() as u64;
        // One prefix per host file system; bounded by the file systems
        // under the share, and past 65535 of them prefixes just repeat.
        let prefix = *self.devices.entry(dev).or_insert(next) & 0xffff;
        let mode = u32::from(st.stx_mode);
        Qid {
            ty: qid_type_of(mode),
            version: (st.stx_mtime.tv_sec as u32) ^ st.stx_mtime.tv_nsec,
            path: (prefix << 48) ^ st.stx_ino,
        }
    }

    fn node_qid(&mut self, fd: OwnedFd) -> Result<(HostNode, Qid), Errno> {
        let st = statx_fd(fd.as_raw_fd())?;
        let qid = self.qid(&st);
        Ok((
            HostNode {
                fd,
                mode: u32::from(st.stx_mode),
            },
            qid,
        ))
    }

    fn lookup_fd(&self, dir: &HostNode, name: &[u8]) -> Result<OwnedFd, Errno> {
        openat2(
            dir.fd.as_raw_fd(),
            &cstring(name)?,
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
            RESOLVE_CONFINED,
        )
    }

    fn proc_name(node_fd: RawFd) -> CString {
        // Digits only: never contains NUL.
        CString::new(node_fd.to_string()).unwrap_or_default()
    }

    /// Reopens `node` for I/O through `/proc/self/fd`, never following a
    /// symbolic link (those are refused first: their magic link would
    /// lead to the link's target).
    fn reopen(&self, node: &HostNode, flags: i32) -> Result<OwnedFd, Errno> {
        if node.mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(errno(libc::ELOOP));
        }
        let name = Self::proc_name(node.fd.as_raw_fd());
        // SAFETY: plain openat on our own /proc/self/fd directory and a
        // NUL-terminated name; the result is checked below.
        let fd = unsafe {
            libc::openat(
                self.proc_fds.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC | libc::O_NOCTTY,
            )
        };
        if fd < 0 {
            return Err(last_errno());
        }
        // SAFETY: a descriptor the kernel just gave us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn require_writable(&self) -> Result<(), Errno> {
        if self.writable {
            Ok(())
        } else {
            Err(errno(libc::EROFS))
        }
    }

    fn open_file(fd: OwnedFd, flags: i32, directory: bool) -> OpenFile {
        let acc = flags & libc::O_ACCMODE;
        OpenFile {
            fd: Arc::new(fd),
            stream: false,
            readable: acc == libc::O_RDONLY || acc == libc::O_RDWR,
            writable: acc == libc::O_WRONLY || acc == libc::O_RDWR,
            directory,
        }
    }

    fn child_qid(&mut self, dir: &HostNode, name: &[u8]) -> Result<Qid, Errno> {
        let fd = self.lookup_fd(dir, name)?;
        Ok(self.node_qid(fd)?.1)
    }
}

impl Filesystem for HostFs {
    type Node = HostNode;

    fn root(&mut self) -> Result<(HostNode, Qid), Errno> {
        let fd = self.root.try_clone().map_err(|_| last_errno())?;
        self.node_qid(fd)
    }

    fn lookup(&mut self, dir: &HostNode, name: &[u8]) -> Result<(HostNode, Qid), Errno> {
        if dir.mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        let fd = self.lookup_fd(dir, name)?;
        self.node_qid(fd)
    }

    fn duplicate(&mut self, node: &HostNode) -> Result<HostNode, Errno> {
        Ok(HostNode {
            fd: node.fd.try_clone().map_err(|_| last_errno())?,
            mode: node.mode,
        })
    }

    fn getattr(&mut self, node: &HostNode) -> Result<Attr, Errno> {
        let st = statx_fd(node.fd.as_raw_fd())?;
        let qid = self.qid(&st);
        let t = |ts: libc::statx_timestamp| (ts.tv_sec as u64, u64::from(ts.tv_nsec));
        Ok(Attr {
            valid: STATS_BASIC
                | if st.stx_mask & libc::STATX_BTIME != 0 {
                    STATS_BTIME
                } else {
                    0
                },
            qid,
            mode: u32::from(st.stx_mode),
            uid: st.stx_uid,
            gid: st.stx_gid,
            nlink: u64::from(st.stx_nlink),
            rdev: libc::makedev(st.stx_rdev_major, st.stx_rdev_minor),
            size: st.stx_size,
            blksize: u64::from(st.stx_blksize),
            blocks: st.stx_blocks,
            atime: t(st.stx_atime),
            mtime: t(st.stx_mtime),
            ctime: t(st.stx_ctime),
            btime: t(st.stx_btime),
        })
    }

    fn open(&mut self, node: &HostNode, flags: u32) -> Result<OpenFile, Errno> {
        let flags = flags as i32 & OPEN_FLAGS_KEPT & !libc::O_EXCL;
        let acc = flags & libc::O_ACCMODE;
        if acc == libc::O_ACCMODE {
            return Err(errno(libc::EINVAL));
        }
        if (acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0) && !self.writable {
            return Err(errno(libc::EROFS));
        }
        let directory = node.mode & libc::S_IFMT == libc::S_IFDIR;
        let fd = self.reopen(node, flags)?;
        Ok(Self::open_file(fd, flags, directory))
    }

    fn readdir(
        &mut self,
        node: &HostNode,
        file: &OpenFile,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, Errno> {
        let fd = file.fd.as_raw_fd();
        // The offset is the cookie (d_off) of the last entry the guest
        // saw; seeking to it resumes after that entry.
        // SAFETY: lseek on our own descriptor.
        if unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_SET) } < 0 {
            return Err(last_errno());
        }
        // A linux_dirent64 is never larger than the 9P entry it becomes
        // plus a little padding, so `max` bytes of them cover the reply.
        let mut buf = vec![0u8; max.clamp(512, 64 * 1024)];
        // SAFETY: getdents64 writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(last_errno());
        }
        let n = (n as usize).min(buf.len());
        let dir_dev = statx_fd(node.fd.as_raw_fd())?;
        let mut out = Vec::with_capacity(max.min(buf.len()));
        let mut pos = 0usize;
        // linux_dirent64: ino[8] off[8] reclen[2] type[1] name[...] NUL.
        while pos + 19 <= n {
            let Some(rec) = buf.get(pos..n) else { break };
            let ino = u64::from_le_bytes(rec[0..8].try_into().unwrap_or_default());
            let off = u64::from_le_bytes(rec[8..16].try_into().unwrap_or_default());
            let reclen = usize::from(u16::from_le_bytes([rec[16], rec[17]]));
            let dtype = rec[18];
            if reclen < 19 || reclen > rec.len() {
                break;
            }
            let name_bytes = &rec[19..reclen];
            let name = name_bytes
                .iter()
                .position(|&b| b == 0)
                .map_or(name_bytes, |end| &name_bytes[..end]);
            let mut st = dir_dev;
            st.stx_ino = ino;
            st.stx_mode = match dtype {
                libc::DT_DIR => libc::S_IFDIR as u16,
                libc::DT_LNK => libc::S_IFLNK as u16,
                _ => libc::S_IFREG as u16,
            };
            let mut qid = self.qid(&st);
            qid.version = 0;
            if !push_dirent(&mut out, max, &qid, off, dtype, name) {
                break;
            }
            pos += reclen;
        }
        Ok(out)
    }

    fn statfs(&mut self, node: &HostNode) -> Result<StatFs, Errno> {
        // SAFETY: statfs is plain data; zeroes are valid.
        let mut s: libc::statfs64 = unsafe { std::mem::zeroed() };
        // SAFETY: a valid out-pointer and our own descriptor.
        check(unsafe { libc::fstatfs64(node.fd.as_raw_fd(), &mut s) })?;
        // SAFETY: fsid_t is two ints, read as one u64.
        let fsid: u64 = unsafe { std::mem::transmute(s.f_fsid) };
        Ok(StatFs {
            fs_type: s.f_type as u32,
            bsize: s.f_bsize as u32,
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            fsid,
            namelen: s.f_namelen as u32,
        })
    }

    fn readlink(&mut self, node: &HostNode) -> Result<Vec<u8>, Errno> {
        if node.mode & libc::S_IFMT != libc::S_IFLNK {
            return Err(errno(libc::EINVAL));
        }
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: readlinkat writes at most `buf.len()` bytes; the empty
        // path names the O_PATH descriptor's link itself.
        let n = unsafe {
            libc::readlinkat(
                node.fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(last_errno());
        }
        buf.truncate((n as usize).min(buf.len()));
        Ok(buf)
    }

    fn create(
        &mut self,
        dir: &HostNode,
        name: &[u8],
        flags: u32,
        mode: u32,
    ) -> Result<(HostNode, Qid, OpenFile), Errno> {
        self.require_writable()?;
        let flags = (flags as i32 & OPEN_FLAGS_KEPT & !libc::O_DIRECTORY) | libc::O_CREAT;
        let fd = openat2(
            dir.fd.as_raw_fd(),
            &cstring(name)?,
            flags | libc::O_NOFOLLOW,
            mode & 0o7777,
            RESOLVE_CONFINED,
        )?;
        // The node is the inode just created, reached through the open
        // descriptor (no second lookup by name).
        let path = {
            let pname = Self::proc_name(fd.as_raw_fd());
            openat2(self.proc_fds.as_raw_fd(), &pname, libc::O_PATH, 0, 0)?
        };
        let (node, qid) = self.node_qid(path)?;
        Ok((node, qid, Self::open_file(fd, flags, false)))
    }

    fn mkdir(&mut self, dir: &HostNode, name: &[u8], mode: u32) -> Result<Qid, Errno> {
        self.require_writable()?;
        let c = cstring(name)?;
        // SAFETY: a NUL-terminated name and our own directory descriptor.
        check(unsafe { libc::mkdirat(dir.fd.as_raw_fd(), c.as_ptr(), mode & 0o7777) })?;
        self.child_qid(dir, name)
    }

    fn symlink(&mut self, dir: &HostNode, name: &[u8], target: &[u8]) -> Result<Qid, Errno> {
        self.require_writable()?;
        let (c, t) = (cstring(name)?, cstring(target)?);
        // SAFETY: NUL-terminated strings and our own directory descriptor.
        check(unsafe { libc::symlinkat(t.as_ptr(), dir.fd.as_raw_fd(), c.as_ptr()) })?;
        self.child_qid(dir, name)
    }

    fn mknod(&mut self, dir: &HostNode, name: &[u8], mode: u32, rdev: u64) -> Result<Qid, Errno> {
        self.require_writable()?;
        let c = cstring(name)?;
        // SAFETY: as for mkdirat.
        check(unsafe { libc::mknodat(dir.fd.as_raw_fd(), c.as_ptr(), mode, rdev) })?;
        self.child_qid(dir, name)
    }

    fn link(&mut self, node: &HostNode, dir: &HostNode, name: &[u8]) -> Result<(), Errno> {
        self.require_writable()?;
        if node.mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(errno(libc::EPERM));
        }
        let c = cstring(name)?;
        let src = Self::proc_name(node.fd.as_raw_fd());
        // AT_SYMLINK_FOLLOW on /proc/self/fd/N links the inode the fid
        // holds (a symbolic link's magic link names the link itself).
        // SAFETY: NUL-terminated names and our own descriptors.
        check(unsafe {
            libc::linkat(
                self.proc_fds.as_raw_fd(),
                src.as_ptr(),
                dir.fd.as_raw_fd(),
                c.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        })
    }

    fn rename(
        &mut self,
        olddir: &HostNode,
        oldname: &[u8],
        newdir: &HostNode,
        newname: &[u8],
    ) -> Result<(), Errno> {
        self.require_writable()?;
        let (o, n) = (cstring(oldname)?, cstring(newname)?);
        // SAFETY: NUL-terminated names and our own directory descriptors.
        check(unsafe {
            libc::renameat(
                olddir.fd.as_raw_fd(),
                o.as_ptr(),
                newdir.fd.as_raw_fd(),
                n.as_ptr(),
            )
        })
    }

    fn unlink(&mut self, dir: &HostNode, name: &[u8], flags: u32) -> Result<(), Errno> {
        self.require_writable()?;
        let c = cstring(name)?;
        let flags = flags as i32 & libc::AT_REMOVEDIR;
        // SAFETY: as above.
        check(unsafe { libc::unlinkat(dir.fd.as_raw_fd(), c.as_ptr(), flags) })
    }

    fn setattr(&mut self, node: &HostNode, a: &SetAttr) -> Result<(), Errno> {
        use super::wire::setattr as v;
        self.require_writable()?;
        let fd = node.fd.as_raw_fd();
        let is_link = node.mode & libc::S_IFMT == libc::S_IFLNK;
        let pname = Self::proc_name(fd);
        let proc_fd = self.proc_fds.as_raw_fd();
        if a.valid & v::MODE != 0 {
            if is_link {
                return Err(errno(libc::EOPNOTSUPP));
            }
            // SAFETY: our /proc/self/fd directory and a NUL-terminated name;
            // the magic link leads to the fid's own inode (not a link).
            check(unsafe { libc::fchmodat(proc_fd, pname.as_ptr(), a.mode & 0o7777, 0) })?;
        }
        if a.valid & (v::UID | v::GID) != 0 {
            let uid = if a.valid & v::UID != 0 {
                a.uid
            } else {
                u32::MAX
            };
            let gid = if a.valid & v::GID != 0 {
                a.gid
            } else {
                u32::MAX
            };
            // SAFETY: an empty path on our O_PATH descriptor.
            check(unsafe {
                libc::fchownat(
                    fd,
                    c"".as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if a.valid & v::SIZE != 0 {
            if is_link || node.mode & libc::S_IFMT == libc::S_IFDIR {
                return Err(errno(libc::EINVAL));
            }
            let file = self.reopen(node, libc::O_WRONLY)?;
            // SAFETY: ftruncate on a descriptor we own.
            check(unsafe { libc::ftruncate(file.as_raw_fd(), a.size as libc::off_t) })?;
        }
        if a.valid & (v::ATIME | v::MTIME) != 0 && !is_link {
            let ts = |set: bool, given: bool, sec: u64, nsec: u64| libc::timespec {
                tv_sec: sec as libc::time_t,
                tv_nsec: if !set {
                    libc::UTIME_OMIT
                } else if given {
                    nsec as libc::c_long
                } else {
                    libc::UTIME_NOW
                },
            };
            let times = [
                ts(
                    a.valid & v::ATIME != 0,
                    a.valid & v::ATIME_SET != 0,
                    a.atime_sec,
                    a.atime_nsec,
                ),
                ts(
                    a.valid & v::MTIME != 0,
                    a.valid & v::MTIME_SET != 0,
                    a.mtime_sec,
                    a.mtime_nsec,
                ),
            ];
            // SAFETY: two valid timespecs and a NUL-terminated name in our
            // /proc/self/fd directory.
            check(unsafe { libc::utimensat(proc_fd, pname.as_ptr(), times.as_ptr(), 0) })?;
        }
        Ok(())
    }
}
