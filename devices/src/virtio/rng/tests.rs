//! Unit tests through the shared driver-side queue mock.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::io::fake::{CountingLine, PanicIo};
use crate::virtio::testing::DriverQueue;
use crate::virtio::{Activation, INT_VRING};

type Dq = DriverQueue<GuestMemoryMmap>;
const W: u16 = Dq::WRITE;

/// A source that counts up, so tests see exactly which bytes arrived.
#[derive(Debug, Default)]
struct Counting(u8);

impl EntropySource for Counting {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        for b in buf.iter_mut() {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
        Ok(buf.len())
    }
}

/// A host with no entropy to give.
#[derive(Debug, Default)]
struct Dry;

impl EntropySource for Dry {
    fn fill(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    q: Dq,
    dev: RngDevice,
    line: CountingLine,
}

impl Rig {
    fn new(source: Box<dyn EntropySource>) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4_0000)]).expect("mem");
        let q = DriverQueue::new(mem.clone(), 0, 16);
        let line = CountingLine::default();
        let mut dev = RngDevice::new(source, Box::new(line.clone()));
        let activation = Activation {
            features: FEATURES & !F_EVENT_IDX,
            queues: vec![q.config()],
        };
        VirtioDevice::activate(&mut dev, &mem, &activation).expect("activate");
        Self { mem, q, dev, line }
    }

    fn run(&mut self) -> Result<ProcessOutcome, DeviceError> {
        let out = self.dev.process_queue(0, &self.mem, &mut PanicIo)?;
        VirtioDevice::<GuestMemoryMmap>::end_turn(&mut self.dev, &self.mem);
        Ok(out)
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read");
        v
    }
}

#[test]
fn buffers_are_filled_across_descriptors_without_host_io() -> Result<(), DeviceError> {
    let mut rig = Rig::new(Box::new(Counting::default()));
    let head = rig.q.push(&[(0x8000, 3, W), (0x9000, 2, W)]);
    let out = rig.run()?;
    assert_eq!((out.popped, out.answered, out.submitted), (1, 1, 0));
    assert_eq!(rig.q.used_entries(), vec![(u32::from(head), 5)]);
    assert_eq!(rig.bytes(0x8000, 3), vec![1, 2, 3]);
    assert_eq!(rig.bytes(0x9000, 2), vec![4, 5]);
    assert_eq!(rig.line.count(), 1, "one interrupt for the turn");
    assert_eq!(rig.dev.info_shared_isr(), INT_VRING);
    let c = rig.dev.counters();
    assert_eq!((c.requests, c.bytes, c.errors), (1, 5, 0));
    Ok(())
}

#[test]
fn a_request_gets_at_most_the_cap() -> Result<(), DeviceError> {
    let mut rig = Rig::new(Box::new(Counting::default()));
    rig.q.push(&[(0x8000, 3 * MAX_REQUEST_BYTES as u32, W)]);
    rig.run()?;
    assert_eq!(rig.q.used_entries()[0].1, MAX_REQUEST_BYTES as u32);
    assert_eq!(rig.bytes(0x8000 + MAX_REQUEST_BYTES as u64, 4), vec![0; 4]);
    Ok(())
}

#[test]
fn readable_and_zero_length_buffers_are_refused_untouched() -> Result<(), DeviceError> {
    let mut rig = Rig::new(Box::new(Counting::default()));
    let readable = rig.q.push(&[(0x8000, 16, 0)]);
    let empty = rig.q.push(&[(0x9000, 0, W)]);
    let mixed = rig.q.push(&[(0xa000, 8, W), (0xb000, 8, 0)]);
    let out = rig.run()?;
    assert_eq!(out.answered, 3);
    assert_eq!(
        rig.q.used_entries(),
        vec![
            (u32::from(readable), 0),
            (u32::from(empty), 0),
            (u32::from(mixed), 0)
        ]
    );
    assert_eq!(rig.bytes(0x8000, 16), vec![0; 16]);
    assert_eq!(rig.bytes(0xa000, 8), vec![0; 8]);
    assert_eq!(rig.dev.counters().errors, 3);
    assert!(
        !rig.dev.info_shared_needs_reset(),
        "bad requests never break the device"
    );
    Ok(())
}

#[test]
fn buffers_outside_memory_and_dry_hosts_give_empty_answers() -> Result<(), DeviceError> {
    let mut rig = Rig::new(Box::new(Dry));
    rig.q.push(&[(0x8000, 16, W)]);
    rig.q.push(&[(0x10_0000_0000, 16, W)]);
    rig.run()?;
    assert_eq!(
        rig.q.used_entries().iter().map(|e| e.1).collect::<Vec<_>>(),
        vec![0, 0]
    );
    assert_eq!(rig.dev.counters().errors, 2);
    Ok(())
}

#[test]
fn a_reset_drops_the_queue_and_reactivation_serves_again() -> Result<(), DeviceError> {
    let mut rig = Rig::new(Box::new(Counting::default()));
    VirtioDevice::<GuestMemoryMmap>::reset(&mut rig.dev);
    assert!(!VirtioDevice::<GuestMemoryMmap>::is_active(&rig.dev));
    assert_eq!(VirtioDevice::<GuestMemoryMmap>::in_flight(&rig.dev), 0);
    rig.q.push(&[(0x8000, 4, W)]);
    let out = rig.run()?;
    assert_eq!(out.popped, 0, "an inactive device pops nothing");
    rig.q.clear();
    let activation = Activation {
        features: FEATURES,
        queues: vec![rig.q.config()],
    };
    VirtioDevice::activate(&mut rig.dev, &rig.mem, &activation)?;
    rig.q.push(&[(0x8000, 4, W)]);
    rig.run()?;
    assert_eq!(rig.q.used_entries()[0].1, 4);
    Ok(())
}

#[test]
fn a_head_outside_the_queue_breaks_it() {
    let mut rig = Rig::new(Box::new(Counting::default()));
    rig.q.publish(200);
    assert!(matches!(rig.run(), Err(DeviceError::QueueBroken(0, _))));
    assert!(rig.dev.info_shared_needs_reset());
}

impl RngDevice {
    fn info_shared_isr(&self) -> u32 {
        self.queues.interrupt().shared().interrupt_status()
    }
    fn info_shared_needs_reset(&self) -> bool {
        self.queues.interrupt().shared().needs_reset()
    }
}
