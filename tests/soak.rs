//! Soak: many requests over loopback, about half of them abandoned by their client at a random
//! point (before the response head, or in the middle of the body), on HTTP/2 and HTTP/1.1.
//!
//! Afterwards every scope is freed (the debug-build live-scope counter is back to zero), the
//! layer's callback ran exactly once per abandoned request that reached the server, and memory
//! stopped growing after the first tenth of the run.
//!
//! `cargo test --test soak` runs the short form (40 000 requests, a few seconds). The full
//! form, 1 000 000 requests: `cargo test --test soak -- --ignored --nocapture` (a debug build,
//! where the live-scope counter exists; about 12 000 requests per second on 2 cores).
//! `SOAK_REQUESTS` overrides either count.
#![cfg(debug_assertions)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::{Layer, service_fn};
use tower_cancel::{CancellationLayer, Cancelled};

/// Client tasks running at once: this many HTTP/2 streams and HTTP/1.1 connections in flight.
const CLIENTS: usize = 32;

/// What the server saw.
#[derive(Default)]
struct Counts {
    /// Handler entries for routes that never complete by themselves: each must be cancelled.
    endless: AtomicU64,
    /// Handler entries for the route that completes.
    fast: AtomicU64,
    /// Runs of the layer's callback.
    callbacks: AtomicU64,
}

type Body = BoxBody<Bytes, Infallible>;

/// `/fast`: a small full response. `/slow`: waits forever (until dropped). `/stream`: a body
/// of 1 KiB chunks every millisecond, forever.
fn app(
    counts: Arc<Counts>,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |req: Request<Incoming>| {
        let counts = counts.clone();
        async move {
            match req.uri().path() {
                "/fast" => {
                    counts.fast.fetch_add(1, Ordering::SeqCst);
                    Ok(Response::new(
                        Full::new(Bytes::from_static(b"done")).boxed(),
                    ))
                }
                "/slow" => {
                    counts.endless.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                    unreachable!()
                }
                _ => {
                    counts.endless.fetch_add(1, Ordering::SeqCst);
                    let chunks = futures_util::stream::unfold((), |()| async {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        Some((
                            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 1024]))),
                            (),
                        ))
                    });
                    Ok(Response::new(StreamBody::new(chunks).boxed()))
                }
            }
        }
    })
}

/// One client action, chosen at random: complete a request, or abandon one before its head
/// or in the middle of its body. Returns whether it abandoned.
enum Action {
    Complete,
    BeforeHead,
    MidBody,
}

fn action(random: &mut u64) -> Action {
    match next(random) % 4 {
        0 | 1 => Action::Complete,
        2 => Action::BeforeHead,
        _ => Action::MidBody,
    }
}

/// xorshift64: deterministic per client, no dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// A random pause of up to about a millisecond: where in its life the request is abandoned.
async fn random_pause(random: &mut u64) {
    match next(random) % 3 {
        0 => tokio::task::yield_now().await,
        1 => tokio::time::sleep(Duration::from_micros(next(random) % 1000)).await,
        _ => {}
    }
}

fn h2_request(addr: SocketAddr, path: &str) -> Request<http_body_util::Empty<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(http_body_util::Empty::new())
        .unwrap()
}

async fn h2_action(h2: &mut H2Sender, addr: SocketAddr, random: &mut u64) -> bool {
    match action(random) {
        Action::Complete => {
            let response = h2.send_request(h2_request(addr, "/fast")).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"done");
            false
        }
        Action::BeforeHead => {
            let request = h2.send_request(h2_request(addr, "/slow"));
            let _ = tokio::time::timeout(Duration::from_micros(next(random) % 1000), request).await;
            true
        }
        Action::MidBody => {
            let response = h2.send_request(h2_request(addr, "/stream")).await.unwrap();
            let mut body = response.into_body();
            body.frame().await.unwrap().unwrap();
            random_pause(random).await;
            true
        }
    }
}

/// HTTP/1.1 over raw TCP: a completed request keeps its connection; an abandoned one closes it.
async fn h1_action(conn: &mut Option<TcpStream>, addr: SocketAddr, random: &mut u64) -> bool {
    let stream = match conn {
        Some(stream) => stream,
        None => conn.insert(TcpStream::connect(addr).await.unwrap()),
    };
    let action = action(random);
    let path = match action {
        Action::Complete => "/fast",
        Action::BeforeHead => "/slow",
        Action::MidBody => "/stream",
    };
    stream.write_all(get(path).as_bytes()).await.unwrap();
    match action {
        Action::Complete => {
            let response = read_until(stream, "done").await;
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            false
        }
        Action::BeforeHead => {
            random_pause(random).await;
            *conn = None;
            true
        }
        Action::MidBody => {
            let mut buf = [0u8; 2048];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0);
            random_pause(random).await;
            *conn = None;
            true
        }
    }
}

