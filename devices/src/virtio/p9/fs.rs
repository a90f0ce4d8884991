//! What the 9P server needs from a file system, as a trait: the host
//! directory a `--share` exports ([`super::hostfs::HostFs`]) and ringvm's
//! own synthetic control tree ([`super::control::ControlFs`]) both
//! implement it, so one protocol engine serves both.
//!
//! Metadata operations are synchronous calls, run on the VMM thread and
//! bounded (one or two syscalls each, on names of at most 255 bytes).
//! Data never passes through here: [`Filesystem::open`] hands back a host
//! file descriptor, and the device moves the bytes between that descriptor
//! and guest memory on the io_uring ring.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::wire::{Attr, Qid, SetAttr, StatFs};

/// A Linux errno (positive), as 9P2000.L's Rlerror carries it.
pub type Errno = u32;

/// Shorthand for the errno constants, which libc types as `i32`.
pub const fn errno(e: i32) -> Errno {
    e as Errno
}

/// A file opened for I/O.
#[derive(Clone, Debug)]
pub struct OpenFile {
    /// The host descriptor the ring reads and writes. Shared so that an
    /// operation in flight keeps it open even if the guest clunks the fid
    /// (or the server forgets it) before the operation completes.
    pub fd: Arc<OwnedFd>,
    /// A stream (a pipe, a terminal, ringvm's own stdio): offsets are
    /// meaningless, every transfer uses the descriptor's own position, and
    /// transfers on the same stream must not overlap.
    pub stream: bool,
    /// Reads are allowed.
    pub readable: bool,
    /// Writes are allowed.
    pub writable: bool,
    /// A directory opened for Treaddir.
    pub directory: bool,
}

/// The file system a 9P server exports.
///
/// Every method that takes a name gets one path component the server has
/// already checked (non-empty, at most 255 bytes, no `/`, no NUL, not `.`
/// or `..`). Methods that change anything return `EROFS` by default.
pub trait Filesystem: std::fmt::Debug {
    /// What a fid points at (an `O_PATH` descriptor, a node index, ...).
    type Node: std::fmt::Debug;

    /// The root of the tree, for Tattach.
    fn root(&mut self) -> Result<(Self::Node, Qid), Errno>;

    /// Looks `name` up in directory `dir`.
    fn lookup(&mut self, dir: &Self::Node, name: &[u8]) -> Result<(Self::Node, Qid), Errno>;

    /// A second reference to `node` (Twalk with no names).
    fn duplicate(&mut self, node: &Self::Node) -> Result<Self::Node, Errno>;

    /// The node's attributes.
    fn getattr(&mut self, node: &Self::Node) -> Result<Attr, Errno>;

    /// Opens the node with Linux open `flags`.
    fn open(&mut self, node: &Self::Node, flags: u32) -> Result<OpenFile, Errno>;

    /// Encoded directory entries of an open directory, starting after the
    /// entry whose cookie is `offset` (0: from the start), at most `max`
    /// bytes (see [`super::wire::push_dirent`]).
    fn readdir(
        &mut self,
        node: &Self::Node,
        file: &OpenFile,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, Errno>;

    /// File system statistics.
    fn statfs(&mut self, node: &Self::Node) -> Result<StatFs, Errno>;

    /// A symbolic link's contents.
    fn readlink(&mut self, node: &Self::Node) -> Result<Vec<u8>, Errno>;

    /// Creates and opens `name` in `dir`; returns the new node.
    fn create(
        &mut self,
        _dir: &Self::Node,
        _name: &[u8],
        _flags: u32,
        _mode: u32,
    ) -> Result<(Self::Node, Qid, OpenFile), Errno> {
        Err(errno(libc::EROFS))
    }

    /// Creates directory `name` in `dir`.
    fn mkdir(&mut self, _dir: &Self::Node, _name: &[u8], _mode: u32) -> Result<Qid, Errno> {
        Err(errno(libc::EROFS))
    }

    /// Creates a symbolic link `name` in `dir` holding `target`.
    fn symlink(&mut self, _dir: &Self::Node, _name: &[u8], _target: &[u8]) -> Result<Qid, Errno> {
        Err(errno(libc::EROFS))
    }

    /// Creates a FIFO, socket or device node.
    fn mknod(
        &mut self,
        _dir: &Self::Node,
        _name: &[u8],
        _mode: u32,
        _rdev: u64,
    ) -> Result<Qid, Errno> {
        Err(errno(libc::EROFS))
    }

    /// Hard-links `node` into `dir` as `name`.
    fn link(&mut self, _node: &Self::Node, _dir: &Self::Node, _name: &[u8]) -> Result<(), Errno> {
        Err(errno(libc::EROFS))
    }

    /// Renames `olddir/oldname` to `newdir/newname`.
    fn rename(
        &mut self,
        _olddir: &Self::Node,
        _oldname: &[u8],
        _newdir: &Self::Node,
        _newname: &[u8],
    ) -> Result<(), Errno> {
        Err(errno(libc::EROFS))
    }

    /// Removes `name` from `dir` (`flags` may hold AT_REMOVEDIR).
    fn unlink(&mut self, _dir: &Self::Node, _name: &[u8], _flags: u32) -> Result<(), Errno> {
        Err(errno(libc::EROFS))
    }

    /// Changes attributes.
    fn setattr(&mut self, _node: &Self::Node, _attr: &SetAttr) -> Result<(), Errno> {
        Err(errno(libc::EROFS))
    }
}
