//! Builds ringvm's guest init (`resources/runner/init.c`) as a static
//! executable and leaves it in OUT_DIR, where `runner.rs` embeds it: the
//! ringvm binary carries its guest side, so `ringvm -- CMD` needs no file
//! beside it.
//!
//! Needs a C compiler and a static libc (Debian: build-essential, which
//! `make deps` installs). `CC` picks the compiler (default `cc`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = PathBuf::from("../resources/runner/init.c");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CC");
    let Some(out_dir) = std::env::var_os("OUT_DIR") else {
        panic!("OUT_DIR is not set (build scripts run under cargo)");
    };
    let out = PathBuf::from(out_dir).join("ringvm-init");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "building the guest init ({cc} -static {}) failed with {s}: install a C compiler \
             and a static libc (Debian: apt-get install build-essential)",
            src.display()
        ),
        Err(e) => panic!(
            "cannot run the C compiler `{cc}` to build the guest init: {e} (Debian: apt-get \
             install build-essential)"
        ),
    }
}
