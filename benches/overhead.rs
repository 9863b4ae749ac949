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
//! - `contract_floor`: `hand_written` plus what the crate's contract adds before any logic: a
//!   second extensions entry, a handle to per-request state shared through an `Arc` (the
//!   layer's `RequestCancellation`). Same allocations as the layer (six), none of its work: a
//!   floor for any implementation of the contract on this allocator;
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
use criterion::{BenchmarkGroup, Criterion, Throughput, measurement::WallTime};
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
    ns_per_request: f64,
}

/// Benchmarks `svc` as `<body>/<name>` and, if criterion measured it in full, appends its
/// median ns/request to `rows`.
fn bench_variant<S, B>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rows: &mut Vec<Row>,
    body: &'static str,
    name: &'static str,
    mut svc: S,
) where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    // ns/request of every call of the routine: criterion's warm-up calls first, then exactly
    // `SAMPLE_SIZE` measurement samples.
    let mut per_call = Vec::new();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut cx = Context::from_waker(Waker::noop());
            let read_buffer = read_buffer();
            let start = Instant::now();
            for _ in 0..iters {
                support::one_request(&mut svc, request(&read_buffer), &mut cx);
            }
            let elapsed = start.elapsed();
            per_call.push(elapsed.as_nanos() as f64 / iters as f64);
            elapsed
        });
    });
    // Filtered out, or run once by `cargo test --benches`: nothing to report.
    if per_call.len() < SAMPLE_SIZE {
        return;
    }
    let mut samples = per_call.split_off(per_call.len() - SAMPLE_SIZE);
    samples.sort_by(f64::total_cmp);
    let ns_per_request = (samples[SAMPLE_SIZE / 2 - 1] + samples[SAMPLE_SIZE / 2]) / 2.0;
    rows.push(Row {
        body,
        variant: name,
        ns_per_request,
    });
}

/// Every variant around the inner service whose body `make_body` builds.
fn bench_body<B, F>(c: &mut Criterion, rows: &mut Vec<Row>, body: &'static str, make_body: F)
where
    B: Body,
    B::Error: std::fmt::Debug,
    F: Fn() -> B + Clone,
{
    let mut group = c.benchmark_group(body);
    group
        .throughput(Throughput::Elements(1))
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    let svc = inner(make_body);
    bench_variant(&mut group, rows, body, "bare", svc.clone());

    let on_early_drop = OnEarlyDropLayer::builder()
        .on_future_drop(|_: &Request<()>| || {})
        .on_body_drop(OnBodyDropFn::new(|_: &Request<()>| {
            |_: &http::response::Parts| || {}
        }));
    bench_variant(
        &mut group,
        rows,
        body,
        "on_early_drop",
        on_early_drop.layer(svc.clone()),
    );

    bench_variant(
        &mut group,
        rows,
        body,
        "hand_written",
        support::HandWrittenLayer {
            shared_handle: false,
        }
        .layer(svc.clone()),
    );

    bench_variant(
        &mut group,
        rows,
        body,
        "contract_floor",
        support::HandWrittenLayer {
            shared_handle: true,
        }
        .layer(svc.clone()),
    );

    let deadline = Duration::from_secs(30);
    let layers = [
        ("layer", CancellationLayer::new()),
        (
            "layer_shutdown",
            CancellationLayer::new().shutdown_token(CancellationToken::new()),
        ),
        ("layer_deadline", CancellationLayer::new().timeout(deadline)),
        (
            "layer_shutdown_deadline",
            CancellationLayer::new()
                .shutdown_token(CancellationToken::new())
                .timeout(deadline),
        ),
    ];
    for (name, layer) in layers {
        bench_variant(&mut group, rows, body, name, layer.layer(svc.clone()));
    }

    group.finish();
}

/// Prints the rows as a Markdown table, with each variant's cost above `bare` and its ratio
/// to `hand_written` in the same body.
fn print_summary(rows: &[Row]) {
    if rows.is_empty() {
        return;
    }
    let find = |body: &str, variant: &str| {
        rows.iter()
            .find(|row| row.body == body && row.variant == variant)
            .map(|row| row.ns_per_request)
    };
    println!();
    println!(
        "Per-request overhead, one thread, in process (median of {SAMPLE_SIZE} criterion samples):"
    );
    println!();
    println!(
        "| {:<8} | {:<23} | {:>10} | {:>10} | {:>14} |",
        "body", "variant", "ns/request", "above bare", "÷ hand_written"
    );
    println!(
        "|{:-<10}|{:-<25}|{:->11}:|{:->11}:|{:->15}:|",
        "", "", "", "", ""
    );
    for row in rows {
        let above_bare = find(row.body, "bare").map_or_else(
            || "—".to_owned(),
            |bare| format!("{:+.1}", row.ns_per_request - bare),
        );
        let ratio = find(row.body, "hand_written").map_or_else(
            || "—".to_owned(),
            |hand_written| format!("{:.2}", row.ns_per_request / hand_written),
        );
        println!(
            "| {:<8} | {:<23} | {:>10.1} | {:>10} | {:>14} |",
            row.body, row.variant, row.ns_per_request, above_bare, ratio
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
