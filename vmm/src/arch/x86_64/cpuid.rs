//! The CPUID a vCPU reports: KVM's supported list, given each vCPU its own
//! APIC id and topology, then filtered by a CPU template.
//!
//! On PVM-native KVM the guest runs in KVM's instruction emulator, which
//! lacks some instructions; the `pvm-safe` template hides those features
//! where CPUID can and, because this KVM does not apply every CPUID bit, the
//! same features are also turned off on the kernel command line
//! ([`CpuTemplate::kernel_params`]).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A named policy for what the guest sees of the host CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuTemplate {
    /// Everything KVM supports on this host, as Firecracker does by default.
    Host,
    /// Host minus what KVM's instruction emulator cannot run, for
    /// PVM-native KVM.
    PvmSafe,
}

/// The template names accepted on the command line and in configs.
pub const TEMPLATE_NAMES: &[&str] = &["host", "pvm-safe"];

/// Errors from choosing a template.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    /// Not one of [`TEMPLATE_NAMES`].
    #[error("unknown CPU template {0:?} (known: host, pvm-safe)")]
    UnknownTemplate(String),
}

impl std::str::FromStr for CpuTemplate {
    type Err = CpuidError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(CpuTemplate::Host),
            "pvm-safe" => Ok(CpuTemplate::PvmSafe),
            other => Err(CpuidError::UnknownTemplate(other.to_string())),
        }
    }
}

impl std::fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CpuTemplate::Host => "host",
            CpuTemplate::PvmSafe => "pvm-safe",
        })
    }
}

/// Kernel parameters that keep Linux off instructions KVM's emulator lacks.
/// Measured on PVM-native KVM: without each of these the guest stops with
/// "KVM internal error, emulation failure". XSAVE is cleared through
/// `clearcpuid=xsave` (the same effect as `noxsave`) because Linux hands a
/// bare unknown word like `noxsave` to init as an argument.
/// `cpuidle.off=1` is of another kind: with the cpuidle framework (which
/// `CONFIG_ACPI` brings) a 2-vCPU guest stopped making progress about
/// 15-20 s into boot here, with no emulation failure.
const PVM_SAFE_KERNEL_PARAMS: &str = "clearcpuid=xsave,cx16,popcnt,smap,smep,fsgsbase,pcid,\
invpcid,rdrand,rdseed,rdpid,pku,umip,avx,avx2,avx512f,movbe 8250.nr_uarts=1 cpuidle.off=1";

impl CpuTemplate {
    /// Words appended to the guest command line for this template.
    pub fn kernel_params(self) -> Option<&'static str> {
        match self {
            CpuTemplate::Host => None,
            CpuTemplate::PvmSafe => Some(PVM_SAFE_KERNEL_PARAMS),
        }
    }

    /// Whether ringvm finishes the kernel-mode instructions KVM's
    /// instruction emulator cannot run (`int3` by injecting #BP, `fwait`):
    /// what gets unpatched kernels through boot on PVM-native KVM.
    pub fn finishes_for_emulator(self) -> bool {
        self == CpuTemplate::PvmSafe
    }
}

// Leaf 1 ECX/EDX bits.
const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_PCID: u32 = 1 << 17;
const LEAF1_ECX_MOVBE: u32 = 1 << 22;
/// The local APIC's TSC-deadline mode. Hidden on PVM-native KVM for a
/// reason of time, not of a missing instruction: with it the APIC timer is
/// one-shot only, and a kernel with a periodic tick (`HZ_PERIODIC`, ours)
/// emulates the period in software, running `tick_periodic()` once for
/// every period that passed since the last one (`tick_handle_periodic`).
/// In KVM's instruction emulator a tick costs about as long as the period
/// itself, so a vCPU that falls behind (a host preemption, a lock held by
/// the other vCPU) never catches up: measured with `--log-level trace`
/// samples, both vCPUs of a 2-vCPU guest spent 95-100% of 400 s in the
/// tick path and the boot stalled between two initcalls for 257 s, with
/// ACPI and without. Without TSC-deadline the APIC timer runs in periodic
/// mode, where KVM keeps at most one tick pending, so missed ticks are
/// dropped instead of replayed: the same guest reached init in 164 s.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_POPCNT: u32 = 1 << 23;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_RDRAND: u32 = 1 << 30;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
// Leaf 7 subleaf 0 EBX/ECX bits.
const LEAF7_EBX_FSGSBASE: u32 = 1 << 0;
const LEAF7_EBX_AVX2: u32 = 1 << 5;
const LEAF7_EBX_SMEP: u32 = 1 << 7;
const LEAF7_EBX_INVPCID: u32 = 1 << 10;
const LEAF7_EBX_AVX512F: u32 = 1 << 16;
const LEAF7_EBX_RDSEED: u32 = 1 << 18;
const LEAF7_EBX_SMAP: u32 = 1 << 20;
const LEAF7_ECX_UMIP: u32 = 1 << 2;
const LEAF7_ECX_PKU: u32 = 1 << 3;
const LEAF7_ECX_RDPID: u32 = 1 << 22;
// KVM paravirt features (leaf 0x4000_0001 EAX) that work through the
// `vmcall` hypercall, which KVM's emulator on PVM-native hosts re-executes
// forever: PV spinlock kicks, PV IPIs and PV yield.
const KVM_LEAF: u32 = 0x4000_0001;
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;

