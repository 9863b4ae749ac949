//! The request direction of a request stream: every byte goes through the frame
//! [`Filter`] before h3 sees it, and the request head has a deadline.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h3::error::Code;
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId};
use tokio::time::Sleep;

use super::codes::{code, connection_error, stream_id};
use super::watch::{Shared, Signal, lock};
use crate::event::TARGET;
use crate::http3::frames::{Filter, Violation};

/// The buffer the request body is read into: chunks are split off it without a copy, and a
/// new one is made when less than `READ_MIN` is left.
const READ_CHUNK: usize = 16 * 1024;
const READ_MIN: usize = 1024;
/// The most read at once while the request head is read, copied to a buffer of its own size:
/// what a stream holds before its request is claimed is what it sent, nothing more.
const HEAD_READ: usize = 4 * 1024;

/// What bounds a request stream before its request is handled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecvLimits {
    /// The bound on a request head, and on any frame but DATA ([`Filter`]).
    pub(crate) max_head: u64,
    /// How long a stream may take to deliver its request head.
    pub(crate) header_timeout: Duration,
}

/// Why this side ended a request stream.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// Stream error: `STOP_SENDING` and `RESET_STREAM` with this code.
    Refused(Code, &'static str),
    /// Connection error `H3_FRAME_ERROR`: the stream ended inside a frame.
    Truncated,
}

/// The error h3 (and the handler reading the body) gets for a stream this side refused.
#[derive(Debug)]
struct Refused(Code, &'static str);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP/3 request stream refused ({}): {}", self.0, self.1)
    }
}

impl std::error::Error for Refused {}

/// The request direction of a request stream.
pub(crate) struct RecvHalf {
    stream: quinn::RecvStream,
    /// Closed with `H3_FRAME_ERROR` when the stream ends inside a frame.
    conn: quinn::Connection,
    buffer: BytesMut,
    filter: Filter,
    /// Filtered bytes not yet handed to h3.
    ready: VecDeque<Bytes>,
    /// Set until the request head is complete; the stream is refused when it passes.
    deadline: Option<Pin<Box<Sleep>>>,
    /// The stream ended cleanly (after `ready` is drained: the end of the body).
    ended: bool,
    failed: Option<Failure>,
    signal: Arc<Signal>,
    /// The code of the client's `RESET_STREAM`, once read, and whether it was signalled to the
    /// request task: every read after it fails with it (quinn would report a clean end, and h3
    /// a complete body), a signalled one once the task has seen it.
    reset: Option<(u64, bool)>,
    /// Held for its `Drop`.
    _entry: Entry,
}

/// Removes the stream's [`Watch`](super::Watch) if nobody took it.
pub(super) struct Entry {
    pub(super) id: u64,
    pub(super) streams: Weak<Shared>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(streams) = self.streams.upgrade() {
            // Dropped outside the lock: a boxed future's drop is not ours to run under it.
            let watch = lock(&streams.watches).remove(&self.id);
            drop(watch);
        }
    }
}

impl RecvHalf {
    pub(super) fn new(
        stream: quinn::RecvStream,
        conn: quinn::Connection,
        signal: Arc<Signal>,
        limits: RecvLimits,
        entry: Entry,
    ) -> Self {
        RecvHalf {
            stream,
            conn,
            buffer: BytesMut::new(),
            filter: Filter::new(limits.max_head),
            ready: VecDeque::new(),
            deadline: Some(Box::pin(tokio::time::sleep(limits.header_timeout))),
            ended: false,
            failed: None,
            signal,
            reset: None,
            _entry: entry,
        }
    }

