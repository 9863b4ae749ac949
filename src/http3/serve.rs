//! The accept loops: endpoint → connections → request streams, and the graceful shutdown.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::io;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::event::TARGET;
use crate::http3::body::IncomingBody;
use crate::http3::quic::{Connection, RecvLimits, Streams};
use crate::http3::request::serve_request;
use crate::propagate::BoxError;

/// The default bound on a graceful shutdown's drain.
const DRAIN: Duration = Duration::from_secs(10);

/// The default number of requests a connection serves before `GOAWAY` (nginx's
/// `keepalive_requests` is 1000).
const MAX_REQUESTS_PER_CONNECTION: usize = 10_000;

/// The default bound on a request's header section, decoded: hyper's HTTP/2 default
/// (`DEFAULT_SETTINGS_MAX_HEADER_LIST_SIZE`, 16 KiB, hyper 1.x `src/proto/h2/server.rs`).
const MAX_FIELD_SECTION_SIZE: u64 = 16 * 1024;

/// The default bound on a request head as it arrives (and on any frame but DATA): four times
/// the decoded bound, since QPACK's Huffman code can make a header section longer than its
/// text, and well under hyper's HTTP/1.1 read buffer (`DEFAULT_MAX_BUFFER_SIZE`, 8 KiB +
/// 400 KiB, hyper 1.x `src/proto/h1/io.rs`).
const MAX_REQUEST_HEAD_BYTES: u64 = 64 * 1024;

/// The default time a request stream has to deliver its request head: hyper's HTTP/1.1
/// `header_read_timeout` (30 s, hyper 1.x `src/server/conn/http1.rs`).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `service` on every connection `endpoint` accepts, over HTTP/3.
///
/// The endpoint needs a server config whose TLS config offers ALPN `h3` (see the
/// [module docs](crate::http3)). Await the returned [`Serve`] to run it: it resolves to `Ok`
/// after the graceful shutdown set with [`with_graceful_shutdown`](Serve::with_graceful_shutdown),
/// and to an error if the endpoint stops accepting connections without one (see
/// [`Serve`]'s `IntoFuture`).
pub fn serve<S, B>(endpoint: quinn::Endpoint, service: S) -> Serve<S>
where
    S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Serve {
        endpoint,
        service,
        signal: None,
        drain: DRAIN,
        max_field_section_size: MAX_FIELD_SECTION_SIZE,
        max_request_head_bytes: MAX_REQUEST_HEAD_BYTES,
        header_read_timeout: HEADER_READ_TIMEOUT,
        max_requests_per_connection: Some(MAX_REQUESTS_PER_CONNECTION),
    }
}

/// An HTTP/3 server being configured; await it to run it. Made by [`serve`].
#[must_use = "a server does nothing until it is awaited"]
pub struct Serve<S> {
    endpoint: quinn::Endpoint,
    service: S,
    /// Resolves when the graceful shutdown begins.
    signal: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    drain: Duration,
    max_field_section_size: u64,
    max_request_head_bytes: u64,
    header_read_timeout: Duration,
    max_requests_per_connection: Option<usize>,
}

