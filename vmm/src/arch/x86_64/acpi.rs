//! ACPI tables: how a kernel without ringvm's command-line words learns the
//! machine. Distribution kernels find virtio-mmio devices only in the DSDT
//! (`LNRO0005`; they lack `virtio_mmio.device=`), their CPUs only in the
//! MADT (Debian's cloud kernel has no MP-table parser), and power off
//! through the FADT's sleep registers.
//!
//! The machine is hardware-reduced ACPI (no PM1 blocks, PM timer, GPEs or
//! SCI): the FADT names only the sleep control/status and reset registers
//! of [`devices::legacy::AcpiPm`]. Tables, from [`ACPI_START`] in the BIOS
//! area the e820 map reserves (where a legacy scan for "RSD PTR " also
//! finds the RSDP):
//!
//! ```text
//! RSDP (36 bytes) → XSDT → FADT → DSDT (COM1, i8042, one LNRO0005 per virtio-mmio window, _S5)
//!                        → MADT (one local APIC per vCPU, the IOAPIC, ISA overrides, LINT1 NMI)
//! ```
//!
//! rust-vmm's `acpi_tables` builds the RSDP, XSDT, FADT and the AML. Its
//! MADT type has no interrupt source override or local APIC NMI entry and
//! hard-codes the flags to 0 (no PC-AT dual 8259), so the MADT is
//! assembled here on its generic `Sdt` from those entries' byte layouts
//! (ACPI 6.5 section 5.2.12), using the crate's own local APIC and IOAPIC
//! entries.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::legacy::{ACPI_PM_PORT, RESET_VALUE, S5_SLEEP_TYPE};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::layout::{HIMEM_START, VIRTIO_MMIO_SIZE};
use super::mptable::{APIC_ADDR, IOAPIC_ADDR, MAX_CPUS};
use crate::machine::device_manager::{VirtioSlot, COM1_IRQ, COM1_PORT, I8042_KBD_IRQ, I8042_PORT};

/// Where the RSDP goes: the start of the BIOS read-only area, one of the
/// places Linux scans when the boot protocol does not hand it the address.
/// The other tables follow; everything stays below 1 MiB.
pub const ACPI_START: u64 = 0xe_0000;

/// OEM id and table id in every header.
const OEM_ID: [u8; 6] = *b"RINGVM";
const OEM_TABLE_ID: [u8; 8] = *b"RINGVM  ";
const OEM_REVISION: u32 = 1;

/// Tables start on 16-byte boundaries (the RSDP must; the rest look tidy).
const TABLE_ALIGN: u64 = 16;

// FADT IA-PC boot architecture flags (ACPI 6.5 table 5.11).
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

// MADT (ACPI 6.5 section 5.2.12).
const MADT_HEADER_LEN: u32 = 44;
const MADT_REVISION: u8 = 5;
const MADT_FLAG_PCAT_COMPAT: u32 = 1;
const MADT_TYPE_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_TYPE_LAPIC_NMI: u8 = 4;
/// MPS INTI flags: active high, edge triggered.
const INTI_EDGE_HIGH: u16 = 0b0101;
/// Local APIC NMI entry: every processor.
const ALL_PROCESSORS: u8 = 0xff;
/// The ISA lines ringvm's devices raise, each wired straight to the same
/// IOAPIC pin by KVM's default routing (the PIT on pin 0, not 2).
const ISA_OVERRIDES: [u8; 3] = [0, I8042_KBD_IRQ as u8, COM1_IRQ as u8];

const DSDT_REVISION: u8 = 6;

/// Why the tables could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// More vCPUs than the MADT's 8-bit APIC ids describe next to the IOAPIC.
    #[error("{0} vCPUs requested, the ACPI tables describe at most {MAX_CPUS}")]
    TooManyCpus(u8),
    /// The tables would run past 1 MiB, where the kernel loads.
    #[error("ACPI tables would end at {0:#x}, past the BIOS area")]
    TooLarge(u64),
    /// Guest memory does not back the BIOS area.
    #[error("guest memory does not cover the ACPI tables at {0:#x}")]
    NotEnoughMemory(u64),
    /// Writing into guest memory failed.
    #[error("cannot write the ACPI tables: {0}")]
    Write(#[from] GuestMemoryError),
}

