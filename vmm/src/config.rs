//! `VmConfig`: the one description of a VM that the command line, a
//! `--config-file` and the API all produce, in Firecracker's JSON shape so
//! the same files and requests work with both.

use std::path::PathBuf;

use devices::rate_limiter::{BucketConfig, BucketUpdate, DeviceRateLimiter, RateLimiter};
use devices::virtio::net::MacAddr;
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::cpuid::CpuTemplate;

/// Default kernel command line when the user gives none: the console on
/// COM1, reboot through the i8042 (which ends ringvm), reboot one second
/// after a panic, and no probing of i8042 ports that are not there.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// Guest vCPU limit: the MP table gives each CPU an 8-bit APIC id and the
/// IOAPIC takes the next one.
pub const MAX_VCPUS: u8 = 254;

/// virtio-mmio devices get IRQs 5..=23 (the IOAPIC's 24 pins, less the
/// legacy ISA lines ringvm uses), minus COM1's IRQ 4 which is below.
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// The kernel and how to start it (Firecracker's `boot-source`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// ELF vmlinux or bzImage.
    pub kernel_image_path: PathBuf,
    /// Kernel command line; [`DEFAULT_CMDLINE`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Optional initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// vCPUs, memory and CPU model (Firecracker's `machine-config`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// CPU template name; `None` picks `pvm-safe` on PVM-native KVM and
    /// `host` elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// ringvm extension: describe the machine with ACPI tables (devices in
    /// the DSDT, CPUs in the MADT, power-off through the FADT), what
    /// distribution kernels need; `false` puts the devices on the command
    /// line as `virtio_mmio.device=` words instead, for kernels built
    /// without `CONFIG_ACPI`. On by default; written out only when off, so a
    /// Firecracker-shaped file stays Firecracker's.
    #[serde(default = "acpi_default", skip_serializing_if = "is_acpi_default")]
    pub acpi: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            cpu_template: None,
            acpi: acpi_default(),
        }
    }
}

/// ACPI tables unless asked otherwise (`--acpi off`, `"acpi": false`).
fn acpi_default() -> bool {
    true
}

fn is_acpi_default(acpi: &bool) -> bool {
    *acpi == acpi_default()
}

/// How the guest's flushes reach the disk (Firecracker's `cache_type`).
///
/// Two defaults, on purpose: a drive described in JSON (API, config file)
/// defaults to `Unsafe`, as in Firecracker, so a Firecracker client gets
/// the device it would get there; a `--disk` on the command line defaults
/// to `Writeback`, so a flush the guest was told succeeded is on the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// FLUSH is not offered; the host page cache decides when data lands.
    Unsafe,
    /// FLUSH is offered and acknowledged only after fdatasync.
    #[default]
    Writeback,
}

impl CacheType {
    /// Firecracker's default, for drives described in JSON.
    pub fn json_default() -> Self {
        CacheType::Unsafe
    }
}

/// Firecracker's `io_engine`. ringvm serves every drive from its io_uring
/// ring whichever is asked; the value is checked and echoed back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Firecracker's blocking engine (its default).
    #[default]
    Sync,
    /// Firecracker's io_uring engine.
    Async,
}

/// Longest kernel command line Firecracker takes from `boot_args`, in
/// bytes including the terminating NUL (Linux's x86 COMMAND_LINE_SIZE).
pub const MAX_BOOT_ARGS: usize = 2048;

/// Deserializes `T` from a JSON object only. serde's derived structs also
/// take an array (the fields by position), which no Firecracker client
/// sends and which the API refuses, nested as at the top.
fn object_only<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct ObjectOnly<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectOnly<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_map(ObjectOnly(std::marker::PhantomData))
}

/// One token bucket in Firecracker's JSON (`TokenBucket`). Like
/// Firecracker, unknown fields inside a bucket are ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TokenBucketConfig {
    /// Tokens in a full bucket (bytes or operations).
    pub size: u64,
    /// Extra tokens spent first and never refilled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket from empty to full.
    pub refill_time: u64,
}

impl TokenBucketConfig {
    /// The device-side settings.
    pub fn bucket(&self) -> BucketConfig {
        BucketConfig {
            size: self.size,
            one_time_burst: self.one_time_burst.unwrap_or(0),
            refill_time_ms: self.refill_time,
        }
    }

