//! Shared harness for the integration tests: a real hyper server on 127.0.0.1:0 (HTTP/1.1 and
//! HTTP/2 by prior knowledge), an event log, and a small app whose handlers record what
//! happens to them.
#![allow(dead_code, unreachable_pub, unused_macros)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tower::Service;
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type AppBody = BoxBody<Bytes, Infallible>;

/// Generous bound for "eventually": only reached when something is broken.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// An ordered log of what happened, shared by handlers, bodies and callbacks.
#[derive(Clone, Default)]
pub struct Log {
    entries: Arc<Mutex<Vec<String>>>,
    changed: Arc<Notify>,
    handles: Arc<Mutex<Vec<RequestCancellation>>>,
}

impl Log {
    pub fn push(&self, entry: impl Into<String>) {
        self.entries.lock().unwrap().push(entry.into());
        self.changed.notify_waiters();
    }

    /// Forgets the entries so far (the kept handles stay).
    pub fn clear(&self) {
        self.entries.lock().unwrap().clear();
    }

    pub fn entries(&self) -> Vec<String> {
        self.entries.lock().unwrap().clone()
    }

    /// Entries that start with `prefix`.
    pub fn with_prefix(&self, prefix: &str) -> Vec<String> {
        self.entries()
            .into_iter()
            .filter(|e| e.starts_with(prefix))
            .collect()
    }

    /// Waits until an entry equal to `entry` is logged.
    pub async fn wait_for(&self, entry: &str) {
        self.wait_until(|entries| entries.iter().any(|e| e == entry), entry)
            .await;
    }

    /// Waits until `count` entries start with `prefix`.
    pub async fn wait_for_count(&self, prefix: &str, count: usize) {
        self.wait_until(
            |entries| entries.iter().filter(|e| e.starts_with(prefix)).count() >= count,
            &format!("{count} × {prefix}"),
        )
        .await;
    }

    async fn wait_until(&self, done: impl Fn(&[String]) -> bool, what: &str) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if done(&self.entries.lock().unwrap()) {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(PATIENCE, wait).await.is_err() {
            panic!("timed out waiting for {what:?}; log: {:#?}", self.entries());
        }
    }

    /// Keeps a request's handle so the test can inspect its token afterwards.
    pub fn keep(&self, rc: RequestCancellation) {
        self.handles.lock().unwrap().push(rc);
    }

    pub fn handles(&self) -> Vec<RequestCancellation> {
        self.handles.lock().unwrap().clone()
    }

    /// A layer whose callback logs `"{name} {path} {reason} {phase}"`.
    pub fn layer(&self, name: &'static str) -> CancellationLayer {
        let log = self.clone();
        CancellationLayer::new().on_cancel(move |c: &Cancelled| log.push(describe(name, c)))
    }
}

pub fn describe(name: &str, c: &Cancelled) -> String {
    format!("{name} {} {} {}", c.uri().path(), c.reason(), c.phase())
}

