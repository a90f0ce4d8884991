//! Guest memory for rings and buffers: a bump arena in .bss, emptied
//! before each case. Addresses are physical (= virtual: identity map).

use core::ptr;

const ARENA_SIZE: usize = 1 << 20;

#[repr(C, align(4096))]
struct Arena([u8; ARENA_SIZE]);

static mut ARENA: Arena = Arena([0; ARENA_SIZE]);
static mut NEXT: usize = 0;

fn base() -> u64 {
    ptr::addr_of!(ARENA) as u64
}

/// Forgets every allocation (the next case starts from the bottom).
pub fn reset() {
    // SAFETY: single CPU, no interrupt handler allocates.
    unsafe { NEXT = 0 };
}

/// `len` zeroed bytes aligned to `align` (a power of two).
pub fn alloc(len: usize, align: usize) -> u64 {
    // SAFETY: single CPU; the arena is ours.
    unsafe {
        let start = (NEXT + align - 1) & !(align - 1);
        let end = start + len;
        if end > ARENA_SIZE {
            crate::println!("FAIL vtest: arena exhausted ({end} bytes)");
            crate::arch::exit(false);
        }
        NEXT = end;
        let addr = base() + start as u64;
        fill(addr, 0, len);
        addr
    }
}

/// Fills `len` bytes at `addr` with `b`.
pub fn fill(addr: u64, b: u8, len: usize) {
    // SAFETY: callers pass arena memory (or memory they own).
    unsafe { ptr::write_bytes(addr as *mut u8, b, len) };
}

pub fn w8(addr: u64, v: u8) {
    // SAFETY: arena memory shared with the device; volatile because the
    // device reads it behind the compiler's back.
    unsafe { ptr::write_volatile(addr as *mut u8, v) }
}
pub fn w16(addr: u64, v: u16) {
    // SAFETY: as w8.
    unsafe { ptr::write_volatile(addr as *mut u16, v) }
}
pub fn w32(addr: u64, v: u32) {
    // SAFETY: as w8.
    unsafe { ptr::write_volatile(addr as *mut u32, v) }
}
pub fn w64(addr: u64, v: u64) {
    // SAFETY: as w8.
    unsafe { ptr::write_volatile(addr as *mut u64, v) }
}
pub fn r8(addr: u64) -> u8 {
    // SAFETY: as w8; the device writes it behind the compiler's back.
    unsafe { ptr::read_volatile(addr as *const u8) }
}
pub fn r16(addr: u64) -> u16 {
    // SAFETY: as r8.
    unsafe { ptr::read_volatile(addr as *const u16) }
}
pub fn r32(addr: u64) -> u32 {
    // SAFETY: as r8.
    unsafe { ptr::read_volatile(addr as *const u32) }
}
pub fn r64(addr: u64) -> u64 {
    // SAFETY: as r8.
    unsafe { ptr::read_volatile(addr as *const u64) }
}

/// The state [`pattern`] starts from for `seed`.
pub fn pattern_start(seed: u64) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// The pattern's next 8-byte word after `x` (xorshift64).
pub fn pattern_next(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Fills `len` bytes with a pattern derived from `seed` (8-byte words; a
/// tail shorter than a word gets the next word's low bytes).
pub fn pattern(addr: u64, len: usize, seed: u64) {
    let mut x = pattern_start(seed);
    for i in 0..len / 8 {
        x = pattern_next(x);
        w64(addr + i as u64 * 8, x);
    }
    let x = pattern_next(x).to_le_bytes();
    for (i, &b) in x.iter().enumerate().take(len % 8) {
        w8(addr + (len / 8 * 8 + i) as u64, b);
    }
}

/// Offset of the first 8-byte word (or tail byte) that differs from
/// `pattern(seed)`.
pub fn check_pattern(addr: u64, len: usize, seed: u64) -> Option<usize> {
    let mut x = pattern_start(seed);
    for i in 0..len / 8 {
        x = pattern_next(x);
        if r64(addr + i as u64 * 8) != x {
            return Some(i * 8);
        }
    }
    let x = pattern_next(x).to_le_bytes();
    (0..len % 8)
        .map(|i| len / 8 * 8 + i)
        .find(|&off| r8(addr + off as u64) != x[off % 8])
}

/// Offset of the first byte of `len` at `addr` that is not `b` (compared
/// a word at a time).
pub fn check_fill(addr: u64, b: u8, len: usize) -> Option<usize> {
    let word = u64::from_le_bytes([b; 8]);
    if let Some(i) = (0..len / 8).find(|i| r64(addr + *i as u64 * 8) != word) {
        return Some(i * 8);
    }
    (len / 8 * 8..len).find(|&off| r8(addr + off as u64) != b)
}

/// Offset of the first non-zero 8-byte word.
pub fn check_zero(addr: u64, len: usize) -> Option<usize> {
    (0..len / 8)
        .find(|i| r64(addr + *i as u64 * 8) != 0)
        .map(|i| i * 8)
}
