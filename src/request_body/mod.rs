//! Uploads: [`RequestBodyLayer`] watches the request body for the client leaving mid-upload,
//! and can read ahead so that hyper notices a client that leaves while the body is still
//! unread (on a server that accepts its own connections, `tcp::PeerWatch`, feature `socket2`,
//! sees that from the kernel, reading nothing; [`read_ahead`](RequestBodyLayer::read_ahead)
//! says when to prefer which).
//!
//! hyper reports a client that leaves during an upload only to whoever reads the body: the
//! read fails, but the handler future lives on. And while nobody reads the body, hyper's
//! HTTP/1.1 connection does not read the socket at all, so it cannot see the client leave.
//! This layer closes both gaps for the routes that take uploads.
//!
//! The flow: [`RequestBodyLayer`] builds a [`RequestBodyService`], whose `call` hands the
//! handler a [`RequestBody`] and returns a [`RequestBodyFuture`]. While the handler is pending
//! and has not read its body, the future reads the body ahead into a buffer bounded per request
//! ([`read_ahead`](RequestBodyLayer::read_ahead)) and for the whole layer
//! ([`read_ahead_total`](RequestBodyLayer::read_ahead_total)), both counted in memory held; the
//! handler later reads the same bytes from the [`RequestBody`]. A failed read, by either, cancels the request with
//! `Disconnected`.
//!
//! A client can also stall: send the head and part of the body, then nothing, with the
//! connection open. With an [`idle_timeout`](RequestBodyLayer::idle_timeout), a handler that
//! waits that long for body bytes gets an [`IdleTimeout`] error from its read, the request is
//! cancelled with `SlowClient`, in the phase it is in (`Handler` while the handler runs,
//! the usual case), and the client gets `408 Request Timeout`: the [`RequestBodyFuture`]
//! answers it in place of the `400` or `500` the handler made of the failed read (axum's
//! `Bytes`, `String`, `Json` and `Form` extractors answer `400`), so the handler need not
//! recognise the error itself. The clock runs only while the handler waits for the body: it
//! starts when a read finds nothing ready and stops when a frame arrives, so a slow but steady
//! upload never times out, and neither does a handler that is busy elsewhere while the body
//! waits for it. A client that trickles, a byte now and then, never stalls that long:
//! [`min_rate`](RequestBodyLayer::min_rate) bounds it too (bytes per second averaged over the
//! time the handler waited, after a grace period), ending the same way with a [`TooSlow`]
//! error. The body's error type is a box (`tower::BoxError`), holding the original body's error
//! unchanged, the `IdleTimeout` or the `TooSlow`.
//!
//! ```
//! use http::{Request, Response};
//! use http_body_util::BodyExt;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_cancel::request_body::{RequestBody, RequestBodyLayer};
//! use tower_cancel::CancellationLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let upload = service_fn(|req: Request<RequestBody<String>>| async move {
//!     let bytes = req.into_body().collect().await.unwrap().to_bytes();
//!     Ok::<_, std::convert::Infallible>(Response::new(format!("{} bytes", bytes.len())))
//! });
//! let layer = RequestBodyLayer::new().read_ahead(1024 * 1024);
//! let svc = ServiceBuilder::new()
//!     .layer(CancellationLayer::new())
//!     .layer(layer.clone())
//!     .service(upload);
//! let response = svc.oneshot(Request::new("a small upload".to_owned())).await.unwrap();
//! assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "14 bytes");
//! assert_eq!(layer.read_ahead_held(), 0);
//! # }
//! ```
//!
//! # Where it goes
//!
//! Inside a [`CancellationLayer`](crate::CancellationLayer), on the routes that take uploads.
//! The handler's body type becomes [`RequestBody<B>`](RequestBody) (axum and tonic accept any
//! body type), and it must answer an `http::Response` (any body type). Any error from the body
//! itself counts as the client leaving, so put layers that make request-body errors of their
//! own (limits, timeouts) inside this one.
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_cancel::{CancellationLayer, RequestBodyLayer};
//!
//! # let upload = tower::service_fn(|_: http::Request<tower_cancel::RequestBody<String>>| async {
//! #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//! # });
//! let svc = ServiceBuilder::new()
//!     .layer(CancellationLayer::new())
//!     // per route is enough; the total is shared by every request of this layer and its clones
//!     .layer(RequestBodyLayer::new().read_ahead(2 * 1024 * 1024).read_ahead_total(64 * 1024 * 1024))
//!     .service(upload);
//! ```
//!
//! # Tested
//!
//! * With read-ahead, hyper keeps reading the socket and sees a client leave an unread upload
//!   (about 0.3 ms here); without, it does not (`tests/uploads.rs`, which prints the figure).
//!   The handler then reads the same bytes, in order
//!   (`read_ahead_hands_the_handler_the_exact_bytes`, and a property test over arbitrary frame
//!   splits).
//! * The idle timeout answers `408` over HTTP/1.1, HTTP/2 and HTTP/3, with and without
//!   read-ahead, behind axum's `Bytes`, `String` and `Json` (`tests/idle_timeout.rs`); the
//!   `/upload` route of `examples/axum.rs` answers 400 for any failed read and the client gets
//!   408.
//! * [`read_ahead_held`](RequestBodyLayer::read_ahead_held) and
//!   [`read_ahead_peak`](RequestBodyLayer::read_ahead_peak) report the memory held, for
//!   metrics; the bound for the whole layer is measured in [the reliability
//!   page](crate::guide::reliability) and against bare hyper in `tests/attack.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Version};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use crate::handle::RequestCancellation;
use crate::macros::inner_service_accessors;

