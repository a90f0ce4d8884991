//! One row of the benchmark report, the same for every benchmark: a point
//! (a workload, or a boot-time figure), ringvm's and the reference's figure
//! in each round, and the ratio the targets speak about. Every benchmark
//! writes its points in this one shape, so `make bench` can put them all in
//! one table and one plot without knowing what each measured.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::stats::Spread;

/// Which direction of a figure is good: throughput wants more, time and
/// memory want less. Decides how a target is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Rates: IOPS, MiB/s, packets/s.
    Higher,
    /// Costs: milliseconds, KiB, CPU time.
    Lower,
    /// A figure meant to equal its reference, e.g. a rate held at a set
    /// limit: too much is as wrong as too little.
    Near,
}

/// The bound the project set for a point's median ratio (ringvm /
/// reference), and where it comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// The median ratio must be at least this (Better::Higher), at most
    /// this (Better::Lower), or within `ratio..=2 - ratio` (Better::Near:
    /// 0.95 means within ±5% of the reference).
    pub ratio: f64,
    /// Where the bound comes from, e.g. "issue 14".
    pub source: String,
}

/// One round of a point: both sides' figures and the machine's other load.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PointRound {
    /// ringvm's figure in this round.
    pub ringvm: f64,
    /// The reference's figure in the same round.
    pub reference: f64,
    /// CPUs other processes kept busy on average during the round.
    pub others_cpus: f64,
}

impl PointRound {
    /// ringvm / reference; NaN when the reference is not positive (a ratio
    /// against nothing means nothing).
    pub fn ratio(&self) -> f64 {
        if self.reference > 0.0 {
            self.ringvm / self.reference
        } else {
            f64::NAN
        }
    }
}

/// One benchmark point with all its rounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Which benchmark: "blk", "net", "boot".
    pub bench: String,
    /// Stable name of the point within its benchmark (what --only matches).
    pub key: String,
    /// The unit of both sides' figures ("IOPS", "MiB/s", "pkt/s", "ms", "KiB").
    pub unit: String,
    /// What ringvm is compared with ("fio io_uring", "direct tap", ...).
    pub reference: String,
    /// Which direction is good.
    pub better: Better,
    /// The rounds, in the order they ran.
    pub rounds: Vec<PointRound>,
    /// The project's bound on the median ratio, if there is one.
    pub target: Option<Target>,
    /// Anything the reader needs next to the figures (one line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Point {
    /// The per-round ratios, in round order.
    pub fn ratios(&self) -> Vec<f64> {
        self.rounds.iter().map(PointRound::ratio).collect()
    }

    /// Median and spread of the per-round ratios.
    pub fn ratio(&self) -> Option<Spread> {
        Spread::of(&self.ratios())
    }

    /// Median and spread of ringvm's figures.
    pub fn ringvm(&self) -> Option<Spread> {
        Spread::of(&self.rounds.iter().map(|r| r.ringvm).collect::<Vec<_>>())
    }

    /// Median and spread of the reference's figures.
    pub fn reference_spread(&self) -> Option<Spread> {
        Spread::of(&self.rounds.iter().map(|r| r.reference).collect::<Vec<_>>())
    }

    /// Median and spread of the machine's other load over the rounds.
    pub fn others(&self) -> Option<Spread> {
        Spread::of(
            &self
                .rounds
                .iter()
                .map(|r| r.others_cpus)
                .collect::<Vec<_>>(),
        )
    }

    /// Whether the median ratio meets the target; `None` without a target
    /// or without a ratio.
    pub fn target_met(&self) -> Option<bool> {
        let t = self.target.as_ref()?;
        let m = self.ratio()?.median;
        Some(match self.better {
            Better::Higher => m >= t.ratio,
            Better::Lower => m <= t.ratio,
            Better::Near => (t.ratio..=2.0 - t.ratio).contains(&m),
        })
    }

    /// The point as JSON, with the derived statistics added for readers
    /// that do not recompute them (the plot, a person with `jq`).
    pub fn json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            let s = |x: Option<Spread>| x.map_or(Value::Null, |s| s.json());
            m.insert("ratios".into(), serde_json::json!(self.ratios()));
            m.insert("ratio".into(), s(self.ratio()));
            m.insert("ringvm_spread".into(), s(self.ringvm()));
            m.insert("reference_spread".into(), s(self.reference_spread()));
            m.insert("others_cpus".into(), s(self.others()));
            m.insert("target_met".into(), serde_json::json!(self.target_met()));
        }
        v
    }

    /// Reads a point back from [`Point::json`]'s form (the derived fields
    /// are ignored and recomputed).
    pub fn from_json(v: &Value) -> Result<Self, String> {
        serde_json::from_value(v.clone()).map_err(|e| format!("not a benchmark point: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(better: Better, target: f64, pairs: &[(f64, f64)]) -> Point {
        Point {
            bench: "blk".into(),
            key: "tmpfs randread 4k QD32".into(),
            unit: "IOPS".into(),
            reference: "fio io_uring".into(),
            better,
            rounds: pairs
                .iter()
                .map(|&(a, b)| PointRound {
                    ringvm: a,
                    reference: b,
                    others_cpus: 0.1,
                })
                .collect(),
            target: Some(Target {
                ratio: target,
                source: "issue 14".into(),
            }),
            note: None,
        }
    }

    #[test]
    fn ratio_is_the_median_of_per_round_ratios() {
        // Round ratios 0.5, 1.0, 0.9: median 0.9, although the medians of
        // the sides (100 / 100) would say 1.0.
        let p = point(
            Better::Higher,
            0.9,
            &[(50.0, 100.0), (100.0, 100.0), (180.0, 200.0)],
        );
        let r = p.ratio().unwrap();
        assert!((r.median - 0.9).abs() < 1e-12);
        assert_eq!((r.min, r.max), (0.5, 1.0));
        assert_eq!(p.target_met(), Some(true));
    }

    #[test]
    fn lower_is_better_reads_the_target_as_a_ceiling() {
        let p = point(Better::Lower, 0.5, &[(40.0, 100.0), (60.0, 100.0)]);
        assert_eq!(p.target_met(), Some(true));
        let p = point(Better::Lower, 0.5, &[(60.0, 100.0), (70.0, 100.0)]);
        assert_eq!(p.target_met(), Some(false));
    }

    #[test]
    fn near_is_met_within_the_band_either_way() {
        for (got, met) in [(94.0, false), (95.5, true), (104.5, true), (106.0, false)] {
            let p = point(Better::Near, 0.95, &[(got, 100.0)]);
            assert_eq!(p.target_met(), Some(met), "{got}");
        }
    }

    #[test]
    fn a_zero_reference_gives_no_ratio() {
        let p = point(Better::Higher, 0.9, &[(1.0, 0.0)]);
        assert!(p.ratio().is_none());
        assert_eq!(p.target_met(), None);
    }

    #[test]
    fn json_round_trips_and_carries_the_statistics() {
        let p = point(Better::Higher, 0.9, &[(90.0, 100.0), (80.0, 100.0)]);
        let v = p.json();
        assert!((v["ratio"]["median"].as_f64().unwrap() - 0.85).abs() < 1e-12);
        assert_eq!(v["target_met"], Value::Bool(false));
        assert_eq!(Point::from_json(&v).unwrap(), p);
    }
}
