//! Cell 1: bodies of one-byte chunks (HTTP/1.1) and one-byte DATA frames (HTTP/2), four
//! uploads at once, to handlers that do not read their bodies, with
//! `RequestBodyLayer::new().read_ahead(1 MiB).read_ahead_total(4 MiB)`. Before aad9861 the
//! read-ahead kept each frame as it came and counted its one byte: the issue saw 286 MiB of
//! growth for four uploads of a million chunks within a 4 MiB budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::child::Config;
use crate::harness::{MIB, PATIENCE, Pair, Server, Stats, connection_errors, proc_available};
use crate::wire;

const UPLOADS: usize = 4;
/// The configuration. Each upload stays under the per-request limit, so read-ahead
/// reads all of it (and sees its client leave), and the four stay under the total.
const READ_AHEAD: usize = 1 << 20;
const TOTAL: usize = 4 << 20;
/// A write that makes no progress for this long: the server is not reading. (A server that
/// reads slowly, a debug build reading one-byte chunks, opens its TCP window 64 KiB at a
/// time: every few hundred milliseconds.)
const STALL: Duration = Duration::from_secs(2);

/// One-byte chunks per HTTP/1.1 upload. The issue sent a million; the cell sends a quarter of
/// that (a debug build reads some 300 000 a second; before the fix, still 105 MiB held), and
/// `ATTACK_CHUNKS=1000000` the count (at most 1 MiB: every upload under the limit).
fn chunks() -> usize {
    std::env::var("ATTACK_CHUNKS").map_or(250_000, |n| n.parse().expect("ATTACK_CHUNKS"))
}

/// One-byte DATA frames per HTTP/2 upload, paced to stay under h2's guard (below).
fn frames() -> usize {
    std::env::var("ATTACK_FRAMES").map_or(100_000, |n| n.parse().expect("ATTACK_FRAMES"))
}

/// h2 (0.4.20) sends GOAWAY `ENHANCE_YOUR_CALM` once a connection buffers about 2 000 small
/// DATA frames nobody has read: its budget is half the connection window (512 KiB in hyper),
/// each frame under 256 bytes costing 256 minus its size. A client that sends as fast as it
/// can is sent away at once, from bare hyper and from the layered server alike. Read-ahead
/// empties that buffer (as a handler reading its body would), so a client that paces its
/// frames to what the server reads gets them all in, and read-ahead holds them: bare hyper
/// sends the same client away. 200 frames every 10 ms per connection is well under what a
/// debug build reads.
const PACE: (usize, Duration) = (200, Duration::from_millis(10));

fn read_ahead_config() -> Config {
    Config {
        read_ahead: READ_AHEAD,
        total: TOTAL,
        ..Config::default()
    }
}

/// Waits until the layered server's read-ahead holds `at_least` bytes and has stopped
/// growing (what it holds stays put for 300 ms).
async fn read_ahead_settled(server: &Server, at_least: u64) -> Stats {
    // A debug build reads some 300 000 one-byte chunks a second: room for a slow machine.
    let within = PATIENCE + Duration::from_secs(at_least / 30_000);
    let filled = |s: &Stats| s.get("held") >= at_least;
    server
        .until_within(within, "the read-ahead to fill", filled)
        .await;
    let mut last = server.stats().await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = server.stats().await;
        if now.get("held") == last.get("held") {
            return now;
        }
        last = now;
    }
}

/// What must hold once the attack's clients are gone: each upload was cancelled as its
/// client left (read-ahead saw it), its handler stopped, its bytes went back to the budget.
async fn clients_gone(layered: &Server) -> Stats {
    layered
        .until("every upload cancelled, every byte given back", |s| {
            s.get("held") == 0 && s.get("disconnected") >= UPLOADS as u64 && s.get("live") == 0
        })
        .await
}

