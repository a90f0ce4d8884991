//! The API's state machine, as pure logic: a [`VmConfig`] being built
//! before boot, the boot decision, and what is forwarded to the running
//! VMM after it.
//!
//! ```text
//!   Not started ──PUT boot-source/machine-config/drives/network-interfaces──► (config updated)
//!        │
//!        │ InstanceStart (kernel set, config valid)
//!        ▼
//!   Decision::Start(config) ──caller boots──► start_result(Ok)  ──► Running
//!                                          └─► start_result(Err) ──► Not started
//!
//!   Running ⇄ Paused (PATCH /vm, carried out by the VMM):
//!            config PUTs → 400 "not supported after starting";
//!            PATCH drives/network-interfaces/vm, SendCtrlAltDel,
//!            FlushMetrics, GET /vm/config
//!            → Decision::Execute(VmCommand) ──caller runs it──► complete()
//! ```
//!
//! The controller never touches KVM or devices, and files only through a
//! [`HostCheck`] (opening what a PUT names, as Firecracker does), so every
//! rule here is unit-tested; the VMM side owns one and feeds it each
//! request it receives from [`super::ApiHandle::try_recv`].

use std::fmt::Display;
use std::path::PathBuf;

use super::host_check::{HostCheck, HostFiles};
use super::types::{
    ActionType, ApiRequest, ApiResponse, FullVmConfig, InstanceInfo, LoggerConfig,
    MachineConfigBody, MachineConfigUpdate, MachineExtras, MetricsConfig, VmStateRequest,
};
use crate::config::{
    BootSource, ConfigError, DriveConfig, MachineConfig, NetConfig, RateLimiterConfig, VmConfig,
    MAX_BOOT_ARGS,
};

/// Firecracker's answer to a configuration request after boot.
pub const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
/// Firecracker's answer to a runtime request before boot.
pub const NOT_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";
/// Firecracker's answer to `InstanceStart` without `PUT /boot-source`.
pub const MISSING_KERNEL: &str = "Cannot start microvm without kernel configuration.";

/// Firecracker's vCPU limit for the API and config files (ringvm's own
/// `--cpus` goes to [`crate::config::MAX_VCPUS`]).
pub const API_MAX_VCPUS: u8 = 32;
/// Firecracker's answer to a vCPU count it refuses.
pub const BAD_VCPU_COUNT: &str = "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled.";
/// Firecracker's answer to a memory size it refuses.
pub const BAD_MEM_SIZE: &str = "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size.";

/// The instance id Firecracker reports when none is given.
pub const DEFAULT_INSTANCE_ID: &str = "anonymous-instance";

/// ringvm's version, reported by `GET /` and `GET /version`.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the VM is in its life, as `GET /` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Configuration phase: `InstanceStart` has not succeeded yet.
    NotStarted,
    /// The guest has been started.
    Running,
    /// Started, and its vCPUs are stopped (`PATCH /vm` Paused).
    Paused,
}

impl VmState {
    /// Firecracker's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::NotStarted => "Not started",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
        }
    }
}

/// Work only the VMM side can do: it owns the logger, the metrics file
/// and, once running, the devices. Run it, then pass it back to
/// [`Controller::complete`] with the outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmCommand {
    /// Change a running drive: re-open its backing file at `path_on_host`
    /// (Firecracker uses this after the host replaced or resized the file;
    /// the guest sees the new size) and/or replace the buckets its rate
    /// limiter names ([`RateLimiterConfig::as_update`]).
    UpdateDrive {
        /// Which drive.
        drive_id: String,
        /// The new backing file, if any.
        path_on_host: Option<PathBuf>,
        /// The limiter update, if any.
        rate_limiter: Option<RateLimiterConfig>,
    },
    /// Replace the buckets a running interface's limiters name.
    UpdateNetRateLimiters {
        /// Which interface.
        iface_id: String,
        /// Receive-side update, if any.
        rx: Option<RateLimiterConfig>,
        /// Transmit-side update, if any.
        tx: Option<RateLimiterConfig>,
    },
    /// Stop every vCPU (kick it out of KVM_RUN and park it) and let the
    /// devices stop draining their queues.
    Pause,
    /// Let the parked vCPUs and the devices run again.
    Resume,
    /// Press Ctrl+Alt+Del on the guest's keyboard controller.
    SendCtrlAltDel,
    /// Write the metrics now (a no-op when no metrics file is set).
    FlushMetrics,
    /// Report the running VM's configuration (drive paths may have been
    /// patched since boot).
    GetVmConfig,
    /// Apply logger settings.
    ConfigureLogger(LoggerConfig),
    /// Start writing metrics to a file.
    ConfigureMetrics(MetricsConfig),
}

/// What a [`VmCommand`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandOutput {
    /// Done, nothing to report.
    Done,
    /// The running VM's configuration, for [`VmCommand::GetVmConfig`].
    VmConfig(Box<VmConfig>),
}

/// What the caller must do with a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Answer now.
    Respond(ApiResponse),
    /// Build and boot a VM from this configuration, then answer with
    /// [`Controller::start_result`].
    Start(Box<VmConfig>),
    /// Run the command, then answer with [`Controller::complete`].
    Execute(VmCommand),
}

/// The API state machine for one VM.
#[derive(Debug)]
pub struct Controller {
    host: Box<dyn HostCheck>,
    id: String,
    state: VmState,
    /// `InstanceStart` was handed out and its result is not back yet.
    starting: bool,
    config: VmConfig,
    extras: MachineExtras,
    logger: Option<LoggerConfig>,
    metrics: Option<MetricsConfig>,
}

impl Controller {
    /// A controller in the configuration phase, starting from `config`
    /// (the defaults, or what the command line already gave).
    pub fn new(instance_id: impl Into<String>, config: VmConfig) -> Self {
        Self {
            host: Box::new(HostFiles),
            id: instance_id.into(),
            state: VmState::NotStarted,
            starting: false,
            config,
            extras: MachineExtras::default(),
            logger: None,
            metrics: None,
        }
    }

    /// Uses `host` instead of the real files and taps (tests).
    pub fn with_host_check(mut self, host: Box<dyn HostCheck>) -> Self {
        self.host = host;
        self
    }

    /// For a VM booted without the API (`--config-file` or CLI flags) that
    /// still serves the socket: only runtime requests are allowed.
    pub fn mark_running(&mut self) {
        self.state = VmState::Running;
        self.starting = false;
    }

