//! HTTPS with ALPN, over real sockets, with a client nobody here wrote: curl over HTTP/1.1 and
//! HTTP/2 (`-k`: the server's certificate is self-signed), giving up mid-handler and mid-body
//! (`--max-time`), and reading to the end. The server is the `https` example's: rustls with
//! ring, and the HTTP version ALPN chose.
//!
//! For each give-up it prints (not asserts: the machines are shared) how long after curl gave
//! up the layer's `on_cancel` ran, bracketed between two clocks; see [`latency`].

#[path = "../examples/https/tls.rs"]
mod tls;

use std::convert::Infallible;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_cancel::{CancelReason, CancellationLayer, Cancelled, Phase, RequestCancellation};

/// What the server saw of one request: its HTTP version, and the layer's record if cancelled.
#[derive(Debug, Default, Clone)]
struct Seen {
    version: Option<Version>,
    cancelled: Option<(CancelReason, Phase)>,
    handle: Option<RequestCancellation>,
    /// When the handler started (inside the layer).
    started: Option<Instant>,
    /// When the layer's `on_cancel` ran.
    cancelled_at: Option<Instant>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

async fn server(log: Log) -> std::net::SocketAddr {
    let (config, _) = tls::server_config(None).unwrap();
    let cancels = log.clone();
    let layer = CancellationLayer::new().on_cancel(move |c: &Cancelled| {
        let now = Instant::now();
        let mut log = cancels.lock().unwrap();
        let last = log.last_mut().expect("a request was seen");
        assert!(last.cancelled.is_none(), "cancelled twice");
        last.cancelled = Some((c.reason(), c.phase()));
        last.cancelled_at = Some(now);
    });
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(move |req: Request<Incoming>| {
            let log = log.clone();
            async move {
                let started = Instant::now();
                let rc = RequestCancellation::from_extensions(req.extensions()).unwrap();
                log.lock().unwrap().push(Seen {
                    version: Some(req.version()),
                    cancelled: None,
                    handle: Some(rc.clone()),
                    started: Some(started),
                    cancelled_at: None,
                });
                let body: BoxBody<Bytes, Infallible> = match req.uri().path() {
                    "/slow" => {
                        let _ = rc.run(tokio::time::sleep(Duration::from_secs(30))).await;
                        Full::new(Bytes::from_static(b"late")).boxed()
                    }
                    "/stream" => {
                        let ticks = futures_util::stream::unfold((), |()| async {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Some((Ok(Frame::data(Bytes::from_static(b"tick\n"))), ()))
                        });
                        StreamBody::new(ticks).boxed()
                    }
                    "/stream3" => {
                        let ticks = futures_util::StreamExt::then(
                            futures_util::stream::iter(0..3),
                            |n| async move {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                Ok(Frame::data(Bytes::from(format!("tick {n}\n"))))
                            },
                        );
                        StreamBody::new(ticks).boxed()
                    }
                    _ => Full::new(Bytes::from_static(b"hello over TLS")).boxed(),
                };
                Ok::<_, Infallible>(Response::new(body))
            }
        }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tls::serve(listener, config, svc));
    addr
}

/// The `--max-time` of the give-ups.
const MAX_TIME: Duration = Duration::from_millis(500);

fn curl_available() -> bool {
    if Command::new("curl").arg("--version").output().is_ok() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "curl is missing on CI");
    eprintln!("curl is not installed: tests/tls.rs skipped");
    false
}

/// One curl run: what it printed, when the test spawned it, and its own timers.
struct Run {
    out: String,
    /// Taken just before the spawn: curl's clock (`--max-time`, `time_total`) starts later.
    spawned: Instant,
    /// curl's `time_pretransfer` and `time_total` (from its `-w`, on stderr), if it printed them.
    timers: Option<(Duration, Duration)>,
}

/// Runs curl with `args` against `path`; returns its output, when it was spawned, and its
/// timers.
async fn curl(addr: std::net::SocketAddr, args: &[&str], path: &str) -> Run {
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["-sk", "-N"])
        // On stderr, so that stdout is the body alone; curl writes it on a timeout too.
        .args(["-w", "%{stderr}timers %{time_pretransfer} %{time_total}\n"])
        .args(args)
        .arg(format!("https://127.0.0.1:{}{path}", addr.port()));
    let spawned = Instant::now();
    let output = command.output().await.unwrap();
    let timers = String::from_utf8_lossy(&output.stderr)
        .lines()
        .find_map(|line| {
            let mut words = line.strip_prefix("timers ")?.split(' ');
            let mut secs = || Duration::try_from_secs_f64(words.next()?.parse().ok()?).ok();
            Some((secs()?, secs()?))
        });
    Run {
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        spawned,
        timers,
    }
}

