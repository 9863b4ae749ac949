//! `RequestBody`: the request body as the handler sees it, read ahead or not.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::handle::RequestCancellation;
use crate::request_body::idle::{BoxError, IdleClock};
use crate::request_body::rate::RateClock;
use crate::request_body::read_ahead::{ForHandler, PollFrame, ReadAhead, into_bytes};

pin_project! {
    /// The request body as the handler behind [`RequestBodyLayer`] sees it: the original
    /// body's bytes and trailers, in order, whether or not some were read ahead. Its data is
    /// [`Bytes`](bytes::Bytes) whatever the original body's data type (hyper's, axum's and
    /// HTTP/3's already are: they pass unchanged). Bytes that were read ahead come in chunks of
    /// the read-ahead's own (copied out of the frames that carried them, so that what is held
    /// is what is counted), not in the frames' original sizes.
    ///
    /// # Errors
    ///
    /// The error type is a box (as `tower::BoxError`): it holds the original body's error,
    /// unchanged (`error.downcast_ref::<hyper::Error>()` finds hyper's), or, with an
    /// [`idle_timeout`], an [`IdleTimeout`]. After an `IdleTimeout` the body is over: it
    /// yields `None` and never polls the original body again.
    ///
    /// # Panics
    ///
    /// If the original body panicked while it was read ahead (the panic then unwound through
    /// the response future, where the server reports it), polling this body after the frames
    /// read before the panic panics with "the request body panicked while it was read ahead",
    /// rather than ending the body early.
    ///
    /// [`RequestBodyLayer`]: crate::request_body::RequestBodyLayer
    /// [`IdleTimeout`]: crate::request_body::IdleTimeout
    /// [`idle_timeout`]: crate::request_body::RequestBodyLayer::idle_timeout
    pub struct RequestBody<B: Body> {
        #[pin]
        pub(crate) kind: Kind<B>,
        // With an idle timeout only.
        pub(crate) idle: Option<IdleClock>,
        // With a minimum rate only.
        pub(crate) rate: Option<RateClock>,
    }
}

pin_project! {
    #[project = KindProj]
    pub(crate) enum Kind<B: Body> {
        Direct { #[pin] inner: B, request: Option<RequestCancellation> },
        // `own`: the body, once the handler has taken it over from the read-ahead (see
        // `ReadAhead::poll_for_handler`).
        Shared { shared: Arc<ReadAhead<B>>, own: Option<Pin<Box<B>>> },
    }
}

impl<B: Body> Kind<B> {
    fn request(&self) -> Option<&RequestCancellation> {
        match self {
            Kind::Direct { request, .. } => request.as_ref(),
            Kind::Shared { shared, .. } => shared.request.as_ref(),
        }
    }

    /// The next frame for the handler: read ahead, or from the body itself.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> PollFrame<B> {
        let (inner, request) = match self.project() {
            KindProj::Direct { inner, request } => (inner, request.as_ref()),
            KindProj::Shared { shared, own } => {
                if own.is_none() {
                    match shared.poll_for_handler(cx) {
                        ForHandler::Poll(poll) => return poll,
                        ForHandler::Body(body) => *own = Some(body),
                    }
                }
                let inner = own.as_mut().expect("handed over").as_mut();
                (inner, shared.request.as_ref())
            }
        };
        let poll = inner.poll_frame(cx);
        if let (Poll::Ready(Some(Err(_))), Some(request)) = (&poll, request) {
            request.client_left();
        }
        poll.map(|next| next.map(|frame| frame.map(into_bytes)))
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if this.idle.is_none() && this.rate.is_none() {
            return this.kind.poll_next(cx).map_err(Into::into);
        }
        if this.idle.as_ref().is_some_and(IdleClock::expired)
            || this.rate.as_ref().is_some_and(RateClock::expired)
        {
            return Poll::Ready(None);
        }
        match this.kind.as_mut().poll_next(cx) {
            Poll::Ready(next) => {
                if let Some(idle) = this.idle.as_mut() {
                    idle.stop();
                }
                if let Some(rate) = this.rate.as_mut() {
                    let bytes = match &next {
                        Some(Ok(frame)) => frame.data_ref().map_or(0, Bytes::len),
                        _ => 0,
                    };
                    rate.stop(bytes);
                }
                Poll::Ready(next.map(|next| next.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle.as_mut().map(|idle| idle.poll_wait(cx));
                let rate = this.rate.as_mut().map(|rate| rate.poll_wait(cx));
                let error: BoxError = match (idle, rate) {
                    (Some(Poll::Ready(timeout)), _) => timeout.into(),
                    (_, Some(Poll::Ready(slow))) => slow.into(),
                    _ => return Poll::Pending,
                };
                if let Some(request) = this.kind.as_ref().get_ref().request() {
                    request.body_timed_out();
                }
                Poll::Ready(Some(Err(error)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.expired_clock() {
            return true;
        }
        match &self.kind {
            Kind::Direct { inner, .. } => inner.is_end_stream(),
            Kind::Shared {
                own: Some(body), ..
            } => body.is_end_stream(),
            Kind::Shared { shared, own: None } => shared.lock().is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.expired_clock() {
            return SizeHint::with_exact(0);
        }
        match &self.kind {
            Kind::Direct { inner, .. } => inner.size_hint(),
            Kind::Shared {
                own: Some(body), ..
            } => body.size_hint(),
            Kind::Shared { shared, own: None } => shared.lock().size_hint(),
        }
    }
}

impl<B: Body> RequestBody<B> {
    /// The idle timeout or the minimum rate ran out: the body is over.
    fn expired_clock(&self) -> bool {
        self.idle.as_ref().is_some_and(IdleClock::expired)
            || self.rate.as_ref().is_some_and(RateClock::expired)
    }
}

impl<B: Body> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let read_ahead = matches!(self.kind, Kind::Shared { .. });
        f.debug_struct("RequestBody")
            .field("read_ahead", &read_ahead)
            .field("idle", &self.idle)
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}
