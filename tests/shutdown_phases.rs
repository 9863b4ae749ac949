//! The two-phase shutdown over real sockets (HTTP/1.1 and HTTP/2 with hyper's clients, HTTP/3
//! with the `h3` crate's, against an axum router): `shutdown_token` with a `shutdown_grace` announces a drain first (handlers
//! see `draining()`, nothing is cancelled, requests that finish within the grace complete),
//! then cancels what is left with `Shutdown`; `EndOnShutdownLayer` ends server-sent event
//! streams cleanly (with a last event, at the grace's end or at the drain's start) and cuts
//! other bodies that are still streaming, so that no client takes a cut body for a whole one.

mod common;
#[path = "common/http3.rs"]
mod http3;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body as AxumBody;
use axum::response::IntoResponse;
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use bytes::Bytes;
use common::{Log, PATIENCE, Server};
use futures_util::stream::{self, Stream};
use http::{Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower_cancel::RequestCancellation;
use tower_cancel::server::EndOnShutdownLayer;

const GRACE: Duration = Duration::from_millis(600);
const LAST_EVENT: &str = "event: bye\ndata: restarting\n\n";
/// The sized download: far more than it can send during the grace.
const DOWNLOAD: u64 = 1 << 20;

/// An endless event stream, one event every 20 ms, that never looks at its request.
fn ticks() -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    Sse::new(stream::unfold(0u64, |n| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Some((Ok(Event::default().data(format!("tick {n}"))), n + 1))
    }))
}

/// A body of exactly `DOWNLOAD` bytes (its length known up front, so sent with a
/// `content-length`), 1 KiB every 20 ms: a download that never looks at its request.
struct SlowDownload {
    left: u64,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Body for SlowDownload {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        std::task::ready!(self.sleep.as_mut().poll(cx));
        let next = tokio::time::Instant::now() + Duration::from_millis(20);
        self.sleep.as_mut().reset(next);
        let n = self.left.min(1024);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n as usize])))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

fn router(log: &Log, shutdown: &CancellationToken) -> Router {
    let layer = log
        .layer("layer")
        .shutdown_token(shutdown.clone())
        .shutdown_grace(GRACE);
    let keep = log.clone();
    Router::new()
        // Answers as soon as the drain is announced: the notice comes before any cancel.
        .route(
            "/notice",
            get(|rc: RequestCancellation| async move {
                let before = rc.is_draining();
                rc.draining().await;
                format!("draining {before} -> {}", rc.is_draining())
            }),
        )
        // Works `ms` milliseconds unless cancelled.
        .route(
            "/report",
            get(|rc: RequestCancellation, uri: http::Uri| async move {
                let ms: u64 = uri
                    .query()
                    .and_then(|q| q.strip_prefix("ms="))
                    .map_or(0, |ms| ms.parse().unwrap());
                match rc.run(tokio::time::sleep(Duration::from_millis(ms))).await {
                    Ok(()) => (StatusCode::OK, "done".to_owned()),
                    Err(c) => (StatusCode::SERVICE_UNAVAILABLE, c.reason().to_string()),
                }
            }),
        )
        .route(
            "/events",
            get(|| async { ticks() }).layer(EndOnShutdownLayer::new().last_event(LAST_EVENT)),
        )
        .route(
            "/events-at-drain",
            get(|| async { ticks() }).layer(EndOnShutdownLayer::new().at_drain()),
        )
        .route(
            "/download",
            get(|| async {
                AxumBody::new(SlowDownload {
                    left: DOWNLOAD,
                    sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
                })
            })
            .layer(EndOnShutdownLayer::new()),
        )
        // A stream of unknown length that is not an event stream: a clean end would pass a
        // cut body off as whole.
        .route(
            "/stream",
            get(|| async {
                let chunks = stream::unfold((), |()| async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Some((Ok::<_, Infallible>(Bytes::from_static(b"chunk\n")), ()))
                });
                (
                    [("content-type", "application/octet-stream")],
                    AxumBody::from_stream(chunks),
                )
                    .into_response()
            })
            .layer(EndOnShutdownLayer::new().last_event("never sent")),
        )
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let keep = keep.clone();
                async move {
                    if let Some(rc) = req.extensions().get::<RequestCancellation>() {
                        keep.keep(rc.clone());
                    }
                    next.run(req).await
                }
            },
        ))
        .layer(layer)
}

