//! `RequestBodyFuture`: reads the request body ahead while the handler is pending, and answers
//! `408` in place of the handler's `400` or `500` once the body's idle timeout has fired.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Response, StatusCode, header};
use http_body::Body;
use pin_project_lite::pin_project;

use crate::event::TARGET;
use crate::request_body::idle::TimedOut;
use crate::request_body::read_ahead::ReadAhead;

pin_project! {
    /// Response future of [`RequestBodyService`](super::RequestBodyService): reads the request
    /// body ahead while the handler is pending and has not started reading it, and, once the
    /// body's [`idle_timeout`](super::RequestBodyLayer::idle_timeout) has fired, answers
    /// `408 Request Timeout` in place of the `400` or `500` the handler made of its failed read.
    #[must_use = "futures do nothing unless polled"]
    pub struct RequestBodyFuture<F, B: Body> {
        #[pin]
        pub(crate) inner: F,
        pub(crate) reader: Option<Arc<ReadAhead<B>>>,
        // With an idle timeout only.
        pub(crate) timed_out: Option<TimedOut>,
        // The request came over HTTP/1.x: a 408 says the connection closes.
        pub(crate) http1: bool,
    }
}

impl<F, B, ResBody, E> Future for RequestBodyFuture<F, B>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    B: Body,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Ready(mut output) => {
                // The handler is done: whatever it left unread is hyper's business.
                *this.reader = None;
                if let (Some(timed_out), Ok(response)) = (this.timed_out.take(), &mut output) {
                    if timed_out.get() {
                        answer_408(response, *this.http1);
                    }
                }
                Poll::Ready(output)
            }
            Poll::Pending => {
                if let Some(reader) = this.reader {
                    if !reader.read_ahead(cx) {
                        *this.reader = None;
                    }
                }
                Poll::Pending
            }
        }
    }
}

/// The statuses a handler makes of a failed body read without knowing why it failed: axum's
/// body extractors (`Bytes`, `String`, `Json`, `Form`, `RawForm`) reject an unknown body error
/// with `400`, and its `Multipart`, or a handler that passes the error on with `?` into an
/// error type of its own, with `500`.
fn made_of_a_failed_read(status: StatusCode) -> bool {
    status == StatusCode::BAD_REQUEST || status == StatusCode::INTERNAL_SERVER_ERROR
}

/// The handler answered after its body's idle timeout fired: a `400` or `500` it made of the
/// failed read becomes `408 Request Timeout`, with its headers and body (so its length stays
/// true), and `connection: close` over HTTP/1.x (RFC 9110 §15.5.9). Any other status is the
/// handler's choice, and kept.
fn answer_408<B>(response: &mut Response<B>, http1: bool) {
    let status = response.status();
    if !made_of_a_failed_read(status) {
        return;
    }
    tracing::debug!(
        target: TARGET,
        status = status.as_u16(),
        "the request body's idle timeout or minimum rate ran out: answering 408 Request Timeout \
         in place of the handler's status",
    );
    *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
    if http1 {
        let close = HeaderValue::from_static("close");
        response.headers_mut().insert(header::CONNECTION, close);
    }
}

impl<F, B: Body> fmt::Debug for RequestBodyFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBodyFuture")
            .field("reading_ahead", &self.reader.is_some())
            .field("idle_timeout", &self.timed_out.is_some())
            .finish_non_exhaustive()
    }
}
