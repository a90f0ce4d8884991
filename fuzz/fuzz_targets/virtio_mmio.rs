//! The virtio-mmio register window from a hostile driver: any sequence of
//! reads and writes of any size at any offset, through the MMIO bus as a
//! vCPU exit would arrive, with the backend (a real block, net or rng device on
//! the VMM thread's side) applying the activations and resets the
//! transport sends it.
//!
//! Checked: what the transport hands the backend is what the spec allows
//! (features offered and VERSION_1, every ready queue's layout passes the
//! memory-independent rules), the backend survives whatever layout reaches
//! it, and a live device serves its queues without a wild access.

#![no_main]

use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::bus::Bus;
use devices::io::fake::{CountingLine, RecordingIo};
use devices::virtio::block::{BlockConfig, BlockDevice};
use devices::virtio::mmio::TransportEvents;
use devices::virtio::net::{MacAddr, NetConfig, NetDevice};
use devices::virtio::rng::{EntropySource, RngDevice};
use devices::virtio::testing::transport_event;
use devices::virtio::{
    MmioTransport, TransportEvent, VirtioDevice, VirtioDeviceInfo, F_VERSION_1, MMIO_SIZE,
};
use libfuzzer_sys::fuzz_target;
use ringvm_fuzz::ops::{Auditor, Outcome};
use ringvm_fuzz::{memfd, with_guest_memory, NullTap};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Where the window sits on the bus; accesses may miss it on both sides.
const BASE: u64 = 0xd000_0000;

/// The registers a driver writes, so inputs reach them without guessing
/// offsets (raw accesses reach everything else).
const REGS: [u64; 19] = [
    0x014, 0x020, 0x024, 0x030, 0x038, 0x044, 0x050, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094,
    0x0a0, 0x0a4, 0x0ac, 0x0c0, 0x100, 0x104,
];

/// Status bits a driver sets on its way to DRIVER_OK.
const STATUS_STEPS: [u32; 6] = [1, 3, 11, 15, 0x80, 0];

#[derive(Arbitrary, Debug)]
enum Access {
    /// A read of `size` bytes at window offset `offset` (may be outside).
    Read { offset: u16, size: u8 },
    /// A write of `size` bytes of `value` at window offset `offset`.
    Write { offset: u16, size: u8, value: u64 },
    /// A 32-bit write to one of [`REGS`].
    Reg { reg: u8, value: u32 },
    /// A Status write of the next usual step.
    Status(u8),
    /// Sets up queue `queue` in one go (size, addresses, ready).
    Queue {
        queue: u8,
        size: u16,
        desc: u32,
        avail: u32,
        used: u32,
    },
    /// The VMM thread applies the transport's messages.
    Backend,
    /// The VMM thread serves every queue once and completes the I/O.
    Serve,
    /// The backend asks the driver for a reset.
    NeedsReset,
    /// The backend signals used buffers.
    Interrupt,
}

#[derive(Arbitrary, Debug)]
enum Kind {
    Block { read_only: bool },
    Net,
    Rng,
}

#[derive(Arbitrary, Debug)]
struct Input {
    kind: Kind,
    accesses: Vec<Access>,
}

type Backend = Box<dyn VirtioDevice<GuestMemoryMmap>>;

/// Entropy that never runs out and costs nothing.
#[derive(Debug)]
struct Counter(u8);

impl EntropySource for Counter {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        for b in buf.iter_mut() {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
        Ok(buf.len())
    }
}

fn serve(dev: &mut Backend, mem: &GuestMemoryMmap, io: &mut RecordingIo, audit: &mut Auditor) {
    for q in 0..dev.info().queue_max_sizes.len() {
        let _ = dev.process_queue(q, mem, io);
        audit.take(io, true, |_, _| {});
    }
    for _ in 0..64 {
        let Some((tag, res)) = audit.finish(0, Outcome::Full, &[]) else {
            break;
        };
        dev.complete(tag, res, mem, io);
        audit.take(io, true, |_, _| {});
    }
    dev.end_turn(mem);
}

fn evt() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).expect("harness: eventfd")
}

fn apply_events(
    rx: &Receiver<TransportEvent>,
    info: &VirtioDeviceInfo,
    backend: &mut Backend,
    mem: &GuestMemoryMmap,
) {
    while let Ok(event) = rx.try_recv() {
        if let TransportEvent::Activate(a) = &event {
            assert_eq!(
                a.features & !info.avail_features,
                0,
                "activation with features the device did not offer"
            );
            assert_ne!(a.features & F_VERSION_1, 0, "activation without VERSION_1");
            assert_eq!(a.queues.len(), info.queue_max_sizes.len());
            for (q, &max) in a.queues.iter().zip(&info.queue_max_sizes) {
                if q.ready {
                    assert_eq!(q.check(max), Ok(()), "activation with a bad queue");
                }
            }
        }
        let _ = transport_event(backend.as_mut(), mem, &event);
        if matches!(event, TransportEvent::Reset) && backend.in_flight() == 0 {
            // What the VMM's slot does once the backend let go of everything.
            info.shared.finish_reset();
        }
    }
}

