//! HTTP/1.1 over real sockets: every way a client leaves, and every way a request completes.

mod common;

use common::*;
use tokio::io::AsyncWriteExt;

/// The handler future was dropped first, then the handler's callback, then the layer's, once.
async fn assert_cancelled_once(server: &Server, log: &Log, path: &str, phase: &str) {
    log.wait_for(&format!("layer {path} disconnected {phase}"))
        .await;
    server.idle().await;
    let dropped = if phase == "handler" {
        format!("dropped {path}")
    } else {
        format!("body-dropped {path}")
    };
    let after_start: Vec<_> = log
        .entries()
        .into_iter()
        .filter(|e| !e.starts_with("start"))
        .collect();
    assert_eq!(
        after_start,
        [
            dropped,
            format!("handler {path} disconnected {phase}"),
            format!("layer {path} disconnected {phase}"),
        ]
    );
    let handles = log.handles();
    assert_eq!(handles.len(), 1);
    assert!(handles[0].token().is_cancelled());
    assert_eq!(
        handles[0].reason(),
        Some(tower_cancel::CancelReason::Disconnected)
    );
}

#[tokio::test]
async fn client_fin_while_handler_runs() {
    let log = Log::default();
    let server = Server::app(&log).await;
    let stream = raw_request(&server, &get("/slow")).await;
    log.wait_for("start /slow").await;
    drop(stream);
    assert_cancelled_once(&server, &log, "/slow", "handler").await;
}

#[tokio::test]
async fn client_rst_while_handler_runs() {
    let log = Log::default();
    let server = Server::app(&log).await;
    let stream = raw_request(&server, &get("/slow")).await;
    log.wait_for("start /slow").await;
    stream.set_zero_linger().unwrap();
    drop(stream);
    assert_cancelled_once(&server, &log, "/slow", "handler").await;
}

#[tokio::test]
async fn client_half_close_while_handler_runs() {
    let log = Log::default();
    let server = Server::app(&log).await;
    let mut stream = raw_request(&server, &get("/slow")).await;
    log.wait_for("start /slow").await;
    stream.shutdown().await.unwrap();
    assert_cancelled_once(&server, &log, "/slow", "handler").await;
    // hyper closes its side once the request is abandoned.
    let rest = read_to_close(&mut stream).await;
    assert_eq!(rest, "", "no response for an abandoned request");
}

#[tokio::test]
async fn small_post_with_unread_body() {
    let log = Log::default();
    let server = Server::app(&log).await;
    let body = "x".repeat(1000);
    let request = format!(
        "POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let stream = raw_request(&server, &request).await;
    log.wait_for("start /upload").await;
    drop(stream);
    assert_cancelled_once(&server, &log, "/upload", "handler").await;
}

#[tokio::test]
async fn streaming_response_abandoned_mid_body() {
    let log = Log::default();
    let server = Server::app(&log).await;
    let mut stream = raw_request(&server, &get("/endless")).await;
    // Read the head and a few chunks, then leave.
    let seen = read_until_count(&mut stream, CHUNK, 3).await;
    assert!(seen.starts_with("HTTP/1.1 200 OK\r\n"), "{seen:?}");
    stream.set_zero_linger().unwrap();
    drop(stream);
    assert_cancelled_once(&server, &log, "/endless", "body").await;
}

/// Sends `requests` on one keep-alive connection, reads all the responses, closes, and checks
/// that nothing was cancelled, also after the connection was gone.
async fn assert_completes(requests: &[(&str, &str)], expect_in_response: &[&str]) {
    let log = Log::default();
    let server = Server::app(&log).await;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut all = String::new();
    for (i, (method, path)) in requests.iter().enumerate() {
        let last = i + 1 == requests.len();
        let connection = if last { "close" } else { "keep-alive" };
        let request =
            format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: {connection}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        if !last {
            // Wait for this response to finish before sending the next one.
            all.push_str(&read_until(&mut stream, expect_in_response[i]).await);
        }
    }
    all.push_str(&read_to_close(&mut stream).await);
    drop(stream);
    server.idle().await;
    for expected in expect_in_response {
        assert!(all.contains(expected), "{expected:?} missing from {all:?}");
    }
    let cancellations: Vec<_> = log
        .entries()
        .into_iter()
        .filter(|e| {
            e.starts_with("handler ") || e.starts_with("layer ") || e.starts_with("dropped ")
        })
        .collect();
    assert_eq!(
        cancellations,
        Vec::<String>::new(),
        "log: {:?}",
        log.entries()
    );
    assert_eq!(log.handles().len(), requests.len());
    assert_all_completed(&log);
}

#[tokio::test]
async fn full_body_completes() {
    assert_completes(&[("GET", "/full")], &["hello"]).await;
}

#[tokio::test]
async fn empty_body_completes() {
    // An empty body ends at once: hyper never polls it.
    assert_completes(
        &[("GET", "/empty"), ("GET", "/full")],
        &["content-length: 0", "hello"],
    )
    .await;
}

#[tokio::test]
async fn chunked_stream_completes() {
    assert_completes(
        &[("GET", "/stream")],
        &["transfer-encoding: chunked", "0\r\n\r\n"],
    )
    .await;
}

#[tokio::test]
async fn stream_with_declared_length_completes() {
    // hyper stops polling this body after the declared bytes, without waiting for its end.
    assert_completes(&[("GET", "/stream-with-length")], &["content-length: 42"]).await;
}

#[tokio::test]
async fn responses_without_a_body_complete_with_their_head() {
    // HEAD and 204: hyper drops the body without polling it.
    assert_completes(
        &[
            ("HEAD", "/stream"),
            ("GET", "/no-content"),
            ("HEAD", "/full"),
        ],
        &[
            "HTTP/1.1 200 OK",
            "HTTP/1.1 204 No Content",
            "content-length: 5",
        ],
    )
    .await;
}

#[tokio::test]
async fn keep_alive_requests_complete_one_after_another() {
    assert_completes(
        &[
            ("GET", "/full"),
            ("GET", "/stream"),
            ("GET", "/stream-with-length"),
            ("GET", "/full"),
        ],
        &["hello", "0\r\n\r\n", "content-length: 42", "hello"],
    )
    .await;
}

#[tokio::test]
async fn handler_that_returns_before_the_client_leaves_is_not_cancelled() {
    let log = Log::default();
    let server = Server::app(&log).await;
    let mut stream = raw_request(&server, &get("/full")).await;
    let response = read_until(&mut stream, "hello").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
    // Leave abruptly right after the response; the request had already completed.
    stream.set_zero_linger().unwrap();
    drop(stream);
    server.idle().await;
    assert_eq!(log.with_prefix("layer"), Vec::<String>::new());
    assert_all_completed(&log);
}
