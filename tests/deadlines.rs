//! Deadlines over real sockets: the layer's `timeout`, the deadline headers (`grpc-timeout`,
//! `connect-timeout-ms`, `x-envoy-expected-rq-timeout-ms`; the shortest of all wins), per-route
//! deadlines, the body phase, and malformed headers.

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower_cancel::{CancelReason, CancellationLayer};

async fn serve(log: &Log, layer: CancellationLayer) -> Server {
    Server::start(ServiceBuilder::new().layer(layer).service(app(log.clone()))).await
}

fn with_grpc_timeout(
    server: &Server,
    path: &str,
    value: &str,
) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    let mut request = h2_get(server, path);
    request
        .headers_mut()
        .insert("grpc-timeout", value.parse().unwrap());
    request
}

/// The deadline lies `limit` after the layer saw the request, which was between `before`
/// and now.
fn assert_deadline_is(deadline: Option<Instant>, before: Instant, limit: Duration) {
    let deadline = deadline.expect("the request has a deadline");
    assert!(
        deadline >= before + limit,
        "{deadline:?} < {before:?} + {limit:?}"
    );
    assert!(
        deadline <= Instant::now() + limit,
        "deadline later than {limit:?}"
    );
}

#[tokio::test]
async fn timeout_cancels_with_deadline_exceeded_and_the_handler_answers() {
    let log = Log::default();
    let limit = Duration::from_millis(100);
    let server = serve(&log, log.layer("layer").timeout(limit)).await;
    let before = Instant::now();
    let mut stream = raw_request(&server, &get("/honour")).await;
    let response = read_until(&mut stream, "stopped").await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(before.elapsed() >= limit);
    assert_eq!(
        log.entries(),
        [
            "start /honour",
            "handler /honour deadline_exceeded handler",
            "layer /honour deadline_exceeded handler",
            "stopped /honour deadline_exceeded",
        ]
    );
    let rc = &log.handles()[0];
    assert_eq!(rc.reason(), Some(CancelReason::DeadlineExceeded));
    assert_deadline_is(rc.deadline(), before, limit);
}

#[tokio::test]
async fn grpc_timeout_shorter_than_the_timeout_wins() {
    let log = Log::default();
    let layer = log
        .layer("layer")
        .timeout(Duration::from_secs(30))
        .grpc_timeout(true);
    let server = serve(&log, layer).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let before = Instant::now();
    let response = h2
        .send_request(with_grpc_timeout(&server, "/honour", "50m"))
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        log.with_prefix("layer"),
        ["layer /honour deadline_exceeded handler"]
    );
    assert_deadline_is(
        log.handles()[0].deadline(),
        before,
        Duration::from_millis(50),
    );
}

#[tokio::test]
async fn timeout_shorter_than_grpc_timeout_wins() {
    let log = Log::default();
    let limit = Duration::from_millis(80);
    let server = serve(&log, log.layer("layer").timeout(limit).grpc_timeout(true)).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let before = Instant::now();
    let response = h2
        .send_request(with_grpc_timeout(&server, "/honour", "10S"))
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_deadline_is(log.handles()[0].deadline(), before, limit);
}

#[tokio::test]
async fn grpc_timeout_is_ignored_unless_enabled() {
    let log = Log::default();
    let server = serve(&log, log.layer("layer")).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let response = h2
        .send_request(with_grpc_timeout(&server, "/full", "1n"))
        .await
        .unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "hello"
    );
    assert_eq!(log.handles()[0].deadline(), None);
    assert_all_completed(&log);
}

#[tokio::test]
async fn malformed_grpc_timeouts_are_ignored() {
    let log = Log::default();
    let server = serve(&log, log.layer("layer").grpc_timeout(true)).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let malformed = [
        "-5S",
        "+5S",
        "123456789m",
        "5s",
        "5",
        "S",
        "",
        "5 S",
        "1.5S",
        "5ms",
    ];
    for value in malformed {
        let response = h2
            .send_request(with_grpc_timeout(&server, "/full", value))
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello", "{value:?}");
    }
    // Two grpc-timeout headers are as malformed as one bad one.
    let mut request = with_grpc_timeout(&server, "/full", "1n");
    request
        .headers_mut()
        .append("grpc-timeout", "1n".parse().unwrap());
    let response = h2.send_request(request).await.unwrap();
    response.into_body().collect().await.unwrap();

    let handles = log.handles();
    assert_eq!(handles.len(), malformed.len() + 1);
    for rc in &handles {
        assert_eq!(rc.deadline(), None);
    }
    assert_all_completed(&log);
}

