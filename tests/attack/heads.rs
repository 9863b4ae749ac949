//! Cells 3 and 4: request heads that never finish (500 HTTP/1.1 connections with half a head;
//! 500 HTTP/2 connections whose HEADERS frame lacks END_HEADERS and no CONTINUATION follows)
//! and oversized heads (1 MiB over HTTP/1.1; a 1 MiB header list in HEADERS + CONTINUATION
//! over HTTP/2). hyper deals with all of them before a request exists, so the layers are
//! never reached: the layered server must hold what bare hyper holds, and answer as it does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::child::Config;
use crate::harness::{MIB, Pair, Server, Stats, connection_errors, proc_available};
use crate::wire;

const CONNECTIONS: u64 = 500;
/// How long the unfinished heads are held before the servers are looked at.
const HOLD: Duration = Duration::from_secs(1);
const OVERSIZED: usize = 20;
const ONE_MIB: usize = 1 << 20;

/// Opens `CONNECTIONS` connections to `server` and writes `bytes` on each.
async fn open_all(server: &Server, bytes: &[u8]) -> Vec<TcpStream> {
    let mut streams = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        wire::write(&mut stream, bytes).await;
        streams.push(stream);
    }
    streams
}

/// Both servers take the unfinished heads; after `HOLD`, each must still be where bare hyper
/// is: no handler started (no request exists), as many connections kept open, and no more
/// memory than bare beyond what connections of its own service type cost.
async fn unfinished(cell: &str, bytes: &[u8], what: &str) {
    let pair = Pair::start(Config::default()).await;
    let (bare, layered) = tokio::join!(open_all(&pair.bare, bytes), open_all(&pair.layered, bytes));
    for server in pair.both() {
        server
            .until("every connection accepted", |s| {
                s.get("accepted") >= server.before.get("accepted") + CONNECTIONS
            })
            .await;
    }
    tokio::time::sleep(HOLD).await;
    let open = [pair.bare.stats().await, pair.layered.stats().await].map(|s| s.get("conns"));
    let started = [
        pair.bare.handlers_started().await,
        pair.layered.handlers_started().await,
    ];
    let accounting = format!(
        "{CONNECTIONS} {what}; after {HOLD:?} hyper keeps {} (bare) / {} (layered) open; \
         handlers started: {} / {}",
        open[0], open[1], started[0], started[1]
    );
    let mut checks = pair.report(cell, &accounting).await;
    drop((bare, layered));
    checks.equal(started, [0, 0], "handlers started (no request exists)");
    checks.equal(
        open[1],
        open[0],
        "connections the layered server keeps, against bare",
    );
    // Its connections hold a service of another type (clones of the layers' Arcs): 2 MiB
    // for 500 covers that and the allocator's noise.
    checks.growth_within(2 * MIB);
    checks.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_heads_that_never_finish() {
    if !proc_available("h1_heads_that_never_finish") {
        return;
    }
    let half = b"POST /ra/wait HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\nx-half: aaa";
    unfinished("3 h1 heads that never finish", half, "half heads").await;
}

/// A connection preface, SETTINGS, and a HEADERS frame on stream 1 with END_STREAM but not
/// END_HEADERS, carrying part of a header block (HPACK static-table entries 2, 6 and 4:
/// `:method GET`, `:scheme http`, `:path /`). RFC 9113 §6.10: the next frame must be a
/// CONTINUATION of stream 1, which never comes.
fn unfinished_header_block() -> Vec<u8> {
    let mut bytes = wire::h2_preface();
    let (headers, end_stream) = (0x1, 0x1);
    bytes.extend(wire::h2_frame(headers, end_stream, 1, &[0x82, 0x86, 0x84]));
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_header_blocks_that_never_finish() {
    if !proc_available("h2_header_blocks_that_never_finish") {
        return;
    }
    let block = unfinished_header_block();
    let cell = "3 h2 HEADERS without END_HEADERS";
    unfinished(cell, &block, "header blocks without CONTINUATION").await;
}

/// What a client saw, counted: status codes, or how the connection ended.
fn tally(outcomes: Vec<String>) -> BTreeMap<String, usize> {
    let mut tally = BTreeMap::new();
    for outcome in outcomes {
        *tally.entry(outcome).or_default() += 1;
    }
    tally
}

/// Both servers answered the oversized heads alike: no handler, no panic, what each client
/// saw is `expected`, hyper ended every connection with `error`, and the layered server grew
/// no more than bare.
async fn alike(
    cell: &str,
    pair: &Pair,
    seen: [BTreeMap<String, usize>; 2],
    expected: impl Fn(&str) -> bool,
    error: &str,
) {
    for server in pair.both() {
        let closed = |s: &Stats| s.get("conns") == 0;
        server.until("every connection closed", closed).await;
    }
    let started = [
        pair.bare.handlers_started().await,
        pair.layered.handlers_started().await,
    ];
    let stats = [pair.bare.stats().await, pair.layered.stats().await];
    let errors = stats.each_ref().map(connection_errors);
    let accounting = format!(
        "{OVERSIZED} clients saw {:?} (bare) / {:?} (layered); {} / {}; handlers started: {} / {}",
        seen[0], seen[1], errors[0], errors[1], started[0], started[1]
    );
    let mut checks = pair.report(cell, &accounting).await;
    checks.equal(started, [0, 0], "handlers started (no request exists)");
    for (label, seen, stats) in [
        ("bare", &seen[0], &stats[0]),
        ("layered", &seen[1], &stats[1]),
    ] {
        checks.that(seen.keys().all(|k| expected(k)), || {
            format!("{label}: the clients saw {seen:?}")
        });
        let key = format!("conn_{error}");
        checks.that(stats.get(&key) == OVERSIZED as u64, || {
            format!("{label}: not every connection ended with {error}: {stats:?}")
        });
    }
    // hyper holds up to ~400 KiB of an HTTP/1.1 head (16 KiB of HTTP/2 header list) before it
    // gives up, one client at a time.
    checks.growth_within(2 * MIB);
    checks.done();
}

async fn h1_oversized(addr: SocketAddr, head: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it read the whole head.
    let _ = wire::flood(&mut stream, head, Duration::from_secs(2)).await;
    let answer = wire::read_all(&mut stream, Duration::from_secs(5)).await;
    match wire::status_of(&answer).as_str() {
        "-" => "closed without an answer".to_owned(),
        status => status.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_oversized_head() {
    if !proc_available("h1_oversized_head") {
        return;
    }
    let pair = Pair::start(Config::default()).await;
    let mut head = b"GET /ra/wait HTTP/1.1\r\nhost: t\r\nx-big: ".to_vec();
    head.resize(head.len() + ONE_MIB, b'a');
    head.extend_from_slice(b"\r\n\r\n");
    // One after the other: hyper buffers up to about 400 KiB of a head before it gives up,
    // and twenty at once would make the two servers' peaks a matter of timing.
    let one_by_one = |addr| {
        let head = &head;
        async move {
            let mut outcomes = Vec::new();
            for _ in 0..OVERSIZED {
                outcomes.push(h1_oversized(addr, head).await);
            }
            tally(outcomes)
        }
    };
    let (bare, layered) = tokio::join!(one_by_one(pair.bare.addr), one_by_one(pair.layered.addr));
    let cell = "4 h1 head of 1 MiB";
    let expected = |seen: &str| seen == "431" || seen == "closed without an answer";
    alike(cell, &pair, [bare, layered], expected, "too_large").await;
}

async fn h2_oversized(addr: SocketAddr, value: http::HeaderValue) -> String {
    let (client, _driver) = wire::h2_connect(addr).await;
    let request = wire::h2_request(addr, "GET", "/ra/wait")
        .header("x-big", value)
        .body(())
        .unwrap();
    let Ok(mut client) = client.ready().await else {
        return "connection failed".to_owned();
    };
    match client.send_request(request, true) {
        Err(e) => format!("not sent: {e}"),
        Ok((response, _)) => match wire::h2_answer(response).await {
            Ok((status, _)) => status.to_string(),
            // h2's error for a GOAWAY ENHANCE_YOUR_CALM received.
            Err(e) if e.contains("excessive load generating behavior") => "GOAWAY".to_owned(),
            // The server closed before the client read its GOAWAY.
            Err(e) if e.contains("broken pipe") => "GOAWAY or closed".to_owned(),
            Err(e) => e,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_oversized_header_list() {
    if !proc_available("h2_oversized_header_list") {
        return;
    }
    let pair = Pair::start(Config::default()).await;
    let value = http::HeaderValue::from_bytes(&vec![b'a'; ONE_MIB]).unwrap();
    let seen = pair.both().map(|server| {
        (0..OVERSIZED)
            .map(|_| tokio::spawn(h2_oversized(server.addr, value.clone())))
            .collect::<Vec<_>>()
    });
    let mut outcomes = [Vec::new(), Vec::new()];
    for (i, clients) in seen.into_iter().enumerate() {
        for client in clients {
            outcomes[i].push(client.await.unwrap());
        }
    }
    let [bare, layered] = outcomes.map(tally);
    let cell = "4 h2 header list of 1 MiB";
    let expected = |seen: &str| seen.starts_with("GOAWAY");
    alike(
        cell,
        &pair,
        [bare, layered],
        expected,
        "h2_ENHANCE_YOUR_CALM",
    )
    .await;
}