/// Gives vCPU `cpu` of `count` its APIC id and a flat topology (one core
/// per vCPU, one package), then applies `template`.
pub fn filter_cpuid(cpuid: &mut CpuId, cpu: u8, count: u8, template: CpuTemplate) {
    for entry in cpuid.as_mut_slice() {
        normalize(entry, cpu, count);
        if template == CpuTemplate::PvmSafe {
            hide_emulator_gaps(entry);
        }
    }
}

fn normalize(entry: &mut kvm_cpuid_entry2, cpu: u8, count: u8) {
    match entry.function {
        0x1 => {
            entry.ebx =
                (entry.ebx & 0x0000_ffff) | (u32::from(cpu) << 24) | (u32::from(count) << 16);
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
        }
        0x4 => {
            // Cores per package - 1 in EAX[31:26]; caches are not shared by
            // threads since there is one thread per core.
            let cores = u32::from(count.max(1)) - 1;
            entry.eax = (entry.eax & 0x0000_3fff) | ((cores & 0x3f) << 26);
        }
        0xb | 0x1f => {
            let bits = u32::BITS - u32::from(count.max(1) - 1).leading_zeros();
            entry.edx = u32::from(cpu);
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = 1 << 8;
                }
                1 => {
                    entry.eax = bits;
                    entry.ebx = u32::from(count);
                    entry.ecx = (2 << 8) | 1;
                }
                i => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = i & 0xff;
                }
            }
        }
        _ => {}
    }
}

fn hide_emulator_gaps(entry: &mut kvm_cpuid_entry2) {
    match (entry.function, entry.index) {
        (0x1, _) => {
            entry.ecx &= !(LEAF1_ECX_CX16
                | LEAF1_ECX_PCID
                | LEAF1_ECX_MOVBE
                | LEAF1_ECX_POPCNT
                | LEAF1_ECX_TSC_DEADLINE
                | LEAF1_ECX_XSAVE
                | LEAF1_ECX_OSXSAVE
                | LEAF1_ECX_AVX
                | LEAF1_ECX_RDRAND);
        }
        (0x7, 0) => {
            entry.ebx &= !(LEAF7_EBX_FSGSBASE
                | LEAF7_EBX_AVX2
                | LEAF7_EBX_SMEP
                | LEAF7_EBX_INVPCID
                | LEAF7_EBX_AVX512F
                | LEAF7_EBX_RDSEED
                | LEAF7_EBX_SMAP);
            entry.ecx &= !(LEAF7_ECX_UMIP | LEAF7_ECX_PKU | LEAF7_ECX_RDPID);
        }
        (KVM_LEAF, _) => {
            entry.eax &=
                !(KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD);
        }
        (0xd, _) => {
            // No XSAVE: the XSAVE state leaf must not advertise components.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn cpuid() -> CpuId {
        CpuId::from_entries(&[
            entry(1, 0),
            entry(7, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xd, 0),
            entry(KVM_LEAF, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_cpu_count() {
        let mut c = cpuid();
        filter_cpuid(&mut c, 3, 4, CpuTemplate::Host);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(find(&c, 0xb, 1).edx, 3);
        assert_eq!(find(&c, 0xb, 1).ebx, 4);
        assert_eq!(find(&c, 0xb, 1).eax, 2);
    }

    #[test]
    fn host_template_keeps_features() {
        let mut c = cpuid();
        filter_cpuid(&mut c, 0, 1, CpuTemplate::Host);
        assert_ne!(find(&c, 1, 0).ecx & LEAF1_ECX_XSAVE, 0);
        assert_ne!(find(&c, 1, 0).ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(find(&c, 7, 0).ebx & LEAF7_EBX_SMEP, 0);
    }

    #[test]
    fn pvm_safe_hides_what_the_emulator_lacks() {
        let mut c = cpuid();
        filter_cpuid(&mut c, 0, 1, CpuTemplate::PvmSafe);
        let l1 = find(&c, 1, 0);
        for bit in [
            LEAF1_ECX_CX16,
            LEAF1_ECX_XSAVE,
            LEAF1_ECX_POPCNT,
            LEAF1_ECX_AVX,
            LEAF1_ECX_TSC_DEADLINE,
        ] {
            assert_eq!(l1.ecx & bit, 0);
        }
        assert_eq!(find(&c, 7, 0).ebx & (LEAF7_EBX_SMEP | LEAF7_EBX_SMAP), 0);
        assert_eq!(find(&c, 0xd, 0).eax, 0);
        assert_eq!(find(&c, KVM_LEAF, 0).eax & KVM_FEATURE_PV_SEND_IPI, 0);
        let params = CpuTemplate::PvmSafe.kernel_params().unwrap();
        assert!(params.contains("clearcpuid=xsave,"));
        // Every word carries '=': Linux passes bare unknown words to init.
        assert!(params.split(' ').all(|w| w.contains('=')));
    }

    #[test]
    fn template_names_round_trip_and_unknown_is_an_error() {
        for name in TEMPLATE_NAMES {
            assert_eq!(name.parse::<CpuTemplate>().unwrap().to_string(), *name);
        }
        assert!(matches!(
            "T2".parse::<CpuTemplate>(),
            Err(CpuidError::UnknownTemplate(_))
        ));
    }
}
