//! Transport conformance (VIRTIO 1.2 §2.1-2.4, §4.2.2-4.2.3).

use super::Ctx;
use crate::blk::{self, Data, T_OUT};
use crate::msg::R;
use crate::time::Deadline;
use crate::virtio::*;
use crate::{arch, ensure, fail, irq, mem};

/// Magic, version, device and vendor ID; then the device serves.
pub fn identity(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    let magic = d.r(MAGIC);
    ensure!(magic == MAGIC_VALUE, "magic {magic:#x}");
    let v = d.r(VERSION);
    ensure!(v == 2, "version {v}, expected 2 (modern)");
    let id = d.r(DEVICE_ID);
    ensure!(id == blk::DEVICE_ID, "device id {id}");
    let vendor = d.r(VENDOR_ID);
    ensure!(vendor != 0, "vendor id 0");
    let mut vq = d.up(blk::polite_features(&d), 16)?;
    blk::good_io(&d, &mut vq, ctx.tag)
}

/// DeviceFeatures pages by DeviceFeaturesSel and offers VERSION_1.
pub fn device_features(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    d.reset()?;
    let f = d.device_features();
    ensure!(f & F_VERSION_1 != 0, "VERSION_1 not offered ({f:#x})");
    ensure!(
        f == d.offered,
        "features changed: {f:#x} then {:#x}",
        d.offered
    );
    d.w(DEVICE_FEATURES_SEL, 2);
    let w2 = d.r(DEVICE_FEATURES);
    ensure!(w2 == 0, "feature word 2 reads {w2:#x}, no such bits exist");
    d.w(DEVICE_FEATURES_SEL, 0);
    let lo = d.r(DEVICE_FEATURES);
    ensure!(lo == f as u32, "feature word 0 reads {lo:#x} after paging");
    Ok(())
}

fn handshake_to_features_ok(d: &Dev, features: u64) -> u32 {
    let _ = d.reset();
    d.w(STATUS, S_ACK);
    d.w(STATUS, S_ACK | S_DRIVER);
    d.write_driver_features(features);
    d.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    d.status()
}

/// FEATURES_OK is refused for an unoffered bit and without VERSION_1, and
/// DRIVER_OK then does not bring the device up; a valid subset passes.
pub fn features_ok_refused(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    let polite = blk::polite_features(&d);
    let unoffered = [F_RING_PACKED, 1 << 35, 1 << 63, 1 << 27, 1 << 3]
        .into_iter()
        .find(|b| d.offered & b == 0)
        .unwrap_or(0);
    ensure!(unoffered != 0, "every candidate bit is offered");
    for (what, f) in [
        ("an unoffered bit", polite | unoffered),
        ("no VERSION_1", polite & !F_VERSION_1),
    ] {
        let s = handshake_to_features_ok(&d, f);
        ensure!(
            s & S_FEATURES_OK == 0,
            "FEATURES_OK accepted with {what} ({f:#x})"
        );
        let vq = Vq::new(16);
        d.setup_queue(0, &vq);
        d.w(STATUS, s | S_FEATURES_OK | S_DRIVER_OK);
        let s = d.status();
        ensure!(
            s & S_DRIVER_OK == 0,
            "DRIVER_OK accepted after FEATURES_OK was refused ({what})"
        );
    }
    let s = handshake_to_features_ok(&d, polite);
    ensure!(
        s & S_FEATURES_OK != 0,
        "FEATURES_OK refused for {polite:#x}"
    );
    let mut vq = d.up(polite, 16)?;
    blk::good_io(&d, &mut vq, ctx.tag)
}

