//! `RequestBody`: the request body as the handler sees it, read ahead or not.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::handle::RequestCancellation;
use crate::request_body::read_ahead::{ForHandler, ReadAhead};

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
        pub(crate) kind: Kind<B>,
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

impl<B: Body> Body for RequestBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let (inner, request) = match self.project().kind.project() {
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
