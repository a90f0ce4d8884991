//! virtio-vsock (VIRTIO 1.2 §5.10) with Firecracker's hybrid host side:
//! guest `AF_VSOCK` stream sockets carried to host Unix sockets, served
//! on the VMM thread's ring like every other device.
//!
//! - `packet.rs`: the 44-byte header, parsed and encoded (pure).
//! - `chain.rs`: a descriptor chain as header + payload iovecs, either way.
//! - `credit.rs`: buf_alloc/fwd_cnt flow control, both ways.
//! - `conn.rs`: one connection's state, owed control packets and ring ops.
//! - `host.rs`: the Unix sockets (listen, accept, connect, CONNECT/OK lines).
//! - `device.rs`: the [`VirtioDevice`](super::VirtioDevice): the muxer.
//!
//! Guest data never passes through a buffer of ours: a guest packet's
//! payload is written to the host socket with `writev` straight from the
//! guest's TX buffers (the chain is held until the socket took it), and
//! host data is read with `readv` straight into a guest RX buffer, after a
//! ring `poll` said the socket is readable, so idle connections hold no
//! guest buffer. Every connection is bounded: at most [`MAX_CONNECTIONS`],
//! each holding at most [`CONN_BUF_ALLOC`] bytes of guest data (the credit
//! it offers; a guest that ignores it gets an RST).

mod chain;
mod conn;
mod credit;
mod device;
pub mod host;
pub mod packet;
#[cfg(test)]
mod tests;

pub use device::{VsockCounters, VsockDevice};

/// virtio device ID of a socket device.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
/// The host's context id (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// Lowest context id a guest may have (0-2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;
/// Queue index: packets to the guest.
pub const RX_QUEUE: usize = 0;
/// Queue index: packets from the guest.
pub const TX_QUEUE: usize = 1;
/// Queue index: events to the guest (transport reset; never sent here).
pub const EVENT_QUEUE: usize = 2;
/// Maximum size of each queue.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Feature bits offered: no SEQPACKET (bit 1), so stream only.
pub const FEATURES: u64 = super::F_VERSION_1 | super::F_EVENT_IDX | super::F_INDIRECT_DESC;
/// Most connections at once (live or being torn down); more are refused
/// (host client: closed at once; guest REQUEST: RST).
pub const MAX_CONNECTIONS: usize = 128;
/// Receive buffer each connection offers the guest: the most guest data
/// it holds (as held TX chains) before the host socket takes it.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload of one packet, either way (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// RSTs for unknown connections waiting for an RX buffer; beyond this a
/// guest that floods us without posting buffers gets none (counted).
pub const MAX_PENDING_RST: usize = 64;