/// Waits until `done()` holds, checking every 2 ms; panics after [`PATIENCE`].
pub async fn eventually(what: &str, done: impl Fn() -> bool) {
    let wait = async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// How a [`Server`] listens, beyond plain HTTP/1.1 and HTTP/2.
#[derive(Default)]
pub struct Listen {
    /// TLS (rustls): HTTP/1.x or HTTP/2 are told apart by the first bytes after the handshake
    /// as over plain text, so that a client without ALPN (nginx's `proxy_pass https://`) is
    /// served too.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// HTTP/1.1 upgrades (`serve_connection_with_upgrades`).
    pub upgrades: bool,
}

/// A server on 127.0.0.1:0 that serves HTTP/1.1 and HTTP/2 (prior knowledge) and counts its
/// open connections.
pub struct Server {
    pub addr: SocketAddr,
    open: Arc<AtomicUsize>,
    closed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start<S, B>(svc: S) -> Self
    where
        S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        Self::start_with(svc, Listen::default()).await
    }

    /// [`Server::start`] with options: TLS, HTTP/1.1 upgrades.
    pub async fn start_with<S, B>(svc: S, listen: Listen) -> Self
    where
        S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let Listen { tls, upgrades } = listen;
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(Notify::new());
        let (o, c) = (open.clone(), closed.clone());
        let task = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let svc = TowerToHyperService::new(svc.clone());
                let (open, closed) = (o.clone(), c.clone());
                let tls = tls.clone();
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    // Room for the tests that keep thousands of streams in flight.
                    builder.http2().max_concurrent_streams(20_000);
                    match tls {
                        None if upgrades => {
                            let io = TokioIo::new(stream);
                            let _ = builder.serve_connection_with_upgrades(io, svc).await;
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let io = TokioIo::new(stream);
                                let _ = builder.serve_connection(io, svc).await;
                            }
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                    closed.notify_waiters();
                });
            }
        });
        Self {
            addr,
            open,
            closed,
            task,
        }
    }

    /// The test app behind a `CancellationLayer` whose callback logs as `layer`.
    pub async fn app(log: &Log) -> Self {
        Self::start(
            tower::ServiceBuilder::new()
                .layer(log.layer("layer"))
                .service(app(log.clone())),
        )
        .await
    }

    /// [`Server::app`] over TLS.
    pub async fn app_tls(log: &Log, config: Arc<rustls::ServerConfig>) -> Self {
        let listen = Listen {
            tls: Some(config),
            ..Listen::default()
        };
        Self::start_with(
            tower::ServiceBuilder::new()
                .layer(log.layer("layer"))
                .service(app(log.clone())),
            listen,
        )
        .await
    }

    /// Waits until every accepted connection has been fully served and dropped: after this,
    /// everything a request could trigger has happened.
    pub async fn idle(&self) {
        let wait = async {
            loop {
                let closed = self.closed.notified();
                if self.open.load(Ordering::SeqCst) == 0 {
                    return;
                }
                closed.await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .expect("server connections did not close");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Logs `message` when dropped unless disarmed: tells a dropped handler from a finished one.
struct DropLog {
    log: Log,
    message: Option<String>,
}

impl Drop for DropLog {
    fn drop(&mut self) {
        if let Some(message) = self.message.take() {
            self.log.push(message);
        }
    }
}

/// The test app. Every request logs `start {path}`, registers a handler callback that logs
/// `handler {path} {reason} {phase}`, and logs `dropped {path}` if its future is dropped.
/// `/honour` waits 30 s unless cancelled, then logs `stopped {path} {reason}` and answers 503.
pub fn app(
    log: Log,
) -> impl Service<Request<Incoming>, Response = Response<AppBody>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<Incoming>| {
        let log = log.clone();
        async move { Ok(route(req, log).await) }
    })
}

/// [`app`] for any request body (the app never reads it): the same routes behind another
/// server, such as `tower_cancel::http3::serve`.
pub fn app_any<B: Send + 'static>(
    log: Log,
) -> impl Service<Request<B>, Response = Response<AppBody>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<B>| {
        let log = log.clone();
        async move { Ok(route(req, log).await) }
    })
}

fn full(text: &'static str) -> AppBody {
    http_body_util::Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed()
}

async fn route<B>(req: Request<B>, log: Log) -> Response<AppBody> {
    let rc = req
        .extensions()
        .get::<RequestCancellation>()
        .expect("CancellationLayer is installed")
        .clone();
    let path = req.uri().path().to_owned();
    log.keep(rc.clone());
    {
        let log = log.clone();
        rc.on_cancel(move |c| log.push(describe("handler", c)));
    }
    let mut dropped = DropLog {
        log: log.clone(),
        message: Some(format!("dropped {path}")),
    };
    log.push(format!("start {path}"));
    let response = match path.as_str() {
        "/slow" | "/upload" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Response::new(full("slow"))
        }
        "/honour" => {
            // A 30 s handler that honours its token: it answers 503 as soon as it is cancelled.
            tokio::select! {
                reason = rc.cancelled() => {
                    log.push(format!("stopped {path} {reason}"));
                    let mut res = Response::new(full("stopped"));
                    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    res
                }
                () = tokio::time::sleep(Duration::from_secs(30)) => Response::new(full("slow")),
            }
        }
        "/full" => Response::new(full("hello")),
        "/empty" => Response::new(http_body_util::Empty::new().boxed()),
        "/stream" => Response::new(Chunks::new(&log, &path, Some(3)).boxed()),
        "/endless" => Response::new(Chunks::new(&log, &path, None).boxed()),
        "/stream-with-length" => {
            let mut res = Response::new(Chunks::new(&log, &path, Some(3)).boxed());
            res.headers_mut()
                .insert(header::CONTENT_LENGTH, (3 * CHUNK.len()).into());
            res
        }
        "/no-content" => {
            let mut res = Response::new(Chunks::new(&log, &path, None).boxed());
            *res.status_mut() = StatusCode::NO_CONTENT;
            res
        }
        "/panic" => panic!("the handler of /panic panics"),
        "/panic-body" => Response::new(PanicBody { yielded: false }.boxed()),
        "/cancel-self" => {
            rc.cancel();
            Response::new(full("cancelled myself"))
        }
        // Its own code cancels its token directly (as code that only knows the token does),
        // then answers at once: the request completes, the token cancelled.
        "/cancel-token" => {
            rc.token().cancel();
            Response::new(full("cancelled my token"))
        }
        // The same, then waits: the layer finds the handler pending and records `Explicit`.
        "/cancel-token-then-wait" => {
            rc.token().cancel();
            tokio::time::sleep(Duration::from_millis(20)).await;
            Response::new(full("cancelled my token"))
        }
        _ => {
            let mut res = Response::new(full("not found"));
            *res.status_mut() = StatusCode::NOT_FOUND;
            res
        }
    };
    dropped.message = None;
    response
}

