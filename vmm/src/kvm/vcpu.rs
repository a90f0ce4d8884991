//! vCPU threads. Each runs `KVM_RUN` and answers register exits (port and
//! MMIO accesses) from the buses; it does no device I/O of its own. What
//! ends a vCPU (reset, power-off, a broken guest) is reported to the VMM
//! thread, which alone decides how the process ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::Bus;
use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::x86_64::cpuid::{filter_cpuid, CpuTemplate};
use crate::arch::x86_64::regs::{boot_fpu, boot_msrs, boot_regs, setup_sregs};
use crate::boot::KernelEntry;
use crate::kvm::emulation::{failed_instruction, finish_instruction};
use crate::kvm::pause::PauseGate;
use crate::kvm::vm::Vm;
use crate::metrics::VcpuExitCounters;
use crate::seccomp::{Filters, ThreadKind};
use kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {cpu}: {what} failed: {source}")]
    Kvm {
        /// The vCPU index.
        cpu: u8,
        /// The operation.
        what: &'static str,
        /// The error from the kernel.
        source: kvm_ioctls::Error,
    },
    /// Boot-time tables could not be written.
    #[error("vCPU {cpu}: {source}")]
    Regs {
        /// The vCPU index.
        cpu: u8,
        /// Why.
        source: crate::arch::x86_64::regs::RegsError,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// The OS refused to start a thread.
    #[error("cannot spawn vCPU thread: {0}")]
    Spawn(std::io::Error),
}

/// Why a vCPU stopped, as told to the VMM thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest asked for a reset (triple fault, or KVM's reset event).
    Reset {
        /// Which vCPU saw it.
        cpu: u8,
        /// What happened.
        reason: &'static str,
    },
    /// The guest powered off (KVM system event).
    PowerOff {
        /// Which vCPU saw it.
        cpu: u8,
    },
    /// KVM could not run the guest any further: the report says why, with
    /// the registers.
    Crashed {
        /// Which vCPU.
        cpu: u8,
        /// Exit reason and register dump.
        report: String,
    },
}

/// The VMM thread's handle on one vCPU thread. The thread waits for
/// [`VcpuHandle::start`] before it runs any guest code, so the VMM thread
/// can put its own seccomp filter in place first.
#[derive(Debug)]
pub struct VcpuHandle {
    thread: Option<JoinHandle<()>>,
    start: Option<Sender<Filters>>,
}

/// What every vCPU thread shares: the buses, the stop flag and the channel
/// back to the VMM thread.
#[derive(Clone)]
pub struct VcpuShared {
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Set by the VMM thread to make every vCPU leave its loop.
    pub stop: Arc<AtomicBool>,
    /// Where stop reasons go.
    pub events: Sender<VcpuEvent>,
    /// Written after each event so the VMM thread's ring wakes up.
    pub events_ready: Arc<EventFd>,
    /// Per vCPU: halted with interrupts off when last kicked. A guest
    /// without ACPI "powers off" by halting every CPU that way; the VMM
    /// thread treats all of them set as a power-off.
    pub halted_for_good: Arc<Vec<AtomicBool>>,
    /// Exit counts for metrics.
    pub exits: Arc<VcpuExitCounters>,
    /// Where each vCPU parks while the guest is paused.
    pub pause: Arc<PauseGate>,
    /// Finish kernel-mode `int3` and `fwait` for KVM's instruction
    /// emulator (PVM-native KVM; see [`super::emulation`]).
    pub finish_for_emulator: bool,
}

/// Creates vCPU `cpu` of `count` and loads its boot state: CPUID, MSRs,
/// LAPIC LINT pins, and for the boot CPU the entry registers.
pub fn create_vcpu(
    vm: &Vm,
    cpu: u8,
    count: u8,
    template: CpuTemplate,
    entry: KernelEntry,
) -> Result<VcpuFd, VcpuError> {
    let err = |what| move |source| VcpuError::Kvm { cpu, what, source };
    let vcpu = vm
        .fd()
        .create_vcpu(u64::from(cpu))
        .map_err(err("KVM_CREATE_VCPU"))?;
    let mut cpuid = vm
        .kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
    filter_cpuid(&mut cpuid, cpu, count, template);
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    set_msrs(&vcpu, cpu)?;
    set_lint_pins(&vcpu).map_err(err("KVM_SET_LAPIC"))?;
    if cpu == 0 {
        let sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        let sregs = setup_sregs(vm.memory(), entry.mode, sregs)
            .map_err(|source| VcpuError::Regs { cpu, source })?;
        vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&boot_regs(entry.mode, entry.entry.0))
            .map_err(err("KVM_SET_REGS"))?;
        vcpu.set_fpu(&boot_fpu()).map_err(err("KVM_SET_FPU"))?;
    }
    Ok(vcpu)
}

