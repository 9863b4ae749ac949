//! The shutdown cascade over real sockets: cancelling the layer's shutdown token cancels every
//! request in flight (HTTP/1.1 and HTTP/2, handler and body phase) without dropping handlers,
//! and requests that arrive afterwards start cancelled.

mod common;

use common::*;
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_cancel::{CancelReason, CancellationLayer};

async fn serve(log: &Log, layer: CancellationLayer) -> Server {
    Server::start(ServiceBuilder::new().layer(layer).service(app(log.clone()))).await
}

fn sorted(mut entries: Vec<String>) -> Vec<String> {
    entries.sort();
    entries
}

#[tokio::test]
async fn shutdown_cancels_every_request_in_flight_and_handlers_answer() {
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let server = serve(&log, log.layer("layer").shutdown_token(shutdown.clone())).await;

    let mut h1 = raw_request(&server, &get("/honour")).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let h2_honour = tokio::spawn(h2.send_request(h2_get(&server, "/honour")));
    let h2_slow = tokio::spawn(h2.send_request(h2_get(&server, "/slow")));
    let endless = h2.send_request(h2_get(&server, "/endless")).await.unwrap();
    let mut endless = endless.into_body();
    assert!(endless.frame().await.unwrap().unwrap().is_data());
    log.wait_for_count("start /honour", 2).await;
    log.wait_for("start /slow").await;

    shutdown.cancel();

    // Handlers that honour their token answer at once, on both protocols.
    let response = read_until(&mut h1, "stopped").await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    let response = h2_honour.await.unwrap().unwrap();
    assert_eq!(response.status(), 503);
    // Every request's callbacks ran, including those of a handler that ignores its token
    // (still sleeping) and of a body that is streaming.
    log.wait_for_count("layer", 4).await;
    assert_eq!(
        sorted(log.with_prefix("layer")),
        [
            "layer /endless shutdown body",
            "layer /honour shutdown handler",
            "layer /honour shutdown handler",
            "layer /slow shutdown handler",
        ]
    );
    assert_eq!(
        sorted(log.with_prefix("stopped")),
        ["stopped /honour shutdown", "stopped /honour shutdown"]
    );
    // Nothing was dropped: shutdown leaves the answer to the handler.
    assert!(!h2_slow.is_finished());
    assert!(log.with_prefix("dropped").is_empty(), "{:?}", log.entries());
    assert!(endless.frame().await.unwrap().unwrap().is_data());
    assert!(log.with_prefix("body-dropped").is_empty());
    for rc in log.handles() {
        assert_eq!(rc.reason(), Some(CancelReason::Shutdown));
    }
}

#[tokio::test]
async fn a_request_after_shutdown_starts_cancelled() {
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let server = serve(&log, log.layer("layer").shutdown_token(shutdown.clone())).await;
    let mut first = raw_request(&server, &get("/honour")).await;
    log.wait_for("start /honour").await;
    shutdown.cancel();
    read_until(&mut first, "stopped").await;

    for protocol in ["http/1.1", "h2"] {
        let before = log.entries().len();
        if protocol == "h2" {
            let (mut h2, _conn, _socket) = h2_client(&server).await;
            let response = h2.send_request(h2_get(&server, "/honour")).await.unwrap();
            assert_eq!(response.status(), 503);
        } else {
            let mut late = raw_request(&server, &get("/honour")).await;
            let response = read_until(&mut late, "stopped").await;
            assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        }
        // The layer's callback ran when the request arrived, before the handler started;
        // the handler's registration (made before it logs `start`) ran at once; the handler
        // saw a cancelled token.
        assert_eq!(
            log.entries()[before..],
            [
                "layer /honour shutdown handler",
                "handler /honour shutdown handler",
                "start /honour",
                "stopped /honour shutdown",
            ],
            "{protocol}"
        );
    }
}

#[tokio::test]
async fn a_per_route_layer_brings_its_own_shutdown_token() {
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let svc = ServiceBuilder::new()
        .layer(log.layer("outer"))
        .layer(log.layer("route").shutdown_token(shutdown.clone()))
        .service(app(log.clone()));
    let server = Server::start(svc).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let honour = tokio::spawn(h2.send_request(h2_get(&server, "/honour")));
    log.wait_for("start /honour").await;
    shutdown.cancel();
    assert_eq!(honour.await.unwrap().unwrap().status(), 503);
    assert_eq!(
        log.entries()[1..],
        [
            "handler /honour shutdown handler",
            "route /honour shutdown handler",
            "outer /honour shutdown handler",
            "stopped /honour shutdown",
        ]
    );
}

#[tokio::test]
async fn completed_requests_are_untouched_by_a_later_shutdown() {
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let server = serve(&log, log.layer("layer").shutdown_token(shutdown.clone())).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    for path in ["/full", "/stream"] {
        let response = h2.send_request(h2_get(&server, path)).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    shutdown.cancel();
    // A request that arrives now is cancelled: proof that the shutdown was processed.
    let response = h2.send_request(h2_get(&server, "/honour")).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(log.with_prefix("layer"), ["layer /honour shutdown handler"]);
    let handles = log.handles();
    assert_eq!(handles[0].reason(), None);
    assert_eq!(handles[1].reason(), None);
}
