//! The virtio-vsock device's configuration, as Firecracker's `PUT /vsock`
//! takes it, `--vsock cid=N,uds=PATH` writes it and a config file's
//! `vsock` section holds it; with its checks.
//!
//! The host side is Firecracker's hybrid vsock: ringvm listens on
//! `uds_path` for host-initiated connections (`CONNECT <port>\n`), and a
//! guest connection to host port P goes to the Unix socket `<uds_path>_P`
//! (see `devices/src/virtio/vsock`).

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::OptionError;

/// `PUT /vsock`'s body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Firecracker's deprecated device id: accepted and echoed, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's context id (3 or more: 0-2 are reserved).
    pub guest_cid: u32,
    /// The Unix socket ringvm listens on; it must not exist yet.
    pub uds_path: PathBuf,
}

/// Longest `uds_path`: a Unix socket address holds 107 bytes, and the
/// guest-initiated `<uds_path>_<port>` adds up to 11.
pub const MAX_UDS_PATH: usize = 107 - 11;

/// Why a vsock configuration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VsockConfigError {
    /// A reserved context id.
    #[error("Invalid vsock config: guest_cid {0} is reserved; use 3 or more")]
    Cid(u32),
    /// No socket path.
    #[error("Invalid vsock config: uds_path is empty")]
    NoPath,
    /// A socket path too long for a Unix socket address.
    #[error("Invalid vsock config: uds_path is {0} bytes; at most {MAX_UDS_PATH} fit a Unix socket address with the _PORT suffix")]
    LongPath(usize),
}

impl VsockConfig {
    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), VsockConfigError> {
        if u64::from(self.guest_cid) < devices::virtio::vsock::MIN_GUEST_CID {
            return Err(VsockConfigError::Cid(self.guest_cid));
        }
        let len = self.uds_path.as_os_str().as_bytes().len();
        if len == 0 {
            return Err(VsockConfigError::NoPath);
        }
        if len > MAX_UDS_PATH {
            return Err(VsockConfigError::LongPath(len));
        }
        Ok(())
    }

    /// Checks the socket can be made, as Firecracker does at `PUT /vsock`:
    /// binds `uds_path` and removes it again (the VMM binds it anew when it
    /// builds the device). The error is the client's `fault_message`.
    pub fn check_host(&self) -> Result<(), String> {
        match std::os::unix::net::UnixListener::bind(&self.uds_path) {
            Ok(listener) => {
                drop(listener);
                let _ = std::fs::remove_file(&self.uds_path);
                Ok(())
            }
            Err(e) => Err(format!(
                "Cannot create backend for vsock device: Error binding to the host-side Unix \
                 socket {}: {e}",
                self.uds_path.display()
            )),
        }
    }
}

impl std::str::FromStr for VsockConfig {
    type Err = OptionError;

    /// Parses `cid=N,uds=PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cfg = VsockConfig::default();
        let mut cid = None;
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            match key {
                "cid" => {
                    cid = Some(value.parse().map_err(|_| OptionError::BadValue {
                        key: key.into(),
                        value: value.into(),
                    })?)
                }
                "uds" => cfg.uds_path = PathBuf::from(value),
                other => return Err(OptionError::UnknownKey(other.into())),
            }
        }
        cfg.guest_cid = cid.ok_or(OptionError::Missing("cid"))?;
        if cfg.uds_path.as_os_str().is_empty() {
            return Err(OptionError::Missing("uds"));
        }
        cfg.validate().map_err(|e| OptionError::BadValue {
            key: "vsock".into(),
            value: e.to_string(),
        })?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_options_parse_and_are_checked() {
        let v: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().expect("parse");
        assert_eq!(v.guest_cid, 3);
        assert_eq!(v.uds_path, PathBuf::from("/tmp/v.sock"));
        assert_eq!(
            "uds=/x".parse::<VsockConfig>(),
            Err(OptionError::Missing("cid"))
        );
        assert_eq!(
            "cid=3".parse::<VsockConfig>(),
            Err(OptionError::Missing("uds"))
        );
        assert!("cid=2,uds=/x".parse::<VsockConfig>().is_err());
        assert!("cid=x,uds=/x".parse::<VsockConfig>().is_err());
        assert!("cid=3,uds=/x,port=1".parse::<VsockConfig>().is_err());
        let long = format!("cid=3,uds=/{}", "a".repeat(MAX_UDS_PATH));
        assert!(long.parse::<VsockConfig>().is_err());
    }

    #[test]
    fn json_is_firecrackers_with_the_deprecated_id() {
        let v: VsockConfig =
            serde_json::from_str(r#"{"vsock_id":"vsock0","guest_cid":3,"uds_path":"/v.sock"}"#)
                .expect("json");
        assert_eq!(v.vsock_id.as_deref(), Some("vsock0"));
        assert!(serde_json::from_str::<VsockConfig>(r#"{"guest_cid":3}"#).is_err());
        assert!(
            serde_json::from_str::<VsockConfig>(r#"{"guest_cid":-1,"uds_path":"/v"}"#).is_err()
        );
        assert!(
            serde_json::from_str::<VsockConfig>(r#"{"guest_cid":3,"uds_path":"/v","x":1}"#)
                .is_err()
        );
        let back = serde_json::to_value(&v).expect("json");
        assert_eq!(back["guest_cid"], 3);
    }

    #[test]
    fn the_host_check_binds_and_cleans_up() {
        let dir = vmm_sys_util::tempdir::TempDir::new().expect("dir");
        let v = VsockConfig {
            guest_cid: 3,
            uds_path: dir.as_path().join("v.sock"),
            vsock_id: None,
        };
        assert_eq!(v.check_host(), Ok(()));
        assert!(!v.uds_path.exists());
        std::fs::write(&v.uds_path, b"").expect("file");
        let e = v.check_host().expect_err("exists");
        assert!(
            e.starts_with("Cannot create backend for vsock device"),
            "{e}"
        );
    }
}
