//! The `tracing` events the layer emits, captured by a real subscriber.

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use common::*;
use http::{Request, Response};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;

#[derive(Clone, Debug)]
struct Event {
    level: tracing::Level,
    target: String,
    fields: BTreeMap<String, String>,
    span: Option<String>,
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

impl<S> tracing_subscriber::Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let span = ctx
            .event_span(event)
            .map(|span| format!("{}{}", span.name(), span_id_field(&span)));
        self.0.lock().unwrap().push(Event {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields,
            span,
        });
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    /// Values recorded on a span after its creation (`Span::record`), kept with the span's
    /// other fields; each recording is also logged with a snapshot of them, for the tests.
    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() else {
            return;
        };
        values.record(&mut Fields(fields));
        recorded_spans()
            .lock()
            .unwrap()
            .push((span.name().to_owned(), fields.clone()));
    }
}

/// Every `Span::record` seen: the span's name and all its fields after the recording.
fn recorded_spans() -> &'static Mutex<Vec<(String, BTreeMap<String, String>)>> {
    static RECORDED: Mutex<Vec<(String, BTreeMap<String, String>)>> = Mutex::new(Vec::new());
    &RECORDED
}

struct SpanFields(BTreeMap<String, String>);

fn span_id_field<S: for<'a> LookupSpan<'a>>(
    span: &tracing_subscriber::registry::SpanRef<'_, S>,
) -> String {
    span.extensions()
        .get::<SpanFields>()
        .and_then(|f| f.0.get("request_id").cloned())
        .map(|id| format!("#{id}"))
        .unwrap_or_default()
}

/// One global subscriber for this test binary; tests tell their events apart by path.
fn events() -> Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let capture = Capture::default();
            let subscriber = tracing_subscriber::registry().with(capture.clone());
            tracing::subscriber::set_global_default(subscriber).unwrap();
            capture
        })
        .clone()
}

fn events_for(capture: &Capture, path: &str) -> Vec<Event> {
    capture
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|e| {
            e.target == "tower_cancel" && e.fields.get("path").map(String::as_str) == Some(path)
        })
        .cloned()
        .collect()
}

/// Enters a per-request span around `call`, as tower-http's `TraceLayer` does.
#[derive(Clone)]
struct SpanPerRequest<S>(S, Arc<std::sync::atomic::AtomicUsize>);

impl<S, B> Service<Request<B>> for SpanPerRequest<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> S::Future {
        let id = self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let span = tracing::info_span!("request", request_id = id);
        let _entered = span.enter();
        self.0.call(req)
    }
}

#[tokio::test]
async fn one_event_per_cancellation_inside_the_request_span() {
    let capture = events();
    let log = Log::default();
    let svc = ServiceBuilder::new()
        .layer_fn(|inner| SpanPerRequest(inner, Arc::new(7.into())))
        .layer(log.layer("layer"))
        .service(app(log.clone()));
    let server = Server::start(svc).await;
    let stream = raw_request(&server, &get("/slow")).await;
    log.wait_for("start /slow").await;
    drop(stream);
    server.idle().await;

    let events = events_for(&capture, "/slow");
    assert_eq!(events.len(), 1, "{events:#?}");
    let event = &events[0];
    assert_eq!(event.level, tracing::Level::DEBUG);
    assert_eq!(event.fields["message"], "request cancelled");
    assert_eq!(event.fields["reason"], "disconnected");
    assert_eq!(event.fields["phase"], "handler");
    assert_eq!(event.fields["method"], "GET");
    assert!(event.fields.contains_key("elapsed"));
    // hyper dropped the future outside any span; the event still lands in the request's.
    assert_eq!(event.span.as_deref(), Some("request#7"));
}

