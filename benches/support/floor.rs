//! The contract floor: what any implementation of the crate's contract must do for a request
//! that completes, and nothing else. Each piece names the clause that needs it.
//!
//! - a new `CancellationToken`, one handle in the extensions (*the token in the extensions*)
//!   and one kept to cancel it later;
//! - per-request state shared through an `Arc`, one reference in the extensions (*the
//!   `RequestCancellation` handle*, whose `reason()`, `on_cancel` and `cancel()` reach it from
//!   the handler) and one held by the guard;
//! - in that state: a state byte (*armed, completed, or cancelled with a reason and phase*),
//!   the start time (*`Cancelled::elapsed`*), the request's method and URI (*`Cancelled::method`,
//!   `Cancelled::uri`*: the handler may drop its request long before a cancellation), and a
//!   reference to the layer's configuration (*the layer's callbacks run on cancellation, also
//!   when `cancel()` or a shutdown cancels from another thread*);
//! - a guard in the response future that moves into the response body (*a drop of either
//!   cancels*), with one read-modify-write when the handler returns (*phase `Body` from now
//!   on, racing any canceller*) and one when the body ends (*completed: no later cause
//!   cancels*).
//!
//! No deadline, no shutdown registry, no callbacks, no events: a layer built like this does
//! less than the contract (its drop does nothing), but no implementation of it can do less per
//! completed request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service};

const HANDLER: u8 = 0;
const BODY: u8 = 1;
const COMPLETED: u8 = 2;

/// Stands for the layer's configuration (its callbacks, limits, shutdown registry).
#[derive(Debug, Default)]
pub(crate) struct Config {
    _callbacks: Vec<fn()>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

/// The per-request state.
pub(crate) struct State {
    state: AtomicU8,
    token: CancellationToken,
    _started: Instant,
    _method: Method,
    _uri: Uri,
    _config: Arc<Config>,
}

/// What the handle in the extensions holds.
#[derive(Clone, Debug)]
struct Handle(#[allow(dead_code)] Arc<State>);

#[derive(Debug, Clone, Default)]
pub(crate) struct FloorLayer {
    config: Arc<Config>,
}

impl<S> Layer<S> for FloorLayer {
    type Service = Floor<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Floor {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Floor<S> {
    inner: S,
    config: Arc<Config>,
}

/// Cancels the token when dropped while armed.
#[derive(Debug)]
struct Guard(Option<Arc<State>>);

impl Guard {
    /// Moves the request to `next` (from an armed state) and, at the end, disarms.
    fn advance(&mut self, next: u8) {
        if let Some(state) = &self.0 {
            let _ =
                state
                    .state
                    .compare_exchange(next - 1, next, Ordering::AcqRel, Ordering::Acquire);
        }
        if next == COMPLETED {
            self.0 = None;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            state.token.cancel();
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Floor<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<FloorBody<ResBody>>;
    type Error = S::Error;
    type Future = FloorFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let token = CancellationToken::new();
        let state = Arc::new(State {
            state: AtomicU8::new(HANDLER),
            token: token.clone(),
            _started: Instant::now(),
            _method: req.method().clone(),
            _uri: req.uri().clone(),
            _config: Arc::clone(&self.config),
        });
        req.extensions_mut().insert(token);
        req.extensions_mut().insert(Handle(Arc::clone(&state)));
        FloorFuture {
            inner: self.inner.call(req),
            guard: Guard(Some(state)),
        }
    }
}

pin_project! {
    pub(crate) struct FloorFuture<F> {
        #[pin]
        inner: F,
        guard: Guard,
    }
}

impl<F, B, E> Future for FloorFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<FloorBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        this.guard.advance(BODY);
        let guard = Guard(this.guard.0.take());
        Poll::Ready(Ok(response.map(|inner| FloorBody { inner, guard })))
    }
}

pin_project! {
    pub(crate) struct FloorBody<B> {
        #[pin]
        inner: B,
        guard: Guard,
    }
}

impl<B: Body> Body for FloorBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let poll = this.inner.as_mut().poll_frame(cx);
        let ended = match &poll {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers() || this.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if ended {
            this.guard.advance(COMPLETED);
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
