//! Counters a running VM exposes, flushed as one JSON line per flush to
//! the metrics path (`PUT /metrics`, `FlushMetrics`, and periodically), in
//! the spirit of Firecracker's metrics file.
//!
//! Counters live with what they count (devices keep their own, vCPU
//! threads bump shared atomics); this module only gathers them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Map, Value};

use crate::host_file::{open_sink, LineSink};
use crate::ring::poll::PollStats;

/// vCPU exits by kind, bumped by every vCPU thread (relaxed: they are
/// statistics, not synchronisation).
#[derive(Debug, Default)]
pub struct VcpuExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// `KVM_RUN` interrupted by a signal (kicks).
    pub interrupted: AtomicU64,
    /// Anything else.
    pub other: AtomicU64,
}

impl VcpuExitCounters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "exit_io_in": get(&self.io_in),
            "exit_io_out": get(&self.io_out),
            "exit_mmio_read": get(&self.mmio_read),
            "exit_mmio_write": get(&self.mmio_write),
            "exit_interrupted": get(&self.interrupted),
            "exit_other": get(&self.other),
        })
    }
}

/// API request counters, bumped by the VMM thread as it answers.
#[derive(Debug, Default)]
pub struct ApiCounters {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests answered with an error status.
    pub errors: AtomicU64,
}

/// One device's counters under its id.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMetrics {
    /// The device kind ("block", "net", "rng"): its section in the line.
    pub kind: &'static str,
    /// The user's id for the device.
    pub id: String,
    /// Its counters as JSON fields.
    pub fields: Value,
}

/// Where metrics lines go: a regular file or a FIFO, written without
/// blocking (a line the reader has no room for is dropped and counted in
/// the next line's `logger.missed_metrics_count`).
#[derive(Debug, Default)]
pub struct MetricsSink {
    path: Option<PathBuf>,
    file: Option<LineSink>,
    /// Lines lost with earlier files, so the count survives a new path.
    missed_before: u64,
}

impl MetricsSink {
    /// Sends later flushes to `path` (a regular file, appended to and
    /// created if missing, or a FIFO).
    pub fn configure(&mut self, path: &Path) -> std::io::Result<()> {
        let file = LineSink::new(open_sink(path)?);
        self.missed_before = self.missed();
        self.path = Some(path.to_path_buf());
        self.file = Some(file);
        Ok(())
    }

    /// Lines lost so far.
    pub fn missed(&self) -> u64 {
        self.missed_before + self.file.as_ref().map_or(0, LineSink::dropped)
    }

    /// Whether a metrics path is set.
    pub fn is_configured(&self) -> bool {
        self.file.is_some()
    }

    /// Writes one JSON line with every counter; a no-op without a path.
    pub fn flush(
        &mut self,
        devices: &[DeviceMetrics],
        vcpus: &VcpuExitCounters,
        api: &ApiCounters,
        poll: &PollStats,
    ) -> std::io::Result<()> {
        let missed = self.missed();
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let mut line = render(devices, vcpus, api, poll);
        line["logger"] = json!({
            "missed_log_count": crate::logger::missed_lines(),
            "missed_metrics_count": missed,
        });
        let mut text = line.to_string();
        text.push('\n');
        file.write_line(text.as_bytes()).map(|_| ())
    }
}

/// The JSON object of one flush.
pub fn render(
    devices: &[DeviceMetrics],
    vcpus: &VcpuExitCounters,
    api: &ApiCounters,
    poll: &PollStats,
) -> Value {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut line = json!({
        "utc_timestamp_ms": now_ms,
        // Always present, so readers of block and net find their sections
        // even on a VM without such devices.
        "block": {},
        "net": {},
        "vcpu": vcpus.snapshot(),
        "api_server": {
            "requests": api.requests.load(Ordering::Relaxed),
            "errors": api.errors.load(Ordering::Relaxed),
        },
        // Whether polling the request queues pays (`--poll-max-us`):
        // hits found work without a notification, misses slept after all.
        "vmm_thread": {
            "poll_hits": poll.hits,
            "poll_misses": poll.misses,
            "poll_window_grown": poll.grown,
            "poll_window_shrunk": poll.shrunk,
        },
    });
    // One section per device kind, keyed by the user's device ids.
    for d in devices {
        if let Some(Value::Object(section)) = line
            .as_object_mut()
            .map(|o| o.entry(d.kind).or_insert_with(|| Value::Object(Map::new())))
        {
            section.insert(d.id.clone(), d.fields.clone());
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_appends_one_json_line_with_every_section() {
        let dir = std::env::temp_dir().join(format!("ringvm-metrics-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let mut sink = MetricsSink::default();
        let vcpus = VcpuExitCounters::default();
        VcpuExitCounters::bump(&vcpus.mmio_write);
        let api = ApiCounters::default();
        api.requests.fetch_add(3, Ordering::Relaxed);
        let devices = vec![DeviceMetrics {
            kind: "block",
            id: "rootfs".into(),
            fields: json!({"requests": 7}),
        }];
        sink.flush(&devices, &vcpus, &api, &PollStats::default())
            .unwrap();
        assert!(!dir.exists(), "no path, no file");
        sink.configure(&dir).unwrap();
        let poll = PollStats {
            hits: 11,
            misses: 2,
            ..PollStats::default()
        };
        sink.flush(&devices, &vcpus, &api, &poll).unwrap();
        sink.flush(&devices, &vcpus, &api, &poll).unwrap();
        let text = std::fs::read_to_string(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["block"]["rootfs"]["requests"], 7);
        assert_eq!(v["vcpu"]["exit_mmio_write"], 1);
        assert_eq!(v["api_server"]["requests"], 3);
        assert_eq!(v["vmm_thread"]["poll_hits"], 11);
        assert_eq!(v["vmm_thread"]["poll_misses"], 2);
        assert_eq!(v["logger"]["missed_metrics_count"], 0);
    }

    #[test]
    fn lines_a_stalled_fifo_cannot_take_are_dropped_and_counted() {
        let path = std::env::temp_dir().join(format!("ringvm-metrics-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut sink = MetricsSink::default();
        // Nobody reads yet: configuring neither blocks nor fails.
        sink.configure(&path).unwrap();
        let vcpus = VcpuExitCounters::default();
        let api = ApiCounters::default();
        let devices: Vec<DeviceMetrics> = (0..8)
            .map(|i| DeviceMetrics {
                kind: "block",
                id: format!("drive{i}"),
                fields: json!({"requests": i}),
            })
            .collect();
        let start = std::time::Instant::now();
        for _ in 0..400 {
            sink.flush(&devices, &vcpus, &api, &PollStats::default())
                .unwrap();
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        let missed = sink.missed();
        assert!(missed > 0, "a 64 KiB pipe cannot hold 400 lines");
        // A reader arrives: the lines it gets are whole, and the next line
        // reports the drops.
        let mut reader = std::fs::File::open(&path).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
        sink.flush(&devices, &vcpus, &api, &PollStats::default())
            .unwrap();
        let m = std::io::Read::read(&mut reader, &mut buf[n..]).unwrap();
        std::fs::remove_file(&path).unwrap();
        let text = std::str::from_utf8(&buf[..n + m]).unwrap();
        let last = text.lines().last().unwrap();
        let v: Value = serde_json::from_str(last).unwrap();
        assert_eq!(v["logger"]["missed_metrics_count"], missed);
        for line in text.lines() {
            serde_json::from_str::<Value>(line).unwrap();
        }
    }
}
