//! virtio-blk requests built by hand, and the checks every case shares:
//! "the device refused this" and "the device still serves a good request".

use crate::mem::{self, r8, w32, w64, w8};
use crate::msg::{Msg, R};
use crate::virtio::{Dev, Vq, Wait, D_NEXT, D_WRITE, F_VERSION_1, WAIT_MS};
use crate::{ensure, fail};

pub const DEVICE_ID: u32 = 2; // virtio-blk

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Written into status bytes before submission: a device that never
/// answered leaves it.
pub const SENTINEL: u8 = 0xaa;

pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

pub const CFG_CAPACITY: u64 = 0;
pub const CFG_SIZE_MAX: u64 = 8;
pub const CFG_SEG_MAX: u64 = 12;
pub const CFG_BLK_SIZE: u64 = 20;

pub const WZ_UNMAP: u32 = 1;

/// The block features a polite driver accepts when offered.
pub fn polite_features(dev: &Dev) -> u64 {
    F_VERSION_1
        | (dev.offered
            & (F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES))
}

/// A 16-byte request header in fresh memory.
pub fn header(kind: u32, sector: u64) -> u64 {
    let h = mem::alloc(16, 16);
    w32(h, kind);
    w32(h + 4, 0);
    w64(h + 8, sector);
    h
}

/// A status byte preset to [`SENTINEL`].
pub fn status_byte() -> u64 {
    let s = mem::alloc(1, 8);
    w8(s, SENTINEL);
    s
}

/// One discard / write-zeroes range segment.
pub fn range(sector: u64, sectors: u32, flags: u32) -> u64 {
    let r = mem::alloc(16, 16);
    w64(r, sector);
    w32(r + 8, sectors);
    w32(r + 12, flags);
    r
}

/// Where a request's data goes or comes from.
#[derive(Clone, Copy)]
pub enum Data {
    None,
    /// Device reads it (OUT, discard ranges).
    Out(u64, u32),
    /// Device writes it (IN, GET_ID).
    In(u64, u32),
}

/// A submitted request: its head descriptor and status byte.
#[derive(Clone, Copy)]
pub struct Sent {
    pub head: u16,
    pub status: u64,
}

/// Writes header / data / status into descriptors `first..first+3` and
/// publishes the chain (no notify).
pub fn queue_simple(vq: &mut Vq, first: u16, kind: u32, sector: u64, data: Data) -> Sent {
    let sent = build_simple(vq, first, kind, sector, data);
    vq.publish(first);
    sent
}

/// Writes header / data / status into descriptors `first..first+3`
/// without publishing them.
pub fn build_simple(vq: &Vq, first: u16, kind: u32, sector: u64, data: Data) -> Sent {
    let h = header(kind, sector);
    let s = status_byte();
    let d1 = first + 1;
    match data {
        Data::None => {
            vq.set_desc(first, h, 16, D_NEXT, d1);
            vq.set_desc(d1, s, 1, D_WRITE, 0);
        }
        Data::Out(a, l) => {
            vq.set_desc(first, h, 16, D_NEXT, d1);
            vq.set_desc(d1, a, l, D_NEXT, d1 + 1);
            vq.set_desc(d1 + 1, s, 1, D_WRITE, 0);
        }
        Data::In(a, l) => {
            vq.set_desc(first, h, 16, D_NEXT, d1);
            vq.set_desc(d1, a, l, D_NEXT | D_WRITE, d1 + 1);
            vq.set_desc(d1 + 1, s, 1, D_WRITE, 0);
        }
    }
    Sent {
        head: first,
        status: s,
    }
}

/// Waits for the answer to `sent`: the used length and status byte.
pub fn answer(dev: &Dev, vq: &mut Vq, sent: Sent) -> Result<(u32, u8), Msg> {
    match vq.wait(dev, WAIT_MS) {
        Wait::Used { id, len } => {
            ensure!(
                id == u32::from(sent.head),
                "used id {id}, expected head {}",
                sent.head
            );
            Ok((len, r8(sent.status)))
        }
        Wait::NeedsReset => fail!("device set NEEDS_RESET on a valid request"),
        Wait::Timeout => fail!("no answer within {WAIT_MS} ms"),
    }
}

/// Submits one request through descriptors 0..3, notifies, and returns
/// (used len, status).
pub fn request(
    dev: &Dev,
    vq: &mut Vq,
    kind: u32,
    sector: u64,
    data: Data,
) -> Result<(u32, u8), Msg> {
    let sent = queue_simple(vq, 0, kind, sector, data);
    dev.notify(0);
    answer(dev, vq, sent)
}