#[tokio::test]
async fn panics_are_reported_as_errors() {
    let capture = events();
    let layer = CancellationLayer::new()
        .on_cancel(|_: &Cancelled| panic!("sync boom"))
        .on_cancel_async(|_: Cancelled| async { panic!("async boom") });
    let tracker = layer.get_task_tracker().clone();
    let mut svc = tower::Layer::layer(
        &layer,
        service_fn(|_: Request<()>| async {
            std::future::pending::<()>().await;
            Ok::<_, std::convert::Infallible>(Response::new(String::new()))
        }),
    );
    let request = Request::get("/panics").body(()).unwrap();
    let future = svc.ready().await.unwrap().call(request);
    drop(future);
    tracker.close();
    tracker.wait().await;

    let errors: Vec<_> = events_for(&capture, "/panics")
        .into_iter()
        .filter(|e| e.level == tracing::Level::ERROR)
        .map(|e| e.fields["panic"].clone())
        .collect();
    assert_eq!(errors, ["sync boom", "async boom"]);
}

#[test]
fn no_runtime_for_async_cleanup_is_reported_not_a_panic() {
    let capture = events();
    let layer = CancellationLayer::new().on_cancel_async(|_: Cancelled| async {});
    let mut svc = tower::Layer::layer(
        &layer,
        service_fn(|_: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(String::new()))
        }),
    );
    // No Tokio runtime anywhere on this thread: called and dropped from plain code.
    let future = svc.call(Request::get("/no-runtime").body(()).unwrap());
    drop(future);
    let events = events_for(&capture, "/no-runtime");
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(events[0].fields["message"], "request cancelled");
    assert_eq!(events[1].level, tracing::Level::ERROR);
    assert!(events[1].fields["message"].contains("no Tokio runtime"));
}

#[tokio::test]
async fn malformed_deadline_headers_are_ignored_with_a_debug_event() {
    let capture = events();
    let log = Log::default();
    let layer = log
        .layer("layer")
        .grpc_timeout(true)
        .connect_timeout(true)
        .envoy_timeout(true);
    let server = Server::start(ServiceBuilder::new().layer(layer).service(app(log.clone()))).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    // (header, value, why); each value is unique, so its event can be told apart.
    let cases = [
        ("grpc-timeout", "-7S", "not an ASCII digit"),
        ("grpc-timeout", "7s", "unit is not one of H M S m u n"),
        ("connect-timeout-ms", "0", "zero is not a deadline"),
        (
            "connect-timeout-ms",
            "12345678901",
            "more digits than the convention allows",
        ),
        (
            "x-envoy-expected-rq-timeout-ms",
            "15s",
            "not an ASCII digit",
        ),
        ("x-envoy-expected-rq-timeout-ms", "", "no digits"),
    ];
    for (header, value, why) in cases {
        let mut request = h2_get(&server, "/full");
        request.headers_mut().insert(header, value.parse().unwrap());
        let response = h2.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(log.handles().pop().unwrap().deadline(), None, "{header}");

        let quoted = format!("{value:?}");
        let events: Vec<_> = capture
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.fields.get("value") == Some(&quoted))
            .cloned()
            .collect();
        assert_eq!(events.len(), 1, "{header} {value:?}: {events:#?}");
        assert_eq!(events[0].level, tracing::Level::DEBUG);
        assert_eq!(events[0].target, "tower_cancel");
        assert_eq!(
            events[0].fields["message"],
            "ignoring a malformed deadline header"
        );
        assert_eq!(events[0].fields["header"], header);
        assert_eq!(events[0].fields["why"], why, "{header} {value:?}");
    }
}

#[tokio::test]
async fn the_event_lands_in_tower_http_trace_layer_span() {
    let capture = events();
    let log = Log::default();
    let svc = ServiceBuilder::new()
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(log.layer("layer"))
        .service(app(log.clone()));
    let server = Server::start(svc).await;
    let stream = raw_request(&server, &get("/upload")).await;
    log.wait_for("start /upload").await;
    drop(stream);
    server.idle().await;

    let events = events_for(&capture, "/upload");
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].fields["reason"], "disconnected");
    // tower-http's span for the request is called `request`.
    assert_eq!(events[0].span.as_deref(), Some("request"));
}

