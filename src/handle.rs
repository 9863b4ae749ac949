//! `RequestCancellation`: the handler's view of its request's cancellation scope.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::record::{CancelReason, Cancelled};
use crate::runtime::shutdown::Draining;
use crate::scope::Scope;

/// The cancellation scope of one request, as the handler sees it.
///
/// [`CancellationLayer`](crate::CancellationLayer) inserts one into every request's
/// extensions, next to the plain [`CancellationToken`] (the same token as
/// [`token()`](Self::token)). Clones share the same scope, so a clone can be moved into
/// spawned work.
///
/// A request that completes (its response body reached its end) is never cancelled: its
/// token stays uncancelled, [`cancelled()`](Self::cancelled) never resolves and callbacks
/// registered with [`on_cancel`](Self::on_cancel) are dropped without running.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use std::time::Duration;
///
/// use http::{Request, Response};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use tower_cancel::{CancellationLayer, RequestCancellation};
///
/// async fn handler(req: Request<String>) -> Result<Response<String>, Infallible> {
///     let cancel = req.extensions().get::<RequestCancellation>().unwrap().clone();
///     cancel.on_cancel(|c| println!("handler cleanup: {}", c.reason()));
///     tokio::select! {
///         reason = cancel.cancelled() => println!("stopping early: {reason}"),
///         _ = tokio::time::sleep(Duration::from_millis(10)) => {}
///     }
///     Ok(Response::new("done".to_owned()))
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(CancellationLayer::new())
///     .service(service_fn(handler));
/// let response = svc.oneshot(Request::new(String::new())).await.unwrap();
/// assert_eq!(response.status(), 200);
/// # }
/// ```
#[derive(Clone)]
pub struct RequestCancellation {
    scope: Arc<Scope>,
}

impl RequestCancellation {
    pub(crate) fn new(scope: Arc<Scope>) -> Self {
        Self { scope }
    }

    /// A handle for a request that no layer serves, for tests (feature `test-util`): armed,
    /// with no deadline and no callbacks but the ones registered on it, as if its request were
    /// `GET /test`. Hand it to a handler under test (in the extensions, as the layer would, or
    /// as the axum extractor's value), then end it with [`cancel_with`](Self::cancel_with).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// use tower_cancel::{CancelReason, RequestCancellation};
    ///
    /// // The handler under test: an axum handler taking the extractor, say.
    /// async fn report(cancel: RequestCancellation) -> String {
    ///     tokio::select! {
    ///         reason = cancel.cancelled() => format!("abandoned: {reason}"),
    ///         _ = tokio::time::sleep(Duration::from_secs(10)) => "report ready".to_owned(),
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let cancel = RequestCancellation::for_test();
    /// let cleaned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    /// let flag = cleaned.clone();
    /// cancel.on_cancel(move |_| flag.store(true, std::sync::atomic::Ordering::SeqCst));
    /// let running = tokio::spawn(report(cancel.clone()));
    /// tokio::time::sleep(Duration::from_millis(10)).await; // the handler is waiting
    /// cancel.cancel_with(CancelReason::Disconnected); // the client leaves
    /// assert_eq!(running.await.unwrap(), "abandoned: disconnected");
    /// assert!(cleaned.load(std::sync::atomic::Ordering::SeqCst));
    /// # }
    /// ```
    #[cfg(any(test, feature = "test-util"))]
    pub fn for_test() -> Self {
        let config = Arc::new(crate::scope::config::Config::new());
        Self::new(Scope::for_test(&config, None))
    }

    /// Cancels the request with `reason`, as the layer would (feature `test-util`): its token
    /// is cancelled and its callbacks run on this thread before this returns. Nothing happens
    /// to a request that already ended. For tests; application code cancels with
    /// [`cancel`](Self::cancel).
    #[cfg(any(test, feature = "test-util"))]
    pub fn cancel_with(&self, reason: CancelReason) {
        self.scope.cancel(reason);
    }

