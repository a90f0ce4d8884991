//! `make bench`'s one report: every benchmark's points in one markdown
//! table per benchmark, one JSON file, and one PNG plot of the per-round
//! ratios, so a reader sees every figure, its median and its spread on one
//! page, and the noise-free instruction counts beside them.
//!
//! The benchmarks write their own files (`blk.json`, `net.json`,
//! `boot.json`, `limit.json`, `callgrind.json`) with their points in the shape of
//! [`Point`]; this module only gathers them. A benchmark that did not run
//! is listed as such, never left out silently.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use super::points::{Better, Point};
use super::Res;

/// One benchmark's share of the report.
#[derive(Clone, Debug)]
pub struct Section {
    /// Short name ("blk", "net", "boot").
    pub bench: String,
    /// Heading of its table.
    pub title: String,
    /// One paragraph on how it was run (rounds, seconds, files, ...).
    pub settings: String,
    /// Its detail report beside this one (e.g. "blk.md").
    pub detail: String,
    /// Its points.
    pub points: Vec<Point>,
    /// Lines the benchmark wants repeated under its table.
    pub notes: Vec<String>,
}

impl Section {
    /// Reads a benchmark's JSON report: its `points`, and its `summary`
    /// object's `title`, `settings` and `notes`.
    pub fn from_report(bench: &str, detail: &str, report: &Value) -> Res<Self> {
        let points = report["points"]
            .as_array()
            .ok_or_else(|| format!("the {bench} report has no points"))?
            .iter()
            .map(Point::from_json)
            .collect::<Res<Vec<_>>>()?;
        let text = |k: &str| {
            report["summary"][k]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        Ok(Self {
            bench: bench.into(),
            title: text("title"),
            settings: text("settings"),
            detail: detail.into(),
            points,
            notes: report["summary"]["notes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|n| n.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// The `summary` object a benchmark puts in its JSON report so this module
/// can title and describe its section.
pub fn summary_json(title: &str, settings: &str, notes: &[String]) -> Value {
    json!({"title": title, "settings": settings, "notes": notes})
}

/// Everything `make bench` reports.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The host line (kernel, CPUs, load).
    pub host: String,
    /// When the report was made (UTC).
    pub generated: String,
    /// The benchmarks that ran, in report order.
    pub sections: Vec<Section>,
    /// Benchmarks that did not run, with why.
    pub missing: Vec<(String, String)>,
    /// The callgrind figures (`callgrind.json`), if measured.
    pub callgrind: Option<Value>,
}

/// "1.23x" style ratio, or "-".
fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}x"))
}

/// A figure in its unit, short.
pub fn fmt_value(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    let n = if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
    .replace(".0k", "k");
    format!("{n} {unit}")
}

fn target_text(p: &Point) -> String {
    match (&p.target, p.target_met()) {
        (Some(t), met) => format!(
            "{}: {}",
            match p.better {
                Better::Higher => format!("≥{:.2}x", t.ratio),
                Better::Lower => format!("≤{:.2}x", t.ratio),
                Better::Near => format!("1.00±{:.2}x", 1.0 - t.ratio),
            },
            match met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "no figure",
            }
        ),
        (None, _) => "-".into(),
    }
}

impl Report {
    /// The markdown page.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# ringvm benchmark report\n");
        let _ = writeln!(s, "Generated {} on {}.\n", self.generated, self.host);
        let _ = writeln!(
            s,
            "Every point ran ringvm and its reference in alternation, N rounds (ringvm first in even rounds, the reference first in odd ones). **ratio** = ringvm / reference within one round; the table gives the median of the per-round ratios, their range (min–max) and interquartile range, and the CPUs the rest of the machine kept busy during the rounds (median, max). For rates (IOPS, pkt/s) higher is better; for costs (ms, KiB) lower is better; for a rate held at a set limit (bench-limit: reference = the limit) the ratio should be 1.00. The per-round ratios are plotted in `report.png`.\n"
        );
        self.targets_markdown(&mut s);
        for sec in &self.sections {
            let _ = writeln!(s, "## {} ({})\n", sec.title, sec.bench);
            if !sec.settings.is_empty() {
                let _ = writeln!(s, "{}\n", sec.settings);
            }
            let _ = writeln!(
                s,
                "| point | ringvm | reference | reference figure | ratio (median) | min–max | IQR | rounds | others' CPUs | target |"
            );
            let _ = writeln!(s, "|---|---:|---|---:|---:|---|---|---:|---|---|");
            for p in &sec.points {
                let ratio = p.ratio();
                let others = p.others();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    p.key,
                    fmt_value(p.ringvm().map_or(f64::NAN, |x| x.median), &p.unit),
                    p.reference,
                    fmt_value(p.reference_spread().map_or(f64::NAN, |x| x.median), &p.unit),
                    fmt_ratio(ratio.map(|r| r.median)),
                    ratio.map_or("-".into(), |r| format!("{:.2}–{:.2}", r.min, r.max)),
                    ratio.map_or("-".into(), |r| format!("{:.2}–{:.2}", r.q1, r.q3)),
                    p.rounds.len(),
                    others.map_or("-".into(), |o| format!("{:.2} ({:.2})", o.median, o.max)),
                    target_text(p),
                );
            }
            for n in &sec.notes {
                let _ = writeln!(s, "\n- {n}");
            }
            let notes_with_points: Vec<&Point> =
                sec.points.iter().filter(|p| p.note.is_some()).collect();
            if !notes_with_points.is_empty() {
                let _ = writeln!(s);
                for p in notes_with_points {
                    let _ = writeln!(s, "- {}: {}", p.key, p.note.as_deref().unwrap_or(""));
                }
            }
            let _ = writeln!(s, "\nDetails: `{}`.\n", sec.detail);
        }
        if let Some(cg) = &self.callgrind {
            callgrind_markdown(&mut s, cg);
        }
        if !self.missing.is_empty() {
            let _ = writeln!(s, "## Not in this report\n");
            for (bench, why) in &self.missing {
                let _ = writeln!(s, "- {bench}: {why}");
            }
            let _ = writeln!(s);
        }
        s
    }

