//! `ringvm`: command line → [`Launch`] (one [`VmConfig`] from flags, a
//! config file or the API) → run → exit code.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use vmm::api::http::DEFAULT_MAX_PAYLOAD;
use vmm::config::{BootSource, DriveConfig, EntropyConfig, MachineConfig, NetConfig, VmConfig};
use vmm::exit_code;
use vmm::launcher::{self, Launch};
use vmm::runner::{RunnerConfig, ShareConfig};
use vmm::seccomp::SeccompChoice;

/// What `--help` shows before the exit codes.
const RUNNER_HELP: &str = "\
Run a command in a fresh kernel, with the host's files:
  ringvm --kernel vmlinux -- uname -r
  ringvm --kernel vmlinux --share ./out:/out,rw -- sh -c 'make check > /out/log'
The guest's root is the host's / (or --root-share DIR), read-only with a
tmpfs overlay for writes; the command runs in the current directory (or
--cwd) and ringvm exits with its status.
";

/// Boot a Linux guest with KVM, or run one command in a fresh kernel; its
/// block, network and shared-directory I/O are served from one io_uring
/// ring on one VMM thread.
#[derive(Debug, Parser)]
#[command(
    name = "ringvm",
    version = concat!("v", env!("CARGO_PKG_VERSION")),
    after_help = format!("{RUNNER_HELP}\n{}", exit_code::HELP)
)]
struct Cli {
    /// Guest kernel: an ELF vmlinux (entered through PVH when it has the
    /// PVH note) or a bzImage. Boots at once.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs to hand to the kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1
    /// i8042.noaux i8042.nomux i8042.dumbkbd"]. ringvm adds its own
    /// parameters (devices, and the pvm-safe set on PVM-native KVM) before
    /// any " -- ".
    #[arg(long, value_name = "ARGS", requires = "kernel")]
    cmdline: Option<String>,
    /// Number of vCPUs (1-254; the API and --config-file keep Firecracker's
    /// 1-32).
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
    /// Describe the machine with ACPI tables: "on" (default: virtio-mmio
    /// devices in the DSDT instead of virtio_mmio.device= words, CPUs in
    /// the MADT, power-off through the FADT; what distribution kernels
    /// need) or "off" (the command-line words and the MP table, for kernels
    /// without CONFIG_ACPI).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    acpi: bool,
    /// A virtio-blk drive: path=FILE[,id=NAME][,ro][,root][,direct=on]
    /// [,cache=unsafe|writeback][,bw=SIZE/MS[+BURST]][,ops=N/MS[+BURST]].
    /// Repeat for more drives (vda, vdb, ...). `root` adds root=/dev/vdX to
    /// the command line; `ro` makes the drive read-only for the guest;
    /// bw/ops are Firecracker's token buckets: SIZE bytes (K, M, G) or N
    /// requests per MS milliseconds, plus a one-time BURST.
    #[arg(long, value_name = "OPTIONS", requires = "kernel")]
    disk: Vec<DriveConfig>,
    /// A virtio-net interface on an existing tap: tap=NAME[,mac=02:..]
    /// [,id=eth0][,mtu=N][,rx_bw=..][,rx_ops=..][,tx_bw=..][,tx_ops=..]
    /// (buckets as in --disk). ringvm opens the tap (IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR); it never creates host interfaces. mtu is offered to
    /// the guest and set on the tap. Repeat for more.
    #[arg(long, value_name = "OPTIONS", requires = "kernel")]
    net: Vec<NetConfig>,
    /// A virtio-rng entropy device fed by the host's getrandom (the guest's
    /// crng initialises from it even without a boot-time seed).
    #[arg(long, requires = "kernel")]
    rng: bool,
    /// A virtio-vsock device, Firecracker's hybrid vsock: cid=N,uds=PATH.
    /// The guest's context id N is 3 or more; ringvm listens on PATH (which
    /// must not exist) for host clients that write "CONNECT <port>\n" and
    /// get "OK <host_port>\n"; a guest connection to host port P goes to
    /// the Unix socket PATH_P.
    #[arg(long, value_name = "cid=N,uds=PATH", requires = "kernel")]
    vsock: Option<vmm::vsock::VsockConfig>,
    /// Boot the VM described by this Firecracker-style JSON file
    /// (boot-source, machine-config, drives, network-interfaces, logger,
    /// metrics, entropy, vsock).
    #[arg(long, value_name = "PATH", conflicts_with = "kernel")]
    config_file: Option<PathBuf>,
    /// Serve the Firecracker-compatible JSON API on this Unix socket. Alone,
    /// ringvm waits for the VM to be configured and started over it; with
    /// --kernel or --config-file it boots at once and keeps serving it.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Do not serve the API (for --config-file; the default without
    /// --api-sock).
    #[arg(long, conflicts_with = "api_sock")]
    no_api: bool,
    /// Instance id reported by GET /.
    #[arg(long, value_name = "NAME", default_value = "anonymous-instance")]
    id: String,
    /// Largest API request body accepted, in bytes; larger ones get 400
    /// without being read.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_PAYLOAD)]
    http_api_max_payload_size: usize,
    /// Log the time from ringvm's start to the guest's write of 123 to the
    /// boot-timer address (0xd0000000), as Firecracker's --boot-timer does.
    #[arg(long)]
    boot_timer: bool,
    /// Append ringvm's log lines to this file instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Append one JSON line of counters (devices, vCPU exits, API) to this
    /// file every 60 s and at exit.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace [default: info; warn
    /// when running a command].
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<log::LevelFilter>,
    /// Run without seccomp filters (they are on by default: each thread
    /// may make only the syscalls its job needs).
    #[arg(long)]
    no_seccomp: bool,
    /// Use these seccomp filters instead of the built-in ones: a JSON file
    /// in seccompiler's format (not Firecracker's compiled BPF) with one
    /// filter per thread kind, keyed "vmm", "api" and "vcpu".
    #[arg(long, value_name = "PATH", conflicts_with = "no_seccomp")]
    seccomp_filter: Option<PathBuf>,
    /// Longest time, in microseconds, the VMM thread watches the guest's
    /// request queues before it sleeps (adaptive, like QEMU's
    /// poll-max-ns): a request the guest adds meanwhile is served without
    /// its notification (a VM exit) or a wake-up. 0 turns polling off.
    #[arg(long, value_name = "US", default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=1000))]
    poll_max_us: u64,
    /// Share a host directory with the command's guest:
    /// HOST_DIR[:GUEST_DIR][,rw]. Read-only unless ",rw"; GUEST_DIR
    /// defaults to HOST_DIR. Repeat for more.
    #[arg(long, value_name = "HOST_DIR[:GUEST_DIR][,rw]", requires = "command")]
    share: Vec<ShareConfig>,
    /// The host directory the command's guest sees as / (read-only, with a
    /// tmpfs overlay) [default: the host's /].
    #[arg(long, value_name = "DIR", requires = "command")]
    root_share: Option<PathBuf>,
    /// The command's working directory in the guest [default: the current
    /// directory with the host's root, / with --root-share].
    #[arg(long, value_name = "DIR", requires = "command")]
    cwd: Option<PathBuf>,
    /// Show the guest's console (kernel and init messages) on stderr.
    #[arg(long, requires = "command")]
    verbose: bool,
    /// Run this command in the guest and exit with its status; its
    /// stdin, stdout and stderr are ringvm's.
    #[arg(last = true, value_name = "COMMAND", requires = "kernel")]
    command: Vec<OsString>,
}

