//! The `h3::quic` backend over quinn, for request streams only.
//!
//! h3's own traits have no way to learn that the client sent `STOP_SENDING` while nothing is
//! being written (a handler still thinking, a body waiting on its source): the error only shows
//! on the next write. quinn has the signal, `SendStream::stopped()`, a `'static` future taken
//! from `&self`. So this backend accepts the request streams itself, takes that future for
//! each one and files it in [`Streams`] under the stream's id, where the request task picks it
//! up. The unidirectional streams (control, QPACK) and the opener are h3-quinn's, unchanged.
//!
//! Two more duties sit here because only the stream halves see them:
//! - a send half dropped before it was finished or reset is *reset* (`H3_REQUEST_CANCELLED`),
//!   never finished: quinn finishes a dropped stream, which would present a truncated response
//!   to the client as complete;
//! - a `RESET_STREAM` on the request body (other than `H3_NO_ERROR`) wakes the request task,
//!   which treats it like `STOP_SENDING`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use h3::error::Code;
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use quinn::VarInt;
use tokio::sync::Notify;
use tokio_util::sync::ReusableBoxFuture;

/// The buffer a request stream reads into: chunks are split off it without a copy, and a new
/// one is made when less than `READ_MIN` is left.
const READ_CHUNK: usize = 16 * 1024;
const READ_MIN: usize = 1024;

/// No `RESET_STREAM` yet: above every QUIC error code (those are varints, below 2^62).
const NO_RESET: u64 = u64::MAX;

type Stopped = Pin<Box<dyn Future<Output = Result<Option<VarInt>, quinn::StoppedError>> + Send>>;
type Accepted = Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>;

/// Why the client is gone from one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gone {
    /// `STOP_SENDING` on the response, with its code.
    Stopped(u64),
    /// `RESET_STREAM` on the request body, with its code.
    Reset(u64),
    /// The whole connection closed or timed out.
    ConnectionLost,
    /// Not gone: the response was finished and the client acknowledged all of it (or the
    /// stream was reset by this side).
    Acknowledged,
}

/// What the request task races its handler and body against.
pub(crate) struct Watch {
    stopped: Stopped,
    signal: Arc<Signal>,
    observed: Observed,
}

/// What the halves of one request stream tell the request task, and the reverse.
struct Signal {
    /// The code of a `RESET_STREAM` the request body was read up to (`NO_RESET`: none yet).
    reset: AtomicU64,
    notify: Notify,
    /// The request task took the stream: from then on a send half dropped unfinished is reset.
    /// Before, it is h3's (a 431 it answered on its own is finished, as h3 meant).
    claimed: AtomicBool,
    /// The request task is done watching (it saw the reset, or it ended): only then does the
    /// body's reader get the reset as its error, so that a handler cannot answer it first.
    observed: AtomicBool,
    /// The body's reader, waiting for `observed`.
    reader: Mutex<Option<Waker>>,
}

/// Sets [`Signal::observed`] when dropped: held by the [`Watch`], and by its `gone()` future
/// until that returns or is dropped.
struct Observed(Arc<Signal>);

