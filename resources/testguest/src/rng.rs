//! virtio-rng (VIRTIO 1.2 §5.4) by hand: one request queue of
//! device-writable buffers the device fills with random bytes, and the
//! checks the `rng.*` cases share.

use crate::mem;
use crate::msg::{Msg, R};
use crate::virtio::{Dev, Part, Vq, Wait, F_VERSION_1, WAIT_MS};
use crate::{ensure, fail};

pub const DEVICE_ID: u32 = 4;

/// Most bytes ringvm gives one request (its documented cap; the spec lets
/// a device return fewer bytes than the buffer holds).
pub const MAX_REQUEST: u32 = 4096;

/// The request queue's size in these cases.
pub const QSIZE: u16 = 16;

/// Brings the device up with VERSION_1 only (it has no feature bits of its
/// own) and one queue of [`QSIZE`] entries.
pub fn up(dev: &Dev) -> Result<Vq, Msg> {
    dev.up(F_VERSION_1, QSIZE)
}

/// Publishes the chain `parts` at descriptors 0.., notifies, and returns
/// the used length it came back with.
pub fn request(dev: &Dev, vq: &mut Vq, parts: &[Part]) -> Result<u32, Msg> {
    let head = vq.chain(0, parts);
    vq.publish(head);
    dev.notify(0);
    match vq.wait(dev, WAIT_MS) {
        Wait::Used { id, len } => {
            ensure!(id == u32::from(head), "used id {id}, expected head {head}");
            Ok(len)
        }
        Wait::NeedsReset => fail!("NEEDS_RESET on a request of {} descriptors", parts.len()),
        Wait::Timeout => fail!("request not returned within {WAIT_MS} ms"),
    }
}

/// A buffer of `len` bytes holding `pattern(seed)`, followed by 64 guard
/// bytes holding the same pattern's continuation.
pub fn patterned(len: usize, seed: u64) -> u64 {
    let b = mem::alloc(len + 64, 64);
    mem::pattern(b, len + 64, seed);
    b
}

/// `len` bytes at `addr` (of a buffer [`patterned`] with `seed`; `len`
/// and `tail` multiples of 8) were all replaced, the `tail` bytes after
/// them were not. A random word equals the pattern's by chance with odds
/// 2^-64.
pub fn check_filled(addr: u64, len: usize, tail: usize, seed: u64, w: &str) -> R {
    let total = len + tail;
    let mut x = mem::pattern_start(seed);
    for i in 0..total / 8 {
        x = mem::pattern_next(x);
        let v = mem::r64(addr + i as u64 * 8);
        if i * 8 < len {
            ensure!(
                v != x,
                "{w}: byte {} of {len} still holds the fill pattern",
                i * 8
            );
            // Eight zero bytes in a row: odds 2^-64 from a random source.
            ensure!(v != 0, "{w}: zero bytes at {} of {len}", i * 8);
        } else {
            ensure!(
                v == x,
                "{w}: byte {} written, past the {len} bytes the device reported",
                i * 8
            );
        }
    }
    Ok(())
}

/// The device still serves: a 64-byte request comes back full of bytes
/// that are not the fill pattern.
pub fn good_request(dev: &Dev, vq: &mut Vq, seed: u64) -> R {
    let b = patterned(64, seed);
    let len = request(dev, vq, &[(b, 64, crate::virtio::D_WRITE)])
        .map_err(|e| Msg::new(format_args!("good request: {}", e.as_str())))?;
    ensure!(len == 64, "good request: used len {len}, expected 64");
    check_filled(b, 64, 64, seed, "good request")
}
