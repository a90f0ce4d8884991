//! virtio-net (VIRTIO 1.2 §5.1) through a tap whose host end answers ARP
//! and pings (169.254.88.1; the guest is 169.254.88.2): round trips in
//! every descriptor layout, RX with no buffers posted, frames larger than
//! the buffers with and without MRG_RXBUF, a reset with a tap read parked,
//! and rude TX and RX chains. Every case ends with a good ping.

use super::Ctx;
use crate::mem;
use crate::msg::{Msg, R};
use crate::net::*;
use crate::time::sleep_ms;
use crate::virtio::*;
use crate::{ensure, fail};

fn what(w: &'static str) -> impl Fn(Msg) -> Msg {
    move |e| Msg::new(format_args!("{w}: {}", e.as_str()))
}

/// Up with the polite features (+ `extra`), buffers posted, peer known.
fn ready(ctx: &Ctx, extra: u64) -> Result<Net, Msg> {
    let mut n = Net::polite(ctx.net(), extra)?;
    n.post_plain();
    n.peer_mac()?;
    Ok(n)
}

/// A good ping of `payload` bytes; replies to `forbidden` fail.
fn good_ping(n: &mut Net, forbidden: &[u16]) -> R {
    let seq = next_seq();
    n.ping(seq, 56, Layout::Split)?;
    let f = n.expect_reply(seq, 56, forbidden)?;
    if !n.mrg() {
        ensure!(
            f.num_buffers == 1,
            "num_buffers {} without MRG_RXBUF",
            f.num_buffers
        );
    }
    Ok(())
}

/// Identity, features, queues and config space; then a round trip.
pub fn identity(ctx: &mut Ctx) -> R {
    let d = ctx.net();
    ensure!(d.r(MAGIC) == MAGIC_VALUE, "magic {:#x}", d.r(MAGIC));
    ensure!(d.r(VERSION) == 2, "version {}", d.r(VERSION));
    let id = d.r(crate::virtio::DEVICE_ID);
    ensure!(id == crate::net::DEVICE_ID, "device id {id}");
    ensure!(d.r(VENDOR_ID) != 0, "vendor id 0");
    d.reset()?;
    let f = d.device_features();
    ensure!(f & F_VERSION_1 != 0, "VERSION_1 not offered ({f:#x})");
    ensure!(f & F_MAC != 0, "MAC not offered ({f:#x})");
    for q in [RXQ, TXQ] {
        d.w(QUEUE_SEL, q);
        let max = d.r(QUEUE_NUM_MAX);
        ensure!(
            max >= 16 && max.is_power_of_two(),
            "queue {q}: QueueNumMax {max}"
        );
    }
    if f & F_CTRL_VQ == 0 {
        d.w(QUEUE_SEL, 2);
        let max = d.r(QUEUE_NUM_MAX);
        ensure!(max == 0, "no CTRL_VQ, yet queue 2 has QueueNumMax {max}");
    }
    let mac: [u8; 6] = core::array::from_fn(|i| d.cfg8(i as u64));
    ensure!(mac[0] & 1 == 0, "config MAC {mac:02x?} is multicast");
    ensure!(mac != [0; 6], "config MAC is all zero");
    if f & F_STATUS != 0 {
        let st = u16::from(d.cfg8(6)) | u16::from(d.cfg8(7)) << 8;
        ensure!(st & S_LINK_UP != 0, "status {st:#x}: link not up");
    }
    for bad in [F_CTRL_VQ, 1 << 22, F_RING_PACKED, 1 << 63] {
        if f & bad != 0 {
            continue;
        }
        d.reset()?;
        d.w(STATUS, S_ACK);
        d.w(STATUS, S_ACK | S_DRIVER);
        d.write_driver_features(polite_features(&d) | bad);
        d.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        let s = d.status();
        ensure!(
            s & S_FEATURES_OK == 0,
            "FEATURES_OK accepted with unoffered bit {bad:#x}"
        );
        break;
    }
    let mut n = Net::polite(d, 0)?;
    ensure!(n.mac == mac, "MAC changed between reads");
    n.post_plain();
    n.round_trip(56, Layout::Split).map(|_| ())
}

