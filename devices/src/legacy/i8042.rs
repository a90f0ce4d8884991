//! The i8042 keyboard controller and the AT keyboard behind it.
//!
//! A micro-VM needs it for two things: Linux's `reboot=k` pulses the CPU
//! reset line through it, and the API's `SendCtrlAltDel` reaches the guest
//! as three key presses on its keyboard, which Linux turns into a restart.
//!
//! vm-superio's `I8042Device` covers only the first: it answers every read
//! with zero, so the status register never shows a byte waiting, Linux's
//! "read control byte" command times out and the driver gives up
//! (`i8042: probe of i8042 failed with error -5`). With no driver bound there
//! is no keyboard to press keys on. This controller answers the commands
//! Linux 6.1's i8042 and atkbd drivers send, so the keyboard is registered
//! (`AT Translated Set 2 keyboard`) and key bytes raise IRQ 1.
//!
//! The model: one output register (what the data port reads; the status
//! register's OBF bit says it is full) fed from two bounded queues, the
//! controller's own replies first and then the keyboard's bytes. A byte is
//! moved into the empty register after every access; when that happens with
//! keyboard interrupts enabled in the control byte, the IRQ eventfd is
//! written (the line is edge-triggered, one edge per byte, as Linux's
//! handler reads one byte per interrupt). There is no mouse port: commands
//! for it are accepted and have no effect, so a guest that probes for one
//! finds nothing.
//!
//! Everything the guest writes is untrusted: every byte value is handled,
//! queues drop what does not fit, and nothing here panics or allocates
//! beyond the fixed queue bounds.

use std::collections::VecDeque;
use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAccess, BusDevice};
use crate::legacy::EventFdTrigger;

/// Offset of the data port (0x60) from the device's base.
pub const DATA_PORT: u64 = 0;
/// Offset of the command/status port (0x64) from the device's base.
pub const COMMAND_PORT: u64 = 4;

// Status register bits.
const SR_OBF: u8 = 0x01;
const SR_SYS: u8 = 0x04;
const SR_CMD: u8 = 0x08;
/// Set when the keylock switch is off; Linux warns "Keylock active" if not.
const SR_NOT_LOCKED: u8 = 0x10;

// Control byte ("command byte", internal RAM byte 0) bits.
const CB_KBD_INT: u8 = 0x01;
const CB_SYS: u8 = 0x04;
const CB_KBD_DISABLE: u8 = 0x10;
const CB_AUX_DISABLE: u8 = 0x20;
const CB_TRANSLATE: u8 = 0x40;

/// What a BIOS leaves after POST: translation on (Linux keeps the mode it
/// finds, and expects it for "AT Translated Set 2"), keyboard interrupt on,
/// system flag set, no mouse.
const INITIAL_CONTROL: u8 = CB_TRANSLATE | CB_AUX_DISABLE | CB_SYS | CB_KBD_INT;

// Controller commands written to the command port.
const CMD_READ_RAM: u8 = 0x20; // ..=0x3f: read RAM byte (0 is the control byte)
const CMD_WRITE_RAM: u8 = 0x60; // ..=0x7f: write RAM byte, parameter follows
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_FIRST: u8 = 0xf0; // ..=0xff: pulse output port bits 0-3

/// Self-test passed.
const SELF_TEST_OK: u8 = 0x55;
/// Interface test: no clock or data line stuck.
const INTERFACE_OK: u8 = 0x00;

/// Output port bit 0: the CPU reset line, active low.
const OP_RESET_DEASSERTED: u8 = 0x01;
/// Output port as a BIOS leaves it: not in reset, A20 enabled.
const INITIAL_OUTPUT_PORT: u8 = 0x03;

// Keyboard commands (bytes written to the data port) and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCAN_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5;
const KBD_DEFAULTS: u8 = 0xf6;
const KBD_RESEND: u8 = 0xfe;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
/// An MF2 keyboard's ID. Through the translator the second byte is 0x41.
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_ID_TRANSLATED: [u8; 2] = [0xab, 0x41];

