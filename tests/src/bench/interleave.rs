//! Rounds of ringvm and its reference measured back to back, so every
//! round yields its own ratio under the machine's load of that moment.
//!
//! On this shared 2-CPU machine a neighbour's build moves fio's own figures
//! by ±30% within a minute. Measuring one side for a long time and then the
//! other compares two different machines; measuring them in alternation
//! and taking the ratio within each round compares like with like, and the
//! median over rounds drops the rounds a burst of load hit. The order
//! alternates too (ringvm first in even rounds, the reference first in odd
//! ones), so whichever side runs second in a warmer page cache or a cooler
//! CPU is not always the same one.

use super::host::{HostCpu, Own};
use super::Res;

/// One round: ringvm's and the reference's measurement, taken back to back.
#[derive(Clone, Debug)]
pub struct Round<A, B> {
    /// ringvm's side.
    pub ringvm: A,
    /// The reference's side (fio, direct tap, QEMU, ...).
    pub reference: B,
    /// Whether ringvm ran first in this round.
    pub ringvm_first: bool,
    /// CPUs the rest of the machine kept busy on average during the round.
    pub others_cpus: f64,
}

/// Runs `rounds` rounds of `ringvm` and `reference` (each given the round's
/// index), alternating which goes first, and samples the machine's other
/// load around each round. `own` says whose CPU time is ours (this process,
/// or also its waited-for children such as fio or a VMM under test).
/// Stops at the first error.
pub fn interleave<A, B>(
    rounds: u32,
    own: Own,
    mut ringvm: impl FnMut(u32) -> Res<A>,
    mut reference: impl FnMut(u32) -> Res<B>,
) -> Res<Vec<Round<A, B>>> {
    let mut out = Vec::with_capacity(rounds as usize);
    for round in 0..rounds {
        let ringvm_first = round % 2 == 0;
        let before = HostCpu::sample(own)?;
        let (a, b) = if ringvm_first {
            let a = ringvm(round)?;
            (a, reference(round)?)
        } else {
            let b = reference(round)?;
            (ringvm(round)?, b)
        };
        let others_cpus = HostCpu::sample(own)?.others_since(&before);
        out.push(Round {
            ringvm: a,
            reference: b,
            ringvm_first,
            others_cpus,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn alternates_the_order_and_keeps_each_rounds_pair() {
        let log = RefCell::new(Vec::new());
        let rounds = interleave(
            4,
            Own::Process,
            |r| {
                log.borrow_mut().push(format!("A{r}"));
                Ok(r * 10)
            },
            |r| {
                log.borrow_mut().push(format!("B{r}"));
                Ok(r * 10 + 1)
            },
        )
        .unwrap();
        assert_eq!(
            log.into_inner(),
            ["A0", "B0", "B1", "A1", "A2", "B2", "B3", "A3"]
        );
        let pairs: Vec<_> = rounds
            .iter()
            .map(|r| (r.ringvm, r.reference, r.ringvm_first))
            .collect();
        assert_eq!(
            pairs,
            [
                (0, 1, true),
                (10, 11, false),
                (20, 21, true),
                (30, 31, false)
            ]
        );
        assert!(rounds.iter().all(|r| r.others_cpus >= 0.0));
    }

    #[test]
    fn stops_at_the_first_error() {
        let mut calls = 0;
        let out = interleave(
            3,
            Own::Process,
            |r| if r == 1 { Err("boom".into()) } else { Ok(()) },
            |_| {
                calls += 1;
                Ok(())
            },
        );
        assert_eq!(out.unwrap_err(), "boom");
        // Round 0 (A then B), round 1 runs B first, then A fails.
        assert_eq!(calls, 2);
    }
}
