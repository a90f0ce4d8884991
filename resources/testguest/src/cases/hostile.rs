//! A rude driver. Every case breaks a rule, expects an error status,
//! the chain back unanswered, or NEEDS_RESET, and then proves the device
//! still serves a good request (after a reset when it asked for one).

use super::Ctx;
use crate::blk::*;
use crate::mem::{self, r8};
use crate::msg::{Msg, R};
use crate::time::{sleep_ms, Deadline};
use crate::virtio::*;
use crate::{ensure, fail};

fn up(ctx: &Ctx, size: u16, extra: u64) -> Result<(Dev, Vq, u64), Msg> {
    let d = ctx.rw();
    let f = polite_features(&d) | (d.offered & extra);
    let vq = d.up(f, size)?;
    Ok((d, vq, f))
}

fn what(w: &'static str) -> impl Fn(Msg) -> Msg {
    move |e| Msg::new(format_args!("{w}: {}", e.as_str()))
}

/// Publishes `head`, notifies, expects a refusal, then recovers.
#[allow(clippy::too_many_arguments)]
fn refuse(
    ctx: &Ctx,
    d: &Dev,
    vq: &mut Vq,
    f: u64,
    head: u16,
    status: Option<u64>,
    how: Refusal,
    w: &'static str,
) -> R {
    vq.publish(head);
    d.notify(0);
    expect_refused(d, vq, head, status, how).map_err(what(w))?;
    recover(d, vq, f, ctx.tag).map_err(what(w))
}

/// Like `refuse` for a chain whose status byte the device must not
/// write (it is device-readable or empty): the sentinel must survive.
#[allow(clippy::too_many_arguments)]
fn refuse_untouched(
    ctx: &Ctx,
    d: &Dev,
    vq: &mut Vq,
    f: u64,
    head: u16,
    status: u64,
    w: &'static str,
) -> R {
    vq.publish(head);
    d.notify(0);
    expect_refused(d, vq, head, None, Refusal::Any).map_err(what(w))?;
    let b = r8(status);
    ensure!(
        b == SENTINEL,
        "{w}: device wrote {b:#x} into a descriptor it may not write"
    );
    recover(d, vq, f, ctx.tag).map_err(what(w))
}

/// Descriptor loops: 1→2→1, a descriptor pointing at itself, and a ring
/// of every descriptor in the queue.
pub fn desc_loop(ctx: &mut Ctx) -> R {
    let (d, mut vq, f) = up(ctx, 16, 0)?;
    let h = header(T_IN, 0);
    let b = mem::alloc(1024, 512);
    vq.set_desc(0, h, 16, D_NEXT, 1);
    vq.set_desc(1, b, 512, D_NEXT | D_WRITE, 2);
    vq.set_desc(2, b + 512, 512, D_NEXT | D_WRITE, 1);
    refuse(ctx, &d, &mut vq, f, 0, None, Refusal::Any, "loop 0→1→2→1")?;
    vq.set_desc(0, h, 16, D_NEXT, 0);
    refuse(ctx, &d, &mut vq, f, 0, None, Refusal::Any, "self loop")?;
    vq.set_desc(0, h, 16, D_NEXT, 1);
    for i in 1..16 {
        vq.set_desc(i, b, 512, D_NEXT | D_WRITE, (i + 1) % 16);
    }
    refuse(
        ctx,
        &d,
        &mut vq,
        f,
        0,
        None,
        Refusal::Any,
        "loop through all 16",
    )
}

/// A `next` index outside the descriptor table.
pub fn next_out_of_range(ctx: &mut Ctx) -> R {
    let (d, mut vq, f) = up(ctx, 16, 0)?;
    let h = header(T_IN, 0);
    for (next, w) in [(16u16, "next = queue size"), (0xffff, "next = 0xffff")] {
        vq.set_desc(0, h, 16, D_NEXT, next);
        refuse(ctx, &d, &mut vq, f, 0, None, Refusal::Any, w)?;
    }
    Ok(())
}