    /// The request's body failed to arrive (the client left mid-upload): cancels the request
    /// with `Disconnected`, unless it already ended.
    pub(crate) fn client_left(&self) {
        self.scope.cancel(CancelReason::Disconnected);
    }

    /// The client sent its body too slowly (the body's idle timeout or minimum rate): cancels
    /// the request with `SlowClient` in its current phase (`Handler` while the handler runs),
    /// unless it already ended.
    pub(crate) fn body_timed_out(&self) {
        self.scope.cancel(CancelReason::SlowClient);
    }

    pub(crate) fn scope_arc(&self) -> &Arc<Scope> {
        &self.scope
    }

    /// The handle the layer inserted into these request extensions.
    ///
    /// The way in for handlers that see the extensions rather than an extractor: plain hyper
    /// and tower services (`req.extensions()`), and tonic, whose `Request::extensions()` carries
    /// the HTTP request's. Fails with [`MissingCancellationLayer`] when no
    /// [`CancellationLayer`](crate::CancellationLayer) wraps the service; with the `tonic`
    /// feature that error converts into a `tonic::Status` (`INTERNAL`), so `?` works in a tonic
    /// method.
    ///
    /// ```
    /// use http::Request;
    /// use tower_cancel::RequestCancellation;
    ///
    /// let req = Request::new(()); // no layer inserted a scope
    /// let missing = RequestCancellation::from_extensions(req.extensions()).unwrap_err();
    /// assert!(missing.to_string().contains("CancellationLayer::new()"));
    /// ```
    pub fn from_extensions(
        extensions: &http::Extensions,
    ) -> Result<Self, MissingCancellationLayer> {
        extensions
            .get::<Self>()
            .cloned()
            .ok_or(MissingCancellationLayer)
    }

    /// The request's token: the same token the layer inserted into the request extensions.
    ///
    /// Hand it (or a [`child_token`](CancellationToken::child_token)) to work that should stop
    /// with the request.
    ///
    /// To cancel the request yourself, call [`cancel`](Self::cancel). Cancelling the token
    /// directly (`token.cancel()`, as code that only knows the token does) fires the token
    /// and everything waiting on it at once, and [`reason`](Self::reason) reports
    /// [`CancelReason::Explicit`] from then on; the layer records the cancellation and runs
    /// the callbacks when it next finds the handler future or the response body pending, or
    /// when either is dropped. It never asks the token on a request's way to completion (the
    /// token's `is_cancelled` takes a mutex): a request that reaches its end first, such as a
    /// handler that cancels its token and answers at once, completed, and no callback runs.
    pub fn token(&self) -> &CancellationToken {
        self.scope.token()
    }

    /// Cancels the request with [`CancelReason::Explicit`], unless it already ended (completed
    /// or cancelled for another reason): its token is cancelled and every callback (the
    /// handler's registrations, then the layers') runs on this thread before this returns.
    /// The one way for application code to cancel a request; the getters never do.
    ///
    /// ```
    /// use std::future::Future;
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::task::{Context, Waker};
    ///
    /// use http::{Request, Response};
    /// use tower::{Layer, Service, service_fn};
    /// use tower_cancel::{CancelReason, CancellationLayer, RequestCancellation};
    ///
    /// let ran = Arc::new(AtomicBool::new(false));
    /// let flag = ran.clone();
    /// let layer = CancellationLayer::new().on_cancel(move |c| {
    ///     assert_eq!(c.reason(), CancelReason::Explicit);
    ///     flag.store(true, Ordering::SeqCst);
    /// });
    /// let mut svc = layer.layer(service_fn(|req: Request<()>| async move {
    ///     let cancel = req.extensions().get::<RequestCancellation>().unwrap().clone();
    ///     cancel.cancel(); // say the work found the request pointless
    ///     assert_eq!(cancel.reason(), Some(CancelReason::Explicit));
    ///     Ok::<_, std::convert::Infallible>(Response::new(String::new()))
    /// }));
    /// let mut response = std::pin::pin!(svc.call(Request::new(())));
    /// let _ = response.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    /// assert!(ran.load(Ordering::SeqCst), "the callbacks ran inside `cancel()`");
    /// ```
    pub fn cancel(&self) {
        self.scope.cancel(CancelReason::Explicit);
    }

