//! The VMM thread once the guest runs: it turns the io_uring ring (every
//! disk and tap I/O, eventfd and signal read, timer is an operation on it),
//! answers API requests, and at the end stops the vCPUs and frees the VM.
//! Opening files is limited to what `PATCH /drives` needs.

use super::rules::{allow_call, arg_in, Only, Rule};

/// `open` flags that create files: never needed after boot.
const CREATING: u64 = (libc::O_CREAT | libc::O_TMPFILE) as u64;

/// The VMM thread's own rules (added to `common.rs`'s).
pub fn rules(kick_signal: i32) -> Vec<Rule> {
    vec![
        allow_call!(
            SYS_io_uring_enter,
            "one loop turn: submit queued operations, wait for completions"
        ),
        allow_call!(
            SYS_tgkill,
            "kick a vCPU out of KVM_RUN (halt probe, stop)",
            arg_in(
                2,
                &[(kick_signal as u64, "SIGRTMIN", "the vCPU kick signal")]
            )
        ),
        allow_call!(SYS_clock_nanosleep, "wait between kicks while a vCPU stops"),
        allow_call!(
            SYS_openat,
            "PATCH /drives opens the new backing file; never creates one",
            Only::ArgLacks {
                index: 2,
                mask: CREATING,
                what: "O_CREAT | O_TMPFILE",
            }
        ),
        allow_call!(
            SYS_statx,
            "type check of a PATCH /drives file (std's File::metadata)"
        ),
        allow_call!(
            SYS_fstatfs,
            "the file system of a PATCH /drives file: on tmpfs, and for buffered writes, \
             its requests go to io_uring's workers at once (block/punt.rs)"
        ),
        allow_call!(
            SYS_fcntl,
            "clear O_NONBLOCK on a PATCH /drives file after its type check",
            arg_in(
                1,
                &[
                    (
                        libc::F_GETFL as u64,
                        "F_GETFL",
                        "read the file status flags"
                    ),
                    (libc::F_SETFL as u64, "F_SETFL", "clear O_NONBLOCK"),
                ]
            )
        ),
        allow_call!(SYS_lseek, "size of a PATCH /drives file (seek to its end)"),
        allow_call!(
            SYS_read,
            "glibc malloc's one-time overcommit probe (the openat above opens it)"
        ),
        allow_call!(
            SYS_getrandom,
            "virtio-rng fills the guest's buffers from the host CSPRNG",
            arg_in(
                2,
                &[(
                    libc::GRND_NONBLOCK as u64,
                    "GRND_NONBLOCK",
                    "never blocks the VMM thread"
                )]
            )
        ),
        allow_call!(
            SYS_ioctl,
            "tap and terminal calls (see the values)",
            arg_in(
                1,
                &[
                    (
                        libc::TUNSETOFFLOAD,
                        "TUNSETOFFLOAD",
                        "the guest's virtio-net driver picks its offloads"
                    ),
                    (
                        libc::TCSETS,
                        "TCSETS",
                        "give the terminal back its settings at exit"
                    ),
                ]
            )
        ),
    ]
}
