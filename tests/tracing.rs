//! The `tracing` events the layer emits, captured by a real subscriber.

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use common::*;
use http::{Request, Response};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_cancel::{CancellationLayer, Cancelled};
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
