//! The 9P2000.L protocol engine: the session (version, msize), the fid
//! table and the meaning of each request, over any [`Filesystem`].
//!
//! It does no guest-memory access and no data I/O: [`Server::handle`]
//! turns one parsed request into an [`Action`], either a complete reply or
//! a data transfer (read, write, fsync) for the device to run on the ring.
//! That keeps it testable with plain byte vectors and a temporary
//! directory, and keeps every bound in one place:
//!
//! - msize is the client's, capped at the device's maximum;
//! - a read or readdir never asks for more than the reply can hold
//!   (msize and the chain's writable bytes, less the reply header);
//! - the fid table holds at most `max_fids` entries (ENFILE beyond);
//! - every name is one path component, checked here before any file
//!   system sees it.

use std::collections::HashMap;

use super::fs::{errno, Errno, Filesystem, OpenFile};
use super::wire::{
    Qid, Reply, Tmessage, MIN_MSIZE, NOFID, READ_REPLY_HEADER_LEN, VERSION_9P2000_L,
};

/// Longest file name accepted (NAME_MAX).
pub const MAX_NAME: usize = 255;

/// Default bound on live fids: each may hold a host descriptor.
pub const DEFAULT_MAX_FIDS: usize = 1 << 16;

/// `F_UNLCK` as 9P's lock types number it.
const LOCK_TYPE_UNLOCK: u8 = 2;

/// What to do with one request.
#[derive(Debug)]
pub enum Action {
    /// Send this reply now.
    Reply(Reply),
    /// Read up to `count` bytes into the reply's data area (after the
    /// 11-byte Rread header), then send Rread.
    Read {
        /// The open file.
        file: OpenFile,
        /// File offset (ignored for streams).
        offset: u64,
        /// Bytes to read, already bounded by msize and the reply room.
        count: u32,
    },
    /// Write the request's payload, then send Rwrite.
    Write {
        /// The open file.
        file: OpenFile,
        /// File offset (ignored for streams).
        offset: u64,
        /// Payload bytes.
        count: u32,
    },
    /// Make the file durable, then send Rfsync.
    Fsync {
        /// The open file.
        file: OpenFile,
        /// fdatasync rather than fsync.
        datasync: bool,
    },
    /// Abort the request tagged `oldtag` (the device knows what is in
    /// flight), then send Rflush.
    Flush {
        /// The tag to abort.
        oldtag: u16,
    },
}

#[derive(Debug)]
struct Fid<N> {
    node: N,
    qid: Qid,
    root: bool,
    open: Option<OpenFile>,
}

fn get<N>(fids: &HashMap<u32, Fid<N>>, fid: u32) -> Result<&Fid<N>, Errno> {
    fids.get(&fid).ok_or(errno(libc::EBADF))
}

/// Checks that `name` is one path component a lookup may use.
pub fn check_name(name: &[u8]) -> Result<(), Errno> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(errno(libc::EINVAL));
    }
    if name.len() > MAX_NAME {
        return Err(errno(libc::ENAMETOOLONG));
    }
    if name == b"." || name == b".." {
        return Err(errno(libc::EINVAL));
    }
    Ok(())
}

/// A 9P2000.L server over one file system.
#[derive(Debug)]
pub struct Server<F: Filesystem> {
    fs: F,
    max_msize: u32,
    msize: u32,
    max_fids: usize,
    fids: HashMap<u32, Fid<F::Node>>,
}

impl<F: Filesystem> Server<F> {
    /// A server for `fs` that negotiates msize up to `max_msize`.
    pub fn new(fs: F, max_msize: u32) -> Self {
        let max_msize = max_msize.max(MIN_MSIZE);
        Self {
            fs,
            max_msize,
            msize: max_msize,
            max_fids: DEFAULT_MAX_FIDS,
            fids: HashMap::new(),
        }
    }

    /// Bounds the fid table (ENFILE past it).
    pub fn set_max_fids(&mut self, max: usize) {
        self.max_fids = max;
    }

    /// The negotiated msize (the maximum until a Tversion).
    pub fn msize(&self) -> u32 {
        self.msize
    }

    /// Live fids.
    pub fn fid_count(&self) -> usize {
        self.fids.len()
    }

    /// The file system, for tests and counters.
    pub fn fs(&self) -> &F {
        &self.fs
    }

    /// Forgets every fid, as a device reset does.
    pub fn reset(&mut self) {
        self.fids.clear();
        self.msize = self.max_msize;
    }

    /// Most data bytes a reply can carry after an 11-byte header, given
    /// the `room` the chain offers for the reply.
    fn data_room(&self, count: u32, room: u32) -> u32 {
        count
            .min(self.msize.saturating_sub(READ_REPLY_HEADER_LEN))
            .min(room.saturating_sub(READ_REPLY_HEADER_LEN))
    }

    fn bind(&mut self, fid: u32, new: Fid<F::Node>) -> Result<(), Errno> {
        if !self.fids.contains_key(&fid) && self.fids.len() >= self.max_fids {
            return Err(errno(libc::ENFILE));
        }
        self.fids.insert(fid, new);
        Ok(())
    }

