//! Feature `metrics` over real sockets, and the `debug` event that says how long a cancelled
//! request's work ran on after its cancellation.
//!
//! Each test installs its own `metrics` recorder (metrics-util's debugging recorder) and its
//! own `tracing` subscriber as the thread's defaults. `#[tokio::test]` runs on a current-thread
//! runtime, so the server, hyper's connection tasks, the shutdown watcher and the cleanups all
//! run on the test's thread and record into that test's recorder and subscriber only, while
//! other tests run in parallel on theirs.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::{Request, Response};
use hyper::body::Incoming;
use metrics::Unit;
use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio_util::sync::CancellationToken;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::SubscriberExt;

const CANCELLATIONS: &str = "tower_cancel_cancellations_total";
const CLEANUPS: &str = "tower_cancel_cleanups_total";
const RAN_AFTER: &str = "tower_cancel_ran_after_cancel_seconds";

/// The metric a snapshot names: kind, name, and labels in key order.
type Id = (MetricKind, String, Vec<(String, String)>);

/// What one test recorded: its recorder's values summed over snapshots (a snapshot drains
/// counters and histograms), and its events.
struct Observed {
    snapshotter: Snapshotter,
    values: Mutex<BTreeMap<Id, Value>>,
    units: Mutex<BTreeMap<String, Unit>>,
    events: Capture,
    _guards: (
        metrics::LocalRecorderGuard<'static>,
        tracing::subscriber::DefaultGuard,
    ),
}

/// Installs a recorder and a subscriber for this thread, until the result is dropped.
fn observe() -> Observed {
    // Leaked (one small recorder per test) so that the guard may outlive this function.
    let recorder: &'static DebuggingRecorder = Box::leak(Box::new(DebuggingRecorder::new()));
    let snapshotter = recorder.snapshotter();
    let metrics_guard = metrics::set_default_local_recorder(recorder);
    let events = Capture::default();
    let subscriber = tracing_subscriber::registry().with(events.clone());
    let tracing_guard = tracing::subscriber::set_default(subscriber);
    Observed {
        snapshotter,
        values: Mutex::default(),
        units: Mutex::default(),
        events,
        _guards: (metrics_guard, tracing_guard),
    }
}

impl Observed {
    /// Everything recorded so far.
    fn values(&self) -> BTreeMap<Id, Value> {
        let mut values = self.values.lock().unwrap();
        for (key, unit, _, value) in self.snapshotter.snapshot().into_vec() {
            let (kind, key) = key.into_parts();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            let name = key.name().to_owned();
            if let Some(unit) = unit {
                self.units.lock().unwrap().insert(name.clone(), unit);
            }
            let slot = values.entry((kind, name, labels)).or_insert(match kind {
                MetricKind::Histogram => Value::Histogram(Vec::new()),
                _ => Value::Counter(0),
            });
            match (slot, value) {
                (Value::Counter(sum), DebugValue::Counter(n)) => *sum += n,
                (Value::Histogram(all), DebugValue::Histogram(more)) => {
                    all.extend(more.into_iter().map(|v| v.into_inner()));
                }
                (slot, value) => panic!("{slot:?} then {value:?}"),
            }
        }
        values.clone()
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.values().get(&id(MetricKind::Counter, name, labels)) {
            Some(Value::Counter(n)) => *n,
            None => 0,
            Some(other) => panic!("{name} is not a counter: {other:?}"),
        }
    }

    /// The values a histogram recorded, in seconds.
    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        match self.values().get(&id(MetricKind::Histogram, name, labels)) {
            Some(Value::Histogram(values)) => values.clone(),
            None => Vec::new(),
            Some(other) => panic!("{name} is not a histogram: {other:?}"),
        }
    }

    fn unit(&self, name: &str) -> Option<Unit> {
        self.values();
        self.units.lock().unwrap().get(name).copied()
    }

    /// The crate's events about `path`.
    fn events(&self, path: &str) -> Vec<Event> {
        self.events
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                e.target == "tower_cancel" && e.fields.get("path").is_some_and(|p| p == path)
            })
            .cloned()
            .collect()
    }

    /// The events that say how long `path`'s work ran on after its cancellation.
    fn stop_reports(&self, path: &str) -> Vec<Event> {
        self.events(path)
            .into_iter()
            .filter(|e| e.fields.contains_key("ran_after_cancel"))
            .collect()
    }
}

