//! `CancellationLayer`: the configuration shared by every request of a service.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_layer::Layer;

use crate::record::Cancelled;
use crate::runtime::callback::Callback;
use crate::runtime::cleanup::{CleanupCounts, CleanupsOverran, Limiter};
use crate::runtime::handlers::{DetachedCounts, Handlers};
use crate::runtime::shutdown::Shutdown;
use crate::scope::config::{Config, Recorder, copy_extension};
use crate::server::service::{Attached, CancellationService, Detached};
use crate::timeout_header::Conventions;

/// A [`Layer`] that gives every request a cancellation scope and runs cleanup when the
/// request is abandoned.
///
/// Callbacks added here run for every cancelled request of the wrapped service, after the
/// handler's own registrations, in the order they were added. A second `CancellationLayer`
/// deeper in the stack (a per-route layer) joins the scope of the outer one: the request
/// keeps one token, and the callbacks of every layer run once, innermost layer first.
///
/// Cloning is cheap: the configuration is shared. Clones also share the task tracker and the
/// cleanup limit (and its counts), until [`task_tracker`](Self::task_tracker) or
/// [`max_running_cleanups`](Self::max_running_cleanups) gives a clone its own.
///
/// The type parameter says what happens to the handler when its client leaves: by default
/// ([`Attached`]) hyper drops it; [`detached()`](Self::detached) keeps it running.
///
/// # Which layer counts a request's tasks
///
/// One rule: the layer that creates a request's scope, the outermost `CancellationLayer` of
/// the request, counts every task the request leaves running. Its [tracker](Self::get_task_tracker)
/// tracks the [`detached`](Self::detached) handler of a per-route layer, an upgraded
/// connection held with [`hold_for_upgrade`](crate::RequestCancellation::hold_for_upgrade),
/// and the async cleanups of every layer of the request, which run under its
/// cleanup limit ([`max_running_cleanups`](Self::max_running_cleanups)) and are awaited by its
/// [`drain_cleanups`](Self::drain_cleanups). So a graceful shutdown waits on the app-wide
/// layer alone. A per-route layer's own `task_tracker` and cleanup limit apply only to
/// requests it is the outermost layer of; its callbacks, deadline, shutdown token and
/// [`detached_limit`](CancellationLayer::detached_limit) always apply.
///
/// # Deadlines
///
/// ```
/// use std::time::Duration;
/// use tower_cancel::CancellationLayer;
///
/// let layer = CancellationLayer::new()
///     .timeout(Duration::from_secs(30)) // every request
///     .grpc_timeout(true)               // and, if shorter, the caller's `grpc-timeout` (gRPC),
///     .connect_timeout(true)            // `connect-timeout-ms` (Connect RPC),
///     .envoy_timeout(true);             // `x-envoy-expected-rq-timeout-ms` (Envoy, Istio)
/// ```
///
/// When the deadline passes, the request is cancelled with
/// [`CancelReason::DeadlineExceeded`](crate::CancelReason::DeadlineExceeded) and its callbacks
/// run. Unlike tower's `TimeoutLayer`, the handler is not dropped: it sees its token and
/// chooses its answer (a `504` of its own, a partial result, a gRPC `DEADLINE_EXCEEDED`
/// status). [`RequestCancellation::deadline`](crate::RequestCancellation::deadline) returns
/// the deadline, to budget work or hand the remaining time to a downstream call. The deadline
/// covers the response body too: a stream still running when it passes is cancelled with phase
/// `Body`.
///
/// * The shortest deadline wins: the layer's `timeout` or any honoured header (each convention
///   is opt-in; a request carrying several gets the shortest); in a stack of layers, a
///   per-route layer can shorten the deadline, never extend it.
/// * Each header's syntax is on its method. Anything else (empty, too many digits, a sign, a
///   space, a decimal point, a unit where none belongs or an unknown one, non-ASCII, a repeated
///   header) is ignored with a `debug` event on target `tower_cancel` naming the header and
///   why; nothing panics (property tests over random bytes in `src/timeout_header/`, and a fuzz
///   target per parser).
/// * Outbound, [`PropagateLayer`](crate::PropagateLayer) writes the time that remains in the
///   convention of the call: `grpc-timeout` for gRPC, `connect-timeout-ms` for Connect, and for
///   anything else only the millisecond header given to its `deadline_header(..)`; a plain
///   HTTP call without one gets no deadline header.
/// * Requests of a layer without a deadline create no timer.
/// * **A drop at the deadline is a deadline.** Others may enforce the same deadline and drop
///   the request a moment before the layer's timer fires: tonic's server (its timer starts a
///   little earlier, outside your layers), tower-http's `TimeoutLayer` with the same duration,
///   or a gRPC client, which resets the stream at its own deadline; its clock started before
///   the request reached the server, so the reset arrives early by the time the request took
///   to arrive. A drop at most 1 ms before a deadline the server chose (`timeout`), or at most
///   20 ms before one the client chose (any of the headers), or after it, is recorded as
///   `DeadlineExceeded`, not `Disconnected`; with both, each keeps its own slack. A client
///   reset that arrives more than 20 ms early (a server so loaded that requests wait that long
///   before reaching the layer) is recorded as `Disconnected`. Unit tests
///   `a_drop_at_the_deadline_is_a_deadline_not_a_disconnect` and
///   `mixed_deadlines_keep_the_widest_slack_that_applies`; over sockets, `tests/tonic.rs`
///   `grpc_timeout_is_a_deadline_even_when_tonic_drops_the_call_first`, where tonic drops
///   every call before the layer's timer fires. (Measured while building it: 20 concurrent
///   tonic calls on one runtime reached the server 1–7 ms after their client's timer started.)
///
/// # Work that runs on after a cancellation
///
/// A handler that is cancelled without being dropped (by a shutdown, a deadline, an explicit
/// cancel, or on a [`detached`](Self::detached) route) runs until it notices its token. When
/// the request's work finally stops, one `debug` event (target `tower_cancel`, in the
/// request's span) says how long it ran on: message `"cancelled request stopped"`, fields
/// `reason`, `method`, `path`, `phase`, `ran_after_cancel` (a `Duration`) and `stopped`:
///
/// * `"ended"`: the handler returned and its response body, if it was streaming or still to
///   come, reached its end (or failed);
/// * `"dropped"`: the server dropped the handler future or the body first (the client left
///   later on, a graceful shutdown gave up), or a detached handler's runtime shut down.
///
/// The time runs from the moment the layer recorded the cancellation (for an explicit cancel,
/// the moment it noticed the token) to the moment the response is over: the handler future
/// returned or was dropped and, once it had answered, the body ended or was dropped; on a
/// detached route, also the handler's own task returned. A request that the server drops (its
/// client left) stopped at once: its `"request cancelled"` event carries `stopped = "dropped"`
/// and `ran_after_cancel = 0ns`, and no second event follows (unless a detached handler or a
/// held upgraded connection still runs: its end makes the report). One report per cancelled
/// request, none for a completed one.
///
/// # Metrics
///
/// With feature `metrics`, the layer records through the [`metrics`](https://docs.rs/metrics)
/// facade into the recorder the application installed (a Prometheus, StatsD or OpenTelemetry
/// exporter):
///
/// | name | kind | labels | counts |
/// |---|---|---|---|
/// | `tower_cancel_cancellations_total` | counter | `reason`, `phase` | requests cancelled |
/// | `tower_cancel_cleanups_total` | counter | `outcome`: `run`, `refused`, `overrun` | async cleanups that ran to their end (or panicked), were refused (queue full, runtime shut down), or were unfinished when [`drain_cleanups`](Self::drain_cleanups) ran out of time |
/// | `tower_cancel_detached_refused_total` | counter | none | requests to a [`detached`](Self::detached) route refused with 503 because its [`detached_limit`](CancellationLayer::detached_limit) handlers were running |
/// | `tower_cancel_ran_after_cancel_seconds` | histogram | `reason`, `phase` | the time a cancelled request's work ran on, as above (0 when it was dropped at once) |
///
/// Label values are the names of [`CancelReason`](crate::CancelReason) and
/// [`Phase`](crate::Phase) as `as_str` gives them (`disconnected`, `handler`, ...); no label
/// carries a path or a method, so none grows without bound. Nothing is recorded for a
/// request that completes, and its path does no more work than without the feature. A layer
/// describes its metrics (unit, help text) to the recorder installed when it is built; every
/// layer of the process records under the same names.
///
/// `cargo run --example metrics` shows every case; `tests/metrics.rs` reads the values back.
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
#[must_use = "a layer does nothing until it wraps a service"]
pub struct CancellationLayer<M = Attached> {
    config: Arc<Config>,
    mode: PhantomData<fn() -> M>,
}

