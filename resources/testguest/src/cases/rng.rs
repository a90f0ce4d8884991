//! virtio-rng (VIRTIO 1.2 §5.4): identity, buffers filled with bytes that
//! are not the fill pattern (and nothing past what the device reported),
//! ringvm's 4096-byte cap per request, refused chains returned untouched,
//! a broken queue, and a reset with requests in flight. Every case ends
//! with a good request.

use super::Ctx;
use crate::mem;
use crate::msg::{Msg, R};
use crate::rng::*;
use crate::time::{sleep_ms, Deadline};
use crate::virtio::*;
use crate::{ensure, fail};

fn what(w: &'static str) -> impl Fn(Msg) -> Msg {
    move |e| Msg::new(format_args!("{w}: {}", e.as_str()))
}

/// Identity, features, one queue, no config space, FEATURES_OK refused
/// with an unoffered bit; then a good request.
pub fn identity(ctx: &mut Ctx) -> R {
    let d = ctx.rng();
    ensure!(d.r(MAGIC) == MAGIC_VALUE, "magic {:#x}", d.r(MAGIC));
    ensure!(d.r(VERSION) == 2, "version {}", d.r(VERSION));
    let id = d.r(crate::virtio::DEVICE_ID);
    ensure!(id == crate::rng::DEVICE_ID, "device id {id}, expected 4");
    ensure!(d.r(VENDOR_ID) != 0, "vendor id 0");
    d.reset()?;
    let f = d.device_features();
    ensure!(f & F_VERSION_1 != 0, "VERSION_1 not offered ({f:#x})");
    ensure!(
        f & 0x00ff_ffff == 0,
        "device-specific feature bits offered ({f:#x}); virtio-rng has none"
    );
    d.w(QUEUE_SEL, 0);
    let max = d.r(QUEUE_NUM_MAX);
    ensure!(max > 0, "request queue: QueueNumMax 0");
    crate::note!("rng QueueNumMax {max}");
    for q in [1, 2] {
        d.w(QUEUE_SEL, q);
        let m = d.r(QUEUE_NUM_MAX);
        ensure!(
            m == 0,
            "queue {q} has QueueNumMax {m}; virtio-rng has one queue"
        );
    }
    let cfg = d.cfg32(0);
    ensure!(cfg == 0, "config space reads {cfg:#x}; virtio-rng has none");
    for bad in [1u64 << 0, 1 << 22, F_RING_PACKED, 1 << 63] {
        if f & bad != 0 {
            continue;
        }
        d.reset()?;
        d.w(STATUS, S_ACK);
        d.w(STATUS, S_ACK | S_DRIVER);
        d.write_driver_features(F_VERSION_1 | bad);
        d.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        let s = d.status();
        ensure!(
            s & S_FEATURES_OK == 0,
            "FEATURES_OK accepted with unoffered bit {bad:#x}"
        );
    }
    let mut vq = up(&d)?;
    good_request(&d, &mut vq, ctx.tag)
}

/// Buffers of 64 and 4096 bytes come back full (used len = buffer length)
/// of bytes that are not the fill pattern, with nothing written past
/// them; two requests give different bytes; a buffer split over two
/// descriptors is filled across both.
pub fn fill(ctx: &mut Ctx) -> R {
    let d = ctx.rng();
    let mut vq = up(&d)?;
    for (k, len) in [64usize, 4096].into_iter().enumerate() {
        let seed = ctx.tag * 100 + k as u64;
        let b = patterned(len, seed);
        let got = request(&d, &mut vq, &[(b, len as u32, D_WRITE)])?;
        ensure!(got == len as u32, "{len}-byte buffer: used len {got}");
        check_filled(b, len, 64, seed, "one buffer")?;
    }
    // Same fill pattern in both buffers: different random bytes must
    // replace it.
    let seed = ctx.tag * 100 + 10;
    let (a, b) = (patterned(64, seed), patterned(64, seed));
    for x in [a, b] {
        let got = request(&d, &mut vq, &[(x, 64, D_WRITE)])?;
        ensure!(got == 64, "64-byte buffer: used len {got}");
        check_filled(x, 64, 64, seed, "two requests")?;
    }
    for i in 0..8u64 {
        let (x, y) = (mem::r64(a + 8 * i), mem::r64(b + 8 * i));
        ensure!(
            x != y,
            "two requests got the same bytes at offset {} ({x:#x})",
            8 * i
        );
    }
    let seed = ctx.tag * 100 + 20;
    let (p, q) = (patterned(96, seed), patterned(160, seed + 1));
    let got = request(&d, &mut vq, &[(p, 96, D_WRITE), (q, 160, D_WRITE)])?;
    ensure!(got == 256, "96 + 160 bytes: used len {got}");
    check_filled(p, 96, 64, seed, "first descriptor of two")?;
    check_filled(q, 160, 64, seed + 1, "second descriptor of two")?;
    good_request(&d, &mut vq, ctx.tag)
}

