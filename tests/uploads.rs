//! Uploads over real sockets (HTTP/1.1): a client that leaves mid-upload while the handler
//! reads, a client that leaves while the body is unread (with and without read-ahead), and
//! read-ahead handing the handler the exact bytes the client sent.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::{ServiceBuilder, service_fn};
use tower_cancel::{CancelReason, RequestBody, RequestBodyLayer, RequestCancellation};

const MIB: usize = 1024 * 1024;

/// What the upload handler does with the body.
#[derive(Clone, Copy)]
enum Handler {
    /// Reads the body, logging `read error` if that fails, then stays busy for 30 s.
    Read,
    /// Waits for `go`, then reads the whole body and answers with its length and whether it
    /// equals `payload(len)`.
    WaitThenRead,
}

async fn serve(log: &Log, body_layer: RequestBodyLayer, handler: Handler) -> (Server, Arc<Notify>) {
    let go = Arc::new(Notify::new());
    let (l, g) = (log.clone(), go.clone());
    let upload = service_fn(move |req: Request<RequestBody<Incoming>>| {
        let (log, go) = (l.clone(), g.clone());
        async move {
            let rc = req
                .extensions()
                .get::<RequestCancellation>()
                .unwrap()
                .clone();
            log.keep(rc.clone());
            log.push("start");
            let body = req.into_body();
            let answer = match handler {
                Handler::Read => {
                    if body.collect().await.is_err() {
                        log.push("read error");
                    }
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late".to_owned()
                }
                Handler::WaitThenRead => {
                    go.notified().await;
                    match body.collect().await {
                        Ok(bytes) => {
                            let bytes = bytes.to_bytes();
                            let same = bytes[..] == payload(bytes.len())[..];
                            format!("{} bytes, identical: {same}", bytes.len())
                        }
                        Err(_) => {
                            log.push("read error");
                            "read error".to_owned()
                        }
                    }
                }
            };
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer))))
        }
    });
    let svc = ServiceBuilder::new()
        .layer(log.layer("layer"))
        .layer(body_layer)
        .service(upload);
    (Server::start(svc).await, go)
}

/// Sends a POST head declaring `declared` bytes, then `sent` bytes of the payload.
async fn upload(server: SocketAddr, declared: usize, sent: usize, chunked: bool) -> TcpStream {
    let mut stream = TcpStream::connect(server).await.unwrap();
    let data = payload(sent);
    if chunked {
        stream
            .write_all(b"POST /upload HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        // Odd-sized chunks, so frames and chunk boundaries never line up.
        for chunk in data.chunks(7919) {
            let head = format!("{:x}\r\n", chunk.len());
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(chunk).await.unwrap();
            stream.write_all(b"\r\n").await.unwrap();
        }
        if sent == declared {
            stream.write_all(b"0\r\n\r\n").await.unwrap();
        }
    } else {
        let head =
            format!("POST /upload HTTP/1.1\r\nhost: t\r\ncontent-length: {declared}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&data).await.unwrap();
    }
    stream
}

#[tokio::test]
async fn a_client_leaving_mid_upload_cancels_while_the_handler_reads() {
    let log = Log::default();
    let (server, _) = serve(&log, RequestBodyLayer::new(), Handler::Read).await;
    let stream = upload(server.addr, MIB, 64 * 1024, false).await;
    log.wait_for("start").await;
    drop(stream);
    log.wait_for("layer /upload disconnected handler").await;
    // hyper kept the handler alive after its read failed; the layer cancelled it anyway.
    assert_eq!(
        log.entries(),
        ["start", "layer /upload disconnected handler", "read error"]
    );
    assert_eq!(log.handles()[0].reason(), Some(CancelReason::Disconnected));
}

#[tokio::test]
async fn an_unread_upload_with_read_ahead_sees_the_client_leave() {
    for sent in [MIB, MIB / 2] {
        let log = Log::default();
        let layer = RequestBodyLayer::new().read_ahead(2 * MIB);
        let (server, go) = serve(&log, layer, Handler::WaitThenRead).await;
        let stream = upload(server.addr, MIB, sent, false).await;
        log.wait_for("start").await;
        // Let the read-ahead take what was sent, then leave.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let left = Instant::now();
        drop(stream);
        log.wait_for("layer /upload disconnected handler").await;
        println!(
            "sent {sent} of {MIB} bytes: cancelled {:?} after the client left",
            left.elapsed()
        );
        assert_eq!(log.handles()[0].reason(), Some(CancelReason::Disconnected));
        // A whole body was read ahead: hyper then saw the close and dropped the handler.
        // Half a body: the read failed, hyper keeps the handler, which learns it on reading.
        go.notify_one();
        server.idle().await;
        let expected: &[&str] = if sent == MIB {
            &["start", "layer /upload disconnected handler"]
        } else {
            &["start", "layer /upload disconnected handler", "read error"]
        };
        assert_eq!(log.entries(), expected, "sent {sent}");
    }
}

#[tokio::test]
async fn without_read_ahead_an_unread_upload_hides_the_client_leaving() {
    // The gap read-ahead closes: hyper does not read the socket while the body is unread.
    let log = Log::default();
    let (server, go) = serve(&log, RequestBodyLayer::new(), Handler::WaitThenRead).await;
    let stream = upload(server.addr, MIB, MIB, false).await;
    log.wait_for("start").await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(log.entries(), ["start"], "nothing noticed the client leave");
    go.notify_one(); // the handler reads: now the request ends
    server.idle().await;
}

#[tokio::test]
async fn read_ahead_hands_the_handler_the_exact_bytes() {
    let cases = [
        ("1 MiB, content-length, limit 2 MiB", MIB, false),
        ("1 MiB, chunked in odd sizes, limit 2 MiB", MIB, true),
        (
            "3 MiB, content-length, beyond the 2 MiB limit",
            3 * MIB,
            false,
        ),
    ];
    for (name, len, chunked) in cases {
        let log = Log::default();
        let layer = RequestBodyLayer::new().read_ahead(2 * MIB);
        let (server, go) = serve(&log, layer, Handler::WaitThenRead).await;
        let writer = tokio::spawn(upload(server.addr, len, len, chunked));
        log.wait_for("start").await;
        tokio::time::sleep(Duration::from_millis(50)).await; // read-ahead runs meanwhile
        go.notify_one();
        let mut stream = writer.await.unwrap();
        let response = read_until(&mut stream, "identical: true").await;
        assert!(
            response.ends_with(&format!("{len} bytes, identical: true")),
            "{name}: {response}"
        );
        assert!(log.handles()[0].reason().is_none(), "{name}: completed");
    }
}
