//! virtio-blk requests (VIRTIO 1.2 §5.2.6), politely.

use super::Ctx;
use crate::blk::*;
use crate::mem::{self, r8};
use crate::msg::{Msg, R};
use crate::virtio::*;
use crate::{ensure, fail};

/// Sectors case `tag` may scribble on (64 of them), away from the scratch
/// sectors of `good_io`.
fn data_sector(tag: u64) -> u64 {
    16384 + tag * 64
}

fn need_capacity(d: &Dev, sectors: u64) -> Result<u64, Msg> {
    let cap = capacity(d)?;
    ensure!(
        cap >= sectors,
        "disk has {cap} sectors; vtest needs at least {sectors} (16 MiB)"
    );
    Ok(cap)
}

fn up(ctx: &Ctx, size: u16) -> Result<(Dev, Vq), Msg> {
    let d = ctx.rw();
    let vq = d.up(polite_features(&d), size)?;
    need_capacity(&d, 32768)?;
    Ok((d, vq))
}

/// 4 KiB written and read back; used lengths 1 and 4097.
pub fn write_read(ctx: &mut Ctx) -> R {
    let (d, mut vq) = up(ctx, 16)?;
    let sector = data_sector(ctx.tag);
    let buf = mem::alloc(4096, 4096);
    mem::pattern(buf, 4096, 0xa11ce);
    let len = request_ok(&d, &mut vq, T_OUT, sector, Data::Out(buf, 4096))?;
    ensure!(
        len == 1,
        "write: used len {len}, expected 1 (the status byte)"
    );
    let back = mem::alloc(4096, 4096);
    let len = request_ok(&d, &mut vq, T_IN, sector, Data::In(back, 4096))?;
    ensure!(len == 4097, "read: used len {len}, expected 4097");
    if let Some(off) = mem::check_pattern(back, 4096, 0xa11ce) {
        fail!("read back differs at byte {off}");
    }
    // A different offset must not alias the first.
    let other = mem::alloc(512, 512);
    mem::fill(other, 0xee, 512);
    request_ok(&d, &mut vq, T_IN, sector + 8, Data::In(other, 512))?;
    let b = r8(other);
    ensure!(
        b != 0xee,
        "read of sector {} left the buffer untouched",
        sector + 8
    );
    Ok(())
}

/// Scattered data: four 512-byte write segments in reverse address order,
/// read back through two 1 KiB segments.
pub fn segments(ctx: &mut Ctx) -> R {
    let (d, mut vq) = up(ctx, 16)?;
    let sector = data_sector(ctx.tag);
    let src = mem::alloc(4096, 4096);
    mem::pattern(src, 2048, 0x5e6);
    // Segment i of the request is bytes i*512.. of the pattern, placed at
    // descending addresses to make sure order follows the chain.
    let scattered = mem::alloc(4096, 4096);
    for i in 0..4u64 {
        for w in 0..64u64 {
            let v = mem::r64(src + i * 512 + w * 8);
            mem::w64(scattered + (3 - i) * 1024 + w * 8, v);
        }
    }
    let h = header(T_OUT, sector);
    let s = status_byte();
    let head = vq.chain(
        0,
        &[
            (h, 16, 0),
            (scattered + 3 * 1024, 512, 0),
            (scattered + 2 * 1024, 512, 0),
            (scattered + 1024, 512, 0),
            (scattered, 512, 0),
            (s, 1, D_WRITE),
        ],
    );
    vq.publish(head);
    d.notify(0);
    let (_, st) = answer(&d, &mut vq, Sent { head, status: s })?;
    ensure!(st == S_OK, "4-segment write: status {st}");
    let back = mem::alloc(2048, 512);
    let back2 = mem::alloc(1024, 512);
    let h = header(T_IN, sector);
    let s = status_byte();
    let head = vq.chain(
        0,
        &[
            (h, 16, 0),
            (back, 1024, D_WRITE),
            (back2, 1024, D_WRITE),
            (s, 1, D_WRITE),
        ],
    );
    vq.publish(head);
    d.notify(0);
    let (len, st) = answer(&d, &mut vq, Sent { head, status: s })?;
    ensure!(st == S_OK, "2-segment read: status {st}");
    ensure!(len == 2049, "2-segment read: used len {len}");
    for w in 0..128u64 {
        ensure!(
            mem::r64(back + w * 8) == mem::r64(src + w * 8),
            "first read segment differs at byte {}",
            w * 8
        );
        ensure!(
            mem::r64(back2 + w * 8) == mem::r64(src + 1024 + w * 8),
            "second read segment differs at byte {}",
            w * 8
        );
    }
    Ok(())
}