/// ARP request out, reply in (the peer's MAC, for every later case).
pub fn arp(ctx: &mut Ctx) -> R {
    let mut n = Net::polite(ctx.net(), 0)?;
    n.post_plain();
    let mac = n.arp()?;
    crate::note!("peer MAC {mac:02x?}");
    ensure!(mac[0] & 1 == 0 && mac != [0; 6], "peer MAC {mac:02x?}");
    good_ping(&mut n, &[])
}

/// Echo round trips with the TX header and frame in two descriptors, in
/// one, and cut across four; payloads from 0 to a full 1514-byte frame
/// (exactly the 1526-byte buffer); used lengths, num_buffers, interrupt.
pub fn ping(ctx: &mut Ctx) -> R {
    let mut n = ready(ctx, 0)?;
    let _ = n.dev.r(INTERRUPT_STATUS);
    n.dev.w(INTERRUPT_ACK, INT_VRING | INT_CONFIG);
    for (layout, name) in [
        (Layout::Split, "header + frame"),
        (Layout::Joined, "one descriptor"),
        (Layout::Scattered, "four descriptors"),
    ] {
        for payload in [56usize, 0, 1, 1472] {
            let f = n.round_trip(payload, layout).map_err(what(name))?;
            let want = 14 + 28 + payload;
            ensure!(
                f.len == want,
                "{name}: frame of {} bytes, expected {want}",
                f.len
            );
            ensure!(
                f.num_buffers == 1 && f.chains == 1,
                "{name}: num_buffers {}",
                f.num_buffers
            );
        }
    }
    let isr = n.dev.r(INTERRUPT_STATUS);
    ensure!(
        isr & INT_VRING != 0,
        "InterruptStatus {isr:#x}: no used-buffer bit after the round trips"
    );
    n.dev.w(INTERRUPT_ACK, isr);
    Ok(())
}

/// Three pings while no receive buffer is posted: the replies must wait
/// (in the tap, not dropped) and all arrive once buffers are posted.
pub fn rx_no_buffers(ctx: &mut Ctx) -> R {
    let _ = ready(ctx, 0)?; // learns the peer's MAC
    let mut n = Net::polite(ctx.net(), 0)?;
    let seqs = [next_seq(), next_seq(), next_seq()];
    for &s in &seqs {
        n.ping(s, 100, Layout::Split)?;
    }
    sleep_ms(300);
    ensure!(n.rx.used_idx() == 0, "RX used entries without buffers");
    n.post_plain();
    let mut pending = seqs;
    for k in 0..3 {
        let me = n.mac;
        let peer = n.peer_mac()?;
        let f = n
            .recv_until(WAIT_MS, |f| {
                Ok(matches!(reply_seq(f.bytes(), &me, &peer), Some(s) if pending.contains(&s)))
            })
            .map_err(|e| {
                Msg::new(format_args!(
                    "reply {} of 3 lost (queued without buffers): {}",
                    k + 1,
                    e.as_str()
                ))
            })?;
        let s = reply_seq(f.bytes(), &me, &peer).unwrap_or(0);
        check_reply(f.bytes(), s, 100)?;
        for p in pending.iter_mut().filter(|p| **p == s) {
            *p = 0;
        }
    }
    good_ping(&mut n, &[])
}

/// Without MRG_RXBUF, receive chains of several descriptors (the header
/// split 5 + 7 across two): a 3042-byte frame fills one chain.
pub fn rx_scatter(ctx: &mut Ctx) -> R {
    let _ = ready(ctx, 0)?;
    let mut n = Net::polite(ctx.net(), 0)?;
    n.post_chains(0, 6, &[5, 1000, 3, 2500]);
    for payload in [3000usize, 56, 3000] {
        let f = n.round_trip(payload, Layout::Split)?;
        ensure!(
            f.len == 42 + payload && f.chains == 1 && f.num_buffers == 1,
            "payload {payload}: frame {} bytes in {} chains, num_buffers {}",
            f.len,
            f.chains,
            f.num_buffers
        );
    }
    Ok(())
}

