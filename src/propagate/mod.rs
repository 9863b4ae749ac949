//! Propagation to outbound calls: [`PropagateLayer`] carries an inbound request's cancellation
//! and deadline to the calls made on its behalf, as Go's `context` and gRPC deadline
//! propagation do.
//!
//! The flow: [`PropagateLayer`] builds a [`PropagateService`] client; each call carries the
//! inbound deadline in the callee's convention (gRPC, Connect, or a header you name) and returns a [`PropagateFuture`], which watches the inbound
//! token while the call runs and hands the response body over as a [`PropagateBody`], which
//! watches it while the body streams. When the inbound request is cancelled, whichever holds
//! the call drops it and fails with [`InboundCancelled`].
//!
//! For reqwest, `PropagateMiddleware` (feature `reqwest`) does the same as a
//! `reqwest-middleware` middleware: `client.get(url).with_extension(inbound.clone())`.
//!
//! A client type with the layer on it names the service, as a field of a handler's state would:
//!
//! ```
//! use tower::Layer;
//! use tower_cancel::propagate::{PropagateLayer, PropagateService};
//!
//! # #[derive(Clone)] struct Backend;
//! struct State {
//!     backend: PropagateService<Backend>,
//! }
//! let state = State { backend: PropagateLayer::new().layer(Backend) };
//! # let _ = state.backend.get_ref();
//! ```
//!
//! # A chain
//!
//! Real deployments are chains: browser → proxy → service A → service B (gRPC) → service C. When
//! the browser leaves, every hop should stop, and a deadline set at the edge should bound every
//! hop behind it. Two pieces do it: [`PropagateLayer`] on the outbound client (see it for what a
//! call carries and when it is abandoned), and
//! [`RequestCancellation::run`](crate::RequestCancellation::run), which binds any future to the
//! request: `Ok(output)`, or `Err(Cancelled)` once the request is cancelled (the work is dropped
//! at its current `.await`). `Cancelled` is an error type and (feature `tonic`) converts into a
//! tonic `Status`, so `rc.run(query).await?` is one line.
//!
//! ```toml
//! [dependencies]
//! tower-cancel = { version = "0.1", features = ["tonic"] } # tonic: `?` on `Cancelled`
//! tonic = "0.14"
//! tower = "0.5"
//! ```
//!
//! ```
//! # #[cfg(feature = "tonic")]
//! # mod example {
//! use tonic::transport::Channel;
//! use tower::Layer;
//! use tower_cancel::{PropagateLayer, RequestCancellation};
//!
//! # #[allow(dead_code, unreachable_pub)]
//! # mod reports { include!(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tonic/reports.rs")); }
//! # use reports::{ReportRequest, reports_client::ReportsClient};
//! // Once, at start-up: the client to service B, behind the layer.
//! fn client_for_b(channel: Channel) -> ReportsClient<tower_cancel::propagate::PropagateService<Channel>> {
//!     ReportsClient::new(PropagateLayer::new().layer(channel))
//! }
//!
//! // In a handler of service A: the call carries A's cancellation and deadline.
//! async fn call_b(
//!     b: &mut ReportsClient<tower_cancel::propagate::PropagateService<Channel>>,
//!     inbound: &RequestCancellation,
//! ) -> Result<String, tonic::Status> {
//!     let mut call = tonic::Request::new(ReportRequest { name: "q3".into(), millis: 0 });
//!     call.extensions_mut().insert(inbound.clone());
//!     let report = b.generate(call).await?.into_inner();
//!     // Local work, bound to the request the same way.
//!     let summary = inbound.run(async move { report.text.to_uppercase() }).await?;
//!     Ok(summary)
//! }
//! # }
//! ```
//!
//! Turn `TCP_NODELAY` on for outbound clients (hyper-util: `HttpConnector::set_nodelay(true)`;
//! tonic's `Endpoint` has it on): without it, the lone `RST_STREAM` that abandons a call can wait
//! about 40 ms for a delayed ACK (measured here: B → C went from 42 ms to 0.15 ms).
//!
//! `examples/chain.rs` runs client → A (plain hyper, HTTP/1.1) → B (tonic) → C (axum, called
//! over Connect) on loopback and prints the timeline (`cargo run --example chain`); `tests/chain.rs` asserts it:
//!
//! | scenario | what happens | measured |
//! |---|---|---|
//! | the client closes its connection to A | A, B, C cancelled with `Disconnected`, B then C (B's reset leaves as A's handler is dropped, a hair before A's callback runs), each cleanup once | A → B 0.18–0.28 ms, B → C 0.12–0.19 ms, client close → A 0.11–0.18 ms (12 runs, debug build) |
//! | A has `timeout(600 ms)` | B receives `grpc-timeout: 599937u`, C `connect-timeout-ms: 599` (each hop takes its share off, rounded down); B and C cancelled once each, with `DeadlineExceeded` (or `Disconnected` if the reset from the hop before came more than 20 ms early); A answers 503 | — |
//! | A's server shuts down mid-call | A's handler keeps running; its call fails with `InboundCancelled` (tonic: `UNAVAILABLE` "the outbound call was abandoned: the inbound request was cancelled (shutdown)"); B and C cancelled with `Disconnected` | — |
//!
//! At A, a deadline is enforced twice when the client is tonic: by A's layer, and by tonic's
//! client, which enforces the `grpc-timeout` the layer set (a hair shorter, since time passed).
//! Whichever fires first, the handler's call fails and A answers; if tonic's fired first, A's
//! request completes (answered) just before its own deadline instead of being cancelled at it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::HeaderName;
use http::{Request, Response};
use http_body::Body;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tower_layer::Layer;
use tower_service::Service;

