//! `RequestBodyLayer::idle_timeout` over real sockets: a client that sends part of a body and
//! then goes silent, with the connection open, fails the handler's read with `IdleTimeout`
//! (the handler answers 408, the client receives it) and cancels the request with
//! `SlowClient` in the handler phase, over HTTP/1.1 and HTTP/2, with and without
//! read-ahead; a slow but steady upload, and a handler that is busy before it reads, never time
//! out.
//!
//! Behind axum's body extractors (`Bytes`, `String`, `Json`), which turn the failed read into a
//! `400` of their own, and behind a handler that turns it into a `500`, the layer answers `408`
//! in their place, over HTTP/1.1 (with `connection: close`), HTTP/2 and HTTP/3
//! (`tower_cancel::http3::serve`), with and without read-ahead; a handler's own `408`, a `200`
//! after the timeout, and a `400` from a handler that never read are left as they are.

mod common;
#[path = "common/http3.rs"]
mod http3;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
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
/// it, and the request was cancelled with `SlowClient` in the handler phase.
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
        ["start", "layer /upload slow_client handler", "idle timeout"]
    );
    let rc = &log.handles()[0];
    assert_eq!(rc.reason(), Some(CancelReason::SlowClient));
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
        ["start", "layer /upload slow_client handler", "idle timeout"]
    );
    let rc = &log.handles()[0];
    assert_eq!(rc.reason(), Some(CancelReason::SlowClient));
    drop(tx);
    drop(send);
    let _ = conn.await;
    server.idle().await;
}

// axum's extractors: the layer answers 408 in place of their 400.

/// What a stalled client's upload declares, and the half of it that it sends.
const AXUM_DECLARED: usize = 100;
const HALF: &str = r#"{"upload": "the first half of the upload, and "#;

/// The text of axum's rejection when the body read fails with the `IdleTimeout`.
const REJECTION: &str =
    "Failed to buffer the request body: no request body bytes arrived for 200ms";

/// An axum app behind `log.layer("layer")` and `body_layer` (with `IDLE`), applied with
/// `Router::layer`: one upload route per body extractor, plus `/manual` (maps the read error
/// itself: its own 408 for the `IdleTimeout`), `/to-bytes` (`axum::body::to_bytes`, any error a
/// 500), `/lenient` (answers 200 whatever the read did) and `/unread` (answers 400 without
/// reading).
fn axum_app(log: &Log, body_layer: RequestBodyLayer) -> axum::Router {
    use axum::Json;
    use axum::body::Body;
    use axum::routing::post;
    axum::Router::new()
        .route(
            "/bytes",
            post(|body: Bytes| async move { format!("{} bytes", body.len()) }),
        )
        .route(
            "/string",
            post(|body: String| async move { format!("{} chars", body.len()) }),
        )
        .route(
            "/json",
            post(|Json(value): Json<serde_json::Value>| async move { value.to_string() }),
        )
        .route(
            "/manual",
            post(|body: Body| async move {
                match body.collect().await {
                    Ok(body) => (StatusCode::OK, format!("{} bytes", body.to_bytes().len())),
                    Err(error) => match IdleTimeout::find(&error) {
                        Some(timeout) => {
                            (StatusCode::REQUEST_TIMEOUT, format!("manual: {timeout}"))
                        }
                        None => (StatusCode::BAD_REQUEST, format!("manual: {error}")),
                    },
                }
            }),
        )
        .route(
            "/to-bytes",
            post(|body: Body| async move {
                match axum::body::to_bytes(body, usize::MAX).await {
                    Ok(bytes) => (StatusCode::OK, format!("{} bytes", bytes.len())),
                    Err(error) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("upload failed: {error}"),
                    ),
                }
            }),
        )
        .route(
            "/lenient",
            post(|body: Body| async move {
                let read = body.collect().await;
                format!("answered anyway; the read failed: {}", read.is_err())
            }),
        )
        .route(
            "/unread",
            post(|| async { (StatusCode::BAD_REQUEST, "refused before reading") }),
        )
        .layer(body_layer.idle_timeout(IDLE))
        .layer(log.layer("layer"))
}

/// The layers of the axum tests: without read-ahead, and with it.
fn body_layers() -> [RequestBodyLayer; 2] {
    [
        RequestBodyLayer::new(),
        RequestBodyLayer::new().read_ahead(MIB),
    ]
}

/// An HTTP/1.1 client that sends the head of a JSON upload of `AXUM_DECLARED` bytes and `HALF`
/// of it, then stalls with the connection open: returns everything the server sent until it
/// closed the connection, and how long after the stall the answer came.
async fn stall_over_http1(server: &Server, path: &str) -> (String, Duration) {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
         content-length: {AXUM_DECLARED}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(HALF.as_bytes()).await.unwrap();
    let stalled = Instant::now();
    let response = read_to_close(&mut stream).await;
    (response, stalled.elapsed())
}