impl CancellationLayer {
    /// A layer with no callbacks, no shutdown token, no deadline and its own [`TaskTracker`].
    ///
    /// A layer, and each builder method's result, must be used: a dropped result configures
    /// nothing, which is a warning.
    ///
    /// ```compile_fail
    /// #![deny(unused_must_use)]
    /// let layer = tower_cancel::CancellationLayer::new();
    /// layer.clone().on_cancel(|_| {}); // error: the callback is added to a layer nobody uses
    /// ```
    ///
    /// Even with no callbacks it is useful: handlers get a token that is cancelled when
    /// their client leaves.
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config::new()),
            mode: PhantomData,
        }
    }

    /// Keeps handlers running when their client leaves: for routes whose work must finish
    /// (a payment, an upload to commit).
    ///
    /// Each request's handler future is spawned on the current Tokio runtime and tracked by
    /// the outermost layer's [`TaskTracker`] (this one's when it is the outermost, the
    /// app-wide layer's when this is a per-route layer: see "Which layer counts a request's
    /// tasks" above), so a graceful shutdown that waits on that tracker waits for it. When the client leaves, the request is still cancelled with
    /// [`CancelReason::Disconnected`](crate::CancelReason::Disconnected) and the callbacks
    /// run at once, so the handler *can* look at its token (for example to skip work that
    /// only served the response); the response it eventually returns is discarded.
    ///
    /// Use it on the routes that need it (per route, below an app-wide layer: it joins the
    /// outer scope), not app-wide: work nobody waits for still costs. It requires the handler
    /// future to be `Send + 'static`. Outside a Tokio runtime the handler cannot be spawned;
    /// it then runs inline (hyper drops it with the connection) and a `warn` event says so.
    ///
    /// | | default | `detached()` |
    /// |---|---|---|
    /// | client leaves while the handler runs | handler dropped at its next `.await` | handler runs to its end |
    /// | token, reason, callbacks | cancelled, `Disconnected`, run | the same |
    /// | response | never sent | computed, then discarded |
    /// | graceful shutdown | nothing to wait for | `tracker.wait()` waits for the handler |
    /// | handlers running at once | bounded by the connections' streams | at most [`detached_limit`](CancellationLayer::detached_limit) (1024); beyond, `503` before the handler starts |
    ///
    /// The route's response body must be `Default` (axum's `Body`, `Full`, `Empty`,
    /// `String` are): it is the body of the `503`.
    ///
    /// Use the default where the work only serves the response (queries, reports, renders),
    /// and `detached()` where stopping halfway would leave things inconsistent.
    /// `tests/axum_example.rs` sends SIGTERM during a payment whose client left: the `axum`
    /// example exits once it committed.
    ///
    /// ```
    /// use tower::Layer;
    /// use tower_cancel::CancellationLayer;
    ///
    /// # let payment_service = tower::service_fn(|_: http::Request<()>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    /// # });
    /// let payments = CancellationLayer::new().detached().layer(payment_service);
    /// # drop(payments);
    /// ```
    pub fn detached(self) -> CancellationLayer<Detached> {
        CancellationLayer {
            config: self.config,
            mode: PhantomData,
        }
    }
}

