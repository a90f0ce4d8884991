//! COM1, the guest's console.
//!
//! The UART state machine is vm-superio's; this file only plugs it onto the
//! bus and gives the VMM thread a way to feed it keyboard input.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAccess, BusDevice};

/// Raises the UART's interrupt by writing an eventfd that the VMM wired to
/// an IRQ line (a KVM irqfd), so this crate never names KVM.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// An 8250 UART on the port bus, writing the guest's output to `W`.
pub struct Serial<W: Write + Send> {
    uart: vm_superio::Serial<EventFdTrigger, NoEvents, W>,
}

impl<W: Write + Send> std::fmt::Debug for Serial<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

impl<W: Write + Send> Serial<W> {
    /// Makes a UART that interrupts through `irq` and prints to `out`.
    pub fn new(irq: EventFd, out: W) -> Self {
        Self {
            uart: vm_superio::Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Queues host input for the guest to read; returns how many bytes the
    /// receive FIFO took. The rest must be offered again later, which is
    /// what keeps a fast paste from being silently dropped.
    pub fn enqueue_input(&mut self, input: &[u8]) -> io::Result<usize> {
        let room = self.uart.fifo_capacity().min(input.len());
        if room == 0 {
            return Ok(0);
        }
        self.uart
            .enqueue_raw_bytes(&input[..room])
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }

    /// How many more input bytes the receive FIFO can take now.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl<W: Write + Send> BusDevice for Serial<W> {
    fn debug_label(&self) -> &str {
        "serial"
    }

    fn read(&mut self, access: BusAccess, data: &mut [u8]) {
        if data.len() != 1 || access.offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(access.offset as u8);
    }

    fn write(&mut self, access: BusAccess, data: &[u8]) {
        if data.len() != 1 || access.offset > 7 {
            return;
        }
        if let Err(e) = self.uart.write(access.offset as u8, data[0]) {
            log::warn!("serial: write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THR: u64 = 0;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 0x01;

    fn access(offset: u64) -> BusAccess {
        BusAccess { offset, vcpu: 0 }
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Vec::new());
        for b in b"hi\n" {
            s.write(access(THR), &[*b]);
        }
        assert_eq!(s.uart.writer(), b"hi\n");
    }

    #[test]
    fn host_input_is_readable_by_the_guest() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, io::sink());
        assert_eq!(s.enqueue_input(b"ab").unwrap(), 2);
        let mut b = [0u8];
        s.read(access(LSR), &mut b);
        assert_ne!(b[0] & LSR_DATA_READY, 0);
        s.read(access(THR), &mut b);
        assert_eq!(b[0], b'a');
    }

    #[test]
    fn a_full_fifo_takes_only_what_fits() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, io::sink());
        let big = vec![b'x'; 1000];
        let taken = s.enqueue_input(&big).unwrap();
        assert!(taken < big.len());
        assert_eq!(s.input_room(), 0);
        assert_eq!(s.enqueue_input(b"y").unwrap(), 0);
    }

    #[test]
    fn odd_sized_and_out_of_range_accesses_are_ignored() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Vec::new());
        s.write(access(THR), b"ab");
        s.write(access(9), b"c");
        let mut b = [0u8; 2];
        s.read(access(0), &mut b);
        assert_eq!(b, [0xff, 0xff]);
        assert!(s.uart.writer().is_empty());
    }
}
