//! Answers the API's reads while the VM asked for on the command line
//! (`--kernel`, `--config-file`) is still being built.
//!
//! Why: building the VM (guest memory, the kernel copied in, devices,
//! vCPUs) takes the main thread most of ringvm's start-up, and the main
//! thread is the one that answers the API. Without this, a client that
//! polls `GET /` to learn that the socket is up waits for the whole build.
//! With it, `GET /`, `GET /version`, `GET /machine-config` and
//! `GET /vm/config` are answered from the moment the socket exists, by a
//! short-lived thread holding the [`Controller`]; their answers are the
//! ones the VMM thread would give (the instance is marked running first:
//! the user asked for it to boot at once, so nothing can configure it any
//! more). Every other request needs the VM: the first one is held back,
//! with everything after it in order, and handed to the VMM thread with
//! the channel ([`ApiHandle::put_back`]), which answers them as it always
//! did once the VM exists.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::channel::ApiHandle;
use super::controller::{CommandOutput, Controller, Decision};
use super::types::{ApiRequest, ApiResponse};
use crate::config::VmConfig;
use crate::seccomp::{Filters, ThreadKind};

/// The thread's stack: it parses nothing (the API thread does) and only
/// renders small JSON answers.
const STACK_SIZE: usize = 256 * 1024;

/// Epoll tokens.
const REQUESTS: u64 = 0;
const DONE: u64 = 1;

/// The thread answering reads while the VM is built; [`EarlyAnswers::finish`]
/// takes the API back for the VMM thread.
#[derive(Debug)]
pub struct EarlyAnswers {
    done: Arc<EventFd>,
    thread: JoinHandle<Handback>,
}

/// What the thread gives back when the VM is built.
#[derive(Debug)]
pub struct Handback {
    /// The API, with any held-back requests at its front.
    pub handle: ApiHandle,
    /// The controller, as the thread left it.
    pub controller: Controller,
    /// Requests the thread answered (for the API metrics).
    pub answered: u64,
    /// Of those, answered with an error status.
    pub errors: u64,
}

/// Errors starting or ending the thread.
#[derive(Debug, thiserror::Error)]
pub enum EarlyError {
    /// The thread or its eventfd/epoll could not be created.
    #[error("cannot start the thread answering the API during the build: {0}")]
    Start(io::Error),
    /// The thread died: the API handle went with it.
    #[error("the thread answering the API during the build died")]
    Died,
}

impl EarlyAnswers {
    /// Starts answering `handle`'s reads with `controller` (marked running
    /// here) and `config`, the configuration being built, for
    /// `GET /vm/config`. The thread runs under the API thread's seccomp
    /// filter: it only waits on eventfds and answers through channels.
    pub fn start(
        handle: ApiHandle,
        mut controller: Controller,
        config: VmConfig,
        filters: &Filters,
    ) -> Result<Self, EarlyError> {
        controller.mark_running();
        let done = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(EarlyError::Start)?);
        // Set up before the filter goes on: epoll_create1 is not on the
        // API thread's list.
        let epoll = Epoll::new().map_err(EarlyError::Start)?;
        for (fd, token) in [(handle.requests_fd(), REQUESTS), (done.as_raw_fd(), DONE)] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(EarlyError::Start)?;
        }
        let filters = filters.clone();
        let stop = done.clone();
        let thread = std::thread::Builder::new()
            .name("ringvm-api-early".into())
            .stack_size(STACK_SIZE)
            .spawn(move || {
                let mut server = Server {
                    handle,
                    controller,
                    config,
                    holding: false,
                    answered: 0,
                    errors: 0,
                };
                match filters.install(ThreadKind::Api) {
                    Ok(()) => server.serve(&epoll, &stop),
                    // Answer nothing: every request waits for the VMM
                    // thread, as without this thread.
                    Err(e) => log::error!("{e}; API requests wait for the VM to be built"),
                }
                server.into_handback()
            })
            .map_err(EarlyError::Start)?;
        Ok(Self { done, thread })
    }

    /// Stops answering and gives the API back. Requests that arrived since
    /// the thread last looked stay queued in the channel, its eventfd
    /// still counting them, so the VMM thread's first read sees them.
    pub fn finish(self) -> Result<Handback, EarlyError> {
        // Cannot fail short of 2^64 - 2 writes.
        let _ = self.done.write(1);
        self.thread.join().map_err(|_| EarlyError::Died)
    }
}

/// The thread's state.
struct Server {
    handle: ApiHandle,
    controller: Controller,
    config: VmConfig,
    /// A request has been held back: every later one is left queued too,
    /// so the VMM thread sees them in the order they came.
    holding: bool,
    answered: u64,
    errors: u64,
}

