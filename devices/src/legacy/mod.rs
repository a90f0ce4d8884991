//! The PC devices a Linux guest expects before any virtio device: a serial
//! console, the i8042 that resets the machine, and the boot timer that
//! measures how long the guest took to reach init.

mod boot_timer;
mod i8042;
mod serial;

pub use boot_timer::{BootTimer, BOOT_TIMER_MAGIC};
pub use i8042::I8042;
pub use serial::{EventFdTrigger, Serial};