/// The machine the tables describe.
#[derive(Clone, Copy, Debug)]
pub struct AcpiMachine<'a> {
    /// vCPUs; local APIC id = index, 0 boots.
    pub vcpus: u8,
    /// Every virtio-mmio window and its IRQ line, in probe order.
    pub virtio: &'a [VirtioSlot],
}

/// Every table as bytes with its guest address; the first is the RSDP.
#[derive(Debug)]
pub struct AcpiTables {
    tables: Vec<(u64, Vec<u8>)>,
}

impl AcpiTables {
    /// Guest address of the RSDP, for `boot_params.acpi_rsdp_addr` and
    /// `hvm_start_info.rsdp_paddr`.
    pub fn rsdp_addr(&self) -> GuestAddress {
        GuestAddress(ACPI_START)
    }

    /// Exclusive end of the last table.
    pub fn end(&self) -> u64 {
        self.tables
            .last()
            .map_or(ACPI_START, |(at, bytes)| at + bytes.len() as u64)
    }

    /// Copies every table into guest memory.
    pub fn write<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), AcpiError> {
        let len = (self.end() - ACPI_START) as usize;
        if !mem.check_range(GuestAddress(ACPI_START), len, Permissions::Write) {
            return Err(AcpiError::NotEnoughMemory(ACPI_START));
        }
        for (at, bytes) in &self.tables {
            mem.write_slice(bytes, GuestAddress(*at))?;
        }
        Ok(())
    }
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    aml.to_aml_bytes(&mut out);
    out
}

/// Places tables one after another from [`ACPI_START`].
struct Placer {
    next: u64,
    tables: Vec<(u64, Vec<u8>)>,
}

impl Placer {
    fn place(&mut self, bytes: Vec<u8>) -> u64 {
        let at = self.next;
        self.next = (at + bytes.len() as u64).next_multiple_of(TABLE_ALIGN);
        self.tables.push((at, bytes));
        at
    }
}

/// Builds every table for `machine`; nothing is written yet.
pub fn build_tables(machine: &AcpiMachine<'_>) -> Result<AcpiTables, AcpiError> {
    if machine.vcpus == 0 || machine.vcpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus(machine.vcpus));
    }
    let dsdt = dsdt(machine.virtio);
    let madt = madt(machine.vcpus);
    // The XSDT's size is known before the addresses it holds: two entries.
    let rsdp_len = Rsdp::len() as u64;
    let xsdt_at = (ACPI_START + rsdp_len).next_multiple_of(TABLE_ALIGN);
    let xsdt_len = 36 + 2 * 8;
    let mut placer = Placer {
        next: (xsdt_at + xsdt_len).next_multiple_of(TABLE_ALIGN),
        tables: Vec::new(),
    };
    let dsdt_at = placer.place(dsdt);
    let fadt_at = placer.place(aml_bytes(&fadt(dsdt_at)));
    let madt_at = placer.place(madt);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt = aml_bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_at));

    let mut tables = vec![(ACPI_START, rsdp), (xsdt_at, xsdt)];
    tables.append(&mut placer.tables);
    let built = AcpiTables { tables };
    if built.end() > HIMEM_START {
        return Err(AcpiError::TooLarge(built.end()));
    }
    Ok(built)
}

/// Builds the tables for `machine` and writes them into `mem`; returns the
/// RSDP's address.
pub fn setup_acpi<M: GuestMemory + ?Sized>(
    mem: &M,
    machine: &AcpiMachine<'_>,
) -> Result<GuestAddress, AcpiError> {
    let tables = build_tables(machine)?;
    tables.write(mem)?;
    Ok(tables.rsdp_addr())
}

/// Hardware-reduced FADT: the sleep and reset registers of the power
/// device, no fixed power or sleep button, an i8042, and none of the PC
/// parts ringvm lacks (VGA, MSI, CMOS clock).
fn fadt(dsdt_at: u64) -> acpi_tables::fadt::FADT {
    let port = |offset: u64| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            ACPI_PM_PORT + offset,
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_at)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .preferred_pm_profile(PmProfile::EnterpriseServer);
    fadt.sleep_control_reg = port(devices::legacy::SLEEP_CONTROL);
    fadt.sleep_status_reg = port(devices::legacy::SLEEP_STATUS);
    fadt.reset_reg = port(devices::legacy::RESET);
    fadt.reset_value = RESET_VALUE;
    fadt.iapc_boot_arch = (IAPC_8042
        | IAPC_VGA_NOT_PRESENT
        | IAPC_MSI_NOT_SUPPORTED
        | IAPC_PCIE_ASPM_CONTROLS
        | IAPC_CMOS_RTC_NOT_PRESENT)
        .into();
    fadt.finalize()
}

