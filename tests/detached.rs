//! Per-route detach over real sockets: on one router, a detached route keeps running to its
//! end when its client leaves (tracked, token still cancelled with `Disconnected`, response
//! discarded), while the default routes are dropped as usual.

mod common;

use std::convert::Infallible;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};
use tower_cancel::{CancelReason, CancellationLayer, Detached, RequestCancellation};

type Route = BoxCloneService<Request<Incoming>, Response<AppBody>, Infallible>;

/// Logs `message` when dropped unless disarmed.
struct DropLog(Log, Option<String>);

impl Drop for DropLog {
    fn drop(&mut self) {
        if let Some(message) = self.1.take() {
            self.0.push(message);
        }
    }
}

/// `/pay` commits only when `release` is cancelled, then logs what its token says.
async fn pay(
    req: Request<Incoming>,
    log: Log,
    release: CancellationToken,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let rc = req
        .extensions()
        .get::<RequestCancellation>()
        .unwrap()
        .clone();
    log.keep(rc.clone());
    let l = log.clone();
    rc.on_cancel(move |c| l.push(describe("handler", c)));
    let mut dropped = DropLog(log.clone(), Some("dropped /pay".into()));
    log.push("start /pay");
    release.cancelled().await;
    let seen = rc.reason().map_or("none".to_owned(), |r| r.to_string());
    log.push(format!("committed /pay, token says {seen}"));
    dropped.1 = None;
    Ok(Response::new(Full::new(Bytes::from_static(b"paid"))))
}

/// One router: `/pay` behind a detached per-route layer, everything else the default app;
/// all of it behind an app-wide layer. Returns the server and the app-wide layer's tracker.
async fn serve(log: &Log, release: &CancellationToken) -> (Server, TaskTracker) {
    let (server, tracker, _) = serve_limited(log, release, None).await;
    (server, tracker)
}

/// [`serve`], with the detached route's `detached_limit` if given; also returns its layer.
async fn serve_limited(
    log: &Log,
    release: &CancellationToken,
    limit: Option<usize>,
) -> (Server, TaskTracker, CancellationLayer<Detached>) {
    let mut pay_layer = log.layer("route").detached();
    if let Some(limit) = limit {
        pay_layer = pay_layer.detached_limit(limit);
    }
    let layer = pay_layer.clone();
    let (l, r) = (log.clone(), release.clone());
    let pay: Route = BoxCloneService::new(
        pay_layer
            .layer(service_fn(move |req| pay(req, l.clone(), r.clone())))
            .map_response(|res| res.map(|body| body.map_err(|never| match never {}).boxed())),
    );
    let rest: Route = BoxCloneService::new(app(log.clone()));
    let router = service_fn(move |req: Request<Incoming>| {
        let route = if req.uri().path() == "/pay" {
            pay.clone()
        } else {
            rest.clone()
        };
        route.oneshot(req)
    });
    // The app-wide layer creates every request's scope: its tracker tracks the detached
    // handler (where a graceful shutdown waits), not the route layer's own.
    let app_layer = log.layer("layer");
    let tracker = app_layer.get_task_tracker().clone();
    let svc = ServiceBuilder::new().layer(app_layer).service(router);
    (Server::start(svc).await, tracker, layer)
}

fn about(log: &Log, path: &str) -> Vec<String> {
    let needle = format!(" {path}");
    log.entries()
        .into_iter()
        .filter(|e| e.contains(&needle) || e.ends_with(path))
        .collect()
}

async fn finish_detached_work(release: &CancellationToken, tracker: &TaskTracker) {
    release.cancel();
    tracker.close();
    tokio::time::timeout(PATIENCE, tracker.wait())
        .await
        .expect("detached handler finished");
}

