//! Does the shutdown cascade serialise requests across threads?
//!
//! Measures the aggregate throughput of the in-process request path (call the service, poll
//! its future to completion, drain the response body to end of stream) on 1 and 2 threads,
//! for four variants:
//!
//! - `bare`: the inner service alone, the baseline;
//! - `layer`: `CancellationLayer::new()`, without a shutdown token;
//! - `layer_with_shutdown`: `CancellationLayer::new().shutdown_token(..)` with one shared
//!   token, the cascade under test;
//! - `child_of_shared_token`: the bare service plus, per request, a `child_token()` of one
//!   shared `CancellationToken`, created and dropped: the naive cascade, which takes the
//!   parent's mutex twice per request and is expected to collapse across threads.
//!
//! Each sample splits its iterations evenly over the threads, releases them together with a
//! barrier and times until the last one finishes, so the reported `elem/s` is the aggregate
//! throughput. Futures and bodies are polled with a no-op waker, with no runtime in the loop;
//! each thread only enters a Tokio runtime, on which the layer spawns its shutdown watcher.
//!
//! Run with `cargo bench --bench scaling` (append `-- <filter>` to run some variants only).

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::sync::Barrier;
use std::task::{Context, Waker};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, measurement::WallTime};
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service};
use tower_cancel::CancellationLayer;

/// Thread counts to measure.
const THREADS: [usize; 2] = [1, 2];

/// The inner service: an immediately ready response with a small full body.
fn inner() -> impl Service<
    Request<()>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>>,
> + Clone
+ Send {
    tower::service_fn(|_req: Request<()>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
            Bytes::from_static(b"hello"),
        ))))
    })
}

/// Runs `iters` requests split evenly over `threads` threads, each with its own clone of
/// `svc` and inside `rt`'s context, calling `per_request` after each request. Returns the wall
/// time from the barrier's release until every thread is done.
fn run<S, B, F>(rt: &Runtime, svc: &S, threads: usize, iters: u64, per_request: &F) -> Duration
where
    S: Service<Request<()>, Response = Response<B>> + Clone + Send,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
    F: Fn() + Sync,
{
    let barrier = Barrier::new(threads + 1);
    let per_thread = iters / threads as u64;
    let remainder = iters % threads as u64;
    thread::scope(|scope| {
        for t in 0..threads {
            let mut svc = svc.clone();
            let barrier = &barrier;
            let n = per_thread + u64::from((t as u64) < remainder);
            scope.spawn(move || {
                let _guard = rt.handle().enter();
                let mut cx = Context::from_waker(Waker::noop());
                barrier.wait();
                for _ in 0..n {
                    support::one_request(&mut svc, Request::new(()), &mut cx);
                    per_request();
                }
            });
        }
        barrier.wait();
        let start = Instant::now();
        // Leaving the scope joins every thread.
        start
    })
    .elapsed()
}

/// Benchmarks `svc` on every thread count as `name/<threads>`.
fn bench_variant<S, B, F>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    name: &str,
    svc: &S,
    per_request: &F,
) where
    S: Service<Request<()>, Response = Response<B>> + Clone + Send,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
    F: Fn() + Sync,
{
    for threads in THREADS {
        group.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &threads| {
            b.iter_custom(|iters| run(rt, svc, threads, iters, per_request));
        });
    }
}

fn scaling(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("failed to build the runtime");

    let mut group = c.benchmark_group("scaling");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    bench_variant(&mut group, &rt, "bare", &inner(), &|| {});

    let layer = CancellationLayer::new();
    bench_variant(&mut group, &rt, "layer", &layer.layer(inner()), &|| {});

    let shutdown = CancellationToken::new();
    let layer = CancellationLayer::new().shutdown_token(shutdown.clone());
    bench_variant(
        &mut group,
        &rt,
        "layer_with_shutdown",
        &layer.layer(inner()),
        &|| {},
    );

    let parent = CancellationToken::new();
    bench_variant(&mut group, &rt, "child_of_shared_token", &inner(), &|| {
        let child = parent.child_token();
        drop(black_box(child));
    });

    group.finish();
    assert!(!shutdown.is_cancelled() && !parent.is_cancelled());
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    scaling(&mut c);
    c.final_summary();
}