#[tokio::test]
async fn a_deadline_during_the_body_is_a_body_phase_cancel() {
    let log = Log::default();
    let server = serve(&log, log.layer("layer").timeout(Duration::from_millis(60))).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let response = h2.send_request(h2_get(&server, "/endless")).await.unwrap();
    let mut body = response.into_body();
    log.wait_for("layer /endless deadline_exceeded body").await;
    // The body is not dropped: it keeps streaming until it checks its token (this one
    // never does).
    assert!(body.frame().await.unwrap().unwrap().is_data());
    assert!(log.with_prefix("body-dropped").is_empty());
    assert_eq!(
        log.handles()[0].reason(),
        Some(CancelReason::DeadlineExceeded)
    );
}

#[tokio::test]
async fn a_per_route_layer_can_only_shorten_the_deadline() {
    let log = Log::default();
    let route_limit = Duration::from_millis(60);
    let svc = ServiceBuilder::new()
        .layer(log.layer("outer").timeout(Duration::from_secs(30)))
        .layer(log.layer("route").timeout(route_limit))
        .service(app(log.clone()));
    let server = Server::start(svc).await;
    let before = Instant::now();
    let mut stream = raw_request(&server, &get("/honour")).await;
    let response = read_until(&mut stream, "stopped").await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert_eq!(
        log.entries(),
        [
            "start /honour",
            "handler /honour deadline_exceeded handler",
            "route /honour deadline_exceeded handler",
            "outer /honour deadline_exceeded handler",
            "stopped /honour deadline_exceeded",
        ]
    );
    assert_deadline_is(log.handles()[0].deadline(), before, route_limit);

    // A longer per-route timeout does not extend the outer one.
    let log = Log::default();
    let outer_limit = Duration::from_millis(60);
    let svc = ServiceBuilder::new()
        .layer(log.layer("outer").timeout(outer_limit))
        .layer(log.layer("route").timeout(Duration::from_secs(30)))
        .service(app(log.clone()));
    let server = Server::start(svc).await;
    let before = Instant::now();
    let mut stream = raw_request(&server, &get("/honour")).await;
    read_until(&mut stream, "stopped").await;
    assert_deadline_is(log.handles()[0].deadline(), before, outer_limit);
}

#[tokio::test]
async fn requests_that_finish_in_time_are_not_cancelled() {
    let log = Log::default();
    let server = serve(&log, log.layer("layer").timeout(Duration::from_secs(30))).await;
    for path in ["/full", "/stream"] {
        let mut stream = raw_request(&server, &get(path)).await;
        let expected = if path == "/full" {
            "hello"
        } else {
            "0\r\n\r\n"
        };
        read_until(&mut stream, expected).await;
    }
    assert!(log.handles().iter().all(|rc| rc.deadline().is_some()));
    assert_all_completed(&log);
}

#[test]
fn a_runtime_without_timers_leaves_the_deadline_unenforced_without_panicking() {
    use tower::{ServiceExt, service_fn};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap(); // no `enable_time`: creating a timer would panic
    let layer = CancellationLayer::new().timeout(Duration::from_millis(1));
    let svc = tower::Layer::layer(
        &layer,
        service_fn(|req: http::Request<()>| async move {
            tokio::task::yield_now().await; // pending once: the layer polls its deadline
            let rc = req
                .extensions()
                .get::<tower_cancel::RequestCancellation>()
                .unwrap();
            Ok::<_, std::convert::Infallible>(http::Response::new(format!("{:?}", rc.reason())))
        }),
    );
    let body = runtime.block_on(async {
        let response = svc.oneshot(http::Request::new(())).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    });
    assert_eq!(body, "None");
}

/// Turns on one deadline header convention.
type Honour = fn(CancellationLayer) -> CancellationLayer;

/// The three deadline headers, their unit suffix, and the layer option that honours each.
const CONVENTIONS: [(&str, &str, Honour); 3] = [
    ("grpc-timeout", "m", |layer| layer.grpc_timeout(true)),
    ("connect-timeout-ms", "", |layer| {
        layer.connect_timeout(true)
    }),
    ("x-envoy-expected-rq-timeout-ms", "", |layer| {
        layer.envoy_timeout(true)
    }),
];