#[tokio::test]
async fn a_token_of_the_application_in_the_extensions_is_replaced_with_a_warning() {
    // Extensions are keyed by type: an application's own `CancellationToken` inserted outside
    // the layer (a shutdown token shared through `Extension`, say) is replaced by the
    // request's, and a `warn` event says so. Inserted inside the layer, it would replace the
    // request's silently: the handler would get the application's token.
    let capture = events();
    let app_token = tokio_util::sync::CancellationToken::new();
    app_token.cancel();
    let outside = app_token.clone();
    let svc = ServiceBuilder::new()
        .map_request(move |mut req: Request<()>| {
            req.extensions_mut().insert(outside.clone());
            req
        })
        .layer(CancellationLayer::new())
        .service(service_fn(|req: Request<()>| async move {
            let token = req
                .extensions()
                .get::<tokio_util::sync::CancellationToken>()
                .unwrap();
            Ok::<_, std::convert::Infallible>(Response::new(token.is_cancelled().to_string()))
        }));
    let request = Request::get("/app-token").body(()).unwrap();
    let response = svc.oneshot(request).await.unwrap();
    assert_eq!(
        response.body().get_ref(),
        "false",
        "the handler got the request's token"
    );
    let warnings: Vec<_> = events_for(&capture, "/app-token")
        .into_iter()
        .filter(|e| e.level == tracing::Level::WARN)
        .map(|e| e.fields["message"].clone())
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("replaced it with the request's own token"));
}

#[tokio::test]
async fn a_request_body_layer_without_a_cancellation_layer_says_so_once() {
    // It has no scope to act on: a client leaving mid-upload would go unrecorded. One `error`
    // event, at the first request, naming the layer to add; none for the requests after.
    let capture = events();
    let layer = tower_cancel::RequestBodyLayer::new().read_ahead(1024);
    let svc = tower::Layer::layer(
        &layer,
        service_fn(|_: Request<tower_cancel::RequestBody<String>>| async {
            Ok::<_, std::convert::Infallible>(Response::new(String::new()))
        }),
    );
    for _ in 0..3 {
        let request = Request::post("/no-scope").body("x".to_owned()).unwrap();
        svc.clone().oneshot(request).await.unwrap();
    }
    let errors: Vec<_> = events_for(&capture, "/no-scope")
        .into_iter()
        .filter(|e| e.level == tracing::Level::ERROR)
        .map(|e| e.fields["message"].clone())
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("CancellationLayer"), "{errors:?}");
}

/// A handler that waits forever, or, on `/traced-stop`, answers 503 once its request is
/// cancelled (as a handler does at shutdown).
async fn traced_handler(
    req: Request<hyper::body::Incoming>,
) -> Result<Response<String>, std::convert::Infallible> {
    let rc = RequestCancellation::from_extensions(req.extensions())
        .unwrap()
        .clone();
    if req.uri().path() == "/traced-stop" {
        rc.cancelled().await;
        let mut res = Response::new(String::from("stopped"));
        *res.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        return Ok(res);
    }
    std::future::pending().await
}

#[tokio::test]
async fn the_reason_and_phase_land_on_trace_layer_span_at_the_chosen_level() {
    // tower-http's `TraceLayer` with a span that declares the two fields, and the layer's
    // event at `INFO`: the client leaves, the event is at `INFO` in that span, and the span
    // carries `tower_cancel.reason` and `tower_cancel.phase` for an exporter to read.
    let capture = events();
    let svc = ServiceBuilder::new()
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(
                |req: &Request<hyper::body::Incoming>| {
                    tracing::info_span!(
                        "traced",
                        path = req.uri().path(),
                        tower_cancel.reason = tracing::field::Empty,
                        tower_cancel.phase = tracing::field::Empty,
                    )
                },
            ),
        )
        .layer(CancellationLayer::new().event_level(tracing::Level::INFO))
        .service(service_fn(traced_handler));
    let server = Server::start(svc).await;
    let stream = raw_request(&server, &get("/traced-leave")).await;
    // The handler waits: give the request time to reach it, then leave.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    drop(stream);
    server.idle().await;

    let events = events_for(&capture, "/traced-leave");
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].level, tracing::Level::INFO);
    assert_eq!(events[0].span.as_deref(), Some("traced"));
    let recorded: Vec<_> = recorded_spans()
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, fields)| {
            name == "traced" && fields.get("path").map(String::as_str) == Some("/traced-leave")
        })
        .map(|(_, fields)| fields.clone())
        .collect();
    let last = recorded.last().expect("the span's fields were recorded");
    assert_eq!(last["tower_cancel.reason"], "disconnected", "{recorded:#?}");
    assert_eq!(last["tower_cancel.phase"], "handler", "{recorded:#?}");
}

