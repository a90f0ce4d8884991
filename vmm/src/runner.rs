//! `ringvm --kernel K -- COMMAND [ARGS...]`: boot a kernel straight into a
//! command, with the host's files, and exit with the command's status.
//!
//! ```text
//!  ringvm                                   guest
//!  ──────                                   ─────
//!  9P "ringvm" (ControlFs) ─── kernel root: /init /config /stdin /stdout /stderr /mnt
//!  9P "root"   (HostFs, ro) ── /mnt/lower ─┐
//!                              tmpfs ──────┴─ overlay = the command's /
//!  9P "shareN" (HostFs)    ─── --share GUEST_DIR (ro, or rw with ,rw)
//!  port 0x504 ◄────────────── init: the command's status, then power-off
//! ```
//!
//! The guest's stdio are files of the control tree backed by ringvm's own
//! stdin, stdout and stderr, so the command's output arrives byte for
//! byte with no console in between; the console (kernel messages) goes to
//! stderr only with `--verbose`, otherwise its last lines are kept and
//! shown if the guest fails before the command runs.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::legacy::CommandStatus;
use devices::virtio::p9::MAX_MSIZE;

use crate::exit_code;

/// The guest init, compiled from `resources/runner/init.c` by `build.rs`.
pub static GUEST_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ringvm-init"));

/// Mount tag of the control tree (the kernel's first root).
pub const CONTROL_TAG: &str = "ringvm";
/// Mount tag of the root share.
pub const ROOT_TAG: &str = "root";

/// Kernel command line of a runner guest unless `--cmdline` is given:
/// panics reboot at once (ringvm then reports the guest failed), and the
/// console stays quiet unless `--verbose`.
pub const RUNNER_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// How much of the console a quiet run keeps, to explain a failure.
pub const CONSOLE_TAIL_BYTES: usize = 16 * 1024;

/// PATH for the command when the root is not the host's own.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Host variables the command inherits, when set.
const INHERITED_ENV: &[&str] = &["TERM", "LANG", "LC_ALL", "TZ"];

/// Mount tag of the `index`th `--share`.
pub fn share_tag(index: usize) -> String {
    format!("share{index}")
}

/// Mount options for a 9P share: the largest msize the device takes, and
/// a cache mode. The root is the lower layer of an overlay, which must not
/// change under it anyway, so it is cached (`loose`: metadata and pages
/// kept, far fewer requests). Shares use `mmap`: reads and writes go to
/// the host at once (host changes show, guest writes land before the
/// command ends) and only memory-mapped files use the page cache, which
/// init's sync() writes back. The control tree uses `none`: its streams
/// must never be cached.
pub fn mount_options(cache: &str) -> String {
    format!("trans=virtio,version=9p2000.L,msize={MAX_MSIZE},cache={cache}")
}

/// One `--share HOST_DIR[:GUEST_DIR][,rw]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareConfig {
    /// The host directory.
    pub host: PathBuf,
    /// Where the guest sees it (absolute); the host path by default.
    pub guest: PathBuf,
    /// The guest may change it (`,rw`); read-only otherwise.
    pub writable: bool,
}

/// Errors in the runner's options, all found before the guest starts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunnerError {
    /// A `--share` string that does not parse.
    #[error("bad --share {0:?}: expected HOST_DIR[:GUEST_DIR][,rw|,ro]")]
    BadShare(String),
    /// A guest directory that is not absolute, or `/` itself.
    #[error("--share guest directory {0:?} must be an absolute path other than / (use --root-share for /)")]
    RelativeGuestDir(PathBuf),
    /// A host directory that does not exist or is not a directory.
    #[error("{what} {path:?} is not a directory: {why}")]
    NotADirectory {
        /// Which option.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// `--cwd` that is not absolute.
    #[error("--cwd {0:?} must be an absolute path")]
    RelativeCwd(PathBuf),
    /// A word with a NUL byte cannot reach the guest.
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    /// No command after `--`.
    #[error("no command to run after --")]
    NoCommand,
}

impl std::str::FromStr for ShareConfig {
    type Err = RunnerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (spec, writable) = match s.rsplit_once(',') {
            Some((spec, "rw")) => (spec, true),
            Some((spec, "ro")) => (spec, false),
            _ => (s, false),
        };
        // GUEST_DIR is absolute, so the split is at the last ":/".
        let (host, guest) = match spec.rfind(":/") {
            Some(at) => (&spec[..at], Some(&spec[at + 1..])),
            None => (spec, None),
        };
        if host.is_empty() {
            return Err(RunnerError::BadShare(s.into()));
        }
        let guest = guest.map(PathBuf::from);
        Ok(Self {
            host: PathBuf::from(host),
            guest: guest.unwrap_or_default(),
            writable,
        })
    }
}

