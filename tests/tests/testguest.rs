//! ringvm's own virtio test guest (`resources/testguest`, "vtest"): a
//! small kernel that drives the virtio-mmio devices directly, politely and
//! rudely, prints one line per case and a closing `N passed, N failed`,
//! and reports its verdict on the test-exit port (ringvm exits 0 only when
//! every case passed, 6 otherwise).

use std::path::PathBuf;
use std::time::Duration;

use ringvm_tests::{kvm_available, run_binary, run_ringvm, workspace_root, Scratch, VmRun};

const DEADLINE: Duration = Duration::from_secs(300);

fn vtest_elf() -> String {
    let p = std::env::var_os("RINGVM_TESTGUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/testguest/vtest.elf"));
    assert!(p.exists(), "{} missing: run `make testguest`", p.display());
    p.to_string_lossy().into_owned()
}

/// Runs the whole suite against `bin` with a writable and a read-only drive.
fn run_suite(bin: Option<&str>, scratch: &Scratch) -> VmRun {
    let rw = scratch.file("vt.img");
    let ro = scratch.file("vt-ro.img");
    for p in [&rw, &ro] {
        let f = std::fs::File::create(p).expect("create drive image");
        f.set_len(16 << 20).expect("size drive image");
    }
    let elf = vtest_elf();
    let rw_disk = format!("path={rw}");
    let ro_disk = format!("path={ro},ro");
    let args = [
        "--kernel",
        &elf,
        "--disk",
        &rw_disk,
        "--disk",
        &ro_disk,
        "--cmdline",
        "suite=all",
    ];
    match bin {
        Some(b) => run_binary(
            std::path::Path::new(b),
            &args,
            None,
            libc::SIGKILL,
            DEADLINE,
        ),
        None => run_ringvm(&args, DEADLINE),
    }
}

/// The closing `N passed, N failed` line.
fn tally(console: &str) -> Option<(u32, u32)> {
    let line = console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find(|l| l.contains(" passed, ") && l.contains(" failed"))?;
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().ok());
    Some((nums.next()??, nums.next()??))
}

#[test]
fn every_conformance_blk_and_hostile_case_passes() {
    if !kvm_available("every_conformance_blk_and_hostile_case_passes") {
        return;
    }
    let scratch = Scratch::new("vtest");
    let run = run_suite(None, &scratch);
    let t = run.transcript();
    assert!(!run.timed_out, "{t}");
    let (passed, failed) = tally(&run.stdout).unwrap_or_else(|| panic!("no tally line\n{t}"));
    assert_eq!(failed, 0, "{t}");
    assert!(passed >= 48, "only {passed} cases ran\n{t}");
    assert!(!run.stdout.contains("FAIL "), "{t}");
    assert_eq!(run.code, Some(0), "{t}");
    eprintln!("vtest: {passed} cases passed in {:?}", run.elapsed);
}

/// A ringvm built with the test-only `broken-status` feature answers
/// refused requests with OK; the hostile and blk cases must catch it and
/// ringvm must exit 6. `make test` builds that binary and names it in
/// RINGVM_BROKEN_BIN.
#[test]
fn a_deliberately_broken_device_fails_the_matching_cases() {
    if !kvm_available("a_deliberately_broken_device_fails_the_matching_cases") {
        return;
    }
    let Some(broken) = std::env::var_os("RINGVM_BROKEN_BIN") else {
        eprintln!(
            "SKIPPED a_deliberately_broken_device_fails_the_matching_cases: \
             RINGVM_BROKEN_BIN not set (make test sets it)"
        );
        return;
    };
    let broken = broken.to_string_lossy().into_owned();
    let scratch = Scratch::new("vtest-broken");
    let run = run_suite(Some(&broken), &scratch);
    let t = run.transcript();
    let (_, failed) = tally(&run.stdout).unwrap_or_else(|| panic!("no tally line\n{t}"));
    assert!(failed >= 5, "the broken device passed too many cases\n{t}");
    for case in [
        "hostile.wrong_direction",
        "hostile.data_outside_ram",
        "blk.past_end",
        "blk.read_only",
    ] {
        assert!(
            run.stdout.contains(&format!("FAIL {case}")),
            "{case} did not catch the broken device\n{t}"
        );
    }
    assert_eq!(run.code, Some(6), "{t}");
}

#[test]
fn tally_line_is_parsed() {
    assert_eq!(tally("ok a\n48 passed, 0 failed\n"), Some((48, 0)));
    assert_eq!(tally("47 passed, 1 failed, 2 skipped\r\n"), Some((47, 1)));
    assert_eq!(tally("nothing"), None);
}