/// Framing is free (VIRTIO 1.2 §2.6.4): the header shares a descriptor
/// with the data, and the status byte shares one with read data.
pub fn shared_descriptors(ctx: &mut Ctx) -> R {
    let (d, mut vq) = up(ctx, 16)?;
    let sector = data_sector(ctx.tag);
    let req = mem::alloc(16 + 512, 16);
    mem::w32(req, T_OUT);
    mem::w64(req + 8, sector);
    mem::pattern(req + 16, 512, 0x5a4ed);
    let s = status_byte();
    let head = vq.chain(0, &[(req, 528, 0), (s, 1, D_WRITE)]);
    vq.publish(head);
    d.notify(0);
    let (_, st) = answer(&d, &mut vq, Sent { head, status: s })?;
    ensure!(st == S_OK, "header+data in one descriptor: status {st}");
    let h = header(T_IN, sector);
    let back = mem::alloc(520, 8);
    mem::w8(back + 512, SENTINEL);
    let head = vq.chain(0, &[(h, 16, 0), (back, 513, D_WRITE)]);
    vq.publish(head);
    d.notify(0);
    let (len, st) = answer(
        &d,
        &mut vq,
        Sent {
            head,
            status: back + 512,
        },
    )?;
    ensure!(st == S_OK, "data+status in one descriptor: status {st}");
    ensure!(len == 513, "data+status in one descriptor: used len {len}");
    if let Some(off) = mem::check_pattern(back, 512, 0x5a4ed) {
        fail!("data+status in one descriptor: data differs at byte {off}");
    }
    Ok(())
}

/// FLUSH is OK when the drive offers it, UNSUPP when it does not.
pub fn flush(ctx: &mut Ctx) -> R {
    let (d, mut vq) = up(ctx, 16)?;
    let buf = mem::alloc(512, 512);
    mem::pattern(buf, 512, 3);
    request_ok(
        &d,
        &mut vq,
        T_OUT,
        data_sector(ctx.tag),
        Data::Out(buf, 512),
    )?;
    let (len, st) = request(&d, &mut vq, T_FLUSH, 0, Data::None)?;
    let offered = d.offered & F_FLUSH != 0;
    let want = if offered { S_OK } else { S_UNSUPP };
    ensure!(
        st == want,
        "flush: status {st}, expected {want} (FLUSH offered: {offered})"
    );
    ensure!(len == 1, "flush: used len {len}");
    good_io(&d, &mut vq, ctx.tag)
}

/// GET_ID fills 20 bytes: an ASCII serial, NUL-padded.
pub fn get_id(ctx: &mut Ctx) -> R {
    let (d, mut vq) = up(ctx, 16)?;
    let buf = mem::alloc(20, 8);
    mem::fill(buf, 0xff, 20);
    let len = request_ok(&d, &mut vq, T_GET_ID, 0, Data::In(buf, 20))?;
    ensure!((2..=21).contains(&len), "used len {len}");
    let mut end = 20;
    for i in 0..20 {
        let b = r8(buf + i);
        if b == 0 {
            end = i;
            break;
        }
        ensure!(
            (0x20..0x7f).contains(&b),
            "serial byte {i} is {b:#x}, not printable ASCII"
        );
    }
    ensure!(end > 0, "empty serial");
    for i in end..20 {
        let b = r8(buf + i);
        ensure!(b == 0, "serial not NUL-padded: byte {i} is {b:#x}");
    }
    Ok(())
}

