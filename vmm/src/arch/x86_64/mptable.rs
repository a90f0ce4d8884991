//! Intel MultiProcessor Specification 1.4 tables for guests booted without ACPI.
//!
//! A Linux guest that finds no ACPI MADT falls back to scanning low memory for an
//! MP floating pointer structure. Without one it boots a single CPU in PIC mode and
//! never learns about the IOAPIC, so secondary vCPUs stay offline and the GSIs
//! above 15 that virtio-mmio devices use are unreachable. This module writes the
//! minimal table that avoids that: one processor entry per vCPU, an ISA bus, the
//! IOAPIC, an identity routing of every IOAPIC pin, and the local APIC LINT0/LINT1
//! wiring.
//!
//! Layout in guest memory, starting at [`MPTABLE_START`]:
//!
//! ```text
//! MPTABLE_START        MP floating pointer structure (16 bytes)
//! MPTABLE_START + 16   MP configuration table header (44 bytes)
//!                      processor entries (20 bytes each, one per vCPU)
//!                      bus entry, IOAPIC entry (8 bytes each)
//!                      I/O interrupt entries (8 bytes each, one per IOAPIC pin)
//!                      local interrupt entries (8 bytes each, LINT0 and LINT1)
//! ```
//!
//! The tables are serialized into a byte buffer and written with one
//! [`Bytes::write_slice`], which keeps this module free of `unsafe` and of
//! packed-struct alignment hazards.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Guest physical address of the MP floating pointer structure.
///
/// Linux only looks for the floating pointer in a few fixed windows; the last KiB
/// of conventional memory (639 KiB..640 KiB) is one of them and lies outside the
/// RAM the e820 map hands to the guest, so the table cannot be overwritten by the
/// guest before it is parsed. The configuration table follows immediately.
pub const MPTABLE_START: u64 = 0x9fc00;

/// Exclusive upper bound for the end of the whole MP table (1 MiB, where the
/// kernel is loaded; `layout::HIMEM_START`).
///
/// Only 1 KiB sits between [`MPTABLE_START`] and 0xA0000, which holds the table
/// for at most 37 vCPUs. Larger tables spill into the legacy VGA/option-ROM/BIOS
/// hole (0xA0000..0x100000). The memory map reserves everything from
/// [`MPTABLE_START`] to 1 MiB and no other boot structure lives there, so the
/// guest neither allocates nor clobbers it. The table for [`MAX_CPUS`] ends at
/// 0xA10F4, far below this bound.
pub const MPTABLE_LIMIT: u64 = 0x10_0000;

/// Guest physical address of the IOAPIC MMIO window.
///
/// This is the architectural default that KVM's in-kernel IOAPIC decodes; the
/// table must advertise the same address or the guest programs a phantom device.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;

/// Guest physical address of the local APIC MMIO window.
///
/// Advertised in the configuration table header so the guest maps the local APIC
/// where KVM emulates it (the architectural reset value of `IA32_APIC_BASE`).
pub const APIC_ADDR: u64 = 0xfee0_0000;

/// Number of input pins on the IOAPIC, and therefore of routable GSIs.
///
/// KVM's in-kernel IOAPIC has 24 pins; every one gets an interrupt entry so that
/// ISA IRQs 0..15 and the GSIs 16..23 used by virtio-mmio devices are all routed.
pub const IRQ_LINES: u8 = 24;

/// Largest vCPU count the table can describe.
///
/// vCPU local APIC ids are their indices and the IOAPIC takes id `num_cpus + 1`;
/// every id is an 8-bit field in the table, so 254 vCPUs (ids 0..=253, IOAPIC
/// id 255) is the most that can be encoded.
pub const MAX_CPUS: u8 = 254;

/// MP specification revision 1.4, as encoded in both structures.
const MP_SPEC_REV: u8 = 4;
/// Local APIC version advertised for every vCPU (integrated xAPIC).
const APIC_VERSION: u8 = 0x14;
/// IOAPIC version advertised (82093AA-compatible, as KVM emulates).
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature: family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX feature flags advertised: FPU (bit 0) and on-chip APIC (bit 9).
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// OEM id string of the configuration table header (space padded).
const OEM_ID: &[u8; 8] = b"RINGVM  ";
/// Product id string of the configuration table header (space padded).
const PRODUCT_ID: &[u8; 12] = b"MICROVM     ";
/// Bus type string of the ISA bus entry (space padded).
const BUS_TYPE_ISA: &[u8; 6] = b"ISA   ";
/// Id of the single (ISA) bus.
const ISA_BUS_ID: u8 = 0;