/// What `ringvm -- COMMAND` runs and with which files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunnerConfig {
    /// The command and its arguments, byte for byte.
    pub command: Vec<OsString>,
    /// The host directory the guest's root shows (read-only, overlaid).
    pub root: PathBuf,
    /// Extra shares.
    pub shares: Vec<ShareConfig>,
    /// The command's working directory in the guest.
    pub cwd: PathBuf,
    /// The command's environment (`NAME=VALUE`).
    pub env: Vec<OsString>,
    /// Console (kernel and init messages) to stderr.
    pub verbose: bool,
}

fn check_dir(what: &'static str, path: &Path) -> Result<PathBuf, RunnerError> {
    let err = |why: String| RunnerError::NotADirectory {
        what,
        path: path.to_path_buf(),
        why,
    };
    let canon = path.canonicalize().map_err(|e| err(e.to_string()))?;
    if !canon.is_dir() {
        return Err(err("not a directory".into()));
    }
    Ok(canon)
}

fn no_nul(what: &'static str, bytes: &[u8]) -> Result<(), RunnerError> {
    if bytes.contains(&0) {
        Err(RunnerError::Nul(what))
    } else {
        Ok(())
    }
}

impl RunnerConfig {
    /// Checks and completes the options: host directories exist (made
    /// absolute), guest directories are absolute, the working directory
    /// defaults to the host's current one when the root is the host's
    /// own (and to `/` otherwise), and the environment is PATH, HOME and
    /// a few host variables.
    pub fn new(
        command: Vec<OsString>,
        root_share: Option<PathBuf>,
        shares: Vec<ShareConfig>,
        cwd: Option<PathBuf>,
        verbose: bool,
    ) -> Result<Self, RunnerError> {
        if command.is_empty() {
            return Err(RunnerError::NoCommand);
        }
        for word in &command {
            no_nul("an argument", word.as_bytes())?;
        }
        let host_root = root_share.is_none();
        let root = check_dir(
            "--root-share",
            root_share.as_deref().unwrap_or(Path::new("/")),
        )?;
        let mut checked = Vec::with_capacity(shares.len());
        for mut share in shares {
            share.host = check_dir("--share", &share.host)?;
            if share.guest.as_os_str().is_empty() {
                share.guest = share.host.clone();
            }
            if !share.guest.is_absolute() || share.guest.parent().is_none() {
                return Err(RunnerError::RelativeGuestDir(share.guest));
            }
            no_nul("a --share path", share.guest.as_os_str().as_bytes())?;
            checked.push(share);
        }
        let cwd = match cwd {
            Some(dir) if !dir.is_absolute() => return Err(RunnerError::RelativeCwd(dir)),
            Some(dir) => dir,
            None if host_root => std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            None => PathBuf::from("/"),
        };
        no_nul("--cwd", cwd.as_os_str().as_bytes())?;
        let mut env = Vec::new();
        let path = match std::env::var_os("PATH") {
            Some(p) if host_root => p,
            _ => DEFAULT_PATH.into(),
        };
        env.push(assign("PATH", &path));
        let home = match std::env::var_os("HOME") {
            Some(h) if host_root => h,
            _ => "/root".into(),
        };
        env.push(assign("HOME", &home));
        for name in INHERITED_ENV {
            if let Some(v) = std::env::var_os(name) {
                env.push(assign(name, &v));
            }
        }
        env.retain(|e| !e.as_bytes().contains(&0));
        Ok(Self {
            command,
            root,
            shares: checked,
            cwd,
            env,
            verbose,
        })
    }

    /// How many virtio devices the runner adds: control tree, root, shares.
    pub fn device_count(&self) -> usize {
        2 + self.shares.len()
    }

