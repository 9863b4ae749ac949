//! [`EndOnShutdownLayer`]: streaming responses that end by themselves when the server shuts
//! down, so that an open server-sent event stream cannot hold a graceful shutdown forever
//! (hyper#2787).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::event::TARGET;
use crate::handle::RequestCancellation;

mod body;

pub use self::body::EndOnShutdownBody;
use self::body::Watch;

/// Ends the response bodies of the routes it wraps when the server shuts down, so that a
/// graceful shutdown is not held up by a stream that never ends on its own.
///
/// Put it inside a [`CancellationLayer`](crate::CancellationLayer) that has a
/// [`shutdown_token`](crate::CancellationLayer::shutdown_token) (and usually a
/// [`shutdown_grace`](crate::CancellationLayer::shutdown_grace)): app-wide, or on the
/// streaming routes only. What it does with each response depends on its body:
///
/// | response | at the grace's end (the request is cancelled with `Shutdown`) |
/// |---|---|
/// | server-sent events (`text/event-stream`, no length) | ends cleanly, after the [`last_event`](Self::last_event) if set |
/// | anything else still streaming (a download) | fails with the request's [`Cancelled`](crate::Cancelled) record: the server resets the stream (HTTP/1.1: closes the connection), the client sees an incomplete response |
/// | a body that ended | nothing |
///
/// A body that is not an event stream has the whole drain to finish, and a cut one is never
/// passed off as complete. An event stream can end when the drain begins instead, with
/// [`at_drain`](Self::at_drain): its clients reconnect elsewhere at once and the server
/// exits sooner. Without a `CancellationLayer` outside (no
/// [`RequestCancellation`] in the request), the body passes through unchanged and a `warn`
/// event says so once per layer.
///
/// Its body's data is [`Bytes`] and its error a boxed error, as axum's and tonic's bodies.
/// Under a response body whose own error is `Box<dyn Error + Send + Sync>`, rustc may fail to
/// prove the `async` block that serves a connection `Send` ("implementation of `From` is not
/// general enough", rust-lang/rust#102211; tower-http's `TimeoutBody` hits the same): spawn the
/// connection's future through a generic function (`fn spawn<C: Future + Send + 'static>(conn: C)`),
/// so that the block awaits a type parameter.
///
/// ```
/// use std::convert::Infallible;
/// use std::time::Duration;
///
/// use axum::Router;
/// use axum::response::sse::{Event, Sse};
/// use axum::routing::get;
/// use futures_util::stream::{self, Stream};
/// use tokio_util::sync::CancellationToken;
/// use tower_cancel::CancellationLayer;
/// use tower_cancel::server::EndOnShutdownLayer;
///
/// async fn events() -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
///     Sse::new(stream::repeat_with(|| Ok(Event::default().data("tick"))))
/// }
///
/// let shutdown = CancellationToken::new();
/// let app: Router = Router::new()
///     .route(
///         "/events",
///         get(events).layer(EndOnShutdownLayer::new().last_event("event: bye\ndata: restarting\n\n")),
///     )
///     .layer(
///         CancellationLayer::new()
///             .shutdown_token(shutdown.clone())
///             .shutdown_grace(Duration::from_secs(10)),
///     );
/// ```
#[derive(Clone, Debug, Default)]
pub struct EndOnShutdownLayer {
    last_event: Option<Bytes>,
    at_drain: bool,
    warned: Arc<AtomicBool>,
}

impl EndOnShutdownLayer {
    /// Ends event streams cleanly and cuts other bodies at the grace's end.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `event` as an event stream's last bytes before its clean end: a whole event,
    /// blank line included (`"event: bye\ndata: restarting\n\n"`), or a `retry:` field that
    /// tells `EventSource` clients when to reconnect.
    pub fn last_event(mut self, event: impl Into<Bytes>) -> Self {
        self.last_event = Some(event.into());
        self
    }

    /// Ends event streams when the drain begins (the shutdown token is cancelled) instead of
    /// when the grace is over. Other bodies still have the grace to finish.
    pub fn at_drain(mut self) -> Self {
        self.at_drain = true;
        self
    }
}

impl<S> Layer<S> for EndOnShutdownLayer {
    type Service = EndOnShutdownService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EndOnShutdownService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`EndOnShutdownLayer`].
#[derive(Clone, Debug)]
pub struct EndOnShutdownService<S> {
    inner: S,
    layer: EndOnShutdownLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for EndOnShutdownService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<EndOnShutdownBody<ResBody>>;
    type Error = S::Error;
    type Future = EndOnShutdownFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let request = req.extensions().get::<RequestCancellation>().cloned();
        if request.is_none() && !self.layer.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: TARGET,
                "EndOnShutdownLayer found no RequestCancellation: add CancellationLayer::new() \
                 with a shutdown_token outside it; responses pass through unchanged",
            );
        }
        EndOnShutdownFuture {
            inner: self.inner.call(req),
            request,
            last_event: self.layer.last_event.clone(),
            at_drain: self.layer.at_drain,
        }
    }
}

pin_project! {
    /// Response future of [`EndOnShutdownService`].
    #[must_use = "futures do nothing unless polled"]
    pub struct EndOnShutdownFuture<F> {
        #[pin]
        inner: F,
        request: Option<RequestCancellation>,
        last_event: Option<Bytes>,
        at_drain: bool,
    }
}

impl<F, B, E> Future for EndOnShutdownFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<EndOnShutdownBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        let watch = this.request.take().map(|request| {
            let clean = (is_event_stream(&response)
                && response.body().size_hint().exact().is_none())
            .then(|| this.last_event.take());
            Watch::new(request, clean, *this.at_drain)
        });
        Poll::Ready(Ok(response.map(|body| EndOnShutdownBody::new(body, watch))))
    }
}

impl<F> fmt::Debug for EndOnShutdownFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndOnShutdownFuture")
            .field("at_drain", &self.at_drain)
            .finish_non_exhaustive()
    }
}

/// Whether the response is a server-sent event stream (`text/event-stream`, any parameters).
fn is_event_stream<B>(response: &Response<B>) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("text/event-stream"))
}
