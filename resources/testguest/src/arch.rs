//! The CPU: entry point, port I/O, the TSC, the IDT and how the test
//! kernel ends the VM.
//!
//! Everything here must run under KVM's instruction emulator (PVM-native
//! KVM): no SSE, no `pause`, no `mfence`, no `int3`, no xsave. A full
//! barrier is a `lock`ed read-modify-write on the stack.

use core::arch::{asm, global_asm};

// ringvm's 64-bit entry (ELF without a PVH note): long mode, the first
// 4 GiB identity-mapped, rsi = the Linux zero page. We take our own stack,
// zero .bss (the ELF loader copies file bytes only) and call `kmain`.
global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
    .code64
_start:
    cli
    cld
    lea rsp, [rip + __stack_top]
    mov r12, rsi
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    shr rcx, 3
    xor eax, eax
    rep stosq
    mov rdi, r12
    xor ebp, ebp
    call {kmain}
2:
    cli
    hlt
    jmp 2b
"#,
    kmain = sym crate::kmain,
);

// 256 interrupt stubs, 16 bytes apart: each pushes a dummy error code when
// the CPU does not push one, then its vector, and joins the common path,
// which saves the general registers and calls `trap` with a frame pointer.
global_asm!(
    r#"
    .section .text
    .balign 16
    .global vtest_isr_stubs
vtest_isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp vtest_isr_common
    .set vec, vec + 1
    .endr

vtest_isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    call {trap}
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
"#,
    trap = sym trap,
    options(att_syntax)
);

extern "C" {
    static vtest_isr_stubs: u8;
}

/// What the common interrupt path saved, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

extern "C" fn trap(frame: &mut TrapFrame) {
    let v = frame.vector as u8;
    if v < 32 {
        let cr2: u64;
        // SAFETY: reading CR2 has no side effect.
        unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
        crate::println!(
            "FAIL vtest: CPU exception {} (error {:#x}) at rip {:#x}, cr2 {:#x}, rsp {:#x}",
            v,
            frame.error,
            frame.rip,
            cr2,
            frame.rsp
        );
        exit(false);
    }
    crate::irq::interrupt(v);
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

#[repr(C, align(16))]
struct Idt([u64; 512]);

static mut IDT: Idt = Idt([0; 512]);

/// Fills the IDT with interrupt gates to the stubs and loads it.
pub fn init_idt() {
    let cs: u16;
    // SAFETY: reading CS has no side effect.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    // SAFETY: the symbol is the start of the stub array in .text.
    let stubs = unsafe { &vtest_isr_stubs as *const u8 as u64 };
    let idt = core::ptr::addr_of_mut!(IDT) as *mut u64;
    for v in 0..256u64 {
        let h = stubs + v * 16;
        let low = (h & 0xffff)
            | (u64::from(cs) << 16)
            | (0x8e00u64 << 32) // present, DPL 0, 64-bit interrupt gate
            | ((h >> 16) & 0xffff) << 48;
        let high = h >> 32;
        // SAFETY: 512 u64 entries; v < 256.
        unsafe {
            idt.add(v as usize * 2).write_volatile(low);
            idt.add(v as usize * 2 + 1).write_volatile(high);
        }
    }
    let ptr = DescriptorPointer {
        limit: (256 * 16 - 1) as u16,
        base: idt as u64,
    };
    // SAFETY: the IDT is static and its gates point at valid handlers.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack)) };
}

#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to devices this kernel owns.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O to devices this kernel owns.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) };
    v
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc has no side effect.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// A full memory barrier the emulator can run (no mfence).
#[inline(always)]
pub fn barrier() {
    // SAFETY: a locked no-op on our own stack slot.
    unsafe { asm!("lock or qword ptr [rsp], 0", options(nostack)) };
}

#[inline(always)]
pub fn sti() {
    // SAFETY: handlers for every vector are installed before the first sti.
    unsafe { asm!("sti", options(nomem, nostack)) };
}

#[inline(always)]
pub fn cli() {
    // SAFETY: masking interrupts is always allowed in ring 0.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// The test-exit port (proposed for ringvm, QEMU's isa-debug-exit
/// address): a write of one byte `v` stops the VM at once; ringvm exits 0
/// when `v` is 0 and with a dedicated non-zero code otherwise.
pub const TEST_EXIT_PORT: u16 = 0x501;
pub const TEST_EXIT_PASS: u8 = 0;
pub const TEST_EXIT_FAIL: u8 = 1;

/// Ends the VM. First the test-exit port; a VMM that has it stops us
/// there. Without it, after half a second: an i8042 reset on success, a
/// triple fault on failure (both end ringvm today), and `cli; hlt` as the
/// last resort.
pub fn exit(pass: bool) -> ! {
    crate::serial::flush();
    outb(
        TEST_EXIT_PORT,
        if pass { TEST_EXIT_PASS } else { TEST_EXIT_FAIL },
    );
    crate::time::sleep_ms(500);
    if pass {
        outb(0x64, 0xfe);
    } else {
        triple_fault();
    }
    loop {
        // SAFETY: stops this CPU for good.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

fn triple_fault() {
    let ptr = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: deliberately unrecoverable: an empty IDT makes the #UD a
    // double and then a triple fault, which resets the VM.
    unsafe {
        asm!("lidt [{}]", "ud2", in(reg) &ptr, options(readonly, nostack));
    }
}
