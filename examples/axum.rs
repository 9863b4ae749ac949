//! An axum server with an app-wide `CancellationLayer`, per-route layers (extra cleanup on one
//! route, a detached route that must finish), an SSE stream that stops when its client leaves,
//! an upload route whose client may stall or trickle (`RequestBodyLayer::idle_timeout` and
//! `min_rate`: 408), and the
//! `RequestCancellation` extractor.
//!
//! Run with: cargo run --example axum
//!
//! Then, from another terminal:
//!
//! ```text
//! curl --max-time 1 'http://127.0.0.1:3000/report?seconds=10'  # stops at once, cleanup runs
//! curl --max-time 2 -N http://127.0.0.1:3000/events            # SSE: cancelled in the body phase
//! curl --max-time 1 -X POST http://127.0.0.1:3000/upload         # per-route cleanup runs too
//! curl -X POST --data-binary @Cargo.toml http://127.0.0.1:3000/upload  # stored after 3 s
//! # declares 100 bytes, sends 4, then stalls: `408 Request Timeout` after 5 s, cleanup runs
//! curl -H 'content-length: 100' --data-binary part http://127.0.0.1:3000/upload
//! # trickles (a line a second): under 1 KiB/s, `408` once it has waited 5 s, cleanup runs
//! (for i in $(seq 10); do echo $i; sleep 1; done) | curl -X POST -T - http://127.0.0.1:3000/upload
//! # slow but above 1 KiB/s (20 KiB/s for 10 s): stored
//! head -c 200000 /dev/zero | curl -X POST --limit-rate 20k -T - http://127.0.0.1:3000/upload
//! curl --max-time 1 -X POST http://127.0.0.1:3000/pay            # detached: still commits after 3 s
//! ```
//!
//! Ctrl-C or SIGTERM shuts down gracefully: requests in flight are cancelled with `Shutdown`,
//! and the process exits once a payment still running (its client gone) has committed.
//!
//! Set `PORT` to listen elsewhere.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::RawQuery;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use futures_util::stream::{self, Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_cancel::request_body::RequestBodyLayer;
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};

/// Work that is pointless once nobody waits for it: stops as soon as the client leaves.
async fn report(cancel: RequestCancellation, RawQuery(query): RawQuery) -> String {
    let seconds = query
        .as_deref()
        .and_then(|q| q.strip_prefix("seconds="))
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    cancel.on_cancel(|c| println!("report: discarding the partial report ({})", c.reason()));
    tokio::select! {
        reason = cancel.cancelled() => format!("report abandoned: {reason}\n"),
        _ = tokio::time::sleep(Duration::from_secs(seconds)) => "report ready\n".to_owned(),
    }
}

/// A stream of server-sent events; hyper drops it when the client leaves, and the layer
/// reports a cancellation in the body phase.
async fn events() -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let ticks = stream::unfold(0u64, |n| async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        Some((Ok(Event::default().data(format!("tick {n}"))), n + 1))
    });
    Sse::new(ticks).keep_alive(KeepAlive::default())
}

/// An upload that leaves a temporary file behind if the client goes away, or stalls: the
/// route's cleanup removes it. A client that sends nothing for 5 s mid-body gets a 408.
async fn upload(cancel: RequestCancellation, body: Body) -> (StatusCode, String) {
    println!("upload: receiving into /tmp/upload.part");
    let mut body = body.into_data_stream();
    let mut received = 0;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => received += bytes.len(),
            // A stall or a trickle (`idle_timeout`, `min_rate`) fails the read too: the
            // request is cancelled (SlowClient) and the layer answers 408 in place of this 400.
            Err(error) => {
                println!("upload: failed after {received} bytes: {error}");
                return (StatusCode::BAD_REQUEST, format!("upload failed: {error}\n"));
            }
        }
    }
    println!("upload: received {received} bytes, storing them");
    // A client that leaves now is seen by hyper, which drops this future: the cleanup runs.
    tokio::select! {
        reason = cancel.cancelled() => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        _ = tokio::time::sleep(Duration::from_secs(3)) => {
            (StatusCode::OK, format!("stored {received} bytes\n"))
        }
    }
}

/// A payment must not stop halfway: this route is detached, so it runs to its end.
async fn pay(cancel: RequestCancellation) -> &'static str {
    println!("pay: charging the card");
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "pay: committed (client {})",
        if cancel.is_cancelled() {
            "left; the answer is discarded"
        } else {
            "still there"
        }
    );
    "paid\n"
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let shutdown = CancellationToken::new();
    // The app-wide layer creates every request's scope, so its tracker counts every task a
    // request leaves running: the detached `/pay` handler (and per-route async cleanups).
    let app_layer = CancellationLayer::new()
        .shutdown_token(shutdown.clone())
        .on_cancel(|c: &Cancelled| {
            println!(
                "layer: {} {} cancelled: {} in the {} phase after {:?}",
                c.method(),
                c.uri().path(),
                c.reason(),
                c.phase(),
                c.elapsed()
            );
        });
    let tracker = app_layer.get_task_tracker().clone();
    let app = Router::new()
        .route("/report", get(report))
        .route("/events", get(events))
        .route(
            "/upload",
            post(upload).route_layer(
                ServiceBuilder::new()
                    .layer(CancellationLayer::new().on_cancel(|_: &Cancelled| {
                        println!("upload: removing /tmp/upload.part");
                    }))
                    // A read that waits 5 s for body bytes fails with `IdleTimeout`, and an
                    // upload under 1 KiB/s (after 5 s of waiting for it) with `TooSlow`; the
                    // client gets 408 (with `connection: close` over HTTP/1.1).
                    .layer(
                        RequestBodyLayer::new()
                            .idle_timeout(Duration::from_secs(5))
                            .min_rate(1024, Duration::from_secs(5)),
                    ),
            ),
        )
        .route(
            "/pay",
            post(pay).route_layer(CancellationLayer::new().detached()),
        )
        .layer(app_layer.clone());

    let port: u16 = std::env::var("PORT")
        .map_or(Ok(3000), |p| p.parse())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    // A client that vanishes without a word (network gone) is noticed within 10 s (feature
    // `socket2`): every accepted connection gets TCP keepalive and TCP_USER_TIMEOUT.
    let listener = listener.tap_io(|stream| {
        if let Err(error) = tower_cancel::tcp::detect_vanished(stream, Duration::from_secs(10)) {
            eprintln!("socket options: {error}");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let signal = shutdown_signal().await;
            println!("shutdown: {signal} received, cancelling the requests in flight");
            shutdown.cancel();
        })
        .await?;
    println!("shutdown: every connection closed");
    // A payment whose client left still runs: wait for it (bounded), then exit.
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(30), tracker.wait())
        .await
        .is_err()
    {
        println!("shutdown: gave up waiting for detached work");
    }
    println!("shutdown: done");
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() -> &'static str {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
                "SIGTERM"
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<&'static str>();
    tokio::select! {
        signal = ctrl_c => signal,
        signal = terminate => signal,
    }
}
