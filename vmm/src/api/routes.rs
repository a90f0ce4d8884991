//! Method + path + body → [`ApiRequest`], with Firecracker's error
//! messages. Pure: no state, no I/O; whether a request is allowed before
//! or after boot is the controller's business.

use serde::de::DeserializeOwned;

use super::http::Method;
use super::types::{
    ActionBody, ApiRequest, ApiResponse, MachineConfigBody, MachineConfigUpdate, PartialDrive,
    PartialNetworkInterface, VmStateBody,
};
use crate::config::{BootSource, DriveConfig, NetConfig, SerialConfig};

/// Firecracker endpoints ringvm does not implement: a request for one of
/// them says so instead of only "invalid path".
const NOT_IMPLEMENTED: &[&str] = &[
    "balloon",
    "cpu-config",
    "hotplug",
    "memory-hotplug",
    "mmds",
    "pmem",
    "snapshot",
];

/// Why a request was refused before reaching the VMM. Every variant is
/// answered with 400 and its message as `fault_message`, worded as
/// Firecracker words it.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No such endpoint, or not with this method.
    #[error("Invalid request method and/or path: {method} {path}.")]
    InvalidPathMethod {
        /// The request method.
        method: String,
        /// The path without its leading `/`.
        path: String,
    },
    /// A Firecracker endpoint that ringvm does not have.
    #[error("Invalid request method and/or path: {method} {path}. (ringvm does not implement Firecracker's /{resource} endpoint.)")]
    NotImplemented {
        /// The request method.
        method: String,
        /// The path without its leading `/`.
        path: String,
        /// The endpoint's first path segment.
        resource: &'static str,
    },
    /// A GET with a body.
    #[error("GET request cannot have a body.")]
    GetWithBody,
    /// A PUT without a body.
    #[error("Empty PUT request.")]
    EmptyPut,
    /// A PATCH without a body, or with nothing to change.
    #[error("Empty PATCH request.")]
    EmptyPatch,
    /// `/drives/` or `/network-interfaces/` without an id.
    #[error("The ID cannot be empty.")]
    EmptyId,
    /// An id with characters other than alphanumerics and `_`.
    #[error("API Resource IDs can only contain alphanumeric characters and underscores.")]
    InvalidId,
    /// The id in the body is not the id in the path.
    #[error("The id from the path does not match the id from the body!")]
    IdMismatch,
    /// The same for an interface, which Firecracker words differently.
    #[error("The id from the path [{path}] does not match the id from the body [{body}]!")]
    IfaceIdMismatch {
        /// The id in the path.
        path: String,
        /// The id in the body.
        body: String,
    },
    /// The body is not JSON, has a field of the wrong type, lacks a
    /// required field or has an unknown one; serde names which.
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    Json(#[from] serde_json::Error),
}

impl From<RouteError> for ApiResponse {
    fn from(e: RouteError) -> Self {
        ApiResponse::bad_request(e.to_string())
    }
}

/// Every body is a JSON object. serde's derived structs would also take
/// an array (fields by position), which Firecracker's clients never send
/// and ringvm refuses.
fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, RouteError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(RouteError::Json(serde::de::Error::invalid_type(
            serde::de::Unexpected::Seq,
            &"a JSON object",
        )));
    }
    Ok(serde_json::from_slice(body)?)
}

/// Firecracker's rule for resource ids in paths.
fn checked_id(id: Option<&str>) -> Result<&str, RouteError> {
    let id = id.unwrap_or_default();
    if id.is_empty() {
        return Err(RouteError::EmptyId);
    }
    if !id.chars().all(|c| c == '_' || c.is_ascii_alphanumeric()) {
        return Err(RouteError::InvalidId);
    }
    Ok(id)
}

