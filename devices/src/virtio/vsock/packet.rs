//! The virtio-vsock packet header (VIRTIO 1.2 §5.10.6): 44 little-endian
//! bytes in front of every packet, parsed and encoded here as plain data.
//!
//! Pure and total: any 44 bytes parse (the device judges the values), so a
//! hostile header can only ever be refused, never crash the parser.

/// Bytes of a header on the wire.
pub const HDR_LEN: usize = 44;

/// `VIRTIO_VSOCK_TYPE_STREAM`: the only socket type this device carries.
pub const TYPE_STREAM: u16 = 1;
/// `VIRTIO_VSOCK_TYPE_SEQPACKET`: not offered; such packets get an RST.
pub const TYPE_SEQPACKET: u16 = 2;

/// `VIRTIO_VSOCK_OP_REQUEST`: open a connection.
pub const OP_REQUEST: u16 = 1;
/// `VIRTIO_VSOCK_OP_RESPONSE`: the connection is accepted.
pub const OP_RESPONSE: u16 = 2;
/// `VIRTIO_VSOCK_OP_RST`: the connection is refused or torn down.
pub const OP_RST: u16 = 3;
/// `VIRTIO_VSOCK_OP_SHUTDOWN`: the sender stops receiving and/or sending.
pub const OP_SHUTDOWN: u16 = 4;
/// `VIRTIO_VSOCK_OP_RW`: stream data.
pub const OP_RW: u16 = 5;
/// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`: the sender's buffer space changed.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`: please send a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_F_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags: the connection is finished.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// One packet header, field by field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender's context id.
    pub src_cid: u64,
    /// Receiver's context id.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload bytes after the header (RW only).
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (SHUTDOWN's `SHUTDOWN_*`).
    pub flags: u32,
    /// Sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far.
    pub fwd_cnt: u32,
}

fn le16(b: &[u8; HDR_LEN], at: usize) -> u16 {
    let mut v = [0u8; 2];
    v.copy_from_slice(b.get(at..at + 2).unwrap_or(&[0; 2]));
    u16::from_le_bytes(v)
}

fn le32(b: &[u8; HDR_LEN], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(b.get(at..at + 4).unwrap_or(&[0; 4]));
    u32::from_le_bytes(v)
}

fn le64(b: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(b.get(at..at + 8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(v)
}

fn put(b: &mut [u8; HDR_LEN], at: usize, bytes: &[u8]) {
    if let Some(dst) = b.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

impl Header {
    /// Reads a header from its wire bytes.
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: le64(b, 0),
            dst_cid: le64(b, 8),
            src_port: le32(b, 16),
            dst_port: le32(b, 20),
            len: le32(b, 24),
            type_: le16(b, 28),
            op: le16(b, 30),
            flags: le32(b, 32),
            buf_alloc: le32(b, 36),
            fwd_cnt: le32(b, 40),
        }
    }

    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        put(&mut b, 0, &self.src_cid.to_le_bytes());
        put(&mut b, 8, &self.dst_cid.to_le_bytes());
        put(&mut b, 16, &self.src_port.to_le_bytes());
        put(&mut b, 20, &self.dst_port.to_le_bytes());
        put(&mut b, 24, &self.len.to_le_bytes());
        put(&mut b, 28, &self.type_.to_le_bytes());
        put(&mut b, 30, &self.op.to_le_bytes());
        put(&mut b, 32, &self.flags.to_le_bytes());
        put(&mut b, 36, &self.buf_alloc.to_le_bytes());
        put(&mut b, 40, &self.fwd_cnt.to_le_bytes());
        b
    }

    /// A stream header from the host (`src_cid`, `src_port`) to the guest
    /// (`dst_cid`, `dst_port`) with operation `op`; lengths, flags and
    /// credit are filled in by the caller.
    pub fn to_guest(src_cid: u64, src_port: u32, dst_cid: u64, dst_port: u32, op: u16) -> Self {
        Self {
            src_cid,
            dst_cid,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_at_the_spec_offsets() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 52,
            len: 4096,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_BOTH,
            buf_alloc: 0x4_0000,
            fwd_cnt: u32::MAX,
        };
        let b = h.encode();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &[0xff; 4]);
        assert_eq!(Header::parse(&b), h);
    }

    #[test]
    fn any_bytes_parse() {
        let b = [0xa5u8; HDR_LEN];
        let h = Header::parse(&b);
        assert_eq!(h.encode(), b);
    }
}