pub const CHUNK: &[u8] = b"chunk-of-data\n";

/// A response body that yields one chunk, then panics.
struct PanicBody {
    yielded: bool,
}

impl Body for PanicBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if !std::mem::replace(&mut self.yielded, true) {
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(CHUNK)))));
        }
        panic!("the body of /panic-body panics");
    }
}

/// A streamed body: `count` chunks (or endless), 5 ms apart, unknown length; logs
/// `body-dropped {path}` if dropped before its end.
pub struct Chunks {
    remaining: Option<usize>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    dropped: DropLog,
}

impl Chunks {
    fn new(log: &Log, path: &str, count: Option<usize>) -> Self {
        Self {
            remaining: count,
            sleep: Box::pin(tokio::time::sleep(Duration::from_millis(5))),
            dropped: DropLog {
                log: log.clone(),
                message: Some(format!("body-dropped {path}")),
            },
        }
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == Some(0) {
            self.dropped.message = None;
            return Poll::Ready(None);
        }
        std::task::ready!(self.sleep.as_mut().poll(cx));
        let next = tokio::time::Instant::now() + Duration::from_millis(5);
        self.sleep.as_mut().reset(next);
        if let Some(n) = self.remaining.as_mut() {
            *n -= 1;
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(CHUNK)))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Sends a raw HTTP/1.1 request and returns the open stream.
pub async fn raw_request(server: &Server, request: &str) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

pub fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n")
}

/// Reads until `needle` has arrived `count` times; returns everything read so far.
pub async fn read_until_count(stream: &mut TcpStream, needle: &[u8], count: usize) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(needle.len()).filter(|w| *w == needle).count() < count {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("timed out; got {:?}", String::from_utf8_lossy(&seen)))
            .unwrap();
        assert!(
            n > 0,
            "server closed early: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Reads until `needle` has arrived; returns everything read so far.
pub async fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    read_until_count(stream, needle.as_bytes(), 1).await
}

/// Reads until the server closes the connection.
pub async fn read_to_close(stream: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut buf))
        .await
        .expect("server did not close")
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

pub type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>;

/// HTTP/2 client over prior knowledge, with a clone of its socket so that a test can close
/// the TCP connection under it (hyper runs the h2 connection in a task of its own).
pub async fn h2_client(
    server: &Server,
) -> (H2Sender, tokio::task::JoinHandle<()>, std::net::TcpStream) {
    h2_client_to(server.addr).await
}

/// [`h2_client`] to any address (a proxy in front of the server, for instance).
pub async fn h2_client_to(
    addr: SocketAddr,
) -> (H2Sender, tokio::task::JoinHandle<()>, std::net::TcpStream) {
    let stream = TcpStream::connect(addr).await.unwrap();
    // As real gRPC clients do: without it, a lone RST_STREAM waits ~40 ms for a delayed ACK.
    stream.set_nodelay(true).unwrap();
    let socket = stream.into_std().unwrap();
    let kill = socket.try_clone().unwrap();
    let stream = TcpStream::from_std(socket).unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task, kill)
}

pub fn h2_get(server: &Server, path: &str) -> Request<http_body_util::Empty<Bytes>> {
    Request::get(server.url(path))
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// Asserts that the request behind each kept handle completed: token never cancelled.
pub fn assert_all_completed(log: &Log) {
    let handles = log.handles();
    assert!(!handles.is_empty(), "no request reached the handler");
    for rc in handles {
        assert!(
            !rc.token().is_cancelled(),
            "token of a completed request was cancelled"
        );
        assert_eq!(rc.reason(), None);
    }
}

/// Deterministic, non-repeating test bytes.
pub fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Runs each named `async fn` test as two tests, on the current-thread runtime and on a
/// two-worker multi-thread one (where connection, request and layer tasks run on different
/// workers). Needs `#[macro_use] mod common;`.
macro_rules! both_flavours {
    ($($name:ident),* $(,)?) => {
        mod current_thread {
            $(#[tokio::test]
            async fn $name() {
                super::$name().await;
            })*
        }
        mod multi_thread {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name().await;
            })*
        }
    };
}

/// A request body fed by the test, frame by frame (`tokio::sync::mpsc`); it ends when the sender
/// is dropped.
pub struct Streamed(pub tokio::sync::mpsc::UnboundedReceiver<Bytes>);

impl Body for Streamed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|data| data.map(|data| Ok(Frame::data(data))))
    }
}
