//! Per-request cancellation for [tower] services: a [`CancellationToken`] that is cancelled
//! when the client goes away, and cleanup that runs exactly once when it does.
//!
//! When an HTTP client gives up (it closes its TCP connection, resets its HTTP/2 stream, or
//! a proxy does it for it), hyper drops the response future, or the response body if the
//! response had started. Code that was awaiting simply stops, work handed to `tokio::spawn`
//! keeps running, and nobody learns why. [`CancellationLayer`] turns that drop into a signal:
//!
//! 1. every request gets a scope, inserted into its extensions as a [`RequestCancellation`]
//!    handle and as the plain [`CancellationToken`] (the same token);
//! 2. when the request is abandoned (the response future or body is dropped before the body
//!    reached its end), the server shuts down ([`CancellationLayer::shutdown_token`]) or its
//!    deadline passes ([`CancellationLayer::timeout`], [`CancellationLayer::grpc_timeout`]),
//!    the token is cancelled once, the [`CancelReason`] and [`Phase`] are recorded, and the
//!    cleanup callbacks run: the handler's own ([`RequestCancellation::on_cancel`]), then the
//!    layer's ([`CancellationLayer::on_cancel`], [`CancellationLayer::on_cancel_async`]);
//! 3. a request that completes is never cancelled.
//!
//! Routes whose work must finish even when the client leaves use
//! [`CancellationLayer::detached`]; async cleanups are bounded
//! ([`CancellationLayer::max_running_cleanups`]) so that a flood of cancellations cannot pile up
//! tasks.
//! At shutdown, [`CancellationLayer::drain_cleanups`] waits for them and reports any it has to
//! leave behind.
//!
//! Across services, [`PropagateLayer`] on an outbound client carries the request's deadline
//! (in the callee's convention: `grpc-timeout`, `connect-timeout-ms`, or a header you name)
//! and its cancellation to the calls made on its behalf, and
//! [`RequestCancellation::run`] binds any future to the request.
//!
//! # Example
//!
#![cfg_attr(
    feature = "axum",
    doc = r#"
An axum router; the client gives up after 10 ms, as hyper's drop of the response future
does when the connection goes (`oneshot` stands for the server here, so that the example
runs as it is):

```toml
[dependencies]
tower-cancel = { version = "0.1", features = ["axum"] }
axum = "0.8"
tokio = { version = "1", features = ["macros", "rt", "time"] }
tower = { version = "0.5", features = ["util"] }
```

```
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::get;
use tower::ServiceExt;
use tower_cancel::{CancelReason, CancellationLayer, Cancelled, Phase, RequestCancellation};

async fn report(cancel: RequestCancellation) -> &'static str {
    cancel.on_cancel(|c| println!("report: discarding the partial result ({})", c.reason()));
    tokio::time::sleep(Duration::from_secs(60)).await; // the slow work
    "report ready"
}

# #[tokio::main(flavor = "current_thread")]
# async fn main() {
let (seen, mut cancellations) = tokio::sync::mpsc::unbounded_channel();
let app = Router::new()
    .route("/report", get(report))
    .layer(CancellationLayer::new().on_cancel(move |c: &Cancelled| {
        let _ = seen.send((c.reason(), c.phase(), c.uri().path().to_owned()));
    }));

let request = Request::get("/report").body(Body::empty()).unwrap();
let gave_up = tokio::time::timeout(Duration::from_millis(10), app.oneshot(request)).await;
assert!(gave_up.is_err());
assert_eq!(
    cancellations.try_recv().unwrap(),
    (CancelReason::Disconnected, Phase::Handler, "/report".to_owned()),
);
# }
```

