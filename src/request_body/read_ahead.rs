//! The read-ahead: a request body shared by the handler and the response future, polled
//! outside the lock that guards its bookkeeping, and the layer-wide budget it reads within.
//!
//! Two parties poll one body: the response future (reading ahead while the handler is pending)
//! and the handler. They share it through [`ReadAhead`], whose lock guards only the crate's own
//! bookkeeping: the body is *checked out* of it to be polled, outside the lock, and put back
//! afterwards, so no user code (the body's `poll_frame`, `is_end_stream`, `size_hint`, the
//! `Drop` of its frames, data or errors) ever runs while the lock is held.

use std::fmt;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

use crate::event::TARGET;
use crate::handle::RequestCancellation;
use crate::loom::{Mutex, MutexGuard, lock};
use crate::request_body::buffer::{Buffer, Tail};

/// The read-ahead budget of a layer, shared by its clones and every request they serve.
#[derive(Debug)]
pub(crate) struct Budget {
    /// Bytes of memory now held in read-ahead buffers.
    pub(crate) held: AtomicUsize,
    /// The highest `held` so far.
    pub(crate) peak: AtomicUsize,
    /// A request reads a frame ahead only while `held < total`. Set by every clone of the layer
    /// alike ([`RequestBodyLayer::read_ahead_total`](super::RequestBodyLayer::read_ahead_total)).
    pub(crate) total: AtomicUsize,
    /// Set once a request without a `CancellationLayer` outside was reported.
    pub(crate) reported_no_scope: AtomicBool,
}

impl Budget {
    pub(crate) fn new(total: usize) -> Self {
        Self {
            held: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            total: AtomicUsize::new(total),
            reported_no_scope: AtomicBool::new(false),
        }
    }

    pub(crate) fn spent(&self) -> bool {
        self.held.load(Ordering::Acquire) >= self.total()
    }

    pub(crate) fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Takes up to `want` bytes of what is left, at once (a compare-and-swap: requests reading
    /// at the same moment on other threads cannot take the same bytes), and returns how many.
    /// The request counts them as its own ([`Held::adopt`]) once it holds its lock.
    pub(crate) fn reserve(&self, want: usize) -> usize {
        let mut granted = 0;
        let taken = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                granted = want.min(self.total().saturating_sub(held));
                (granted > 0).then_some(held + granted)
            });
        match taken {
            Ok(before) => {
                self.peak.fetch_max(before + granted, Ordering::AcqRel);
                granted
            }
            Err(_) => 0,
        }
    }
}

/// The memory one request holds in its read-ahead buffer, counted in its layer's budget, and
/// given back when the request's state is dropped, however the request ends.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) budget: Arc<Budget>,
    pub(crate) bytes: usize,
}

impl Held {
    pub(crate) fn new(budget: Arc<Budget>) -> Self {
        Self { budget, bytes: 0 }
    }

    pub(crate) fn add(&mut self, bytes: usize) {
        self.bytes += bytes;
        let now = self.budget.held.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.budget.peak.fetch_max(now, Ordering::AcqRel);
    }

    /// Counts `bytes` the request reserved with [`Budget::reserve`] as its own.
    pub(crate) fn adopt(&mut self, bytes: usize) {
        self.bytes += bytes;
    }

