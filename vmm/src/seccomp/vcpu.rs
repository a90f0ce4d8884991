//! A vCPU thread: it runs `KVM_RUN` and answers port and MMIO exits from
//! the device buses (which only touch memory, write eventfds and send
//! channel messages), so beyond the common list it needs four ioctls on
//! its own vCPU fd, and five more to finish `int3`/`fwait` for KVM's
//! instruction emulator (`kvm/emulation.rs`, pvm-safe template only).

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs, kvm_translation, kvm_vcpu_events, KVMIO,
};

use super::rules::{
    allow_call, arg_in, ioc, malloc_probe_refused, Rule, IOC_NONE, IOC_READ, IOC_WRITE,
};

/// `KVM_RUN`.
pub const KVM_RUN: u64 = ioc(IOC_NONE, KVMIO as u64, 0x80, 0);
/// `KVM_GET_REGS`.
pub const KVM_GET_REGS: u64 = ioc(IOC_READ, KVMIO as u64, 0x81, size_of::<kvm_regs>());
/// `KVM_GET_SREGS`.
pub const KVM_GET_SREGS: u64 = ioc(IOC_READ, KVMIO as u64, 0x83, size_of::<kvm_sregs>());
/// `KVM_GET_MP_STATE`.
pub const KVM_GET_MP_STATE: u64 = ioc(IOC_READ, KVMIO as u64, 0x98, size_of::<kvm_mp_state>());
/// `KVM_SET_REGS`.
pub const KVM_SET_REGS: u64 = ioc(IOC_WRITE, KVMIO as u64, 0x82, size_of::<kvm_regs>());
/// `KVM_TRANSLATE`.
pub const KVM_TRANSLATE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    KVMIO as u64,
    0x85,
    size_of::<kvm_translation>(),
);
/// `KVM_GET_FPU`.
pub const KVM_GET_FPU: u64 = ioc(IOC_READ, KVMIO as u64, 0x8c, size_of::<kvm_fpu>());
/// `KVM_GET_VCPU_EVENTS`.
pub const KVM_GET_VCPU_EVENTS: u64 =
    ioc(IOC_READ, KVMIO as u64, 0x9f, size_of::<kvm_vcpu_events>());
/// `KVM_SET_VCPU_EVENTS`.
pub const KVM_SET_VCPU_EVENTS: u64 =
    ioc(IOC_WRITE, KVMIO as u64, 0xa0, size_of::<kvm_vcpu_events>());

/// The vCPU thread's own rules (added to `common.rs`'s).
pub fn rules() -> Vec<Rule> {
    vec![
        allow_call!(
            SYS_openat,
            "refused (EACCES): glibc malloc's one-time overcommit probe",
            malloc_probe_refused()
        ),
        allow_call!(
            SYS_ioctl,
            "KVM vCPU calls (see the values)",
            arg_in(
                1,
                &[
                    (KVM_RUN, "KVM_RUN", "run the guest until its next exit"),
                    (
                        KVM_GET_MP_STATE,
                        "KVM_GET_MP_STATE",
                        "after a kick: is the vCPU halted (power-off detection)"
                    ),
                    (
                        KVM_GET_REGS,
                        "KVM_GET_REGS",
                        "after a kick: are interrupts off; registers in a crash report"
                    ),
                    (
                        KVM_GET_SREGS,
                        "KVM_GET_SREGS",
                        "control registers in a crash report"
                    ),
                    (
                        KVM_TRANSLATE,
                        "KVM_TRANSLATE",
                        "emulator: read the failed instruction through the guest page tables"
                    ),
                    (
                        KVM_GET_FPU,
                        "KVM_GET_FPU",
                        "emulator: is an x87 exception pending at an fwait"
                    ),
                    (
                        KVM_SET_REGS,
                        "KVM_SET_REGS",
                        "emulator: step RIP past a finished int3 or fwait"
                    ),
                    (
                        KVM_GET_VCPU_EVENTS,
                        "KVM_GET_VCPU_EVENTS",
                        "emulator: before injecting #BP or #MF"
                    ),
                    (
                        KVM_SET_VCPU_EVENTS,
                        "KVM_SET_VCPU_EVENTS",
                        "emulator: inject #BP or #MF"
                    ),
                ]
            )
        ),
    ]
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    use super::*;

    ioctl_io_nr!(REF_KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(REF_KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(REF_KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_ior_nr!(REF_KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_iow_nr!(REF_KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_iowr_nr!(REF_KVM_TRANSLATE, KVMIO, 0x85, kvm_translation);
    ioctl_ior_nr!(REF_KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_ior_nr!(REF_KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_iow_nr!(REF_KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);

    #[test]
    fn ioctl_numbers_match_the_kernel_encoding() {
        assert_eq!(KVM_RUN, REF_KVM_RUN());
        assert_eq!(KVM_GET_REGS, REF_KVM_GET_REGS());
        assert_eq!(KVM_GET_SREGS, REF_KVM_GET_SREGS());
        assert_eq!(KVM_GET_MP_STATE, REF_KVM_GET_MP_STATE());
        assert_eq!(KVM_SET_REGS, REF_KVM_SET_REGS());
        assert_eq!(KVM_TRANSLATE, REF_KVM_TRANSLATE());
        assert_eq!(KVM_GET_FPU, REF_KVM_GET_FPU());
        assert_eq!(KVM_GET_VCPU_EVENTS, REF_KVM_GET_VCPU_EVENTS());
        assert_eq!(KVM_SET_VCPU_EVENTS, REF_KVM_SET_VCPU_EVENTS());
        // And as strace decodes them on x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
    }
}