    /// A size or refill time of 0 means "no limit" (Firecracker's rule).
    pub fn is_unlimited(&self) -> bool {
        self.size == 0 || self.refill_time == 0
    }
}

impl<'de> Deserialize<'de> for TokenBucketConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct TokenBucket {
            size: u64,
            #[serde(default)]
            one_time_burst: Option<u64>,
            refill_time: u64,
        }
        let b: TokenBucket = object_only(d)?;
        Ok(Self {
            size: b.size,
            one_time_burst: b.one_time_burst,
            refill_time: b.refill_time,
        })
    }
}

/// A device's limiter in Firecracker's JSON (`RateLimiter`): a bandwidth
/// bucket in bytes and an ops bucket in requests (drives) or frames
/// (interfaces). An absent bucket is no limit on that dimension.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl<'de> Deserialize<'de> for RateLimiterConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RateLimiter {
            #[serde(default)]
            bandwidth: Option<TokenBucketConfig>,
            #[serde(default)]
            ops: Option<TokenBucketConfig>,
        }
        let r: RateLimiter = object_only(d)?;
        Ok(Self {
            bandwidth: r.bandwidth,
            ops: r.ops,
        })
    }
}

impl RateLimiterConfig {
    /// A limiter with full buckets, for a device being built.
    pub fn limiter(&self) -> DeviceRateLimiter {
        RateLimiter::new(
            self.bandwidth.map(|b| b.bucket()),
            self.ops.map(|b| b.bucket()),
            std::sync::Arc::new(devices::rate_limiter::MonotonicClock),
        )
    }

    /// The limiter for an optional configuration (none: unlimited).
    pub fn limiter_for(config: Option<&Self>) -> DeviceRateLimiter {
        config.map(Self::limiter).unwrap_or_default()
    }

    /// What this body means as a live update (`PATCH`): a bucket it names
    /// is replaced (or removed, when it says size or refill time 0); a
    /// bucket it does not name is kept.
    pub fn as_update(&self) -> (BucketUpdate, BucketUpdate) {
        let one = |b: Option<TokenBucketConfig>| match b {
            Some(b) => BucketUpdate::Set(b.bucket()),
            None => BucketUpdate::Keep,
        };
        (one(self.bandwidth), one(self.ops))
    }

    /// The stored configuration after `update` (as [`Self::as_update`]
    /// applies it to the device), or `None` when nothing is limited any
    /// more.
    pub fn patched(current: Option<Self>, update: &Self) -> Option<Self> {
        let cur = current.unwrap_or_default();
        let merge = |old: Option<TokenBucketConfig>, new: Option<TokenBucketConfig>| match new {
            Some(b) if b.is_unlimited() => None,
            Some(b) => Some(b),
            None => old,
        };
        let merged = Self {
            bandwidth: merge(cur.bandwidth, update.bandwidth),
            ops: merge(cur.ops, update.ops),
        };
        (merged.bandwidth.is_some() || merged.ops.is_some()).then_some(merged)
    }
}

/// `PUT /serial` (Firecracker's `SerialDevice`): where the guest console
/// goes instead of stdout, and an optional bandwidth limit on it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// File or named pipe the console output is appended to; stdout when
    /// absent. Opened at `InstanceStart`, as Firecracker does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<std::path::PathBuf>,
    /// Bytes per refill time the guest may print; the rest is dropped
    /// (and counted), as Firecracker does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucketConfig>,
}

/// One virtio-blk drive (Firecracker's `drives` entry).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Unique name, any length; the serial the guest reads (GET_ID) is its
    /// first 20 bytes.
    pub drive_id: String,
    /// Backing file or block device. Required by ringvm (Firecracker
    /// allows leaving it out for a vhost-user `socket`).
    #[serde(default)]
    pub path_on_host: PathBuf,
    /// Adds `root=/dev/vdX` (or `root=PARTUUID=...`) to the command line.
    /// Required in JSON, as in Firecracker.
    pub is_root_device: bool,
    /// Offers VIRTIO_BLK_F_RO; writes fail without touching the file.
    #[serde(default)]
    pub is_read_only: bool,
    /// Root partition by PARTUUID instead of the whole device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Flush policy; see [`CacheType`] for the two defaults.
    #[serde(default = "CacheType::json_default")]
    pub cache_type: CacheType,
    /// Firecracker's engine choice, checked and echoed; ringvm always uses
    /// its io_uring ring.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// Bandwidth and ops limits for the drive's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// Firecracker's vhost-user backend socket. ringvm has no vhost-user:
    /// a drive naming one is refused with a message that says so, rather
    /// than booting a guest without the disk its client asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// ringvm extension: open the file with O_DIRECT (bypass the host page
    /// cache).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub direct: bool,
}

