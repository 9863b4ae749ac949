//! Upgraded connections (HTTP/1.1 `Upgrade`, `101 Switching Protocols`, hyper's
//! `upgrade::on`) held in their request's scope with `RequestCancellation::hold_for_upgrade`,
//! over real sockets: a line protocol after the `101`, served by a task that owns the guard.
//! Each way the upgraded connection can end, and what the layer records: completed when the
//! task drops the guard, `Shutdown` / `DeadlineExceeded` / `Explicit` in phase `Upgraded`
//! while it runs, `Disconnected` when the peer vanishes, and, without a hold, completed at the
//! `101` as before.

#[macro_use]
mod common;

use std::convert::Infallible;
use std::time::Duration;

use common::*;
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_cancel::{CancelReason, CancellationLayer, Phase, RequestCancellation, UpgradeGuard};

/// The upgrade handler. `?hold=no` upgrades without holding the request; `?slow` waits 30 s
/// before answering (a client that leaves before the `101`); `?cancel` has the task cancel the
/// request's token once upgraded. Logs `held`, `not held`, `hold again: none`, then what the
/// upgraded task saw.
fn upgrade_app(
    log: Log,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<AppBody>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |mut req: Request<Incoming>| {
        let log = log.clone();
        async move {
            let rc = RequestCancellation::from_extensions(req.extensions()).unwrap();
            log.keep(rc.clone());
            {
                let log = log.clone();
                rc.on_cancel(move |c| log.push(describe("handler", c)));
            }
            let query = req.uri().query().unwrap_or("").to_owned();
            let guard = if query.contains("hold=no") {
                log.push("not held");
                None
            } else {
                let guard = rc.hold_for_upgrade().expect("an armed request can be held");
                assert!(rc.hold_for_upgrade().is_none(), "held twice");
                log.push("held");
                Some(guard)
            };
            if query.contains("slow") {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            let on_upgrade = hyper::upgrade::on(&mut req);
            let cancel_token = query.contains("cancel");
            let quiet = query.contains("quiet");
            tokio::spawn(async move {
                let upgraded = on_upgrade.await.expect("the connection upgrades");
                if quiet {
                    // Cancels the token and never asks the request about it.
                    rc.token().cancel();
                    let _guard = guard;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    drop(upgraded);
                    return;
                }
                serve_upgraded(TokioIo::new(upgraded), guard, rc, cancel_token, log).await;
            });
            let mut res = Response::new(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
            );
            *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            res.headers_mut()
                .insert(header::CONNECTION, "upgrade".parse().unwrap());
            res.headers_mut()
                .insert(header::UPGRADE, "lines".parse().unwrap());
            Ok(res)
        }
    })
}

/// The upgraded protocol: the server greets, echoes lines, ends on `bye`; told of a
/// cancellation, it writes `cancelled {reason}` and closes.
async fn serve_upgraded(
    io: TokioIo<hyper::upgrade::Upgraded>,
    guard: Option<UpgradeGuard>,
    rc: RequestCancellation,
    cancel_token: bool,
    log: Log,
) {
    let (read, mut write) = tokio::io::split(io);
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"hello\n").await.unwrap();
    if cancel_token {
        rc.token().cancel();
    }
    loop {
        tokio::select! {
            reason = rc.cancelled() => {
                log.push(format!("upgraded task saw {reason}"));
                let _ = write.write_all(format!("cancelled {reason}\n").as_bytes()).await;
                let _ = write.shutdown().await;
                return;
            }
            line = lines.next_line() => match line {
                Ok(Some(line)) if line == "bye" => {
                    log.push("upgraded task: bye");
                    let _ = write.write_all(b"bye\n").await;
                    drop(guard); // completes the request
                    return;
                }
                Ok(Some(line)) => {
                    let _ = write.write_all(format!("{line}\n").as_bytes()).await;
                }
                Ok(None) | Err(_) => {
                    log.push("upgraded task: peer gone");
                    if let Some(guard) = guard {
                        guard.peer_left();
                    }
                    return;
                }
            },
        }
    }
}