/// MADT: the local APIC of every vCPU (id = index), the IOAPIC (id after
/// the last vCPU, as the MP table gives it), identity overrides for the ISA
/// lines in use, and LINT1 as NMI on every CPU.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, APIC_ADDR as u32);
    madt.write_u32(40, MADT_FLAG_PCAT_COMPAT);
    for cpu in 0..vcpus {
        let lapic = ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled);
        madt.append_slice(&aml_bytes(&lapic));
    }
    let ioapic = IoApic::new(vcpus + 1, IOAPIC_ADDR as u32, 0);
    madt.append_slice(&aml_bytes(&ioapic));
    for irq in ISA_OVERRIDES {
        madt.append_slice(&interrupt_override(irq, u32::from(irq), INTI_EDGE_HIGH));
    }
    madt.append_slice(&lapic_nmi(ALL_PROCESSORS, 1));
    madt.as_slice().to_vec()
}

/// Interrupt Source Override (type 2, 10 bytes): ISA `irq` is `gsi`.
fn interrupt_override(irq: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut e = [0u8; 10];
    e[0] = MADT_TYPE_INTERRUPT_OVERRIDE;
    e[1] = 10;
    e[2] = 0; // bus: ISA
    e[3] = irq;
    e[4..8].copy_from_slice(&gsi.to_le_bytes());
    e[8..10].copy_from_slice(&flags.to_le_bytes());
    e
}

/// Local APIC NMI (type 4, 6 bytes): `lint` of processor `uid` is an NMI.
fn lapic_nmi(uid: u8, lint: u8) -> [u8; 6] {
    let flags: u16 = 0; // conforms to the bus
    let f = flags.to_le_bytes();
    [MADT_TYPE_LAPIC_NMI, 6, uid, f[0], f[1], lint]
}

/// DSDT: COM1 (`PNP0501`), the i8042 keyboard (`PNP0303`), one `LNRO0005`
/// device per virtio-mmio window with its edge-triggered IRQ (KVM's irqfd
/// delivers an edge), and `_S5` naming the sleep type that powers off.
fn dsdt(virtio: &[VirtioSlot]) -> Vec<u8> {
    let com1_io = IO::new(COM1_PORT as u16, COM1_PORT as u16, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1 = device(
        "COM1",
        &EISAName::new("PNP0501"),
        Some(0),
        &ResourceTemplate::new(vec![&com1_io, &com1_irq]),
    );
    let kbd_data = IO::new(I8042_PORT as u16, I8042_PORT as u16, 1, 1);
    let kbd_cmd = IO::new(I8042_PORT as u16 + 4, I8042_PORT as u16 + 4, 1, 1);
    let kbd_irq = Interrupt::new(true, true, false, false, I8042_KBD_IRQ);
    let kbd = device(
        "PS2K",
        &EISAName::new("PNP0303"),
        None,
        &ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]),
    );
    let mut devices = vec![com1, kbd];
    for (index, slot) in virtio.iter().enumerate() {
        let mem = Memory32Fixed::new(true, slot.base as u32, VIRTIO_MMIO_SIZE as u32);
        let irq = Interrupt::new(true, true, false, false, slot.irq);
        // Vnnn: n stays far below 1000 (19 IRQ lines).
        let name = format!("V{:03}", index % 1000);
        devices.push(device(
            &name,
            &"LNRO0005",
            Some(index as u32),
            &ResourceTemplate::new(vec![&mem, &irq]),
        ));
    }
    let raw: Vec<RawAml<'_>> = devices.iter().map(|d| RawAml(d)).collect();
    let sb = Scope::new(
        Path::new("\\_SB_"),
        raw.iter().map(|r| r as &dyn Aml).collect(),
    );
    let s5 = Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    );

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&aml_bytes(&sb));
    dsdt.append_slice(&aml_bytes(&s5));
    dsdt.as_slice().to_vec()
}

