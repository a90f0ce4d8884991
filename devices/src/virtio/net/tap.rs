//! The host end of a network device: an existing tap interface.
//!
//! ringvm never creates host interfaces. `TUNSETIFF` on a name that does
//! not exist *creates* a tap when the caller may, so [`TapDevice::open`]
//! first asks the kernel for the interface's index and refuses an unknown
//! name, then compares the index after attaching: if the interface was
//! deleted and a new one born in between (or ours was just created), the
//! fd is closed, which removes a tap we made, and the open fails.
//!
//! The fd is non-blocking (io_uring waits on it in its own poll), carries
//! a 12-byte `virtio_net_hdr_v1` in front of every frame in both
//! directions (the guest's header goes to the tap as is), and learns from
//! [`Tap::set_offload`] which offloads the guest accepts.

use std::ffi::CString;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_LEN;

/// Path of the tun/tap clone device.
pub const TUN_PATH: &str = "/dev/net/tun";

/// What a network device needs of its host end; a fake implements it in
/// tests.
pub trait Tap: AsRawFd + Send + Debug {
    /// Tells the host which `TUN_F_*` offloads the guest accepts, so the
    /// host may hand it partially checksummed or GSO frames.
    fn set_offload(&self, flags: u32) -> Result<(), TapError>;
}