impl CancellationLayer<Detached> {
    /// The default of [`detached_limit`](Self::detached_limit): 1024 handlers at once.
    pub const DEFAULT_DETACHED_LIMIT: usize = crate::runtime::handlers::DEFAULT_MAX;

    /// Bounds the detached handlers of this layer (and its clones): at most `max` run at
    /// once, counted from the moment a handler is spawned to the moment its task ends,
    /// whether or not its client is still there. A request that arrives while `max` run is
    /// refused with `503 Service Unavailable` (an empty body) *before its handler starts*,
    /// with a `debug` event, a `warn` event when the limit is first reached (again only after
    /// the count fell to half of it) and, with feature `metrics`, the counter
    /// `tower_cancel_detached_refused_total`. The 503 completes the request: nothing is
    /// cancelled. Default: [`DEFAULT_DETACHED_LIMIT`](Self::DEFAULT_DETACHED_LIMIT), 1024;
    /// `max` is at least 1.
    ///
    /// Why a bound: a detached handler outlives its client, so a client that opens requests
    /// and abandons them at once (HTTP/2 rapid reset, CVE-2023-44487) would leave one running
    /// handler behind per request, as many as it cares to send; attached handlers are dropped
    /// with their streams, and async cleanups are bounded for the same reason.
    ///
    /// Why refuse rather than drop: the routes that are detached are the ones whose work must
    /// not stop half-way (a payment, a commit). Dropping a started handler past the limit
    /// would tear exactly that work in half; refusing a request that has not started leaves
    /// nothing half-done, and its client can retry. Size the limit to what the route's
    /// backend can take at once (a database pool, a payment provider's rate), which is also
    /// where a flood should stop.
    ///
    /// ```
    /// use tower_cancel::CancellationLayer;
    ///
    /// let payments = CancellationLayer::new().detached().detached_limit(64);
    /// assert_eq!(payments.detached_counts().running, 0);
    /// ```
    pub fn detached_limit(self, max: usize) -> Self {
        self.configure(|config| config.handlers = Arc::new(Handlers::new(max)))
    }

