//! 10 000 requests in flight: how fast a server shutdown cancels them all, and what each one
//! costs in memory.
//!
//! - **Shutdown over HTTP/2**: a hyper server (hyper-util `auto::Builder`, HTTP/2 by prior
//!   knowledge, `max_concurrent_streams(20_000)`) behind
//!   `CancellationLayer::new().shutdown_token(token).on_cancel(..)`, whose handler waits on its
//!   `RequestCancellation` and answers 503. A hyper HTTP/2 client puts 10 000 requests in
//!   flight over 4 connections; once every handler started, `token.cancel()`, and the bench
//!   times until the 10 000th `on_cancel` callback ran and until the 10 000th client got its
//!   503. Each round checks that exactly 10 000 callbacks ran, all with reason `Shutdown`.
//! - **Shutdown in-process**: the same layer around a service whose future never completes;
//!   10 000 requests are called and polled once (no sockets, no hyper), then `token.cancel()`.
//! - **Memory per in-flight request**: RSS growth (`/proc/self/smaps_rollup`) while 10 000
//!   requests are held, divided by 10 000, with the layer and without it: over HTTP/2 (the
//!   bare server runs the same handler, waiting on a `Notify` that is never notified), and
//!   in-process around a never-completing service, once with the request dropped by the inner
//!   service and once kept by its future (the layer's extensions then stay allocated). RSS
//!   only shows memory the allocator took from the kernel, and freed memory is kept for reuse,
//!   so every sample runs in a fresh process (this binary, re-executed): a small warm-up batch
//!   first (threads, allocator arenas, connection buffers), then the baseline, then the
//!   10 000. Over HTTP/2 the figure includes hyper's per-stream state on both sides (client
//!   and server share the process); the difference between the two setups is what the layer
//!   costs.
//!
//! Tokio multi-thread runtime with 2 workers. Timings: 5 rounds after a warm-up round, median
//! and max; memory: median of 7 samples per setup, bare and layer interleaved. Linux only.
//!
//! Run with `cargo bench --bench scale` (about 5 s).

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service, service_fn};
use tower_cancel::{CancelReason, CancellationLayer, Cancelled, RequestCancellation};

mod support;

/// The least any implementation of the contract holds per request (benches/support/floor.rs).
fn contract_floor() -> support::floor::FloorLayer {
    support::floor::FloorLayer::default()
}

/// Requests held in flight.
const REQUESTS: usize = 10_000;
/// HTTP/2 client connections the requests are spread over.
const CONNECTIONS: usize = 4;
/// Timed rounds, after one warm-up round.
const ROUNDS: usize = 5;
/// Memory samples per setup, each in its own process.
const MEMORY_SAMPLES: usize = 7;
/// Requests run to completion before the memory baseline, so that lazily created state
/// (worker threads' allocator arenas, connection buffers, the shutdown watcher) is not
/// counted per request.
const WARM_UP: usize = 200;
/// Bound for anything that should take milliseconds: only reached when something is broken.
const PATIENCE: Duration = Duration::from_secs(30);
/// Environment variable that turns this binary into a memory probe.
const PROBE_ENV: &str = "TOWER_CANCEL_SCALE_PROBE";

