//! Cells 8 and 9: uploads that trickle under the idle timeout, one that stalls, and many
//! HTTP/2 uploads whose connection is then reset.
//!
//! With `RequestBodyLayer::new().idle_timeout(200 ms)`, 100 uploads send one byte every
//! 100 ms for 3 s: by design they never time out (the clock runs only while the handler waits,
//! and restarts with each byte), and the server holds no more than bare hyper does; an upload
//! that stalls gets the documented 408 (bare hyper waits for it forever). Then one HTTP/2
//! connection opens 200 uploads, half sent and read ahead, and is reset (SO_LINGER 0): every
//! request is cancelled `Disconnected`, and every count comes back to 0.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};

use crate::child::Config;
use crate::harness::{MIB, Pair, Server, Stats, proc_available};
use crate::wire;

const TRICKLES: usize = 100;
const BYTES: usize = 30;
const EVERY: Duration = Duration::from_millis(100);
const IDLE: u64 = 200;

fn idle_config() -> Config {
    Config {
        idle_ms: Some(IDLE),
        ..Config::default()
    }
}

/// Half the uploads without read-ahead, half with it (the handler reads at once either way).
fn path(i: usize) -> &'static str {
    if i % 2 == 0 { "/read" } else { "/ra/read" }
}

/// A tick every `EVERY`, on schedule (a late tick comes at once): one byte each.
fn every() -> tokio::time::Interval {
    let mut every = tokio::time::interval_at(Instant::now() + EVERY, EVERY);
    every.set_missed_tick_behavior(MissedTickBehavior::Burst);
    every
}

async fn h1_trickle(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {BYTES}\r\n\r\n");
    wire::write(&mut stream, head.as_bytes()).await;
    let mut every = every();
    for _ in 0..BYTES {
        every.tick().await;
        // The server may have answered (a 408) and closed: then read what it said.
        if stream.write_all(b"x").await.is_err() {
            break;
        }
    }
    let answer = wire::read_all(&mut stream, Duration::from_millis(500)).await;
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    format!("{} {body}", wire::status_of(&answer))
}

/// Sends 5 of 30 bytes and stops; returns what the server answered within 1 s.
async fn h1_stall(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!("POST /read HTTP/1.1\r\nhost: t\r\ncontent-length: {BYTES}\r\n\r\nxxxxx");
    wire::write(&mut stream, head.as_bytes()).await;
    let answer = wire::read_all(&mut stream, Duration::from_secs(1)).await;
    wire::status_of(&answer)
}

async fn h2_trickle(client: wire::H2, addr: SocketAddr, path: &str) -> String {
    let request = wire::h2_request(addr, "POST", path)
        .header("content-length", BYTES)
        .body(())
        .unwrap();
    let mut client = client.ready().await.unwrap();
    let (response, mut stream) = client.send_request(request, false).unwrap();
    let mut every = every();
    for sent in 1..=BYTES {
        every.tick().await;
        let x = Bytes::from_static(b"x");
        // The server may have answered (a 408) and ended the stream.
        if stream.send_data(x, sent == BYTES).is_err() {
            break;
        }
    }
    match wire::h2_answer(response).await {
        Ok((status, body)) => format!("{status} {body}"),
        Err(e) => e,
    }
}

async fn h2_stall(client: wire::H2, addr: SocketAddr) -> String {
    let request = wire::h2_request(addr, "POST", "/read")
        .header("content-length", BYTES)
        .body(())
        .unwrap();
    let mut client = client.ready().await.unwrap();
    let (response, mut stream) = client.send_request(request, false).unwrap();
    stream
        .send_data(Bytes::from_static(b"xxxxx"), false)
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(1), wire::h2_answer(response)).await {
        Err(_) => "-".to_owned(),
        Ok(Ok((status, _))) => status.to_string(),
        Ok(Err(e)) => e,
    }
}

/// The trickles and the stall against one server; returns the trickles' answers tallied, and
/// the stall's.
async fn against(server: &Server, h2: bool) -> (Vec<(String, usize)>, String) {
    let addr = server.addr;
    // HTTP/2: every upload a stream of one connection.
    let client = if h2 {
        Some(wire::h2_connect(addr).await)
    } else {
        None
    };
    let trickles: Vec<_> = (0..TRICKLES)
        .map(|i| match &client {
            Some((client, _)) => tokio::spawn(h2_trickle(client.clone(), addr, path(i))),
            None => tokio::spawn(h1_trickle(addr, path(i))),
        })
        .collect();
    let stall = match &client {
        Some((client, _)) => h2_stall(client.clone(), addr).await,
        None => h1_stall(addr).await,
    };
    let mut answers = std::collections::BTreeMap::new();
    for trickle in trickles {
        *answers.entry(trickle.await.unwrap()).or_insert(0) += 1;
    }
    (answers.into_iter().collect(), stall)
}