impl<S> Serve<S> {
    /// Shuts down gracefully when `signal` resolves, as axum's `serve(..)
    /// .with_graceful_shutdown(signal)` does: no new connection is accepted, every connection
    /// sends `GOAWAY`, its requests in flight may finish for at most the
    /// [`drain`](Self::drain) bound, then the connections and the endpoint are closed.
    ///
    /// With a `CancellationToken` as the server's shutdown, pass `token.clone().cancelled_owned()`
    /// here and the same token to
    /// [`CancellationLayer::shutdown_token`](crate::CancellationLayer::shutdown_token), so that
    /// the requests in flight are cancelled with `Shutdown` and can stop early.
    pub fn with_graceful_shutdown<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.signal = Some(Box::pin(signal));
        self
    }

    /// How long a graceful shutdown waits for requests in flight (10 s unless set). Those
    /// still running then are dropped, and their streams reset. It also bounds how long a
    /// finished response waits for the client to acknowledge it before its connection may
    /// close.
    pub fn drain(mut self, bound: Duration) -> Self {
        self.drain = bound;
        self
    }

    /// How many requests one connection serves before it sends `GOAWAY` and ends once those
    /// are done (10 000 unless set; `None`: no limit). The client opens a new connection for
    /// the next ones. quinn keeps a little state per stream for as long as the connection
    /// lives, so that a connection never grows without bound.
    pub fn max_requests_per_connection(mut self, max: Option<usize>) -> Self {
        self.max_requests_per_connection = max;
        self
    }

    /// The largest request header section accepted, decoded, in bytes as RFC 9114 §4.2.2
    /// counts them (name, value and 32 per field): 16 KiB unless set, hyper's HTTP/2 default.
    /// It is announced to clients in `SETTINGS`; a larger one gets `431`, and its handler is
    /// not called. The encoded section must also fit in
    /// [`max_request_head_bytes`](Self::max_request_head_bytes): raise both together.
    pub fn max_field_section_size(mut self, bytes: u64) -> Self {
        self.max_field_section_size = bytes;
        self
    }

    /// The most a request stream may deliver before its request head is complete (its HEADERS
    /// frame, and any unknown frames before it), and the largest trailers or other frame but
    /// DATA: 64 KiB unless set. What goes over is never buffered: the stream is ended at once
    /// (`STOP_SENDING` and `RESET_STREAM` with `H3_EXCESSIVE_LOAD`), at the frame's announced
    /// length if that says so, and no handler is called. So a connection holds at most this
    /// times quinn's `max_concurrent_bidi_streams` (100 by default) in request heads, plus
    /// what quinn itself buffers per stream (its `stream_receive_window`).
    pub fn max_request_head_bytes(mut self, bytes: u64) -> Self {
        self.max_request_head_bytes = bytes;
        self
    }

    /// How long a request stream has, from the moment it is accepted, to deliver its request
    /// head: 30 s unless set, hyper's HTTP/1.1 `header_read_timeout`. A stream still short of
    /// it then is ended (`H3_REQUEST_REJECTED`: the client may retry it) and what it sent is
    /// freed, so that streams that never finish their headers hold nothing for long.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }
}

impl<S> fmt::Debug for Serve<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serve")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .field("graceful_shutdown", &self.signal.is_some())
            .field("drain", &self.drain)
            .field("max_field_section_size", &self.max_field_section_size)
            .field("max_request_head_bytes", &self.max_request_head_bytes)
            .field("header_read_timeout", &self.header_read_timeout)
            .finish_non_exhaustive()
    }
}

impl<S, B> IntoFuture for Serve<S>
where
    S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// `Ok` after a graceful shutdown. An error if the endpoint has no local address, or
    /// stops accepting connections when no shutdown asked it to: closed elsewhere
    /// ([`quinn::Endpoint::close`]), or its driver ended on an I/O error of its socket (which
    /// quinn logs, at `error`, with the error itself). The connections still open are closed
    /// either way.
    type Output = io::Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

