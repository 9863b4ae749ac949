//! What cancellations cost, as metrics (feature `metrics`): requests cancelled by reason and
//! phase, async cleanups run or refused, and how long cancelled work ran on after its
//! cancellation.
//!
//! Run with: cargo run --example metrics
//!
//! The layer records through the `metrics` facade, so any exporter works (Prometheus, StatsD,
//! OpenTelemetry). To stay self-contained this example installs metrics-util's debugging
//! recorder and prints what it holds. It starts a hyper server on a free port, sends requests
//! that complete, that their client abandons (in the handler and mid-body), that reach their
//! deadline, and that a shutdown cancels; then it prints the metrics and exits, in about a
//! second. With `metrics-exporter-prometheus` the same numbers read:
//!
//! ```text
//! tower_cancel_cancellations_total{reason="deadline_exceeded",phase="handler"} 1
//! tower_cancel_ran_after_cancel_seconds_sum{reason="deadline_exceeded",phase="handler"} 0.041
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};

type Body = BoxBody<Bytes, Infallible>;

/// `/work` takes 5 s unless cancelled, and then needs 40 ms to wind down (say, to flush what
/// it did); `/stream` sends a chunk every 20 ms, forever, without looking at its token; `/ok`
/// answers at once.
async fn handler(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let cancel = req
        .extensions()
        .get::<RequestCancellation>()
        .unwrap()
        .clone();
    let response = match req.uri().path() {
        "/work" => tokio::select! {
            reason = cancel.cancelled() => {
                tokio::time::sleep(Duration::from_millis(40)).await;
                let mut response = Response::new(full(format!("stopped: {reason}\n")));
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                response
            }
            () = tokio::time::sleep(Duration::from_secs(5)) => Response::new(full("done\n".into())),
        },
        "/stream" => {
            let chunks = futures_util::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"tick\n"))),
                    (),
                ))
            });
            Response::new(StreamBody::new(chunks).boxed())
        }
        _ => Response::new(full("ok\n".into())),
    };
    Ok(response)
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text)).boxed()
}

/// Sends `GET path`; reads the whole response, or leaves after `leave_after`.
async fn get(addr: SocketAddr, path: &str, leave_after: Option<Duration>) -> String {
    let mut client = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: example\r\nconnection: close\r\n\r\n");
    client.write_all(request.as_bytes()).await.unwrap();
    if let Some(after) = leave_after {
        tokio::time::sleep(after).await;
        return format!("left after {after:?}");
    }
    let mut response = String::new();
    client.read_to_string(&mut response).await.unwrap();
    response.lines().next().unwrap_or_default().to_owned()
}

#[tokio::main]
async fn main() {
    // Installed before the layer is built, so that the layer's descriptions (units, help
    // text) reach it.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("no other recorder is installed");

    let shutdown = CancellationToken::new();
    let (cancelled_tx, mut cancelled) = tokio::sync::mpsc::unbounded_channel();
    let layer = CancellationLayer::new()
        .shutdown_token(shutdown.clone())
        .timeout(Duration::from_millis(300))
        .on_cancel(move |c: &Cancelled| {
            let _ = cancelled_tx.send(c.clone());
        })
        // One cleanup at a time and none queued: a second cancellation within 300 ms finds no
        // room, and its cleanup is refused.
        .max_running_cleanups(1)
        .max_queued_cleanups(0)
        .on_cancel_async(|_: Cancelled| tokio::time::sleep(Duration::from_millis(300)));
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(handler);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    println!("server listening on http://{addr}\n");

    // Each scenario: what the client saw, and what the layer's callback was told.
    let mut report = |scenario: &str, client: String| {
        let layer = cancelled
            .try_recv()
            .map_or_else(|_| "not cancelled".to_owned(), |c| c.to_string());
        println!(
            "{scenario}
    client: {client}
    layer:  {layer}"
        );
    };
    // Time for the server to notice a client that left.
    let settle = || tokio::time::sleep(Duration::from_millis(50));

    let client = get(addr, "/ok", None).await;
    settle().await;
    report("GET /ok", client);
    let client = get(addr, "/work", Some(Duration::from_millis(50))).await;
    settle().await;
    report("GET /work, abandoned by its client", client);
    let client = get(addr, "/stream", Some(Duration::from_millis(100))).await;
    settle().await;
    report("GET /stream, abandoned mid-body", client);
    let client = get(addr, "/work", None).await;
    report("GET /work, until its deadline (300 ms)", client);
    let at_shutdown = tokio::spawn(get(addr, "/work", None));
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.cancel();
    let client = at_shutdown.await.unwrap();
    report("GET /work, cancelled by the shutdown", client);
    let drained = layer.drain_cleanups(Duration::from_secs(1)).await;
    println!("\ncleanups drained: {drained:?}\n");

    // What an exporter would publish: one line per metric and label set.
    let mut lines = Vec::new();
    let mut ran_after = 0;
    for (key, unit, _, value) in snapshotter.snapshot().into_vec() {
        let labels: Vec<String> = key
            .key()
            .labels()
            .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.key().name(), labels.join(","));
        let value = match value {
            DebugValue::Counter(n) => n.to_string(),
            DebugValue::Gauge(v) => v.to_string(),
            DebugValue::Histogram(values) => {
                ran_after += values.len();
                let values: Vec<String> = values.iter().map(|v| format!("{:.3}", v)).collect();
                format!("[{}]", values.join(", "))
            }
        };
        let unit = unit
            .map(|u| format!(" ({})", u.as_str()))
            .unwrap_or_default();
        lines.push(format!("{name} {value}{unit}"));
    }
    lines.sort();
    for line in &lines {
        println!("{line}");
    }
    // Four cancellations (the completed request recorded nothing), each with its time ran on.
    let count = |reason: &str| lines.iter().filter(|l| l.contains(reason)).count();
    assert_eq!(ran_after, 4, "{lines:#?}");
    for reason in ["disconnected", "deadline_exceeded", "shutdown"] {
        assert!(count(reason) > 0, "no {reason} in {lines:#?}");
    }
}
