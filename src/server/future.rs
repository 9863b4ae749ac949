//! `CancellationFuture`: guards the request while the handler runs.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Method, Response, StatusCode, Version, header};
use http_body::Body;
use pin_project_lite::pin_project;

use crate::server::body::CancellationBody;
use crate::server::guard::Guard;

pin_project! {
    /// Response future of [`CancellationService`](crate::CancellationService).
    ///
    /// A response to a request that was cancelled before the handler answered (a shutdown, a
    /// deadline, an explicit cancel) carries the request's [`Cancelled`](crate::Cancelled)
    /// record in its extensions.
    ///
    /// Dropping it before it resolves cancels the request with
    /// [`CancelReason::Disconnected`](crate::CancelReason::Disconnected) and
    /// [`Phase::Handler`](crate::Phase::Handler), after the inner future has been dropped.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicBool, Ordering};
    ///
    /// use http::{Request, Response};
    /// use tower::{Layer, Service, service_fn};
    /// use tower_cancel::{CancelReason, CancellationLayer, Phase};
    ///
    /// let fired = Arc::new(AtomicBool::new(false));
    /// let f = fired.clone();
    /// let layer = CancellationLayer::new().on_cancel(move |c| {
    ///     assert_eq!((c.reason(), c.phase()), (CancelReason::Disconnected, Phase::Handler));
    ///     f.store(true, Ordering::SeqCst);
    /// });
    /// let mut svc = layer.layer(service_fn(|_: Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(Response::new(String::new()))
    /// }));
    /// let future = svc.call(Request::new(())); // a CancellationFuture
    /// drop(future); // what hyper does when the client leaves
    /// assert!(fired.load(Ordering::SeqCst));
    /// ```
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct CancellationFuture<F> {
        // Declared first so that it is dropped first: the handler's destructors run before
        // the guard cancels the request and runs the callbacks.
        #[pin]
        inner: F,
        guard: Guard,
        // The request's HTTP version: whether the writer stops at a declared length.
        version: Version,
    }
}

impl<F> CancellationFuture<F> {
    pub(crate) fn new(inner: F, guard: Guard, version: Version) -> Self {
        Self {
            inner,
            guard,
            version,
        }
    }
}

impl<F, B, E> Future for CancellationFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<CancellationBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let inner = this.inner;
        let result = match this.guard.polling(|| inner.poll(cx)) {
            Poll::Pending => {
                this.guard.pending(cx);
                return Poll::Pending;
            }
            Poll::Ready(result) => result,
        };
        let mut guard = this.guard.take();
        let Some(scope) = guard.scope() else {
            // Not the scope's owner (or already resolved): pass through.
            return Poll::Ready(result.map(|res| res.map(CancellationBody::passthrough)));
        };
        let mut response = match result {
            Ok(response) => response,
            Err(error) => {
                // The inner service failed: the request ended, it was not abandoned.
                guard.finish();
                return Poll::Ready(Err(error));
            }
        };
        if scope.cancellation().is_some() {
            // Cancelled before the handler answered (a shutdown, a deadline, an explicit
            // cancel): the answer carries the record, for what wraps the layer to see (a
            // `TraceLayer` classifier that does not count it as a server error).
            response.extensions_mut().insert(scope.record());
        }
        let declared =
            if sends_body(scope.method(), response.status()) && !response.body().is_end_stream() {
                declared_length(&response, *this.version)
            } else {
                Some(0)
            };
        if declared == Some(0) {
            // hyper writes no body (or an empty one) and may drop it without polling it.
            guard.finish();
            return Poll::Ready(Ok(response.map(CancellationBody::passthrough)));
        }
        scope.enter_body();
        Poll::Ready(Ok(
            response.map(|body| CancellationBody::guarded(body, guard, declared))
        ))
    }
}

/// Whether a response to `method` with `status` carries a body on the wire (RFC 9110 §6.4.1).
#[inline]
fn sends_body(method: &Method, status: StatusCode) -> bool {
    !(has_no_content(method, status) || (method == Method::CONNECT && status.is_success()))
}

/// Whether a response to `method` with `status` has no content, whatever its body would yield
/// (RFC 9110 §6.4.1): what HEAD, 1xx, 204 and 304 responses have in common on every version.
pub(crate) fn has_no_content(method: &Method, status: StatusCode) -> bool {
    method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// The body length hyper will stop at: the `content-length` header, else an exact size hint.
///
/// hyper's HTTP/1.x writer stops polling the body once that many bytes were written, so the
/// body counts them to tell completion from abandonment. Its HTTP/2 writer polls on until the
/// body ends (`None`, `is_end_stream`, or trailers, which may follow the last byte): there the
/// length says nothing about the end.
fn declared_length<B: Body>(response: &Response<B>, version: Version) -> Option<u64> {
    if version >= Version::HTTP_2 {
        return None;
    }
    response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse().ok())
        .or_else(|| response.body().size_hint().exact())
}