/// Chains longer than seg_max + 2, up to the whole 256-entry queue.
pub fn chain_too_long(ctx: &mut Ctx) -> R {
    let (d, mut vq, f) = up(ctx, 256, 0)?;
    let b = mem::alloc(512, 512);
    for (len, w) in [
        (129u16, "129 descriptors"),
        (256, "256 descriptors (the whole queue)"),
    ] {
        let h = header(T_IN, 0);
        let s = status_byte();
        vq.set_desc(0, h, 16, D_NEXT, 1);
        for i in 1..len - 1 {
            vq.set_desc(i, b, 512, D_NEXT | D_WRITE, i + 1);
        }
        vq.set_desc(len - 1, s, 1, D_WRITE, 0);
        refuse(ctx, &d, &mut vq, f, 0, Some(s), Refusal::Any, w)?;
    }
    Ok(())
}

/// Indirect tables: longer than the limits, nested, a length that is not
/// a multiple of 16, empty, and outside guest memory.
pub fn indirect_bad(ctx: &mut Ctx) -> R {
    let (d, mut vq, f) = up(ctx, 8, F_INDIRECT_DESC)?;
    ensure!(f & F_INDIRECT_DESC != 0, "INDIRECT_DESC not offered");
    let b = mem::alloc(512, 512);
    let h = header(T_IN, 0);
    // 200 entries on a queue of 8.
    let s = status_byte();
    let t = mem::alloc(16 * 200, 16);
    write_desc(t, h, 16, D_NEXT, 1);
    for i in 1..199u16 {
        write_desc(t + 16 * u64::from(i), b, 512, D_NEXT | D_WRITE, i + 1);
    }
    write_desc(t + 16 * 199, s, 1, D_WRITE, 0);
    vq.set_desc(0, t, 16 * 200, D_INDIRECT, 0);
    refuse(
        ctx,
        &d,
        &mut vq,
        f,
        0,
        Some(s),
        Refusal::Any,
        "indirect table of 200",
    )?;
    // Nested.
    let s = status_byte();
    let inner = indirect_table(&[(b, 512, D_WRITE), (s, 1, D_WRITE)]);
    let outer = indirect_table(&[(h, 16, 0), (inner, 32, D_INDIRECT)]);
    vq.set_desc(0, outer, 32, D_INDIRECT, 0);
    refuse(
        ctx,
        &d,
        &mut vq,
        f,
        0,
        Some(s),
        Refusal::Any,
        "nested indirect table",
    )?;
    // Length not a multiple of 16, and zero.
    let s = status_byte();
    let t = indirect_table(&[(h, 16, 0), (b, 512, D_WRITE), (s, 1, D_WRITE)]);
    vq.set_desc(0, t, 40, D_INDIRECT, 0);
    refuse(
        ctx,
        &d,
        &mut vq,
        f,
        0,
        Some(s),
        Refusal::Any,
        "indirect len 40",
    )?;
    vq.set_desc(0, t, 0, D_INDIRECT, 0);
    refuse(
        ctx,
        &d,
        &mut vq,
        f,
        0,
        Some(s),
        Refusal::Any,
        "indirect len 0",
    )?;
    // Outside memory.
    vq.set_desc(0, ctx.ram_end + 0x10_0000, 48, D_INDIRECT, 0);
    refuse(
        ctx,
        &d,
        &mut vq,
        f,
        0,
        None,
        Refusal::Any,
        "indirect table outside RAM",
    )
}

/// An avail ring entry naming a head beyond the queue.
pub fn head_out_of_range(ctx: &mut Ctx) -> R {
    let (d, mut vq, f) = up(ctx, 16, 0)?;
    vq.put(vq.avail_idx, 300);
    vq.set_avail_idx(vq.avail_idx.wrapping_add(1));
    d.notify(0);
    match vq.wait(&d, WAIT_MS) {
        Wait::NeedsReset => {}
        Wait::Used { id, len } => ensure!(
            len == 0 && id == 300,
            "head 300 of 16 came back as id {id} len {len}"
        ),
        Wait::Timeout => fail!("neither NEEDS_RESET nor a used entry for head 300 of 16"),
    }
    recover(&d, &mut vq, f, ctx.tag)
}