mod body;
mod buffer;
mod future;
mod idle;
mod rate;
mod read_ahead;
// Not under loom: these tests run std threads, outside any loom model.
#[cfg(all(test, not(tower_cancel_loom)))]
mod tests;

use self::body::Kind;
pub use self::body::RequestBody;
pub use self::future::RequestBodyFuture;
pub use self::idle::IdleTimeout;
use self::idle::{BoxError, IdleClock, TimedOut};
use self::rate::RateClock;
pub use self::rate::TooSlow;
use self::read_ahead::{Budget, ReadAhead};

/// A [`Layer`] for routes that receive request bodies (uploads): a failed body read caused by
/// the client (hyper's "connection closed before message completed", a reset stream) cancels
/// the request with [`CancelReason::Disconnected`](crate::CancelReason::Disconnected) at once, and, with
/// [`read_ahead`](Self::read_ahead), the body is read into a bounded buffer while the handler
/// has not started reading it, so that hyper keeps reading the socket and sees the client
/// leave.
///
/// Put it inside (after) a [`CancellationLayer`](crate::CancellationLayer): it acts on that
/// layer's scope, found in the request extensions. Without one it only passes the body
/// through (an idle timeout still fails the read), and an `error` event (target
/// `tower_cancel`) says so at the first such request, once per layer. The handler receives a [`RequestBody`], which yields the same bytes and trailers,
/// in the same order, whether or not they were read ahead.
///
/// Any error the request body reports counts as the client leaving: hyper only fails a
/// request body for transport reasons (incomplete message, reset stream, malformed chunk).
/// Layers that produce request-body errors of their own (size limits, timeouts) belong inside
/// this one, so their errors never pass through it. This layer's own
/// [`idle_timeout`](Self::idle_timeout) and [`min_rate`](Self::min_rate) are not a client
/// leaving: they cancel with `SlowClient`.
///
/// What is read ahead is bounded per request ([`read_ahead`](Self::read_ahead)) and for all
/// requests together ([`read_ahead_total`](Self::read_ahead_total), 64 MiB by default). The
/// total is a budget shared by the layer, its clones and every request they serve: build the
/// layer once and clone it onto each upload route to bound the whole server.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_cancel::{CancellationLayer, RequestBodyLayer};
///
/// # let upload = tower::service_fn(|_: http::Request<tower_cancel::RequestBody<String>>| async {
/// #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// # });
/// let svc = ServiceBuilder::new()
///     .layer(CancellationLayer::new())
///     .layer(RequestBodyLayer::new().read_ahead(2 * 1024 * 1024))
///     .service(upload);
/// # drop(svc);
/// ```
#[derive(Debug, Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct RequestBodyLayer {
    read_ahead: usize,
    budget: Arc<Budget>,
    idle_timeout: Option<Duration>,
    /// Bytes per second, and the grace period.
    min_rate: Option<(u64, Duration)>,
}

