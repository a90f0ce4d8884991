//! The machine: builds a VM from a [`VmConfig`] and runs its VMM thread
//! loop on the ring until the guest stops.

use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use vmm_sys_util::eventfd::EventFd;

use devices::virtio::block::BlockDevice;
use devices::virtio::LimiterSide;

use crate::api::{ApiHandle, CommandOutput, Controller, Decision, VmCommand};
use crate::arch::x86_64::acpi::{setup_acpi, AcpiError, AcpiMachine};
use crate::arch::x86_64::cpuid::CpuTemplate;
use crate::arch::x86_64::mptable::{setup_mptable, MptableError};
use crate::boot::{load_kernel, write_boot_data, BootError, BootFiles};
use crate::cmdline::{compose_cmdline, root_param};
use crate::config::{ConfigError, RateLimiterConfig, VmConfig};
use crate::console::ConsoleOut;
use crate::exit_code;
use crate::kvm::pause::PauseGate;
use crate::kvm::vcpu::{
    create_vcpu, install_kick_handler, VcpuError, VcpuEvent, VcpuHandle, VcpuShared,
};
use crate::kvm::vm::{host_is_pvm_native, Vm, VmError};
use crate::machine::builder::{open_backing_file, DeviceSetupError, VirtioBuilder};
use crate::machine::device_manager::{DeviceError, DeviceManager};
use crate::metrics::{ApiCounters, DeviceMetrics, MetricsSink, VcpuExitCounters};
use crate::ring::{Completion, Ring, Token, VirtioDevices};
use crate::runner::{ConsoleTail, RunnerConfig};
use crate::seccomp::{Filters, SeccompError, ThreadKind};
use crate::terminal::RawTerminal;
use devices::legacy::{CommandStatus, ExitCell, ExitReport, PowerRequest};

