//! What is specific to the guest's CPU architecture: the memory map, the
//! boot-time tables and the registers a kernel expects at its entry point.

pub mod x86_64;
