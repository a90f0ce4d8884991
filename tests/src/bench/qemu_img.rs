//! QEMU's block layer as a second reference for `make bench-blk`, driven
//! by `qemu-img bench` (Debian's qemu-utils).
//!
//! A QEMU guest cannot measure QEMU's data plane on this machine (guest
//! code runs in KVM's instruction emulator), but `qemu-img bench` runs
//! QEMU's own block layer without a guest: it opens the file as a
//! BlockBackend (the same `blk_aio_preadv`/`blk_aio_pwritev` path its
//! virtio-blk device and IOThread data plane call) and keeps a queue depth
//! of requests in flight on QEMU's event loop, with the AIO engine and
//! cache mode a QEMU user would pick for the same file (`aio=io_uring`,
//! `cache=none` for O_DIRECT, `cache=writeback` for buffered). What it
//! leaves out is virtio (no queue, no guest, no notifications), so its
//! rate bounds what QEMU's data plane could reach on the same file:
//! ringvm / QEMU >= 1 means ringvm, virtio included, beats QEMU's block
//! layer alone.
//!
//! `qemu-img bench` has no random mode: request k goes to offset
//! `k * step mod file size`. [`full_cycle_step`] picks a step that is a
//! whole number of blocks coprime with the file's block count and far from
//! neighbouring blocks, so the offsets visit every block once per pass in
//! a scattered order, as fio's random map does; for a file held in the
//! page cache (tmpfs, buffered ext4) the order costs nothing either way,
//! and with O_DIRECT no two consecutive requests are adjacent.

use std::process::Command;
use std::time::Duration;

use super::Res;

/// The program; Debian ships it in qemu-utils (`make bench-deps`).
pub const QEMU_IMG: &str = "qemu-img";

/// What `qemu-img bench` is asked to run: one workload on one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchSpec {
    /// The file, opened as a raw image.
    pub file: String,
    /// O_DIRECT (`-t none`) instead of the host page cache (`-t writeback`).
    pub direct: bool,
    /// Bytes per request (`-s`).
    pub block: u64,
    /// Requests in flight (`-d`).
    pub depth: usize,
    /// Writes (`-w`) instead of reads.
    pub write: bool,
    /// Bytes between consecutive requests' offsets (`-S`).
    pub step: u64,
    /// Requests in all (`-c`).
    pub count: u64,
    /// A flush after every this many requests, issued without draining
    /// the queue first (`--flush-interval`, `--no-drain`); 0: none.
    pub flush_every: u32,
}

impl BenchSpec {
    /// The command line: raw format, aio=io_uring, the cache mode by
    /// `direct`.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "bench".to_string(),
            "-f".into(),
            "raw".into(),
            "-i".into(),
            "io_uring".into(),
            "-t".into(),
            if self.direct { "none" } else { "writeback" }.into(),
            "-c".into(),
            self.count.to_string(),
            "-d".into(),
            self.depth.to_string(),
            "-s".into(),
            self.block.to_string(),
            "-S".into(),
            self.step.to_string(),
        ];
        if self.write {
            a.push("-w".into());
        }
        if self.flush_every > 0 {
            a.push(format!("--flush-interval={}", self.flush_every));
            a.push("--no-drain".into());
        }
        a.push(self.file.clone());
        a
    }

    /// The command as a person would type it, for the report.
    pub fn command(&self) -> String {
        format!("{QEMU_IMG} {}", self.args().join(" "))
    }
}

/// What one `qemu-img bench` run printed, parsed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BenchOutput {
    /// Requests it said it sends.
    pub requests: u64,
    /// Bytes per request it said it uses.
    pub block: u64,
    /// Requests in flight it said it keeps.
    pub depth: u64,
    /// Whether it said the requests are writes.
    pub write: bool,
    /// "Run completed in N seconds": from the first submission to the
    /// last completion, start-up and image opening excluded.
    pub seconds: f64,
}

