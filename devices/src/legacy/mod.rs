//! The PC devices a Linux guest expects before any virtio device: a serial
//! console, the i8042 that resets the machine, the boot timer that
//! measures how long the guest took to reach init, a test-exit port, and
//! the ACPI power registers that power the machine off.

mod acpi_pm;
mod boot_timer;
mod debug_exit;
mod i8042;
mod serial;

pub use acpi_pm::{
    AcpiPm, PowerRequest, ACPI_PM_PORT, ACPI_PM_PORTS, RESET, RESET_VALUE, S5_SLEEP_TYPE,
    SLEEP_CONTROL, SLEEP_STATUS,
};
pub use boot_timer::{BootTimer, BOOT_TIMER_MAGIC};
pub use debug_exit::{
    CommandStatus, DebugExit, ExitCell, ExitReport, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT,
};
pub use i8042::I8042;
pub use serial::{EventFdTrigger, Serial};
