//! Cells 5, 6 and 7: bodies that lie. A truncated body (an HTTP/1.1 chunk announcing 0x1000
//! bytes, 10 sent, then the client closes; HTTP/2 DATA shorter than its content-length, then
//! END_STREAM), a content-length larger or smaller than the body, and empty DATA frames in the
//! middle of an HTTP/2 body. Each goes to a handler that reads at once (`/read`, no
//! read-ahead) and to one that reads after 300 ms (`/ra/read?wait=300`, so that read-ahead
//! meets the body first). A handler never sees a complete body of the wrong size; a body that
//! fails cancels its request with `Disconnected`; the read-ahead gives every byte back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::child::Config;
use crate::harness::{MIB, Pair, Server, Stats, connection_errors, proc_available};
use crate::wire;

/// Requests per path and server.
const EACH: usize = 10;
/// How long an HTTP/1.1 client waits for the server to answer and close.
const WAIT: Duration = Duration::from_secs(2);
const PATHS: [&str; 2] = ["/read", "/ra/read?wait=300"];

/// Sends `bytes` on a new HTTP/1.1 connection, closes the sending side if `close`, and
/// returns what the client saw until the server closed or `wait` passed: the status codes of
/// the answers, or "closed".
async fn h1_exchange(addr: SocketAddr, bytes: Vec<u8>, close: bool, wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    wire::write(&mut stream, &bytes).await;
    if close {
        stream.shutdown().await.unwrap();
    }
    let answer = wire::read_all(&mut stream, wait).await;
    let statuses: Vec<_> = answer
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| wire::status_of(&answer[at..]))
        .collect();
    if statuses.is_empty() {
        "closed".to_owned()
    } else {
        statuses.join("+")
    }
}

/// Every path `EACH` times, on both servers at once; the client's outcomes tallied.
async fn each_request<F, Fut>(pair: &Pair, send: F) -> [BTreeMap<String, usize>; 2]
where
    F: Fn(SocketAddr, &'static str) -> Fut,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    let tasks = pair.both().map(|server: &Server| {
        PATHS
            .iter()
            .flat_map(|path| (0..EACH).map(|_| tokio::spawn(send(server.addr, path))))
            .collect::<Vec<_>>()
    });
    let mut tallies: [BTreeMap<String, usize>; 2] = Default::default();
    for (i, tasks) in tasks.into_iter().enumerate() {
        for task in tasks {
            *tallies[i].entry(task.await.unwrap()).or_default() += 1;
        }
    }
    tallies
}

/// What each handler got, per server: complete bodies, read errors, dropped before reading.
fn handlers(stats: &Stats) -> String {
    format!(
        "{} complete ({} of a wrong size), {} read errors, {} dropped",
        stats.get("read_ok"),
        stats.get("wrong_size"),
        stats.get("read_error"),
        stats.get("dropped"),
    )
}

/// The requests are over: no handler alive, no byte held, cleanups settled, every
/// connection closed.
async fn settled(pair: &Pair) -> [Stats; 2] {
    let over = |s: &Stats| {
        let cleanups = s.get("cl_running") + s.get("cl_queued");
        s.get("live") == 0 && s.get("held") == 0 && cleanups == 0 && s.get("conns") == 0
    };
    [
        pair.bare.until("every request over", over).await,
        pair.layered.until("every request over", over).await,
    ]
}

/// The cell's row, and what holds for bodies that lie: no handler saw a complete body of the
/// wrong size; `failed` handlers (on each server) had their read fail or were dropped, and the
/// layered server cancelled each of those requests with `Disconnected`, and no other; every
/// client saw `answer`, if given; the layered server grew no more than bare.
async fn report(
    cell: &str,
    pair: &Pair,
    seen: [BTreeMap<String, usize>; 2],
    failed: u64,
    answer: Option<&str>,
) {
    let [bare, layered] = settled(pair).await;
    let accounting = format!(
        "clients saw {:?} / {:?}; handlers: {} / {}; {} cancelled disconnected, read_ahead \
         peak {} B, then 0; {} / {}",
        seen[0],
        seen[1],
        handlers(&bare),
        handlers(&layered),
        layered.get("disconnected"),
        layered.get("peak"),
        connection_errors(&bare),
        connection_errors(&layered),
    );
    let mut checks = pair.report(cell, &accounting).await;
    for (label, stats, seen) in [("bare", &bare, &seen[0]), ("layered", &layered, &seen[1])] {
        let wrong = stats.get("wrong_size");
        checks.that(wrong == 0, || {
            format!("{label}: {wrong} handlers read a complete body of the wrong size")
        });
        checks.equal(
            stats.get("read_error") + stats.get("dropped"),
            failed,
            &format!("{label}: handlers whose read failed or that were dropped"),
        );
        if let Some(answer) = answer {
            let only: Vec<&str> = seen.keys().map(String::as_str).collect();
            checks.equal(
                only,
                vec![answer],
                &format!("{label}: what the clients saw"),
            );
        }
    }
    checks.equal(
        layered.get("disconnected"),
        failed,
        "cancelled Disconnected",
    );
    checks.equal(layered.get("cancelled"), failed, "cancelled in all");
    checks.growth_within(2 * MIB);
    checks.done();
}

