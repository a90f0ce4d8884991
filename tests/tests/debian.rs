//! A distribution kernel as a test subject: Debian's own cloud kernel
//! (`make debian-kernel`: linux-image-cloud-amd64 from apt, with a small
//! initramfs of its virtio modules and busybox), booted by ringvm with
//! `--acpi on`. That kernel has no `virtio_mmio.device=` parameter and no MP
//! table parser: it finds ringvm's CPUs and devices only through the ACPI
//! tables, so this is the end-to-end proof that they describe the machine.
//!
//! How far it gets depends on the host, and the test asserts exactly that:
//!
//! - real KVM: all the way. The kernel reads the tables, brings up both
//!   vCPUs, runs the initramfs's /init, which loads the modules; the drive
//!   (vda, found as an ACPI `LNRO0005` device) is mounted, and `poweroff
//!   -f` ends ringvm with 0 through ACPI.
//! - PVM-native KVM (guest code in KVM's instruction emulator, about 1.6 us
//!   an instruction): ringvm's pvm-safe template gets the unpatched kernel
//!   through the instructions the emulator cannot run (the alternatives
//!   `int3` self-test, the `fwait` of every thread exit). The test follows
//!   it through the ACPI tables, the MADT, the bring-up of both vCPUs and
//!   the ACPI interpreter loading ringvm's DSDT with S5 (power-off)
//!   supported, and on until the emulator meets an instruction nobody
//!   finishes for it: `ldmxcsr` (0f ae /2, in the kernel's
//!   `kernel_fpu_begin`), where ringvm stops with exit 5 and names the
//!   bytes. That is as far as this kernel gets here (about 90 s of guest
//!   time; see resources/guest/README.md).

use std::time::Duration;

use ringvm_tests::{guest_dir, kvm_available, run_ringvm, Scratch};

const BOOT_DEADLINE: Duration = Duration::from_secs(900);

fn debian_dir() -> std::path::PathBuf {
    std::env::var_os("RINGVM_DEBIAN_KERNEL_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| ringvm_tests::workspace_root().join("target/debian-kernel"))
}

fn host_is_pvm_native() -> bool {
    std::fs::read_to_string("/sys/module/kvm_pvm/parameters/pvm_native")
        .is_ok_and(|s| s.trim() == "Y")
}

fn value<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("DEBIAN: {key}=");
    console
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix.as_str()))
}

#[test]
fn debian_cloud_kernel_boots_as_far_as_the_host_allows() {
    let name = "debian_cloud_kernel_boots_as_far_as_the_host_allows";
    if !kvm_available(name) {
        return;
    }
    let dir = debian_dir();
    let file = |f: &str| {
        let p = dir.join(f);
        assert!(
            p.exists(),
            "{} missing: run `make debian-kernel`",
            p.display()
        );
        p.to_string_lossy().into_owned()
    };
    // On PVM-native KVM the ELF inside the bzImage, entered through PVH:
    // the in-guest LZ4 decompression alone would take minutes there. On
    // real KVM the bzImage as shipped, through the 64-bit boot protocol.
    let pvm = host_is_pvm_native();
    let kernel = file(if pvm { "vmlinux" } else { "vmlinuz" });
    let initrd = file("initramfs.cpio");
    let version = std::fs::read_to_string(file("version.txt")).unwrap_or_default();
    let scratch = Scratch::new("debian");
    let rootfs = scratch.file("rootfs.ext4");
    std::fs::copy(guest_dir().join("rootfs.ext4"), &rootfs)
        .expect("copy the test guest's rootfs.ext4 (run `make guest`)");
    let drive = format!("path={rootfs},id=debianroot,ro");
    // On PVM-native KVM, skip ftrace's boot-time scan of its ~40k call
    // sites through kallsyms (a workqueue job init waits for): emulated,
    // it takes many minutes and checks nothing ringvm provides.
    let cmdline = if pvm {
        "console=ttyS0 reboot=k panic=-1 initcall_blacklist=ftrace_check_for_weak_functions"
    } else {
        "console=ttyS0 reboot=k panic=-1"
    };
    let args = [
        "--kernel",
        &kernel,
        "--acpi",
        "on",
        "--initrd",
        &initrd,
        "--cpus",
        "2",
        "--mem",
        "512",
        "--disk",
        &drive,
        "--cmdline",
        cmdline,
    ];
    const ACPI_LOADED: &str = "ACPI: PM: (supports S0 S5)";
    let run = run_ringvm(&args, BOOT_DEADLINE);
    let t = run.transcript();
    assert!(!run.timed_out, "{t}");

    // The distribution kernel, described by ACPI only.
    assert!(
        run.stdout.contains("Linux version 6.1") && run.stdout.contains("cloud-amd64"),
        "not Debian's cloud kernel ({version})\n{t}"
    );
    for line in [
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: DSDT",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "smp: Brought up 1 node, 2 CPUs",
        "ACPI: 1 ACPI AML tables successfully acquired and loaded",
        ACPI_LOADED,
    ] {
        assert!(run.stdout.contains(line), "no {line:?}\n{t}");
    }
    assert!(!run.stdout.contains("virtio_mmio.device="), "{t}");
    assert!(!run.stdout.contains("ACPI Error"), "{t}");

    if pvm {
        // The end here: an `ldmxcsr` the emulator cannot run, reported
        // with its bytes and exit 5 (the guest broke a vCPU).
        assert_eq!(run.code, Some(5), "{t}");
        assert!(run.stderr.contains("emulation failure"), "{t}");
        assert!(
            run.stderr.contains("instruction bytes at RIP: [0f ae 54"),
            "not the ldmxcsr this kernel ends at here\n{t}"
        );
        eprintln!(
            "{name}: PVM-native KVM: Debian's kernel ({}) read the ACPI tables, brought up \
             both vCPUs through the MADT, loaded the DSDT with S5 and ran until an ldmxcsr \
             the emulator cannot run, in {:.0} s",
            version.lines().next().unwrap_or("?"),
            run.elapsed.as_secs_f64()
        );
        return;
    }

    // Real KVM: user space, the modules and the drive.
    assert!(run.stdout.contains("Run /init as init process"), "{t}");
    assert!(run.stdout.contains("DEBIAN: init start"), "{t}");
    assert!(
        !run.stdout.contains("DEBIAN: insmod"),
        "a module failed\n{t}"
    );
    assert_eq!(value(&run.stdout, "nproc"), Some("2"), "{t}");
    assert_eq!(value(&run.stdout, "disks"), Some("/sys/block/vda"), "{t}");
    assert!(
        run.stdout
            .contains("DEBIAN: root drive mounted, /init present"),
        "{t}"
    );
    assert!(run.stdout.contains("DEBIAN: DONE"), "{t}");
    assert!(
        run.stderr.contains("guest powered off through ACPI (S5)"),
        "{t}"
    );
    assert_eq!(run.code, Some(0), "{t}");
}