#[tokio::test]
async fn a_cancelled_request_s_answer_carries_its_record_for_trace_layer_to_classify() {
    // A handler that answers 503 once its request is cancelled (a shutdown): `TraceLayer`'s
    // default classifier counts the 503 as a server failure; the documented one, which looks
    // for `Cancelled` in the response, does not. A request that completes carries no record.
    use tower_http::classify::{
        ClassifiedResponse, ClassifyResponse, NeverClassifyEos, ServerErrorsAsFailures,
        ServerErrorsFailureClass, SharedClassifier,
    };

    #[derive(Clone, Copy)]
    struct CancelledIsNotAFailure;

    impl ClassifyResponse for CancelledIsNotAFailure {
        type FailureClass = ServerErrorsFailureClass;
        type ClassifyEos = NeverClassifyEos<ServerErrorsFailureClass>;

        fn classify_response<B>(
            self,
            res: &Response<B>,
        ) -> ClassifiedResponse<Self::FailureClass, Self::ClassifyEos> {
            if res.extensions().get::<Cancelled>().is_some() {
                return ClassifiedResponse::Ready(Ok(()));
            }
            ServerErrorsAsFailures::new().classify_response(res)
        }

        fn classify_error<E: fmt::Display + 'static>(self, error: &E) -> Self::FailureClass {
            ServerErrorsAsFailures::new().classify_error(error)
        }
    }

    let shutdown = tokio_util::sync::CancellationToken::new();
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = |failures: &Arc<std::sync::atomic::AtomicUsize>| {
        let failures = failures.clone();
        move |_: ServerErrorsFailureClass, _: std::time::Duration, _: &tracing::Span| {
            failures.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    };
    let recipe_failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let default = ServiceBuilder::new()
        .layer(tower_http::trace::TraceLayer::new_for_http().on_failure(counted(&failures)))
        .layer(CancellationLayer::new().shutdown_token(shutdown.clone()))
        .service(service_fn(traced_handler));
    let recipe = ServiceBuilder::new()
        .layer(
            tower_http::trace::TraceLayer::new(SharedClassifier::new(CancelledIsNotAFailure))
                .on_failure(counted(&recipe_failures)),
        )
        .layer(CancellationLayer::new().shutdown_token(shutdown.clone()))
        .service(service_fn(traced_handler));
    let default_server = Server::start(default).await;
    let recipe_server = Server::start(recipe).await;
    let mut streams = Vec::new();
    for server in [&default_server, &recipe_server] {
        streams.push(raw_request(server, &get("/traced-stop")).await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    shutdown.cancel();
    for stream in &mut streams {
        let answer = read_until(stream, "stopped").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    }
    drop(streams);
    default_server.idle().await;
    recipe_server.idle().await;
    assert_eq!(
        failures.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "default classifier"
    );
    assert_eq!(
        recipe_failures.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the recipe"
    );

    // A request that completes carries no record.
    let svc = tower::Layer::layer(
        &CancellationLayer::new(),
        service_fn(|_: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(String::from("ok")))
        }),
    );
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert!(res.extensions().get::<Cancelled>().is_none());
}