fn h1_post(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!("POST {path} HTTP/1.1\r\nhost: t\r\n{headers}\r\n").into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_truncated_chunk() {
    if !proc_available("h1_truncated_chunk") {
        return;
    }
    let pair = Pair::start(Config::default()).await;
    let seen = each_request(&pair, |addr, path| {
        let head = "transfer-encoding: chunked\r\n";
        h1_exchange(addr, h1_post(path, head, b"1000\r\n0123456789"), true, WAIT)
    })
    .await;
    let cell = "5 h1 chunk of 0x1000 bytes, 10 sent, close";
    report(cell, &pair, seen, (2 * EACH) as u64, None).await;
}

/// Sends a request with `content-length: declared` and `body` in one DATA frame (with
/// END_STREAM), on a connection of its own; returns the answer's status or the stream error.
async fn h2_lying(addr: SocketAddr, path: &str, declared: usize, body: usize) -> String {
    let (client, _driver) = wire::h2_connect(addr).await;
    let request = wire::h2_request(addr, "POST", path)
        .header("content-length", declared)
        .body(())
        .unwrap();
    let mut client = client.ready().await.unwrap();
    let (response, mut stream) = client.send_request(request, false).unwrap();
    if let Err(e) = stream.send_data(Bytes::from(vec![b'x'; body]), true) {
        return format!("not sent: {e}");
    }
    match wire::h2_answer(response).await {
        Ok((status, _)) => status.to_string(),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_data_shorter_than_content_length() {
    if !proc_available("h2_data_shorter_than_content_length") {
        return;
    }
    let pair = Pair::start(Config::default()).await;
    let seen = each_request(&pair, |addr, path| h2_lying(addr, path, 100, 10)).await;
    let cell = "5/6 h2 content-length 100, 10 bytes, END_STREAM";
    report(cell, &pair, seen, (2 * EACH) as u64, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_data_longer_than_content_length() {
    if !proc_available("h2_data_longer_than_content_length") {
        return;
    }
    let pair = Pair::start(Config::default()).await;
    let seen = each_request(&pair, |addr, path| h2_lying(addr, path, 100, 200)).await;
    let cell = "6 h2 content-length 100, 200 bytes";
    report(cell, &pair, seen, (2 * EACH) as u64, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_body_shorter_than_content_length() {
    if !proc_available("h1_body_shorter_than_content_length") {
        return;
    }
    let pair = Pair::start(Config::default()).await;
    let seen = each_request(&pair, |addr, path| {
        h1_exchange(
            addr,
            h1_post(path, "content-length: 100\r\n", &[b'x'; 10]),
            true,
            WAIT,
        )
    })
    .await;
    let cell = "6 h1 content-length 100, 10 bytes, close";
    report(cell, &pair, seen, (2 * EACH) as u64, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_body_longer_than_content_length() {
    if !proc_available("h1_body_longer_than_content_length") {
        return;
    }
    // The first 100 bytes are the body, answered; hyper reads the other 100 as the start of
    // the next request's head, and waits for the rest of it until the client closes.
    let pair = Pair::start(Config::default()).await;
    let seen = each_request(&pair, |addr, path| {
        let request = h1_post(path, "content-length: 100\r\n", &[b'x'; 200]);
        h1_exchange(addr, request, false, Duration::from_millis(500))
    })
    .await;
    let cell = "6 h1 content-length 100, 200 bytes";
    // The first 100 bytes, answered.
    report(cell, &pair, seen, 0, Some("200")).await;
}

/// "hello", `empties` empty DATA frames, "world", and an empty DATA frame with END_STREAM: on
/// a connection of its own. (h2 drops the empty frames that do not end the stream before hyper
/// sees them; the last one reaches the body, and the layers, as an empty data frame.)
async fn h2_with_empty_frames(addr: SocketAddr, path: &str, empties: usize) -> String {
    let (client, _driver) = wire::h2_connect(addr).await;
    let request = wire::h2_request(addr, "POST", path).body(()).unwrap();
    let mut client = client.ready().await.unwrap();
    let (response, mut stream) = client.send_request(request, false).unwrap();
    let frames = std::iter::once(("hello", false))
        .chain((0..empties).map(|_| ("", false)))
        .chain([("world", false), ("", true)]);
    for (data, end) in frames {
        if let Err(e) = stream.send_data(Bytes::from_static(data.as_bytes()), end) {
            return format!("not sent: {e}");
        }
    }
    match wire::h2_answer(response).await {
        Ok((status, body)) => format!("{status} {body}"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_empty_data_frames() {
    if !proc_available("h2_empty_data_frames") {
        return;
    }
    let pair = Pair::start(Config::default()).await;
    let seen = each_request(&pair, |addr, path| h2_with_empty_frames(addr, path, 10)).await;
    let cell = "7 h2 10 empty DATA frames mid-body";
    // Every body whole.
    report(cell, &pair, seen, 0, Some("200 10 bytes")).await;
    // Past 100 empty frames on a connection, h2 sends the client away (its own guard, which
    // counts them as they arrive: the layers cannot change it). Recorded.
    let (bare, layered) = tokio::join!(
        h2_with_empty_frames(pair.bare.addr, "/read", 150),
        h2_with_empty_frames(pair.layered.addr, "/ra/read?wait=300", 150),
    );
    let stats = [pair.bare.stats().await, pair.layered.stats().await];
    let accounting = format!(
        "clients saw {bare:?} / {layered:?}; {} / {}",
        connection_errors(&stats[0]),
        connection_errors(&stats[1]),
    );
    let cell = "7 h2 150 empty DATA frames (growth: the whole test)";
    pair.report(cell, &accounting).await.done();
}