/// One virtio-net interface on a tap (Firecracker's `network-interfaces`
/// entry).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Unique name.
    pub iface_id: String,
    /// An existing tap device; ringvm does not create host interfaces.
    pub host_dev_name: String,
    /// MAC address the guest sees (unicast); generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<MacAddr>,
    /// MTU offered to the guest (VIRTIO_NET_F_MTU) and set on the tap;
    /// 68..=65535. When absent the guest picks its own (1500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Limits on frames the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on frames the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Smallest MTU Firecracker accepts (IPv4's minimum datagram).
pub const MIN_MTU: u16 = 68;

/// The entropy device, virtio-rng (Firecracker's `entropy`): its bytes come
/// from the host's getrandom.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    /// Limits on the bytes the guest draws, parsed and checked as
    /// Firecracker's; enforced once the device data paths take limiters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Errors in a `--disk` or `--net` option string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    /// A key this option does not know.
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    /// A key with a value it cannot take.
    #[error("bad value for {key}: {value:?}")]
    BadValue {
        /// The key.
        key: String,
        /// The value given.
        value: String,
    },
    /// A required key is missing.
    #[error("missing {0}=")]
    Missing(&'static str),
}

/// Parses a size with an optional binary suffix: `4096`, `64K`, `10M`, `1G`.
fn parse_size(key: &str, text: &str) -> Result<u64, OptionError> {
    let bad = || OptionError::BadValue {
        key: key.into(),
        value: text.into(),
    };
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 20),
        Some(b'G' | b'g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// Parses a token bucket option: `SIZE/REFILL_MS[+BURST]`, e.g.
/// `bw=10M/1000` (10 MiB per second) or `ops=1000/1000+5000` (1000
/// requests per second after a one-time burst of 5000).
fn parse_bucket(key: &str, value: Option<&str>) -> Result<TokenBucketConfig, OptionError> {
    let text = value.unwrap_or_default();
    let bad = || OptionError::BadValue {
        key: key.into(),
        value: text.into(),
    };
    let (rate, burst) = match text.split_once('+') {
        Some((rate, burst)) => (rate, Some(parse_size(key, burst)?)),
        None => (text, None),
    };
    let (size, refill) = rate.split_once('/').ok_or_else(bad)?;
    Ok(TokenBucketConfig {
        size: parse_size(key, size)?,
        one_time_burst: burst,
        refill_time: refill.parse().map_err(|_| bad())?,
    })
}

/// Sets one bucket of the limiter in `slot`, creating the limiter.
fn set_bucket(
    slot: &mut Option<RateLimiterConfig>,
    ops: bool,
    key: &str,
    value: Option<&str>,
) -> Result<(), OptionError> {
    let bucket = parse_bucket(key, value)?;
    let limiter = slot.get_or_insert_with(RateLimiterConfig::default);
    if ops {
        limiter.ops = Some(bucket);
    } else {
        limiter.bandwidth = Some(bucket);
    }
    Ok(())
}

fn parse_switch(key: &str, value: Option<&str>) -> Result<bool, OptionError> {
    match value {
        None | Some("on" | "true" | "1" | "yes") => Ok(true),
        Some("off" | "false" | "0" | "no") => Ok(false),
        Some(v) => Err(OptionError::BadValue {
            key: key.into(),
            value: v.into(),
        }),
    }
}

impl std::str::FromStr for DriveConfig {
    type Err = OptionError;

    /// Parses `path=FILE[,id=NAME][,ro][,root][,direct=on][,cache=unsafe|writeback]
    /// [,bw=SIZE/MS[+BURST]][,ops=N/MS[+BURST]]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut drive = DriveConfig::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            match key {
                "path" => drive.path_on_host = PathBuf::from(value.unwrap_or_default()),
                "id" => drive.drive_id = value.unwrap_or_default().to_string(),
                "ro" | "readonly" => drive.is_read_only = parse_switch(key, value)?,
                "root" => drive.is_root_device = parse_switch(key, value)?,
                "direct" => drive.direct = parse_switch(key, value)?,
                "bw" => set_bucket(&mut drive.rate_limiter, false, key, value)?,
                "ops" => set_bucket(&mut drive.rate_limiter, true, key, value)?,
                "cache" => {
                    drive.cache_type = match value {
                        Some("unsafe") => CacheType::Unsafe,
                        Some("writeback") => CacheType::Writeback,
                        other => {
                            return Err(OptionError::BadValue {
                                key: key.into(),
                                value: other.unwrap_or_default().into(),
                            })
                        }
                    }
                }
                other => return Err(OptionError::UnknownKey(other.into())),
            }
        }
        if drive.path_on_host.as_os_str().is_empty() {
            return Err(OptionError::Missing("path"));
        }
        Ok(drive)
    }
}