/// One `Device` with its hardware id, optional unique id and resources.
fn device(name: &str, hid: &dyn Aml, uid: Option<u32>, crs: &ResourceTemplate<'_>) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), hid);
    let uid = uid.map(|u| Name::new(Path::new("_UID"), &u));
    let crs = Name::new(Path::new("_CRS"), crs);
    let mut children: Vec<&dyn Aml> = vec![&hid];
    if let Some(uid) = &uid {
        children.push(uid);
    }
    children.push(&crs);
    aml_bytes(&Device::new(Path::new(name), children))
}

/// AML already serialized, placed as a child of another object.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::mptable::{mptable_size, MPTABLE_START};
    use vm_memory::GuestMemoryMmap;

    fn slots(n: usize) -> Vec<VirtioSlot> {
        (0..n)
            .map(|i| VirtioSlot {
                base: 0xd000_1000 + i as u64 * 0x1000,
                irq: 5 + i as u32,
            })
            .collect()
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn find<'a>(t: &'a AcpiTables, sig: &[u8]) -> (u64, &'a [u8]) {
        t.tables
            .iter()
            .find(|(_, b)| b.starts_with(sig))
            .map(|(a, b)| (*a, b.as_slice()))
            .unwrap()
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    #[test]
    fn every_table_sums_to_zero_and_has_its_length() {
        for (vcpus, devs) in [(1, 0), (2, 3), (MAX_CPUS, 19)] {
            let s = slots(devs);
            let t = build_tables(&AcpiMachine { vcpus, virtio: &s }).unwrap();
            let (_, rsdp) = find(&t, b"RSD PTR ");
            assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
            assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
            assert_eq!(u32_at(rsdp, 20) as usize, rsdp.len());
            for sig in [b"XSDT", b"FACP", b"APIC", b"DSDT"] {
                let (at, b) = find(&t, sig);
                assert_eq!(sum(b), 0, "{} checksum", String::from_utf8_lossy(sig));
                assert_eq!(u32_at(b, 4) as usize, b.len());
                assert_eq!(at % 16, 0);
            }
            assert!(t.end() <= HIMEM_START);
            // The MP table (kept for kernels without ACPI) spills past the
            // EBDA for many vCPUs; it must still end before the RSDP.
            assert!(MPTABLE_START + mptable_size(vcpus) as u64 <= ACPI_START);
        }
    }

    #[test]
    fn pointers_chain_rsdp_to_every_table() {
        let s = slots(2);
        let t = build_tables(&AcpiMachine {
            vcpus: 2,
            virtio: &s,
        })
        .unwrap();
        let (rsdp_at, rsdp) = find(&t, b"RSD PTR ");
        assert_eq!(rsdp_at, ACPI_START);
        assert_eq!(t.rsdp_addr(), GuestAddress(ACPI_START));
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        let (xsdt_at, xsdt) = find(&t, b"XSDT");
        assert_eq!(u64_at(rsdp, 24), xsdt_at);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let (fadt_at, fadt) = find(&t, b"FACP");
        let (madt_at, _) = find(&t, b"APIC");
        assert_eq!(entries, vec![fadt_at, madt_at]);
        let (dsdt_at, _) = find(&t, b"DSDT");
        assert_eq!(u64_at(fadt, 140), dsdt_at, "X_DSDT");
    }

    #[test]
    fn fadt_is_hardware_reduced_with_the_power_registers() {
        let t = build_tables(&AcpiMachine {
            vcpus: 1,
            virtio: &[],
        })
        .unwrap();
        let (_, f) = find(&t, b"FACP");
        assert_eq!(f.len(), 276, "ACPI 6 FADT");
        let flags = u32_at(f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let iapc = u16::from_le_bytes([f[109], f[110]]);
        assert_ne!(iapc & IAPC_8042, 0);
        assert_ne!(iapc & IAPC_CMOS_RTC_NOT_PRESENT, 0);
        // Generic address structures: space 1 = I/O, 8 bits wide.
        let gas = |at: usize| (f[at], f[at + 1], u64_at(f, at + 4));
        assert_eq!(gas(116), (1, 8, ACPI_PM_PORT + 2), "reset register");
        assert_eq!(f[128], RESET_VALUE);
        assert_eq!(gas(244), (1, 8, ACPI_PM_PORT), "sleep control");
        assert_eq!(gas(256), (1, 8, ACPI_PM_PORT + 1), "sleep status");
    }

    #[test]
    fn madt_lists_every_vcpu_the_ioapic_overrides_and_nmi() {
        for vcpus in [1u8, 4, MAX_CPUS] {
            let t = build_tables(&AcpiMachine { vcpus, virtio: &[] }).unwrap();
            let (_, m) = find(&t, b"APIC");
            assert_eq!(u32_at(m, 36), APIC_ADDR as u32);
            assert_eq!(u32_at(m, 40), MADT_FLAG_PCAT_COMPAT);
            let mut entries = Vec::new();
            let mut at = MADT_HEADER_LEN as usize;
            while at < m.len() {
                let (kind, len) = (m[at], m[at + 1] as usize);
                assert!(len >= 2 && at + len <= m.len());
                entries.push((kind, &m[at..at + len]));
                at += len;
            }
            assert_eq!(at, m.len(), "entries fill the table exactly");
            let lapics: Vec<_> = entries.iter().filter(|(k, _)| *k == 0).collect();
            assert_eq!(lapics.len(), usize::from(vcpus));
            for (i, (_, e)) in lapics.iter().enumerate() {
                assert_eq!((e[2], e[3]), (i as u8, i as u8), "uid and APIC id");
                assert_eq!(u32_at(e, 4), 1, "enabled");
            }
            let ioapics: Vec<_> = entries.iter().filter(|(k, _)| *k == 1).collect();
            assert_eq!(ioapics.len(), 1);
            let io = ioapics[0].1;
            assert_eq!(io[2], vcpus.wrapping_add(1));
            assert_eq!(u32_at(io, 4), IOAPIC_ADDR as u32);
            assert_eq!(u32_at(io, 8), 0, "GSI base");
            let isos: Vec<_> = entries.iter().filter(|(k, _)| *k == 2).collect();
            assert_eq!(isos.len(), ISA_OVERRIDES.len());
            for (_, e) in &isos {
                assert_eq!(u32::from(e[3]), u32_at(e, 4), "identity");
            }
            assert_eq!(entries.iter().filter(|(k, _)| *k == 4).count(), 1);
            assert_eq!(
                entries.len(),
                usize::from(vcpus) + 1 + ISA_OVERRIDES.len() + 1
            );
        }
    }

    #[test]
    fn dsdt_names_each_virtio_window_and_the_legacy_devices() {
        let s = slots(3);
        let t = build_tables(&AcpiMachine {
            vcpus: 1,
            virtio: &s,
        })
        .unwrap();
        let (_, d) = find(&t, b"DSDT");
        assert_eq!(count(d, b"LNRO0005"), 3);
        for slot in &s {
            // Memory32Fixed: tag 0x86, length 9, read-write, base, 4 KiB.
            let mut desc = vec![0x86, 9, 0, 1];
            desc.extend_from_slice(&(slot.base as u32).to_le_bytes());
            desc.extend_from_slice(&0x1000u32.to_le_bytes());
            assert_eq!(count(d, &desc), 1, "window {:#x}", slot.base);
            // Extended interrupt: tag 0x89, consumer + edge, one IRQ.
            let mut irq = vec![0x89, 6, 0, 0b11, 1];
            irq.extend_from_slice(&slot.irq.to_le_bytes());
            assert_eq!(count(d, &irq), 1, "irq {}", slot.irq);
        }
        for name in [b"V000", b"V001", b"V002", b"COM1", b"PS2K", b"_S5_"] {
            assert_eq!(count(d, name), 1, "{}", String::from_utf8_lossy(name));
        }
        // PNP0501 and PNP0303 as EISA ids.
        assert_eq!(count(d, &[0x41, 0xd0, 0x05, 0x01]), 1);
        assert_eq!(count(d, &[0x41, 0xd0, 0x03, 0x03]), 1);
    }

    #[test]
    fn bad_cpu_counts_are_refused_and_tables_land_in_memory() {
        assert!(matches!(
            build_tables(&AcpiMachine {
                vcpus: 0,
                virtio: &[]
            }),
            Err(AcpiError::TooManyCpus(0))
        ));
        assert!(build_tables(&AcpiMachine {
            vcpus: 255,
            virtio: &[]
        })
        .is_err());
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = setup_acpi(
            &mem,
            &AcpiMachine {
                vcpus: 2,
                virtio: &[],
            },
        )
        .unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let small: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            setup_acpi(
                &small,
                &AcpiMachine {
                    vcpus: 1,
                    virtio: &[]
                }
            ),
            Err(AcpiError::NotEnoughMemory(_))
        ));
    }
}
