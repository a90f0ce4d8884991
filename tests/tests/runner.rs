//! `ringvm --kernel K -- COMMAND`: real guests running one command each
//! with the host's files (virtio-9p), as a user of the runner sees it:
//! exit statuses, stdout and stderr byte for byte, stdin, shares read and
//! written, a read-only root with an overlay, no way out of a share, and
//! arguments that arrive intact.
//!
//! Most boots use `--root-share` with a busybox-only root (`make
//! runner-root`): on PVM-native KVM guest code runs in KVM's instruction
//! emulator, where a static busybox starts at once and a host binary's
//! dynamic loader costs seconds. One boot uses the host's own root, the
//! default, to run the host's `/bin/true`.
//!
//! Boots run one at a time, like every guest test here: two emulated
//! guests on two host cores only slow each other down.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use ringvm_tests::command::{run_command, runner_root, CommandRun};
use ringvm_tests::{guest_dir, kvm_available, pattern, ringvm_bin, Scratch};

const DEADLINE: Duration = Duration::from_secs(1200);

fn kernel() -> String {
    let p = guest_dir().join("vmlinux");
    assert!(p.exists(), "{} missing: run `make guest`", p.display());
    p.to_string_lossy().into_owned()
}

fn args(words: &[&str]) -> Vec<OsString> {
    words.iter().map(OsString::from).collect()
}

fn run(words: Vec<OsString>, stdin: &[u8]) -> CommandRun {
    run_command(&ringvm_bin(), &words, stdin, DEADLINE)
}

fn with_busybox_root(extra: &[&str], command: &[&str]) -> Vec<OsString> {
    let root = runner_root();
    let mut w = args(&["--kernel", &kernel(), "--root-share"]);
    w.push(root.into_os_string());
    w.extend(args(extra));
    w.push("--".into());
    w.extend(args(command));
    w
}

#[test]
fn command_statuses_become_ringvm_exit_codes() {
    if !kvm_available("command_statuses_become_ringvm_exit_codes") {
        return;
    }
    // The guest gets a fresh /tmp, but a working directory under the
    // host's /tmp (a checkout there) stays visible: the command finds a
    // file the host put in it.
    let host_tmp =
        std::path::PathBuf::from(format!("/tmp/ringvm-runner-cwd-{}", std::process::id()));
    std::fs::create_dir_all(&host_tmp).expect("a directory under /tmp");
    std::fs::write(host_tmp.join("marker"), b"host").expect("marker");
    let cwd = host_tmp.to_string_lossy().into_owned();
    let check = format!("test -f marker && test -f {cwd}/marker");
    let host_root = args(&[
        "--kernel",
        &kernel(),
        "--cwd",
        &cwd,
        "--",
        "/bin/sh",
        "-c",
        &check,
    ]);
    let cases: Vec<(&str, Vec<OsString>, i32, &str)> = vec![
        (
            "host root, a working directory under /tmp",
            host_root,
            0,
            "",
        ),
        (
            "exit 7",
            with_busybox_root(&[], &["sh", "-c", "exit 7"]),
            7,
            "",
        ),
        (
            "killed by SIGKILL",
            with_busybox_root(&[], &["sh", "-c", "kill -9 $$"]),
            137,
            "",
        ),
        (
            "--cwd that does not exist in the guest",
            with_busybox_root(&["--cwd", "/no/such/dir"], &["true"]),
            125,
            "working directory",
        ),
    ];
    for (name, words, want, needle) in cases {
        let r = run(words, b"");
        eprintln!("runner: {name}: exit {:?} after {:?}", r.code, r.elapsed);
        let t = r.transcript();
        assert_eq!(r.code, Some(want), "{name}\n{t}");
        assert!(
            String::from_utf8_lossy(&r.stderr).contains(needle),
            "{name}: stderr should name {needle:?}\n{t}"
        );
        if want != 125 {
            assert!(r.stdout.is_empty(), "{name}: no console on stdout\n{t}");
        }
    }
    let _ = std::fs::remove_dir_all(&host_tmp);
}

