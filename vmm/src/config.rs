//! `VmConfig`: the one description of a VM that the command line, a
//! `--config-file` and the API all produce, in Firecracker's JSON shape so
//! the same files and requests work with both.

use std::path::PathBuf;

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
    /// the DSDT, CPUs in the MADT, power-off through the FADT) instead of
    /// the `virtio_mmio.device=` command-line words, for kernels that only
    /// know ACPI (distribution kernels). Off by default: on PVM-native KVM a
    /// 2-vCPU ACPI guest still stalls early in boot (see README). Written out only
    /// when on, so a
    /// Firecracker-shaped file stays Firecracker's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub acpi: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            cpu_template: None,
            acpi: false,
        }
    }
}

/// How the guest's flushes reach the disk (Firecracker's `cache_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// FLUSH is not offered; the host page cache decides when data lands.
    Unsafe,
    /// FLUSH is offered and acknowledged only after fdatasync.
    #[default]
    Writeback,
}

/// One virtio-blk drive (Firecracker's `drives` entry).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Unique name; also the serial the guest reads (GET_ID, 20 bytes max).
    pub drive_id: String,
    /// Backing file or block device.
    pub path_on_host: PathBuf,
    /// Adds `root=/dev/vdX` (or `root=PARTUUID=...`) to the command line.
    #[serde(default)]
    pub is_root_device: bool,
    /// Offers VIRTIO_BLK_F_RO; writes fail without touching the file.
    #[serde(default)]
    pub is_read_only: bool,
    /// Root partition by PARTUUID instead of the whole device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Flush policy.
    #[serde(default)]
    pub cache_type: CacheType,
    /// Accepted for Firecracker compatibility; ringvm always uses io_uring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Accepted for Firecracker compatibility; not enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
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
    /// MAC address the guest sees; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Accepted for Firecracker compatibility; not enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Accepted for Firecracker compatibility; not enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
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

    /// Parses `path=FILE[,id=NAME][,ro][,root][,direct=on][,cache=unsafe|writeback]`.
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

    /// Parses `tap=NAME[,mac=02:..][,id=eth0]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut net = NetConfig::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            match key {
                "tap" => net.host_dev_name = value.to_string(),
                "mac" => net.guest_mac = Some(value.to_string()),
                "id" => net.iface_id = value.to_string(),
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
    /// Two drives share an id, or an id is too long for the guest's serial.
    #[error("drive id {0:?} is empty, repeated or longer than 20 bytes")]
    DriveId(String),
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
    /// Log the time from process start to the guest's boot-timer write.
    #[serde(skip)]
    pub boot_timer: bool,
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
            if d.drive_id.is_empty() || d.drive_id.len() > 20 || !seen.insert(d.drive_id.as_str()) {
                return Err(ConfigError::DriveId(d.drive_id.clone()));
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
        }
        let devices = self.drives.len() + self.network_interfaces.len();
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
        self.boot_source
            .boot_args
            .as_deref()
            .unwrap_or(DEFAULT_CMDLINE)
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
    fn net_options_parse() {
        let n: NetConfig = "tap=tap0,mac=02:00:00:00:00:01,id=eth0".parse().unwrap();
        assert_eq!(n.host_dev_name, "tap0");
        assert_eq!(n.guest_mac.as_deref(), Some("02:00:00:00:00:01"));
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
        c.drives = vec!["path=/a,id=123456789012345678901".parse().unwrap()];
        assert!(matches!(c.validate(), Err(ConfigError::DriveId(_))));
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
    fn acpi_is_off_unless_a_file_turns_it_on() {
        let json = r#"{"boot-source":{"kernel_image_path":"/k"},
                       "machine-config":{"vcpu_count":1,"mem_size_mib":128}}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        assert!(!c.machine_config.acpi);
        assert!(!serde_json::to_string(&c).unwrap().contains("acpi"));
        let json = r#"{"boot-source":{"kernel_image_path":"/k"},
                       "machine-config":{"vcpu_count":1,"mem_size_mib":128,"acpi":true}}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        assert!(c.machine_config.acpi);
        assert!(serde_json::to_string(&c)
            .unwrap()
            .contains(r#""acpi":true"#));
    }
}