/// A read-only drive offers RO, serves reads and flushes, and refuses
/// writes, discards and write-zeroes, whether or not RO was negotiated.
pub fn read_only(ctx: &mut Ctx) -> R {
    let d = ctx.ro();
    ensure!(d.offered & F_RO != 0, "RO not offered");
    let before = mem::alloc(512, 512);
    for (round, feats) in [polite_features(&d), polite_features(&d) & !F_RO]
        .into_iter()
        .enumerate()
    {
        let mut vq = d.up(feats, 16)?;
        request_ok(&d, &mut vq, T_IN, 8, Data::In(before, 512))?;
        let buf = mem::alloc(512, 512);
        mem::pattern(buf, 512, 9);
        let (_, st) = request(&d, &mut vq, T_OUT, 8, Data::Out(buf, 512))?;
        ensure!(
            st != S_OK,
            "round {round}: write accepted on a read-only drive"
        );
        ensure!(
            st == S_IOERR,
            "round {round}: write refused with status {st}, expected IOERR"
        );
        for kind in [T_DISCARD, T_WRITE_ZEROES] {
            let r = range(8, 8, 0);
            let (_, st) = request(&d, &mut vq, kind, 0, Data::Out(r, 16))?;
            ensure!(
                st != S_OK,
                "round {round}: type {kind} accepted on a read-only drive"
            );
        }
        if d.offered & F_FLUSH != 0 {
            request_ok(&d, &mut vq, T_FLUSH, 0, Data::None)?;
        }
        let after = mem::alloc(512, 512);
        request_ok(&d, &mut vq, T_IN, 8, Data::In(after, 512))?;
        for w in 0..64 {
            ensure!(
                mem::r64(after + w * 8) == mem::r64(before + w * 8),
                "round {round}: sector 8 changed on a read-only drive"
            );
        }
    }
    Ok(())
}

/// DISCARD of an aligned range is accepted (OK, or UNSUPP when the host
/// file cannot punch holes).
pub fn discard(ctx: &mut Ctx) -> R {
    let (d, mut vq) = up(ctx, 16)?;
    ensure!(d.offered & F_DISCARD != 0, "DISCARD not offered");
    let sector = data_sector(ctx.tag);
    let buf = mem::alloc(4096, 4096);
    mem::pattern(buf, 4096, 11);
    request_ok(&d, &mut vq, T_OUT, sector, Data::Out(buf, 4096))?;
    let r = range(sector, 8, 0);
    let (len, st) = request(&d, &mut vq, T_DISCARD, 0, Data::Out(r, 16))?;
    ensure!(st == S_OK || st == S_UNSUPP, "discard: status {st}");
    ensure!(len == 1, "discard: used len {len}");
    good_io(&d, &mut vq, ctx.tag)
}

/// WRITE_ZEROES, with and without the unmap flag, reads back as zeroes.
pub fn write_zeroes(ctx: &mut Ctx) -> R {
    let (d, mut vq) = up(ctx, 16)?;
    ensure!(d.offered & F_WRITE_ZEROES != 0, "WRITE_ZEROES not offered");
    let sector = data_sector(ctx.tag);
    for flags in [0, WZ_UNMAP] {
        let buf = mem::alloc(4096, 4096);
        mem::pattern(buf, 4096, 13);
        request_ok(&d, &mut vq, T_OUT, sector, Data::Out(buf, 4096))?;
        let r = range(sector + 1, 6, flags);
        let (_, st) = request(&d, &mut vq, T_WRITE_ZEROES, 0, Data::Out(r, 16))?;
        ensure!(st == S_OK, "write-zeroes (flags {flags}): status {st}");
        let back = mem::alloc(4096, 4096);
        request_ok(&d, &mut vq, T_IN, sector, Data::In(back, 4096))?;
        if let Some(off) = mem::check_zero(back + 512, 3072) {
            fail!("write-zeroes (flags {flags}): byte {} not zero", 512 + off);
        }
        if let Some(off) = mem::check_pattern(back, 512, 13) {
            fail!("write-zeroes (flags {flags}): the sector before changed at {off}");
        }
        ensure!(
            mem::r64(back + 3584) == mem::r64(buf + 3584),
            "write-zeroes (flags {flags}): the sector after changed"
        );
    }
    Ok(())
}

