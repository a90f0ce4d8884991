//! JSON API on a Unix socket, compatible with Firecracker's: the same
//! endpoints, bodies, status codes and `{"fault_message": ...}` errors, so
//! tools written for Firecracker (its Go SDK, Python clients, curl) drive
//! ringvm unchanged.
//!
//! - [`http`]: strict HTTP/1.1 parsing and response framing.
//! - [`routes`]: method + path + body → [`ApiRequest`] (pure).
//! - [`controller`]: the pre-boot / post-boot / paused state machine
//!   (pure but for [`host_check`], which opens the files a PUT names).
//! - [`channel`]: the [`ApiHandle`] / [`Responder`] pair the VMM thread
//!   uses.
//! - [`server`]: the API thread (event-manager loop: listener,
//!   connections, timeouts).
//! - [`early`]: answers the reads while a VM given on the command line is
//!   still being built.
//!
//! The VMM side, in outline:
//!
//! ```no_run
//! use std::path::Path;
//! use vmm::api::{ApiServer, Controller, Decision, CommandOutput, http::DEFAULT_MAX_PAYLOAD};
//! use vmm::config::VmConfig;
//! use vmm::seccomp::Filters;
//!
//! let (api, _thread) =
//!     ApiServer::start(Path::new("/tmp/ringvm.sock"), DEFAULT_MAX_PAYLOAD, Filters::none())?;
//! let mut controller = Controller::new("anonymous-instance", VmConfig::default());
//! // ... arm an 8-byte read of api.requests_fd() on the ring; on its completion:
//! while let Some((request, responder)) = api.try_recv() {
//!     let answer = match controller.handle(request) {
//!         Decision::Respond(r) => r,
//!         Decision::Start(config) => {
//!             let booted: Result<(), String> = Ok(()); // build and boot from `config`
//!             controller.start_result(booted)
//!         }
//!         Decision::Execute(command) => {
//!             let done: Result<CommandOutput, String> = Ok(CommandOutput::Done); // run it
//!             controller.complete(command, done)
//!         }
//!     };
//!     responder.respond(answer);
//! }
//! # Ok::<(), vmm::api::ApiError>(())
//! ```

pub mod channel;
pub mod controller;
pub mod early;
pub mod host_check;
pub mod http;
pub mod routes;
pub mod server;
pub mod types;

pub use channel::{ApiHandle, Responder};
pub use controller::{CommandOutput, Controller, Decision, VmCommand, VmState};
pub use server::{ApiError, ApiServer};
pub use types::{ApiRequest, ApiResponse};