fuzz_target!(|input: Input| with_guest_memory(|mem| run(mem, &input)));

fn run(mem: &GuestMemoryMmap, input: &Input) {
    let line = || Box::new(CountingLine::default());
    let mut backend: Backend = match input.kind {
        Kind::Block { read_only } => Box::new(
            BlockDevice::new(
                BlockConfig {
                    file: memfd(1 << 20),
                    read_only,
                    flush: true,
                    id: "fuzz".into(),
                },
                line(),
            )
            .expect("harness: device"),
        ),
        Kind::Net => Box::new(NetDevice::new(
            NetConfig {
                tap: NullTap::default(),
                mac: MacAddr::from_bytes([2, 0, 0, 0, 0, 2]).ok(),
            },
            line(),
        )),
        Kind::Rng => Box::new(RngDevice::new(Box::new(Counter(0)), line())),
    };
    let info = backend.info();
    let (sender, rx) = mpsc::sync_channel(devices::virtio::mmio::TRANSPORT_QUEUE_DEPTH);
    let kicks = info.queue_max_sizes.iter().map(|_| evt()).collect();
    let transport = MmioTransport::new(
        info.clone(),
        TransportEvents {
            sender,
            wake: evt(),
        },
        kicks,
    )
    .expect("harness: transport");
    let transport = Arc::new(Mutex::new(transport));
    let mut bus = Bus::new();
    bus.insert(transport.clone(), BASE, MMIO_SIZE)
        .expect("harness: bus");
    let mut io = RecordingIo::default();
    let mut audit = Auditor::new(mem);
    let irq =
        devices::virtio::Interrupt::new(info.shared.clone(), Box::new(CountingLine::default()));

    let write32 = |offset: u64, v: u32| {
        bus.write(0, BASE + offset, &v.to_le_bytes());
    };
    let mut step = 0usize;
    for access in input.accesses.iter().take(512) {
        match access {
            Access::Read { offset, size } => {
                let mut data = vec![0u8; usize::from(size % 9)];
                bus.read(1, BASE - 0x80 + u64::from(*offset), &mut data);
            }
            Access::Write {
                offset,
                size,
                value,
            } => {
                let bytes = value.to_le_bytes();
                bus.write(
                    1,
                    BASE - 0x80 + u64::from(*offset),
                    &bytes[..usize::from(size % 9)],
                );
            }
            Access::Reg { reg, value } => write32(REGS[usize::from(*reg) % REGS.len()], *value),
            Access::Status(skip) => {
                step = (step + usize::from(*skip % 2)) % STATUS_STEPS.len();
                write32(0x070, STATUS_STEPS[step]);
                step += 1;
            }
            Access::Queue {
                queue,
                size,
                desc,
                avail,
                used,
            } => {
                write32(0x030, u32::from(*queue));
                write32(0x038, u32::from(*size));
                write32(0x080, *desc);
                write32(0x090, *avail);
                write32(0x0a0, *used);
                write32(0x044, 1);
            }
            Access::Backend => apply_events(&rx, &info, &mut backend, mem),
            Access::Serve => {
                apply_events(&rx, &info, &mut backend, mem);
                serve(&mut backend, mem, &mut io, &mut audit);
            }
            Access::NeedsReset => backend.request_reset(),
            Access::Interrupt => {
                let _ = irq.used_buffer();
            }
        }
    }

    // The driver resets the device; the backend lets go of everything.
    write32(0x070, 0);
    apply_events(&rx, &info, &mut backend, mem);
    for _ in 0..64 {
        let Some((tag, res)) = audit.finish(0, Outcome::Errno(3), &[]) else {
            break;
        };
        backend.complete(tag, res, mem, &mut io);
        audit.take(&mut io, true, |_, _| {});
    }
    if info.shared.reset_pending() && backend.in_flight() == 0 {
        info.shared.finish_reset();
    }
    assert_eq!(backend.in_flight(), 0, "ops still counted in flight");
    let mut status = [0u8; 4];
    bus.read(0, BASE + 0x070, &mut status);
    assert_eq!(
        u32::from_le_bytes(status),
        0,
        "Status after a completed reset"
    );
}