#[derive(Clone, Copy, Debug)]
enum Protocol {
    Http1,
    Http2,
    Http3,
}

/// The router served over TCP (HTTP/1.1 and HTTP/2) or over QUIC (HTTP/3).
enum Target {
    Tcp(Server),
    Quic(http3::H3Server),
}

impl Target {
    async fn start(protocol: Protocol, router: Router) -> Self {
        match protocol {
            Protocol::Http1 | Protocol::Http2 => Self::Tcp(Server::start(router).await),
            // The server's own graceful shutdown stays out of it (a token never cancelled):
            // the layer's drain is what is tested.
            Protocol::Http3 => {
                Self::Quic(http3::H3Server::start(router, CancellationToken::new(), PATIENCE).await)
            }
        }
    }
}

/// What a client saw of one response.
#[derive(Debug)]
struct Seen {
    status: StatusCode,
    content_length: Option<u64>,
    body: Vec<u8>,
    /// When each data frame arrived.
    frames: Vec<Instant>,
    /// `Ok` for a complete body, `Err` for one the server cut.
    end: Result<(), String>,
    ended: Instant,
}

impl Seen {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `GET path` on a connection of its own with hyper's client, and reads the response
/// to its end (or its failure); panics after [`PATIENCE`].
async fn fetch(protocol: Protocol, target: &Target, path: &str) -> Seen {
    let once = async {
        match target {
            Target::Tcp(server) => fetch_once(protocol, server, path).await,
            Target::Quic(server) => fetch_h3(server, path).await,
        }
    };
    tokio::time::timeout(PATIENCE, once)
        .await
        .unwrap_or_else(|_| panic!("{protocol:?} {path}: no end after {PATIENCE:?}"))
}

async fn fetch_once(protocol: Protocol, server: &Server, path: &str) -> Seen {
    let stream = TcpStream::connect(server.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let io = TokioIo::new(stream);
    let request = Request::get(server.url(path))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response: http::Response<Incoming> = match protocol {
        Protocol::Http1 => {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            send.send_request(request).await.unwrap()
        }
        Protocol::Http3 => unreachable!("HTTP/3 goes over QUIC: fetch_h3"),
        Protocol::Http2 => {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            send.send_request(request).await.unwrap()
        }
    };
    let status = response.status();
    let content_length = response
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let mut body = response.into_body();
    let mut seen = Seen {
        status,
        content_length,
        body: Vec::new(),
        frames: Vec::new(),
        end: Ok(()),
        ended: Instant::now(),
    };
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    seen.frames.push(Instant::now());
                    seen.body.extend_from_slice(&data);
                }
            }
            Some(Err(error)) => {
                seen.end = Err(error.to_string());
                break;
            }
        }
    }
    seen.ended = Instant::now();
    seen
}