async fn trickle_cell(cell: &str, h2: bool) {
    let pair = Pair::start(idle_config()).await;
    let ((bare, bare_stall), (layered, layered_stall)) =
        tokio::join!(against(&pair.bare, h2), against(&pair.layered, h2));
    let stats = pair.layered.stats().await;
    let accounting = format!(
        "{TRICKLES} uploads of {BYTES} B, 1 B / {EVERY:?}, idle_timeout {IDLE} ms: answers {bare:?} \
         / {layered:?}, {} timed out; a stalled upload: bare answered {bare_stall:?} within 1 s, \
         layered {layered_stall:?} ({} slow_client)",
        stats.get("read_timeout"),
        stats.get("slow_client"),
    );
    let mut checks = pair.report(cell, &accounting).await;
    let whole = vec![(format!("200 {BYTES} bytes"), TRICKLES)];
    checks.equal(bare, whole.clone(), "bare: the trickles' answers");
    checks.equal(
        layered,
        whole,
        "layered: the trickles' answers (none timed out)",
    );
    checks.equal(
        stats.get("read_timeout"),
        1,
        "layered: reads that timed out (the stall's)",
    );
    checks.equal(layered_stall.as_str(), "408", "layered: the stall's answer");
    checks.equal(stats.get("slow_client"), 1, "layered: cancelled SlowClient");
    checks.growth_within(2 * MIB);
    checks.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_uploads_that_trickle() {
    if !proc_available("h1_uploads_that_trickle") {
        return;
    }
    trickle_cell("8 h1 100 trickling uploads + 1 stalled", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_uploads_that_trickle() {
    if !proc_available("h2_uploads_that_trickle") {
        return;
    }
    trickle_cell("8 h2 100 trickling streams + 1 stalled", true).await;
}

const STREAMS: u64 = 200;
const HALF: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_many_streams_then_reset() {
    if !proc_available("h2_many_streams_then_reset") {
        return;
    }
    let pair = Pair::start(Config::default()).await;
    let open = |server: &Server| {
        let addr = server.addr;
        async move {
            let (client, driver, socket) = wire::h2_connect_socket(addr).await;
            let mut streams = Vec::new();
            for _ in 0..STREAMS {
                let request = wire::h2_request(addr, "POST", "/ra/wait")
                    .header("content-length", 2 * HALF)
                    .body(())
                    .unwrap();
                let mut client = client.clone().ready().await.unwrap();
                let (response, mut stream) = client.send_request(request, false).unwrap();
                stream
                    .send_data(Bytes::from(vec![b'x'; HALF]), false)
                    .unwrap();
                streams.push((response, stream));
            }
            (client, driver, socket, streams)
        }
    };
    let (bare, layered) = tokio::join!(open(&pair.bare), open(&pair.layered));
    pair.bare
        .until("every handler started", |s| s.get("live") == STREAMS)
        .await;
    let read_ahead = |s: &Stats| s.get("live") == STREAMS && s.get("held") >= STREAMS * HALF as u64;
    let before = pair
        .layered
        .until("every half read ahead", read_ahead)
        .await;
    // Reset: SO_LINGER 0 on the socket, then its last descriptor closed (the clone here, the
    // connection's in the aborted driver task): the kernel sends RST, not FIN.
    for (_client, driver, socket, _streams) in [bare, layered] {
        socket.set_zero_linger().unwrap();
        driver.abort();
        let _ = driver.await;
        drop(socket);
    }
    let over = |s: &Stats| {
        let cleanups = s.get("cl_running") + s.get("cl_queued");
        s.get("live") == 0 && s.get("held") == 0 && cleanups == 0 && s.get("conns") == 0
    };
    let bare = pair.bare.until("every request over", over).await;
    let after = pair.layered.until("every request over", over).await;
    let accounting = format!(
        "{STREAMS} uploads half sent on one connection, then RST: read_ahead held {} B, then \
         {}; cancelled {} ({} disconnected), cleanups {} run + {} refused; handlers alive \
         after: {} / {}, connections {} / {}",
        before.get("held"),
        after.get("held"),
        after.get("cancelled"),
        after.get("disconnected"),
        after.get("cl_completed"),
        after.get("cl_refused"),
        bare.get("live"),
        after.get("live"),
        bare.get("conns"),
        after.get("conns"),
    );
    let cell = "9 h2 200 half-sent uploads, then RST";
    let mut checks = pair.report(cell, &accounting).await;
    checks.equal(after.get("disconnected"), STREAMS, "cancelled Disconnected");
    checks.equal(after.get("cancelled"), STREAMS, "cancelled in all");
    checks.equal(
        after.get("cl_completed") + after.get("cl_refused"),
        STREAMS,
        "cleanups run or refused",
    );
    checks.growth_within(2 * MIB);
    checks.done();
}
