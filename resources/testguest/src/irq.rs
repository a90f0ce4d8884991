//! Interrupts through the in-kernel irqchip: the 8259s masked, the IOAPIC
//! routing a device pin to a vector on the boot CPU's LAPIC, and a count
//! per vector that cases read.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::arch::outb;
use crate::mem::{r32, w32};

const IOAPIC: u64 = 0xfec0_0000;
const LAPIC: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const SPURIOUS: u8 = 0xff;
/// Device pin `p` interrupts at vector `VECTOR_BASE + p`.
pub const VECTOR_BASE: u8 = 0x40;

static COUNTS: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];

/// Masks the legacy PICs and turns the LAPIC on (interrupts stay off
/// until a case waits for one).
pub fn init() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    w32(LAPIC + LAPIC_TPR, 0);
    w32(LAPIC + LAPIC_SVR, 0x100 | u32::from(SPURIOUS));
}

fn ioapic_write(reg: u32, v: u32) {
    w32(IOAPIC, reg);
    w32(IOAPIC + 0x10, v);
}

/// Routes IOAPIC pin `pin` (edge, active high) to this CPU, or masks it.
pub fn route(pin: u32, enable: bool) {
    let vector = u32::from(VECTOR_BASE) + pin;
    let apic_id = r32(LAPIC + LAPIC_ID) >> 24;
    let mask = if enable { 0 } else { 1 << 16 };
    ioapic_write(0x11 + 2 * pin, apic_id << 24);
    ioapic_write(0x10 + 2 * pin, vector | mask);
}

pub fn vector_of(pin: u32) -> u8 {
    VECTOR_BASE + pin as u8
}

pub fn count(vector: u8) -> u32 {
    COUNTS[usize::from(vector)].load(Ordering::Acquire)
}

/// Called from the trap path for vectors 32..=255.
pub fn interrupt(vector: u8) {
    COUNTS[usize::from(vector)].fetch_add(1, Ordering::AcqRel);
    if vector != SPURIOUS {
        w32(LAPIC + LAPIC_EOI, 0);
    }
}
