//! `CancellationBody`: guards the request while the response body streams.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::server::guard::Guard;

pin_project! {
    /// Response body of [`CancellationService`](crate::CancellationService).
    ///
    /// The request completes when this body reaches its end: the inner body returns `None`,
    /// yields a trailers frame (always a body's last: hyper stops polling after it), reports
    /// [`is_end_stream`](Body::is_end_stream), has yielded as many bytes as its
    /// `content-length` (HTTP/1.x, whose writer stops there), or fails. Dropping it earlier cancels the request with
    /// [`CancelReason::Disconnected`](crate::CancelReason::Disconnected) and
    /// [`Phase::Body`](crate::Phase::Body), after the inner body has been dropped.
    ///
    /// # Example
    ///
    /// ```
    /// use http::{Request, Response};
    /// use http_body_util::BodyExt;
    /// use tower::{ServiceExt, service_fn};
    /// use tower_cancel::RequestCancellation;
    /// use tower_cancel::server::{CancellationBody, CancellationService};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let svc = CancellationService::new(service_fn(|req: Request<()>| async move {
    ///     let cancel = req.extensions().get::<RequestCancellation>().unwrap().clone();
    ///     cancel.on_cancel(|_| unreachable!("this request completes"));
    ///     Ok::<_, std::convert::Infallible>(Response::new(String::from("streamed")))
    /// }));
    /// let response: Response<CancellationBody<String>> =
    ///     svc.oneshot(Request::new(())).await.unwrap();
    /// // Reading the body to its end completes the request.
    /// let bytes = response.into_body().collect().await.unwrap().to_bytes();
    /// assert_eq!(bytes, "streamed");
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct CancellationBody<B> {
        // Declared first so that it is dropped before the guard fires.
        #[pin]
        inner: B,
        guard: Guard,
        // Bytes still expected when the length is known up front.
        remaining: Option<u64>,
    }
}

/// A body that guards nothing, for layers outside that build responses of their own (such as
/// tower-http's `TimeoutLayer`, which needs `Default` bodies).
impl<B: Default> Default for CancellationBody<B> {
    fn default() -> Self {
        Self::passthrough(B::default())
    }
}

impl<B> CancellationBody<B> {
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            inner,
            guard: Guard::default(),
            remaining: None,
        }
    }

    pub(crate) fn guarded(inner: B, guard: Guard, remaining: Option<u64>) -> Self {
        Self {
            inner,
            guard,
            remaining,
        }
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// The inner body, mutably.
    pub fn get_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// The inner body, pinned.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut B> {
        self.project().inner
    }
}

/// Whether `body` is over once it yielded `frame`: a trailers frame is always a body's last
/// (hyper's HTTP/1.1 and HTTP/2 writers stop polling after it), and otherwise the body says so
/// with [`is_end_stream`](Body::is_end_stream).
#[inline]
pub(crate) fn ends_body<D, B: Body + ?Sized>(frame: &Frame<D>, body: &B) -> bool {
    frame.is_trailers() || body.is_end_stream()
}

impl<B: Body> Body for CancellationBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let inner = this.inner.as_mut();
        let poll = this.guard.polling(|| inner.poll_frame(cx));
        if this.guard.scope().is_none() {
            return poll;
        }
        let ended = match &poll {
            Poll::Pending => {
                this.guard.pending(cx);
                false
            }
            // End of stream, or an error: the response is over either way.
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(remaining), Some(data)) = (this.remaining.as_mut(), frame.data_ref()) {
                    *remaining = remaining.saturating_sub(data.remaining() as u64);
                }
                *this.remaining == Some(0) || ends_body(frame, &*this.inner)
            }
        };
        if ended {
            this.guard.finish();
        } else if poll.is_ready() {
            // A body that is always ready never reaches `pending`: check the deadline here,
            // against the clock (a timer is only armed when the body waits).
            this.guard.check_deadline();
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
