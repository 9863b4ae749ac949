//! One axum `Router` served over HTTPS (HTTP/2 and HTTP/1.1 on TCP) and over HTTP/3 (QUIC, on
//! the UDP port of the same number) with `tower_cancel::http3::serve`: an HTTP/3 client that
//! gives up reaches the same `CancellationLayer` as a TCP one, and the graceful shutdown
//! stops the requests in flight through the layer's shutdown token.
//!
//! Run with: cargo run --example http3
//!
//! By default it runs its own clients and prints a timeline (milliseconds since start): an
//! HTTPS request that learns the `alt-svc: h3` header, an HTTP/3 request that completes, one
//! to `/slow` given up after 200 ms (cancelled: disconnected, phase handler), one to `/stream`
//! dropped after three ticks (phase body), then a graceful shutdown with a `/slow` in flight
//! (cancelled: shutdown; the handler answers at once). It exits non-zero if a server event
//! it waits for does not come. Add `--serve` to serve on 127.0.0.1:4433 (or `PORT`) until
//! Ctrl-C instead, then, from another terminal (a curl built with HTTP/3):
//!
//! ```text
//! curl -k --http3-only https://127.0.0.1:4433/                    # completes: nothing cancelled
//! curl -k --http3-only --max-time 1 https://127.0.0.1:4433/slow   # disconnected, phase handler
//! curl -k --http3-only -N --max-time 1 https://127.0.0.1:4433/stream  # disconnected, phase body
//! curl -k -i https://127.0.0.1:4433/                              # over TCP, with its alt-svc
//! ```
//!
//! Chromium takes HTTP/3 from a self-signed certificate only when told its key's hash (the
//! certificate is written to the file printed at start-up):
//!
//! ```text
//! SPKI=$(openssl x509 -in /tmp/tower-cancel-http3.pem -pubkey -noout |
//!   openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64)
//! chromium --user-data-dir=/tmp/h3-profile --origin-to-force-quic-on=127.0.0.1:4433 \
//!   --ignore-certificate-errors-spki-list=$SPKI https://127.0.0.1:4433/stream
//! ```

#[path = "https/tls.rs"]
mod tls;

use std::convert::Infallible;
use std::error::Error;
use std::future::IntoFuture;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use bytes::{Buf, Bytes};
use http::header::{ALT_SVC, HeaderValue};
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};

type BoxError = Box<dyn Error + Send + Sync>;
type H3Send = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;
type H3Stream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

static START: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Prints one line of the timeline.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{:>5} ms  {}", START.elapsed().as_millis(), format_args!($($arg)*))
    };
}

/// The server's side of the timeline: printed, and passed on to the clients that wait for it.
#[derive(Clone)]
struct Events(mpsc::UnboundedSender<String>);

impl Events {
    fn say(&self, event: String) {
        say!("server: {event}");
        let _ = self.0.send(event); // nobody listens with `--serve`
    }
}

async fn root(version: Version) -> String {
    format!("hello over {version:?}\n")
}

/// Ten seconds of work that stops early when its request is cancelled.
async fn slow(State(events): State<Events>, rc: RequestCancellation) -> (StatusCode, String) {
    events.say("/slow started".into());
    match rc.run(tokio::time::sleep(Duration::from_secs(10))).await {
        Ok(()) => (StatusCode::OK, "done\n".into()),
        Err(cancelled) => {
            events.say(format!("/slow stopped early: {}", cancelled.reason()));
            (StatusCode::SERVICE_UNAVAILABLE, format!("{cancelled}\n"))
        }
    }
}

/// An endless body, a tick every 100 ms.
async fn stream(State(events): State<Events>) -> Body {
    events.say("/stream started".into());
    let ticks = futures_util::stream::unfold(0u32, |n| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, Infallible>(format!("tick {n}\n")), n + 1))
    });
    Body::from_stream(ticks)
}