    /// Current state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// The configuration as built so far (or as booted).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Logger settings received through the API, if any.
    pub fn logger(&self) -> Option<&LoggerConfig> {
        self.logger.as_ref()
    }

    /// Metrics settings received through the API, if any.
    pub fn metrics(&self) -> Option<&MetricsConfig> {
        self.metrics.as_ref()
    }

    /// Applies one request: answers it, or says what the caller must do.
    pub fn handle(&mut self, request: ApiRequest) -> Decision {
        use ApiRequest as R;
        let running = self.state != VmState::NotStarted;
        if self.starting {
            return respond(ApiResponse::bad_request(
                "The microVM is starting; retry when InstanceStart has been answered.",
            ));
        }
        match request {
            R::GetInstanceInfo => respond(ApiResponse::ok(&InstanceInfo {
                id: self.id.clone(),
                state: self.state.as_str(),
                vmm_version: VMM_VERSION,
                app_name: "ringvm",
            })),
            R::GetVersion => respond(ApiResponse::ok(&serde_json::json!({
                "firecracker_version": VMM_VERSION,
                "vmm_version": VMM_VERSION,
            }))),
            R::GetMachineConfig => respond(ApiResponse::ok(&MachineConfigBody::from_config(
                &self.config,
                self.extras,
            ))),
            R::GetVmConfig if running => Decision::Execute(VmCommand::GetVmConfig),
            R::GetVmConfig => respond(ApiResponse::ok(&self.full_config(&self.config))),

            R::PutMachineConfig(_)
            | R::PatchMachineConfig(_)
            | R::PutBootSource(_)
            | R::PutDrive(_)
            | R::PutNetworkInterface(_)
            | R::PutLogger(_)
            | R::PutMetrics(_)
            | R::PutSerial(_)
            | R::PutEntropy(_)
            | R::PutVsock(_)
                if running =>
            {
                respond(ApiResponse::bad_request(NOT_AFTER_START))
            }
            R::PatchDrive(_)
            | R::PatchNetworkInterface(_)
            | R::PatchVmState(_)
            | R::Action(ActionType::FlushMetrics | ActionType::SendCtrlAltDel)
                if !running =>
            {
                respond(ApiResponse::bad_request(NOT_BEFORE_START))
            }

            R::PutMachineConfig(body) => {
                let update = MachineConfigUpdate {
                    vcpu_count: Some(body.vcpu_count),
                    mem_size_mib: Some(body.mem_size_mib),
                    smt: Some(body.smt),
                    track_dirty_pages: Some(body.track_dirty_pages),
                    huge_pages: Some(body.huge_pages),
                    cpu_template: Some(body.cpu_template.unwrap_or_else(|| "None".into())),
                };
                respond(self.update_machine(update))
            }
            R::PatchMachineConfig(update) => respond(self.update_machine(update)),
            R::PutBootSource(boot_source) => respond(self.put_boot_source(boot_source)),
            R::PutDrive(drive) => respond(self.put_drive(drive)),
            R::PutSerial(serial) => {
                self.config.serial = serial;
                respond(ApiResponse::no_content())
            }
            R::PutNetworkInterface(iface) => respond(self.put_net(iface)),
            R::PutEntropy(entropy) => {
                let mut candidate = self.config.clone();
                candidate.entropy = Some(entropy);
                respond(self.accept(candidate))
            }
            R::PutVsock(vsock) => respond(self.put_vsock(vsock)),
            R::PatchDrive(update) => {
                if !self
                    .config
                    .drives
                    .iter()
                    .any(|d| d.drive_id == update.drive_id)
                {
                    return respond(ApiResponse::bad_request(format!(
                        "Invalid block device ID: no drive {:?} is attached.",
                        update.drive_id
                    )));
                }
                if update.path_on_host.is_none() && update.rate_limiter.is_none() {
                    // Firecracker's vhost-user "config update"; ringvm's
                    // drives have nothing to refresh.
                    return respond(ApiResponse::no_content());
                }
                Decision::Execute(VmCommand::UpdateDrive {
                    drive_id: update.drive_id,
                    path_on_host: update.path_on_host,
                    rate_limiter: update.rate_limiter,
                })
            }
            R::PatchNetworkInterface(update) => {
                if !self
                    .config
                    .network_interfaces
                    .iter()
                    .any(|n| n.iface_id == update.iface_id)
                {
                    return respond(ApiResponse::bad_request(format!(
                        "Invalid network interface ID: no interface {:?} is attached.",
                        update.iface_id
                    )));
                }
                if update.rx_rate_limiter.is_none() && update.tx_rate_limiter.is_none() {
                    return respond(ApiResponse::no_content());
                }
                Decision::Execute(VmCommand::UpdateNetRateLimiters {
                    iface_id: update.iface_id,
                    rx: update.rx_rate_limiter,
                    tx: update.tx_rate_limiter,
                })
            }
            R::PatchVmState(VmStateRequest::Paused) => Decision::Execute(VmCommand::Pause),
            R::PatchVmState(VmStateRequest::Resumed) => Decision::Execute(VmCommand::Resume),
            R::PutLogger(logger) => Decision::Execute(VmCommand::ConfigureLogger(logger)),
            R::PutMetrics(_) if self.metrics.is_some() => respond(ApiResponse::bad_request(
                "Reinitialization of metrics not allowed.",
            )),
            R::PutMetrics(metrics) => Decision::Execute(VmCommand::ConfigureMetrics(metrics)),

            R::Action(ActionType::InstanceStart) if running => {
                respond(ApiResponse::bad_request(NOT_AFTER_START))
            }
            R::Action(ActionType::InstanceStart) => self.instance_start(),
            R::Action(ActionType::SendCtrlAltDel) => Decision::Execute(VmCommand::SendCtrlAltDel),
            R::Action(ActionType::FlushMetrics) => Decision::Execute(VmCommand::FlushMetrics),
        }
    }

    /// Records the outcome of a [`Decision::Start`] and gives the answer to
    /// `InstanceStart`. After an error the VM stays "Not started" and can
    /// be reconfigured (the caller exits instead if the failure left it
    /// unusable).
    pub fn start_result<E: Display>(&mut self, result: Result<(), E>) -> ApiResponse {
        self.starting = false;
        match result {
            Ok(()) => {
                self.state = VmState::Running;
                ApiResponse::no_content()
            }
            Err(e) => ApiResponse::bad_request(format!("Failed to start the microVM: {e}")),
        }
    }