/// An HTTP/2 connection to `server`, for [`stall_over_http2`] and whole requests.
async fn http2_connection(
    server: &Server,
) -> (
    hyper::client::conn::http2::SendRequest<Streamed>,
    tokio::task::JoinHandle<()>,
) {
    let stream = TcpStream::connect(server.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, conn)
}

/// The HTTP/1.1 stall over HTTP/2, on `send`'s connection: the request stream stays open after
/// `HALF`. Returns the status, the body and how long after the stall the answer came.
async fn stall_over_http2(
    send: &mut hyper::client::conn::http2::SendRequest<Streamed>,
    server: &Server,
    path: &str,
) -> (StatusCode, String, Duration) {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(Bytes::from_static(HALF.as_bytes())).unwrap();
    let request = Request::post(server.url(path))
        .header("content-type", "application/json")
        .header("content-length", AXUM_DECLARED)
        .body(Streamed(rx))
        .unwrap();
    let stalled = Instant::now();
    let response = tokio::time::timeout(PATIENCE, send.send_request(request))
        .await
        .expect("an answer")
        .unwrap();
    let took = stalled.elapsed();
    let status = response.status();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert!(!response.headers().contains_key("connection"));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    drop(tx);
    (status, String::from_utf8(body.to_vec()).unwrap(), took)
}

/// A whole upload over HTTP/2, on `send`'s connection: the answer's status and body.
async fn whole_over_http2(
    send: &mut hyper::client::conn::http2::SendRequest<Streamed>,
    server: &Server,
    path: &str,
) -> (StatusCode, String) {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(Bytes::from_static(b"\"whole\"")).unwrap();
    drop(tx);
    let request = Request::post(server.url(path))
        .header("content-type", "application/json")
        .body(Streamed(rx))
        .unwrap();
    let response = send.send_request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// The status line of a raw HTTP/1.1 response, its head and its body.
fn split_http1(response: &str) -> (&str, &str, &str) {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {response:?}"));
    (head.lines().next().unwrap(), head, body)
}

#[tokio::test]
async fn axum_http1_each_body_extractor_answers_408_when_the_client_stalls() {
    for layer in body_layers() {
        let log = Log::default();
        let server = Server::start(axum_app(&log, layer)).await;
        // The extractors' 400, and a handler's 500 made of the failed read.
        let cases = [
            ("/bytes", REJECTION.to_owned()),
            ("/string", REJECTION.to_owned()),
            ("/json", REJECTION.to_owned()),
            (
                "/to-bytes",
                "upload failed: no request body bytes arrived for 200ms".to_owned(),
            ),
        ];
        for (path, text) in cases {
            let (response, took) = stall_over_http1(&server, path).await;
            println!("HTTP/1.1 {path}: after {took:?}: {response:?}");
            let (status, head, body) = split_http1(&response);
            assert_eq!(status, "HTTP/1.1 408 Request Timeout", "{path}: {response}");
            // The handler's body and headers, with a length that is still true.
            assert_eq!(body, text, "{path}");
            let length = format!("content-length: {}\r\n", text.len());
            assert!(head.contains(&length), "{path}: {head}");
            // RFC 9110 §15.5.9: a 408 says the connection closes; and it did.
            assert!(head.contains("\r\nconnection: close"), "{path}: {head}");
            assert!(took >= IDLE, "{path}: 408 after {took:?}");
            let cancelled = format!("layer {path} slow_client handler");
            log.wait_for(&cancelled).await;
        }
        server.idle().await;
        assert_eq!(
            log.entries(),
            [
                "layer /bytes slow_client handler",
                "layer /string slow_client handler",
                "layer /json slow_client handler",
                "layer /to-bytes slow_client handler",
            ]
        );
    }
}

#[tokio::test]
async fn axum_http2_each_body_extractor_answers_408_when_the_client_stalls() {
    for layer in body_layers() {
        let log = Log::default();
        let server = Server::start(axum_app(&log, layer)).await;
        let (mut send, conn) = http2_connection(&server).await;
        for path in ["/bytes", "/string", "/json"] {
            let (status, body, took) = stall_over_http2(&mut send, &server, path).await;
            println!("HTTP/2 {path}: {status} after {took:?}: {body:?}");
            assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{path}: {body}");
            assert_eq!(body, REJECTION, "{path}");
            assert!(took >= IDLE, "{path}: 408 after {took:?}");
            log.wait_for(&format!("layer {path} slow_client handler"))
                .await;
        }
        // The connection serves on.
        let whole = whole_over_http2(&mut send, &server, "/json").await;
        assert_eq!(whole, (StatusCode::OK, "\"whole\"".to_owned()));
        drop(send);
        conn.await.unwrap();
        server.idle().await;
        assert_eq!(log.entries().len(), 3, "{:?}", log.entries());
    }
}

/// A handler's own 408 passes as it is; a handler that answers 200 after the timeout keeps its
/// 200; a handler that answered 400 before it read anything keeps its 400 (no timeout).
#[tokio::test]
async fn axum_what_the_handler_chose_is_kept() {
    for layer in body_layers() {
        let log = Log::default();
        let server = Server::start(axum_app(&log, layer)).await;

        let (response, took) = stall_over_http1(&server, "/manual").await;
        let (status, _, body) = split_http1(&response);
        assert_eq!(status, "HTTP/1.1 408 Request Timeout", "{response}");
        assert_eq!(body, "manual: no request body bytes arrived for 200ms");
        assert!(took >= IDLE, "408 after {took:?}");
        let (mut send, conn) = http2_connection(&server).await;
        let (status, body, _) = stall_over_http2(&mut send, &server, "/manual").await;
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(body, "manual: no request body bytes arrived for 200ms");

        let (status, body, took) = stall_over_http2(&mut send, &server, "/lenient").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, "answered anyway; the read failed: true");
        assert!(took >= IDLE, "answered after {took:?}");

        let (status, body, took) = stall_over_http2(&mut send, &server, "/unread").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body, "refused before reading");
        assert!(took < IDLE, "answered after {took:?}");

        drop(send);
        conn.await.unwrap();
        server.idle().await;
        assert_eq!(
            log.entries(),
            [
                "layer /manual slow_client handler",
                "layer /manual slow_client handler",
                "layer /lenient slow_client handler",
            ]
        );
    }
}

