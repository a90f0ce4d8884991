//! `vtest.probe=NAME`: executes one instruction and reports, to find out
//! which instructions KVM's emulator (PVM-native KVM) cannot run. An
//! instruction it lacks stops the VM ("KVM internal error, emulation
//! failure", ringvm exit 5) before `probe NAME: ok` is printed; a CPU
//! exception prints its vector. `vtest.probe=list` prints the names.

use core::arch::asm;

use crate::arch::rdtsc;
use crate::println;

#[repr(C, align(16))]
struct Scratch([u64; 64]);

static mut SCRATCH: Scratch = Scratch([0; 64]);

fn enable_sse() {
    // SAFETY: CR0.EM off, CR0.MP on, CR4.OSFXSR | OSXMMEXCPT: what an OS
    // sets before using SSE; nothing else depends on these bits here.
    unsafe {
        asm!(
            "mov rax, cr0",
            "and rax, ~4",
            "or rax, 2",
            "mov cr0, rax",
            "mov rax, cr4",
            "or rax, 0x600",
            "mov cr4, rax",
            out("rax") _,
            options(nostack)
        );
    }
}

macro_rules! probe {
    ($($insn:literal),+) => {{
        let p = core::ptr::addr_of_mut!(SCRATCH) as u64;
        // SAFETY: each probe touches only rax..rdx, rsi, rdi (pointing at the
        // aligned scratch buffer) and the flags.
        unsafe {
            asm!(
                "push rbx",
                "xor ebx, ebx",
                $($insn),+,
                "pop rbx",
                inout("rdi") p => _,
                inout("rax") 0u64 => _,
                inout("rcx") 0u64 => _,
                inout("rdx") 0u64 => _,
                out("rsi") _,
            );
        }
    }};
}

const NAMES: &[&str] = &[
    "loop",
    "cpuid",
    "rdtscp",
    "rdmsr",
    "wrmsr",
    "pause",
    "lfence",
    "sfence",
    "mfence",
    "popcnt",
    "lzcnt",
    "tzcnt",
    "movbe",
    "crc32",
    "cmpxchg",
    "cmpxchg8b",
    "cmpxchg16b",
    "xadd",
    "rep_movsb",
    "rep_movsq",
    "rep_stosb",
    "bswap",
    "bt",
    "cmov",
    "int3",
    "int",
    "ud2",
    "clac",
    "stac",
    "vmcall",
    "vmmcall",
    "rdrand",
    "rdseed",
    "rdpid",
    "wbinvd",
    "invlpg",
    "fninit",
    "fwait",
    "x87",
    "sse_xorps",
    "sse_movdqa",
    "sse2_paddq",
    "fxsave",
    "xgetbv",
    "xsave",
    "prefetch",
    "clflush",
    "nop_long",
    "hlt_if1",
];

#[inline(never)]
fn run(name: &str) -> bool {
    match name {
        "loop" => {
            let t0 = rdtsc();
            let mut n = 1_000_000u64;
            // SAFETY: a counted loop on a register.
            unsafe { asm!("2:", "dec {0}", "jnz 2b", inout(reg) n, options(nomem, nostack)) };
            let _ = n;
            let cycles = rdtsc() - t0;
            println!("probe loop: 2M instructions in {} TSC cycles", cycles);
        }
        "cpuid" => probe!("mov eax, 1", "cpuid"),
        "rdtscp" => probe!("rdtscp"),
        "rdmsr" => probe!("mov ecx, 0x10", "rdmsr"),
        "wrmsr" => probe!(
            "mov ecx, 0xc0000102",
            "xor eax, eax",
            "xor edx, edx",
            "wrmsr"
        ),
        "pause" => probe!("pause"),
        "lfence" => probe!("lfence"),
        "sfence" => probe!("sfence"),
        "mfence" => probe!("mfence"),
        "popcnt" => probe!("popcnt rax, rdi"),
        "lzcnt" => probe!("lzcnt rax, rdi"),
        "tzcnt" => probe!("tzcnt rax, rdi"),
        "movbe" => probe!("movbe rax, [rdi]"),
        "crc32" => probe!("crc32 rax, rdi"),
        "cmpxchg" => probe!("lock cmpxchg [rdi], rcx"),
        "cmpxchg8b" => probe!("lock cmpxchg8b [rdi]"),
        "cmpxchg16b" => probe!("lock cmpxchg16b [rdi]"),
        "xadd" => probe!("lock xadd [rdi], rax"),
        "rep_movsb" => probe!("lea rsi, [rdi + 256]", "mov rcx, 64", "rep movsb"),
        "rep_movsq" => probe!("lea rsi, [rdi + 256]", "mov rcx, 8", "rep movsq"),
        "rep_stosb" => probe!("mov rcx, 64", "rep stosb"),
        "bswap" => probe!("bswap rax"),
        "bt" => probe!("bt rdi, 3"),
        "cmov" => probe!("test rax, rax", "cmovz rax, rdi"),
        "int3" => probe!("int3"),
        "int" => probe!("int 0x80"),
        "ud2" => probe!("ud2"),
        "clac" => probe!("clac"),
        "stac" => probe!("stac"),
        "vmcall" => probe!("vmcall"),
        "vmmcall" => probe!("vmmcall"),
        "rdrand" => probe!("rdrand rax"),
        "rdseed" => probe!("rdseed rax"),
        "rdpid" => probe!("rdpid rax"),
        "wbinvd" => probe!("wbinvd"),
        "invlpg" => probe!("invlpg [rdi]"),
        "fninit" => probe!("fninit"),
        "fwait" => probe!("fwait"),
        "x87" => probe!("fninit", "fld1", "fstp qword ptr [rdi]"),
        "sse_xorps" => {
            enable_sse();
            probe!("xorps xmm0, xmm0")
        }
        "sse_movdqa" => {
            enable_sse();
            probe!("movdqa xmm0, [rdi]")
        }
        "sse2_paddq" => {
            enable_sse();
            probe!("paddq xmm0, xmm0")
        }
        "fxsave" => {
            enable_sse();
            probe!("fxsave [rdi]")
        }
        "xgetbv" => probe!("xor ecx, ecx", "xgetbv"),
        "xsave" => probe!("xsave [rdi]"),
        "prefetch" => probe!("prefetcht0 [rdi]"),
        "clflush" => probe!("clflush [rdi]"),
        "nop_long" => probe!("nop dword ptr [rax + rax]"),
        "hlt_if1" => {
            // The LAPIC timer would be needed to wake; just check sti/nop/cli.
            probe!("sti", "nop", "cli")
        }
        _ => return false,
    }
    true
}

/// Runs the probe named on the command line; never returns.
#[inline(never)]
pub fn main(name: &[u8]) -> ! {
    let name = core::str::from_utf8(name).unwrap_or("");
    if name == "list" {
        for n in NAMES {
            crate::serial::puts(n);
            crate::serial::putb(b' ');
        }
        crate::serial::putb(b'\n');
        crate::arch::exit(true);
    }
    if run(name) {
        println!("probe {name}: ok");
        crate::arch::exit(true);
    }
    println!("probe {name}: unknown (vtest.probe=list)");
    crate::arch::exit(false)
}