    /// Records the outcome of a [`Decision::Execute`] and gives the answer.
    pub fn complete<E: Display>(
        &mut self,
        command: VmCommand,
        result: Result<CommandOutput, E>,
    ) -> ApiResponse {
        let output = match result {
            Ok(output) => output,
            Err(e) => {
                let what = match command {
                    VmCommand::UpdateDrive { .. } => "Cannot update the drive",
                    VmCommand::UpdateNetRateLimiters { .. } => "Cannot update the interface",
                    VmCommand::Pause => "Cannot pause the microVM",
                    VmCommand::Resume => "Cannot resume the microVM",
                    VmCommand::SendCtrlAltDel => "Cannot send Ctrl+Alt+Del",
                    VmCommand::FlushMetrics => "Cannot flush the metrics",
                    VmCommand::GetVmConfig => "Cannot read the VM configuration",
                    VmCommand::ConfigureLogger(_) => "Cannot configure the logger",
                    VmCommand::ConfigureMetrics(_) => "Cannot configure the metrics",
                };
                return ApiResponse::bad_request(format!("{what}: {e}"));
            }
        };
        match command {
            VmCommand::UpdateDrive {
                drive_id,
                path_on_host,
                rate_limiter,
            } => {
                if let Some(d) = self
                    .config
                    .drives
                    .iter_mut()
                    .find(|d| d.drive_id == drive_id)
                {
                    if let Some(path) = path_on_host {
                        d.path_on_host = path;
                    }
                    if let Some(update) = rate_limiter {
                        d.rate_limiter = RateLimiterConfig::patched(d.rate_limiter, &update);
                    }
                }
                ApiResponse::no_content()
            }
            VmCommand::UpdateNetRateLimiters { iface_id, rx, tx } => {
                if let Some(n) = self
                    .config
                    .network_interfaces
                    .iter_mut()
                    .find(|n| n.iface_id == iface_id)
                {
                    if let Some(update) = rx {
                        n.rx_rate_limiter = RateLimiterConfig::patched(n.rx_rate_limiter, &update);
                    }
                    if let Some(update) = tx {
                        n.tx_rate_limiter = RateLimiterConfig::patched(n.tx_rate_limiter, &update);
                    }
                }
                ApiResponse::no_content()
            }
            VmCommand::Pause => {
                self.state = VmState::Paused;
                ApiResponse::no_content()
            }
            VmCommand::Resume => {
                self.state = VmState::Running;
                ApiResponse::no_content()
            }
            VmCommand::GetVmConfig => match output {
                CommandOutput::VmConfig(config) => ApiResponse::ok(&self.full_config(&config)),
                CommandOutput::Done => ApiResponse::ok(&self.full_config(&self.config)),
            },
            VmCommand::ConfigureLogger(logger) => {
                self.logger = Some(logger);
                ApiResponse::no_content()
            }
            VmCommand::ConfigureMetrics(metrics) => {
                self.metrics = Some(metrics);
                ApiResponse::no_content()
            }
            VmCommand::SendCtrlAltDel | VmCommand::FlushMetrics => ApiResponse::no_content(),
        }
    }

    fn instance_start(&mut self) -> Decision {
        if self
            .config
            .boot_source
            .kernel_image_path
            .as_os_str()
            .is_empty()
        {
            return respond(ApiResponse::bad_request(MISSING_KERNEL));
        }
        if let Err(e) = self.config.validate() {
            return respond(ApiResponse::bad_request(format!(
                "Invalid microVM configuration: {e}"
            )));
        }
        self.starting = true;
        Decision::Start(Box::new(self.config.clone()))
    }

    fn update_machine(&mut self, update: MachineConfigUpdate) -> ApiResponse {
        let mut candidate = self.config.clone();
        let m: &mut MachineConfig = &mut candidate.machine_config;
        if let Some(v) = update.vcpu_count {
            m.vcpu_count = v;
        }
        if let Some(v) = update.mem_size_mib {
            m.mem_size_mib = v;
        }
        if let Some(t) = update.cpu_template {
            // Firecracker's "None" is "no template": let ringvm choose.
            m.cpu_template = (t != "None").then_some(t);
        }
        let mut extras = self.extras;
        if let Some(v) = update.smt {
            extras.smt = v;
        }
        if let Some(v) = update.track_dirty_pages {
            extras.track_dirty_pages = v;
        }
        if let Some(v) = update.huge_pages {
            extras.huge_pages = v;
        }
        // Firecracker's limits, before ringvm's own (which are wider for
        // vCPUs and narrower for memory).
        let vcpus = candidate.machine_config.vcpu_count;
        if vcpus == 0 || vcpus > API_MAX_VCPUS || (extras.smt && vcpus > 1 && vcpus % 2 == 1) {
            return ApiResponse::bad_request(BAD_VCPU_COUNT);
        }
        let mem = candidate.machine_config.mem_size_mib;
        if mem == 0 || !mem.is_multiple_of(extras.huge_pages.page_mib()) {
            return ApiResponse::bad_request(BAD_MEM_SIZE);
        }
        let response = self.accept(candidate);
        if response.status == 204 {
            self.extras = extras;
        }
        response
    }

    fn put_boot_source(&mut self, boot_source: BootSource) -> ApiResponse {
        if let Some(args) = &boot_source.boot_args {
            if let Err(e) = linux_loader::cmdline::Cmdline::try_from(args, MAX_BOOT_ARGS) {
                return ApiResponse::bad_request(format!(
                    "Boot source error: The kernel command line is invalid: {e}"
                ));
            }
        }
        let checked = self
            .host
            .kernel(&boot_source.kernel_image_path)
            .and_then(|()| match &boot_source.initrd_path {
                Some(initrd) => self.host.initrd(initrd),
                None => Ok(()),
            });
        if let Err(why) = checked {
            return ApiResponse::bad_request(why);
        }
        self.config.boot_source = boot_source;
        ApiResponse::no_content()
    }

    fn put_drive(&mut self, drive: DriveConfig) -> ApiResponse {
        let mut candidate = self.config.clone();
        upsert(&mut candidate.drives, drive.clone(), |d| {
            d.drive_id == drive.drive_id
        });
        // The body is checked before the host is touched.
        if let Err(refused) = valid_but_for_kernel(&candidate) {
            return refused;
        }
        if let Err(why) = self.host.drive(&drive) {
            return ApiResponse::bad_request(why);
        }
        self.config = candidate;
        ApiResponse::no_content()
    }

