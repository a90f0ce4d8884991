//! Boots the test kernel under KVM and checks what a user would: the
//! banner, the command line, the CPUs and memory it found, the boot timer,
//! and that a panic with `panic=-1` reboots and ends ringvm with exit 0.
//!
//! A Linux boot takes a minute or more on PVM-native KVM, so one boot
//! checks all of these.

use std::time::Duration;

use ringvm_tests::{guest_dir, kvm_available, run_ringvm};

const BOOT_DEADLINE: Duration = Duration::from_secs(900);

/// Memory the guest is given; the kernel's "Memory: a/bK available" line
/// must show nearly all of it.
const MEM_MIB: u64 = 256;

#[test]
fn kernel_boots_with_smp_memory_cmdline_and_boot_timer_then_reboots_on_panic() {
    if !kvm_available("kernel_boots_with_smp_memory_cmdline_and_boot_timer_then_reboots_on_panic") {
        return;
    }
    let kernel = guest_dir().join("vmlinux");
    assert!(kernel.exists(), "{} missing: run `make guest`", kernel.display());
    let mem = MEM_MIB.to_string();
    let cmdline = "console=ttyS0 reboot=k panic=-1 init=/nonexistent ringvm_test_marker=7f3a";
    let run = run_ringvm(
        &[
            "--kernel",
            kernel.to_str().expect("utf-8 path"),
            "--cpus",
            "2",
            "--mem",
            &mem,
            "--boot-timer",
            "--cmdline",
            cmdline,
        ],
        BOOT_DEADLINE,
    );
    let t = run.transcript();
    assert!(!run.timed_out, "guest did not finish in time\n{t}");
    assert!(run.stdout.contains("Linux version 6.1"), "no banner\n{t}");
    let cmdline_line = run
        .stdout
        .lines()
        .find(|l| l.contains("Kernel command line:"))
        .unwrap_or_else(|| panic!("no command line echo\n{t}"));
    assert!(cmdline_line.contains("ringvm_test_marker=7f3a"), "{cmdline_line}");
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
    assert!(
        run.stdout.contains("Kernel panic") || run.stdout.contains("No working init found"),
        "expected the init panic\n{t}"
    );
    assert_eq!(run.code, Some(0), "reboot after panic must exit 0\n{t}");
}

/// Parses the total from "Memory: 230000K/262144K available ...".
fn memory_total_k(console: &str) -> Option<u64> {
    let line = console.lines().find(|l| l.contains("Memory: ") && l.contains("K available"))?;
    let after = line.split("Memory: ").nth(1)?;
    let total = after.split('/').nth(1)?;
    total.split('K').next()?.trim().parse().ok()
}

#[test]
fn memory_line_parser_reads_the_total() {
    let line = "[    0.000000] Memory: 233000K/261624K available (4096K kernel code)";
    assert_eq!(memory_total_k(line), Some(261624));
    assert_eq!(memory_total_k("nothing"), None);
}
