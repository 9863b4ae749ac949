//! `RequestBodyLayer`: watches the request body for the client leaving mid-upload, and can read
//! ahead so that hyper notices a client that leaves while the body is still unread.
//!
//! hyper reports a client that leaves during an upload only to whoever reads the body: the
//! read fails, but the handler future lives on. And while nobody reads the body, hyper's
//! HTTP/1.1 connection does not read the socket at all, so it cannot see the client leave.
//! This layer closes both gaps for the routes that take uploads.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Buf;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::scope::Scope;
use crate::{CancelReason, RequestCancellation};

/// A [`Layer`] for routes that receive request bodies (uploads): a failed body read caused by
/// the client (hyper's "connection closed before message completed", a reset stream) cancels
/// the request with [`CancelReason::Disconnected`] at once, and, with
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
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestBodyLayer {
    read_ahead: usize,
}

impl RequestBodyLayer {
    /// Watches request bodies for read errors; no read-ahead.
    pub fn new() -> Self {
        Self::default()
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
    pub fn read_ahead(mut self, bytes: usize) -> Self {
        self.read_ahead = bytes;
        self
    }
}

impl<S> Layer<S> for RequestBodyLayer {
    type Service = RequestBodyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestBodyService {
            inner,
            read_ahead: self.read_ahead,
        }
    }
}

/// Middleware built by [`RequestBodyLayer`].
#[derive(Debug, Clone)]
pub struct RequestBodyService<S> {
    inner: S,
    read_ahead: usize,
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
        let scope = req
            .extensions()
            .get::<RequestCancellation>()
            .map(|rc| Arc::clone(rc.scope_arc()));
        let (parts, body) = req.into_parts();
        let (body, reader) = if self.read_ahead > 0 && !body.is_end_stream() {
            let shared = Arc::new(ReadAhead::new(body, scope, self.read_ahead));
            (
                RequestBody {
                    kind: Kind::Shared {
                        shared: Arc::clone(&shared),
                    },
                },
                Some(shared),
            )
        } else {
            (
                RequestBody {
                    kind: Kind::Direct { inner: body, scope },
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

pin_project! {
    /// Response future of [`RequestBodyService`]: reads the request body ahead while the
    /// handler is pending and has not started reading it.
    #[must_use = "futures do nothing unless polled"]
    pub struct RequestBodyFuture<F, B: Body> {
        #[pin]
        inner: F,
        reader: Option<Arc<ReadAhead<B>>>,
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

pin_project! {
    /// The request body as the handler behind [`RequestBodyLayer`] sees it: the original
    /// body's frames, in order, whether or not some were read ahead.
    pub struct RequestBody<B: Body> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B: Body> {
        Direct { #[pin] inner: B, scope: Option<Arc<Scope>> },
        Shared { shared: Arc<ReadAhead<B>> },
    }
}

impl<B: Body> Body for RequestBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Direct { inner, scope } => {
                let poll = inner.poll_frame(cx);
                if let (Poll::Ready(Some(Err(_))), Some(scope)) = (&poll, scope) {
                    scope.cancel(CancelReason::Disconnected);
                }
                poll
            }
            KindProj::Shared { shared } => shared.poll_for_handler(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Direct { inner, .. } => inner.is_end_stream(),
            Kind::Shared { shared } => shared.lock().is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Direct { inner, .. } => inner.size_hint(),
            Kind::Shared { shared } => shared.lock().size_hint(),
        }
    }
}

impl<B: Body> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let read_ahead = matches!(self.kind, Kind::Shared { .. });
        f.debug_struct("RequestBody")
            .field("read_ahead", &read_ahead)
            .finish_non_exhaustive()
    }
}

/// What `Body::poll_frame` returns for a body of type `B`.
type PollFrame<B> = Poll<Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>>;

/// A request body shared by the handler and the read-ahead in the response future.
pub(crate) struct ReadAhead<B: Body> {
    state: Mutex<State<B>>,
    scope: Option<Arc<Scope>>,
    limit: usize,
}

struct State<B: Body> {
    body: Pin<Box<B>>,
    /// Frames read ahead, not yet handed to the handler.
    frames: VecDeque<Frame<B::Data>>,
    /// Data bytes in `frames`.
    buffered: usize,
    /// The body ended (`None`) or failed, while reading ahead; handed over after `frames`.
    end: Option<Option<B::Error>>,
    /// The handler polled the body: reading ahead is over.
    handler_started: bool,
}

impl<B: Body> State<B> {
    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && (matches!(self.end, Some(None)) || self.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.body.size_hint();
        let buffered = self.buffered as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(buffered));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(buffered));
        }
        hint
    }
}