async fn serve(log: &Log, layer: CancellationLayer) -> Server {
    let listen = Listen {
        upgrades: true,
        ..Listen::default()
    };
    Server::start_with(
        ServiceBuilder::new()
            .layer(layer)
            .service(upgrade_app(log.clone())),
        listen,
    )
    .await
}

/// Opens an upgraded connection to `path`; returns it once the server's greeting arrived.
async fn upgrade(server: &Server, path: &str) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: upgrade\r\nupgrade: lines\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut stream = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(next_line(&mut stream).await, "hello");
    stream
}

async fn next_line(stream: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    tokio::time::timeout(PATIENCE, stream.read_line(&mut line))
        .await
        .expect("a line in time")
        .unwrap();
    line.trim_end().to_owned()
}

async fn say(stream: &mut BufReader<TcpStream>, line: &str) {
    stream
        .get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .await
        .unwrap();
}

/// Waits a moment and checks that exactly `expected` was logged (the request is over), in any
/// order: the token is cancelled before the callbacks run, so on a multi-thread runtime the
/// upgraded task may log first. The callbacks' own order is checked where it matters.
async fn settled(log: &Log, expected: &[&str]) {
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut entries = log.entries();
    let mut expected: Vec<String> = expected.iter().map(|e| (*e).to_owned()).collect();
    entries.sort();
    expected.sort();
    assert_eq!(entries, expected);
    let ordered = log.entries();
    let at = |prefix: &str| ordered.iter().position(|e| e.starts_with(prefix));
    if let (Some(handler), Some(layer)) = (at("handler "), at("layer ")) {
        assert!(
            handler < layer,
            "handler callback after the layer's: {ordered:?}"
        );
    }
}

async fn dropping_the_guard_completes_the_request() {
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let layer = log.layer("layer").shutdown_token(shutdown.clone());
    let tracker = layer.get_task_tracker().clone();
    let server = serve(&log, layer).await;
    let mut client = upgrade(&server, "/upgrade").await;
    say(&mut client, "ping").await;
    assert_eq!(next_line(&mut client).await, "ping");
    // Held: the tracker counts the upgraded connection.
    tracker.close();
    assert!(!tracker.is_empty(), "the held connection is tracked");
    let rc = log.handles().pop().unwrap();
    assert!(!rc.is_cancelled() && rc.reason().is_none());
    say(&mut client, "bye").await;
    assert_eq!(next_line(&mut client).await, "bye");
    tokio::time::timeout(PATIENCE, tracker.wait())
        .await
        .expect("the tracker empties when the guard is dropped");
    settled(&log, &["held", "upgraded task: bye"]).await;
    assert!(!rc.token().is_cancelled());
    assert_eq!(rc.reason(), None);
    // Completed: a shutdown afterwards does not reach it.
    shutdown.cancel();
    settled(&log, &["held", "upgraded task: bye"]).await;
    assert_eq!(rc.reason(), None);
}

async fn shutdown_cancels_a_held_upgraded_request_in_phase_upgraded() {
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let server = serve(&log, log.layer("layer").shutdown_token(shutdown.clone())).await;
    let mut client = upgrade(&server, "/upgrade").await;
    shutdown.cancel();
    assert_eq!(next_line(&mut client).await, "cancelled shutdown");
    settled(
        &log,
        &[
            "held",
            "handler /upgrade shutdown upgraded",
            "layer /upgrade shutdown upgraded",
            "upgraded task saw shutdown",
        ],
    )
    .await;
    let rc = log.handles().pop().unwrap();
    assert_eq!(rc.reason(), Some(CancelReason::Shutdown));
}

async fn the_deadline_reaches_a_held_upgraded_request() {
    let log = Log::default();
    let limit = Duration::from_millis(300);
    let server = serve(&log, log.layer("layer").timeout(limit)).await;
    let started = tokio::time::Instant::now();
    let mut client = upgrade(&server, "/upgrade").await;
    say(&mut client, "ping").await;
    assert_eq!(next_line(&mut client).await, "ping");
    assert_eq!(next_line(&mut client).await, "cancelled deadline_exceeded");
    assert!(started.elapsed() >= limit, "not before the deadline");
    settled(
        &log,
        &[
            "held",
            "handler /upgrade deadline_exceeded upgraded",
            "layer /upgrade deadline_exceeded upgraded",
            "upgraded task saw deadline_exceeded",
        ],
    )
    .await;
}

