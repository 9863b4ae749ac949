//! A graceful shutdown that drains in milliseconds instead of waiting out slow handlers.
//!
//! On Ctrl-C or SIGTERM the server stops accepting, cancels the shutdown token wired into
//! `CancellationLayer` (every request in flight is cancelled with `Shutdown`, and handlers
//! that honour their token answer at once), waits a bounded time for hyper-util's
//! `GracefulShutdown` to close the connections, then waits a bounded time for the async
//! cleanups (`drain_cleanups`, which reports any it has to leave behind). Each step is printed.
//!
//! Run with: cargo run --example graceful_shutdown
//!
//! Then, from another terminal:
//!
//! ```text
//! curl 'http://127.0.0.1:3000/report?seconds=30' &   # a 30 s report
//! kill -TERM <pid of the example>                      # or Ctrl-C in its terminal
//! ```
//!
//! The report answers `503 report abandoned: shutdown` at once, its cleanup runs, and the
//! process exits well under a second after the signal. Set `PORT` to listen elsewhere
//! (`PORT=0` picks a free port; the address is printed either way).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{ServiceBuilder, service_fn};
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};

/// How long to wait for connections, then for cleanups, before giving up on them.
const DRAIN: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("PORT")
        .map_or(Ok(3000), |p| p.parse())
        .unwrap_or(3000);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let layer = CancellationLayer::new()
        .shutdown_token(shutdown.clone())
        .task_tracker(tracker.clone())
        .on_cancel(|c: &Cancelled| {
            println!(
                "cancelled: {} {} ({}, after {:?})",
                c.method(),
                c.uri().path(),
                c.reason(),
                c.elapsed()
            );
        })
        .on_cancel_async(|c: Cancelled| async move {
            // Stands for real cleanup I/O: releasing a lock, deleting a temporary file...
            tokio::time::sleep(Duration::from_millis(100)).await;
            println!(
                "cleanup: released what {} held ({})",
                c.uri().path(),
                c.reason()
            );
        });
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(report));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's HTTP/1.1 header_read_timeout (30 s) only runs with a timer.
    builder.http1().timer(TokioTimer::new());
    // HTTP/2 clients that vanish: an unanswered PING closes the connection.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let graceful = GracefulShutdown::new();
    let mut signal = std::pin::pin!(shutdown_signal());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        eprintln!("accept error: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // HTTP/1.1 clients that vanish: keepalive and TCP_USER_TIMEOUT (feature `socket2`).
                if let Err(error) = tower_cancel::tcp::detect_vanished(&stream, Duration::from_secs(10)) {
                    eprintln!("socket options: {error}");
                }
                let svc = TowerToHyperService::new(svc.clone());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(error) = conn.await {
                        eprintln!("connection error: {error}");
                    }
                });
            }
            name = &mut signal => {
                println!("shutdown: {name} received, no longer accepting");
                break;
            }
        }
    }
    drop(listener);

    println!("shutdown: cancelling the requests in flight");
    shutdown.cancel();

    println!("shutdown: waiting up to {DRAIN:?} for connections to close");
    match tokio::time::timeout(DRAIN, graceful.shutdown()).await {
        Ok(()) => println!("shutdown: every connection closed"),
        Err(_) => println!("shutdown: connections still open after {DRAIN:?}; leaving them"),
    }

    // The async cleanups, running or queued behind the layer's limit; any still unfinished
    // when the time is up is reported (a `warn` event each) before the runtime drops it.
    println!("shutdown: waiting up to {DRAIN:?} for the cleanups");
    match layer.drain_cleanups(DRAIN).await {
        Ok(counts) => println!(
            "shutdown: every cleanup finished ({} ran, {} refused)",
            counts.completed, counts.refused
        ),
        Err(overran) => println!("shutdown: leaving them: {overran}"),
    }
    // Anything else on the tracker (detached handlers, if there were any).
    tracker.close();
    if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
        println!(
            "shutdown: {} task(s) still running; leaving them",
            tracker.len()
        );
    }
    println!("shutdown: done");
    Ok(())
}

/// `GET /report?seconds=N`: a slow report that stops as soon as its request is cancelled.
async fn report(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let cancel = req
        .extensions()
        .get::<RequestCancellation>()
        .expect("CancellationLayer is installed")
        .clone();
    let seconds = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("seconds="))
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    println!("report: started, {seconds} s of work");
    tokio::select! {
        reason = cancel.cancelled() => {
            println!("report: stopped early ({reason})");
            let mut response = Response::new(Full::from(format!("report abandoned: {reason}\n")));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Ok(response)
        }
        () = tokio::time::sleep(Duration::from_secs(seconds)) => {
            println!("report: finished");
            Ok(Response::new(Full::from("report ready\n")))
        }
    }
}

/// Resolves with the name of the first shutdown signal: Ctrl-C (SIGINT) or, on Unix, SIGTERM.
async fn shutdown_signal() -> &'static str {
    let ctrl_c = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "Ctrl-C",
            Err(error) => {
                eprintln!("cannot listen for Ctrl-C: {error}");
                std::future::pending().await
            }
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
                "SIGTERM"
            }
            Err(error) => {
                eprintln!("cannot listen for SIGTERM: {error}");
                std::future::pending().await
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<&'static str>();
    tokio::select! {
        name = ctrl_c => name,
        name = terminate => name,
    }
}
