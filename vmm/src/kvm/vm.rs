//! The KVM VM: guest memory slots, the in-kernel interrupt controllers and
//! PIT, and the eventfd wiring that lets devices interrupt the guest and
//! the guest kick devices without any vCPU exit reaching ringvm.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{ram_ranges, KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors creating or wiring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm is missing or cannot be opened.
    #[error("KVM is not available (/dev/kvm): {0}")]
    KvmUnavailable(kvm_ioctls::Error),
    /// The host KVM lacks something ringvm needs.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error from the kernel.
        source: kvm_ioctls::Error,
    },
    /// The host could not give us the guest's memory.
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Memory {
        /// Requested size.
        mib: u64,
        /// Why.
        source: vm_memory::mmap::FromRangesError,
    },
}

impl VmError {
    /// The documented exit code: KVM missing or lacking a capability is the
    /// host's state (4); anything else is ringvm's failure (1).
    pub fn exit_code(&self) -> i32 {
        match self {
            VmError::KvmUnavailable(_) | VmError::MissingCap(_) => {
                crate::exit_code::KVM_UNAVAILABLE
            }
            _ => crate::exit_code::INTERNAL,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// True when this host's KVM is PVM-native (module `kvm_pvm`), where guest
/// code runs in KVM's instruction emulator and needs the `pvm-safe` CPU
/// template.
pub fn host_is_pvm_native() -> bool {
    std::fs::read_to_string("/sys/module/kvm_pvm/parameters/pvm_native")
        .map(|s| s.trim() == "Y" || s.trim() == "1")
        .unwrap_or(false)
}

/// A VM with its memory mapped and its interrupt controllers created.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemoryMmap,
}

impl Vm {
    /// Opens /dev/kvm, creates the VM, gives it `mem_mib` MiB of RAM, the
    /// in-kernel IOAPIC/PIC/LAPICs and a PIT.
    pub fn new(mem_mib: u64) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::KvmUnavailable)?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let bytes = mem_mib << 20;
        let ranges: Vec<_> = ram_ranges(bytes)
            .into_iter()
            .map(|(a, l)| (a, l as usize))
            .collect();
        let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| VmError::Memory {
            mib: mem_mib,
            source,
        })?;
        for (slot, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::MissingCap("mapped guest memory"))?;
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is mapped for as long as `memory` lives, and
            // `memory` is owned by this Vm, which outlives the VM fd's use of
            // the slot (the fd is dropped with it).
            unsafe { fd.set_user_memory_region(mr) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Self { kvm, fd, memory })
    }

    /// The guest's RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The VM fd, for creating vCPUs.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The /dev/kvm handle, for CPUID and MSR lists.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Makes writes to `evt` raise `gsi` in the guest.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }

    /// Makes a guest write of `value` (4 bytes) to MMIO `addr` signal `evt`
    /// inside KVM, with no exit to a vCPU thread.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        value: Option<u32>,
    ) -> Result<(), VmError> {
        let at = IoEventAddress::Mmio(addr);
        match value {
            Some(v) => self.fd.register_ioevent(evt, &at, v),
            None => self.fd.register_ioevent(evt, &at, NoDatamatch),
        }
        .map_err(kvm_err("KVM_IOEVENTFD"))
    }
}
