//! Where things live in guest physical memory.
//!
//! Low memory holds the boot structures at fixed addresses Linux accepts;
//! the 768 MiB below 4 GiB are left for MMIO (IOAPIC, LAPIC, virtio-mmio
//! devices, the boot timer), and RAM that does not fit below that gap
//! continues at 4 GiB.

use vm_memory::GuestAddress;

/// The GDT the vCPUs start with.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the kernel loads its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux boot protocol "zero page" (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry: PML4, PDPT, then four
/// page directories that map the first 4 GiB with 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories.
pub const PDE_START: u64 = 0xb000;
/// `setup_data` entries chained from the zero page (the RNG seed).
pub const SETUP_DATA_START: u64 = 0xf000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// x86 Linux truncates the command line past 2048 bytes; refuse instead.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: RAM below it is usable, from it to
/// 1 MiB is reserved (the MP table lives there).
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels load at 1 MiB and above.
pub const HIMEM_START: u64 = 0x10_0000;
/// The MMIO hole below 4 GiB starts here and is this long.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// Length of the 32-bit MMIO hole.
pub const MMIO_GAP_SIZE: u64 = 0x3000_0000;
/// First address past 4 GiB, where RAM resumes above the hole.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// The boot timer sits at the very start of the MMIO hole, where Firecracker
/// puts it, so guest images that write 123 there measure the same way.
pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
/// virtio-mmio devices follow, one 4 KiB window each.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START + 0x1000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// KVM needs three pages for the TSS and one for the identity map, inside
/// the hole and away from devices.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's EPT identity-map page (real-mode emulation on Intel).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The RAM ranges for `mem_bytes` of guest memory: everything below the MMIO
/// hole first, the rest from 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (
                GuestAddress(FIRST_ADDR_PAST_32BITS),
                mem_bytes - MMIO_GAP_START,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(r[1].0, GuestAddress(FIRST_ADDR_PAST_32BITS));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let fixed = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 0x8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x20),
            (PVH_MEMMAP_START, 0x600),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x4000),
            (SETUP_DATA_START, 0x100),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, a) in fixed.iter().enumerate() {
            for b in &fixed[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
            assert!(a.0 + a.1 <= EBDA_START);
        }
    }
}