/// How long after curl gave up (`--max-time`) the layer's `on_cancel` ran, as well as it can be
/// told from here: curl's clock is its own. Let T0 be when curl's timer starts (after the spawn,
/// after curl's own start-up), `total` its `time_total` (T0 → give-up, on curl's clock) and
/// `pretransfer` its `time_pretransfer` (T0 → connected, TLS done, request about to go).
///
/// - `high = on_cancel − spawn − total`: since T0 ≥ spawn, give-up ≥ spawn + total, so this is
///   an upper bound; it includes curl's start-up before its timer (exec, libcurl, OpenSSL).
/// - `low = on_cancel − handler start − (total − pretransfer)`: the handler starts one request
///   transit (TLS, loopback, hyper, the layer) after T0 + pretransfer, so this is the latency
///   minus that transit: a lower bound, off by the request's one-way trip.
/// - `overshoot = on_cancel − spawn − max_time`: the plain upper bound, with curl's start-up and
///   its timer's lateness (`total − max_time`) in it. (On the server's clock alone,
///   `on_cancel − handler start − max_time` would bound nothing: it subtracts the connection
///   and TLS set-up, which run inside curl's `--max-time`.)
fn latency(label: &str, max_time: Duration, run: &Run, seen: &Seen) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // `b - a` in ms, negative if `b` came first.
    let signed = |a: Instant, b: Instant| {
        if b >= a { ms(b - a) } else { -ms(a - b) }
    };
    let (Some(started), Some(cancelled)) = (seen.started, seen.cancelled_at) else {
        panic!("{label}: no handler start or on_cancel stamp: {seen:?}");
    };
    let overshoot = signed(run.spawned + max_time, cancelled);
    let bracket = match run.timers {
        Some((pretransfer, total)) => format!(
            "give-up → on_cancel in [{:+.1}, {:+.1}] ms (low: server clock and curl's timers, \
             less the request's one-way trip; high: from the spawn, with curl's start-up); \
             curl: pretransfer {:.1} ms, total {:.1} ms",
            signed(started + total.saturating_sub(pretransfer), cancelled),
            signed(run.spawned + total, cancelled),
            ms(pretransfer),
            ms(total),
        ),
        None => "curl printed no timers".to_owned(),
    };
    eprintln!(
        "tls {label}: --max-time {:.0} ms; handler start → on_cancel {:.1} ms; overshoot \
         {overshoot:+.1} ms (spawn → on_cancel − max-time: an upper bound, with curl's \
         start-up and timer lateness); {bracket}",
        ms(max_time),
        signed(started, cancelled),
    );
}

/// Waits until the last request's outcome is known: cancelled, or `done` for a completion.
async fn last_outcome(log: &Log) -> Seen {
    for _ in 0..500 {
        let last = log.lock().unwrap().last().cloned();
        if let Some(seen) = last {
            if seen.cancelled.is_some() {
                return seen;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    log.lock()
        .unwrap()
        .last()
        .cloned()
        .expect("a request reached the server")
}

#[tokio::test]
async fn curl_over_tls_gives_up_or_completes_and_the_layer_records_exactly_that() {
    if !curl_available() {
        return;
    }
    // (curl's protocol flag, the version the server must see)
    let protocols = [
        ("--http1.1", Version::HTTP_11),
        ("--http2", Version::HTTP_2),
    ];
    let give_up = MAX_TIME.as_secs_f64().to_string();
    for (flag, version) in protocols {
        // Gives up while the handler runs.
        let log = Log::default();
        let addr = server(log.clone()).await;
        let run = curl(addr, &[flag, "--max-time", &give_up], "/slow").await;
        let seen = last_outcome(&log).await;
        assert_eq!(seen.version, Some(version), "{flag}");
        assert_eq!(
            seen.cancelled,
            Some((CancelReason::Disconnected, Phase::Handler)),
            "{flag} mid-handler"
        );
        latency(&format!("{flag} mid-handler"), MAX_TIME, &run, &seen);

        // Gives up while the body streams.
        let log = Log::default();
        let addr = server(log.clone()).await;
        let run = curl(addr, &[flag, "--max-time", &give_up], "/stream").await;
        let out = &run.out;
        assert!(out.starts_with("tick"), "{flag}: {out:?}");
        let seen = last_outcome(&log).await;
        assert_eq!(
            seen.cancelled,
            Some((CancelReason::Disconnected, Phase::Body)),
            "{flag} mid-body"
        );
        latency(&format!("{flag} mid-body"), MAX_TIME, &run, &seen);

        // Reads to the end: a full body and a streamed one. Nothing is cancelled, then or later.
        for (path, expected) in [
            ("/fast", "hello over TLS"),
            ("/stream3", "tick 0\ntick 1\ntick 2\n"),
        ] {
            let log = Log::default();
            let addr = server(log.clone()).await;
            let out = curl(addr, &[flag, "--max-time", "10"], path).await.out;
            assert_eq!(out, expected, "{flag} {path}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let seen = log.lock().unwrap().last().cloned().unwrap();
            assert_eq!(seen.version, Some(version), "{flag} {path}");
            assert_eq!(seen.cancelled, None, "{flag} {path} completed");
            assert!(!seen.handle.unwrap().is_cancelled(), "{flag} {path}");
        }
    }
}