/// Parses `qemu-img bench`'s stdout:
///
/// ```text
/// Sending 200000 read requests, 4096 bytes each, 32 in parallel (starting at offset 0, step size 4096)
/// Sending flush every 32 requests
/// Run completed in 1.611 seconds.
/// ```
///
/// Anything else (a missing line, a zero time) is an error: a figure
/// that cannot be read must not become one.
pub fn parse_output(text: &str) -> Res<BenchOutput> {
    let sending = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Sending "))
        .filter(|rest| !rest.starts_with("flush"))
        .ok_or("no \"Sending N ... requests\" line")?;
    let words: Vec<&str> = sending.split_whitespace().collect();
    let num = |i: usize, what: &str| -> Res<u64> {
        words
            .get(i)
            .map(|w| w.trim_end_matches(','))
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| format!("cannot read the {what} in \"Sending {sending}\""))
    };
    // Sending <n> <read|write> requests, <bytes> bytes each, <depth> in parallel ...
    let requests = num(0, "request count")?;
    let write = match words.get(1) {
        Some(&"write") => true,
        Some(&"read") => false,
        _ => return Err(format!("neither read nor write in \"Sending {sending}\"")),
    };
    if words.get(2) != Some(&"requests,") || words.get(4) != Some(&"bytes") {
        return Err(format!("unexpected \"Sending {sending}\""));
    }
    let block = num(3, "request size")?;
    let depth = num(6, "queue depth")?;
    let seconds: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Run completed in "))
        .and_then(|r| r.strip_suffix(" seconds."))
        .ok_or("no \"Run completed in N seconds.\" line")?
        .trim()
        .parse()
        .map_err(|e| format!("cannot read the run time: {e}"))?;
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!(
            "run time {seconds} s: too short to give a rate (more requests needed)"
        ));
    }
    Ok(BenchOutput {
        requests,
        block,
        depth,
        write,
        seconds,
    })
}

/// A step of whole blocks, coprime with the file's block count, near the
/// golden-ratio point of the file: `k * step mod size` then visits every
/// block exactly once per `size / block` requests, consecutive requests
/// land far apart, and it wraps inside the file. `qemu-img` takes steps up
/// to `i32::MAX` bytes; `None` when the file is too big for that, or
/// smaller than two blocks.
pub fn full_cycle_step(file_bytes: u64, block: u64) -> Option<u64> {
    if block == 0 {
        return None;
    }
    let blocks = file_bytes / block;
    if blocks < 2 {
        return None;
    }
    // 0.618... of the file, in blocks, then up to the next coprime count.
    let mut s = ((blocks as f64) * 0.618_033_988_75) as u64;
    s = s.clamp(1, blocks - 1);
    while gcd(s, blocks) != 1 {
        s += 1;
    }
    let step = s.checked_mul(block)?;
    (step <= i32::MAX as u64).then_some(step)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// One measured run.
#[derive(Clone, Debug)]
pub struct QemuRun {
    /// Requests completed (the flushes of a flush row not counted).
    pub requests: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// qemu-img's own run time.
    pub seconds: f64,
    /// The whole qemu-img process's CPU time (user + system), its io-wq
    /// workers and start-up included, from getrusage(RUSAGE_CHILDREN).
    pub cpu_ns: u64,
    /// The command that ran.
    pub command: String,
}

impl QemuRun {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    /// MiB per second.
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.seconds
    }

    /// CPU per request, µs.
    pub fn cpu_us_per_req(&self) -> f64 {
        self.cpu_ns as f64 / 1000.0 / self.requests.max(1) as f64
    }
}

/// `qemu-img --version`'s first line, or why there is no qemu-img.
pub fn version() -> Res<String> {
    match Command::new(QEMU_IMG).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("qemu-img")
            .trim()
            .to_string()),
        Ok(o) => Err(format!(
            "`qemu-img --version` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!(
            "qemu-img not found ({e}); `make bench-deps` installs qemu-utils"
        )),
    }
}

