//! `make bench-callgrind`: the VMM's instructions per request, a figure the
//! machine's load cannot move.
//!
//! Each workload runs twice under `valgrind --tool=callgrind`, a short and
//! a long run of `bench_blk` / `bench_net --callgrind-requests N`: the
//! benchmark's synthetic driver and the real device loop on one thread
//! (see `bench::inline_vmm`), callgrind collecting only inside the loop's
//! turn function. (long − short) instructions / (long − short) requests is
//! the VMM's steady cost per request. The previous run's figure is kept
//! beside the new one in `target/bench/callgrind.{json,md}`, and the long
//! run's profile in `target/bench/callgrind/` for `callgrind_annotate`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::Parser;
use ringvm_tests::bench::callgrind::{
    parse_annotate, per_request, top_json, total_instructions, FunctionCost,
};
use ringvm_tests::bench::inline_vmm::TURN_SYMBOL;
use ringvm_tests::bench::report;
use ringvm_tests::bench::summary::utc_now;
use ringvm_tests::bench::Res;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "VMM instructions per request (callgrind) on short fixed workloads")]
struct Args {
    /// Where callgrind.json, callgrind.md and the profiles go (default:
    /// <workspace>/target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only the workloads whose key contains this text.
    #[arg(long)]
    only: Option<String>,
    /// Skip the network workloads (they need root for their namespace).
    #[arg(long)]
    no_net: bool,
    /// Multiplies every workload's request counts (longer, steadier runs).
    #[arg(long, default_value_t = 1)]
    scale: u64,
}

/// One workload: which benchmark, what it selects, and the short and long
/// run's request counts.
struct Workload {
    key: &'static str,
    bin: &'static str,
    args: &'static [&'static str],
    small: u64,
    large: u64,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        key: "blk tmpfs randread 4k QD1",
        bin: "bench_blk",
        args: &["--only", "tmpfs randread 4k QD1", "--exact"],
        small: 200,
        large: 1200,
    },
    Workload {
        key: "blk tmpfs randread 4k QD32",
        bin: "bench_blk",
        args: &["--only", "tmpfs randread 4k QD32", "--exact"],
        small: 500,
        large: 2500,
    },
    Workload {
        key: "blk tmpfs randwrite 4k QD32",
        bin: "bench_blk",
        args: &["--only", "tmpfs randwrite 4k QD32", "--exact"],
        small: 500,
        large: 2500,
    },
    Workload {
        key: "blk tmpfs read 128k QD32",
        bin: "bench_blk",
        args: &["--only", "tmpfs read 128k QD32", "--exact"],
        small: 200,
        large: 1200,
    },
    Workload {
        key: "net tx-1514",
        bin: "bench_net",
        args: &["--only", "tx-1514", "--exact"],
        small: 1000,
        large: 5000,
    },
    Workload {
        key: "net rx-1514",
        bin: "bench_net",
        args: &["--only", "rx-1514", "--exact"],
        small: 500,
        large: 2500,
    },
    Workload {
        key: "net rx-1514-nogso",
        bin: "bench_net",
        args: &["--only", "rx-1514-nogso", "--exact"],
        small: 500,
        large: 2500,
    },
    Workload {
        key: "net tx-tso-65536",
        bin: "bench_net",
        args: &["--only", "tx-tso-65536", "--exact"],
        small: 200,
        large: 1000,
    },
];

/// What one valgrind run gave.
struct CgRun {
    instructions: u64,
    requests: u64,
    turns: u64,
    profile: PathBuf,
}

fn sibling(bin: &str) -> Res<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let path = exe.with_file_name(bin);
    if !path.exists() {
        return Err(format!(
            "{} is missing: build the benchmarks first (cargo build --release -p ringvm-tests --bins)",
            path.display()
        ));
    }
    Ok(path)
}

