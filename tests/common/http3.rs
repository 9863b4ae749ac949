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
    pub task: JoinHandle<()>,
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
        Self::start_with(svc, shutdown, drain, quinn::TransportConfig::default()).await
    }

    /// [`H3Server::start`] with the endpoint's QUIC transport settings (idle timeout,
    /// keep-alive).
    pub async fn start_with<S, B>(
        svc: S,
        shutdown: CancellationToken,
        drain: Duration,
        transport: quinn::TransportConfig,
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
        let serve = tower_cancel::http3::serve(endpoint, svc)
            .with_graceful_shutdown(shutdown.clone())
            .drain(drain);
        let task = tokio::spawn(serve.into_future());
        H3Server {
            addr,
            cert,
            cert_pem,
            shutdown,
            task,
        }
    }
}

pub type H3Send = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;
pub type H3Stream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

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
        let mut roots = rustls::RootCertStore::empty();
        roots.add(server.cert.clone()).unwrap();
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