    /// Returns `true` once the request is cancelled (recorded, or its token cancelled by
    /// application code).
    ///
    /// A pure query: it never records anything nor runs a callback. It costs one atomic load
    /// and, while no cancellation is recorded, a lock and unlock of the token's (uncontended)
    /// mutex: cheap enough to poll from a CPU-bound loop that never reaches an `.await`, which
    /// is the only way such a loop can learn that its client left.
    pub fn is_cancelled(&self) -> bool {
        self.scope.reason().is_some()
    }

    /// Why the request was cancelled, or `None` while it is not.
    ///
    /// A pure query, as [`is_cancelled`](Self::is_cancelled): for a token that application
    /// code cancelled directly and the layer has not noticed yet, it reports
    /// [`CancelReason::Explicit`] without recording it (the layer records the same reason
    /// when it notices; see [`token`](Self::token)).
    pub fn reason(&self) -> Option<CancelReason> {
        self.scope.reason()
    }

    /// Waits until the request is cancelled and returns why.
    ///
    /// Equivalent to:
    ///
    /// ```ignore
    /// async fn cancelled(&self) -> CancelReason {
    ///     self.token().cancelled().await;
    ///     self.reason().unwrap()
    /// }
    /// ```
    ///
    /// Never resolves for a request that completes normally.
    ///
    /// # Cancellation safety
    ///
    /// This method is cancel safe: dropping the future loses nothing, and it can be used as
    /// a `tokio::select!` branch.
    pub async fn cancelled(&self) -> CancelReason {
        self.scope.token().cancelled().await;
        // The token is only cancelled after the reason is recorded, or by application code.
        self.reason().unwrap_or(CancelReason::Explicit)
    }

    /// Resolves when the server announces its shutdown: the first phase of a shutdown with a
    /// [`shutdown_grace`](crate::CancellationLayer::shutdown_grace), while the request still
    /// runs. Finish up then (close a WebSocket with `1001`, end a stream, stop taking new
    /// work); the request is cancelled with [`CancelReason::Shutdown`] when the grace is over.
    /// Without a grace, the drain and the cancellation begin together. For a request whose
    /// layers have no shutdown token, it never resolves.
    ///
    /// ```
    /// use tokio::sync::mpsc;
    /// use tower_cancel::RequestCancellation;
    ///
    /// // A long-lived stream of updates to one client (say, a WebSocket's sending half).
    /// async fn forward(cancel: RequestCancellation, mut updates: mpsc::Receiver<String>) {
    ///     loop {
    ///         tokio::select! {
    ///             () = cancel.draining() => {
    ///                 // Tell the client to reconnect elsewhere, then return within the grace.
    ///                 return;
    ///             }
    ///             update = updates.recv() => match update {
    ///                 Some(_update) => {} // send it
    ///                 None => return,
    ///             },
    ///         }
    ///     }
    /// }
    /// ```
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: a new future each loop turn (as above) loses nothing.
    pub fn draining(&self) -> Draining {
        self.scope.draining()
    }

    /// Returns `true` once the server announced its shutdown (see
    /// [`draining`](Self::draining)). A pure query: an atomic load, and a lock of the
    /// request's own state only if a deeper layer joined it.
    pub fn is_draining(&self) -> bool {
        self.scope.is_draining()
    }