/// `on`/`off` for switches that take a value.
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("expected on or off, got {other:?}")),
    }
}

/// Gives unnamed drives and NICs the ids the guest will know them by.
fn name_devices(
    drives: Vec<DriveConfig>,
    nets: Vec<NetConfig>,
) -> (Vec<DriveConfig>, Vec<NetConfig>) {
    let drives = drives
        .into_iter()
        .enumerate()
        .map(|(i, mut d)| {
            if d.drive_id.is_empty() {
                d.drive_id = format!("drive{i}");
            }
            d
        })
        .collect();
    let nets = nets
        .into_iter()
        .enumerate()
        .map(|(i, mut n)| {
            if n.iface_id.is_empty() {
                n.iface_id = format!("eth{i}");
            }
            n
        })
        .collect();
    (drives, nets)
}

impl Cli {
    fn into_launch(self, runner: Option<RunnerConfig>) -> Launch {
        let cli_config = self.kernel.map(|kernel| {
            let (drives, network_interfaces) = name_devices(self.disk, self.net);
            VmConfig {
                boot_source: BootSource {
                    kernel_image_path: kernel,
                    boot_args: self.cmdline,
                    initrd_path: self.initrd,
                },
                machine_config: MachineConfig {
                    vcpu_count: self.cpus,
                    mem_size_mib: self.mem,
                    cpu_template: self.cpu_template,
                    acpi: self.acpi,
                },
                drives,
                network_interfaces,
                entropy: self.rng.then(EntropyConfig::default),
                vsock: self.vsock,
                boot_timer: self.boot_timer,
                serial: Default::default(),
                runner,
            }
        });
        Launch {
            id: self.id,
            cli_config,
            config_file: self.config_file,
            api_sock: if self.no_api { None } else { self.api_sock },
            max_payload: self.http_api_max_payload_size,
            metrics_path: self.metrics_path,
            boot_timer: self.boot_timer,
            poll_max: std::time::Duration::from_micros(self.poll_max_us),
            seccomp: match (self.no_seccomp, self.seccomp_filter) {
                (true, _) => SeccompChoice::Off,
                (false, Some(path)) => SeccompChoice::File(path),
                (false, None) => SeccompChoice::Builtin,
            },
        }
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    // First of all: threads inherit the mask (see stop_signals.rs).
    vmm::stop_signals::block();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit_code::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    if cli.kernel.is_none() && cli.config_file.is_none() && cli.api_sock.is_none() {
        eprintln!("error: give --kernel PATH, --config-file PATH or --api-sock PATH (see --help)");
        return ExitCode::from(exit_code::USAGE as u8);
    }
    let runner = if cli.command.is_empty() {
        None
    } else {
        match RunnerConfig::new(
            cli.command.clone(),
            cli.root_share.clone(),
            cli.share.clone(),
            cli.cwd.clone(),
            cli.verbose,
        ) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(exit_code::BAD_CONFIG as u8);
            }
        }
    };
    let default_level = if runner.is_some() {
        log::LevelFilter::Warn
    } else {
        log::LevelFilter::Info
    };
    vmm::logger::init(cli.log_level.unwrap_or(default_level));
    if let Some(path) = &cli.log_path {
        if let Err(e) = vmm::logger::configure(Some(path), None, true, false) {
            log::error!("cannot open log file {}: {e}", path.display());
            return ExitCode::from(exit_code::BAD_CONFIG as u8);
        }
    }
    let code = launcher::run(cli.into_launch(runner), start);
    ExitCode::from(code as u8)
}
