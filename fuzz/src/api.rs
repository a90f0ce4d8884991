//! Playing the VMM side of the API controller: answer its decisions the
//! way `launcher.rs` and the VMM thread do, without files, KVM or threads,
//! and check every answer a client would get.

use vmm::api::types::ApiResponse;
use vmm::api::{ApiRequest, CommandOutput, Controller, Decision};
use vmm::cmdline;

/// Whether the (pretend) VMM side succeeds at what the controller asks.
#[derive(arbitrary::Arbitrary, Clone, Copy, Debug)]
pub struct Fate {
    /// Booting works.
    pub boot_ok: bool,
    /// Commands (drive update, logger, metrics, ...) work.
    pub command_ok: bool,
}

/// Feeds `request` to `controller`, carries out its decision as `fate`
/// says, checks and returns the answer.
pub fn drive(controller: &mut Controller, request: ApiRequest, fate: Fate) -> ApiResponse {
    let answer = match controller.handle(request) {
        Decision::Respond(r) => r,
        Decision::Execute(command) => {
            let result = if fate.command_ok {
                Ok(CommandOutput::VmConfig(Box::new(
                    controller.config().clone(),
                )))
            } else {
                Err("refused by the fuzzer")
            };
            let result = result.map(|out| match out {
                CommandOutput::VmConfig(c)
                    if matches!(command, vmm::api::VmCommand::GetVmConfig) =>
                {
                    CommandOutput::VmConfig(c)
                }
                _ => CommandOutput::Done,
            });
            controller.complete(command, result)
        }
        Decision::Start(config) => {
            // The controller only hands out what it validated.
            assert_eq!(config.validate(), Ok(()), "Start with an invalid config");
            let root = cmdline::root_param(&config);
            let extra: Vec<&str> = root.iter().map(String::as_str).collect();
            let line = cmdline::compose_cmdline(config.base_cmdline(), &extra);
            if let Some(root) = &root {
                assert!(line.contains(root.as_str()), "root= missing from {line:?}");
            }
            let result = if fate.boot_ok {
                Ok(())
            } else {
                Err("boot refused by the fuzzer")
            };
            controller.start_result(result)
        }
    };
    check_answer(&answer);
    answer
}

/// Every answer is 200 with a JSON body, 204 without one, or 400 with
/// `{"fault_message": "..."}`.
pub fn check_answer(answer: &ApiResponse) {
    match answer.status {
        200 => {
            let body = answer.body.as_deref().expect("200 without a body");
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(body);
            assert!(parsed.is_ok(), "200 body is not JSON: {body:?}");
        }
        204 => assert!(answer.body.is_none(), "204 with a body"),
        400 => assert!(
            answer.fault_message().is_some(),
            "400 without a fault_message: {:?}",
            answer.body
        ),
        other => panic!("API answered {other}: {:?}", answer.body),
    }
}