"#
)]
//! The same with a plain tower service, and a request that completes:
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//!
//! use http::{Request, Response};
//! use tokio_util::sync::CancellationToken;
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//! use tower_cancel::{CancelReason, CancellationLayer, Cancelled, Phase};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let log = seen.clone();
//! let mut svc = ServiceBuilder::new()
//!     .layer(CancellationLayer::new().on_cancel(move |c: &Cancelled| {
//!         log.lock().unwrap().push((c.reason(), c.phase(), c.uri().path().to_owned()));
//!     }))
//!     .service(service_fn(|req: Request<()>| async move {
//!         let token = req.extensions().get::<CancellationToken>().unwrap().clone();
//!         if req.uri().path() == "/slow" {
//!             tokio::time::sleep(Duration::from_secs(60)).await;
//!         }
//!         Ok::<_, Infallible>(Response::new(format!("token cancelled: {}", token.is_cancelled())))
//!     }));
//!
//! // A client that leaves: hyper drops the response future while the handler sleeps.
//! let mut slow = Box::pin(svc.ready().await.unwrap().call(Request::get("/slow").body(()).unwrap()));
//! let _ = tokio::time::timeout(Duration::from_millis(10), &mut slow).await;
//! drop(slow);
//! assert_eq!(
//!     *seen.lock().unwrap(),
//!     [(CancelReason::Disconnected, Phase::Handler, "/slow".to_owned())],
//! );
//!
//! // A request that completes (its body is read to the end) runs no cleanup.
//! let response = svc.ready().await.unwrap().call(Request::get("/fast").body(()).unwrap()).await;
//! let body = http_body_util::BodyExt::collect(response.unwrap().into_body()).await.unwrap();
//! assert_eq!(body.to_bytes(), "token cancelled: false");
//! assert_eq!(seen.lock().unwrap().len(), 1);
//! # }
//! ```
//!
//! With hyper, axum or tonic the layer goes around the service you serve: hyper's
//! `TowerToHyperService`, axum's `Router::layer`, tonic's `Server::builder().layer(..)` (or,
//! for one service of the server, `add_service(layer.layer(..))`: feature `tonic`). The
//! repository's `examples/` have a complete server for each, and a graceful shutdown.
//!
//! The [`guide`] puts the pieces together: [serving with hyper](guide::servers) (HTTPS, a
//! graceful shutdown), [frameworks](guide::frameworks) (axum, tonic, tower-http), and the
//! measured pages: [what the transport can see](guide::transport),
//! [reliability](guide::reliability); the benchmarks are in the repository's `BENCHMARKS.md`.
//!
//! # Features
//!
//! * `axum`: [`RequestCancellation`] is an axum extractor (`FromRequestParts`, and
//!   `OptionalFromRequestParts` for `Option<RequestCancellation>`).
//! * `tonic`: [`CancelReason`] and [`MissingCancellationLayer`] convert into `tonic::Status`,
//!   so that a tonic method can answer `Err(reason.into())` and use `?` on
//!   [`RequestCancellation::from_extensions`]; the layers' services are tonic `NamedService`s,
//!   so a layer can wrap one service of a server, with its own deadline
//!   (`add_service(CancellationLayer::new().timeout(..).layer(ReportsServer::new(..)))`).
//! * `socket2`: `tcp::detect_vanished(&stream, bound)` sets TCP keepalive and
//!   `TCP_USER_TIMEOUT` on an accepted connection, so that a client that vanishes without FIN
//!   or RST is noticed within `bound`.
//! * `metrics`: counters of cancellations (by reason and phase) and of async cleanups (run,
//!   refused, overrun), and a histogram of how long cancelled work ran on after its
//!   cancellation, on the `metrics` facade; see [`CancellationLayer`]'s "Metrics".
//! * `http3`: `http3::serve` serves any tower `Service` (an axum `Router`, a stack with
//!   [`CancellationLayer`]) over HTTP/3 on a `quinn::Endpoint`, with the `h3` crate; a client's
//!   `STOP_SENDING` or `RESET_STREAM` reaches the layer at once, as hyper's drops do, and a
//!   response cut short is reset, never finished. It adds quinn, rustls and ring to the build.
//! * `reqwest`: `propagate::PropagateMiddleware`, a `reqwest-middleware` middleware that
//!   carries the inbound request's cancellation and deadline to reqwest calls, as
//!   [`PropagateLayer`] does for tower clients.
//! * `test-util`: `RequestCancellation::for_test()`, a handle no layer serves, and
//!   `cancel_with(reason)`, to unit-test a handler that takes a [`RequestCancellation`]
//!   without a server.
//!
//! No feature is on by default. On docs.rs every item a feature gates says which.
//!
//! # Semantics
//!
//! * **Exactly once.** A request is cancelled at most once, whatever races (a drop, the
//!   shutdown, the deadline, the application, completion); each callback runs at most once. A
//!   completed request (its response body reached its end) is never cancelled: its token stays
//!   uncancelled.
//! * **Completion** means the end of the response body, not just the response head: a client
//!   that leaves while a download or an SSE stream is being sent cancels the request with
//!   phase `Body`. A response that carries no body on the wire (`HEAD`, `1xx`, `204`, `304`,
//!   `CONNECT` 2xx, an empty body) completes with its head. Over HTTP/1.x a body with a
//!   `content-length` (or an exact size hint) completes when that many bytes were produced,
//!   because hyper's HTTP/1.1 writer stops polling it there (its HTTP/2 writer polls on to the
//!   body's end). A body completes with its trailers frame, always a body's last (hyper's
//!   writers stop polling after it). A body that fails ends the request without cancelling it.
//! * **Order.** On a drop, callbacks run after the handler future (or the body) was dropped,
//!   so the handler's own destructors ran first. Then: the handler's
//!   [`on_cancel`](RequestCancellation::on_cancel) registrations in registration order, then
//!   each layer's callbacks from the innermost layer to the outermost, each in the order
//!   they were added.
//! * **Late registration.** Registering on a cancelled request runs the callback at once; on a
//!   completed request the callback is dropped without running.
//! * **Panics** in callbacks (sync or async) are caught and reported with `tracing::error!`;
//!   the remaining callbacks still run, also when the drop happens while the thread is
//!   unwinding.
//! * **Async cleanup** runs on the runtime the request arrived on, tracked by a
//!   [`TaskTracker`](tokio_util::task::TaskTracker), at most
//!   [`max_running_cleanups`](CancellationLayer::max_running_cleanups) at once. If no runtime is reachable,
//!   an `error` event says so.
//! * **Shutdown and deadlines** cancel the request ([`CancelReason::Shutdown`],
//!   [`CancelReason::DeadlineExceeded`]) without dropping the handler: it sees its token and
//!   answers. A request that arrives once the shutdown token's `cancel()` has returned starts
//!   cancelled (its callbacks run before its handler is called). With a
//!   [`shutdown_grace`](CancellationLayer::shutdown_grace), `cancel()` first announces a drain
//!   ([`RequestCancellation::draining`]; nothing is cancelled, new requests are served) and
//!   all of the above happens when the grace is over. A request
//!   dropped at its deadline (by tonic enforcing `grpc-timeout`, or by the client), when the
//!   layer knows that deadline (`timeout`, or `grpc_timeout(true)`), is recorded as
//!   `DeadlineExceeded`, not `Disconnected`.
//! * **Explicit cancellation.** [`RequestCancellation::cancel`] cancels the request with
//!   [`CancelReason::Explicit`] and runs its callbacks before it returns. Cancelling the token
//!   directly cancels the request too if the layer finds the handler or body waiting (pending)
//!   afterwards, or dropped: it never asks the token on a request's way to completion (the
//!   token's `is_cancelled` takes a mutex), so a request that reaches its end first completed.
//!   The getters report `Explicit` as soon as the token is cancelled. They (`is_cancelled`,
//!   `reason`, `deadline`) are pure queries: they never record anything nor run a callback.
//! * **A panic is not a client leaving.** A handler future or response body whose poll panics,
//!   the panic unwinding through the layer, is recorded as [`CancelReason::Panicked`] when it
//!   is dropped (by Tokio's task, hyper, or a `CatchPanicLayer` outside the layer). A panic
//!   caught inside the layer is a response like any other.
//! * **Stacking.** A deeper `CancellationLayer` joins the scope of the outer one: its
//!   callbacks, shutdown token and deadline (which can only shorten the outer one) apply.
//! * **Observability.** Each cancellation emits one event with target `tower_cancel` (fields
//!   `reason`, `method`, `path`, `phase`, `elapsed`; `DEBUG` unless
//!   [`event_level`](CancellationLayer::event_level) says otherwise), inside the span that was
//!   current when the request entered the layer (for example tower-http's `TraceLayer` span),
//!   and records `tower_cancel.reason` and `tower_cancel.phase` on that span if it declares
//!   them. An answer to a request cancelled before its handler answered carries the
//!   [`Cancelled`] record in its extensions, so that a `TraceLayer` classifier does not count
//!   a shutdown's `503` as a server error.
//!   Work that runs on after its cancellation (shutdown, deadline, explicit, detached) emits a
//!   second `DEBUG` event, "cancelled request stopped", when it stops, with
//!   `ran_after_cancel` and `stopped`; a request whose work stopped as it was cancelled (hyper
//!   dropped it) has only the one event, carrying `stopped = "dropped"` and
//!   `ran_after_cancel = 0ns`, unless something else of it still runs then (a detached
//!   handler, or an upgraded connection's task, whose end makes the second event).
//!
//! # Limits
//!
//! The layer sits in front of every route, so nothing a client sends can make it hold more
//! than a bound, counted in real memory or tasks, each with a default:
//!
//! | what a client can make the server hold | default | set with |
//! |---|---|---|
//! | request body read ahead, per request (memory, plus the frame that crossed it) | off | [`RequestBodyLayer::read_ahead`] |
//! | request bodies read ahead, all requests of a layer (memory, plus a frame per request) | 64 MiB | [`RequestBodyLayer::read_ahead_total`] |
//! | a handler's wait for request-body bytes, or a trickle of them (then `408`, `SlowClient`) | none | [`RequestBodyLayer::idle_timeout`], [`min_rate`](RequestBodyLayer::min_rate) |
//! | detached handlers running, also after their client left (then `503` before the start) | 1024 | [`CancellationLayer::detached_limit`] |
//! | async cleanups running / queued (then refused, counted) | 64 / 1024 | [`CancellationLayer::max_running_cleanups`], [`max_queued_cleanups`](CancellationLayer::max_queued_cleanups) |
//! | digits read of a deadline header | 8 / 10 | fixed |
//! | HTTP/3: request head or non-DATA frame bytes before the request is claimed | 64 KiB | `http3::Serve::max_request_head_bytes` |
//! | HTTP/3: time for a request head to complete | 30 s | `http3::Serve::header_read_timeout` |
//! | HTTP/3: a decoded header section | 16 KiB | `http3::Serve::max_field_section_size` |
//! | HTTP/3: requests per connection | 10 000 | `http3::Serve::max_requests_per_connection` |
//! | HTTP/3: requests still running at shutdown (then dropped and reset) | 10 s | `http3::Serve::drain` |
//!
//! A request in flight holds one scope (a 240-byte allocation) and, with a shutdown token, one
//! registry entry (three words), freed
//! when it ends. Header sizes, streams per connection, connections and keep-alive are the
//! transport's (hyper's and quinn's builders), unchanged by the layer. Two of those need a line
//! of yours on a server facing the open internet: hyper's HTTP/1.1 `header_read_timeout` (30 s)
//! applies only with a timer (`auto::Builder::new(..).http1().timer(TokioTimer::new())`;
//! without one, a head that never completes holds its connection for good), and quinn buffers
//! up to `stream_receive_window` (1.25 MB) per stream before it is read, with no
//! connection-wide `receive_window` unless set (`quinn::TransportConfig`). `tests/attack.rs`,
//! `tests/http3_hostile.rs` and `tests/http3_abort.rs` measure each bound against bare hyper
//! in the same run (figures in [`guide::reliability`]).
//!
//! # What the transport can and cannot see
//!
//! * HTTP/1.1: hyper notices a closed connection only while it reads the socket. While a
//!   request body is unread it does not read, so a disconnect is seen only when the handler
//!   reads the body or writes the response. Go's `net/http` has the same gap
//!   (golang/go#23262).
//! * A client that vanishes without FIN or RST (an unplugged network) is seen only through
//!   keepalive: HTTP/2 PING (`keep_alive_interval`) or TCP keepalive.
//! * Work that never reaches an `.await` (a CPU loop) cannot be interrupted by a drop: it
//!   must poll [`RequestCancellation::is_cancelled`].
//!
//! Every way a client can leave, with what hyper does alone and the measured latencies, is in
//! [`guide::transport`].
//!
//! [tower]: https://docs.rs/tower
//! [`CancellationToken`]: tokio_util::sync::CancellationToken

