//! Where a vCPU is, sampled at every halt-probe kick when the log level is
//! `trace`: the instruction pointer, the interrupt flag and KVM's run state
//! per vCPU, so a guest that stops making progress can be located (map the
//! RIP with the guest's `System.map`) without a debugger.

use kvm_ioctls::VcpuFd;

const RFLAGS_IF: u64 = 1 << 9;

/// One line describing `vcpu`'s state, for the trace log.
pub fn describe(vcpu: &VcpuFd, cpu: u8) -> String {
    let mut line = format!("vcpu{cpu}:");
    match vcpu.get_regs() {
        Ok(r) => {
            line += &format!(
                " rip={:#x} rsp={:#x} if={}",
                r.rip,
                r.rsp,
                u8::from(r.rflags & RFLAGS_IF != 0)
            );
        }
        Err(e) => line += &format!(" regs: {e}"),
    }
    match vcpu.get_mp_state() {
        Ok(s) => line += &format!(" mp_state={}", s.mp_state),
        Err(e) => line += &format!(" mp_state: {e}"),
    }
    line
}