impl Default for RequestBodyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestBodyLayer {
    /// The default of [`read_ahead_total`](Self::read_ahead_total): 64 MiB.
    pub const DEFAULT_READ_AHEAD_TOTAL: usize = 64 * 1024 * 1024;

    /// Watches request bodies for read errors; no read-ahead.
    pub fn new() -> Self {
        Self {
            read_ahead: 0,
            budget: Arc::new(Budget::new(Self::DEFAULT_READ_AHEAD_TOTAL)),
            idle_timeout: None,
            min_rate: None,
        }
    }

    /// Reads up to `bytes` of each request body ahead of the handler, while the handler has
    /// not polled the body yet.
    ///
    /// **Or a `tcp::PeerWatch`?** On a server that accepts its TCP
    /// connections (feature `socket2`, Linux, the BSDs, macOS), the watch sees a client close
    /// or reset an unread upload from the kernel's notice, faster and with nothing read or
    /// held, and leaves `Expect: 100-continue` alone. Read ahead where the watch cannot see:
    /// behind a proxy that ends TLS or pools connections (the server's socket is the proxy's),
    /// on Windows, or to catch a client that closes while flow control stalls its upload (its
    /// FIN waits behind the bytes the full receive window cannot take; reading opens the
    /// window). Read-ahead also hands the handler a body already read, which a watch cannot.
    ///
    /// The reading is done when the response future is polled and the handler is pending:
    /// hyper then keeps reading the connection and notices a client that leaves, and the
    /// request is cancelled with `Disconnected` within the time the handler takes to be
    /// polled again. The handler later reads the same bytes, in order, unchanged (in chunks of
    /// the read-ahead's own size, see below), then reads the rest of the body itself.
    ///
    /// **Memory.** The bytes read ahead are copied out of the frames that carried them into
    /// blocks of the read-ahead's own (from 1 KiB, each twice the last, up to 16 KiB; or one
    /// frame's size), and the frames are dropped at once: what is held is the blocks, and the budget counts their capacity,
    /// so a body sent as one-byte chunks holds what it would as one chunk. (A frame kept as it
    /// came would keep alive the part of hyper's read buffer it was cut from, plus a frame
    /// and a queue slot of its own: about a hundred times its bytes for one-byte chunks.)
    /// Memory per request is bounded by `bytes`, or by the bytes read plus the last frame's
    /// size when that frame crossed the limit; no block is larger than needed to reach the
    /// limit or the end of the body (its size hint). Once the buffer holds `bytes`, reading
    /// stops: for the rest of the body, a client that leaves is seen as without this option
    /// (when the handler reads, or when the response is written). Once the handler polls the
    /// body, it reads the rest itself. `0` turns read-ahead off.
    ///
    /// All requests together hold at most [`read_ahead_total`](Self::read_ahead_total) bytes
    /// of memory (64 MiB unless set), plus one frame per request reading ahead: without that
    /// bound, the per-request limit times the number of concurrent uploads would be the
    /// server's memory (10 000 slow uploads with `read_ahead(2 MiB)` would hold 20 GiB).
    ///
    /// A request that carries `Expect: 100-continue` is not read ahead: its client waits for
    /// the `100 Continue` before it sends the body, and hyper sends it when the body is first
    /// polled, so reading ahead would accept the upload before the handler decided to (it may
    /// answer 413 or 401 instead). The handler's own first read sends the `100`.
    pub fn read_ahead(mut self, bytes: usize) -> Self {
        self.read_ahead = bytes;
        self
    }