fn main() {
    if let Ok(name) = std::env::var(PROBE_ENV) {
        let probe = Probe::from_name(&name).unwrap_or_else(|| panic!("unknown probe {name:?}"));
        let runtime = runtime();
        let bytes_per_request = runtime.block_on(probe.run());
        println!("bytes_per_request={bytes_per_request}");
        std::io::stdout().flush().expect("stdout");
        // Exit with the requests still in flight: winding 10 000 of them down (connections
        // closing under waiting clients) is not what this process is for.
        std::process::exit(0);
    }

    let started = Instant::now();
    let runtime = runtime();

    let mut h2_callbacks = Vec::new();
    let mut h2_responses = Vec::new();
    let mut local_callbacks = Vec::new();
    for round in 0..=ROUNDS {
        let (callbacks, responses) = runtime.block_on(h2_shutdown_round());
        let local = runtime.block_on(in_process_shutdown_round());
        if round > 0 {
            h2_callbacks.push(callbacks);
            h2_responses.push(responses);
            local_callbacks.push(local);
        }
    }

    let mut memory_samples: Vec<(Probe, Vec<f64>)> =
        Probe::ALL.iter().map(|p| (*p, Vec::new())).collect();
    for _ in 0..MEMORY_SAMPLES {
        // Interleaved, so that drift on the machine touches every setup alike.
        for (probe, samples) in &mut memory_samples {
            samples.push(probe.run_in_child());
        }
    }
    let memory = |bare: Probe, layer: Probe| {
        let samples = |probe: Probe| {
            let (_, samples) = memory_samples
                .iter()
                .find(|(p, _)| *p == probe)
                .expect("run");
            samples
        };
        (median(samples(bare)), median(samples(layer)))
    };

    let n = grouped(REQUESTS);
    print_report(
        &[
            (
                format!(
                    "HTTP/2, {CONNECTIONS} connections: `token.cancel()` → all {n} \
                     `on_cancel` callbacks ran"
                ),
                &h2_callbacks,
                "≤ 5 ms",
            ),
            (
                format!("HTTP/2: `token.cancel()` → all {n} clients got their 503"),
                &h2_responses,
                "information",
            ),
            (
                format!("in-process, no sockets: `token.cancel()` → all {n} callbacks ran"),
                &local_callbacks,
                "≤ 5 ms",
            ),
        ],
        &[
            (
                "HTTP/2 over loopback, client and server in the process (hyper's per-stream \
                 state of both sides included)",
                memory(Probe::H2Bare, Probe::H2Layer),
            ),
            (
                "in-process, no sockets: inner future `pending()`, request dropped by the inner \
                 service",
                memory(Probe::LocalBare, Probe::LocalLayer),
            ),
            (
                "in-process, no sockets: inner future keeps its request (so the layer's two \
                 extensions stay allocated)",
                memory(Probe::KeptBare, Probe::KeptLayer),
            ),
            (
                "*contract floor* instead of the layer, in-process, request dropped",
                memory(Probe::LocalBare, Probe::LocalFloor),
            ),
            (
                "*contract floor* instead of the layer, in-process, request kept",
                memory(Probe::KeptBare, Probe::KeptFloor),
            ),
        ],
    );
    println!("\nTotal run time: {:.1} s", started.elapsed().as_secs_f64());
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("Tokio runtime")
}

fn print_report(timings: &[(String, &Vec<Duration>, &str)], memory: &[(&str, (f64, f64))]) {
    let n = grouped(REQUESTS);
    println!("## tower-cancel at scale: {n} requests in flight\n");
    println!("Tokio multi-thread runtime, 2 workers. {ROUNDS} rounds after a warm-up round.\n");
    println!("| shutdown of {n} in-flight requests | median | max | target |");
    println!("|---|---|---|---|");
    for (what, samples, target) in timings {
        let max = samples.iter().max().expect("samples");
        println!(
            "| {what} | {} | {} | {target} |",
            millis(median_duration(samples)),
            millis(*max)
        );
    }
    println!(
        "\nEvery round: exactly {n} callbacks, all with reason `Shutdown`, and {n} \
         responses 503.\n"
    );
    println!("| memory per in-flight request | bare | with layer | layer − bare | target |");
    println!("|---|---|---|---|---|");
    for (setup, (bare, layer)) in memory {
        println!(
            "| {setup} | {bare:.0} B | {layer:.0} B | **{:.0} B** | ≤ 256 B |",
            layer - bare
        );
    }
    println!(
        "\nMemory: RSS growth while {n} requests are held, ÷ {n}; median of \
         {MEMORY_SAMPLES} samples, each in a fresh process after a warm-up of {WARM_UP} \
         requests. RSS-based: the HTTP/2 figures include hyper's per-stream state on both \
         sides and allocator slack; the difference is what matters. Layer: \
         `CancellationLayer::new().shutdown_token(..).on_cancel(..)`. Bare over HTTP/2: the \
         same handler waiting on a `Notify` instead of its token; bare in-process: the inner \
         service alone. Contract floor: benches/support/floor.rs, what any implementation of \
         the crate's contract holds per request and no more (a token and an `Arc` handle in \
         the extensions; in the shared state a state byte, the start time, the method and \
         URI that `Cancelled` reports, the configuration; a guard; no logic)."
    );
}

/// `10000` → `10 000`.
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(digit);
    }
    out
}

fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn median_duration(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Counts events and remembers when the `target`-th one happened.
struct Milestone {
    count: AtomicUsize,
    target: usize,
    reached_at: Mutex<Option<Instant>>,
    reached: Notify,
}

impl Milestone {
    fn new(target: usize) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            target,
            reached_at: Mutex::new(None),
            reached: Notify::new(),
        })
    }

    fn hit(&self) {
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            *self.reached_at.lock().unwrap() = Some(Instant::now());
            // `notify_one` keeps a permit if nobody waits yet.
            self.reached.notify_one();
        }
    }

    async fn wait(&self, what: &str) -> Instant {
        tokio::time::timeout(PATIENCE, self.reached.notified())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {what}: {} of {}",
                    self.count(),
                    self.target
                )
            });
        self.reached_at
            .lock()
            .unwrap()
            .expect("set before notifying")
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// A layer with the shutdown token and a callback that counts `Shutdown` cancellations (and,
/// separately, any other reason, which would be a bug here).
fn counting_layer(
    token: &CancellationToken,
    callbacks: &Arc<Milestone>,
    other: &Arc<AtomicUsize>,
) -> CancellationLayer {
    let (callbacks, other) = (callbacks.clone(), other.clone());
    CancellationLayer::new()
        .shutdown_token(token.clone())
        .on_cancel(move |c: &Cancelled| {
            if c.reason() == CancelReason::Shutdown {
                callbacks.hit();
            } else {
                other.fetch_add(1, Ordering::Relaxed);
            }
        })
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}

/// The handler under test: `GET /ok` answers at once (warm-up); any other path counts as
/// started, waits until its request is cancelled and answers 503.
fn honouring_handler(
    started: Arc<Milestone>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Empty<Bytes>>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    service_fn(move |req: Request<Incoming>| {
        let started = started.clone();
        let quick = req.uri().path() == "/ok";
        let cancel = req.extensions().get::<RequestCancellation>().cloned();
        async move {
            if quick {
                return Ok(status(StatusCode::OK));
            }
            let cancel = cancel.expect("CancellationLayer is installed");
            started.hit();
            cancel.cancelled().await;
            Ok(status(StatusCode::SERVICE_UNAVAILABLE))
        }
    })
}

/// The baseline: the same handler, waiting on a `Notify` that is never notified.
fn bare_handler(
    started: Arc<Milestone>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Empty<Bytes>>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    let never = Arc::new(Notify::new());
    service_fn(move |req: Request<Incoming>| {
        let started = started.clone();
        let quick = req.uri().path() == "/ok";
        let never = never.clone();
        async move {
            if quick {
                return Ok(status(StatusCode::OK));
            }
            started.hit();
            never.notified().await;
            Ok(status(StatusCode::SERVICE_UNAVAILABLE))
        }
    })
}