/// The same app through `tower_cancel::http3::serve`, with h3's client: a request stream that
/// sends half its body and stays open gets 408 behind each extractor.
#[tokio::test]
async fn axum_http3_each_body_extractor_answers_408_when_the_client_stalls() {
    for layer in body_layers() {
        let log = Log::default();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let server =
            http3::H3Server::start(axum_app(&log, layer), shutdown, Duration::from_secs(1)).await;
        let mut client = http3::H3Client::connect(&server).await;
        let cases = [
            ("/bytes", StatusCode::REQUEST_TIMEOUT, REJECTION),
            ("/string", StatusCode::REQUEST_TIMEOUT, REJECTION),
            ("/json", StatusCode::REQUEST_TIMEOUT, REJECTION),
            (
                "/to-bytes",
                StatusCode::REQUEST_TIMEOUT,
                "upload failed: no request body bytes arrived for 200ms",
            ),
            (
                "/manual",
                StatusCode::REQUEST_TIMEOUT,
                "manual: no request body bytes arrived for 200ms",
            ),
        ];
        for (path, expected, text) in cases {
            let request = Request::post(format!("https://localhost{path}"))
                .header("content-type", "application/json")
                .header("content-length", AXUM_DECLARED)
                .body(())
                .unwrap();
            let mut stream = client.send.send_request(request).await.unwrap();
            stream
                .send_data(Bytes::from_static(HALF.as_bytes()))
                .await
                .unwrap();
            // The request stream stays open, and sends nothing more.
            let stalled = Instant::now();
            let response = tokio::time::timeout(PATIENCE, stream.recv_response())
                .await
                .expect("an answer")
                .unwrap();
            let took = stalled.elapsed();
            let (body, ending) = http3::read_body(&mut stream).await;
            let body = String::from_utf8(body).unwrap();
            println!(
                "HTTP/3 {path}: {} after {took:?}: {body:?}",
                response.status()
            );
            assert_eq!(response.status(), expected, "{path}: {body}");
            assert_eq!(response.version(), http::Version::HTTP_3);
            assert!(!response.headers().contains_key("connection"));
            assert_eq!(
                (body.as_str(), ending),
                (text, http3::Ending::Finished),
                "{path}"
            );
            assert!(took >= IDLE, "{path}: answered after {took:?}");
            log.wait_for(&format!("layer {path} slow_client handler"))
                .await;
        }
        // The connection serves on.
        let mut stream = client.request("POST", "/bytes", b"whole").await;
        let response = stream.recv_response().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let (body, _) = http3::read_body(&mut stream).await;
        assert_eq!(body, b"5 bytes");
        assert_eq!(log.entries().len(), 5, "{:?}", log.entries());
    }
}