impl std::str::FromStr for NetConfig {
    type Err = OptionError;

    /// Parses `tap=NAME[,mac=02:..][,id=eth0][,mtu=N][,rx_bw=SIZE/MS[+BURST]]
    /// [,rx_ops=N/MS[+BURST]][,tx_bw=..][,tx_ops=..]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut net = NetConfig::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            match key {
                "tap" => net.host_dev_name = value.to_string(),
                "mac" => {
                    net.guest_mac = Some(value.parse().map_err(|_| OptionError::BadValue {
                        key: key.into(),
                        value: value.into(),
                    })?)
                }
                "id" => net.iface_id = value.to_string(),
                "mtu" => {
                    net.mtu = Some(value.parse().map_err(|_| OptionError::BadValue {
                        key: key.into(),
                        value: value.into(),
                    })?)
                }
                "rx_bw" => set_bucket(&mut net.rx_rate_limiter, false, key, Some(value))?,
                "rx_ops" => set_bucket(&mut net.rx_rate_limiter, true, key, Some(value))?,
                "tx_bw" => set_bucket(&mut net.tx_rate_limiter, false, key, Some(value))?,
                "tx_ops" => set_bucket(&mut net.tx_rate_limiter, true, key, Some(value))?,
                other => return Err(OptionError::UnknownKey(other.into())),
            }
        }
        if net.host_dev_name.is_empty() {
            return Err(OptionError::Missing("tap"));
        }
        Ok(net)
    }
}

/// Errors in a VM description, found before any KVM work starts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count outside the supported range.
    #[error("vcpu_count must be between 1 and {MAX_VCPUS}, got {0}")]
    VcpuCount(u8),
    /// Memory too small to boot anything, or too large to address.
    #[error("mem_size_mib must be between 16 and 16777216 (16 TiB), got {0}")]
    MemSize(u64),
    /// The CPU template name is unknown.
    #[error("{0}")]
    CpuTemplate(#[from] crate::arch::x86_64::cpuid::CpuidError),
    /// Two drives share an id, or one has none.
    #[error("drive id {0:?} is empty or repeated")]
    DriveId(String),
    /// A drive without a backing file.
    #[error("Drive config error: Unable to create the virtio block device: Invalid block config. (drive {0:?} has no path_on_host)")]
    NoDrivePath(String),
    /// A drive asks for Firecracker's vhost-user backend.
    #[error("Drive config error: Unable to create the virtio block device: ringvm has no vhost-user block backend (drive {0:?} names a socket); give path_on_host instead")]
    VhostUser(String),
    /// An interface MTU below IPv4's minimum.
    #[error("Network config error: MTU {0} is out of range [68, 65535]")]
    Mtu(u16),
    /// Two interfaces share an id, or one has none.
    #[error("network interface id {0:?} is empty or repeated")]
    IfaceId(String),
    /// More than one drive claims to be the root.
    #[error("only one drive can be the root device")]
    TwoRoots,
    /// More devices than the MMIO window and IRQ lines can take.
    #[error("too many virtio devices: {0} (at most {MAX_VIRTIO_DEVICES})")]
    TooManyDevices(usize),
    /// No kernel was given.
    #[error("no kernel: give --kernel PATH (or boot-source.kernel_image_path)")]
    NoKernel,
    /// The vsock device is misconfigured.
    #[error("{0}")]
    Vsock(#[from] crate::vsock::VsockConfigError),
}

/// Everything needed to build and boot one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The kernel, initrd and command line.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// vCPUs, memory, CPU template.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// Block devices, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// Network interfaces (eth0, eth1, ...).
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetConfig>,
    /// The entropy device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    /// The vsock device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<crate::vsock::VsockConfig>,
    /// Log the time from process start to the guest's boot-timer write.
    #[serde(skip)]
    pub boot_timer: bool,
    /// Where the guest console goes (`PUT /serial`); stdout by default.
    #[serde(skip)]
    pub serial: SerialConfig,
    /// Run a command in the guest (`ringvm -- CMD`): the shares, the
    /// control tree and the exit status. Command line only.
    #[serde(skip)]
    pub runner: Option<crate::runner::RunnerConfig>,
}