/// Why a tap could not be used; each names the interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Not a valid interface name.
    #[error("tap name {0:?} is invalid (1-15 bytes, no '/', '%', whitespace or NUL)")]
    BadName(String),
    /// No interface has this name; ringvm does not create interfaces.
    #[error("tap {0}: no such interface (create it first, e.g. `ip tuntap add dev {0} mode tap`)")]
    NotFound(String),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(#[source] io::Error),
    /// The interface exists but is not a single-queue tap (a tun, a
    /// multi-queue tap, or no tun device at all).
    #[error("tap {0}: interface exists but is not a single-queue tap")]
    NotATap(String),
    /// Another process (or device) has the tap open.
    #[error("tap {0}: already in use")]
    Busy(String),
    /// The tap belongs to another user or group.
    #[error("tap {0}: permission denied (owner/group of the tap, or CAP_NET_ADMIN)")]
    Permission(String),
    /// The interface changed under us while attaching.
    #[error("tap {0}: interface disappeared or was replaced while opening")]
    Vanished(String),
    /// TUNSETIFF failed otherwise.
    #[error("tap {name}: TUNSETIFF failed: {source}")]
    SetIff {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// TUNSETVNETHDRSZ failed.
    #[error("tap {name}: cannot set the vnet header size: {source}")]
    VnetHdr {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The interface's MTU cannot be read or set (SIOCGIFMTU/SIOCSIFMTU).
    #[error("tap {name}: cannot set the MTU to {mtu}: {source}")]
    Mtu {
        /// The interface.
        name: String,
        /// The MTU asked for.
        mtu: u16,
        /// Why (EPERM: the MTU differs and ringvm lacks CAP_NET_ADMIN;
        /// EINVAL: the interface refuses that size).
        #[source]
        source: io::Error,
    },
    /// TUNSETOFFLOAD refused the offloads.
    #[error("tap: cannot set offloads {flags:#x}: {source}")]
    Offload {
        /// The TUN_F_* flags asked for.
        flags: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// An open, attached tap interface.
#[derive(Debug)]
pub struct TapDevice {
    file: File,
    name: String,
}

fn check_name(name: &str) -> Result<CString, TapError> {
    let bad = || TapError::BadName(name.to_string());
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name
            .bytes()
            .any(|b| b == b'/' || b == b'%' || b == b':' || b.is_ascii_whitespace())
    {
        return Err(bad());
    }
    CString::new(name).map_err(|_| bad())
}

fn if_index(name: &CString) -> u32 {
    // SAFETY: `name` is a valid NUL-terminated string; the call reads it.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

impl TapDevice {
    /// Attaches to the existing tap `name` with `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`, non-blocking, with a 12-byte vnet header.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let cname = check_name(name)?;
        let before = if_index(&cname);
        if before == 0 {
            return Err(TapError::NotFound(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(cname.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads (and may write back) one ifreq, which
        // lives on our stack for the whole call; the fd is ours.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name),
                Some(libc::EPERM) => TapError::Permission(name),
                Some(libc::EINVAL) => TapError::NotATap(name),
                _ => TapError::SetIff { name, source: e },
            });
        }
        if if_index(&cname) != before {
            // Dropping `file` detaches, and removes a tap this call made.
            return Err(TapError::Vanished(name.to_string()));
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int from the pointer, which
        // points at a live local.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(TapError::VnetHdr {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Self {
            file,
            name: name.to_string(),
        };
        // Until a driver says otherwise, the guest takes no offloads.
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The interface name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes the host side's MTU `mtu`, so frames as large as the guest
    /// is told it may send (VIRTIO_NET_F_MTU) pass the tap. An interface
    /// already at that MTU is left alone, so a tap its owner prepared
    /// works without CAP_NET_ADMIN.
    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        let err = |source| TapError::Mtu {
            name: self.name.clone(),
            mtu,
            source,
        };
        let cname = check_name(&self.name)?;
        // SAFETY: plain socket(2) call; the fd is owned below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(cname.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into
        // the ifreq on our stack; the socket fd is ours.
        let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut ifr) };
        // SAFETY: after SIOCGIFMTU the union holds ifru_mtu.
        if ret == 0 && unsafe { ifr.ifr_ifru.ifru_mtu } == libc::c_int::from(mtu) {
            return Ok(());
        }
        ifr.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        // SAFETY: SIOCSIFMTU reads the ifreq on our stack; the fd is ours.
        let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &ifr) };
        if ret < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl AsRawFd for TapDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Tap for TapDevice {
    fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // passed. The fd is ours.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(TapError::Offload {
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// A tap stand-in for tests: one end of a `SOCK_SEQPACKET` socketpair,
/// which keeps frame boundaries like a tap does; the test holds the other
/// end as "the host".
#[cfg(any(test, feature = "test-utils"))]
pub mod fake {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;

    use super::*;

    /// The device's end of the pair, recording offload requests.
    #[derive(Debug)]
    pub struct FakeTap {
        fd: OwnedFd,
        /// Last flags passed to [`Tap::set_offload`]; clones share it.
        pub offload: Arc<AtomicU32>,
        /// When set, [`Tap::set_offload`] fails.
        pub refuse_offload: Arc<AtomicBool>,
    }

    impl FakeTap {
        /// Makes the pair: the fake tap (non-blocking) and the host end.
        pub fn new() -> io::Result<(Self, OwnedFd)> {
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: socketpair writes two fds into the two-element array.
            let ret = unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            };
            if ret < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: both fds were just created and are owned by nobody else.
            let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            Ok((
                Self {
                    fd: a,
                    offload: Arc::default(),
                    refuse_offload: Arc::default(),
                },
                b,
            ))
        }
    }

    impl AsRawFd for FakeTap {
        fn as_raw_fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
    }

    impl Tap for FakeTap {
        fn set_offload(&self, flags: u32) -> Result<(), TapError> {
            if self.refuse_offload.load(Ordering::SeqCst) {
                return Err(TapError::Offload {
                    flags,
                    source: io::Error::from_raw_os_error(libc::EINVAL),
                });
            }
            self.offload.store(flags, Ordering::SeqCst);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_syscall() {
        for bad in [
            "",
            "0123456789abcdef",
            "a/b",
            "tap%d",
            "a b",
            "a\0b",
            "eth0:1",
        ] {
            assert!(
                matches!(TapDevice::open(bad), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_missing_interface_is_refused_not_created() {
        let name = "ringvm-nx0";
        let err = TapDevice::open(name).err();
        assert!(matches!(err, Some(TapError::NotFound(_))), "{err:?}");
        let cname = check_name(name).ok();
        assert_eq!(cname.map(|c| if_index(&c)), Some(0));
    }

    /// Runs `f` on a thread of its own in a fresh network namespace (the
    /// namespace is per thread and dies with it), or says why not.
    fn in_netns(f: impl FnOnce() + Send + 'static) -> bool {
        let handle = std::thread::spawn(move || {
            // SAFETY: unshare changes only this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return false;
            }
            if !std::path::Path::new(TUN_PATH).exists() {
                return false;
            }
            f();
            true
        });
        handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Makes a persistent tap `name` in the current namespace, as an
    /// administrator would with `ip tuntap add`.
    fn make_tap(name: &str, flags: libc::c_int) -> io::Result<()> {
        let file = OpenOptions::new().read(true).write(true).open(TUN_PATH)?;
        // SAFETY: ifreq is plain old data.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = flags as i16;
        // SAFETY: as in TapDevice::open.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: TUNSETPERSIST takes its argument by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    #[test]
    fn real_taps_open_once_and_only_when_they_exist() {
        let ran = in_netns(|| {
            assert!(matches!(
                TapDevice::open("rvt0"),
                Err(TapError::NotFound(_))
            ));
            make_tap("rvt0", libc::IFF_TAP | libc::IFF_NO_PI).expect("make tap");
            let tap = TapDevice::open("rvt0").expect("open tap");
            assert_eq!(tap.name(), "rvt0");
            tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO_ECN)
                .expect("offloads");
            assert!(tap.set_offload(libc::TUN_F_TSO4).is_err());
            // SAFETY: F_GETFL reads flags only.
            let fl = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_GETFL) };
            assert_ne!(fl & libc::O_NONBLOCK, 0);
            let again = TapDevice::open("rvt0").err();
            assert!(matches!(again, Some(TapError::Busy(_))), "{again:?}");
            drop(tap);
            assert!(TapDevice::open("rvt0").is_ok());
            make_tap("rvtun0", libc::IFF_TUN | libc::IFF_NO_PI).expect("make tun");
            let tun = TapDevice::open("rvtun0").err();
            assert!(matches!(tun, Some(TapError::NotATap(_))), "{tun:?}");
            let lo = TapDevice::open("lo").err();
            assert!(matches!(lo, Some(TapError::NotATap(_))), "{lo:?}");
        });
        if !ran {
            eprintln!("SKIPPED real_taps_open_once_and_only_when_they_exist: needs CAP_SYS_ADMIN/CAP_NET_ADMIN and {TUN_PATH}");
        }
    }
}
