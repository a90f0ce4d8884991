//! What the VMM thread may add when it serves shared host directories
//! (`ringvm -- CMD`, virtio-9p): the metadata calls a 9P2000.L server
//! makes on the host's behalf. Only a run with shares gets these; every
//! path stays under the share's directory fd (`openat2` with
//! RESOLVE_BENEATH / RESOLVE_IN_ROOT, see `devices/src/virtio/p9`).

use super::rules::{allow_call, Rule};

/// The VMM thread's extra rules while it serves shares.
pub fn rules() -> Vec<Rule> {
    vec![
        allow_call!(SYS_openat2, "walk and open under a share (RESOLVE_BENEATH)"),
        allow_call!(SYS_openat, "create files in a read-write share (Tlcreate)"),
        allow_call!(SYS_getdents64, "list a shared directory (Treaddir)"),
        allow_call!(SYS_statx, "attributes of a shared file (Tgetattr)"),
        allow_call!(SYS_fstatfs, "file system figures of a share (Tstatfs)"),
        allow_call!(SYS_ftruncate, "resize a shared file (Tsetattr)"),
        allow_call!(SYS_fchmodat, "change a shared file's mode (Tsetattr)"),
        allow_call!(SYS_fchownat, "change a shared file's owner (Tsetattr)"),
        allow_call!(SYS_utimensat, "change a shared file's times (Tsetattr)"),
        allow_call!(SYS_mkdirat, "make a directory in a share (Tmkdir)"),
        allow_call!(SYS_mknodat, "make a node in a share (Tmknod)"),
        allow_call!(SYS_symlinkat, "make a symlink in a share (Tsymlink)"),
        allow_call!(SYS_readlinkat, "read a shared symlink (Treadlink)"),
        allow_call!(SYS_linkat, "make a hard link in a share (Tlink)"),
        allow_call!(SYS_renameat, "rename within a share (Trenameat)"),
        allow_call!(SYS_unlinkat, "remove from a share (Tunlinkat)"),
        allow_call!(SYS_fcntl, "flags of a shared file's fd"),
        allow_call!(SYS_lseek, "directory offsets (Treaddir)"),
        allow_call!(SYS_pread64, "the runner's control files"),
        allow_call!(SYS_pwrite64, "the runner's control files"),
        allow_call!(SYS_writev, "the command's output to ringvm's stdout/stderr"),
    ]
}
