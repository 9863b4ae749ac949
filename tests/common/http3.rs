//! HTTP/3 harness: `tower_cancel::http3::serve` on a quinn endpoint at 127.0.0.1:0 with a
//! self-signed certificate, and the `h3` crate's own client (over h3-quinn) trusting it.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceBuilder};
use tower_cancel::http3::IncomingBody;

use crate::common::{BoxError, CHUNK, Log, app_any, eventually};

/// A running HTTP/3 server.
pub struct H3Server {
    pub addr: SocketAddr,
    pub cert: CertificateDer<'static>,
    pub cert_pem: String,
    /// Cancelling it starts the graceful shutdown (`with_graceful_shutdown`).
    pub shutdown: CancellationToken,
    /// The server's endpoint (a clone).
    pub endpoint: quinn::Endpoint,
    pub task: JoinHandle<std::io::Result<()>>,
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, and a TLS 1.3 config offering
/// ALPN `h3`.
pub fn tls() -> (rustls::ServerConfig, CertificateDer<'static>, String) {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"h3".to_vec()];
    (config, cert, certified.cert.pem())
}

impl H3Server {
    /// Serves `svc`; `shutdown` is also the token the test gives the layer. A graceful
    /// shutdown drains for at most `drain`.
    pub async fn start<S, B>(svc: S, shutdown: CancellationToken, drain: Duration) -> Self
    where
        S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let transport = quinn::TransportConfig::default();
        Self::start_with(svc, shutdown, drain, transport, None).await
    }

    /// [`H3Server::start`] with the endpoint's QUIC transport settings (idle timeout,
    /// keep-alive), and a 1000-byte header limit and `max_requests` per connection (`None`:
    /// the default).
    pub async fn start_with<S, B>(
        svc: S,
        shutdown: CancellationToken,
        drain: Duration,
        transport: quinn::TransportConfig,
        max_requests: Option<usize>,
    ) -> Self
    where
        S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        Self::start_tuned(svc, shutdown, transport, |serve| {
            let serve = serve.drain(drain).max_field_section_size(16 * 1024);
            match max_requests {
                Some(max) => serve.max_requests_per_connection(Some(max)),
                None => serve,
            }
        })
        .await
    }

    /// Serves `svc` with the endpoint's QUIC transport settings and what `tune` sets on
    /// [`Serve`](tower_cancel::http3::Serve) (graceful shutdown on `shutdown` already set).
    pub async fn start_tuned<S, B>(
        svc: S,
        shutdown: CancellationToken,
        transport: quinn::TransportConfig,
        tune: impl FnOnce(tower_cancel::http3::Serve<S>) -> tower_cancel::http3::Serve<S>,
    ) -> Self
    where
        S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let (config, cert, cert_pem) = tls();
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(config).unwrap();
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let serve = tower_cancel::http3::serve(endpoint.clone(), svc)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let task = tokio::spawn(tune(serve).into_future());
        H3Server {
            addr,
            cert,
            cert_pem,
            shutdown,
            endpoint,
            task,
        }
    }
}

pub type H3Send = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;
pub type H3Stream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// A QUIC client endpoint offering ALPN `h3` and trusting `cert`.
pub fn client_endpoint(cert: &CertificateDer<'static>) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    endpoint
}

/// One client connection: the `h3` crate's client over quinn.
pub struct H3Client {
    pub send: H3Send,
    pub conn: quinn::Connection,
    pub endpoint: quinn::Endpoint,
    pub driver: JoinHandle<h3::error::ConnectionError>,
}

impl H3Client {
    pub async fn connect(server: &H3Server) -> Self {
        Self::connect_to(server, server.addr).await
    }

    /// Connects to `addr` (a relay in front of `server`, say), trusting `server`'s certificate.
    pub async fn connect_to(server: &H3Server, addr: SocketAddr) -> Self {
        let endpoint = client_endpoint(&server.cert);
        let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
            .await
            .unwrap();
        let driver =
            tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
        H3Client {
            send,
            conn,
            endpoint,
            driver,
        }
    }

    /// Sends `method path` with `body` (none if empty) and ends the request.
    pub async fn request(&mut self, method: &str, path: &str, body: &[u8]) -> H3Stream {
        let mut stream = self.open(method, path).await;
        if !body.is_empty() {
            stream
                .send_data(Bytes::copy_from_slice(body))
                .await
                .unwrap();
        }
        stream.finish().await.unwrap();
        stream
    }

    /// Sends the head of `method path` and leaves the request body open.
    pub async fn open(&mut self, method: &str, path: &str) -> H3Stream {
        let req = Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"))
            .body(())
            .unwrap();
        self.send.send_request(req).await.unwrap()
    }

    pub async fn get(&mut self, path: &str) -> H3Stream {
        self.request("GET", path, b"").await
    }
}

/// How a response ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// The server finished the stream: the response is complete.
    Finished,
    /// The server reset the stream, with this code.
    Reset(u64),
    /// Something else went wrong.
    Failed(String),
}

