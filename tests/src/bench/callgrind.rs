//! Reading callgrind's output: the instruction total of a run, the
//! functions that cost most, and the instructions per request of a
//! workload from two runs of different lengths.
//!
//! Instruction counts do not move with the machine's load, so they show a
//! regression of the VMM's own work that the timed benchmarks, ±30% on
//! this shared host, cannot.

use serde_json::{json, Value};

/// The `totals:` (or, failing that, `summary:`) line of a callgrind output
/// file: instructions collected in the whole run.
pub fn total_instructions(out_file: &str) -> Option<u64> {
    let find = |key: &str| {
        out_file
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    find("totals:").or_else(|| find("summary:"))
}

/// Instructions per request from a short and a long run of the same
/// workload: the difference cancels what both runs pay once (the first
/// turn's device activation, warm-up), leaving the steady per-request cost.
pub fn per_request(small: (u64, u64), large: (u64, u64)) -> Option<f64> {
    let (ir_small, req_small) = small;
    let (ir_large, req_large) = large;
    if req_large <= req_small || ir_large < ir_small {
        return None;
    }
    Some((ir_large - ir_small) as f64 / (req_large - req_small) as f64)
}

/// One line of `callgrind_annotate`'s function table.
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionCost {
    /// Instructions (self cost unless the table was inclusive).
    pub instructions: u64,
    /// The function, without the object file suffix.
    pub function: String,
}

/// The function table of `callgrind_annotate` output: lines such as
/// `2,120,020 (11.28%)  ???:vm_memory::...::to_region_addr [/path/bin]`.
pub fn parse_annotate(text: &str) -> Vec<FunctionCost> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let (count, rest) = l.split_once(' ')?;
            let instructions: u64 = count.replace(',', "").parse().ok()?;
            let rest = rest.trim_start();
            // "(11.28%)  file:function [object]"
            let rest = rest
                .strip_prefix('(')
                .and_then(|r| r.split_once(')'))
                .map_or(rest, |(_, r)| r)
                .trim();
            if rest.is_empty() || rest.starts_with("PROGRAM TOTALS") {
                return None;
            }
            let function = rest
                .rsplit_once(" [")
                .map_or(rest, |(f, _)| f)
                .split_once(':')
                .map_or(rest, |(_, f)| f)
                .to_string();
            Some(FunctionCost {
                instructions,
                function,
            })
        })
        .collect()
}

/// The top `n` functions as JSON, each with its instructions per request.
pub fn top_json(costs: &[FunctionCost], requests: u64, n: usize) -> Value {
    json!(costs
        .iter()
        .take(n)
        .map(|c| json!({
            "function": c.function,
            "instructions": c.instructions,
            "per_request": c.instructions as f64 / requests.max(1) as f64,
        }))
        .collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_come_from_the_totals_line() {
        let f =
            "version: 1\ncmd: x\nevents: Ir\nsummary: 18792939\nfn=(1)\n0 5\ntotals: 18792939\n";
        assert_eq!(total_instructions(f), Some(18_792_939));
        assert_eq!(total_instructions("summary: 7\n"), Some(7));
        assert_eq!(total_instructions("nothing"), None);
    }

    #[test]
    fn per_request_subtracts_the_short_run() {
        assert_eq!(per_request((1_000, 100), (10_000, 1_000)), Some(10.0));
        assert_eq!(per_request((1_000, 100), (10_000, 100)), None);
        assert_eq!(per_request((10_000, 100), (1_000, 1_000)), None);
    }

    #[test]
    fn annotate_lines_become_function_costs() {
        let text = "\
--------------------------------------------------------------------------------
18,792,939 (100.0%)  PROGRAM TOTALS
--------------------------------------------------------------------------------
Ir                  file:function
--------------------------------------------------------------------------------
2,120,020 (11.28%)  ???:vm_memory::guest_memory::GuestMemoryBackend::to_region_addr [/work/bench_blk]
1,031,808 ( 5.49%)  ./malloc/./malloc/malloc.c:_int_free [/usr/lib/x86_64-linux-gnu/libc.so.6]
";
        let costs = parse_annotate(text);
        assert_eq!(
            costs,
            [
                FunctionCost {
                    instructions: 2_120_020,
                    function: "vm_memory::guest_memory::GuestMemoryBackend::to_region_addr".into()
                },
                FunctionCost {
                    instructions: 1_031_808,
                    function: "_int_free".into()
                },
            ]
        );
        let top = top_json(&costs, 1000, 1);
        assert_eq!(top.as_array().unwrap().len(), 1);
        assert!((top[0]["per_request"].as_f64().unwrap() - 2120.02).abs() < 1e-9);
    }
}