/// The same head made available twice while it is in flight.
pub fn head_twice(ctx: &mut Ctx) -> R {
    let (d, mut vq, f) = up(ctx, 16, 0)?;
    let buf = mem::alloc(512, 512);
    let sent = queue_simple(&mut vq, 0, T_IN, 0, Data::In(buf, 512));
    vq.publish(sent.head);
    d.notify(0);
    for n in 0..2 {
        match vq.wait(&d, WAIT_MS) {
            Wait::NeedsReset => break,
            Wait::Used { id, .. } => ensure!(id == 0, "answer {n}: used id {id}"),
            Wait::Timeout if n == 1 => break, // refused silently, ring intact
            Wait::Timeout => fail!("no answer at all"),
        }
    }
    // Whatever the device chose, a reset must bring it back.
    if !d.needs_reset() {
        vq = d.up(f, 16)?;
    }
    recover(&d, &mut vq, f, ctx.tag)
}

fn data_refused(ctx: &Ctx, kind: u32, addr: u64, len: u32, w: &'static str) -> R {
    let (d, mut vq, f) = up(ctx, 16, 0)?;
    let data = if kind == T_IN {
        Data::In(addr, len)
    } else {
        Data::Out(addr, len)
    };
    let sent = build_simple(&vq, 0, kind, 0, data);
    refuse(
        ctx,
        &d,
        &mut vq,
        f,
        sent.head,
        Some(sent.status),
        Refusal::ErrorStatus,
        w,
    )
}

/// Data buffers beyond the end of RAM.
pub fn data_outside_ram(ctx: &mut Ctx) -> R {
    let far = ctx.ram_end + 0x10_0000;
    data_refused(ctx, T_IN, far, 512, "read into a buffer past RAM")?;
    data_refused(ctx, T_OUT, far, 512, "write from a buffer past RAM")?;
    data_refused(ctx, T_IN, 0x1_0000_0000_0000, 512, "read into 2^48")
}

/// Data buffers in the MMIO hole: the device's own window, the LAPIC.
pub fn data_in_mmio_hole(ctx: &mut Ctx) -> R {
    let base = ctx.rw().base;
    data_refused(ctx, T_IN, base, 512, "read into the device's own registers")?;
    data_refused(ctx, T_OUT, 0xfee0_0000, 512, "write from the LAPIC page")
}

/// A buffer straddling the end of low RAM (the start of the MMIO hole
/// when RAM reaches it): refused whole, nothing written into the RAM part.
pub fn straddle_ram_end(ctx: &mut Ctx) -> R {
    let inside = ctx.low_ram_end - 512;
    mem::fill(inside, 0x5a, 512);
    data_refused(ctx, T_IN, inside, 1024, "read across the end of low RAM")?;
    for i in 0..512 {
        let b = r8(inside + i);
        ensure!(
            b == 0x5a,
            "refused read still wrote byte {i} below the end of RAM"
        );
    }
    Ok(())
}

/// Address + length wrapping around 2^64.
pub fn addr_wraps(ctx: &mut Ctx) -> R {
    data_refused(
        ctx,
        T_IN,
        0xffff_ffff_ffff_fe00,
        1024,
        "buffer wrapping 2^64",
    )
}

/// The header, or the status byte, outside guest memory.
pub fn header_status_outside_ram(ctx: &mut Ctx) -> R {
    let (d, mut vq, f) = up(ctx, 16, 0)?;
    let far = ctx.ram_end + 0x1000;
    let b = mem::alloc(512, 512);
    let s = status_byte();
    let head = vq.chain(0, &[(far, 16, 0), (b, 512, D_WRITE), (s, 1, D_WRITE)]);
    refuse(
        ctx,
        &d,
        &mut vq,
        f,
        head,
        Some(s),
        Refusal::ErrorStatus,
        "header past RAM",
    )?;
    let h = header(T_IN, 0);
    let head = vq.chain(0, &[(h, 16, 0), (b, 512, D_WRITE), (far, 1, D_WRITE)]);
    refuse(
        ctx,
        &d,
        &mut vq,
        f,
        head,
        None,
        Refusal::Any,
        "status byte past RAM",
    )
}

