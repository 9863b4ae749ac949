//! Callback semantics over real sockets: explicit cancellation, stacking, panics, async
//! cleanup and the runtime it runs on.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use http::{Request, Response};
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_cancel::{CancelReason, CancellationLayer, Cancelled, RequestCancellation};

#[tokio::test]
async fn a_token_cancelled_by_the_handler_is_explicit_and_fires_once() {
    let log = Log::default();
    let server = Server::start(
        ServiceBuilder::new()
            .layer(log.layer("layer"))
            .service(app(log.clone())),
    )
    .await;
    let mut stream = raw_request(&server, &get("/cancel-self")).await;
    // The handler's answer still reaches the client.
    let response = read_until(&mut stream, "cancelled myself").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
    drop(stream);
    server.idle().await;
    assert_eq!(
        log.entries()[1..],
        [
            "handler /cancel-self explicit handler",
            "layer /cancel-self explicit handler"
        ]
    );
    assert_eq!(log.handles()[0].reason(), Some(CancelReason::Explicit));
}

#[tokio::test]
async fn a_token_cancelled_directly_cancels_the_request_only_if_the_layer_finds_it_waiting() {
    // The layer never asks the token on a request's way to completion (its `is_cancelled`
    // takes a mutex): it notices a token cancelled directly when it finds the handler or body
    // pending, or dropped. A handler that cancels its token and answers at once completed.
    for (path, expected) in [
        ("/cancel-token", vec![]),
        (
            "/cancel-token-then-wait",
            vec![
                "handler /cancel-token-then-wait explicit handler",
                "layer /cancel-token-then-wait explicit handler",
            ],
        ),
    ] {
        let log = Log::default();
        let server = Server::start(
            ServiceBuilder::new()
                .layer(log.layer("layer"))
                .service(app(log.clone())),
        )
        .await;
        let mut stream = raw_request(&server, &get(path)).await;
        let response = read_until(&mut stream, "cancelled my token").await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
        drop(stream);
        server.idle().await;
        assert_eq!(log.entries()[1..], expected, "{path}");
        // What the getters say either way: the token is cancelled.
        assert_eq!(log.handles()[0].reason(), Some(CancelReason::Explicit));
    }
}