/// Resident set size of this process (`smaps_rollup` walks the page tables: exact).
fn rss() -> u64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let kib: u64 = rollup
        .lines()
        .find_map(|line| line.strip_prefix("Rss:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|value| value.trim().parse().ok())
        .expect("an `Rss:` line in kB");
    kib * 1024
}

/// The live-scope counter is process-wide: one soak at a time (`--include-ignored` would run
/// both at once).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn soak(requests: u64) {
    let _alone = ONE_AT_A_TIME.lock().await;
    assert_eq!(tower_cancel::__live_scopes(), 0, "a clean start");
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    let layer = CancellationLayer::new().on_cancel(move |_: &Cancelled| {
        c.callbacks.fetch_add(1, Ordering::SeqCst);
    });
    let server = Server::start(layer.layer(app(counts.clone()))).await;

    let issued = Arc::new(AtomicU64::new(0));
    let abandoned = Arc::new(AtomicU64::new(0));
    let checkpoint = requests / 10;
    let rss_at_checkpoint = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (issued, abandoned, rss_at_checkpoint) =
            (issued.clone(), abandoned.clone(), rss_at_checkpoint.clone());
        let addr = server.addr;
        clients.push(tokio::spawn(async move {
            let mut random = 0x9E37_79B9_7F4A_7C15 ^ (client as u64 + 1).wrapping_mul(0x2545_F491);
            let http2 = client % 2 == 0;
            let mut h2 = None;
            let mut h1 = None;
            loop {
                let n = issued.fetch_add(1, Ordering::SeqCst);
                if n >= requests {
                    return;
                }
                if n == checkpoint {
                    rss_at_checkpoint.store(rss(), Ordering::SeqCst);
                }
                let gave_up = if http2 {
                    let sender = match &mut h2 {
                        Some(sender) => sender,
                        None => {
                            let (sender, _conn, _socket) = h2_client_to(addr).await;
                            h2.insert(sender)
                        }
                    };
                    h2_action(sender, addr, &mut random).await
                } else {
                    h1_action(&mut h1, addr, &mut random).await
                };
                if gave_up {
                    abandoned.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let elapsed = started.elapsed();
    // Every connection closes (the HTTP/2 clients drop their senders with their tasks), and
    // hyper drops what each request left (HTTP/2 streams run in tasks of their own, which may
    // finish after their connection): once no scope is alive, every cancellation has fired.
    server.idle().await;
    eventually_no_live_scopes().await;

    let endless = counts.endless.load(Ordering::SeqCst);
    let abandoned = abandoned.load(Ordering::SeqCst);
    let callbacks = counts.callbacks.load(Ordering::SeqCst);
    let (rss_checkpoint, rss_end) = (rss_at_checkpoint.load(Ordering::SeqCst), rss());
    println!(
        "soak: {requests} requests in {elapsed:.1?} ({:.0}/s); {abandoned} abandoned by the \
         client, {endless} of them reached the handler; {callbacks} callbacks; {} completed; \
         RSS {:.1} MiB after {checkpoint}, {:.1} MiB at the end",
        requests as f64 / elapsed.as_secs_f64(),
        counts.fast.load(Ordering::SeqCst),
        rss_checkpoint as f64 / 1048576.0,
        rss_end as f64 / 1048576.0,
    );

    assert_eq!(
        callbacks, endless,
        "one callback per abandoned request that reached the server, none for completed ones"
    );
    assert!(
        endless <= abandoned && abandoned > requests / 3,
        "{abandoned} abandoned"
    );
    let growth = rss_end.saturating_sub(rss_checkpoint);
    assert!(
        growth < 4 << 20,
        "RSS grew {:.1} MiB after the first tenth",
        growth as f64 / 1048576.0
    );
}

/// Scopes are freed as the server's connection tasks finish dropping what they held.
async fn eventually_no_live_scopes() {
    eventually("every scope to be freed (any left is a leak)", || {
        tower_cancel::__live_scopes() == 0
    })
    .await;
    assert_eq!(tower_cancel::__live_scopes(), 0);
}

fn requests(default: u64) -> u64 {
    std::env::var("SOAK_REQUESTS").map_or(default, |n| n.parse().expect("SOAK_REQUESTS"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_short() {
    soak(requests(40_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a million requests: run with `cargo test --test soak -- --ignored --nocapture`"]
async fn soak_full() {
    soak(requests(1_000_000)).await;
}
