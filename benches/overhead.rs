//! What does `CancellationLayer` cost per request, next to the alternatives?
//!
//! Measures, on one thread and in process, the whole life of one request: build
//! `GET /api/items/42` with an empty body (its URI a slice of a shared read buffer, as hyper
//! parses it), poll readiness, call the service, poll its future
//! to completion, drain the response body to its end (`poll_frame` until `None`) and drop
//! everything. Every variant pays the same request construction and inner service; the
//! differences are the middleware. Variants (benchmark ids `<body>/<variant>`):
//!
//! - `bare`: the inner service alone, an immediately ready response;
//! - `on_early_drop`: tower-http's `OnEarlyDropLayer` with no-op future-drop and body-drop
//!   callbacks;
//! - `hand_written`: the pattern of tonic's cancellation example as the cheapest honest layer:
//!   per request a new `CancellationToken` in the request extensions and a `DropGuard` held by
//!   the response future, disarmed when the handler completes (no reason, no body guard, no
//!   shutdown, no deadline);
//! - `two_entries`: `hand_written` plus a second extensions entry, a handle to per-request
//!   state shared through an `Arc` (the floor of earlier runs);
//! - `contract_floor`: what any implementation of the contract must do for a request that
//!   completes and no more (`support/floor.rs` names the clause behind each piece): the token
//!   and the shared state in the extensions, the state holding the start time, the method and
//!   URI (what `Cancelled` reports) and a reference to the layer's configuration, a guard that
//!   moves from the future into the body, one compare-and-swap when the handler returns and
//!   one when the body ends. Same allocations as the layer (six);
//! - `layer`: `CancellationLayer::new()`;
//! - `layer_shutdown`: with `.shutdown_token(..)` (never cancelled);
//! - `layer_deadline`: with `.timeout(30 s)` (never fires);
//! - `layer_shutdown_deadline`: both.
//!
//! Each variant runs with two response bodies (one benchmark group each): `full`, a
//! `Full<Bytes>` of 5 bytes (its end is known from its size), and `streamed`, 3 data frames
//! with no size hint whose end is only seen when it returns `None`.
//!
//! Futures and bodies are polled with a no-op waker, with no runtime in the loop; the thread
//! only enters a Tokio runtime, on which the layer spawns its shutdown watcher and registers
//! its deadline timers. After criterion's own report, a summary table (Markdown) gives each
//! variant's median ns/request over criterion's measurement samples, the difference from
//! `bare` and the ratio to `hand_written`.
//!
//! Run with `cargo bench --bench overhead` (about a minute; append `-- <filter>`, such as
//! `-- streamed/` or `-- layer`, to run some benchmarks only). Criterion only measures under
//! `cargo bench`: `cargo test --benches` runs each benchmark once as a smoke test and prints
//! no table, and CI only compiles this file (`cargo bench --no-run`).

mod support;

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput};
use http::{Request, Response, Uri};
use http_body::{Body, Frame};
use http_body_util::Full;
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service};
use tower_cancel::CancellationLayer;
use tower_http::on_early_drop::{OnBodyDropFn, OnEarlyDropLayer};

/// Criterion samples per benchmark; the summary is the median over exactly these.
const SAMPLE_SIZE: usize = 100;

/// The inner service: an immediately ready response whose body `make_body` builds.
fn inner<B, F>(
    make_body: F,
) -> impl Service<
    Request<()>,
    Response = Response<B>,
    Error = Infallible,
    Future = Ready<Result<Response<B>, Infallible>>,
> + Clone
where
    F: Fn() -> B + Clone,
{
    tower::service_fn(move |_req: Request<()>| ready(Ok(Response::new(make_body()))))
}

/// The head of the request every variant gets, as it sits in a connection's read buffer.
const HEAD: &[u8] = b"GET /api/items/42 HTTP/1.1\r\nhost: bench\r\n\r\n";
/// Where its path is in `HEAD`.
const PATH: std::ops::Range<usize> = 4..17;

/// The read buffer the requests are parsed from: a shared `Bytes`, as hyper freezes it.
fn read_buffer() -> Bytes {
    BytesMut::from(HEAD).split().freeze()
}

