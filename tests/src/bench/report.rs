//! Where the benchmarks' results go and how they leave: a markdown and a
//! JSON file side by side, the markdown also on stdout, errors on stderr
//! with the benchmark's name.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;

use super::Res;

/// The report directory: `out`, else `<workspace>/target/bench`; created
/// if missing.
pub fn out_dir(out: Option<&Path>) -> Res<PathBuf> {
    let dir = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| crate::workspace_root().join("target/bench"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Writes `<dir>/<stem>.md` and `<dir>/<stem>.json`, prints the markdown
/// and says on stderr (as `tag`) where both went.
pub fn write(dir: &Path, stem: &str, tag: &str, md: &str, report: &Value) -> Res<()> {
    let json_text = serde_json::to_string_pretty(report)
        .map_err(|e| format!("cannot encode the report: {e}"))?;
    let md_path = dir.join(format!("{stem}.md"));
    let json_path = dir.join(format!("{stem}.json"));
    std::fs::write(&md_path, md).map_err(|e| format!("cannot write {}: {e}", md_path.display()))?;
    std::fs::write(&json_path, json_text + "\n")
        .map_err(|e| format!("cannot write {}: {e}", json_path.display()))?;
    println!("{md}");
    eprintln!(
        "{tag}: wrote {} and {}",
        md_path.display(),
        json_path.display()
    );
    Ok(())
}

/// The process exit for a benchmark's outcome, printing the error as
/// "`tag`: error: ...".
pub fn exit(tag: &str, outcome: Res<()>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tag}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Appends the closing sections both reports share: what bounds the
/// figures, how they were measured, and why there is no QEMU column.
pub fn notes_markdown(s: &mut String, bounds: &[&str], method: &[&str], qemu: &str) {
    let _ = writeln!(s, "\n## What bounds them\n");
    for b in bounds {
        let _ = writeln!(s, "- {b}");
    }
    let _ = writeln!(s, "\n## Method\n");
    for m in method {
        let _ = writeln!(s, "- {m}");
    }
    let _ = writeln!(s, "\n## QEMU\n\n{qemu}");
}
