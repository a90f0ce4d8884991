//! The machine around the devices: where each device sits on the buses
//! ([`device_manager`]) and how each virtio device is made from its
//! configuration ([`builder`], one `add_*` per device kind).

pub mod builder;
pub mod device_manager;
