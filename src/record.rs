//! What a cancellation tells its observers: why, when, and which request.

use std::fmt;
use std::time::Duration;

use std::sync::Arc;

use http::header::AsHeaderName;
use http::{Extensions, HeaderMap, HeaderValue, Method, Uri};

/// Why a request was cancelled.
///
/// Recorded once per request, by whichever cause was first; later causes are ignored.
///
/// # Example
///
/// ```
/// use tower_cancel::CancelReason;
///
/// let reason = CancelReason::Disconnected;
/// assert_eq!(reason.to_string(), "disconnected");
/// assert_ne!(reason, CancelReason::Shutdown);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CancelReason {
    /// The client went away: hyper dropped the response future or the response body before
    /// the body reached its end (TCP close or reset, HTTP/2 `RST_STREAM`, a proxy giving up).
    Disconnected,
    /// The server is shutting down: the layer's
    /// [`shutdown_token`](crate::CancellationLayer::shutdown_token) was cancelled.
    Shutdown,
    /// The request's deadline passed: the layer's
    /// [`timeout`](crate::CancellationLayer::timeout) or a `grpc-timeout` header
    /// (see [`grpc_timeout`](crate::CancellationLayer::grpc_timeout)).
    ///
    /// Also recorded when the request is dropped at its deadline, a moment before the layer's
    /// own timer fires: by another layer enforcing the same deadline (tonic's server does), or
    /// by a gRPC client resetting the stream at its own deadline. "At" means after the deadline,
    /// or at most 1 ms before a deadline the server chose, or at most 20 ms before one the
    /// client chose (its clock started before the request reached the server).
    DeadlineExceeded,
    /// Application code cancelled the request:
    /// [`RequestCancellation::cancel`](crate::RequestCancellation::cancel), or its
    /// [`CancellationToken`] cancelled directly, noticed when the layer next found the handler
    /// or body pending, or dropped (see
    /// [`RequestCancellation::token`](crate::RequestCancellation::token)).
    ///
    /// [`CancellationToken`]: tokio_util::sync::CancellationToken
    Explicit,
    /// The server failed, not the client: the handler future (or the response body) panicked
    /// while the layer polled it, and the panic unwound through the layer. Whoever caught it
    /// (Tokio's task, hyper's connection, tower-http's `CatchPanicLayer` outside this layer)
    /// then dropped the request. A panic caught *inside* the layer (`CatchPanicLayer` between
    /// it and the handler) becomes a response like any other, and the request completes when
    /// that response was sent.
    Panicked,
    /// The client sent its request body too slowly: no bytes arrived for the
    /// [`idle_timeout`](crate::RequestBodyLayer::idle_timeout) while the handler waited for
    /// them, or they arrived below the [`min_rate`](crate::RequestBodyLayer::min_rate). The
    /// handler's read failed, and the client gets `408 Request Timeout`. Recorded apart from
    /// [`DeadlineExceeded`](Self::DeadlineExceeded), so that metrics tell a slow client from a
    /// deadline that passed.
    SlowClient,
}

impl CancelReason {
    /// A short lowercase name, as used in `tracing` events: `"disconnected"`, `"shutdown"`,
    /// `"deadline_exceeded"`, `"explicit"`, `"panicked"` or `"slow_client"`.
    ///
    /// ```
    /// assert_eq!(tower_cancel::CancelReason::DeadlineExceeded.as_str(), "deadline_exceeded");
    /// ```
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Disconnected => "disconnected",
            Self::Shutdown => "shutdown",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Explicit => "explicit",
            Self::Panicked => "panicked",
            Self::SlowClient => "slow_client",
        }
    }
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the request was when it was cancelled.
///
/// ```
/// use tower_cancel::Phase;
///
/// assert_eq!(Phase::Body.to_string(), "body");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Phase {
    /// The inner service had not yet produced the response head: the handler was running.
    Handler,
    /// The response head was produced and the body was streaming (a download, an SSE stream).
    Body,
    /// The response was over and the connection upgraded (a WebSocket after its `101`), and
    /// the handler held the request for it with
    /// [`hold_for_upgrade`](crate::RequestCancellation::hold_for_upgrade).
    Upgraded,
}

impl Phase {
    /// `"handler"`, `"body"` or `"upgraded"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Handler => "handler",
            Self::Body => "body",
            Self::Upgraded => "upgraded",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The record of one cancelled request, given to every cleanup callback.
///
/// Synchronous callbacks receive `&Cancelled`; asynchronous ones receive their own clone,
/// which does not keep any other per-request state alive.
///
/// # Example
///
/// ```
/// use tower_cancel::{CancellationLayer, Cancelled};
///
/// let layer = CancellationLayer::new().on_cancel(|c: &Cancelled| {
///     eprintln!(
///         "{} {} cancelled ({}) during {} after {:?}",
///         c.method(),
///         c.uri().path(),
///         c.reason(),
///         c.phase(),
///         c.elapsed(),
///     );
/// });
/// # drop(layer);
/// ```
#[derive(Clone, Debug)]
pub struct Cancelled {
    pub(crate) reason: CancelReason,
    pub(crate) phase: Phase,
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) elapsed: Duration,
    /// What the layer was asked to keep of the request: `None` unless it was
    /// ([`CancellationLayer::record_header`](crate::CancellationLayer::record_header),
    /// [`record_extension`](crate::CancellationLayer::record_extension)).
    pub(crate) recorded: Option<Arc<Recorded>>,
}

/// The request headers and extensions a layer keeps for its cancellation records, copied when
/// the request entered it.
#[derive(Debug, Default)]
pub(crate) struct Recorded {
    pub(crate) headers: HeaderMap,
    pub(crate) extensions: Extensions,
}

impl Cancelled {
    /// Why the request was cancelled.
    pub fn reason(&self) -> CancelReason {
        self.reason
    }

    /// Whether the handler was still running or the response body was streaming.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The request's method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request's URI, as the server received it.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// Time from the moment the layer saw the request to the moment it was cancelled.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// The request's header `name`, if the layer was asked to record it
    /// ([`record_header`](crate::CancellationLayer::record_header)) and the request carried it:
    /// to tie a cancellation to a request id, say. The first value, if it came more than once.
    pub fn header<K: AsHeaderName>(&self, name: K) -> Option<&HeaderValue> {
        self.recorded.as_ref()?.headers.get(name)
    }

    /// The request extension of type `T`, if the layer was asked to record it
    /// ([`record_extension`](crate::CancellationLayer::record_extension)) and the request
    /// carried it when it entered the layer: axum's `MatchedPath`, tower-http's `RequestId`.
    pub fn extension<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.recorded.as_ref()?.extensions.get::<T>()
    }
}

/// `GET /path cancelled (disconnected) in handler after 1.2s`.
impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} cancelled ({}) in {} after {:?}",
            self.method,
            self.uri.path(),
            self.reason,
            self.phase,
            self.elapsed
        )
    }
}

/// The error of [`RequestCancellation::run`](crate::RequestCancellation::run): the work was
/// stopped because its request was cancelled.
impl std::error::Error for Cancelled {}
