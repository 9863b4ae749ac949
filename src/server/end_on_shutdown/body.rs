//! [`EndOnShutdownBody`]: a response body that ends itself when the server shuts down.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::event::TARGET;
use crate::handle::RequestCancellation;
use crate::runtime::shutdown::Draining;

/// A boxed error, as tower and axum spell it.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// Response body of [`EndOnShutdownService`](super::EndOnShutdownService): the inner body,
    /// until the server's shutdown ends it.
    ///
    /// * A server-sent event stream (`content-type: text/event-stream`, no known length)
    ///   ends cleanly: the layer's last event, if it has one, then the end of the stream
    ///   (HTTP/1.1's last chunk, HTTP/2's and HTTP/3's end of stream). Clients see a
    ///   complete stream and, for `EventSource`, reconnect (to another instance).
    /// * Any other body cannot end early without the client taking a cut response for a
    ///   whole one: it runs on through the drain, and if it is still streaming when the
    ///   request is cancelled with `Shutdown`, it fails with that
    ///   [`Cancelled`](crate::Cancelled) record, which the server turns into a reset (or a
    ///   closed HTTP/1.1 connection): the client sees an incomplete response.
    pub struct EndOnShutdownBody<B> {
        #[pin]
        inner: B,
        // `None`: nothing to watch (no `RequestCancellation`, or a cancellation for another
        // reason made the watch moot).
        watch: Option<Box<Watch>>,
        state: State,
    }
}

/// What the body watches, and how it ends.
pub(super) struct Watch {
    request: RequestCancellation,
    /// `Some`: ends cleanly, with this last frame if any.
    clean: Option<Option<Bytes>>,
    /// A clean end comes at the drain's start rather than at the grace's end.
    at_drain: bool,
    /// Made when the inner body is first pending: wakers for the two moments.
    cancelled: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    draining: Option<Draining>,
}

enum State {
    Streaming,
    /// Ending cleanly: this last frame, then the end.
    Last(Option<Bytes>),
    Done,
}

/// What the watch says about now.
enum Now {
    Stream,
    /// End cleanly, with this last frame if any.
    End(Option<Bytes>),
    /// Fail with the request's cancellation record.
    Cut,
    /// The request was cancelled for another reason: nothing left to watch.
    Moot,
}

impl Watch {
    pub(super) fn new(
        request: RequestCancellation,
        clean: Option<Option<Bytes>>,
        at_drain: bool,
    ) -> Self {
        Self {
            request,
            clean,
            at_drain,
            cancelled: None,
            draining: None,
        }
    }

    fn now(&self) -> Now {
        let scope = self.request.scope_arc();
        match scope.shut_down() {
            Some(true) => match &self.clean {
                Some(last) => Now::End(last.clone()),
                None => Now::Cut,
            },
            Some(false) => Now::Moot,
            None => match &self.clean {
                Some(last) if self.at_drain && scope.is_draining() => Now::End(last.clone()),
                _ => Now::Stream,
            },
        }
    }

    /// Parks the task's waker for the moments watched, and says which came meanwhile.
    fn park(&mut self, cx: &mut Context<'_>) -> Parked {
        let request = &self.request;
        let cancelled = self
            .cancelled
            .get_or_insert_with(|| Box::pin(request.token().clone().cancelled_owned()));
        if cancelled.as_mut().poll(cx).is_ready() {
            return Parked::TokenCancelled;
        }
        if self.clean.is_some() && self.at_drain {
            let draining = self.draining.get_or_insert_with(|| request.draining());
            if Pin::new(draining).poll(cx).is_ready() {
                return Parked::Draining;
            }
        }
        Parked::Waiting
    }
}

/// What [`Watch::park`] found.
enum Parked {
    Waiting,
    TokenCancelled,
    Draining,
}

impl<B> EndOnShutdownBody<B> {
    pub(super) fn new(inner: B, watch: Option<Watch>) -> Self {
        Self {
            inner,
            watch: watch.map(Box::new),
            state: State::Streaming,
        }
    }

    /// A body that watches nothing: the inner body as it is.
    pub fn passthrough(inner: B) -> Self {
        Self::new(inner, None)
    }

    /// The body inside.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B> Body for EndOnShutdownBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let State::Streaming = this.state {
            if let Some(watch) = this.watch.as_deref() {
                match watch.now() {
                    Now::Stream => {}
                    Now::Moot => *this.watch = None,
                    Now::End(last) => {
                        tracing::debug!(target: TARGET, "shutdown: ending a streaming response");
                        *this.state = State::Last(last);
                        *this.watch = None;
                    }
                    Now::Cut => {
                        let record = watch.request.record();
                        tracing::debug!(target: TARGET, "shutdown: cutting a response body");
                        *this.state = State::Done;
                        *this.watch = None;
                        return Poll::Ready(Some(Err(Box::new(record))));
                    }
                }
            }
        }
        match std::mem::replace(this.state, State::Done) {
            State::Done => return Poll::Ready(None),
            State::Last(Some(last)) => return Poll::Ready(Some(Ok(Frame::data(last)))),
            State::Last(None) => return Poll::Ready(None),
            State::Streaming => *this.state = State::Streaming,
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(None) => {
                *this.state = State::Done;
                *this.watch = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => {
                if let Some(watch) = this.watch.as_deref_mut() {
                    match watch.park(cx) {
                        Parked::Waiting => {}
                        // The token fired with nothing recorded: application code cancelled
                        // it directly, and the shutdown can no longer come.
                        Parked::TokenCancelled if matches!(watch.now(), Now::Stream) => {
                            *this.watch = None;
                        }
                        // A moment came while parking: look again.
                        Parked::TokenCancelled | Parked::Draining => cx.waker().wake_by_ref(),
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.state {
            State::Done => true,
            State::Last(_) => false,
            State::Streaming => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        match (&self.state, &self.watch) {
            (State::Done, _) => SizeHint::with_exact(0),
            (State::Last(last), _) => {
                SizeHint::with_exact(last.as_ref().map_or(0, |b| b.len() as u64))
            }
            // A clean end may add a last frame or stop short: only the lower bound holds.
            (State::Streaming, Some(watch)) if watch.clean.is_some() => SizeHint::new(),
            (State::Streaming, _) => inner,
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for EndOnShutdownBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndOnShutdownBody")
            .field("inner", &self.inner)
            .field("watching", &self.watch.is_some())
            .finish_non_exhaustive()
    }
}