/// The layered server's growth within twice the budget of bare's: the budget is what
/// read-ahead may hold, the rest covers the allocator and hyper's buffers (bare hyper fills
/// none of them: it reads nothing). (These uploads stay under the budget: the peak's own bound
/// is checked by the cell that goes over it.)
async fn within_budget(cell: &str, accounting: &str, pair: &Pair) {
    let mut checks = pair.report(cell, accounting).await;
    checks.growth_within(2 * TOTAL as u64);
    checks.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_one_byte_chunks() {
    if !proc_available("h1_one_byte_chunks") {
        return;
    }
    let pair = Pair::start(read_ahead_config()).await;
    let body = Arc::new(b"1\r\nx\r\n".repeat(chunks()));
    let upload = |server: &Server| {
        let (addr, body) = (server.addr, Arc::clone(&body));
        tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let head = "POST /ra/wait HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n";
            wire::write(&mut stream, head.as_bytes()).await;
            let written = wire::flood(&mut stream, &body, STALL).await;
            (written, stream)
        })
    };
    let uploads: Vec<_> = (0..UPLOADS).flat_map(|_| pair.both().map(upload)).collect();
    let (mut written, mut streams) = ([0, 0], Vec::new());
    for (i, upload) in uploads.into_iter().enumerate() {
        let (n, stream) = upload.await.unwrap();
        written[i % 2] += n;
        streams.push(stream);
    }
    // Every chunk went to the layered server (it reads them all ahead, none is over the
    // limit); the clients hold their connections until it has.
    assert_eq!(
        written[1],
        UPLOADS * body.len(),
        "layered: every chunk sent"
    );
    let filled = read_ahead_settled(&pair.layered, (UPLOADS * chunks()) as u64).await;
    drop(streams);
    let after = clients_gone(&pair.layered).await;
    let bare = pair.bare.stats().await;
    let accounting = format!(
        "{} chunks; held {} B with every chunk read ahead, peak {} B, 0 once the clients left \
         ({} cancelled disconnected); bare read nothing, still {} handlers waiting",
        UPLOADS * chunks(),
        filled.get("held"),
        after.get("peak"),
        after.get("disconnected"),
        bare.get("live"),
    );
    let cell = "1 h1 one-byte chunks ×4, read_ahead 1 MiB / 4 MiB";
    within_budget(cell, &accounting, &pair).await;
}

/// Over the budget: eight uploads of one-byte chunks, each as large as the per-request limit
/// (50 KiB), four times `read_ahead_total` (100 KiB) together. The read-ahead stops where the
/// budget is spent, the rest waits for handlers that answer after 3 s without reading. Neither
/// is a multiple of the read-ahead's 16 KiB blocks: the last block of a request, and the one
/// that spends the budget, must be cut to size.
const OVER_UPLOADS: usize = 8;
const OVER_READ_AHEAD: usize = 50 << 10;
const OVER_TOTAL: usize = 100 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_one_byte_chunks_over_the_budget() {
    if !proc_available("h1_one_byte_chunks_over_the_budget") {
        return;
    }
    let config = Config {
        read_ahead: OVER_READ_AHEAD,
        total: OVER_TOTAL,
        ..Config::default()
    };
    let pair = Pair::start(config).await;
    let body = Arc::new(b"1\r\nx\r\n".repeat(OVER_READ_AHEAD));
    let upload = |server: &Server| {
        let (addr, body) = (server.addr, Arc::clone(&body));
        tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let head = "POST /ra/wait?wait=3000 HTTP/1.1\r\nhost: t\r\n\
                        transfer-encoding: chunked\r\n\r\n";
            wire::write(&mut stream, head.as_bytes()).await;
            wire::flood(&mut stream, &body, STALL).await;
            wire::status_of(&wire::read_all(&mut stream, Duration::from_secs(10)).await)
        })
    };
    let uploads: Vec<_> = (0..OVER_UPLOADS)
        .flat_map(|_| pair.both().map(upload))
        .collect();
    let mut answers = std::collections::BTreeMap::new();
    for upload in uploads {
        *answers.entry(upload.await.unwrap()).or_insert(0) += 1;
    }
    let over = |s: &Stats| s.get("live") == 0 && s.get("held") == 0;
    let after = pair.layered.until("every handler answered", over).await;
    let peak = after.get("peak");
    let accounting = format!(
        "{OVER_UPLOADS} × 50 Ki chunks, read_ahead 50 KiB / 100 KiB: peak {peak} B, then 0; \
         answers {answers:?}"
    );
    let cell = "1 h1 one-byte chunks ×8, 4 × the budget";
    let mut checks = pair.report(cell, &accounting).await;
    checks.that(peak >= OVER_TOTAL as u64, || {
        format!("the attack never reached the budget: peak {peak}")
    });
    // The total plus one frame (a byte) per upload: `read_ahead_total`'s promise, also with
    // uploads reading on both worker threads at the budget's edge (each block is reserved in
    // the budget before it is made).
    let bound = (OVER_TOTAL + OVER_UPLOADS) as u64;
    checks.that(peak <= bound, || {
        format!("read_ahead_peak {peak} above the total plus one frame per upload ({bound})")
    });
    // The budget is small next to what the allocator and hyper's buffers move by: 4 MiB.
    checks.growth_within(4 * MIB);
    checks.done();
}