    /// Bounds the memory all requests served by this layer and its clones hold in read-ahead
    /// buffers together: `bytes`, plus at most one frame per request that is reading ahead (a
    /// request checks the budget before it reads a frame, and reserves the block a frame needs
    /// in the budget before it makes it, at once, so requests reading on other threads at the
    /// same moment cannot take the same room; without room left, the block holds just the
    /// frame).
    /// Default: [`DEFAULT_READ_AHEAD_TOTAL`](Self::DEFAULT_READ_AHEAD_TOTAL), 64 MiB.
    ///
    /// Why a total, and why that default: [`read_ahead`](Self::read_ahead) is per request, so
    /// without a total a server holds the per-request limit times the number of uploads in
    /// flight, and whoever opens many slow uploads chooses how much memory that is (10 000 of
    /// them with `read_ahead(2 MiB)` make 20 GiB): an exhaustion attack that read-ahead itself
    /// would enable. 64 MiB lets 32 uploads read 2 MiB ahead at once, which covers servers
    /// with a few uploads in flight, and stays small next to a server's memory. Raise it for
    /// servers that take many large uploads at once and have the memory for them.
    ///
    /// A request that finds the budget spent reads nothing more ahead: its upload behaves as
    /// without read-ahead (a client that leaves is seen when the handler reads or the response
    /// is written), and a `debug` event with target `tower_cancel` says so, once per request.
    /// A request's bytes return to the budget as its handler reads them, and when the request
    /// ends, however it ends (completed, dropped, panicked).
    ///
    /// There is one budget per [`RequestBodyLayer::new`]: this layer and all its clones share
    /// it, made before or after this call, and this sets its total for all of them (a clone
    /// made earlier is not left on the old total). For routes with budgets of their own, build
    /// a layer for each with `new()`. `0` turns read-ahead off.
    pub fn read_ahead_total(self, bytes: usize) -> Self {
        self.budget.total.store(bytes, Ordering::Relaxed);
        self
    }

