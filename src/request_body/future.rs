//! `RequestBodyFuture`: reads the request body ahead while the handler is pending.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::Body;
use pin_project_lite::pin_project;

use crate::request_body::read_ahead::ReadAhead;

pin_project! {
    /// Response future of [`RequestBodyService`]: reads the request body ahead while the
    /// handler is pending and has not started reading it.
    #[must_use = "futures do nothing unless polled"]
    pub struct RequestBodyFuture<F, B: Body> {
        #[pin]
        pub(crate) inner: F,
        pub(crate) reader: Option<Arc<ReadAhead<B>>>,
    }
}

impl<F: Future, B: Body> Future for RequestBodyFuture<F, B> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Ready(output) => {
                // The handler is done: whatever it left unread is hyper's business.
                *this.reader = None;
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

impl<F, B: Body> fmt::Debug for RequestBodyFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBodyFuture")
            .field("reading_ahead", &self.reader.is_some())
            .finish_non_exhaustive()
    }
}
