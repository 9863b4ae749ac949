//! Bounded async cleanup over real sockets: 10 000 requests in flight on one HTTP/2
//! connection are cancelled at once (the client closes the connection) against a limit of 16
//! running and 1 000 queued cleanups. The rest are refused, each with a `warn` event, and
//! counted; none is lost; the number of tasks never grows past the limit.

mod common;

use std::convert::Infallible;
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::{Layer, service_fn};
use tower_cancel::{CancellationLayer, Cancelled, CleanupCounts};
use tracing_subscriber::layer::SubscriberExt;

const REQUESTS: usize = 10_000;
const RUNNING: usize = 16;
const QUEUED: usize = 1_000;

/// Counts the `warn` events of target `tower_cancel`.
#[derive(Clone, Default)]
struct Warnings(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() == tracing::Level::WARN && meta.target() == "tower_cancel" {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_cancellations_against_a_limit_of_sixteen() {
    let warnings = Warnings::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(warnings.clone()))
        .unwrap();

    let gate = CancellationToken::new();
    let ran = Arc::new(AtomicUsize::new(0));
    let (g, r) = (gate.clone(), ran.clone());
    let layer = CancellationLayer::new()
        .max_running_cleanups(RUNNING)
        .max_queued_cleanups(QUEUED)
        .on_cancel_async(move |_: Cancelled| {
            let (gate, ran) = (g.clone(), r.clone());
            async move {
                gate.cancelled().await;
                ran.fetch_add(1, Ordering::SeqCst);
            }
        });
    let tracker = layer.get_task_tracker().clone();

    let started = Arc::new(AtomicUsize::new(0));
    let all_started = Arc::new(Notify::new());
    let (s, a) = (started.clone(), all_started.clone());
    let handler = service_fn(move |_: Request<Incoming>| {
        if s.fetch_add(1, Ordering::SeqCst) + 1 == REQUESTS {
            a.notify_one();
        }
        async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    });
    let server = Server::start(layer.clone().layer(handler)).await;

    let (h2, _conn, socket) = h2_client(&server).await;
    let mut requests = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let mut h2 = h2.clone();
        let request = h2_get(&server, "/park");
        requests.push(tokio::spawn(async move { h2.send_request(request).await }));
    }
    tokio::time::timeout(PATIENCE, all_started.notified())
        .await
        .expect("every request reached the handler");

    // One event cancels all of them.
    socket.shutdown(Shutdown::Both).unwrap();
    eventually("every cancellation to be counted", || {
        let c = layer.cleanup_counts();
        c.running + c.queued + c.refused as usize == REQUESTS
    })
    .await;
    let refused = REQUESTS - RUNNING - QUEUED;
    assert_eq!(
        layer.cleanup_counts(),
        counts(RUNNING, QUEUED, refused as u64, 0)
    );
    assert_eq!(
        tracker.len(),
        RUNNING + QUEUED,
        "tasks: one per running slot; queued cleanups are tracked, not spawned"
    );
    assert_eq!(warnings.0.load(Ordering::SeqCst), refused, "one warn each");
    server.idle().await;

    // Release the gate: the queue drains through the 16 slots, and the tracker waits for all.
    gate.cancel();
    tracker.close();
    tokio::time::timeout(PATIENCE, tracker.wait())
        .await
        .expect("every admitted cleanup ran");
    assert_eq!(ran.load(Ordering::SeqCst), RUNNING + QUEUED);
    assert_eq!(
        layer.cleanup_counts(),
        counts(0, 0, refused as u64, (RUNNING + QUEUED) as u64)
    );
    for request in requests {
        assert!(request.await.unwrap().is_err(), "no request completed");
    }
}

fn counts(running: usize, queued: usize, refused: u64, completed: u64) -> CleanupCounts {
    let mut c = CleanupCounts::default();
    c.running = running;
    c.queued = queued;
    c.refused = refused;
    c.completed = completed;
    c
}
