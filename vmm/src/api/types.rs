//! The API's requests, bodies and responses, in Firecracker's JSON shapes.
//!
//! Bodies that [`crate::config`] already describes (`BootSource`,
//! `DriveConfig`, `NetConfig`) are used as they are; the ones here exist
//! because the API accepts fields the VM description does not carry
//! (`smt`, `track_dirty_pages`, `huge_pages`) or because they are
//! API-only (actions, logger, metrics, partial updates).

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{
    BootSource, DriveConfig, EntropyConfig, NetConfig, RateLimiterConfig, SerialConfig, VmConfig,
};

/// Firecracker's `huge_pages` machine setting. Checked (memory must be a
/// whole number of huge pages, as in Firecracker) and remembered so a
/// client reads back what it wrote; ringvm backs guest memory with
/// ordinary anonymous pages either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Ordinary pages.
    #[default]
    None,
    /// 2 MiB hugetlbfs pages (ignored by ringvm).
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

impl HugePages {
    /// The page size guest memory must be a multiple of, in MiB.
    pub fn page_mib(self) -> u64 {
        match self {
            HugePages::None => 1,
            HugePages::Hugetlbfs2M => 2,
        }
    }
}

/// Body of `PUT /machine-config` and of `GET /machine-config`'s answer.
/// `vcpu_count` and `mem_size_mib` are required on PUT, as in Firecracker,
/// and the optional fields fall back to their defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigBody {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Accepted, ignored: ringvm gives each vCPU its own core.
    #[serde(default)]
    pub smt: bool,
    /// Accepted, ignored: ringvm has no snapshots to track pages for.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Accepted, ignored (see [`HugePages`]).
    #[serde(default)]
    pub huge_pages: HugePages,
    /// ringvm template name (`host`, `pvm-safe`); Firecracker's `"None"`
    /// means no template, which lets ringvm choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
}

/// Body of `PATCH /machine-config`: any subset of the machine fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// New vCPU count.
    pub vcpu_count: Option<u8>,
    /// New memory size.
    pub mem_size_mib: Option<u64>,
    /// See [`MachineConfigBody::smt`].
    pub smt: Option<bool>,
    /// See [`MachineConfigBody::track_dirty_pages`].
    pub track_dirty_pages: Option<bool>,
    /// See [`MachineConfigBody::huge_pages`].
    pub huge_pages: Option<HugePages>,
    /// See [`MachineConfigBody::cpu_template`].
    pub cpu_template: Option<String>,
}

impl MachineConfigUpdate {
    /// Firecracker answers an empty PATCH with 400 rather than a no-op.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Body of `PATCH /drives/{id}`: swap the backing file of a running
/// drive (e.g. after the host resized or replaced it) and/or change its
/// rate limiter.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// Must equal the id in the path.
    pub drive_id: String,
    /// New backing file.
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    /// Buckets to replace (see [`RateLimiterConfig::as_update`]).
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Body of `PATCH /network-interfaces/{id}`: change an interface's rate
/// limiters while the guest runs.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// Must equal the id in the path.
    pub iface_id: String,
    /// Buckets to replace on the receive side.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Buckets to replace on the transmit side.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `state` of `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum VmStateRequest {
    /// Stop every vCPU.
    Paused,
    /// Let them run again.
    Resumed,
}

/// Body of `PATCH /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateBody {
    /// The state wanted.
    pub state: VmStateRequest,
}

/// `action_type` of `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionType {
    /// Build and boot the VM from the configuration given so far.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's i8042 keyboard.
    SendCtrlAltDel,
    /// Write the metrics now.
    FlushMetrics,
}

// By hand rather than derived: serde's derived enum answers a number with
// "expected value", which does not name the problem.
impl<'de> Deserialize<'de> for ActionType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const NAMES: &[&str] = &["InstanceStart", "SendCtrlAltDel", "FlushMetrics"];
        let s = String::deserialize(d)?;
        match s.as_str() {
            "InstanceStart" => Ok(ActionType::InstanceStart),
            "SendCtrlAltDel" => Ok(ActionType::SendCtrlAltDel),
            "FlushMetrics" => Ok(ActionType::FlushMetrics),
            _ => Err(serde::de::Error::unknown_variant(&s, NAMES)),
        }
    }
}

/// Body of `PUT /actions`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    /// What to do.
    pub action_type: ActionType,
}

/// Log level of `PUT /logger`; Firecracker takes the names in any case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    /// No logging.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors (Firecracker's default).
    Warning,
    /// Informational messages.
    Info,
    /// Debug messages.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The `log` crate's filter for this level, for the VMM side to apply.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => {
                return Err(serde::de::Error::unknown_variant(
                    &s,
                    &["Off", "Error", "Warning", "Info", "Debug", "Trace"],
                ))
            }
        })
    }
}

/// Body of `PUT /logger`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// File or named pipe for the log; stderr when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// Level; unchanged when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Prefix each line with its level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix each line with file:line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log from this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// Body of `PUT /metrics`. Unknown fields are ignored, as Firecracker
/// ignores them (newer Firecrackers add `emit_id` and `properties` here).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsConfig {
    /// File or named pipe the JSON metrics lines are written to.
    pub metrics_path: PathBuf,
}