fn slug(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

fn run_one(w: &Workload, requests: u64, dir: &Path) -> Res<CgRun> {
    let bin = sibling(w.bin)?;
    let profile = dir.join(format!("{}-{requests}.out", slug(w.key)));
    let mut cmd = Command::new("valgrind");
    cmd.args([
        "--tool=callgrind",
        "--collect-atstart=no",
        &format!("--toggle-collect={TURN_SYMBOL}"),
        &format!("--callgrind-out-file={}", profile.display()),
    ])
    .arg(&bin)
    .args(["--callgrind-requests", &requests.to_string()])
    .args(w.args);
    if w.bin == "bench_blk" {
        // A small file: the driver writes it under valgrind.
        cmd.args(["--file-mib", "64"]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run valgrind (apt-get install valgrind): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "valgrind {} for {} failed ({:?}): {}",
            bin.display(),
            w.key,
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("requests").is_some())
        .ok_or_else(|| format!("{} printed no result for {}", w.bin, w.key))?;
    let text = std::fs::read_to_string(&profile)
        .map_err(|e| format!("cannot read {}: {e}", profile.display()))?;
    Ok(CgRun {
        instructions: total_instructions(&text)
            .ok_or_else(|| format!("{} has no totals", profile.display()))?,
        requests: line["requests"].as_u64().unwrap_or(0),
        turns: line["turns"].as_u64().unwrap_or(0),
        profile,
    })
}

fn annotate(profile: &Path) -> Vec<FunctionCost> {
    Command::new("callgrind_annotate")
        .arg("--threshold=100")
        .arg(profile)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| parse_annotate(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default()
}

fn git_commit() -> String {
    let root = ringvm_tests::workspace_root();
    let rev = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let dirty = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    match rev {
        Some(r) if dirty => format!("{r} (with uncommitted changes)"),
        Some(r) => r,
        None => "unknown".into(),
    }
}

const METHOD: &str = "Each workload runs twice under `valgrind --tool=callgrind --collect-atstart=no --toggle-collect=<InlineVmm::turn>`: the benchmark's synthetic driver and the real device loop (ring turn, dispatch, resume) on one thread, callgrind counting instructions only inside the loop's turn. Instructions per request = (long run − short run) instructions / (long − short) requests, so one-time costs cancel. User-space instructions only: what the kernel does inside io_uring_enter is not counted. Deterministic up to the batching the kernel's completion timing allows (a few %); a change beyond that is the VMM's own.";

fn markdown(doc: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# VMM instructions per request (callgrind)\n\nGenerated {} at commit {}; previous run: {} at {}. {}\n",
        doc["generated"].as_str().unwrap_or("?"),
        doc["commit"].as_str().unwrap_or("?"),
        doc["previous_generated"].as_str().unwrap_or("none"),
        doc["previous_commit"].as_str().unwrap_or("-"),
        METHOD
    );
    let _ = writeln!(
        s,
        "| workload | instructions / request | previous | change | turns / request |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    for w in doc["workloads"].as_array().into_iter().flatten() {
        let now = w["instructions_per_request"].as_f64();
        let prev = w["previous"].as_f64();
        let _ = writeln!(
            s,
            "| {}{} | {} | {} | {} | {} |",
            w["key"].as_str().unwrap_or("?"),
            if w["not_rerun"] == true {
                " (not re-run)"
            } else {
                ""
            },
            now.map_or("-".into(), |v| format!("{v:.0}")),
            prev.map_or("-".into(), |v| format!("{v:.0}")),
            match (now, prev) {
                (Some(n), Some(p)) if p > 0.0 => format!("{:+.1}%", (n / p - 1.0) * 100.0),
                _ => "-".into(),
            },
            w["turns_per_request"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.3}")),
        );
    }
    for w in doc["workloads"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "\n## {}: top functions (self instructions per request, long run)\n",
            w["key"].as_str().unwrap_or("?")
        );
        let _ = writeln!(s, "| instructions / request | function |");
        let _ = writeln!(s, "|---:|---|");
        for f in w["top"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {:.0} | `{}` |",
                f["per_request"].as_f64().unwrap_or(0.0),
                f["function"].as_str().unwrap_or("?")
            );
        }
    }
    for (key, why) in doc["skipped"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k, v.as_str().unwrap_or("")))
    {
        let _ = writeln!(s, "\nSkipped {key}: {why}");
    }
    s
}