    fn put_net(&mut self, iface: NetConfig) -> ApiResponse {
        // A malformed or multicast MAC never gets here: `MacAddr` refused it
        // while the body was parsed, as it does for --net and config files.
        for other in self
            .config
            .network_interfaces
            .iter()
            .filter(|n| n.iface_id != iface.iface_id)
        {
            if other.host_dev_name == iface.host_dev_name {
                return ApiResponse::bad_request(format!(
                    "The host device name {:?} is already in use by interface {:?}.",
                    iface.host_dev_name, other.iface_id
                ));
            }
            if let (Some(a), Some(b)) = (&other.guest_mac, &iface.guest_mac) {
                if a == b {
                    return ApiResponse::bad_request(format!(
                        "The guest MAC address {b} is already in use by interface {:?}.",
                        other.iface_id
                    ));
                }
            }
        }
        let mut candidate = self.config.clone();
        upsert(&mut candidate.network_interfaces, iface.clone(), |n| {
            n.iface_id == iface.iface_id
        });
        if let Err(refused) = valid_but_for_kernel(&candidate) {
            return refused;
        }
        if let Err(why) = self.host.tap(&iface) {
            return ApiResponse::bad_request(why);
        }
        self.config = candidate;
        ApiResponse::no_content()
    }

    /// Adopts `candidate` if it is valid apart from a kernel, which may
    /// still come.
    fn accept(&mut self, candidate: VmConfig) -> ApiResponse {
        match valid_but_for_kernel(&candidate) {
            Ok(()) => {
                self.config = candidate;
                ApiResponse::no_content()
            }
            Err(refused) => refused,
        }
    }

    /// `PUT /vsock`: checked, and its socket bound and removed again, as
    /// Firecracker binds it at this call.
    fn put_vsock(&mut self, vsock: crate::vsock::VsockConfig) -> ApiResponse {
        if let Err(e) = vsock.validate() {
            return ApiResponse::bad_request(e.to_string());
        }
        if let Err(why) = self.host.vsock(&vsock) {
            return ApiResponse::bad_request(why);
        }
        let mut candidate = self.config.clone();
        candidate.vsock = Some(vsock);
        self.accept(candidate)
    }

    fn full_config(&self, config: &VmConfig) -> FullVmConfig {
        FullVmConfig {
            boot_source: config.boot_source.clone(),
            machine_config: MachineConfigBody::from_config(config, self.extras),
            drives: config.drives.clone(),
            network_interfaces: config.network_interfaces.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
            entropy: config.entropy.clone(),
            vsock: config.vsock.clone(),
        }
    }
}

fn respond(response: ApiResponse) -> Decision {
    Decision::Respond(response)
}

/// A pre-boot configuration is whole apart from a kernel, which may still
/// come; anything else it lacks is the client's 400.
fn valid_but_for_kernel(candidate: &VmConfig) -> Result<(), ApiResponse> {
    match candidate.validate() {
        Ok(()) | Err(ConfigError::NoKernel) => Ok(()),
        Err(e) => Err(ApiResponse::bad_request(e.to_string())),
    }
}

