//! The CPU state a kernel expects at its entry point, built as plain
//! values so it can be checked without KVM; `kvm::vcpu` loads it.
//!
//! Two entries are supported: PVH (32-bit protected mode, paging off, `rbx`
//! at the start info) and the Linux 64-bit boot protocol (long mode with an
//! identity map, `rsi` at the zero page).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};

/// Which protocol the kernel is entered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit protected mode, paging off (Xen PVH ABI, used for ELF kernels
    /// with a PVH note).
    Pvh,
    /// 64-bit long mode with identity paging (bzImage, or ELF without PVH).
    Linux64,
}

/// Errors from writing boot-time CPU tables into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// The GDT, IDT or page tables did not fit in guest memory.
    #[error("cannot write boot-time CPU tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selectors into the boot GDT below: null, null, code, data, TSS.
const CODE_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;

/// Packs a segment descriptor from flags, base and limit (Intel SDM 3.4.5).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT for `mode`: the code segment is 64-bit for the Linux entry
/// and 32-bit for PVH.
fn boot_gdt(mode: EntryMode) -> [u64; 5] {
    let code_flags = match mode {
        EntryMode::Linux64 => 0xa09b, // present, DPL0, exec/read, accessed, L=1, G=1
        EntryMode::Pvh => 0xc09b,     // present, DPL0, exec/read, accessed, D=1, G=1
    };
    [
        0,
        0,
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff), // data: present, read/write, accessed, D/B=1, G=1
        gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 32-bit TSS
    ]
}

/// Unpacks a GDT entry into the form KVM_SET_SREGS takes.
fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    // With 4 KiB granularity the limit counts pages; KVM wants bytes.
    let limit = if granularity == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and (for the 64-bit entry) identity page
/// tables covering the first 4 GiB, then returns `sregs` set up for `mode`.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let gdt = boot_gdt(mode);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;

    let code = segment_from_gdt(gdt[2], CODE_SELECTOR);
    let data = segment_from_gdt(gdt[3], DATA_SELECTOR);
    let tss = segment_from_gdt(gdt[4], TSS_SELECTOR);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

/// Identity-maps 0..4 GiB with 2 MiB pages: the 64-bit boot protocol needs
/// the kernel, the zero page and the command line mapped, wherever they are
/// below 4 GiB.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(PDPTE_START | PRESENT_RW, GuestAddress(PML4_START))?;
    for dir in 0..4u64 {
        let pd = PDE_START + dir * 0x1000;
        mem.write_obj(pd | PRESENT_RW, GuestAddress(PDPTE_START + dir * 8))?;
        for i in 0..512u64 {
            let phys = ((dir << 9) + i) << 21;
            mem.write_obj(phys | PRESENT_RW | PAGE_SIZE_2M, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// General registers at the kernel entry.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    regs
}

/// x87 and SSE control words as after FNINIT, so the kernel's first FPU use
/// does not trap on a garbage state.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR values at entry: zeroed syscall/sysenter state and the time stamp,
/// and fast strings on, as firmware leaves them.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn gdt_code_segment_matches_the_entry_mode() {
        let seg64 = segment_from_gdt(boot_gdt(EntryMode::Linux64)[2], CODE_SELECTOR);
        assert_eq!((seg64.l, seg64.db, seg64.present), (1, 0, 1));
        assert_eq!(seg64.limit, 0xffff_ffff);
        let seg32 = segment_from_gdt(boot_gdt(EntryMode::Pvh)[2], CODE_SELECTOR);
        assert_eq!((seg32.l, seg32.db, seg32.type_), (0, 1, 0xb));
    }

    #[test]
    fn long_mode_sregs_and_identity_map() {
        let m = mem();
        let s = setup_sregs(&m, EntryMode::Linux64, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        // The entry mapping 1 GiB + 2 MiB sits in the second directory.
        let pde: u64 = m.read_obj(GuestAddress(PDE_START + 0x1000 + 8)).unwrap();
        assert_eq!(pde & !0xfff, (1 << 30) + (2 << 20));
        let gdt2: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 16)).unwrap();
        assert_eq!(gdt2, boot_gdt(EntryMode::Linux64)[2]);
    }

    #[test]
    fn pvh_starts_unpaged_with_rbx_at_start_info() {
        let m = mem();
        let s = setup_sregs(&m, EntryMode::Pvh, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer, 0);
        let r = boot_regs(EntryMode::Pvh, 0x100_0000);
        assert_eq!((r.rip, r.rbx), (0x100_0000, PVH_INFO_START));
    }

    #[test]
    fn tables_that_do_not_fit_are_an_error() {
        let tiny = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(setup_sregs(&tiny, EntryMode::Linux64, kvm_sregs::default()).is_err());
    }
}
