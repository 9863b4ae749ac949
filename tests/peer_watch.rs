//! `tcp::PeerWatch` over real sockets: the kernel's notice of a peer's FIN or RST reaches the
//! request in flight while hyper is not reading (a request body left unread), with nothing
//! read ahead. A table of endings (FIN, RST, half-close) × modes (no watch, the default
//! watch, a watch allowing half-close) × phases (handler with its body unread, response body
//! streaming), over HTTP/1.1, and the same over HTTP/2 and TLS (curl giving up mid-upload);
//! keep-alive and pipelined requests never cancel anything.
#![cfg(unix)]

mod common;
#[path = "common/nginx.rs"]
mod nginx;
#[allow(dead_code)]
#[path = "../examples/https/tls.rs"]
mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;
use tower_cancel::tcp::PeerWatch;
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};

const PATIENCE: Duration = Duration::from_secs(10);
/// How long a test waits to be sure that nothing was cancelled.
const QUIET: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// No watch: today's behaviour, for contrast.
    Unwatched,
    /// `PeerWatch::new`: a FIN counts.
    Watched,
    /// `PeerWatch::allowing_half_close` (and hyper's `half_close(true)`): only a RST counts.
    HalfCloseAllowed,
}

/// What the server saw: each cancellation (`path reason phase`) and when it ran, and each
/// handler start.
#[derive(Clone, Default)]
struct Seen {
    cancelled: Arc<Mutex<Vec<(String, Instant)>>>,
    started: Arc<Mutex<Vec<String>>>,
}

impl Seen {
    fn cancellations(&self) -> Vec<String> {
        self.cancelled
            .lock()
            .unwrap()
            .iter()
            .map(|(c, _)| c.clone())
            .collect()
    }

