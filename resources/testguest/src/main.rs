//! vtest: a freestanding x86_64 kernel that ringvm boots to check its
//! virtio-mmio devices, politely and rudely (issue 6).
//!
//! It prints one line per case (`ok name` / `FAIL name: reason`, `skip
//! name: reason` when the VM lacks what the case needs), then
//! `N passed, N failed`, and stops the VM: success through the test-exit
//! port and an i8042 reset, failure through the test-exit port and a
//! triple fault (see `arch::exit`).
//!
//! Command line: `suite=all` (default) or a comma-separated list of case
//! name prefixes (`suite=mmio,blk.flush,hostile`); `vtest.verbose` prints
//! each case's time.

#![no_std]
#![no_main]
// Failures carry their reason inline: there is no allocator to box it.
#![allow(clippy::result_large_err)]

mod arch;
mod blk;
mod bootinfo;
mod cases;
mod irq;
mod mem;
mod msg;
mod net;
mod probe;
mod rng;
mod serial;
mod time;
mod virtio;
mod vsock;

use bootinfo::BootInfo;
use cases::{Ctx, Need, CASES};
use virtio::Dev;

/// `vtest.verbose` on the command line: case times and notes.
pub static VERBOSE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// A diagnostic line, printed only with `vtest.verbose`.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        if $crate::VERBOSE.load(core::sync::atomic::Ordering::Relaxed) {
            $crate::print!("  note: ");
            $crate::println!($($arg)*);
        }
    };
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("FAIL vtest: panic: {}", info);
    arch::exit(false)
}

fn selected(info: &BootInfo, name: &str) -> bool {
    let Some(suite) = info.param(b"suite") else {
        return true;
    };
    suite
        .split(|b| *b == b',')
        .any(|t| t == b"all" || (!t.is_empty() && name.as_bytes().starts_with(t)))
}

/// Called by the entry stub with the zero page address.
#[no_mangle]
pub extern "C" fn kmain(zero_page: u64) -> ! {
    arch::init_idt();
    irq::init();
    let tsc = time::calibrate();
    let t0 = time::now_ms();
    let info = BootInfo::parse(zero_page);
    let verbose = info.flag(b"vtest.verbose");
    VERBOSE.store(verbose, core::sync::atomic::Ordering::Relaxed);
    if let Some(name) = info.param(b"vtest.probe") {
        probe::main(name);
    }
    match tsc {
        Some(per_ms) => println!(
            "vtest: TSC {} MHz, RAM ends at {:#x} (below 4 GiB: {:#x})",
            per_ms / 1000,
            info.ram_end,
            info.low_ram_end
        ),
        None => println!("vtest: PIT did not count; timeouts assume a 4 GHz TSC"),
    }

    let mut ctx = Ctx {
        rw: None,
        rw2: None,
        ro: None,
        net: None,
        rng: None,
        vsock: None,
        ram_end: info.ram_end,
        low_ram_end: info.low_ram_end,
        tag: 0,
    };
    for slot in info.slots.iter().flatten() {
        let Some(dev) = Dev::probe(slot) else {
            println!("vtest: no virtio-mmio v2 device at {:#x}", slot.base);
            continue;
        };
        // F_RO (bit 5) means read-only only on a block device.
        let ro = dev.device_id == blk::DEVICE_ID && dev.offered & blk::F_RO != 0;
        println!(
            "vtest: device {} at {:#x} ({} bytes) irq {}{}",
            dev.device_id,
            dev.base,
            slot.size,
            dev.irq,
            if ro { " (read-only)" } else { "" }
        );
        if dev.device_id == blk::DEVICE_ID {
            if ro && ctx.ro.is_none() {
                ctx.ro = Some(dev);
            } else if !ro && ctx.rw.is_none() {
                ctx.rw = Some(dev);
            } else if !ro && ctx.rw2.is_none() {
                ctx.rw2 = Some(dev);
            }
        } else if dev.device_id == net::DEVICE_ID && ctx.net.is_none() {
            ctx.net = Some(dev);
        } else if dev.device_id == rng::DEVICE_ID && ctx.rng.is_none() {
            ctx.rng = Some(dev);
        } else if dev.device_id == vsock::DEVICE_ID && ctx.vsock.is_none() {
            ctx.vsock = Some(dev);
        }
    }

    let (mut passed, mut failed, mut skipped) = (0u32, 0u32, 0u32);
    for (i, case) in CASES.iter().enumerate() {
        if !selected(&info, case.name) {
            continue;
        }
        let missing = match case.need {
            Need::Rw if ctx.rw.is_none() => Some("no writable virtio-blk drive"),
            Need::Ro if ctx.ro.is_none() => Some("no read-only virtio-blk drive (--disk ...,ro)"),
            Need::Net if ctx.net.is_none() => Some("no virtio-net device (--net tap=...)"),
            Need::Rng if ctx.rng.is_none() => Some("no virtio-rng device (--rng)"),
            Need::Vsock if ctx.vsock.is_none() => Some("no virtio-vsock device (--vsock)"),
            _ => None,
        };
        if let Some(why) = missing {
            println!("skip {}: {}", case.name, why);
            skipped += 1;
            continue;
        }
        mem::reset();
        ctx.tag = i as u64;
        let start = time::now_ms();
        let result = (case.run)(&mut ctx);
        let took = time::now_ms() - start;
        match result {
            Ok(()) => {
                passed += 1;
                serial::puts("ok ");
                serial::puts(case.name);
                if verbose {
                    print!(" ({took} ms)");
                }
                serial::putb(b'\n');
            }
            Err(m) => {
                failed += 1;
                println!("FAIL {}: {}", case.name, m.as_str());
            }
        }
        // Leave every device quiet for the next case.
        for dev in [ctx.rw, ctx.rw2, ctx.ro, ctx.net, ctx.rng, ctx.vsock]
            .iter()
            .flatten()
        {
            let _ = dev.reset();
        }
    }
    if passed + failed == 0 {
        println!("FAIL vtest: no case ran (devices or suite= filter?)");
        failed += 1;
    }
    if verbose {
        println!("vtest: {} ms", time::now_ms() - t0);
    }
    if skipped > 0 {
        println!("{passed} passed, {failed} failed, {skipped} skipped");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    arch::exit(failed == 0)
}