/// QueueNumMax, QueueReady, an absent queue, then a working queue.
pub fn queue_setup(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    d.negotiate(blk::polite_features(&d))?;
    d.w(QUEUE_SEL, 0);
    let max = d.r(QUEUE_NUM_MAX);
    ensure!(
        (16..=32768).contains(&max) && max.is_power_of_two(),
        "QueueNumMax {max}"
    );
    let r = d.r(QUEUE_READY);
    ensure!(r == 0, "QueueReady {r} before setup");
    d.w(QUEUE_SEL, 1);
    let (m1, r1) = (d.r(QUEUE_NUM_MAX), d.r(QUEUE_READY));
    ensure!(m1 == 0 && r1 == 0, "absent queue 1: max {m1}, ready {r1}");
    let vq = Vq::new(16);
    d.setup_queue(0, &vq);
    let r = d.r(QUEUE_READY);
    ensure!(r == 1, "QueueReady reads {r} after writing 1");
    d.w(QUEUE_READY, 0);
    let r = d.r(QUEUE_READY);
    ensure!(r == 0, "QueueReady reads {r} after writing 0");
    d.w(QUEUE_READY, 1);
    d.driver_ok()?;
    let mut vq = vq;
    blk::good_io(&d, &mut vq, ctx.tag)
}

fn wait_isr(d: &Dev, bits: u32, ms: u64) -> bool {
    let dl = Deadline::after_ms(ms);
    loop {
        if d.r(INTERRUPT_STATUS) & bits == bits {
            return true;
        }
        if dl.passed() {
            return false;
        }
    }
}

/// A reset returns every readable register to its initial value and
/// forgets the queue: fresh rings starting at index 0 work.
pub fn reset(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    d.reset()?;
    let initial_max = {
        d.w(QUEUE_SEL, 0);
        d.r(QUEUE_NUM_MAX)
    };
    let initial_gen = d.r(CONFIG_GENERATION);
    let f = blk::polite_features(&d);
    let mut vq = d.up(f, 16)?;
    blk::good_io(&d, &mut vq, ctx.tag)?;
    ensure!(
        wait_isr(&d, INT_VRING, 1000),
        "no used-buffer bit in InterruptStatus"
    );
    d.w(QUEUE_SEL, 1);
    // A live device's reset completes when Status reads 0 (virtio 1.2
    // §4.2.2.1): the device may take a moment to let go of its queues.
    d.reset()?;
    let isr = d.r(INTERRUPT_STATUS);
    ensure!(isr == 0, "InterruptStatus {isr:#x} after reset");
    // QueueSel went back to 0: these read queue 0.
    let (max, ready) = (d.r(QUEUE_NUM_MAX), d.r(QUEUE_READY));
    ensure!(
        max == initial_max,
        "QueueNumMax {max} after reset (queue 0: {initial_max}; QueueSel not reset?)"
    );
    ensure!(ready == 0, "QueueReady {ready} after reset");
    let g = d.r(CONFIG_GENERATION);
    ensure!(
        g == initial_gen,
        "config generation moved {initial_gen} -> {g}"
    );
    let feats = d.device_features();
    ensure!(feats == d.offered, "device features {feats:#x} after reset");
    // Fresh rings at new addresses, indices from 0: the device must not
    // remember where the old ring was.
    let mut vq = d.up(f, 16)?;
    blk::good_io(&d, &mut vq, ctx.tag)?;
    blk::good_io(&d, &mut vq, ctx.tag + 1000)
}

/// Config space: capacity, generation, byte-granular reads, writes to a
/// read-only config field ignored.
pub fn config(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    d.negotiate(blk::polite_features(&d))?;
    let g0 = d.r(CONFIG_GENERATION);
    let cap = blk::capacity(&d)?;
    ensure!(cap > 0, "capacity 0");
    let mut bytes = 0u64;
    for i in 0..8 {
        bytes |= u64::from(d.cfg8(blk::CFG_CAPACITY + i)) << (8 * i);
    }
    ensure!(
        bytes == cap,
        "byte reads give capacity {bytes}, word reads {cap}"
    );
    if d.offered & blk::F_BLK_SIZE != 0 {
        let bs = d.cfg32(blk::CFG_BLK_SIZE);
        ensure!(bs >= 512 && bs.is_power_of_two(), "blk_size {bs}");
    }
    if d.offered & blk::F_SEG_MAX != 0 {
        let sm = d.cfg32(blk::CFG_SEG_MAX);
        ensure!(sm >= 1, "seg_max {sm}");
    }
    if d.offered & blk::F_SIZE_MAX != 0 {
        let sm = d.cfg32(blk::CFG_SIZE_MAX);
        ensure!(sm >= 512, "size_max {sm}");
    }
    // virtio-blk config is read-only without CONFIG_WCE: writes are ignored.
    crate::mem::w8(d.base + CONFIG, 0x55);
    crate::mem::w32(d.base + CONFIG + 4, 0x1234_5678);
    let cap2 = blk::capacity(&d)?;
    ensure!(
        cap2 == cap,
        "capacity {cap} became {cap2} after a config write"
    );
    let g1 = d.r(CONFIG_GENERATION);
    ensure!(
        g1 == g0,
        "generation {g0} became {g1} with no config change"
    );
    // Past the end of the config space reads zero, not garbage or a fault.
    let far = d.cfg32(0xefc);
    ensure!(far == 0, "config offset 0xefc reads {far:#x}");
    Ok(())
}