    /// How the detached handlers of this layer (and its clones) are doing: running now, and
    /// refused since [`detached_limit`](Self::detached_limit) (or the layer) was set.
    pub fn detached_counts(&self) -> DetachedCounts {
        self.config.handlers.counts()
    }
}

impl<M> CancellationLayer<M> {
    fn configure(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// Adds a synchronous callback, run once for every cancelled request.
    ///
    /// It runs on the thread that noticed the cancellation (for a disconnect, inside hyper's
    /// connection task, right after the handler future or body was dropped; for a shutdown,
    /// in the task that watches the shutdown token), so keep it short and non-blocking; use
    /// [`on_cancel_async`](Self::on_cancel_async) for I/O. A panic is caught and reported
    /// with `tracing::error!`; the other callbacks still run.
    pub fn on_cancel<F>(self, callback: F) -> Self
    where
        F: Fn(&Cancelled) + Send + Sync + 'static,
    {
        self.configure(|config| config.callbacks.push(Callback::sync(callback)))
    }

    /// Adds an asynchronous cleanup, spawned once for every cancelled request.
    ///
    /// The future is spawned on the Tokio runtime the request arrived on, tracked by the
    /// outermost layer's [`TaskTracker`] (see [`task_tracker`](Self::task_tracker)), so a
    /// graceful shutdown can wait for every cleanup with `tracker.close();
    /// tracker.wait().await`. How many run at once is bounded by the outermost layer's
    /// cleanup limit ([`max_running_cleanups`](Self::max_running_cleanups)).
    /// A panic inside it is caught and reported. If no runtime is reachable, the cleanup does
    /// not run and an `error` event says so.
    pub fn on_cancel_async<F, Fut>(self, cleanup: F) -> Self
    where
        F: Fn(Cancelled) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.configure(|config| {
            config.callbacks.push(Callback::asynchronous(cleanup));
            config.has_async = true;
        })
    }

    /// Tracks the tasks of the requests this layer is the outermost layer of (async cleanups,
    /// [`detached`](CancellationLayer::detached) handlers, held upgrades) on `tracker` instead
    /// of the layer's own.
    ///
    /// Share one tracker between the layer and the rest of the server, then during shutdown
    /// call `tracker.close()` and `tracker.wait().await`.
    pub fn task_tracker(self, tracker: TaskTracker) -> Self {
        self.configure(|config| config.tracker = tracker)
    }

    /// Cancels every in-flight request with
    /// [`CancelReason::Shutdown`](crate::CancelReason::Shutdown) when `token` is cancelled.
    ///
    /// The requests' tokens are cancelled and their callbacks run promptly, without waiting
    /// for the handlers; the handlers are not dropped: they see their token and answer. A
    /// request that arrives once `token.cancel()` has returned starts cancelled: its token is
    /// cancelled, its sync callbacks have run and its async ones are spawned before the handler
    /// is called, on any runtime, also for the layer's first request and for a token cancelled
    /// before the layer was built. ("Returned" means the `cancel()` call that cancelled the
    /// token: a second, concurrent `cancel()` can return while the first is still waking the
    /// token's waiters, and the layer learns of the shutdown from its own waiter.) Wire the same
    /// token into the accept loop and hyper-util's `GracefulShutdown`, and the drain ends as
    /// soon as the handlers return (see the `graceful_shutdown` example).
    ///
    /// Requests are not child tokens of `token`: that would serialise every request on the
    /// token's lock. The layer keeps its in-flight requests in a registry sharded by thread
    /// and watches `token` from one task, spawned on the runtime of the first request (and
    /// again on a later request's runtime if that one shut down); a waker it parks on `token`
    /// when this method is called raises a flag inside `token.cancel()`, which is how a new
    /// request knows without a lock.
    ///
    /// With a [`shutdown_grace`](Self::shutdown_grace), cancelling `token` announces a drain
    /// instead, and the requests are cancelled when the grace is over.
    pub fn shutdown_token(self, token: CancellationToken) -> Self {
        self.configure(|config| {
            config.shutdown = Some(Shutdown::with_grace(token, config.shutdown_grace));
        })
    }