    /// What init reads from `/config` (format: `resources/runner/init.c`).
    pub fn init_config(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut word = |w: &[u8]| {
            out.extend_from_slice(w);
            out.push(0);
        };
        word(b"ringvm-init 1");
        word(b"root");
        word(ROOT_TAG.as_bytes());
        word(mount_options("loose").as_bytes());
        for (i, share) in self.shares.iter().enumerate() {
            word(b"share");
            word(share_tag(i).as_bytes());
            word(share.guest.as_os_str().as_bytes());
            word(if share.writable { b"rw" } else { b"ro" });
            word(mount_options("mmap").as_bytes());
        }
        word(b"cwd");
        word(self.cwd.as_os_str().as_bytes());
        for e in &self.env {
            word(b"env");
            word(e.as_bytes());
        }
        for a in &self.command {
            word(b"arg");
            word(a.as_bytes());
        }
        word(b"verbose");
        word(if self.verbose { b"1" } else { b"0" });
        word(b"end");
        out
    }

    /// Kernel parameters: the control tree as the first root (not `ro`:
    /// init opens /stdout for writing; the tree itself refuses changes),
    /// init, and a quiet console unless verbose.
    pub fn kernel_params(&self) -> Vec<String> {
        let mut p = vec![
            format!("root={CONTROL_TAG}"),
            "rootfstype=9p".into(),
            format!("rootflags={}", mount_options("none")),
            "init=/init".into(),
        ];
        if !self.verbose {
            p.push("quiet".into());
        }
        p
    }
}

fn assign(name: &str, value: &std::ffi::OsStr) -> OsString {
    let mut v = OsString::from(format!("{name}=")).into_vec();
    v.extend_from_slice(value.as_bytes());
    OsString::from_vec(v)
}

/// The exit code for a command status, as a shell reports it; setup
/// failures are [`exit_code::GUEST_SETUP_FAILED`].
pub fn status_exit_code(status: CommandStatus) -> i32 {
    match status {
        CommandStatus::Exited(code) => i32::from(code),
        CommandStatus::Signaled(sig) => exit_code::SIGNAL_BASE + i32::from(sig),
        CommandStatus::SetupFailed { .. } => exit_code::GUEST_SETUP_FAILED,
    }
}

/// What init was doing at stage `stage` (see `enum stage` in init.c).
pub fn stage_name(stage: u8) -> &'static str {
    match stage {
        1 => "reading /config",
        2 => "mounting a tmpfs on /mnt",
        3 => "mounting the root share",
        4 => "mounting the overlay on the root",
        5 => "mounting /proc, /sys, /dev or /tmp",
        6 => "mounting a --share",
        7 => "opening ringvm's stdio",
        8 => "entering the new root",
        9 => "entering the working directory (--cwd)",
        10 => "starting the command",
        _ => "an unknown stage",
    }
}

/// The guest console of a quiet run: the last [`CONSOLE_TAIL_BYTES`]
/// bytes, kept to explain a guest that fails before the command runs.
#[derive(Clone, Debug, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    /// The bytes kept, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        let tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().copied().collect()
    }
}

