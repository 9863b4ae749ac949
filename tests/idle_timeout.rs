//! `RequestBodyLayer::idle_timeout` over real sockets: a client that sends part of a body and
//! then goes silent, with the connection open, fails the handler's read with `IdleTimeout`
//! (the handler answers 408, the client receives it) and cancels the request with
//! `DeadlineExceeded` in the handler phase, over HTTP/1.1 and HTTP/2, with and without
//! read-ahead; a slow but steady upload, and a handler that is busy before it reads, never time
//! out.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::{ServiceBuilder, service_fn};
use tower_cancel::request_body::IdleTimeout;
use tower_cancel::{CancelReason, RequestBody, RequestBodyLayer, RequestCancellation};

const IDLE: Duration = Duration::from_millis(200);
/// How long the busy handler works before it reads its body.
const BUSY: Duration = Duration::from_millis(600);
const DECLARED: usize = 100_000;
const MIB: usize = 1024 * 1024;

/// What the upload handler does before it reads its whole body.
#[derive(Clone, Copy, Debug)]
enum Handler {
    /// Reads at once.
    Read,
    /// Works for `BUSY` (three idle timeouts) without polling the body, then reads.
    BusyThenRead,
}

/// The upload route behind `log.layer("layer")` and `body_layer`. The handler reads the whole
/// body and answers `200` with `{len} bytes, identical: {payload(len) == body}`, or `408` with
/// the `IdleTimeout`'s message (logging `idle timeout`), or `400` (logging `read error`); the
/// `x-waited-ms` header says how long its read took.
async fn serve(log: &Log, body_layer: RequestBodyLayer, handler: Handler) -> Server {
    let l = log.clone();
    let upload = service_fn(move |req: Request<RequestBody<Incoming>>| {
        let log = l.clone();
        async move {
            let rc = req
                .extensions()
                .get::<RequestCancellation>()
                .unwrap()
                .clone();
            log.keep(rc);
            log.push("start");
            if let Handler::BusyThenRead = handler {
                tokio::time::sleep(BUSY).await;
            }
            let reading = Instant::now();
            let (status, text) = match req.into_body().collect().await {
                Ok(body) => {
                    let bytes = body.to_bytes();
                    let same = bytes[..] == payload(bytes.len())[..];
                    let text = format!("{} bytes, identical: {same}", bytes.len());
                    (StatusCode::OK, text)
                }
                Err(error) => match IdleTimeout::find(&*error) {
                    Some(timeout) => {
                        log.push("idle timeout");
                        (StatusCode::REQUEST_TIMEOUT, timeout.to_string())
                    }
                    None => {
                        log.push("read error");
                        (StatusCode::BAD_REQUEST, error.to_string())
                    }
                },
            };
            let waited = reading.elapsed().as_millis().to_string();
            let response = Response::builder()
                .status(status)
                .header("x-waited-ms", waited)
                .body(Full::new(Bytes::from(text)))
                .unwrap();
            Ok::<_, Infallible>(response)
        }
    });
    let svc = ServiceBuilder::new()
        .layer(log.layer("layer"))
        .layer(body_layer)
        .service(upload);
    Server::start(svc).await
}