/// Everything that can stop a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The kernel, initrd or command line could not be loaded.
    #[error("{0}")]
    Boot(#[from] BootError),
    /// KVM refused to create or wire the VM.
    #[error("{0}")]
    Vm(#[from] VmError),
    /// A vCPU could not be created or started.
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    /// A device could not be created or placed.
    #[error("{0}")]
    Device(#[from] DeviceError),
    /// A virtio device could not be set up.
    #[error("{0}")]
    Setup(#[from] DeviceSetupError),
    /// A seccomp filter could not be installed.
    #[error("{0}")]
    Seccomp(#[from] SeccompError),
    /// The MP table could not be written.
    #[error("MP table: {0}")]
    Mptable(#[from] MptableError),
    /// The ACPI tables could not be written.
    #[error("ACPI tables: {0}")]
    Acpi(#[from] AcpiError),
    /// The ring or another host resource failed.
    #[error("{what}: {source}")]
    Host {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

impl VmmError {
    /// The documented exit code for this error: the user's configuration,
    /// KVM's absence, or ringvm's own failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmmError::Config(_) | VmmError::Boot(_) => exit_code::BAD_CONFIG,
            VmmError::Setup(e) => e.exit_code(),
            VmmError::Vm(e) => e.exit_code(),
            _ => exit_code::INTERNAL,
        }
    }
}

/// How the guest ended, which decides ringvm's exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest rebooted (i8042 reset, triple fault) or powered off.
    Stopped(String),
    /// The guest broke a vCPU; the text has the exit reason and registers.
    Crashed(String),
    /// A signal asked ringvm to stop.
    Signal(i32),
    /// A test guest wrote its verdict to the test-exit port: 0 means every
    /// case passed.
    TestVerdict(u32),
    /// The guest init of `ringvm -- CMD` reported the command's status.
    Command(CommandStatus),
}

/// Period of the automatic metrics flush, as Firecracker's.
const METRICS_PERIOD_S: u64 = 60;

/// How long `PATCH /vm` Paused waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the VMM thread checks whether every vCPU halted for good.
const HALT_PROBE_NS: u32 = 500_000_000;

const STDIN_BUF: usize = 64;

/// Buffers the ring reads into; boxed so they never move while the kernel
/// holds a pointer to them.
struct ReadBuffers {
    vcpu_event: [u8; 8],
    reset: [u8; 8],
    debug_exit: [u8; 8],
    acpi_power: [u8; 8],
    api: [u8; 8],
    stdin: [u8; STDIN_BUF],
    signal: [u8; std::mem::size_of::<libc::signalfd_siginfo>()],
    retry: types::Timespec,
    halt_probe: types::Timespec,
    metrics_period: types::Timespec,
}

/// The API socket as the running VMM serves it: requests arrive from the
/// API thread and are answered here, between guest I/O completions.
#[derive(Debug)]
struct ApiRuntime {
    handle: ApiHandle,
    controller: Controller,
}

/// A built VM, ready to run.
pub struct Vmm {
    // The ring is declared first so it is dropped (and waits for every
    // operation it holds) before the buffers and guest memory it points at.
    ring: Ring,
    bufs: Box<ReadBuffers>,
    vm: Vm,
    devices: DeviceManager,
    virtio: VirtioDevices,
    vcpus: Vec<VcpuHandle>,
    stop: Arc<AtomicBool>,
    /// Closed while the guest is paused; the flag a device slot reads to
    /// stop draining its queues meanwhile ([`Vmm::is_paused`]).
    pause: Arc<PauseGate>,
    vcpu_events: Receiver<VcpuEvent>,
    vcpu_events_ready: Arc<EventFd>,
    halted_for_good: Arc<Vec<AtomicBool>>,
    exits: Arc<VcpuExitCounters>,
    api_counters: Arc<ApiCounters>,
    metrics: MetricsSink,
    signal_fd: RawFd,
    debug_exit_evt: EventFd,
    exit_report: Arc<ExitCell>,
    /// Written by the ACPI power registers; the cell says which request.
    acpi_power_evt: EventFd,
    acpi_power: Arc<AtomicU8>,
    /// Running a command (`ringvm -- CMD`): stdin belongs to the command,
    /// not to the console.
    runs_command: bool,
    console_tail: Option<ConsoleTail>,
    /// The configuration booted, kept current (drive paths) for the API.
    config: VmConfig,
    api: Option<ApiRuntime>,
    stdin_open: bool,
    pending_input: Vec<u8>,
    _terminal: Option<RawTerminal>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

fn host(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Host { what, source }
}

/// Picks the CPU template: the user's, else `pvm-safe` on PVM-native KVM
/// (saying so), else `host`.
fn choose_template(config: &VmConfig) -> Result<CpuTemplate, VmmError> {
    if let Some(name) = &config.machine_config.cpu_template {
        return Ok(name.parse().map_err(ConfigError::from)?);
    }
    if host_is_pvm_native() {
        log::info!(
            "PVM-native KVM detected (kvm_pvm): guest code runs in KVM's instruction emulator; \
             applying the pvm-safe CPU template (hides cx16, xsave, avx, smap, smep, ... and adds \
             the matching kernel parameters). Use --cpu-template host to override."
        );
        Ok(CpuTemplate::PvmSafe)
    } else {
        Ok(CpuTemplate::Host)
    }
}

impl Vmm {
    /// Builds the VM: memory, devices, kernel, boot tables and vCPUs. The
    /// vCPUs do not run until [`Vmm::run`].
    pub fn new(config: &VmConfig, process_start: Instant) -> Result<Self, VmmError> {
        config.validate()?;
        // Open the files before touching KVM, so a typo is a config error
        // even on a host without /dev/kvm.
        let boot = &config.boot_source;
        let boot_files = BootFiles::open(&boot.kernel_image_path, boot.initrd_path.as_deref())?;
        // Drives and taps too: a missing or unreadable image is a config
        // error, found before KVM is touched.
        let mut virtio = VirtioBuilder::new();
        for drive in &config.drives {
            virtio.add_drive(drive)?;
        }
        for iface in &config.network_interfaces {
            virtio.add_net(iface)?;
        }
        if let Some(entropy) = &config.entropy {
            virtio.add_rng(entropy)?;
        }
        if let Some(vsock) = &config.vsock {
            virtio.add_vsock(vsock)?;
        }
        if let Some(runner) = &config.runner {
            virtio.add_runner(runner)?;
        }
        let template = choose_template(config)?;
        let vcpu_count = config.machine_config.vcpu_count;

        let vm = Vm::new(config.machine_config.mem_size_mib)?;
        let mut devices = DeviceManager::new()?;
        let (console, console_tail) = match &config.runner {
            None => (
                ConsoleOut::open(&config.serial).map_err(host("opening the serial output"))?,
                None,
            ),
            Some(r) if r.verbose => (ConsoleOut::to_writer(Box::new(std::io::stderr())), None),
            Some(_) => {
                let tail = ConsoleTail::default();
                (ConsoleOut::to_writer(Box::new(tail.clone())), Some(tail))
            }
        };
        let console_is_stdout = console.is_stdout();
        devices.add_serial(&vm, console)?;
        devices.add_i8042(&vm)?;
        let debug_exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(host("eventfd"))?;
        let exit_report =
            devices.add_debug_exit(debug_exit_evt.try_clone().map_err(host("eventfd"))?)?;
        if config.boot_timer {
            devices.add_boot_timer(process_start)?;
        }
        let acpi = config.machine_config.acpi;
        let acpi_power_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(host("eventfd"))?;
        let acpi_power = if acpi {
            devices.add_acpi_pm(acpi_power_evt.try_clone().map_err(host("eventfd"))?)?
        } else {
            Arc::default()
        };

        let mut virtio = virtio.place(&mut devices, &vm)?;

        let runner_params = config
            .runner
            .as_ref()
            .map(RunnerConfig::kernel_params)
            .unwrap_or_default();

        // With ACPI the DSDT describes the devices; the words would make
        // kernels that also parse them register every device twice.
        let device_words = if acpi { &[] } else { devices.virtio_cmdline() };
        let mut extra: Vec<&str> = device_words.iter().map(String::as_str).collect();
        let root = root_param(config);
        extra.extend(root.as_deref());
        extra.extend(runner_params.iter().map(String::as_str));
        extra.extend(template.kernel_params());
        let cmdline = compose_cmdline(config.base_cmdline(), &extra);
        let kernel = load_kernel(vm.memory(), boot_files)?;
        let rsdp = if acpi {
            Some(setup_acpi(
                vm.memory(),
                &AcpiMachine {
                    vcpus: vcpu_count,
                    virtio: devices.virtio_slots(),
                },
            )?)
        } else {
            None
        };
        write_boot_data(vm.memory(), &kernel, &cmdline, rsdp)?;
        setup_mptable(vm.memory(), vcpu_count)?;
        log::debug!("kernel entry {:?}; command line: {cmdline}", kernel.entry());

        let ring =
            Ring::with_buf_rings(virtio.buf_rings()).map_err(host("creating the io_uring ring"))?;
        let signal_fd = crate::stop_signals::signal_fd()
            .map_err(host("signalfd"))?
            .into_raw_fd();
        install_kick_handler()?;

        let (tx, rx) = channel();
        let events_ready = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(host("eventfd"))?);
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(PauseGate::default());
        let exits = Arc::new(VcpuExitCounters::default());
        let halted_for_good: Arc<Vec<AtomicBool>> =
            Arc::new((0..vcpu_count).map(|_| AtomicBool::new(false)).collect());
        let shared = VcpuShared {
            pio: devices.pio.clone(),
            mmio: devices.mmio.clone(),
            stop: stop.clone(),
            events: tx,
            events_ready: events_ready.clone(),
            halted_for_good: halted_for_good.clone(),
            exits: exits.clone(),
            pause: pause.clone(),
            finish_for_emulator: template.finishes_for_emulator(),
        };
        let mut fds = Vec::with_capacity(usize::from(vcpu_count));
        for cpu in 0..vcpu_count {
            fds.push(create_vcpu(&vm, cpu, vcpu_count, template, kernel.entry())?);
        }
        let mut vmm = Self {
            ring,
            bufs: Box::new(ReadBuffers {
                vcpu_event: [0; 8],
                reset: [0; 8],
                debug_exit: [0; 8],
                acpi_power: [0; 8],
                api: [0; 8],
                stdin: [0; STDIN_BUF],
                signal: [0; std::mem::size_of::<libc::signalfd_siginfo>()],
                retry: types::Timespec::new().nsec(10_000_000),
                halt_probe: types::Timespec::new().nsec(HALT_PROBE_NS),
                metrics_period: types::Timespec::new().sec(METRICS_PERIOD_S),
            }),
            vm,
            devices,
            virtio,
            vcpus: Vec::new(),
            stop,
            pause,
            vcpu_events: rx,
            vcpu_events_ready: events_ready,
            halted_for_good,
            exits,
            api_counters: Arc::new(ApiCounters::default()),
            metrics: MetricsSink::default(),
            signal_fd,
            debug_exit_evt,
            exit_report,
            acpi_power_evt,
            acpi_power,
            runs_command: config.runner.is_some(),
            console_tail,
            config: config.clone(),
            api: None,
            // With the console in a file, stdin is not the guest's (as in
            // Firecracker).
            stdin_open: console_is_stdout,
            pending_input: Vec::new(),
            _terminal: None,
        };
        for (cpu, fd) in fds.into_iter().enumerate() {
            let handle = VcpuHandle::spawn(fd, cpu as u8, shared.clone(), vmm.vm.memory().clone())?;
            vmm.vcpus.push(handle);
        }
        Ok(vmm)
    }

    /// Arms an 8-byte eventfd read into `buf`.
    fn arm_eventfd(
        ring: &mut Ring,
        fd: RawFd,
        buf: &mut [u8; 8],
        token: Token,
    ) -> Result<(), VmmError> {
        // SAFETY: `buf` is inside the boxed ReadBuffers, which outlives the
        // ring (the ring is dropped first and waits for its operations).
        unsafe { ring.arm_eventfd(fd, buf, token) }.map_err(host("arming an eventfd read"))
    }

    fn arm_stdin(&mut self) -> Result<(), VmmError> {
        if !self.stdin_open {
            return Ok(());
        }
        let token = if self.pending_input.is_empty() {
            let read = opcode::Read::new(
                types::Fd(libc::STDIN_FILENO),
                self.bufs.stdin.as_mut_ptr(),
                STDIN_BUF as u32,
            )
            // -1: read at the file position, so a regular file given as
            // stdin is read once through, not from offset 0 forever.
            .offset(u64::MAX)
            .build();
            // SAFETY: the boxed buffer outlives the ring, as above.
            return unsafe { self.ring.push(read, Token::Stdin) }.map_err(host("arming stdin"));
        } else {
            Token::StdinRetry
        };
        // The guest has not drained the UART yet: look again in 10 ms.
        let timeout = opcode::Timeout::new(&self.bufs.retry).build();
        // SAFETY: the timespec is in the boxed buffers, as above.
        unsafe { self.ring.push(timeout, token) }.map_err(host("arming the stdin retry"))
    }

    /// Serves the API socket from the VMM thread's ring while the guest
    /// runs; `controller` is already marked running.
    pub fn attach_api(&mut self, handle: ApiHandle, controller: Controller) {
        self.api = Some(ApiRuntime { handle, controller });
    }

    fn arm_api(&mut self) -> Result<(), VmmError> {
        let Some(api) = &self.api else {
            return Ok(());
        };
        let fd = api.handle.requests_fd();
        Self::arm_eventfd(&mut self.ring, fd, &mut self.bufs.api, Token::Api)
    }

    /// Answers every queued API request, then re-arms the requests eventfd
    /// (drain first, re-arm after: no request can slip between).
    fn serve_api(&mut self) -> Result<(), VmmError> {
        loop {
            let Some(api) = self.api.as_mut() else {
                return Ok(());
            };
            let Some((request, responder)) = api.handle.try_recv() else {
                break;
            };
            let answer = match api.controller.handle(request) {
                Decision::Respond(r) => r,
                Decision::Start(_) => api
                    .controller
                    .start_result(Err("the microVM is already running")),
                Decision::Execute(command) => {
                    let result = self.execute(&command);
                    match self.api.as_mut() {
                        Some(api) => api.controller.complete(command, result),
                        None => return Ok(()),
                    }
                }
            };
            self.api_counters.requests.fetch_add(1, Ordering::Relaxed);
            if answer.status >= 400 {
                self.api_counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            responder.respond(answer);
        }
        self.arm_api()
    }

    /// Carries out an API command on the running VM.
    pub fn execute(&mut self, command: &VmCommand) -> Result<CommandOutput, String> {
        match command {
            VmCommand::FlushMetrics => self
                .flush_metrics()
                .map(|()| CommandOutput::Done)
                .map_err(|e| e.to_string()),
            VmCommand::GetVmConfig => Ok(CommandOutput::VmConfig(Box::new(self.config.clone()))),
            VmCommand::SendCtrlAltDel => {
                let Some(i8042) = &self.devices.i8042 else {
                    return Err("this VM has no i8042".into());
                };
                let mut dev = i8042.lock().unwrap_or_else(|e| e.into_inner());
                dev.trigger_ctrl_alt_del()
                    .map(|()| CommandOutput::Done)
                    .map_err(|e| e.to_string())
            }
            VmCommand::UpdateDrive {
                drive_id,
                path_on_host,
                rate_limiter,
            } => {
                let Some(index) = self
                    .config
                    .drives
                    .iter()
                    .position(|d| &d.drive_id == drive_id)
                else {
                    return Err(format!("no drive {drive_id:?}"));
                };
                if let Some(path) = path_on_host {
                    let mut cfg = self.config.drives[index].clone();
                    cfg.path_on_host = path.clone();
                    let file = open_backing_file(&cfg).map_err(|e| e.to_string())?;
                    let drive = self
                        .virtio
                        .device_mut::<BlockDevice>(drive_id)
                        .ok_or_else(|| format!("no drive {drive_id:?}"))?;
                    drive
                        .swap_disk(file)
                        .map_err(|e| format!("drive {drive_id}: {e}"))?;
                    self.config.drives[index] = cfg;
                }
                if let Some(update) = rate_limiter {
                    self.update_rate_limiter(drive_id, LimiterSide::Requests, update)?;
                    let d = &mut self.config.drives[index];
                    d.rate_limiter = RateLimiterConfig::patched(d.rate_limiter, update);
                }
                Ok(CommandOutput::Done)
            }
            VmCommand::UpdateNetRateLimiters { iface_id, rx, tx } => {
                let Some(index) = self
                    .config
                    .network_interfaces
                    .iter()
                    .position(|n| &n.iface_id == iface_id)
                else {
                    return Err(format!("no network interface {iface_id:?}"));
                };
                for (side, update) in [(LimiterSide::Rx, rx), (LimiterSide::Tx, tx)] {
                    if let Some(update) = update {
                        self.update_rate_limiter(iface_id, side, update)?;
                    }
                }
                let n = &mut self.config.network_interfaces[index];
                if let Some(update) = rx {
                    n.rx_rate_limiter = RateLimiterConfig::patched(n.rx_rate_limiter, update);
                }
                if let Some(update) = tx {
                    n.tx_rate_limiter = RateLimiterConfig::patched(n.tx_rate_limiter, update);
                }
                Ok(CommandOutput::Done)
            }
            VmCommand::Pause => self.pause_guest().map(|()| CommandOutput::Done),
            VmCommand::Resume => {
                // Devices first: the guest's first kick after resuming must
                // find them draining again.
                self.virtio
                    .set_paused(false, &mut self.ring, self.vm.memory())
                    .map_err(|e| format!("resuming the devices: {e}"))?;
                self.pause.open();
                log::info!("guest resumed");
                Ok(CommandOutput::Done)
            }
            VmCommand::ConfigureLogger(l) => crate::logger::configure(
                l.log_path.as_deref(),
                l.level.map(|v| v.filter()),
                l.show_level.unwrap_or(true),
                l.show_log_origin.unwrap_or(false),
            )
            .map(|()| CommandOutput::Done)
            .map_err(|e| e.to_string()),
            VmCommand::ConfigureMetrics(m) => self
                .configure_metrics(&m.metrics_path)
                .map(|()| CommandOutput::Done)
                .map_err(|e| e.to_string()),
        }
    }

    /// Whether the guest is paused (`PATCH /vm`): its vCPUs are parked and
    /// its devices take no new requests (what is in flight completes).
    pub fn is_paused(&self) -> bool {
        self.pause.is_paused()
    }

    /// Parks every running vCPU; fails (leaving the guest running) if one
    /// does not leave `KVM_RUN` within [`PAUSE_TIMEOUT`].
    fn pause_guest(&mut self) -> Result<(), String> {
        let vcpus = &self.vcpus;
        let paused = self.pause.close(
            || vcpus.iter().filter(|v| !v.is_finished()).count(),
            || vcpus.iter().for_each(VcpuHandle::kick),
            PAUSE_TIMEOUT,
        );
        if !paused {
            return Err(format!(
                "a vCPU did not stop within {} s",
                PAUSE_TIMEOUT.as_secs()
            ));
        }
        if let Err(e) = self
            .virtio
            .set_paused(true, &mut self.ring, self.vm.memory())
        {
            self.pause.open();
            return Err(format!("pausing the devices: {e}"));
        }
        log::info!("guest paused ({} vCPUs parked)", self.pause.parked());
        Ok(())
    }

    /// Applies a live limiter update (`PATCH`) to the running device: a
    /// bucket the body names is replaced by a full one (or removed by a
    /// zero size or refill time), the other is kept, and queues the old
    /// limit held back are served at once.
    fn update_rate_limiter(
        &mut self,
        device: &str,
        side: LimiterSide,
        update: &RateLimiterConfig,
    ) -> Result<(), String> {
        let applied = self
            .virtio
            .update_rate_limiter(
                device,
                side,
                update.as_update(),
                &mut self.ring,
                self.vm.memory(),
            )
            .map_err(|e| format!("updating the rate limiter of {device}: {e}"))?;
        if !applied {
            return Err(format!("{device} has no {side:?} rate limiter"));
        }
        log::info!("rate limiter of {device} ({side:?}) updated: {update:?}");
        Ok(())
    }

    /// Bounds how long the VMM thread polls the request queues before it
    /// sleeps (`--poll-max-us`; zero never polls).
    pub fn set_poll_max(&mut self, max: std::time::Duration) {
        self.virtio.set_poll_max(max);
    }

    /// Sends metrics to `path` from now on (`--metrics-path`, `PUT /metrics`).
    pub fn configure_metrics(&mut self, path: &std::path::Path) -> std::io::Result<()> {
        self.metrics.configure(path)
    }

    /// The API thread's counters, to bump as requests are answered.
    pub fn api_counters(&self) -> Arc<ApiCounters> {
        self.api_counters.clone()
    }

    /// The console's last bytes, kept when a command ran quietly.
    pub fn console_tail(&self) -> Option<Vec<u8>> {
        self.console_tail.as_ref().map(ConsoleTail::contents)
    }

    /// Every device's counters, for a metrics line or the API.
    pub fn device_metrics(&self) -> Vec<DeviceMetrics> {
        self.virtio.metrics()
    }

    /// Writes one metrics line now (`FlushMetrics`); a no-op without a
    /// metrics path.
    pub fn flush_metrics(&mut self) -> std::io::Result<()> {
        let devices = self.device_metrics();
        let poll = self.virtio.poll_stats();
        self.metrics
            .flush(&devices, &self.exits, &self.api_counters, &poll)
    }

    fn arm_metrics_timer(&mut self) -> Result<(), VmmError> {
        let timeout = opcode::Timeout::new(&self.bufs.metrics_period).build();
        // SAFETY: the timespec is in the boxed buffers, which outlive the ring.
        unsafe { self.ring.push(timeout, Token::MetricsTimer) }
            .map_err(host("arming the metrics timer"))
    }

    fn arm_halt_probe(&mut self) -> Result<(), VmmError> {
        let timeout = opcode::Timeout::new(&self.bufs.halt_probe).build();
        // SAFETY: the timespec is in the boxed buffers, which outlive the ring.
        unsafe { self.ring.push(timeout, Token::HaltProbe) }.map_err(host("arming the halt probe"))
    }

    fn arm_signal(&mut self) -> Result<(), VmmError> {
        let read = opcode::Read::new(
            types::Fd(self.signal_fd),
            self.bufs.signal.as_mut_ptr(),
            self.bufs.signal.len() as u32,
        )
        .build();
        // SAFETY: as for the other boxed buffers.
        unsafe { self.ring.push(read, Token::Signal) }.map_err(host("arming the signalfd"))
    }

    /// Moves stdin bytes into the UART as far as its FIFO has room.
    fn feed_serial(&mut self) {
        let Some(serial) = &self.devices.serial else {
            self.pending_input.clear();
            return;
        };
        let mut serial = serial.lock().unwrap_or_else(|e| e.into_inner());
        match serial.enqueue_input(&self.pending_input) {
            Ok(n) => {
                self.pending_input.drain(..n);
            }
            Err(e) => {
                log::warn!("serial input dropped: {e}");
                self.pending_input.clear();
            }
        }
    }

    /// Runs the VMM thread loop until the guest stops; then stops and
    /// joins every vCPU. The VMM thread's seccomp filter from `filters` is
    /// installed first, then each vCPU thread installs its own and only
    /// then enters the guest.
    pub fn run(&mut self, filters: &Filters) -> Result<GuestExit, VmmError> {
        if self.runs_command {
            // The command reads stdin through its own file; the terminal
            // stays as it is (^C stops ringvm).
            self.stdin_open = false;
        } else if self.stdin_open {
            self._terminal = RawTerminal::enter(libc::STDIN_FILENO);
        }
        filters.install(ThreadKind::Vmm)?;
        #[cfg(feature = "broken-seccomp")]
        crate::seccomp::broken::forbidden_call();
        for vcpu in &mut self.vcpus {
            vcpu.start(filters.clone());
        }
        let events_fd = self.vcpu_events_ready.as_raw_fd();
        let reset_fd = self.devices.reset_evt.as_raw_fd();
        Self::arm_eventfd(
            &mut self.ring,
            events_fd,
            &mut self.bufs.vcpu_event,
            Token::VcpuEvent,
        )?;
        Self::arm_eventfd(
            &mut self.ring,
            reset_fd,
            &mut self.bufs.reset,
            Token::GuestReset,
        )?;
        let debug_exit_fd = self.debug_exit_evt.as_raw_fd();
        Self::arm_eventfd(
            &mut self.ring,
            debug_exit_fd,
            &mut self.bufs.debug_exit,
            Token::DebugExit,
        )?;
        let acpi_power_fd = self.acpi_power_evt.as_raw_fd();
        Self::arm_eventfd(
            &mut self.ring,
            acpi_power_fd,
            &mut self.bufs.acpi_power,
            Token::AcpiPower,
        )?;
        self.arm_signal()?;
        self.arm_stdin()?;
        self.arm_halt_probe()?;
        self.arm_metrics_timer()?;
        self.arm_api()?;
        self.virtio
            .arm(&mut self.ring)
            .map_err(host("arming device eventfds"))?;

        let mut completions = Vec::with_capacity(64);
        let outcome = 'outer: loop {
            completions.clear();
            self.virtio
                .turn(&mut self.ring, self.vm.memory(), &mut completions)
                .map_err(host("io_uring_enter"))?;
            for c in completions.iter().copied() {
                if VirtioDevices::owns(c.token) {
                    self.virtio
                        .dispatch_selected(
                            c.token,
                            c.result,
                            c.selected(),
                            &mut self.ring,
                            self.vm.memory(),
                        )
                        .map_err(host("re-arming a device eventfd"))?;
                } else if let Some(exit) = self.dispatch(c)? {
                    break 'outer exit;
                }
            }
            // Drains that stopped at their budget or on a full ring resume
            // now, after this batch freed slots; then each device makes its
            // one interrupt decision for the turn.
            self.virtio
                .end_turn(&mut self.ring, self.vm.memory())
                .map_err(host("re-arming a device poll"))?;
        };
        self.shutdown();
        Ok(outcome)
    }

    fn dispatch(&mut self, c: Completion) -> Result<Option<GuestExit>, VmmError> {
        match c.token {
            Token::VcpuEvent => {
                if let Ok(event) = self.vcpu_events.try_recv() {
                    return Ok(Some(match event {
                        VcpuEvent::Reset { cpu, reason } => {
                            GuestExit::Stopped(format!("guest reset on vCPU {cpu}: {reason}"))
                        }
                        VcpuEvent::PowerOff { cpu } => {
                            GuestExit::Stopped(format!("guest powered off (vCPU {cpu})"))
                        }
                        VcpuEvent::Crashed { cpu, report } => {
                            GuestExit::Crashed(format!("vCPU {cpu}: {report}"))
                        }
                    }));
                }
                let fd = self.vcpu_events_ready.as_raw_fd();
                Self::arm_eventfd(&mut self.ring, fd, &mut self.bufs.vcpu_event, c.token)?;
            }
            Token::GuestReset => {
                return Ok(Some(GuestExit::Stopped(
                    "guest reset through the i8042".into(),
                )));
            }
            Token::Signal => {
                if c.result > 0 {
                    // SAFETY: the kernel filled the buffer with one
                    // signalfd_siginfo; read_unaligned copes with alignment.
                    let info: libc::signalfd_siginfo =
                        unsafe { std::ptr::read_unaligned(self.bufs.signal.as_ptr().cast()) };
                    return Ok(Some(GuestExit::Signal(info.ssi_signo as i32)));
                }
                self.arm_signal()?;
            }
            Token::Stdin => {
                if c.result <= 0 {
                    // EOF or an unreadable stdin: the guest gets no more input.
                    self.stdin_open = false;
                    return Ok(None);
                }
                let n = (c.result as usize).min(STDIN_BUF);
                self.pending_input.extend_from_slice(&self.bufs.stdin[..n]);
                self.feed_serial();
                self.arm_stdin()?;
            }
            Token::Api => self.serve_api()?,
            Token::AcpiPower => {
                let how = match PowerRequest::load(&self.acpi_power) {
                    PowerRequest::Reset => "guest reset through ACPI",
                    _ => "guest powered off through ACPI (S5)",
                };
                return Ok(Some(GuestExit::Stopped(how.into())));
            }
            Token::DebugExit => {
                return Ok(match self.exit_report.get() {
                    Some(ExitReport::TestVerdict(v)) => Some(GuestExit::TestVerdict(u32::from(v))),
                    Some(ExitReport::Command(status)) => Some(GuestExit::Command(status)),
                    None => None,
                });
            }
            Token::MetricsTimer => {
                if let Err(e) = self.flush_metrics() {
                    log::warn!("metrics flush failed: {e}");
                }
                self.arm_metrics_timer()?;
            }
            Token::HaltProbe => {
                // Flags set by the previous probe's kicks: every vCPU asleep
                // with interrupts off means the guest halted or powered off.
                // Parked vCPUs do not refresh their flags: no verdict and
                // no kicks while the guest is paused.
                if self.pause.is_paused() {
                    self.arm_halt_probe()?;
                    return Ok(None);
                }
                if self
                    .halted_for_good
                    .iter()
                    .all(|h| h.load(Ordering::Acquire))
                {
                    return Ok(Some(GuestExit::Stopped(
                        "guest halted every vCPU with interrupts off (power-off)".into(),
                    )));
                }
                for vcpu in &self.vcpus {
                    vcpu.kick();
                }
                self.arm_halt_probe()?;
            }
            Token::StdinRetry => {
                self.feed_serial();
                self.arm_stdin()?;
            }
            other => log::warn!("completion for an unknown source: {other:?}"),
        }
        Ok(None)
    }

    /// Stops every vCPU and waits for them, so the process ends with no
    /// thread still touching guest memory.
    fn shutdown(&mut self) {
        if self.stop.load(Ordering::Acquire) {
            return; // already done (run() ended, now Drop)
        }
        if self.metrics.is_configured() {
            if let Err(e) = self.flush_metrics() {
                log::warn!("final metrics flush failed: {e}");
            }
        }
        self.stop.store(true, Ordering::Release);
        self.pause.release();
        for vcpu in &mut self.vcpus {
            vcpu.stop_and_join();
        }
        self._terminal = None;
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
        // SAFETY: the signalfd is ours and closed once.
        unsafe { libc::close(self.signal_fd) };
    }
}