/// The request every variant gets (built inside the measured loop: all variants pay it).
///
/// Its URI is built the way hyper 1.x's HTTP/1.1 parser builds it: `Uri::from_maybe_shared`
/// on a slice of the frozen read buffer, so cloning it counts a reference, as in a server.
/// `Request::get("/api/items/42")` would instead copy the path into a buffer that allocates
/// again the first time it is cloned, a cost no request that came off a socket has.
fn request(read_buffer: &Bytes) -> Request<()> {
    let uri = Uri::from_maybe_shared(read_buffer.slice(PATH)).expect("valid path");
    Request::get(uri).body(()).expect("valid request")
}

fn full_body() -> Full<Bytes> {
    Full::new(Bytes::from_static(b"hello"))
}

/// A streamed response: 3 data frames, no size hint, and the end only known when `None` is
/// returned, so a guard cannot complete before the last poll.
#[derive(Debug)]
struct Streamed {
    frames_left: u8,
    ended: bool,
}

impl Streamed {
    fn new() -> Self {
        Self {
            frames_left: 3,
            ended: false,
        }
    }
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.frames_left == 0 {
            this.ended = true;
            return Poll::Ready(None);
        }
        this.frames_left -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"chunk")))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// One line of the summary.
struct Row {
    body: &'static str,
    variant: &'static str,
    /// Median over criterion's samples, if criterion measured this variant in full.
    criterion: Option<f64>,
    /// Median over the interleaved rounds.
    interleaved: Option<f64>,
}

/// Runs one whole request of a variant.
type Runner = Box<dyn FnMut(Request<()>, &mut Context<'_>)>;

fn runner<S, B>(mut svc: S) -> Runner
where
    S: Service<Request<()>, Response = Response<B>> + 'static,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    Box::new(move |request, cx| support::one_request(&mut svc, request, cx))
}

/// Every variant around the inner service whose body `make_body` builds, in table order.
fn variants<B, F>(make_body: F) -> Vec<(&'static str, Runner)>
where
    B: Body + 'static,
    B::Error: std::fmt::Debug,
    F: Fn() -> B + Clone + 'static,
{
    let svc = inner(make_body);
    let on_early_drop = OnEarlyDropLayer::builder()
        .on_future_drop(|_: &Request<()>| || {})
        .on_body_drop(OnBodyDropFn::new(|_: &Request<()>| {
            |_: &http::response::Parts| || {}
        }));
    let deadline = Duration::from_secs(30);
    vec![
        ("bare", runner(svc.clone())),
        ("on_early_drop", runner(on_early_drop.layer(svc.clone()))),
        (
            "hand_written",
            runner(
                support::HandWrittenLayer {
                    shared_handle: false,
                }
                .layer(svc.clone()),
            ),
        ),
        (
            "two_entries",
            runner(
                support::HandWrittenLayer {
                    shared_handle: true,
                }
                .layer(svc.clone()),
            ),
        ),
        (
            "contract_floor",
            runner(support::floor::FloorLayer::default().layer(svc.clone())),
        ),
        ("layer", runner(CancellationLayer::new().layer(svc.clone()))),
        (
            "layer_shutdown",
            runner(
                CancellationLayer::new()
                    .shutdown_token(CancellationToken::new())
                    .layer(svc.clone()),
            ),
        ),
        (
            "layer_deadline",
            runner(
                CancellationLayer::new()
                    .timeout(deadline)
                    .layer(svc.clone()),
            ),
        ),
        (
            "layer_shutdown_deadline",
            runner(
                CancellationLayer::new()
                    .shutdown_token(CancellationToken::new())
                    .timeout(deadline)
                    .layer(svc),
            ),
        ),
    ]
}

/// `iters` requests through `run`; returns the time they took.
fn time_requests(run: &mut Runner, iters: u64) -> Duration {
    let mut cx = Context::from_waker(Waker::noop());
    let read_buffer = read_buffer();
    let start = Instant::now();
    for _ in 0..iters {
        run(request(&read_buffer), &mut cx);
    }
    start.elapsed()
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    }
}