/// Without MRG_RXBUF a 4042-byte frame cannot fit a 1526-byte buffer: it
/// must be dropped (ringvm counts it in rx_dropped), nothing truncated
/// delivered, and the next frame received normally.
pub fn big_frame_dropped(ctx: &mut Ctx) -> R {
    let mut n = ready(ctx, 0)?;
    for payload in [4000usize, 1473, 4000] {
        let big = next_seq();
        n.ping(big, payload, Layout::Split)?;
        sleep_ms(100);
        good_ping(&mut n, &[big]).map_err(|e| {
            Msg::new(format_args!(
                "after a {}-byte frame (1526-byte buffers): {}",
                42 + payload,
                e.as_str()
            ))
        })?;
    }
    Ok(())
}

/// With MRG_RXBUF, frames larger than a 1526-byte buffer spread across
/// buffers: num_buffers says how many, the bytes are the frame's.
pub fn big_frame_mrg(ctx: &mut Ctx) -> R {
    let mut n = ready(ctx, F_MRG_RXBUF)?;
    for payload in [4000usize, 56, 8000, 1472, 1473, 4000] {
        let f = n.round_trip(payload, Layout::Split)?;
        let total = HDR_LEN + 42 + payload;
        let want = total.div_ceil(BUF_LEN as usize) as u16;
        ensure!(
            f.num_buffers == want && f.chains == want,
            "payload {payload}: num_buffers {} in {} chains, expected {want}",
            f.num_buffers,
            f.chains
        );
    }
    // Fewer buffers posted than a frame needs: the device may wait for
    // more or drop the frame, never deliver it cut short.
    let mut n = Net::polite(ctx.net(), F_MRG_RXBUF)?;
    n.post_chains(0, 2, &[BUF_LEN]);
    let big = next_seq();
    n.ping(big, 4000, Layout::Split)?;
    sleep_ms(100);
    n.post_chains(2, NBUFS - 2, &[BUF_LEN]);
    let small = next_seq();
    n.ping(small, 56, Layout::Split)?;
    let (me, peer) = (n.mac, n.peer_mac()?);
    let mut big_seen = false;
    let mut big_bad: Option<(usize, u16)> = None;
    n.recv_until(WAIT_MS, |f| {
        let b = f.bytes();
        match reply_seq(b, &me, &peer) {
            Some(s) if s == big => {
                big_seen = true;
                if check_reply(b, big, 4000).is_err() {
                    big_bad = Some((f.len, f.num_buffers));
                }
                Ok(false)
            }
            Some(s) => Ok(s == small),
            None => Ok(false),
        }
    })
    .map_err(what("a frame larger than the 2 buffers posted"))?;
    if let Some((len, nb)) = big_bad {
        fail!(
            "a 4042-byte frame with 2 buffers (3052 bytes) posted was delivered cut short: \
             {len} bytes, num_buffers {nb}"
        );
    }
    crate::note!(
        "frame larger than the posted buffers: {}",
        if big_seen {
            "delivered whole later"
        } else {
            "dropped"
        }
    );
    Ok(())
}

/// Reset while the device waits for a frame with buffers posted: the old
/// buffers must never be written after Status reads 0, and the next
/// frame must reach the new rings.
pub fn reset_rx_parked(ctx: &mut Ctx) -> R {
    reset_with_rx_posted(ctx, ready(ctx, 0)?)
}

