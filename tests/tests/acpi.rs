//! The machine described by ACPI (`--acpi on`), on real Linux guests.
//!
//! One boot of the project's kernel with ACPI on: no `virtio_mmio.device=`
//! word reaches the kernel, yet it finds every drive and the NIC through
//! the DSDT (`LNRO0005` platform devices), every vCPU through the MADT,
//! and `poweroff -f` ends ringvm with 0 through the FADT's sleep register.
//! Two vCPUs on every host (on PVM-native KVM that needs the pvm-safe
//! template's hidden TSC-deadline timer; see README).
//! ACPI is the default; the test still says `--acpi on` so it keeps
//! meaning the same if the default changes. The fallback (`--acpi off`: command-line words, MP table, power-off by
//! halting) is `guest::poweroff_without_acpi_ends_ringvm_with_zero`.
//!
//! The NIC sits on a tap in a namespace of the test's own (link-local
//! addresses only); the guest only has to see it, no packet is sent.

use std::path::Path;
use std::time::{Duration, Instant};

use ringvm_tests::{
    guest_dir, guest_value, kvm_available, net_available, ringvm_bin, script_image, NetNs, Running,
    Scratch,
};

const BOOT_DEADLINE: Duration = Duration::from_secs(900);
const GUEST_MAC: &str = "02:00:00:0a:0c:0d";

fn guest_file(name: &str) -> String {
    let p = guest_dir().join(name);
    assert!(p.exists(), "{} missing: run `make guest`", p.display());
    p.to_string_lossy().into_owned()
}

/// What the guest prints about the devices it found, with shell builtins
/// only (every fork costs most of a second on PVM-native KVM): the kernel
/// command line, the ACPI platform devices and the virtio devices bound,
/// the drives, the data drive's serial and eth0's MAC.
const PROBE_SCRIPT: &str = "read -r c < /proc/cmdline; echo \"T: cmdline=$c\"\n\
     set -- /sys/bus/platform/devices/LNRO0005:*; echo \"T: lnro=$#\"\n\
     set -- /sys/bus/virtio/drivers/virtio_blk/virtio*; echo \"T: blk_bound=$#\"\n\
     set -- /sys/bus/virtio/drivers/virtio_net/virtio*; echo \"T: net_bound=$#\"\n\
     set -- /sys/block/vd*; echo \"T: disks=$*\"\n\
     read -r s < /sys/block/vdb/serial; echo \"T: serial=$s\"\n\
     read -r m < /sys/class/net/eth0/address; echo \"T: mac=$m\"";

/// 2 vCPUs, a root drive, a data drive, the script
/// drive and a NIC, `--acpi on`: the guest finds them all without command-line words
/// and powers off through ACPI; ringvm exits 0 right after.
#[test]
fn acpi_guest_finds_drives_nic_and_cpus_and_powers_off() {
    let name = "acpi_guest_finds_drives_nic_and_cpus_and_powers_off";
    if !kvm_available(name) || !net_available(name) {
        return;
    }
    let scratch = Scratch::new("acpi");
    let rootfs = scratch.file("rootfs.ext4");
    std::fs::copy(guest_file("rootfs.ext4"), &rootfs).expect("copy rootfs");
    let data = scratch.file("data.img");
    std::fs::write(&data, vec![0u8; 1 << 20]).expect("data image");
    let script = scratch.file("script.img");
    script_image(&script, PROBE_SCRIPT);
    let ns = NetNs::new("acpi");
    ns.add_tap("tap0", "169.254.11.1/24");

    let kernel = guest_file("vmlinux");
    let cpus = "2";
    let bin = ringvm_bin().to_string_lossy().into_owned();
    let root = format!("path={rootfs},id=rootfs,root");
    let data_disk = format!("path={data},id=acpidata");
    let script_disk = format!("path={script},id=script,ro");
    let net = format!("tap=tap0,mac={GUEST_MAC}");
    let args = ns.ringvm_args(
        &bin,
        &[
            "--kernel",
            &kernel,
            "--acpi",
            "on",
            "--cpus",
            cpus,
            "--disk",
            &root,
            "--disk",
            &data_disk,
            "--disk",
            &script_disk,
            "--net",
            &net,
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 guest.script=/dev/vdc guest.halt=poweroff",
        ],
    );
    let mut vm = Running::spawn(Path::new("ip"), &args);
    let asked = vm.wait_for("GUEST: halt poweroff", BOOT_DEADLINE);
    let asked_at = Instant::now();
    let run = vm.finish(BOOT_DEADLINE);
    let after_command = asked_at.elapsed();
    let t = run.transcript();
    assert!(asked, "the guest never reached its power-off\n{t}");
    assert!(!run.timed_out, "{t}");

    // The kernel read the tables ringvm wrote, and no device word.
    for line in ["ACPI: RSDP 0x00000000000E0000", "ACPI: FACP", "ACPI: DSDT"] {
        assert!(run.stdout.contains(line), "no {line:?}\n{t}");
    }
    assert!(
        run.stdout
            .contains("ACPI: Using ACPI (MADT) for SMP configuration"),
        "{t}"
    );
    let cmdline = guest_value(&run.stdout, "cmdline").unwrap_or_else(|| panic!("no cmdline\n{t}"));
    assert!(
        !cmdline.contains("virtio_mmio.device="),
        "ACPI on must not add device words: {cmdline}"
    );
    assert!(
        !run.stdout.contains("virtio_mmio.device="),
        "a device word reached the kernel\n{t}"
    );

    // Every vCPU, drive and the NIC, found through the DSDT and MADT.
    assert!(run.stdout.contains("smp: Brought up 1 node, 2 CPUs"), "{t}");
    assert!(
        run.stdout.contains(&format!("GUEST: nproc={cpus}")),
        "user space sees every vCPU\n{t}"
    );
    assert_eq!(guest_value(&run.stdout, "lnro"), Some("4"), "{t}");
    assert_eq!(guest_value(&run.stdout, "blk_bound"), Some("3"), "{t}");
    assert_eq!(guest_value(&run.stdout, "net_bound"), Some("1"), "{t}");
    assert_eq!(
        guest_value(&run.stdout, "disks"),
        Some("/sys/block/vda /sys/block/vdb /sys/block/vdc"),
        "{t}"
    );
    assert_eq!(guest_value(&run.stdout, "serial"), Some("acpidata"), "{t}");
    assert_eq!(guest_value(&run.stdout, "mac"), Some(GUEST_MAC), "{t}");

    // `poweroff -f` goes through the FADT's sleep control register.
    assert!(
        run.stderr.contains("guest powered off through ACPI (S5)"),
        "{t}"
    );
    assert_eq!(run.code, Some(0), "ACPI power-off must exit 0\n{t}");
    eprintln!(
        "acpi: ringvm exited {:.2} s after the guest announced `poweroff -f` \
         (that includes the guest's remount and the fork+exec of poweroff)",
        after_command.as_secs_f64()
    );
    assert!(
        after_command < Duration::from_secs(60),
        "power-off took {after_command:?}\n{t}"
    );
}