fn with_headers(
    server: &Server,
    path: &str,
    headers: &[(&'static str, String)],
) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    let mut request = h2_get(server, path);
    for (name, value) in headers {
        request.headers_mut().append(*name, value.parse().unwrap());
    }
    request
}

#[tokio::test]
async fn each_deadline_header_cancels_when_honoured_and_is_ignored_otherwise() {
    for (header, unit, honour) in CONVENTIONS {
        // Honoured: a 30 s handler that honours its token answers 503 at the header's 80 ms.
        let log = Log::default();
        let server = serve(&log, honour(log.layer("layer"))).await;
        let (mut h2, _conn, _socket) = h2_client(&server).await;
        let before = Instant::now();
        let value = format!("80{unit}");
        let request = with_headers(&server, "/honour", &[(header, value)]);
        let response = h2.send_request(request).await.unwrap();
        assert_eq!(response.status(), 503, "{header}");
        assert_eq!(
            log.with_prefix("layer"),
            ["layer /honour deadline_exceeded handler"],
            "{header}"
        );
        let rc = &log.handles()[0];
        assert_eq!(
            rc.reason(),
            Some(CancelReason::DeadlineExceeded),
            "{header}"
        );
        assert_deadline_is(rc.deadline(), before, Duration::from_millis(80));

        // The same over HTTP/1.1.
        let log = Log::default();
        let server = serve(&log, honour(log.layer("layer"))).await;
        let before = Instant::now();
        let request = format!("GET /honour HTTP/1.1\r\nhost: t\r\n{header}: 80{unit}\r\n\r\n");
        let mut stream = raw_request(&server, &request).await;
        let response = read_until(&mut stream, "stopped").await;
        assert!(response.starts_with("HTTP/1.1 503"), "{header}: {response}");
        assert_eq!(
            log.with_prefix("layer"),
            ["layer /honour deadline_exceeded handler"],
            "{header} over HTTP/1.1"
        );
        assert_deadline_is(
            log.handles()[0].deadline(),
            before,
            Duration::from_millis(80),
        );

        // Not honoured by a layer without the option (the others on): no deadline at all.
        let log = Log::default();
        let others = CONVENTIONS
            .iter()
            .filter(|(name, ..)| *name != header)
            .fold(log.layer("layer"), |layer, (_, _, on)| on(layer));
        let server = serve(&log, others).await;
        let (mut h2, _conn, _socket) = h2_client(&server).await;
        let request = with_headers(&server, "/full", &[(header, format!("1{unit}"))]);
        let response = h2.send_request(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello", "{header}");
        assert_eq!(log.handles()[0].deadline(), None, "{header}");
        assert_all_completed(&log);
    }
}

#[tokio::test]
async fn the_shortest_deadline_of_every_source_wins() {
    let log = Log::default();
    let layer = CONVENTIONS
        .iter()
        .fold(log.layer("layer"), |layer, (_, _, on)| on(layer))
        .timeout(Duration::from_secs(40));
    let server = serve(&log, layer).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    // Each header in turn is the shortest (10 s); the others say 20 s and 30 s.
    for shortest in 0..CONVENTIONS.len() {
        let headers: Vec<_> = CONVENTIONS
            .iter()
            .enumerate()
            .map(|(i, (name, unit, _))| {
                let secs = 10 + 10 * ((i + CONVENTIONS.len() - shortest) % CONVENTIONS.len());
                let value = if unit.is_empty() {
                    format!("{}", secs * 1000)
                } else {
                    format!("{secs}S")
                };
                (*name, value)
            })
            .collect();
        let before = Instant::now();
        let response = h2
            .send_request(with_headers(&server, "/full", &headers))
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        let rc = log.handles().pop().unwrap();
        assert_deadline_is(rc.deadline(), before, Duration::from_secs(10));
    }
    // The layer's own timeout, when it is the shortest.
    let short = [("connect-timeout-ms", "50000".to_owned())];
    let before = Instant::now();
    let response = h2
        .send_request(with_headers(&server, "/full", &short))
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
    let rc = log.handles().pop().unwrap();
    assert_deadline_is(rc.deadline(), before, Duration::from_secs(40));
    assert_all_completed(&log);
}

#[tokio::test]
async fn malformed_millisecond_deadlines_are_ignored() {
    let log = Log::default();
    let layer = log.layer("layer").connect_timeout(true).envoy_timeout(true);
    let server = serve(&log, layer).await;
    let (mut h2, _conn, _socket) = h2_client(&server).await;
    let malformed = [
        "0",
        "-5",
        "+5",
        "5ms",
        "5S",
        "1.5",
        "1e3",
        " 5",
        "12345678901",
        "",
    ];
    let mut sent = 0;
    for header in ["connect-timeout-ms", "x-envoy-expected-rq-timeout-ms"] {
        for value in malformed {
            let request = with_headers(&server, "/full", &[(header, value.to_owned())]);
            let response = h2.send_request(request).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "hello", "{header}: {value:?}");
            sent += 1;
        }
        // Repeated: as malformed as one bad value.
        let twice = [(header, "1".to_owned()), (header, "1".to_owned())];
        let response = h2
            .send_request(with_headers(&server, "/full", &twice))
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        sent += 1;
    }
    let handles = log.handles();
    assert_eq!(handles.len(), sent);
    for rc in &handles {
        assert_eq!(rc.deadline(), None);
    }
    assert_all_completed(&log);
}