/// The driver resets `old` (its receive buffers posted, the device
/// waiting for frames), then checks that no old buffer is written after
/// Status reads 0 while a fresh device passes frames.
fn reset_with_rx_posted(ctx: &mut Ctx, old: Net) -> R {
    sleep_ms(20);
    old.dev.reset()?;
    let used = old.rx.used_idx();
    let mut bufs = [(0u64, 0u32); NBUFS as usize];
    for (i, b) in bufs.iter_mut().enumerate() {
        let d = old.rx.desc_addr(i as u16);
        *b = (mem::r64(d), mem::r32(d + 8));
        mem::fill(b.0, 0xee, b.1 as usize);
    }
    let mut n = Net::polite(ctx.net(), 0)?;
    n.post_plain();
    n.round_trip(56, Layout::Split)
        .map_err(what("the first frame after the reset"))?;
    good_ping(&mut n, &[])?;
    ensure!(
        old.rx.used_idx() == used,
        "old RX used index moved after the reset"
    );
    for (i, &(a, l)) in bufs.iter().enumerate() {
        if let Some(off) = (0..l as u64).find(|&o| mem::r8(a + o) != 0xee) {
            fail!("old RX buffer {i} written at byte {off} after the reset");
        }
    }
    Ok(())
}

/// Receive buffers that each hold a whole frame (2048 bytes; no MRG_RXBUF
/// and no guest GSO, so no frame is longer than 1514 bytes): ringvm
/// publishes such buffers to the host kernel ahead of the frames (io_uring
/// provided buffers, one multishot tap read; the host test checks its
/// metrics counted these frames). Round trips of every size, more than
/// there are buffers, so each is posted again; then a reset while they
/// are published to the kernel.
pub fn provided_buffers(ctx: &mut Ctx) -> R {
    const WHOLE_FRAME_BUF: u32 = 2048;
    let mut n = Net::polite(ctx.net(), 0)?;
    n.post_chains(0, NBUFS, &[WHOLE_FRAME_BUF]);
    n.peer_mac()?;
    for round in 0..3 {
        for payload in [56usize, 0, 1, 1472, 700, 1472, 56, 1000] {
            let f = n
                .round_trip(payload, Layout::Split)
                .map_err(what("round trip"))?;
            let want = 14 + 28 + payload;
            ensure!(
                f.len == want,
                "round {round}: frame of {} bytes, expected {want}",
                f.len
            );
            ensure!(
                f.num_buffers == 1 && f.chains == 1,
                "round {round}: num_buffers {}",
                f.num_buffers
            );
        }
    }
    reset_with_rx_posted(ctx, n)
}

/// Frames racing a reset (VIRTIO 1.2 §2.4.1): with receive buffers posted
/// and tap reads parked, a batch of 8 echo requests goes out in one kick
/// and the driver resets while their replies come in (at once after the
/// kick, after the first reply, after the fourth: 3 rounds). Whatever
/// lands before Status reads 0 is fine; the moment it reads 0 the driver
/// marks the first word of every old receive buffer (where a frame's
/// header lands), fills the rest of each and the old used ring, and
/// checks InterruptStatus is 0. Then, with frames flowing again (a fresh
/// device on new rings pings twice; late replies to the raced pings are
/// skipped), every mark must still be intact.
pub fn reset_rx_race(ctx: &mut Ctx) -> R {
    const PINGS: u16 = 8;
    let used_len = 6 + 8 * usize::from(QSIZE);
    for (round, after) in [0u16, 1, 4].into_iter().enumerate() {
        let mut n = ready(ctx, 0)?;
        let mut bufs = [(0u64, 0usize); NBUFS as usize];
        for (i, b) in bufs.iter_mut().enumerate() {
            let d = n.rx.desc_addr(i as u16);
            *b = (mem::r64(d), mem::r32(d + 8) as usize);
        }
        for k in 0..PINGS {
            let p = n.echo_request(next_seq(), 56)?;
            let head = n.tx.chain(
                2 * k,
                &[(p.base, HDR_LEN as u32, 0), (p.base + 12, p.len as u32, 0)],
            );
            n.tx.publish(head);
        }
        n.dev.notify(TXQ);
        if after > 0 {
            let dl = crate::time::Deadline::after_ms(WAIT_MS);
            while n.rx.used_idx() < after && !dl.passed() {}
        }
        n.dev.w(STATUS, 0);
        let dl = crate::time::Deadline::after_ms(1000);
        while n.dev.status() != 0 {
            ensure!(
                !dl.passed(),
                "round {round}: Status never read 0 after the reset"
            );
        }
        // Status reads 0: the buffers are the driver's again.
        for (i, &(a, _)) in bufs.iter().enumerate() {
            mem::w64(a, race_mark(round, i));
        }
        for (i, &(a, l)) in bufs.iter().enumerate() {
            mem::fill(a + 8, race_byte(round, i), l - 8);
        }
        let got = n.rx.used_idx();
        let seed = 0x7261_6365 + round as u64;
        mem::pattern(n.rx.used, used_len, seed);
        let isr = n.dev.r(INTERRUPT_STATUS);
        ensure!(
            isr == 0,
            "round {round}: InterruptStatus {isr:#x} after Status read 0"
        );
        crate::note!("reset_rx_race round {round}: {got} frames received when Status read 0");
        let mut fresh = Net::polite(ctx.net(), 0)?;
        fresh.post_plain();
        let pinged = good_ping(&mut fresh, &[]).and_then(|()| good_ping(&mut fresh, &[]));
        // A frame in an old buffer explains a lost reply: report it first.
        if let Some(w) = race_marks_changed(&bufs, n.rx.used, round, seed) {
            fail!("round {round}: {} written after Status read 0", w.as_str());
        }
        pinged.map_err(what("the device after the reset"))?;
    }
    Ok(())
}

