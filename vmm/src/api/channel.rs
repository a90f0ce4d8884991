//! The VMM side of the API: requests come out of an [`ApiHandle`] (with an
//! eventfd to arm on the ring), and each is answered through its one-shot
//! [`Responder`]. The API thread holds the other end, a [`VmmLink`].
//!
//! Why a response eventfd per connection: the VMM side can wake exactly
//! the connection that waits, and the API thread's event manager
//! dispatches that fd to that connection alone.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::types::{ApiRequest, ApiResponse};

/// The one-shot way back for one request. Dropping it without answering
/// answers 500, so a client never waits forever on a VMM-side bug.
pub struct Responder {
    tx: Option<Sender<ApiResponse>>,
    ready: Arc<EventFd>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("answered", &self.tx.is_none())
            .finish()
    }
}

impl Responder {
    /// Sends the answer to the waiting connection. If the client has gone
    /// meanwhile the answer is dropped.
    pub fn respond(mut self, response: ApiResponse) {
        self.send(response);
    }

    fn send(&mut self, response: ApiResponse) {
        if let Some(tx) = self.tx.take() {
            if tx.send(response).is_ok() {
                // A full counter (2^64 - 2 wake-ups) is the only failure;
                // the connection is awake then anyway.
                let _ = self.ready.write(1);
            }
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.send(ApiResponse::fault(
            500,
            "The VMM dropped the request without answering it.",
        ));
    }
}

/// The VMM side's end of the API: requests come out of it, answers go
/// back through each request's [`Responder`]. Dropping it stops the API
/// thread.
#[derive(Debug)]
pub struct ApiHandle {
    rx: Receiver<(ApiRequest, Responder)>,
    /// Requests taken out and handed back unanswered (see
    /// [`ApiHandle::put_back`]), served before the channel's.
    held: RefCell<VecDeque<(ApiRequest, Responder)>>,
    requests: Arc<EventFd>,
    shutdown: Arc<EventFd>,
}

impl ApiHandle {
    /// A blocking eventfd the API thread writes after queueing requests:
    /// arm an 8-byte read of it on the ring (the read resets the counter),
    /// and on its completion drain [`ApiHandle::try_recv`] before re-arming.
    /// Reset first, drain second, and no request is ever missed.
    pub fn requests_fd(&self) -> RawFd {
        self.requests.as_raw_fd()
    }

    /// The next queued request and the way to answer it, if any.
    pub fn try_recv(&self) -> Option<(ApiRequest, Responder)> {
        if let Some(held) = self.held.borrow_mut().pop_front() {
            return Some(held);
        }
        self.rx.try_recv().ok()
    }

    /// Hands a request taken out by [`ApiHandle::try_recv`] back unanswered,
    /// for whoever serves the handle next: requests put back come out
    /// again first, in the order they were put back, and the requests
    /// eventfd is written so that server wakes for them.
    pub fn put_back(&self, request: ApiRequest, responder: Responder) {
        self.held.borrow_mut().push_back((request, responder));
        // A full counter is the only failure; the reader wakes then anyway.
        let _ = self.requests.write(1);
    }

    /// Asks the API thread to close every connection, unlink the socket
    /// and exit; join its handle to wait for that.
    pub fn shutdown(&self) {
        let _ = self.shutdown.write(1);
    }
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How the API thread reaches the VMM thread: queue a request, then wake
/// the VMM's ring through the requests eventfd.
#[derive(Clone)]
pub(crate) struct VmmLink {
    tx: Sender<(ApiRequest, Responder)>,
    wake: Arc<EventFd>,
}

impl VmmLink {
    /// Hands `request` to the VMM thread; its answer will arrive on the
    /// returned receiver, and `ready` will be written when it does.
    pub(crate) fn send(&self, request: ApiRequest, ready: Arc<EventFd>) -> Receiver<ApiResponse> {
        let (tx, rx) = mpsc::channel();
        let responder = Responder {
            tx: Some(tx),
            ready,
        };
        match self.tx.send((request, responder)) {
            Ok(()) => {
                let _ = self.wake.write(1);
            }
            Err(mpsc::SendError((_, responder))) => responder.respond(ApiResponse::fault(
                503,
                "The VMM is not accepting API requests.",
            )),
        }
        rx
    }
}

/// Creates both ends: the VMM's [`ApiHandle`] and the API thread's
/// [`VmmLink`], plus the shutdown eventfd the API thread watches.
pub(crate) fn channel() -> std::io::Result<(ApiHandle, VmmLink, Arc<EventFd>)> {
    let requests = Arc::new(EventFd::new(0)?);
    let shutdown = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let (tx, rx) = mpsc::channel();
    let link = VmmLink {
        tx,
        wake: requests.clone(),
    };
    let handle = ApiHandle {
        rx,
        held: RefCell::default(),
        requests,
        shutdown: shutdown.clone(),
    };
    Ok((handle, link, shutdown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_side_types_can_move_to_the_vmm_thread() {
        fn send<T: Send>() {}
        send::<ApiHandle>();
        send::<Responder>();
        send::<ApiRequest>();
    }

    #[test]
    fn a_request_comes_out_and_its_answer_goes_back() {
        let (handle, link, _shutdown) = channel().unwrap();
        let ready = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let rx = link.send(ApiRequest::GetInstanceInfo, ready.clone());
        assert_eq!(handle.requests.read().unwrap(), 1);
        let (request, responder) = handle.try_recv().unwrap();
        assert_eq!(request, ApiRequest::GetInstanceInfo);
        responder.respond(ApiResponse::fault(400, "no"));
        assert_eq!(ready.read().unwrap(), 1);
        assert_eq!(rx.try_recv().unwrap().status, 400);
    }

    #[test]
    fn requests_put_back_come_out_first_in_order_and_wake_the_reader() {
        let (handle, link, _shutdown) = channel().unwrap();
        let ready = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let _a = link.send(ApiRequest::GetInstanceInfo, ready.clone());
        let _b = link.send(ApiRequest::GetVersion, ready.clone());
        let _c = link.send(ApiRequest::GetVmConfig, ready.clone());
        assert_eq!(handle.requests.read().unwrap(), 3);
        let (first, r1) = handle.try_recv().unwrap();
        let (second, r2) = handle.try_recv().unwrap();
        handle.put_back(first, r1);
        handle.put_back(second, r2);
        assert_eq!(handle.requests.read().unwrap(), 2);
        let order: Vec<ApiRequest> =
            std::iter::from_fn(|| handle.try_recv().map(|(r, _)| r)).collect();
        assert_eq!(
            order,
            [
                ApiRequest::GetInstanceInfo,
                ApiRequest::GetVersion,
                ApiRequest::GetVmConfig
            ]
        );
    }

    #[test]
    fn a_dropped_responder_answers_500_and_a_gone_vmm_503() {
        let (handle, link, _shutdown) = channel().unwrap();
        let ready = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let rx = link.send(ApiRequest::GetInstanceInfo, ready.clone());
        drop(handle.try_recv());
        assert_eq!(rx.try_recv().unwrap().status, 500);
        drop(handle);
        let rx = link.send(ApiRequest::GetInstanceInfo, ready);
        assert_eq!(rx.try_recv().unwrap().status, 503);
    }
}