/// Turns one HTTP request into an [`ApiRequest`].
pub fn parse(method: &Method, path: &str, body: &[u8]) -> Result<ApiRequest, RouteError> {
    let trimmed = path.trim_start_matches('/');
    // One trailing slash is tolerated (`/machine-config/`), as Firecracker
    // does.
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    let segments: Vec<&str> = trimmed.split('/').collect();
    let invalid = || RouteError::InvalidPathMethod {
        method: method.to_string(),
        path: trimmed.to_string(),
    };
    let has_body = !body.is_empty();

    let (resource, id, extra) = match segments.as_slice() {
        [r] => (*r, None, false),
        [r, id] => (*r, Some(*id), false),
        [r, ..] => (*r, None, true),
        [] => ("", None, false),
    };

    if let Some(&resource) = NOT_IMPLEMENTED.iter().find(|r| **r == resource) {
        return Err(RouteError::NotImplemented {
            method: method.to_string(),
            path: trimmed.to_string(),
            resource,
        });
    }
    if extra {
        return Err(invalid());
    }

    let needs_body = |kind: RouteError| if has_body { Ok(()) } else { Err(kind) };
    let request = match (method, resource, id) {
        (Method::Get, _, _) if has_body && is_get_path(resource, id) => {
            return Err(RouteError::GetWithBody)
        }
        (Method::Get, "", None) => ApiRequest::GetInstanceInfo,
        (Method::Get, "version", None) => ApiRequest::GetVersion,
        (Method::Get, "machine-config", None) => ApiRequest::GetMachineConfig,
        (Method::Get, "vm", Some("config")) => ApiRequest::GetVmConfig,

        (Method::Put, "actions", None) => {
            needs_body(RouteError::EmptyPut)?;
            ApiRequest::Action(json::<ActionBody>(body)?.action_type)
        }
        (Method::Put, "boot-source", None) => {
            needs_body(RouteError::EmptyPut)?;
            ApiRequest::PutBootSource(json::<BootSource>(body)?)
        }
        (Method::Put, "machine-config", None) => {
            needs_body(RouteError::EmptyPut)?;
            ApiRequest::PutMachineConfig(json::<MachineConfigBody>(body)?)
        }
        (Method::Patch, "machine-config", None) => {
            needs_body(RouteError::EmptyPatch)?;
            let update: MachineConfigUpdate = json(body)?;
            if update.is_empty() {
                return Err(RouteError::EmptyPatch);
            }
            ApiRequest::PatchMachineConfig(update)
        }
        (Method::Put, "drives", _) => {
            let id = checked_id(id)?;
            needs_body(RouteError::EmptyPut)?;
            let drive: DriveConfig = json(body)?;
            if drive.drive_id != id {
                return Err(RouteError::IdMismatch);
            }
            ApiRequest::PutDrive(drive)
        }
        (Method::Patch, "drives", _) => {
            let id = checked_id(id)?;
            needs_body(RouteError::EmptyPatch)?;
            let update: PartialDrive = json(body)?;
            if update.drive_id != id {
                return Err(RouteError::IdMismatch);
            }
            ApiRequest::PatchDrive(update)
        }
        (Method::Put, "network-interfaces", _) => {
            let id = checked_id(id)?;
            needs_body(RouteError::EmptyPut)?;
            let iface: NetConfig = json(body)?;
            if iface.iface_id != id {
                return Err(RouteError::IfaceIdMismatch {
                    path: id.into(),
                    body: iface.iface_id,
                });
            }
            ApiRequest::PutNetworkInterface(iface)
        }
        (Method::Patch, "network-interfaces", _) => {
            let id = checked_id(id)?;
            needs_body(RouteError::EmptyPatch)?;
            let update: PartialNetworkInterface = json(body)?;
            if update.iface_id != id {
                return Err(RouteError::IfaceIdMismatch {
                    path: id.into(),
                    body: update.iface_id,
                });
            }
            ApiRequest::PatchNetworkInterface(update)
        }
        (Method::Put, "logger", None) => {
            needs_body(RouteError::EmptyPut)?;
            ApiRequest::PutLogger(json(body)?)
        }
        (Method::Put, "metrics", None) => {
            needs_body(RouteError::EmptyPut)?;
            ApiRequest::PutMetrics(json(body)?)
        }
        (Method::Put, "serial", None) => {
            needs_body(RouteError::EmptyPut)?;
            ApiRequest::PutSerial(json::<SerialConfig>(body)?)
        }
        (Method::Patch, "vm", None) => {
            needs_body(RouteError::EmptyPatch)?;
            ApiRequest::PatchVmState(json::<VmStateBody>(body)?.state)
        }
        (Method::Put, "entropy", None) => {
            needs_body(RouteError::EmptyPut)?;
            ApiRequest::PutEntropy(json(body)?)
        }
        (Method::Put, "vsock", None) => {
            needs_body(RouteError::EmptyPut)?;
            ApiRequest::PutVsock(json(body)?)
        }
        _ => return Err(invalid()),
    };
    Ok(request)
}

