//! The synthetic driver's side of interrupts: how to sleep on the
//! interrupt line, as a guest does it on real KVM (when to kick is the
//! shared driver mock's `DriverQueue::kick_wanted`).

use std::io;
use std::os::fd::AsRawFd;

use vmm_sys_util::eventfd::EventFd;

use super::Res;

/// Sleeps on the irq eventfd for up to `timeout_ms`: `None` if nothing
/// came, else the eventfd counter consumed (the device's irq writes; 0 if
/// a signal raced with the read). The caller re-arms before and acks the
/// interrupt status after, as its virtio driver does.
pub fn wait_irq(irq: &EventFd, timeout_ms: i32) -> Res<Option<u64>> {
    let mut pfd = libc::pollfd {
        fd: irq.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    match rc {
        0 => return Ok(None),
        r if r < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(format!("poll on the irq eventfd: {e}"));
            }
        }
        _ => {}
    }
    match irq.read() {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(0)),
        Err(e) => Err(format!("irq eventfd read: {e}")),
    }
}
