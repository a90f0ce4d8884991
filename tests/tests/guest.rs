//! Real Linux guests under KVM, through the `ringvm` binary.
//!
//! A boot takes a minute or so on PVM-native KVM (guest code runs in KVM's
//! instruction emulator), so each boot checks many things and guest user
//! space does little: a few commands from a script drive. The tests run one
//! at a time (the Makefile passes `--test-threads=1`): two emulated guests
//! on two host cores would only slow each other down.

use std::time::Duration;

use ringvm_tests::{
    guest_dir, guest_value, kvm_available, pattern, run_ringvm, run_ringvm_signal_at,
    run_ringvm_until, script_image, tiny_initramfs, Scratch, VmRun,
};

const BOOT_DEADLINE: Duration = Duration::from_secs(900);
const MEM_MIB: u64 = 256;
const DATA_BYTES: usize = 8 << 20;
/// What the guest copies from the pattern drive to the data drive: a few
/// hundred KiB, in 64 KiB blocks.
const COPY_BLOCKS: usize = 6;
const COPY_BYTES: usize = COPY_BLOCKS * 64 * 1024;

fn guest_file(name: &str) -> String {
    let p = guest_dir().join(name);
    assert!(p.exists(), "{} missing: run `make guest`", p.display());
    p.to_string_lossy().into_owned()
}

/// A private copy of the root image: the guest mounts it read-write.
fn rootfs_copy(scratch: &Scratch) -> String {
    let dst = scratch.file("rootfs.ext4");
    std::fs::copy(guest_file("rootfs.ext4"), &dst).expect("copy rootfs");
    dst
}

fn disk(path: &str, extra: &str) -> String {
    format!("path={path}{extra}")
}

/// Parses the total from the kernel's "Memory: 230000K/262144K available".
fn memory_total_k(console: &str) -> Option<u64> {
    let line = console
        .lines()
        .find(|l| l.contains("Memory: ") && l.contains("K available"))?;
    let after = line.split("Memory: ").nth(1)?;
    let total = after.split('/').nth(1)?;
    total.split('K').next()?.trim().parse().ok()
}

fn guest_marker<'a>(run: &'a VmRun, key: &str) -> Option<&'a str> {
    let prefix = format!("GUEST: {key}=");
    run.stdout
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix.as_str()))
}