impl Server {
    fn serve(&mut self, epoll: &Epoll, done: &EventFd) {
        let mut events = [EpollEvent::default(); 2];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("API during the build: epoll_wait: {e}");
                    return;
                }
            };
            let mut finished = false;
            for event in &events[..n] {
                match event.data() {
                    REQUESTS => {
                        self.drain();
                        if self.holding {
                            // The rest is the VMM thread's: stop looking.
                            let fd = self.handle.requests_fd();
                            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                        }
                    }
                    _ => finished = true,
                }
            }
            if finished {
                let _ = done.read();
                return;
            }
        }
    }

    /// Resets the requests eventfd, then answers or holds back every
    /// queued request (reset first: none can slip between).
    fn drain(&mut self) {
        let mut counter = [0u8; 8];
        // SAFETY: reads at most 8 bytes into our stack buffer from the
        // blocking requests eventfd, which epoll reported readable; the
        // handle keeps it open.
        unsafe { libc::read(self.handle.requests_fd(), counter.as_mut_ptr().cast(), 8) };
        while let Some((request, responder)) = self.handle.try_recv() {
            if !is_read(&request) {
                // Back into the handle for the VMM thread, with every
                // later request behind it, in order.
                self.holding = true;
                self.handle.put_back(request, responder);
                return;
            }
            let answer = self.answer(request);
            self.answered += 1;
            if answer.status >= 400 {
                self.errors += 1;
            }
            responder.respond(answer);
        }
    }

    /// The answer the VMM thread would give to a read.
    fn answer(&mut self, request: ApiRequest) -> ApiResponse {
        match self.controller.handle(request) {
            Decision::Respond(r) => r,
            Decision::Execute(command) => {
                // Only GET /vm/config gets here: the configuration the VM
                // is built from, as the VMM thread reports it.
                let config = Box::new(self.config.clone());
                self.controller
                    .complete(command, Ok::<_, String>(CommandOutput::VmConfig(config)))
            }
            Decision::Start(_) => self
                .controller
                .start_result(Err("the microVM is already running")),
        }
    }

    fn into_handback(self) -> Handback {
        Handback {
            handle: self.handle,
            controller: self.controller,
            answered: self.answered,
            errors: self.errors,
        }
    }
}

/// The requests answered while the VM is built: the reads, whose answers
/// do not depend on the VM existing.
fn is_read(request: &ApiRequest) -> bool {
    matches!(
        request,
        ApiRequest::GetInstanceInfo
            | ApiRequest::GetVersion
            | ApiRequest::GetMachineConfig
            | ApiRequest::GetVmConfig
    )
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::Receiver;
    use std::time::Duration;

    use super::*;
    use crate::api::channel::{self, VmmLink};
    use crate::api::types::VmStateRequest;

    fn ask(link: &VmmLink, request: ApiRequest) -> Receiver<ApiResponse> {
        link.send(request, Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
    }

    #[test]
    fn reads_are_answered_and_the_first_other_request_holds_back_the_rest() {
        let (handle, link, _shutdown) = channel::channel().unwrap();
        let controller = Controller::new("early", VmConfig::default());
        let early =
            EarlyAnswers::start(handle, controller, VmConfig::default(), &Filters::none()).unwrap();
        let wait = Duration::from_secs(10);
        let info = ask(&link, ApiRequest::GetInstanceInfo).recv_timeout(wait);
        let info = info.unwrap();
        assert_eq!(info.status, 200);
        assert!(info.body.unwrap().contains(r#""state":"Running""#));
        let config = ask(&link, ApiRequest::GetVmConfig).recv_timeout(wait);
        assert_eq!(config.unwrap().status, 200);

        let pause = ask(&link, ApiRequest::PatchVmState(VmStateRequest::Paused));
        let later = ask(&link, ApiRequest::GetVersion);
        assert!(later.recv_timeout(Duration::from_millis(300)).is_err());
        assert!(pause.try_recv().is_err());

        let back = early.finish().unwrap();
        assert_eq!((back.answered, back.errors), (2, 0));
        assert_eq!(back.controller.state(), crate::api::VmState::Running);
        let order: Vec<ApiRequest> =
            std::iter::from_fn(|| back.handle.try_recv().map(|(r, _)| r)).collect();
        assert_eq!(order.len(), 2, "{order:?}");
        assert!(matches!(order[0], ApiRequest::PatchVmState(_)));
        assert_eq!(order[1], ApiRequest::GetVersion);
    }
}