/// Which part of round `round`'s old RX queue (buffers `bufs`, used ring
/// at `used` holding `pattern(seed)`) no longer holds its marks.
fn race_marks_changed(bufs: &[(u64, usize)], used: u64, round: usize, seed: u64) -> Option<Msg> {
    for (i, &(a, l)) in bufs.iter().enumerate() {
        let first = mem::r64(a);
        if first != race_mark(round, i) {
            return Some(Msg::new(format_args!(
                "old RX buffer {i} (first word {first:#x})"
            )));
        }
        if let Some(off) = mem::check_fill(a + 8, race_byte(round, i), l - 8) {
            return Some(Msg::new(format_args!(
                "old RX buffer {i} (at byte {})",
                off + 8
            )));
        }
    }
    mem::check_pattern(used, 6 + 8 * usize::from(QSIZE), seed)
        .map(|off| Msg::new(format_args!("old RX used ring (at byte {off})")))
}

/// The first word of RX buffer `i` in round `round`, after a reset.
fn race_mark(round: usize, i: usize) -> u64 {
    0x6d61_726b_0000_0000 | (round as u64) << 8 | i as u64
}

/// The byte the rest of RX buffer `i` is filled with in round `round`.
fn race_byte(round: usize, i: usize) -> u8 {
    0xa0 ^ (round as u8) << 4 ^ i as u8
}

// ---- hostile ----------------------------------------------------------

/// Publishes the TX chain `parts` (descriptors 0..), expects it back with
/// used len 0 or NEEDS_RESET (then brings the device up again).
fn tx_refused(n: &mut Net, parts: &[Part], w: &'static str) -> R {
    let head = n.tx.chain(0, parts);
    tx_head_refused(n, head, w)
}

fn tx_head_refused(n: &mut Net, head: u16, w: &'static str) -> R {
    n.tx.publish(head);
    n.dev.notify(TXQ);
    match n.tx.wait(&n.dev, WAIT_MS) {
        Wait::Used { id, len } => {
            ensure!(
                id == u32::from(head) && len == 0,
                "{w}: used id {id} len {len}, expected head {head} len 0"
            );
        }
        Wait::NeedsReset => {
            *n = Net::up(n.dev, n.features).map_err(what(w))?;
            n.post_plain();
        }
        Wait::Timeout => fail!("{w}: the chain was never returned"),
    }
    Ok(())
}