/// One boot with 2 vCPUs, 256 MiB, an ext4 root on a ringvm drive and four
/// more drives: the kernel's view of the machine, user space, the drive
/// serial, a pattern written by the guest and synced, a read-only drive
/// that refuses writes, and `reboot -f` ending ringvm with 0.
#[test]
fn linux_boots_from_an_ext4_drive_and_its_writes_reach_the_images() {
    if !kvm_available("linux_boots_from_an_ext4_drive_and_its_writes_reach_the_images") {
        return;
    }
    let scratch = Scratch::new("guest-main");
    let rootfs = rootfs_copy(&scratch);
    let data = scratch.file("data.img");
    std::fs::write(&data, vec![0u8; DATA_BYTES]).expect("data image");
    let ro = scratch.file("ro.img");
    let ro_before = pattern(0x5eed_0002, 64 * 1024);
    std::fs::write(&ro, &ro_before).expect("ro image");
    let src = scratch.file("pattern.img");
    let expected = pattern(0x5eed_0001, COPY_BYTES);
    std::fs::write(&src, &expected).expect("pattern image");
    let script = scratch.file("script.img");
    script_image(
        &script,
        &format!(
            "echo \"T: serial=$(cat /sys/block/vdb/serial)\"\n\
             dd if=/dev/vdd of=/dev/vdb bs=64k count={COPY_BLOCKS} conv=fsync 2>/dev/null\n\
             echo \"T: dd_rc=$?\"\n\
             echo \"T: ro_flag=$(cat /sys/block/vdc/ro)\"\n\
             dd if=/dev/vdd of=/dev/vdc bs=4k count=1 conv=fsync 2>/dev/null\n\
             echo \"T: ro_rc=$?\"\n\
             read -r RNG < /sys/class/misc/hw_random/rng_current\n\
             echo \"T: hwrng=$RNG\"\n\
             echo \"T: hwrng_bytes=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c)\""
        ),
    );
    let kernel = guest_file("vmlinux");
    let mem = MEM_MIB.to_string();
    let metrics = scratch.file("metrics.json");
    let disks = [
        disk(&rootfs, ",id=rootfs,root"),
        disk(&data, ",id=data0"),
        disk(&ro, ",id=roimg,ro"),
        disk(&src, ",id=pattern,ro"),
        disk(&script, ",id=script,ro"),
    ];
    let mut args = vec![
        "--kernel",
        &kernel,
        "--cpus",
        "2",
        "--mem",
        &mem,
        "--boot-timer",
        "--metrics-path",
        &metrics,
        "--rng",
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1 ringvm_test_marker=7f3a guest.script=/dev/vde",
    ];
    for d in &disks {
        args.push("--disk");
        args.push(d);
    }
    let run = run_ringvm(&args, BOOT_DEADLINE);
    let t = run.transcript();
    assert!(!run.timed_out, "guest did not finish in time\n{t}");

    // The kernel's view of the machine.
    assert!(run.stdout.contains("Linux version 6.1"), "no banner\n{t}");
    let cmdline_line = run
        .stdout
        .lines()
        .find(|l| l.contains("Kernel command line:"))
        .unwrap_or_else(|| panic!("no command line echo\n{t}"));
    assert!(
        cmdline_line.contains("ringvm_test_marker=7f3a"),
        "{cmdline_line}"
    );
    assert!(
        run.stdout.contains("smp: Brought up 1 node, 2 CPUs"),
        "guest did not bring up both vCPUs\n{t}"
    );
    let total_k = memory_total_k(&run.stdout).unwrap_or_else(|| panic!("no Memory: line\n{t}"));
    let asked_k = MEM_MIB * 1024;
    assert!(
        total_k <= asked_k && total_k > asked_k * 95 / 100,
        "guest sees {total_k}K of {asked_k}K\n{t}"
    );
    assert!(
        run.stderr.contains("boot-timer: guest reached init"),
        "no boot-timer line\n{t}"
    );

    // User space.
    assert_eq!(guest_marker(&run, "nproc"), Some("2"), "{t}");
    let memtotal: u64 = guest_marker(&run, "memtotal_kb")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no memtotal\n{t}"));
    assert!(memtotal > asked_k * 80 / 100 && memtotal < asked_k, "{t}");

    // Drives.
    assert_eq!(guest_value(&run.stdout, "serial"), Some("data0"), "{t}");
    assert_eq!(guest_value(&run.stdout, "dd_rc"), Some("0"), "{t}");
    let written = std::fs::read(&data).expect("read data image");
    assert!(
        written[..COPY_BYTES] == expected[..],
        "data image does not hold the pattern the guest wrote\n{t}"
    );
    assert!(
        written[COPY_BYTES..].iter().all(|b| *b == 0),
        "bytes past the write changed"
    );
    assert_eq!(guest_value(&run.stdout, "ro_flag"), Some("1"), "{t}");
    assert_ne!(
        guest_value(&run.stdout, "ro_rc"),
        Some("0"),
        "read-only write succeeded\n{t}"
    );
    assert!(guest_value(&run.stdout, "ro_rc").is_some(), "{t}");
    assert_eq!(
        std::fs::read(&ro).expect("read ro image"),
        ro_before,
        "read-only image changed"
    );

    // Entropy: the guest entered through PVH, so it got no boot-time seed;
    // its hwrng is our virtio-rng, it reads from it, and its crng comes up.
    assert_eq!(
        guest_value(&run.stdout, "hwrng"),
        Some("virtio_rng.0"),
        "{t}"
    );
    assert_eq!(guest_value(&run.stdout, "hwrng_bytes"), Some("64"), "{t}");
    assert!(
        run.stdout.contains("random: crng init done"),
        "the guest's crng never initialised\n{t}"
    );

    // The metrics line written at exit counts what the guest did.
    let text = std::fs::read_to_string(&metrics).expect("metrics file");
    let last = text
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no metrics line\n{t}"));
    let m: serde_json::Value = serde_json::from_str(last).expect("metrics line is JSON");
    let written_bytes = m["block"]["data0"]["write_bytes"].as_u64().unwrap_or(0);
    assert!(written_bytes >= COPY_BYTES as u64, "metrics: {last}");
    // Linux refuses writes to a VIRTIO_BLK_F_RO disk itself: none arrive.
    assert_eq!(
        m["block"]["roimg"]["write_bytes"].as_u64(),
        Some(0),
        "metrics: {last}"
    );
    assert!(
        m["vcpu"]["exit_io_out"].as_u64().unwrap_or(0) > 0,
        "metrics: {last}"
    );
    assert!(
        m["rng"]["rng0"]["bytes"].as_u64().unwrap_or(0) >= 64,
        "the guest took no entropy from the device: {last}"
    );

    // `reboot -f` at the end of init ends ringvm with 0.
    assert!(run.stdout.contains("GUEST: DONE"), "{t}");
    assert_eq!(run.code, Some(0), "reboot must exit 0\n{t}");
}

