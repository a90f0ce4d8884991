//! Split-ring behaviour (VIRTIO 1.2 §2.7): notification suppression both
//! ways, indirect descriptors, ring wrap-around.

use super::Ctx;
use crate::blk::{self, T_IN, T_OUT};
use crate::msg::R;
use crate::time::Deadline;
use crate::virtio::*;
use crate::{ensure, fail, mem};

fn isr_within(d: &Dev, ms: u64) -> u32 {
    let dl = Deadline::after_ms(ms);
    loop {
        let isr = d.r(INTERRUPT_STATUS);
        if isr & INT_VRING != 0 || dl.passed() {
            return isr;
        }
    }
}

/// One cheap request through descriptors 0..3, answered OK.
fn flush(d: &Dev, vq: &mut Vq) -> R {
    blk::ping(d, vq)
}

/// EVENT_IDX, device → driver: no interrupt while used_event lies ahead,
/// one as soon as the used index passes it.
pub fn event_idx_used(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    ensure!(d.offered & F_EVENT_IDX != 0, "EVENT_IDX not offered");
    let mut vq = d.up(blk::polite_features(&d) | F_EVENT_IDX, 16)?;
    vq.set_used_event(100);
    flush(&d, &mut vq)?;
    // The device finished the first request's interrupt decision before it
    // could see the second one (one thread serves the queue): once the
    // second is used, InterruptStatus tells about both.
    flush(&d, &mut vq)?;
    let isr = d.r(INTERRUPT_STATUS);
    ensure!(
        isr & INT_VRING == 0,
        "used-buffer interrupt although used_event (100) was not reached"
    );
    vq.set_used_event(vq.used_seen);
    flush(&d, &mut vq)?;
    let isr = isr_within(&d, 1000);
    ensure!(
        isr & INT_VRING != 0,
        "no interrupt when the used index passed used_event"
    );
    d.w(INTERRUPT_ACK, isr);
    // used_event far behind (wrapped): the device must not interrupt.
    vq.set_used_event(vq.used_seen.wrapping_sub(10));
    flush(&d, &mut vq)?;
    flush(&d, &mut vq)?;
    let isr = d.r(INTERRUPT_STATUS);
    ensure!(
        isr & INT_VRING == 0,
        "interrupt although used_event lies behind the used index"
    );
    Ok(())
}

/// EVENT_IDX, driver → device: once idle, the device publishes in
/// avail_event the avail index it wants to be notified about.
pub fn event_idx_avail(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    ensure!(d.offered & F_EVENT_IDX != 0, "EVENT_IDX not offered");
    let mut vq = d.up(blk::polite_features(&d) | F_EVENT_IDX, 16)?;
    for round in 0..3 {
        flush(&d, &mut vq)?;
        let ae = avail_event_settles(&vq);
        ensure!(
            ae == vq.avail_idx,
            "round {round}: avail_event {ae}, expected the next avail index {}",
            vq.avail_idx
        );
    }
    // Two requests published at once, one notification: both served.
    let s1 = blk::queue_ping(&mut vq, 0);
    let s2 = blk::queue_ping(&mut vq, 4);
    d.notify(0);
    let mut seen = [false; 2];
    for _ in 0..2 {
        match vq.wait(&d, WAIT_MS) {
            Wait::Used { id, .. } if id == u32::from(s1.head) => seen[0] = true,
            Wait::Used { id, .. } if id == u32::from(s2.head) => seen[1] = true,
            other => fail!("batch of two: {other:?}"),
        }
    }
    ensure!(seen[0] && seen[1], "batch of two: a head was used twice");
    let ae = avail_event_settles(&vq);
    ensure!(
        ae == vq.avail_idx,
        "after a batch: avail_event {ae}, expected {}",
        vq.avail_idx
    );
    blk::good_io(&d, &mut vq, ctx.tag)
}

/// avail_event once it equals the avail index, or its value after 200 ms
/// (the device may publish it just after the used entry).
fn avail_event_settles(vq: &Vq) -> u16 {
    let dl = Deadline::after_ms(200);
    loop {
        let ae = vq.avail_event();
        if ae == vq.avail_idx || dl.passed() {
            return ae;
        }
    }
}

/// Without EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT suppresses interrupts
/// and clearing it brings them back.
pub fn no_interrupt_flag(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    let mut vq = d.up(blk::polite_features(&d), 16)?;
    vq.set_avail_flags(AVAIL_F_NO_INTERRUPT);
    flush(&d, &mut vq)?;
    flush(&d, &mut vq)?;
    let isr = d.r(INTERRUPT_STATUS);
    ensure!(
        isr & INT_VRING == 0,
        "interrupt although the driver set VRING_AVAIL_F_NO_INTERRUPT"
    );
    vq.set_avail_flags(0);
    flush(&d, &mut vq)?;
    let isr = isr_within(&d, 1000);
    ensure!(
        isr & INT_VRING != 0,
        "no interrupt once the flag was cleared"
    );
    Ok(())
}

/// A write and a read-back whose header, data and status live in
/// indirect descriptor tables.
pub fn indirect(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    ensure!(
        d.offered & F_INDIRECT_DESC != 0,
        "INDIRECT_DESC not offered"
    );
    let mut vq = d.up(blk::polite_features(&d) | F_INDIRECT_DESC, 16)?;
    let sector = blk::scratch_sector(ctx.tag) + 4;
    let buf = mem::alloc(2048, 512);
    mem::pattern(buf, 2048, 0x1d);
    let h = blk::header(T_OUT, sector);
    let s = blk::status_byte();
    let t = indirect_table(&[
        (h, 16, 0),
        (buf, 1024, 0),
        (buf + 1024, 1024, 0),
        (s, 1, D_WRITE),
    ]);
    vq.set_desc(3, t, 64, D_INDIRECT, 0);
    vq.publish(3);
    d.notify(0);
    let (_, st) = blk::answer(&d, &mut vq, blk::Sent { head: 3, status: s })?;
    ensure!(st == blk::S_OK, "indirect write: status {st}");
    let back = mem::alloc(2048, 512);
    let h = blk::header(T_IN, sector);
    let s = blk::status_byte();
    let t = indirect_table(&[(h, 16, 0), (back, 2048, D_WRITE), (s, 1, D_WRITE)]);
    vq.set_desc(5, t, 48, D_INDIRECT, 0);
    vq.publish(5);
    d.notify(0);
    let (len, st) = blk::answer(&d, &mut vq, blk::Sent { head: 5, status: s })?;
    ensure!(st == blk::S_OK, "indirect read: status {st}");
    ensure!(len == 2049, "indirect read: used len {len}, expected 2049");
    if let Some(off) = mem::check_pattern(back, 2048, 0x1d) {
        fail!("indirect read: data differs at byte {off}");
    }
    Ok(())
}

/// An 8-entry queue used 20 times: avail and used rings wrap.
pub fn wrap(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    let mut vq = d.up(blk::polite_features(&d), 8)?;
    for i in 0..20u16 {
        // Alternate heads 0 and 3 (three descriptors each).
        let head = (i % 2) * 3;
        let s = blk::queue_ping(&mut vq, head);
        d.notify(0);
        let (_, st) = blk::answer(&d, &mut vq, s)?;
        ensure!(st == blk::S_OK, "request {i}: status {st}");
    }
    let ui = vq.used_idx();
    ensure!(ui == 20, "used idx {ui} after 20 requests");
    blk::good_io(&d, &mut vq, ctx.tag)
}