    /// Fails the handler's read of its body with [`IdleTimeout`] once it has waited `idle` for
    /// body bytes that do not come, and cancels the request with
    /// [`CancelReason::SlowClient`](crate::CancelReason::SlowClient): for clients
    /// that send part of a body and then stall, holding the connection and the handler.
    /// Without it, nothing limits how long a read waits.
    ///
    /// The clock runs only while the handler waits for the body. It starts when the
    /// handler's read finds no frame ready (`poll_frame` returns `Pending`) and stops when a
    /// frame (data or trailers) reaches the handler; the next wait starts a fresh `idle`. So
    /// a slow upload that keeps sending never times out, however long it takes, and time the
    /// handler spends not reading (before its first read, or between frames it was given)
    /// does not count. A wait that has started runs until a frame arrives, even if the handler
    /// stops polling meanwhile (a read dropped by a `select!`): the next read sees it. With
    /// [`read_ahead`](Self::read_ahead), frames already read ahead reach the handler at once;
    /// a handler waiting for more is on the same clock.
    ///
    /// When it runs out, on the handler's read:
    ///
    /// * the request's scope (of the [`CancellationLayer`](crate::CancellationLayer) outside)
    ///   is cancelled with `SlowClient`, in its current phase: `Phase::Handler` while the
    ///   handler runs, which is when a handler reads its body (a response body that streams
    ///   the request body out after the handler returned would see `Phase::Body`). Without a
    ///   `CancellationLayer` there is nothing to cancel, and the read fails all the same;
    /// * the read returns `Err` with a boxed [`IdleTimeout`] (find it with `downcast_ref`,
    ///   `is`, or [`IdleTimeout::find`] through wrappers such as `axum::Error`);
    /// * the body is over: it yields `None` from then on and never polls the original body
    ///   again;
    /// * when the handler answers, the layer turns a `400 Bad Request` or a
    ///   `500 Internal Server Error` into `408 Request Timeout`, keeping the handler's headers
    ///   and body (its `content-length` stays true, and its text, such as axum's "Failed to
    ///   buffer the request body: no request body bytes arrived for 30s", says why), and adds
    ///   `connection: close` when the request came over HTTP/1.x (RFC 9110 §15.5.9: the server
    ///   is not waiting for the rest of the body; hyper closes such a connection anyway when
    ///   the rest is not there to drain). Those two statuses are what a failed body read becomes
    ///   when the handler does not look at why it failed: axum's `Bytes`, `String`, `Json`,
    ///   `Form` and `RawForm` extractors reject it with `400`, its `Multipart` with `500`, and
    ///   a handler that passes the error on with `?` usually answers `500`. Any other status is
    ///   the handler's own choice and is kept: a `2xx` or `3xx` (it did without the rest of the
    ///   body), its own `408`, a `413` (a length limit was reached: axum answers it only for
    ///   `LengthLimitError`, never for this timeout), a `503` or `504` of a handler that saw its
    ///   cancellation, and the rest. So is any answer when the timeout did not fire, such as a
    ///   `400` given before the body was read. The answer that is changed is the one the
    ///   handler returns: a response whose body goes on reading the request body (the timeout
    ///   then fires in `Phase::Body`) has been sent already. A `debug` event with target
    ///   `tower_cancel` tells when the layer answered `408`.
    ///
    /// The timeout needs Tokio's timer: on a runtime without the time driver it is not
    /// enforced, and an `error` event with target `tower_cancel` says so, once per request.
    /// A zero `idle` fails any read that has to wait.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    ///
    /// use bytes::Bytes;
    /// use futures_util::stream::{self, StreamExt};
    /// use http::{Request, Response, StatusCode};
    /// use http_body::Frame;
    /// use http_body_util::{BodyExt, StreamBody};
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tower_cancel::request_body::{RequestBody, RequestBodyLayer};
    /// use tower_cancel::{CancelReason, CancellationLayer, Cancelled, Phase};
    ///
    /// // Any failed read is a 400 here: the layer answers 408 in its place after a stall.
    /// async fn upload<B>(req: Request<RequestBody<B>>) -> Result<Response<String>, Infallible>
    /// where
    ///     B: http_body::Body,
    ///     B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    /// {
    ///     let (status, text) = match req.into_body().collect().await {
    ///         Ok(body) => (StatusCode::OK, format!("{} bytes\n", body.to_bytes().len())),
    ///         Err(e) => (StatusCode::BAD_REQUEST, format!("the upload failed: {e}\n")),
    ///     };
    ///     let mut response = Response::new(text);
    ///     *response.status_mut() = status;
    ///     Ok(response)
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let (seen, cancelled) = std::sync::mpsc::channel();
    /// let svc = ServiceBuilder::new()
    ///     .layer(CancellationLayer::new().on_cancel(move |c: &Cancelled| {
    ///         let _ = seen.send((c.reason(), c.phase()));
    ///     }))
    ///     .layer(RequestBodyLayer::new().idle_timeout(Duration::from_secs(30)))
    ///     .service_fn(upload);
    ///
    /// // A client that sends 5 bytes, then stalls.
    /// let first = Ok::<_, Infallible>(Frame::data(Bytes::from("hello")));
    /// let stalled = StreamBody::new(stream::iter([first]).chain(stream::pending()));
    /// let response = svc.oneshot(Request::new(stalled)).await.unwrap();
    /// assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    /// let text = response.into_body().collect().await.unwrap().to_bytes();
    /// assert_eq!(text, "the upload failed: no request body bytes arrived for 30s\n");
    /// assert_eq!(
    ///     cancelled.try_recv(),
    ///     Ok((CancelReason::SlowClient, Phase::Handler))
    /// );
    /// # }
    /// ```
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }

    /// Fails the handler's read of its body with [`TooSlow`] once its bytes arrive below
    /// `bytes_per_second`: Kestrel's `MinRequestBodyDataRate`, Caddy's `min_rate`. A client
    /// that trickles an upload (a slow-loris on the body) holds a connection and a handler
    /// for as long as it likes under an idle timeout alone, as long as a byte arrives now and
    /// then.
    ///
    /// The clock runs while the handler waits for body bytes (a read that finds nothing ready,
    /// until a frame arrives): a handler that is slow to read does not make its client look
    /// slow. Once it has run for `grace` in all, the bytes that reached the handler must
    /// average at least `bytes_per_second` over the time it ran; the read fails at the moment
    /// they fall behind. Bytes sent early count for later (pair it with an
    /// [`idle_timeout`](Self::idle_timeout) to bound a stall too).
    ///
    /// It ends as the idle timeout does: the read fails (then the body is over), the request
    /// is cancelled with [`CancelReason::SlowClient`](crate::CancelReason::SlowClient), and the
    /// client gets `408 Request Timeout` in place of the `400` or `500` the handler made of the
    /// failed read, over HTTP/1.1 (with `connection: close`), HTTP/2 and HTTP/3. A body that is
    /// read ahead is measured as the handler reads it.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// use tower::ServiceBuilder;
    /// use tower_cancel::{CancellationLayer, RequestBodyLayer};
    ///
    /// # let upload = tower::service_fn(|_: http::Request<tower_cancel::RequestBody<String>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    /// # });
    /// // At least 1 KiB/s once the handler has waited 5 s for bytes; never 30 s without one.
    /// let uploads = RequestBodyLayer::new()
    ///     .min_rate(1024, Duration::from_secs(5))
    ///     .idle_timeout(Duration::from_secs(30));
    /// let svc = ServiceBuilder::new()
    ///     .layer(CancellationLayer::new())
    ///     .layer(uploads)
    ///     .service(upload);
    /// # drop(svc);
    /// ```
    pub fn min_rate(mut self, bytes_per_second: u64, grace: Duration) -> Self {
        self.min_rate = Some((bytes_per_second, grace));
        self
    }

    /// Bytes of memory held in read-ahead buffers right now (the capacity of their blocks, see
    /// [`read_ahead`](Self::read_ahead)), by all requests served through this layer's budget
    /// (this layer and its clones; see [`read_ahead_total`](Self::read_ahead_total)). For
    /// metrics.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// use std::time::Duration;
    ///
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{Layer, Service, service_fn};
    /// use tower_cancel::{RequestBody, RequestBodyLayer};
    ///
    /// let layer = RequestBodyLayer::new().read_ahead(1024).read_ahead_total(1 << 20);
    /// let mut svc = layer.layer(service_fn(|req: http::Request<RequestBody<Full<Bytes>>>| async {
    ///     tokio::time::sleep(Duration::from_secs(1)).await; // busy: the body is read ahead
    ///     let body = req.into_body().collect().await?.to_bytes();
    ///     Ok::<_, tower::BoxError>(http::Response::new(body))
    /// }));
    /// let mut response = std::pin::pin!(svc.call(http::Request::new(Full::from("hello"))));
    /// assert!(tokio::time::timeout(Duration::from_millis(1), &mut response).await.is_err());
    /// assert_eq!(layer.read_ahead_held(), 5); // "hello", waiting for the handler
    ///
    /// assert_eq!(response.await.unwrap().into_body(), "hello");
    /// assert_eq!(layer.read_ahead_held(), 0);
    /// assert_eq!(layer.read_ahead_peak(), 5);
    /// # }
    /// ```
    pub fn read_ahead_held(&self) -> usize {
        self.budget.held.load(Ordering::Acquire)
    }

    /// The highest [`read_ahead_held`](Self::read_ahead_held) since this budget was created
    /// (by [`new`](Self::new) or [`read_ahead_total`](Self::read_ahead_total)). At most the
    /// total plus one frame per request that was reading ahead at the time.
    pub fn read_ahead_peak(&self) -> usize {
        self.budget.peak.load(Ordering::Acquire)
    }
}

