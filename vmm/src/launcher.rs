//! The three ways to describe a VM, brought to one [`VmConfig`] and one
//! run: command-line flags, a Firecracker-style `--config-file`, and the
//! API socket (configure, then `InstanceStart`). The socket, when there is
//! one, stays up while the guest runs and is served by the VMM thread.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::Deserialize;

use crate::api::early::{EarlyAnswers, EarlyError};
use crate::api::types::{LoggerConfig, MachineConfigBody, MetricsConfig};
use crate::api::{
    ApiHandle, ApiRequest, ApiServer, CommandOutput, Controller, Decision, VmCommand,
};
use crate::config::{BootSource, DriveConfig, EntropyConfig, NetConfig, VmConfig};
use crate::exit_code;
use crate::seccomp::{self, Filters, SeccompChoice, SeccompError};
use crate::stop_signals;
use crate::vmm::{GuestExit, Vmm, VmmError};

/// How this run was asked for.
#[derive(Debug)]
pub struct Launch {
    /// Instance id shown by `GET /`.
    pub id: String,
    /// A VM given on the command line (`--kernel` ...), booted at once.
    pub cli_config: Option<VmConfig>,
    /// A Firecracker-style JSON file, booted at once.
    pub config_file: Option<PathBuf>,
    /// The API socket to serve, if any.
    pub api_sock: Option<PathBuf>,
    /// Largest API request body accepted.
    pub max_payload: usize,
    /// `--metrics-path`.
    pub metrics_path: Option<PathBuf>,
    /// `--boot-timer`, applied to whatever config is booted.
    pub boot_timer: bool,
    /// `--no-seccomp` / `--seccomp-filter`.
    pub seccomp: SeccompChoice,
    /// `--poll-max-us`: the VMM thread's largest polling window.
    pub poll_max: std::time::Duration,
}

/// Firecracker's configuration file: the `GET /vm/config` shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(rename = "boot-source")]
    boot_source: BootSource,
    #[serde(rename = "machine-config", default)]
    machine_config: Option<MachineConfigBody>,
    #[serde(default)]
    drives: Vec<DriveConfig>,
    #[serde(rename = "network-interfaces", default)]
    network_interfaces: Vec<NetConfig>,
    #[serde(default)]
    logger: Option<LoggerConfig>,
    #[serde(default)]
    metrics: Option<MetricsConfig>,
    #[serde(default)]
    entropy: Option<EntropyConfig>,
    #[serde(default)]
    vsock: Option<crate::vsock::VsockConfig>,
}

/// Errors before any guest runs, each one line and an exit code.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The config file cannot be read or parsed, or a setting is refused.
    #[error("config file {path}: {why}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The API socket cannot be served.
    #[error("API socket: {0}")]
    Api(String),
    /// The seccomp filters cannot be built (e.g. a bad `--seccomp-filter`).
    #[error("{0}")]
    Seccomp(#[from] SeccompError),
    /// Building or running the VM failed.
    #[error("{0}")]
    Vmm(#[from] VmmError),
}

impl LaunchError {
    /// The documented exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchError::ConfigFile { .. } | LaunchError::Api(_) | LaunchError::Seccomp(_) => {
                exit_code::BAD_CONFIG
            }
            LaunchError::Vmm(e) => e.exit_code(),
        }
    }
}

/// Parses a config file's text into the API requests it stands for, in
/// the order the API would receive them. Public so the fuzzer reaches the
/// parser without touching the filesystem.
pub fn config_file_requests(text: &str) -> Result<Vec<ApiRequest>, serde_json::Error> {
    let file: ConfigFile = serde_json::from_str(text)?;
    let mut requests = vec![ApiRequest::PutBootSource(file.boot_source)];
    if let Some(m) = file.machine_config {
        requests.push(ApiRequest::PutMachineConfig(m));
    }
    requests.extend(file.drives.into_iter().map(ApiRequest::PutDrive));
    requests.extend(
        file.network_interfaces
            .into_iter()
            .map(ApiRequest::PutNetworkInterface),
    );
    requests.extend(file.logger.map(ApiRequest::PutLogger));
    requests.extend(file.metrics.map(ApiRequest::PutMetrics));
    requests.extend(file.entropy.map(ApiRequest::PutEntropy));
    requests.extend(file.vsock.map(ApiRequest::PutVsock));
    Ok(requests)
}