impl VmConfig {
    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.machine_config;
        if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(m.vcpu_count));
        }
        if !(16..=(16 << 20)).contains(&m.mem_size_mib) {
            return Err(ConfigError::MemSize(m.mem_size_mib));
        }
        if let Some(t) = &m.cpu_template {
            t.parse::<CpuTemplate>()?;
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.drives {
            if d.drive_id.is_empty() || !seen.insert(d.drive_id.as_str()) {
                return Err(ConfigError::DriveId(d.drive_id.clone()));
            }
            if d.socket.is_some() {
                return Err(ConfigError::VhostUser(d.drive_id.clone()));
            }
            if d.path_on_host.as_os_str().is_empty() {
                return Err(ConfigError::NoDrivePath(d.drive_id.clone()));
            }
        }
        if self.drives.iter().filter(|d| d.is_root_device).count() > 1 {
            return Err(ConfigError::TwoRoots);
        }
        let mut seen = std::collections::HashSet::new();
        for n in &self.network_interfaces {
            if n.iface_id.is_empty() || !seen.insert(n.iface_id.as_str()) {
                return Err(ConfigError::IfaceId(n.iface_id.clone()));
            }
            if let Some(mtu) = n.mtu.filter(|m| *m < MIN_MTU) {
                return Err(ConfigError::Mtu(mtu));
            }
        }
        let devices = self.drives.len()
            + self.network_interfaces.len()
            + usize::from(self.entropy.is_some())
            + usize::from(self.vsock.is_some())
            + self.runner.as_ref().map_or(0, |r| r.device_count());
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        if self.boot_source.kernel_image_path.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        Ok(())
    }

    /// The kernel command line the user asked for, before ringvm adds its
    /// own parameters.
    pub fn base_cmdline(&self) -> &str {
        let default = if self.runner.is_some() {
            crate::runner::RUNNER_CMDLINE
        } else {
            DEFAULT_CMDLINE
        };
        self.boot_source.boot_args.as_deref().unwrap_or(default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> VmConfig {
        VmConfig {
            boot_source: BootSource {
                kernel_image_path: "/k".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn defaults_validate() {
        assert_eq!(good().validate(), Ok(()));
        assert_eq!(good().base_cmdline(), DEFAULT_CMDLINE);
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = good();
        c.machine_config.vcpu_count = 0;
        assert_eq!(c.validate(), Err(ConfigError::VcpuCount(0)));
        let mut c = good();
        c.machine_config.vcpu_count = 255;
        assert_eq!(c.validate(), Err(ConfigError::VcpuCount(255)));
        let mut c = good();
        c.machine_config.mem_size_mib = 1;
        assert_eq!(c.validate(), Err(ConfigError::MemSize(1)));
        let mut c = good();
        c.machine_config.cpu_template = Some("C3".into());
        assert!(c.validate().unwrap_err().to_string().contains("C3"));
        assert_eq!(VmConfig::default().validate(), Err(ConfigError::NoKernel));
    }

    #[test]
    fn disk_options_parse() {
        let d: DriveConfig = "path=/img,id=rootfs,ro,root".parse().unwrap();
        assert_eq!(d.path_on_host, PathBuf::from("/img"));
        assert_eq!(d.drive_id, "rootfs");
        assert!(d.is_read_only && d.is_root_device && !d.direct);
        let d: DriveConfig = "path=/x,direct=on,cache=unsafe".parse().unwrap();
        assert!(d.direct);
        assert_eq!(d.cache_type, CacheType::Unsafe);
        assert_eq!(
            "id=x".parse::<DriveConfig>(),
            Err(OptionError::Missing("path"))
        );
        assert!(matches!(
            "path=/x,bogus".parse::<DriveConfig>(),
            Err(OptionError::UnknownKey(_))
        ));
        assert!(matches!(
            "path=/x,ro=maybe".parse::<DriveConfig>(),
            Err(OptionError::BadValue { .. })
        ));
    }

    #[test]
    fn limiter_options_parse() {
        let d: DriveConfig = "path=/x,bw=10M/1000,ops=100/1000+500".parse().unwrap();
        let rl = d.rate_limiter.unwrap();
        assert_eq!(
            rl.bandwidth,
            Some(TokenBucketConfig {
                size: 10 << 20,
                one_time_burst: None,
                refill_time: 1000
            })
        );
        assert_eq!(
            rl.ops,
            Some(TokenBucketConfig {
                size: 100,
                one_time_burst: Some(500),
                refill_time: 1000
            })
        );
        assert_eq!(d.cache_type, CacheType::Writeback, "the CLI default");
        let n: NetConfig = "tap=t,mtu=9000,rx_bw=1G/1000+64K,tx_ops=10/100"
            .parse()
            .unwrap();
        assert_eq!(n.mtu, Some(9000));
        let rx = n.rx_rate_limiter.unwrap().bandwidth.unwrap();
        assert_eq!((rx.size, rx.one_time_burst), (1 << 30, Some(64 << 10)));
        assert_eq!(n.tx_rate_limiter.unwrap().ops.unwrap().refill_time, 100);
        for bad in [
            "path=/x,bw=10M",
            "path=/x,bw=x/1",
            "path=/x,bw=1/x",
            "path=/x,ops=99999999999999999999G/1",
            "path=/x,bw=1/1+",
        ] {
            assert!(
                matches!(
                    bad.parse::<DriveConfig>(),
                    Err(OptionError::BadValue { .. })
                ),
                "{bad}"
            );
        }
        assert!("tap=t,mtu=70000".parse::<NetConfig>().is_err());
        let mut c = good();
        c.network_interfaces = vec!["tap=t,id=e,mtu=67".parse().unwrap()];
        assert_eq!(c.validate(), Err(ConfigError::Mtu(67)));
    }

    #[test]
    fn rate_limiter_json_is_firecrackers() {
        let d: DriveConfig = serde_json::from_str(
            r#"{"drive_id":"a","path_on_host":"/a","is_root_device":false,
                "rate_limiter":{"bandwidth":{"size":1000,"refill_time":100,"one_time_burst":5},
                                "ops":{"size":10,"refill_time":1000,"extra":1}}}"#,
        )
        .unwrap();
        assert_eq!(d.cache_type, CacheType::Unsafe, "Firecracker's default");
        assert_eq!(d.io_engine, IoEngine::Sync);
        let rl = d.rate_limiter.unwrap();
        assert_eq!(rl.bandwidth.unwrap().one_time_burst, Some(5));
        for (body, needle) in [
            (
                r#"{"bandwidth":{"size":"1","refill_time":1}}"#,
                "invalid type",
            ),
            (r#"{"bandwidth":{"size":-1,"refill_time":1}}"#, "-1"),
            (
                r#"{"bandwidth":{"size":18446744073709551616,"refill_time":1}}"#,
                "expected u64",
            ),
            (r#"{"bandwidth":{"size":1}}"#, "missing field `refill_time`"),
            (r#"{"ops":{"refill_time":1}}"#, "missing field `size`"),
            (r#"{"bandwith":{}}"#, "unknown field `bandwith`"),
            (r#"{"ops":{"size":1,"refill_time":1.5}}"#, "invalid type"),
            (r#"[null, null]"#, "expected a JSON object"),
            (r#"{"bandwidth":[1, null, 100]}"#, "expected a JSON object"),
            (r#"{"ops":"fast"}"#, "expected a JSON object"),
        ] {
            let e = serde_json::from_str::<RateLimiterConfig>(body).unwrap_err();
            assert!(e.to_string().contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn limiter_patches_merge_as_the_device_applies_them() {
        let b = |size| TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time: 100,
        };
        let both = RateLimiterConfig {
            bandwidth: Some(b(1)),
            ops: Some(b(2)),
        };
        let only_ops = RateLimiterConfig {
            bandwidth: None,
            ops: Some(b(3)),
        };
        assert_eq!(
            RateLimiterConfig::patched(Some(both), &only_ops),
            Some(RateLimiterConfig {
                bandwidth: Some(b(1)),
                ops: Some(b(3))
            })
        );
        let off = RateLimiterConfig {
            bandwidth: Some(b(0)),
            ops: Some(b(0)),
        };
        assert_eq!(RateLimiterConfig::patched(Some(both), &off), None);
        assert_eq!(
            only_ops.as_update(),
            (
                BucketUpdate::Keep,
                BucketUpdate::Set(BucketConfig {
                    size: 3,
                    one_time_burst: 0,
                    refill_time_ms: 100
                })
            )
        );
        assert!(!both.limiter().is_unlimited());
        assert!(off.limiter().is_unlimited());
    }

    #[test]
    fn net_options_parse() {
        let n: NetConfig = "tap=tap0,mac=02:00:00:00:00:01,id=eth0".parse().unwrap();
        assert_eq!(n.host_dev_name, "tap0");
        assert_eq!(
            n.guest_mac.map(|m| m.to_string()).as_deref(),
            Some("02:00:00:00:00:01")
        );
        assert!(
            "tap=t,mac=01:00:00:00:00:01".parse::<NetConfig>().is_err(),
            "multicast refused"
        );
        assert_eq!(n.iface_id, "eth0");
        assert_eq!(
            "mac=02:00:00:00:00:01".parse::<NetConfig>(),
            Err(OptionError::Missing("tap"))
        );
        assert!(matches!(
            "tap=t,speed=10".parse::<NetConfig>(),
            Err(OptionError::UnknownKey(_))
        ));
    }

    #[test]
    fn drive_ids_must_be_unique_and_fit_the_serial() {
        let mut c = good();
        let d: DriveConfig = "path=/a,id=same".parse().unwrap();
        c.drives = vec![d.clone(), d];
        assert!(matches!(c.validate(), Err(ConfigError::DriveId(_))));
        // Ids longer than the 20-byte serial are fine (the serial is cut).
        c.drives = vec!["path=/a,id=a_drive_id_longer_than_twenty_bytes"
            .parse()
            .unwrap()];
        assert_eq!(c.validate(), Ok(()));
        c.drives[0].socket = Some("/vhost.sock".into());
        assert!(c.validate().unwrap_err().to_string().contains("vhost-user"));
        c.drives[0].socket = None;
        c.drives[0].path_on_host = PathBuf::new();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("Invalid block config"));
        c.drives = vec![
            "path=/a,id=a,root".parse().unwrap(),
            "path=/b,id=b,root".parse().unwrap(),
        ];
        assert_eq!(c.validate(), Err(ConfigError::TwoRoots));
    }

    #[test]
    fn firecracker_shaped_json_parses_and_unknown_fields_fail() {
        let json = r#"{"boot-source":{"kernel_image_path":"/vmlinux","boot_args":"console=ttyS0"},
                       "machine-config":{"vcpu_count":2,"mem_size_mib":256}}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.machine_config.vcpu_count, 2);
        assert_eq!(c.base_cmdline(), "console=ttyS0");
        let bad = r#"{"boot-source":{"kernel_image_path":"/k","bogus":1}}"#;
        assert!(serde_json::from_str::<VmConfig>(bad).is_err());
    }

    #[test]
    fn acpi_is_on_unless_a_file_turns_it_off() {
        let json = r#"{"boot-source":{"kernel_image_path":"/k"},
                       "machine-config":{"vcpu_count":1,"mem_size_mib":128}}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        assert!(c.machine_config.acpi);
        assert!(MachineConfig::default().acpi);
        assert!(!serde_json::to_string(&c).unwrap().contains("acpi"));
        let json = r#"{"boot-source":{"kernel_image_path":"/k"},
                       "machine-config":{"vcpu_count":1,"mem_size_mib":128,"acpi":false}}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        assert!(!c.machine_config.acpi);
        assert!(serde_json::to_string(&c)
            .unwrap()
            .contains(r#""acpi":false"#));
    }
}