impl Drop for Observed {
    fn drop(&mut self) {
        self.0.observed.store(true, Ordering::Release);
        let reader = lock(&self.0.reader).take();
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

impl Watch {
    /// Resolves when the client has gone from this request.
    pub(crate) async fn gone(self) -> Gone {
        let Watch {
            stopped,
            signal,
            observed,
        } = self;
        let _observed = observed;
        let stopped = async move {
            match stopped.await {
                Ok(Some(code)) => Gone::Stopped(code.into_inner()),
                Ok(None) => Gone::Acknowledged,
                Err(_) => Gone::ConnectionLost,
            }
        };
        let reset = async move {
            loop {
                let notified = signal.notify.notified();
                let code = signal.reset.load(Ordering::Acquire);
                if code != NO_RESET {
                    return Gone::Reset(code);
                }
                notified.await;
            }
        };
        tokio::select! {
            gone = stopped => gone,
            gone = reset => gone,
        }
    }
}

/// One connection's request streams as the backend accepted them, shared with the serve loop.
#[derive(Clone)]
pub(crate) struct Streams(Arc<Shared>);

struct Shared {
    /// Every accepted request stream's [`Watch`], until its request task takes it or the
    /// stream is dropped (a stream h3 rejected leaves no entry behind).
    watches: Mutex<HashMap<u64, Watch>>,
    /// The id after the last request stream accepted (0 before the first).
    next: AtomicU64,
    /// Streams from this id on are refused (`u64::MAX`: none is).
    refuse_from: AtomicU64,
}

impl Streams {
    pub(crate) fn new() -> Self {
        Streams(Arc::new(Shared {
            watches: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            refuse_from: AtomicU64::new(u64::MAX),
        }))
    }

    /// The request task's [`Watch`] of stream `id`; the stream is the task's from now on.
    pub(crate) fn take(&self, id: StreamId) -> Option<Watch> {
        let watch = lock(&self.0.watches).remove(&id.into_inner())?;
        watch.signal.claimed.store(true, Ordering::Release);
        Some(watch)
    }

    /// Refuses, from now on, every request stream after those already accepted: called just
    /// before h3 sends `GOAWAY`, whose id (the stream after the last one h3 accepted) the client
    /// reads as "this one and later were not processed" (RFC 9114 §5.2). h3 itself would still
    /// serve that one stream.
    pub(crate) fn refuse_new(&self) {
        let next = self.0.next.load(Ordering::Acquire);
        self.0.refuse_from.store(next, Ordering::Release);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while these locks are held; a poisoned one still holds valid data.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A quinn connection as h3 sees it.
pub(crate) struct Connection {
    conn: quinn::Connection,
    uni: h3_quinn::Connection,
    accepting: ReusableBoxFuture<'static, Accepted>,
    streams: Streams,
}

impl Connection {
    pub(crate) fn new(conn: quinn::Connection, streams: Streams) -> Self {
        Connection {
            uni: h3_quinn::Connection::new(conn.clone()),
            accepting: ReusableBoxFuture::new(accept_bi(conn.clone())),
            conn,
            streams,
        }
    }
}

async fn accept_bi(conn: quinn::Connection) -> Accepted {
    conn.accept_bi().await
}

impl quic::Connection<Bytes> for Connection {
    type RecvStream = h3_quinn::RecvStream;
    type OpenStreams = Opener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        quic::Connection::<Bytes>::poll_accept_recv(&mut self.uni, cx)
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        let shared = &self.streams.0;
        let (send, recv, id) = loop {
            let accepted = ready!(self.accepting.poll(cx));
            self.accepting.set(accept_bi(self.conn.clone()));
            let (mut send, mut recv) = accepted.map_err(connection_error)?;
            let id = u64::from(send.id());
            if id < shared.refuse_from.load(Ordering::Acquire) {
                break (send, recv, id);
            }
            let rejected = code(Code::H3_REQUEST_REJECTED.value());
            let _ = recv.stop(rejected);
            let _ = send.reset(rejected);
        };
        shared.next.fetch_max(id + 4, Ordering::AcqRel);
        let signal = Arc::new(Signal {
            reset: AtomicU64::new(NO_RESET),
            notify: Notify::new(),
            claimed: AtomicBool::new(false),
            observed: AtomicBool::new(false),
            reader: Mutex::new(None),
        });
        let watch = Watch {
            stopped: Box::pin(send.stopped()),
            signal: signal.clone(),
            observed: Observed(signal.clone()),
        };
        lock(&shared.watches).insert(id, watch);
        Poll::Ready(Ok(RequestStream {
            send: SendHalf::new(send, signal.clone()),
            recv: RecvHalf {
                stream: recv,
                buffer: BytesMut::new(),
                signal,
                reset: None,
                _entry: Entry {
                    id,
                    streams: Arc::downgrade(shared),
                },
            },
        }))
    }

    fn opener(&self) -> Self::OpenStreams {
        Opener(quic::Connection::<Bytes>::opener(&self.uni))
    }
}

impl quic::OpenStreams<Bytes> for Connection {
    type BidiStream = RequestStream;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        Poll::Ready(Err(no_server_bidi()))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<Bytes>::poll_open_send(&mut self.uni, cx)
    }

    fn close(&mut self, code: Code, reason: &[u8]) {
        quic::OpenStreams::<Bytes>::close(&mut self.uni, code, reason)
    }
}

/// h3's handle for opening unidirectional streams (a server opens no bidirectional ones).
pub(crate) struct Opener(h3_quinn::OpenStreams);

impl quic::OpenStreams<Bytes> for Opener {
    type BidiStream = RequestStream;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        Poll::Ready(Err(no_server_bidi()))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<Bytes>::poll_open_send(&mut self.0, cx)
    }

    fn close(&mut self, code: Code, reason: &[u8]) {
        quic::OpenStreams::<Bytes>::close(&mut self.0, code, reason)
    }
}

fn no_server_bidi() -> StreamErrorIncoming {
    StreamErrorIncoming::Unknown("an HTTP/3 server opens no bidirectional streams".into())
}

/// One request stream, both directions.
pub(crate) struct RequestStream {
    send: SendHalf,
    recv: RecvHalf,
}

impl quic::BidiStream<Bytes> for RequestStream {
    type SendStream = SendHalf;
    type RecvStream = RecvHalf;

