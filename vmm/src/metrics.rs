//! Counters a running VM exposes, flushed as one JSON line per flush to
//! the metrics path (`PUT /metrics`, `FlushMetrics`, and periodically), in
//! the spirit of Firecracker's metrics file.
//!
//! Counters live with what they count (devices keep their own, vCPU
//! threads bump shared atomics); this module only gathers them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Map, Value};

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

/// Where metrics lines go.
#[derive(Debug, Default)]
pub struct MetricsSink {
    path: Option<PathBuf>,
    file: Option<File>,
}

impl MetricsSink {
    /// Sends later flushes to `path` (appended; created if missing).
    pub fn configure(&mut self, path: &Path) -> std::io::Result<()> {
        let file = OpenOptions::new().append(true).create(true).open(path)?;
        self.path = Some(path.to_path_buf());
        self.file = Some(file);
        Ok(())
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
    ) -> std::io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let line = render(devices, vcpus, api);
        writeln!(file, "{line}")
    }
}

/// The JSON object of one flush.
pub fn render(devices: &[DeviceMetrics], vcpus: &VcpuExitCounters, api: &ApiCounters) -> Value {
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
        sink.flush(&devices, &vcpus, &api).unwrap();
        assert!(!dir.exists(), "no path, no file");
        sink.configure(&dir).unwrap();
        sink.flush(&devices, &vcpus, &api).unwrap();
        sink.flush(&devices, &vcpus, &api).unwrap();
        let text = std::fs::read_to_string(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["block"]["rootfs"]["requests"], 7);
        assert_eq!(v["vcpu"]["exit_mmio_write"], 1);
        assert_eq!(v["api_server"]["requests"], 3);
    }
}
