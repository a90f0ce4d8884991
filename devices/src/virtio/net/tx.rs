//! Transmit: each TX chain becomes one `writev` on the tap, straight from
//! guest memory, many in flight, each answered with a used length of 0.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemory;

use super::device::NetDevice;
use super::frame::{self, Direction};
use super::tap::Tap;
use super::tx_slots::Refused;
use super::{TX_QUEUE, VNET_HDR_LEN};
use crate::io::{IoOp, IoSubmit, IoSubmitError};
use crate::virtio::{drain_queue, ChainTaken, DeviceError, ProcessOutcome, Taken};

impl<T: Tap> NetDevice<T> {
    /// Sends up to one queue's worth of chains.
    pub(super) fn tx_drain<M: GuestMemory>(
        &mut self,
        mem: &M,
        io: &mut dyn IoSubmit,
    ) -> Result<ProcessOutcome, DeviceError> {
        drain_queue(
            self,
            |d| &mut d.queues,
            TX_QUEUE,
            mem,
            |d, q, chain, head| d.tx_take(q, mem, io, head, chain),
        )
    }

    fn tx_take<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        io: &mut dyn IoSubmit,
        head: u16,
        chain: DescriptorChain<&M>,
    ) -> Result<ChainTaken, String> {
        let fd = self.tap.as_raw_fd();
        let (tag, iovecs) = match self.tx.reserve(head, self.generation) {
            Ok(reserved) => reserved,
            // A write from before a reset still holds this head's slot.
            Err(Refused::Orphaned) => return Ok(ChainTaken::PutBack),
            Err(Refused::InFlight) => {
                return Err(format!("head index {head} is already in flight"))
            }
            Err(Refused::OutOfRange) => return Err(format!("head index {head} outside the queue")),
        };
        let len = match frame::walk(mem, chain, Direction::Tx, &mut iovecs.0, None) {
            Ok(len) => len,
            Err(e) => {
                self.tx.release(head);
                self.counters.tx_errors += 1;
                self.log.warn(
                    "tx-chain",
                    format_args!("transmit chain {head} refused: {e}"),
                );
                queue
                    .add_used(mem, head, 0)
                    .map_err(|e| format!("used ring: {e}"))?;
                return Ok(ChainTaken::Answered);
            }
        };
        let bytes = len.saturating_sub(VNET_HDR_LEN) as u64;
        if !self.tx_limiter.is_unlimited() {
            if let Err(wait) = self.tx_limiter.try_consume(bytes, 1) {
                self.tx.release(head);
                self.throttle(TX_QUEUE, wait);
                return Ok(ChainTaken::Throttled);
            }
        }
        let (iovecs, iovcnt) = iovecs.as_raw();
        let op = IoOp::Writev {
            fd,
            iovecs,
            iovcnt,
            offset: u64::MAX,
        };
        // SAFETY: the iovec array lives in this head's slot of the TX
        // in-flight table, neither touched nor freed until this tag's completion (a
        // reset only orphans it; dropping the table with ops in flight leaks
        // it). The buffers are guest memory, mapped for the VM's life and
        // checked by `walk` to lie inside it. The tap stays open while ops
        // are in flight (see the device's Drop).
        match unsafe { io.submit(op, tag) } {
            Ok(()) => {
                self.tx.commit(head, tag, len);
                Ok(ChainTaken::Submitted)
            }
            Err(IoSubmitError::QueueFull) => {
                self.tx.release(head);
                self.tx_limiter.refund(bytes, 1);
                Ok(ChainTaken::PutBack)
            }
            Err(e) => {
                self.tx.release(head);
                self.counters.tx_dropped += 1;
                self.log.warn(
                    "tx-submit",
                    format_args!("tap write could not be submitted: {e}"),
                );
                queue
                    .add_used(mem, head, 0)
                    .map_err(|e| format!("used ring: {e}"))?;
                Ok(ChainTaken::Answered)
            }
        }
    }

    /// Answers a finished tap write.
    pub(super) fn tx_complete<M: GuestMemory>(&mut self, tag: u64, res: i32, mem: &M) {
        let (head, len) = match self.tx.take(tag) {
            Some(Taken::Live { head, pending }) => (head, pending),
            Some(Taken::Stale { .. }) => return,
            None => {
                log::debug!("virtio-net: completion for unknown tag {tag:#x}");
                return;
            }
        };
        if res >= 0 {
            self.counters.tx_packets += 1;
            self.counters.tx_bytes += len.saturating_sub(VNET_HDR_LEN) as u64;
        } else {
            self.counters.tx_dropped += 1;
            self.log.warn(
                "tx-failed",
                format_args!("tap write failed: errno {}", -res),
            );
        }
        // A corrupt used ring breaks the queue; the driver hears of it
        // through NEEDS_RESET, so the error needs no other handling here.
        let _ = self.queues.add_used_batched(TX_QUEUE, mem, head, 0);
    }
}