/// A hyper server on 127.0.0.1:0 speaking HTTP/2 by prior knowledge.
struct Server {
    addr: SocketAddr,
    open_connections: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Server {
    async fn start<S, B>(svc: S) -> Self
    where
        S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open_connections = Arc::new(AtomicUsize::new(0));
        let open = open_connections.clone();
        let accept = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let _ = stream.set_nodelay(true);
                let svc = TowerToHyperService::new(svc.clone());
                let open = open.clone();
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut builder = auto::Builder::new(TokioExecutor::new()).http2_only();
                    // hyper's default (200) would queue most of the 10 000 streams.
                    builder.http2().max_concurrent_streams(20_000);
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            open_connections,
            accept,
        }
    }

    /// Waits until every connection was served and dropped: nothing can cancel a request
    /// after this.
    async fn idle(&self) {
        let wait = async {
            while self.open_connections.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .expect("server connections closed");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

type Client = SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Vec<Client> {
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (client, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        // Ends by itself once every `SendRequest` clone is dropped.
        tokio::spawn(connection);
        clients.push(client);
    }
    clients
}

/// Sends `count` requests for `path`, round robin over the clients, each in its own task that
/// checks the status and counts the answer.
fn send(
    clients: &mut [Client],
    addr: SocketAddr,
    path: &str,
    count: usize,
    expect: StatusCode,
    answered: &Arc<Milestone>,
) -> Vec<JoinHandle<()>> {
    let uri = format!("http://{addr}{path}");
    (0..count)
        .map(|i| {
            let request = Request::get(&uri).body(Empty::new()).unwrap();
            // Queues the request on the connection now; the task only waits for the answer.
            let response = clients[i % clients.len()].send_request(request);
            let answered = answered.clone();
            tokio::spawn(async move {
                let response = response.await.expect("response");
                assert_eq!(response.status(), expect);
                answered.hit();
            })
        })
        .collect()
}

/// One round of the HTTP/2 shutdown: returns (cancel → last callback, cancel → last 503).
async fn h2_shutdown_round() -> (Duration, Duration) {
    let token = CancellationToken::new();
    let started = Milestone::new(REQUESTS);
    let callbacks = Milestone::new(REQUESTS);
    let other_reasons = Arc::new(AtomicUsize::new(0));
    let layer = counting_layer(&token, &callbacks, &other_reasons);
    let server = Server::start(layer.layer(honouring_handler(started.clone()))).await;
    let mut clients = connect(server.addr).await;

    let answered = Milestone::new(REQUESTS);
    let requests = send(
        &mut clients,
        server.addr,
        "/wait",
        REQUESTS,
        StatusCode::SERVICE_UNAVAILABLE,
        &answered,
    );
    started.wait("every handler to start").await;

    let begin = Instant::now();
    token.cancel();
    let all_callbacks = callbacks.wait("every callback").await - begin;
    let all_answers = answered.wait("every 503").await - begin;

    for request in requests {
        request.await.expect("every client got a 503");
    }
    drop(clients);
    server.idle().await;
    assert_eq!(callbacks.count(), REQUESTS, "one callback per request");
    assert_eq!(other_reasons.load(Ordering::Relaxed), 0, "only `Shutdown`");
    (all_callbacks, all_answers)
}

type Never = Result<Response<Empty<Bytes>>, Infallible>;

/// A service whose future never completes; the request is dropped when it is called.
fn never_answers()
-> impl Service<Request<()>, Response = Response<Empty<Bytes>>, Error = Infallible> {
    service_fn(|_: Request<()>| std::future::pending::<Never>())
}

/// The same, but the future keeps its request (and its extensions) as a handler would.
fn never_answers_keeping_request()
-> impl Service<Request<()>, Response = Response<Empty<Bytes>>, Error = Infallible> {
    service_fn(|req: Request<()>| async move {
        let _kept = req;
        std::future::pending::<Never>().await
    })
}

/// Calls `svc` `count` times and polls each future once, so that every request is in flight
/// (for the layer: its scope exists and is registered); the futures are pushed onto `held`.
fn hold<S>(svc: &mut S, count: usize, held: &mut Vec<Pin<Box<S::Future>>>)
where
    S: Service<Request<()>>,
{
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..count {
        assert!(svc.poll_ready(&mut cx).is_ready());
        let mut future = Box::pin(svc.call(Request::new(())));
        assert!(future.as_mut().poll(&mut cx).is_pending());
        held.push(future);
    }
}

/// One round of the in-process shutdown: returns cancel → last callback.
async fn in_process_shutdown_round() -> Duration {
    let token = CancellationToken::new();
    let callbacks = Milestone::new(REQUESTS);
    let other_reasons = Arc::new(AtomicUsize::new(0));
    let mut svc = counting_layer(&token, &callbacks, &other_reasons).layer(never_answers());
    let mut held = Vec::with_capacity(REQUESTS);
    hold(&mut svc, REQUESTS, &mut held);

    let begin = Instant::now();
    token.cancel();
    let elapsed = callbacks.wait("every callback").await - begin;

    // Dropping requests that were cancelled already runs nothing again.
    drop(held);
    assert_eq!(callbacks.count(), REQUESTS, "one callback per request");
    assert_eq!(other_reasons.load(Ordering::Relaxed), 0, "only `Shutdown`");
    elapsed
}

/// Memory measurements, each run in a fresh process.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Probe {
    H2Bare,
    H2Layer,
    LocalBare,
    LocalLayer,
    LocalFloor,
    KeptBare,
    KeptLayer,
    KeptFloor,
}

impl Probe {
    const ALL: [Probe; 8] = [
        Probe::H2Bare,
        Probe::H2Layer,
        Probe::LocalBare,
        Probe::LocalLayer,
        Probe::LocalFloor,
        Probe::KeptBare,
        Probe::KeptLayer,
        Probe::KeptFloor,
    ];

    fn name(self) -> &'static str {
        match self {
            Probe::H2Bare => "h2-bare",
            Probe::H2Layer => "h2-layer",
            Probe::LocalBare => "local-bare",
            Probe::LocalLayer => "local-layer",
            Probe::LocalFloor => "local-floor",
            Probe::KeptBare => "kept-bare",
            Probe::KeptLayer => "kept-layer",
            Probe::KeptFloor => "kept-floor",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Runs this probe in a fresh copy of this binary and returns its bytes per request.
    fn run_in_child(self) -> f64 {
        let exe = std::env::current_exe().expect("path of the bench binary");
        let output = Command::new(exe)
            .env(PROBE_ENV, self.name())
            .stderr(Stdio::inherit())
            .output()
            .expect("run the memory probe");
        assert!(output.status.success(), "probe {} failed", self.name());
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| line.strip_prefix("bytes_per_request="))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("probe {} printed no result", self.name()))
    }

    async fn run(self) -> f64 {
        // Never cancelled: the same layer as in the timed shutdown, registry included.
        let token = CancellationToken::new();
        let callbacks = Milestone::new(REQUESTS);
        let other_reasons = Arc::new(AtomicUsize::new(0));
        let layer = counting_layer(&token, &callbacks, &other_reasons);
        let started = Milestone::new(REQUESTS);
        match self {
            Probe::H2Bare => h2_memory(bare_handler(started.clone()), &started).await,
            Probe::H2Layer => {
                h2_memory(layer.layer(honouring_handler(started.clone())), &started).await
            }
            Probe::LocalBare => local_memory(never_answers()),
            Probe::LocalLayer => local_memory(layer.layer(never_answers())),
            Probe::KeptBare => local_memory(never_answers_keeping_request()),
            Probe::KeptLayer => local_memory(layer.layer(never_answers_keeping_request())),
            Probe::LocalFloor => local_memory(contract_floor().layer(never_answers())),
            Probe::KeptFloor => {
                local_memory(contract_floor().layer(never_answers_keeping_request()))
            }
        }
    }
}

