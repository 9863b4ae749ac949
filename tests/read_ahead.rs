//! Read-ahead over real sockets (HTTP/1.1): the layer-wide budget under 200 concurrent uploads,
//! the budget given back however a request ends, and a request body that panics while it is
//! read ahead.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::{ServiceBuilder, service_fn};
use tower_cancel::{CancellationLayer, RequestBody, RequestBodyLayer};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Whether `data`, found at `pos` in a body, is what `base` rotated left by `rotation` has
/// there (each upload of the 200 sends `base` rotated by its own amount: distinct bodies).
fn same_as_rotated(base: &[u8], rotation: usize, pos: usize, mut data: &[u8]) -> bool {
    let mut at = pos;
    while !data.is_empty() {
        let start = (rotation + at) % base.len();
        let n = data.len().min(base.len() - start);
        if data[..n] != base[start..start + n] {
            return false;
        }
        data = &data[n..];
        at += n;
    }
    true
}

/// Reads the response until the server closes; a reset counts as a close.
async fn response(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut buf)).await;
    let _ = read.expect("the server neither answered nor closed");
    String::from_utf8_lossy(&buf).into_owned()
}

fn text(answer: String) -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from(answer)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_uploads_share_one_read_ahead_budget() {
    const UPLOADS: usize = 200;
    const TOTAL: usize = 16 * MIB;
    let started = Instant::now();
    let base = Arc::new(payload(MIB));
    let rotation = |id: usize| id * 5003 % MIB;
    let layer = RequestBodyLayer::new()
        .read_ahead(MIB)
        .read_ahead_total(TOTAL);
    let gate = CancellationToken::new();
    let largest = Arc::new(AtomicUsize::new(0));

    let handler = {
        let (base, gate, largest) = (base.clone(), gate.clone(), largest.clone());
        service_fn(move |req: Request<RequestBody<Incoming>>| {
            let (base, gate, largest) = (base.clone(), gate.clone(), largest.clone());
            async move {
                let id: usize = req.uri().path()["/upload/".len()..].parse().unwrap();
                gate.cancelled().await;
                let mut body = req.into_body();
                let (mut pos, mut same) = (0, true);
                while let Some(frame) = body.frame().await {
                    let frame = match frame {
                        Ok(frame) => frame,
                        Err(error) => return Ok(text(format!("{id}: read error {error}"))),
                    };
                    if let Some(data) = frame.data_ref() {
                        largest.fetch_max(data.len(), Ordering::SeqCst);
                        same &= same_as_rotated(&base, rotation(id), pos, data);
                        pos += data.len();
                    }
                }
                let answer = if same && pos == MIB {
                    format!("identical {id}")
                } else {
                    format!("{id}: {pos} bytes, identical so far: {same}")
                };
                Ok::<_, Infallible>(text(answer))
            }
        })
    };
    let server = Server::start(
        ServiceBuilder::new()
            .layer(CancellationLayer::new())
            .layer(layer.clone())
            .service(handler),
    )
    .await;

    let clients: Vec<_> = (0..UPLOADS)
        .map(|id| {
            let (addr, base) = (server.addr, base.clone());
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let head = format!(
                    "POST /upload/{id} HTTP/1.1\r\nhost: t\r\ncontent-length: {MIB}\r\n\
                     connection: close\r\n\r\n"
                );
                stream.write_all(head.as_bytes()).await.unwrap();
                let rotation = rotation(id);
                stream.write_all(&base[rotation..]).await.unwrap();
                stream.write_all(&base[..rotation]).await.unwrap();
                response(&mut stream).await
            })
        })
        .collect();

    // The handlers wait until the read-ahead holds the whole budget.
    let filled = tokio::time::timeout(PATIENCE, async {
        while layer.read_ahead_held() < TOTAL {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(
        filled.is_ok(),
        "the read-ahead never held the budget: held {}, peak {}",
        layer.read_ahead_held(),
        layer.read_ahead_peak()
    );
    // And until the read-ahead has stopped: what it holds stays put for 100 ms.
    let settled = tokio::time::timeout(PATIENCE, async {
        loop {
            let before = layer.read_ahead_held();
            tokio::time::sleep(Duration::from_millis(100)).await;
            if layer.read_ahead_held() == before {
                return before;
            }
        }
    })
    .await;
    let held_at_gate = settled.expect("the read-ahead never stopped");
    gate.cancel();
    for (id, client) in clients.into_iter().enumerate() {
        let response = client.await.unwrap();
        assert!(
            response.ends_with(&format!("\r\n\r\nidentical {id}")),
            "upload {id}: {response:?}"
        );
    }
    server.idle().await;

    let (peak, largest) = (layer.read_ahead_peak(), largest.load(Ordering::SeqCst));
    println!(
        "{UPLOADS} uploads of 1 MiB, read_ahead(1 MiB), read_ahead_total(16 MiB): held {held_at_gate} \
         at the gate, peak {peak} ({:.2} MiB), largest frame {largest}, {:?}",
        peak as f64 / MIB as f64,
        started.elapsed()
    );
    assert!(peak >= TOTAL, "the budget was used: peak {peak}");
    assert!(
        peak <= TOTAL + UPLOADS * largest,
        "peak {peak} above the budget plus one frame ({largest}) per upload"
    );
    assert_eq!(layer.read_ahead_held(), 0, "every byte back in the budget");
}

#[tokio::test]
async fn the_budget_comes_back_however_a_request_ends() {
    const SIZE: usize = 256 * KIB;
    const EACH: usize = 3;
    let layer = RequestBodyLayer::new().read_ahead(MIB);
    let gate = CancellationToken::new();
    let handler = {
        let gate = gate.clone();
        service_fn(move |req: Request<RequestBody<Incoming>>| {
            let gate = gate.clone();
            async move {
                gate.cancelled().await;
                match req.uri().path() {
                    "/answer" => Ok::<_, Infallible>(text("answered unread".to_owned())),
                    "/panic" => panic!("the handler panics with its body unread"),
                    _ => {
                        // `/leave`: the client leaves first, and hyper drops this handler.
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        Ok(text("late".to_owned()))
                    }
                }
            }
        })
    };
    let server = Server::start(
        ServiceBuilder::new()
            .layer(CancellationLayer::new())
            .layer(layer.clone())
            .service(handler),
    )
    .await;
    let body = payload(SIZE);
    let mut streams = Vec::new();
    for path in ["/answer", "/leave", "/panic"] {
        for _ in 0..EACH {
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            let head = format!(
                "POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {SIZE}\r\nconnection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(&body).await.unwrap();
            streams.push((path, stream));
        }
    }
    eventually("every body read ahead", || {
        layer.read_ahead_held() == 3 * EACH * SIZE
    })
    .await;
    let mut answered = Vec::new();
    for (path, stream) in streams {
        if path == "/answer" {
            answered.push(stream);
        } else if path == "/leave" {
            drop(stream);
        }
    }
    gate.cancel();
    for mut stream in answered {
        let response = response(&mut stream).await;
        assert!(response.ends_with("answered unread"), "{response:?}");
    }
    let given_back = tokio::time::timeout(PATIENCE, async {
        while layer.read_ahead_held() != 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(
        given_back.is_ok(),
        "{} bytes still held after every request ended (answered unread, client left, handler \
         panicked)",
        layer.read_ahead_held()
    );
    assert_eq!(layer.read_ahead_peak(), 3 * EACH * SIZE);
}

const BODY_PANIC: &str = "test body: the second poll_frame panics";

/// hyper's body, which panics on its second `poll_frame` if `panics`.
struct MaybePanicking {
    inner: Incoming,
    panics: bool,
    polls: usize,
}

impl Body for MaybePanicking {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.polls += 1;
        if self.panics && self.polls == 2 {
            panic!("{BODY_PANIC}");
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[tokio::test]
async fn a_request_body_that_panics_while_read_ahead_fails_its_connection_only() {
    const SIZE: usize = 256 * KIB;
    let layer = RequestBodyLayer::new().read_ahead(MIB);
    // What the second request's handler found held by read-ahead before it read.
    let held_before_reading = Arc::new(AtomicUsize::new(0));
    let handler = {
        let held_before_reading = held_before_reading.clone();
        let layer = layer.clone();
        service_fn(move |req: Request<RequestBody<MaybePanicking>>| {
            let held_before_reading = held_before_reading.clone();
            let layer = layer.clone();
            async move {
                if req.uri().path() == "/panic" {
                    // Never reads: the body is only read ahead, and panics there (so the panic
                    // below is the read-ahead's). hyper drops this future with its connection.
                    std::future::pending::<()>().await;
                }
                // Reads once the whole body was read ahead (or after a bound, to fail below).
                let wait = async {
                    while layer.read_ahead_held() < SIZE {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                };
                let _ = tokio::time::timeout(PATIENCE, wait).await;
                held_before_reading.store(layer.read_ahead_held(), Ordering::SeqCst);
                let answer = match req.into_body().collect().await {
                    Ok(body) => {
                        let body = body.to_bytes();
                        let same = body[..] == payload(body.len())[..];
                        format!("{} bytes, identical: {same}", body.len())
                    }
                    Err(error) => format!("read error {error}"),
                };
                Ok::<_, Infallible>(text(answer))
            }
        })
    };
    let svc = ServiceBuilder::new()
        .layer(CancellationLayer::new())
        // Outside the read-ahead: the body it reads panics, on one path only.
        .map_request(|req: Request<Incoming>| {
            let panics = req.uri().path() == "/panic";
            req.map(|inner| MaybePanicking {
                inner,
                panics,
                polls: 0,
            })
        })
        .layer(layer.clone())
        .service(handler);

    // An accept loop that keeps each connection task's JoinHandle.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connections, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let acceptor = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = TowerToHyperService::new(svc.clone());
            let _ = connections.send(tokio::spawn(async move {
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
            }));
        }
    });
    let upload = |path: &'static str, addr: SocketAddr| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {SIZE}\r\nconnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        // The server may be gone before all of it is sent.
        let _ = stream.write_all(&payload(SIZE)).await;
        response(&mut stream).await
    };

    let client = tokio::spawn(upload("/panic", addr));
    let connection = accepted.recv().await.unwrap();
    let failure = tokio::time::timeout(PATIENCE, connection)
        .await
        .expect("the connection task ended")
        .expect_err("the connection task panicked");
    assert!(failure.is_panic(), "{failure:?}");
    let payload_of = failure.into_panic();
    let message = payload_of
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload_of.downcast_ref::<&str>().map(|s| (*s).to_owned()));
    assert_eq!(message.as_deref(), Some(BODY_PANIC), "the body's own panic");
    let response = client.await.unwrap();
    assert!(!response.contains("HTTP/1.1"), "no answer: {response:?}");
    assert_eq!(
        layer.read_ahead_held(),
        0,
        "the panicked request gave its bytes back"
    );

    // The server keeps serving, with read-ahead: the next body arrives byte-identical.
    let response = upload("/upload", addr).await;
    assert!(
        response.ends_with(&format!("{SIZE} bytes, identical: true")),
        "{response:?}"
    );
    let connection = accepted.recv().await.unwrap();
    let served = tokio::time::timeout(PATIENCE, connection).await.unwrap();
    assert!(served.unwrap().is_ok(), "the next connection is served");
    assert_eq!(layer.read_ahead_held(), 0);
    assert_eq!(
        held_before_reading.load(Ordering::SeqCst),
        SIZE,
        "the second body was read ahead, whole"
    );
    acceptor.abort();
}

/// Everything the server sends within `wait`, as text.
async fn sent_within(stream: &mut TcpStream, wait: Duration) -> String {
    let mut buf = vec![0; 4096];
    let mut text = String::new();
    let deadline = Instant::now() + wait;
    while let Ok(read) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    text
}

#[tokio::test]
async fn read_ahead_leaves_expect_100_continue_to_the_handler() {
    // A client that sends `Expect: 100-continue` waits for the `100` before sending its body.
    // hyper sends it when the body is first polled, so read-ahead must not poll it: the
    // handler decides. `/reject` answers 413 unread; `/accept` reads, once it is ready.
    const BUSY: Duration = Duration::from_millis(300);
    let layer = RequestBodyLayer::new().read_ahead(MIB);
    let handler = service_fn(|req: Request<RequestBody<Incoming>>| async move {
        tokio::time::sleep(BUSY).await;
        if req.uri().path() == "/reject" {
            let mut response = text("too large".to_owned());
            *response.status_mut() = http::StatusCode::PAYLOAD_TOO_LARGE;
            return Ok::<_, Infallible>(response);
        }
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Ok(text(format!("{} bytes", body.len())))
    });
    let server = Server::start(
        ServiceBuilder::new()
            .layer(CancellationLayer::new())
            .layer(layer.clone())
            .service(handler),
    )
    .await;
    for (path, expect) in [("/reject", "expect"), ("/accept", "Expect")] {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n{expect}: 100-continue\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        // While the handler is busy, nothing: no `100` sent on its behalf.
        let early = sent_within(&mut stream, BUSY / 2).await;
        assert_eq!(early, "", "{path}: sent while the handler was busy");
        if path == "/reject" {
            let answer = response(&mut stream).await;
            assert!(answer.starts_with("HTTP/1.1 413 "), "{answer:?}");
            assert!(!answer.contains("100 Continue"), "{answer:?}");
            continue;
        }
        let continued = read_until(&mut stream, "\r\n\r\n").await;
        assert!(
            continued.starts_with("HTTP/1.1 100 Continue"),
            "{continued:?}"
        );
        assert!(
            started.elapsed() >= BUSY,
            "the 100 came with the handler's first read, after {:?}",
            started.elapsed()
        );
        stream.write_all(b"hello").await.unwrap();
        let answer = read_until(&mut stream, "5 bytes").await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    }
    assert_eq!(layer.read_ahead_peak(), 0, "nothing was read ahead");
}