/// Entry type codes of the configuration table.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// Interrupt type codes of I/O and local interrupt entries.
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Interrupt flags "polarity and trigger mode conform to the bus" (ISA: active
/// high, edge triggered), which is what Linux expects for legacy-style routing.
const INT_FLAGS_CONFORMING: u16 = 0;

/// Processor entry flag: the CPU is usable.
const CPU_FLAG_ENABLED: u8 = 1 << 0;
/// Processor entry flag: the CPU is the bootstrap processor.
const CPU_FLAG_BSP: u8 = 1 << 1;
/// IOAPIC entry flag: the IOAPIC is usable.
const IOAPIC_FLAG_ENABLED: u8 = 1 << 0;

/// Destination local APIC id meaning "every local APIC".
const ALL_LOCAL_APICS: u8 = 0xff;

/// Sizes of the structures, in bytes, fixed by the specification.
const FLOATING_POINTER_LEN: usize = 16;
const CONFIG_HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

/// Offsets of the header fields patched after the entries are serialized.
const HEADER_LENGTH_OFFSET: usize = 4;
const HEADER_CHECKSUM_OFFSET: usize = 7;
const HEADER_ENTRY_COUNT_OFFSET: usize = 34;
/// Offset of the checksum byte in the floating pointer structure.
const FLOATING_POINTER_CHECKSUM_OFFSET: usize = 10;

/// Number of entries after the processor entries: bus, IOAPIC, one I/O interrupt
/// entry per IOAPIC pin, and the two local interrupt entries.
const NON_CPU_ENTRIES: usize = 1 + 1 + IRQ_LINES as usize + 2;

/// Why the MP table could not be written.
#[derive(Debug, Error)]
pub enum MptableError {
    /// A guest needs at least one vCPU, and the BSP entry is mandatory.
    #[error("an MP table needs at least one CPU")]
    NoCpus,
    /// More vCPUs than 8-bit APIC ids can address alongside the IOAPIC.
    #[error("{0} CPUs requested, the MP table supports at most {MAX_CPUS}")]
    TooManyCpus(u8),
    /// The table would run past [`MPTABLE_LIMIT`] into memory used for other things.
    #[error("MP table would end at {end:#x}, beyond the limit {limit:#x}")]
    TableTooLarge {
        /// Exclusive end address the table would need.
        end: u64,
        /// Exclusive end address the table must stay below.
        limit: u64,
    },
    /// Guest memory does not back the whole range the table occupies.
    #[error("guest memory does not cover the MP table at {start:#x}..{end:#x}")]
    NotEnoughMemory {
        /// First byte of the table.
        start: u64,
        /// Exclusive end of the table.
        end: u64,
    },
    /// Writing the serialized table into guest memory failed.
    #[error("failed to write the MP table to guest memory: {0}")]
    Write(#[source] GuestMemoryError),
}

/// Size in bytes of everything [`setup_mptable`] writes for `num_cpus` vCPUs.
///
/// Exposed so the memory map can reserve exactly
/// `MPTABLE_START..MPTABLE_START + mptable_size(num_cpus)`.
pub const fn mptable_size(num_cpus: u8) -> usize {
    FLOATING_POINTER_LEN
        + CONFIG_HEADER_LEN
        + num_cpus as usize * PROCESSOR_ENTRY_LEN
        + NON_CPU_ENTRIES * SMALL_ENTRY_LEN
}

/// Writes the MP floating pointer and configuration table for `num_cpus` vCPUs.
///
/// Must run before the guest starts; without ACPI this is the only way Linux
/// discovers its application processors and the IOAPIC routing. The vCPUs'
/// local APIC ids must equal their index (0 is the BSP), and the IOAPIC gets id
/// `num_cpus + 1` so it never collides with a local APIC id.
pub fn setup_mptable<M: GuestMemory + ?Sized>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }

    let size = mptable_size(num_cpus);
    let end = MPTABLE_START + size as u64;
    if end > MPTABLE_LIMIT {
        return Err(MptableError::TableTooLarge {
            end,
            limit: MPTABLE_LIMIT,
        });
    }
    let start = GuestAddress(MPTABLE_START);
    if !mem.check_range(start, size, Permissions::Write) {
        return Err(MptableError::NotEnoughMemory {
            start: MPTABLE_START,
            end,
        });
    }

    let table = build_table(num_cpus);
    debug_assert_eq!(table.len(), size);
    mem.write_slice(&table, start).map_err(MptableError::Write)
}