/// Bound of the controller's reply queue. Every command answers at most one
/// byte, so this only overflows when the guest never reads.
const CONTROLLER_QUEUE: usize = 16;
/// Bound of the keyboard's buffer, the size Linux's driver expects
/// (`I8042_BUFFER_SIZE`); it also holds a whole Ctrl-Alt-Del.
const KEYBOARD_QUEUE: usize = 16;

/// A key as both scan code sets spell its make code.
#[derive(Clone, Copy)]
struct Key {
    set1: u8,
    set2: u8,
    extended: bool,
}

const KEY_LEFT_CTRL: Key = Key {
    set1: 0x1d,
    set2: 0x14,
    extended: false,
};
const KEY_LEFT_ALT: Key = Key {
    set1: 0x38,
    set2: 0x11,
    extended: false,
};
const KEY_DELETE: Key = Key {
    set1: 0x53,
    set2: 0x71,
    extended: true,
};

const PREFIX_EXTENDED: u8 = 0xe0;
const SET2_BREAK: u8 = 0xf0;
const SET1_BREAK: u8 = 0x80;

/// The bytes of one key press (`make`) or release, as the guest reads them:
/// set 1 when the controller translates, the keyboard's set 2 otherwise.
fn key_bytes(key: Key, make: bool, translate: bool, out: &mut Vec<u8>) {
    if key.extended {
        out.push(PREFIX_EXTENDED);
    }
    match (translate, make) {
        (true, true) => out.push(key.set1),
        (true, false) => out.push(key.set1 | SET1_BREAK),
        (false, true) => out.push(key.set2),
        (false, false) => out.extend([SET2_BREAK, key.set2]),
    }
}

/// A byte the keyboard owes a parameter for, after the command that takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KbdParam {
    Leds,
    Typematic,
    ScanSet,
}

/// The keyboard on the first port: its command state and its send buffer.
#[derive(Debug)]
struct Keyboard {
    queue: VecDeque<u8>,
    awaiting: Option<KbdParam>,
    scanning: bool,
    leds: u8,
    typematic: u8,
    /// Last byte sent, for the resend command.
    last_sent: u8,
}

impl Keyboard {
    fn new() -> Self {
        Self {
            queue: VecDeque::with_capacity(KEYBOARD_QUEUE),
            awaiting: None,
            scanning: true,
            leds: 0,
            typematic: 0x2b,
            last_sent: KBD_ACK,
        }
    }

    fn room(&self) -> usize {
        KEYBOARD_QUEUE - self.queue.len()
    }