/// Connects and sends a POST head declaring `DECLARED` bytes.
async fn post_head(server: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(server).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let head = format!("POST /upload HTTP/1.1\r\nhost: t\r\ncontent-length: {DECLARED}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// The value of the `x-waited-ms` header of a raw HTTP/1.1 response.
fn waited(response: &str) -> Duration {
    let value = response
        .lines()
        .find_map(|line| line.strip_prefix("x-waited-ms: "))
        .unwrap_or_else(|| panic!("no x-waited-ms in {response:?}"));
    Duration::from_millis(value.trim().parse().unwrap())
}

/// A client that sends the head and 10 000 of the declared bytes, then nothing, with the
/// connection open: the handler's read fails after `IDLE`, it answers 408, the client receives
/// it, and the request was cancelled with `DeadlineExceeded` in the handler phase.
async fn a_silent_client_gets_408_over_http1(body_layer: RequestBodyLayer, handler: Handler) {
    let log = Log::default();
    let server = serve(&log, body_layer.idle_timeout(IDLE), handler).await;
    let mut stream = post_head(server.addr).await;
    stream.write_all(&payload(10_000)).await.unwrap();
    let silent = Instant::now();
    let response = read_until(&mut stream, "200ms").await;
    let took = silent.elapsed();
    println!("{handler:?}: 408 {took:?} after the client went silent; {response:?}");
    assert!(response.starts_with("HTTP/1.1 408 "), "{response}");
    assert!(
        response.ends_with("\r\n\r\nno request body bytes arrived for 200ms"),
        "{response}"
    );
    let waited = waited(&response);
    assert!(waited >= IDLE, "the read failed after {waited:?}");
    assert!(took >= IDLE, "408 after {took:?}");
    if let Handler::BusyThenRead = handler {
        // The clock ran from the read, not from the request: busy time did not count.
        assert!(took >= BUSY + IDLE, "408 after {took:?}");
    }
    assert_eq!(
        log.entries(),
        [
            "start",
            "layer /upload deadline_exceeded handler",
            "idle timeout"
        ]
    );
    let rc = &log.handles()[0];
    assert_eq!(rc.reason(), Some(CancelReason::DeadlineExceeded));
    drop(stream);
    server.idle().await;
}

#[tokio::test]
async fn http1_a_client_that_goes_silent_mid_upload_gets_408() {
    a_silent_client_gets_408_over_http1(RequestBodyLayer::new(), Handler::Read).await;
}

#[tokio::test]
async fn http1_with_read_ahead_a_client_that_goes_silent_gets_408() {
    // Busy first: the read-ahead takes what was sent; the handler gets it at once, then waits.
    let layer = RequestBodyLayer::new().read_ahead(MIB);
    a_silent_client_gets_408_over_http1(layer.clone(), Handler::BusyThenRead).await;
    // All that was sent (10 000 bytes) was read ahead: the memory held is that, in blocks
    // that at most double what they hold.
    let peak = layer.read_ahead_peak();
    assert!(
        (10_000..=20_000).contains(&peak),
        "read ahead: {peak} bytes"
    );
    assert_eq!(layer.read_ahead_held(), 0);
}

/// Sends the head, then 10 frames of 1000 bytes, one every `IDLE / 2`, then the rest at once.
async fn a_slow_steady_upload_completes(body_layer: RequestBodyLayer, handler: Handler) {
    let log = Log::default();
    let server = serve(&log, body_layer.idle_timeout(IDLE), handler).await;
    let mut stream = post_head(server.addr).await;
    let data = payload(DECLARED);
    let started = Instant::now();
    for chunk in data[..10_000].chunks(1000) {
        tokio::time::sleep(IDLE / 2).await;
        let sent = stream.write_all(chunk).await;
        sent.unwrap_or_else(|e| panic!("upload cut off after {:?}: {e}", started.elapsed()));
    }
    stream.write_all(&data[10_000..]).await.unwrap();
    let response = read_until(&mut stream, "identical: true").await;
    println!("uploaded in {:?}: {response:?}", started.elapsed());
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    assert!(
        response.ends_with(&format!("{DECLARED} bytes, identical: true")),
        "{response}"
    );
    if let Handler::Read = handler {
        // Five idle timeouts long, and not one of them passed between two frames.
        assert!(waited(&response) >= IDLE * 5, "{response}");
    }
    assert_eq!(log.entries(), ["start"]);
    assert_all_completed(&log);
}

#[tokio::test]
async fn http1_a_slow_steady_upload_never_times_out() {
    a_slow_steady_upload_completes(RequestBodyLayer::new(), Handler::Read).await;
}

#[tokio::test]
async fn http1_with_read_ahead_a_slow_steady_upload_never_times_out() {
    // Busy first: the first frames are read ahead, the rest the handler waits for.
    let layer = RequestBodyLayer::new().read_ahead(MIB);
    a_slow_steady_upload_completes(layer.clone(), Handler::BusyThenRead).await;
    // Some frames, not all (the memory held is under what all 10 would take).
    let peak = layer.read_ahead_peak();
    assert!((1000..10_000).contains(&peak), "read ahead: {peak} bytes");
}

#[tokio::test]
async fn http1_a_busy_handler_reading_a_body_that_is_all_there_does_not_time_out() {
    // The body sent with the head; or sent `IDLE / 2` after the handler starts reading, so that
    // its first read waits (the clock must start then, not when the request arrived).
    for late in [false, true] {
        let log = Log::default();
        let layer = RequestBodyLayer::new().idle_timeout(IDLE);
        let server = serve(&log, layer, Handler::BusyThenRead).await;
        let mut stream = post_head(server.addr).await;
        let started = Instant::now();
        if late {
            log.wait_for("start").await;
            tokio::time::sleep(BUSY + IDLE / 2).await;
        }
        stream.write_all(&payload(DECLARED)).await.unwrap();
        let response = read_until(&mut stream, "identical: true").await;
        let took = started.elapsed();
        println!("late {late}: answered after {took:?}: {response:?}");
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        assert!(
            took >= BUSY,
            "the handler was busy for {BUSY:?} (three idle timeouts)"
        );
        assert!(response.ends_with(&format!("{DECLARED} bytes, identical: true")));
        if late {
            assert!(
                waited(&response) >= IDLE / 4,
                "the first read waited: {response}"
            );
        }
        assert_eq!(log.entries(), ["start"]);
        assert_all_completed(&log);
    }
}

/// An HTTP/2 request body fed by the test, frame by frame; it ends when the sender is dropped.
struct Streamed(mpsc::UnboundedReceiver<Bytes>);

impl Body for Streamed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|data| data.map(|data| Ok(Frame::data(data))))
    }
}

#[tokio::test]
async fn http2_a_client_whose_request_stream_stops_sending_gets_408() {
    let log = Log::default();
    let layer = RequestBodyLayer::new().idle_timeout(IDLE);
    let server = serve(&log, layer, Handler::Read).await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let (tx, rx) = mpsc::unbounded_channel();
    let body = Streamed(rx);
    tx.send(Bytes::from(payload(10_000))).unwrap();
    let request = Request::post(server.url("/upload")).body(body).unwrap();
    let silent = Instant::now();
    // The request stream stays open (`tx` lives on) and sends nothing more.
    let response = tokio::time::timeout(PATIENCE, send.send_request(request))
        .await
        .expect("an answer")
        .unwrap();
    let took = silent.elapsed();
    println!(
        "HTTP/2: {} {took:?} after the client went silent",
        response.status()
    );
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    let waited: u64 = response.headers()["x-waited-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(Duration::from_millis(waited) >= IDLE, "waited {waited} ms");
    let text = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(text, "no request body bytes arrived for 200ms");
    assert_eq!(
        log.entries(),
        [
            "start",
            "layer /upload deadline_exceeded handler",
            "idle timeout"
        ]
    );
    let rc = &log.handles()[0];
    assert_eq!(rc.reason(), Some(CancelReason::DeadlineExceeded));
    drop(tx);
    drop(send);
    let _ = conn.await;
    server.idle().await;
}
