//! A virtio-mmio (version 2) driver that does exactly what it is told:
//! register access, the status handshake, and a split virtqueue whose
//! descriptors and rings the cases write by hand.

use crate::arch::barrier;
use crate::bootinfo::MmioSlot;
use crate::mem::{self, r16, r32, r8, w16, w32, w64};
use crate::msg::R;
use crate::time::Deadline;
use crate::{ensure, fail};

pub const MAGIC: u64 = 0x000;
pub const VERSION: u64 = 0x004;
pub const DEVICE_ID: u64 = 0x008;
pub const VENDOR_ID: u64 = 0x00c;
pub const DEVICE_FEATURES: u64 = 0x010;
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
pub const DRIVER_FEATURES: u64 = 0x020;
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
pub const QUEUE_SEL: u64 = 0x030;
pub const QUEUE_NUM_MAX: u64 = 0x034;
pub const QUEUE_NUM: u64 = 0x038;
pub const QUEUE_READY: u64 = 0x044;
pub const QUEUE_NOTIFY: u64 = 0x050;
pub const INTERRUPT_STATUS: u64 = 0x060;
pub const INTERRUPT_ACK: u64 = 0x064;
pub const STATUS: u64 = 0x070;
pub const QUEUE_DESC_LOW: u64 = 0x080;
pub const QUEUE_DESC_HIGH: u64 = 0x084;
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG: u64 = 0x100;

pub const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"

pub const S_ACK: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 0x40;

pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_RING_PACKED: u64 = 1 << 34;

pub const D_NEXT: u16 = 1;
pub const D_WRITE: u16 = 2;
pub const D_INDIRECT: u16 = 4;

pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One device window.
#[derive(Clone, Copy)]
pub struct Dev {
    pub base: u64,
    pub irq: u32,
    pub device_id: u32,
    /// Features the device offers (read at discovery).
    pub offered: u64,
}

impl Dev {
    /// Reads the identity of the device at `slot`; None if it is not a
    /// virtio-mmio v2 device.
    pub fn probe(slot: &MmioSlot) -> Option<Dev> {
        let mut d = Dev {
            base: slot.base,
            irq: slot.irq,
            device_id: 0,
            offered: 0,
        };
        if d.r(MAGIC) != MAGIC_VALUE || d.r(VERSION) != 2 {
            return None;
        }
        d.device_id = d.r(DEVICE_ID);
        d.offered = d.device_features();
        Some(d)
    }

    #[inline]
    pub fn r(&self, off: u64) -> u32 {
        r32(self.base + off)
    }

    #[inline]
    pub fn w(&self, off: u64, v: u32) {
        w32(self.base + off, v)
    }

    pub fn status(&self) -> u32 {
        self.r(STATUS)
    }

