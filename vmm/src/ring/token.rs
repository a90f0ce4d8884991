//! What each operation on the ring is for: the one list of event sources
//! the VMM thread serves, carried through io_uring as the 64-bit
//! `user_data` of each operation.
//!
//! Layout of the encoded value: the kind in the top 8 bits, a device index
//! in the next 8, and 48 bits of payload (a queue number, or a device's
//! own I/O tag, which [`devices::io::TAG_BITS`] bounds to 48 bits).

use devices::io::TAG_MAX;

/// The source of one completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// A vCPU posted an event (reset, power-off, crash).
    VcpuEvent,
    /// The i8042 pulsed the reset line.
    GuestReset,
    /// Bytes from stdin for the serial console.
    Stdin,
    /// Retry feeding stdin after the UART's FIFO filled up.
    StdinRetry,
    /// A stop signal arrived on the signalfd.
    Signal,
    /// Time to check whether every vCPU halted for good.
    HaltProbe,
    /// Time to write a metrics line.
    MetricsTimer,
    /// A test guest wrote its verdict to the test-exit port.
    DebugExit,
    /// The API thread queued a request.
    Api,
    /// The guest wrote the ACPI sleep or reset register.
    AcpiPower,
    /// The guest kicked queue `queue` of virtio device `device`.
    Kick {
        /// Device index (slot).
        device: u8,
        /// Queue index.
        queue: u16,
    },
    /// Device `device`'s transport sent an activation or reset message.
    TransportMessage {
        /// Device index (slot).
        device: u8,
    },
    /// One of device `device`'s host I/O operations completed.
    DeviceIo {
        /// Device index (slot).
        device: u8,
        /// The device's own tag.
        tag: u64,
        /// Counted as disk I/O, whose completions turns wait to batch.
        batched: bool,
    },
    /// An fd device `device` asked to watch became readable.
    DevicePoll {
        /// Device index (slot).
        device: u8,
    },
    /// Device `device`'s rate limiter has tokens again for queue `queue`.
    Throttle {
        /// Device index (slot).
        device: u8,
        /// Queue index.
        queue: u16,
    },
    /// A cancel the VMM asked for finished (nothing to do).
    Cancel,
    /// Device `device`'s interrupt write through the ring failed (a
    /// successful one posts no completion, see `irq.rs`).
    Interrupt {
        /// Device index (slot).
        device: u8,
    },
    /// A value this build never issued (kept so it can be logged).
    Unknown(u64),
}

const VCPU_EVENT: u8 = 1;
const GUEST_RESET: u8 = 2;
const STDIN: u8 = 3;
const STDIN_RETRY: u8 = 4;
const SIGNAL: u8 = 5;
const HALT_PROBE: u8 = 6;
const METRICS_TIMER: u8 = 7;
const DEBUG_EXIT: u8 = 8;
const API: u8 = 9;
const ACPI_POWER: u8 = 10;
const KICK: u8 = 16;
const TRANSPORT_MESSAGE: u8 = 17;
const DEVICE_IO: u8 = 18;
const DEVICE_IO_BATCHED: u8 = 19;
const DEVICE_POLL: u8 = 20;
const CANCEL: u8 = 21;
const THROTTLE: u8 = 22;
const INTERRUPT: u8 = 23;

fn pack(kind: u8, device: u8, payload: u64) -> u64 {
    (u64::from(kind) << 56) | (u64::from(device) << 48) | (payload & TAG_MAX)
}