/// Reads the response body to its end: the bytes, and how it ended. Panics after
/// [`PATIENCE`](crate::common::PATIENCE).
pub async fn read_body(stream: &mut H3Stream) -> (Vec<u8>, Ending) {
    tokio::time::timeout(crate::common::PATIENCE, read_to_end(stream))
        .await
        .expect("the response body did not end")
}

async fn read_to_end(stream: &mut H3Stream) -> (Vec<u8>, Ending) {
    let mut body = Vec::new();
    loop {
        match stream.recv_data().await {
            Ok(Some(mut data)) => {
                let chunk = data.copy_to_bytes(data.remaining());
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return (body, Ending::Finished),
            Err(error) => return (body, ending(&error)),
        }
    }
}

/// The reset code in an h3 stream error, if the peer reset the stream.
pub fn ending(error: &h3::error::StreamError) -> Ending {
    match error {
        h3::error::StreamError::RemoteTerminate { code, .. } => Ending::Reset(code.value()),
        other => Ending::Failed(format!("{other:?}")),
    }
}

/// Reads body chunks until at least `bytes` arrived.
pub async fn read_at_least(stream: &mut H3Stream, bytes: usize) -> usize {
    let mut got = 0;
    while got < bytes {
        let mut data = stream
            .recv_data()
            .await
            .unwrap()
            .expect("the body ended too early");
        got += data.remaining();
        data.advance(data.remaining());
    }
    got
}

pub const H3_REQUEST_CANCELLED: u64 = 0x10c;
pub const H3_REQUEST_REJECTED: u64 = 0x10b;
pub const H3_INTERNAL_ERROR: u64 = 0x102;

pub type H3Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// The test app behind a layer logging as `layer` (with `shutdown` as its shutdown token), plus
/// `/broken` (two chunks, then an error) and `/read` (reads the request body, answers its size,
/// or 400 and `read-error /read` if reading failed).
pub fn stack(
    log: &Log,
    shutdown: &CancellationToken,
    in_flight: &InFlight,
) -> impl Service<
    Request<IncomingBody>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = BoxError> + Send + 'static>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    let app = app_any::<IncomingBody>(log.clone());
    let routes_log = log.clone();
    let routes = tower::service_fn(move |req: Request<IncomingBody>| {
        let mut app = app.clone();
        let log = routes_log.clone();
        async move {
            match req.uri().path() {
                "/broken" => {
                    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                        Ok(Frame::data(Bytes::from_static(CHUNK))),
                        Ok(Frame::data(Bytes::from_static(CHUNK))),
                        Err("the source failed".into()),
                    ];
                    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
                    Ok(Response::new(body.boxed()))
                }
                "/trailers" => {
                    // Data, trailers, then a stream that never ends: the trailers end it.
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                        Ok(Frame::data(Bytes::from_static(CHUNK))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    let stream = futures_util::StreamExt::chain(
                        futures_util::stream::iter(frames),
                        futures_util::stream::pending(),
                    );
                    let body = http_body_util::StreamBody::new(stream);
                    Ok(Response::new(body.boxed()))
                }
                "/read-elsewhere" => {
                    // The body is read by a task of its own, which outlives a dropped handler.
                    log.push("start /read-elsewhere");
                    let reader_log = log.clone();
                    let reader = tokio::spawn(async move {
                        let outcome = match req.into_body().collect().await {
                            Ok(body) => format!("read {}", body.to_bytes().len()),
                            Err(error) => format!("read-error {error}"),
                        };
                        reader_log.push(format!("spawned reader /read-elsewhere: {outcome}"));
                    });
                    let _ = reader.await;
                    Ok(Response::new(full_body("read elsewhere".into())))
                }
                "/read" => {
                    log.push("start /read");
                    let response = match req.into_body().collect().await {
                        Ok(body) => {
                            let text = format!("read {}", body.to_bytes().len());
                            Response::new(full_body(text))
                        }
                        Err(error) => {
                            log.push(format!("read-error /read {error}"));
                            let mut response = Response::new(full_body("bad body".into()));
                            *response.status_mut() = StatusCode::BAD_REQUEST;
                            response
                        }
                    };
                    Ok(response)
                }
                _ => {
                    let response = app.call(req).await?;
                    Ok(response.map(|body| body.map_err(|never| match never {}).boxed()))
                }
            }
        }
    });
    let layered = ServiceBuilder::new()
        .layer(log.layer("layer").shutdown_token(shutdown.clone()))
        .service(routes);
    in_flight.track(layered)
}

pub fn full_body(text: String) -> H3Body {
    http_body_util::Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}

pub async fn start(drain: Duration) -> (Log, H3Server, InFlight) {
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let in_flight = InFlight::default();
    let server = H3Server::start(stack(&log, &shutdown, &in_flight), shutdown, drain).await;
    (log, server, in_flight)
}

/// The layer's and the handler's records (everything a cancellation logs).
pub fn cancellations(log: &Log) -> Vec<String> {
    log.entries()
        .into_iter()
        .filter(|e| e.starts_with("layer ") || e.starts_with("handler "))
        .collect()
}