    /// Sends `bytes`; a real keyboard whose buffer is full loses them.
    fn send(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.queue.len() < KEYBOARD_QUEUE {
                self.queue.push_back(b);
                if b != KBD_RESEND {
                    self.last_sent = b;
                }
            }
        }
    }

    fn defaults(&mut self) {
        self.typematic = 0x2b;
        self.awaiting = None;
    }

    /// A byte from the host (the guest's data-port write), answered as an
    /// MF2 keyboard answers it. `translate` picks how scan-set numbers and
    /// the ID look once they pass the controller.
    fn receive(&mut self, byte: u8, translate: bool) {
        // A command byte while a parameter is awaited starts a new command,
        // as on real keyboards; anything else is the parameter.
        if let Some(param) = self.awaiting.take() {
            if byte < KBD_SET_LEDS {
                self.parameter(param, byte, translate);
                return;
            }
        }
        match byte {
            KBD_RESET => {
                self.queue.clear();
                self.defaults();
                self.scanning = true;
                self.leds = 0;
                self.send(&[KBD_ACK, KBD_BAT_OK]);
            }
            KBD_RESEND => {
                let last = self.last_sent;
                self.send(&[last]);
            }
            KBD_DEFAULTS => {
                self.defaults();
                self.send(&[KBD_ACK]);
            }
            KBD_DISABLE => {
                self.defaults();
                self.scanning = false;
                self.send(&[KBD_ACK]);
            }
            KBD_ENABLE => {
                self.queue.clear();
                self.scanning = true;
                self.send(&[KBD_ACK]);
            }
            KBD_TYPEMATIC => {
                self.awaiting = Some(KbdParam::Typematic);
                self.send(&[KBD_ACK]);
            }
            KBD_GET_ID => {
                let id = if translate { KBD_ID_TRANSLATED } else { KBD_ID };
                self.send(&[KBD_ACK, id[0], id[1]]);
            }
            KBD_SCAN_SET => {
                self.awaiting = Some(KbdParam::ScanSet);
                self.send(&[KBD_ACK]);
            }
            KBD_ECHO => self.send(&[KBD_ECHO]),
            KBD_SET_LEDS => {
                self.awaiting = Some(KbdParam::Leds);
                self.send(&[KBD_ACK]);
            }
            // 0xf7..=0xfd: set-3 key-type commands; acknowledged and, as
            // this keyboard only speaks set 2, without effect.
            0xf7..=0xfd => self.send(&[KBD_ACK]),
            // Not a command: a keyboard asks for it again.
            _ => self.send(&[KBD_RESEND]),
        }
    }

    fn parameter(&mut self, param: KbdParam, byte: u8, translate: bool) {
        match param {
            KbdParam::Leds => {
                self.leds = byte & 0x07;
                self.send(&[KBD_ACK]);
            }
            KbdParam::Typematic => {
                self.typematic = byte & 0x7f;
                self.send(&[KBD_ACK]);
            }
            // 0 asks which set is in use; only set 2 is spoken, so asking
            // for another is refused. Through the translator set 2 reads
            // as 0x41.
            KbdParam::ScanSet => match byte {
                0 => self.send(&[KBD_ACK, if translate { 0x41 } else { 0x02 }]),
                2 => self.send(&[KBD_ACK]),
                _ => self.send(&[KBD_RESEND]),
            },
        }
    }
}

/// The i8042: control byte, output register and queues, the keyboard, and
/// the two lines it drives (CPU reset and IRQ 1), both eventfds the VMM
/// wires up.
#[derive(Debug)]
pub struct I8042 {
    reset: EventFdTrigger,
    irq: EventFdTrigger,
    /// Internal RAM; byte 0 is the control byte.
    ram: [u8; 32],
    output_port: u8,
    /// The command whose parameter the next data-port write is.
    awaiting: Option<u8>,
    /// Whether the last write went to the command port (status bit 3).
    last_was_command: bool,
    /// The output register; `Some` means OBF is set.
    output: Option<u8>,
    /// What the data port reads once the register has been emptied.
    stale: u8,
    replies: VecDeque<u8>,
    kbd: Keyboard,
}

impl I8042 {
    /// Makes a controller that writes `reset` when the guest resets the CPU
    /// and `irq` (wired to IRQ 1) for every byte it has for the guest.
    pub fn new(reset: EventFd, irq: EventFd) -> Self {
        let mut ram = [0; 32];
        ram[0] = INITIAL_CONTROL;
        Self {
            reset: EventFdTrigger(reset),
            irq: EventFdTrigger(irq),
            ram,
            output_port: INITIAL_OUTPUT_PORT,
            awaiting: None,
            last_was_command: false,
            output: None,
            stale: 0,
            replies: VecDeque::with_capacity(CONTROLLER_QUEUE),
            kbd: Keyboard::new(),
        }
    }