    /// Splits the shutdown in two phases: when the [`shutdown_token`](Self::shutdown_token)
    /// is cancelled, requests in flight are told to finish up, and `grace` later those still
    /// running are cancelled with [`CancelReason::Shutdown`](crate::CancelReason::Shutdown).
    ///
    /// * **Draining**, from `token.cancel()`: nothing is cancelled. Handlers, response bodies
    ///   and upgraded connections learn of it through
    ///   [`RequestCancellation::draining`](crate::RequestCancellation::draining) (a future)
    ///   or [`is_draining`](crate::RequestCancellation::is_draining), and finish on their own
    ///   terms: a WebSocket sends `1001 going away`, a report that is almost done completes.
    ///   Requests that arrive meanwhile (on connections still open) are served and drain too.
    ///   An [`EndOnShutdownLayer`](crate::server::EndOnShutdownLayer) ends streaming
    ///   responses (SSE) by itself.
    /// * **Hard**, `grace` after `token.cancel()` (counted from that call, even if the
    ///   layer's watcher task runs late): every request still in flight is cancelled with
    ///   `Shutdown`, exactly as without a grace, and requests that arrive from then on start
    ///   cancelled.
    ///
    /// The default is no grace: `token.cancel()` cancels every request at once. The grace is
    /// the layer's own timer; wire the same token into the server's graceful shutdown (with
    /// axum, `with_graceful_shutdown`) and give the server a bound above the grace, so that
    /// the hard phase's answers still go out. `shutdown_token` and `shutdown_grace` can come
    /// in either order.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// use tokio_util::sync::CancellationToken;
    /// use tower_cancel::CancellationLayer;
    ///
    /// let shutdown = CancellationToken::new();
    /// let layer = CancellationLayer::new()
    ///     .shutdown_token(shutdown.clone())
    ///     .shutdown_grace(Duration::from_secs(10));
    /// // On SIGTERM: `shutdown.cancel()`; requests drain for 10 s, then are cancelled.
    /// # drop(layer);
    /// ```
    pub fn shutdown_grace(self, grace: Duration) -> Self {
        self.configure(|config| {
            config.shutdown_grace = grace;
            if let Some(shutdown) = &config.shutdown {
                config.shutdown = Some(Shutdown::with_grace(shutdown.token().clone(), grace));
            }
        })
    }