impl<S> Layer<S> for RequestBodyLayer {
    type Service = RequestBodyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestBodyService {
            inner,
            read_ahead: self.read_ahead,
            budget: Arc::clone(&self.budget),
            idle_timeout: self.idle_timeout,
            min_rate: self.min_rate,
        }
    }
}

/// Middleware built by [`RequestBodyLayer`].
///
/// It serves an `http::Response`, whatever its body type (no bound on it), so that it can
/// answer `408` after an [`idle_timeout`](RequestBodyLayer::idle_timeout).
#[derive(Debug, Clone)]
pub struct RequestBodyService<S> {
    inner: S,
    read_ahead: usize,
    budget: Arc<Budget>,
    idle_timeout: Option<Duration>,
    min_rate: Option<(u64, Duration)>,
}

impl<S> RequestBodyService<S> {
    inner_service_accessors!();
}

impl<S, B, ResBody> Service<Request<B>> for RequestBodyService<S>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResBody>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError> + Send,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = RequestBodyFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let request = req.extensions().get::<RequestCancellation>().cloned();
        if request.is_none() && !self.budget.reported_no_scope.swap(true, Ordering::Relaxed) {
            // Without a scope there is nothing to cancel: a client leaving mid-upload, or an
            // idle timeout, is not recorded, and read-ahead reads for nothing. Once per layer.
            tracing::error!(
                target: crate::event::TARGET,
                method = %req.method(),
                path = req.uri().path(),
                "RequestBodyLayer sees a request with no cancellation scope: put it inside \
                 (after) a CancellationLayer, e.g. ServiceBuilder::new()\
                 .layer(CancellationLayer::new()).layer(RequestBodyLayer::new())",
            );
        }
        let (parts, body) = req.into_parts();
        // A client that sent `Expect: 100-continue` waits for the `100` before it sends its
        // body, and hyper sends it when the body is first polled: reading ahead would answer
        // for the handler, which may not want the upload (it may answer 413 or 401). Its body
        // is read by the handler alone.
        let expects_continue = parts
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let reading_ahead = self.read_ahead > 0 && self.budget.total() > 0 && !expects_continue;
        // The body's clocks and the response future share whether one of them ran out.
        let timed_out =
            (self.idle_timeout.is_some() || self.min_rate.is_some()).then(TimedOut::default);
        let idle = self
            .idle_timeout
            .zip(timed_out.clone())
            .map(|(idle, timed_out)| IdleClock::new(idle, timed_out));
        let rate = self
            .min_rate
            .zip(timed_out.clone())
            .map(|((rate, grace), timed_out)| RateClock::new(rate, grace, timed_out));
        let http1 = matches!(
            parts.version,
            Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11
        );
        let (body, reader) = if reading_ahead && !body.is_end_stream() {
            let budget = Arc::clone(&self.budget);
            let shared = Arc::new(ReadAhead::new(body, request, self.read_ahead, budget));
            (
                RequestBody {
                    kind: Kind::Shared {
                        shared: Arc::clone(&shared),
                        own: None,
                    },
                    idle,
                    rate,
                },
                Some(shared),
            )
        } else {
            (
                RequestBody {
                    kind: Kind::Direct {
                        inner: body,
                        request,
                    },
                    idle,
                    rate,
                },
                None,
            )
        };
        RequestBodyFuture {
            inner: self.inner.call(Request::from_parts(parts, body)),
            reader,
            timed_out,
            http1,
        }
    }
}