impl<B: Body> ReadAhead<B> {
    fn new(body: B, scope: Option<Arc<Scope>>, limit: usize) -> Self {
        Self {
            state: Mutex::new(State {
                body: Box::pin(body),
                frames: VecDeque::new(),
                buffered: 0,
                end: None,
                handler_started: false,
            }),
            scope,
            limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<B>> {
        // No user code runs under this lock (a body's poll_frame is not user callback code
        // that could re-enter it).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn disconnected(&self) {
        if let Some(scope) = &self.scope {
            scope.cancel(CancelReason::Disconnected);
        }
    }

    /// Reads ahead with the response future's waker. Returns `false` once there is nothing
    /// more to do (the handler took over, the body ended or failed, or the buffer is full).
    fn read_ahead(&self, cx: &mut Context<'_>) -> bool {
        let mut state = self.lock();
        loop {
            if state.handler_started || state.end.is_some() {
                return false;
            }
            if state.buffered >= self.limit {
                return false;
            }
            match state.body.as_mut().poll_frame(cx) {
                Poll::Pending => return true,
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        state.buffered += data.remaining();
                    }
                    state.frames.push_back(frame);
                }
                Poll::Ready(None) => {
                    state.end = Some(None);
                    return false;
                }
                Poll::Ready(Some(Err(error))) => {
                    state.end = Some(Some(error));
                    drop(state);
                    self.disconnected();
                    return false;
                }
            }
        }
    }

    /// The handler reads: first what was read ahead, then the body itself.
    fn poll_for_handler(&self, cx: &mut Context<'_>) -> PollFrame<B> {
        let mut state = self.lock();
        state.handler_started = true;
        if let Some(frame) = state.frames.pop_front() {
            if let Some(data) = frame.data_ref() {
                state.buffered -= data.remaining();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        match state.end.take() {
            Some(Some(error)) => {
                // Reported once; the body is over after it.
                state.end = Some(None);
                return Poll::Ready(Some(Err(error)));
            }
            Some(None) => {
                state.end = Some(None);
                return Poll::Ready(None);
            }
            None => {}
        }
        let poll = state.body.as_mut().poll_frame(cx);
        drop(state);
        if let Poll::Ready(Some(Err(_))) = &poll {
            self.disconnected();
        }
        poll
    }
}

impl<B: Body> fmt::Debug for ReadAhead<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadAhead")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::task::Waker;

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;

    /// A body that yields a scripted sequence of frames, with `Pending` in between.
    struct Scripted(VecDeque<Option<Bytes>>);

    impl Body for Scripted {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0.pop_front() {
                Some(Some(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => Poll::Ready(None),
            }
        }
    }

    proptest! {
        #[test]
        fn read_ahead_reproduces_any_frame_split(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..24),
            pending_after in proptest::collection::vec(any::<bool>(), 24),
            limit in 1usize..512,
            read_ahead_polls in 0usize..8,
        ) {
            let mut script = VecDeque::new();
            for (i, chunk) in chunks.iter().enumerate() {
                script.push_back(Some(Bytes::from(chunk.clone())));
                if pending_after[i] {
                    script.push_back(None);
                }
            }
            let shared = ReadAhead::new(Scripted(script), None, limit);
            let mut cx = Context::from_waker(Waker::noop());
            for _ in 0..read_ahead_polls {
                shared.read_ahead(&mut cx);
            }
            prop_assert!(shared.lock().buffered <= limit + 64, "bounded by the limit plus a frame");
            let mut received = Vec::new();
            loop {
                match shared.poll_for_handler(&mut cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        received.extend_from_slice(&frame.into_data().unwrap());
                    }
                    Poll::Ready(Some(Err(never))) => match never {},
                    Poll::Ready(None) => break,
                    Poll::Pending => {}
                }
                // Once the handler reads, read-ahead stands down.
                prop_assert!(!shared.read_ahead(&mut cx));
            }
            prop_assert_eq!(received, chunks.concat());
        }
    }
}
