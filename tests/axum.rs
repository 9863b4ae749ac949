//! axum over real sockets: the `RequestCancellation` extractor, an app-wide layer plus a
//! per-route `route_layer` with extra cleanup, the rejection without a layer, the optional
//! extractor, and an SSE stream that stops when its client leaves (phase `Body`).

mod common;

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::response::sse::{Event, Sse};
use axum::routing::get as route_get;
use common::*;
use futures_util::stream::{self, Stream};
use http_body_util::BodyExt;
use tower_cancel::{CancelReason, RequestCancellation};

fn router(log: &Log) -> Router {
    let (l1, l2, l3) = (log.clone(), log.clone(), log.clone());
    Router::new()
        .route(
            "/slow",
            route_get(move |cancel: RequestCancellation| slow(cancel, l1.clone())),
        )
        .route(
            "/events",
            route_get(move |cancel: RequestCancellation| events(cancel, l2.clone())),
        )
        .route(
            "/upload",
            route_get(move |cancel: RequestCancellation| slow(cancel, l3.clone()))
                .route_layer(log.layer("route")),
        )
        .route(
            "/optional",
            route_get(|cancel: Option<RequestCancellation>| async move {
                format!("layer present: {}", cancel.is_some())
            }),
        )
        .layer(log.layer("app"))
}

async fn slow(cancel: RequestCancellation, log: Log) -> &'static str {
    log.keep(cancel.clone());
    let l = log.clone();
    cancel.on_cancel(move |c| l.push(describe("handler", c)));
    log.push("start");
    tokio::time::sleep(Duration::from_secs(30)).await;
    "slow"
}

/// One event every 5 ms, forever, until the client leaves.
async fn events(
    cancel: RequestCancellation,
    log: Log,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    log.keep(cancel);
    log.push("start");
    let ticks = stream::unfold(0u64, |n| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Some((Ok(Event::default().data(format!("tick {n}"))), n + 1))
    });
    Sse::new(ticks)
}

#[tokio::test]
async fn app_wide_and_per_route_layers_run_once_each() {
    let log = Log::default();
    let server = Server::start(router(&log)).await;
    let stream = raw_request(&server, &get("/upload")).await;
    log.wait_for("start").await;
    drop(stream);
    server.idle().await;
    assert_eq!(
        log.entries(),
        [
            "start",
            "handler /upload disconnected handler",
            "route /upload disconnected handler",
            "app /upload disconnected handler",
        ]
    );
    assert_eq!(log.handles()[0].reason(), Some(CancelReason::Disconnected));
}

#[tokio::test]
async fn the_extractor_sees_its_client_leave() {
    let log = Log::default();
    let server = Server::start(router(&log)).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let pending = tokio::spawn(h2.send_request(h2_get(&server, "/slow")));
    log.wait_for("start").await;
    pending.abort();
    log.wait_for("app /slow disconnected handler").await;
    assert_eq!(
        log.entries(),
        [
            "start",
            "handler /slow disconnected handler",
            "app /slow disconnected handler"
        ]
    );
}

#[tokio::test]
async fn an_sse_client_that_leaves_cancels_in_the_body_phase() {
    let log = Log::default();
    let server = Server::start(router(&log)).await;
    let mut stream = raw_request(&server, &get("/events")).await;
    let received = read_until(&mut stream, "tick 2").await;
    assert!(received.contains("text/event-stream"), "{received}");
    drop(stream);
    log.wait_for("app /events disconnected body").await;
    server.idle().await;
    assert_eq!(log.entries(), ["start", "app /events disconnected body"]);
}

#[tokio::test]
async fn without_a_layer_the_extractor_rejects_and_says_what_to_add() {
    let app = Router::new()
        .route(
            "/",
            route_get(|_: RequestCancellation| async { "unreachable" }),
        )
        .route(
            "/optional",
            route_get(|cancel: Option<RequestCancellation>| async move {
                format!("layer present: {}", cancel.is_some())
            }),
        );
    let server = Server::start(app).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;

    let response = h2.send_request(h2_get(&server, "/")).await.unwrap();
    assert_eq!(response.status(), 500);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("CancellationLayer::new()") && body.contains("Router"),
        "{body}"
    );

    let response = h2.send_request(h2_get(&server, "/optional")).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "layer present: false");
}

#[tokio::test]
async fn the_optional_extractor_finds_the_layer() {
    let log = Log::default();
    let server = Server::start(router(&log)).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let response = h2.send_request(h2_get(&server, "/optional")).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "layer present: true");
    assert!(log.entries().is_empty(), "completed: {:?}", log.entries());
}

#[tokio::test]
async fn a_handler_can_be_tested_without_a_server_with_a_test_handle() {
    // Feature `test-util`: a handle no layer serves, put where the layer would put it, drives
    // a Router's handler through the extractor; `cancel_with` plays the client leaving.
    use tower::ServiceExt;
    let app: Router = Router::new().route(
        "/report",
        route_get(|cancel: RequestCancellation| async move {
            tokio::select! {
                reason = cancel.cancelled() => format!("abandoned: {reason}"),
                () = tokio::time::sleep(Duration::from_secs(30)) => "report ready".to_owned(),
            }
        }),
    );
    let cancel = RequestCancellation::for_test();
    let mut request = http::Request::get("/report")
        .body(axum::body::Body::empty())
        .unwrap();
    request.extensions_mut().insert(cancel.clone());
    let response = tokio::spawn(app.oneshot(request));
    tokio::time::sleep(Duration::from_millis(20)).await;
    cancel.cancel_with(CancelReason::Disconnected);
    let response = response.await.unwrap().unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "abandoned: disconnected");
    assert_eq!(cancel.reason(), Some(CancelReason::Disconnected));
}

#[tokio::test]
async fn a_cancellation_record_carries_the_request_id_and_the_matched_route() {
    // `record_header` and `record_extension` keep what ties a cancellation to its request:
    // the client's `x-request-id`, and axum's `MatchedPath` (the layer runs after routing).
    use axum::extract::MatchedPath;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let app: Router = Router::new()
        .route(
            "/items/{id}",
            route_get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .layer(
            tower_cancel::CancellationLayer::new()
                .record_header(http::HeaderName::from_static("x-request-id"))
                .record_extension::<MatchedPath>()
                .on_cancel(move |c| {
                    let id = c
                        .header("x-request-id")
                        .map(|v| v.to_str().unwrap().to_owned());
                    let route = c.extension::<MatchedPath>().map(|p| p.as_str().to_owned());
                    log.lock()
                        .unwrap()
                        .push((c.uri().path().to_owned(), id, route));
                }),
        );
    let server = Server::start(app).await;
    for (path, id) in [("/items/7", Some("req-7")), ("/items/8", None)] {
        let mut head = format!("GET {path} HTTP/1.1\r\nhost: t\r\n");
        if let Some(id) = id {
            head.push_str(&format!("x-request-id: {id}\r\n"));
        }
        head.push_str("\r\n");
        let stream = raw_request(&server, &head).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(stream);
    }
    eventually("both cancelled", || seen.lock().unwrap().len() == 2).await;
    let route = Some("/items/{id}".to_owned());
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (
                "/items/7".to_owned(),
                Some("req-7".to_owned()),
                route.clone()
            ),
            ("/items/8".to_owned(), None, route),
        ]
    );
}
