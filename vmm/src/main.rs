//! `ringvm`: command line → [`VmConfig`] → [`Vmm`] → exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use vmm::config::{BootSource, DriveConfig, MachineConfig, NetConfig, VmConfig};
use vmm::exit_code;
use vmm::vmm::{GuestExit, Vmm, VmmError};
use vmm::vstate::vm::VmError;

/// Boot a Linux guest with KVM; its block and network I/O are served from
/// one io_uring ring on one VMM thread.
#[derive(Debug, Parser)]
#[command(name = "ringvm", version = concat!("v", env!("CARGO_PKG_VERSION")), after_help = exit_code::HELP)]
struct Cli {
    /// Guest kernel: an ELF vmlinux (entered through PVH when it has the
    /// PVH note) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs to hand to the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1
    /// i8042.noaux i8042.nomux i8042.dumbkbd"]. ringvm appends its own
    /// parameters (devices, and the pvm-safe set on PVM-native KVM).
    #[arg(long, value_name = "ARGS")]
    cmdline: Option<String>,
    /// Number of vCPUs (1-254).
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    mem: u64,
    /// CPU template: "host" (KVM's supported CPUID, filtered) or "pvm-safe"
    /// (hides what KVM's instruction emulator cannot run and adds the
    /// matching kernel parameters). Default: pvm-safe on PVM-native KVM,
    /// host elsewhere.
    #[arg(long, value_name = "NAME")]
    cpu_template: Option<String>,
    /// Log the time from ringvm's start to the guest's write of 123 to the
    /// boot-timer address (0xd0000000), as Firecracker's --boot-timer does.
    #[arg(long)]
    boot_timer: bool,
    /// A virtio-blk drive: path=FILE[,id=NAME][,ro][,root][,direct=on]
    /// [,cache=unsafe|writeback]. Repeat for more drives (vda, vdb, ...).
    /// `root` adds root=/dev/vdX to the command line; `ro` makes the drive
    /// read-only for the guest.
    #[arg(long, value_name = "OPTIONS")]
    disk: Vec<DriveConfig>,
    /// A virtio-net interface on an existing tap: tap=NAME[,mac=02:..]
    /// [,id=eth0]. ringvm opens the tap (IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR); it never creates host interfaces. Repeat for more.
    #[arg(long, value_name = "OPTIONS")]
    net: Vec<NetConfig>,
    /// Append ringvm's log lines to this file instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Append one JSON line of counters (devices, vCPU exits, API) to this
    /// file every 60 s and at exit.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: log::LevelFilter,
}

impl From<Cli> for VmConfig {
    fn from(cli: Cli) -> Self {
        VmConfig {
            boot_source: BootSource {
                kernel_image_path: cli.kernel,
                boot_args: cli.cmdline,
                initrd_path: cli.initrd,
            },
            machine_config: MachineConfig {
                vcpu_count: cli.cpus,
                mem_size_mib: cli.mem,
                cpu_template: cli.cpu_template,
            },
            drives: cli
                .disk
                .into_iter()
                .enumerate()
                .map(|(i, mut d)| {
                    if d.drive_id.is_empty() {
                        d.drive_id = format!("drive{i}");
                    }
                    d
                })
                .collect(),
            network_interfaces: cli
                .net
                .into_iter()
                .enumerate()
                .map(|(i, mut n)| {
                    if n.iface_id.is_empty() {
                        n.iface_id = format!("eth{i}");
                    }
                    n
                })
                .collect(),
            boot_timer: cli.boot_timer,
        }
    }
}

fn error_exit_code(e: &VmmError) -> i32 {
    match e {
        VmmError::Config(_) | VmmError::Boot(_) => exit_code::BAD_CONFIG,
        VmmError::Drive(vmm::virtio_block::DriveError::Open { .. }) => exit_code::BAD_CONFIG,
        VmmError::Net(
            vmm::virtio_net::NetSetupError::Tap { .. } | vmm::virtio_net::NetSetupError::Mac { .. },
        ) => exit_code::BAD_CONFIG,
        VmmError::Vm(VmError::KvmUnavailable(_) | VmError::MissingCap(_)) => {
            exit_code::KVM_UNAVAILABLE
        }
        _ => exit_code::INTERNAL,
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit_code::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    vmm::logger::init(cli.log_level);
    if let Some(path) = &cli.log_path {
        if let Err(e) = vmm::logger::configure(Some(path), None, true, false) {
            log::error!("cannot open log file {}: {e}", path.display());
            return ExitCode::from(exit_code::BAD_CONFIG as u8);
        }
    }
    let metrics_path = cli.metrics_path.clone();
    let config = VmConfig::from(cli);
    let run = Vmm::new(&config, start).and_then(|mut vmm| {
        if let Some(path) = &metrics_path {
            vmm.configure_metrics(path)
                .map_err(|source| VmmError::Host {
                    what: "opening the metrics file",
                    source,
                })?;
        }
        vmm.run()
    });
    let code = match run {
        Ok(GuestExit::Stopped(why)) => {
            log::info!("{why}; exiting");
            exit_code::GUEST_STOPPED
        }
        Ok(GuestExit::Crashed(report)) => {
            log::error!("the guest stopped the vCPU: {report}");
            exit_code::GUEST_CRASHED
        }
        Ok(GuestExit::TestVerdict(0)) => {
            log::info!("test guest reported success on the test-exit port");
            exit_code::GUEST_STOPPED
        }
        Ok(GuestExit::TestVerdict(v)) => {
            log::error!("test guest reported failure (verdict {v}) on the test-exit port");
            exit_code::GUEST_TEST_FAILED
        }
        Ok(GuestExit::Signal(sig)) => {
            log::info!("stopped by signal {sig}");
            exit_code::SIGNAL_BASE + sig
        }
        Err(e) => {
            log::error!("{e}");
            error_exit_code(&e)
        }
    };
    ExitCode::from(code as u8)
}
