//! `DetachedFuture`: the inner future of a detached service, spawned so that it outlives its client.

use std::fmt;
use std::future::Future;
use std::panic::resume_unwind;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::event::TARGET;
use crate::runtime::handlers::Permit;
use crate::scope::{Scope, Stopped};

pin_project! {
    /// The handler future of a [`detached`](crate::CancellationLayer::detached) service.
    ///
    /// The handler runs in its own task, tracked by the layer's `TaskTracker`; this future
    /// only waits for its output. Dropping it (the client left) leaves the task running.
    /// When the layer's [`detached_limit`](crate::CancellationLayer::detached_limit) handlers
    /// already run, the handler is not started and this future resolves to a
    /// `503 Service Unavailable` with an empty (`Default`) body.
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
        Inline { #[pin] future: F, permit: Permit },
        // Past the limit: the handler was not started.
        Refused,
    }
}

impl<F> DetachedFuture<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// Spawns `future`, the handler of the request whose scope is `scope`: the scope counts
    /// the task among the work that runs on after a cancellation, until the handler returns.
    /// The task holds `permit` until it ends.
    pub(crate) fn spawn(
        future: F,
        tracker: &TaskTracker,
        scope: Option<Arc<Scope>>,
        permit: Permit,
    ) -> Self {
        let kind = match Handle::try_current() {
            Ok(runtime) => {
                if let Some(scope) = &scope {
                    scope.detach();
                }
                let watched = Watched {
                    future,
                    stop: TaskStop(scope),
                    _permit: permit,
                };
                Kind::Spawned {
                    handle: tracker.spawn_on(watched, &runtime),
                }
            }
            Err(_) => {
                tracing::warn!(
                    target: TARGET,
                    "detached handler called outside a Tokio runtime: it runs inline and \
                     stops if its client leaves",
                );
                Kind::Inline { future, permit }
            }
        };
        Self { kind }
    }

    /// A request refused because the layer's detached handlers are all running.
    pub(crate) fn refused() -> Self {
        Self {
            kind: Kind::Refused,
        }
    }
}

pin_project! {
    /// The spawned handler: tells its scope when it returned or was dropped.
    struct Watched<F> {
        // Declared first, so that the handler's destructors run before a drop is reported.
        #[pin]
        future: F,
        stop: TaskStop,
        // Given back when the task ends, however it ends.
        _permit: Permit,
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let output = std::task::ready!(this.future.poll(cx));
        // Before the output reaches the response future: the handler has returned.
        if let Some(scope) = this.stop.0.take() {
            scope.detached_stopped(Stopped::Ended);
        }
        Poll::Ready(output)
    }
}

/// Reports a handler task dropped before it returned (its runtime shut down, or it panicked).
struct TaskStop(Option<Arc<Scope>>);

impl Drop for TaskStop {
    fn drop(&mut self) {
        if let Some(scope) = self.0.take() {
            scope.detached_stopped(Stopped::Dropped);
        }
    }
}

impl<F, B, E> Future for DetachedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project().kind.project() {
            KindProj::Refused => {
                let mut response = Response::new(B::default());
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                Poll::Ready(Ok(response))
            }
            KindProj::Inline { future, .. } => future.poll(cx),
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
        let kind = match self.kind {
            Kind::Spawned { .. } => "spawned",
            Kind::Inline { .. } => "inline",
            Kind::Refused => "refused",
        };
        f.debug_struct("DetachedFuture")
            .field("kind", &kind)
            .finish()
    }
}