#[tokio::test]
async fn a_token_cancelled_by_other_code_is_noticed_by_the_handle() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let layer = CancellationLayer::new().on_cancel(move |c: &Cancelled| {
        assert_eq!(c.reason(), CancelReason::Explicit);
        r.fetch_add(1, Ordering::SeqCst);
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<RequestCancellation>();
    let tx = std::sync::Mutex::new(Some(tx));
    let svc = layer.layer_svc(service_fn(move |req: Request<()>| {
        let rc = req
            .extensions()
            .get::<RequestCancellation>()
            .unwrap()
            .clone();
        tx.lock().unwrap().take().unwrap().send(rc.clone()).unwrap();
        async move {
            // Honours the token: returns when it is cancelled.
            let reason = rc.cancelled().await;
            Ok::<_, std::convert::Infallible>(Response::new(reason.to_string()))
        }
    }));
    let call = tokio::spawn(svc.oneshot(Request::new(())));
    let rc = rx.await.unwrap();
    rc.token().cancel(); // e.g. from a task the handler spawned
    let response = call.await.unwrap().unwrap();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap();
    // The handle reports it; the handler woke and answered before the layer found it
    // waiting again, so the request completed: nothing recorded, no callback.
    assert_eq!(body.to_bytes(), "explicit");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(rc.reason(), Some(CancelReason::Explicit));
}

trait LayerExt {
    fn layer_svc<S>(&self, inner: S) -> tower_cancel::server::CancellationService<S>;
}

impl LayerExt for CancellationLayer {
    fn layer_svc<S>(&self, inner: S) -> tower_cancel::server::CancellationService<S> {
        tower::Layer::layer(self, inner)
    }
}

#[tokio::test]
async fn a_deeper_layer_joins_the_outer_scope() {
    let log = Log::default();
    let seen_by_outer = Log::default();
    let keep = seen_by_outer.clone();
    let server = Server::start(
        ServiceBuilder::new()
            .layer(log.layer("outer"))
            .map_request(move |req: Request<hyper::body::Incoming>| {
                keep.keep(
                    req.extensions()
                        .get::<RequestCancellation>()
                        .unwrap()
                        .clone(),
                );
                req
            })
            .layer(log.layer("inner"))
            .service(app(log.clone())),
    )
    .await;

    // Disconnect: handler, inner, outer, each once.
    let stream = raw_request(&server, &get("/slow")).await;
    log.wait_for("start /slow").await;
    drop(stream);
    server.idle().await;
    assert_eq!(
        log.entries()[1..],
        [
            "dropped /slow",
            "handler /slow disconnected handler",
            "inner /slow disconnected handler",
            "outer /slow disconnected handler",
        ]
    );

    // One token per request: the handler cancelling its token is seen by the outer layer.
    let mut stream = raw_request(&server, &get("/cancel-self")).await;
    read_until(&mut stream, "cancelled myself").await;
    drop(stream);
    server.idle().await;
    let outer_view = &seen_by_outer.handles()[1];
    assert!(outer_view.token().is_cancelled());
    assert_eq!(outer_view.reason(), Some(CancelReason::Explicit));
    let explicit: Vec<_> = log
        .entries()
        .into_iter()
        .filter(|e| e.contains("/cancel-self explicit"))
        .collect();
    assert_eq!(
        explicit,
        [
            "handler /cancel-self explicit handler",
            "inner /cancel-self explicit handler",
            "outer /cancel-self explicit handler",
        ]
    );
}

#[tokio::test]
async fn panicking_callbacks_are_contained() {
    let log = Log::default();
    let l = log.clone();
    let layer = CancellationLayer::new()
        .on_cancel(|_: &Cancelled| panic!("layer callback panics"))
        .on_cancel(move |c: &Cancelled| l.push(describe("after-panic", c)))
        .on_cancel_async(|_: Cancelled| async { panic!("async cleanup panics") });
    let server = Server::start(
        ServiceBuilder::new()
            .layer(layer)
            .map_request(|req: Request<hyper::body::Incoming>| {
                let rc = req.extensions().get::<RequestCancellation>().unwrap();
                rc.on_cancel(|_| panic!("handler callback panics"));
                req
            })
            .service(app(log.clone())),
    )
    .await;
    for _ in 0..2 {
        let stream = raw_request(&server, &get("/slow")).await;
        log.wait_for_count("start /slow", log.with_prefix("start").len() + 1)
            .await;
        drop(stream);
        server.idle().await;
    }
    // Both requests ran every non-panicking callback; the server still serves.
    assert_eq!(log.with_prefix("handler /slow disconnected").len(), 2);
    assert_eq!(log.with_prefix("after-panic /slow disconnected").len(), 2);
    let mut stream = raw_request(&server, &get("/full")).await;
    let response = read_until(&mut stream, "hello").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_cleanup_is_tracked_and_awaited() {
    let log = Log::default();
    let tracker = TaskTracker::new();
    let release = Arc::new(Notify::new());
    let (l, r) = (log.clone(), release.clone());
    let server_runtime = tokio::runtime::Handle::current().id();
    let marker = log.clone();
    let layer = CancellationLayer::new()
        .on_cancel_async(move |c: Cancelled| {
            let (log, release) = (l.clone(), r.clone());
            async move {
                release.notified().await;
                let same = tokio::runtime::Handle::current().id() == server_runtime;
                log.push(format!("{} same-runtime={same}", describe("async", &c)));
            }
        })
        // Runs after the async cleanup was spawned: callbacks run in the order they were added.
        .on_cancel(move |c: &Cancelled| marker.push(describe("layer", c)))
        .task_tracker(tracker.clone());
    let server = Server::start(ServiceBuilder::new().layer(layer).service(app(log.clone()))).await;
    let stream = raw_request(&server, &get("/slow")).await;
    log.wait_for("start /slow").await;
    drop(stream);
    log.wait_for("layer /slow disconnected handler").await;
    assert_eq!(tracker.len(), 1, "the cleanup is tracked while it runs");
    assert!(log.with_prefix("async").is_empty());

    tracker.close();
    let waiting = tokio::spawn({
        let tracker = tracker.clone();
        async move { tracker.wait().await }
    });
    release.notify_one();
    tokio::time::timeout(PATIENCE, waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        log.with_prefix("async"),
        ["async /slow disconnected handler same-runtime=true"]
    );
}

#[test]
fn async_cleanup_runs_on_the_runtime_the_request_arrived_on() {
    // The response future is created on `rt` but dropped on a thread with no runtime: the
    // cleanup still runs on `rt`, because the handle was captured when the request arrived.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let layer = CancellationLayer::new().on_cancel_async(move |c: Cancelled| {
        let tx = tx.clone();
        async move {
            let id = tokio::runtime::Handle::current().id();
            tx.send((id, c.reason())).unwrap();
        }
    });
    let tracker = layer.get_task_tracker().clone();
    let mut svc = layer.layer_svc(service_fn(|_: Request<()>| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, std::convert::Infallible>(Response::new(String::new()))
    }));
    // Creating the future inside the runtime is what `call` sees; it is not awaited here.
    let future = {
        let _inside = rt.enter();
        svc.call(Request::new(()))
    };
    std::thread::spawn(move || drop(future)).join().unwrap();
    let (id, reason) = rx.recv_timeout(PATIENCE).unwrap();
    assert_eq!(id, rt.handle().id());
    assert_eq!(reason, CancelReason::Disconnected);
    tracker.close();
    rt.block_on(tracker.wait());
}

#[tokio::test]
async fn the_extension_token_is_the_handles_token() {
    let svc = CancellationLayer::new().layer_svc(service_fn(|req: Request<()>| async move {
        let token = req
            .extensions()
            .get::<tokio_util::sync::CancellationToken>()
            .unwrap();
        let rc = req.extensions().get::<RequestCancellation>().unwrap();
        assert!(!rc.is_cancelled());
        token.cancel();
        assert!(rc.token().is_cancelled());
        Ok::<_, std::convert::Infallible>(Response::new(format!("{:?}", rc.reason())))
    }));
    let response = svc.oneshot(Request::new(())).await.unwrap();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap();
    assert_eq!(body.to_bytes(), "Some(Explicit)");
}