/// Device-writable descriptors in TX chains: returned unsent, unwritten.
pub fn hostile_tx_writable(ctx: &mut Ctx) -> R {
    let mut n = ready(ctx, 0)?;
    let mut sent = [0u16; 2];
    for (k, flags) in [(0, [0, D_WRITE]), (1, [D_WRITE, 0])] {
        let seq = next_seq();
        sent[k] = seq;
        let p = n.echo_request(seq, 56)?;
        let copy = mem::alloc(HDR_LEN + p.len, 64);
        // SAFETY: two arena ranges of that length.
        unsafe {
            core::ptr::copy_nonoverlapping(p.base as *const u8, copy as *mut u8, HDR_LEN + p.len)
        };
        tx_refused(
            &mut n,
            &[
                (p.base, HDR_LEN as u32, flags[0]),
                (p.base + 12, p.len as u32, flags[1]),
            ],
            if k == 0 {
                "writable frame"
            } else {
                "writable header"
            },
        )?;
        for i in 0..(HDR_LEN + p.len) as u64 {
            ensure!(
                mem::r8(p.base + i) == mem::r8(copy + i),
                "the device wrote byte {i} of a TX chain"
            );
        }
    }
    good_ping(&mut n, &sent)
}

/// Zero-length descriptors: an empty header, an empty piece in the middle
/// of a frame, a chain of one empty descriptor.
pub fn hostile_tx_zero_len(ctx: &mut Ctx) -> R {
    let mut n = ready(ctx, 0)?;
    let p = n.echo_request(next_seq(), 56)?;
    let (b, l) = (p.base, p.len as u32);
    tx_refused(
        &mut n,
        &[(b, 0, 0), (b, 12, 0), (b + 12, l, 0)],
        "empty first",
    )?;
    good_ping(&mut n, &[])?;
    let p = n.echo_request(next_seq(), 56)?;
    let (b, l) = (p.base, p.len as u32);
    tx_refused(
        &mut n,
        &[(b, 12, 0), (b + 12, 0, 0), (b + 12, l, 0)],
        "empty middle",
    )?;
    good_ping(&mut n, &[])?;
    tx_refused(&mut n, &[(b, 0, 0)], "one empty descriptor")?;
    good_ping(&mut n, &[])
}