/// Runs `spec` and checks that qemu-img did what was asked.
pub fn run(spec: &BenchSpec) -> Res<QemuRun> {
    let cpu0 = children_cpu_ns();
    let out = Command::new(QEMU_IMG)
        .args(spec.args())
        .output()
        .map_err(|e| format!("cannot run {QEMU_IMG}: {e}"))?;
    let cpu_ns = children_cpu_ns().saturating_sub(cpu0);
    if !out.status.success() {
        return Err(format!(
            "`{}` failed: {}",
            spec.command(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let o = parse_output(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| format!("`{}`: {e}", spec.command()))?;
    if (o.requests, o.block, o.depth, o.write)
        != (spec.count, spec.block, spec.depth as u64, spec.write)
    {
        return Err(format!(
            "`{}` ran {} {} requests of {} bytes at depth {}, not what was asked",
            spec.command(),
            o.requests,
            if o.write { "write" } else { "read" },
            o.block,
            o.depth
        ));
    }
    Ok(QemuRun {
        requests: o.requests,
        bytes: o.requests * o.block,
        seconds: o.seconds,
        cpu_ns,
        command: spec.command(),
    })
}

/// A request count that takes about `secs` at `rate` requests/s: at least
/// a few queue depths, at most what qemu-img's `-c` takes (an int).
pub fn count_for(rate: f64, secs: Duration, depth: usize) -> u64 {
    let want = (rate.max(1.0) * secs.as_secs_f64()).round();
    let floor = (depth as u64 * 4).max(64);
    if want.is_finite() {
        (want as u64).clamp(floor, i32::MAX as u64)
    } else {
        floor
    }
}

/// CPU time (user + system) of every waited-for child so far, ns.
fn children_cpu_ns() -> u64 {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_CHILDREN and a valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    ns(ru.ru_utime) + ns(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: &str = "Sending 200000 read requests, 4096 bytes each, 32 in parallel (starting at offset 0, step size 2591309824)\nRun completed in 1.611 seconds.\n";

    #[test]
    fn parses_a_read_run() {
        let o = parse_output(READ).unwrap();
        assert_eq!(
            o,
            BenchOutput {
                requests: 200_000,
                block: 4096,
                depth: 32,
                write: false,
                seconds: 1.611,
            }
        );
    }

    #[test]
    fn parses_a_write_run_with_flushes() {
        let text = "Sending 64000 write requests, 131072 bytes each, 1 in parallel (starting at offset 0, step size 167677952)\nSending flush every 32 requests\nRun completed in 0.539 seconds.\n";
        let o = parse_output(text).unwrap();
        assert_eq!(
            (o.requests, o.block, o.depth, o.write),
            (64_000, 131_072, 1, true)
        );
        assert!((o.seconds - 0.539).abs() < 1e-12);
    }

    #[test]
    fn rejects_what_is_not_a_complete_run() {
        // A failed run prints the first line only.
        assert!(parse_output(&READ[..READ.find('\n').unwrap()]).is_err());
        assert!(parse_output("Run completed in 1.0 seconds.\n").is_err());
        assert!(parse_output("").is_err());
        // Too short to give a rate.
        let zero = READ.replace("1.611", "0.000");
        assert!(parse_output(&zero).unwrap_err().contains("too short"));
        // A changed wording is not guessed at.
        let odd = READ.replace("read requests", "discard requests");
        assert!(parse_output(&odd).is_err());
        let odd = READ.replace("4096 bytes each", "4096 octets each");
        assert!(parse_output(&odd).is_err());
    }

    #[test]
    fn command_line_matches_the_workload() {
        let spec = BenchSpec {
            file: "/dev/shm/f.img".into(),
            direct: true,
            block: 4096,
            depth: 32,
            write: true,
            step: 8192,
            count: 1000,
            flush_every: 32,
        };
        assert_eq!(
            spec.command(),
            "qemu-img bench -f raw -i io_uring -t none -c 1000 -d 32 -s 4096 -S 8192 -w --flush-interval=32 --no-drain /dev/shm/f.img"
        );
        let buffered_read = BenchSpec {
            direct: false,
            write: false,
            flush_every: 0,
            ..spec
        };
        assert_eq!(
            buffered_read.command(),
            "qemu-img bench -f raw -i io_uring -t writeback -c 1000 -d 32 -s 4096 -S 8192 /dev/shm/f.img"
        );
    }

    /// The offsets qemu-img computes (`k * step mod size`) for `n` requests.
    fn offsets(size: u64, step: u64, n: u64) -> Vec<u64> {
        (0..n)
            .map(|k| (k as u128 * step as u128 % size as u128) as u64)
            .collect()
    }

    #[test]
    fn full_cycle_step_visits_every_block_once_per_pass() {
        for (size, block) in [
            (1u64 << 30, 4096u64),
            (1000 * 4096, 4096),
            (3 << 20, 128 << 10),
        ] {
            let step = full_cycle_step(size, block).unwrap();
            assert_eq!(step % block, 0, "{size} {block}");
            let blocks = size / block;
            let mut seen: Vec<u64> = offsets(size, step, blocks.min(1 << 18))
                .into_iter()
                .map(|o| {
                    assert!(o + block <= size);
                    o / block
                })
                .collect();
            let n = seen.len();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(
                seen.len(),
                n,
                "a block came back within one pass: {size} {block}"
            );
            // Consecutive requests are far apart (no readahead-friendly runs).
            let o = offsets(size, step, 64);
            assert!(
                o.windows(2).all(|w| w[0].abs_diff(w[1]) >= size / 8),
                "{size} {block}"
            );
        }
    }

    #[test]
    fn full_cycle_step_refuses_what_qemu_img_cannot_take() {
        assert_eq!(full_cycle_step(4096, 4096), None);
        assert_eq!(full_cycle_step(1 << 40, 4096), None);
        assert_eq!(full_cycle_step(1 << 30, 0), None);
        assert!(full_cycle_step(8192, 4096).is_some());
    }

    #[test]
    fn counts_are_sized_by_rate_and_bounded() {
        assert_eq!(count_for(100_000.0, Duration::from_secs(1), 32), 100_000);
        assert_eq!(count_for(10.0, Duration::from_millis(300), 32), 128);
        assert_eq!(count_for(f64::INFINITY, Duration::from_secs(1), 1), 64);
        assert_eq!(count_for(1e12, Duration::from_secs(10), 1), i32::MAX as u64);
        assert_eq!(count_for(f64::NAN, Duration::from_secs(1), 1), 64);
    }
}
