//! Command-line failures a user meets before any guest runs: they must be
//! immediate, one clear line, and the documented exit code.

use std::time::Duration;

use ringvm_tests::run_ringvm;

const QUICK: Duration = Duration::from_secs(20);

#[test]
fn missing_kernel_is_a_config_error_at_once() {
    let run = run_ringvm(&["--kernel", "/nonexistent/vmlinux"], QUICK);
    let t = run.transcript();
    assert_eq!(run.code, Some(3), "{t}");
    assert!(run.elapsed < Duration::from_secs(5), "{t}");
    assert!(run.stderr.contains("/nonexistent/vmlinux"), "{t}");
    assert_eq!(
        run.stderr.trim().lines().count(),
        1,
        "one line expected\n{t}"
    );
}

#[test]
fn garbage_kernel_is_a_config_error() {
    let path = std::env::temp_dir().join(format!("ringvm-cli-garbage-{}", std::process::id()));
    std::fs::write(&path, vec![0x42u8; 4096]).expect("write temp file");
    let run = run_ringvm(&["--kernel", path.to_str().expect("utf-8")], QUICK);
    let _ = std::fs::remove_file(&path);
    assert_eq!(run.code, Some(3), "{}", run.transcript());
    assert!(
        run.stderr.contains("not a loadable"),
        "{}",
        run.transcript()
    );
}

#[test]
fn usage_errors_exit_2() {
    let run = run_ringvm(&["--cpus", "lots", "--kernel", "/k"], QUICK);
    assert_eq!(run.code, Some(2), "{}", run.transcript());
    let run = run_ringvm(&[], QUICK);
    assert_eq!(run.code, Some(2), "{}", run.transcript());
    for bad in [
        &["--acpi", "maybe"][..],
        &["--acpi"][..],
        &["--poll-max-us", "5000"][..],
        &["--poll-max-us", "many"][..],
    ] {
        let mut args = vec!["--kernel", "/k"];
        args.extend_from_slice(bad);
        let run = run_ringvm(&args, QUICK);
        assert_eq!(run.code, Some(2), "{bad:?}: {}", run.transcript());
        assert!(run.stderr.contains(bad[0]), "{}", run.transcript());
    }
}

#[test]
fn out_of_range_values_are_config_errors() {
    let run = run_ringvm(&["--kernel", "/k", "--cpus", "0"], QUICK);
    assert_eq!(run.code, Some(3), "{}", run.transcript());
    assert!(run.stderr.contains("vcpu_count"), "{}", run.transcript());
    let run = run_ringvm(&["--kernel", "/k", "--cpu-template", "T9"], QUICK);
    assert_eq!(run.code, Some(3), "{}", run.transcript());
}

#[test]
fn help_documents_exit_codes_and_version_is_prefixed() {
    let run = run_ringvm(&["--help"], QUICK);
    assert_eq!(run.code, Some(0));
    for needle in [
        "--kernel",
        "--cpu-template",
        "--acpi <on|off>",
        "--boot-timer",
        "--poll-max-us <US>",
        "Exit codes:",
        "KVM unavailable",
        "-- <COMMAND>...",
        "ringvm --kernel vmlinux -- uname -r",
        "--share <HOST_DIR[:GUEST_DIR][,rw]>",
        "--root-share",
        "125  the guest failed before running the command",
    ] {
        assert!(
            run.stdout.contains(needle),
            "--help lacks {needle}\n{}",
            run.stdout
        );
    }
    let run = run_ringvm(&["--version"], QUICK);
    assert!(run.stdout.starts_with("ringvm v"), "{}", run.stdout);
}

#[test]
fn a_missing_drive_is_a_config_error_before_kvm() {
    let kernel = std::env::temp_dir().join(format!("ringvm-cli-k-{}", std::process::id()));
    std::fs::write(&kernel, b"not looked at yet").expect("write temp kernel");
    let run = run_ringvm(
        &[
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--disk",
            "path=/nonexistent/disk.img,id=data",
        ],
        QUICK,
    );
    let _ = std::fs::remove_file(&kernel);
    let t = run.transcript();
    assert_eq!(run.code, Some(3), "{t}");
    assert!(run.stderr.contains("/nonexistent/disk.img"), "{t}");
    assert_eq!(
        run.stderr.trim().lines().count(),
        1,
        "one line expected\n{t}"
    );
}

#[test]
fn bad_disk_options_are_usage_errors() {
    for bad in ["id=x", "path=/x,bogus=1", "path=/x,ro=perhaps"] {
        let run = run_ringvm(&["--kernel", "/k", "--disk", bad], QUICK);
        assert_eq!(run.code, Some(2), "{bad}: {}", run.transcript());
    }
}

#[test]
fn runner_options_are_checked_before_any_guest() {
    // Runner options without a command, or a command without a kernel:
    // usage errors.
    for args in [
        &["--kernel", "/k", "--share", "/tmp"][..],
        &["--kernel", "/k", "--cwd", "/"],
        &["--", "true"],
    ] {
        let run = run_ringvm(args, QUICK);
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.transcript());
    }
    // Shares that do not exist, a relative --cwd, a missing kernel: the
    // configuration exit code, at once, in one line naming the culprit.
    for (args, needle) in [
        (
            &[
                "--kernel",
                "/k",
                "--share",
                "/nonexistent/share",
                "--",
                "true",
            ][..],
            "/nonexistent/share",
        ),
        (
            &[
                "--kernel",
                "/k",
                "--root-share",
                "/nonexistent/root",
                "--",
                "true",
            ],
            "/nonexistent/root",
        ),
        (
            &["--kernel", "/k", "--share", "/tmp:relative", "--", "true"],
            "relative",
        ),
        (&["--kernel", "/k", "--cwd", "rel", "--", "true"], "rel"),
        (
            &["--kernel", "/nonexistent/vmlinux", "--", "true"],
            "/nonexistent/vmlinux",
        ),
    ] {
        let run = run_ringvm(args, QUICK);
        let t = run.transcript();
        assert_eq!(run.code, Some(3), "{args:?}: {t}");
        assert!(run.stderr.contains(needle), "{args:?}: {t}");
        assert_eq!(run.stderr.trim().lines().count(), 1, "{args:?}: {t}");
        assert!(run.elapsed < Duration::from_secs(5), "{args:?}: {t}");
    }
}
