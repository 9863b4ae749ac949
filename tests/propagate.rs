//! `PropagateLayer` on a hyper-util client against a real server: an inbound request's
//! deadline becomes the outbound deadline header of the call's convention (`grpc-timeout`,
//! `connect-timeout-ms`, or a configured header), and its cancellation abandons the outbound
//! call even after the call answered, in the middle of its body.

mod common;

use std::convert::Infallible;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_cancel::{
    CancelReason, CancellationLayer, InboundCancelled, PropagateLayer, RequestCancellation,
};

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    client_for(true)
}

/// hyper-util's client, HTTP/2 (prior knowledge) or HTTP/1.1.
fn client_for(http2: bool) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(connector)
}

/// Runs `handler` as an inbound request behind `layer`, in process; returns its answer.
async fn inbound<F, Fut>(layer: CancellationLayer, handler: F) -> String
where
    F: Fn(RequestCancellation) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        let handler = handler.clone();
        async move {
            let rc = RequestCancellation::from_extensions(req.extensions()).unwrap();
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(handler(rc).await))))
        }
    }));
    let response = svc.oneshot(Request::new(())).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

async fn abandons_the_outbound_body_mid_stream(http2: bool) {
    let log = Log::default();
    let downstream = Server::app(&log).await;
    let url = downstream.url("/endless");
    let l = log.clone();
    let answer = inbound(CancellationLayer::new(), move |rc| {
        let (url, log) = (url.clone(), l.clone());
        async move {
            let mut outbound = PropagateLayer::from_inbound(rc.clone()).layer(client_for(http2));
            let call = Request::get(url).body(Empty::new()).unwrap();
            let response = outbound.ready().await.unwrap().call(call).await.unwrap();
            let mut body = response.into_body();
            body.frame().await.unwrap().unwrap();
            // The application gives up on the request (as a shutdown or a deadline would),
            // and keeps reading: the next frame is the typed error, then the end.
            rc.token().cancel();
            let error = body.frame().await.unwrap().unwrap_err();
            let why = error
                .downcast_ref::<InboundCancelled>()
                .expect("InboundCancelled");
            assert_eq!(why.reason(), CancelReason::Explicit);
            assert!(body.frame().await.is_none());
            // Still holding `body`: only the layer can have dropped the call's stream.
            log.wait_for("layer /endless disconnected body").await;
            drop(body);
            error.to_string()
        }
    })
    .await;
    assert!(
        answer.starts_with("the outbound call was abandoned: the inbound request was cancelled ("),
        "{answer}"
    );
    log.wait_for("body-dropped /endless").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_inbound_request_abandons_the_outbound_body_mid_stream_http2() {
    abandons_the_outbound_body_mid_stream(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_inbound_request_abandons_the_outbound_body_mid_stream_http1() {
    abandons_the_outbound_body_mid_stream(false).await;
}

/// Answers with the `grpc-timeout` header it received, or `none`.
fn echo_timeout() -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(|req: Request<Incoming>| async move {
        let value = req
            .headers()
            .get("grpc-timeout")
            .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(value))))
    })
}

async fn grpc_timeout_seen(layer: CancellationLayer) -> String {
    let downstream = Server::start(echo_timeout()).await;
    let url = downstream.url("/");
    inbound(layer, move |rc| {
        let url = url.clone();
        async move {
            // The handle travels in the outbound request's extensions.
            let mut outbound = PropagateLayer::new().layer(client());
            let mut call = Request::get(url)
                .header("content-type", "application/grpc")
                .body(Empty::new())
                .unwrap();
            call.extensions_mut().insert(rc);
            let response = outbound.ready().await.unwrap().call(call).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(body.to_vec()).unwrap()
        }
    })
    .await
}

#[tokio::test]
async fn the_inbound_deadline_becomes_the_outbound_grpc_timeout() {
    let seen =
        grpc_timeout_seen(CancellationLayer::new().timeout(std::time::Duration::from_secs(2)))
            .await;
    let (digits, unit) = seen.split_at(seen.len() - 1);
    let micros: u64 = digits.parse().unwrap();
    assert_eq!(unit, "u", "{seen}");
    assert!(
        (1_000_000..2_000_000).contains(&micros),
        "at most the 2 s that remained, and not much less: {seen}"
    );
    assert_eq!(grpc_timeout_seen(CancellationLayer::new()).await, "none");
}