/// Benchmarks every variant of one body with criterion (`<body>/<variant>`), then, unless
/// filtered, runs them side by side: `ROUNDS` rounds, each running every variant for
/// `ROUND_REQUESTS` requests, in turn, so that the machine's drifts hit every variant alike.
fn bench_body<B, F>(c: &mut Criterion, rows: &mut Vec<Row>, body: &'static str, make_body: F)
where
    B: Body + 'static,
    B::Error: std::fmt::Debug,
    F: Fn() -> B + Clone + 'static,
{
    let mut variants = variants(make_body);
    let mut group = c.benchmark_group(body);
    group
        .throughput(Throughput::Elements(1))
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut measured = Vec::new();
    for (name, run) in &mut variants {
        // ns/request of every call of the routine: criterion's warm-up calls first, then
        // exactly `SAMPLE_SIZE` measurement samples.
        let mut per_call = Vec::new();
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                let elapsed = time_requests(run, iters);
                per_call.push(elapsed.as_nanos() as f64 / iters as f64);
                elapsed
            });
        });
        // Filtered out, or run once by `cargo test --benches`: nothing to report.
        let criterion = (per_call.len() >= SAMPLE_SIZE)
            .then(|| median(per_call.split_off(per_call.len() - SAMPLE_SIZE)));
        measured.push(criterion.is_some());
        rows.push(Row {
            body,
            variant: name,
            criterion,
            interleaved: None,
        });
    }
    group.finish();

    let first = rows.len() - variants.len();
    let mut rounds = vec![Vec::new(); variants.len()];
    for _ in 0..ROUNDS {
        for (i, (_, run)) in variants.iter_mut().enumerate() {
            if measured[i] {
                let elapsed = time_requests(run, ROUND_REQUESTS);
                rounds[i].push(elapsed.as_nanos() as f64 / ROUND_REQUESTS as f64);
            }
        }
    }
    for (row, samples) in rows[first..].iter_mut().zip(rounds) {
        if !samples.is_empty() {
            row.interleaved = Some(median(samples));
        }
    }
}

/// Interleaved rounds after criterion's runs, and requests per variant in each.
const ROUNDS: usize = 7;
const ROUND_REQUESTS: u64 = 100_000;

/// Prints the rows as a Markdown table: each variant's median ns/request (criterion's, and
/// the interleaved rounds'), and, from the interleaved rounds, its cost above `bare` and its
/// ratio to `contract_floor` and to `hand_written` in the same body.
fn print_summary(rows: &[Row]) {
    if rows.is_empty() || rows.iter().all(|row| row.criterion.is_none()) {
        return;
    }
    let find = |body: &str, variant: &str| {
        rows.iter()
            .find(|row| row.body == body && row.variant == variant)
            .and_then(|row| row.interleaved)
    };
    let show = |value: Option<f64>, format: &dyn Fn(f64) -> String| {
        value.map_or_else(|| "—".to_owned(), format)
    };
    println!();
    println!(
        "Per-request cost, one thread, in process: criterion's median over {SAMPLE_SIZE} \
         samples, then {ROUNDS} interleaved rounds of {ROUND_REQUESTS} requests per variant \
         (median), from which the last three columns are computed:"
    );
    println!();
    println!(
        "| {:<8} | {:<23} | {:>9} | {:>11} | {:>10} | {:>7} | {:>14} |",
        "body", "variant", "criterion", "interleaved", "above bare", "÷ floor", "÷ hand_written"
    );
    println!(
        "|{:-<10}|{:-<25}|{:->10}:|{:->12}:|{:->11}:|{:->8}:|{:->15}:|",
        "", "", "", "", "", "", ""
    );
    for row in rows.iter().filter(|row| row.criterion.is_some()) {
        let ns = row.interleaved;
        let above_bare = ns.zip(find(row.body, "bare")).map(|(ns, bare)| ns - bare);
        let floor = ns
            .zip(find(row.body, "contract_floor"))
            .map(|(ns, floor)| ns / floor);
        let hand = ns
            .zip(find(row.body, "hand_written"))
            .map(|(ns, hand)| ns / hand);
        println!(
            "| {:<8} | {:<23} | {:>9} | {:>11} | {:>10} | {:>7} | {:>14} |",
            row.body,
            row.variant,
            show(row.criterion, &|v| format!("{v:.1}")),
            show(ns, &|v| format!("{v:.1}")),
            show(above_bare, &|v| format!("{v:+.1}")),
            show(floor, &|v| format!("{v:.2}")),
            show(hand, &|v| format!("{v:.2}")),
        );
    }
}

fn main() {
    // The layer spawns its shutdown watcher and registers deadline timers on the runtime it
    // is called in; nothing in the measured loop runs on it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("failed to build the runtime");
    let _runtime = rt.enter();

    let mut c = Criterion::default().configure_from_args();
    let mut rows = Vec::new();
    bench_body(&mut c, &mut rows, "full", full_body);
    bench_body(&mut c, &mut rows, "streamed", Streamed::new);
    c.final_summary();
    print_summary(&rows);
}