/// Data the guest wrote and synced is in the image even when ringvm is
/// killed with SIGKILL right after the guest saw the sync return.
#[test]
fn synced_writes_survive_sigkill_of_the_vmm() {
    if !kvm_available("synced_writes_survive_sigkill_of_the_vmm") {
        return;
    }
    let scratch = Scratch::new("guest-sigkill");
    let rootfs = rootfs_copy(&scratch);
    let data = scratch.file("data.img");
    std::fs::write(&data, vec![0u8; DATA_BYTES]).expect("data image");
    let src = scratch.file("pattern.img");
    let expected = pattern(0x5eed_0003, 256 * 1024);
    std::fs::write(&src, &expected).expect("pattern image");
    let script = scratch.file("script.img");
    script_image(
        &script,
        "dd if=/dev/vdc of=/dev/vdb bs=64k count=4 conv=fsync 2>/dev/null\n\
         echo \"T: synced_rc=$?\"\n\
         sleep 600",
    );
    let kernel = guest_file("vmlinux");
    let disks = [
        disk(&rootfs, ",root"),
        disk(&data, ",id=data0"),
        disk(&src, ",ro"),
        disk(&script, ",ro"),
    ];
    let mut args = vec![
        "--kernel",
        &kernel,
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1 guest.script=/dev/vdd",
    ];
    for d in &disks {
        args.push("--disk");
        args.push(d);
    }
    let run = run_ringvm_until(&args, Some("T: synced_rc=0"), BOOT_DEADLINE);
    let t = run.transcript();
    assert!(!run.timed_out, "guest never reported the sync\n{t}");
    assert_eq!(run.code, None, "ringvm should have been killed\n{t}");
    let written = std::fs::read(&data).expect("read data image");
    assert!(
        written[..expected.len()] == expected[..],
        "synced data is not in the image after SIGKILL\n{t}"
    );
}

/// A kernel whose init is missing panics; with `panic=-1` it reboots at
/// once and ringvm exits 0. The boot timer fires just before the kernel
/// tries init.
#[test]
fn panic_reboots_and_ringvm_exits_zero() {
    if !kvm_available("panic_reboots_and_ringvm_exits_zero") {
        return;
    }
    let scratch = Scratch::new("guest-panic");
    let rootfs = rootfs_copy(&scratch);
    let kernel = guest_file("vmlinux");
    let root = disk(&rootfs, ",root");
    // A one-file initramfs: the kernel unpacks it, finds no /init in it,
    // and goes on to the root drive.
    let initrd = scratch.file("tiny.cpio");
    std::fs::write(&initrd, tiny_initramfs("ringvm-initrd-marker", b"hello\n")).expect("initrd");
    let run = run_ringvm(
        &[
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--boot-timer",
            "--disk",
            &root,
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 init=/nonexistent",
        ],
        BOOT_DEADLINE,
    );
    let t = run.transcript();
    assert!(!run.timed_out, "{t}");
    assert!(
        run.stdout.contains("Kernel panic"),
        "expected the init panic\n{t}"
    );
    assert!(run.stderr.contains("boot-timer: guest reached init"), "{t}");
    assert_eq!(run.code, Some(0), "reboot after panic must exit 0\n{t}");
}

#[test]
fn memory_line_parser_reads_the_total() {
    let line = "[    0.000000] Memory: 233000K/261624K available (4096K kernel code)";
    assert_eq!(memory_total_k(line), Some(261624));
    assert_eq!(memory_total_k("nothing"), None);
}