fn is_get_path(resource: &str, id: Option<&str>) -> bool {
    matches!(
        (resource, id),
        ("", None) | ("version", None) | ("machine-config", None) | ("vm", Some("config"))
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::api::types::{ActionType, HugePages, LogLevel, VmStateRequest};
    use crate::config::CacheType;

    fn ok(method: Method, path: &str, body: &str) -> ApiRequest {
        match parse(&method, path, body.as_bytes()) {
            Ok(r) => r,
            Err(e) => panic!("{method} {path} {body}: {e}"),
        }
    }

    fn err(method: Method, path: &str, body: &str) -> String {
        match parse(&method, path, body.as_bytes()) {
            Ok(r) => panic!("{method} {path} {body} parsed as {r:?}"),
            Err(e) => {
                assert_eq!(ApiResponse::from(RouteError::EmptyId).status, 400);
                e.to_string()
            }
        }
    }

    #[test]
    fn gets() {
        assert_eq!(ok(Method::Get, "/", ""), ApiRequest::GetInstanceInfo);
        assert_eq!(ok(Method::Get, "/version", ""), ApiRequest::GetVersion);
        assert_eq!(
            ok(Method::Get, "/machine-config", ""),
            ApiRequest::GetMachineConfig
        );
        assert_eq!(
            ok(Method::Get, "/machine-config/", ""),
            ApiRequest::GetMachineConfig
        );
        assert_eq!(ok(Method::Get, "/vm/config", ""), ApiRequest::GetVmConfig);
        assert_eq!(
            err(Method::Get, "/version", "{}"),
            "GET request cannot have a body."
        );
    }

    #[test]
    fn boot_source() {
        let r = ok(
            Method::Put,
            "/boot-source",
            r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0","initrd_path":"/i"}"#,
        );
        let ApiRequest::PutBootSource(b) = r else {
            panic!("{r:?}")
        };
        assert_eq!(b.kernel_image_path, PathBuf::from("/k"));
        assert_eq!(b.initrd_path, Some(PathBuf::from("/i")));
        let e = err(Method::Put, "/boot-source", r#"{"boot_args":"x"}"#);
        assert!(e.contains("missing field `kernel_image_path`"), "{e}");
        assert_eq!(err(Method::Put, "/boot-source", ""), "Empty PUT request.");
    }

    #[test]
    fn machine_config() {
        let r = ok(
            Method::Put,
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":1024,"smt":false,"track_dirty_pages":true,"huge_pages":"None","cpu_template":"None"}"#,
        );
        let ApiRequest::PutMachineConfig(m) = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            (m.vcpu_count, m.mem_size_mib, m.track_dirty_pages),
            (2, 1024, true)
        );
        assert_eq!(m.huge_pages, HugePages::None);
        let e = err(Method::Put, "/machine-config", r#"{"vcpu_count":2}"#);
        assert!(e.contains("missing field `mem_size_mib`"), "{e}");
        let e = err(
            Method::Put,
            "/machine-config",
            r#"{"vcpu_count":"2","mem_size_mib":1}"#,
        );
        assert!(e.contains("invalid type"), "{e}");
        let e = err(
            Method::Put,
            "/machine-config",
            r#"{"vcpu_count":300,"mem_size_mib":1}"#,
        );
        assert!(e.contains("300"), "{e}");
        let e = err(
            Method::Put,
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":1,"huge_pages":"7M"}"#,
        );
        assert!(e.contains("7M"), "{e}");

        let r = ok(Method::Patch, "/machine-config", r#"{"vcpu_count":4}"#);
        let ApiRequest::PatchMachineConfig(u) = r else {
            panic!("{r:?}")
        };
        assert_eq!(u.vcpu_count, Some(4));
        assert_eq!(
            err(Method::Patch, "/machine-config", "{}"),
            "Empty PATCH request."
        );
        assert_eq!(
            err(Method::Patch, "/machine-config", ""),
            "Empty PATCH request."
        );
    }

    #[test]
    fn drives() {
        let r = ok(
            Method::Put,
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/img","is_root_device":true,"is_read_only":false,
                "cache_type":"Unsafe","io_engine":"Sync","rate_limiter":{"bandwidth":{"size":1,"refill_time":1}}}"#,
        );
        let ApiRequest::PutDrive(d) = r else {
            panic!("{r:?}")
        };
        assert!(d.is_root_device);
        assert_eq!(d.cache_type, CacheType::Unsafe);
        assert_eq!(
            err(
                Method::Put,
                "/drives/other",
                r#"{"drive_id":"rootfs","path_on_host":"/img","is_root_device":false}"#
            ),
            "The id from the path does not match the id from the body!"
        );
        assert_eq!(
            err(Method::Put, "/drives/", "{}"),
            "The ID cannot be empty."
        );
        assert_eq!(err(Method::Put, "/drives", "{}"), "The ID cannot be empty.");
        assert_eq!(
            err(Method::Put, "/drives/a-b", "{}"),
            "API Resource IDs can only contain alphanumeric characters and underscores."
        );
        let e = err(
            Method::Put,
            "/drives/x",
            r#"{"drive_id":"x","path_on_host":"/i","is_root_device":false,"bogus":1}"#,
        );
        assert!(e.contains("unknown field `bogus`"), "{e}");
        // Firecracker requires is_root_device and knows two engines.
        let e = err(
            Method::Put,
            "/drives/x",
            r#"{"drive_id":"x","path_on_host":"/i"}"#,
        );
        assert!(e.contains("missing field `is_root_device`"), "{e}");
        let e = err(
            Method::Put,
            "/drives/x",
            r#"{"drive_id":"x","path_on_host":"/i","is_root_device":false,"io_engine":"Fast"}"#,
        );
        assert!(
            e.contains("unknown variant `Fast`, expected `Sync` or `Async`"),
            "{e}"
        );
        let r = ok(
            Method::Put,
            "/drives/x",
            r#"{"drive_id":"x","path_on_host":"/i","is_root_device":false,"io_engine":"Async",
                "socket":"/s"}"#,
        );
        let ApiRequest::PutDrive(d) = r else {
            panic!("{r:?}")
        };
        assert_eq!(d.cache_type, CacheType::Unsafe);
        assert_eq!(d.socket.as_deref(), Some("/s"));
        let e = err(
            Method::Put,
            "/drives/x",
            r#"{"drive_id":"x","path_on_host":"/i","is_root_device":false,
                "rate_limiter":{"bandwidth":{"size":"1","refill_time":1}}}"#,
        );
        assert!(e.contains("invalid type: string"), "{e}");
        let e = err(
            Method::Put,
            "/drives/x",
            r#"{"drive_id":"x","path_on_host":"/i","is_root_device":false,"is_read_only":"yes"}"#,
        );
        assert!(e.contains("invalid type"), "{e}");
        let e = err(Method::Put, "/drives/x", "not json");
        assert!(
            e.starts_with("An error occurred when deserializing the json body of a request: "),
            "{e}"
        );
        assert!(err(Method::Put, "/drives/x/y", "{}")
            .starts_with("Invalid request method and/or path: PUT drives/x/y."));

        let r = ok(
            Method::Patch,
            "/drives/x",
            r#"{"drive_id":"x","path_on_host":"/new"}"#,
        );
        assert_eq!(
            r,
            ApiRequest::PatchDrive(PartialDrive {
                drive_id: "x".into(),
                path_on_host: Some("/new".into()),
                rate_limiter: None
            })
        );
        let r = ok(
            Method::Patch,
            "/drives/x",
            r#"{"drive_id":"x","rate_limiter":{"ops":{"size":5,"refill_time":100,"one_time_burst":10}}}"#,
        );
        let ApiRequest::PatchDrive(p) = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            p.rate_limiter
                .and_then(|r| r.ops)
                .and_then(|b| b.one_time_burst),
            Some(10)
        );
        let e = err(
            Method::Patch,
            "/drives/x",
            r#"{"drive_id":"x","rate_limiter":{"bandwidth":{"size":1}}}"#,
        );
        assert!(e.contains("missing field `refill_time`"), "{e}");
        let e = err(
            Method::Patch,
            "/drives/x",
            r#"{"drive_id":"x","is_read_only":true}"#,
        );
        assert!(e.contains("unknown field `is_read_only`"), "{e}");
        assert_eq!(
            err(Method::Patch, "/drives/y", r#"{"drive_id":"x"}"#),
            "The id from the path does not match the id from the body!"
        );
        assert_eq!(err(Method::Patch, "/drives/y", ""), "Empty PATCH request.");
    }

    #[test]
    fn network_interfaces() {
        let r = ok(
            Method::Put,
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:AC:10:00:02"}"#,
        );
        let ApiRequest::PutNetworkInterface(n) = r else {
            panic!("{r:?}")
        };
        assert_eq!(n.host_dev_name, "tap0");
        assert_eq!(
            err(
                Method::Put,
                "/network-interfaces/eth1",
                r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#
            ),
            "The id from the path [eth1] does not match the id from the body [eth0]!"
        );
        let r = ok(
            Method::Put,
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","host_dev_name":"tap0","mtu":9000,
                "rx_rate_limiter":{"bandwidth":{"size":1000,"refill_time":100}}}"#,
        );
        let ApiRequest::PutNetworkInterface(n) = r else {
            panic!("{r:?}")
        };
        assert_eq!(n.mtu, Some(9000));
        assert_eq!(
            n.rx_rate_limiter.and_then(|r| r.bandwidth).map(|b| b.size),
            Some(1000)
        );
        let e = err(
            Method::Put,
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","host_dev_name":"tap0","mtu":65536}"#,
        );
        assert!(e.contains("expected u16"), "{e}");
        let e = err(
            Method::Patch,
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","tx_rate_limiter":{"ops":{"size":-5,"refill_time":1}}}"#,
        );
        assert!(e.contains("-5"), "{e}");
        let e = err(
            Method::Put,
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0"}"#,
        );
        assert!(e.contains("missing field `host_dev_name`"), "{e}");
        let r = ok(
            Method::Patch,
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","rx_rate_limiter":{}}"#,
        );
        assert!(matches!(r, ApiRequest::PatchNetworkInterface(_)));
    }

    #[test]
    fn actions() {
        for (name, action) in [
            ("InstanceStart", ActionType::InstanceStart),
            ("SendCtrlAltDel", ActionType::SendCtrlAltDel),
            ("FlushMetrics", ActionType::FlushMetrics),
        ] {
            let body = format!(r#"{{"action_type":"{name}"}}"#);
            assert_eq!(
                ok(Method::Put, "/actions", &body),
                ApiRequest::Action(action)
            );
        }
        let e = err(Method::Put, "/actions", r#"{"action_type":"Reboot"}"#);
        assert!(e.contains("unknown variant `Reboot`"), "{e}");
        let e = err(Method::Put, "/actions", r#"{"action_type":3}"#);
        assert!(
            e.contains("invalid type: integer `3`, expected a string"),
            "{e}"
        );
        assert_eq!(err(Method::Put, "/actions", ""), "Empty PUT request.");
    }

    #[test]
    fn logger_and_metrics() {
        let r = ok(
            Method::Put,
            "/logger",
            r#"{"log_path":"/log","level":"Info","show_level":true,"show_log_origin":false,"module":"vmm"}"#,
        );
        let ApiRequest::PutLogger(l) = r else {
            panic!("{r:?}")
        };
        assert_eq!(l.level, Some(LogLevel::Info));
        assert_eq!(l.module.as_deref(), Some("vmm"));
        let r = ok(Method::Put, "/metrics", r#"{"metrics_path":"/m"}"#);
        let ApiRequest::PutMetrics(m) = r else {
            panic!("{r:?}")
        };
        assert_eq!(m.metrics_path, PathBuf::from("/m"));
        let e = err(Method::Put, "/metrics", r#"{}"#);
        assert!(e.contains("missing field `metrics_path`"), "{e}");
    }

    #[test]
    fn wrong_methods_and_unknown_paths() {
        assert_eq!(
            err(Method::Get, "/nope", ""),
            "Invalid request method and/or path: GET nope."
        );
        assert_eq!(
            err(Method::Put, "/version", "{}"),
            "Invalid request method and/or path: PUT version."
        );
        assert_eq!(
            err(Method::Get, "/boot-source", ""),
            "Invalid request method and/or path: GET boot-source."
        );
        assert_eq!(
            err(Method::Patch, "/actions", "{}"),
            "Invalid request method and/or path: PATCH actions."
        );
        assert_eq!(
            err(Method::Other("DELETE".into()), "/drives/x", ""),
            "Invalid request method and/or path: DELETE drives/x."
        );
        assert_eq!(
            err(Method::Get, "/drives/x", ""),
            "Invalid request method and/or path: GET drives/x."
        );
        assert_eq!(
            err(Method::Get, "/vm/other", ""),
            "Invalid request method and/or path: GET vm/other."
        );
        assert!(err(Method::Put, "/snapshot/create", "{}")
            .contains("does not implement Firecracker's /snapshot endpoint"));
        assert!(err(Method::Put, "/balloon", "{}").contains("/balloon endpoint"));
    }

    #[test]
    fn vm_state_and_serial() {
        assert_eq!(
            ok(Method::Patch, "/vm", r#"{"state":"Paused"}"#),
            ApiRequest::PatchVmState(VmStateRequest::Paused)
        );
        assert_eq!(
            ok(Method::Patch, "/vm", r#"{"state":"Resumed"}"#),
            ApiRequest::PatchVmState(VmStateRequest::Resumed)
        );
        let e = err(Method::Patch, "/vm", r#"{"state":"Stopped"}"#);
        assert!(e.contains("unknown variant `Stopped`"), "{e}");
        assert_eq!(err(Method::Patch, "/vm", ""), "Empty PATCH request.");
        let r = ok(
            Method::Put,
            "/serial",
            r#"{"serial_out_path":"/tmp/console.log","rate_limiter":{"size":100,"refill_time":10}}"#,
        );
        let ApiRequest::PutSerial(s) = r else {
            panic!("{r:?}")
        };
        assert_eq!(s.serial_out_path, Some(PathBuf::from("/tmp/console.log")));
        assert_eq!(s.rate_limiter.map(|b| b.size), Some(100));
        assert!(err(Method::Put, "/serial", r#"{"out":"/x"}"#).contains("unknown field `out`"));
    }

    #[test]
    fn bodies_must_be_objects() {
        for (method, path, body) in [
            (Method::Put, "/actions", r#"["InstanceStart"]"#),
            (Method::Patch, "/machine-config", "[]"),
            (Method::Put, "/machine-config", " \n [1, 128]"),
            (Method::Put, "/drives/a", r#"["a","/x",false]"#),
            (Method::Put, "/metrics", r#"["/m"]"#),
        ] {
            let e = err(method, path, body);
            assert!(
                e.contains("invalid type: sequence, expected a JSON object"),
                "{path} {body}: {e}"
            );
        }
        let e = err(Method::Put, "/actions", "3");
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn metrics_ignore_unknown_fields_as_firecracker_does() {
        let r = ok(
            Method::Put,
            "/metrics",
            r#"{"metrics_path":"/m","emit_id":true,"properties":{"a":"b"}}"#,
        );
        assert!(matches!(r, ApiRequest::PutMetrics(_)));
    }
}
