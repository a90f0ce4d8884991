//! Levelled log lines, on stderr by default (kept apart from the guest
//! console on stdout so scripts can read either alone), or appended to a
//! file chosen at run time (`PUT /logger`, Firecracker's `log_path`).
//!
//! A log file may be a FIFO. Its writes never block (every thread logs,
//! vCPUs included): a line its reader has no room for is dropped and
//! counted ([`missed_lines`], `logger.missed_log_count` in metrics).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::host_file::{open_sink, LineOutcome, LineSink};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Where lines go and how they look.
#[derive(Debug)]
struct Target {
    file: Option<LineSink>,
    show_level: bool,
    show_origin: bool,
    /// Whether stderr is a terminal (raw mode needs "\r\n").
    stderr_is_terminal: bool,
}

static TARGET: OnceLock<Mutex<Target>> = OnceLock::new();

/// Lines lost: dropped because a FIFO's reader had no room, or failed.
static MISSED: AtomicU64 = AtomicU64::new(0);

/// How many log lines were lost so far (for metrics).
pub fn missed_lines() -> u64 {
    MISSED.load(Ordering::Relaxed)
}

fn target() -> &'static Mutex<Target> {
    TARGET.get_or_init(|| {
        Mutex::new(Target {
            file: None,
            show_level: true,
            show_origin: false,
            // Asked once, here: isatty is an ioctl, which the seccomp
            // filters do not let every thread make.
            stderr_is_terminal: std::io::stderr().is_terminal(),
        })
    })
}

struct RingvmLogger;

impl Log for RingvmLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        let mut t = target().lock().unwrap_or_else(|e| e.into_inner());
        let mut prefix = String::from("[ringvm");
        if t.show_level {
            prefix.push(' ');
            prefix.push_str(level);
        }
        if t.show_origin {
            prefix.push_str(&format!(
                " {}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        prefix.push(']');
        match t.file.as_mut() {
            Some(f) => {
                // One write per line, so a FIFO takes it whole or not at all.
                let line = format!("{prefix} {}\n", record.args());
                if !matches!(f.write_line(line.as_bytes()), Ok(LineOutcome::Written)) {
                    MISSED.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                // A terminal in raw mode (while the guest owns stdin) needs
                // an explicit carriage return.
                let eol = if t.stderr_is_terminal { "\r\n" } else { "\n" };
                let _ = write!(std::io::stderr().lock(), "{prefix} {}{eol}", record.args());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger once; later calls only change the level.
pub fn init(level: LevelFilter) {
    let _ = target();
    let _ = log::set_logger(&RingvmLogger);
    log::set_max_level(level);
}

/// Sends later lines to `path` (a regular file, appended to and created if
/// missing, or a FIFO) with the given options, as `PUT /logger` asks.
pub fn configure(
    path: Option<&Path>,
    level: Option<LevelFilter>,
    show_level: bool,
    show_origin: bool,
) -> std::io::Result<()> {
    let file = match path {
        Some(p) => Some(LineSink::new(open_sink(p)?)),
        None => None,
    };
    let mut t = target().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(file) = file {
        // A seccomp violation is reported in the log file too.
        crate::seccomp::sigsys::set_log_fd(Some(file.raw_fd()));
        t.file = Some(file);
    }
    t.show_level = show_level;
    t.show_origin = show_origin;
    if let Some(level) = level {
        log::set_max_level(level);
    }
    Ok(())
}