/// [`fetch_once`] over HTTP/3, with the `h3` crate's client on a connection of its own.
async fn fetch_h3(server: &http3::H3Server, path: &str) -> Seen {
    let mut client = http3::H3Client::connect(server).await;
    let mut stream = client.get(path).await;
    let response = stream.recv_response().await.unwrap();
    let content_length = response
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let mut seen = Seen {
        status: response.status(),
        content_length,
        body: Vec::new(),
        frames: Vec::new(),
        end: Ok(()),
        ended: Instant::now(),
    };
    loop {
        match stream.recv_data().await {
            Ok(Some(mut data)) => {
                use bytes::Buf;
                seen.frames.push(Instant::now());
                let chunk = data.copy_to_bytes(data.remaining());
                seen.body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(error) => {
                seen.end = Err(format!("{:?}", http3::ending(&error)));
                break;
            }
        }
    }
    seen.ended = Instant::now();
    seen
}

async fn phases(protocol: Protocol) {
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let server = Arc::new(Target::start(protocol, router(&log, &shutdown)).await);
    let spawn = |path: &'static str| {
        let server = server.clone();
        tokio::spawn(async move { fetch(protocol, &server, path).await })
    };
    let notice = spawn("/notice");
    let short = spawn("/report?ms=200");
    let long = spawn("/report?ms=30000");
    let events = spawn("/events");
    let events_at_drain = spawn("/events-at-drain");
    let download = spawn("/download");
    let chunked = spawn("/stream");
    // Every request is in its handler or streaming before the shutdown.
    common::eventually("every request in flight", || log.handles().len() == 7).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let cancelled = Instant::now();
    shutdown.cancel();
    // A request that arrives during the drain is served, and drains too.
    let during = fetch(protocol, &server, "/notice").await;
    assert_eq!(during.status, StatusCode::OK);
    assert_eq!(during.text(), "draining true -> true");

    // The notice: answered at the drain's start, before any cancellation.
    let notice = notice.await.unwrap();
    assert_eq!(notice.status, StatusCode::OK, "{protocol:?}");
    assert_eq!(notice.text(), "draining false -> true");
    assert!(notice.ended < cancelled + GRACE, "{protocol:?}");

    // Work that ends within the grace completes; work that does not is cancelled at its end.
    let short = short.await.unwrap();
    assert_eq!(
        (short.status, short.text().as_str()),
        (StatusCode::OK, "done")
    );
    let long = long.await.unwrap();
    assert_eq!(
        (long.status, long.text().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "shutdown")
    );
    assert!(
        long.ended >= cancelled + GRACE,
        "{protocol:?}: cancelled early"
    );

    // The event stream ran on through the drain, then ended cleanly with the last event.
    let events = events.await.unwrap();
    assert_eq!(events.status, StatusCode::OK);
    assert_eq!(events.end, Ok(()), "{protocol:?}: {}", events.text());
    assert!(events.text().ends_with(LAST_EVENT), "{}", events.text());
    assert!(
        events.frames.iter().any(|t| *t > cancelled + GRACE / 2),
        "{protocol:?}: the stream stopped at the drain's start"
    );
    assert!(
        events.ended >= cancelled + GRACE,
        "{protocol:?}: ended early"
    );

    // At the drain's start instead: a clean end, no last event, and the request completed.
    let early = events_at_drain.await.unwrap();
    assert_eq!(early.end, Ok(()), "{protocol:?}");
    assert!(early.text().contains("data: tick"), "{}", early.text());
    assert!(early.ended < cancelled + GRACE, "{protocol:?}");

    // A sized download still streaming at the grace's end is cut: the client sees less than
    // its content-length and an error, never a whole body.
    let download = download.await.unwrap();
    assert_eq!(download.content_length, Some(DOWNLOAD), "{protocol:?}");
    assert!((download.body.len() as u64) < DOWNLOAD);
    assert!(download.end.is_err(), "{protocol:?}: {:?}", download.end);
    assert!(
        download.ended >= cancelled + GRACE,
        "{protocol:?}: cut early"
    );

    // A stream of unknown length that is not an event stream: cut too, no last frame.
    let chunked = chunked.await.unwrap();
    assert!(
        chunked.end.is_err(),
        "{protocol:?}: a cut stream looked whole"
    );
    assert!(!chunked.text().contains("never sent"));

    // What was cancelled: what ran past the grace, each once, with `Shutdown`.
    let mut cancelled = log.with_prefix("layer");
    cancelled.sort();
    assert_eq!(
        cancelled,
        [
            "layer /download shutdown body",
            "layer /events shutdown body",
            "layer /report shutdown handler",
            "layer /stream shutdown body",
        ],
        "{protocol:?}"
    );
    // A request that arrives after the grace starts cancelled.
    let after = fetch(protocol, &server, "/report?ms=30000").await;
    assert_eq!(
        (after.status, after.text().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "shutdown")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_drains_then_cancels_and_ends_streams() {
    phases(Protocol::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_drains_then_cancels_and_ends_streams() {
    phases(Protocol::Http2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_drains_then_cancels_and_ends_streams() {
    phases(Protocol::Http3).await;
}