/// Counts the requests whose response future or body is still alive, outside the layer: once it
/// is zero, everything a request could trigger has happened.
#[derive(Clone, Default)]
pub struct InFlight(std::sync::Arc<std::sync::atomic::AtomicUsize>);

pub struct Counted(InFlight);

impl Drop for Counted {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A response body that holds its request's count; the count is dropped after the body.
pub struct CountedBody<B> {
    body: std::pin::Pin<Box<B>>,
    _counted: Counted,
}

impl<B: http_body::Body> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl InFlight {
    pub fn track<S, B>(
        &self,
        inner: S,
    ) -> impl Service<
        Request<IncomingBody>,
        Response = Response<CountedBody<B>>,
        Error = S::Error,
        Future: Send,
    > + Clone
    + Send
    + 'static
    where
        S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send,
        B: Send,
    {
        let in_flight = self.clone();
        tower::service_fn(move |req: Request<IncomingBody>| {
            in_flight
                .0
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let counted = Counted(in_flight.clone());
            let call = inner.clone().call(req);
            async move {
                let response = call.await?;
                Ok(response.map(|body| CountedBody {
                    body: Box::pin(body),
                    _counted: counted,
                }))
            }
        })
    }

    pub async fn wait_for_none(&self) {
        eventually("no request in flight", || {
            self.0.load(std::sync::atomic::Ordering::SeqCst) == 0
        })
        .await;
    }
}

/// A QUIC connection speaking HTTP/3 by hand (ALPN `h3`, request streams only), for what the h3
/// client will not send: a stream that ends inside a DATA frame, headers over the server's
/// limit, a request after `GOAWAY`.
pub struct RawClient {
    pub conn: quinn::Connection,
    pub endpoint: quinn::Endpoint,
}

impl RawClient {
    pub async fn connect(server: &H3Server) -> Self {
        Self::connect_to(&server.cert, server.addr).await
    }

    /// Connects to the server at `addr` whose certificate is `cert`. No control stream is
    /// opened: the server needs none to serve requests.
    pub async fn connect_to(cert: &CertificateDer<'static>, addr: SocketAddr) -> Self {
        let endpoint = client_endpoint(cert);
        let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        RawClient { conn, endpoint }
    }

    /// Opens a request stream and writes `bytes` on it; `finish` ends it.
    pub async fn send(&self, bytes: &[u8], finish: bool) -> (quinn::SendStream, quinn::RecvStream) {
        let (mut send, recv) = self.conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        if finish {
            send.finish().unwrap();
        }
        (send, recv)
    }
}

/// A QUIC variable-length integer.
pub fn varint(value: u64, out: &mut Vec<u8>) {
    match value {
        0..=0x3f => out.push(value as u8),
        0x40..=0x3fff => out.extend_from_slice(&(0x4000 | value as u16).to_be_bytes()),
        _ => out.extend_from_slice(&(0x8000_0000 | value as u32).to_be_bytes()),
    }
}

/// A QPACK prefixed integer: `first` holds the pattern bits, `bits` the prefix length.
fn prefixed(value: usize, first: u8, bits: u32, out: &mut Vec<u8>) {
    let max = (1usize << bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest as u8 & 0x7f) | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// A HEADERS frame for `method path` at `localhost`, plus `extra` headers, encoded with QPACK's
/// static table and literals only.
pub fn headers_frame(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = vec![0, 0];
    let method_index = match method {
        "GET" => 17,
        "POST" => 20,
        other => panic!("no static entry for {other}"),
    };
    block.push(0xc0 | method_index); // indexed, static
    block.push(0xc0 | 23); // :scheme https
    block.push(0x50); // :authority, literal value
    prefixed(9, 0, 7, &mut block);
    block.extend_from_slice(b"localhost");
    block.push(0x51); // :path, literal value
    prefixed(path.len(), 0, 7, &mut block);
    block.extend_from_slice(path.as_bytes());
    for (name, value) in extra {
        prefixed(name.len(), 0x20, 3, &mut block); // literal name and value
        block.extend_from_slice(name.as_bytes());
        prefixed(value.len(), 0, 7, &mut block);
        block.extend_from_slice(value.as_bytes());
    }
    let mut frame = Vec::new();
    varint(0x01, &mut frame);
    varint(block.len() as u64, &mut frame);
    frame.extend_from_slice(&block);
    frame
}

/// The header of a DATA frame of `len` bytes.
pub fn data_frame_header(len: u64) -> Vec<u8> {
    let mut frame = Vec::new();
    varint(0x00, &mut frame);
    varint(len, &mut frame);
    frame
}

/// Reads a response stream to its end: its bytes (frames undecoded), and how it ended.
pub async fn read_raw(recv: &mut quinn::RecvStream) -> (Vec<u8>, Ending) {
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(crate::common::PATIENCE, async {
        loop {
            match recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk.bytes),
                Ok(None) => return Ending::Finished,
                Err(quinn::ReadError::Reset(code)) => return Ending::Reset(code.into_inner()),
                Err(other) => return Ending::Failed(other.to_string()),
            }
        }
    });
    let ending = read.await.expect("the response stream did not end");
    (bytes, ending)
}
