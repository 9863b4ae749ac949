//! HTTP/2 (prior knowledge, hyper's client) over real sockets: stream resets, connection
//! close, mid-body abandonment, completion, and isolation between streams.

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use tower_cancel::CancelReason;

/// What a cancellation logs: dropped handlers and bodies, and callbacks. (hyper also drops
/// the bodies of HEAD and 204 responses unpolled; those are not cancellations.)
fn cancellations(log: &Log) -> Vec<String> {
    log.entries()
        .into_iter()
        .filter(|e| !e.starts_with("start"))
        .filter(|e| {
            !e.starts_with("body-dropped /stream") && !e.starts_with("body-dropped /no-content")
        })
        .collect()
}

#[tokio::test]
async fn dropping_the_response_future_resets_the_stream() {
    let log = Log::default();
    let server = Server::app(&log).await;
    let (mut client, conn, _socket) = h2_client(&server).await;
    let pending = tokio::spawn(client.send_request(h2_get(&server, "/slow")));
    log.wait_for("start /slow").await;
    pending.abort(); // drops the response future: hyper's client sends RST_STREAM(CANCEL)
    log.wait_for("layer /slow disconnected handler").await;
    assert_eq!(
        cancellations(&log),
        [
            "dropped /slow",
            "handler /slow disconnected handler",
            "layer /slow disconnected handler",
        ]
    );
    // The connection is still usable, and the next request completes.
    let response = client.send_request(h2_get(&server, "/full")).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello");
    drop(client);
    conn.await.unwrap();
    server.idle().await;
    assert_eq!(log.with_prefix("layer").len(), 1, "{:?}", log.entries());
    let handles = log.handles();
    assert_eq!(handles[0].reason(), Some(CancelReason::Disconnected));
    assert_eq!(handles[1].reason(), None);
}

#[tokio::test]
async fn closing_the_connection_cancels_every_stream() {
    let log = Log::default();
    let server = Server::app(&log).await;
    let (mut client, _conn, socket) = h2_client(&server).await;
    let a = tokio::spawn(client.send_request(h2_get(&server, "/slow")));
    let b = tokio::spawn(client.send_request(h2_get(&server, "/upload")));
    log.wait_for("start /slow").await;
    log.wait_for("start /upload").await;
    socket.shutdown(std::net::Shutdown::Both).unwrap(); // the TCP connection closes
    server.idle().await;
    let mut layer = log.with_prefix("layer");
    layer.sort();
    assert_eq!(
        layer,
        [
            "layer /slow disconnected handler",
            "layer /upload disconnected handler"
        ]
    );
    assert_eq!(log.with_prefix("handler").len(), 2);
    assert!(a.await.unwrap().is_err() && b.await.unwrap().is_err());
}

#[tokio::test]
async fn dropping_the_body_mid_stream_is_a_body_phase_cancel() {
    let log = Log::default();
    let server = Server::app(&log).await;
    let (mut client, conn, _socket) = h2_client(&server).await;
    let response = client
        .send_request(h2_get(&server, "/endless"))
        .await
        .unwrap();
    let mut body = response.into_body();
    for _ in 0..3 {
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), CHUNK);
    }
    drop(body); // RST_STREAM while the server is still sending
    log.wait_for("layer /endless disconnected body").await;
    assert_eq!(
        cancellations(&log),
        [
            "body-dropped /endless",
            "handler /endless disconnected body",
            "layer /endless disconnected body",
        ]
    );
    drop(client);
    conn.await.unwrap();
    server.idle().await;
    assert_eq!(log.with_prefix("layer").len(), 1);
}

#[tokio::test]
async fn full_and_streamed_bodies_complete() {
    let log = Log::default();
    let server = Server::app(&log).await;
    let (mut client, conn, _socket) = h2_client(&server).await;
    for (path, expected) in [
        ("/full", b"hello".to_vec()),
        ("/empty", Vec::new()),
        ("/stream", CHUNK.repeat(3)),
        ("/stream-with-length", CHUNK.repeat(3)),
    ] {
        let response = client.send_request(h2_get(&server, path)).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, expected, "{path}");
    }
    let head = http::Request::head(server.url("/stream"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = client.send_request(head).await.unwrap();
    assert_eq!(response.status(), 200);
    let no_content = client
        .send_request(h2_get(&server, "/no-content"))
        .await
        .unwrap();
    assert_eq!(no_content.status(), 204);
    drop((response, no_content));
    drop(client);
    conn.await.unwrap();
    server.idle().await;
    assert_eq!(cancellations(&log), Vec::<String>::new());
    assert_eq!(log.handles().len(), 6);
    assert_all_completed(&log);
}

#[tokio::test]
async fn a_reset_stream_does_not_touch_its_neighbours() {
    let log = Log::default();
    let server = Server::app(&log).await;
    let (mut client, conn, _socket) = h2_client(&server).await;
    // A long stream that will complete, and a slow request on the same connection.
    let streamed = client
        .send_request(h2_get(&server, "/stream"))
        .await
        .unwrap();
    let slow = tokio::spawn(client.send_request(h2_get(&server, "/slow")));
    log.wait_for("start /slow").await;
    slow.abort();
    log.wait_for("layer /slow disconnected handler").await;
    let body = streamed.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, CHUNK.repeat(3));
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .unwrap()
        .unwrap();
    server.idle().await;
    assert_eq!(
        log.with_prefix("layer"),
        ["layer /slow disconnected handler"]
    );
    let handles = log.handles();
    assert_eq!(handles.len(), 2);
    let reasons: Vec<_> = handles.iter().map(|rc| rc.reason()).collect();
    assert!(reasons.contains(&None) && reasons.contains(&Some(CancelReason::Disconnected)));
}