async fn a_peer_that_vanishes_is_disconnected_in_phase_upgraded() {
    let log = Log::default();
    let server = serve(&log, log.layer("layer")).await;
    let client = upgrade(&server, "/upgrade").await;
    drop(client);
    log.wait_for("layer /upgrade disconnected upgraded").await;
    settled(
        &log,
        &[
            "held",
            "upgraded task: peer gone",
            "handler /upgrade disconnected upgraded",
            "layer /upgrade disconnected upgraded",
        ],
    )
    .await;
}

#[tokio::test]
async fn the_application_cancelling_the_token_is_explicit_in_phase_upgraded() {
    let log = Log::default();
    let server = serve(&log, log.layer("layer")).await;
    let mut client = upgrade(&server, "/upgrade?cancel").await;
    assert_eq!(next_line(&mut client).await, "cancelled explicit");
    settled(
        &log,
        &[
            "held",
            "handler /upgrade explicit upgraded",
            "layer /upgrade explicit upgraded",
            "upgraded task saw explicit",
        ],
    )
    .await;
}

async fn an_application_cancel_is_recorded_at_once_even_if_nothing_asks() {
    let log = Log::default();
    let server = serve(&log, log.layer("layer")).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /upgrade?quiet HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: lines\r\n\r\n")
        .await
        .unwrap();
    // The task holds the guard for 30 s without looking at the request: the guard's watcher
    // records the cancel.
    log.wait_for("layer /upgrade explicit upgraded").await;
    assert_eq!(
        log.entries(),
        [
            "held",
            "handler /upgrade explicit upgraded",
            "layer /upgrade explicit upgraded",
        ]
    );
}

#[tokio::test]
async fn without_a_hold_the_request_completes_at_the_101() {
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let server = serve(&log, log.layer("layer").shutdown_token(shutdown.clone())).await;
    let mut client = upgrade(&server, "/upgrade?hold=no").await;
    // Completed at the 101: the shutdown does not reach the connection.
    shutdown.cancel();
    say(&mut client, "ping").await;
    assert_eq!(next_line(&mut client).await, "ping");
    let rc = log.handles().pop().unwrap();
    assert_eq!(rc.reason(), None);
    say(&mut client, "bye").await;
    settled(&log, &["not held", "upgraded task: bye"]).await;
}

#[tokio::test]
async fn a_client_leaving_before_the_101_is_disconnected_in_the_handler() {
    let log = Log::default();
    let server = serve(&log, log.layer("layer")).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /upgrade?slow HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: lines\r\n\r\n")
        .await
        .unwrap();
    log.wait_for("held").await;
    drop(stream);
    log.wait_for("layer /upgrade disconnected handler").await;
    server.idle().await;
    settled(
        &log,
        &[
            "held",
            "handler /upgrade disconnected handler",
            "layer /upgrade disconnected handler",
        ],
    )
    .await;
    // The handler was dropped with its guard: the hold ended, nothing else happened.
    let rc = log.handles().pop().unwrap();
    assert_eq!(rc.reason(), Some(CancelReason::Disconnected));
    assert!(
        rc.hold_for_upgrade().is_none(),
        "a cancelled request cannot be held"
    );
}

#[test]
fn phase_upgraded_is_named_upgraded() {
    assert_eq!(Phase::Upgraded.to_string(), "upgraded");
}

both_flavours!(
    dropping_the_guard_completes_the_request,
    shutdown_cancels_a_held_upgraded_request_in_phase_upgraded,
    the_deadline_reaches_a_held_upgraded_request,
    an_application_cancel_is_recorded_at_once_even_if_nothing_asks,
    a_peer_that_vanishes_is_disconnected_in_phase_upgraded,
);