use crate::handle::RequestCancellation;
use crate::macros::inner_service_accessors;
use crate::timeout_header;

mod body;
mod error;
mod future;
#[cfg(feature = "reqwest")]
mod reqwest;

pub use self::body::PropagateBody;
pub(crate) use self::error::BoxError;
pub use self::error::InboundCancelled;
pub use self::future::PropagateFuture;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub use self::reqwest::PropagateMiddleware;

/// A [`Layer`] for outbound clients (hyper-util's `Client`, a tonic `Channel`, any tower
/// `Service` of `http::Request`s) that carries the inbound request's cancellation and
/// deadline to the calls made on its behalf, as Go's `context` and gRPC deadline propagation
/// do.
///
/// For each outbound request it finds the inbound [`RequestCancellation`]: the one given to
/// [`PropagateLayer::from_inbound`], or else one in the outbound request's extensions (insert
/// a clone there; a tonic `Request`'s extensions become the HTTP request's). Then:
///
/// * **Deadline.** If the inbound request has a deadline, the outbound request carries the
///   time that remains, in the convention it speaks: `grpc-timeout` for gRPC (a
///   `content-type` of `application/grpc…`), `connect-timeout-ms` for Connect (a
///   `connect-protocol-version` header, a `content-type` of `application/connect+…`, or
///   `connect=v1` in the query), and for anything else the header set with
///   [`deadline_header`](Self::deadline_header), in milliseconds, or none at all: a plain
///   HTTP callee (a third party's API) has no known convention, and a deadline header it does
///   not expect would leak the inbound deadline and could change how it behaves. The value is what
///   remains, rounded down, but never below one unit: `1n` once the deadline has passed, and
///   `1` ms for anything under a millisecond (0 means "no deadline" in these conventions); and
///   never longer than a value the request already had in that header.
///   No deadline, no header. A server behind a [`CancellationLayer`](crate::CancellationLayer)
///   with [`grpc_timeout(true)`](crate::CancellationLayer::grpc_timeout) or
///   [`connect_timeout(true)`](crate::CancellationLayer::connect_timeout) enforces it, and
///   so do tonic and Connect servers.
/// * **Cancellation.** When the inbound request is cancelled (its client left, the server shuts
///   down, its deadline passed, or the token was cancelled), the outbound call is abandoned:
///   its response future, or its response body if the call already answered, is dropped, so
///   the downstream server sees `RST_STREAM` (HTTP/2) or a closed connection (HTTP/1.1) and
///   its own scope is cancelled (`Disconnected`, or `DeadlineExceeded` when the reset comes at
///   the deadline it was given). The call then fails with [`InboundCancelled`], which says why.
///
/// Without an inbound `RequestCancellation` the request passes through unchanged. The time
/// that remains is measured when the call is made (`call`), not when its headers are written:
/// time the call then spends waiting for a connection is not taken off.
///
/// A handler that is dropped (its client left) drops its outbound calls anyway; this layer
/// matters for the handler that keeps running: on shutdown, at its deadline, on an explicit
/// cancel, or for work it spawned while the request is still running (once the request
/// completes, its token never fires). Do not put it in front of calls that must finish even
/// if the client leaves, such as those of a [`detached`](crate::CancellationLayer::detached)
/// payment route: there the client leaving still cancels the request, and the layer would
/// abandon the call.
///
/// The gRPC status mapping needs the crate's `tonic` feature; without it a tonic client reports
/// the abandoned call as `UNKNOWN` with this error's message.
///
/// # Example
///
/// ```no_run
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use tower::{Layer, Service, ServiceExt};
/// use tower_cancel::{InboundCancelled, PropagateLayer, RequestCancellation};
///
/// async fn handler(req: http::Request<hyper::body::Incoming>) -> Result<String, tower::BoxError> {
///     let inbound = RequestCancellation::from_extensions(req.extensions())?;
///     let client = Client::builder(TokioExecutor::new()).build_http::<String>();
///     // In a real service, build the client once and add the layer per call (it is cheap).
///     let mut backend = PropagateLayer::from_inbound(inbound).layer(client);
///     let call = http::Request::get("http://backend.internal/items").body(String::new())?;
///     match backend.ready().await?.call(call).await {
///         Ok(response) => Ok(format!("backend answered {}", response.status())),
///         Err(error) => match error.downcast_ref::<InboundCancelled>() {
///             Some(why) => Err(format!("gave up on the backend: {}", why.reason()).into()),
///             None => Err(error),
///         },
///     }
/// }
/// ```
#[derive(Clone, Debug, Default)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct PropagateLayer {
    inbound: Option<RequestCancellation>,
    deadline_header: Option<HeaderName>,
}

