//! What the in-process benches share: one request driven by hand with a no-op waker.
//!
//! A module directory rather than `benches/support.rs`, so that cargo does not take it for a
//! bench of its own.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower::Service;

/// One request: poll readiness, call with `request`, poll the future to completion, drain the
/// body to its end (`poll_frame` until `None`), drop everything. Nothing here waits: every
/// `Pending` is polled again at once.
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
