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
//!
//! Every byte of a request stream's request direction goes through a frame filter
//! ([`frames`](crate::http3::frames)) before h3 sees it, and its request head has a deadline
//! ([`recv`]).

mod codes;
mod recv;
mod send;
mod watch;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h3::error::Code;
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use tokio_util::sync::ReusableBoxFuture;

use self::codes::{code, connection_error};
use self::recv::Entry;
pub(crate) use self::recv::{RecvHalf, RecvLimits};
pub(crate) use self::send::SendHalf;
pub(crate) use self::watch::{Gone, Refuser, Streams, Watch};
use self::watch::{Observed, Signal, lock};

type Accepted = Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>;

/// A quinn connection as h3 sees it.
pub(crate) struct Connection {
    conn: quinn::Connection,
    uni: h3_quinn::Connection,
    accepting: ReusableBoxFuture<'static, Accepted>,
    streams: Streams,
    limits: RecvLimits,
}

impl Connection {
    pub(crate) fn new(conn: quinn::Connection, streams: Streams, limits: RecvLimits) -> Self {
        Connection {
            limits,
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
        let signal = Signal::new();
        let watch = Watch {
            stopped: Box::pin(send.stopped()),
            signal: signal.clone(),
            observed: Observed(signal.clone()),
        };
        lock(&shared.watches).insert(id, watch);
        let entry = Entry {
            id,
            streams: Arc::downgrade(shared),
        };
        Poll::Ready(Ok(RequestStream {
            send: SendHalf::new(send, signal.clone()),
            recv: RecvHalf::new(recv, self.conn.clone(), signal, self.limits, entry),
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
