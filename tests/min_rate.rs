//! `RequestBodyLayer::min_rate` over real sockets: a client that trickles its upload below the
//! minimum gets `408` (in place of the `400` of axum's `Bytes` extractor) and its request is
//! recorded as `SlowClient`, over HTTP/1.1 (raw TCP), HTTP/2 (hyper's client) and HTTP/3
//! (`tower_cancel::http3::serve`, h3's client), with and without read-ahead; one that sends
//! above it completes.

mod common;
#[path = "common/http3.rs"]
mod http3;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tower_cancel::RequestBodyLayer;

/// The minimum: 1 000 bytes per second once the handler has waited 500 ms.
const MIN_RATE: u64 = 1000;
const GRACE: Duration = Duration::from_millis(500);
/// Each frame the client sends.
const CHUNK: &[u8] = &[b'x'; 100];
const FRAMES: usize = 20;

/// How the client paces its upload: 100 bytes every `every`.
#[derive(Clone, Copy, Debug)]
enum Pace {
    /// 400 B/s: behind once the grace has run out.
    Below,
    /// 1 667 B/s.
    Above,
}

impl Pace {
    fn every(self) -> Duration {
        match self {
            Pace::Below => Duration::from_millis(250),
            Pace::Above => Duration::from_millis(60),
        }
    }

    fn expected(self) -> (StatusCode, String, Option<&'static str>) {
        match self {
            Pace::Below => (
                StatusCode::REQUEST_TIMEOUT,
                "Failed to buffer the request body: the request body arrived too slowly".into(),
                Some("layer /upload slow_client handler"),
            ),
            Pace::Above => (
                StatusCode::OK,
                format!("{} bytes", CHUNK.len() * FRAMES),
                None,
            ),
        }
    }
}

fn app(log: &Log, body_layer: RequestBodyLayer) -> axum::Router {
    axum::Router::new()
        .route(
            "/upload",
            axum::routing::post(|body: Bytes| async move { format!("{} bytes", body.len()) }),
        )
        .layer(body_layer.min_rate(MIN_RATE, GRACE))
        .layer(log.layer("layer"))
}

fn body_layers() -> [RequestBodyLayer; 2] {
    [
        RequestBodyLayer::new(),
        RequestBodyLayer::new().read_ahead(1024 * 1024),
    ]
}

const DECLARED: usize = 100 * FRAMES;

/// Checks an answer against the pace's expectation (the 408's text starts with it).
async fn check(log: &Log, pace: Pace, protocol: &str, status: StatusCode, body: &str) {
    let (expected, text, cancelled) = pace.expected();
    println!("{protocol} {pace:?}: {status} {body:?}");
    assert_eq!(status, expected, "{protocol} {pace:?}: {body}");
    assert!(body.starts_with(&text), "{protocol} {pace:?}: {body}");
    match cancelled {
        Some(entry) => log.wait_for(entry).await,
        None => assert_eq!(log.entries().len(), 0, "{:?}", log.entries()),
    }
}

#[tokio::test]
async fn http1_a_trickle_below_the_minimum_gets_408_and_one_above_completes() {
    for layer in body_layers() {
        for pace in [Pace::Below, Pace::Above] {
            let log = Log::default();
            let server = Server::start(app(&log, layer.clone())).await;
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let head = format!(
                "POST /upload HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\
                 content-length: {DECLARED}\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            let (mut read, mut write) = stream.into_split();
            let sender = tokio::spawn(async move {
                for _ in 0..FRAMES {
                    tokio::time::sleep(pace.every()).await;
                    if write.write_all(CHUNK).await.is_err() {
                        return None; // the server answered and closed
                    }
                }
                Some(write) // kept open: the server closes after answering
            });
            let mut response = Vec::new();
            let read_all = tokio::io::AsyncReadExt::read_to_end(&mut read, &mut response);
            let _ = tokio::time::timeout(PATIENCE, read_all)
                .await
                .expect("closed");
            let response = String::from_utf8(response).unwrap();
            let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
            let status: u16 = head[9..12].parse().unwrap();
            check(
                &log,
                pace,
                "HTTP/1.1",
                StatusCode::from_u16(status).unwrap(),
                body,
            )
            .await;
            if matches!(pace, Pace::Below) {
                assert!(head.contains("connection: close"), "{head}");
            }
            sender.abort();
        }
    }
}

#[tokio::test]
async fn http2_a_trickle_below_the_minimum_gets_408_and_one_above_completes() {
    for layer in body_layers() {
        for pace in [Pace::Below, Pace::Above] {
            let log = Log::default();
            let server = Server::start(app(&log, layer.clone())).await;
            let stream = TcpStream::connect(server.addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let (tx, rx) = mpsc::unbounded_channel();
            let sender = tokio::spawn(async move {
                for _ in 0..FRAMES {
                    tokio::time::sleep(pace.every()).await;
                    if tx.send(Bytes::from_static(CHUNK)).is_err() {
                        return;
                    }
                }
            });
            let request = Request::post(server.url("/upload"))
                .header("content-length", DECLARED)
                .body(Streamed(rx))
                .unwrap();
            let response = tokio::time::timeout(PATIENCE, send.send_request(request))
                .await
                .expect("an answer")
                .unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let body = String::from_utf8(body.to_vec()).unwrap();
            check(&log, pace, "HTTP/2", status, &body).await;
            sender.abort();
        }
    }
}

#[tokio::test]
async fn http3_a_trickle_below_the_minimum_gets_408_and_one_above_completes() {
    for layer in body_layers() {
        for pace in [Pace::Below, Pace::Above] {
            let log = Log::default();
            let shutdown = tokio_util::sync::CancellationToken::new();
            let server =
                http3::H3Server::start(app(&log, layer.clone()), shutdown, Duration::from_secs(1))
                    .await;
            let mut client = http3::H3Client::connect(&server).await;
            let request = Request::post("https://localhost/upload")
                .header("content-length", DECLARED)
                .body(())
                .unwrap();
            let stream = client.send.send_request(request).await.unwrap();
            let (mut send_half, mut recv_half) = stream.split();
            let sender = tokio::spawn(async move {
                for _ in 0..FRAMES {
                    tokio::time::sleep(pace.every()).await;
                    if send_half
                        .send_data(Bytes::from_static(CHUNK))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let _ = send_half.finish().await;
            });
            let response = tokio::time::timeout(PATIENCE, recv_half.recv_response())
                .await
                .expect("an answer")
                .unwrap();
            let mut body = Vec::new();
            while let Ok(Some(mut chunk)) = recv_half.recv_data().await {
                use bytes::Buf;
                while chunk.has_remaining() {
                    let part = chunk.chunk().to_vec();
                    chunk.advance(part.len());
                    body.extend(part);
                }
            }
            let body = String::from_utf8(body).unwrap();
            check(&log, pace, "HTTP/3", response.status(), &body).await;
            sender.abort();
        }
    }
}
