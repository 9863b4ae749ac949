//! Cell 2: HTTP/2 rapid reset (CVE-2023-44487): eight clients open streams (HEADERS) and
//! reset them (RST_STREAM) a batch at a time, reconnecting whenever the server sends them
//! away, 20 000 streams in all, against (a) an attached route whose handler waits 20 s and
//! (b) a `detached()` route with `detached_limit(256)` whose handler takes 20 s. Bare is the
//! same route with hyper alone: a reset stream's handler is dropped. Before 88a9bc1 a
//! detached route had no bound: 12 993 handlers ran at once after a 20 000-reset run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::child::Config;
use crate::harness::{MIB, Pair, Server, proc_available};

const CLIENTS: u64 = 8;
const STREAMS: u64 = 20_000;
const LIMIT: usize = 256;
/// Streams opened before they are reset, in one go (as in `tests/rapid_reset.rs`).
const BATCH: usize = 100;

/// One attacking client: opens `BATCH` streams, gives the server a moment to start their
/// handlers, resets them all, and again, `streams` times in all; a new connection after each
/// GOAWAY or error. Returns the connections it needed.
async fn attacker(addr: SocketAddr, path: &'static str, streams: u64) -> u64 {
    let (mut sent, mut connections) = (0, 0);
    while sent < streams {
        connections += 1;
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let Ok((mut client, connection)) = h2::client::handshake(stream).await else {
            continue;
        };
        let driver = tokio::spawn(connection);
        let mut open = Vec::with_capacity(BATCH);
        'connection: while sent < streams {
            while open.len() < BATCH && sent + (open.len() as u64) < streams {
                client = match client.ready().await {
                    Ok(client) => client,
                    Err(_) => break 'connection,
                };
                let request = http::Request::get(format!("http://{addr}{path}"))
                    .body(())
                    .unwrap();
                let Ok(stream) = client.send_request(request, true) else {
                    break 'connection;
                };
                open.push(stream);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            for (_response, mut stream) in open.drain(..) {
                stream.send_reset(h2::Reason::CANCEL);
                sent += 1;
            }
        }
        // Streams of a connection that failed mid-batch count as sent: they were opened.
        sent += open.len() as u64;
        open.clear();
        driver.abort();
    }
    connections
}

/// The attack against both servers at once; meanwhile the layered server's counts are
/// sampled every 5 ms. Returns the connections the attack needed per server, the most
/// detached handlers the layered server reported running, and how long it took.
async fn attack(pair: &Pair, path: &'static str) -> ([u64; 2], u64, Duration) {
    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let most_running = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, most) = (Arc::clone(&done), Arc::clone(&most_running));
        let layered = &pair.layered;
        async move {
            while !done.load(Ordering::SeqCst) {
                let running = layered.stats().await.get("det_running");
                most.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let clients = pair.both().map(|server: &Server| {
        let addr = server.addr;
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| tokio::spawn(attacker(addr, path, STREAMS / CLIENTS)))
            .collect();
        async move {
            let mut connections = 0;
            for client in clients {
                connections += client.await.unwrap();
            }
            connections
        }
    });
    let [bare, layered] = clients;
    let attacks = async {
        let connections = tokio::join!(bare, layered);
        done.store(true, Ordering::SeqCst);
        connections
    };
    let ((bare, layered), ()) = tokio::join!(attacks, sampler);
    (
        [bare, layered],
        most_running.load(Ordering::SeqCst),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_attached() {
    if !proc_available("h2_rapid_reset_attached") {
        return;
    }
    let pair = Pair::start(Config::default()).await;
    let (connections, _, took) = attack(&pair, "/slow").await;
    // Every reset handler was dropped, and every cancellation's cleanup ran or was refused.
    let settled = |s: &crate::harness::Stats| {
        s.get("live") == 0 && s.get("cl_running") == 0 && s.get("cl_queued") == 0
    };
    let bare = pair.bare.until("every handler dropped", settled).await;
    let layered = pair.layered.until("every handler dropped", settled).await;
    let accounting = format!(
        "{STREAMS} resets in {took:.1?} on {} / {} connections; handlers at once: bare {}, \
         layered {}; {} cancelled (disconnected), cleanups {} run + {} refused",
        connections[0],
        connections[1],
        bare.get("max_live"),
        layered.get("max_live"),
        layered.get("cancelled"),
        layered.get("cl_completed"),
        layered.get("cl_refused"),
    );
    let cell = "2a h2 rapid reset, attached route";
    let mut checks = pair.report(cell, &accounting).await;
    checks.equal(
        layered.get("cl_completed") + layered.get("cl_refused"),
        layered.get("cancelled"),
        "cleanups run or refused, against cancellations (none lost, none left running)",
    );
    checks.equal(
        layered.get("disconnected"),
        layered.get("cancelled"),
        "cancellations as Disconnected, against all",
    );
    // What the layer adds per request (a scope, its callbacks) goes with the request.
    checks.growth_within(8 * MIB);
    checks.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_detached() {
    if !proc_available("h2_rapid_reset_detached") {
        return;
    }
    let config = Config {
        detached_limit: LIMIT,
        ..Config::default()
    };
    let pair = Pair::start(config).await;
    let (connections, most_running, took) = attack(&pair, "/detached/slow").await;
    let bare = pair
        .bare
        .until("every handler dropped", |s| s.get("live") == 0)
        .await;
    let layered = pair.layered.stats().await;
    let accounting = format!(
        "{STREAMS} resets in {took:.1?} on {} / {} connections; handlers at once: bare {}, \
         layered {} (detached_counts: at most {most_running} running, {} refused with 503, \
         limit {LIMIT}); {} cancelled",
        connections[0],
        connections[1],
        bare.get("max_live"),
        layered.get("max_live"),
        layered.get("det_refused"),
        layered.get("cancelled"),
    );
    let cell = "2b h2 rapid reset, detached route, limit 256";
    let mut checks = pair.report(cell, &accounting).await;
    checks.that(most_running <= LIMIT as u64, || {
        format!("detached_counts reported {most_running} running, over the limit {LIMIT}")
    });
    let most = layered.get("max_live");
    checks.that(most <= LIMIT as u64, || {
        format!("{most} detached handlers ran at once (counted by the handlers), over {LIMIT}")
    });
    checks.that(layered.get("det_refused") > 0, || {
        format!("none refused: the attack never reached the limit: {layered:?}")
    });
    // At most `LIMIT` handlers outlive their streams: their tasks, requests and scopes.
    checks.growth_within(8 * MIB);
    checks.done();
}
