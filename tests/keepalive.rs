//! A client that vanishes without FIN or RST (an unplugged network) is seen only through
//! keepalive. An in-process TCP relay between client and server stops forwarding without
//! closing anything; with HTTP/2 PING keepalive on the server, the request is cancelled with
//! `Disconnected` within interval + timeout.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower_cancel::CancelReason;

const INTERVAL: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_millis(200);

/// Forwards bytes between a client and `upstream` until `frozen` is set; then it holds both
/// sockets open and silent, like a network that stopped delivering packets.
async fn relay(upstream: std::net::SocketAddr, frozen: Arc<AtomicBool>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(upstream).await.unwrap();
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        let a = tokio::spawn(pipe(client_read, server_write, frozen.clone()));
        let b = tokio::spawn(pipe(server_read, client_write, frozen));
        let _ = tokio::join!(a, b);
    });
    addr
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Swallow everything and keep both sockets open: no FIN, no RST.
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Never close: a vanished peer does not say goodbye.
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn http2_ping_keepalive_cancels_a_request_whose_client_vanished() {
    let log = Log::default();
    let svc = ServiceBuilder::new()
        .layer(log.layer("layer"))
        .service(app(log.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(INTERVAL)
            .keep_alive_timeout(TIMEOUT);
        let _ = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
            .await;
    });

    let frozen = Arc::new(AtomicBool::new(false));
    let relay_addr = relay(server_addr, frozen.clone()).await;
    let stream = TcpStream::connect(relay_addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get(format!("http://{server_addr}/slow"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let _pending = tokio::spawn(h2.send_request(request));
    log.wait_for("start /slow").await;
    // Let a few pings go through while the client is still there: no cancellation.
    tokio::time::sleep(3 * INTERVAL).await;
    assert_eq!(log.entries(), ["start /slow"]);

    let vanished = Instant::now();
    frozen.store(true, Ordering::SeqCst);
    log.wait_for("layer /slow disconnected handler").await;
    let took = vanished.elapsed();
    println!(
        "vanished client detected after {took:?} (interval {INTERVAL:?} + timeout {TIMEOUT:?})"
    );
    assert!(
        took >= TIMEOUT,
        "cancelled before the ping could time out: {took:?}"
    );
    assert_eq!(
        log.entries(),
        [
            "start /slow",
            "dropped /slow",
            "handler /slow disconnected handler",
            "layer /slow disconnected handler",
        ]
    );
    assert_eq!(log.handles()[0].reason(), Some(CancelReason::Disconnected));
}
