//! Uploads: [`RequestBodyLayer`] watches the request body for the client leaving mid-upload,
//! and can read ahead so that hyper notices a client that leaves while the body is still
//! unread.
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
//! ([`read_ahead_total`](RequestBodyLayer::read_ahead_total)); the handler later reads the same
//! frames from the [`RequestBody`]. A failed read, by either, cancels the request with
//! `Disconnected`.
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

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use http::Request;
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use crate::handle::RequestCancellation;
use crate::macros::inner_service_accessors;

mod body;
mod future;
mod read_ahead;
// Not under loom: these tests run std threads, outside any loom model.
#[cfg(all(test, not(tower_cancel_loom)))]
mod tests;

use self::body::Kind;
pub use self::body::RequestBody;
pub use self::future::RequestBodyFuture;
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
/// through. The handler receives a [`RequestBody`], which yields the same frames, in the same
/// order, whether or not they were read ahead.
///
/// Any error the request body reports counts as the client leaving: hyper only fails a
/// request body for transport reasons (incomplete message, reset stream, malformed chunk).
/// Layers that produce request-body errors of their own (size limits, timeouts) belong inside
/// this one, so their errors never pass through it.
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
pub struct RequestBodyLayer {
    read_ahead: usize,
    budget: Arc<Budget>,
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
        }
    }

    /// Reads up to `bytes` of each request body ahead of the handler, while the handler has
    /// not polled the body yet.
    ///
    /// The reading is done when the response future is polled and the handler is pending:
    /// hyper then keeps reading the connection and notices a client that leaves, and the
    /// request is cancelled with `Disconnected` within the time the handler takes to be
    /// polled again. The handler later reads the same bytes, in order, unchanged.
    ///
    /// Memory per request is bounded by `bytes` plus one frame (hyper's frames are at most its
    /// read buffer). Once the buffer holds `bytes`, reading stops: for the rest of the body,
    /// a client that leaves is seen as without this option (when the handler reads, or when
    /// the response is written). Once the handler polls the body, it reads the rest itself.
    /// `0` turns read-ahead off.
    ///
    /// All requests together hold at most [`read_ahead_total`](Self::read_ahead_total) bytes
    /// (64 MiB unless set), plus one frame per request reading ahead: without that bound, the
    /// per-request limit times the number of concurrent uploads would be the server's memory
    /// (10 000 slow uploads with `read_ahead(2 MiB)` would hold 20 GiB).
    pub fn read_ahead(mut self, bytes: usize) -> Self {
        self.read_ahead = bytes;
        self
    }

    /// Bounds what all requests served by this layer and its clones hold in read-ahead
    /// buffers together: `bytes`, plus at most one frame per request that is reading ahead (a
    /// request checks the budget before it reads a frame and counts the frame once read).
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
    /// Each call starts a new budget, shared by this layer and the clones made from it
    /// afterwards. `0` turns read-ahead off.
    pub fn read_ahead_total(mut self, bytes: usize) -> Self {
        self.budget = Arc::new(Budget::new(bytes));
        self
    }

    /// Bytes held in read-ahead buffers right now, by all requests served through this layer's
    /// budget (this layer and its clones; see [`read_ahead_total`](Self::read_ahead_total)).
    /// For metrics.
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
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(body))
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
        }
    }
}

/// Middleware built by [`RequestBodyLayer`].
#[derive(Debug, Clone)]
pub struct RequestBodyService<S> {
    inner: S,
    read_ahead: usize,
    budget: Arc<Budget>,
}

impl<S> RequestBodyService<S> {
    inner_service_accessors!();
}

impl<S, B> Service<Request<B>> for RequestBodyService<S>
where
    S: Service<Request<RequestBody<B>>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Send,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RequestBodyFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let request = req.extensions().get::<RequestCancellation>().cloned();
        let (parts, body) = req.into_parts();
        let reading_ahead = self.read_ahead > 0 && self.budget.total > 0;
        let (body, reader) = if reading_ahead && !body.is_end_stream() {
            let budget = Arc::clone(&self.budget);
            let shared = Arc::new(ReadAhead::new(body, request, self.read_ahead, budget));
            (
                RequestBody {
                    kind: Kind::Shared {
                        shared: Arc::clone(&shared),
                        own: None,
                    },
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
                },
                None,
            )
        };
        RequestBodyFuture {
            inner: self.inner.call(Request::from_parts(parts, body)),
            reader,
        }
    }
}
