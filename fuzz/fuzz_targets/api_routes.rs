//! The API from a hostile client, past HTTP: any method, path and body
//! (mostly JSON shaped like the API's own bodies) through the router and
//! the controller's state machine, with the VMM side's work succeeding or
//! failing as the input says. Every answer must be 200 with JSON, 204, or
//! 400 with a fault_message, and `GET /vm/config` must always give a
//! document that ringvm accepts back as a `--config-file`.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ringvm_fuzz::api::{check_answer, drive, Fate};
use ringvm_fuzz::json::Doc;
use vmm::api::http::Method;
use vmm::api::types::ApiResponse;
use vmm::api::{routes, ApiRequest, Controller};
use vmm::config::VmConfig;
use vmm::launcher::config_file_requests;

const PATHS: &[&str] = &[
    "/",
    "/version",
    "/machine-config",
    "/vm/config",
    "/actions",
    "/boot-source",
    "/drives/",
    "/network-interfaces/",
    "/logger",
    "/entropy",
    "/vsock",
    "/metrics",
    "/mmds",
    "/vm",
    "/snapshot/create",
];

#[derive(Arbitrary, Debug)]
enum Verb {
    Get,
    Put,
    Patch,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Path {
    /// One of [`PATHS`], with an id appended.
    Known(u8, String),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
struct Call {
    verb: Verb,
    path: Path,
    body: Doc,
    fate: Fate,
}

fuzz_target!(|calls: Vec<Call>| {
    let mut controller = Controller::new("fuzz", VmConfig::default());
    for call in calls.iter().take(64) {
        let method = match &call.verb {
            Verb::Get => Method::Get,
            Verb::Put => Method::Put,
            Verb::Patch => Method::Patch,
            Verb::Other(m) => Method::Other(m.clone()),
        };
        let path = match &call.path {
            Path::Known(i, id) => format!("{}{id}", PATHS[usize::from(*i) % PATHS.len()]),
            Path::Raw(p) => p.clone(),
        };
        let body = call.body.bytes();
        match routes::parse(&method, &path, &body) {
            Ok(request) => {
                drive(&mut controller, request, call.fate);
            }
            Err(e) => check_answer(&ApiResponse::from(e)),
        }

        let fate = Fate {
            boot_ok: true,
            command_ok: true,
        };
        let shown = drive(&mut controller, ApiRequest::GetVmConfig, fate);
        let text = shown.body.unwrap_or_default();
        if let Err(e) = config_file_requests(&text) {
            panic!("GET /vm/config gave a document --config-file refuses: {e}\n{text}");
        }
    }
});
