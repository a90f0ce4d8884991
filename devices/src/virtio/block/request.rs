//! A virtio-blk request as plain data, parsed and checked with no host I/O.
//!
//! [`parse`] walks one descriptor chain (VIRTIO 1.2 §5.2.6) and returns
//! what to do, on which disk bytes, with which guest buffers, and where the
//! status byte goes; [`check_request`] applies drive policy (read-only).
//! Everything here is pure: the guest chooses every input, so every rule is
//! an error variant and nothing panics, loops without bound or allocates
//! more than the advertised limits allow.
//!
//! Framing follows the spec's "device MUST NOT make assumptions about the
//! particular arrangement of descriptors" as far as it costs nothing: the
//! 16-byte header may span readable descriptors and data may share a
//! descriptor with the header. The status byte is the last byte of the last
//! descriptor, which must be device-writable.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::{MAX_DISCARD_SECTORS, MAX_REQUEST_BYTES, SECTOR_SHIFT, SECTOR_SIZE, SEG_MAX, SIZE_MAX};

/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
pub const HEADER_LEN: u64 = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes` segment.
pub const RANGE_LEN: u64 = 16;
/// Most descriptors one request may use: the data segments we advertise
/// (seg_max) plus the header and the status descriptors.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// A run of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address of the first byte.
    pub addr: GuestAddress,
    /// Length in bytes (never zero in a parsed request).
    pub len: u32,
}

/// What a request asks the disk to do; offsets and lengths are in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// VIRTIO_BLK_T_IN: read `data_len` bytes at `offset` into the data segments.
    Read {
        /// Disk byte offset.
        offset: u64,
    },
    /// VIRTIO_BLK_T_OUT: write the data segments at `offset`.
    Write {
        /// Disk byte offset.
        offset: u64,
    },
    /// VIRTIO_BLK_T_FLUSH: make completed writes durable.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: copy the drive's serial into the data segments.
    GetId,
    /// VIRTIO_BLK_T_DISCARD: the range's contents may be dropped.
    Discard {
        /// Disk byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// VIRTIO_BLK_T_WRITE_ZEROES: the range must read back as zeroes.
    WriteZeroes {
        /// Disk byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The driver allows deallocating the range (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
        unmap: bool,
    },
}

/// A parsed request, with nothing left to check in guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Operation,
    /// Guest buffers, in order: device-writable for Read/GetId,
    /// device-readable for Write, empty otherwise. All inside guest memory.
    pub data: Vec<Segment>,
    /// Sum of `data` lengths.
    pub data_len: u64,
    /// Where the status byte goes (inside guest memory, writable).
    pub status: GuestAddress,
}

/// What [`parse`] needs to know about the drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskLimits {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// FLUSH was offered (not `cache=unsafe`); without it a FLUSH is
    /// refused as unsupported rather than silently acknowledged.
    pub flush: bool,
}

/// Why a request was refused. Ordered by name; `status()` maps each to the
/// status byte the guest sees.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain ended on a descriptor that still had NEXT set: a loop, a
    /// `next` outside the table, a bad indirect table or unreadable memory.
    #[error("descriptor chain is broken (loop, bad index or unreadable descriptor)")]
    BrokenChain,
    /// The chain yielded no descriptor at all.
    #[error("descriptor chain is empty")]
    EmptyChain,
    /// The header is shorter than 16 bytes.
    #[error("request header is shorter than {HEADER_LEN} bytes")]
    HeaderTooShort,
    /// Data length is not a multiple of 512 bytes.
    #[error("data length {0} is not a multiple of 512")]
    MisalignedLength(u64),
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer at {0:#x} is outside guest memory")]
    OutsideMemory(u64),
    /// The request reaches past the end of the disk.
    #[error("request ends at byte {end} past the disk's {capacity} bytes")]
    PastEnd {
        /// First byte after the request.
        end: u64,
        /// Disk size in bytes.
        capacity: u64,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// A write-type request on a read-only drive.
    #[error("drive is read-only")]
    ReadOnly,
    /// A discard/write-zeroes range is empty or not 16-byte framed.
    #[error("bad discard/write-zeroes range")]
    BadRange,
    /// Sector arithmetic overflowed.
    #[error("sector arithmetic overflows")]
    SectorOverflow,
    /// The last descriptor is empty, so there is no status byte.
    #[error("status descriptor is empty")]
    StatusEmpty,
    /// The last descriptor is device-readable, so the status cannot be written.
    #[error("status descriptor is not device-writable")]
    StatusNotWritable,
    /// The status byte is outside guest memory.
    #[error("status byte at {0:#x} is outside guest memory")]
    StatusOutsideMemory(u64),
    /// More descriptors than [`MAX_DESCRIPTORS`], or more data segments than seg_max.
    #[error("request uses too many descriptors or segments")]
    TooManySegments,
    /// A data segment above size_max, or a request above the bounded total.
    #[error("request or segment of {0} bytes is too large")]
    TooLarge(u64),
    /// The request type is not supported.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Discard/write-zeroes flags we do not know (or unmap on a discard).
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    /// Data buffers point the wrong way for the request type.
    #[error("data descriptors have the wrong direction for the request type")]
    WrongDirection,
}

impl RequestError {
    /// The status byte this error earns (VIRTIO_BLK_S_*).
    pub fn status(&self) -> u8 {
        // A deliberately broken device, built only to prove that the test
        // guest's cases can fail: every refusal is reported as success.
        #[cfg(feature = "broken-status")]
        {
            let _ = self;
            return virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
        }
        #[cfg(not(feature = "broken-status"))]
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A refused request, with its status byte address when the chain had a
/// usable one (then the guest gets an error status; otherwise the chain is
/// returned with used length 0).
#[derive(Debug, PartialEq, Eq)]
pub struct ParseError {
    /// Where to write the error status, if anywhere.
    pub status: Option<GuestAddress>,
    /// What was wrong.
    pub error: RequestError,
}

fn no_status(error: RequestError) -> ParseError {
    ParseError {
        status: None,
        error,
    }
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Copies the first `out.len()` bytes of the non-empty descriptors in
/// `descs`, starting `skip` bytes in, out of guest memory.
fn read_prefix<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    skip: u64,
    out: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0usize;
    let mut skip = skip;
    for d in descs {
        if done == out.len() {
            break;
        }
        let len = u64::from(d.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        // skip < len <= u32::MAX, and addr + len was checked not to overflow.
        let addr = d.addr().unchecked_add(skip);
        let n = (out.len() - done).min((len - skip) as usize);
        skip = 0;
        let dst = out
            .get_mut(done..done + n)
            .ok_or(RequestError::HeaderTooShort)?;
        mem.read_slice(dst, addr)
            .map_err(|_| RequestError::OutsideMemory(addr.raw_value()))?;
        done += n;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(RequestError::HeaderTooShort)
    }
}

/// Appends the non-empty parts of `descs` after the first `skip` bytes to
/// `out`, as segments.
fn push_segments(descs: &[Descriptor], skip: u64, out: &mut Vec<Segment>) {
    let mut skip = skip;
    for d in descs {
        let len = u64::from(d.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        // skip < len <= u32::MAX, so both fit in u32, and addr + len was
        // checked not to overflow.
        out.push(Segment {
            addr: d.addr().unchecked_add(skip),
            len: (len - skip) as u32,
        });
        skip = 0;
    }
}

fn check_in_memory<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    access: Permissions,
) -> Result<(), RequestError> {
    for s in segs {
        if !mem.check_range(s.addr, s.len as usize, access) {
            return Err(RequestError::OutsideMemory(s.addr.raw_value()));
        }
    }
    Ok(())
}

/// Byte range `[sector*512, sector*512 + len)` checked against the disk.
fn disk_range(sector: u64, len: u64, limits: &DiskLimits) -> Result<u64, RequestError> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::SectorOverflow)?;
    let end = offset
        .checked_add(len)
        .ok_or(RequestError::SectorOverflow)?;
    let capacity = limits
        .capacity_sectors
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::SectorOverflow)?;
    if end > capacity {
        return Err(RequestError::PastEnd { end, capacity });
    }
    Ok(offset)
}

/// Checks a data transfer's buffers: bounded, sector-multiple, in memory.
fn check_data<M: GuestMemory>(
    mem: &M,
    data: &[Segment],
    access: Permissions,
) -> Result<u64, RequestError> {
    if data.len() > SEG_MAX as usize {
        return Err(RequestError::TooManySegments);
    }
    if let Some(s) = data.iter().find(|s| s.len > SIZE_MAX) {
        return Err(RequestError::TooLarge(u64::from(s.len)));
    }
    let len = total(data);
    if len > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge(len));
    }
    check_in_memory(mem, data, access)?;
    Ok(len)
}

/// Parses one request from the descriptors of a chain.
///
/// `descs` is normally a [`virtio_queue::DescriptorChain`], whose iterator
/// already bounds the walk by the queue (or indirect table) size and stops
/// early on loops, bad indices or unreadable memory; this function notices
/// the early stop (the last descriptor still says NEXT) and refuses it.
/// Allocates its working vectors anew: the device keeps a [`Parser`] instead.
pub fn parse<M, I>(descs: I, mem: &M, limits: &DiskLimits) -> Result<Request, ParseError>
where
    M: GuestMemory,
    I: IntoIterator<Item = Descriptor>,
{
    Parser::default().parse(descs, mem, limits)
}

/// [`parse`] with its working vectors kept from one request to the next,
/// so the data path allocates nothing per request once warm. Both are
/// bounded: at most [`MAX_DESCRIPTORS`] descriptors and segments.
#[derive(Debug, Default)]
pub struct Parser {
    /// The chain being parsed.
    chain: Vec<Descriptor>,
    /// The segment vector the next request's data goes into (handed back
    /// with [`Parser::recycle`]).
    spare: Vec<Segment>,
}

impl Parser {
    /// Takes back a request's segment vector for the next parse.
    pub fn recycle(&mut self, req: Request) {
        let mut data = req.data;
        if data.capacity() >= self.spare.capacity() {
            data.clear();
            self.spare = data;
        }
    }

    /// Parses one request, as [`parse`] does.
    pub fn parse<M, I>(
        &mut self,
        descs: I,
        mem: &M,
        limits: &DiskLimits,
    ) -> Result<Request, ParseError>
    where
        M: GuestMemory,
        I: IntoIterator<Item = Descriptor>,
    {
        let mut data = std::mem::take(&mut self.spare);
        data.clear();
        let chain = &mut self.chain;
        chain.clear();
        for d in descs {
            if chain.len() == MAX_DESCRIPTORS {
                self.spare = data;
                return Err(no_status(RequestError::TooManySegments));
            }
            chain.push(d);
        }
        let parsed = parse_chain(chain, mem, limits, &mut data);
        match parsed {
            Ok((op, status)) => Ok(Request {
                op,
                data_len: total(&data),
                data,
                status,
            }),
            Err(e) => {
                self.spare = data;
                Err(e)
            }
        }
    }
}

/// The body of [`parse`] on a collected chain: the operation and the
/// status byte's address, with the data segments appended to `data`.
fn parse_chain<M: GuestMemory>(
    chain: &[Descriptor],
    mem: &M,
    limits: &DiskLimits,
    data: &mut Vec<Segment>,
) -> Result<(Operation, GuestAddress), ParseError> {
    let Some((last, body)) = chain.split_last() else {
        return Err(no_status(RequestError::EmptyChain));
    };
    if last.has_next() {
        return Err(no_status(RequestError::BrokenChain));
    }
    if !last.is_write_only() {
        return Err(no_status(RequestError::StatusNotWritable));
    }
    let Some(status_off) = last.len().checked_sub(1) else {
        return Err(no_status(RequestError::StatusEmpty));
    };
    let status = last
        .addr()
        .checked_add(u64::from(status_off))
        .filter(|a| mem.check_range(*a, 1, Permissions::Write))
        .ok_or(no_status(RequestError::StatusOutsideMemory(
            last.addr().raw_value(),
        )))?;
    let fail = |error| ParseError {
        status: Some(status),
        error,
    };

    // Readable descriptors first, then writable ones (VIRTIO 1.2 §2.7.4.2);
    // the status byte is cut off the end of the last one. A readable
    // descriptor after a non-empty writable one is refused at once; after
    // an empty writable one, once the walk found nothing worse.
    let last_trimmed = Descriptor::new(last.addr().raw_value(), status_off, last.flags(), 0);
    // Index in `body` of the first writable descriptor.
    let mut split = body.len();
    let mut has_writable = false;
    let mut late_readable = false;
    for (i, d) in body
        .iter()
        .chain(std::iter::once(&last_trimmed))
        .enumerate()
    {
        if d.addr().checked_add(u64::from(d.len())).is_none() {
            return Err(fail(RequestError::OutsideMemory(d.addr().raw_value())));
        }
        if d.is_write_only() {
            split = split.min(i);
            has_writable |= d.len() > 0;
        } else if has_writable {
            return Err(fail(RequestError::ReadableAfterWritable));
        } else if split < body.len() {
            late_readable = true;
        }
    }
    if late_readable {
        return Err(fail(RequestError::ReadableAfterWritable));
    }
    let (readable, writable_body) = body.split_at(split);
    let has_rest = readable.iter().map(|d| u64::from(d.len())).sum::<u64>() > HEADER_LEN;

    let mut header = [0u8; HEADER_LEN as usize];
    read_prefix(mem, readable, 0, &mut header).map_err(fail)?;
    let mut word = [0u8; 4];
    word.copy_from_slice(&header[0..4]);
    let kind = u32::from_le_bytes(word);
    let mut dword = [0u8; 8];
    dword.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(dword);
    let push_writable = |data: &mut Vec<Segment>| {
        push_segments(writable_body, 0, data);
        push_segments(std::slice::from_ref(&last_trimmed), 0, data);
    };

    let op = match kind {
        VIRTIO_BLK_T_IN => {
            if has_rest {
                return Err(fail(RequestError::WrongDirection));
            }
            push_writable(data);
            let len = check_data(mem, data, Permissions::Write).map_err(fail)?;
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(fail(RequestError::MisalignedLength(len)));
            }
            let offset = disk_range(sector, len, limits).map_err(fail)?;
            Operation::Read { offset }
        }
        VIRTIO_BLK_T_OUT => {
            if has_writable {
                return Err(fail(RequestError::WrongDirection));
            }
            push_segments(readable, HEADER_LEN, data);
            let len = check_data(mem, data, Permissions::Read).map_err(fail)?;
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(fail(RequestError::MisalignedLength(len)));
            }
            let offset = disk_range(sector, len, limits).map_err(fail)?;
            Operation::Write { offset }
        }
        VIRTIO_BLK_T_FLUSH if !limits.flush => {
            return Err(fail(RequestError::Unsupported(VIRTIO_BLK_T_FLUSH)))
        }
        VIRTIO_BLK_T_FLUSH => Operation::Flush,
        VIRTIO_BLK_T_GET_ID => {
            if has_rest {
                return Err(fail(RequestError::WrongDirection));
            }
            push_writable(data);
            check_data(mem, data, Permissions::Write).map_err(fail)?;
            Operation::GetId
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if has_writable {
                return Err(fail(RequestError::WrongDirection));
            }
            let ranges = readable
                .iter()
                .map(|d| u64::from(d.len()))
                .sum::<u64>()
                .saturating_sub(HEADER_LEN);
            if ranges > RANGE_LEN && ranges.is_multiple_of(RANGE_LEN) {
                // We advertise max_discard_seg = max_write_zeroes_seg = 1.
                return Err(fail(RequestError::TooManySegments));
            }
            if ranges != RANGE_LEN {
                return Err(fail(RequestError::BadRange));
            }
            let mut range = [0u8; RANGE_LEN as usize];
            read_prefix(mem, readable, HEADER_LEN, &mut range).map_err(fail)?;
            dword.copy_from_slice(&range[0..8]);
            let sector = u64::from_le_bytes(dword);
            word.copy_from_slice(&range[8..12]);
            let num_sectors = u32::from_le_bytes(word);
            word.copy_from_slice(&range[12..16]);
            let flags = u32::from_le_bytes(word);
            let allowed = if kind == VIRTIO_BLK_T_DISCARD {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return Err(fail(RequestError::UnsupportedFlags(flags)));
            }
            if num_sectors == 0 {
                return Err(fail(RequestError::BadRange));
            }
            if num_sectors > MAX_DISCARD_SECTORS {
                return Err(fail(RequestError::TooLarge(
                    u64::from(num_sectors) << SECTOR_SHIFT,
                )));
            }
            let len = u64::from(num_sectors) << SECTOR_SHIFT;
            let offset = disk_range(sector, len, limits).map_err(fail)?;
            if kind == VIRTIO_BLK_T_DISCARD {
                Operation::Discard { offset, len }
            } else {
                Operation::WriteZeroes {
                    offset,
                    len,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            }
        }
        other => return Err(fail(RequestError::Unsupported(other))),
    };
    Ok((op, status))
}

/// Applies drive policy that is not about the chain's shape: a read-only
/// drive refuses anything that would change it, before any I/O.
pub fn check_request(req: &Request, limits: &DiskLimits) -> Result<(), RequestError> {
    match req.op {
        Operation::Write { .. } | Operation::Discard { .. } | Operation::WriteZeroes { .. }
            if limits.read_only =>
        {
            Err(RequestError::ReadOnly)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const R: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16;
    const WL: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory")
    }

    fn limits() -> DiskLimits {
        DiskLimits {
            capacity_sectors: 64,
            read_only: false,
            flush: true,
        }
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).expect("header");
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn err(r: Result<Request, ParseError>) -> ParseError {
        match r {
            Ok(req) => panic!("parsed {req:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_a_read_with_split_data() -> Result<(), ParseError> {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 3);
        let descs = [
            d(0x1000, 16, R),
            d(0x2000, 512, W),
            d(0x3000, 1024, W),
            d(0x4000, 1, WL),
        ];
        let req = parse(descs, &m, &limits())?;
        assert_eq!(req.op, Operation::Read { offset: 3 * 512 });
        assert_eq!(req.data_len, 1536);
        assert_eq!(req.data.len(), 2);
        assert_eq!(req.status, GuestAddress(0x4000));
        Ok(())
    }

    #[test]
    fn header_may_span_descriptors_and_share_with_data() -> Result<(), ParseError> {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 1);
        // Header split 10 + 6; the second descriptor also carries 512 data bytes.
        let descs = [d(0x1000, 10, R), d(0x100a, 6 + 512, R), d(0x4000, 1, WL)];
        let req = parse(descs, &m, &limits())?;
        assert_eq!(req.op, Operation::Write { offset: 512 });
        assert_eq!(
            req.data,
            vec![Segment {
                addr: GuestAddress(0x1010),
                len: 512
            }]
        );
        Ok(())
    }

    #[test]
    fn status_byte_is_the_last_byte_of_the_last_descriptor() -> Result<(), ParseError> {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let descs = [d(0x1000, 16, R), d(0x2000, 513, WL)];
        let req = parse(descs, &m, &limits())?;
        assert_eq!(req.status, GuestAddress(0x2200));
        assert_eq!(req.data_len, 512);
        Ok(())
    }

    #[test]
    fn status_problems_leave_no_status() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let cases = [
            (vec![], RequestError::EmptyChain),
            (
                vec![d(0x1000, 16, R), d(0x4000, 1, 0)],
                RequestError::StatusNotWritable,
            ),
            (
                vec![d(0x1000, 16, R), d(0x4000, 0, WL)],
                RequestError::StatusEmpty,
            ),
            (
                vec![d(0x1000, 16, R), d(0x20_0000, 1, WL)],
                RequestError::StatusOutsideMemory(0x20_0000),
            ),
            (
                vec![d(0x1000, 16, R), d(u64::MAX, 2, WL)],
                RequestError::StatusOutsideMemory(u64::MAX),
            ),
            (vec![d(0x1000, 16, R)], RequestError::BrokenChain),
        ];
        for (descs, want) in cases {
            let e = err(parse(descs, &m, &limits()));
            assert_eq!(e, no_status(want));
        }
    }

    #[test]
    fn direction_errors_get_ioerr() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        header(&m, 0x1100, VIRTIO_BLK_T_OUT, 0);
        header(&m, 0x1200, VIRTIO_BLK_T_GET_ID, 0);
        let cases = [
            // IN with device-readable data.
            vec![d(0x1000, 16, R), d(0x2000, 512, R), d(0x4000, 1, WL)],
            // OUT with device-writable data.
            vec![d(0x1100, 16, R), d(0x2000, 512, W), d(0x4000, 1, WL)],
            // GET_ID into a read-only buffer.
            vec![d(0x1200, 16, R), d(0x2000, 20, R), d(0x4000, 1, WL)],
        ];
        for descs in cases {
            let e = err(parse(descs, &m, &limits()));
            assert_eq!(e.error, RequestError::WrongDirection);
            assert_eq!(e.status, Some(GuestAddress(0x4000)));
            assert_eq!(e.error.status(), VIRTIO_BLK_S_IOERR as u8);
        }
        let e = err(parse(
            [
                d(0x1000, 16, R),
                d(0x2000, 512, W),
                d(0x3000, 512, R),
                d(0x4000, 1, WL),
            ],
            &m,
            &limits(),
        ));
        assert_eq!(e.error, RequestError::ReadableAfterWritable);
        let e = err(parse(
            [
                d(0x1000, 16, R),
                d(0x2000, 0, W),
                d(0x3000, 512, R),
                d(0x4000, 1, WL),
            ],
            &m,
            &limits(),
        ));
        assert_eq!(e.error, RequestError::ReadableAfterWritable);
    }

    #[test]
    fn size_and_range_errors() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        header(&m, 0x1100, VIRTIO_BLK_T_IN, 63);
        header(&m, 0x1200, VIRTIO_BLK_T_IN, u64::MAX / 256);
        header(&m, 0x1300, VIRTIO_BLK_T_IN, 64);
        let status = d(0x4000, 1, WL);
        let cases = [
            (vec![d(0x1000, 8, R), status], RequestError::HeaderTooShort),
            (
                vec![d(0x1000, 16, R), d(0x2000, 100, W), status],
                RequestError::MisalignedLength(100),
            ),
            (
                vec![d(0x1100, 16, R), d(0x2000, 1024, W), status],
                RequestError::PastEnd {
                    end: 64 * 512 + 512,
                    capacity: 64 * 512,
                },
            ),
            (
                vec![d(0x1200, 16, R), d(0x2000, 512, W), status],
                RequestError::SectorOverflow,
            ),
            (
                vec![d(0x1000, 16, R), d(0x2000, u32::MAX, W), status],
                RequestError::TooLarge(u64::from(u32::MAX)),
            ),
            (
                vec![d(0x1000, 16, R), d(0xf_fe00, 1024, W), status],
                RequestError::OutsideMemory(0xf_fe00),
            ),
            (
                vec![d(0x1000, 16, R), d(u64::MAX - 10, 512, W), status],
                RequestError::OutsideMemory(u64::MAX - 10),
            ),
            (
                vec![d(0x20_0000, 16, R), status],
                RequestError::OutsideMemory(0x20_0000),
            ),
        ];
        for (descs, want) in cases {
            let e = err(parse(descs, &m, &limits()));
            assert_eq!(e.error, want);
            assert_eq!(e.status, Some(GuestAddress(0x4000)));
        }
        // Reading the very last sector works, one past it does not.
        let ok = parse([d(0x1100, 16, R), d(0x2000, 512, W), status], &m, &limits());
        assert!(ok.is_ok());
        let e = err(parse(
            [d(0x1300, 16, R), d(0x2000, 512, W), status],
            &m,
            &limits(),
        ));
        assert!(matches!(e.error, RequestError::PastEnd { .. }));
    }

    #[test]
    fn too_many_descriptors_is_refused_without_reading_them_all() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let descs = std::iter::once(d(0x1000, 16, R))
            .chain(std::iter::repeat(d(0x2000, 512, W)))
            .take(10_000);
        let e = err(parse(descs, &m, &limits()));
        assert_eq!(e, no_status(RequestError::TooManySegments));
    }

    #[test]
    fn discard_and_write_zeroes_ranges() -> Result<(), ParseError> {
        let m = mem();
        let range = |at: u64, sector: u64, n: u32, flags: u32| {
            let mut r = [0u8; 16];
            r[0..8].copy_from_slice(&sector.to_le_bytes());
            r[8..12].copy_from_slice(&n.to_le_bytes());
            r[12..16].copy_from_slice(&flags.to_le_bytes());
            m.write_slice(&r, GuestAddress(at)).expect("range");
        };
        header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        header(&m, 0x1100, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range(0x2000, 4, 8, 0);
        range(0x2100, 4, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        range(0x2200, 60, 8, 0);
        range(0x2300, 4, 0, 0);
        range(0x2400, 4, 8, 2);
        let st = d(0x4000, 1, WL);
        let req = parse([d(0x1000, 16, R), d(0x2000, 16, R), st], &m, &limits())?;
        assert_eq!(
            req.op,
            Operation::Discard {
                offset: 2048,
                len: 4096
            }
        );
        let req = parse([d(0x1100, 16, R), d(0x2100, 16, R), st], &m, &limits())?;
        assert_eq!(
            req.op,
            Operation::WriteZeroes {
                offset: 2048,
                len: 4096,
                unmap: true
            }
        );
        let cases = [
            (
                vec![d(0x1000, 16, R), d(0x2100, 16, R), st],
                RequestError::UnsupportedFlags(1),
            ),
            (
                vec![d(0x1100, 16, R), d(0x2400, 16, R), st],
                RequestError::UnsupportedFlags(2),
            ),
            (
                vec![d(0x1000, 16, R), d(0x2200, 16, R), st],
                RequestError::PastEnd {
                    end: 68 * 512,
                    capacity: 64 * 512,
                },
            ),
            (
                vec![d(0x1000, 16, R), d(0x2300, 16, R), st],
                RequestError::BadRange,
            ),
            (
                vec![d(0x1000, 16, R), d(0x2000, 8, R), st],
                RequestError::BadRange,
            ),
            (vec![d(0x1000, 16, R), st], RequestError::BadRange),
            (
                vec![d(0x1000, 16, R), d(0x2000, 32, R), st],
                RequestError::TooManySegments,
            ),
            (
                vec![d(0x1000, 16, R), d(0x2000, 16, W), st],
                RequestError::WrongDirection,
            ),
        ];
        for (descs, want) in cases {
            assert_eq!(err(parse(descs, &m, &limits())).error, want);
        }
        assert_eq!(
            RequestError::UnsupportedFlags(1).status(),
            VIRTIO_BLK_S_UNSUPP as u8
        );
        Ok(())
    }

    #[test]
    fn unknown_types_are_unsupported_and_read_only_refuses_writes() -> Result<(), ParseError> {
        let m = mem();
        header(&m, 0x1000, 77, 0);
        let st = d(0x4000, 1, WL);
        let e = err(parse([d(0x1000, 16, R), st], &m, &limits()));
        assert_eq!(e.error, RequestError::Unsupported(77));
        assert_eq!(e.error.status(), VIRTIO_BLK_S_UNSUPP as u8);

        header(&m, 0x1100, VIRTIO_BLK_T_OUT, 0);
        let req = parse([d(0x1100, 16, R), d(0x2000, 512, R), st], &m, &limits())?;
        let ro = DiskLimits {
            read_only: true,
            ..limits()
        };
        assert_eq!(check_request(&req, &ro), Err(RequestError::ReadOnly));
        assert_eq!(check_request(&req, &limits()), Ok(()));
        header(&m, 0x1200, VIRTIO_BLK_T_FLUSH, 0);
        let req = parse([d(0x1200, 16, R), st], &m, &limits())?;
        assert_eq!(req.op, Operation::Flush);
        assert_eq!(check_request(&req, &ro), Ok(()));
        Ok(())
    }

    #[test]
    fn flush_is_unsupported_when_not_offered() {
        let m = mem();
        header(&m, 0x1200, VIRTIO_BLK_T_FLUSH, 0);
        let no_flush = DiskLimits {
            flush: false,
            ..limits()
        };
        let e = err(parse([d(0x1200, 16, R), d(0x4000, 1, WL)], &m, &no_flush));
        assert_eq!(e.error, RequestError::Unsupported(VIRTIO_BLK_T_FLUSH));
        assert_eq!(e.error.status(), VIRTIO_BLK_S_UNSUPP as u8);
        let flush_bit = crate::virtio::feature(virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH);
        assert_eq!(super::super::features(false, false) & flush_bit, 0);
        assert_ne!(super::super::features(false, true) & flush_bit, 0);
    }
}
