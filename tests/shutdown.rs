//! The shutdown cascade over real sockets: cancelling the layer's shutdown token cancels every
//! request in flight (HTTP/1.1 and HTTP/2, handler and body phase) without dropping handlers,
//! and requests whose scope is created after `cancel()` returned start cancelled: on either
//! runtime, for the first request of a layer, and for a layer built from a cancelled token.

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
    assert_each_protocol_starts_cancelled(&server, &log, "after a request").await;
}

/// Sends `/honour` over HTTP/1.1, then HTTP/2, and checks that each started cancelled: the
/// layer's callback ran when the request arrived, before the handler started; the handler's
/// registration (made before it logs `start`) ran at once; the handler saw a cancelled token
/// and answered 503.
async fn assert_each_protocol_starts_cancelled(server: &Server, log: &Log, case: &str) {
    for protocol in ["http/1.1", "h2"] {
        let before = log.entries().len();
        if protocol == "h2" {
            let (mut h2, _conn, _socket) = h2_client(server).await;
            let response = h2.send_request(h2_get(server, "/honour")).await.unwrap();
            assert_eq!(response.status(), 503, "{case} {protocol}");
        } else {
            let mut late = raw_request(server, &get("/honour")).await;
            let response = read_until(&mut late, "stopped").await;
            assert!(response.starts_with("HTTP/1.1 503"), "{case}: {response}");
        }
        assert_eq!(
            log.entries()[before..],
            [
                "layer /honour shutdown handler",
                "handler /honour shutdown handler",
                "start /honour",
                "stopped /honour shutdown",
            ],
            "{case} {protocol}"
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

/// When the shutdown token is cancelled, relative to the request that must see it.
#[derive(Clone, Copy, Debug)]
enum Cancel {
    /// Before the layer is built: a process told to stop while it was starting.
    BeforeTheLayer,
    /// After the layer is built, before its first request (no watcher task exists yet).
    BeforeTheFirstRequest,
    /// After a request was served (the watcher was spawned but has not run since).
    AfterARequest,
    /// On another thread, which tells the request side once `cancel()` returned.
    OnAnotherThread,
}

const WHEN: [Cancel; 4] = [
    Cancel::BeforeTheLayer,
    Cancel::BeforeTheFirstRequest,
    Cancel::AfterARequest,
    Cancel::OnAnotherThread,
];

/// What a handler saw on its first line.
#[derive(Debug, PartialEq)]
struct Seen {
    is_cancelled: bool,
    token_cancelled: bool,
    reason: Option<CancelReason>,
    /// The layer's callbacks that had run for this request before the handler started.
    callbacks_before: usize,
}

const STARTED_CANCELLED: Seen = Seen {
    is_cancelled: true,
    token_cancelled: true,
    reason: Some(CancelReason::Shutdown),
    callbacks_before: 1,
};

/// One layer, one shutdown token cancelled as `when` says, then one request, in process: what
/// its handler saw first.
async fn first_look(when: Cancel) -> Seen {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use tower::{Layer, Service, ServiceExt, service_fn};
    use tower_cancel::RequestCancellation;

    let shutdown = CancellationToken::new();
    if let Cancel::BeforeTheLayer = when {
        shutdown.cancel();
    }
    let callbacks = Arc::new(AtomicUsize::new(0));
    let counted = callbacks.clone();
    let layer = CancellationLayer::new()
        .shutdown_token(shutdown.clone())
        .on_cancel(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        });
    let seen = Arc::new(Mutex::new(None));
    let slot = seen.clone();
    let mut svc = layer.layer(service_fn(move |req: http::Request<()>| {
        let rc = req
            .extensions()
            .get::<RequestCancellation>()
            .unwrap()
            .clone();
        let token = req.extensions().get::<CancellationToken>().unwrap().clone();
        *slot.lock().unwrap() = Some(Seen {
            is_cancelled: rc.is_cancelled(),
            token_cancelled: token.is_cancelled(),
            reason: rc.reason(),
            callbacks_before: callbacks.load(Ordering::SeqCst),
        });
        async { Ok::<_, std::convert::Infallible>(http::Response::new(String::new())) }
    }));
    match when {
        Cancel::BeforeTheLayer => {}
        Cancel::BeforeTheFirstRequest => shutdown.cancel(),
        Cancel::AfterARequest => {
            let response = svc.ready().await.unwrap().call(http::Request::new(()));
            response.await.unwrap().into_body().collect().await.unwrap();
            shutdown.cancel();
        }
        Cancel::OnAnotherThread => {
            let (returned, cancel_returned) = tokio::sync::oneshot::channel();
            let canceller = shutdown.clone();
            std::thread::spawn(move || {
                canceller.cancel();
                returned.send(()).unwrap();
            });
            cancel_returned.await.unwrap();
        }
    }
    let response = svc.ready().await.unwrap().call(http::Request::new(()));
    response.await.unwrap();
    seen.lock().unwrap().take().expect("the handler ran")
}

/// 1 000 rounds of each way to cancel before the request: the handler's very first look
/// always finds the request cancelled with `Shutdown`, its callbacks already run.
async fn every_round_starts_cancelled() {
    for when in WHEN {
        for round in 0..1_000 {
            assert_eq!(
                first_look(when).await,
                STARTED_CANCELLED,
                "{when:?}, round {round}"
            );
        }
    }
}

#[test]
fn a_request_after_cancel_returned_starts_cancelled_on_the_current_thread_runtime() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(every_round_starts_cancelled());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_after_cancel_returned_starts_cancelled_on_the_multi_thread_runtime() {
    every_round_starts_cancelled().await;
}

/// Over sockets, HTTP/1.1 and HTTP/2: a server whose shutdown token was cancelled before its
/// first request (before or after the layer was built) answers every request from a handler
/// that found it cancelled, its callbacks already run.
async fn over_sockets_the_first_request_starts_cancelled() {
    for round in 0..20 {
        let when = if round % 2 == 0 {
            Cancel::BeforeTheLayer
        } else {
            Cancel::BeforeTheFirstRequest
        };
        let log = Log::default();
        let shutdown = CancellationToken::new();
        if let Cancel::BeforeTheLayer = when {
            shutdown.cancel();
        }
        let layer = log.layer("layer").shutdown_token(shutdown.clone());
        if let Cancel::BeforeTheFirstRequest = when {
            shutdown.cancel();
        }
        let server = serve(&log, layer).await;
        assert_each_protocol_starts_cancelled(&server, &log, &format!("{when:?}, round {round}"))
            .await;
    }
}

#[test]
fn over_sockets_the_first_request_starts_cancelled_on_the_current_thread_runtime() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(over_sockets_the_first_request_starts_cancelled());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_sockets_the_first_request_starts_cancelled_on_the_multi_thread_runtime() {
    over_sockets_the_first_request_starts_cancelled().await;
}

/// The watcher task lives on the runtime of the layer's first request. If that runtime shuts
/// down, the next request spawns a new one on its own runtime, so requests in flight there
/// are still cancelled when the shutdown begins.
#[test]
fn requests_on_a_second_runtime_are_cancelled_after_the_first_one_shut_down() {
    use tower::{Layer, ServiceExt, service_fn};
    use tower_cancel::RequestCancellation;

    let shutdown = CancellationToken::new();
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let notify = started.clone();
    let svc = CancellationLayer::new()
        .shutdown_token(shutdown.clone())
        .layer(service_fn(move |req: http::Request<()>| {
            let rc = req
                .extensions()
                .get::<RequestCancellation>()
                .unwrap()
                .clone();
            let started = notify.clone();
            async move {
                if req.uri().path() == "/fast" {
                    return Ok::<_, std::convert::Infallible>(http::Response::new(String::new()));
                }
                started.notify_one();
                let reason = tokio::time::timeout(PATIENCE, rc.cancelled()).await;
                Ok(http::Response::new(format!("{reason:?}")))
            }
        }));
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    // The first request spawns the watcher on this runtime, which then shuts down.
    runtime().block_on(async {
        let fast = http::Request::get("/fast").body(()).unwrap();
        svc.clone().oneshot(fast).await.unwrap();
    });
    let answer = runtime().block_on(async {
        let slow = http::Request::get("/slow").body(()).unwrap();
        let call = tokio::spawn(svc.clone().oneshot(slow));
        started.notified().await;
        shutdown.cancel();
        let response = call.await.unwrap().unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    });
    assert_eq!(answer, "Ok(Shutdown)");
}
