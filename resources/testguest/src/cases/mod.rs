//! The cases, in the order they run.

mod blk;
mod hostile;
mod mmio;
mod net;
mod ring;
mod rng;
mod vsock;

use crate::msg::R;
use crate::virtio::Dev;

/// What the cases share.
pub struct Ctx {
    /// The first writable virtio-blk device.
    pub rw: Option<Dev>,
    /// The second writable virtio-blk device, if any (`hostile.reset_read_race`
    /// runs on it: give it `direct=on`).
    pub rw2: Option<Dev>,
    /// The first read-only virtio-blk device.
    pub ro: Option<Dev>,
    /// The first virtio-net device.
    pub net: Option<Dev>,
    /// The first virtio-rng device.
    pub rng: Option<Dev>,
    /// The first virtio-vsock device.
    pub vsock: Option<Dev>,
    /// First byte past guest RAM.
    pub ram_end: u64,
    /// First byte past the RAM below 4 GiB.
    pub low_ram_end: u64,
    /// This case's index (chooses its scratch sectors).
    pub tag: u64,
}

impl Ctx {
    pub fn rw(&self) -> Dev {
        self.rw.expect("runner checked Need::Rw")
    }
    pub fn ro(&self) -> Dev {
        self.ro.expect("runner checked Need::Ro")
    }
    pub fn net(&self) -> Dev {
        self.net.expect("runner checked Need::Net")
    }
    pub fn rng(&self) -> Dev {
        self.rng.expect("runner checked Need::Rng")
    }
    pub fn vsock(&self) -> Dev {
        self.vsock.expect("runner checked Need::Vsock")
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Rw,
    Ro,
    /// A virtio-net device whose tap peer answers ARP and pings.
    Net,
    /// A virtio-rng device.
    Rng,
    /// A virtio-vsock device with the integration test's sockets behind it.
    Vsock,
}

pub struct Case {
    pub name: &'static str,
    pub need: Need,
    pub run: fn(&mut Ctx) -> R,
}

const fn c(name: &'static str, need: Need, run: fn(&mut Ctx) -> R) -> Case {
    Case { name, need, run }
}

use Need::{Net, Rng, Ro, Rw, Vsock};

pub static CASES: &[Case] = &[
    c("mmio.identity", Rw, mmio::identity),
    c("mmio.device_features", Rw, mmio::device_features),
    c("mmio.features_ok_refused", Rw, mmio::features_ok_refused),
    c("mmio.queue_setup", Rw, mmio::queue_setup),
    c("mmio.reset", Rw, mmio::reset),
    c("mmio.config", Rw, mmio::config),
    c("mmio.interrupt_ack", Rw, mmio::interrupt_ack),
    c("mmio.irq_delivery", Rw, mmio::irq_delivery),
    c("ring.event_idx_used", Rw, ring::event_idx_used),
    c("ring.event_idx_avail", Rw, ring::event_idx_avail),
    c("ring.no_interrupt_flag", Rw, ring::no_interrupt_flag),
    c("ring.indirect", Rw, ring::indirect),
    c("ring.wrap", Rw, ring::wrap),
    c("blk.write_read", Rw, blk::write_read),
    c("blk.segments", Rw, blk::segments),
    c("blk.shared_descriptors", Rw, blk::shared_descriptors),
    c("blk.max_segments", Rw, blk::max_segments),
    c("blk.flush", Rw, blk::flush),
    c("blk.get_id", Rw, blk::get_id),
    c("blk.read_only", Ro, blk::read_only),
    c("blk.discard", Rw, blk::discard),
    c("blk.write_zeroes", Rw, blk::write_zeroes),
    c("blk.discard_limits", Rw, blk::discard_limits),
    c("blk.past_end", Rw, blk::past_end),
    c("blk.unsupported", Rw, blk::unsupported),
    c("blk.in_flight", Rw, blk::in_flight),
    c("hostile.desc_loop", Rw, hostile::desc_loop),
    c("hostile.next_out_of_range", Rw, hostile::next_out_of_range),
    c("hostile.chain_too_long", Rw, hostile::chain_too_long),
    c("hostile.indirect_bad", Rw, hostile::indirect_bad),
    c("hostile.head_out_of_range", Rw, hostile::head_out_of_range),
    c("hostile.head_twice", Rw, hostile::head_twice),
    c("hostile.data_outside_ram", Rw, hostile::data_outside_ram),
    c("hostile.data_in_mmio_hole", Rw, hostile::data_in_mmio_hole),
    c("hostile.straddle_ram_end", Rw, hostile::straddle_ram_end),
    c("hostile.addr_wraps", Rw, hostile::addr_wraps),
    c(
        "hostile.header_status_outside_ram",
        Rw,
        hostile::header_status_outside_ram,
    ),
    c("hostile.zero_len", Rw, hostile::zero_len),
    c("hostile.huge_len", Rw, hostile::huge_len),
    c("hostile.wrong_direction", Rw, hostile::wrong_direction),
    c("hostile.status_wrong", Rw, hostile::status_wrong),
    c("hostile.misaligned_len", Rw, hostile::misaligned_len),
    c("hostile.avail_jump", Rw, hostile::avail_jump),
    c("hostile.notify_not_ready", Rw, hostile::notify_not_ready),
    c("hostile.readonly_regs", Rw, hostile::readonly_regs),
    c("hostile.late_writes", Rw, hostile::late_writes),
    c("hostile.bad_queue_layout", Rw, hostile::bad_queue_layout),
    c("hostile.reset_in_flight", Rw, hostile::reset_in_flight),
    c("hostile.reset_read_race", Rw, hostile::reset_read_race),
    c("rng.identity", Rng, rng::identity),
    c("rng.fill", Rng, rng::fill),
    c("rng.max_request", Rng, rng::max_request),
    c("rng.refused", Rng, rng::refused),
    c("rng.head_out_of_range", Rng, rng::head_out_of_range),
    c("rng.reset_in_flight", Rng, rng::reset_in_flight),
    c("net.identity", Net, net::identity),
    c("net.arp", Net, net::arp),
    c("net.ping", Net, net::ping),
    c("net.rx_no_buffers", Net, net::rx_no_buffers),
    c("net.rx_scatter", Net, net::rx_scatter),
    c("net.big_frame_dropped", Net, net::big_frame_dropped),
    c("net.big_frame_mrg", Net, net::big_frame_mrg),
    c("net.reset_rx_parked", Net, net::reset_rx_parked),
    c("net.provided_buffers", Net, net::provided_buffers),
    c("net.reset_rx_race", Net, net::reset_rx_race),
    c("net.hostile_tx_writable", Net, net::hostile_tx_writable),
    c("net.hostile_tx_zero_len", Net, net::hostile_tx_zero_len),
    c(
        "net.hostile_tx_outside_ram",
        Net,
        net::hostile_tx_outside_ram,
    ),
    c("net.hostile_tx_size", Net, net::hostile_tx_size),
    c("net.hostile_tx_broken", Net, net::hostile_tx_broken),
    c("net.hostile_rx", Net, net::hostile_rx),
    c("vsock.identity", Vsock, vsock::identity),
    c("vsock.host_connect", Vsock, vsock::host_connect),
    c("vsock.guest_connect", Vsock, vsock::guest_connect),
    c("vsock.credit", Vsock, vsock::credit),
    c("vsock.refused", Vsock, vsock::refused),
    c("vsock.hostile", Vsock, vsock::hostile),
];