    /// Answers one request; `room` is how many bytes the chain has for the
    /// reply.
    pub fn handle(&mut self, msg: &Tmessage<'_>, room: u32) -> Action {
        match self.dispatch(msg, room) {
            Ok(action) => action,
            Err(e) => Action::Reply(Reply::Lerror(e)),
        }
    }

    fn dispatch(&mut self, msg: &Tmessage<'_>, room: u32) -> Result<Action, Errno> {
        let reply = |r| Ok(Action::Reply(r));
        match *msg {
            Tmessage::Version { msize, version } => {
                self.fids.clear();
                if version != VERSION_9P2000_L || msize < MIN_MSIZE {
                    return reply(Reply::Version {
                        msize: msize.min(self.max_msize),
                        version: b"unknown",
                    });
                }
                self.msize = msize.min(self.max_msize);
                reply(Reply::Version {
                    msize: self.msize,
                    version: VERSION_9P2000_L,
                })
            }
            Tmessage::Auth { .. } => Err(errno(libc::EOPNOTSUPP)),
            Tmessage::Attach { fid, afid, .. } => {
                if afid != NOFID {
                    return Err(errno(libc::EINVAL));
                }
                if self.fids.contains_key(&fid) {
                    return Err(errno(libc::EBADF));
                }
                let (node, qid) = self.fs.root()?;
                self.bind(
                    fid,
                    Fid {
                        node,
                        qid,
                        root: true,
                        open: None,
                    },
                )?;
                reply(Reply::Attach(qid))
            }
            Tmessage::Flush { oldtag } => Ok(Action::Flush { oldtag }),
            Tmessage::Walk {
                fid,
                newfid,
                ref names,
            } => self.walk(fid, newfid, names),
            Tmessage::Read { fid, offset, count } => {
                let f = get(&self.fids, fid)?;
                let file = f.open.as_ref().ok_or(errno(libc::EBADF))?;
                if file.directory {
                    return Err(errno(libc::EISDIR));
                }
                if !file.readable {
                    return Err(errno(libc::EBADF));
                }
                Ok(Action::Read {
                    file: file.clone(),
                    offset,
                    count: self.data_room(count, room),
                })
            }
            Tmessage::Write { fid, offset, count } => {
                let f = get(&self.fids, fid)?;
                let file = f.open.as_ref().ok_or(errno(libc::EBADF))?;
                if !file.writable || file.directory {
                    return Err(errno(libc::EBADF));
                }
                Ok(Action::Write {
                    file: file.clone(),
                    offset,
                    count,
                })
            }
            Tmessage::Clunk { fid } => {
                self.fids.remove(&fid).ok_or(errno(libc::EBADF))?;
                reply(Reply::Clunk)
            }
            Tmessage::Remove { fid } => {
                // Tremove clunks the fid even when it fails. Linux removes
                // by name (Tunlinkat) and only falls back to this.
                self.fids.remove(&fid).ok_or(errno(libc::EBADF))?;
                Err(errno(libc::EOPNOTSUPP))
            }
            Tmessage::Statfs { fid } => {
                let node = &get(&self.fids, fid)?.node;
                reply(Reply::Statfs(self.fs.statfs(node)?))
            }
            Tmessage::Lopen { fid, flags } => {
                let f = get(&self.fids, fid)?;
                if f.open.is_some() {
                    return Err(errno(libc::EBADF));
                }
                let qid = f.qid;
                let file = self.fs.open(&f.node, flags)?;
                if let Some(f) = self.fids.get_mut(&fid) {
                    f.open = Some(file);
                }
                reply(Reply::Lopen { qid, iounit: 0 })
            }
            Tmessage::Lcreate {
                fid,
                name,
                flags,
                mode,
                ..
            } => {
                check_name(name)?;
                let f = get(&self.fids, fid)?;
                if f.open.is_some() {
                    return Err(errno(libc::EBADF));
                }
                let (node, qid, file) = self.fs.create(&f.node, name, flags, mode)?;
                self.fids.insert(
                    fid,
                    Fid {
                        node,
                        qid,
                        root: false,
                        open: Some(file),
                    },
                );
                reply(Reply::Lcreate { qid, iounit: 0 })
            }
            Tmessage::Symlink {
                fid, name, target, ..
            } => {
                check_name(name)?;
                if target.is_empty() || target.contains(&0) {
                    return Err(errno(libc::EINVAL));
                }
                let node = &get(&self.fids, fid)?.node;
                reply(Reply::Symlink(self.fs.symlink(node, name, target)?))
            }
            Tmessage::Mknod {
                dfid,
                name,
                mode,
                major,
                minor,
                ..
            } => {
                check_name(name)?;
                let node = &get(&self.fids, dfid)?.node;
                let rdev = libc::makedev(major, minor);
                reply(Reply::Mknod(self.fs.mknod(node, name, mode, rdev)?))
            }
            // Linux renames with Trenameat and falls back to this only
            // when a server lacks it; a fid carries no name to rename.
            Tmessage::Rename { .. } => Err(errno(libc::EOPNOTSUPP)),
            Tmessage::Readlink { fid } => {
                let node = &get(&self.fids, fid)?.node;
                reply(Reply::Readlink(self.fs.readlink(node)?))
            }
            Tmessage::Getattr { fid, .. } => {
                let node = &get(&self.fids, fid)?.node;
                reply(Reply::Getattr(self.fs.getattr(node)?))
            }
            Tmessage::Setattr { fid, ref attr } => {
                let node = &get(&self.fids, fid)?.node;
                self.fs.setattr(node, attr)?;
                reply(Reply::Setattr)
            }
            // No extended attributes: the client treats them as absent.
            Tmessage::XattrWalk { fid, .. } | Tmessage::XattrCreate { fid, .. } => {
                get(&self.fids, fid)?;
                Err(errno(libc::EOPNOTSUPP))
            }
            Tmessage::Readdir { fid, offset, count } => {
                let f = get(&self.fids, fid)?;
                let file = f.open.as_ref().ok_or(errno(libc::EBADF))?;
                if !file.directory {
                    return Err(errno(libc::ENOTDIR));
                }
                let max = self.data_room(count, room) as usize;
                let data = self.fs.readdir(&f.node, file, offset, max)?;
                reply(Reply::Readdir(data))
            }
            Tmessage::Fsync { fid, datasync } => {
                let file = get(&self.fids, fid)?
                    .open
                    .as_ref()
                    .ok_or(errno(libc::EBADF))?;
                if file.stream || file.directory {
                    // Nothing to make durable (and fsync on a pipe fails).
                    return reply(Reply::Fsync);
                }
                Ok(Action::Fsync {
                    file: file.clone(),
                    datasync: datasync != 0,
                })
            }
            // POSIX locks are kept by the guest kernel itself; the server
            // only grants (one guest, no other lock holders it knows of).
            Tmessage::Lock { fid, .. } => {
                get(&self.fids, fid)?;
                reply(Reply::Lock(0))
            }
            Tmessage::GetLock {
                fid,
                start,
                length,
                proc_id,
                client_id,
                ..
            } => {
                get(&self.fids, fid)?;
                reply(Reply::GetLock {
                    lock_type: LOCK_TYPE_UNLOCK,
                    start,
                    length,
                    proc_id,
                    client_id: client_id.to_vec(),
                })
            }
            Tmessage::Link { dfid, fid, name } => {
                check_name(name)?;
                let dir = &get(&self.fids, dfid)?.node;
                let node = &get(&self.fids, fid)?.node;
                self.fs.link(node, dir, name)?;
                reply(Reply::Link)
            }
            Tmessage::Mkdir {
                dfid, name, mode, ..
            } => {
                check_name(name)?;
                let node = &get(&self.fids, dfid)?.node;
                reply(Reply::Mkdir(self.fs.mkdir(node, name, mode)?))
            }
            Tmessage::Renameat {
                olddirfid,
                oldname,
                newdirfid,
                newname,
            } => {
                check_name(oldname)?;
                check_name(newname)?;
                let old = &get(&self.fids, olddirfid)?.node;
                let new = &get(&self.fids, newdirfid)?.node;
                self.fs.rename(old, oldname, new, newname)?;
                reply(Reply::Renameat)
            }
            Tmessage::Unlinkat {
                dirfid,
                name,
                flags,
            } => {
                check_name(name)?;
                let node = &get(&self.fids, dirfid)?.node;
                self.fs.unlink(node, name, flags)?;
                reply(Reply::Unlinkat)
            }
        }
    }