/// `--acpi off`: no ACPI tables, so the devices reach the kernel as
/// `virtio_mmio.device=` words and the CPUs through the MP table; `poweroff
/// -f` then halts every vCPU with interrupts off, which ringvm takes as a
/// power-off and exits 0. (With ACPI, the default, see `acpi.rs`.)
#[test]
fn poweroff_without_acpi_ends_ringvm_with_zero() {
    if !kvm_available("poweroff_without_acpi_ends_ringvm_with_zero") {
        return;
    }
    let scratch = Scratch::new("guest-poweroff");
    let rootfs = rootfs_copy(&scratch);
    let kernel = guest_file("vmlinux");
    let root = disk(&rootfs, ",root");
    let run = run_ringvm(
        &[
            "--kernel",
            &kernel,
            "--acpi",
            "off",
            "--cpus",
            "2",
            "--disk",
            &root,
            "--cmdline",
            "console=ttyS0 reboot=k panic=0 guest.halt=poweroff",
        ],
        BOOT_DEADLINE,
    );
    let t = run.transcript();
    assert!(!run.timed_out, "{t}");
    assert!(
        run.stdout.contains("virtio_mmio.device=4K@0xd0001000:5"),
        "no device word on the command line\n{t}"
    );
    assert!(
        !run.stdout.contains("ACPI: RSDP"),
        "tables were written\n{t}"
    );
    assert!(
        run.stdout.contains("smp: Brought up 1 node, 2 CPUs"),
        "the MP table did not bring up both vCPUs\n{t}"
    );
    assert!(run.stdout.contains("GUEST: halt poweroff"), "{t}");
    assert!(run.stderr.contains("power-off"), "{t}");
    assert_eq!(run.code, Some(0), "power-off must exit 0\n{t}");
}

/// SIGTERM stops the guest and ringvm cleanly, with 128 + 15.
#[test]
fn sigterm_stops_ringvm_with_143() {
    if !kvm_available("sigterm_stops_ringvm_with_143") {
        return;
    }
    let kernel = guest_file("vmlinux");
    let run = run_ringvm_signal_at(
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1",
        ],
        Some("Linux version"),
        libc::SIGTERM,
        BOOT_DEADLINE,
    );
    let t = run.transcript();
    assert_eq!(run.code, Some(143), "{t}");
    assert!(run.stderr.contains("stopped by signal 15"), "{t}");
}

fn host_is_pvm_native() -> bool {
    std::fs::read_to_string("/sys/module/kvm_pvm/parameters/pvm_native")
        .is_ok_and(|s| s.trim() == "Y")
}

/// On PVM-native KVM the `host` template lets Linux use XSAVE, which KVM's
/// emulator cannot run: the vCPU stops with an internal error, and ringvm
/// says so with the registers and exit code 5.
#[test]
fn a_guest_that_breaks_the_vcpu_exits_5_with_registers() {
    if !kvm_available("a_guest_that_breaks_the_vcpu_exits_5_with_registers") {
        return;
    }
    if !host_is_pvm_native() {
        eprintln!(
            "SKIPPED a_guest_that_breaks_the_vcpu_exits_5_with_registers: \
             needs PVM-native KVM, where the host template is known to break the guest"
        );
        return;
    }
    let kernel = guest_file("vmlinux");
    let run = run_ringvm(
        &[
            "--kernel",
            &kernel,
            "--cpu-template",
            "host",
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1",
        ],
        BOOT_DEADLINE,
    );
    let t = run.transcript();
    assert_eq!(run.code, Some(5), "{t}");
    assert!(run.stderr.contains("KVM internal error"), "{t}");
    assert!(run.stderr.contains("RIP=0x"), "{t}");
}

/// The LZ4 bzImage boots through the Linux 64-bit boot protocol (zero
/// page, e820 from boot_params): kernel only, it panics on the missing
/// root, reboots and ringvm exits 0.
#[test]
fn bzimage_boots_through_the_64_bit_protocol() {
    if !kvm_available("bzimage_boots_through_the_64_bit_protocol") {
        return;
    }
    let kernel = guest_file("bzImage");
    let run = run_ringvm(
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 ringvm_bzimage=1",
        ],
        BOOT_DEADLINE,
    );
    let t = run.transcript();
    assert!(!run.timed_out, "{t}");
    assert!(run.stdout.contains("Linux version 6.1"), "{t}");
    assert!(run.stdout.contains("ringvm_bzimage=1"), "{t}");
    assert!(run.stdout.contains("BIOS-e820"), "no e820 map echoed\n{t}");
    assert!(run.stdout.contains("Kernel panic"), "{t}");
    assert_eq!(run.code, Some(0), "{t}");
}