/// A request larger than 4096 bytes gets exactly 4096 (ringvm's cap),
/// the rest untouched: one 8 KiB buffer, and 2560 + 4096 bytes over two
/// descriptors (the second filled for 1536 bytes).
pub fn max_request(ctx: &mut Ctx) -> R {
    let d = ctx.rng();
    let mut vq = up(&d)?;
    let seed = ctx.tag * 100;
    let b = patterned(8192, seed);
    let got = request(&d, &mut vq, &[(b, 8192, D_WRITE)])?;
    ensure!(
        got == MAX_REQUEST,
        "8192-byte buffer: used len {got}, expected 4096"
    );
    check_filled(b, 4096, 4096 + 64, seed, "8192-byte buffer")?;
    let (p, q) = (patterned(2560, seed + 1), patterned(4096, seed + 2));
    let got = request(&d, &mut vq, &[(p, 2560, D_WRITE), (q, 4096, D_WRITE)])?;
    ensure!(
        got == MAX_REQUEST,
        "2560 + 4096 bytes: used len {got}, expected 4096"
    );
    check_filled(p, 2560, 64, seed + 1, "2560 + 4096, first")?;
    check_filled(q, 1536, 2560 + 64, seed + 2, "2560 + 4096, second")?;
    good_request(&d, &mut vq, ctx.tag)
}

/// Chains the device must refuse: an empty descriptor (alone and after a
/// good one), a device-readable buffer (alone, after and before a
/// writable one). Each comes back with used len 0 and every buffer of it
/// unwritten; a good request follows each.
pub fn refused(ctx: &mut Ctx) -> R {
    let d = ctx.rng();
    let mut vq = up(&d)?;
    // (length, flags) of each descriptor.
    type Descs = &'static [(u32, u16)];
    let cases: [(&str, Descs); 5] = [
        ("one empty descriptor", &[(0, D_WRITE)]),
        (
            "64 bytes then an empty descriptor",
            &[(64, D_WRITE), (0, D_WRITE)],
        ),
        ("a device-readable buffer", &[(64, 0)]),
        ("writable then readable", &[(64, D_WRITE), (64, 0)]),
        ("readable then writable", &[(64, 0), (64, D_WRITE)]),
    ];
    for (k, (w, descs)) in cases.into_iter().enumerate() {
        let seed = ctx.tag * 100 + 2 * k as u64;
        let bufs = [patterned(64, seed), patterned(64, seed + 1)];
        let mut parts = [(0u64, 0u32, 0u16); 2];
        for (i, &(len, flags)) in descs.iter().enumerate() {
            parts[i] = (bufs[i], len, flags);
        }
        let n = descs.len();
        let got = request(&d, &mut vq, &parts[..n]).map_err(what(w))?;
        ensure!(got == 0, "{w}: used len {got}, expected 0 (refused)");
        for (i, &b) in bufs.iter().enumerate() {
            if let Some(off) = mem::check_pattern(b, 128, seed + i as u64) {
                fail!("{w}: buffer {i} written at byte {off} of a refused request");
            }
        }
        good_request(&d, &mut vq, seed).map_err(what(w))?;
    }
    Ok(())
}

