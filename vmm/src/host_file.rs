//! Opening the files a user names (kernel, initrd, drives, log, metrics)
//! so that no path can stall ringvm, and writing lines that never block.
//!
//! Every path is opened with `O_NONBLOCK`, so a FIFO with no writer (or
//! no reader) cannot hang `open` on the VMM thread, then its type is
//! checked on the opened descriptor (no race with a rename):
//! - images (kernel, initrd, drives) must be a regular file or a block
//!   device; `O_NONBLOCK` is then cleared (io_uring would otherwise answer
//!   `-EAGAIN` instead of waiting for the page cache);
//! - sinks (log, metrics) may be a regular file or a FIFO (as Kata and
//!   Firecracker's users point them at FIFOs) and stay non-blocking: a line
//!   the reader has no room for is dropped and counted ([`LineSink`]),
//!   never waited for by a vCPU or the VMM thread.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// A path that opened but is the wrong kind of file.
#[derive(Debug, thiserror::Error)]
#[error("is {found}, not {expected}")]
pub struct WrongFileType {
    /// What it is ("a FIFO", "a directory", ...).
    pub found: &'static str,
    /// What was asked for.
    pub expected: &'static str,
}

fn describe(ft: std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "an unknown kind of file"
    }
}

fn wrong(found: std::fs::FileType, expected: &'static str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        WrongFileType {
            found: describe(found),
            expected,
        },
    )
}

fn set_nonblocking(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: F_SETFL on a descriptor we own, with flags derived from its own.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How an image is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageAccess {
    /// Open for writing too.
    pub write: bool,
    /// `O_DIRECT`.
    pub direct: bool,
}

/// Opens a kernel, initrd or drive image: a regular file or a block device,
/// blocking I/O once the type is checked.
pub fn open_image(path: &Path, access: ImageAccess) -> io::Result<File> {
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    if access.direct {
        flags |= libc::O_DIRECT;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(access.write)
        .custom_flags(flags)
        .open(path)?;
    let ft = file.metadata()?.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(wrong(ft, "a regular file or a block device"));
    }
    set_nonblocking(&file, false)?;
    Ok(file)
}

/// Opens a log or metrics destination for appending: a regular file
/// (created, mode 0600, if missing) or a FIFO, left non-blocking. A FIFO
/// nobody reads yet is opened read-write, which Linux allows without a
/// reader, so the open neither blocks nor fails.
pub fn open_sink(path: &Path) -> io::Result<File> {
    let flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    let opened = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(flags)
        .open(path);
    let file = match opened {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)?,
        other => other?,
    };
    let ft = file.metadata()?.file_type();
    if !(ft.is_file() || ft.is_fifo()) {
        return Err(wrong(ft, "a regular file or a FIFO"));
    }
    Ok(file)
}

/// What became of a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineOutcome {
    /// Written whole (or its tail queued behind a partial write).
    Written,
    /// No room: dropped and counted.
    Dropped,
}

/// A non-blocking line writer: a line is written whole or not at all, and
/// the reader never sees two lines mixed. (POSIX makes a non-blocking
/// pipe write of up to PIPE_BUF, 4096 bytes, all or nothing; only longer
/// lines can be split.) A long line a FIFO took only part
/// of is finished before any later line; while that tail is pending, later
/// lines are dropped.
#[derive(Debug)]
pub struct LineSink {
    file: File,
    pending: Vec<u8>,
    dropped: u64,
}

impl LineSink {
    /// Wraps a file from [`open_sink`].
    pub fn new(file: File) -> Self {
        Self {
            file,
            pending: Vec::new(),
            dropped: 0,
        }
    }

