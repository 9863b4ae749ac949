//! Composition with tower-http's `TimeoutLayer` and `CatchPanicLayer` over real sockets: which
//! order gives which outcome. The layer's own `timeout`, the alternative, is tested in tests/deadlines.rs;
//! `TraceLayer` in tests/tracing.rs, which owns the global subscriber.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;

const LIMIT: Duration = Duration::from_millis(50);

async fn get_status(server: &Server, path: &str) -> String {
    let mut stream = raw_request(server, &get(path)).await;
    read_until(&mut stream, "\r\n").await
}

#[tokio::test]
async fn timeout_layer_outside_is_seen_as_a_drop() {
    // TimeoutLayer drops the cancellation layer's future: from inside, that is exactly what a
    // client leaving looks like, so it is recorded as `Disconnected`.
    let log = Log::default();
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            LIMIT,
        ))
        .layer(log.layer("layer"))
        .service(app(log.clone()));
    let server = Server::start(svc).await;
    assert!(
        get_status(&server, "/slow")
            .await
            .starts_with("HTTP/1.1 504")
    );
    assert_eq!(
        log.entries(),
        [
            "start /slow",
            "dropped /slow",
            "handler /slow disconnected handler",
            "layer /slow disconnected handler",
        ]
    );
}

#[tokio::test]
async fn timeout_layer_inside_hides_the_timeout() {
    // TimeoutLayer drops the handler and answers 504 itself: the cancellation layer sees a
    // response that completes, so nothing is cancelled, and the handler's registrations are
    // dropped without running. This order loses the cleanup: avoid it.
    let log = Log::default();
    let svc = ServiceBuilder::new()
        .layer(log.layer("layer"))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            LIMIT,
        ))
        .service(app(log.clone()));
    let server = Server::start(svc).await;
    assert!(
        get_status(&server, "/slow")
            .await
            .starts_with("HTTP/1.1 504")
    );
    server.idle().await;
    assert_eq!(log.entries(), ["start /slow", "dropped /slow"]);
    assert_eq!(log.handles()[0].reason(), None);
}

#[tokio::test]
async fn catch_panic_outside_records_the_panic_not_the_client() {
    // The handler's panic unwinds through the layer's future, which CatchPanicLayer then
    // drops: the server failed, the client did not leave, and the record says so.
    let log = Log::default();
    let svc = ServiceBuilder::new()
        .layer(CatchPanicLayer::new())
        .layer(log.layer("layer"))
        .service(app(log.clone()));
    let server = Server::start(svc).await;
    assert!(
        get_status(&server, "/panic")
            .await
            .starts_with("HTTP/1.1 500")
    );
    log.wait_for("layer /panic panicked handler").await;
    assert_eq!(
        log.entries(),
        [
            "start /panic",
            "dropped /panic",
            "handler /panic panicked handler",
            "layer /panic panicked handler",
        ]
    );
}

#[tokio::test]
async fn catch_panic_inside_answers_500_and_the_request_completes() {
    // The panic is caught before it reaches the layer: the layer sees a 500 response, which
    // completes when it was sent. Nothing is cancelled (the handler's registrations are
    // dropped without running).
    let log = Log::default();
    let svc = ServiceBuilder::new()
        .layer(log.layer("layer"))
        .layer(CatchPanicLayer::new())
        .service(app(log.clone()));
    let server = Server::start(svc).await;
    assert!(
        get_status(&server, "/panic")
            .await
            .starts_with("HTTP/1.1 500")
    );
    server.idle().await;
    assert_eq!(log.entries(), ["start /panic", "dropped /panic"]);
    assert_eq!(log.handles()[0].reason(), None);
}

#[tokio::test]
async fn an_uncaught_panic_in_the_handler_or_the_body_is_recorded_as_panicked() {
    // No CatchPanicLayer: the panic unwinds into hyper's connection task, which Tokio catches
    // and drops (the client sees its connection close). Over HTTP/1.1 and HTTP/2, in the
    // handler and in the response body.
    for h2 in [false, true] {
        let log = Log::default();
        let svc = ServiceBuilder::new()
            .layer(log.layer("layer"))
            .service(app(log.clone()));
        let server = Server::start(svc).await;
        for (path, phase) in [("/panic", "handler"), ("/panic-body", "body")] {
            let entry = format!("layer {path} panicked {phase}");
            if h2 {
                let (mut client, _conn, _socket) = h2_client(&server).await;
                let _ = client.send_request(h2_get(&server, path)).await;
            } else {
                let mut stream = raw_request(&server, &get(path)).await;
                let _ = read_to_close(&mut stream).await;
            }
            log.wait_for(&entry).await;
            assert_eq!(log.with_prefix("layer "), [entry], "h2: {h2}, {path}");
            log.clear();
        }
    }
}