impl PropagateLayer {
    /// A layer that takes the inbound [`RequestCancellation`] from each outbound request's
    /// extensions.
    pub fn new() -> Self {
        Self::default()
    }

    /// A layer bound to one inbound request: every call through it propagates `inbound`.
    pub fn from_inbound(inbound: RequestCancellation) -> Self {
        Self {
            inbound: Some(inbound),
            deadline_header: None,
        }
    }

    /// For outbound requests that are neither gRPC nor Connect: write the time that remains
    /// in header `name`, in whole milliseconds (rounded down, at least 1). Without it such
    /// requests carry no deadline header. For example `x-envoy-upstream-rq-timeout-ms`, which an Envoy in front
    /// of the downstream service takes as the route's timeout.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_cancel::PropagateLayer;
    ///
    /// let layer = PropagateLayer::new()
    ///     .deadline_header(HeaderName::from_static("x-envoy-upstream-rq-timeout-ms"));
    /// # let _ = layer;
    /// ```
    pub fn deadline_header(mut self, name: HeaderName) -> Self {
        self.deadline_header = Some(name);
        self
    }
}

impl<S> Layer<S> for PropagateLayer {
    type Service = PropagateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PropagateService {
            inner,
            inbound: self.inbound.clone(),
            deadline_header: self.deadline_header.clone(),
        }
    }
}

/// The outbound client behind a [`PropagateLayer`].
#[derive(Clone, Debug)]
pub struct PropagateService<S> {
    inner: S,
    inbound: Option<RequestCancellation>,
    deadline_header: Option<HeaderName>,
}

impl<S> PropagateService<S> {
    inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for PropagateService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<PropagateBody<ResBody>>;
    type Error = BoxError;
    type Future = PropagateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let inbound = self
            .inbound
            .clone()
            .or_else(|| req.extensions().get::<RequestCancellation>().cloned());
        if let Some(deadline) = inbound.as_ref().and_then(RequestCancellation::deadline) {
            let (mut parts, body) = req.into_parts();
            let other = self.deadline_header.as_ref();
            timeout_header::propagate(&mut parts.headers, &parts.uri, deadline, other);
            req = Request::from_parts(parts, body);
        }
        PropagateFuture {
            inner: Some(self.inner.call(req)),
            watch: Watch::new(inbound),
        }
    }
}

/// What a call watches: the inbound request's token, until the call has ended.
pub(crate) struct Watch {
    inbound: RequestCancellation,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Watch {
    pub(crate) fn new(inbound: Option<RequestCancellation>) -> Option<Self> {
        inbound.map(|inbound| Self {
            cancelled: Box::pin(inbound.token().clone().cancelled_owned()),
            inbound,
        })
    }

    /// The inbound request's cancellation, once it happened.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<InboundCancelled> {
        self.cancelled
            .as_mut()
            .poll(cx)
            .map(|()| InboundCancelled::new(self.inbound.record()))
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("inbound", &self.inbound)
            .finish_non_exhaustive()
    }
}