impl<S, B> Serve<S>
where
    S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    async fn run(mut self) -> io::Result<()> {
        self.endpoint.local_addr()?;
        // Cancelled when the signal resolves: what every connection watches.
        let shutdown = CancellationToken::new();
        let mut signal = self
            .signal
            .take()
            .unwrap_or_else(|| Box::pin(std::future::pending()));
        let mut connections = JoinSet::new();
        let mut stopped = false;
        loop {
            tokio::select! {
                biased;
                () = &mut signal => {
                    shutdown.cancel();
                    break;
                }
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else {
                        stopped = true;
                        break;
                    };
                    let limits = Limits {
                        drain: self.drain,
                        max_field_section_size: self.max_field_section_size,
                        max_requests: self.max_requests_per_connection,
                        recv: RecvLimits {
                            max_head: self.max_request_head_bytes,
                            header_timeout: self.header_read_timeout,
                        },
                    };
                    let connection =
                        serve_connection(incoming, self.service.clone(), shutdown.clone(), limits);
                    connections.spawn(connection);
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        if shutdown.is_cancelled() {
            // New handshakes are refused from here on; each connection drains on its own.
            self.endpoint.set_server_config(None);
            let deadline = Instant::now() + self.drain + Duration::from_millis(500);
            loop {
                tokio::select! {
                    joined = connections.join_next() => if joined.is_none() { break },
                    () = sleep_until(deadline) => break,
                }
            }
        }
        connections.shutdown().await;
        self.endpoint.close(quinn::VarInt::from_u32(0x100), b"");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        if stopped {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the QUIC endpoint stopped accepting connections (closed, or its socket failed)",
            ));
        }
        Ok(())
    }
}

/// What a connection needs from its server's configuration.
#[derive(Clone, Copy)]
struct Limits {
    drain: Duration,
    max_field_section_size: u64,
    max_requests: Option<usize>,
    recv: RecvLimits,
}

/// One connection: its request streams, each on a task of its own.
async fn serve_connection<S, B>(
    incoming: quinn::Incoming,
    service: S,
    shutdown: CancellationToken,
    limits: Limits,
) where
    S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let quic = match incoming.await {
        Ok(quic) => quic,
        Err(error) => {
            tracing::debug!(target: TARGET, %error, "QUIC handshake failed");
            return;
        }
    };
    let streams = Streams::new();
    let mut h3 = h3::server::builder();
    h3.max_field_section_size(limits.max_field_section_size);
    let mut conn = match h3
        .build::<_, Bytes>(Connection::new(quic, streams.clone(), limits.recv))
        .await
    {
        Ok(conn) => conn,
        Err(error) => {
            tracing::debug!(target: TARGET, %error, "HTTP/3 connection failed to start");
            return;
        }
    };
    // Aborted with the connection: a request outliving it is dropped, which is a cancellation.
    let mut requests = JoinSet::new();
    let mut accepted = 0usize;
    // Set once GOAWAY went out (at shutdown, or after `max_requests`): the connection ends when
    // its last request does.
    let mut going_away = false;
    // Set at shutdown: the connection ends then at the latest.
    let mut deadline: Option<Instant> = None;
    loop {
        let drained = async {
            match deadline {
                Some(deadline) => sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let goaway = tokio::select! {
            biased;
            () = shutdown.cancelled(), if deadline.is_none() => {
                deadline = Some(Instant::now() + limits.drain);
                !going_away
            }
            () = drained => break,
            Some(_) = requests.join_next(), if !requests.is_empty() => false,
            incoming = conn.accept() => match incoming {
                Ok(Some(resolver)) => {
                    let request =
                        serve_request(resolver, service.clone(), streams.clone(), limits.drain);
                    requests.spawn(request);
                    accepted += 1;
                    !going_away && limits.max_requests.is_some_and(|max| accepted >= max)
                }
                Ok(None) => break,
                Err(error) => {
                    if !error.is_h3_no_error() {
                        tracing::debug!(target: TARGET, %error, "HTTP/3 connection ended");
                    }
                    break;
                }
            },
        };
        if goaway {
            going_away = true;
            streams.refuse_new();
            if let Err(error) = conn.shutdown(1).await {
                tracing::debug!(target: TARGET, %error, "HTTP/3 GOAWAY not sent");
                break;
            }
        }
        if going_away && requests.is_empty() {
            break;
        }
    }
    // Requests still finishing write their last frames before the connection closes (bounded:
    // those of a lost connection end on their own, as their streams fail).
    if deadline.is_none() {
        let all = async { while requests.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(limits.drain, all).await;
    }
    requests.shutdown().await;
    drop(conn);
}