/// Discard and write-zeroes limits: the unmap flag on a discard and
/// unknown flags are UNSUPP; two segments (max 1), zero sectors and a
/// range past max_discard_sectors are refused.
pub fn discard_limits(ctx: &mut Ctx) -> R {
    let (d, mut vq) = up(ctx, 16)?;
    let sector = data_sector(ctx.tag);
    let r = range(sector, 8, WZ_UNMAP);
    let (_, st) = request(&d, &mut vq, T_DISCARD, 0, Data::Out(r, 16))?;
    ensure!(
        st == S_UNSUPP,
        "discard with the unmap flag: status {st}, spec says UNSUPP"
    );
    let r = range(sector, 8, 0x80);
    let (_, st) = request(&d, &mut vq, T_WRITE_ZEROES, 0, Data::Out(r, 16))?;
    ensure!(
        st == S_UNSUPP || st == S_IOERR,
        "write-zeroes with flag 0x80: status {st}"
    );
    let two = mem::alloc(32, 16);
    for i in 0..2u64 {
        mem::w64(two + 16 * i, sector + 8 * i);
        mem::w32(two + 16 * i + 8, 8);
    }
    let (_, st) = request(&d, &mut vq, T_DISCARD, 0, Data::Out(two, 32))?;
    ensure!(
        st != S_OK,
        "discard with 2 segments (max_discard_seg 1) accepted"
    );
    let r = range(sector, 0, 0);
    let (_, st) = request(&d, &mut vq, T_WRITE_ZEROES, 0, Data::Out(r, 16))?;
    ensure!(st != S_OK, "write-zeroes of 0 sectors accepted");
    let r = range(0, u32::MAX, 0);
    let (_, st) = request(&d, &mut vq, T_DISCARD, 0, Data::Out(r, 16))?;
    ensure!(st != S_OK, "discard of 2^32-1 sectors accepted");
    let short = range(sector, 8, 0);
    let (_, st) = request(&d, &mut vq, T_DISCARD, 0, Data::Out(short, 8))?;
    ensure!(st != S_OK, "discard with an 8-byte range accepted");
    good_io(&d, &mut vq, ctx.tag)
}

/// Requests at and past the end of the disk.
pub fn past_end(ctx: &mut Ctx) -> R {
    let (d, mut vq) = up(ctx, 16)?;
    let cap = capacity(&d)?;
    let buf = mem::alloc(1024, 512);
    request_ok(&d, &mut vq, T_IN, cap - 1, Data::In(buf, 512))
        .map_err(|e| Msg::new(format_args!("last sector: {}", e.as_str())))?;
    request_ok(&d, &mut vq, T_OUT, cap - 1, Data::Out(buf, 512))
        .map_err(|e| Msg::new(format_args!("last sector: {}", e.as_str())))?;
    let bad: [(&str, u32, u64, Data); 7] = [
        ("read at capacity", T_IN, cap, Data::In(buf, 512)),
        ("read across the end", T_IN, cap - 1, Data::In(buf, 1024)),
        ("write at capacity", T_OUT, cap, Data::Out(buf, 512)),
        ("read at sector 2^64-1", T_IN, u64::MAX, Data::In(buf, 512)),
        (
            "read at sector 2^55 (byte offset overflows)",
            T_IN,
            1 << 55,
            Data::In(buf, 512),
        ),
        (
            "discard past the end",
            T_DISCARD,
            0,
            Data::Out(range(cap - 4, 8, 0), 16),
        ),
        (
            "write-zeroes past the end",
            T_WRITE_ZEROES,
            0,
            Data::Out(range(cap, 1, 0), 16),
        ),
    ];
    for (what, kind, sector, data) in bad {
        let (len, st) = request(&d, &mut vq, kind, sector, data)?;
        ensure!(st == S_IOERR, "{what}: status {st}, expected IOERR");
        ensure!(len <= 1, "{what}: used len {len} for a failed request");
    }
    good_io(&d, &mut vq, ctx.tag)
}

/// An unknown request type is UNSUPP.
pub fn unsupported(ctx: &mut Ctx) -> R {
    let (d, mut vq) = up(ctx, 16)?;
    for kind in [0x77, 3, 0x8000_0000] {
        let (_, st) = request(&d, &mut vq, kind, 0, Data::None)?;
        ensure!(
            st == S_UNSUPP,
            "type {kind:#x}: status {st}, expected UNSUPP"
        );
    }
    good_io(&d, &mut vq, ctx.tag)
}

