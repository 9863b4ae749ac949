//! An axum server with an app-wide `CancellationLayer`, per-route layers (extra cleanup on one
//! route, a detached route that must finish), an SSE stream that stops when its client leaves,
//! and the `RequestCancellation` extractor.
//!
//! Run with: cargo run --example axum
//!
//! Then, from another terminal:
//!
//! ```text
//! curl --max-time 1 'http://127.0.0.1:3000/report?seconds=10'  # stops at once, cleanup runs
//! curl --max-time 2 -N http://127.0.0.1:3000/events            # SSE: cancelled in the body phase
//! curl --max-time 1 -X POST http://127.0.0.1:3000/upload         # per-route cleanup runs too
//! curl --max-time 1 -X POST http://127.0.0.1:3000/pay            # detached: still commits after 3 s
//! ```
//!
//! Set `PORT` to listen elsewhere.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::RawQuery;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use futures_util::stream::{self, Stream};
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

/// An upload that leaves a temporary file behind if the client goes away.
async fn upload(cancel: RequestCancellation) -> &'static str {
    println!("upload: receiving into /tmp/upload.part");
    cancel.cancelled().await;
    "unreachable: the client left"
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
    let app = Router::new()
        .route("/report", get(report))
        .route("/events", get(events))
        .route(
            "/upload",
            post(upload).route_layer(CancellationLayer::new().on_cancel(|_: &Cancelled| {
                println!("upload: removing /tmp/upload.part");
            })),
        )
        .route(
            "/pay",
            post(pay).route_layer(CancellationLayer::new().detached()),
        )
        .layer(CancellationLayer::new().on_cancel(|c: &Cancelled| {
            println!(
                "layer: {} {} cancelled: {} in the {} phase after {:?}",
                c.method(),
                c.uri().path(),
                c.reason(),
                c.phase(),
                c.elapsed()
            );
        }));

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
    axum::serve(listener, app).await
}
