//! The last step of `make bench`: gathers the benchmarks' own reports
//! (`blk.json`, `net.json`, `boot.json`, `limit.json`, `callgrind.json` in
//! `target/bench`) into one `report.md`, `report.json` and `report.png`.
//! A benchmark whose file is missing is listed as not run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ringvm_tests::bench::host::HostInfo;
use ringvm_tests::bench::report;
use ringvm_tests::bench::summary::{plot_script, utc_now, Report, Section};
use ringvm_tests::bench::Res;
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(
    about = "Gathers target/bench/{blk,net,boot,limit,callgrind}.json into report.{md,json,png}"
)]
struct Args {
    /// The directory holding the benchmarks' reports, where the report
    /// goes too (default: <workspace>/target/bench).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The benchmarks' reports, in report order: (name, file stem, make target).
const BENCHES: &[(&str, &str, &str)] = &[
    ("blk", "blk", "make bench-blk"),
    ("net", "net", "make bench-net"),
    ("boot", "boot", "make bench-boot"),
    ("limit", "limit", "make bench-limit"),
];

fn run(args: &Args) -> Res<()> {
    let dir = report::out_dir(args.dir.as_deref())?;
    let read = |stem: &str| -> Option<Res<Value>> {
        let path = dir.join(format!("{stem}.json"));
        let text = std::fs::read_to_string(&path).ok()?;
        Some(
            serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display())),
        )
    };
    let host = HostInfo::read();
    let mut r = Report {
        host: format!(
            "{} x {}, kernel {}, load average {}",
            host.cpus, host.cpu, host.kernel, host.loadavg
        ),
        generated: utc_now(),
        ..Report::default()
    };
    for (bench, stem, target) in BENCHES {
        match read(stem) {
            Some(v) => {
                let v = v?;
                r.sections
                    .push(Section::from_report(bench, &format!("{stem}.md"), &v)?);
            }
            None => r.missing.push((
                (*bench).into(),
                format!("{stem}.json not found ({target} writes it)"),
            )),
        }
    }
    match read("callgrind") {
        Some(v) => r.callgrind = Some(v?),
        None => r.missing.push((
            "callgrind".into(),
            "callgrind.json not found (make bench-callgrind writes it)".into(),
        )),
    }
    let plot = r.write(&dir, &plot_script())?;
    eprintln!(
        "bench-report: wrote {} and {}; {plot}",
        dir.join("report.md").display(),
        dir.join("report.json").display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    report::exit("bench-report", run(&args))
}