#![forbid(unsafe_code)]
// docs.rs (`--cfg docsrs`, nightly): "Available on crate feature ... only" on what a feature
// gates. Since nightly 1.92 `doc_cfg` also derives those notes from the `cfg`s themselves
// (`doc_auto_cfg` was folded into it).
#![cfg_attr(docsrs, feature(doc_cfg))]

mod event;
pub mod guide;
mod handle;
#[cfg(feature = "http3")]
pub mod http3;
mod integrations;
mod loom;
mod macros;
pub mod propagate;
mod record;
pub mod request_body;
mod runtime;
mod scope;
pub mod server;
#[cfg(feature = "socket2")]
pub mod tcp;
mod timeout_header;
mod upgrade;

pub use handle::{MissingCancellationLayer, RequestCancellation};
pub use propagate::{InboundCancelled, PropagateLayer};
pub use record::{CancelReason, Cancelled, Phase};
pub use request_body::{RequestBody, RequestBodyLayer};
pub use runtime::cleanup::{CleanupCounts, CleanupsOverran};
pub use runtime::shutdown::Draining;
pub use server::{Attached, CancellationLayer, Detached};
pub use upgrade::UpgradeGuard;

/// The number of request scopes alive in this process, in debug builds only: a leak check for
/// tests (every request's scope is freed once its future, body and handles are gone). Not part
/// of the API; it may change or disappear in any release.
#[doc(hidden)]
#[cfg(debug_assertions)]
pub fn __live_scopes() -> usize {
    scope::live()
}

