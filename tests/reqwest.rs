//! `PropagateMiddleware` over real sockets: axum A → reqwest (with the middleware) → axum B.
//! A's handler hands the call to a task of its own, so that only the middleware can stop it
//! when A's request is cancelled.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use bytes::Bytes;
use http::HeaderName;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_cancel::propagate::PropagateMiddleware;
use tower_cancel::{CancellationLayer, Cancelled, InboundCancelled};

/// What happened, with the time since the test started.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(String, Instant)>>>);

impl Log {
    fn push(&self, what: impl Into<String>) {
        self.0.lock().unwrap().push((what.into(), Instant::now()));
    }

    fn entries(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(e, _)| e.clone())
            .collect()
    }

    fn at(&self, prefix: &str) -> Option<Instant> {
        let entries = self.0.lock().unwrap();
        entries
            .iter()
            .find(|(e, _)| e.starts_with(prefix))
            .map(|(_, at)| *at)
    }

    async fn wait_for(&self, prefix: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.at(prefix).is_none() {
            assert!(
                Instant::now() < deadline,
                "no {prefix:?} in {:?}",
                self.entries()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

fn record(log: &Log, who: &'static str) -> CancellationLayer {
    let log = log.clone();
    CancellationLayer::new().on_cancel(move |c: &Cancelled| {
        log.push(format!("{who} cancelled {} {}", c.reason(), c.phase()));
    })
}

/// B: `/wait` answers after 1 s unless cancelled, logging the deadline header it got;
/// `/stream` sends its head, then one chunk every 50 ms for 2 s.
async fn start_b(log: &Log) -> String {
    let wait = {
        let log = log.clone();
        move |req: http::Request<Body>| async move {
            let header = req
                .headers()
                .get("connect-timeout-ms")
                .map(|v| v.to_str().unwrap().to_owned());
            log.push(format!(
                "B got {}",
                header.unwrap_or_else(|| "no deadline".into())
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
            log.push("B answered");
            "report"
        }
    };
    let stream = {
        let log = log.clone();
        move || async move {
            log.push("B got the stream request");
            streamed()
        }
    };
    fn streamed() -> Body {
        let chunks = futures_util::stream::unfold(0u32, |n| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            (n < 40).then(|| (Ok::<_, std::io::Error>(Bytes::from_static(b"chunk")), n + 1))
        });
        Body::from_stream(chunks)
    }
    let app = Router::new()
        .route("/wait", get(wait))
        .route("/stream", get(stream))
        .layer(record(log, "B").connect_timeout(true));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[derive(Clone)]
struct A {
    client: ClientWithMiddleware,
    b: String,
    log: Log,
}

/// A's handler: the call to B (and the read of its body) runs in a task of its own, bound to
/// A's request by the middleware; the handler waits for it.
async fn a_handler(
    State(a): State<A>,
    inbound: tower_cancel::RequestCancellation,
    uri: http::Uri,
) -> String {
    let path = uri.path().to_owned();
    let call = a
        .client
        .get(format!("{}{path}", a.b))
        .with_extension(inbound)
        .send();
    let log = a.log.clone();
    let task = tokio::spawn(async move {
        let outcome = match call.await {
            Ok(response) => response
                .text()
                .await
                .map_err(|error| format!("body failed: {:?}", inbound_reason(&error))),
            Err(reqwest_middleware::Error::Middleware(error)) => Err(format!(
                "abandoned: {:?}",
                error.downcast_ref::<InboundCancelled>().map(|c| c.reason())
            )),
            Err(error) => Err(format!("failed: {error}")),
        };
        log.push(format!("A's call: {outcome:?}"));
        outcome.unwrap_or_default()
    });
    task.await.unwrap_or_default()
}

/// A, calling B through a client with or without the middleware, behind `layer`.
async fn start_a(log: &Log, b: String, middleware: bool, layer: CancellationLayer) -> String {
    let mut client = ClientBuilder::new(reqwest::Client::new());
    if middleware {
        client = client.with(
            PropagateMiddleware::new()
                .deadline_header(HeaderName::from_static("connect-timeout-ms")),
        );
    }
    let state = A {
        client: client.build(),
        b,
        log: log.clone(),
    };
    let app = Router::new()
        .route("/wait", get(a_handler))
        .route("/stream", get(a_handler))
        .with_state(state)
        .layer(layer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn a_client_leaving_a_stops_the_call_to_b() {
    for middleware in [true, false] {
        let log = Log::default();
        let b = start_b(&log).await;
        let a = start_a(&log, b, middleware, record(&log, "A")).await;
        let client = tokio::spawn(reqwest::get(format!("{a}/wait")));
        log.wait_for("B got").await;
        client.abort(); // the client leaves A
        log.wait_for("A cancelled").await;
        if middleware {
            log.wait_for("B cancelled").await;
            let after = log.at("B cancelled").unwrap() - log.at("A cancelled").unwrap();
            println!("A cancelled → B cancelled: {after:?}");
            assert!(after < Duration::from_millis(500), "{after:?}");
            log.wait_for("A's call").await;
            let entries = log.entries();
            assert!(
                entries.contains(&"B cancelled disconnected handler".to_owned()),
                "{entries:?}"
            );
            assert!(
                entries.contains(&"A's call: Err(\"abandoned: Some(Disconnected)\")".to_owned()),
                "{entries:?}"
            );
            assert!(!entries.contains(&"B answered".to_owned()), "{entries:?}");
        } else {
            // Without it, the call outlives A's request: B answers, uncancelled.
            log.wait_for("B answered").await;
            assert!(log.at("B cancelled").is_none(), "{:?}", log.entries());
        }
    }
}

#[tokio::test]
async fn a_s_deadline_reaches_b_in_its_convention() {
    let log = Log::default();
    let b = start_b(&log).await;
    let a = start_a(
        &log,
        b,
        true,
        record(&log, "A").timeout(Duration::from_millis(300)),
    )
    .await;
    let answer = reqwest::get(format!("{a}/wait")).await.unwrap();
    assert_eq!(answer.status(), 200);
    log.wait_for("B cancelled").await;
    log.wait_for("A's call").await;
    let entries = log.entries();
    let header: u64 = entries[0].strip_prefix("B got ").unwrap().parse().unwrap();
    assert!((250..=300).contains(&header), "{entries:?}");
    assert!(
        entries.contains(&"B cancelled deadline_exceeded handler".to_owned()),
        "{entries:?}"
    );
    assert!(
        entries.contains(&"A cancelled deadline_exceeded handler".to_owned()),
        "{entries:?}"
    );
    assert!(!entries.contains(&"B answered".to_owned()), "{entries:?}");
}

#[tokio::test]
async fn a_shutdown_mid_body_stops_the_read_and_b_s_body() {
    let log = Log::default();
    let b = start_b(&log).await;
    let shutdown = CancellationToken::new();
    let a = start_a(
        &log,
        b,
        true,
        record(&log, "A").shutdown_token(shutdown.clone()),
    )
    .await;
    let client = tokio::spawn(reqwest::get(format!("{a}/stream")));
    log.wait_for("B got").await;
    // B's head is out and its body streams: A's task reads it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    log.wait_for("B cancelled").await;
    log.wait_for("A's call").await;
    let entries = log.entries();
    assert!(
        entries.contains(&"A cancelled shutdown handler".to_owned()),
        "{entries:?}"
    );
    assert!(
        entries.contains(&"B cancelled disconnected body".to_owned()),
        "{entries:?}"
    );
    assert!(
        entries.contains(&"A's call: Err(\"body failed: Some(Shutdown)\")".to_owned()),
        "{entries:?}"
    );
    // A's handler answers (its call failed); the client gets that answer.
    let answer = client.await.unwrap().unwrap();
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn a_call_without_an_inbound_request_passes_through() {
    let log = Log::default();
    let b = start_b(&log).await;
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(PropagateMiddleware::new())
        .build();
    let answer = client.get(format!("{b}/wait")).send().await.unwrap();
    let url = answer.url().clone();
    assert_eq!(answer.text().await.unwrap(), "report");
    assert_eq!(url.path(), "/wait");
    assert_eq!(log.entries(), ["B got no deadline", "B answered"]);
}

/// The reason of the `InboundCancelled` in `error`'s source chain (reqwest wraps a body's
/// error), as a user finds it.
fn inbound_reason(error: &(dyn std::error::Error + 'static)) -> Option<tower_cancel::CancelReason> {
    InboundCancelled::find(error).map(InboundCancelled::reason)
}
