//! `RequestBodyLayer`: watches the request body for the client leaving mid-upload, and can read
//! ahead so that hyper notices a client that leaves while the body is still unread.
//!
//! hyper reports a client that leaves during an upload only to whoever reads the body: the
//! read fails, but the handler future lives on. And while nobody reads the body, hyper's
//! HTTP/1.1 connection does not read the socket at all, so it cannot see the client leave.
//! This layer closes both gaps for the routes that take uploads.
//!
//! With read-ahead, two parties poll one body: the response future (reading ahead while the
//! handler is pending) and the handler. They share it through [`ReadAhead`], whose lock guards
//! only the crate's own bookkeeping: the body is *checked out* of it to be polled, outside the
//! lock, and put back afterwards, so no user code (the body's `poll_frame`, `is_end_stream`,
//! `size_hint`, the `Drop` of its frames, data or errors) ever runs while the lock is held.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

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
/// What is read ahead is bounded per request ([`read_ahead`](Self::read_ahead)) and for all
/// requests together ([`read_ahead_total`](Self::read_ahead_total), 64 MiB by default). The
/// total is a budget shared by the layer, its clones and every request they serve: build the
/// layer once and clone it onto each upload route to bound the whole server.
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
#[derive(Debug, Clone)]
pub struct RequestBodyLayer {
    read_ahead: usize,
    budget: Arc<Budget>,
}

impl Default for RequestBodyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestBodyLayer {
    /// The default of [`read_ahead_total`](Self::read_ahead_total): 64 MiB.
    pub const DEFAULT_READ_AHEAD_TOTAL: usize = 64 * 1024 * 1024;

    /// Watches request bodies for read errors; no read-ahead.
    pub fn new() -> Self {
        Self {
            read_ahead: 0,
            budget: Arc::new(Budget::new(Self::DEFAULT_READ_AHEAD_TOTAL)),
        }
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
    ///
    /// All requests together hold at most [`read_ahead_total`](Self::read_ahead_total) bytes
    /// (64 MiB unless set), plus one frame per request reading ahead: without that bound, the
    /// per-request limit times the number of concurrent uploads would be the server's memory
    /// (10 000 slow uploads with `read_ahead(2 MiB)` would hold 20 GiB).
    pub fn read_ahead(mut self, bytes: usize) -> Self {
        self.read_ahead = bytes;
        self
    }

    /// Bounds what all requests served by this layer and its clones hold in read-ahead
    /// buffers together: `bytes`, plus at most one frame per request that is reading ahead (a
    /// request checks the budget before it reads a frame and counts the frame once read).
    /// Default: [`DEFAULT_READ_AHEAD_TOTAL`](Self::DEFAULT_READ_AHEAD_TOTAL), 64 MiB.
    ///
    /// Why a total, and why that default: [`read_ahead`](Self::read_ahead) is per request, so
    /// without a total a server holds the per-request limit times the number of uploads in
    /// flight, and whoever opens many slow uploads chooses how much memory that is (10 000 of
    /// them with `read_ahead(2 MiB)` make 20 GiB): an exhaustion attack that read-ahead itself
    /// would enable. 64 MiB lets 32 uploads read 2 MiB ahead at once, which covers servers
    /// with a few uploads in flight, and stays small next to a server's memory. Raise it for
    /// servers that take many large uploads at once and have the memory for them.
    ///
    /// A request that finds the budget spent reads nothing more ahead: its upload behaves as
    /// without read-ahead (a client that leaves is seen when the handler reads or the response
    /// is written), and a `debug` event with target `tower_cancel` says so, once per request.
    /// A request's bytes return to the budget as its handler reads them, and when the request
    /// ends, however it ends (completed, dropped, panicked).
    ///
    /// Each call starts a new budget, shared by this layer and the clones made from it
    /// afterwards. `0` turns read-ahead off.
    pub fn read_ahead_total(mut self, bytes: usize) -> Self {
        self.budget = Arc::new(Budget::new(bytes));
        self
    }

    /// Bytes held in read-ahead buffers right now, by all requests served through this layer's
    /// budget (this layer and its clones; see [`read_ahead_total`](Self::read_ahead_total)).
    /// For metrics.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// use std::time::Duration;
    ///
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{Layer, Service, service_fn};
    /// use tower_cancel::{RequestBody, RequestBodyLayer};
    ///
    /// let layer = RequestBodyLayer::new().read_ahead(1024).read_ahead_total(1 << 20);
    /// let mut svc = layer.layer(service_fn(|req: http::Request<RequestBody<Full<Bytes>>>| async {
    ///     tokio::time::sleep(Duration::from_secs(1)).await; // busy: the body is read ahead
    ///     let body = req.into_body().collect().await?.to_bytes();
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(body))
    /// }));
    /// let mut response = std::pin::pin!(svc.call(http::Request::new(Full::from("hello"))));
    /// assert!(tokio::time::timeout(Duration::from_millis(1), &mut response).await.is_err());
    /// assert_eq!(layer.read_ahead_held(), 5); // "hello", waiting for the handler
    ///
    /// assert_eq!(response.await.unwrap().into_body(), "hello");
    /// assert_eq!(layer.read_ahead_held(), 0);
    /// assert_eq!(layer.read_ahead_peak(), 5);
    /// # }
    /// ```
    pub fn read_ahead_held(&self) -> usize {
        self.budget.held.load(Ordering::Acquire)
    }