    /// Registers `callback` to run once if the request is cancelled, like Go's
    /// `context.AfterFunc`.
    ///
    /// * Registered callbacks run before the layer's own, in registration order.
    /// * If the request is already cancelled, `callback` runs at once, on this thread.
    /// * If the request completes, `callback` is dropped without running.
    /// * A panic in `callback` is caught and reported with `tracing::error!`.
    ///
    /// There is no handle to unregister: the registration lasts for the rest of the request.
    ///
    /// ```
    /// # use tower_cancel::RequestCancellation;
    /// fn start_upload(cancel: &RequestCancellation, tmp_path: std::path::PathBuf) {
    ///     cancel.on_cancel(move |c| {
    ///         let _ = std::fs::remove_file(&tmp_path);
    ///         tracing::info!(reason = %c.reason(), "removed partial upload");
    ///     });
    /// }
    /// ```
    pub fn on_cancel<F>(&self, callback: F)
    where
        F: FnOnce(&Cancelled) + Send + 'static,
    {
        self.scope.on_cancel(Box::new(callback));
    }

    /// Runs `work` until it finishes or the request is cancelled, whichever comes first: the
    /// one-line way to bind any future to the request, without a hand-written `select!`.
    ///
    /// Returns the work's output, or the request's [`Cancelled`] record once it is cancelled
    /// (the work is then dropped at its current `.await`). A request already cancelled does
    /// not start the work. `Cancelled` is an error type, so `?` works in a handler returning
    /// a boxed error (and, with the `tonic` feature, in a tonic method: it converts into the
    /// reason's `Status`).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// use tower_cancel::{Cancelled, RequestCancellation};
    ///
    /// async fn report(rc: &RequestCancellation) -> Result<String, Cancelled> {
    ///     let rows = rc.run(async {
    ///         tokio::time::sleep(Duration::from_millis(5)).await; // a slow query
    ///         vec![1, 2, 3]
    ///     })
    ///     .await?;
    ///     Ok(format!("{} rows", rows.len()))
    /// }
    /// ```
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe if `work` is.
    pub async fn run<F: Future>(&self, work: F) -> Result<F::Output, Cancelled> {
        // Checked here too: before tokio-util 0.7.16, `run_until_cancelled` polled the work
        // once even on a cancelled token.
        if self.scope.token().is_cancelled() {
            return Err(self.scope.record());
        }
        match self.scope.token().run_until_cancelled(work).await {
            Some(output) => Ok(output),
            None => Err(self.scope.record()),
        }
    }

    /// The record of this request's cancellation, for code that saw its token cancelled.
    pub(crate) fn record(&self) -> Cancelled {
        self.scope.record()
    }

    /// The request's deadline, if one applies: the earliest of the layers'
    /// [`timeout`](crate::CancellationLayer::timeout) and, where honoured, the `grpc-timeout`
    /// header, counted from when the outermost layer saw the request.
    ///
    /// When it passes, the request is cancelled with
    /// [`CancelReason::DeadlineExceeded`]. Use it to budget work, or to pass the remaining
    /// time on to a downstream call.
    pub fn deadline(&self) -> Option<Instant> {
        self.scope.deadline()
    }
}

impl fmt::Debug for RequestCancellation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RequestCancellation")
            .field(&self.scope)
            .finish()
    }
}

/// No [`CancellationLayer`](crate::CancellationLayer) wraps the service: the request carries
/// no cancellation scope.
///
/// Returned by [`RequestCancellation::from_extensions`] and by the axum extractor (feature
/// `axum`), where it answers `500 Internal Server Error`. With the `tonic` feature it converts
/// into `tonic::Status::internal`. Its message says which layer to add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MissingCancellationLayer;

impl fmt::Display for MissingCancellationLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the request has no cancellation scope: wrap the service in \
             `tower_cancel::CancellationLayer::new()` (axum: `.layer(..)` on the Router, or \
             `.route_layer(..)` for this route; tonic: `Server::builder().layer(..)`)",
        )
    }
}

impl std::error::Error for MissingCancellationLayer {}
