//! Composition with tower-http's `TimeoutLayer` over real sockets: which order gives which
//! outcome. The layer's own `timeout`, the alternative, is tested in tests/deadlines.rs;
//! `TraceLayer` in tests/tracing.rs, which owns the global subscriber.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use tower::ServiceBuilder;
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