/// Some hosts refuse some MSRs (PVM-native KVM refuses a few): the guest
/// does not need them at entry, so a short write is logged, not fatal.
fn set_msrs(vcpu: &VcpuFd, cpu: u8) -> Result<(), VcpuError> {
    let entries: Vec<kvm_msr_entry> = boot_msrs()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Kvm {
        cpu,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    match vcpu.set_msrs(&msrs) {
        Ok(n) if n == entries.len() => {}
        Ok(n) => log::debug!(
            "vCPU {cpu}: host took {n} of {} boot MSRs; first refused: {:#x}",
            entries.len(),
            entries[n].index
        ),
        Err(e) => log::debug!("vCPU {cpu}: KVM_SET_MSRS failed ({e}); continuing"),
    }
    Ok(())
}

/// LINT0 delivers the PIC's ExtINT and LINT1 NMIs, as the MP table says.
fn set_lint_pins(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7;
    const DELIVERY_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic()?;
    for (reg, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let bytes: Vec<u8> = lapic.regs[reg..reg + 4].iter().map(|b| *b as u8).collect();
        let old = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let new = (old & !0x700) | (mode << 8);
        for (i, b) in new.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that pulls a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the (empty) kick handler once per process; its only job is to
/// make `KVM_RUN` return EINTR.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

impl VcpuHandle {
    /// Creates the thread that will run `vcpu`; it waits for
    /// [`VcpuHandle::start`].
    pub fn spawn(
        vcpu: VcpuFd,
        cpu: u8,
        shared: VcpuShared,
        mem: GuestMemoryMmap,
    ) -> Result<Self, VcpuError> {
        let (start, started) = channel::<Filters>();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{cpu}"))
            .spawn(move || {
                // A dropped sender: the VM is torn down before it ran.
                let Ok(filters) = started.recv() else {
                    return;
                };
                if let Err(e) = filters.install(ThreadKind::Vcpu) {
                    let report_text = e.to_string();
                    report(
                        &shared,
                        VcpuEvent::Crashed {
                            cpu,
                            report: report_text,
                        },
                    );
                    return;
                }
                run_vcpu(vcpu, cpu, shared, mem)
            })
            .map_err(VcpuError::Spawn)?;
        Ok(Self {
            thread: Some(thread),
            start: Some(start),
        })
    }

    /// Whether the thread has ended (it reported a stop or a crash).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Lets the thread install its seccomp filter (from `filters`) and
    /// enter the guest.
    pub fn start(&mut self, filters: Filters) {
        if let Some(start) = self.start.take() {
            let _ = start.send(filters);
        }
    }

    /// Interrupts `KVM_RUN` once, so the thread re-reads its halt state
    /// and the pause gate.
    pub fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        if let Some(thread) = &self.thread {
            if !thread.is_finished() {
                // SAFETY: the thread is not joined, so its pthread_t is
                // valid; the signal has an installed no-op handler.
                unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
            }
        }
    }

    /// Kicks the thread out of `KVM_RUN` until it notices the stop flag and
    /// ends, then joins it. Repeated kicks cover the window where the
    /// signal lands just before the thread re-enters `KVM_RUN`.
    pub fn stop_and_join(&mut self) {
        // Never started: the thread ends when it sees the sender gone.
        self.start = None;
        let Some(thread) = self.thread.take() else {
            return;
        };
        use std::os::unix::thread::JoinHandleExt;
        let pthread = thread.as_pthread_t();
        for _ in 0..500 {
            if thread.is_finished() {
                break;
            }
            // SAFETY: the thread has not been joined, so its pthread_t is
            // still valid; the signal has an installed no-op handler.
            unsafe { libc::pthread_kill(pthread, kick_signal()) };
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::warn!("a vCPU thread did not stop within 5 s; leaving it");
        }
    }
}

fn report(shared: &VcpuShared, event: VcpuEvent) {
    let _ = shared.events.send(event);
    let _ = shared.events_ready.write(1);
}

/// What the run loop must do after an exit, decided while the exit borrows
/// the vCPU and acted on after.
enum Next {
    Continue,
    Stop(VcpuEvent),
    Crash(String),
}

fn run_vcpu(mut vcpu: VcpuFd, cpu: u8, shared: VcpuShared, mem: GuestMemoryMmap) {
    let idx = usize::from(cpu);
    while !shared.stop.load(Ordering::Acquire) {
        shared.pause.wait_if_closed();
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let next = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                VcpuExitCounters::bump(&shared.exits.io_in);
                if !shared.pio.read(idx, u64::from(port), data) {
                    data.fill(0xff);
                }
                Next::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                VcpuExitCounters::bump(&shared.exits.io_out);
                shared.pio.write(idx, u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                VcpuExitCounters::bump(&shared.exits.mmio_read);
                if !shared.mmio.read(idx, addr, data) {
                    data.fill(0xff);
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                VcpuExitCounters::bump(&shared.exits.mmio_write);
                shared.mmio.write(idx, addr, data);
                Next::Continue
            }
            Ok(VcpuExit::Shutdown) => Next::Stop(VcpuEvent::Reset {
                cpu,
                reason: "triple fault (or reboot=t)",
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(VcpuEvent::PowerOff { cpu }),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::Stop(VcpuEvent::Reset {
                    cpu,
                    reason: "KVM reset event",
                }),
                other => Next::Crash(format!("unexpected KVM system event {other}")),
            },
            Ok(VcpuExit::Hlt) => {
                VcpuExitCounters::bump(&shared.exits.other);
                Next::Continue
            }
            Ok(VcpuExit::InternalError) => {
                let sub = vcpu.get_kvm_run().exit_reason;
                // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel fills the
                // `internal` member of the exit union; we read it as such.
                let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
                if internal.suberror == KVM_INTERNAL_ERROR_EMULATION
                    && shared.finish_for_emulator
                    && finish_instruction(&mut vcpu, &mem)
                {
                    VcpuExitCounters::bump(&shared.exits.other);
                    continue;
                }
                let detail = match internal.suberror {
                    1 => "emulation failure (an instruction KVM cannot emulate)",
                    2 => "simultaneous exceptions",
                    3 => "delivery event failed",
                    _ => "unknown suberror",
                };
                let insn = match internal.suberror {
                    KVM_INTERNAL_ERROR_EMULATION => {
                        let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                        let bytes = failed_instruction(&mut vcpu, &mem, rip);
                        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                        format!("; instruction bytes at RIP: [{}]", hex.join(" "))
                    }
                    _ => String::new(),
                };
                Next::Crash(format!(
                    "KVM internal error (exit {sub}, suberror {}: {detail}){insn}",
                    internal.suberror
                ))
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                Next::Crash(format!("KVM entry failed (hardware reason {reason:#x})"))
            }
            Ok(other) => Next::Crash(format!("unhandled vCPU exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                VcpuExitCounters::bump(&shared.exits.interrupted);
                if log::log_enabled!(log::Level::Trace) {
                    log::trace!("{}", crate::kvm::sample::describe(&vcpu, cpu));
                }
                let stuck = halted_with_interrupts_off(&vcpu);
                if let Some(flag) = shared.halted_for_good.get(idx) {
                    flag.store(stuck, Ordering::Release);
                }
                Next::Continue
            }
            Err(e) => Next::Crash(format!("KVM_RUN failed: {e}")),
        };
        match next {
            Next::Continue => {}
            Next::Stop(event) => {
                report(&shared, event);
                return;
            }
            Next::Crash(why) => {
                let report_text = format!("{why}\n{}", register_dump(&vcpu));
                report(
                    &shared,
                    VcpuEvent::Crashed {
                        cpu,
                        report: report_text,
                    },
                );
                return;
            }
        }
    }
}

/// True when the vCPU sleeps in HLT with interrupts masked: only an NMI or
/// INIT could wake it, and Linux uses this state to halt or power off
/// when it has no ACPI.
fn halted_with_interrupts_off(vcpu: &VcpuFd) -> bool {
    const RFLAGS_IF: u64 = 1 << 9;
    let halted = vcpu
        .get_mp_state()
        .map(|s| s.mp_state == kvm_bindings::KVM_MP_STATE_HALTED)
        .unwrap_or(false);
    halted
        && vcpu
            .get_regs()
            .map(|r| r.rflags & RFLAGS_IF == 0)
            .unwrap_or(false)
}

/// A one-screen register dump for crash reports.
fn register_dump(vcpu: &VcpuFd) -> String {
    let mut out = String::new();
    if let Ok(r) = vcpu.get_regs() {
        out += &format!(
            "  RIP={:#018x} RSP={:#018x} RFLAGS={:#x}\n  RAX={:#x} RBX={:#x} RCX={:#x} RDX={:#x}\n  RSI={:#x} RDI={:#x} RBP={:#x}\n",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        );
    }
    if let Ok(s) = vcpu.get_sregs() {
        out += &format!(
            "  CR0={:#x} CR2={:#x} CR3={:#x} CR4={:#x} EFER={:#x} CS={:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
        );
    }
    out
}
