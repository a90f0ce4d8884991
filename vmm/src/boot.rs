//! Puts a kernel, its initrd and command line into guest memory and writes
//! the structures its entry protocol reads: the zero page (with the e820
//! map and an RNG seed) for the Linux 64-bit protocol, or the PVH start
//! info.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{linux::LinuxBootConfigurator, BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, load_cmdline, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::x86_64::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, SETUP_DATA_START, ZERO_PAGE_START,
};
use crate::arch::x86_64::regs::EntryMode;
use crate::host_file::{open_image, ImageAccess};

/// Errors while loading the kernel image and its boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        /// The path given.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The initrd file could not be opened or read.
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        /// The path given.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage, or a broken one.
    #[error("{path} is not a loadable x86_64 kernel (ELF: {elf}; bzImage: {bzimage})")]
    BadKernel {
        /// The path given.
        path: PathBuf,
        /// What the ELF loader said.
        elf: linux_loader::loader::Error,
        /// What the bzImage loader said.
        bzimage: linux_loader::loader::Error,
    },
    /// The initrd does not fit in low memory above the kernel.
    #[error(
        "initrd of {size} bytes does not fit in guest memory below {limit:#x} above the kernel"
    )]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// Highest usable address.
        limit: u64,
    },
    /// The command line is longer than x86 Linux accepts.
    #[error("kernel command line is {0} bytes; x86 Linux takes at most {CMDLINE_MAX_SIZE}")]
    CmdlineTooLong(usize),
    /// The command line has a character the kernel would not parse.
    #[error("bad kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("cannot write the kernel command line: {0}")]
    LoadCmdline(linux_loader::loader::Error),
    /// Writing the zero page or PVH structures failed.
    #[error("cannot write boot parameters: {0}")]
    BootParams(#[from] linux_loader::configurator::Error),
    /// Any other guest memory write failed.
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Where the kernel starts and in which mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    /// Address of the first instruction.
    pub entry: GuestAddress,
    /// Protocol used to enter it.
    pub mode: EntryMode,
}

/// A kernel in guest memory, before its boot data is written.
#[derive(Debug)]
pub struct LoadedKernel {
    entry: KernelEntry,
    result: KernelLoaderResult,
    initrd: Option<(GuestAddress, u64)>,
}