/// Feeds a config file to the controller as the API requests it stands
/// for, so the file is checked exactly as the API checks them.
fn apply_config_file(controller: &mut Controller, path: &Path) -> Result<(), LaunchError> {
    let err = |why: String| LaunchError::ConfigFile {
        path: path.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let requests = config_file_requests(&text).map_err(|e| err(e.to_string()))?;
    let mut pending_metrics = None;
    for request in requests {
        let answer = match controller.handle(request) {
            Decision::Respond(r) => r,
            Decision::Execute(cmd) => {
                let result = execute_before_boot(&cmd, &mut pending_metrics);
                controller.complete(cmd, result)
            }
            Decision::Start(_) => continue,
        };
        if let Some(why) = answer.fault_message() {
            return Err(err(why));
        }
    }
    Ok(())
}

/// What the VMM can do for an API command before a VM exists.
fn execute_before_boot(
    command: &VmCommand,
    pending_metrics: &mut Option<PathBuf>,
) -> Result<CommandOutput, String> {
    match command {
        VmCommand::ConfigureLogger(l) => crate::logger::configure(
            l.log_path.as_deref(),
            l.level.map(|v| v.filter()),
            l.show_level.unwrap_or(true),
            l.show_log_origin.unwrap_or(false),
        )
        .map(|()| CommandOutput::Done)
        .map_err(|e| e.to_string()),
        VmCommand::ConfigureMetrics(m) => {
            // Open it now so a bad path is refused at once.
            crate::host_file::open_sink(&m.metrics_path)
                .map_err(|e| format!("{}: {e}", m.metrics_path.display()))?;
            *pending_metrics = Some(m.metrics_path.clone());
            Ok(CommandOutput::Done)
        }
        _ => Err("the microVM is not running".into()),
    }
}

/// What ended the wait for `InstanceStart`.
enum Configured {
    /// A VM was built.
    Built(Box<Vmm>),
    /// A stop signal arrived first.
    Stopped(i32),
}

/// Blocks until the API thread has queued requests, or a stop signal is
/// pending; returns that signal.
fn wait_for_requests(api: &ApiHandle, signals: &std::os::fd::OwnedFd) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd {
            fd: api.requests_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: signals.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is an array of two valid pollfds for the whole call.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if fds[1].revents != 0 {
        if let Some(sig) = stop_signals::take_pending(signals) {
            return Some(sig);
        }
    }
    if fds[0].revents != 0 {
        let mut counter = [0u8; 8];
        // SAFETY: reads at most 8 bytes into our stack buffer from the
        // API's eventfd, which lives as long as `api`; it is readable.
        unsafe { libc::read(api.requests_fd(), counter.as_mut_ptr().cast(), 8) };
    }
    None
}

/// Serves the socket until `InstanceStart` builds a VM or a stop signal
/// arrives.
fn configure_over_api(
    api: &ApiHandle,
    controller: &mut Controller,
    pending_metrics: &mut Option<PathBuf>,
    boot_timer: bool,
    start: Instant,
) -> Result<Configured, LaunchError> {
    let signals = stop_signals::signal_fd().map_err(|source| VmmError::Host {
        what: "signalfd",
        source,
    })?;
    loop {
        if let Some(sig) = wait_for_requests(api, &signals) {
            return Ok(Configured::Stopped(sig));
        }
        while let Some((request, responder)) = api.try_recv() {
            let answer = match controller.handle(request) {
                Decision::Respond(r) => r,
                Decision::Execute(cmd) => {
                    let result = execute_before_boot(&cmd, pending_metrics);
                    controller.complete(cmd, result)
                }
                Decision::Start(config) => {
                    let mut config = *config;
                    config.boot_timer = boot_timer;
                    match Vmm::new(&config, start) {
                        Ok(vmm) => {
                            responder.respond(controller.start_result(Ok::<(), String>(())));
                            return Ok(Configured::Built(Box::new(vmm)));
                        }
                        Err(e) => controller.start_result(Err(e)),
                    }
                }
            };
            responder.respond(answer);
        }
    }
}

/// Runs what `launch` asks for and returns the process exit code.
pub fn run(launch: Launch, start: Instant) -> i32 {
    let runs_command = launch
        .cli_config
        .as_ref()
        .is_some_and(|c| c.runner.is_some());
    let outcome = try_run(launch, start);
    if runs_command {
        return match outcome {
            Ok((exit, console)) => command_exit_code(exit, console.as_deref()),
            Err(e) => {
                log::error!("{e}");
                e.exit_code()
            }
        };
    }
    match outcome.map(|(exit, _)| exit) {
        Ok(GuestExit::Command(status)) => {
            log::info!("the guest reported a command status: {status:?}");
            crate::runner::status_exit_code(status)
        }
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
            e.exit_code()
        }
    }
}

