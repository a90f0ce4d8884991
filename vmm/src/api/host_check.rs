//! The host resources a configuration request names, checked when the
//! request arrives, as Firecracker checks them: `PUT /boot-source` opens
//! the kernel and initrd, `PUT /drives` opens the backing file as the
//! drive will use it, `PUT /network-interfaces` attaches to the tap. A
//! typo is then a 400 on the request that made it, not a failed
//! `InstanceStart` later. The files are closed again at once; the VMM
//! opens them anew when it builds the VM.
//!
//! Behind a trait so the controller's rules are tested without files.

use std::fs::File;
use std::path::Path;

use crate::config::{DriveConfig, NetConfig};

/// Opens what a request names; each error is the `fault_message` the
/// client gets, worded as Firecracker words it.
pub trait HostCheck: Send + std::fmt::Debug {
    /// `PUT /boot-source`: the kernel image.
    fn kernel(&self, path: &Path) -> Result<(), String>;
    /// `PUT /boot-source`: the initrd.
    fn initrd(&self, path: &Path) -> Result<(), String>;
    /// `PUT /drives`: the backing file, read-write unless read-only.
    fn drive(&self, drive: &DriveConfig) -> Result<(), String>;
    /// `PUT /network-interfaces`: the tap.
    fn tap(&self, iface: &NetConfig) -> Result<(), String>;
    /// `PUT /vsock`: the socket can be listened on.
    fn vsock(&self, vsock: &crate::vsock::VsockConfig) -> Result<(), String> {
        vsock.check_host()
    }
}

/// The real host.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostFiles;

impl HostCheck for HostFiles {
    fn kernel(&self, path: &Path) -> Result<(), String> {
        File::open(path)
            .map(drop)
            .map_err(|e| format!("Boot source error: The kernel file cannot be opened: {e}"))
    }

    fn initrd(&self, path: &Path) -> Result<(), String> {
        File::open(path).map(drop).map_err(|e| {
            format!(
                "Boot source error: The initrd file cannot be opened due to invalid path or \
                 invalid permissions. {e}"
            )
        })
    }

    fn drive(&self, drive: &DriveConfig) -> Result<(), String> {
        use crate::machine::builder::{open_backing_file, DeviceSetupError};
        match open_backing_file(drive) {
            Ok(_) => Ok(()),
            Err(DeviceSetupError::OpenDrive { path, source, .. }) => Err(format!(
                "Drive config error: Unable to create the virtio block device: Virtio backend \
                 error: Error manipulating the backing file: {source} {}",
                path.display()
            )),
            Err(e) => Err(format!(
                "Drive config error: Unable to create the virtio block device: {e}"
            )),
        }
    }

    /// Only attaches and detaches: the MTU is set when the VM is built.
    fn tap(&self, iface: &NetConfig) -> Result<(), String> {
        devices::virtio::net::TapDevice::open(&iface.host_dev_name)
            .map(drop)
            .map_err(|e| {
                format!(
                    "Network config error: Could not create the network device: Open tap device \
                     failed: {e}"
                )
            })
    }
}

/// A host where every file and tap exists: for tests of the API that are
/// not about files.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AcceptAll;

#[cfg(test)]
impl HostCheck for AcceptAll {
    fn kernel(&self, _: &Path) -> Result<(), String> {
        Ok(())
    }
    fn initrd(&self, _: &Path) -> Result<(), String> {
        Ok(())
    }
    fn drive(&self, _: &DriveConfig) -> Result<(), String> {
        Ok(())
    }
    fn tap(&self, _: &NetConfig) -> Result<(), String> {
        Ok(())
    }
    fn vsock(&self, _: &crate::vsock::VsockConfig) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named_as_firecracker_names_them() {
        let missing = Path::new("/nonexistent/ringvm-host-check");
        let e = HostFiles.kernel(missing).unwrap_err();
        assert!(
            e.starts_with("Boot source error: The kernel file cannot be opened: No such file"),
            "{e}"
        );
        let e = HostFiles.initrd(missing).unwrap_err();
        assert!(e.contains("The initrd file cannot be opened"), "{e}");
        let drive = DriveConfig {
            drive_id: "d".into(),
            path_on_host: missing.into(),
            ..DriveConfig::default()
        };
        let e = HostFiles.drive(&drive).unwrap_err();
        assert!(
            e.starts_with("Drive config error: Unable to create the virtio block device: ")
                && e.ends_with("/nonexistent/ringvm-host-check"),
            "{e}"
        );
        assert_eq!(HostFiles.kernel(Path::new("/proc/self/stat")), Ok(()));
        let ro = DriveConfig {
            path_on_host: "/proc/self/stat".into(),
            is_read_only: true,
            ..drive
        };
        assert_eq!(HostFiles.drive(&ro), Ok(()));
        let iface = NetConfig {
            iface_id: "eth0".into(),
            host_dev_name: "ringvm-no-such-tap".into(),
            ..NetConfig::default()
        };
        let e = HostFiles.tap(&iface).unwrap_err();
        assert!(e.starts_with("Network config error: "), "{e}");
    }
}