/// A parsed, well-formed API request: what the router hands to the VMM
/// side. Whether it is allowed now is the [`super::controller`]'s call.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiRequest {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfigBody),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`.
    PutDrive(DriveConfig),
    /// `PATCH /drives/{id}`.
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetConfig),
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PUT /logger`.
    PutLogger(LoggerConfig),
    /// `PUT /metrics`.
    PutMetrics(MetricsConfig),
    /// `PUT /serial`.
    PutSerial(SerialConfig),
    /// `PATCH /vm`.
    PatchVmState(VmStateRequest),
    /// `PUT /entropy`.
    PutEntropy(EntropyConfig),
    /// `PUT /vsock`.
    PutVsock(crate::vsock::VsockConfig),
}

/// Status and JSON body of one answer. Bodies are JSON text already, so
/// the API thread writes them without knowing their type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status code.
    pub status: u16,
    /// JSON body; `None` for 204.
    pub body: Option<String>,
}

impl ApiResponse {
    /// 204 No Content: the success answer of every PUT, PATCH and action.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// 200 with `value` serialized as the body.
    pub fn ok<T: Serialize + ?Sized>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Self {
                status: 200,
                body: Some(body),
            },
            Err(e) => Self::fault(500, format!("Cannot serialize the response: {e}")),
        }
    }

    /// An error answer: `{"fault_message": "..."}`, Firecracker's shape.
    pub fn fault(status: u16, message: impl AsRef<str>) -> Self {
        let body = serde_json::json!({ "fault_message": message.as_ref() }).to_string();
        Self {
            status,
            body: Some(body),
        }
    }

    /// 400 with `message`: the status Firecracker uses for every refused
    /// request.
    pub fn bad_request(message: impl AsRef<str>) -> Self {
        Self::fault(400, message)
    }

    /// The `fault_message` of an error answer, if any (for logs and tests).
    pub fn fault_message(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(self.body.as_deref()?).ok()?;
        v.get("fault_message")?.as_str().map(str::to_string)
    }
}

/// `GET /` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    /// The instance id (`--id`; Firecracker's default is
    /// `anonymous-instance`).
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: &'static str,
    /// ringvm's version.
    pub vmm_version: &'static str,
    /// `ringvm`, where Firecracker says `Firecracker`.
    pub app_name: &'static str,
}

/// `GET /vm/config` answer, in Firecracker's `FullVmConfiguration` shape
/// (the same keys a `--config-file` uses).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FullVmConfig {
    /// Kernel, initrd, command line.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// Machine settings including the accepted-but-ignored ones.
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfigBody,
    /// Drives in guest order.
    pub drives: Vec<DriveConfig>,
    /// Network interfaces in guest order.
    #[serde(rename = "network-interfaces")]
    pub network_interfaces: Vec<NetConfig>,
    /// Logger settings, if set through the API.
    pub logger: Option<LoggerConfig>,
    /// Metrics settings, if set through the API.
    pub metrics: Option<MetricsConfig>,
    /// The entropy device, if configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    /// The vsock device, if configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<crate::vsock::VsockConfig>,
}

/// The settings of [`MachineConfigBody`] that [`VmConfig`] has no place
/// for; kept by the controller to echo back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineExtras {
    /// See [`MachineConfigBody::smt`].
    pub smt: bool,
    /// See [`MachineConfigBody::track_dirty_pages`].
    pub track_dirty_pages: bool,
    /// See [`MachineConfigBody::huge_pages`].
    pub huge_pages: HugePages,
}

impl MachineConfigBody {
    /// The API view of a VM's machine settings.
    pub fn from_config(config: &VmConfig, extras: MachineExtras) -> Self {
        let m = &config.machine_config;
        Self {
            vcpu_count: m.vcpu_count,
            mem_size_mib: m.mem_size_mib,
            smt: extras.smt,
            track_dirty_pages: extras.track_dirty_pages,
            huge_pages: extras.huge_pages,
            cpu_template: m.cpu_template.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_is_case_insensitive() {
        let c: LoggerConfig = serde_json::from_str(r#"{"log_path":"/l","level":"debug"}"#).unwrap();
        assert_eq!(c.level, Some(LogLevel::Debug));
        let c: LoggerConfig = serde_json::from_str(r#"{"level":"WARNING"}"#).unwrap();
        assert_eq!(c.level.map(LogLevel::filter), Some(log::LevelFilter::Warn));
        let e = serde_json::from_str::<LoggerConfig>(r#"{"level":"loud"}"#).unwrap_err();
        assert!(e.to_string().contains("loud"), "{e}");
    }

    #[test]
    fn fault_bodies_have_firecrackers_shape() {
        let r = ApiResponse::bad_request("nope \"quoted\"");
        assert_eq!(r.status, 400);
        assert_eq!(
            r.body.as_deref(),
            Some(r#"{"fault_message":"nope \"quoted\""}"#)
        );
        assert_eq!(r.fault_message().as_deref(), Some("nope \"quoted\""));
        assert_eq!(ApiResponse::no_content().fault_message(), None);
    }

    #[test]
    fn machine_config_round_trips_with_firecracker_names() {
        let b: MachineConfigBody = serde_json::from_str(
            r#"{"vcpu_count":2,"mem_size_mib":256,"huge_pages":"2M","smt":true}"#,
        )
        .unwrap();
        assert_eq!(b.huge_pages, HugePages::Hugetlbfs2M);
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"vcpu_count":2,"mem_size_mib":256,"smt":true,
                               "track_dirty_pages":false,"huge_pages":"2M"})
        );
    }
}
