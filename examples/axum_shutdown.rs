//! A two-phase graceful shutdown with axum: server-sent events, WebSockets and slow work under
//! `axum::serve(..).with_graceful_shutdown(..)`, none of which can hold the shutdown up.
//!
//! On SIGTERM (or Ctrl-C) the shutdown token is cancelled and the drain begins:
//!
//! * WebSocket sessions see `draining()` and close at once with `1001 going away`;
//! * work in progress (`/report`) has the grace to finish, and completes if it does;
//! * event streams (`/events`) keep streaming, and when the grace is over
//!   `EndOnShutdownLayer` ends them cleanly with a last event, without code in the stream;
//! * whatever still runs then is cancelled with `Shutdown` (a report answers 503), and the
//!   process exits within the grace.
//!
//! Run with: cargo run --example axum_shutdown
//!
//! Then, from other terminals:
//!
//! ```text
//! curl -N http://127.0.0.1:3000/events            # a tick a second
//! python3 -m websockets ws://127.0.0.1:3000/ws     # echoes what you type
//! curl 'http://127.0.0.1:3000/report?ms=3000'      # done within the grace
//! curl 'http://127.0.0.1:3000/report?ms=60000'     # cancelled when the grace is over
//! kill -TERM <pid of the example>                   # or Ctrl-C in its terminal
//! ```
//!
//! The grace is 10 s; set `GRACE_MS` to change it, and `PORT` to listen elsewhere (`PORT=0`
//! picks a free port; the address is printed either way).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::stream::{self, Stream};
use http::{StatusCode, Uri};
use tokio_util::sync::CancellationToken;
use tower_cancel::server::EndOnShutdownLayer;
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation, UpgradeGuard};

/// What an event stream's clients receive last: an event they can act on, and when to
/// reconnect (to the next instance).
const LAST_EVENT: &str = "event: shutdown\ndata: server restarting\nretry: 2000\n\n";

/// `GET /events`: a tick a second, forever. The stream never looks at the shutdown.
async fn events() -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    Sse::new(stream::unfold(0u64, |n| async move {
        if n > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Some((Ok(Event::default().data(format!("tick {n}"))), n + 1))
    }))
}

/// `GET /report?ms=N`: N milliseconds of work, cancelled with the request.
async fn report(cancel: RequestCancellation, uri: Uri) -> Response {
    let ms = uri
        .query()
        .and_then(|q| q.strip_prefix("ms="))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(1000);
    println!("report: started, {ms} ms of work");
    match cancel
        .run(tokio::time::sleep(Duration::from_millis(ms)))
        .await
    {
        Ok(()) => {
            println!("report: done");
            "report done\n".into_response()
        }
        Err(cancelled) => {
            println!("report: stopped ({})", cancelled.reason());
            let body = format!("report abandoned: {}\n", cancelled.reason());
            (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
        }
    }
}

/// `GET /ws`: a WebSocket that stays in its request's scope, so the shutdown reaches it.
async fn ws(upgrade: WebSocketUpgrade, cancel: RequestCancellation) -> Response {
    let Some(guard) = cancel.hold_for_upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    };
    upgrade.on_upgrade(move |socket| session(socket, guard))
}

/// Greets, echoes, and says goodbye as soon as the drain begins.
async fn session(mut socket: WebSocket, guard: UpgradeGuard) {
    println!("websocket open");
    if socket.send(Message::text("hello")).await.is_err() {
        guard.peer_left();
        return;
    }
    loop {
        tokio::select! {
            // The first phase: close now, the client reconnects to the next instance.
            () = guard.draining() => break,
            // The hard phase (if the close above were slow): same answer.
            _ = guard.cancelled() => break,
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    if socket.send(Message::Text(text)).await.is_err() {
                        guard.peer_left();
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    println!("websocket closed by the client");
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    guard.peer_left();
                    return;
                }
            },
        }
    }
    let close = CloseFrame {
        code: close_code::AWAY,
        reason: "server restarting".into(),
    };
    let _ = socket.send(Message::Close(Some(close))).await;
    println!("websocket closed by the server");
    // Dropping the guard here, within the grace, completes the request: nothing is cancelled.
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let grace = Duration::from_millis(
        std::env::var("GRACE_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(10_000),
    );
    let shutdown = CancellationToken::new();
    let layer = CancellationLayer::new()
        .shutdown_token(shutdown.clone())
        .shutdown_grace(grace)
        .on_cancel(|c: &Cancelled| {
            println!(
                "cancelled: {} {} ({}, phase {})",
                c.method(),
                c.uri().path(),
                c.reason(),
                c.phase()
            );
        });
    // Upgraded connections are not axum's to wait for: the layer's tracker counts them.
    let tracker = layer.get_task_tracker().clone();
    let app = Router::new()
        .route(
            "/events",
            get(events).layer(EndOnShutdownLayer::new().last_event(LAST_EVENT)),
        )
        .route("/report", get(report))
        .route("/ws", get(ws))
        .layer(layer);

    let port: u16 = std::env::var("PORT")
        .map_or(Ok(3000), |p| p.parse())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);

    let signalled = std::sync::Arc::new(std::sync::OnceLock::new());
    let signal = {
        let (shutdown, signalled) = (shutdown.clone(), signalled.clone());
        async move {
            wait_for_signal().await;
            signalled.get_or_init(Instant::now);
            println!("shutdown: draining for {grace:?}");
            shutdown.cancel();
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await?;
    println!("shutdown: every connection closed");
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(1), tracker.wait())
        .await
        .is_err()
    {
        println!("shutdown: upgraded connections still open; leaving them");
    }
    let took = signalled.get().map(Instant::elapsed).unwrap_or_default();
    println!("shutdown: done, {took:?} after the signal");
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
