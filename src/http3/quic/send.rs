//! The response direction of a request stream.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h3::error::Code;
use h3::quic::{self, StreamErrorIncoming, StreamId, WriteBuf};

use super::codes::{code, stream_id, write_error};
use super::watch::Signal;

/// The response direction of a request stream.
pub(crate) struct SendHalf {
    stream: quinn::SendStream,
    writing: Option<WriteBuf<Bytes>>,
    /// Finished or reset: dropping it leaves it as it is.
    closed: bool,
    signal: Arc<Signal>,
}

impl SendHalf {
    pub(super) fn new(stream: quinn::SendStream, signal: Arc<Signal>) -> Self {
        SendHalf {
            stream,
            writing: None,
            closed: false,
            signal,
        }
    }

    /// The request was refused (malformed, or over a bound): the response is reset with that
    /// code instead of being written.
    fn refused(&mut self) -> Result<(), StreamErrorIncoming> {
        let Some(error_code) = self.signal.refused() else {
            return Ok(());
        };
        if !self.closed {
            self.closed = true;
            let _ = self.stream.reset(code(error_code));
        }
        Err(StreamErrorIncoming::StreamTerminated { error_code })
    }
}

impl Drop for SendHalf {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if let Some(refused) = self.signal.refused() {
            let _ = self.stream.reset(code(refused));
        } else if self.signal.claimed.load(Ordering::Acquire) {
            // quinn would finish it: a response cut short would look complete.
            let _ = self.stream.reset(code(Code::H3_REQUEST_CANCELLED.value()));
        }
    }
}

impl quic::SendStream<Bytes> for SendHalf {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.refused()?;
        while let Some(buf) = self.writing.as_mut() {
            if !buf.has_remaining() {
                self.writing = None;
                break;
            }
            let written = ready!(Pin::new(&mut self.stream).poll_write(cx, buf.chunk()))
                .map_err(write_error)?;
            buf.advance(written);
        }
        Poll::Ready(Ok(()))
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.refused()?;
        if self.writing.is_some() {
            return Err(StreamErrorIncoming::Unknown(
                "send_data before the previous write was flushed".into(),
            ));
        }
        self.writing = Some(data.into());
        Ok(())
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        ready!(self.poll_ready(cx))?;
        self.closed = true;
        Poll::Ready(
            self.stream
                .finish()
                .map_err(|closed| StreamErrorIncoming::Unknown(Box::new(closed))),
        )
    }

    fn reset(&mut self, reset_code: u64) {
        self.closed = true;
        let _ = self.stream.reset(code(reset_code));
    }

    fn send_id(&self) -> StreamId {
        stream_id(self.stream.id())
    }
}