    /// Presses and releases Ctrl, Alt and Delete, as a user at the keyboard
    /// would, so the guest restarts the way it chose to (Linux's keyboard
    /// driver calls `ctrl_alt_del()`).
    ///
    /// The sequence goes into the keyboard's buffer whole or not at all.
    /// Errors: `WouldBlock` if the guest has not drained the buffer enough
    /// for it, `Other` if the guest has disabled scanning (the keyboard
    /// would drop the keys), or the IRQ eventfd's write error.
    pub fn trigger_ctrl_alt_del(&mut self) -> io::Result<()> {
        if !self.kbd.scanning {
            return Err(io::Error::other("the guest has disabled keyboard scanning"));
        }
        let translate = self.control() & CB_TRANSLATE != 0;
        let mut bytes = Vec::with_capacity(KEYBOARD_QUEUE);
        for key in [KEY_LEFT_CTRL, KEY_LEFT_ALT, KEY_DELETE] {
            key_bytes(key, true, translate, &mut bytes);
        }
        for key in [KEY_DELETE, KEY_LEFT_ALT, KEY_LEFT_CTRL] {
            key_bytes(key, false, translate, &mut bytes);
        }
        if bytes.len() > self.kbd.room() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "keyboard buffer full: the guest is not reading it",
            ));
        }
        self.kbd.send(&bytes);
        self.refill()
    }

    fn control(&self) -> u8 {
        self.ram[0]
    }

    fn status(&self) -> u8 {
        let mut s = SR_NOT_LOCKED;
        if self.output.is_some() {
            s |= SR_OBF;
        }
        if self.control() & CB_SYS != 0 {
            s |= SR_SYS;
        }
        if self.last_was_command {
            s |= SR_CMD;
        }
        s
    }

    fn irq_enabled(&self) -> bool {
        self.control() & CB_KBD_INT != 0
    }

    fn raise_irq(&self) -> io::Result<()> {
        self.irq.trigger()
    }

    /// Moves the next byte into an empty output register: controller
    /// replies first, then keyboard bytes unless the keyboard interface is
    /// disabled. Raises the IRQ for a byte that arrived.
    fn refill(&mut self) -> io::Result<()> {
        if self.output.is_some() {
            return Ok(());
        }
        let next = match self.replies.pop_front() {
            Some(b) => Some(b),
            None if self.control() & CB_KBD_DISABLE == 0 => self.kbd.queue.pop_front(),
            None => None,
        };
        if let Some(b) = next {
            self.output = Some(b);
            if self.irq_enabled() {
                self.raise_irq()?;
            }
        }
        Ok(())
    }

    fn reply(&mut self, byte: u8) {
        if self.replies.len() < CONTROLLER_QUEUE {
            self.replies.push_back(byte);
        }
    }

    fn reset_cpu(&self) {
        if let Err(e) = self.reset.trigger() {
            log::warn!("i8042: could not signal reset: {e}");
        }
    }

    fn set_control(&mut self, value: u8) -> io::Result<()> {
        let was_enabled = self.irq_enabled();
        self.ram[0] = value;
        // Enabling the interrupt with a byte already waiting raises the
        // line, which the edge-triggered pin sees as a new interrupt.
        if !was_enabled && self.irq_enabled() && self.output.is_some() {
            self.raise_irq()?;
        }
        Ok(())
    }

    fn read_data(&mut self) -> u8 {
        if let Some(b) = self.output.take() {
            self.stale = b;
        }
        self.stale
    }

    fn command(&mut self, cmd: u8) {
        // A command always starts afresh, even if a parameter was owed.
        self.awaiting = None;
        match cmd {
            0x20..=0x3f => self.reply(self.ram[usize::from(cmd - CMD_READ_RAM)]),
            0x60..=0x7f
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OUTPUT
            | CMD_WRITE_AUX_OUTPUT
            | CMD_WRITE_AUX => self.awaiting = Some(cmd),
            CMD_AUX_DISABLE => self.ram[0] |= CB_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ram[0] &= !CB_AUX_DISABLE,
            CMD_AUX_TEST | CMD_KBD_TEST => self.reply(INTERFACE_OK),
            CMD_SELF_TEST => {
                self.ram[0] |= CB_SYS;
                self.reply(SELF_TEST_OK);
            }
            CMD_KBD_DISABLE => self.ram[0] |= CB_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ram[0] &= !CB_KBD_DISABLE,
            CMD_READ_OUTPUT_PORT => self.reply(self.output_port),
            // Pulse the output port bits whose bit in the low nibble is 0;
            // bit 0 is the reset line (0xfe is the usual reset command).
            CMD_PULSE_FIRST..=0xff => {
                if cmd & OP_RESET_DEASSERTED == 0 {
                    self.reset_cpu();
                }
            }
            _ => log::debug!("i8042: ignoring controller command {cmd:#04x}"),
        }
    }

    fn data(&mut self, byte: u8) -> io::Result<()> {
        let Some(cmd) = self.awaiting.take() else {
            let translate = self.control() & CB_TRANSLATE != 0;
            self.kbd.receive(byte, translate);
            return Ok(());
        };
        match cmd {
            0x60 => self.set_control(byte)?,
            0x61..=0x7f => self.ram[usize::from(cmd - CMD_WRITE_RAM)] = byte,
            CMD_WRITE_OUTPUT_PORT => {
                self.output_port = byte;
                if byte & OP_RESET_DEASSERTED == 0 {
                    self.reset_cpu();
                }
            }
            CMD_WRITE_KBD_OUTPUT => self.reply(byte),
            // No mouse: what is written for it goes nowhere.
            _ => {}
        }
        Ok(())
    }
}

