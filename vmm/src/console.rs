//! Where the guest's console (COM1) output goes: stdout, or the file or
//! named pipe `PUT /serial` names, optionally through a bandwidth limit
//! under which bytes beyond the rate are dropped and counted (Firecracker's
//! serial `rate_limiter`).

use std::fs::{File, OpenOptions};
use std::io::{self, Stdout, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::rate_limiter::{Clock, MonotonicClock, TokenBucket};

use crate::config::SerialConfig;

/// The console's destination.
enum Sink {
    Stdout(Stdout),
    File(File),
    /// Another writer: stderr or the kept tail of a command run's console.
    Writer(Box<dyn Write + Send>),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Stdout(_) => f.write_str("Stdout"),
            Sink::File(file) => f.debug_tuple("File").field(file).finish(),
            Sink::Writer(_) => f.write_str("Writer"),
        }
    }
}

/// The writer the UART prints through.
#[derive(Debug)]
pub struct ConsoleOut {
    sink: Sink,
    limit: Option<TokenBucket>,
    dropped: Arc<AtomicU64>,
}

impl ConsoleOut {
    /// Opens the destination `cfg` names. A file is created if missing and
    /// appended to; it is opened non-blocking, so a named pipe nobody
    /// drains loses console bytes instead of stalling a vCPU.
    pub fn open(cfg: &SerialConfig) -> io::Result<Self> {
        let sink = match &cfg.serial_out_path {
            Some(path) => Sink::File(
                OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
            ),
            None => Sink::Stdout(io::stdout()),
        };
        let limit = cfg
            .rate_limiter
            .and_then(|b| b.bucket().build(MonotonicClock.now_ns()));
        Ok(Self {
            sink,
            limit,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Whether the console is the process's stdout (then stdin feeds the
    /// guest's console too; with a file it does not, as in Firecracker).
    /// The console into `w` with no rate limit: `ringvm -- CMD` keeps its
    /// stdout for the command and sends the console to stderr (--verbose)
    /// or keeps its tail for an error report.
    pub fn to_writer(w: Box<dyn Write + Send>) -> Self {
        Self {
            sink: Sink::Writer(w),
            limit: None,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether the console is ringvm's stdout (and so stdin is the guest's).
    pub fn is_stdout(&self) -> bool {
        matches!(self.sink, Sink::Stdout(_))
    }

    /// Bytes the rate limit dropped so far.
    pub fn dropped_bytes(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(limit) = self.limit.as_mut() {
            let len = buf.len() as u64;
            if !limit.try_consume(len, MonotonicClock.now_ns()) {
                self.dropped.fetch_add(len, Ordering::Relaxed);
                return Ok(buf.len());
            }
        }
        match &mut self.sink {
            Sink::Stdout(out) => out.write(buf),
            Sink::File(file) => file.write(buf),
            Sink::Writer(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Stdout(out) => out.flush(),
            Sink::File(file) => file.flush(),
            Sink::Writer(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenBucketConfig;

    #[test]
    fn a_file_console_appends_and_the_limit_drops_the_excess() {
        let path = std::env::temp_dir().join(format!("ringvm-console-{}", std::process::id()));
        std::fs::write(&path, b"old\n").unwrap();
        let cfg = SerialConfig {
            serial_out_path: Some(path.clone()),
            // 10 bytes per hour: the first 10 go through, the rest drop.
            rate_limiter: Some(TokenBucketConfig {
                size: 10,
                one_time_burst: None,
                refill_time: 3_600_000,
            }),
        };
        let mut out = ConsoleOut::open(&cfg).unwrap();
        assert!(!out.is_stdout());
        for b in b"hello, world" {
            assert_eq!(out.write(&[*b]).unwrap(), 1);
        }
        out.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nhello, wor");
        assert_eq!(out.dropped_bytes().load(Ordering::Relaxed), 2);
        std::fs::remove_file(&path).unwrap();

        let bad = SerialConfig {
            serial_out_path: Some("/nonexistent/dir/console".into()),
            rate_limiter: None,
        };
        let e = ConsoleOut::open(&bad).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir/console"), "{e}");
        assert!(ConsoleOut::open(&SerialConfig::default())
            .unwrap()
            .is_stdout());
    }
}
