//! The request body an HTTP/3 handler reads.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h3::error::Code;
use http::HeaderMap;
use http_body::{Frame, SizeHint};

use crate::event::TARGET;
use crate::http3::quic::RecvHalf;
use crate::propagate::BoxError;

type Recv = h3::server::RequestStream<RecvHalf, Bytes>;

/// The error of a request body whose stream ended in the middle of a DATA frame.
const TRUNCATED: &str = "the HTTP/3 request stream ended inside a DATA frame";

/// The body of a request served by [`serve`](crate::http3::serve): the DATA frames of the
/// request stream, then its trailers, streamed as the handler reads them (`Data = Bytes`).
///
/// A client's `RESET_STREAM` shows up here as an error. Dropping the body before its end asks
/// the client to stop sending (`STOP_SENDING` with `H3_NO_ERROR`), as RFC 9114 §4.1 allows a
/// server that has what it needs.
pub struct IncomingBody {
    stream: Option<Recv>,
    state: State,
    size_hint: SizeHint,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    Trailers,
    Done,
}

impl IncomingBody {
    pub(crate) fn new(stream: Recv, headers: &HeaderMap) -> Self {
        let mut size_hint = SizeHint::new();
        let length = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if let Some(length) = length {
            size_hint = SizeHint::with_exact(length);
        }
        IncomingBody {
            stream: Some(stream),
            state: State::Data,
            size_hint,
        }
    }

    fn finish(&mut self) {
        self.state = State::Done;
        self.stream = None;
    }
}

impl http_body::Body for IncomingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(None);
        };
        if this.state == State::Data {
            match ready!(stream.poll_recv_data(cx)) {
                Ok(Some(mut data)) => {
                    let data = data.copy_to_bytes(data.remaining());
                    if let Some(left) = this.size_hint.exact() {
                        this.size_hint =
                            SizeHint::with_exact(left.saturating_sub(data.len() as u64));
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) => this.state = State::Trailers,
                Err(error) => {
                    this.finish();
                    return Poll::Ready(Some(Err(error.into())));
                }
            }
        }
        // h3 0.0.8 asserts, in the frame decoder, that no DATA payload is left over when it
        // looks for trailers; a client that ends its stream inside a DATA frame gets there.
        // The panic is contained and the body fails instead.
        let trailers = catch_unwind(AssertUnwindSafe(|| stream.poll_recv_trailers(cx)));
        let trailers = match trailers {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(trailers)) => trailers,
            Err(_) => {
                this.finish();
                tracing::debug!(target: TARGET, "HTTP/3 request body ended inside a DATA frame");
                return Poll::Ready(Some(Err(TRUNCATED.into())));
            }
        };
        this.finish();
        match trailers {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint
    }
}

impl Drop for IncomingBody {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.as_mut() {
            stream.stop_sending(Code::H3_NO_ERROR);
        }
    }
}

impl fmt::Debug for IncomingBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingBody")
            .field("ended", &(self.state == State::Done))
            .finish()
    }
}
