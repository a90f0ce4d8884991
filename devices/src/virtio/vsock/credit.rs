//! Credit-based flow control for one connection (VIRTIO 1.2 §5.10.6.3),
//! both ways.
//!
//! Each side tells the other, in every header, how big its receive buffer
//! is (`buf_alloc`) and how many bytes it has consumed from it (`fwd_cnt`,
//! a wrapping counter). A sender may have at most `buf_alloc - (sent -
//! fwd_cnt)` bytes outstanding. Counters are `u32` and wrap, as on the
//! wire; every difference is taken with wrapping arithmetic and clamped,
//! so no value a guest writes (huge, zero, running backwards) can make us
//! send more than it offered or accept more than we offered.

/// Most bytes that can honestly be outstanding to the guest: a larger
/// `tx_cnt - fwd_cnt` (wrapping) means the guest's `fwd_cnt` ran ahead of
/// what it was sent, and it gets no credit. No real buffer is 2 GiB.
const MAX_OUTSTANDING: u32 = i32::MAX as u32;

/// The credit state of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credit {
    /// Our receive buffer for guest data: what we let the guest have
    /// outstanding (held guest chains not yet written to the host socket).
    buf_alloc: u32,
    /// Bytes of guest data received.
    rx_cnt: u32,
    /// Bytes of guest data written to the host socket.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_told: u32,
    /// The guest's receive buffer, as it last told us.
    peer_buf_alloc: u32,
    /// Bytes the guest consumed, as it last told us.
    peer_fwd_cnt: u32,
    /// Bytes of host data sent to the guest.
    tx_cnt: u32,
}

/// The guest sent more than the credit we gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest sent {len} bytes with {room} bytes of credit left")]
pub struct OverCredit {
    /// Bytes in the packet.
    pub len: u32,
    /// Credit it had.
    pub room: u32,
}

impl Credit {
    /// A new connection offering `buf_alloc` bytes of buffer to the guest;
    /// the guest's own figures come from its first header.
    pub fn new(buf_alloc: u32) -> Self {
        Self {
            buf_alloc,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
        }
    }

    /// Takes the guest's `buf_alloc` and `fwd_cnt` from any header it sent.
    pub fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes we may still send to the guest. A `fwd_cnt` ahead of what we
    /// sent (the guest claims to have consumed bytes it never got) reads
    /// as an enormous outstanding count and so as no credit at all.
    pub fn peer_credit(&self) -> u32 {
        let outstanding = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        if outstanding > MAX_OUTSTANDING {
            // "Negative": fwd_cnt ahead of what we sent.
            return 0;
        }
        self.peer_buf_alloc.saturating_sub(outstanding)
    }

    /// Counts `n` bytes sent to the guest (at most [`Self::peer_credit`]).
    pub fn sent(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// Room left in our buffer for guest data.
    pub fn room(&self) -> u32 {
        let held = self.rx_cnt.wrapping_sub(self.fwd_cnt);
        self.buf_alloc.saturating_sub(held)
    }

    /// Accepts `len` bytes of guest data into our buffer, or refuses them
    /// if the guest ignored its credit.
    pub fn receive(&mut self, len: u32) -> Result<(), OverCredit> {
        let room = self.room();
        if len > room {
            return Err(OverCredit { len, room });
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        Ok(())
    }

    /// Counts `n` bytes of guest data written to the host socket.
    pub fn forwarded(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }

    /// Whether the guest should hear of freed buffer space now: a quarter
    /// of the buffer was freed since we last said, or everything held was
    /// written and something was freed (so a guest that stopped at its
    /// credit limit never waits for an update that would not come).
    pub fn update_due(&self) -> bool {
        let untold = self.fwd_cnt.wrapping_sub(self.fwd_cnt_told);
        untold >= self.buf_alloc / 4 || (untold > 0 && self.rx_cnt == self.fwd_cnt)
    }

    /// Our `(buf_alloc, fwd_cnt)` for a header to the guest; the guest
    /// then knows of everything forwarded so far.
    pub fn stamp(&mut self) -> (u32, u32) {
        self.fwd_cnt_told = self.fwd_cnt;
        (self.buf_alloc, self.fwd_cnt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn we_never_send_more_than_the_guest_offered() {
        let mut c = Credit::new(1024);
        assert_eq!(c.peer_credit(), 0, "nothing before the guest speaks");
        c.update_peer(100, 0);
        assert_eq!(c.peer_credit(), 100);
        c.sent(60);
        assert_eq!(c.peer_credit(), 40);
        c.update_peer(100, 60);
        assert_eq!(c.peer_credit(), 100);
    }

    #[test]
    fn hostile_credit_values_give_no_credit_or_the_stated_one() {
        let mut c = Credit::new(1024);
        c.sent(10);
        // fwd_cnt beyond what was sent: outstanding wraps huge, no credit.
        c.update_peer(u32::MAX, 1_000_000);
        assert_eq!(c.peer_credit(), 0);
        c.update_peer(u32::MAX, 11);
        assert_eq!(c.peer_credit(), 0, "one byte ahead");
        // Huge buf_alloc with honest fwd_cnt: credit is what it says.
        c.update_peer(u32::MAX, 10);
        assert_eq!(c.peer_credit(), u32::MAX);
        // Counters that wrapped are still honest differences.
        let mut w = Credit::new(1024);
        w.sent(u32::MAX);
        w.sent(5);
        w.update_peer(64, u32::MAX);
        assert_eq!(w.peer_credit(), 64 - 5);
    }

    #[test]
    fn the_guest_cannot_overrun_our_buffer() {
        let mut c = Credit::new(100);
        assert!(c.receive(60).is_ok());
        assert_eq!(c.receive(41), Err(OverCredit { len: 41, room: 40 }));
        assert!(c.receive(40).is_ok());
        assert_eq!(c.room(), 0);
        c.forwarded(100);
        assert_eq!(c.room(), 100);
        assert!(c.receive(u32::MAX).is_err());
    }

    #[test]
    fn credit_updates_are_due_after_a_quarter_or_when_drained() {
        let mut c = Credit::new(1000);
        assert!(!c.update_due());
        c.receive(600).unwrap_or_default();
        c.forwarded(100);
        assert!(!c.update_due(), "100 of 1000 freed, 500 still held");
        c.forwarded(200);
        assert!(c.update_due(), "a quarter freed");
        assert_eq!(c.stamp(), (1000, 300));
        assert!(!c.update_due());
        c.forwarded(300);
        assert!(c.update_due(), "all held data written");
    }
}
