//! Order statistics of a handful of per-round figures: the median and the
//! spread the reports print beside it. On a shared machine a mean of a few
//! rounds is dragged by one disturbed round; the median is not, and the
//! spread says how far to trust it.

use serde_json::{json, Value};

/// Median and spread of a set of figures (e.g. the per-round ratios of one
/// benchmark point).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// How many figures.
    pub n: usize,
    /// The middle figure (mean of the two middle ones for an even count).
    pub median: f64,
    /// Smallest figure.
    pub min: f64,
    /// Largest figure.
    pub max: f64,
    /// First quartile (linear interpolation between order statistics).
    pub q1: f64,
    /// Third quartile.
    pub q3: f64,
}

impl Spread {
    /// The statistics of `values`, ignoring NaNs; `None` when none is left.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Self {
            n: v.len(),
            median: quantile(&v, 0.5),
            min: v[0],
            max: v[v.len() - 1],
            q1: quantile(&v, 0.25),
            q3: quantile(&v, 0.75),
        })
    }

    /// Interquartile range relative to the median: a unit-free "how noisy".
    pub fn relative_iqr(&self) -> f64 {
        (self.q3 - self.q1) / self.median.abs().max(f64::MIN_POSITIVE)
    }

    /// The JSON form the reports carry.
    pub fn json(&self) -> Value {
        json!({
            "n": self.n,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "q1": self.q1,
            "q3": self.q3,
        })
    }

    /// Reads back what [`Spread::json`] wrote.
    pub fn from_json(v: &Value) -> Option<Self> {
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        Some(Self {
            n: usize::try_from(v.get("n")?.as_u64()?).ok()?,
            median: f("median")?,
            min: f("min")?,
            max: f("max")?,
            q1: f("q1")?,
            q3: f("q3")?,
        })
    }
}

/// Quantile `p` (0..=1) of sorted, non-empty `v`, interpolating linearly
/// between the two nearest order statistics (R's type 7, numpy's default),
/// so the figures match what a reader recomputes from the JSON.
fn quantile(v: &[f64], p: f64) -> f64 {
    let pos = p.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Median of `values`, NaN when there is none.
pub fn median(values: &[f64]) -> f64 {
    Spread::of(values).map_or(f64::NAN, |s| s.median)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_count_takes_the_middle() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max), (3, 2.0, 1.0, 3.0));
        assert_eq!((s.q1, s.q3), (1.5, 2.5));
    }

    #[test]
    fn even_count_averages_the_middle_two() {
        let s = Spread::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!((s.q1, s.q3), (1.75, 3.25));
    }

    #[test]
    fn one_disturbed_round_does_not_move_the_median() {
        let s = Spread::of(&[0.9, 0.91, 0.2, 0.92, 0.89]).unwrap();
        assert_eq!(s.median, 0.9);
        assert_eq!(s.min, 0.2);
    }

    #[test]
    fn nans_are_ignored_and_empty_is_none() {
        assert!(Spread::of(&[]).is_none());
        assert!(Spread::of(&[f64::NAN]).is_none());
        assert_eq!(Spread::of(&[f64::NAN, 5.0]).unwrap().median, 5.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn json_round_trips() {
        let s = Spread::of(&[1.0, 2.0, 4.0, 8.0]).unwrap();
        assert_eq!(Spread::from_json(&s.json()), Some(s));
    }
}