impl LoadedKernel {
    /// Where and how the vCPUs enter the kernel.
    pub fn entry(&self) -> KernelEntry {
        self.entry
    }
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const BOOT_PROTOCOL_2_15: u16 = 0x020f;
const SETUP_RNG_SEED: u32 = 9;
const RNG_SEED_BYTES: usize = 32;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const PAGE_SIZE: u64 = 4096;

/// The kernel and initrd, opened (and type-checked, see `host_file.rs`)
/// before KVM is touched, so a bad path is a config error and the files
/// loaded are the ones checked.
#[derive(Debug)]
pub struct BootFiles {
    kernel: File,
    kernel_path: PathBuf,
    initrd: Option<(File, PathBuf)>,
}

impl BootFiles {
    /// Opens the kernel and, if given, the initrd: each must be a regular
    /// file or a block device.
    pub fn open(kernel_path: &Path, initrd_path: Option<&Path>) -> Result<Self, BootError> {
        let kernel = open_image(kernel_path, ImageAccess::default()).map_err(|source| {
            BootError::OpenKernel {
                path: kernel_path.to_path_buf(),
                source,
            }
        })?;
        let initrd = match initrd_path {
            Some(p) => Some((
                open_image(p, ImageAccess::default()).map_err(|source| BootError::Initrd {
                    path: p.to_path_buf(),
                    source,
                })?,
                p.to_path_buf(),
            )),
            None => None,
        };
        Ok(Self {
            kernel,
            kernel_path: kernel_path.to_path_buf(),
            initrd,
        })
    }
}

/// Loads the kernel (ELF first, then bzImage) and the optional initrd
/// into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, files: BootFiles) -> Result<LoadedKernel, BootError> {
    let BootFiles {
        kernel: mut file,
        kernel_path,
        initrd: initrd_file,
    } = files;
    let kernel_path = kernel_path.as_path();
    let open_err = |source| BootError::OpenKernel {
        path: kernel_path.to_path_buf(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let (result, entry) = match Elf::load(mem, None, &mut file, himem) {
        Ok(r) => {
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => KernelEntry {
                    entry: addr,
                    mode: EntryMode::Pvh,
                },
                _ => KernelEntry {
                    entry: r.kernel_load,
                    mode: EntryMode::Linux64,
                },
            };
            (r, entry)
        }
        Err(elf) => {
            file.seek(SeekFrom::Start(0)).map_err(open_err)?;
            match BzImage::load(mem, None, &mut file, himem) {
                // The 64-bit entry of a bzImage is 0x200 past its load address.
                Ok(r) => {
                    let entry = KernelEntry {
                        entry: r.kernel_load.unchecked_add(0x200),
                        mode: EntryMode::Linux64,
                    };
                    (r, entry)
                }
                Err(bzimage) => {
                    return Err(BootError::BadKernel {
                        path: kernel_path.to_path_buf(),
                        elf,
                        bzimage,
                    })
                }
            }
        }
    };
    let initrd = match initrd_file {
        Some((file, path)) => Some(load_initrd(mem, file, &path, &result)?),
        None => None,
    };
    Ok(LoadedKernel {
        entry,
        result,
        initrd,
    })
}

/// Places the initrd as high as possible in low memory (below the MMIO
/// hole and the kernel's `initrd_addr_max`), page aligned.
fn load_initrd(
    mem: &GuestMemoryMmap,
    mut file: File,
    path: &Path,
    kernel: &KernelLoaderResult,
) -> Result<(GuestAddress, u64), BootError> {
    let err = |source| BootError::Initrd {
        path: path.to_path_buf(),
        source,
    };
    // Seeking finds a block device's size too (its metadata says 0).
    let size = file.seek(SeekFrom::End(0)).map_err(err)?;
    file.seek(SeekFrom::Start(0)).map_err(err)?;
    let lowmem_end = mem.last_addr().raw_value().min(MMIO_GAP_START - 1) + 1;
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(0x7fff_ffff)
        + 1;
    let limit = lowmem_end.min(addr_max);
    let too_big = BootError::InitrdTooBig { size, limit };
    let start = limit.checked_sub(size).ok_or(too_big)? & !(PAGE_SIZE - 1);
    if start < kernel.kernel_end || size == 0 {
        return Err(BootError::InitrdTooBig { size, limit });
    }
    let slice = mem
        .get_slice(GuestAddress(start), size as usize)
        .map_err(BootError::Memory)?;
    file.read_exact_volatile(&mut slice.clone())
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    Ok((GuestAddress(start), size))
}

use vm_memory::ReadVolatile;

/// Writes the command line and the entry protocol's boot data. `rsdp` is
/// where the ACPI tables start, when the machine has them: the kernel is
/// told directly rather than left to scan the BIOS area.
pub fn write_boot_data(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &str,
    rsdp: Option<GuestAddress>,
) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let cmdline = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(BootError::LoadCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);
    match kernel.entry.mode {
        EntryMode::Pvh => write_pvh_start_info(mem, kernel, rsdp),
        EntryMode::Linux64 => write_zero_page(mem, kernel, cmdline_len, rsdp),
    }
}

/// The guest RAM map as (start, length, e820 type).
fn memory_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.last_addr().raw_value() + 1;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

use vm_memory::GuestMemoryRegion;

fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    rsdp: Option<GuestAddress>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    match kernel.result.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            params.hdr.version = BOOT_PROTOCOL_2_15;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = kernel.initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if write_rng_seed(mem)? {
        params.hdr.setup_data = SETUP_DATA_START;
    }
    params.acpi_rsdp_addr = rsdp.map_or(0, |a| a.raw_value());
    let map = memory_map(mem);
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)?;
    Ok(())
}

/// Chains a SETUP_RNG_SEED entry so the guest's CRNG is seeded at once
/// instead of waiting for jitter entropy (slow under an emulated CPU).
/// Returns false when the host could not provide randomness.
fn write_rng_seed(mem: &GuestMemoryMmap) -> Result<bool, BootError> {
    let mut seed = [0u8; RNG_SEED_BYTES];
    // SAFETY: getrandom writes at most `seed.len()` bytes into the buffer,
    // which is valid and exclusively ours for the call.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != seed.len() as isize {
        log::warn!("no host randomness for the guest RNG seed; the guest will gather its own");
        return Ok(false);
    }
    let header = SetupDataHeader {
        next: 0,
        type_: SETUP_RNG_SEED,
        len: RNG_SEED_BYTES as u32,
    };
    mem.write_obj(header, GuestAddress(SETUP_DATA_START))?;
    let data_at = SETUP_DATA_START + std::mem::size_of::<SetupDataHeader>() as u64;
    mem.write_slice(&seed, GuestAddress(data_at))?;
    Ok(true)
}