    /// Twalk: up to 16 names from `fid`; `newfid` is bound only when every
    /// name was found. `.` stays, `..` at the root stays at the root; any
    /// other `..` is refused, because the server never resolves a path
    /// upwards (Linux's client never sends one: its VFS resolves `..`).
    fn walk(&mut self, fid: u32, newfid: u32, names: &[&[u8]]) -> Result<Action, Errno> {
        let start = get(&self.fids, fid)?;
        if newfid != fid && self.fids.contains_key(&newfid) {
            return Err(errno(libc::EBADF));
        }
        let mut node = self.fs.duplicate(&start.node)?;
        let mut qid = start.qid;
        let mut root = start.root;
        let mut qids = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let step = match *name {
                b"." => Ok(None),
                b".." if root => Ok(None),
                b".." => Err(errno(libc::EPERM)),
                n => check_name(n).and_then(|()| self.fs.lookup(&node, n).map(Some)),
            };
            match step {
                Ok(None) => qids.push(qid),
                Ok(Some((next, next_qid))) => {
                    node = next;
                    qid = next_qid;
                    root = false;
                    qids.push(qid);
                }
                Err(e) if i == 0 => return Err(e),
                // A partial walk answers the qids found and binds nothing.
                Err(_) => return Ok(Action::Reply(Reply::Walk(qids))),
            }
        }
        self.bind(
            newfid,
            Fid {
                node,
                qid,
                root,
                open: None,
            },
        )?;
        Ok(Action::Reply(Reply::Walk(qids)))
    }
}
