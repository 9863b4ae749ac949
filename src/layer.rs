//! `CancellationLayer`: the configuration shared by every request of a service.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tokio_util::task::TaskTracker;
use tower_layer::Layer;

use crate::hooks::Hooks;
use crate::{CancellationService, Cancelled};

/// A [`Layer`] that gives every request a cancellation scope and runs cleanup when the
/// request is abandoned.
///
/// Callbacks added here run for every cancelled request of the wrapped service, after the
/// handler's own registrations, in the order they were added. A second `CancellationLayer`
/// deeper in the stack (a per-route layer) joins the scope of the outer one: the request
/// keeps one token, and the callbacks of every layer run once, innermost layer first.
///
/// Cloning is cheap: the configuration is shared.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
///
/// use http::{Request, Response};
/// use tokio_util::task::TaskTracker;
/// use tower::{ServiceBuilder, service_fn};
/// use tower_cancel::{CancellationLayer, Cancelled};
///
/// let tracker = TaskTracker::new();
/// let svc = ServiceBuilder::new()
///     .layer(
///         CancellationLayer::new()
///             .on_cancel(|c: &Cancelled| eprintln!("{} {} cancelled: {}", c.method(), c.uri(), c.reason()))
///             .on_cancel_async(|c: Cancelled| async move {
///                 // e.g. tell a job queue to drop the work started for this request
///                 let _ = c;
///             })
///             .task_tracker(tracker.clone()),
///     )
///     .service(service_fn(|_req: Request<String>| async {
///         Ok::<_, Infallible>(Response::new(String::from("hello")))
///     }));
/// # drop(svc);
/// ```
#[derive(Clone)]
pub struct CancellationLayer {
    hooks: Arc<Hooks>,
}

impl CancellationLayer {
    /// A layer with no callbacks and its own [`TaskTracker`].
    ///
    /// Even with no callbacks it is useful: handlers get a token that is cancelled when
    /// their client leaves.
    pub fn new() -> Self {
        Self {
            hooks: Arc::new(Hooks::new()),
        }
    }

    /// Adds a synchronous callback, run once for every cancelled request.
    ///
    /// It runs on the thread that noticed the cancellation (for a disconnect, inside hyper's
    /// connection task, right after the handler future or body was dropped), so keep it
    /// short and non-blocking; use [`on_cancel_async`](Self::on_cancel_async) for I/O.
    /// A panic is caught and reported with `tracing::error!`; the other callbacks still run.
    pub fn on_cancel<F>(mut self, callback: F) -> Self
    where
        F: Fn(&Cancelled) + Send + Sync + 'static,
    {
        Arc::make_mut(&mut self.hooks).push_sync(callback);
        self
    }

    /// Adds an asynchronous cleanup, spawned once for every cancelled request.
    ///
    /// The future is spawned on the Tokio runtime the request arrived on, tracked by the
    /// layer's [`TaskTracker`] (see [`task_tracker`](Self::task_tracker)), so a graceful
    /// shutdown can wait for every cleanup with `tracker.close(); tracker.wait().await`.
    /// A panic inside it is caught and reported. If no runtime is reachable, the cleanup does
    /// not run and an `error` event says so.
    pub fn on_cancel_async<F, Fut>(mut self, cleanup: F) -> Self
    where
        F: Fn(Cancelled) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Arc::make_mut(&mut self.hooks).push_async(cleanup);
        self
    }

    /// Tracks async cleanups on `tracker` instead of the layer's own.
    ///
    /// Share one tracker between the layer and the rest of the server, then during shutdown
    /// call `tracker.close()` and `tracker.wait().await`.
    pub fn task_tracker(mut self, tracker: TaskTracker) -> Self {
        Arc::make_mut(&mut self.hooks).set_tracker(tracker);
        self
    }

    /// The tracker async cleanups are spawned on: the one given to
    /// [`task_tracker`](Self::task_tracker), or the layer's own.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = tower_cancel::CancellationLayer::new();
    /// let tracker = layer.tracker().clone();
    /// // ... serve, then at shutdown:
    /// tracker.close();
    /// tracker.wait().await;
    /// # }
    /// ```
    pub fn tracker(&self) -> &TaskTracker {
        self.hooks.tracker()
    }
}

impl Default for CancellationLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for CancellationLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancellationLayer")
            .field("callbacks", &self.hooks.len())
            .field("tracker", self.hooks.tracker())
            .finish()
    }
}

impl<S> Layer<S> for CancellationLayer {
    type Service = CancellationService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CancellationService::from_hooks(inner, Arc::clone(&self.hooks))
    }
}