    /// The descriptor, for the SIGSYS handler's line.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// Lines dropped because the reader had no room.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Writes as much of `bytes` as the file takes now; returns the count.
    fn write_now(&mut self, bytes: &[u8]) -> io::Result<usize> {
        loop {
            match self.file.write(bytes) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes `line` (which should end in `\n`) without blocking. Errors
    /// other than "no room" (a full disk, a FIFO whose reader left) are
    /// returned; the line is then lost too.
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<LineOutcome> {
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            let n = self.write_now(&pending)?;
            self.pending = pending[n..].to_vec();
            if !self.pending.is_empty() {
                self.dropped += 1;
                return Ok(LineOutcome::Dropped);
            }
        }
        let n = self.write_now(line)?;
        if n == 0 && !line.is_empty() {
            self.dropped += 1;
            return Ok(LineOutcome::Dropped);
        }
        if n < line.len() {
            // Only a line longer than PIPE_BUF can be split by a FIFO.
            self.pending = line[n..].to_vec();
        }
        Ok(LineOutcome::Written)
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("ringvm-hostfile-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn fifo(&self, name: &str) -> PathBuf {
            let p = self.0.join(name);
            let c = CString::new(p.as_os_str().as_bytes()).unwrap();
            // SAFETY: mkfifo with a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            p
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn images_must_be_regular_files_or_block_devices_and_never_block() {
        let d = Dir::new("image");
        let fifo = d.fifo("fifo");
        let start = Instant::now();
        for access in [
            ImageAccess::default(),
            ImageAccess {
                write: true,
                direct: false,
            },
        ] {
            let e = open_image(&fifo, access).unwrap_err();
            assert!(
                e.to_string()
                    .contains("is a FIFO, not a regular file or a block device"),
                "{e}"
            );
        }
        assert!(start.elapsed() < Duration::from_secs(2), "open blocked");
        let e = open_image(&d.0, ImageAccess::default()).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = open_image(Path::new("/dev/null"), ImageAccess::default()).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        // A regular file opens, and blocking again.
        let f = d.0.join("img");
        std::fs::write(&f, b"data").unwrap();
        let file = open_image(&f, ImageAccess::default()).unwrap();
        // SAFETY: F_GETFL on our own descriptor.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn sinks_may_be_fifos_without_a_reader_but_not_devices() {
        let d = Dir::new("sink");
        let fifo = d.fifo("fifo");
        let start = Instant::now();
        let mut sink = LineSink::new(open_sink(&fifo).unwrap());
        assert!(start.elapsed() < Duration::from_secs(2));
        // Nobody reads: the pipe fills, then lines are dropped, never waited on.
        let line = [b'x'; 1000];
        let mut written = 0;
        for _ in 0..200 {
            if sink.write_line(&line).unwrap() == LineOutcome::Written {
                written += 1;
            }
        }
        assert!(written > 0 && written < 200, "{written}");
        assert_eq!(sink.dropped(), 200 - written);
        assert!(start.elapsed() < Duration::from_secs(2), "a write blocked");
        let e = open_sink(Path::new("/dev/null")).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        // A new regular file is created owner-only.
        let f = d.0.join("log");
        let mut s = LineSink::new(open_sink(&f).unwrap());
        s.write_line(b"one\n").unwrap();
        s.write_line(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "one\ntwo\n");
        let mode = std::fs::metadata(&f).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_long_line_split_by_a_full_fifo_is_finished_before_the_next() {
        let d = Dir::new("split");
        let fifo = d.fifo("fifo");
        let mut sink = LineSink::new(open_sink(&fifo).unwrap());
        // SAFETY: F_SETPIPE_SZ on our own FIFO: the smallest pipe (a page).
        unsafe { libc::fcntl(sink.raw_fd(), libc::F_SETPIPE_SZ, 4096) };
        let mut reader = std::fs::File::open(&fifo).unwrap();
        let long: Vec<u8> = (0..10_000)
            .map(|i| b'a' + (i % 26) as u8)
            .chain([b'\n'])
            .collect();
        assert_eq!(sink.write_line(&long).unwrap(), LineOutcome::Written);
        // The rest waits; a short line meanwhile is dropped, not mixed in.
        assert_eq!(sink.write_line(b"short\n").unwrap(), LineOutcome::Dropped);
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while got.len() < long.len() {
            let n = reader.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
            let _ = sink.write_line(b"later\n").unwrap();
        }
        assert_eq!(&got[..long.len()], &long[..]);
        let rest = &got[long.len()..];
        assert!(
            rest.is_empty() || rest.starts_with(b"later\n"),
            "{:?}",
            String::from_utf8_lossy(rest)
        );
    }
}
