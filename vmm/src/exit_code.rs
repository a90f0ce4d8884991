//! ringvm's process exit codes, documented in `--help` and the README so
//! scripts can tell a guest that shut down from a VMM that could not start.

/// The guest rebooted or powered off.
pub const GUEST_STOPPED: i32 = 0;
/// ringvm itself failed (a host resource, an internal error).
pub const INTERNAL: i32 = 1;
/// The command line could not be parsed.
pub const USAGE: i32 = 2;
/// The configuration is invalid: a missing or unreadable kernel, initrd or
/// disk, a path of the wrong type (a FIFO as a drive), a value out of
/// range, an API socket another process serves, a bad seccomp filter file.
pub const BAD_CONFIG: i32 = 3;
/// KVM is unavailable or lacks a capability ringvm needs.
pub const KVM_UNAVAILABLE: i32 = 4;
/// The guest broke a vCPU (KVM internal error, failed entry); the exit
/// reason and registers are printed.
pub const GUEST_CRASHED: i32 = 5;
/// A test guest reported failed cases through the test-exit port.
pub const GUEST_TEST_FAILED: i32 = 6;
/// `ringvm -- CMD`: the guest failed before running the command (a share
/// would not mount, the kernel panicked, the guest stopped without a
/// status). 125 as `env`, `timeout` and `docker run` use it for "the
/// runner failed", next to 126 (cannot execute) and 127 (not found),
/// which the command itself reports.
pub const GUEST_SETUP_FAILED: i32 = 125;
/// Stopped by a signal: 128 + the signal number, as a shell reports it.
pub const SIGNAL_BASE: i32 = 128;

/// The help text block that lists these codes.
pub const HELP: &str = "\
Exit codes:
  0    the guest rebooted or powered off
  1    internal error in ringvm
  2    usage error (bad command-line syntax)
  3    bad configuration (missing/unreadable kernel, initrd, disk or share; a FIFO or
       other wrong file type; invalid value; API socket in use; bad --seccomp-filter file)
  4    KVM unavailable (/dev/kvm missing or lacking a needed capability)
  5    the guest broke a vCPU (e.g. KVM internal error); reason and registers printed
  6    a test guest wrote a failure verdict to the test-exit port (0x501)
  128+N  stopped by signal N (e.g. 130 for SIGINT, 143 for SIGTERM)
A seccomp violation logs one line naming the syscall and ends ringvm with
SIGSYS (159 in a shell).
With -- COMMAND: the command's own exit status (128+N if signal N killed it);
  125  the guest failed before running the command
  126  the command cannot be executed; 127 it was not found";