/// Entry points for the fuzz targets in `fuzz/` (`cargo fuzz` builds with `--cfg fuzzing`). Not
/// part of the API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod __fuzz {
    /// The `grpc-timeout` parser: the duration, or `None` for a malformed value.
    pub fn grpc_timeout(value: &[u8]) -> Option<std::time::Duration> {
        crate::timeout_header::grpc::parse(value).ok()
    }

    /// The millisecond parser of `connect-timeout-ms` and `x-envoy-expected-rq-timeout-ms`.
    pub fn millis_timeout(value: &[u8]) -> Option<std::time::Duration> {
        crate::timeout_header::millis::parse(value).ok()
    }
}

/// The README's examples, compiled (and, where they terminate, run) as doctests, with the
/// features their Cargo lines name.
#[cfg(all(doctest, feature = "axum"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// Compile-time checks of the auto traits users rely on.
#[allow(dead_code)]
fn _assert_traits() {
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send<T: Send>() {}
    send_sync_clone::<CancellationLayer>();
    send_sync_clone::<CancellationLayer<Detached>>();
    send_sync_clone::<server::CancellationService<tower_layer::Identity, Detached>>();
    send::<server::CancellationFuture<server::DetachedFuture<std::future::Ready<()>>>>();
    send_sync_clone::<CleanupCounts>();
    send_sync_clone::<RequestCancellation>();
    send_sync_clone::<Cancelled>();
    send_sync_clone::<server::CancellationService<tower_layer::Identity>>();
    send::<server::CancellationFuture<std::future::Ready<()>>>();
    send::<server::CancellationBody<String>>();
}