impl BusDevice for I8042 {
    fn debug_label(&self) -> &str {
        "i8042"
    }

    fn read(&mut self, access: BusAccess, data: &mut [u8]) {
        match (access.offset, data.len()) {
            (DATA_PORT, 1) => {
                data[0] = self.read_data();
                if let Err(e) = self.refill() {
                    log::warn!("i8042: could not raise the keyboard IRQ: {e}");
                }
            }
            (COMMAND_PORT, 1) => data[0] = self.status(),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, access: BusAccess, data: &[u8]) {
        let &[byte] = data else { return };
        let result = match access.offset {
            DATA_PORT => {
                self.last_was_command = false;
                self.data(byte)
            }
            COMMAND_PORT => {
                self.last_was_command = true;
                self.command(byte);
                Ok(())
            }
            _ => return,
        };
        if let Err(e) = result.and_then(|()| self.refill()) {
            log::warn!("i8042: could not raise the keyboard IRQ: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rig {
        dev: I8042,
        reset: EventFd,
        irq: EventFd,
    }

    fn rig() -> Rig {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(reset.try_clone().unwrap(), irq.try_clone().unwrap());
        Rig { dev, reset, irq }
    }

    impl Rig {
        fn out(&mut self, offset: u64, byte: u8) {
            self.dev.write(BusAccess { offset, vcpu: 0 }, &[byte]);
        }

        fn inb(&mut self, offset: u64) -> u8 {
            let mut b = [0u8];
            self.dev.read(BusAccess { offset, vcpu: 0 }, &mut b);
            b[0]
        }

        fn command(&mut self, cmd: u8) {
            self.out(COMMAND_PORT, cmd);
        }

        fn status(&mut self) -> u8 {
            self.inb(COMMAND_PORT)
        }

        /// Reads bytes while OBF is set, as Linux's flush does.
        fn drain(&mut self) -> Vec<u8> {
            let mut v = Vec::new();
            while self.status() & SR_OBF != 0 {
                v.push(self.inb(DATA_PORT));
                // The register itself holds one byte beyond the queues.
                assert!(
                    v.len() <= CONTROLLER_QUEUE + KEYBOARD_QUEUE + 1,
                    "OBF never clears"
                );
            }
            v
        }

        /// How many interrupts were raised since the last call.
        fn irqs(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }

        fn read_control(&mut self) -> u8 {
            self.command(0x20);
            assert_ne!(self.status() & SR_OBF, 0);
            self.inb(DATA_PORT)
        }

        fn write_control(&mut self, value: u8) {
            self.command(0x60);
            self.out(DATA_PORT, value);
        }
    }

    #[test]
    fn reset_command_signals_the_reset_line() {
        let mut r = rig();
        assert!(r.reset.read().is_err(), "no reset before the command");
        r.command(0xfe);
        assert_eq!(r.reset.read().unwrap(), 1);
    }

    #[test]
    fn output_port_reset_bit_signals_the_reset_line() {
        let mut r = rig();
        // Linux enables A20 this way at probe: bit 0 set, no reset.
        r.command(0xd1);
        r.out(DATA_PORT, 0xdf);
        r.command(0xff); // null command, pulses nothing
        assert!(r.reset.read().is_err());
        r.command(0xd0);
        assert_eq!(r.drain(), [0xdf]);
        r.command(0xd1);
        r.out(DATA_PORT, 0xde);
        assert_eq!(r.reset.read().unwrap(), 1);
    }

    #[test]
    fn other_ports_and_widths_do_not_reset() {
        let mut r = rig();
        r.out(2, 0xfe);
        r.out(DATA_PORT, 0xfe);
        r.dev.write(
            BusAccess {
                offset: COMMAND_PORT,
                vcpu: 0,
            },
            &[0xfe, 0xfe],
        );
        assert!(r.reset.read().is_err());
        let mut wide = [0u8; 2];
        r.dev.read(
            BusAccess {
                offset: COMMAND_PORT,
                vcpu: 0,
            },
            &mut wide,
        );
        assert_eq!(wide, [0xff, 0xff]);
    }

    #[test]
    fn idle_status_reports_no_data_and_no_keylock() {
        let mut r = rig();
        let s = r.status();
        assert_eq!(s & SR_OBF, 0);
        assert_ne!(s & SR_NOT_LOCKED, 0);
        assert_ne!(s & SR_SYS, 0);
        assert_eq!(s & 0x02, 0, "input buffer never busy");
    }

    #[test]
    fn self_tests_answer() {
        let mut r = rig();
        r.command(0xaa);
        let s = r.status();
        assert_ne!(s & SR_OBF, 0);
        assert_ne!(s & SR_CMD, 0, "last write was a command");
        assert_eq!(r.drain(), [0x55]);
        r.command(0xab);
        assert_eq!(r.drain(), [0x00]);
        r.command(0xa9);
        assert_eq!(r.drain(), [0x00]);
    }

    #[test]
    fn control_byte_round_trips() {
        let mut r = rig();
        let initial = r.read_control();
        assert_ne!(initial & CB_TRANSLATE, 0, "firmware leaves translation on");
        assert_eq!(r.read_control(), initial, "stable across reads");
        r.write_control(0x30);
        assert_eq!(r.status() & SR_CMD, 0, "last write was data");
        assert_eq!(r.read_control(), 0x30);
        r.command(0xa8);
        r.command(0xae);
        assert_eq!(r.read_control(), 0x00);
        r.command(0xa7);
        r.command(0xad);
        assert_eq!(r.read_control(), 0x30);
        // Other RAM bytes are kept too.
        r.command(0x65);
        r.out(DATA_PORT, 0x5a);
        r.command(0x25);
        assert_eq!(r.drain(), [0x5a]);
    }

    #[test]
    fn keyboard_reset_and_id() {
        let mut r = rig();
        r.out(DATA_PORT, 0xff);
        assert_eq!(r.drain(), [0xfa, 0xaa]);
        r.write_control(CB_SYS | CB_KBD_INT);
        r.out(DATA_PORT, 0xf2);
        assert_eq!(r.drain(), [0xfa, 0xab, 0x83]);
        r.write_control(CB_SYS | CB_KBD_INT | CB_TRANSLATE);
        r.out(DATA_PORT, 0xf2);
        assert_eq!(r.drain(), [0xfa, 0xab, 0x41]);
    }

    #[test]
    fn keyboard_commands_and_parameters() {
        let mut r = rig();
        for cmd in [0xf4, 0xf5, 0xf6] {
            r.out(DATA_PORT, cmd);
            assert_eq!(r.drain(), [0xfa], "command {cmd:#x}");
        }
        // LEDs and typematic rate: ACK for the command, ACK for the byte.
        r.out(DATA_PORT, 0xed);
        r.out(DATA_PORT, 0x07);
        r.out(DATA_PORT, 0xf3);
        r.out(DATA_PORT, 0x20);
        assert_eq!(r.drain(), [0xfa, 0xfa, 0xfa, 0xfa]);
        // A command where a parameter was owed is a new command.
        r.out(DATA_PORT, 0xed);
        r.out(DATA_PORT, 0xee);
        assert_eq!(r.drain(), [0xfa, 0xee]);
        // Scan set: query (translated), set 2 accepted, set 3 refused.
        for (p, want) in [
            (0, vec![0xfa, 0xfa, 0x41]),
            (2, vec![0xfa, 0xfa]),
            (3, vec![0xfa, 0xfe]),
        ] {
            r.out(DATA_PORT, 0xf0);
            r.out(DATA_PORT, p);
            assert_eq!(r.drain(), want, "scan set {p}");
        }
        // Not a command: resend.
        r.out(DATA_PORT, 0x42);
        assert_eq!(r.drain(), [0xfe]);
    }

    #[test]
    fn irq_only_when_enabled() {
        let mut r = rig();
        r.write_control(CB_SYS | CB_TRANSLATE);
        r.irqs();
        r.out(DATA_PORT, 0xff);
        assert_eq!(r.drain(), [0xfa, 0xaa]);
        assert_eq!(r.irqs(), 0, "interrupt disabled");

        r.write_control(CB_SYS | CB_TRANSLATE | CB_KBD_INT);
        r.out(DATA_PORT, 0xff);
        assert_eq!(r.irqs(), 1, "one edge for the first byte");
        assert_eq!(r.inb(DATA_PORT), 0xfa);
        assert_eq!(r.irqs(), 1, "and one for the next");
        assert_eq!(r.inb(DATA_PORT), 0xaa);
        assert_eq!(r.irqs(), 0, "none once empty");

        // A byte already waiting when the interrupt is enabled raises it.
        r.write_control(CB_SYS);
        r.command(0xab);
        assert_eq!(r.irqs(), 0);
        r.write_control(CB_SYS | CB_KBD_INT);
        assert_eq!(r.irqs(), 1);
        assert_eq!(r.drain(), [0x00]);
    }

    #[test]
    fn disabled_keyboard_holds_its_bytes() {
        let mut r = rig();
        r.command(0xad);
        r.out(DATA_PORT, 0xf4);
        assert_eq!(r.status() & SR_OBF, 0);
        r.command(0xae);
        assert_eq!(r.drain(), [0xfa]);
    }

    #[test]
    fn ctrl_alt_del_translated() {
        let mut r = rig();
        r.irqs();
        r.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(r.irqs(), 1);
        assert_eq!(
            r.drain(),
            [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d],
            "set 1: Ctrl, Alt, Del down, then up in reverse"
        );
    }

    #[test]
    fn ctrl_alt_del_untranslated() {
        let mut r = rig();
        r.write_control(CB_SYS | CB_KBD_INT);
        r.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(
            r.drain(),
            [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14],
            "set 2"
        );
    }

    #[test]
    fn ctrl_alt_del_when_the_guest_does_not_read() {
        let mut r = rig();
        let mut queued = 0;
        let err = loop {
            match r.dev.trigger_ctrl_alt_del() {
                Ok(()) => queued += 1,
                Err(e) => break e,
            }
            assert!(queued <= KEYBOARD_QUEUE, "the buffer is bounded");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(queued >= 1);
        // Whole sequences only: none was half-queued.
        assert_eq!(r.drain().len(), 8 * queued);
        r.out(DATA_PORT, 0xf5);
        assert_eq!(r.drain(), [0xfa]);
        assert!(r.dev.trigger_ctrl_alt_del().is_err(), "scanning disabled");
    }

    #[test]
    fn hostile_input_stays_bounded() {
        let mut r = rig();
        for b in 0..=255u8 {
            if b & 0xf1 == 0xf0 || b == 0xd1 {
                continue; // reset pulses and output-port writes
            }
            for _ in 0..64 {
                r.out(COMMAND_PORT, b);
                r.out(DATA_PORT, b);
                r.out(DATA_PORT, 0xf2);
                r.out(DATA_PORT, 0xff);
            }
            r.inb(DATA_PORT);
            r.inb(COMMAND_PORT);
            r.inb(3);
            r.out(1, b);
        }
        // drain() fails if the bytes waiting exceed the bounds.
        r.drain();
        assert!(r.reset.read().is_err(), "nothing here resets");
        // Empty register: the data port repeats the last byte.
        let last = r.inb(DATA_PORT);
        assert_eq!(r.inb(DATA_PORT), last);
    }
}
