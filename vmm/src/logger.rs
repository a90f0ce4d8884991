//! Levelled log lines, on stderr by default (kept apart from the guest
//! console on stdout so scripts can read either alone), or appended to a
//! file chosen at run time (`PUT /logger`, Firecracker's `log_path`).

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Where lines go and how they look.
#[derive(Debug)]
struct Target {
    file: Option<File>,
    show_level: bool,
    show_origin: bool,
}

static TARGET: OnceLock<Mutex<Target>> = OnceLock::new();

fn target() -> &'static Mutex<Target> {
    TARGET.get_or_init(|| {
        Mutex::new(Target {
            file: None,
            show_level: true,
            show_origin: false,
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
                let _ = writeln!(f, "{prefix} {}", record.args());
            }
            None => {
                // A terminal in raw mode (while the guest owns stdin) needs
                // an explicit carriage return.
                let eol = if std::io::stderr().is_terminal() {
                    "\r\n"
                } else {
                    "\n"
                };
                let _ = write!(std::io::stderr().lock(), "{prefix} {}{eol}", record.args());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger once; later calls only change the level.
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&RingvmLogger);
    log::set_max_level(level);
}

/// Sends later lines to `path` (appending; created if missing) with the
/// given options, as `PUT /logger` asks.
pub fn configure(
    path: Option<&Path>,
    level: Option<LevelFilter>,
    show_level: bool,
    show_origin: bool,
) -> std::io::Result<()> {
    let file = match path {
        Some(p) => Some(OpenOptions::new().append(true).create(true).open(p)?),
        None => None,
    };
    let mut t = target().lock().unwrap_or_else(|e| e.into_inner());
    if file.is_some() {
        t.file = file;
    }
    t.show_level = show_level;
    t.show_origin = show_origin;
    if let Some(level) = level {
        log::set_max_level(level);
    }
    Ok(())
}
