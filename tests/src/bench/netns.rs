//! A private network namespace for a benchmark's taps, so its frames
//! (link-local addresses only) never meet the host's own interfaces, and
//! one killed run cannot leave a namespace behind for good.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;

use super::Res;

/// Runs `program args...`; its stderr becomes the error.
pub fn run_cmd(program: &str, args: &[&str]) -> Res<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// A namespace made with `ip netns add`, its name deleted on drop (also on
/// error). The namespace itself goes when the last thread in it exits.
pub struct Netns {
    /// Its name under /var/run/netns.
    pub name: String,
}

impl Netns {
    /// `<prefix><pid>`, after deleting the stale ones of the same prefix
    /// whose process is gone (a run killed by a signal cannot clean up).
    pub fn create(prefix: &str) -> Res<Self> {
        clean_stale(prefix);
        let name = format!("{prefix}{}", std::process::id());
        run_cmd("ip", &["netns", "add", &name])?;
        Ok(Self { name })
    }

    /// Moves the calling thread (and every thread and child it starts
    /// afterwards) into the namespace.
    pub fn enter(&self) -> Res<()> {
        let path = format!("/var/run/netns/{}", self.name);
        let f = File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
        // SAFETY: setns on a namespace fd we just opened; it changes only
        // this thread's network namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "setns into {}: {}",
                self.name,
                io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// `ip -n <name> args...`.
    pub fn ip(&self, args: &[&str]) -> Res<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_cmd("ip", &all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_cmd("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}

/// Deletes `<prefix><pid>` namespaces whose process is gone.
fn clean_stale(prefix: &str) {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("deleting stale namespace {name}");
            let _ = run_cmd("ip", &["netns", "del", &name]);
        }
    }
}

/// A MAC as `ip` writes it.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