/// Header or frame outside RAM, straddling its end, in the MMIO hole,
/// wrapping around 2^64: returned unsent.
pub fn hostile_tx_outside_ram(ctx: &mut Ctx) -> R {
    let mut n = ready(ctx, 0)?;
    let (end, low) = (ctx.ram_end, ctx.low_ram_end);
    let mut sent = [0u16; 7];
    let cases: [(&'static str, u64, u64); 7] = [
        ("header past RAM", end, 0),
        ("frame past RAM", 0, end),
        ("frame at 2^48", 0, 1 << 48),
        ("frame straddling the end of low RAM", 0, low - 32),
        ("frame in the device's registers", 0, ctx.net().base),
        ("frame at the LAPIC", 0, 0xfee0_0000),
        ("frame wrapping 2^64", 0, u64::MAX - 31),
    ];
    for (k, &(w, hdr_at, frame_at)) in cases.iter().enumerate() {
        let seq = next_seq();
        sent[k] = seq;
        let p = n.echo_request(seq, 56)?;
        let h = if hdr_at != 0 { hdr_at } else { p.base };
        let f = if frame_at != 0 { frame_at } else { p.base + 12 };
        tx_refused(&mut n, &[(h, 12, 0), (f, p.len as u32, 0)], w)?;
        good_ping(&mut n, &sent[..=k]).map_err(what(w))?;
    }
    Ok(())
}

/// Chains too short for a header and an Ethernet header, and too long
/// for any frame (90000 bytes, 4 GiB): returned unsent.
pub fn hostile_tx_size(ctx: &mut Ctx) -> R {
    let mut n = ready(ctx, 0)?;
    let seq = next_seq();
    let p = n.echo_request(seq, 56)?;
    let b = p.base;
    tx_refused(&mut n, &[(b, 12, 0)], "header only")?;
    tx_refused(&mut n, &[(b, 12, 0), (b + 12, 13, 0)], "25 bytes")?;
    good_ping(&mut n, &[])?;
    let big = mem::alloc(30000, 64);
    // SAFETY: arena ranges; the request fits in the 30000 bytes.
    unsafe { core::ptr::copy_nonoverlapping(b as *const u8, big as *mut u8, HDR_LEN + p.len) };
    tx_refused(
        &mut n,
        &[(big, 30000, 0), (big, 30000, 0), (big, 30000, 0)],
        "90000 bytes",
    )?;
    tx_refused(&mut n, &[(big, 12, 0), (big + 12, u32::MAX, 0)], "4 GiB")?;
    good_ping(&mut n, &[seq])
}

/// Broken chains: a loop, `next` outside the table, a head outside the
/// queue.
pub fn hostile_tx_broken(ctx: &mut Ctx) -> R {
    let mut n = ready(ctx, 0)?;
    let seq = next_seq();
    let p = n.echo_request(seq, 56)?;
    let (b, l) = (p.base, p.len as u32);
    n.tx.set_desc(0, b, 12, D_NEXT, 1);
    n.tx.set_desc(1, b + 12, l, D_NEXT, 0);
    tx_head_refused(&mut n, 0, "loop 0→1→0")?;
    good_ping(&mut n, &[seq])?;
    n.tx.set_desc(0, b, 12, D_NEXT, QSIZE);
    tx_head_refused(&mut n, 0, "next = queue size")?;
    good_ping(&mut n, &[seq])?;
    n.tx.put(n.tx.avail_idx, 300);
    n.tx.set_avail_idx(n.tx.avail_idx.wrapping_add(1));
    n.dev.notify(TXQ);
    match n.tx.wait(&n.dev, WAIT_MS) {
        Wait::NeedsReset => {
            n = Net::up(n.dev, n.features)?;
            n.post_plain();
        }
        Wait::Used { id, len } => ensure!(
            id == 300 && len == 0,
            "TX head 300 of {QSIZE} came back as id {id} len {len}"
        ),
        Wait::Timeout => fail!("neither NEEDS_RESET nor a used entry for TX head 300"),
    }
    good_ping(&mut n, &[seq])
}

/// Bad receive chains posted before good buffers: a device-readable one
/// (must stay untouched), one shorter than the header, one outside RAM,
/// an empty one, readable after writable. Each must come back with used
/// len 0 (or NEEDS_RESET) and the next frame land in a good buffer.
pub fn hostile_rx(ctx: &mut Ctx) -> R {
    let _ = ready(ctx, 0)?;
    let end = ctx.ram_end;
    for k in 0..5 {
        let mut n = Net::polite(ctx.net(), 0)?;
        let buf = mem::alloc(2048, 64);
        mem::fill(buf, 0x5a, 2048);
        const H: u16 = 20;
        let w: &'static str = match k {
            0 => {
                n.rx.set_desc(H, buf, BUF_LEN, 0, 0);
                "device-readable buffer"
            }
            1 => {
                n.rx.set_desc(H, buf, 8, D_WRITE, 0);
                "8-byte buffer"
            }
            2 => {
                n.rx.set_desc(H, end, BUF_LEN, D_WRITE, 0);
                "buffer past RAM"
            }
            3 => {
                n.rx.set_desc(H, buf, 0, D_WRITE, 0);
                "empty buffer"
            }
            _ => {
                n.rx.set_desc(H, buf, 12, D_WRITE | D_NEXT, H + 1);
                n.rx.set_desc(H + 1, buf + 12, 1514, 0, 0);
                "readable after writable"
            }
        };
        n.rx.publish(H);
        n.post_plain();
        match n.rx.wait(&n.dev, WAIT_MS) {
            Wait::Used { id, len } => ensure!(
                id == u32::from(H) && len == 0,
                "{w}: used id {id} len {len}, expected chain {H} back with len 0"
            ),
            Wait::NeedsReset => {
                n = Net::up(n.dev, n.features).map_err(what(w))?;
                n.post_plain();
            }
            Wait::Timeout => fail!("{w}: the chain was never returned"),
        }
        good_ping(&mut n, &[]).map_err(what(w))?;
        // A refused chain is not written (the writable 12 bytes in front
        // of case 4 aside).
        let from = if k == 4 { 12 } else { 0 };
        if let Some(off) = (from..2048u64).find(|&o| mem::r8(buf + o) != 0x5a) {
            fail!("{w}: the device wrote byte {off} of a refused chain");
        }
    }
    Ok(())
}