impl Write for ConsoleTail {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let keep = buf.len().min(CONSOLE_TAIL_BYTES);
        let excess = (tail.len() + keep).saturating_sub(CONSOLE_TAIL_BYTES);
        let drop = excess.min(tail.len());
        tail.drain(..drop);
        tail.extend(&buf[buf.len() - keep..]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Raises the soft open-file limit to the hard one: each fid the guest
/// holds on a share is an open descriptor here (as with virtiofsd).
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct we own.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// How many fids one share may hold: a share of the descriptors left.
pub fn max_fids_per_share(shares: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: getrlimit fills our struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let budget = (lim.rlim_cur as usize).saturating_sub(256);
    (budget / shares.max(1)).clamp(64, 1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_options_parse() {
        let s: ShareConfig = "/a/b".parse().unwrap();
        assert_eq!(
            s,
            ShareConfig {
                host: "/a/b".into(),
                guest: PathBuf::new(),
                writable: false
            }
        );
        let s: ShareConfig = "/a:b/c:/mnt/x,rw".parse().unwrap();
        assert_eq!(s.host, PathBuf::from("/a:b/c"));
        assert_eq!(s.guest, PathBuf::from("/mnt/x"));
        assert!(s.writable);
        let s: ShareConfig = "rel/dir,ro".parse().unwrap();
        assert_eq!(s.host, PathBuf::from("rel/dir"));
        assert!(!s.writable);
        assert!(",rw".parse::<ShareConfig>().is_err());
    }

    #[test]
    fn options_are_checked_before_boot() {
        let cmd = vec![OsString::from("true")];
        assert_eq!(
            RunnerConfig::new(vec![], None, vec![], None, false),
            Err(RunnerError::NoCommand)
        );
        let e = RunnerConfig::new(
            cmd.clone(),
            Some("/nonexistent".into()),
            vec![],
            None,
            false,
        );
        assert!(matches!(e, Err(RunnerError::NotADirectory { .. })));
        let share = ShareConfig {
            host: "/tmp".into(),
            guest: "rel".into(),
            writable: false,
        };
        assert_eq!(
            RunnerConfig::new(cmd.clone(), None, vec![share], None, false),
            Err(RunnerError::RelativeGuestDir("rel".into()))
        );
        let root = ShareConfig {
            host: "/tmp".into(),
            guest: "/".into(),
            writable: false,
        };
        assert_eq!(
            RunnerConfig::new(cmd.clone(), None, vec![root], None, false),
            Err(RunnerError::RelativeGuestDir("/".into()))
        );
        assert_eq!(
            RunnerConfig::new(cmd.clone(), None, vec![], Some("x".into()), false),
            Err(RunnerError::RelativeCwd("x".into()))
        );
        let c = RunnerConfig::new(cmd, Some("/tmp".into()), vec![], None, false).unwrap();
        assert_eq!(c.cwd, PathBuf::from("/"));
        assert!(c
            .env
            .iter()
            .any(|e| e.as_bytes() == format!("PATH={DEFAULT_PATH}").as_bytes()));
    }

    #[test]
    fn init_config_carries_arguments_byte_for_byte() {
        let cmd: Vec<OsString> = vec![
            "sh".into(),
            "-c".into(),
            "echo \"a  b\" 'c'".into(),
            OsString::from_vec(vec![0xff, b' ', 0xc3, 0xa9]),
            "".into(),
        ];
        let share = ShareConfig {
            host: "/tmp".into(),
            guest: "/mnt/my share".into(),
            writable: true,
        };
        let c = RunnerConfig::new(
            cmd.clone(),
            Some("/".into()),
            vec![share],
            Some("/work dir".into()),
            true,
        )
        .unwrap();
        let cfg = c.init_config();
        let words: Vec<&[u8]> = cfg.split(|&b| b == 0).collect();
        assert_eq!(words[0], b"ringvm-init 1");
        assert_eq!(*words.last().unwrap(), b"", "ends with a NUL");
        let args: Vec<&[u8]> = words
            .windows(2)
            .filter(|w| w[0] == b"arg")
            .map(|w| w[1])
            .collect();
        let want: Vec<&[u8]> = cmd.iter().map(|a| a.as_bytes()).collect();
        assert_eq!(args, want);
        let share = words.iter().position(|w| *w == b"share").unwrap();
        assert_eq!(
            &words[share + 1..share + 4],
            &[b"share0".as_slice(), b"/mnt/my share", b"rw"]
        );
        assert!(words
            .windows(2)
            .any(|w| w == [b"cwd".as_slice(), b"/work dir"]));
        assert_eq!(words[words.len() - 2], b"end");
        let bad = RunnerConfig::new(
            vec![OsString::from_vec(vec![b'a', 0])],
            None,
            vec![],
            None,
            false,
        );
        assert_eq!(bad, Err(RunnerError::Nul("an argument")));
    }

    #[test]
    fn statuses_map_to_shell_exit_codes() {
        assert_eq!(status_exit_code(CommandStatus::Exited(0)), 0);
        assert_eq!(status_exit_code(CommandStatus::Exited(7)), 7);
        assert_eq!(status_exit_code(CommandStatus::Signaled(9)), 137);
        assert_eq!(
            status_exit_code(CommandStatus::SetupFailed { stage: 3, errno: 2 }),
            exit_code::GUEST_SETUP_FAILED
        );
    }

    #[test]
    fn the_console_tail_keeps_the_last_bytes() {
        let mut t = ConsoleTail::default();
        t.write_all(&vec![b'a'; CONSOLE_TAIL_BYTES]).unwrap();
        t.write_all(b"end").unwrap();
        let c = t.contents();
        assert_eq!(c.len(), CONSOLE_TAIL_BYTES);
        assert!(c.ends_with(b"aend"));
        t.write_all(&vec![b'z'; CONSOLE_TAIL_BYTES * 2]).unwrap();
        assert_eq!(t.contents(), vec![b'z'; CONSOLE_TAIL_BYTES]);
    }
}