fn app(events: Events, h3_port: u16, shutdown: CancellationToken) -> Router {
    let alt_svc = HeaderValue::try_from(format!("h3=\":{h3_port}\"; ma=3600")).unwrap();
    let layer = CancellationLayer::new()
        .shutdown_token(shutdown)
        .on_cancel({
            let events = events.clone();
            move |c: &Cancelled| {
                let (method, path) = (c.method(), c.uri().path());
                events.say(format!(
                    "{method} {path} cancelled: {}, phase {}",
                    c.reason(),
                    c.phase()
                ));
            }
        });
    Router::new()
        .route("/", get(root))
        .route("/slow", get(slow))
        .route("/stream", get(stream))
        .with_state(events)
        .layer(axum::middleware::map_response(move |mut res: Response| {
            res.headers_mut().insert(ALT_SVC, alt_svc.clone());
            std::future::ready(res)
        }))
        .layer(layer)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    LazyLock::force(&START);
    let serve_only = std::env::args().any(|arg| arg == "--serve");

    // One self-signed certificate for both: ALPN h2 and http/1.1 on TCP, h3 on QUIC (which
    // needs TLS 1.3; the config offers it).
    let (tcp_tls, pem) = tls::server_config(None)?;
    let pem = pem.expect("a self-signed certificate");
    let mut quic_tls = (*tcp_tls).clone();
    quic_tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(quic_tls)?;
    let quic = quinn::ServerConfig::with_crypto(Arc::new(quic));

    let port = match std::env::var("PORT") {
        Ok(port) if serve_only => port.parse()?,
        _ if serve_only => 4433,
        _ => 0,
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let port = listener.local_addr()?.port();
    let endpoint = match quinn::Endpoint::server(quic.clone(), ([127, 0, 0, 1], port).into()) {
        Ok(endpoint) => endpoint,
        Err(_) if !serve_only => quinn::Endpoint::server(quic, ([127, 0, 0, 1], 0).into())?,
        Err(error) => return Err(error.into()),
    };
    let h3_addr = endpoint.local_addr()?;
    say!("listening on https://127.0.0.1:{port} (TCP) and UDP {h3_addr} (HTTP/3)");

    let shutdown = CancellationToken::new();
    let (events, mut heard) = mpsc::unbounded_channel();
    let app = app(Events(events), h3_addr.port(), shutdown.clone());
    let tcp = tokio::spawn(tls::serve(listener, tcp_tls, app.clone()));
    let h3 = tower_cancel::http3::serve(endpoint, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .drain(Duration::from_secs(5));
    let h3 = tokio::spawn(h3.into_future());

    if serve_only {
        let file = std::env::temp_dir().join("tower-cancel-http3.pem");
        std::fs::write(&file, &pem)?;
        say!("certificate in {}; Ctrl-C to stop", file.display());
        tokio::signal::ctrl_c().await?;
        say!("shutting down");
        shutdown.cancel();
    } else {
        let clients = clients(&pem, port, h3_addr, &mut heard, &shutdown);
        let done = tokio::time::timeout(Duration::from_secs(30), clients).await;
        done.map_err(|_| "the clients took more than 30 s")??;
    }
    // The server's own error (an endpoint that stopped without the shutdown), if any.
    h3.await??;
    say!("HTTP/3 server drained and closed");
    // `tls::serve` has no drain of its own; the token has already stopped its requests early.
    tcp.abort();
    Ok(())
}

/// Waits (at most 5 s) until the server has said each of `wanted`, in any order; anything
/// else it says is an error.
async fn expect(
    heard: &mut mpsc::UnboundedReceiver<String>,
    wanted: &[&str],
) -> Result<(), BoxError> {
    let mut missing: Vec<&str> = wanted.to_vec();
    while !missing.is_empty() {
        let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(5), heard.recv()).await
        else {
            return Err(format!("the server never said {missing:?}").into());
        };
        let Some(at) = missing.iter().position(|w| *w == event) else {
            return Err(
                format!("unexpected server event {event:?} (waiting for {missing:?})").into(),
            );
        };
        missing.remove(at);
    }
    Ok(())
}

/// Sends `GET path` on its own request stream.
async fn h3_get(send: &mut H3Send, path: &str) -> Result<H3Stream, BoxError> {
    let req = Request::get(format!("https://localhost{path}")).body(())?;
    let mut stream = send.send_request(req).await?;
    stream.finish().await?;
    say!("client: HTTP/3 GET {path} sent");
    Ok(stream)
}

/// Reads a response body to its end.
async fn read_body(stream: &mut H3Stream) -> Result<String, BoxError> {
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await? {
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    Ok(String::from_utf8(body)?)
}

fn client_tls(pem: &str, alpn: &[u8]) -> Result<rustls::ClientConfig, BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(pem.as_bytes())?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// The client side: every request, then the shutdown.
async fn clients(
    pem: &str,
    tcp_port: u16,
    h3_addr: std::net::SocketAddr,
    heard: &mut mpsc::UnboundedReceiver<String>,
    shutdown: &CancellationToken,
) -> Result<(), BoxError> {
    // HTTPS over TCP (HTTP/2), where a client learns that HTTP/3 is on offer.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(pem, b"h2")?));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port)).await?;
    let tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = Request::get(format!("https://localhost:{tcp_port}/")).body(Empty::<Bytes>::new())?;
    let res = h2.send_request(req).await?;
    let (status, alt_svc) = (res.status(), res.headers().get(ALT_SVC).cloned());
    let body = String::from_utf8(res.into_body().collect().await?.to_bytes().to_vec())?;
    say!("client: HTTPS GET / -> {status} {body:?}, alt-svc: {alt_svc:?}");

    // HTTP/3: the h3 crate's client over quinn.
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(pem, b"h3")?)?;
    let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint.connect(h3_addr, "localhost")?.await?;
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });

    let mut stream = h3_get(&mut send, "/").await?;
    let res = stream.recv_response().await?;
    let body = read_body(&mut stream).await?;
    say!("client: HTTP/3 GET / -> {} {body:?}", res.status());

    // Dropping the stream is what a Rust client does when it gives up: quinn sends
    // STOP_SENDING. (h3-quinn panics on `stop_sending` while a read is pending.)
    let mut stream = h3_get(&mut send, "/slow").await?;
    let gave_up = tokio::time::timeout(Duration::from_millis(200), stream.recv_response()).await;
    if gave_up.is_ok() {
        return Err("/slow answered within 200 ms".into());
    }
    say!("client: gives up on /slow: drops the stream");
    drop(stream);
    expect(
        heard,
        &[
            "/slow started",
            "GET /slow cancelled: disconnected, phase handler",
        ],
    )
    .await?;

    let mut stream = h3_get(&mut send, "/stream").await?;
    stream.recv_response().await?;
    for _ in 0..3 {
        let mut tick = stream.recv_data().await?.ok_or("the stream ended")?;
        let tick = tick.copy_to_bytes(tick.remaining());
        say!("client: /stream {:?}", String::from_utf8_lossy(&tick));
    }
    say!("client: has read enough of /stream: drops it");
    drop(stream);
    expect(
        heard,
        &[
            "/stream started",
            "GET /stream cancelled: disconnected, phase body",
        ],
    )
    .await?;

    // The graceful shutdown with a request in flight: the layer cancels it with `Shutdown`,
    // its handler stops early and answers, then `serve` drains and returns.
    let mut stream = h3_get(&mut send, "/slow").await?;
    expect(heard, &["/slow started"]).await?;
    say!("client side: cancels the shutdown token");
    shutdown.cancel();
    let res = stream.recv_response().await?;
    let body = read_body(&mut stream).await?;
    say!("client: HTTP/3 GET /slow -> {} {body:?}", res.status());
    let shut = [
        "GET /slow cancelled: shutdown, phase handler",
        "/slow stopped early: shutdown",
    ];
    expect(heard, &shut).await
}