/// The exit code of `ringvm -- CMD`: the command's status, or 125 with
/// the reason (and the guest console's last lines) when the guest did not
/// get to report one.
fn command_exit_code(exit: GuestExit, console: Option<&[u8]>) -> i32 {
    use crate::runner::{stage_name, status_exit_code};
    use devices::legacy::CommandStatus;
    let show_console = || {
        if let Some(c) = console.filter(|c| !c.is_empty()) {
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "--- guest console (last {} bytes) ---", c.len());
            let _ = err.write_all(c);
            let _ = writeln!(err, "\n--- end of guest console ---");
        }
    };
    match exit {
        GuestExit::Command(CommandStatus::SetupFailed { stage, errno }) => {
            log::error!(
                "the guest failed before running the command: {}: {}",
                stage_name(stage),
                std::io::Error::from_raw_os_error(i32::from(errno))
            );
            show_console();
            exit_code::GUEST_SETUP_FAILED
        }
        GuestExit::Command(status) => status_exit_code(status),
        GuestExit::Stopped(why) | GuestExit::Crashed(why) => {
            log::error!("the guest stopped before reporting the command's status: {why}");
            show_console();
            exit_code::GUEST_SETUP_FAILED
        }
        GuestExit::TestVerdict(v) => {
            log::error!(
                "the guest wrote verdict {v} to the test-exit port instead of running the command"
            );
            exit_code::GUEST_SETUP_FAILED
        }
        GuestExit::Signal(sig) => exit_code::SIGNAL_BASE + sig,
    }
}

fn try_run(launch: Launch, start: Instant) -> Result<(GuestExit, Option<Vec<u8>>), LaunchError> {
    // Before any thread exists, so every thread inherits the mask.
    stop_signals::block();
    let shares = launch
        .cli_config
        .as_ref()
        .is_some_and(|c| c.runner.is_some());
    let filters = Filters::load(&launch.seccomp, shares)?;
    seccomp::install_violation_handler()?;
    let (api, api_thread) = match &launch.api_sock {
        Some(path) => {
            let (handle, thread) = ApiServer::start(path, launch.max_payload, filters.clone())
                .map_err(|e| LaunchError::Api(e.to_string()))?;
            (Some(handle), Some(thread))
        }
        None => (None, None),
    };
    let result = boot_and_run(&launch, api, &filters, start);
    // The API thread removes the socket file as it ends: wait for it, so
    // no stale socket outlives the process.
    if let Some(thread) = api_thread {
        let _ = thread.join();
    }
    result
}

/// Builds the VM of `config` while [`EarlyAnswers`] answers the API's
/// reads; gives the VM and the API (with any request that needs the VM
/// still queued) back, `controller` marked running.
fn build_while_answering(
    config: &VmConfig,
    api: ApiHandle,
    controller: &mut Controller,
    filters: &Filters,
    start: Instant,
) -> Result<(Vmm, Option<ApiHandle>), LaunchError> {
    let early_error = |e: EarlyError| match e {
        EarlyError::Start(source) => LaunchError::Vmm(VmmError::Host {
            what: "starting the thread answering the API during the build",
            source,
        }),
        EarlyError::Died => LaunchError::Api(e.to_string()),
    };
    let placeholder = Controller::new(String::new(), VmConfig::default());
    let early = EarlyAnswers::start(
        api,
        std::mem::replace(controller, placeholder),
        config.clone(),
        filters,
    )
    .map_err(early_error)?;
    let built = Vmm::new(config, start);
    // Joined before a build error returns, so no request is answered
    // after it; the handle then drops, as it did without this thread.
    let back = early.finish().map_err(early_error)?;
    *controller = back.controller;
    let vmm = built?;
    let counters = vmm.api_counters();
    counters
        .requests
        .fetch_add(back.answered, Ordering::Relaxed);
    counters.errors.fetch_add(back.errors, Ordering::Relaxed);
    Ok((vmm, Some(back.handle)))
}