/// Answers with every deadline header it received, `name=value` separated by spaces.
fn echo_deadline_headers() -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(|req: Request<Incoming>| async move {
        let names = [
            "grpc-timeout",
            "connect-timeout-ms",
            "x-envoy-upstream-rq-timeout-ms",
        ];
        let seen: Vec<String> = names
            .iter()
            .flat_map(|name| {
                req.headers()
                    .get_all(*name)
                    .iter()
                    .map(move |v| format!("{name}={}", v.to_str().unwrap()))
            })
            .collect();
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(seen.join(" ")))))
    })
}

#[tokio::test]
async fn each_call_gets_the_deadline_header_of_its_convention() {
    let downstream = Server::start(echo_deadline_headers()).await;
    let envoy = http::HeaderName::from_static("x-envoy-upstream-rq-timeout-ms");
    // (content-type, connect-protocol-version, query, configured header) → header written
    let cases = [
        (Some("application/grpc"), false, "", true, "grpc-timeout"),
        (
            Some("application/json"),
            true,
            "",
            true,
            "connect-timeout-ms",
        ),
        (
            Some("application/connect+proto"),
            false,
            "",
            false,
            "connect-timeout-ms",
        ),
        (
            None,
            false,
            "?connect=v1&encoding=json&message=%7B%7D",
            true,
            "connect-timeout-ms",
        ),
        (
            Some("application/json"),
            false,
            "",
            true,
            "x-envoy-upstream-rq-timeout-ms",
        ),
        // Plain HTTP, no header configured: the callee's convention is unknown, so none.
        (Some("application/json"), false, "", false, ""),
        (None, false, "", false, ""),
    ];
    for (content_type, connect, query, configured, expected) in cases {
        let url = downstream.url(&format!("/call{query}"));
        let envoy = envoy.clone();
        let layer = CancellationLayer::new().timeout(std::time::Duration::from_secs(2));
        let seen = inbound(layer, move |rc| {
            let (url, envoy) = (url.clone(), envoy.clone());
            async move {
                let mut layer = PropagateLayer::from_inbound(rc);
                if configured {
                    layer = layer.deadline_header(envoy);
                }
                let mut outbound = layer.layer(client());
                let mut call = Request::get(url);
                if let Some(content_type) = content_type {
                    call = call.header("content-type", content_type);
                }
                if connect {
                    call = call.header("connect-protocol-version", "1");
                }
                let call = call.body(Empty::new()).unwrap();
                let response = outbound.ready().await.unwrap().call(call).await.unwrap();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                String::from_utf8(body.to_vec()).unwrap()
            }
        })
        .await;
        let case = format!("{content_type:?} connect={connect} {query:?} configured={configured}");
        if expected.is_empty() {
            assert_eq!(seen, "", "no deadline header: {case}");
            continue;
        }
        let (name, value) = seen
            .split_once('=')
            .unwrap_or_else(|| panic!("{case}: {seen:?}"));
        assert_eq!(name, expected, "{case}: {seen:?}");
        assert!(
            !value.contains(' '),
            "one deadline header only: {case}: {seen:?}"
        );
        if expected != "grpc-timeout" {
            let millis: u64 = value.parse().unwrap();
            assert!(
                (1_000..=2_000).contains(&millis),
                "at most the 2 s that remained, and not much less: {case}: {seen:?}"
            );
        }
    }
}

#[tokio::test]
async fn without_an_inbound_request_the_call_passes_through() {
    let downstream = Server::start(echo_timeout()).await;
    let mut outbound = PropagateLayer::new().layer(client());
    let call = Request::get(downstream.url("/"))
        .body(Empty::new())
        .unwrap();
    let response = outbound.ready().await.unwrap().call(call).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"none");
}
