//! A self-driving tour: a server, a client that gives up, and the timeline of what follows.
//!
//! Run with: cargo run --example demo
//!
//! It starts a hyper server on a free port with `CancellationLayer`, sends a slow request and
//! abandons it, prints when the handler started, when the client left, when the token was
//! cancelled (reason, phase, elapsed) and when each cleanup ran; then it sends a request that
//! completes and shows that no cleanup runs for it. It exits on its own after about a second.

use std::convert::Infallible;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};

/// Prints a line with the time since the demo started.
fn say(line: impl std::fmt::Display) {
    static START: OnceLock<Instant> = OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed();
    println!("[{:>6.3}s] {line}", t.as_secs_f64());
}

/// Builds a report; takes `work_ms` unless the client leaves first.
async fn report(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let cancel = req
        .extensions()
        .get::<RequestCancellation>()
        .unwrap()
        .clone();
    let work_ms: u64 = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("work_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    say(format!(
        "handler: started {} (needs {work_ms} ms)",
        req.uri()
    ));

    // Work handed to another task outlives the request unless it watches the token.
    let token = cancel.token().clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = token.cancelled() => say("spawned worker: token cancelled, stopping"),
            _ = tokio::time::sleep(Duration::from_millis(work_ms)) => {}
        }
    });

    // Cleanup that belongs to this handler, registered like a deferred call.
    cancel.on_cancel(|c| {
        say(format!(
            "handler cleanup: discard partial report ({})",
            c.reason()
        ))
    });

    tokio::time::sleep(Duration::from_millis(work_ms)).await;
    say("handler: finished");
    Ok(Response::new(Full::new(Bytes::from("report ready\n"))))
}

#[tokio::main]
async fn main() {
    say("starting");
    let (cleaned_tx, mut cleaned_rx) = tokio::sync::mpsc::unbounded_channel();
    let layer = CancellationLayer::new()
        .on_cancel(|c: &Cancelled| {
            say(format!(
                "layer: {} {} cancelled: reason={} phase={} elapsed={:?}",
                c.method(),
                c.uri(),
                c.reason(),
                c.phase(),
                c.elapsed()
            ));
        })
        .on_cancel_async(move |c: Cancelled| {
            let cleaned = cleaned_tx.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                say(format!("async cleanup: released resources of {}", c.uri()));
                let _ = cleaned.send(());
            }
        });
    let tracker = layer.get_task_tracker().clone();
    let svc = ServiceBuilder::new().layer(layer).service_fn(report);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            // Clients that vanish without a word are noticed within 10 s (feature `socket2`).
            tower_cancel::tcp::detect_vanished(&stream, Duration::from_secs(10)).unwrap();
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    say(format!("server listening on http://{addr}"));

    // 1. A client asks for a slow report, then gives up.
    println!();
    say("client: GET /report?work_ms=5000");
    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /report?work_ms=5000 HTTP/1.1\r\nhost: demo\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    say("client: giving up, closing the connection");
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), cleaned_rx.recv())
        .await
        .expect("the cleanup ran");

    // 2. A request that completes: nothing is cancelled, no cleanup runs.
    println!();
    say("client: GET /report?work_ms=100");
    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /report?work_ms=100 HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    client.read_to_string(&mut response).await.unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    say(format!("client: got {:?}", body.trim_end()));

    // Graceful exit: wait for every async cleanup.
    tracker.close();
    tracker.wait().await;
    assert!(
        cleaned_rx.try_recv().is_err(),
        "a completed request ran cleanup"
    );
    println!();
    say("done: one abandoned request cleaned up once, one completed request left alone");
}