fn boot_and_run(
    launch: &Launch,
    api: Option<ApiHandle>,
    filters: &Filters,
    start: Instant,
) -> Result<(GuestExit, Option<Vec<u8>>), LaunchError> {
    let mut pending_metrics = launch.metrics_path.clone();
    let mut controller = Controller::new(
        launch.id.clone(),
        launch.cli_config.clone().unwrap_or_default(),
    );
    let immediate = if let Some(path) = &launch.config_file {
        apply_config_file(&mut controller, path)?;
        Some(controller.config().clone())
    } else {
        launch.cli_config.clone()
    };
    let (mut vmm, api) = match (immediate, api) {
        (Some(mut config), Some(api)) => {
            config.boot_timer = launch.boot_timer;
            build_while_answering(&config, api, &mut controller, filters, start)?
        }
        (Some(mut config), None) => {
            config.boot_timer = launch.boot_timer;
            let vmm = Vmm::new(&config, start)?;
            controller.mark_running();
            (vmm, None)
        }
        (None, Some(api)) => {
            let configured = configure_over_api(
                &api,
                &mut controller,
                &mut pending_metrics,
                launch.boot_timer,
                start,
            )?;
            let vmm = match configured {
                Configured::Built(vmm) => *vmm,
                Configured::Stopped(sig) => return Ok((GuestExit::Signal(sig), None)),
            };
            controller.mark_running();
            (vmm, Some(api))
        }
        (None, None) => {
            return Err(LaunchError::Api(
                "nothing to boot: give --kernel, --config-file or --api-sock".into(),
            ))
        }
    };
    if let Some(path) = &pending_metrics {
        vmm.configure_metrics(path)
            .map_err(|source| VmmError::Host {
                what: "opening the metrics file",
                source,
            })?;
    }
    let controller_has_vsock = controller.config().vsock.is_some();
    if let Some(api) = api {
        vmm.attach_api(api, controller);
    }
    // The VMM thread's list widens for a vsock device's socket calls only
    // when there is one.
    let filters = filters.for_vmm_thread(controller_has_vsock);
    vmm.set_poll_max(launch.poll_max);
    let exit = vmm.run(&filters)?;
    let console = vmm.console_tail();
    // Dropping the VM drops the API handle, which stops the API thread.
    drop(vmm);
    Ok((exit, console))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ringvm-cfg-{name}-{}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_firecracker_config_file_fills_the_config() {
        // The files it names are opened, as Firecracker opens them.
        let kernel = write("kernel", "not really a kernel");
        let rootfs = write("rootfs", "");
        let text = r#"{"boot-source":{"kernel_image_path":"KERNEL","boot_args":"console=ttyS0"},
                "machine-config":{"vcpu_count":2,"mem_size_mib":256,"smt":false},
                "drives":[{"drive_id":"rootfs","path_on_host":"ROOTFS","is_root_device":true,"is_read_only":false,
                           "rate_limiter":{"bandwidth":{"size":1048576,"refill_time":100}}}],
                "network-interfaces":[]}"#
            .replace("KERNEL", &kernel.to_string_lossy())
            .replace("ROOTFS", &rootfs.to_string_lossy());
        let p = write("good", &text);
        let mut c = Controller::new("t", VmConfig::default());
        apply_config_file(&mut c, &p).unwrap();
        for f in [&p, &kernel, &rootfs] {
            std::fs::remove_file(f).unwrap();
        }
        assert!(c.config().drives[0].rate_limiter.is_some());
        assert_eq!(c.config().machine_config.vcpu_count, 2);
        assert_eq!(c.config().drives[0].drive_id, "rootfs");
        assert_eq!(c.config().base_cmdline(), "console=ttyS0");
    }

    #[test]
    fn bad_config_files_are_one_line_errors() {
        for (name, text, needle) in [
            (
                "kernel",
                r#"{"boot-source":{"kernel_image_path":"/nonexistent/vmlinux"}}"#,
                "The kernel file cannot be opened",
            ),
            (
                "vcpus",
                r#"{"boot-source":{"kernel_image_path":"/proc/self/stat"},
                   "machine-config":{"vcpu_count":33,"mem_size_mib":128}}"#,
                "number of vCPUs",
            ),
            ("json", "{not json", "key must be a string"),
            (
                "field",
                r#"{"boot-source":{"kernel_image_path":"/k"},"bogus":1}"#,
                "bogus",
            ),
            (
                "twoRoots",
                r#"{"boot-source":{"kernel_image_path":"/proc/self/stat"},"drives":[
                   {"drive_id":"a","path_on_host":"/proc/self/stat","is_root_device":true,"is_read_only":true},
                   {"drive_id":"b","path_on_host":"/proc/self/stat","is_root_device":true,"is_read_only":true}]}"#,
                "root",
            ),
        ] {
            let p = write(name, text);
            let mut c = Controller::new("t", VmConfig::default());
            let e = apply_config_file(&mut c, &p).unwrap_err();
            std::fs::remove_file(&p).unwrap();
            assert!(e.to_string().contains(needle), "{name}: {e}");
            assert_eq!(e.exit_code(), exit_code::BAD_CONFIG);
            assert!(!e.to_string().contains('\n'), "{name}: {e}");
        }
    }

    #[test]
    fn missing_config_file_is_named() {
        let mut c = Controller::new("t", VmConfig::default());
        let e = apply_config_file(&mut c, Path::new("/nonexistent/vm.json")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vm.json"));
    }

    #[test]
    fn metrics_before_boot_are_checked_and_kept() {
        let mut pending = None;
        let cmd = VmCommand::ConfigureMetrics(MetricsConfig {
            metrics_path: "/nonexistent/dir/m.json".into(),
        });
        assert!(execute_before_boot(&cmd, &mut pending).is_err());
        assert!(pending.is_none());
        assert!(execute_before_boot(&VmCommand::SendCtrlAltDel, &mut pending).is_err());
    }
}