/// A counter's sum, or a histogram's values (in seconds), over every snapshot.
#[derive(Clone, Debug)]
enum Value {
    Counter(u64),
    Histogram(Vec<f64>),
}

fn id(kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> Id {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|&(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    labels.sort();
    (kind, name.to_owned(), labels)
}

#[derive(Clone, Debug)]
struct Event {
    level: tracing::Level,
    target: String,
    fields: BTreeMap<String, String>,
}

impl Event {
    fn field(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .unwrap_or_else(|| panic!("no field {name} in {self:#?}"))
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Event>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(Event {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields,
        });
    }
}

fn response(text: &'static str) -> Response<AppBody> {
    use http_body_util::BodyExt;
    Response::new(
        http_body_util::Full::new(bytes::Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    )
}

/// A handler that notices its cancellation late: it answers `late` 200 ms after its token fires.
async fn notices_late(req: Request<Incoming>, log: Log) -> Result<Response<AppBody>, Infallible> {
    let rc = req
        .extensions()
        .get::<RequestCancellation>()
        .unwrap()
        .clone();
    log.push(format!("start {}", req.uri().path()));
    rc.cancelled().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    log.push(format!("answered {}", req.uri().path()));
    Ok(response("late"))
}

#[tokio::test]
async fn a_client_that_leaves_stops_the_handler_at_once() {
    let observed = observe();
    let log = Log::default();
    let server = Server::app(&log).await;
    let stream = raw_request(&server, &get("/slow")).await;
    log.wait_for("start /slow").await;
    drop(stream);
    log.wait_for("layer /slow disconnected handler").await;
    server.idle().await;

    let labels = [("reason", "disconnected"), ("phase", "handler")];
    assert_eq!(observed.counter(CANCELLATIONS, &labels), 1);
    assert_eq!(
        observed.histogram(RAN_AFTER, &labels),
        [0.0],
        "hyper dropped the handler: it stopped at once"
    );
    assert_eq!(observed.unit(RAN_AFTER), Some(Unit::Seconds));
    assert_eq!(observed.unit(CANCELLATIONS), Some(Unit::Count));

    // One event, the cancellation's: it is also the report, since nothing ran on.
    let events = observed.events("/slow");
    assert_eq!(events.len(), 1, "{events:#?}");
    let event = &events[0];
    assert_eq!(event.level, tracing::Level::DEBUG);
    assert_eq!(event.field("message"), "request cancelled");
    assert_eq!(event.field("reason"), "disconnected");
    assert_eq!(event.field("stopped"), "dropped");
    assert_eq!(event.field("ran_after_cancel"), "0ns");
}

#[tokio::test]
async fn a_handler_that_honours_its_deadline_answers_soon_after_it() {
    let observed = observe();
    let log = Log::default();
    let layer = log.layer("layer").timeout(Duration::from_millis(50));
    let server = Server::start(ServiceBuilder::new().layer(layer).service(app(log.clone()))).await;
    let mut stream = raw_request(&server, &get("/honour")).await;
    let answer = read_until(&mut stream, "stopped").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    drop(stream);
    server.idle().await;

    let labels = [("reason", "deadline_exceeded"), ("phase", "handler")];
    assert_eq!(observed.counter(CANCELLATIONS, &labels), 1);
    let ran = observed.histogram(RAN_AFTER, &labels);
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert!(
        (0.0..5.0).contains(&ran[0]),
        "answered as its token fired: {ran:?}"
    );

    let reports = observed.stop_reports("/honour");
    assert_eq!(reports.len(), 1, "{reports:#?}");
    assert_eq!(reports[0].level, tracing::Level::DEBUG);
    assert_eq!(reports[0].field("message"), "cancelled request stopped");
    assert_eq!(reports[0].field("reason"), "deadline_exceeded");
    assert_eq!(reports[0].field("phase"), "handler");
    assert_eq!(reports[0].field("stopped"), "ended");
    assert_eq!(reports[0].field("method"), "GET");
    let cancelled: Vec<_> = observed
        .events("/honour")
        .into_iter()
        .filter(|e| e.field("message") == "request cancelled")
        .collect();
    assert_eq!(cancelled.len(), 1, "{cancelled:#?}");
    assert!(
        !cancelled[0].fields.contains_key("stopped"),
        "the handler was still running when it was cancelled"
    );
}

#[tokio::test]
async fn a_shutdown_counts_the_time_the_handler_takes_to_notice() {
    let observed = observe();
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let l = log.clone();
    let svc = ServiceBuilder::new()
        .layer(log.layer("layer").shutdown_token(shutdown.clone()))
        .service(service_fn(move |req| notices_late(req, l.clone())));
    let server = Server::start(svc).await;
    let mut stream = raw_request(&server, &get("/late")).await;
    log.wait_for("start /late").await;
    shutdown.cancel();
    read_until(&mut stream, "late").await;
    drop(stream);
    server.idle().await;

    let labels = [("reason", "shutdown"), ("phase", "handler")];
    assert_eq!(observed.counter(CANCELLATIONS, &labels), 1);
    let ran = observed.histogram(RAN_AFTER, &labels);
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert!(
        (0.2..5.0).contains(&ran[0]),
        "the handler slept 200 ms after its token fired: {ran:?}"
    );
    let reports = observed.stop_reports("/late");
    assert_eq!(reports.len(), 1, "{reports:#?}");
    assert_eq!(reports[0].field("message"), "cancelled request stopped");
    assert_eq!(reports[0].field("reason"), "shutdown");
    assert_eq!(reports[0].field("stopped"), "ended");
}

#[tokio::test]
async fn a_detached_handler_runs_on_after_its_client_left() {
    let observed = observe();
    let log = Log::default();
    let route = CancellationLayer::new().detached();
    let tracker = route.get_task_tracker().clone();
    let l = log.clone();
    let svc = ServiceBuilder::new().layer(log.layer("layer")).service(
        route
            .layer(service_fn(move |req| notices_late(req, l.clone())))
            .map_response(|res| res.map(http_body_util::BodyExt::boxed)),
    );
    let server = Server::start(svc).await;
    let stream = raw_request(&server, &get("/detached")).await;
    log.wait_for("start /detached").await;
    drop(stream);
    log.wait_for("layer /detached disconnected handler").await;
    server.idle().await;
    assert!(
        observed.stop_reports("/detached").is_empty(),
        "the handler still runs"
    );
    log.wait_for("answered /detached").await;
    tracker.close();
    tracker.wait().await;

    let labels = [("reason", "disconnected"), ("phase", "handler")];
    assert_eq!(observed.counter(CANCELLATIONS, &labels), 1);
    let ran = observed.histogram(RAN_AFTER, &labels);
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert!(
        (0.2..5.0).contains(&ran[0]),
        "the detached handler returned 200 ms after its token fired: {ran:?}"
    );
    let reports = observed.stop_reports("/detached");
    assert_eq!(reports.len(), 1, "{reports:#?}");
    assert_eq!(reports[0].field("message"), "cancelled request stopped");
    assert_eq!(reports[0].field("stopped"), "ended");
}

#[tokio::test]
async fn a_stream_cancelled_at_its_deadline_runs_until_the_client_leaves() {
    let observed = observe();
    let log = Log::default();
    let layer = log.layer("layer").timeout(Duration::from_millis(100));
    let server = Server::start(ServiceBuilder::new().layer(layer).service(app(log.clone()))).await;
    let mut stream = raw_request(&server, &get("/endless")).await;
    read_until(&mut stream, "chunk-of-data").await;
    log.wait_for("layer /endless deadline_exceeded body").await;
    // The body ignores its token and streams on; the client leaves 100 ms later.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    log.wait_for("body-dropped /endless").await;
    server.idle().await;

    let labels = [("reason", "deadline_exceeded"), ("phase", "body")];
    assert_eq!(observed.counter(CANCELLATIONS, &labels), 1);
    let ran = observed.histogram(RAN_AFTER, &labels);
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert!((0.1..5.0).contains(&ran[0]), "{ran:?}");
    let reports = observed.stop_reports("/endless");
    assert_eq!(reports.len(), 1, "{reports:#?}");
    assert_eq!(reports[0].field("message"), "cancelled request stopped");
    assert_eq!(reports[0].field("phase"), "body");
    assert_eq!(reports[0].field("stopped"), "dropped");
}

#[tokio::test]
async fn a_handler_that_cancels_itself_is_explicit() {
    let observed = observe();
    let log = Log::default();
    let server = Server::app(&log).await;
    let mut stream = raw_request(&server, &get("/cancel-self")).await;
    read_until(&mut stream, "cancelled myself").await;
    drop(stream);
    server.idle().await;

    let labels = [("reason", "explicit"), ("phase", "handler")];
    assert_eq!(observed.counter(CANCELLATIONS, &labels), 1);
    assert_eq!(observed.histogram(RAN_AFTER, &labels).len(), 1);
    let reports = observed.stop_reports("/cancel-self");
    assert_eq!(reports.len(), 1, "{reports:#?}");
    assert_eq!(reports[0].field("stopped"), "ended");
}

#[tokio::test]
async fn completed_requests_record_nothing() {
    let observed = observe();
    let log = Log::default();
    let server = Server::app(&log).await;
    let mut stream = raw_request(&server, &get("/full")).await;
    read_until(&mut stream, "hello").await;
    for path in ["/stream", "/stream-with-length"] {
        use tokio::io::AsyncWriteExt;
        stream.write_all(get(path).as_bytes()).await.unwrap();
        read_until_count(&mut stream, CHUNK, 3).await;
    }
    drop(stream);
    server.idle().await;
    assert_all_completed(&log);

    let values = observed.values();
    assert!(values.is_empty(), "{values:#?}");
    for path in ["/full", "/stream", "/stream-with-length"] {
        let events = observed.events(path);
        assert!(events.is_empty(), "{path}: {events:#?}");
    }
}

#[tokio::test]
async fn cleanups_run_refused_and_overrun_are_counted() {
    let observed = observe();
    let log = Log::default();
    let release = CancellationToken::new();
    let r = release.clone();
    let layer = log
        .layer("layer")
        .max_running_cleanups(1)
        .max_queued_cleanups(0)
        .on_cancel_async(move |_: Cancelled| {
            let release = r.clone();
            async move { release.cancelled().await }
        });
    let server = Server::start(
        ServiceBuilder::new()
            .layer(layer.clone())
            .service(app(log.clone())),
    )
    .await;
    // Three clients leave: the first cleanup runs (and waits), the other two find no room.
    for n in 1..=3 {
        let stream = raw_request(&server, &get("/slow")).await;
        log.wait_for_count("start /slow", n).await;
        drop(stream);
        log.wait_for_count("layer /slow disconnected handler", n)
            .await;
    }
    server.idle().await;
    assert_eq!(observed.counter(CLEANUPS, &[("outcome", "refused")]), 2);
    assert_eq!(observed.counter(CLEANUPS, &[("outcome", "run")]), 0);

    let overran = layer.drain_cleanups(Duration::from_millis(20)).await;
    assert!(overran.is_err(), "{overran:?}");
    assert_eq!(observed.counter(CLEANUPS, &[("outcome", "overrun")]), 1);

    release.cancel();
    let counts = layer.drain_cleanups(PATIENCE).await.unwrap();
    assert_eq!((counts.completed, counts.refused), (1, 2));
    assert_eq!(observed.counter(CLEANUPS, &[("outcome", "run")]), 1);
    assert_eq!(observed.unit(CLEANUPS), Some(Unit::Count));
    assert_eq!(
        observed.counter(
            CANCELLATIONS,
            &[("reason", "disconnected"), ("phase", "handler")]
        ),
        3
    );
}

/// The same request through `oneshot`, without sockets: a cancellation recorded while the
/// handler is pending, a handler that stops 200 ms later on the paused clock, exactly.
#[tokio::test(start_paused = true)]
async fn the_time_ran_on_is_measured_from_the_cancellation() {
    let observed = observe();
    let shutdown = CancellationToken::new();
    let svc = CancellationLayer::new()
        .shutdown_token(shutdown.clone())
        .layer(service_fn(|req: Request<()>| async move {
            let rc = req
                .extensions()
                .get::<RequestCancellation>()
                .unwrap()
                .clone();
            rc.cancelled().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    let request = Request::get("/paused").body(()).unwrap();
    let call = tokio::spawn(svc.oneshot(request));
    tokio::time::sleep(Duration::from_secs(1)).await;
    shutdown.cancel();
    let response = call.await.unwrap().unwrap();
    // An empty body: the request is over with the head.
    drop(response);
    let ran = observed.histogram(RAN_AFTER, &[("reason", "shutdown"), ("phase", "handler")]);
    assert_eq!(ran, [0.2]);
}
