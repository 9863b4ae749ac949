//! WebSockets that stay in their request's scope (axum's `WebSocketUpgrade`): the handler
//! holds its request for the upgraded connection, so the server's shutdown reaches every open
//! WebSocket, each sends its client a close frame `1001 going away`, and the process waits for
//! them (bounded) before it exits.
//!
//! Run with: cargo run --example websocket
//!
//! Then, from another terminal (any WebSocket client; `websocat` shown, or Python's
//! `websockets`: `python3 -m websockets ws://127.0.0.1:3000/ws`):
//!
//! ```text
//! websocat ws://127.0.0.1:3000/ws   # "hello", then every line you type comes back
//! ```
//!
//! and press Ctrl-C in the server's terminal (or `kill -TERM` it): the client receives
//! `1001 going away` and the server prints each cancellation (reason `shutdown`, phase
//! `upgraded`) and exits. A client that closes first completes its request: nothing is
//! cancelled. Set `PORT` to listen elsewhere.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use http::StatusCode;
use tokio_util::sync::CancellationToken;
use tower_cancel::{CancelReason, CancellationLayer, Cancelled, RequestCancellation, UpgradeGuard};

async fn ws(upgrade: WebSocketUpgrade, cancel: RequestCancellation) -> Response {
    // Held before the 101 goes out: the request stays in scope until the guard is dropped.
    let Some(guard) = cancel.hold_for_upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    };
    upgrade.on_upgrade(move |socket| session(socket, guard))
}

/// One WebSocket: greets, echoes, and closes with a code that says why when its request is
/// cancelled.
async fn session(mut socket: WebSocket, guard: UpgradeGuard) {
    println!("websocket open");
    if socket.send(Message::text("hello")).await.is_err() {
        guard.peer_left();
        return;
    }
    loop {
        tokio::select! {
            reason = guard.cancelled() => {
                let (code, text) = match reason {
                    CancelReason::DeadlineExceeded => (close_code::POLICY, "deadline exceeded"),
                    _ => (close_code::AWAY, "going away"),
                };
                let close = CloseFrame { code, reason: text.into() };
                let _ = socket.send(Message::Close(Some(close))).await;
                println!("websocket closed by the server: {reason}");
                return;
            }
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    if socket.send(Message::Text(text)).await.is_err() {
                        guard.peer_left();
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    // The client closed: dropping the guard completes the request.
                    println!("websocket closed by the client");
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    // The connection failed under us: the client vanished.
                    guard.peer_left();
                    return;
                }
            },
        }
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let shutdown = CancellationToken::new();
    let layer = CancellationLayer::new()
        .shutdown_token(shutdown.clone())
        .on_cancel(|c: &Cancelled| {
            println!(
                "{} {} cancelled: {}, phase {}",
                c.method(),
                c.uri(),
                c.reason(),
                c.phase()
            );
        });
    let tracker = layer.get_task_tracker().clone();
    let app = Router::new().route("/ws", any(ws)).layer(layer);

    let port: u16 = std::env::var("PORT")
        .map_or(Ok(3000), |p| p.parse())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on ws://{}/ws", listener.local_addr()?);

    let signal = {
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            println!("shutting down");
            // Every request in flight, the upgraded ones included, is cancelled with
            // `Shutdown`: each WebSocket sends its close frame.
            shutdown.cancel();
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await?;
    // axum waited for the HTTP connections; the upgraded ones are the tracker's.
    let started = Instant::now();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        println!("websockets still open after 5 s; exiting anyway");
    }
    println!("exited after {:?} of draining", started.elapsed());
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
