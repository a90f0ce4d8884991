//! What ringvm does when KVM's instruction emulator gives up: finish a
//! kernel-mode `int3` or `fwait` (below), and otherwise name the
//! instruction in the crash report.
//!
//! `int3` for kernels on PVM-native KVM.
//!
//! There, guest code runs in KVM's instruction emulator, which cannot
//! deliver a software interrupt in long mode: a kernel-mode `int3` ends
//! `KVM_RUN` with an emulation failure instead of raising #BP. Stock x86
//! kernels execute one on purpose early in boot (the alternatives code's
//! `int3_selftest`) and again whenever they patch live code (static keys,
//! `text_poke_bp`), so without help they die there.
//!
//! The VMM finishes the instruction for the emulator: when the failing
//! instruction is `int3` (0xCC), it moves RIP past it and injects #BP, the
//! exception the CPU would have raised, so the guest's own handler runs
//! with the state it expects (RIP after the `int3`, as for any trap).
//! Nothing in the guest is patched.
//!
//! `fwait` is the same story: the emulator cannot run it, and Linux
//! executes one in `fpu__drop()` whenever a thread exits. ringvm does what
//! the CPU does: nothing but step over it, unless the x87 status word says
//! an unmasked exception is pending, in which case #MF is delivered.

use kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The one-byte breakpoint instruction.
const INT3: u8 = 0xcc;
/// The breakpoint exception vector.
const BP_VECTOR: u8 = 3;
/// `fwait` (`wait`): wait for the x87 unit, raising pending exceptions.
const FWAIT: u8 = 0x9b;
/// x87 floating-point error vector.
const MF_VECTOR: u8 = 16;
/// x87 status word: error summary, set while an unmasked exception is
/// pending.
const FSW_ERROR_SUMMARY: u16 = 1 << 7;

/// Longest x86 instruction.
const MAX_INSN: usize = 15;

/// The bytes of the instruction KVM failed to emulate: from the exit itself
/// when KVM reports them, else read at RIP through the guest's page tables
/// (up to the end of RIP's page). Call only right after an emulation
/// failure exit.
pub fn failed_instruction(vcpu: &mut VcpuFd, mem: &GuestMemoryMmap, rip: u64) -> Vec<u8> {
    // SAFETY: called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR
    // with the emulation suberror, for which the kernel fills the
    // `emulation_failure` member of the exit union.
    let failure = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.emulation_failure };
    if failure.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 {
        // SAFETY: the flag says the instruction bytes member is valid.
        let bytes = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
        let n = usize::from(bytes.insn_size).min(MAX_INSN);
        if n > 0 {
            return bytes.insn_bytes[..n].to_vec();
        }
    }
    let Ok(t) = vcpu.translate_gva(rip) else {
        return Vec::new();
    };
    if t.valid == 0 {
        return Vec::new();
    }
    let in_page = (0x1000 - (rip & 0xfff)) as usize;
    let mut buf = vec![0u8; MAX_INSN.min(in_page)];
    match mem.read_slice(&mut buf, GuestAddress(t.physical_address)) {
        Ok(()) => buf,
        Err(_) => Vec::new(),
    }
}

/// Called on an emulation failure: when the instruction is one ringvm
/// can finish for the emulator (kernel-mode `int3` or `fwait`), does what
/// the CPU would have done and returns true, so the vCPU runs on;
/// otherwise returns false and changes nothing.
pub fn finish_instruction(vcpu: &mut VcpuFd, mem: &GuestMemoryMmap) -> bool {
    let Ok(regs) = vcpu.get_regs() else {
        return false;
    };
    let opcode = failed_instruction(vcpu, mem, regs.rip).first().copied();
    log::debug!(
        "emulation failure at RIP {:#x}, opcode {opcode:02x?}",
        regs.rip
    );
    match opcode.as_ref() {
        Some(&INT3) => deliver_after(vcpu, regs, Some(BP_VECTOR)),
        Some(&FWAIT) => {
            // FWAIT raises #MF when an unmasked x87 exception is pending
            // (the status word's error-summary bit); otherwise it does
            // nothing. Linux runs one in fpu__drop() at every thread exit.
            let Ok(fpu) = vcpu.get_fpu() else {
                return false;
            };
            let pending = fpu.fsw & FSW_ERROR_SUMMARY != 0;
            deliver_after(vcpu, regs, pending.then_some(MF_VECTOR))
        }
        _ => false,
    }
}

/// Moves RIP past the one-byte instruction at it and, if `vector` is
/// given, injects that exception (a trap: it is delivered with RIP after
/// the instruction).
fn deliver_after(vcpu: &mut VcpuFd, mut regs: kvm_bindings::kvm_regs, vector: Option<u8>) -> bool {
    let Ok(mut events) = vcpu.get_vcpu_events() else {
        return false;
    };
    if events.exception.injected != 0 || events.exception.pending != 0 {
        return false; // something else is being delivered: do not stack
    }
    regs.rip = regs.rip.wrapping_add(1);
    if vcpu.set_regs(&regs).is_err() {
        return false;
    }
    let Some(nr) = vector else {
        return true;
    };
    events.exception.injected = 1;
    events.exception.nr = nr;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    vcpu.set_vcpu_events(&events).is_ok()
}