    /// Ends the stream (or, for a truncated one, the connection) and fails this read and
    /// every later one.
    fn fail(&mut self, failure: Failure) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        if self.failed.is_none() {
            self.ready.clear();
            match failure {
                Failure::Refused(error_code, why) => {
                    tracing::debug!(target: TARGET, code = %error_code, why, "HTTP/3 request stream refused");
                    self.signal.refuse(error_code.value());
                    let _ = self.stream.stop(code(error_code.value()));
                }
                Failure::Truncated => {
                    tracing::debug!(target: TARGET, "HTTP/3 request stream ended inside a frame");
                    let frame_error = Code::H3_FRAME_ERROR;
                    self.conn.close(
                        code(frame_error.value()),
                        b"request stream ended inside a frame",
                    );
                }
            }
            self.failed = Some(failure);
        }
        Poll::Ready(Err(match failure {
            Failure::Refused(code, why) => {
                StreamErrorIncoming::Unknown(Box::new(Refused(code, why)))
            }
            Failure::Truncated => StreamErrorIncoming::ConnectionErrorIncoming {
                connection_error: ConnectionErrorIncoming::ApplicationClose {
                    error_code: Code::H3_FRAME_ERROR.value(),
                },
            },
        }))
    }

    fn violation(
        &mut self,
        violation: Violation,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.fail(match violation {
            Violation::TooLarge => Failure::Refused(
                Code::H3_EXCESSIVE_LOAD,
                "a frame, or the request head, over the bound",
            ),
            Violation::Truncated => Failure::Truncated,
        })
    }

    /// One read from quinn: `None` at the stream's end.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, quinn::ReadError>> {
        if self.filter.in_head() {
            let mut head = [0u8; HEAD_READ];
            let n = ready!(self.stream.poll_read(cx, &mut head))?;
            return Poll::Ready(Ok((n > 0).then(|| Bytes::copy_from_slice(&head[..n]))));
        }
        if self.buffer.len() < READ_MIN {
            self.buffer = BytesMut::zeroed(READ_CHUNK);
        }
        let n = ready!(self.stream.poll_read(cx, &mut self.buffer))?;
        Poll::Ready(Ok((n > 0).then(|| self.buffer.split_to(n).freeze())))
    }
}

impl quic::RecvStream for RecvHalf {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        if let Some((error_code, signalled)) = self.reset {
            if signalled && !self.signal.observed.load(Ordering::Acquire) {
                *lock(&self.signal.reader) = Some(cx.waker().clone());
                if !self.signal.observed.load(Ordering::Acquire) {
                    return Poll::Pending;
                }
            }
            return Poll::Ready(Err(StreamErrorIncoming::StreamTerminated { error_code }));
        }
        if let Some(failure) = self.failed {
            return self.fail(failure);
        }
        let mut filtered = Vec::new();
        loop {
            if let Some(chunk) = self.ready.pop_front() {
                return Poll::Ready(Ok(Some(chunk)));
            }
            if self.ended {
                return Poll::Ready(Ok(None));
            }
            let read = match self.poll_read(cx) {
                Poll::Ready(read) => read,
                Poll::Pending => {
                    let late = self
                        .deadline
                        .as_mut()
                        .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                    if late {
                        let why = "the request head did not arrive in time";
                        return self.fail(Failure::Refused(Code::H3_REQUEST_REJECTED, why));
                    }
                    return Poll::Pending;
                }
            };
            match read {
                Ok(Some(chunk)) => {
                    if let Err(violation) = self.filter.feed(&chunk, &mut filtered) {
                        return self.violation(violation);
                    }
                    self.ready.extend(filtered.drain(..));
                    if !self.filter.in_head() {
                        self.deadline = None;
                    }
                }
                Ok(None) => {
                    if let Err(violation) = self.filter.end() {
                        return self.violation(violation);
                    }
                    self.ended = true;
                }
                Err(quinn::ReadError::Reset(reset_code)) => {
                    let reset_code = reset_code.into_inner();
                    // Any code but H3_NO_ERROR: the client gave up, and the request task drops
                    // the handler on this signal. The reader waits until the task has seen it
                    // (h3 may read on over buffered frames, so one `Pending` would not hold it
                    // back).
                    let signalled = reset_code != Code::H3_NO_ERROR.value();
                    self.reset = Some((reset_code, signalled));
                    if signalled {
                        self.signal.reset.store(reset_code, Ordering::Release);
                        self.signal.notify.notify_one();
                    }
                    return self.poll_data(cx);
                }
                Err(quinn::ReadError::ConnectionLost(error)) => {
                    return Poll::Ready(Err(StreamErrorIncoming::ConnectionErrorIncoming {
                        connection_error: connection_error(error),
                    }));
                }
                Err(other) => {
                    return Poll::Ready(Err(StreamErrorIncoming::Unknown(Box::new(other))));
                }
            }
        }
    }

    fn stop_sending(&mut self, error_code: u64) {
        let _ = self.stream.stop(code(error_code));
    }

    fn recv_id(&self) -> StreamId {
        stream_id(self.stream.id())
    }
}