    pub(crate) fn release(&mut self, bytes: usize) {
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

/// What the handler's `poll_frame` gets for a body of type `B`: its data as `Bytes`.
pub(crate) type PollFrame<B> = Poll<Option<Result<Frame<Bytes>, <B as Body>::Error>>>;

/// What `Body::poll_frame` of `B` itself returns.
type PollInner<B> = Poll<Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>>;

/// A frame of `B` with its data as `Bytes` (no copy when the data already is `Bytes`).
pub(crate) fn into_bytes<D: Buf>(frame: Frame<D>) -> Frame<Bytes> {
    frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
}

/// What the handler's poll gets from [`ReadAhead`]: a frame, the end, an error or `Pending`;
/// or the body itself, to poll from then on (the read-ahead is over for good).
pub(crate) enum ForHandler<B: Body> {
    Poll(PollFrame<B>),
    Body(Pin<Box<B>>),
}

/// The message of the panic of a handler that polls a body whose read-ahead panicked.
pub(crate) const LOST: &str = "the request body panicked while it was read ahead";

/// A request body shared by the handler and the read-ahead in the response future.
///
/// The lock guards the bookkeeping only; the body is polled outside it (see [`CheckedOut`]),
/// and frames and errors leave the lock before they are dropped.
pub(crate) struct ReadAhead<B: Body> {
    pub(crate) state: Mutex<State<B>>,
    pub(crate) request: Option<RequestCancellation>,
    pub(crate) limit: usize,
}

/// Where the body is.
pub(crate) enum BodyAt<B> {
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
pub(crate) struct Hints {
    pub(crate) end: bool,
    pub(crate) size: SizeHint,
}

impl Hints {
    pub(crate) fn of<B: Body>(body: &B) -> Self {
        Self {
            end: body.is_end_stream(),
            size: body.size_hint(),
        }
    }
}

pub(crate) struct State<B: Body> {
    pub(crate) body: BodyAt<B>,
    /// What was read ahead, not yet handed to the handler.
    pub(crate) buffer: Buffer,
    /// The memory `buffer` holds, counted in the layer's budget.
    pub(crate) held: Held,
    /// The body ended (`None`) or failed, while reading ahead; handed over after `frames`.
    pub(crate) end: Option<Option<B::Error>>,
    /// The handler polled the body: reading ahead is over.
    pub(crate) handler_started: bool,
    /// The handler, waiting for the read-ahead to put the body back.
    pub(crate) handler_waker: Option<Waker>,
    /// The body's hints, cached by whoever polled it last (user code stays out of the lock).
    pub(crate) hints: Hints,
}

impl<B: Body> State<B> {
    /// Counts what the buffer holds now in the budget (after the read-ahead put it back).
    fn charge(&mut self) {
        let (memory, charged) = (self.buffer.memory(), self.held.bytes);
        if memory > charged {
            self.held.add(memory - charged);
        } else {
            self.held.release(charged - memory);
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        if !self.buffer.is_empty() {
            return false;
        }
        match (&self.end, &self.body) {
            (Some(None), _) => true,
            // An error, or the panic, is still to be reported.
            (Some(Some(_)), _) | (None, BodyAt::Lost) => false,
            (None, _) => self.hints.end,
        }
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        let inner = self.hints.size;
        let buffered = self.buffer.len as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(buffered));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(buffered));
        }
        hint
    }
}

impl<B: Body> ReadAhead<B> {
    pub(crate) fn new(
        body: B,
        request: Option<RequestCancellation>,
        limit: usize,
        budget: Arc<Budget>,
    ) -> Self {
        // The hints are taken here, before the body is shared; then by whoever polls it.
        let hints = Hints::of(&body);
        Self {
            state: Mutex::new(State {
                body: BodyAt::Here(Box::pin(body)),
                buffer: Buffer::new(),
                held: Held::new(budget),
                end: None,
                handler_started: false,
                handler_waker: None,
                hints,
            }),
            request,
            limit,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State<B>> {
        // The body is polled, and asked for its hints, checked out of it; frames and errors
        // are moved out before they are dropped.
        lock(&self.state)
    }

    pub(crate) fn disconnected(&self) {
        if let Some(request) = &self.request {
            request.client_left();
        }
    }

    /// Reads ahead with the response future's waker. Returns `false` once there is nothing
    /// more to do (the handler took over, the body ended or failed or sent its trailers, the
    /// buffer is full, or the layer's budget is spent).
    pub(crate) fn read_ahead(&self, cx: &mut Context<'_>) -> bool {
        loop {
            let (body, tail, room, budget) = {
                let mut state = self.lock();
                let over = state.end.is_some() || state.buffer.trailers.is_some();
                if state.handler_started || over || state.buffer.len >= self.limit {
                    return false;
                }
                let budget = Arc::clone(&state.held.budget);
                if budget.spent() {
                    let (held, total) = (budget.held.load(Ordering::Relaxed), budget.total());
                    drop(state);
                    tracing::debug!(
                        target: TARGET,
                        held,
                        total,
                        "read-ahead budget spent: the rest of this request body is not read ahead",
                    );
                    return false;
                }
                let body = match mem::replace(&mut state.body, BodyAt::Out) {
                    BodyAt::Here(body) => body,
                    // Lost: an earlier read-ahead panicked. (`Out` and `Handler` need the
                    // handler to have polled, and then `handler_started` is set.)
                    other => {
                        state.body = other;
                        return false;
                    }
                };
                // What this request may still read ahead, no more than the body says it has
                // left: new blocks are no larger (but to hold a frame), so a small body gets a
                // small block.
                let left = state.hints.size.upper().map_or(usize::MAX, |upper| {
                    usize::try_from(upper).unwrap_or(usize::MAX)
                });
                let room = (self.limit - state.buffer.len).min(left);
                (body, state.buffer.check_out(), room, budget)
            };
            let mut out = CheckedOut {
                shared: self,
                body: Some(body),
                tail: Some(tail),
                reserved: 0,
            };
            let (poll, hints) = out.poll(cx);
            // The copy (`Buf` is user code) and the frame's drop run outside the lock, with
            // the body checked out.
            let mut trailers = None;
            let done = match poll {
                Poll::Ready(Some(Ok(frame))) => {
                    match frame.into_data() {
                        Ok(data) => out.copy(data, room, &budget),
                        Err(frame) => trailers = frame.into_trailers().ok(),
                    }
                    None
                }
                Poll::Pending => Some((true, None)),
                Poll::Ready(None) => Some((false, Some(None))),
                Poll::Ready(Some(Err(error))) => Some((false, Some(Some(error)))),
            };
            let mut state = self.lock();
            let waker = out.put_back(&mut state, hints);
            let failed = matches!(done, Some((_, Some(Some(_)))));
            let more = match done {
                None => {
                    // A frame that is neither data nor trailers is dropped; trailers end it.
                    state.buffer.trailers = trailers;
                    None
                }
                Some((more, end)) => {
                    if end.is_some() {
                        state.end = end;
                    }
                    Some(more)
                }
            };
            state.charge();
            drop(state);
            if let Some(waker) = waker {
                waker.wake();
            }
            if failed {
                self.disconnected();
            }
            if let Some(more) = more {
                return more;
            }
        }
    }

    /// The handler reads: first what was read ahead, then the body itself, which it takes
    /// over (once the handler has polled, the read-ahead never polls again).
    pub(crate) fn poll_for_handler(&self, cx: &mut Context<'_>) -> ForHandler<B> {
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
    pub(crate) fn try_for_handler(
        &self,
        cx: &mut Context<'_>,
        waker: &mut Option<Waker>,
    ) -> Option<ForHandler<B>> {
        let mut state = self.lock();
        state.handler_started = true;
        if let Some((data, memory)) = state.buffer.pop_data() {
            state.held.release(memory);
            return Some(ForHandler::Poll(Poll::Ready(Some(Ok(Frame::data(data))))));
        }
        if let Some(trailers) = state.buffer.trailers.take() {
            return Some(ForHandler::Poll(Poll::Ready(Some(Ok(Frame::trailers(
                trailers,
            ))))));
        }
        if let Some(end) = state.end.take() {
            // An error is reported once; the body is over after it.
            state.end = Some(None);
            return Some(ForHandler::Poll(Poll::Ready(end.map(Err))));
        }
        match mem::replace(&mut state.body, BodyAt::Handler) {
            BodyAt::Here(body) => Some(ForHandler::Body(body)),
            BodyAt::Out => {
                // The read-ahead is polling it: whoever puts it back wakes the handler.
                state.body = BodyAt::Out;
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
            BodyAt::Lost => {
                state.body = BodyAt::Lost;
                drop(state);
                panic!("{LOST}");
            }
            BodyAt::Handler => {
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

/// The body (and the buffer's tail), checked out of the state and polled (and filled) by the
/// read-ahead outside the lock. Put back with [`put_back`](Self::put_back); dropped without
/// that (its poll, a hint or the frame's data panicked), it marks the body lost and wakes a
/// waiting handler, whose poll then panics with [`LOST`] instead of returning a truncated body.
pub(crate) struct CheckedOut<'a, B: Body> {
    pub(crate) shared: &'a ReadAhead<B>,
    pub(crate) body: Option<Pin<Box<B>>>,
    pub(crate) tail: Option<Tail>,
    /// Budget reserved for the copy, counted as the request's when put back.
    pub(crate) reserved: usize,
}

impl<B: Body> CheckedOut<'_, B> {
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> (PollInner<B>, Hints) {
        let body = self.body.as_mut().expect("checked out");
        let poll = body.as_mut().poll_frame(cx);
        (poll, Hints::of(&**body))
    }

    /// Copies a frame's data into the tail. The new block it needs is reserved in `budget`
    /// first, at once, so that requests reading at the same moment cannot all take the room
    /// that is left; without room, the block holds just the frame (one frame over the budget).
    fn copy(&mut self, data: B::Data, room: usize, budget: &Budget) {
        let tail = self.tail.as_mut().expect("checked out");
        let spare = tail.spare();
        let needed = tail.block_for(data.remaining(), room);
        // Most frames fit in the block being filled: no new block, nothing to reserve.
        if needed > 0 {
            self.reserved = budget.reserve(needed);
        }
        tail.copy(data, room.min(spare + self.reserved));
    }

    /// Puts the body and the tail back into the locked state, with the body's new hints and
    /// what was copied into the tail; returns the waker of a handler waiting for them, to be
    /// woken once the lock is released.
    pub(crate) fn put_back(mut self, state: &mut State<B>, hints: Hints) -> Option<Waker> {
        if let Some(body) = self.body.take() {
            state.body = BodyAt::Here(body);
        }
        if let Some(tail) = self.tail.take() {
            state.buffer.put_back(tail);
        }
        state.held.adopt(mem::take(&mut self.reserved));
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
            state.body = BodyAt::Lost;
            if let Some(tail) = self.tail.take() {
                // What it holds was copied before the panic, in order: the handler gets it.
                state.buffer.put_back(tail);
            }
            state.held.adopt(mem::take(&mut self.reserved));
            state.charge();
            state.handler_waker.take()
        };
        drop(body);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}
