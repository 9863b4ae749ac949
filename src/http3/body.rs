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
use crate::http3::quic::{RecvHalf, Refuser};
use crate::propagate::BoxError;

type Recv = h3::server::RequestStream<RecvHalf, Bytes>;

/// The error of a request body whose stream ended in the middle of a DATA frame.
const TRUNCATED: &str = "the HTTP/3 request stream ended inside a DATA frame";

/// The request's `content-length`: `Ok(None)` without one, `Err` if it is not one number (RFC
/// 9110 §8.6; a list of the same number is accepted).
pub(crate) fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    let mut length = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        let value = value.to_str().map_err(|_| ())?;
        for item in value.split(',') {
            let item = item.trim();
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            let item = item.parse::<u64>().map_err(|_| ())?;
            if length.is_some_and(|length| length != item) {
                return Err(());
            }
            length = Some(item);
        }
    }
    Ok(length)
}

/// The body of a request served by [`serve`](crate::http3::serve): the DATA frames of the
/// request stream, then its trailers, streamed as the handler reads them (`Data = Bytes`).
///
/// A client's `RESET_STREAM` shows up here as an error. So does a body that does not match
/// the request's `content-length` (RFC 9114 §4.1.2: malformed), as soon as it is seen to
/// differ: the stream is then ended with `H3_MESSAGE_ERROR`, and the response is reset with it,
/// never sent. Dropping the body before its end asks the client to stop sending
/// (`STOP_SENDING` with `H3_NO_ERROR`), as RFC 9114 §4.1 allows a server that has what it
/// needs.
pub struct IncomingBody {
    stream: Option<Recv>,
    state: State,
    size_hint: SizeHint,
    /// The `content-length`, and the DATA received so far.
    expected: Option<u64>,
    received: u64,
    refuser: Option<Refuser>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    Trailers,
    Done,
}

impl IncomingBody {
    /// The body of `stream`, whose `content-length` (checked by [`content_length`]) is
    /// `expected`.
    pub(crate) fn new(stream: Recv, expected: Option<u64>, refuser: Option<Refuser>) -> Self {
        let size_hint = expected.map_or_else(SizeHint::new, SizeHint::with_exact);
        IncomingBody {
            stream: Some(stream),
            state: State::Data,
            size_hint,
            expected,
            received: 0,
            refuser,
        }
    }

    /// The body does not match its `content-length`: the stream is malformed.
    fn mismatch(&mut self, what: &str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let code = Code::H3_MESSAGE_ERROR;
        if let Some(refuser) = &self.refuser {
            refuser.refuse(code.value());
        }
        if let Some(stream) = self.stream.as_mut() {
            stream.stop_sending(code);
        }
        self.state = State::Done;
        self.stream = None;
        let expected = self.expected.unwrap_or_default();
        tracing::debug!(target: TARGET, expected, what, "HTTP/3 request body does not match its content-length");
        let error = format!(
            "HTTP/3 request body malformed (H3_MESSAGE_ERROR): content-length {expected}, {what}"
        );
        Poll::Ready(Some(Err(error.into())))
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
                    this.received = this.received.saturating_add(data.len() as u64);
                    if this
                        .expected
                        .is_some_and(|expected| this.received > expected)
                    {
                        return this.mismatch("more DATA than that");
                    }
                    if let Some(left) = this.size_hint.exact() {
                        this.size_hint =
                            SizeHint::with_exact(left.saturating_sub(data.len() as u64));
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) => {
                    if this
                        .expected
                        .is_some_and(|expected| this.received < expected)
                    {
                        let received = this.received;
                        return this.mismatch(&format!("only {received} bytes of DATA"));
                    }
                    this.state = State::Trailers;
                }
                Err(error) => {
                    this.finish();
                    return Poll::Ready(Some(Err(error.into())));
                }
            }
        }
        // h3 0.0.8 asserts, in the frame decoder, that no DATA payload is left over when it
        // looks for trailers. A client that ends its stream inside a DATA frame got there; the
        // frame filter (`frames.rs`) now ends such a stream before h3 sees its end, so this
        // cannot be reached from the wire. It stays as a second line for a build that unwinds
        // (with `panic = "abort"` it could not help): the body fails instead.
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