/// Head 300 in a 16-entry avail ring: the queue is broken, the device
/// asks for a reset (NEEDS_RESET and a config interrupt) and serves again
/// after one.
pub fn head_out_of_range(ctx: &mut Ctx) -> R {
    let d = ctx.rng();
    let mut vq = up(&d)?;
    good_request(&d, &mut vq, ctx.tag)?;
    let b = patterned(64, ctx.tag);
    vq.set_desc(0, b, 64, D_WRITE, 0);
    vq.publish(300);
    d.notify(0);
    match vq.wait(&d, WAIT_MS) {
        Wait::NeedsReset => {}
        other => fail!("head 300 in a queue of 16: {other:?}, expected NEEDS_RESET"),
    }
    ensure!(
        mem::check_pattern(b, 128, ctx.tag).is_none(),
        "a buffer was written for head 300"
    );
    let dl = Deadline::after_ms(1000);
    while d.r(INTERRUPT_STATUS) & INT_CONFIG == 0 {
        ensure!(
            !dl.passed(),
            "NEEDS_RESET without a config-change interrupt"
        );
    }
    d.reset()?;
    let isr = d.r(INTERRUPT_STATUS);
    ensure!(isr == 0, "InterruptStatus {isr:#x} after the reset");
    let mut vq = up(&d)?;
    good_request(&d, &mut vq, ctx.tag)
}

/// Bytes in each buffer of [`reset_in_flight`].
const RESET_BUF: usize = 256;

/// A reset with requests posted and kicked (VIRTIO 1.2 §2.4.1): once
/// Status reads 0 the device must not write the old used ring, the old
/// buffers, or raise an interrupt, even when the driver kicks the old
/// queue again. Rounds reset at once after the kick, after the first
/// answer, after 8; the device then comes up on new rings.
pub fn reset_in_flight(ctx: &mut Ctx) -> R {
    let d = ctx.rng();
    for (round, after) in [0u16, 1, 8].into_iter().enumerate() {
        let mut vq = up(&d)?;
        let mut bufs = [0u64; QSIZE as usize];
        for (i, b) in bufs.iter_mut().enumerate() {
            *b = mem::alloc(RESET_BUF, 64);
            vq.set_desc(i as u16, *b, RESET_BUF as u32, D_WRITE, 0);
            vq.put(i as u16, i as u16);
        }
        vq.set_avail_idx(QSIZE);
        d.notify(0);
        let dl = Deadline::after_ms(WAIT_MS);
        while vq.used_idx() < after && !dl.passed() {}
        d.reset()?;
        // From here on the device may touch nothing of the old queue.
        let used_len = 6 + 8 * usize::from(QSIZE);
        let seed = ctx.tag * 100 + round as u64;
        mem::pattern(vq.used, used_len, seed);
        for (i, &b) in bufs.iter().enumerate() {
            mem::pattern(b, RESET_BUF, seed + 1 + i as u64);
        }
        crate::note!("rng reset round {round}: reset after {after} answers");
        // A kick on the old, no longer live queue must be ignored too.
        d.notify(0);
        sleep_ms(20);
        let isr = d.r(INTERRUPT_STATUS);
        ensure!(
            isr == 0,
            "round {round}: InterruptStatus {isr:#x} after Status read 0"
        );
        let check = |when: &str| -> R {
            if let Some(off) = mem::check_pattern(vq.used, used_len, seed) {
                fail!("round {round}: old used ring written at byte {off} {when}");
            }
            for (i, &b) in bufs.iter().enumerate() {
                if let Some(off) = mem::check_pattern(b, RESET_BUF, seed + 1 + i as u64) {
                    fail!("round {round}: old buffer {i} written at byte {off} {when}");
                }
            }
            Ok(())
        };
        check("after Status read 0")?;
        let mut fresh = up(&d)?;
        good_request(&d, &mut fresh, seed)?;
        check("after the device came up on new rings")?;
    }
    Ok(())
}
