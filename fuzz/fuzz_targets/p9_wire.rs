//! The 9P2000.L message parser (`devices::virtio::p9::wire`) on any bytes
//! a guest could put in a request chain: it must return for every input,
//! never panic, and anything it accepts must stay within its documented
//! bounds (at most 16 walk names, strings of at most 4096 bytes) and be
//! answerable with an Rlerror that carries its own size.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devices::virtio::p9::fuzz_entry(data));