/// Little-endian serializer for the MP structures.
struct TableBuf(Vec<u8>);

impl TableBuf {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }

    fn zeros(&mut self, n: usize) {
        self.0.resize(self.0.len() + n, 0);
    }

    fn patch_u16(&mut self, at: usize, v: u16) {
        self.0[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets the byte at `at` so that `range` sums to zero modulo 256.
    fn seal_checksum(&mut self, range: std::ops::Range<usize>, at: usize) {
        self.0[at] = 0;
        self.0[at] = checksum(&self.0[range]);
    }
}

/// The byte that makes `bytes` sum to zero modulo 256.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Narrows an address to the 32-bit fields of the MP structures.
///
/// Only used to initialize constants, so an address above 4 GiB fails the build
/// instead of being silently truncated.
const fn addr32(addr: u64) -> u32 {
    assert!(addr <= u32::MAX as u64, "MP table addresses are 32-bit");
    addr as u32
}

/// Guest physical address of the configuration table, right after the pointer.
const CONFIG_ADDR32: u32 = addr32(MPTABLE_START + FLOATING_POINTER_LEN as u64);
/// [`APIC_ADDR`] as stored in the configuration table header.
const APIC_ADDR32: u32 = addr32(APIC_ADDR);
/// [`IOAPIC_ADDR`] as stored in the IOAPIC entry.
const IOAPIC_ADDR32: u32 = addr32(IOAPIC_ADDR);

/// Serializes the floating pointer followed by the configuration table.
fn build_table(num_cpus: u8) -> Vec<u8> {
    let config_start = FLOATING_POINTER_LEN;
    let ioapic_id = num_cpus + 1;
    let mut t = TableBuf(Vec::with_capacity(mptable_size(num_cpus)));

    // MP floating pointer structure.
    t.bytes(b"_MP_");
    t.u32(CONFIG_ADDR32);
    t.u8((FLOATING_POINTER_LEN / 16) as u8); // length in 16-byte paragraphs
    t.u8(MP_SPEC_REV);
    t.u8(0); // checksum, sealed below
    t.u8(0); // feature 1: 0 = a configuration table is present
    t.u8(0); // feature 2: IMCR absent, virtual wire mode
    t.zeros(3); // features 3..5, reserved
    t.seal_checksum(0..FLOATING_POINTER_LEN, FLOATING_POINTER_CHECKSUM_OFFSET);

    // Configuration table header; length, entry count and checksum patched below.
    t.bytes(b"PCMP");
    t.u16(0); // base table length
    t.u8(MP_SPEC_REV);
    t.u8(0); // checksum
    t.bytes(OEM_ID);
    t.bytes(PRODUCT_ID);
    t.u32(0); // OEM table pointer: none
    t.u16(0); // OEM table size
    t.u16(0); // entry count
    t.u32(APIC_ADDR32);
    t.u16(0); // extended table length: none
    t.u8(0); // extended table checksum
    t.u8(0); // reserved

    // Entries, in the ascending type order the specification requires.
    for cpu in 0..num_cpus {
        let mut flags = CPU_FLAG_ENABLED;
        if cpu == 0 {
            flags |= CPU_FLAG_BSP;
        }
        t.u8(ENTRY_PROCESSOR);
        t.u8(cpu); // local APIC id
        t.u8(APIC_VERSION);
        t.u8(flags);
        t.u32(CPU_SIGNATURE);
        t.u32(CPU_FEATURES);
        t.zeros(8); // reserved
    }

    t.u8(ENTRY_BUS);
    t.u8(ISA_BUS_ID);
    t.bytes(BUS_TYPE_ISA);

    t.u8(ENTRY_IOAPIC);
    t.u8(ioapic_id);
    t.u8(IOAPIC_VERSION);
    t.u8(IOAPIC_FLAG_ENABLED);
    t.u32(IOAPIC_ADDR32);

    // Identity routing: ISA IRQ n -> IOAPIC pin n, matching KVM's default GSI
    // routing (GSI n -> IOAPIC pin n), including IRQ 0 for the in-kernel PIT.
    for pin in 0..IRQ_LINES {
        t.u8(ENTRY_IO_INTERRUPT);
        t.u8(INT_TYPE_INT);
        t.u16(INT_FLAGS_CONFORMING);
        t.u8(ISA_BUS_ID);
        t.u8(pin); // source bus IRQ
        t.u8(ioapic_id);
        t.u8(pin); // destination IOAPIC INTIN#
    }

    // Virtual wire: the 8259 output reaches LINT0, NMIs reach LINT1.
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        t.u8(ENTRY_LOCAL_INTERRUPT);
        t.u8(int_type);
        t.u16(INT_FLAGS_CONFORMING);
        t.u8(ISA_BUS_ID);
        t.u8(0); // source bus IRQ
        t.u8(ALL_LOCAL_APICS);
        t.u8(lint);
    }

    let config_len = t.0.len() - config_start;
    let entry_count = num_cpus as usize + NON_CPU_ENTRIES;
    // Both fit in u16: the largest table (254 CPUs) is a few KiB with < 300 entries.
    t.patch_u16(config_start + HEADER_LENGTH_OFFSET, config_len as u16);
    t.patch_u16(config_start + HEADER_ENTRY_COUNT_OFFSET, entry_count as u16);
    t.seal_checksum(
        config_start..t.0.len(),
        config_start + HEADER_CHECKSUM_OFFSET,
    );
    t.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr))
            .expect("read guest memory");
        buf
    }

    fn le16(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    /// Parses the table back the way a guest would and checks every entry.
    fn check_table(mem: &GuestMemoryMmap, num_cpus: u8) {
        let fp = read(mem, MPTABLE_START, FLOATING_POINTER_LEN);
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(fp[8], 1, "floating pointer length in paragraphs");
        assert_eq!(fp[9], 4, "spec revision");
        assert_eq!(sum(&fp), 0, "floating pointer checksum");
        assert_eq!(fp[11], 0, "feature 1 must select the config table");
        let physptr = u64::from(le32(&fp, 4));

        let header = read(mem, physptr, CONFIG_HEADER_LEN);
        assert_eq!(&header[0..4], b"PCMP");
        assert_eq!(header[6], 4, "spec revision");
        assert_eq!(&header[8..16], OEM_ID);
        assert_eq!(&header[16..28], PRODUCT_ID);
        assert_eq!(u64::from(le32(&header, 36)), APIC_ADDR);
        assert_eq!(le16(&header, 40), 0, "no extended table");
        let length = usize::from(le16(&header, 4));
        let count = usize::from(le16(&header, 34));

        let table = read(mem, physptr, length);
        assert_eq!(sum(&table), 0, "configuration table checksum");
        assert_eq!(
            MPTABLE_START + FLOATING_POINTER_LEN as u64 + length as u64,
            MPTABLE_START + mptable_size(num_cpus) as u64
        );
        assert!(physptr + length as u64 <= MPTABLE_LIMIT);

        let ioapic_id = num_cpus + 1;
        let mut cpus = 0usize;
        let mut bsps = 0usize;
        let mut buses = 0usize;
        let mut ioapics = 0usize;
        let mut irq_entries = 0u8;
        let mut lints = Vec::new();
        let mut last_type = 0u8;
        let mut off = CONFIG_HEADER_LEN;
        for _ in 0..count {
            let e = &table[off..];
            assert!(e[0] >= last_type, "entries must be sorted by type");
            last_type = e[0];
            match e[0] {
                ENTRY_PROCESSOR => {
                    assert_eq!(usize::from(e[1]), cpus, "APIC id == cpu index");
                    assert_eq!(e[2], 0x14);
                    assert_ne!(e[3] & CPU_FLAG_ENABLED, 0);
                    if e[3] & CPU_FLAG_BSP != 0 {
                        assert_eq!(cpus, 0, "only cpu 0 may be the BSP");
                        bsps += 1;
                    }
                    assert_eq!(le32(e, 4), 0x600);
                    assert_eq!(le32(e, 8), (1 << 0) | (1 << 9));
                    cpus += 1;
                    off += PROCESSOR_ENTRY_LEN;
                    continue;
                }
                ENTRY_BUS => {
                    assert_eq!(e[1], ISA_BUS_ID);
                    assert_eq!(&e[2..8], b"ISA   ");
                    buses += 1;
                }
                ENTRY_IOAPIC => {
                    assert_eq!(e[1], ioapic_id);
                    assert_eq!(e[2], 0x11);
                    assert_eq!(e[3] & IOAPIC_FLAG_ENABLED, 1);
                    assert_eq!(u64::from(le32(e, 4)), IOAPIC_ADDR);
                    ioapics += 1;
                }
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(e[1], INT_TYPE_INT);
                    assert_eq!(le16(e, 2), 0);
                    assert_eq!(e[4], ISA_BUS_ID);
                    assert_eq!(e[5], irq_entries, "source irq");
                    assert_eq!(e[6], ioapic_id);
                    assert_eq!(e[7], irq_entries, "destination pin");
                    irq_entries += 1;
                }
                ENTRY_LOCAL_INTERRUPT => {
                    assert_eq!(e[6], ALL_LOCAL_APICS);
                    lints.push((e[1], e[7]));
                }
                other => panic!("unknown entry type {other}"),
            }
            off += SMALL_ENTRY_LEN;
        }
        assert_eq!(off, length, "entry count and length agree");
        assert_eq!(cpus, usize::from(num_cpus));
        assert_eq!(bsps, 1);
        assert_eq!(buses, 1);
        assert_eq!(ioapics, 1);
        assert_eq!(irq_entries, IRQ_LINES);
        assert_eq!(lints, vec![(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)]);
    }

    #[test]
    fn writes_parsable_tables() {
        for num_cpus in [1u8, 2, 37, 38, MAX_CPUS] {
            let mem = memory(1 << 20);
            setup_mptable(&mem, num_cpus).expect("setup_mptable");
            check_table(&mem, num_cpus);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(mptable_size(1), 304);
        // Up to 37 CPUs the table stays within the last KiB below 640 KiB.
        assert!(MPTABLE_START + mptable_size(37) as u64 <= 0xa0000);
        assert!(MPTABLE_START + mptable_size(38) as u64 > 0xa0000);
        assert_eq!(MPTABLE_START + mptable_size(MAX_CPUS) as u64, 0xa10f4);
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        let mem = memory(1 << 20);
        assert!(matches!(setup_mptable(&mem, 0), Err(MptableError::NoCpus)));
        assert!(matches!(
            setup_mptable(&mem, 255),
            Err(MptableError::TooManyCpus(255))
        ));
        // Nothing was written.
        assert_eq!(read(&mem, MPTABLE_START, 4), vec![0; 4]);
    }

    #[test]
    fn errors_when_memory_too_small() {
        let mem = memory(64 << 10);
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(MptableError::NotEnoughMemory { .. })
        ));

        // Memory ending at 640 KiB holds small tables but not ones that spill over.
        let mem = memory(0xa0000);
        setup_mptable(&mem, 37).expect("37 CPUs fit below 0xA0000");
        check_table(&mem, 37);
        assert!(matches!(
            setup_mptable(&mem, 38),
            Err(MptableError::NotEnoughMemory { end, .. }) if end > 0xa0000
        ));
    }

    #[test]
    fn checksum_zeroes_sum() {
        let data = [1u8, 2, 3, 250, 77];
        let mut with = data.to_vec();
        with.push(checksum(&data));
        assert_eq!(sum(&with), 0);
    }
}