    fn split(self) -> (SendHalf, RecvHalf) {
        (self.send, self.recv)
    }
}

impl quic::RecvStream for RequestStream {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code)
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl quic::SendStream<Bytes> for RequestStream {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code)
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}

/// The response direction of a request stream.
pub(crate) struct SendHalf {
    stream: quinn::SendStream,
    writing: Option<WriteBuf<Bytes>>,
    /// Finished or reset: dropping it leaves it as it is.
    closed: bool,
    signal: Arc<Signal>,
}

impl SendHalf {
    fn new(stream: quinn::SendStream, signal: Arc<Signal>) -> Self {
        SendHalf {
            stream,
            writing: None,
            closed: false,
            signal,
        }
    }
}

impl Drop for SendHalf {
    fn drop(&mut self) {
        if !self.closed && self.signal.claimed.load(Ordering::Acquire) {
            // quinn would finish it: a response cut short would look complete.
            let _ = self.stream.reset(code(Code::H3_REQUEST_CANCELLED.value()));
        }
    }
}

impl quic::SendStream<Bytes> for SendHalf {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
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

/// The request direction of a request stream.
pub(crate) struct RecvHalf {
    stream: quinn::RecvStream,
    buffer: BytesMut,
    signal: Arc<Signal>,
    /// The code of the client's `RESET_STREAM`, once read, and whether it was signalled to the
    /// request task: every read after it fails with it (quinn would report a clean end, and h3
    /// a complete body), a signalled one once the task has seen it.
    reset: Option<(u64, bool)>,
    /// Held for its `Drop`.
    _entry: Entry,
}

/// Removes the stream's [`Watch`] if nobody took it.
struct Entry {
    id: u64,
    streams: Weak<Shared>,
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
        if self.buffer.len() < READ_MIN {
            self.buffer = BytesMut::zeroed(READ_CHUNK);
        }
        match ready!(self.stream.poll_read(cx, &mut self.buffer)) {
            Ok(0) => Poll::Ready(Ok(None)),
            Ok(n) => Poll::Ready(Ok(Some(self.buffer.split_to(n).freeze()))),
            Err(quinn::ReadError::Reset(reset_code)) => {
                let reset_code = reset_code.into_inner();
                // Any code but H3_NO_ERROR: the client gave up, and the request task drops the
                // handler on this signal. The reader waits until the task has seen it (h3 may
                // read on over buffered frames, so one `Pending` would not hold it back).
                let signalled = reset_code != Code::H3_NO_ERROR.value();
                self.reset = Some((reset_code, signalled));
                if signalled {
                    self.signal.reset.store(reset_code, Ordering::Release);
                    self.signal.notify.notify_one();
                }
                self.poll_data(cx)
            }
            Err(quinn::ReadError::ConnectionLost(error)) => {
                Poll::Ready(Err(StreamErrorIncoming::ConnectionErrorIncoming {
                    connection_error: connection_error(error),
                }))
            }
            Err(other) => Poll::Ready(Err(StreamErrorIncoming::Unknown(Box::new(other)))),
        }
    }

    fn stop_sending(&mut self, error_code: u64) {
        let _ = self.stream.stop(code(error_code));
    }

    fn recv_id(&self) -> StreamId {
        stream_id(self.stream.id())
    }
}

fn code(value: u64) -> VarInt {
    VarInt::from_u64(value).unwrap_or(VarInt::MAX)
}

fn stream_id(id: quinn::StreamId) -> StreamId {
    StreamId::try_from(u64::from(id)).expect("a QUIC stream id is a variable-length integer")
}

fn write_error(error: quinn::WriteError) -> StreamErrorIncoming {
    match error {
        quinn::WriteError::Stopped(stop_code) => StreamErrorIncoming::StreamTerminated {
            error_code: stop_code.into_inner(),
        },
        quinn::WriteError::ConnectionLost(error) => StreamErrorIncoming::ConnectionErrorIncoming {
            connection_error: connection_error(error),
        },
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}

fn connection_error(error: quinn::ConnectionError) -> ConnectionErrorIncoming {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            ConnectionErrorIncoming::ApplicationClose {
                error_code: close.error_code.into_inner(),
            }
        }
        quinn::ConnectionError::TimedOut => ConnectionErrorIncoming::Timeout,
        other => ConnectionErrorIncoming::Undefined(Arc::new(other)),
    }
}