fn run(args: &Args) -> Res<()> {
    let out_dir = report::out_dir(args.out.as_deref())?;
    let profiles = out_dir.join("callgrind");
    std::fs::create_dir_all(&profiles)
        .map_err(|e| format!("cannot create {}: {e}", profiles.display()))?;
    let valgrind = Command::new("valgrind")
        .arg("--version")
        .output()
        .map_err(|e| format!("valgrind is not available ({e}); make bench-deps installs it"))?;
    let json_path = out_dir.join("callgrind.json");
    let previous: Value = std::fs::read_to_string(&json_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let prev_of = |key: &str| {
        previous["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["key"] == key)
            .and_then(|w| w["instructions_per_request"].as_f64())
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut results = Vec::new();
    let mut skipped = serde_json::Map::new();
    for w in WORKLOADS {
        if args.only.as_deref().is_some_and(|o| !w.key.contains(o)) {
            continue;
        }
        if w.bin == "bench_net" && (args.no_net || !root) {
            let why = if root {
                "--no-net"
            } else {
                "needs root (network namespace and taps)"
            };
            eprintln!("bench-callgrind: SKIPPED {}: {why}", w.key);
            skipped.insert(w.key.into(), json!(why));
            continue;
        }
        let small = run_one(w, w.small * args.scale.max(1), &profiles)?;
        let large = run_one(w, w.large * args.scale.max(1), &profiles)?;
        let per_req = per_request(
            (small.instructions, small.requests),
            (large.instructions, large.requests),
        )
        .ok_or_else(|| format!("{}: the long run did not count more than the short", w.key))?;
        let top = annotate(&large.profile);
        let prev = prev_of(w.key);
        eprintln!(
            "  {:28} {:>8.0} instructions/request  (previous {})",
            w.key,
            per_req,
            prev.map_or("-".into(), |p| format!("{p:.0}"))
        );
        let _ = std::fs::remove_file(&small.profile);
        results.push(json!({
            "key": w.key,
            "instructions_per_request": per_req,
            "previous": prev,
            "requests": large.requests - small.requests,
            "turns_per_request": (large.turns - small.turns) as f64 / (large.requests - small.requests).max(1) as f64,
            "short_run": {"requests": small.requests, "instructions": small.instructions, "turns": small.turns},
            "long_run": {"requests": large.requests, "instructions": large.instructions, "turns": large.turns, "profile": large.profile.display().to_string()},
            "top": top_json(&top, large.requests, 15),
        }));
    }
    // Workloads --only left out keep their last figures, so a partial run
    // does not erase the history of the others.
    for w in previous["workloads"].as_array().into_iter().flatten() {
        let key = w["key"].as_str().unwrap_or_default();
        if !results.iter().any(|r| r["key"] == key) && !skipped.contains_key(key) {
            let mut kept = w.clone();
            kept["not_rerun"] = json!(true);
            results.push(kept);
        }
    }
    let doc = json!({
        "generated": utc_now(),
        "commit": git_commit(),
        "valgrind": String::from_utf8_lossy(&valgrind.stdout).trim(),
        "previous_generated": previous["generated"],
        "previous_commit": previous["commit"],
        "method": METHOD,
        "workloads": results,
        "skipped": skipped,
    });
    let md = markdown(&doc);
    report::write(&out_dir, "callgrind", "bench-callgrind", &md, &doc)
}

fn main() -> ExitCode {
    let args = Args::parse();
    report::exit("bench-callgrind", run(&args))
}
