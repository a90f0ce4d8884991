//! What ringvm tells the kernel at entry: the command line and the e820
//! map from the Linux zero page.

use crate::mem::{r32, r64, r8};

const ZP_E820_ENTRIES: u64 = 0x1e8;
const ZP_CMD_LINE_PTR: u64 = 0x228;
const ZP_E820_TABLE: u64 = 0x2d0;
const E820_RAM: u32 = 1;
const CMDLINE_MAX: usize = 2048;

/// A virtio-mmio device from a `virtio_mmio.device=<size>@<base>:<irq>`
/// parameter.
#[derive(Clone, Copy, Debug)]
pub struct MmioSlot {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

pub const MAX_SLOTS: usize = 16;

pub struct BootInfo {
    pub cmdline: &'static [u8],
    pub slots: [Option<MmioSlot>; MAX_SLOTS],
    /// First byte past the highest RAM range.
    pub ram_end: u64,
    /// First byte past the highest RAM range below 4 GiB (where the MMIO
    /// hole or unbacked space begins; identity-mapped, so writable here).
    pub low_ram_end: u64,
}

impl BootInfo {
    /// Reads the zero page at `zp`.
    pub fn parse(zp: u64) -> BootInfo {
        let ptr = u64::from(r32(zp + ZP_CMD_LINE_PTR));
        let cmdline: &'static [u8] = if ptr == 0 {
            &[]
        } else {
            let mut len = 0;
            while len < CMDLINE_MAX && r8(ptr + len as u64) != 0 {
                len += 1;
            }
            // SAFETY: ringvm wrote a NUL-terminated string there, in RAM
            // this kernel never writes.
            unsafe { core::slice::from_raw_parts(ptr as *const u8, len) }
        };
        let (mut ram_end, mut low_ram_end) = (0, 0);
        let n = u64::from(r8(zp + ZP_E820_ENTRIES)).min(128);
        for i in 0..n {
            let e = zp + ZP_E820_TABLE + i * 20;
            let (addr, size, kind) = (r64(e), r64(e + 8), r32(e + 16));
            let end = addr.saturating_add(size);
            if kind != E820_RAM {
                continue;
            }
            ram_end = ram_end.max(end);
            if end <= 1 << 32 {
                low_ram_end = low_ram_end.max(end);
            }
        }
        let mut info = BootInfo {
            cmdline,
            slots: [None; MAX_SLOTS],
            ram_end,
            low_ram_end,
        };
        let mut n = 0;
        for word in info.words() {
            if let Some(v) = word.strip_prefix(b"virtio_mmio.device=") {
                if let Some(slot) = parse_slot(v) {
                    if n < MAX_SLOTS {
                        info.slots[n] = Some(slot);
                        n += 1;
                    }
                }
            }
        }
        info
    }

    pub fn words(&self) -> impl Iterator<Item = &'static [u8]> {
        self.cmdline.split(|b| *b == b' ').filter(|w| !w.is_empty())
    }

    /// The value of `key=value` on the command line.
    pub fn param(&self, key: &[u8]) -> Option<&'static [u8]> {
        self.words()
            .find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix(b"=")))
    }

    pub fn flag(&self, key: &[u8]) -> bool {
        self.words().any(|w| w == key)
    }
}

/// `4K@0xd0001000:5`
fn parse_slot(v: &[u8]) -> Option<MmioSlot> {
    let at = v.iter().position(|b| *b == b'@')?;
    let colon = v.iter().position(|b| *b == b':')?;
    let size = parse_size(&v[..at])?;
    let base = parse_num(&v[at + 1..colon])?;
    let irq = parse_num(&v[colon + 1..])?;
    Some(MmioSlot {
        base,
        size,
        irq: u32::try_from(irq).ok()?,
    })
}

fn parse_size(v: &[u8]) -> Option<u64> {
    let (num, mult) = match v.last()? {
        b'K' | b'k' => (&v[..v.len() - 1], 1 << 10),
        b'M' | b'm' => (&v[..v.len() - 1], 1 << 20),
        b'G' | b'g' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    parse_num(num)?.checked_mul(mult)
}

/// Decimal, or hexadecimal with a 0x prefix.
pub fn parse_num(v: &[u8]) -> Option<u64> {
    let (digits, radix) = match v.strip_prefix(b"0x").or_else(|| v.strip_prefix(b"0X")) {
        Some(h) => (h, 16),
        None => (v, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in digits {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        if u32::from(d) >= radix {
            return None;
        }
        n = n.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(n)
}