/// InterruptStatus shows a used buffer, is read-only, and InterruptACK
/// clears exactly the bits written.
pub fn interrupt_ack(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    let mut vq = d.up(blk::polite_features(&d), 16)?;
    let isr = d.r(INTERRUPT_STATUS);
    ensure!(isr == 0, "InterruptStatus {isr:#x} before any request");
    blk::ping(&d, &mut vq)?;
    ensure!(
        wait_isr(&d, INT_VRING, 1000),
        "no used-buffer bit after a completion"
    );
    d.w(INTERRUPT_STATUS, 0);
    let isr = d.r(INTERRUPT_STATUS);
    ensure!(
        isr & INT_VRING != 0,
        "a write to read-only InterruptStatus cleared it"
    );
    d.w(INTERRUPT_ACK, INT_CONFIG);
    let isr = d.r(INTERRUPT_STATUS);
    ensure!(
        isr & INT_VRING != 0,
        "acking bit 1 cleared bit 0 ({isr:#x})"
    );
    d.w(INTERRUPT_ACK, INT_VRING);
    let isr = d.r(INTERRUPT_STATUS);
    ensure!(isr == 0, "InterruptStatus {isr:#x} after ack");
    blk::good_io(&d, &mut vq, ctx.tag)
}

/// A completion arrives as a real interrupt: device → irqfd → IOAPIC pin
/// → LAPIC → our IDT vector, with InterruptStatus set when it lands.
pub fn irq_delivery(ctx: &mut Ctx) -> R {
    let d = ctx.rw();
    let vector = irq::vector_of(d.irq);
    let mut vq = d.up(blk::polite_features(&d), 16)?;
    irq::route(d.irq, true);
    let before = irq::count(vector);
    let buf = mem::alloc(512, 512);
    mem::pattern(buf, 512, 7);
    let sent = blk::queue_simple(
        &mut vq,
        0,
        T_OUT,
        blk::scratch_sector(ctx.tag),
        Data::Out(buf, 512),
    );
    d.notify(0);
    let dl = Deadline::after_ms(2000);
    let mut isr_seen = 0;
    let got = loop {
        arch::sti();
        for _ in 0..64 {
            if irq::count(vector) != before {
                break;
            }
        }
        arch::cli();
        if irq::count(vector) != before {
            isr_seen = d.r(INTERRUPT_STATUS);
            break true;
        }
        if dl.passed() {
            break false;
        }
    };
    irq::route(d.irq, false);
    if !got {
        let isr = d.r(INTERRUPT_STATUS);
        fail!(
            "no interrupt on vector {vector:#x} (IOAPIC pin {}) within 2 s; InterruptStatus {isr:#x}, used idx {}",
            d.irq,
            vq.used_idx()
        );
    }
    ensure!(
        isr_seen & INT_VRING != 0,
        "interrupt arrived but InterruptStatus is {isr_seen:#x}"
    );
    let (_, st) = blk::answer(&d, &mut vq, sent)?;
    ensure!(st == blk::S_OK, "status {st}");
    d.w(INTERRUPT_ACK, isr_seen);
    blk::good_io(&d, &mut vq, ctx.tag)
}
