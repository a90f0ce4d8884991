//! The kernel command line ringvm hands the guest: the user's words, then
//! ringvm's own (devices, root drive, CPU-template parameters), always
//! before a " -- ", after which everything is init's.

use crate::config::VmConfig;

/// Adds ringvm's parameters to the user's command line, before any
/// " -- " (what follows it is init's arguments, not the kernel's).
pub fn compose_cmdline(user: &str, extra: &[&str]) -> String {
    let (kernel_part, init_part) = match user.find(" -- ") {
        Some(at) => (&user[..at], Some(&user[at + 4..])),
        None if user.starts_with("-- ") => ("", Some(&user[3..])),
        None => (user, None),
    };
    let mut words: Vec<&str> = vec![kernel_part.trim()];
    words.extend(extra.iter().copied());
    let mut out = words
        .into_iter()
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(init) = init_part {
        out.push_str(" -- ");
        out.push_str(init);
    }
    out
}

/// The `root=` parameter for the drive marked as root: by PARTUUID when
/// given, else `/dev/vdX` by its position among the drives.
pub fn root_param(config: &VmConfig) -> Option<String> {
    let (index, drive) = config
        .drives
        .iter()
        .enumerate()
        .find(|(_, d)| d.is_root_device)?;
    let mode = if drive.is_read_only { "ro" } else { "rw" };
    Some(match &drive.partuuid {
        Some(uuid) => format!("root=PARTUUID={uuid} {mode}"),
        None => format!("root=/dev/vd{} {mode}", disk_letters(index)),
    })
}

/// Linux's virtio-blk names: vda..vdz, then vdaa, vdab, ...
pub fn disk_letters(index: usize) -> String {
    let letter = |i: usize| char::from(b'a' + (i % 26) as u8);
    if index < 26 {
        letter(index).to_string()
    } else {
        format!("{}{}", letter(index / 26 - 1), letter(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ringvm_parameters_go_before_init_arguments() {
        assert_eq!(
            compose_cmdline("console=ttyS0", &["a=1", "b"]),
            "console=ttyS0 a=1 b"
        );
        assert_eq!(
            compose_cmdline("console=ttyS0 -- echo hi -- there", &["a=1"]),
            "console=ttyS0 a=1 -- echo hi -- there"
        );
        assert_eq!(compose_cmdline("-- nproc", &["a=1"]), "a=1 -- nproc");
        assert_eq!(compose_cmdline("", &[]), "");
    }

    #[test]
    fn disks_are_named_like_linux_does() {
        assert_eq!(disk_letters(0), "a");
        assert_eq!(disk_letters(25), "z");
        assert_eq!(disk_letters(26), "aa");
        assert_eq!(disk_letters(27), "ab");
    }

    #[test]
    fn root_parameter_follows_the_root_drive() {
        let mut c = VmConfig::default();
        assert_eq!(root_param(&c), None);
        c.drives = vec![
            "path=/a,id=a".parse().unwrap(),
            "path=/b,id=b,root,ro".parse().unwrap(),
        ];
        assert_eq!(root_param(&c).as_deref(), Some("root=/dev/vdb ro"));
        c.drives[1].partuuid = Some("1234-01".into());
        c.drives[1].is_read_only = false;
        assert_eq!(root_param(&c).as_deref(), Some("root=PARTUUID=1234-01 rw"));
    }
}
