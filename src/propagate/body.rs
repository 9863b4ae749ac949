//! `PropagateBody`: the outbound response's body, ended with an error if the inbound request is
//! cancelled while it streams.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::propagate::Watch;
use crate::propagate::error::BoxError;
use crate::server::body::ends_body;

pin_project! {
    /// Response body of [`PropagateService`]: the outbound response's body, dropped (and ended with
    /// an [`InboundCancelled`] error) if the inbound request is cancelled while it streams.
    #[derive(Debug)]
    pub struct PropagateBody<B> {
        #[pin]
        pub(crate) inner: Option<B>,
        pub(crate) watch: Option<Watch>,
    }
}

impl<B> Body for PropagateBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if let Some(watch) = this.watch.as_mut() {
            if let Poll::Ready(cancelled) = watch.poll(cx) {
                this.inner.set(None);
                *this.watch = None;
                return Poll::Ready(Some(Err(Box::new(cancelled))));
            }
        }
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(inner.poll_frame(cx));
        let over = match &frame {
            None | Some(Err(_)) => true,
            Some(Ok(frame)) => this
                .inner
                .as_ref()
                .as_pin_ref()
                .is_some_and(|body| ends_body(frame, &*body)),
        };
        if over {
            // The call is over: a later cancellation of the inbound request changes nothing.
            *this.watch = None;
        }
        if frame.is_none() {
            this.inner.set(None);
        }
        Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;
    use crate::handle::RequestCancellation;

    /// The handle of an inbound request, armed, for a layer with no callbacks.
    fn inbound() -> RequestCancellation {
        RequestCancellation::for_test()
    }

    /// A body that has ended is not turned into an error by a later cancellation.
    #[test]
    fn a_cancellation_after_the_body_ended_changes_nothing() {
        use std::pin::pin;
        use std::task::Waker;

        use bytes::Bytes;
        use http_body_util::Full;

        let inbound = inbound();
        let mut body = pin!(PropagateBody {
            inner: Some(Full::new(Bytes::from_static(b"all of it"))),
            watch: Watch::new(Some(inbound.clone())),
        });
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert!(body.is_end_stream());
        inbound.token().cancel();
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(None)
        ));
    }

    /// A body whose last frame is a trailers frame (as gRPC's are) has ended with it, even if
    /// it never says `is_end_stream`: the consumer stops there, and a later cancellation does
    /// not turn the finished call into an error.
    #[test]
    fn a_body_ends_with_its_trailers() {
        use std::pin::pin;
        use std::task::Waker;

        use bytes::Bytes;
        use http_body_util::StreamBody;

        let inbound = inbound();
        let frames: [Result<Frame<Bytes>, std::convert::Infallible>; 2] = [
            Ok(Frame::data(Bytes::from_static(b"message"))),
            Ok(Frame::trailers(HeaderMap::new())),
        ];
        let mut body = pin!(PropagateBody {
            inner: Some(StreamBody::new(futures_util::stream::iter(frames))),
            watch: Watch::new(Some(inbound.clone())),
        });
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..2 {
            assert!(matches!(
                body.as_mut().poll_frame(&mut cx),
                Poll::Ready(Some(Ok(_)))
            ));
        }
        assert!(!body.is_end_stream(), "the stream itself never says so");
        inbound.token().cancel();
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(None)
        ));
    }
}
