//! `--disk` and `--net` option strings from a hostile command line: any
//! text (mostly `key=value` lists with the keys ringvm knows) through
//! their parsers; what parses must make sense, and a VM built from it must
//! validate or be refused with an error, never a panic.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmm::cmdline;
use vmm::config::{BootSource, DriveConfig, NetConfig, VmConfig};

const KEYS: &[&str] = &[
    "path", "id", "ro", "readonly", "root", "direct", "cache", "tap", "mac",
];
const VALUES: &[&str] = &[
    "on",
    "off",
    "true",
    "false",
    "1",
    "0",
    "yes",
    "no",
    "unsafe",
    "writeback",
    "/dev/null",
    "tap0",
    "02:00:00:00:00:01",
    "rootfs",
    "",
];

#[derive(Arbitrary, Debug)]
enum Part {
    Known(u8, Option<u8>),
    KnownRaw(u8, String),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Opt {
    Raw(String),
    Parts(Vec<Part>),
}

impl Opt {
    fn text(&self) -> String {
        match self {
            Opt::Raw(s) => s.clone(),
            Opt::Parts(parts) => parts
                .iter()
                .map(|p| match p {
                    Part::Known(k, v) => {
                        let k = KEYS[usize::from(*k) % KEYS.len()];
                        match v {
                            Some(v) => format!("{k}={}", VALUES[usize::from(*v) % VALUES.len()]),
                            None => k.to_string(),
                        }
                    }
                    Part::KnownRaw(k, v) => format!("{}={v}", KEYS[usize::from(*k) % KEYS.len()]),
                    Part::Raw(s) => s.clone(),
                })
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

fuzz_target!(|opts: Vec<(bool, Opt)>| {
    let mut config = VmConfig {
        boot_source: BootSource {
            kernel_image_path: "/vmlinux".into(),
            ..BootSource::default()
        },
        ..VmConfig::default()
    };
    for (net, opt) in opts.iter().take(16) {
        let text = opt.text();
        if *net {
            if let Ok(n) = text.parse::<NetConfig>() {
                assert!(!n.host_dev_name.is_empty(), "{text:?} parsed without a tap");
                config.network_interfaces.push(n);
            }
        } else if let Ok(d) = text.parse::<DriveConfig>() {
            assert!(
                !d.path_on_host.as_os_str().is_empty(),
                "{text:?} parsed without a path"
            );
            config.drives.push(d);
        }
    }
    // Unnamed devices get ids as main.rs gives them.
    for (i, d) in config.drives.iter_mut().enumerate() {
        if d.drive_id.is_empty() {
            d.drive_id = format!("drive{i}");
        }
    }
    for (i, n) in config.network_interfaces.iter_mut().enumerate() {
        if n.iface_id.is_empty() {
            n.iface_id = format!("eth{i}");
        }
    }
    if config.validate().is_ok() {
        let root = cmdline::root_param(&config);
        let extra: Vec<&str> = root.iter().map(String::as_str).collect();
        let _ = cmdline::compose_cmdline(config.base_cmdline(), &extra);
    }
});