/// Zero lengths: an empty header, an empty status descriptor, an empty
/// data descriptor in the middle of a read.
pub fn zero_len(ctx: &mut Ctx) -> R {
    let (d, mut vq, f) = up(ctx, 16, 0)?;
    let h = header(T_IN, 0);
    let b = mem::alloc(512, 512);
    let s = status_byte();
    let head = vq.chain(0, &[(h, 0, 0), (b, 512, D_WRITE), (s, 1, D_WRITE)]);
    refuse(
        ctx,
        &d,
        &mut vq,
        f,
        head,
        Some(s),
        Refusal::ErrorStatus,
        "empty header",
    )?;
    let s = status_byte();
    let head = vq.chain(0, &[(h, 16, 0), (b, 512, D_WRITE), (s, 0, D_WRITE)]);
    refuse_untouched(ctx, &d, &mut vq, f, head, s, "empty status descriptor")?;
    // An empty data descriptor is pointless but harmless: any answer will do.
    let s = status_byte();
    let head = vq.chain(
        0,
        &[
            (h, 16, 0),
            (b, 0, D_WRITE),
            (b, 512, D_WRITE),
            (s, 1, D_WRITE),
        ],
    );
    vq.publish(head);
    d.notify(0);
    match vq.wait(&d, WAIT_MS) {
        Wait::Used { id, .. } => ensure!(id == u32::from(head), "used id {id}"),
        Wait::NeedsReset => {}
        Wait::Timeout => fail!("empty data descriptor: no answer"),
    }
    recover(&d, &mut vq, f, ctx.tag)
}

/// Huge lengths: 4 GiB - 512, a segment above size_max, a chain whose
/// lengths add up past 2^32.
pub fn huge_len(ctx: &mut Ctx) -> R {
    let base = mem::alloc(512, 512);
    data_refused(ctx, T_IN, base, 0xffff_fe00, "a 4 GiB read buffer")?;
    if ctx.ram_end >= 0x0400_0000 {
        // RAM, but twice size_max (1 MiB) in one segment.
        data_refused(ctx, T_OUT, 0x0200_0000, 2 << 20, "a 2 MiB segment")?;
    }
    let (d, mut vq, f) = up(ctx, 16, 0)?;
    let h = header(T_OUT, 0);
    let s = status_byte();
    let head = vq.chain(
        0,
        &[
            (h, 16, 0),
            (base, 0x8000_0000, 0),
            (base, 0x8000_0000, 0),
            (base, 0x8000_0000, 0),
            (s, 1, D_WRITE),
        ],
    );
    refuse(
        ctx,
        &d,
        &mut vq,
        f,
        head,
        Some(s),
        Refusal::Any,
        "chain of 6 GiB",
    )
}