#[tokio::test]
async fn a_detached_route_outlives_its_client_and_a_default_route_does_not() {
    let log = Log::default();
    let release = CancellationToken::new();
    let (server, tracker) = serve(&log, &release).await;
    let pay = raw_request(&server, &get("/pay")).await;
    let slow = raw_request(&server, &get("/slow")).await;
    log.wait_for("start /pay").await;
    log.wait_for("start /slow").await;
    drop((pay, slow));
    log.wait_for("layer /pay disconnected handler").await;
    log.wait_for("layer /slow disconnected handler").await;

    // The default route was dropped; the detached one is still running, tracked.
    assert_eq!(
        about(&log, "/slow"),
        [
            "start /slow",
            "dropped /slow",
            "handler /slow disconnected handler",
            "layer /slow disconnected handler",
        ]
    );
    assert_eq!(
        tracker.len(),
        1,
        "the detached handler is tracked by the app-wide layer"
    );
    // Its token is cancelled and every callback ran at once, though it keeps running.
    assert_eq!(
        about(&log, "/pay"),
        [
            "start /pay",
            "handler /pay disconnected handler",
            "route /pay disconnected handler",
            "layer /pay disconnected handler",
        ]
    );

    finish_detached_work(&release, &tracker).await;
    assert_eq!(
        about(&log, "/pay")[4..],
        ["committed /pay, token says disconnected"]
    );
    assert!(!log.entries().contains(&"dropped /pay".to_owned()));
    server.idle().await;
}

#[tokio::test]
async fn a_reset_http2_stream_leaves_a_detached_handler_running() {
    let log = Log::default();
    let release = CancellationToken::new();
    let (server, tracker) = serve(&log, &release).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let pending = tokio::spawn(h2.send_request(h2_get(&server, "/pay")));
    log.wait_for("start /pay").await;
    pending.abort(); // RST_STREAM
    log.wait_for("layer /pay disconnected handler").await;
    assert_eq!(tracker.len(), 1);
    finish_detached_work(&release, &tracker).await;
    assert_eq!(
        about(&log, "/pay").last().unwrap(),
        "committed /pay, token says disconnected"
    );
    assert_eq!(log.handles()[0].reason(), Some(CancelReason::Disconnected));
}

#[tokio::test]
async fn a_detached_route_whose_client_waits_answers_normally() {
    let log = Log::default();
    let release = CancellationToken::new();
    let (server, tracker) = serve(&log, &release).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let pending = tokio::spawn(h2.send_request(h2_get(&server, "/pay")));
    log.wait_for("start /pay").await;
    release.cancel();
    let response = pending.await.unwrap().unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "paid");
    assert_eq!(
        about(&log, "/pay"),
        ["start /pay", "committed /pay, token says none"]
    );
    tracker.close();
    tracker.wait().await;
    assert_all_completed(&log);
}

#[tokio::test]
async fn past_the_detached_limit_a_request_is_refused_before_its_handler_starts() {
    // Two abandoned payments still run (the limit); a third request gets 503 and its handler
    // never starts; other routes are served; once the two finished, payments start again.
    let log = Log::default();
    let release = CancellationToken::new();
    let (server, tracker, layer) = serve_limited(&log, &release, Some(2)).await;
    for _ in 0..2 {
        let client = raw_request(&server, &get("/pay")).await;
        log.wait_for_count("start /pay", log.with_prefix("start /pay").len() + 1)
            .await;
        drop(client);
    }
    log.wait_for_count("layer /pay disconnected", 2).await;
    assert_eq!(layer.detached_counts().running, 2);

    let mut refused = raw_request(&server, &get("/pay")).await;
    let answer = read_until(&mut refused, "\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer:?}");
    let counts = layer.detached_counts();
    assert_eq!((counts.running, counts.refused), (2, 1));
    assert_eq!(log.with_prefix("start /pay").len(), 2, "not started");
    let mut other = raw_request(&server, &get("/full")).await;
    assert!(
        read_until(&mut other, "hello")
            .await
            .starts_with("HTTP/1.1 200 ")
    );

    finish_detached_work(&release, &tracker).await;
    assert_eq!(layer.detached_counts().running, 0);
    let mut again = raw_request(&server, &get("/pay")).await;
    let answer = read_until(&mut again, "paid").await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    // The refused request was answered, not cancelled: two cancellations in all.
    assert_eq!(
        log.with_prefix("layer /pay").len(),
        2,
        "{:?}",
        log.entries()
    );
}