/// Like [`request`], failing unless the status is OK.
pub fn request_ok(dev: &Dev, vq: &mut Vq, kind: u32, sector: u64, data: Data) -> Result<u32, Msg> {
    let (len, st) = request(dev, vq, kind, sector, data)?;
    ensure!(
        st == S_OK,
        "request type {kind} at sector {sector}: status {st}"
    );
    Ok(len)
}

pub fn capacity(dev: &Dev) -> Result<u64, Msg> {
    dev.cfg64(CFG_CAPACITY)
}

/// A cheap request every drive serves: a 512-byte read of sector 0
/// through descriptors 0..3.
pub fn ping(dev: &Dev, vq: &mut Vq) -> R {
    let buf = mem::alloc(512, 512);
    request_ok(dev, vq, T_IN, 0, Data::In(buf, 512)).map(|_| ())
}

/// [`queue_simple`] for a [`ping`] read at descriptors `first..first+3`.
pub fn queue_ping(vq: &mut Vq, first: u16) -> Sent {
    let buf = mem::alloc(512, 512);
    queue_simple(vq, first, T_IN, 0, Data::In(buf, 512))
}

/// Sector used by the good round trip of case `tag`, away from what other
/// cases touch.
pub fn scratch_sector(tag: u64) -> u64 {
    4096 + tag * 16
}

/// Writes 1 KiB with a pattern and reads it back: the device serves.
pub fn good_io(dev: &Dev, vq: &mut Vq, tag: u64) -> R {
    let sector = scratch_sector(tag);
    let buf = mem::alloc(1024, 512);
    mem::pattern(buf, 1024, tag ^ 0x5eed);
    let (_, st) = request(dev, vq, T_OUT, sector, Data::Out(buf, 1024))
        .map_err(|e| Msg::new(format_args!("good write after the case: {}", e.as_str())))?;
    ensure!(st == S_OK, "good write after the case: status {st}");
    let back = mem::alloc(1024, 512);
    let (len, st) = request(dev, vq, T_IN, sector, Data::In(back, 1024))
        .map_err(|e| Msg::new(format_args!("good read after the case: {}", e.as_str())))?;
    ensure!(st == S_OK, "good read after the case: status {st}");
    ensure!(len >= 1025, "good read: used len {len}, expected 1025");
    if let Some(off) = mem::check_pattern(back, 1024, tag ^ 0x5eed) {
        fail!("good read: data differs at byte {off}");
    }
    Ok(())
}

/// How a refused request may end.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A used entry whose status byte is IOERR or UNSUPP.
    ErrorStatus,
    /// That, or the chain returned with used len 0 and the status byte
    /// untouched, or NEEDS_RESET.
    Any,
}

/// Waits for the device to refuse the chain at `head`; returns whether it
/// went NEEDS_RESET.
pub fn expect_refused(
    dev: &Dev,
    vq: &mut Vq,
    head: u16,
    status: Option<u64>,
    how: Refusal,
) -> Result<bool, Msg> {
    match vq.wait(dev, WAIT_MS) {
        Wait::Used { id, len } => {
            ensure!(id == u32::from(head), "used id {id}, expected head {head}");
            let st = status.map(r8);
            match st {
                Some(S_IOERR) | Some(S_UNSUPP) => Ok(false),
                Some(S_OK) => fail!("device answered OK (used len {len})"),
                Some(SENTINEL) | None if how == Refusal::Any => {
                    ensure!(len == 0, "chain returned without status but used len {len}");
                    Ok(false)
                }
                Some(other) => fail!("status byte {other:#x} (used len {len})"),
                None => fail!("expected an error status"),
            }
        }
        Wait::NeedsReset if how == Refusal::Any => Ok(true),
        Wait::NeedsReset => fail!("NEEDS_RESET where an error status was expected"),
        Wait::Timeout => fail!("the chain was never returned within {WAIT_MS} ms"),
    }
}

/// After a hostile chain: reset if the device asked for it, then prove a
/// good request still works.
pub fn recover(dev: &Dev, vq: &mut Vq, features: u64, tag: u64) -> R {
    if dev.needs_reset() {
        *vq = dev.up(features, vq.size)?;
    }
    good_io(dev, vq, tag)
}
