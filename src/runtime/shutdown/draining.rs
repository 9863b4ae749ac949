//! [`Draining`]: the future of a request's "finish up" notice.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_util::sync::WaitForCancellationFutureOwned;

use super::Shutdown;

/// Resolves when the server announces its shutdown: the shutdown token of a
/// [`CancellationLayer`](crate::CancellationLayer) the request passed through was cancelled.
/// Get one from [`RequestCancellation::draining`](crate::RequestCancellation::draining) or
/// [`UpgradeGuard::draining`](crate::UpgradeGuard::draining).
///
/// It is the first of a shutdown's two phases: the request still runs, and has the layer's
/// [`shutdown_grace`](crate::CancellationLayer::shutdown_grace) to finish (close a WebSocket
/// with `1001`, end a stream, refuse a long new job). When the grace is over the request is
/// cancelled with [`CancelReason::Shutdown`](crate::CancelReason::Shutdown), as without a
/// grace. A request whose layers have no shutdown token never sees it resolve.
#[must_use = "futures do nothing unless polled"]
pub struct Draining {
    /// One per layer with a shutdown token; empty: never resolves.
    announcements: Vec<(Shutdown, Pin<Box<WaitForCancellationFutureOwned>>)>,
}

impl Draining {
    pub(crate) fn new<'a>(shutdowns: impl IntoIterator<Item = &'a Shutdown>) -> Self {
        Self {
            announcements: shutdowns
                .into_iter()
                .map(|shutdown| {
                    let announced = Box::pin(shutdown.token().clone().cancelled_owned());
                    (shutdown.clone(), announced)
                })
                .collect(),
        }
    }
}

impl Future for Draining {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        for (shutdown, announced) in &mut self.announcements {
            if announced.as_mut().poll(cx).is_ready() {
                // The token wakes its waiters in no set order: this task may run before the
                // registry's own waker did. Announce here too, so that `is_draining` agrees.
                shutdown.announce();
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

impl fmt::Debug for Draining {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Draining")
            .field("shutdown_tokens", &self.announcements.len())
            .finish()
    }
}