/// Replaces the entry `same` picks in `list` with `item`, or appends it: a
/// `PUT` of an existing id replaces it, as in Firecracker.
fn upsert<T>(list: &mut Vec<T>, item: T, same: impl Fn(&T) -> bool) {
    match list.iter_mut().find(|e| same(e)) {
        Some(existing) => *existing = item,
        None => list.push(item),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::http::Method;
    use crate::api::routes;
    use crate::config::ConfigError;

    /// Routes and handles one request, as the two sides do together.
    fn send(c: &mut Controller, method: Method, path: &str, body: &str) -> Decision {
        let request = routes::parse(&method, path, body.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        c.handle(request)
    }

    fn answer(c: &mut Controller, method: Method, path: &str, body: &str) -> ApiResponse {
        match send(c, method, path, body) {
            Decision::Respond(r) => r,
            other => panic!("{path}: expected an answer, got {other:?}"),
        }
    }

    fn json(r: &ApiResponse) -> serde_json::Value {
        assert_eq!(r.status, 200, "{r:?}");
        serde_json::from_str(r.body.as_deref().unwrap_or_default()).unwrap()
    }

    /// Files and taps whose names start with "/missing" or "missing" do
    /// not exist; everything else does.
    #[derive(Debug)]
    struct FakeHost;

    impl HostCheck for FakeHost {
        fn kernel(&self, path: &std::path::Path) -> Result<(), String> {
            check(path.to_string_lossy().as_ref(), "kernel")
        }
        fn initrd(&self, path: &std::path::Path) -> Result<(), String> {
            check(path.to_string_lossy().as_ref(), "initrd")
        }
        fn drive(&self, drive: &DriveConfig) -> Result<(), String> {
            check(drive.path_on_host.to_string_lossy().as_ref(), "drive")
        }
        fn tap(&self, iface: &NetConfig) -> Result<(), String> {
            check(&iface.host_dev_name, "tap")
        }
        fn vsock(&self, v: &crate::vsock::VsockConfig) -> Result<(), String> {
            check(v.uds_path.to_string_lossy().as_ref(), "vsock socket")
        }
    }

    fn check(name: &str, what: &str) -> Result<(), String> {
        if name.trim_start_matches('/').starts_with("missing") {
            Err(format!("no {what} {name}"))
        } else {
            Ok(())
        }
    }

    fn controller() -> Controller {
        Controller::new("vm0", VmConfig::default()).with_host_check(Box::new(FakeHost))
    }

    fn configured() -> Controller {
        let mut c = controller();
        let r = answer(
            &mut c,
            Method::Put,
            "/boot-source",
            r#"{"kernel_image_path":"/vmlinux"}"#,
        );
        assert_eq!(r.status, 204);
        let r = answer(
            &mut c,
            Method::Put,
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/img","is_root_device":true,"is_read_only":false}"#,
        );
        assert_eq!(r.status, 204, "{r:?}");
        c
    }

    fn boot(c: &mut Controller) {
        let d = send(
            c,
            Method::Put,
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
        );
        assert!(matches!(d, Decision::Start(_)), "{d:?}");
        assert_eq!(c.start_result::<String>(Ok(())), ApiResponse::no_content());
        assert_eq!(c.state(), VmState::Running);
    }

    #[test]
    fn instance_info_and_version() {
        let mut c = Controller::new(DEFAULT_INSTANCE_ID, VmConfig::default())
            .with_host_check(Box::new(FakeHost));
        let v = json(&answer(&mut c, Method::Get, "/", ""));
        assert_eq!(v["id"], "anonymous-instance");
        assert_eq!(v["state"], "Not started");
        assert_eq!(v["app_name"], "ringvm");
        assert_eq!(v["vmm_version"], VMM_VERSION);
        let v = json(&answer(&mut c, Method::Get, "/version", ""));
        assert_eq!(v["firecracker_version"], VMM_VERSION);
        c.mark_running();
        let v = json(&answer(&mut c, Method::Get, "/", ""));
        assert_eq!(v["state"], "Running");
    }

    #[test]
    fn machine_config_put_get_patch() {
        let mut c = controller();
        let v = json(&answer(&mut c, Method::Get, "/machine-config", ""));
        assert_eq!(
            v,
            serde_json::json!({"vcpu_count":1,"mem_size_mib":128,"smt":false,
                               "track_dirty_pages":false,"huge_pages":"None"})
        );
        let body = r#"{"vcpu_count":2,"mem_size_mib":512,"smt":true,"track_dirty_pages":true,"huge_pages":"2M","cpu_template":"None"}"#;
        assert_eq!(
            answer(&mut c, Method::Put, "/machine-config", body).status,
            204
        );
        let v = json(&answer(&mut c, Method::Get, "/machine-config", ""));
        assert_eq!(
            v,
            serde_json::json!({"vcpu_count":2,"mem_size_mib":512,"smt":true,
                               "track_dirty_pages":true,"huge_pages":"2M"})
        );
        assert_eq!(c.config().machine_config.cpu_template, None);

        // PATCH keeps what it does not name.
        let r = answer(
            &mut c,
            Method::Patch,
            "/machine-config",
            r#"{"mem_size_mib":1024,"cpu_template":"host"}"#,
        );
        assert_eq!(r.status, 204);
        assert_eq!(c.config().machine_config.vcpu_count, 2);
        assert_eq!(c.config().machine_config.mem_size_mib, 1024);
        assert_eq!(
            c.config().machine_config.cpu_template.as_deref(),
            Some("host")
        );

        // PUT resets the optional fields to their defaults.
        let r = answer(
            &mut c,
            Method::Put,
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":256}"#,
        );
        assert_eq!(r.status, 204);
        let v = json(&answer(&mut c, Method::Get, "/machine-config", ""));
        assert_eq!(v["smt"], false);
        assert_eq!(v["huge_pages"], "None");
        assert_eq!(c.config().machine_config.cpu_template, None);

        // Invalid values are refused whole, naming the problem.
        let r = answer(
            &mut c,
            Method::Patch,
            "/machine-config",
            r#"{"vcpu_count":0,"smt":true}"#,
        );
        assert_eq!(r.fault_message().as_deref(), Some(BAD_VCPU_COUNT));
        assert_eq!(c.config().machine_config.vcpu_count, 1);
        assert_eq!(
            json(&answer(&mut c, Method::Get, "/machine-config", ""))["smt"],
            false
        );
        let r = answer(
            &mut c,
            Method::Put,
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":1}"#,
        );
        assert_eq!(r.status, 400);
        let r = answer(
            &mut c,
            Method::Put,
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":128,"cpu_template":"T2"}"#,
        );
        assert!(
            r.fault_message().unwrap_or_default().contains("T2"),
            "{r:?}"
        );
    }

    #[test]
    fn instance_start_without_kernel() {
        let mut c = controller();
        let r = answer(
            &mut c,
            Method::Put,
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
        );
        assert_eq!(r.status, 400);
        assert_eq!(r.fault_message().as_deref(), Some(MISSING_KERNEL));
        assert_eq!(c.state(), VmState::NotStarted);
    }

    #[test]
    fn instance_start_hands_out_the_config_then_locks_it() {
        let mut c = configured();
        let d = send(
            &mut c,
            Method::Put,
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
        );
        let Decision::Start(config) = d else {
            panic!("{d:?}")
        };
        assert_eq!(
            config.boot_source.kernel_image_path,
            PathBuf::from("/vmlinux")
        );
        assert_eq!(config.drives.len(), 1);
        // While the caller boots, nothing else is accepted.
        let r = answer(&mut c, Method::Get, "/", "");
        assert_eq!(r.status, 400);
        assert_eq!(c.start_result::<String>(Ok(())).status, 204);

        for (method, path, body) in [
            (Method::Put, "/boot-source", r#"{"kernel_image_path":"/k"}"#),
            (
                Method::Put,
                "/machine-config",
                r#"{"vcpu_count":1,"mem_size_mib":128}"#,
            ),
            (Method::Patch, "/machine-config", r#"{"vcpu_count":2}"#),
            (
                Method::Put,
                "/drives/d2",
                r#"{"drive_id":"d2","path_on_host":"/x","is_root_device":false}"#,
            ),
            (Method::Put, "/serial", r#"{"serial_out_path":"/s"}"#),
            (
                Method::Put,
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#,
            ),
            (Method::Put, "/logger", r#"{"log_path":"/l"}"#),
            (Method::Put, "/metrics", r#"{"metrics_path":"/m"}"#),
            (
                Method::Put,
                "/actions",
                r#"{"action_type":"InstanceStart"}"#,
            ),
        ] {
            let r = answer(&mut c, method, path, body);
            assert_eq!(r.status, 400, "{path}");
            assert_eq!(
                r.fault_message().as_deref(),
                Some(NOT_AFTER_START),
                "{path}"
            );
        }
        // Reads still work.
        assert_eq!(
            json(&answer(&mut c, Method::Get, "/machine-config", ""))["vcpu_count"],
            1
        );
    }

    #[test]
    fn failed_start_stays_configurable() {
        let mut c = configured();
        assert!(matches!(
            send(
                &mut c,
                Method::Put,
                "/actions",
                r#"{"action_type":"InstanceStart"}"#
            ),
            Decision::Start(_)
        ));
        let r = c.start_result(Err("kernel file not found"));
        assert_eq!(r.status, 400);
        assert_eq!(
            r.fault_message().as_deref(),
            Some("Failed to start the microVM: kernel file not found")
        );
        assert_eq!(c.state(), VmState::NotStarted);
        assert_eq!(
            answer(
                &mut c,
                Method::Put,
                "/boot-source",
                r#"{"kernel_image_path":"/k2"}"#
            )
            .status,
            204
        );
    }

    #[test]
    fn instance_start_validates_the_whole_config() {
        let mut c = configured();
        c.config.drives.push(c.config.drives[0].clone());
        let r = answer(
            &mut c,
            Method::Put,
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
        );
        assert!(
            r.fault_message()
                .unwrap_or_default()
                .starts_with("Invalid microVM configuration: "),
            "{r:?}"
        );
    }

    #[test]
    fn drives_are_replaced_by_id_and_checked() {
        let mut c = configured();
        let r = answer(
            &mut c,
            Method::Put,
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/img2","is_root_device":true,"is_read_only":true}"#,
        );
        assert_eq!(r.status, 204);
        assert_eq!(c.config().drives.len(), 1);
        assert!(c.config().drives[0].is_read_only);
        // A second root is refused and not stored.
        let r = answer(
            &mut c,
            Method::Put,
            "/drives/data",
            r#"{"drive_id":"data","path_on_host":"/d","is_root_device":true,"is_read_only":false}"#,
        );
        assert_eq!(r.fault_message(), Some(ConfigError::TwoRoots.to_string()));
        assert_eq!(c.config().drives.len(), 1);
        // Ids longer than the virtio serial are fine (Firecracker has no
        // limit; the guest's serial is the first 20 bytes).
        let r = answer(
            &mut c,
            Method::Put,
            "/drives/a123456789012345678901",
            r#"{"drive_id":"a123456789012345678901","path_on_host":"/d","is_root_device":false}"#,
        );
        assert_eq!(r.status, 204, "{r:?}");
        // The file is opened at PUT: a missing one is refused there.
        let r = answer(
            &mut c,
            Method::Put,
            "/drives/gone",
            r#"{"drive_id":"gone","path_on_host":"/missing.img","is_root_device":false}"#,
        );
        assert_eq!(r.fault_message().as_deref(), Some("no drive /missing.img"));
        let r = answer(
            &mut c,
            Method::Put,
            "/drives/vhost",
            r#"{"drive_id":"vhost","socket":"/run/vhost.sock","is_root_device":false}"#,
        );
        assert!(
            r.fault_message()
                .unwrap_or_default()
                .contains("no vhost-user"),
            "{r:?}"
        );
        assert_eq!(c.config().drives.len(), 2);
        let v = json(&answer(&mut c, Method::Get, "/vm/config", ""));
        assert_eq!(v["drives"][0]["path_on_host"], "/img2");
        assert_eq!(v["boot-source"]["kernel_image_path"], "/vmlinux");
    }

    #[test]
    fn patch_drive_is_post_boot_only_and_forwarded() {
        let mut c = configured();
        let r = answer(
            &mut c,
            Method::Patch,
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/new"}"#,
        );
        assert_eq!(r.fault_message().as_deref(), Some(NOT_BEFORE_START));
        boot(&mut c);
        let d = send(
            &mut c,
            Method::Patch,
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/new"}"#,
        );
        let Decision::Execute(cmd) = d else {
            panic!("{d:?}")
        };
        assert_eq!(
            cmd,
            VmCommand::UpdateDrive {
                drive_id: "rootfs".into(),
                path_on_host: Some("/new".into()),
                rate_limiter: None,
            }
        );
        let r = c.complete::<String>(cmd.clone(), Err("No such file".into()));
        assert_eq!(
            r.fault_message().as_deref(),
            Some("Cannot update the drive: No such file")
        );
        assert_eq!(c.config().drives[0].path_on_host, PathBuf::from("/img"));
        assert_eq!(
            c.complete::<String>(cmd, Ok(CommandOutput::Done)).status,
            204
        );
        assert_eq!(c.config().drives[0].path_on_host, PathBuf::from("/new"));

        // A rate limiter goes to the VMM as a typed update, and GET
        // /vm/config shows the merged result.
        let d = send(
            &mut c,
            Method::Patch,
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","rate_limiter":{"ops":{"size":100,"refill_time":1000}}}"#,
        );
        let Decision::Execute(cmd) = d else {
            panic!("{d:?}")
        };
        let VmCommand::UpdateDrive {
            path_on_host: None,
            rate_limiter: Some(rl),
            ..
        } = &cmd
        else {
            panic!("{cmd:?}")
        };
        assert_eq!(rl.ops.map(|b| (b.size, b.refill_time)), Some((100, 1000)));
        assert_eq!(
            c.complete::<String>(cmd, Ok(CommandOutput::Done)).status,
            204
        );
        assert_eq!(
            c.config().drives[0]
                .rate_limiter
                .and_then(|r| r.ops)
                .map(|b| b.size),
            Some(100)
        );
        // Nothing to change: answered at once, as Firecracker answers a
        // vhost-user config refresh.
        let r = answer(
            &mut c,
            Method::Patch,
            "/drives/rootfs",
            r#"{"drive_id":"rootfs"}"#,
        );
        assert_eq!(r.status, 204);
        let r = answer(
            &mut c,
            Method::Patch,
            "/drives/nope",
            r#"{"drive_id":"nope","path_on_host":"/x"}"#,
        );
        assert_eq!(r.status, 400);
    }

    #[test]
    fn runtime_actions() {
        let mut c = configured();
        let r = answer(
            &mut c,
            Method::Put,
            "/actions",
            r#"{"action_type":"SendCtrlAltDel"}"#,
        );
        assert_eq!(r.fault_message().as_deref(), Some(NOT_BEFORE_START));
        // Firecracker refuses FlushMetrics before boot too.
        let r = answer(
            &mut c,
            Method::Put,
            "/actions",
            r#"{"action_type":"FlushMetrics"}"#,
        );
        assert_eq!(r.fault_message().as_deref(), Some(NOT_BEFORE_START));
        boot(&mut c);
        let d = send(
            &mut c,
            Method::Put,
            "/actions",
            r#"{"action_type":"SendCtrlAltDel"}"#,
        );
        assert_eq!(d, Decision::Execute(VmCommand::SendCtrlAltDel));
        assert_eq!(
            c.complete::<String>(VmCommand::SendCtrlAltDel, Ok(CommandOutput::Done))
                .status,
            204
        );
        assert_eq!(
            send(
                &mut c,
                Method::Put,
                "/actions",
                r#"{"action_type":"FlushMetrics"}"#
            ),
            Decision::Execute(VmCommand::FlushMetrics)
        );
    }

    #[test]
    fn vm_config_after_boot_comes_from_the_vmm() {
        let mut c = configured();
        boot(&mut c);
        let d = send(&mut c, Method::Get, "/vm/config", "");
        assert_eq!(d, Decision::Execute(VmCommand::GetVmConfig));
        let mut live = c.config().clone();
        live.drives[0].path_on_host = "/live".into();
        let r = c.complete::<String>(
            VmCommand::GetVmConfig,
            Ok(CommandOutput::VmConfig(Box::new(live))),
        );
        let v = json(&r);
        assert_eq!(v["drives"][0]["path_on_host"], "/live");
        assert_eq!(v["machine-config"]["vcpu_count"], 1);
        assert!(v["logger"].is_null());
    }

    #[test]
    fn vsock_is_checked_at_put_shown_and_locked_after_boot() {
        let mut c = configured();
        let put = |c: &mut Controller, body: &str| answer(c, Method::Put, "/vsock", body);
        let r = put(&mut c, r#"{"guest_cid":2,"uds_path":"/v.sock"}"#);
        assert_eq!(r.status, 400);
        assert!(r
            .fault_message()
            .unwrap_or_default()
            .contains("guest_cid 2"));
        let r = put(&mut c, r#"{"guest_cid":3,"uds_path":"/missing/v.sock"}"#);
        assert_eq!(r.status, 400);
        let r = put(&mut c, r#"{"guest_cid":3,"uds_path":""}"#);
        assert_eq!(r.status, 400);
        let r = put(
            &mut c,
            r#"{"vsock_id":"vsock0","guest_cid":3,"uds_path":"/v.sock"}"#,
        );
        assert_eq!(r.status, 204, "{r:?}");
        // A second PUT replaces the first, as in Firecracker.
        let r = put(&mut c, r#"{"guest_cid":42,"uds_path":"/w.sock"}"#);
        assert_eq!(r.status, 204, "{r:?}");
        let v = json(&answer(&mut c, Method::Get, "/vm/config", ""));
        assert_eq!(
            v["vsock"],
            serde_json::json!({"guest_cid":42,"uds_path":"/w.sock"})
        );
        boot(&mut c);
        let r = put(&mut c, r#"{"guest_cid":3,"uds_path":"/v.sock"}"#);
        assert_eq!(r.status, 400);
    }

    #[test]
    fn network_interfaces_are_checked() {
        let mut c = configured();
        let put = |c: &mut Controller, id: &str, body: &str| {
            answer(c, Method::Put, &format!("/network-interfaces/{id}"), body)
        };
        assert_eq!(
            put(
                &mut c,
                "eth0",
                r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:ac:10:00:02"}"#
            )
            .status,
            204
        );
        let r = put(
            &mut c,
            "eth1",
            r#"{"iface_id":"eth1","host_dev_name":"tap0"}"#,
        );
        assert!(
            r.fault_message().unwrap_or_default().contains("tap0"),
            "{r:?}"
        );
        let r = put(
            &mut c,
            "eth1",
            r#"{"iface_id":"eth1","host_dev_name":"tap1","guest_mac":"06:00:AC:10:00:02"}"#,
        );
        assert!(
            r.fault_message().unwrap_or_default().contains("MAC"),
            "{r:?}"
        );
        // Malformed and multicast MACs are refused while the body is parsed
        // (the same `MacAddr` rule as --net and config files).
        for (mac, why) in [
            ("06:00:AC:10:00", "bad MAC address"),
            ("01:00:5e:00:00:01", "multicast"),
        ] {
            let body =
                format!(r#"{{"iface_id":"eth1","host_dev_name":"tap1","guest_mac":"{mac}"}}"#);
            let e = routes::parse(&Method::Put, "/network-interfaces/eth1", body.as_bytes())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(why), "{mac}: {e}");
        }
        // Re-putting the same interface replaces it.
        assert_eq!(
            put(
                &mut c,
                "eth0",
                r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#
            )
            .status,
            204
        );
        assert_eq!(c.config().network_interfaces.len(), 1);
        let r = answer(
            &mut c,
            Method::Patch,
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0"}"#,
        );
        assert_eq!(r.fault_message().as_deref(), Some(NOT_BEFORE_START));
        boot(&mut c);
        let d = send(
            &mut c,
            Method::Patch,
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","rx_rate_limiter":{"bandwidth":{"size":1000,"refill_time":10}}}"#,
        );
        let Decision::Execute(cmd @ VmCommand::UpdateNetRateLimiters { .. }) = d else {
            panic!("{d:?}")
        };
        assert_eq!(
            c.complete::<String>(cmd, Ok(CommandOutput::Done)).status,
            204
        );
        assert!(c.config().network_interfaces[0].rx_rate_limiter.is_some());
        assert!(c.config().network_interfaces[0].tx_rate_limiter.is_none());
        let r = answer(
            &mut c,
            Method::Patch,
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0"}"#,
        );
        assert_eq!(r.status, 204);
        let r = answer(
            &mut c,
            Method::Patch,
            "/network-interfaces/eth9",
            r#"{"iface_id":"eth9"}"#,
        );
        assert_eq!(r.status, 400);
    }

    #[test]
    fn logger_and_metrics_are_applied_by_the_vmm_side() {
        let mut c = configured();
        let d = send(
            &mut c,
            Method::Put,
            "/logger",
            r#"{"log_path":"/l","level":"Debug"}"#,
        );
        let Decision::Execute(cmd @ VmCommand::ConfigureLogger(_)) = d else {
            panic!("{d:?}")
        };
        assert!(
            c.complete::<String>(cmd.clone(), Err("cannot open /l".into()))
                .status
                == 400
        );
        assert!(c.logger().is_none());
        assert_eq!(
            c.complete::<String>(cmd, Ok(CommandOutput::Done)).status,
            204
        );
        assert_eq!(
            c.logger().and_then(|l| l.log_path.clone()),
            Some(PathBuf::from("/l"))
        );

        let d = send(&mut c, Method::Put, "/metrics", r#"{"metrics_path":"/m"}"#);
        let Decision::Execute(cmd) = d else {
            panic!("{d:?}")
        };
        assert_eq!(
            c.complete::<String>(cmd, Ok(CommandOutput::Done)).status,
            204
        );
        let r = answer(&mut c, Method::Put, "/metrics", r#"{"metrics_path":"/m2"}"#);
        assert_eq!(
            r.fault_message().as_deref(),
            Some("Reinitialization of metrics not allowed.")
        );
        let v = json(&answer(&mut c, Method::Get, "/vm/config", ""));
        assert_eq!(v["metrics"]["metrics_path"], "/m");
        assert_eq!(v["logger"]["level"], "Debug");
    }

    #[test]
    fn firecrackers_machine_limits() {
        let mut c = controller();
        let put = |c: &mut Controller, body: &str| answer(c, Method::Put, "/machine-config", body);
        for body in [
            r#"{"vcpu_count":33,"mem_size_mib":128}"#,
            r#"{"vcpu_count":0,"mem_size_mib":128}"#,
            r#"{"vcpu_count":3,"mem_size_mib":128,"smt":true}"#,
        ] {
            assert_eq!(
                put(&mut c, body).fault_message().as_deref(),
                Some(BAD_VCPU_COUNT),
                "{body}"
            );
        }
        for body in [
            r#"{"vcpu_count":32,"mem_size_mib":128}"#,
            r#"{"vcpu_count":1,"mem_size_mib":128,"smt":true}"#,
            r#"{"vcpu_count":4,"mem_size_mib":128,"smt":true}"#,
            r#"{"vcpu_count":1,"mem_size_mib":130,"huge_pages":"2M"}"#,
        ] {
            assert_eq!(put(&mut c, body).status, 204, "{body}");
        }
        let r = put(
            &mut c,
            r#"{"vcpu_count":1,"mem_size_mib":129,"huge_pages":"2M"}"#,
        );
        assert_eq!(r.fault_message().as_deref(), Some(BAD_MEM_SIZE));
        // A PATCH is checked against what it does not name, too.
        let r = answer(
            &mut c,
            Method::Patch,
            "/machine-config",
            r#"{"mem_size_mib":131}"#,
        );
        assert_eq!(r.fault_message().as_deref(), Some(BAD_MEM_SIZE));
        let r = answer(
            &mut c,
            Method::Patch,
            "/machine-config",
            r#"{"vcpu_count":3,"smt":true}"#,
        );
        assert_eq!(r.fault_message().as_deref(), Some(BAD_VCPU_COUNT));
        assert_eq!(c.config().machine_config.mem_size_mib, 130);
        // The command line stays wider: a CLI config is not re-checked.
        let mut cli = VmConfig::default();
        cli.machine_config.vcpu_count = 200;
        let mut c = Controller::new("cli", cli);
        c.mark_running();
        assert_eq!(
            json(&answer(&mut c, Method::Get, "/machine-config", ""))["vcpu_count"],
            200
        );
    }

    #[test]
    fn boot_source_is_checked_at_put() {
        let mut c = controller();
        let r = answer(
            &mut c,
            Method::Put,
            "/boot-source",
            r#"{"kernel_image_path":"/missing/vmlinux"}"#,
        );
        assert_eq!(
            r.fault_message().as_deref(),
            Some("no kernel /missing/vmlinux")
        );
        let r = answer(
            &mut c,
            Method::Put,
            "/boot-source",
            r#"{"kernel_image_path":"/vmlinux","initrd_path":"/missing.cpio"}"#,
        );
        assert_eq!(
            r.fault_message().as_deref(),
            Some("no initrd /missing.cpio")
        );
        assert!(c
            .config()
            .boot_source
            .kernel_image_path
            .as_os_str()
            .is_empty());
        // 2047 bytes and the NUL fit; 2048 do not.
        let args = |n: usize| {
            format!(
                r#"{{"kernel_image_path":"/vmlinux","boot_args":"{}"}}"#,
                "x".repeat(n)
            )
        };
        assert_eq!(
            answer(&mut c, Method::Put, "/boot-source", &args(2047)).status,
            204
        );
        let r = answer(&mut c, Method::Put, "/boot-source", &args(2048));
        assert!(
            r.fault_message()
                .unwrap_or_default()
                .starts_with("Boot source error: The kernel command line is invalid: "),
            "{r:?}"
        );
        let r = answer(
            &mut c,
            Method::Put,
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","host_dev_name":"missing0"}"#,
        );
        assert_eq!(r.fault_message().as_deref(), Some("no tap missing0"));
        let r = answer(
            &mut c,
            Method::Put,
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","host_dev_name":"tap0","mtu":40}"#,
        );
        assert_eq!(r.fault_message(), Some(ConfigError::Mtu(40).to_string()));
        assert!(c.config().network_interfaces.is_empty());
    }

    #[test]
    fn pause_and_resume_are_post_boot_and_reported() {
        let mut c = configured();
        let r = answer(&mut c, Method::Patch, "/vm", r#"{"state":"Paused"}"#);
        assert_eq!(r.fault_message().as_deref(), Some(NOT_BEFORE_START));
        // The serial output is set before boot only.
        let r = answer(
            &mut c,
            Method::Put,
            "/serial",
            r#"{"serial_out_path":"/tmp/console"}"#,
        );
        assert_eq!(r.status, 204);
        assert_eq!(
            c.config().serial.serial_out_path.as_deref(),
            Some(std::path::Path::new("/tmp/console"))
        );
        boot(&mut c);
        let d = send(&mut c, Method::Patch, "/vm", r#"{"state":"Paused"}"#);
        assert_eq!(d, Decision::Execute(VmCommand::Pause));
        // A pause the VMM could not carry out leaves the guest running.
        let r = c.complete::<String>(VmCommand::Pause, Err("a vCPU did not stop".into()));
        assert_eq!(
            r.fault_message().as_deref(),
            Some("Cannot pause the microVM: a vCPU did not stop")
        );
        assert_eq!(
            json(&answer(&mut c, Method::Get, "/", ""))["state"],
            "Running"
        );
        assert_eq!(
            c.complete::<String>(VmCommand::Pause, Ok(CommandOutput::Done))
                .status,
            204
        );
        assert_eq!(c.state(), VmState::Paused);
        assert_eq!(
            json(&answer(&mut c, Method::Get, "/", ""))["state"],
            "Paused"
        );
        // Paused is still started: runtime requests go on, config ones do not.
        let r = answer(
            &mut c,
            Method::Put,
            "/boot-source",
            r#"{"kernel_image_path":"/k"}"#,
        );
        assert_eq!(r.fault_message().as_deref(), Some(NOT_AFTER_START));
        assert_eq!(
            send(
                &mut c,
                Method::Put,
                "/actions",
                r#"{"action_type":"FlushMetrics"}"#
            ),
            Decision::Execute(VmCommand::FlushMetrics)
        );
        let d = send(&mut c, Method::Patch, "/vm", r#"{"state":"Resumed"}"#);
        assert_eq!(d, Decision::Execute(VmCommand::Resume));
        assert_eq!(
            c.complete::<String>(VmCommand::Resume, Ok(CommandOutput::Done))
                .status,
            204
        );
        assert_eq!(
            json(&answer(&mut c, Method::Get, "/", ""))["state"],
            "Running"
        );
    }
}