/// RSS growth per request while `REQUESTS` requests are in flight on a server running `svc`.
async fn h2_memory<S, B>(svc: S, started: &Milestone) -> f64
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let server = Server::start(svc).await;
    let mut clients = connect(server.addr).await;
    let warm_up = Milestone::new(WARM_UP);
    let requests = send(
        &mut clients,
        server.addr,
        "/ok",
        WARM_UP,
        StatusCode::OK,
        &warm_up,
    );
    for request in requests {
        request.await.expect("warm-up request");
    }
    settle().await;

    let before = resident_bytes();
    let answered = Milestone::new(REQUESTS);
    let _in_flight = send(
        &mut clients,
        server.addr,
        "/wait",
        REQUESTS,
        StatusCode::SERVICE_UNAVAILABLE,
        &answered,
    );
    started.wait("every handler to start").await;
    settle().await;
    let after = resident_bytes();
    // The process exits with the requests still in flight: nothing to clean up.
    (after as f64 - before as f64) / REQUESTS as f64
}

/// RSS growth per request while `REQUESTS` requests of `svc` are held in-process.
fn local_memory<S>(mut svc: S) -> f64
where
    S: Service<Request<()>>,
{
    let mut held = Vec::with_capacity(WARM_UP + REQUESTS);
    hold(&mut svc, WARM_UP, &mut held);
    held.clear();

    let before = resident_bytes();
    hold(&mut svc, REQUESTS, &mut held);
    let after = resident_bytes();
    (after as f64 - before as f64) / REQUESTS as f64
}

/// Lets the runtime finish what the last step woke (client tasks, connection writes).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Resident set size of this process. `smaps_rollup` walks the page tables, so it is exact,
/// unlike `statm` and `status`, whose counters the kernel updates in per-CPU batches.
fn resident_bytes() -> u64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup")
        .expect("/proc/self/smaps_rollup (Linux only)");
    let kib: u64 = rollup
        .lines()
        .find_map(|line| line.strip_prefix("Rss:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|value| value.trim().parse().ok())
        .expect("an `Rss:` line in kB");
    kib * 1024
}