/// `struct setup_data` from arch/x86/include/uapi/asm/setup_data.h, without
/// its flexible data member (linux-loader does not export it).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct SetupDataHeader {
    next: u64,
    type_: u32,
    len: u32,
}
// SAFETY: two u64-aligned integers of fixed layout with no padding; any
// byte pattern is a valid value.
unsafe impl ByteValued for SetupDataHeader {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: hvm_start_info is a C struct of integers with no padding holes
// that matter to the guest; any byte pattern is a valid value.
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: as above, plain integers.
unsafe impl ByteValued for MemmapEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: as above, plain integers.
unsafe impl ByteValued for ModlistEntry {}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    rsdp: Option<GuestAddress>,
) -> Result<(), BootError> {
    let map: Vec<MemmapEntry> = memory_map(mem)
        .into_iter()
        .map(|(addr, size, type_)| {
            MemmapEntry(hvm_memmap_table_entry {
                addr,
                size,
                type_,
                reserved: 0,
            })
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp.map_or(0, |a| a.raw_value()),
        ..Default::default()
    };
    let mut bp = BootParams::new(&StartInfo(info), GuestAddress(PVH_INFO_START));
    if let Some((addr, size)) = kernel.initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        bp = BootParams::new(&StartInfo(info), GuestAddress(PVH_INFO_START));
        let module = ModlistEntry(hvm_modlist_entry {
            paddr: addr.raw_value(),
            size,
            ..Default::default()
        });
        bp.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    bp.set_sections(&map, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> = crate::arch::x86_64::layout::ram_ranges(size)
            .into_iter()
            .map(|(a, l)| (a, l as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn memory_map_reserves_the_bios_area_and_covers_ram() {
        let m = mem(64 << 20);
        let map = memory_map(&m);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn a_missing_kernel_is_named() {
        let m = mem(16 << 20);
        let _ = m;
        let e = BootFiles::open(Path::new("/nonexistent/vmlinux"), None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let dir = std::env::temp_dir().join(format!("ringvm-boot-{}", std::process::id()));
        std::fs::write(&dir, vec![0x5a; 8192]).unwrap();
        let m = mem(16 << 20);
        let e = load_kernel(&m, BootFiles::open(&dir, None).unwrap()).unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(e, BootError::BadKernel { .. }), "{e}");
    }

    #[test]
    fn rng_seed_is_chained_setup_data() {
        let m = mem(16 << 20);
        assert!(write_rng_seed(&m).unwrap());
        let hdr: SetupDataHeader = m.read_obj(GuestAddress(SETUP_DATA_START)).unwrap();
        assert_eq!((hdr.type_, hdr.len, hdr.next), (SETUP_RNG_SEED, 32, 0));
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let m = mem(16 << 20);
        let k = LoadedKernel {
            entry: KernelEntry {
                entry: GuestAddress(HIMEM_START),
                mode: EntryMode::Linux64,
            },
            result: KernelLoaderResult::default(),
            initrd: None,
        };
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_boot_data(&m, &k, &long, None),
            Err(BootError::CmdlineTooLong(_))
        ));
        write_boot_data(&m, &k, "console=ttyS0", None).unwrap();
        let zp: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ zp.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ zp.e820_entries }, 3);
        assert_eq!({ zp.hdr.setup_data }, SETUP_DATA_START);
    }

    #[test]
    fn both_entry_protocols_carry_the_rsdp() {
        let m = mem(16 << 20);
        let rsdp = GuestAddress(0xe_0000);
        for mode in [EntryMode::Linux64, EntryMode::Pvh] {
            let k = LoadedKernel {
                entry: KernelEntry {
                    entry: GuestAddress(HIMEM_START),
                    mode,
                },
                result: KernelLoaderResult::default(),
                initrd: None,
            };
            write_boot_data(&m, &k, "console=ttyS0", Some(rsdp)).unwrap();
        }
        let zp: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ zp.acpi_rsdp_addr }, 0xe_0000);
        let info: StartInfo = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!({ info.0.rsdp_paddr }, 0xe_0000);
    }
}