    async fn wait_started(&self, count: usize) {
        let wait = async {
            while self.started.lock().unwrap().len() < count {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .expect("the handler did not start");
    }

    /// Waits for the first cancellation: what it was and when it ran.
    async fn wait_cancelled(&self) -> (String, Instant) {
        let wait = async {
            loop {
                if let Some(first) = self.cancelled.lock().unwrap().first() {
                    return first.clone();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("nothing was cancelled; started: {:?}", self.started))
    }
}

/// A server on 127.0.0.1:0 whose connections are watched as `mode` says (and served over TLS
/// with `tls`). Routes: `/hold` waits 30 s without reading its body, `/ok` answers at once,
/// `/stream` streams a tick at once, then one every 5 s forever.
async fn serve(mode: Mode, tls: bool) -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let cancelled = seen.cancelled.clone();
    let layer = CancellationLayer::new().on_cancel(move |c: &Cancelled| {
        let entry = format!("{} {} {}", c.uri().path(), c.reason(), c.phase());
        cancelled.lock().unwrap().push((entry, Instant::now()));
    });
    let started = seen.started.clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(move |req: Request<Incoming>| {
            let started = started.clone();
            async move {
                let rc = RequestCancellation::from_extensions(req.extensions()).unwrap();
                started.lock().unwrap().push(req.uri().path().to_owned());
                let body: BoxBody<Bytes, Infallible> = match req.uri().path() {
                    "/hold" => {
                        // Decides for a long time before reading the upload; `req` (and its
                        // unread body) stays alive meanwhile.
                        let _ = rc.run(tokio::time::sleep(Duration::from_secs(30))).await;
                        drop(req);
                        Full::new(Bytes::from_static(b"late")).boxed()
                    }
                    "/stream" => {
                        // A tick now, then one every 5 s: hyper, which only learns of a
                        // closed connection when a write fails, would take seconds.
                        let ticks = futures_util::stream::unfold(false, |waited| async move {
                            if waited {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                            }
                            Some((Ok(Frame::data(Bytes::from_static(b"tick\n"))), true))
                        });
                        StreamBody::new(ticks).boxed()
                    }
                    _ => Full::new(Bytes::from_static(b"ok")).boxed(),
                };
                Ok::<_, Infallible>(Response::new(body))
            }
        }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.then(|| {
        let (config, _) = tls::server_config(None).unwrap();
        tokio_rustls::TlsAcceptor::from(config)
    });
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = svc.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let watch = match mode {
                    Mode::Unwatched => None,
                    Mode::Watched => Some(PeerWatch::new(&stream).unwrap()),
                    Mode::HalfCloseAllowed => {
                        Some(PeerWatch::allowing_half_close(&stream).unwrap())
                    }
                };
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder.http1().half_close(mode == Mode::HalfCloseAllowed);
                match (watch, acceptor) {
                    (Some(watch), None) => {
                        let svc = TowerToHyperService::new(watch.service(svc));
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    (None, None) => {
                        let svc = TowerToHyperService::new(svc);
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    (Some(watch), Some(acceptor)) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let svc = TowerToHyperService::new(watch.service(svc));
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    (None, Some(_)) => unreachable!("TLS is tested watched"),
                }
            });
        }
    });
    (addr, seen)
}

#[derive(Clone, Copy, Debug)]
enum Ending {
    /// `close()` with nothing unread on the client: a FIN.
    Fin,
    /// `SO_LINGER` 0, then close: a RST.
    Rst,
    /// `shutdown(SHUT_WR)`, still reading: a FIN too, from a client that wants its answer.
    HalfClose,
}

/// The head of a 100 000-byte upload and its first 50 000 bytes: the rest never comes.
fn partial_upload(path: &str) -> Vec<u8> {
    let mut request =
        format!("POST {path} HTTP/1.1\r\nhost: test\r\ncontent-length: 100000\r\n\r\n")
            .into_bytes();
    request.extend(std::iter::repeat_n(b'x', 50_000));
    request
}

/// Ends the client's side of the connection as `ending` says; returns when it did.
async fn end(stream: TcpStream, ending: Ending) -> (Instant, Option<TcpStream>) {
    match ending {
        Ending::Fin => {
            drop(stream);
            (Instant::now(), None)
        }
        Ending::Rst => {
            stream.set_zero_linger().unwrap();
            drop(stream);
            (Instant::now(), None)
        }
        Ending::HalfClose => {
            let mut stream = stream;
            stream.shutdown().await.unwrap();
            (Instant::now(), Some(stream))
        }
    }
}

/// One cell: `request` sent, the handler (or body) running, then `ending`. Returns what was
/// cancelled, and how long after the client's ending.
async fn cell(mode: Mode, request: &[u8], ending: Ending) -> Option<(String, Duration)> {
    let (addr, seen) = serve(mode, false).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    seen.wait_started(1).await;
    if request.starts_with(b"GET /stream") {
        // The response is streaming: its head and a first tick have arrived.
        let mut buf = [0; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0);
    } else {
        // The handler is running, its body unread.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ended, _kept) = end(stream, ending).await;
    let first = tokio::time::timeout(QUIET, seen.wait_cancelled()).await;
    first
        .ok()
        .map(|(what, when)| (what, when.saturating_duration_since(ended)))
}

#[tokio::test]
async fn the_table_of_endings_modes_and_phases_over_http1() {
    let upload = partial_upload("/hold");
    let stream = b"GET /stream HTTP/1.1\r\nhost: test\r\n\r\n".to_vec();
    let handler = "/hold disconnected handler";
    let body = "/stream disconnected body";
    // (mode, request, ending, expected cancellation)
    let table: [(Mode, &[u8], Ending, Option<&str>); 13] = [
        // Without the watch, hyper does not read an unread body: nothing is seen (the gap).
        (Mode::Unwatched, &upload, Ending::Fin, None),
        (Mode::Unwatched, &upload, Ending::Rst, None),
        (Mode::Watched, &upload, Ending::Fin, Some(handler)),
        (Mode::Watched, &upload, Ending::Rst, Some(handler)),
        (Mode::Watched, &upload, Ending::HalfClose, Some(handler)),
        (Mode::HalfCloseAllowed, &upload, Ending::Fin, None),
        (Mode::HalfCloseAllowed, &upload, Ending::Rst, Some(handler)),
        (Mode::HalfCloseAllowed, &upload, Ending::HalfClose, None),
        // A streaming response. With the request read to its end (no body), hyper reads for
        // the end of the stream itself and sees a FIN; a RST while half-close is allowed it
        // learns of only when a write fails (seconds here, between ticks). The watch sees
        // either at once.
        (Mode::Unwatched, &stream, Ending::Fin, Some(body)),
        (Mode::Watched, &stream, Ending::Fin, Some(body)),
        (Mode::Watched, &stream, Ending::Rst, Some(body)),
        (Mode::HalfCloseAllowed, &stream, Ending::HalfClose, None),
        (Mode::HalfCloseAllowed, &stream, Ending::Rst, Some(body)),
    ];
    let mut failures = Vec::new();
    for (mode, request, ending, expected) in table {
        let path = String::from_utf8_lossy(&request[..12]).into_owned();
        let seen = cell(mode, request, ending).await;
        println!("{mode:?} × {path:?} × {ending:?}: {seen:?}");
        let got = seen.as_ref().map(|(what, _)| what.as_str());
        if got != expected {
            failures.push(format!(
                "{mode:?} × {path:?} × {ending:?}: expected {expected:?}, got {seen:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A watched connection whose client only half-closed, with half-close allowed, gets its
/// answer: the handler runs to its end and nothing is cancelled.
#[tokio::test]
async fn a_half_closed_client_gets_its_answer_when_half_close_is_allowed() {
    let (addr, seen) = serve(Mode::HalfCloseAllowed, false).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /ok HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("ok"), "{response}");
    tokio::time::sleep(QUIET).await;
    assert!(
        seen.cancellations().is_empty(),
        "{:?}",
        seen.cancellations()
    );
}

/// Keep-alive with pauses between requests, and pipelined requests: new data on the socket
/// is not a peer leaving, and a client that closes an idle connection cancels nothing.
#[tokio::test]
async fn keep_alive_and_pipelined_requests_cancel_nothing() {
    let (addr, seen) = serve(Mode::Watched, false).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let one = b"GET /ok HTTP/1.1\r\nhost: test\r\n\r\n";
    let mut read = Vec::new();
    for round in 1..=3 {
        stream.write_all(one).await.unwrap();
        while read_count(&read) < round {
            let mut buf = [0; 1024];
            let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed after {round} requests");
            read.extend_from_slice(&buf[..n]);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Five pipelined in one write, one of them with a body.
    let mut pipelined = one.repeat(2);
    pipelined
        .extend_from_slice(b"POST /ok HTTP/1.1\r\nhost: test\r\ncontent-length: 5\r\n\r\nhello");
    pipelined.extend_from_slice(&one.repeat(2));
    stream.write_all(&pipelined).await.unwrap();
    while read_count(&read) < 8 {
        let mut buf = [0; 4096];
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        read.extend_from_slice(&buf[..n]);
    }
    drop(stream); // an idle keep-alive connection, closed
    tokio::time::sleep(QUIET).await;
    assert_eq!(seen.started.lock().unwrap().len(), 8);
    assert!(
        seen.cancellations().is_empty(),
        "{:?}",
        seen.cancellations()
    );
}

fn read_count(read: &[u8]) -> usize {
    read.windows(12).filter(|w| w == b"HTTP/1.1 200").count()
}

/// HTTP/2 (prior knowledge): the watch is a second signal beside hyper's own; a client that
/// closes with a request in flight is cancelled once.
#[tokio::test]
async fn http2_a_client_that_closes_is_cancelled_once() {
    let (addr, seen) = serve(Mode::Watched, false).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let socket = stream.into_std().unwrap();
    let kill = socket.try_clone().unwrap();
    let stream = TcpStream::from_std(socket).unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = Request::post(format!("http://{addr}/hold"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let _pending = tokio::spawn(send.send_request(request));
    seen.wait_started(1).await;
    kill.shutdown(std::net::Shutdown::Both).unwrap(); // a FIN
    let (what, _) = seen.wait_cancelled().await;
    assert_eq!(what, "/hold disconnected handler");
    tokio::time::sleep(QUIET).await;
    assert_eq!(seen.cancellations().len(), 1);
}

/// curl, in cleartext and over TLS: an upload given up halfway (`--max-time`), the handler
/// not reading it.
#[tokio::test]
async fn curl_giving_up_mid_upload_is_seen_in_cleartext_and_over_tls() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(std::env::var_os("CI").is_none(), "curl is missing on CI");
        return;
    }
    for tls in [false, true] {
        let (addr, seen) = serve(Mode::Watched, tls).await;
        let scheme = if tls { "https" } else { "http" };
        let upload = std::env::temp_dir().join(format!("peer-watch-{}", std::process::id()));
        std::fs::write(&upload, vec![b'x'; 4 << 20]).unwrap();
        let started = Instant::now();
        let status = tokio::process::Command::new("curl")
            .args([
                "-sk",
                "--http1.1",
                "--max-time",
                "0.5",
                "--limit-rate",
                "64K",
            ])
            .arg("--data-binary")
            .arg(format!("@{}", upload.display()))
            .arg(format!("{scheme}://{addr}/hold"))
            .status()
            .await
            .unwrap();
        let gave_up = Instant::now();
        let _ = std::fs::remove_file(&upload);
        assert_eq!(status.code(), Some(28), "curl timed out: {status}");
        let (what, when) = seen.wait_cancelled().await;
        assert_eq!(what, "/hold disconnected handler");
        println!(
            "{scheme}: curl gave up after {:?}; cancelled {:?} later",
            gave_up - started,
            when.saturating_duration_since(gave_up)
        );
    }
}

/// axum: `into_make_service_with_connect_info::<PeerWatch>()` and `PeerWatchLayer` outside
/// the `CancellationLayer`. A handler that holds its upload unread is cancelled when the
/// client closes (FIN) or resets (RST) mid-upload; without the watch layer it runs on; a
/// request that completes is never cancelled, also when its client closes right after.
#[tokio::test]
async fn axum_with_connect_info_sees_a_client_leave_an_unread_upload() {
    use axum::Router;
    use axum::routing::post;
    use tower_cancel::tcp::PeerWatchLayer;

    for (watched, ending, expected) in [
        (true, Ending::Fin, Some("/upload disconnected handler")),
        (true, Ending::Rst, Some("/upload disconnected handler")),
        (false, Ending::Fin, None),
        (false, Ending::Rst, None),
    ] {
        let seen = Seen::default();
        let cancelled = seen.cancelled.clone();
        let started = seen.started.clone();
        let app = Router::new()
            .route(
                "/upload",
                post(move |rc: RequestCancellation, body: axum::body::Body| {
                    started.lock().unwrap().push("/upload".to_owned());
                    async move {
                        // Decides for a long time before reading the upload.
                        let _ = rc.run(tokio::time::sleep(Duration::from_secs(30))).await;
                        let _ = axum::body::to_bytes(body, usize::MAX).await;
                        "stored"
                    }
                }),
            )
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .layer(CancellationLayer::new().on_cancel(move |c: &Cancelled| {
                let entry = format!("{} {} {}", c.uri().path(), c.reason(), c.phase());
                cancelled.lock().unwrap().push((entry, Instant::now()));
            }));
        let app = if watched {
            app.layer(PeerWatchLayer::new())
        } else {
            app
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<PeerWatch>(),
            )
            .await
        });

        // A completed request, its client closing right after: nothing.
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /ok HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0; 1024];
        let n = client.read(&mut buf).await.unwrap();
        assert!(buf[..n].ends_with(b"ok"));
        drop(client);

        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(&partial_upload("/upload")).await.unwrap();
        seen.wait_started(1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (ended, _) = end(client, ending).await;
        let first = tokio::time::timeout(QUIET, seen.wait_cancelled())
            .await
            .ok();
        println!(
            "axum, watched {watched}, {ending:?}: {:?}",
            first
                .as_ref()
                .map(|(what, when)| (what, when.saturating_duration_since(ended)))
        );
        assert_eq!(first.map(|(what, _)| what).as_deref(), expected);
        assert!(
            seen.cancellations().len() <= 1,
            "{:?}",
            seen.cancellations()
        );
    }
}

/// The limit of the kernel's notice: a client that closes while its upload is stalled by flow
/// control (the server's receive window full, nothing read) queues its FIN behind the bytes
/// still in its send buffer, so no FIN reaches the server until the server reads; a RST
/// (`SO_LINGER` 0, or a killed process with unread data) discards them and is seen at once.
#[tokio::test]
async fn a_fin_stuck_behind_a_full_receive_window_is_not_seen_a_rst_is() {
    for (ending, expected) in [
        (Ending::Fin, None),
        (Ending::Rst, Some("/hold disconnected handler")),
    ] {
        let (addr, seen) = serve(Mode::Watched, false).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        stream
            .try_write(b"POST /hold HTTP/1.1\r\nhost: test\r\ncontent-length: 1000000000\r\n\r\n")
            .unwrap();
        seen.wait_started(1).await;
        // Fill both buffers: the client's send buffer and the server's receive window.
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        loop {
            match stream.try_write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if tokio::time::timeout(Duration::from_millis(100), stream.writable())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        let (ended, _) = end(stream, ending).await;
        let first = tokio::time::timeout(QUIET, seen.wait_cancelled())
            .await
            .ok();
        println!(
            "{ending:?} after {sent} bytes stuck: {:?}",
            first
                .as_ref()
                .map(|(what, when)| (what, when.saturating_duration_since(ended)))
        );
        assert_eq!(
            first.map(|(what, _)| what).as_deref(),
            expected,
            "{ending:?}"
        );
    }
}

/// nginx in front (`proxy_request_buffering off`, so that the upload streams through): a
/// client that leaves mid-upload at nginx makes nginx close its upstream connection, and the
/// watch on the server sees that close while the handler has not read the body.
#[tokio::test]
async fn behind_nginx_a_client_that_leaves_mid_upload_is_seen() {
    let Some(bin) = nginx::nginx() else { return };
    for (mode, expected) in [
        (Mode::Unwatched, None),
        (Mode::Watched, Some("/hold disconnected handler")),
    ] {
        let (addr, seen) = serve(mode, false).await;
        let proxy =
            nginx::Nginx::start_at(bin, nginx::Front::Plain, nginx::PROXY_STREAMING, addr).await;
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        client.write_all(&partial_upload("/hold")).await.unwrap();
        seen.wait_started(1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (ended, _) = end(client, Ending::Fin).await;
        let first = tokio::time::timeout(QUIET, seen.wait_cancelled())
            .await
            .ok();
        println!(
            "nginx, {mode:?}: {:?}",
            first
                .as_ref()
                .map(|(what, when)| (what, when.saturating_duration_since(ended)))
        );
        assert_eq!(first.map(|(what, _)| what).as_deref(), expected, "{mode:?}");
    }
}
