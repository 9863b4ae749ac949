//! What the in-process benches share: one request driven by hand with a no-op waker, and the
//! hand-written peer of the layer.
//!
//! A module directory rather than `benches/support.rs`, so that cargo does not take it for a
//! bench of its own.

// Each bench uses only part of this module.
#![allow(dead_code)]

pub(crate) mod floor;

use std::future::Future;
use std::hint::black_box;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::AtomicU8;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio_util::sync::{CancellationToken, DropGuard};
use tower::{Layer, Service};

/// One request: poll readiness, call with `request`, poll the future to completion, drain the
/// body to its end (`poll_frame` until `None`), drop everything. Nothing here waits: every
/// `Pending` is polled again at once. Never inlined, so that profilers (callgrind) can count
/// the instructions of one request.
#[inline(never)]
pub(crate) fn one_request<S, B>(svc: &mut S, request: Request<()>, cx: &mut Context<'_>)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    loop {
        if let Poll::Ready(ready) = svc.poll_ready(cx) {
            ready.expect("service failed");
            break;
        }
    }
    let mut future = pin!(svc.call(request));
    let response = loop {
        if let Poll::Ready(response) = future.as_mut().poll(cx) {
            break response.expect("service failed");
        }
    };
    let mut body = pin!(response.into_body());
    loop {
        match body.as_mut().poll_frame(cx) {
            Poll::Ready(Some(frame)) => {
                black_box(frame.expect("body failed"));
            }
            Poll::Ready(None) => break,
            Poll::Pending => {}
        }
    }
}

/// tonic's cancellation example as a tower layer: a token per request in the extensions,
/// cancelled if the response future is dropped before the handler completes.
///
/// With `shared_handle`, it also inserts a [`SharedHandle`]: the `two_entries` variant (the
/// floor of earlier runs, which guards neither the body nor keeps what `Cancelled` reports;
/// see [`floor::FloorLayer`] for the contract floor).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HandWrittenLayer {
    pub(crate) shared_handle: bool,
}

impl<S> Layer<S> for HandWrittenLayer {
    type Service = HandWritten<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HandWritten {
            inner,
            shared_handle: self.shared_handle,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct HandWritten<S> {
    inner: S,
    shared_handle: bool,
}

/// The least a second, shared per-request handle costs: one `Arc` and one more extensions
/// entry.
#[derive(Debug, Clone)]
struct SharedHandle(#[allow(dead_code)] Arc<AtomicU8>);

impl<S, ReqBody> Service<Request<ReqBody>> for HandWritten<S>
where
    S: Service<Request<ReqBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = HandWrittenFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let token = CancellationToken::new();
        req.extensions_mut().insert(token.clone());
        if self.shared_handle {
            req.extensions_mut()
                .insert(SharedHandle(Arc::new(AtomicU8::new(0))));
        }
        HandWrittenFuture {
            inner: self.inner.call(req),
            guard: Some(token.drop_guard()),
        }
    }
}

pin_project! {
    /// The handler's future, cancelling the token if dropped before it completes.
    pub(crate) struct HandWrittenFuture<F> {
        #[pin]
        inner: F,
        guard: Option<DropGuard>,
    }
}

impl<F: Future> Future for HandWrittenFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        // The handler finished: its token must not be cancelled any more.
        if let Some(guard) = this.guard.take() {
            guard.disarm();
        }
        Poll::Ready(output)
    }
}
