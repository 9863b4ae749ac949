//! `PropagateFuture`: the outbound call, abandoned if the inbound request is cancelled first.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use crate::propagate::Watch;
use crate::propagate::body::PropagateBody;
use crate::propagate::error::BoxError;

pin_project! {
    /// Response future of [`PropagateService`]: the outbound call, abandoned if the inbound request
    /// is cancelled first.
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct PropagateFuture<F> {
        #[pin]
        pub(crate) inner: Option<F>,
        pub(crate) watch: Option<Watch>,
    }
}

impl<F, B, E> Future for PropagateFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<PropagateBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The inbound request first: once it is cancelled, nobody wants the answer.
        if let Some(watch) = this.watch.as_mut() {
            if let Poll::Ready(cancelled) = watch.poll(cx) {
                // Dropping the call is what tells the downstream server.
                this.inner.set(None);
                *this.watch = None;
                return Poll::Ready(Err(Box::new(cancelled)));
            }
        }
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(Err("PropagateFuture polled after it completed".into()));
        };
        let result = std::task::ready!(inner.poll(cx));
        this.inner.set(None);
        let watch = this.watch.take();
        Poll::Ready(match result {
            Ok(response) => Ok(response.map(|body| PropagateBody {
                inner: Some(body),
                watch,
            })),
            Err(error) => Err(error.into()),
        })
    }
}
