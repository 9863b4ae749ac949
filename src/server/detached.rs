//! `DetachedFuture`: the inner future of a detached service, spawned so that it outlives its client.

use std::fmt;
use std::future::Future;
use std::panic::resume_unwind;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::event::TARGET;

pin_project! {
    /// The handler future of a [`detached`](crate::CancellationLayer::detached) service.
    ///
    /// The handler runs in its own task, tracked by the layer's `TaskTracker`; this future
    /// only waits for its output. Dropping it (the client left) leaves the task running.
    #[must_use = "futures do nothing unless polled"]
    pub struct DetachedFuture<F: Future> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F: Future> {
        Spawned { handle: JoinHandle<F::Output> },
        // No runtime to spawn on: the handler runs inline, as if not detached.
        Inline { #[pin] future: F },
    }
}

impl<F> DetachedFuture<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    pub(crate) fn spawn(future: F, tracker: &TaskTracker) -> Self {
        let kind = match Handle::try_current() {
            Ok(runtime) => Kind::Spawned {
                handle: tracker.spawn_on(future, &runtime),
            },
            Err(_) => {
                tracing::warn!(
                    target: TARGET,
                    "detached handler called outside a Tokio runtime: it runs inline and \
                     stops if its client leaves",
                );
                Kind::Inline { future }
            }
        };
        Self { kind }
    }
}

impl<F: Future> Future for DetachedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project().kind.project() {
            KindProj::Inline { future } => future.poll(cx),
            KindProj::Spawned { handle } => match Pin::new(handle).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(output)) => Poll::Ready(output),
                // The handler panicked: carry its panic to whoever awaits the response, as
                // if it had not been spawned.
                Poll::Ready(Err(error)) if error.is_panic() => resume_unwind(error.into_panic()),
                // The runtime is shutting down and aborted the task; so is this connection.
                Poll::Ready(Err(_)) => Poll::Pending,
            },
        }
    }
}

impl<F: Future> fmt::Debug for DetachedFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let spawned = matches!(self.kind, Kind::Spawned { .. });
        f.debug_struct("DetachedFuture")
            .field("spawned", &spawned)
            .finish()
    }
}