    pub fn device_features(&self) -> u64 {
        self.w(DEVICE_FEATURES_SEL, 0);
        let lo = self.r(DEVICE_FEATURES);
        self.w(DEVICE_FEATURES_SEL, 1);
        let hi = self.r(DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    pub fn write_driver_features(&self, f: u64) {
        self.w(DRIVER_FEATURES_SEL, 0);
        self.w(DRIVER_FEATURES, f as u32);
        self.w(DRIVER_FEATURES_SEL, 1);
        self.w(DRIVER_FEATURES, (f >> 32) as u32);
    }

    pub fn cfg8(&self, off: u64) -> u8 {
        r8(self.base + CONFIG + off)
    }

    pub fn cfg32(&self, off: u64) -> u32 {
        r32(self.base + CONFIG + off)
    }

    /// A 64-bit config field read as two 32-bit halves inside a
    /// generation check, as the spec asks for fields wider than 32 bits.
    pub fn cfg64(&self, off: u64) -> Result<u64, crate::msg::Msg> {
        for _ in 0..8 {
            let g0 = self.r(CONFIG_GENERATION);
            let lo = self.cfg32(off);
            let hi = self.cfg32(off + 4);
            if self.r(CONFIG_GENERATION) == g0 {
                return Ok((u64::from(hi) << 32) | u64::from(lo));
            }
        }
        fail!("config generation never settled");
    }

    /// Writes 0 to Status and waits until it reads 0.
    pub fn reset(&self) -> R {
        self.w(STATUS, 0);
        let d = Deadline::after_ms(1000);
        loop {
            let s = self.status();
            if s == 0 {
                return Ok(());
            }
            if d.passed() {
                fail!("status {s:#x} after reset, not 0");
            }
        }
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (checked).
    pub fn negotiate(&self, features: u64) -> R {
        self.reset()?;
        self.w(STATUS, S_ACK);
        self.w(STATUS, S_ACK | S_DRIVER);
        self.write_driver_features(features);
        self.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        let s = self.status();
        ensure!(
            s & S_FEATURES_OK != 0,
            "FEATURES_OK refused for {features:#x} (offered {:#x}, status {s:#x})",
            self.offered
        );
        Ok(())
    }

    /// Programs queue `q` from `vq` and sets QueueReady.
    pub fn setup_queue(&self, q: u32, vq: &Vq) {
        self.w(QUEUE_SEL, q);
        self.w(QUEUE_NUM, u32::from(vq.size));
        self.w(QUEUE_DESC_LOW, vq.desc as u32);
        self.w(QUEUE_DESC_HIGH, (vq.desc >> 32) as u32);
        self.w(QUEUE_DRIVER_LOW, vq.avail as u32);
        self.w(QUEUE_DRIVER_HIGH, (vq.avail >> 32) as u32);
        self.w(QUEUE_DEVICE_LOW, vq.used as u32);
        self.w(QUEUE_DEVICE_HIGH, (vq.used >> 32) as u32);
        self.w(QUEUE_READY, 1);
    }

    pub fn driver_ok(&self) -> R {
        self.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        let s = self.status();
        ensure!(s & S_DRIVER_OK != 0, "DRIVER_OK refused (status {s:#x})");
        ensure!(s & S_NEEDS_RESET == 0, "NEEDS_RESET right after DRIVER_OK");
        Ok(())
    }

    /// Full bring-up with one queue of `size` entries in fresh memory.
    pub fn up(&self, features: u64, size: u16) -> Result<Vq, crate::msg::Msg> {
        self.negotiate(features)?;
        let max = {
            self.w(QUEUE_SEL, 0);
            self.r(QUEUE_NUM_MAX)
        };
        ensure!(
            u32::from(size) <= max,
            "QueueNumMax {max} is below the {size} entries a case needs"
        );
        let vq = Vq::new(size);
        self.setup_queue(0, &vq);
        self.driver_ok()?;
        Ok(vq)
    }

    pub fn notify(&self, q: u32) {
        barrier();
        self.w(QUEUE_NOTIFY, q);
    }

    pub fn needs_reset(&self) -> bool {
        self.status() & S_NEEDS_RESET != 0
    }
}

/// A split virtqueue in arena memory, driven by hand.
pub struct Vq {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The avail index the driver publishes next.
    pub avail_idx: u16,
    /// Used entries consumed so far.
    pub used_seen: u16,
}

/// What waiting for the device produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    Used { id: u32, len: u32 },
    NeedsReset,
    Timeout,
}

pub const WAIT_MS: u64 = 3000;

impl Vq {
    pub fn new(size: u16) -> Vq {
        let n = usize::from(size);
        let desc = mem::alloc(16 * n, 4096);
        let avail = mem::alloc(6 + 2 * n, 4096);
        let used = mem::alloc(6 + 8 * n, 4096);
        Vq {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn desc_addr(&self, i: u16) -> u64 {
        self.desc + u64::from(i) * 16
    }

    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(self.desc_addr(i), addr, len, flags, next);
    }

    /// Writes `head` into the next avail slot without publishing it.
    pub fn put(&self, slot_idx: u16, head: u16) {
        let slot = u64::from(slot_idx % self.size);
        w16(self.avail + 4 + 2 * slot, head);
    }

    /// Makes the avail index `idx` visible to the device.
    pub fn set_avail_idx(&mut self, idx: u16) {
        barrier();
        w16(self.avail + 2, idx);
        self.avail_idx = idx;
    }

    /// Puts `head` in the next slot and publishes it.
    pub fn publish(&mut self, head: u16) {
        self.put(self.avail_idx, head);
        self.set_avail_idx(self.avail_idx.wrapping_add(1));
    }

    pub fn set_avail_flags(&self, flags: u16) {
        w16(self.avail, flags);
    }

    /// used_event (EVENT_IDX): the trailing field of the avail ring.
    pub fn set_used_event(&self, v: u16) {
        w16(self.avail + 4 + 2 * u64::from(self.size), v);
    }

    /// avail_event (EVENT_IDX): the trailing field of the used ring.
    pub fn avail_event(&self) -> u16 {
        r16(self.used + 4 + 8 * u64::from(self.size))
    }

    pub fn used_idx(&self) -> u16 {
        r16(self.used + 2)
    }

    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let e = self.used + 4 + 8 * u64::from(i % self.size);
        (r32(e), r32(e + 4))
    }

    /// Takes the next used entry if there is one.
    pub fn poll(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.used_seen {
            return None;
        }
        barrier();
        let e = self.used_elem(self.used_seen);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some(e)
    }

    /// Waits for the next used entry, NEEDS_RESET, or `ms` to pass.
    pub fn wait(&mut self, dev: &Dev, ms: u64) -> Wait {
        let d = Deadline::after_ms(ms);
        let mut spins = 0u32;
        loop {
            if let Some((id, len)) = self.poll() {
                return Wait::Used { id, len };
            }
            spins += 1;
            if spins.is_multiple_of(16) {
                if dev.needs_reset() {
                    // An entry may have landed just before the flag.
                    if let Some((id, len)) = self.poll() {
                        return Wait::Used { id, len };
                    }
                    return Wait::NeedsReset;
                }
                if d.passed() {
                    return Wait::Timeout;
                }
            }
        }
    }
}

/// One descriptor of a hand-built chain: address, length, flags (NEXT is
/// added for all but the last).
pub type Part = (u64, u32, u16);

impl Vq {
    /// Writes `parts` into descriptors `first..` linked in order; returns
    /// the head (`first`). Nothing is published.
    pub fn chain(&self, first: u16, parts: &[Part]) -> u16 {
        for (i, &(addr, len, flags)) in parts.iter().enumerate() {
            let i = i as u16;
            let last = usize::from(i) + 1 == parts.len();
            let (flags, next) = if last {
                (flags, 0)
            } else {
                (flags | D_NEXT, first + i + 1)
            };
            self.set_desc(first + i, addr, len, flags, next);
        }
        first
    }
}

/// An indirect descriptor table holding `parts` linked in order.
pub fn indirect_table(parts: &[Part]) -> u64 {
    let t = mem::alloc(16 * parts.len().max(1), 16);
    for (i, &(addr, len, flags)) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let (flags, next) = if last {
            (flags, 0)
        } else {
            (flags | D_NEXT, i as u16 + 1)
        };
        write_desc(t + 16 * i as u64, addr, len, flags, next);
    }
    t
}

/// Writes one 16-byte descriptor at `at` (a ring or an indirect table).
pub fn write_desc(at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    w64(at, addr);
    w32(at + 8, len);
    w16(at + 12, flags);
    w16(at + 14, next);
}