    fn targets_markdown(&self, s: &mut String) {
        let with_targets: Vec<(&Section, &Point)> = self
            .sections
            .iter()
            .flat_map(|sec| sec.points.iter().map(move |p| (sec, p)))
            .filter(|(_, p)| p.target.is_some())
            .collect();
        if with_targets.is_empty() {
            return;
        }
        let met = with_targets
            .iter()
            .filter(|(_, p)| p.target_met() == Some(true))
            .count();
        let _ = writeln!(
            s,
            "## Targets: {met} of {} met\n\n| bench | point | median ratio (min–max) | target | source |\n|---|---|---:|---|---|",
            with_targets.len()
        );
        for (sec, p) in with_targets {
            let r = p.ratio();
            let _ = writeln!(
                s,
                "| {} | {} | {} ({}) | {} | {} |",
                sec.bench,
                p.key,
                fmt_ratio(r.map(|r| r.median)),
                r.map_or("-".into(), |r| format!("{:.2}–{:.2}", r.min, r.max)),
                target_text(p),
                p.target.as_ref().map_or("", |t| t.source.as_str()),
            );
        }
        let _ = writeln!(s);
    }

    /// The JSON file: every point with its statistics, the callgrind
    /// figures and what did not run.
    pub fn json(&self) -> Value {
        json!({
            "generated": self.generated,
            "host": self.host,
            "sections": self.sections.iter().map(|sec| json!({
                "bench": sec.bench,
                "title": sec.title,
                "settings": sec.settings,
                "detail": sec.detail,
                "notes": sec.notes,
                "points": sec.points.iter().map(Point::json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "callgrind": self.callgrind,
            "missing": self.missing.iter().map(|(b, w)| json!({"bench": b, "why": w})).collect::<Vec<_>>(),
        })
    }

    /// Writes `report.md`, `report.json` and (through the plot script)
    /// `report.png` into `dir`; returns the PNG's fate as a line for the
    /// person running it (the plot needs matplotlib: a missing one is
    /// reported, the markdown and JSON are written regardless).
    pub fn write(&self, dir: &Path, plot_script: &Path) -> Res<String> {
        let md = dir.join("report.md");
        let js = dir.join("report.json");
        let png = dir.join("report.png");
        std::fs::write(&md, self.markdown())
            .map_err(|e| format!("cannot write {}: {e}", md.display()))?;
        let text = serde_json::to_string_pretty(&self.json())
            .map_err(|e| format!("cannot encode the report: {e}"))?;
        std::fs::write(&js, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", js.display()))?;
        plot(plot_script, &js, &png)
    }
}

fn callgrind_markdown(s: &mut String, cg: &Value) {
    let _ = writeln!(
        s,
        "## Instructions per request on the VMM thread (callgrind, noise-free)\n"
    );
    if let Some(how) = cg["method"].as_str() {
        let _ = writeln!(s, "{how}\n");
    }
    let _ = writeln!(
        s,
        "| workload | instructions / request | previous run | change | requests (large − small run) |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    for w in cg["workloads"].as_array().into_iter().flatten() {
        let now = w["instructions_per_request"].as_f64();
        let prev = w["previous"].as_f64();
        let change = match (now, prev) {
            (Some(n), Some(p)) if p > 0.0 => format!("{:+.1}%", (n / p - 1.0) * 100.0),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            w["key"].as_str().unwrap_or("?"),
            now.map_or("-".into(), |v| format!("{v:.0}")),
            prev.map_or("-".into(), |v| format!("{v:.0}")),
            change,
            w["requests"].as_u64().map_or("-".into(), |v| v.to_string()),
        );
    }
    let _ = writeln!(s, "\nDetails: `callgrind.md`.\n");
}

/// Candidate interpreters for the plot script: Debian's python3 (where
/// `make bench-deps` installs python3-matplotlib) before whatever
/// `python3` is first on PATH.
const PYTHONS: &[&str] = &["/usr/bin/python3", "python3"];

/// Runs the plot script on `json`, writing `png`. A missing matplotlib is
/// not an error of the benchmarks: it is reported in the returned line.
pub fn plot(script: &Path, json: &Path, png: &Path) -> Res<String> {
    let python = PYTHONS.iter().find(|p| {
        Command::new(p)
            .args(["-c", "import matplotlib"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(python) = python else {
        return Ok(format!(
            "no plot: no python3 with matplotlib (make bench-deps installs python3-matplotlib); {} not written",
            png.display()
        ));
    };
    let out = Command::new(python)
        .arg(script)
        .arg(json)
        .arg(png)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(format!("wrote {}", png.display()))
}

/// The plot script in the source tree.
pub fn plot_script() -> PathBuf {
    crate::workspace_root().join("tests/scripts/plot_report.py")
}

/// Today's date and time in UTC, "YYYY-MM-DD HH:MM UTC", from the system
/// clock (days to civil date after Howard Hinnant's algorithm).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::points::{PointRound, Target};

    fn sample_report() -> Report {
        let point = |key: &str, better, target: Option<f64>, pairs: &[(f64, f64)]| Point {
            bench: "blk".into(),
            key: key.into(),
            unit: "IOPS".into(),
            reference: if key.ends_with("vs QEMU") {
                "QEMU block layer (qemu-img bench, io_uring)"
            } else {
                "fio io_uring"
            }
            .into(),
            better,
            rounds: pairs
                .iter()
                .map(|&(a, b)| PointRound {
                    ringvm: a,
                    reference: b,
                    others_cpus: 0.25,
                })
                .collect(),
            target: target.map(|r| Target {
                ratio: r,
                source: "issue 14".into(),
            }),
            note: None,
        };
        Report {
            host: "test host".into(),
            generated: utc_now(),
            sections: vec![Section {
                bench: "blk".into(),
                title: "virtio-blk vs fio".into(),
                settings: "3 rounds".into(),
                detail: "blk.md".into(),
                points: vec![
                    point(
                        "tmpfs randread 4k QD32",
                        Better::Higher,
                        Some(0.9),
                        &[(90e3, 100e3), (95e3, 100e3), (50e3, 100e3)],
                    ),
                    // A second reference: the plot gives it its own panel.
                    point(
                        "tmpfs randread 4k QD32 vs QEMU",
                        Better::Higher,
                        None,
                        &[(90e3, 80e3), (95e3, 100e3), (50e3, 50e3)],
                    ),
                    point(
                        "boot API ready",
                        Better::Lower,
                        Some(0.5),
                        &[(10.0, 30.0), (11.0, 30.0)],
                    ),
                    point(
                        "blk bandwidth limit",
                        Better::Near,
                        Some(0.95),
                        &[(101.0, 100.0), (99.0, 100.0), (100.0, 100.0)],
                    ),
                ],
                notes: vec!["a note".into()],
            }],
            missing: vec![("net".into(), "net.json is missing".into())],
            callgrind: Some(json!({
                "method": "how",
                "workloads": [{"key": "blk tmpfs randread 4k QD1", "instructions_per_request": 11000.0, "previous": 10000.0, "requests": 1800}],
            })),
        }
    }

    #[test]
    fn markdown_has_every_point_its_median_spread_and_target() {
        let md = sample_report().markdown();
        assert!(md.contains("| tmpfs randread 4k QD32 | 90k IOPS | fio io_uring | 100k IOPS | 0.90x | 0.50–0.95 |"), "{md}");
        assert!(md.contains("≥0.90x: met"), "{md}");
        assert!(md.contains("≤0.50x: met"), "{md}");
        assert!(md.contains("1.00±0.05x: met"), "{md}");
        assert!(md.contains("## Targets: 3 of 3 met"), "{md}");
        assert!(
            md.contains("| tmpfs randread 4k QD32 vs QEMU | 90k IOPS | QEMU block layer (qemu-img bench, io_uring) | 80k IOPS | 1.00x | 0.95–1.12 |"),
            "{md}"
        );
        assert!(
            md.contains("| blk tmpfs randread 4k QD1 | 11000 | 10000 | +10.0% | 1800 |"),
            "{md}"
        );
        assert!(md.contains("- net: net.json is missing"), "{md}");
    }

    #[test]
    fn json_sections_read_back_as_sections() {
        let r = sample_report();
        let v = r.json();
        let sec = &v["sections"][0];
        let back = Section::from_report(
            "blk",
            "blk.md",
            &json!({"points": sec["points"], "summary": summary_json("virtio-blk vs fio", "3 rounds", &["a note".into()])}),
        )
        .unwrap();
        assert_eq!(back.points, r.sections[0].points);
        assert_eq!(back.title, "virtio-blk vs fio");
        assert_eq!(back.notes, ["a note"]);
    }

    /// The whole path `make bench` takes at its end, plot included when
    /// this machine has matplotlib (said on stderr when it does not).
    #[test]
    fn writes_markdown_json_and_png() {
        let dir = std::env::temp_dir().join(format!("ringvm-summary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let line = sample_report().write(&dir, &plot_script()).unwrap();
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert!(md.starts_with("# ringvm benchmark report"));
        let js: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap())
                .unwrap();
        assert_eq!(js["sections"][0]["points"].as_array().unwrap().len(), 4);
        if line.starts_with("no plot") {
            eprintln!("SKIPPED the PNG part: {line}");
        } else {
            let png = std::fs::read(dir.join("report.png")).unwrap();
            assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{line}");
            assert!(png.len() > 5000, "a plot of {} bytes", png.len());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn utc_now_looks_like_a_date() {
        let d = utc_now();
        assert_eq!(d.len(), "2026-01-01 00:00 UTC".len(), "{d}");
        assert!(d.starts_with("20"), "{d}");
    }

    #[test]
    fn values_are_short() {
        assert_eq!(fmt_value(123_456.0, "IOPS"), "123.5k IOPS");
        assert_eq!(fmt_value(90_000.0, "IOPS"), "90k IOPS");
        assert_eq!(fmt_value(1_234_567.0, "pkt/s"), "1.23M pkt/s");
        assert_eq!(fmt_value(12.345, "ms"), "12.3 ms");
        assert_eq!(fmt_value(f64::NAN, "ms"), "-");
    }
}