    /// The highest [`read_ahead_held`](Self::read_ahead_held) since this budget was created
    /// (by [`new`](Self::new) or [`read_ahead_total`](Self::read_ahead_total)). At most the
    /// total plus one frame per request that was reading ahead at the time.
    pub fn read_ahead_peak(&self) -> usize {
        self.budget.peak.load(Ordering::Acquire)
    }
}

impl<S> Layer<S> for RequestBodyLayer {
    type Service = RequestBodyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestBodyService {
            inner,
            read_ahead: self.read_ahead,
            budget: Arc::clone(&self.budget),
        }
    }
}

/// Middleware built by [`RequestBodyLayer`].
#[derive(Debug, Clone)]
pub struct RequestBodyService<S> {
    inner: S,
    read_ahead: usize,
    budget: Arc<Budget>,
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
        let reading_ahead = self.read_ahead > 0 && self.budget.total > 0;
        let (body, reader) = if reading_ahead && !body.is_end_stream() {
            let budget = Arc::clone(&self.budget);
            let shared = Arc::new(ReadAhead::new(body, scope, self.read_ahead, budget));
            (
                RequestBody {
                    kind: Kind::Shared {
                        shared: Arc::clone(&shared),
                        own: None,
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
    ///
    /// # Panics
    ///
    /// If the original body panicked while it was read ahead (the panic then unwound through
    /// the response future, where the server reports it), polling this body after the frames
    /// read before the panic panics with "the request body panicked while it was read ahead",
    /// rather than ending the body early.
    pub struct RequestBody<B: Body> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B: Body> {
        Direct { #[pin] inner: B, scope: Option<Arc<Scope>> },
        // `own`: the body, once the handler has taken it over from the read-ahead (see
        // `ReadAhead::poll_for_handler`).
        Shared { shared: Arc<ReadAhead<B>>, own: Option<Pin<Box<B>>> },
    }
}

impl<B: Body> Body for RequestBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let (inner, scope) = match self.project().kind.project() {
            KindProj::Direct { inner, scope } => (inner, scope.as_deref()),
            KindProj::Shared { shared, own } => {
                if own.is_none() {
                    match shared.poll_for_handler(cx) {
                        ForHandler::Poll(poll) => return poll,
                        ForHandler::Body(body) => *own = Some(body),
                    }
                }
                let inner = own.as_mut().expect("handed over").as_mut();
                (inner, shared.scope.as_deref())
            }
        };
        let poll = inner.poll_frame(cx);
        if let (Poll::Ready(Some(Err(_))), Some(scope)) = (&poll, scope) {
            scope.cancel(CancelReason::Disconnected);
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Direct { inner, .. } => inner.is_end_stream(),
            Kind::Shared {
                own: Some(body), ..
            } => body.is_end_stream(),
            Kind::Shared { shared, own: None } => shared.lock().is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Direct { inner, .. } => inner.size_hint(),
            Kind::Shared {
                own: Some(body), ..
            } => body.size_hint(),
            Kind::Shared { shared, own: None } => shared.lock().size_hint(),
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

/// The read-ahead budget of a layer, shared by its clones and every request they serve.
#[derive(Debug)]
struct Budget {
    /// Data bytes now held in read-ahead buffers.
    held: AtomicUsize,
    /// The highest `held` so far.
    peak: AtomicUsize,
    /// A request reads a frame ahead only while `held < total`.
    total: usize,
}

impl Budget {
    fn new(total: usize) -> Self {
        Self {
            held: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            total,
        }
    }

    fn spent(&self) -> bool {
        self.held.load(Ordering::Acquire) >= self.total
    }
}

/// The bytes one request holds in its read-ahead buffer, counted in its layer's budget, and
/// given back when the request's state is dropped, however the request ends.
#[derive(Debug)]
struct Held {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Held {
    fn new(budget: Arc<Budget>) -> Self {
        Self { budget, bytes: 0 }
    }

    fn add(&mut self, bytes: usize) {
        self.bytes += bytes;
        let now = self.budget.held.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.budget.peak.fetch_max(now, Ordering::AcqRel);
    }

    fn release(&mut self, bytes: usize) {
        self.bytes -= bytes;
        self.budget.held.fetch_sub(bytes, Ordering::AcqRel);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let bytes = self.bytes;
        self.release(bytes);
    }
}

/// What `Body::poll_frame` returns for a body of type `B`.
type PollFrame<B> = Poll<Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>>;

/// What the handler's poll gets from [`ReadAhead`]: a frame, the end, an error or `Pending`;
/// or the body itself, to poll from then on (the read-ahead is over for good).
enum ForHandler<B: Body> {
    Poll(PollFrame<B>),
    Body(Pin<Box<B>>),
}

/// The message of the panic of a handler that polls a body whose read-ahead panicked.
const LOST: &str = "the request body panicked while it was read ahead";

/// A request body shared by the handler and the read-ahead in the response future.
///
/// The lock guards the bookkeeping only; the body is polled outside it (see [`CheckedOut`]),
/// and frames and errors leave the lock before they are dropped.
pub(crate) struct ReadAhead<B: Body> {
    state: Mutex<State<B>>,
    scope: Option<Arc<Scope>>,
    limit: usize,
}

/// Where the body is.
enum Slot<B> {
    /// In the state, to be checked out by whoever polls it next.
    Here(Pin<Box<B>>),
    /// Checked out: the read-ahead is polling it, outside the lock.
    Out,
    /// Handed to the handler for good (`Kind::Shared::own`).
    Handler,
    /// Its poll (or a hint) panicked while it was read ahead: it was dropped.
    Lost,
}

/// `is_end_stream` and `size_hint` of the body, as of its last poll (or of its construction).
#[derive(Debug, Clone, Copy)]
struct Hints {
    end: bool,
    size: SizeHint,
}

impl Hints {
    fn of<B: Body>(body: &B) -> Self {
        Self {
            end: body.is_end_stream(),
            size: body.size_hint(),
        }
    }
}

struct State<B: Body> {
    body: Slot<B>,
    /// Frames read ahead, not yet handed to the handler, each with its data length.
    frames: VecDeque<(Frame<B::Data>, usize)>,
    /// Data bytes in `frames`, counted in the layer's budget.
    held: Held,
    /// The body ended (`None`) or failed, while reading ahead; handed over after `frames`.
    end: Option<Option<B::Error>>,
    /// The handler polled the body: reading ahead is over.
    handler_started: bool,
    /// The handler, waiting for the read-ahead to put the body back.
    handler_waker: Option<Waker>,
    /// The body's hints, cached by whoever polled it last (user code stays out of the lock).
    hints: Hints,
}

impl<B: Body> State<B> {
    fn is_end_stream(&self) -> bool {
        if !self.frames.is_empty() {
            return false;
        }
        match (&self.end, &self.body) {
            (Some(None), _) => true,
            // An error, or the panic, is still to be reported.
            (Some(Some(_)), _) | (None, Slot::Lost) => false,
            (None, _) => self.hints.end,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.hints.size;
        let buffered = self.held.bytes as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(buffered));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(buffered));
        }
        hint
    }
}

impl<B: Body> ReadAhead<B> {
    fn new(body: B, scope: Option<Arc<Scope>>, limit: usize, budget: Arc<Budget>) -> Self {
        // The hints are taken here, before the body is shared; then by whoever polls it.
        let hints = Hints::of(&body);
        Self {
            state: Mutex::new(State {
                body: Slot::Here(Box::pin(body)),
                frames: VecDeque::new(),
                held: Held::new(budget),
                end: None,
                handler_started: false,
                handler_waker: None,
                hints,
            }),
            scope,
            limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<B>> {
        // No user code runs under this lock (the body is polled, and asked for its hints,
        // checked out of it; frames and errors are moved out before they are dropped), and
        // the crate's own code under it does not panic: it cannot be poisoned.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn disconnected(&self) {
        if let Some(scope) = &self.scope {
            scope.cancel(CancelReason::Disconnected);
        }
    }

    /// Reads ahead with the response future's waker. Returns `false` once there is nothing
    /// more to do (the handler took over, the body ended or failed, the buffer is full, or the
    /// layer's budget is spent).
    fn read_ahead(&self, cx: &mut Context<'_>) -> bool {
        loop {
            let body = {
                let mut state = self.lock();
                if state.handler_started || state.end.is_some() || state.held.bytes >= self.limit {
                    return false;
                }
                let budget = &state.held.budget;
                if budget.spent() {
                    let (held, total) = (budget.held.load(Ordering::Relaxed), budget.total);
                    drop(state);
                    tracing::debug!(
                        target: "tower_cancel",
                        held,
                        total,
                        "read-ahead budget spent: the rest of this request body is not read ahead",
                    );
                    return false;
                }
                match mem::replace(&mut state.body, Slot::Out) {
                    Slot::Here(body) => body,
                    // Lost: an earlier read-ahead panicked. (`Out` and `Handler` need the
                    // handler to have polled, and then `handler_started` is set.)
                    other => {
                        state.body = other;
                        return false;
                    }
                }
            };
            let mut out = CheckedOut {
                shared: self,
                body: Some(body),
            };
            let (poll, hints) = out.poll(cx);
            // `Buf::remaining` is user code too: outside the lock, with the body checked out.
            let len = match &poll {
                Poll::Ready(Some(Ok(frame))) => frame.data_ref().map_or(0, Buf::remaining),
                _ => 0,
            };
            let mut state = self.lock();
            let waker = out.put_back(&mut state, hints);
            let mut failed = false;
            let done = match poll {
                Poll::Ready(Some(Ok(frame))) => {
                    state.held.add(len);
                    state.frames.push_back((frame, len));
                    None
                }
                Poll::Pending => Some(true),
                Poll::Ready(None) => {
                    state.end = Some(None);
                    Some(false)
                }
                Poll::Ready(Some(Err(error))) => {
                    state.end = Some(Some(error));
                    failed = true;
                    Some(false)
                }
            };
            drop(state);
            if let Some(waker) = waker {
                waker.wake();
            }
            if failed {
                self.disconnected();
            }
            if let Some(more) = done {
                return more;
            }
        }
    }

    /// The handler reads: first what was read ahead, then the body itself, which it takes
    /// over (once the handler has polled, the read-ahead never polls again).
    fn poll_for_handler(&self, cx: &mut Context<'_>) -> ForHandler<B> {
        // A clone of the handler's waker, made outside the lock (cloning runs the executor's
        // code), once the body was found checked out.
        let mut waker: Option<Waker> = None;
        loop {
            if let Some(poll) = self.try_for_handler(cx, &mut waker) {
                return poll;
            }
            waker = Some(cx.waker().clone());
        }
    }

    /// One attempt of [`poll_for_handler`](Self::poll_for_handler): `None` when the body is
    /// checked out and `waker` holds no clone of the handler's waker yet.
    fn try_for_handler(
        &self,
        cx: &mut Context<'_>,
        waker: &mut Option<Waker>,
    ) -> Option<ForHandler<B>> {
        let mut state = self.lock();
        state.handler_started = true;
        if let Some((frame, len)) = state.frames.pop_front() {
            state.held.release(len);
            return Some(ForHandler::Poll(Poll::Ready(Some(Ok(frame)))));
        }
        if let Some(end) = state.end.take() {
            // An error is reported once; the body is over after it.
            state.end = Some(None);
            return Some(ForHandler::Poll(Poll::Ready(end.map(Err))));
        }
        match mem::replace(&mut state.body, Slot::Handler) {
            Slot::Here(body) => Some(ForHandler::Body(body)),
            Slot::Out => {
                // The read-ahead is polling it: whoever puts it back wakes the handler.
                state.body = Slot::Out;
                // `will_wake` only compares pointers.
                if state
                    .handler_waker
                    .as_ref()
                    .is_some_and(|parked| parked.will_wake(cx.waker()))
                {
                    return Some(ForHandler::Poll(Poll::Pending));
                }
                let new = waker.take()?;
                let old = state.handler_waker.replace(new);
                drop(state);
                drop(old);
                Some(ForHandler::Poll(Poll::Pending))
            }
            Slot::Lost => {
                state.body = Slot::Lost;
                drop(state);
                panic!("{LOST}");
            }
            Slot::Handler => {
                drop(state);
                unreachable!("the handler polled the read-ahead for a body it had taken over")
            }
        }
    }
}

impl<B: Body> fmt::Debug for ReadAhead<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadAhead")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// The body, checked out of the state and polled by the read-ahead outside the lock. Put back
/// with [`put_back`](Self::put_back); dropped without that (its poll or a hint panicked), it
/// marks the body lost and wakes a waiting handler, whose poll then panics with [`LOST`]
/// instead of returning a truncated body.
struct CheckedOut<'a, B: Body> {
    shared: &'a ReadAhead<B>,
    body: Option<Pin<Box<B>>>,
}

impl<B: Body> CheckedOut<'_, B> {
    fn poll(&mut self, cx: &mut Context<'_>) -> (PollFrame<B>, Hints) {
        let body = self.body.as_mut().expect("checked out");
        let poll = body.as_mut().poll_frame(cx);
        (poll, Hints::of(&**body))
    }

    /// Puts the body back into the locked state, with its new hints; returns the waker of a
    /// handler waiting for it, to be woken once the lock is released.
    fn put_back(mut self, state: &mut State<B>, hints: Hints) -> Option<Waker> {
        if let Some(body) = self.body.take() {
            state.body = Slot::Here(body);
        }
        state.hints = hints;
        state.handler_waker.take()
    }
}

impl<B: Body> Drop for CheckedOut<'_, B> {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        let waker = {
            let mut state = self.shared.lock();
            state.body = Slot::Lost;
            state.handler_waker.take()
        };
        drop(body);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::rc::{Rc, Weak};
    use std::sync::atomic::AtomicBool;
    use std::sync::{Once, mpsc};
    use std::task::{Wake, Waker};
    use std::thread;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;

    /// A waker that records that it was woken.
    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl Flag {
        fn is_set(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }

    const SCRIPTED_PANIC: &str = "scripted body panics";

    fn message(panic: &(dyn std::any::Any + Send)) -> String {
        panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    }

    /// Keeps the panics these tests provoke out of the test output; others print as usual.
    fn quiet_expected_panics() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let text = message(info.payload());
                if text != SCRIPTED_PANIC && text != LOST {
                    default(info);
                }
            }));
        });
    }

    /// One step of a scripted body's life.
    #[derive(Debug, Clone)]
    enum Step {
        Data(Vec<u8>),
        /// `Pending` once (waking at once).
        Pending,
        /// The handler polls its body from inside this body's `poll_frame` (so while the
        /// read-ahead has it checked out), then the script goes on.
        Reenter,
        /// `poll_frame` panics.
        Panic,
    }

    /// What a script's `Reenter` step calls, set once the handler's body exists.
    type Hook = Rc<RefCell<Option<Box<dyn Fn()>>>>;

    /// A body that plays a script. Its hints are exact: the data still in the script.
    struct Script {
        steps: VecDeque<Step>,
        reenter: Hook,
    }

    impl Body for Script {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            loop {
                match self.steps.pop_front() {
                    Some(Step::Data(data)) => {
                        return Poll::Ready(Some(Ok(Frame::data(data.into()))));
                    }
                    Some(Step::Pending) => {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    Some(Step::Reenter) => {
                        if let Some(reenter) = self.reenter.borrow().as_ref() {
                            reenter();
                        }
                    }
                    Some(Step::Panic) => panic!("{SCRIPTED_PANIC}"),
                    None => return Poll::Ready(None),
                }
            }
        }

        fn is_end_stream(&self) -> bool {
            self.steps.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            let data = self.steps.iter().map(|step| match step {
                Step::Data(data) => data.len() as u64,
                _ => 0,
            });
            SizeHint::with_exact(data.sum())
        }
    }

    /// What the handler received.
    #[derive(Default)]
    struct Seen {
        bytes: Vec<u8>,
        ended: bool,
        panicked: Option<String>,
        /// The waker of the handler's last poll, if it returned `Pending`: it must have been
        /// woken by the time the operation that polled returns (a later poll supersedes it).
        waiting: Option<Arc<Flag>>,
        /// Bytes the whole body carries, when its hints can be checked (no panic).
        total: Option<u64>,
    }

    /// One poll of the handler's body; checks its hints against what is left.
    fn handler_poll(body: &RefCell<RequestBody<Script>>, seen: &RefCell<Seen>) {
        // Re-entered from the handler's own poll (it took the body over): not a second handler.
        let Ok(mut body) = body.try_borrow_mut() else {
            return;
        };
        {
            let seen = seen.borrow();
            if seen.ended || seen.panicked.is_some() {
                return;
            }
            if let Some(total) = seen.total {
                let left = total - seen.bytes.len() as u64;
                let hint = body.size_hint();
                assert_eq!(
                    (hint.lower(), hint.upper()),
                    (left, Some(left)),
                    "size_hint"
                );
            }
        }
        let said_end = body.is_end_stream();
        let flag = Arc::new(Flag::default());
        let waker = Waker::from(Arc::clone(&flag));
        let poll = catch_unwind(AssertUnwindSafe(|| {
            Pin::new(&mut *body).poll_frame(&mut Context::from_waker(&waker))
        }));
        let mut seen = seen.borrow_mut();
        assert!(
            !said_end || matches!(poll, Ok(Poll::Ready(None))),
            "is_end_stream, then more"
        );
        seen.waiting = None;
        match poll {
            Ok(Poll::Ready(Some(Ok(frame)))) => {
                seen.bytes.extend_from_slice(&frame.into_data().unwrap())
            }
            Ok(Poll::Ready(Some(Err(never)))) => match never {},
            Ok(Poll::Ready(None)) => seen.ended = true,
            Ok(Poll::Pending) => seen.waiting = Some(flag),
            Err(panic) => seen.panicked = Some(message(&*panic)),
        }
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Step::Data),
            2 => Just(Step::Pending),
            1 => Just(Step::Reenter),
        ]
    }

    proptest! {
        /// Any frame split, any interleaving of read-ahead and handler polls, the handler
        /// polling while the read-ahead has the body checked out, a body that panics, any
        /// per-request limit and any budget, partly held by another request: the handler
        /// receives exactly the original bytes in order (up to a panic, which it then sees),
        /// the hints stay exact, every `Pending` is woken, the buffer and the budget stay
        /// within their bounds, and every byte returns to the budget.
        #[test]
        fn read_ahead_reproduces_any_frame_split(
            mut steps in proptest::collection::vec(step(), 0..24),
            panic_at in proptest::option::weighted(0.25, 0usize..24),
            ops in proptest::collection::vec(any::<bool>(), 0..16),
            limit in 1usize..512,
            total in 1usize..512,
            neighbour in 0usize..512,
        ) {
            quiet_expected_panics();
            if let Some(at) = panic_at {
                steps.insert(at.min(steps.len()), Step::Panic);
            }
            let mut expected = Vec::new();
            for step in &steps {
                match step {
                    Step::Data(data) => expected.extend_from_slice(data),
                    Step::Panic => break,
                    _ => {}
                }
            }
            let panics = panic_at.is_some();

            let budget = Arc::new(Budget::new(total));
            let mut other = Held::new(Arc::clone(&budget));
            other.add(neighbour);
            let reenter = Rc::new(RefCell::new(None));
            let script = Script { steps: steps.into(), reenter: Rc::clone(&reenter) };
            // `Kind::Shared` holds an `Arc`; this test stays on one thread.
            #[allow(clippy::arc_with_non_send_sync)]
            let shared = Arc::new(ReadAhead::new(script, None, limit, Arc::clone(&budget)));
            let body = Rc::new(RefCell::new(RequestBody {
                kind: Kind::Shared { shared: Arc::clone(&shared), own: None },
            }));
            let seen = Rc::new(RefCell::new(Seen {
                total: (!panics).then_some(expected.len() as u64),
                ..Seen::default()
            }));
            {
                let (body, seen): (Weak<_>, _) = (Rc::downgrade(&body), Rc::clone(&seen));
                *reenter.borrow_mut() = Some(Box::new(move || {
                    if let Some(body) = body.upgrade() {
                        handler_poll(&body, &seen);
                    }
                }) as Box<dyn Fn()>);
            }

            let mut cx = Context::from_waker(Waker::noop());
            let mut reading_ahead = true;
            let mut read_ahead_panicked = false;
            let check = |seen: &RefCell<Seen>| -> Result<(), TestCaseError> {
                if let Some(flag) = seen.borrow_mut().waiting.take() {
                    prop_assert!(flag.is_set(), "a Pending handler poll was never woken");
                }
                let mine = shared.lock().held.bytes;
                prop_assert!(mine <= limit + 63, "bounded by the limit plus a frame");
                let all = budget.held.load(Ordering::SeqCst);
                prop_assert_eq!(all, neighbour + mine);
                prop_assert!(mine == 0 || neighbour < total, "nothing read on a spent budget");
                prop_assert!(all <= neighbour.max(total + 63), "bounded by the budget plus a frame");
                Ok(())
            };
            for op in ops {
                if op {
                    if reading_ahead {
                        match catch_unwind(AssertUnwindSafe(|| shared.read_ahead(&mut cx))) {
                            Ok(more) => reading_ahead = more,
                            Err(panic) => {
                                prop_assert_eq!(message(&*panic), SCRIPTED_PANIC);
                                reading_ahead = false;
                                read_ahead_panicked = true;
                            }
                        }
                    }
                } else {
                    handler_poll(&body, &seen);
                }
                check(&seen)?;
                if shared.lock().handler_started {
                    // Once the handler reads, read-ahead stands down.
                    prop_assert!(!shared.read_ahead(&mut cx));
                    reading_ahead = false;
                }
            }
            for _ in 0..200 {
                handler_poll(&body, &seen);
                check(&seen)?;
                let seen = seen.borrow();
                if seen.ended || seen.panicked.is_some() {
                    break;
                }
            }
            let seen = seen.borrow();
            prop_assert_eq!(&seen.bytes, &expected);
            if panics {
                let panicked = seen.panicked.as_deref();
                if read_ahead_panicked {
                    prop_assert_eq!(panicked, Some(LOST), "the handler learns of the panic");
                } else {
                    prop_assert!(panicked == Some(SCRIPTED_PANIC) || panicked == Some(LOST));
                }
            } else {
                prop_assert!(seen.ended && seen.panicked.is_none());
            }
            prop_assert!(budget.peak.load(Ordering::SeqCst) <= neighbour.max(total + 63));
            drop(seen);
            drop(body);
            drop(shared);
            prop_assert_eq!(budget.held.load(Ordering::SeqCst), neighbour, "all given back");
            drop(other);
            prop_assert_eq!(budget.held.load(Ordering::SeqCst), 0);
        }
    }

    /// A `Send` body whose first `poll_frame` blocks its thread until released.
    struct Blocking {
        entered: mpsc::Sender<()>,
        release: mpsc::Receiver<()>,
        polled: bool,
    }

    impl Body for Blocking {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if mem::replace(&mut self.polled, true) {
                return Poll::Ready(None);
            }
            self.entered.send(()).unwrap();
            let _ = self.release.recv();
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"ahead")))))
        }

        fn is_end_stream(&self) -> bool {
            false
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(if self.polled { 0 } else { 5 })
        }
    }

    #[test]
    fn the_handler_never_waits_for_a_body_polled_on_another_thread() {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let body = Blocking {
            entered: entered_tx,
            release: release_rx,
            polled: false,
        };
        let budget = Arc::new(Budget::new(1 << 20));
        let shared = Arc::new(ReadAhead::new(body, None, 1024, Arc::clone(&budget)));
        let reader = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || shared.read_ahead(&mut Context::from_waker(Waker::noop())))
        };
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the read-ahead polls the body");
        // Releases the body after 3 s if the test has not, and says it had to: a handler that
        // waits for the read-ahead's poll fails this test instead of hanging it.
        let (stop, stopped) = mpsc::channel::<()>();
        let watchdog = {
            let release = release.clone();
            thread::spawn(move || {
                let fired = stopped.recv_timeout(Duration::from_secs(3)).is_err();
                if fired {
                    let _ = release.send(());
                }
                fired
            })
        };

        let woken = Arc::new(Flag::default());
        let waker = Waker::from(Arc::clone(&woken));
        let mut body = RequestBody {
            kind: Kind::Shared {
                shared: Arc::clone(&shared),
                own: None,
            },
        };
        let started = Instant::now();
        let poll = Pin::new(&mut body).poll_frame(&mut Context::from_waker(&waker));
        let end = body.is_end_stream();
        let hint = body.size_hint();
        let took = started.elapsed();
        let _ = stop.send(());
        let fired = watchdog.join().unwrap();
        assert!(
            !fired,
            "the handler's poll_frame, is_end_stream and size_hint returned after {took:?}, \
             only once the watchdog released the body the read-ahead was polling"
        );
        assert!(
            poll.is_pending(),
            "the body is checked out: Pending, not {poll:?}"
        );
        assert!(!end);
        assert_eq!((hint.lower(), hint.upper()), (5, Some(5)));
        assert!(!woken.is_set(), "woken before the body is back");

        release.send(()).unwrap();
        assert!(
            !reader.join().unwrap(),
            "the read-ahead stands down once the handler has polled"
        );
        assert!(woken.is_set(), "putting the body back wakes the handler");
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => assert_eq!(frame.into_data().unwrap(), "ahead"),
            other => panic!("expected the frame read ahead, got {other:?}"),
        }
        assert!(matches!(
            Pin::new(&mut body).poll_frame(&mut cx),
            Poll::Ready(None)
        ));
        drop((body, shared));
        assert_eq!(budget.held.load(Ordering::SeqCst), 0);
    }

    /// Yields `Data` frames with a `Pending` before each, then panics if `panics`, or ends.
    struct Frames {
        frames: VecDeque<&'static [u8]>,
        pending: bool,
        panics: bool,
    }

    impl Frames {
        fn new(frames: &[&'static [u8]], panics: bool) -> Self {
            Self {
                frames: frames.iter().copied().collect(),
                pending: false,
                panics,
            }
        }
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if !mem::replace(&mut self.pending, true) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.pending = false;
            match self.frames.pop_front() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data))))),
                None if self.panics => panic!("{SCRIPTED_PANIC}"),
                None => Poll::Ready(None),
            }
        }
    }

    #[test]
    fn a_body_that_panics_while_read_ahead_fails_the_handler_loudly() {
        quiet_expected_panics();
        let budget = Arc::new(Budget::new(1 << 20));
        let shared = Arc::new(ReadAhead::new(
            Frames::new(&[b"first"], true),
            None,
            1024,
            Arc::clone(&budget),
        ));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(shared.read_ahead(&mut cx), "pending");
        assert!(shared.read_ahead(&mut cx), "read `first`, then pending");
        let panic = catch_unwind(AssertUnwindSafe(|| shared.read_ahead(&mut cx))).unwrap_err();
        assert_eq!(
            message(&*panic),
            SCRIPTED_PANIC,
            "the body's panic, unchanged"
        );
        assert!(!shared.read_ahead(&mut cx), "a lost body is not read again");
        assert_eq!(budget.held.load(Ordering::SeqCst), 5);

        let mut body = RequestBody {
            kind: Kind::Shared {
                shared: Arc::clone(&shared),
                own: None,
            },
        };
        assert!(!body.is_end_stream());
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => assert_eq!(frame.into_data().unwrap(), "first"),
            other => panic!("expected the frame read ahead, got {other:?}"),
        }
        assert!(!body.is_end_stream(), "a panic is not the end of the body");
        let panic =
            catch_unwind(AssertUnwindSafe(|| Pin::new(&mut body).poll_frame(&mut cx))).unwrap_err();
        assert_eq!(message(&*panic), LOST);
        assert!(
            !shared.state.is_poisoned(),
            "no lock was held across a panic"
        );
        drop((body, shared));
        assert_eq!(budget.held.load(Ordering::SeqCst), 0);
    }

    /// Pending `n` times (waking at once), then ready.
    struct Yield(usize);

    impl Future for Yield {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 == 0 {
                return Poll::Ready(());
            }
            self.0 -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// Collects the `message` of every event, prefixed by its level and target.
    struct Events(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Events {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            let mut message = Message(String::new());
            event.record(&mut message);
            let meta = event.metadata();
            let line = format!("{} {} {}", meta.level(), meta.target(), message.0);
            self.0.lock().unwrap().push(line);
        }
    }

    #[test]
    fn a_request_that_finds_the_budget_spent_reads_no_further_and_says_so_once() {
        use http_body_util::BodyExt;
        use tracing_subscriber::layer::SubscriberExt;

        let events = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Events(Arc::clone(&events)));
        let layer = RequestBodyLayer::new().read_ahead(100).read_ahead_total(4);
        let handler = tower::service_fn(|req: Request<RequestBody<Frames>>| async move {
            Yield(20).await;
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, Infallible>(body)
        });
        let mut svc = layer.layer(handler);
        let frames: &[&[u8]] = &[b"abc", b"def", b"ghi", b"jkl"];
        let body = tracing::subscriber::with_default(subscriber, || {
            let mut future = std::pin::pin!(svc.call(Request::new(Frames::new(frames, false))));
            let mut cx = Context::from_waker(Waker::noop());
            loop {
                if let Poll::Ready(body) = future.as_mut().poll(&mut cx) {
                    break body.unwrap();
                }
            }
        });
        assert_eq!(body, "abcdefghijkl");
        let spent: Vec<_> = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.contains("budget spent"))
            .cloned()
            .collect();
        assert_eq!(
            spent,
            [
                "DEBUG tower_cancel read-ahead budget spent: the rest of this request body is not read ahead"
            ]
        );
        // `abc` (3 < 4: one more), `def` (6: spent): one frame over the budget, no more.
        assert_eq!(layer.read_ahead_peak(), 6);
        assert_eq!(layer.read_ahead_held(), 0);
    }

    #[test]
    fn the_budget_is_shared_by_clones_and_renewed_by_read_ahead_total() {
        let layer = RequestBodyLayer::new().read_ahead(10);
        let clone = layer.clone();
        let fresh = layer.clone().read_ahead_total(100);
        assert!(Arc::ptr_eq(&layer.budget, &clone.budget));
        assert!(Arc::ptr_eq(&layer.budget, &layer.layer(()).budget));
        assert!(!Arc::ptr_eq(&layer.budget, &fresh.budget));
        assert_eq!(
            layer.budget.total,
            RequestBodyLayer::DEFAULT_READ_AHEAD_TOTAL
        );
        assert_eq!(fresh.budget.total, 100);
        assert_eq!(RequestBodyLayer::DEFAULT_READ_AHEAD_TOTAL, 64 << 20);
    }
}