/// The script the guest runs, with the test's arguments as `$@`.
const SCRIPT: &str = r#"
cat /in/a.bin
cat /in/b.bin >&2
cat > /out/stdin.bin
printf '[%s]\n' "$@" > /out/args.txt
cp /in/a.bin /out/copy.bin
echo overlay > /etc/overlay-probe && cat /etc/overlay-probe > /out/overlay.txt
for p in /in/up/secret /in/abs/secret /in/../outside/secret /outside/secret; do
    if cat "$p" > /dev/null 2>&1; then echo "READ $p"; else echo "refused $p"; fi
done > /out/escape.txt
exit 3
"#;

#[test]
fn a_command_gets_host_files_and_stdio_byte_for_byte() {
    if !kvm_available("a_command_gets_host_files_and_stdio_byte_for_byte") {
        return;
    }
    let s = Scratch::new("runner-files");
    let (input, output, outside) = (
        s.path.join("in"),
        s.path.join("out"),
        s.path.join("outside"),
    );
    for d in [&input, &output, &outside] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let a = pattern(11, 1 << 20);
    let b = pattern(12, 1 << 20);
    let stdin = pattern(13, 64 << 10);
    std::fs::write(input.join("a.bin"), &a).expect("write a");
    std::fs::write(input.join("b.bin"), &b).expect("write b");
    std::fs::write(outside.join("secret"), b"host secret\n").expect("write secret");
    symlink("../outside", input.join("up")).expect("symlink");
    symlink(&outside, input.join("abs")).expect("symlink");
    let root = runner_root();
    let probe = root.join("etc/overlay-probe");
    let _ = std::fs::remove_file(&probe);

    let mut words = args(&["--kernel", &kernel(), "--root-share"]);
    words.push(root.clone().into_os_string());
    words.extend(args(&[
        "--share",
        &format!("{}:/in", input.display()),
        "--share",
        &format!("{}:/out,rw", output.display()),
        "--",
        "/bin/sh",
        "-c",
        SCRIPT,
        "argv0",
        "a  b",
        "c'd",
        "e\"f",
        "x \\ y",
        "é",
        "",
    ]));
    words.push(OsString::from_vec(vec![0xff, b' ', 0xfe]));
    let r = run(words, &stdin);
    let t = r.transcript();
    assert_eq!(r.code, Some(3), "{t}");
    assert!(r.stdout == a, "stdout is not a.bin byte for byte\n{t}");
    assert!(r.stderr == b, "stderr is not b.bin byte for byte\n{t}");
    let read = |name: &str| std::fs::read(output.join(name)).unwrap_or_default();
    assert!(
        read("stdin.bin") == stdin,
        "stdin did not reach the command intact"
    );
    assert!(
        read("copy.bin") == a,
        "the rw share did not get the copy intact"
    );
    let mut want_args = b"[a  b]\n[c'd]\n[e\"f]\n[x \\ y]\n[\xc3\xa9]\n[]\n[".to_vec();
    want_args.extend_from_slice(&[0xff, b' ', 0xfe]);
    want_args.extend_from_slice(b"]\n");
    assert_eq!(
        String::from_utf8_lossy(&read("args.txt")),
        String::from_utf8_lossy(&want_args)
    );
    assert_eq!(read("args.txt"), want_args);
    assert_eq!(
        read("overlay.txt"),
        b"overlay\n",
        "writes to / land in the overlay"
    );
    assert!(
        !probe.exists(),
        "a write to the read-only root reached the host"
    );
    let escape = String::from_utf8_lossy(&read("escape.txt")).into_owned();
    assert_eq!(escape.matches("refused").count(), 4, "{escape}");
    assert!(!escape.contains("READ"), "{escape}");
    assert_eq!(
        std::fs::read(outside.join("secret")).expect("secret"),
        b"host secret\n"
    );
    assert_only(&input, &["a.bin", "abs", "b.bin", "up"]);
}

/// The read-only share still holds exactly `names`.
fn assert_only(dir: &Path, names: &[&str]) {
    let mut got: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    got.sort();
    assert_eq!(got, names);
}