/// Four HTTP/2 uploads of one-byte DATA frames to each server, paced by `pace` (or as fast as
/// the window opens); returns, per server, the frames sent and how the uploads ended.
async fn h2_uploads(pair: &Pair, count: usize, pace: Option<(usize, Duration)>) -> [String; 2] {
    let upload = |server: &Server| {
        let addr = server.addr;
        tokio::spawn(async move {
            let (client, driver) = wire::h2_connect(addr).await;
            let request = wire::h2_request(addr, "POST", "/ra/wait").body(()).unwrap();
            let mut client = client.ready().await.unwrap();
            let (_response, mut stream) = client.send_request(request, false).unwrap();
            let started = Instant::now();
            let x = Bytes::from_static(b"x");
            let (sent, error) = wire::h2_frames(&mut stream, x, count, STALL, pace).await;
            if error.is_some() {
                driver.abort();
                return (sent, Some(started.elapsed()));
            }
            // Hold the upload open until the server has read what it will.
            tokio::time::sleep(Duration::from_millis(300)).await;
            driver.abort();
            (sent, None)
        })
    };
    let uploads: Vec<_> = (0..UPLOADS).flat_map(|_| pair.both().map(upload)).collect();
    let mut sent = [0, 0];
    let mut sent_away: [Vec<Duration>; 2] = Default::default();
    for (i, upload) in uploads.into_iter().enumerate() {
        let (n, ended) = upload.await.unwrap();
        sent[i % 2] += n;
        sent_away[i % 2].extend(ended);
    }
    [0, 1].map(|i| match sent_away[i].iter().max() {
        None => format!("{} frames, all sent", sent[i]),
        Some(last) => format!(
            "{} frames queued, {} of {UPLOADS} uploads sent away within {last:.0?}",
            sent[i],
            sent_away[i].len()
        ),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_one_byte_frames_as_fast_as_possible() {
    if !proc_available("h2_one_byte_frames_as_fast_as_possible") {
        return;
    }
    let pair = Pair::start(read_ahead_config()).await;
    let [bare, layered] = h2_uploads(&pair, frames(), None).await;
    let after = clients_gone(&pair.layered).await;
    let bare_stats = pair.bare.stats().await;
    let accounting = format!(
        "bare: {bare}, {}; layered: {layered}, {}; peak {} B, then 0 ({} cancelled \
         disconnected)",
        connection_errors(&bare_stats),
        connection_errors(&after),
        after.get("peak"),
        after.get("disconnected"),
    );
    let cell = "1 h2 one-byte DATA ×4, unpaced";
    // h2's guard sends both away (recorded, not asserted: a read-ahead that kept up with the
    // flood, as a release build may, would take it all in, within the same budget).
    within_budget(cell, &accounting, &pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_one_byte_frames_paced() {
    if !proc_available("h2_one_byte_frames_paced") {
        return;
    }
    let pair = Pair::start(read_ahead_config()).await;
    let [bare, layered] = h2_uploads(&pair, frames(), Some(PACE)).await;
    let after = clients_gone(&pair.layered).await;
    let bare_stats = pair.bare.stats().await;
    let accounting = format!(
        "bare: {bare}, {}; layered: {layered}; peak {} B, then 0 ({} cancelled disconnected)",
        connection_errors(&bare_stats),
        after.get("peak"),
        after.get("disconnected"),
    );
    let cell = "1 h2 one-byte DATA ×4, paced 200 / 10 ms";
    within_budget(cell, &accounting, &pair).await;
}