    /// Gives every request a deadline: `timeout` after the layer saw it, the request is
    /// cancelled with [`CancelReason::DeadlineExceeded`](crate::CancelReason::DeadlineExceeded).
    ///
    /// The handler is not dropped: it sees its token and chooses its answer (a 503 or 504
    /// of its own, a partial result). [`RequestCancellation::deadline`](crate::RequestCancellation::deadline)
    /// reports the deadline. In a stack of layers, the shortest deadline wins. The deadline
    /// also covers the response body: a stream still running when it passes is cancelled
    /// with phase `Body`. Requests of a layer without a deadline pay nothing for this.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.configure(|config| config.timeout = Some(timeout))
    }

    /// Honours the `grpc-timeout` request header (gRPC over HTTP/2): its deadline applies as
    /// if given to [`timeout`](Self::timeout), and the shortest deadline of all wins (this,
    /// `timeout`, [`connect_timeout`](Self::connect_timeout) and
    /// [`envoy_timeout`](Self::envoy_timeout), each only if set).
    ///
    /// A valid value is 1 to 8 ASCII digits followed by one unit: `H` (hours), `M` (minutes),
    /// `S` (seconds), `m` (milliseconds), `u` (microseconds) or `n` (nanoseconds). Anything
    /// else (empty, 9 digits or more, a sign, a space, an unknown unit, non-ASCII, or the
    /// header repeated) is ignored with a `debug` event on target `tower_cancel`.
    ///
    /// Turn it on for gRPC servers. The client enforces the same deadline (it resets the
    /// stream when it passes), and so does tonic's server; without this the layer knows no
    /// deadline and records their drops as `Disconnected`. With it, a drop at the deadline is
    /// recorded as [`DeadlineExceeded`](crate::CancelReason::DeadlineExceeded).
    pub fn grpc_timeout(self, honour: bool) -> Self {
        self.honour(Conventions::GRPC, honour)
    }

    /// Honours the `connect-timeout-ms` request header ([Connect RPC]): its deadline applies
    /// as if given to [`timeout`](Self::timeout), and the shortest deadline of all wins.
    ///
    /// A valid value is a positive whole number of milliseconds, 1 to 10 ASCII digits. Anything
    /// else (empty, `0`, 11 digits or more, a sign, a space, a unit, or the header repeated) is
    /// ignored with a `debug` event on target `tower_cancel`. Connect clients enforce their
    /// deadline themselves, so a drop a moment before it counts as
    /// [`DeadlineExceeded`](crate::CancelReason::DeadlineExceeded), as for `grpc-timeout`.
    ///
    /// [Connect RPC]: https://connectrpc.com/docs/protocol/
    pub fn connect_timeout(self, honour: bool) -> Self {
        self.honour(Conventions::CONNECT, honour)
    }

    /// Honours the `x-envoy-expected-rq-timeout-ms` request header, which Envoy (and so Istio)
    /// sends to the upstream it routes to: the route's timeout in milliseconds. Its deadline
    /// applies as if given to [`timeout`](Self::timeout), and the shortest deadline of all
    /// wins.
    ///
    /// The value is read as for [`connect_timeout`](Self::connect_timeout): 1 to 10 ASCII
    /// digits, not `0` (a route timeout of 0 disables it). Envoy resets the upstream request
    /// when its route timeout passes, so a drop a moment before the deadline counts as
    /// [`DeadlineExceeded`](crate::CancelReason::DeadlineExceeded). Turn it on only behind an
    /// Envoy that sets the header: a client could send it too, and would only shorten its own
    /// request.
    pub fn envoy_timeout(self, honour: bool) -> Self {
        self.honour(Conventions::ENVOY, honour)
    }

    fn honour(self, convention: Conventions, honour: bool) -> Self {
        self.configure(|config| {
            config.deadline_headers = config.deadline_headers.set(convention, honour);
        })
    }

    /// Keeps request header `name` for this layer's cancellation records:
    /// [`Cancelled::header`](crate::Cancelled::header) returns it, so a callback or a log line
    /// can tie the cancellation to a request id (`x-request-id`), a tenant, a trace.
    ///
    /// Copied when the request enters the layer (every value of a repeated header); nothing is
    /// copied and nothing is allocated for requests of a layer that records nothing. Only the
    /// layer that creates the request's scope (the outermost) records: a per-route layer that
    /// joins its scope cannot add to the record.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_cancel::{CancellationLayer, Cancelled};
    ///
    /// let layer = CancellationLayer::new()
    ///     .record_header(HeaderName::from_static("x-request-id"))
    ///     .on_cancel(|c: &Cancelled| {
    ///         let id = c.header("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
    ///         eprintln!("request {id} cancelled: {}", c.reason());
    ///     });
    /// # drop(layer);
    /// ```
    pub fn record_header(self, name: HeaderName) -> Self {
        self.configure(|config| config.recorders.push(Recorder::Header(name)))
    }

    /// Keeps the request extension of type `T` for this layer's cancellation records:
    /// [`Cancelled::extension`](crate::Cancelled::extension) returns it. For what a layer
    /// outside this one or the framework put there: axum's `MatchedPath` (present for a layer
    /// added with `Router::layer` or `route_layer`, which run after routing), tower-http's
    /// `RequestId`.
    ///
    /// Cloned when the request enters the layer, if present; as for
    /// [`record_header`](Self::record_header), it costs nothing to a layer that records
    /// nothing, and only the outermost layer records.
    ///
    /// ```
    /// use tower_cancel::{CancellationLayer, Cancelled};
    ///
    /// #[derive(Clone)]
    /// struct Tenant(String);
    ///
    /// let layer = CancellationLayer::new()
    ///     .record_extension::<Tenant>()
    ///     .on_cancel(|c: &Cancelled| {
    ///         let tenant = c.extension::<Tenant>().map_or("-", |t| t.0.as_str());
    ///         eprintln!("{tenant}: {} cancelled", c.uri().path());
    ///     });
    /// # drop(layer);
    /// ```
    pub fn record_extension<T: Clone + Send + Sync + 'static>(self) -> Self {
        self.configure(|config| {
            config
                .recorders
                .push(Recorder::Extension(copy_extension::<T>));
        })
    }

    /// The level of the one event each cancellation emits (target `tower_cancel`, message
    /// `"request cancelled"`, fields `reason`, `method`, `path`, `phase`, `elapsed`): `DEBUG`
    /// unless set; at `INFO` it shows in a service's usual logs. Set it on the outermost layer,
    /// the one that creates the request's scope.
    ///
    /// When an event at this level is enabled, the layer also keeps the request's span (the one
    /// current when the request entered the layer, such as the span of tower-http's
    /// `TraceLayer`), emits the event in it, and records the reason and the phase on it as the
    /// fields `tower_cancel.reason` and `tower_cancel.phase`, if the span declares them (as
    /// `tracing::field::Empty`). A `tracing-opentelemetry` exporter turns them into attributes
    /// of the request's span, which then says "cancelled", not "failed".
    ///
    /// A response to a request cancelled before its handler answered (by a shutdown, a
    /// deadline, [`RequestCancellation::cancel`](crate::RequestCancellation::cancel)) carries
    /// the request's [`Cancelled`](crate::Cancelled) record in its extensions: a `TraceLayer`
    /// classifier can count the `503` a handler answers at shutdown as the cancellation it is
    /// rather than as a server error. A client that leaves has no answer at all: hyper drops
    /// `TraceLayer`'s future, which reports nothing, and the span closes with the reason
    /// recorded.
    ///
    /// ```toml
    /// [dependencies]
    /// tower-cancel = "0.1"
    /// tower = { version = "0.5", features = ["util"] }
    /// tower-http = { version = "0.7", features = ["trace"] }
    /// tracing = "0.1"
    /// http = "1"
    /// tokio = { version = "1", features = ["macros", "rt"] }
    /// ```
    ///
    /// ```
    /// use std::fmt;
    ///
    /// use http::{Request, Response, StatusCode};
    /// use tower::{ServiceBuilder, ServiceExt, service_fn};
    /// use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};
    /// use tower_http::classify::{
    ///     ClassifiedResponse, ClassifyResponse, NeverClassifyEos, ServerErrorsAsFailures,
    ///     ServerErrorsFailureClass, SharedClassifier,
    /// };
    /// use tower_http::trace::TraceLayer;
    /// use tracing::{Level, field::Empty};
    ///
    /// /// Server errors are failures, except the answer to a cancelled request.
    /// #[derive(Clone, Copy)]
    /// struct CancelledIsNotAFailure;
    ///
    /// impl ClassifyResponse for CancelledIsNotAFailure {
    ///     type FailureClass = ServerErrorsFailureClass;
    ///     type ClassifyEos = NeverClassifyEos<ServerErrorsFailureClass>;
    ///
    ///     fn classify_response<B>(
    ///         self,
    ///         res: &Response<B>,
    ///     ) -> ClassifiedResponse<Self::FailureClass, Self::ClassifyEos> {
    ///         if res.extensions().get::<Cancelled>().is_some() {
    ///             return ClassifiedResponse::Ready(Ok(()));
    ///         }
    ///         ServerErrorsAsFailures::new().classify_response(res)
    ///     }
    ///
    ///     fn classify_error<E: fmt::Display + 'static>(self, error: &E) -> Self::FailureClass {
    ///         ServerErrorsAsFailures::new().classify_error(error)
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let svc = ServiceBuilder::new()
    ///     .layer(
    ///         TraceLayer::new(SharedClassifier::new(CancelledIsNotAFailure)).make_span_with(
    ///             |req: &Request<String>| {
    ///                 tracing::info_span!(
    ///                     "request",
    ///                     method = %req.method(),
    ///                     uri = %req.uri(),
    ///                     tower_cancel.reason = Empty,
    ///                     tower_cancel.phase = Empty,
    ///                 )
    ///             },
    ///         ),
    ///     )
    ///     .layer(CancellationLayer::new().event_level(Level::INFO))
    ///     .service(service_fn(|req: Request<String>| async move {
    ///         // Cancelled before it answers, as a shutdown or a deadline would.
    ///         RequestCancellation::from_extensions(req.extensions()).unwrap().cancel();
    ///         let mut res = Response::new(String::from("stopped"));
    ///         *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    ///         Ok::<_, std::convert::Infallible>(res)
    ///     }));
    /// let res = svc.oneshot(Request::new(String::new())).await.unwrap();
    /// assert_eq!(res.status(), 503);
    /// assert!(res.extensions().get::<Cancelled>().is_some());
    /// # }
    /// ```
    pub fn event_level(self, level: tracing::Level) -> Self {
        self.configure(|config| config.event_level = level)
    }

    /// Bounds the async cleanups of the requests this layer is the outermost layer of (those
    /// of every layer of the request): at most `max` run at once; more wait in a queue of
    /// [`max_queued_cleanups`](Self::max_queued_cleanups), and beyond that a cleanup is
    /// refused with a `warn` event and counted (see [`cleanup_counts`](Self::cleanup_counts)).
    ///
    /// The default is 64 running and 1024 queued. A client can create and cancel thousands
    /// of requests a second (HTTP/2 rapid reset, CVE-2023-44487): without a bound, each would
    /// leave a task behind. `max` is at least 1. A running slot is one task that takes the
    /// next queued cleanup when its own is done.
    ///
    /// Each call starts new counts ([`cleanup_counts`](Self::cleanup_counts)), shared by this
    /// layer and the clones made from it afterwards.
    ///
    /// `tests/cleanup_limit.rs` cancels 10 000 requests at once against a limit of 16 running
    /// and 1 000 queued: 16 tasks, 1 000 queued, 8 984 refused with one `warn` each, and all
    /// 1 016 admitted cleanups run.
    ///
    /// ```
    /// let layer = tower_cancel::CancellationLayer::new()
    ///     .max_running_cleanups(16)
    ///     .max_queued_cleanups(256);
    /// # drop(layer);
    /// ```
    pub fn max_running_cleanups(self, max: usize) -> Self {
        self.configure(|config| {
            let queued = config.limiter.max_queued();
            config.limiter = Arc::new(Limiter::new(max, queued));
        })
    }

    /// How many async cleanups may wait for a running slot (see
    /// [`max_running_cleanups`](Self::max_running_cleanups)): 1024 unless set; `0` refuses
    /// every cleanup that finds no free slot. Queued cleanups are not spawned yet, but the
    /// [`TaskTracker`] tracks them like running ones.
    pub fn max_queued_cleanups(self, max: usize) -> Self {
        self.configure(|config| {
            let running = config.limiter.max_running();
            config.limiter = Arc::new(Limiter::new(running, max));
        })
    }

    /// How the layer's async cleanups are doing: running, queued, refused and completed,
    /// counted across every service and request built from this layer.
    ///
    /// ```
    /// let layer = tower_cancel::CancellationLayer::new().max_running_cleanups(16);
    /// let counts = layer.cleanup_counts();
    /// assert_eq!((counts.running, counts.queued, counts.refused), (0, 0, 0));
    /// ```
    pub fn cleanup_counts(&self) -> CleanupCounts {
        self.config.limiter.counts()
    }

    /// Waits, at shutdown, until every async cleanup of this layer has finished (the running
    /// ones and the ones queued behind the limit, see
    /// [`max_running_cleanups`](Self::max_running_cleanups)), for at
    /// most `timeout`.
    ///
    /// Call it after the server stopped taking requests and the in-flight ones ended (for
    /// example after hyper-util's `GracefulShutdown`), and before the runtime shuts down: a
    /// runtime that shuts down drops the cleanups it still holds. If time runs out, every
    /// unfinished cleanup is reported with a `warn` event (target `tower_cancel`) naming its
    /// request, and the error counts them.
    ///
    /// Unlike waiting on the [tracker](Self::get_task_tracker), this waits for cleanups only, not for
    /// [`detached`](Self::detached) handlers or other tasks sharing the tracker.
    ///
    /// `tests/drain.rs` checks both outcomes. A cleanup whose runtime shuts down before it
    /// finishes (one submitted after the drain, say) is dropped with a `warn` event of its own
    /// and counted as refused, never silently. The [servers guide](crate::guide::servers#graceful-shutdown) has a
    /// graceful shutdown in four steps.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = tower_cancel::CancellationLayer::new()
    ///     .on_cancel_async(|_| async { /* release what the request held */ });
    /// // ... serve, stop accepting, let the connections close, then:
    /// match layer.drain_cleanups(Duration::from_secs(5)).await {
    ///     Ok(counts) => println!("{} cleanups ran, {} refused", counts.completed, counts.refused),
    ///     Err(overran) => eprintln!("shutting down anyway: {overran}"),
    /// }
    /// # }
    /// ```
    pub async fn drain_cleanups(
        &self,
        timeout: Duration,
    ) -> Result<CleanupCounts, CleanupsOverran> {
        self.config.limiter.drain(timeout).await
    }

    /// The tracker of the tasks this layer counts (see "Which layer counts a request's tasks"):
    /// the one given to [`task_tracker`](Self::task_tracker), or the layer's own. Named as
    /// std's `Command::get_*` getters are, beside the builder method of the same name.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = tower_cancel::CancellationLayer::new();
    /// let tracker = layer.get_task_tracker().clone();
    /// // ... serve, then at shutdown:
    /// tracker.close();
    /// tracker.wait().await;
    /// # }
    /// ```
    pub fn get_task_tracker(&self) -> &TaskTracker {
        &self.config.tracker
    }
}

impl Default for CancellationLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> Clone for CancellationLayer<M> {
    fn clone(&self) -> Self {
        Self {
            config: Arc::clone(&self.config),
            mode: PhantomData,
        }
    }
}

impl<M> fmt::Debug for CancellationLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.config;
        f.debug_struct("CancellationLayer")
            .field("mode", &std::any::type_name::<M>())
            .field("callbacks", &config.callbacks.len())
            .field("tracker", &config.tracker)
            .field("cleanups", &config.limiter)
            .field("shutdown", &config.shutdown)
            .field("timeout", &config.timeout)
            .field("deadline_headers", &config.deadline_headers)
            .finish()
    }
}

impl<S, M> Layer<S> for CancellationLayer<M> {
    type Service = CancellationService<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        CancellationService::from_config(inner, Arc::clone(&self.config))
    }
}
