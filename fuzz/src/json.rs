//! JSON documents built from fuzz input, with object keys drawn mostly
//! from the names ringvm's API and config file know, so inputs reach the
//! deserializers' field handling rather than stopping at "unknown field".

use arbitrary::Arbitrary;
use serde_json::{Map, Number, Value};

/// Every field and enum name the API bodies and the config file use.
pub const KEYS: &[&str] = &[
    "action_type",
    "boot-source",
    "boot_args",
    "cache_type",
    "cpu_template",
    "direct",
    "drive_id",
    "drives",
    "entropy",
    "guest_cid",
    "guest_mac",
    "host_dev_name",
    "huge_pages",
    "iface_id",
    "initrd_path",
    "io_engine",
    "is_read_only",
    "is_root_device",
    "kernel_image_path",
    "level",
    "log_path",
    "logger",
    "machine-config",
    "mem_size_mib",
    "metrics",
    "metrics_path",
    "module",
    "network-interfaces",
    "partuuid",
    "path_on_host",
    "rate_limiter",
    "rx_rate_limiter",
    "show_level",
    "show_log_origin",
    "smt",
    "track_dirty_pages",
    "tx_rate_limiter",
    "uds_path",
    "vcpu_count",
    "vsock",
    "vsock_id",
];

/// String values the API gives meaning to.
pub const WORDS: &[&str] = &[
    "InstanceStart",
    "SendCtrlAltDel",
    "FlushMetrics",
    "Unsafe",
    "Writeback",
    "Sync",
    "Async",
    "None",
    "2M",
    "host",
    "pvm-safe",
    "T2",
    "Error",
    "Warning",
    "Info",
    "Debug",
    "Trace",
    "Off",
    "rootfs",
    "eth0",
    "tap0",
    "06:00:AC:10:00:02",
    "/dev/null",
    "/nonexistent/vmlinux",
    "",
];

/// A JSON value, shaped by the input.
#[derive(Arbitrary, Clone, Debug)]
pub enum Json {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A large unsigned integer.
    Big(u64),
    /// A float (non-finite ones become `null`).
    Float(f64),
    /// A string the API knows.
    Word(u8),
    /// Any string.
    Str(String),
    /// An array.
    Array(Vec<Json>),
    /// An object; keys by [`Key`].
    Object(Vec<(Key, Json)>),
}

/// An object key.
#[derive(Arbitrary, Clone, Debug)]
pub enum Key {
    /// One of [`KEYS`].
    Known(u8),
    /// Anything.
    Raw(String),
}

impl Key {
    fn text(&self) -> String {
        match self {
            Key::Known(i) => KEYS[usize::from(*i) % KEYS.len()].to_string(),
            Key::Raw(s) => s.clone(),
        }
    }
}

impl Json {
    /// The serde_json value, nesting cut at `depth` levels.
    pub fn value(&self, depth: usize) -> Value {
        if depth == 0 {
            return Value::Null;
        }
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Int(i) => Value::from(*i),
            Json::Big(u) => Value::from(*u),
            Json::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Json::Word(i) => Value::from(WORDS[usize::from(*i) % WORDS.len()]),
            Json::Str(s) => Value::from(s.as_str()),
            Json::Array(items) => Value::Array(items.iter().map(|j| j.value(depth - 1)).collect()),
            Json::Object(fields) => {
                let mut map = Map::new();
                for (k, v) in fields {
                    map.insert(k.text(), v.value(depth - 1));
                }
                Value::Object(map)
            }
        }
    }

    /// The document as text.
    pub fn text(&self) -> String {
        self.value(8).to_string()
    }
}

/// A request body or file: structured JSON, or raw bytes for the parser.
#[derive(Arbitrary, Clone, Debug)]
pub enum Doc {
    /// Built from [`Json`].
    Json(Json),
    /// Anything.
    Raw(Vec<u8>),
}

impl Doc {
    /// The bytes a client would send.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Doc::Json(j) => j.text().into_bytes(),
            Doc::Raw(b) => b.clone(),
        }
    }
}
