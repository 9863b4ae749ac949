//! nginx as a real reverse proxy in front of the server: a client that gives up at nginx
//! cancels the request behind it, over `proxy_pass` (HTTP/1.1 to the server) and `grpc_pass`
//! (HTTP/2 to the server). Each test runs its own nginx on a free port.
#![cfg(unix)]

mod common;
#[path = "common/nginx.rs"]
mod nginx;
#[allow(dead_code)]
#[path = "../examples/https/tls.rs"]
mod tls;

use std::time::Instant;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use nginx::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A gRPC-style request: nginx's `grpc_pass` forwards anything, but this is what it is for.
fn grpc_request(nginx: &Nginx, path: &str) -> http::Request<http_body_util::Empty<Bytes>> {
    http::Request::post(nginx.url(path))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// An HTTP/1.1 client at nginx asks for `/slow` and leaves once the handler runs.
async fn abandon_slow_http1(nginx: &Nginx, log: &Log, rst: bool) -> Instant {
    let mut client = TcpStream::connect(nginx.addr).await.unwrap();
    client.write_all(get("/slow").as_bytes()).await.unwrap();
    log.wait_for("start /slow").await;
    if rst {
        client.set_zero_linger().unwrap();
    }
    let left = Instant::now();
    drop(client); // FIN (or RST): nginx gives up (499) and leaves the server
    left
}

/// An HTTP/1.1 request through nginx, read to the end of its body.
async fn full_http1(nginx: &Nginx) {
    let mut client = TcpStream::connect(nginx.addr).await.unwrap();
    client.write_all(get("/full").as_bytes()).await.unwrap();
    let response = read_until(&mut client, "hello").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
    assert!(
        response.contains("\r\nContent-Length: 5\r\n"),
        "{response:?}"
    );
}

/// A gRPC-style request through nginx, read to the end of its body.
async fn full_h2(client: &mut H2Sender, nginx: &Nginx) {
    let response = client
        .send_request(grpc_request(nginx, "/full"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello");
}

#[tokio::test]
async fn proxy_pass_client_fin_cancels_the_request() {
    let Some(bin) = nginx() else { return };
    let log = Log::default();
    let server = Server::app(&log).await;
    let nginx = Nginx::start(bin, PROXY, &server).await;
    let left = abandon_slow_http1(&nginx, &log, false).await;
    assert_slow_cancelled(&log, left, "proxy_pass, client FIN").await;
    server.idle().await; // nginx closed its connection to the server
    assert_eq!(log.entries().len(), 4, "{:?}", log.entries());
}

#[tokio::test]
async fn proxy_pass_client_rst_cancels_the_request() {
    let Some(bin) = nginx() else { return };
    let log = Log::default();
    let server = Server::app(&log).await;
    let nginx = Nginx::start(bin, PROXY, &server).await;
    let left = abandon_slow_http1(&nginx, &log, true).await;
    assert_slow_cancelled(&log, left, "proxy_pass, client RST").await;
    server.idle().await;
    assert_eq!(log.entries().len(), 4, "{:?}", log.entries());
}

#[tokio::test]
async fn proxy_pass_with_upstream_keepalive_cancels_the_request() {
    let Some(bin) = nginx() else { return };
    let log = Log::default();
    let server = Server::app(&log).await;
    let nginx = Nginx::start(bin, PROXY_KEEPALIVE, &server).await;
    let left = abandon_slow_http1(&nginx, &log, false).await;
    assert_slow_cancelled(&log, left, "proxy_pass keepalive, client FIN").await;
    // Requests after it complete, over kept-alive upstream connections.
    full_http1(&nginx).await;
    full_http1(&nginx).await;
    drop(nginx);
    server.idle().await;
    assert_only_slow_cancelled(&log, 3);
}

#[tokio::test]
async fn grpc_pass_reset_stream_cancels_the_request() {
    let Some(bin) = nginx() else { return };
    let log = Log::default();
    let server = Server::app(&log).await;
    let nginx = Nginx::start(bin, GRPC, &server).await;
    let (mut client, conn, _socket) = h2_client_to(nginx.addr).await;
    let pending = tokio::spawn(client.send_request(grpc_request(&nginx, "/slow")));
    log.wait_for("start /slow").await;
    let left = Instant::now();
    pending.abort(); // drops the response future: hyper's client sends RST_STREAM(CANCEL)
    assert_slow_cancelled(&log, left, "grpc_pass, RST_STREAM").await;
    server.idle().await; // nginx closed its connection to the server
    // The client's connection to nginx survives the reset: the next request completes.
    full_h2(&mut client, &nginx).await;
    drop(client);
    tokio::time::timeout(PATIENCE, conn).await.unwrap().unwrap();
    server.idle().await;
    assert_only_slow_cancelled(&log, 2);
}

#[tokio::test]
async fn grpc_pass_connection_close_cancels_the_request() {
    let Some(bin) = nginx() else { return };
    let log = Log::default();
    let server = Server::app(&log).await;
    let nginx = Nginx::start(bin, GRPC, &server).await;
    let (mut client, _conn, socket) = h2_client_to(nginx.addr).await;
    let pending = tokio::spawn(client.send_request(grpc_request(&nginx, "/slow")));
    log.wait_for("start /slow").await;
    let left = Instant::now();
    socket.shutdown(std::net::Shutdown::Both).unwrap(); // the TCP connection to nginx closes
    assert_slow_cancelled(&log, left, "grpc_pass, connection close").await;
    server.idle().await;
    let result = tokio::time::timeout(PATIENCE, pending)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_err(), "the client got no response: {result:?}");
    assert_eq!(log.entries().len(), 4, "{:?}", log.entries());
}

#[tokio::test]
async fn grpc_pass_with_upstream_keepalive_cancels_the_request() {
    let Some(bin) = nginx() else { return };
    let log = Log::default();
    let server = Server::app(&log).await;
    let nginx = Nginx::start(bin, GRPC_KEEPALIVE, &server).await;
    let (mut client, conn, _socket) = h2_client_to(nginx.addr).await;
    let pending = tokio::spawn(client.send_request(grpc_request(&nginx, "/slow")));
    log.wait_for("start /slow").await;
    let left = Instant::now();
    pending.abort();
    assert_slow_cancelled(&log, left, "grpc_pass keepalive, RST_STREAM").await;
    full_h2(&mut client, &nginx).await;
    full_h2(&mut client, &nginx).await;
    drop(client);
    tokio::time::timeout(PATIENCE, conn).await.unwrap().unwrap();
    drop(nginx);
    server.idle().await;
    assert_only_slow_cancelled(&log, 3);
}

#[tokio::test]
async fn requests_through_nginx_that_complete_cancel_nothing() {
    let Some(bin) = nginx() else { return };
    let upstreams = [
        PROXY,
        PROXY_KEEPALIVE,
        PROXY_TLS,
        PROXY_TLS_KEEPALIVE,
        PROXY_TLS_10,
        PROXY_STREAMING,
        GRPC,
        GRPC_KEEPALIVE,
    ];
    for upstream in upstreams {
        let log = Log::default();
        let server = backend(&log, upstream).await;
        let nginx = Nginx::start(bin, upstream, &server).await;
        match upstream.pass {
            Pass::Proxy | Pass::ProxyTls | Pass::ProxyTls10 | Pass::ProxyStreaming => {
                full_http1(&nginx).await
            }
            Pass::Grpc => {
                let (mut client, conn, _socket) = h2_client_to(nginx.addr).await;
                full_h2(&mut client, &nginx).await;
                drop(client);
                tokio::time::timeout(PATIENCE, conn).await.unwrap().unwrap();
            }
        }
        if !upstream.keepalive {
            // nginx closes its upstream connection after the response: still no cancel.
            server.idle().await;
        }
        drop(nginx);
        server.idle().await;
        assert_eq!(log.entries(), ["start /full"], "{upstream:?}");
        assert_eq!(log.handles().len(), 1, "{upstream:?}");
        assert_all_completed(&log);
    }
}