impl Token {
    /// The `user_data` carried through the ring.
    pub fn encode(self) -> u64 {
        match self {
            Token::VcpuEvent => pack(VCPU_EVENT, 0, 0),
            Token::GuestReset => pack(GUEST_RESET, 0, 0),
            Token::Stdin => pack(STDIN, 0, 0),
            Token::StdinRetry => pack(STDIN_RETRY, 0, 0),
            Token::Signal => pack(SIGNAL, 0, 0),
            Token::HaltProbe => pack(HALT_PROBE, 0, 0),
            Token::MetricsTimer => pack(METRICS_TIMER, 0, 0),
            Token::DebugExit => pack(DEBUG_EXIT, 0, 0),
            Token::Api => pack(API, 0, 0),
            Token::AcpiPower => pack(ACPI_POWER, 0, 0),
            Token::Kick { device, queue } => pack(KICK, device, u64::from(queue)),
            Token::TransportMessage { device } => pack(TRANSPORT_MESSAGE, device, 0),
            Token::DeviceIo {
                device,
                tag,
                batched,
            } => {
                let kind = if batched {
                    DEVICE_IO_BATCHED
                } else {
                    DEVICE_IO
                };
                pack(kind, device, tag)
            }
            Token::DevicePoll { device } => pack(DEVICE_POLL, device, 0),
            Token::Throttle { device, queue } => pack(THROTTLE, device, u64::from(queue)),
            Token::Cancel => pack(CANCEL, 0, 0),
            Token::Interrupt { device } => pack(INTERRUPT, device, 0),
            Token::Unknown(v) => v,
        }
    }

    /// Recovers the token from a completion's `user_data`.
    pub fn decode(v: u64) -> Self {
        let device = (v >> 48) as u8;
        let payload = v & TAG_MAX;
        match (v >> 56) as u8 {
            VCPU_EVENT => Token::VcpuEvent,
            GUEST_RESET => Token::GuestReset,
            STDIN => Token::Stdin,
            STDIN_RETRY => Token::StdinRetry,
            SIGNAL => Token::Signal,
            HALT_PROBE => Token::HaltProbe,
            METRICS_TIMER => Token::MetricsTimer,
            DEBUG_EXIT => Token::DebugExit,
            API => Token::Api,
            ACPI_POWER => Token::AcpiPower,
            KICK => Token::Kick {
                device,
                queue: payload as u16,
            },
            TRANSPORT_MESSAGE => Token::TransportMessage { device },
            DEVICE_IO | DEVICE_IO_BATCHED => Token::DeviceIo {
                device,
                tag: payload,
                batched: (v >> 56) as u8 == DEVICE_IO_BATCHED,
            },
            DEVICE_POLL => Token::DevicePoll { device },
            THROTTLE => Token::Throttle {
                device,
                queue: payload as u16,
            },
            CANCEL => Token::Cancel,
            INTERRUPT => Token::Interrupt { device },
            _ => Token::Unknown(v),
        }
    }

    /// Whether the op is disk I/O that turns wait a little to batch.
    pub fn is_batched(self) -> bool {
        matches!(self, Token::DeviceIo { batched: true, .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_round_trips() {
        let all = [
            Token::VcpuEvent,
            Token::GuestReset,
            Token::Stdin,
            Token::StdinRetry,
            Token::Signal,
            Token::HaltProbe,
            Token::MetricsTimer,
            Token::DebugExit,
            Token::Api,
            Token::AcpiPower,
            Token::Kick {
                device: 7,
                queue: 300,
            },
            Token::TransportMessage { device: 255 },
            Token::DeviceIo {
                device: 3,
                tag: TAG_MAX,
                batched: true,
            },
            Token::DeviceIo {
                device: 3,
                tag: 0xdead_beef,
                batched: false,
            },
            Token::DevicePoll { device: 1 },
            Token::Throttle {
                device: 2,
                queue: 1,
            },
            Token::Cancel,
            Token::Interrupt { device: 4 },
        ];
        for t in all {
            assert_eq!(Token::decode(t.encode()), t, "{t:?}");
        }
        assert_eq!(Token::decode(u64::MAX), Token::Unknown(u64::MAX));
        assert!(Token::DeviceIo {
            device: 0,
            tag: 1,
            batched: true
        }
        .is_batched());
        assert!(!Token::Stdin.is_batched());
    }
}