/// Buffers pointing the wrong way.
pub fn wrong_direction(ctx: &mut Ctx) -> R {
    let (d, mut vq, f) = up(ctx, 16, 0)?;
    let b = mem::alloc(1024, 512);
    let cases: [(&'static str, u32, [Part; 4], usize); 5] = [
        (
            "read into a device-readable buffer",
            T_IN,
            [(0, 16, 0), (b, 512, 0), (0, 1, D_WRITE), (0, 0, 0)],
            3,
        ),
        (
            "write from a device-writable buffer",
            T_OUT,
            [(0, 16, 0), (b, 512, D_WRITE), (0, 1, D_WRITE), (0, 0, 0)],
            3,
        ),
        (
            "device-writable header",
            T_IN,
            [
                (0, 16, D_WRITE),
                (b, 512, D_WRITE),
                (0, 1, D_WRITE),
                (0, 0, 0),
            ],
            3,
        ),
        (
            "readable after writable",
            T_OUT,
            [
                (0, 16, 0),
                (b, 512, D_WRITE),
                (b + 512, 512, 0),
                (0, 1, D_WRITE),
            ],
            4,
        ),
        (
            "GET_ID into a device-readable buffer",
            T_GET_ID,
            [(0, 16, 0), (b, 20, 0), (0, 1, D_WRITE), (0, 0, 0)],
            3,
        ),
    ];
    for (w, kind, mut parts, n) in cases {
        let h = header(kind, 0);
        let s = status_byte();
        parts[0].0 = h;
        parts[n - 1].0 = s;
        let head = vq.chain(0, &parts[..n]);
        refuse(ctx, &d, &mut vq, f, head, Some(s), Refusal::ErrorStatus, w)?;
    }
    Ok(())
}

/// A status descriptor that is device-readable or empty.
pub fn status_wrong(ctx: &mut Ctx) -> R {
    let (d, mut vq, f) = up(ctx, 16, 0)?;
    let b = mem::alloc(512, 512);
    let h = header(T_IN, 0);
    let s = status_byte();
    let head = vq.chain(0, &[(h, 16, 0), (b, 512, D_WRITE), (s, 1, 0)]);
    // A read-only last descriptor also breaks "readable before writable".
    refuse_untouched(ctx, &d, &mut vq, f, head, s, "device-readable status")?;
    let h = header(T_GET_ID, 0);
    let s = status_byte();
    let head = vq.chain(0, &[(h, 16, 0), (b, 20, D_WRITE), (s, 1, 0)]);
    refuse_untouched(
        ctx,
        &d,
        &mut vq,
        f,
        head,
        s,
        "GET_ID with a device-readable status",
    )?;
    let s = status_byte();
    let head = vq.chain(0, &[(h, 16, 0), (b, 20, D_WRITE), (s, 0, D_WRITE)]);
    refuse_untouched(ctx, &d, &mut vq, f, head, s, "GET_ID with an empty status")
}

/// Data lengths that are not a multiple of 512.
pub fn misaligned_len(ctx: &mut Ctx) -> R {
    let b = mem::alloc(1024, 512);
    data_refused(ctx, T_IN, b, 100, "read of 100 bytes")?;
    data_refused(ctx, T_OUT, b, 513, "write of 513 bytes")
}

/// The avail index jumps by more than the queue size: NEEDS_RESET with a
/// config interrupt; after a reset the device serves again.
pub fn avail_jump(ctx: &mut Ctx) -> R {
    let (d, mut vq, f) = up(ctx, 16, 0)?;
    good_io(&d, &mut vq, ctx.tag)?;
    let sent = queue_ping(&mut vq, 0);
    vq.set_avail_idx(vq.avail_idx.wrapping_add(16));
    d.notify(0);
    match vq.wait(&d, WAIT_MS) {
        Wait::NeedsReset => {}
        other => fail!("avail idx +17 on a queue of 16: {other:?}, expected NEEDS_RESET"),
    }
    ensure!(
        r8(sent.status) == SENTINEL,
        "a request behind the bad index was still answered"
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
    let mut vq = d.up(f, 16)?;
    good_io(&d, &mut vq, ctx.tag)
}

/// Notifications before the device is live are ignored: no buffer is
/// used before DRIVER_OK. Notifications for absent queues are ignored.
pub fn notify_not_ready(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    let f = polite_features(&d);
    d.reset()?;
    d.notify(0);
    d.w(STATUS, S_ACK);
    d.w(STATUS, S_ACK | S_DRIVER);
    d.notify(0);
    d.write_driver_features(f);
    d.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    ensure!(d.status() & S_FEATURES_OK != 0, "FEATURES_OK refused");
    let mut vq = Vq::new(16);
    let sent = queue_ping(&mut vq, 0);
    d.notify(0);
    d.setup_queue(0, &vq);
    d.notify(0);
    d.notify(1);
    sleep_ms(20);
    let ui = vq.used_idx();
    ensure!(ui == 0, "the device used a buffer before DRIVER_OK");
    ensure!(
        r8(sent.status) == SENTINEL,
        "status written before DRIVER_OK"
    );
    d.driver_ok()?;
    d.notify(0);
    let (_, st) = answer(&d, &mut vq, sent)?;
    ensure!(st == S_OK, "request queued before DRIVER_OK: status {st}");
    for q in [1, 7, 0xffff, u32::MAX] {
        d.notify(q);
    }
    good_io(&d, &mut vq, ctx.tag)
}

/// Writes to read-only registers, to unknown offsets, and of the wrong
/// width change nothing.
pub fn readonly_regs(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    let mut vq = d.up(polite_features(&d), 16)?;
    let regs = [
        MAGIC,
        VERSION,
        crate::virtio::DEVICE_ID,
        VENDOR_ID,
        DEVICE_FEATURES,
        QUEUE_NUM_MAX,
        INTERRUPT_STATUS,
        CONFIG_GENERATION,
    ];
    d.w(QUEUE_SEL, 0);
    d.w(DEVICE_FEATURES_SEL, 0);
    let mut before = [0u32; 8];
    for (i, r) in regs.iter().enumerate() {
        before[i] = d.r(*r);
    }
    for r in regs {
        d.w(r, 0xdead_beef);
        d.w(r, 0);
    }
    for (i, r) in regs.iter().enumerate() {
        let v = d.r(*r);
        ensure!(
            v == before[i],
            "register {r:#x}: {:#x} became {v:#x}",
            before[i]
        );
    }
    let s = d.status();
    // Narrow and unaligned accesses to Status, writes to holes.
    mem::w8(d.base + STATUS, 0);
    mem::w16(d.base + STATUS, 0);
    mem::w32(d.base + STATUS + 2, 0);
    for off in [0x0c8u64, 0x0f0, 0x0f8, 0x018, 0x0ac] {
        d.w(off, 0xffff_ffff);
    }
    let s2 = d.status();
    ensure!(s2 == s, "status {s:#x} became {s2:#x} after narrow writes");
    good_io(&d, &mut vq, ctx.tag)
}

/// Queue registers and driver features written after DRIVER_OK are
/// ignored: the device keeps the layout it went live with.
pub fn late_writes(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    let mut vq = d.up(polite_features(&d), 16)?;
    d.w(QUEUE_SEL, 0);
    d.w(QUEUE_NUM, 4);
    d.w(QUEUE_DESC_LOW, 0x1230);
    d.w(QUEUE_DRIVER_LOW, 0x4560);
    d.w(QUEUE_DEVICE_LOW, 0x7890);
    d.w(QUEUE_READY, 0);
    d.write_driver_features(0);
    d.w(STATUS, S_ACK); // clears bits: not allowed
    d.w(
        STATUS,
        S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK | S_NEEDS_RESET,
    );
    let s = d.status();
    ensure!(
        s & S_NEEDS_RESET == 0,
        "the driver could set NEEDS_RESET ({s:#x})"
    );
    ensure!(s & S_DRIVER_OK != 0, "status lost DRIVER_OK ({s:#x})");
    good_io(&d, &mut vq, ctx.tag)?;
    good_io(&d, &mut vq, ctx.tag + 1000)
}

/// Layouts the device must refuse at DRIVER_OK (or flag NEEDS_RESET for):
/// bad sizes, a misaligned table, rings outside RAM.
pub fn bad_queue_layout(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    let f = polite_features(&d);
    let far = ctx.ram_end + 0x10_0000;
    let layouts: [(&str, u32, u64, u64, u64); 7] = [
        ("size 100", 100, 0, 0, 0),
        ("size 0", 0, 0, 0, 0),
        ("size 512 > QueueNumMax", 512, 0, 0, 0),
        ("descriptor table at +8", 16, 8, 0, 0),
        ("used ring at +2", 16, 0, 0, 2),
        ("descriptor table past RAM", 16, far, 0, 0),
        ("used ring past RAM", 16, 0, 0, far),
    ];
    for (w, size, desc, avail, used) in layouts {
        d.negotiate(f)?;
        let vq = Vq::new(16);
        let place = |delta: u64, at: u64| if delta >= 0x1000 { delta } else { at + delta };
        d.w(QUEUE_SEL, 0);
        d.w(QUEUE_NUM, size);
        let (da, aa, ua) = (
            place(desc, vq.desc),
            place(avail, vq.avail),
            place(used, vq.used),
        );
        d.w(QUEUE_DESC_LOW, da as u32);
        d.w(QUEUE_DESC_HIGH, (da >> 32) as u32);
        d.w(QUEUE_DRIVER_LOW, aa as u32);
        d.w(QUEUE_DRIVER_HIGH, (aa >> 32) as u32);
        d.w(QUEUE_DEVICE_LOW, ua as u32);
        d.w(QUEUE_DEVICE_HIGH, (ua >> 32) as u32);
        d.w(QUEUE_READY, 1);
        d.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        // Refused at once (no DRIVER_OK), or NEEDS_RESET soon after.
        let dl = Deadline::after_ms(1000);
        loop {
            let s = d.status();
            if s & S_DRIVER_OK == 0 || s & S_NEEDS_RESET != 0 {
                break;
            }
            ensure!(!dl.passed(), "{w}: accepted (status {s:#x})");
        }
        let mut vq = d.up(f, 16).map_err(what(w))?;
        good_io(&d, &mut vq, ctx.tag).map_err(what(w))?;
    }
    Ok(())
}

/// Resets while 80 one-MiB writes complete (four rounds, after 1, 4, 10
/// and 20 completions): once Status reads 0 the device must not touch the
/// old rings or interrupt (VIRTIO 1.2 §2.4.1); fresh rings work.
pub fn reset_in_flight(ctx: &mut Ctx) -> R {
    const N: u16 = 80;
    ensure!(ctx.ram_end >= 0x0300_0000, "needs 48 MiB of RAM");
    for (round, after) in [1u16, 4, 10, 20].into_iter().enumerate() {
        let (d, mut vq, f) = up(ctx, 256, 0)?;
        let cap = capacity(&d)?;
        ensure!(cap >= 32768, "disk smaller than 16 MiB");
        // Every request writes the same 1 MiB of RAM at 32 MiB (its
        // content does not matter) to one of the first 16 MiB of the disk.
        for i in 0..N {
            queue_simple(
                &mut vq,
                i * 3,
                T_OUT,
                u64::from(i % 16) * 2048,
                Data::Out(0x0200_0000, 1 << 20),
            );
        }
        d.notify(0);
        let dl = Deadline::after_ms(WAIT_MS);
        while vq.used_idx() < after && !dl.passed() {}
        d.reset()?;
        let u0 = vq.used_idx();
        crate::note!("reset_in_flight round {round}: {u0} of {N} used when Status read 0");
        sleep_ms(30);
        let u1 = vq.used_idx();
        ensure!(
            u1 == u0,
            "round {round}: {} used entries written into the old ring after Status read 0 \
             ({u0} before)",
            u1.wrapping_sub(u0)
        );
        let isr = d.r(INTERRUPT_STATUS);
        ensure!(
            isr == 0,
            "round {round}: InterruptStatus {isr:#x} after Status read 0"
        );
        let old_used = vq.used;
        let mut vq = d.up(f, 16)?;
        good_io(&d, &mut vq, ctx.tag)?;
        let u2 = mem::r16(old_used + 2);
        ensure!(
            u2 == u1,
            "round {round}: the old used ring moved after the device came back up"
        );
    }
    Ok(())
}

/// Mark `p` of READ `i`'s buffer in round `round`: unlike the disk's
/// bytes (0x5a) and every other round's marks.
fn race_mark(round: usize, i: u64, p: u64) -> u64 {
    0x6d61_726b_0000_0000 | (round as u64) << 24 | i << 12 | p
}

/// How a round of [`reset_read_race`] times its reset.
#[derive(Clone, Copy, Debug)]
enum RaceAt {
    /// Once the device has taken every READ (avail_event, EVENT_IDX).
    AllTaken,
    /// Once it has taken every READ and answered the first.
    FirstAnswer,
    /// Straight after the kick.
    Kick,
}

/// The rounds of [`reset_read_race`]: each outcome of the race depends on
/// the host's timing, so it runs several.
const ROUNDS: [RaceAt; 5] = [
    RaceAt::AllTaken,
    RaceAt::FirstAnswer,
    RaceAt::Kick,
    RaceAt::AllTaken,
    RaceAt::FirstAnswer,
];

/// Resets while 32 READs of 256 KiB (8 MiB from the disk into RAM) are in
/// flight, in the [`ROUNDS`]. VIRTIO 1.2 §2.4.1: once Status reads 0 the
/// device must not write the driver's buffers. The moment Status reads 0
/// the driver marks the last word of every READ's buffer (the last READ
/// first; a late READ writes its whole buffer), then every 16 KiB of them
/// and their status bytes; 20 ms later every mark must be intact, the old
/// used index unmoved, InterruptStatus 0. Runs on the second writable
/// drive when there is one: given `direct=on`, its reads take real disk
/// time, so the reset lands while they are in flight (from a cached file
/// they are all done before ringvm sees the reset).
pub fn reset_read_race(ctx: &mut Ctx) -> R {
    const N: u64 = 32;
    const LEN: u64 = 256 << 10;
    /// Marks per buffer besides its last word: one every 16 KiB.
    const MARKS: u64 = LEN / STRIDE;
    const STRIDE: u64 = 16 << 10;
    const SRC: u64 = 0x0200_0000;
    const BUFS: u64 = 0x0200_0000;
    ensure!(ctx.ram_end >= 0x0300_0000, "needs 48 MiB of RAM");
    let d = ctx.rw2.unwrap_or(ctx.rw());
    let f = polite_features(&d) | (d.offered & F_EVENT_IDX);
    let mut vq = d.up(f, 128)?;
    ensure!(capacity(&d)? >= 32768, "disk smaller than 16 MiB");
    // The READs read the first MiB of the disk, written from RAM that
    // holds 0x5a bytes where the marks go: a late READ overwrites a mark
    // with something else. (Written, not a hole: a hole is read without
    // any disk time.)
    for off in (0..1 << 20).step_by(STRIDE as usize) {
        mem::w64(SRC + off, 0x5a5a_5a5a_5a5a_5a5a);
        mem::w64(SRC + off + STRIDE - 8, 0x5a5a_5a5a_5a5a_5a5a);
    }
    request_ok(&d, &mut vq, T_OUT, 0, Data::Out(SRC, 1 << 20))?;
    let mut raced = 0;
    for (round, at) in ROUNDS.into_iter().enumerate() {
        vq = d.up(f, 128)?;
        let mut status = [0u64; N as usize];
        for i in 0..N {
            let data = Data::In(BUFS + i * LEN, LEN as u32);
            let sector = (i % 4) * (LEN / 512);
            status[i as usize] = queue_simple(&mut vq, i as u16 * 3, T_IN, sector, data).status;
        }
        d.notify(0);
        let dl = Deadline::after_ms(WAIT_MS);
        let taken = |vq: &Vq| f & F_EVENT_IDX == 0 || vq.avail_event() == N as u16;
        match at {
            RaceAt::AllTaken => while !taken(&vq) && !dl.passed() {},
            RaceAt::FirstAnswer => while !(dl.passed() || taken(&vq) && vq.used_idx() > 0) {},
            RaceAt::Kick => {}
        }
        d.w(STATUS, 0);
        let dl = Deadline::after_ms(1000);
        while d.status() != 0 {
            ensure!(
                !dl.passed(),
                "round {round}: Status never read 0 after the reset"
            );
        }
        // Status reads 0: the buffers are the driver's again. One mark
        // per READ first (a late one writes its whole buffer), then the
        // rest.
        let last = LEN - 8;
        for i in (0..N).rev() {
            mem::w64(BUFS + i * LEN + last, race_mark(round, i, MARKS));
        }
        let u0 = vq.used_idx();
        for i in (0..N).rev() {
            mem::w8(status[i as usize], 0x77);
            for p in (0..MARKS).rev() {
                mem::w64(BUFS + i * LEN + p * STRIDE, race_mark(round, i, p));
            }
        }
        if u0 < N as u16 {
            raced += 1;
        }
        sleep_ms(20);
        for i in 0..N {
            let buf = BUFS + i * LEN;
            let st = r8(status[i as usize]);
            ensure!(
                st == 0x77,
                "round {round}: READ {i}'s status byte written ({st:#x}) after Status read 0"
            );
            for (p, at) in (0..MARKS)
                .map(|p| (p, buf + p * STRIDE))
                .chain([(MARKS, buf + last)])
            {
                let got = mem::r64(at);
                ensure!(
                    got == race_mark(round, i, p),
                    "round {round}: READ {i} wrote its buffer at byte {} ({got:#x}) after \
                     Status read 0 ({u0} of {N} READs answered before)",
                    at - buf
                );
            }
        }
        crate::note!("reset_read_race round {round} ({at:?}): {u0} of {N} used when Status read 0");
        let u1 = vq.used_idx();
        ensure!(
            u1 == u0,
            "round {round}: {} used entries written after Status read 0",
            u1.wrapping_sub(u0)
        );
        let isr = d.r(INTERRUPT_STATUS);
        ensure!(
            isr == 0,
            "round {round}: InterruptStatus {isr:#x} after Status read 0"
        );
    }
    crate::note!(
        "reset_read_race: the reset overtook READs in {raced} of {} rounds",
        ROUNDS.len()
    );
    let mut vq = d.up(f, 16)?;
    good_io(&d, &mut vq, ctx.tag)
}
