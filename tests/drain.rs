//! Graceful shutdown with async cleanups still pending: `drain_cleanups` awaits every one of
//! them, running or queued behind the limit, and reports the ones that overrun its deadline.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tower::{Layer, service_fn};
use tower_cancel::{CancellationLayer, Cancelled, CleanupCounts, RequestCancellation};
use tracing_subscriber::layer::SubscriberExt;

const REQUESTS: usize = 10;

/// A handler that waits for its request to be cancelled, then answers 503.
fn until_cancelled() -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(|req: Request<Incoming>| async move {
        let rc = RequestCancellation::from_extensions(req.extensions()).unwrap();
        rc.cancelled().await;
        let mut response = Response::new(Full::new(Bytes::from_static(b"shutting down")));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        Ok::<_, Infallible>(response)
    })
}

/// Sends `count` requests on one HTTP/2 connection. One that reaches the layer after the
/// shutdown began starts cancelled, so each request gets its cleanup either way.
async fn in_flight(
    server: &Server,
    count: usize,
) -> Vec<tokio::task::JoinHandle<Result<Response<Incoming>, hyper::Error>>> {
    let (h2, _conn, _socket) = h2_client(server).await;
    (0..count)
        .map(|i| {
            let mut h2 = h2.clone();
            let request = h2_get(server, &format!("/job/{i}"));
            tokio::spawn(async move { h2.send_request(request).await })
        })
        .collect()
}

fn pending(c: &CleanupCounts) -> usize {
    c.running + c.queued
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_awaits_every_cleanup_running_or_queued() {
    let shutdown = CancellationToken::new();
    let done = Arc::new(Mutex::new(Vec::<String>::new()));
    // The cleanups wait for this gate, so that the queue is seen full before the drain.
    let gate = CancellationToken::new();
    let (d, g) = (done.clone(), gate.clone());
    let layer = CancellationLayer::new()
        .shutdown_token(shutdown.clone())
        .max_running_cleanups(2)
        .max_queued_cleanups(100)
        .on_cancel_async(move |c: Cancelled| {
            let (done, gate) = (d.clone(), g.clone());
            async move {
                gate.cancelled().await;
                // Stands for cleanup I/O.
                tokio::time::sleep(Duration::from_millis(5)).await;
                done.lock().unwrap().push(c.uri().path().to_owned());
            }
        });
    let server = Server::start(layer.layer(until_cancelled())).await;
    let requests = in_flight(&server, REQUESTS).await;

    shutdown.cancel();
    eventually("every cleanup to be submitted", || {
        let c = layer.cleanup_counts();
        pending(&c) + c.completed as usize == REQUESTS
    })
    .await;
    let at_drain = layer.cleanup_counts();
    assert_eq!(
        (at_drain.running, at_drain.queued),
        (2, REQUESTS - 2),
        "two run, the rest wait behind the limit: {at_drain:?}"
    );
    gate.cancel();

    let counts = layer
        .drain_cleanups(PATIENCE)
        .await
        .expect("the drain finished in time");
    assert_eq!(
        (
            counts.running,
            counts.queued,
            counts.refused,
            counts.completed
        ),
        (0, 0, 0, REQUESTS as u64)
    );
    let mut paths = done.lock().unwrap().clone();
    paths.sort();
    let mut expected: Vec<String> = (0..REQUESTS).map(|i| format!("/job/{i}")).collect();
    expected.sort();
    assert_eq!(
        paths, expected,
        "each cleanup ran to its end before the drain returned"
    );

    for request in requests {
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}

/// The `warn` events of target `tower_cancel`, as "status path" lines.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() != tracing::Level::WARN || meta.target() != "tower_cancel" {
            return;
        }
        #[derive(Default)]
        struct Fields {
            status: String,
            path: String,
        }
        impl tracing::field::Visit for Fields {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                match field.name() {
                    "status" => self.status = value.to_owned(),
                    "path" => self.path = value.to_owned(),
                    _ => {}
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let line = format!("{} {}", fields.status, fields.path);
        self.0.lock().unwrap().push(line);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanups_that_overrun_the_drain_are_reported_then_still_awaited() {
    let warnings = Warnings::default();
    // The drain runs on this thread, so a thread-local subscriber sees its events.
    let _subscriber =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
    let shutdown = CancellationToken::new();
    let release = CancellationToken::new();
    let r = release.clone();
    let layer = CancellationLayer::new()
        .shutdown_token(shutdown.clone())
        .max_running_cleanups(1)
        .max_queued_cleanups(10)
        .on_cancel_async(move |_: Cancelled| {
            let release = r.clone();
            async move { release.cancelled().await }
        });
    let server = Server::start(layer.layer(until_cancelled())).await;
    let requests = in_flight(&server, 3).await;

    shutdown.cancel();
    eventually("one cleanup running and two queued", || {
        let c = layer.cleanup_counts();
        (c.running, c.queued) == (1, 2)
    })
    .await;

    let overran = layer
        .drain_cleanups(Duration::from_millis(100))
        .await
        .expect_err("the cleanups wait for a release that has not come");
    assert_eq!((overran.counts.running, overran.counts.queued), (1, 2));
    assert_eq!(overran.timeout, Duration::from_millis(100));
    assert_eq!(
        overran.to_string(),
        "1 async cancellation cleanup(s) still running and 2 queued after 100ms"
    );
    let mut reported = warnings.0.lock().unwrap().clone();
    reported.sort();
    assert_eq!(
        reported.len(),
        3,
        "one event per unfinished cleanup: {reported:?}"
    );
    assert_eq!(
        reported
            .iter()
            .filter(|line| line.starts_with("running /job/"))
            .count(),
        1,
        "{reported:?}"
    );
    assert_eq!(
        reported
            .iter()
            .filter(|line| line.starts_with("queued /job/"))
            .count(),
        2,
        "{reported:?}"
    );

    // Nothing was dropped by the report: released, all three run, and a second drain sees it.
    release.cancel();
    let counts = layer.drain_cleanups(PATIENCE).await.unwrap();
    assert_eq!((counts.running, counts.queued, counts.completed), (0, 0, 3));
    for request in requests {
        assert_eq!(
            request.await.unwrap().unwrap().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}

#[tokio::test]
async fn a_per_route_layer_s_cleanup_is_drained_by_the_outermost_layer() {
    // One rule: the layer that creates the request's scope (the outermost) counts every task
    // the request leaves running, so its drain and its tracker wait for a per-route layer's
    // async cleanup too.
    let done = Arc::new(Mutex::new(Vec::<&str>::new()));
    let d = done.clone();
    let route = CancellationLayer::new().on_cancel_async(move |_: Cancelled| {
        let done = d.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            done.lock().unwrap().push("route cleanup");
        }
    });
    let app = CancellationLayer::new();
    let svc = app.layer(route.layer(until_cancelled()));
    let server = Server::start(svc).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let call = tokio::spawn(h2.send_request(h2_get(&server, "/job")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    call.abort(); // RST_STREAM: the request is cancelled, the route's cleanup starts
    eventually("the cleanup is running", || {
        app.cleanup_counts().running == 1
    })
    .await;
    assert_eq!(route.cleanup_counts().running, 0, "not the route layer's");
    assert_eq!(
        app.get_task_tracker().len(),
        1,
        "tracked by the outermost layer"
    );
    let counts = app.drain_cleanups(Duration::from_secs(5)).await.unwrap();
    assert_eq!(counts.completed, 1);
    assert_eq!(*done.lock().unwrap(), ["route cleanup"]);
}
