//! Levelled log lines on stderr, kept apart from the guest console on
//! stdout so scripts can read either alone.

use std::io::{IsTerminal, Write};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
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
        // A terminal in raw mode (while the guest owns stdin) needs an
        // explicit carriage return.
        let eol = if std::io::stderr().is_terminal() {
            "\r\n"
        } else {
            "\n"
        };
        let _ = write!(
            std::io::stderr().lock(),
            "[ringvm {level}] {}{eol}",
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Installs the logger once; later calls are ignored.
pub fn init(level: LevelFilter) {
    let logger = Box::new(StderrLogger { level });
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
