//! `--config-file` from a hostile file: any text (mostly JSON shaped like
//! Firecracker's config file) through the parser and, when it parses, the
//! same controller checks the API applies, then InstanceStart. Nothing may
//! panic; a config the controller starts from must be valid.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ringvm_fuzz::api::{drive, Fate};
use ringvm_fuzz::json::Doc;
use vmm::api::types::ActionType;
use vmm::api::{ApiRequest, Controller};
use vmm::config::VmConfig;
use vmm::launcher::config_file_requests;

#[derive(Arbitrary, Debug)]
struct Input {
    file: Doc,
    fate: Fate,
}

fuzz_target!(|input: Input| {
    let bytes = input.file.bytes();
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return;
    };
    let Ok(requests) = config_file_requests(text) else {
        return;
    };
    let mut controller = Controller::new("fuzz", VmConfig::default());
    for request in requests {
        drive(&mut controller, request, input.fate);
    }
    drive(
        &mut controller,
        ApiRequest::Action(ActionType::InstanceStart),
        input.fate,
    );
});