const IN_FLIGHT: u16 = 64;

/// 64 writes, then 64 reads, published in a shuffled head order with one
/// notification each batch; completions are matched by id, in any order.
pub fn in_flight(ctx: &mut Ctx) -> R {
    let (d, mut vq) = up(ctx, 256)?;
    let base = data_sector(ctx.tag);
    let bufs = mem::alloc(usize::from(IN_FLIGHT) * 512, 4096);
    for write in [true, false] {
        let mut sent = [Sent { head: 0, status: 0 }; IN_FLIGHT as usize];
        for k in 0..IN_FLIGHT {
            let i = (k * 37) % IN_FLIGHT; // a permutation of 0..64
            let buf = bufs + u64::from(i) * 512;
            let data = if write {
                mem::pattern(buf, 512, 1000 + u64::from(i));
                Data::Out(buf, 512)
            } else {
                mem::fill(buf, 0, 512);
                Data::In(buf, 512)
            };
            let kind = if write { T_OUT } else { T_IN };
            sent[usize::from(i)] = queue_simple(&mut vq, i * 3, kind, base + u64::from(i), data);
        }
        d.notify(0);
        let mut done = [false; IN_FLIGHT as usize];
        for n in 0..IN_FLIGHT {
            match vq.wait(&d, WAIT_MS) {
                Wait::Used { id, len } => {
                    ensure!(
                        id % 3 == 0 && id < 3 * u32::from(IN_FLIGHT),
                        "used id {id} was never a head"
                    );
                    let i = (id / 3) as usize;
                    ensure!(!done[i], "head {id} used twice");
                    done[i] = true;
                    let st = r8(sent[i].status);
                    ensure!(st == S_OK, "request {i}: status {st}");
                    let want = if write { 1 } else { 513 };
                    ensure!(len == want, "request {i}: used len {len}, expected {want}");
                }
                other => fail!("{} of {IN_FLIGHT} answered, then {other:?}", n),
            }
        }
        if !write {
            for i in 0..IN_FLIGHT {
                if let Some(off) =
                    mem::check_pattern(bufs + u64::from(i) * 512, 512, 1000 + u64::from(i))
                {
                    fail!(
                        "sector {}: read back differs at byte {off}",
                        base + u64::from(i)
                    );
                }
            }
        }
    }
    Ok(())
}

/// The largest request the device advertises: seg_max segments.
pub fn max_segments(ctx: &mut Ctx) -> R {
    let (d, mut vq) = up(ctx, 256)?;
    ensure!(d.offered & F_SEG_MAX != 0, "SEG_MAX not offered");
    let seg_max = d.cfg32(CFG_SEG_MAX).min(254) as u16;
    let sector = data_sector(ctx.tag);
    let buf = mem::alloc(usize::from(seg_max) * 512, 4096);
    mem::pattern(buf, usize::from(seg_max) * 512, 0x5e9);
    let h = header(T_OUT, sector);
    let s = status_byte();
    vq.set_desc(0, h, 16, D_NEXT, 1);
    for i in 0..seg_max {
        vq.set_desc(1 + i, buf + u64::from(i) * 512, 512, D_NEXT, 2 + i);
    }
    vq.set_desc(1 + seg_max, s, 1, D_WRITE, 0);
    vq.publish(0);
    d.notify(0);
    let (_, st) = answer(&d, &mut vq, Sent { head: 0, status: s })?;
    ensure!(st == S_OK, "write of {seg_max} segments: status {st}");
    let back = mem::alloc(usize::from(seg_max) * 512, 4096);
    request_ok(
        &d,
        &mut vq,
        T_IN,
        sector,
        Data::In(back, u32::from(seg_max) * 512),
    )?;
    if let Some(off) = mem::check_pattern(back, usize::from(seg_max) * 512, 0x5e9) {
        fail!("read back of the {seg_max}-segment write differs at byte {off}");
    }
    Ok(())
}
