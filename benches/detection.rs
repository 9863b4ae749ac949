//! How long after a client leaves does the layer's `on_cancel` callback run?
//!
//! Runs a real hyper server (hyper-util `auto::Builder`, HTTP/1.1 and HTTP/2), the same app
//! over TLS (the `https` example's server: rustls with ring, HTTP/2 or HTTP/1.1 as ALPN
//! chose) and a tonic server on 127.0.0.1, all behind `CancellationLayer`, and for each way a
//! client can leave (close, reset, half-close, `RST_STREAM`, connection close, a dropped gRPC
//! call, in the handler or mid-body, with and without `RequestBodyLayer`, in cleartext and
//! over TLS) measures, per request:
//!
//! - client action → callback: from `Instant::now()` taken just before the client's close,
//!   reset or drop, to `Instant::now()` inside the layer's `on_cancel` callback: the whole
//!   detection latency over loopback;
//! - hyper drop → callback: from the `Drop` of a guard owned by the handler future (or the
//!   response body) to the callback: what the layer adds after hyper's drop. "—" where hyper
//!   drops nothing and the layer itself cancels (`h1_mid_upload_reading`: a failed body read
//!   in `RequestBodyLayer`, the handler still running). With read-ahead
//!   (`h1_upload_unread_read_ahead`) hyper does drop the handler: the read-ahead drained the
//!   body, so hyper reads the socket again and sees the close. With `tcp::PeerWatch`
//!   (`h1_upload_unread_peer_watch`, and `_rst` for a reset) nothing is read: 64 KiB of the
//!   upload is sent, and the kernel's notice of the FIN (or RST) makes the watch drop the
//!   handler.
//!
//! The `tls_` scenarios are their cleartext namesakes over TLS: the client (tokio-rustls,
//! trusting the server's self-signed certificate, ALPN `http/1.1` or `h2`, checked) does the
//! handshake and sends the request before the clock starts, so that the latency is the
//! detection alone. `tls_h1_fin` and `tls_h1_mid_body` drop the client's TLS stream without
//! `shutdown()`: no `close_notify`, just the TCP close, as a client killed with ^C does. The
//! server sees the end of the TCP stream as an unexpected EOF (or a reset), not a TLS
//! closure.
//!
//! Requests are matched by an id in the query (`?id=N`; for gRPC a `bench-id` header that a
//! layer outside `CancellationLayer` moves into the query). Iterations run one after another,
//! one connection each (the `RST_STREAM` cases reuse one HTTP/2 connection, one in cleartext
//! and one over TLS), after a few warm-up iterations, so that no latency includes queueing.
//! Each cancellation's reason and phase are checked; the bench aborts if one is not the
//! expected one.
//!
//! Run with `cargo bench --bench detection`; `DETECTION_ITERS=20 cargo bench --bench detection`
//! for a quick run (the default is 200 iterations per scenario).

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/tonic/reports.rs"]
mod reports;

#[allow(dead_code)]
#[path = "../examples/https/tls.rs"]
mod tls;

#[path = "detection/http3.rs"]
mod http3;

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use reports::reports_client::ReportsClient;
use reports::reports_server::{Reports, ReportsServer};
use reports::{Report, ReportRequest, Tick, WatchRequest};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tower::util::MapRequestLayer;
use tower::{Service, ServiceBuilder, service_fn};
use tower_cancel::{
    CancelReason, CancellationLayer, Cancelled, Phase, RequestBody, RequestBodyLayer,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BenchBody = BoxBody<Bytes, Infallible>;
type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

const DEFAULT_ITERATIONS: usize = 200;
const WARM_UP_ITERATIONS: usize = 5;
/// Bound for every wait: only reached when something is broken.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long the slow handlers would run: far longer than any iteration.
const SLOW: Duration = Duration::from_secs(30);
const MIB: usize = 1024 * 1024;
/// The upload scenarios declare 1 MiB; the mid-upload client sends half of it.
const UPLOAD: usize = MIB;
/// Time for the read-ahead to take the whole upload before the client leaves, so that the
/// measured latency is the detection, not the rest of the upload.
const READ_AHEAD_SETTLE: Duration = Duration::from_millis(20);
const CHUNK: &[u8] = b"chunk-of-data\n";
const CHUNK_INTERVAL: Duration = Duration::from_millis(2);
/// The gRPC request header carrying the request id.
const ID_HEADER: &str = "bench-id";
/// The ALPN protocol the TLS HTTP/1.1 client offers, and the one it checks was chosen.
const ALPN_H1: &[u8] = b"http/1.1";
/// The ALPN protocol the TLS HTTP/2 client offers, and the one it checks was chosen.
const ALPN_H2: &[u8] = b"h2";
/// The name the TLS clients ask for: the self-signed certificate covers it and 127.0.0.1.
const TLS_NAME: &str = "localhost";

fn main() {
    let iterations = match std::env::var("DETECTION_ITERS") {
        Ok(value) => value
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or_else(|| {
                fail(format!(
                    "DETECTION_ITERS={value:?} is not a positive integer"
                ))
            }),
        Err(_) => DEFAULT_ITERATIONS,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("failed to build the tokio runtime");
    let rows = runtime.block_on(run(iterations));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "tower-cancel detection latency, loopback, {iterations} iterations per scenario ({profile})"
    );
    println!(
        "| scenario | n | client action → callback p50 | p99 | hyper drop → callback p50 | p99 |"
    );
    println!("|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    println!();
    println!(
        "—: hyper dropped nothing; `RequestBodyLayer` cancelled on the failed body read while \
         the handler ran."
    );
}

/// Prints why the bench cannot go on and exits: a bench that measures the wrong thing is
/// worse than none.
fn fail(message: String) -> ! {
    eprintln!("detection bench aborted: {message}");
    std::process::exit(1)
}

// ---------------------------------------------------------------------------------------
// Scenarios

#[derive(Clone, Copy, Debug)]
enum Scenario {
    H1Fin,
    H1Rst,
    H1HalfClose,
    H1SmallPostUnread,
    H1UploadUnreadReadAhead,
    H1UploadUnreadPeerWatch,
    H1UploadUnreadPeerWatchRst,
    H1MidUploadReading,
    H1MidBody,
    H2RstStream,
    H2ConnClose,
    GrpcClientCancel,
    TlsH1Fin,
    TlsH1MidBody,
    TlsH2RstStream,
    H3StopSending,
    H3MidBody,
}

impl Scenario {
    const ALL: [Self; 17] = [
        Self::H1Fin,
        Self::H1Rst,
        Self::H1HalfClose,
        Self::H1SmallPostUnread,
        Self::H1UploadUnreadReadAhead,
        Self::H1UploadUnreadPeerWatch,
        Self::H1UploadUnreadPeerWatchRst,
        Self::H1MidUploadReading,
        Self::H1MidBody,
        Self::H2RstStream,
        Self::H2ConnClose,
        Self::GrpcClientCancel,
        Self::TlsH1Fin,
        Self::TlsH1MidBody,
        Self::TlsH2RstStream,
        Self::H3StopSending,
        Self::H3MidBody,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::H1Fin => "h1_fin",
            Self::H1Rst => "h1_rst",
            Self::H1HalfClose => "h1_half_close",
            Self::H1SmallPostUnread => "h1_small_post_unread",
            Self::H1UploadUnreadReadAhead => "h1_upload_unread_read_ahead",
            Self::H1UploadUnreadPeerWatch => "h1_upload_unread_peer_watch",
            Self::H1UploadUnreadPeerWatchRst => "h1_upload_unread_peer_watch_rst",
            Self::H1MidUploadReading => "h1_mid_upload_reading",
            Self::H1MidBody => "h1_mid_body",
            Self::H2RstStream => "h2_rst_stream",
            Self::H2ConnClose => "h2_conn_close",
            Self::GrpcClientCancel => "grpc_client_cancel",
            Self::TlsH1Fin => "tls_h1_fin",
            Self::TlsH1MidBody => "tls_h1_mid_body",
            Self::TlsH2RstStream => "tls_h2_rst_stream",
            Self::H3StopSending => "h3_stop_sending",
            Self::H3MidBody => "h3_mid_body",
        }
    }

    fn expected_phase(self) -> Phase {
        match self {
            Self::H1MidBody | Self::TlsH1MidBody | Self::H3MidBody => Phase::Body,
            _ => Phase::Handler,
        }
    }

    /// Whether the scenario runs over TLS, against `Bench::tls`.
    fn tls(self) -> bool {
        matches!(
            self,
            Self::TlsH1Fin | Self::TlsH1MidBody | Self::TlsH2RstStream
        )
    }

    /// Whether hyper drops the handler future (or body) and the layer reacts to the drop, or
    /// the layer cancels on its own (a failed body read) while the handler keeps running.
    /// With read-ahead hyper drops: once the body is drained it reads the socket and sees
    /// the close.
    fn hyper_drops(self) -> bool {
        !matches!(self, Self::H1MidUploadReading)
    }
}

/// Everything the scenarios talk to.
struct Bench {
    recorder: Recorder,
    /// `CancellationLayer` around the app.
    plain: SocketAddr,
    /// `CancellationLayer`, then `RequestBodyLayer::new().read_ahead(2 MiB)`.
    read_ahead: SocketAddr,
    /// `CancellationLayer`, then `RequestBodyLayer::new()`.
    body_watch: SocketAddr,
    /// `CancellationLayer` around the app, each connection's service wrapped by its
    /// `tcp::PeerWatch`.
    peer_watch: SocketAddr,
    /// One HTTP/2 connection to `plain`, reused by `h2_rst_stream`.
    h2: H2Sender,
    /// `CancellationLayer` around the app, over TLS (the `https` example's server).
    tls: SocketAddr,
    /// The session tickets the TLS server sends after a TLS 1.3 handshake.
    tls_tickets: u32,
    /// TLS client trusting `tls`'s certificate, offering ALPN `http/1.1` only.
    tls_h1: TlsConnector,
    /// One HTTP/2 connection over TLS (ALPN `h2`) to `tls`, reused by `tls_h2_rst_stream`.
    tls_h2: H2Sender,
    grpc: ReportsClient<tonic::transport::Channel>,
    /// One HTTP/3 connection (the `h3` crate's client) to `tower_cancel::http3::serve`.
    h3: http3::H3Send,
    next_id: u64,
}

/// The measurements of one scenario.
struct Row {
    scenario: Scenario,
    client_to_callback: Vec<Duration>,
    drop_to_callback: Vec<Duration>,
}

async fn run(iterations: usize) -> Vec<Row> {
    let recorder = Recorder::default();
    let plain = serve_http(
        ServiceBuilder::new()
            .layer(cancellation_layer(&recorder))
            .service(app::<Incoming>(recorder.clone())),
    )
    .await;
    let read_ahead = serve_http(
        ServiceBuilder::new()
            .layer(cancellation_layer(&recorder))
            .layer(RequestBodyLayer::new().read_ahead(2 * MIB))
            .service(app::<RequestBody<Incoming>>(recorder.clone())),
    )
    .await;
    let body_watch = serve_http(
        ServiceBuilder::new()
            .layer(cancellation_layer(&recorder))
            .layer(RequestBodyLayer::new())
            .service(app::<RequestBody<Incoming>>(recorder.clone())),
    )
    .await;
    let peer_watch = serve_http_with(
        ServiceBuilder::new()
            .layer(cancellation_layer(&recorder))
            .service(app::<Incoming>(recorder.clone())),
        true,
    )
    .await;
    let (tls, tls_cert, tls_tickets) = serve_tls(
        ServiceBuilder::new()
            .layer(cancellation_layer(&recorder))
            .service(app::<Incoming>(recorder.clone())),
    )
    .await;
    let grpc_addr = serve_grpc(&recorder).await;
    let (h2, _h2_socket) = h2_client(plain).await;
    let tls_h1 = tls_connector(&tls_cert, ALPN_H1);
    let tls_h2 = h2_tls_client(&tls_connector(&tls_cert, ALPN_H2), tls).await;
    let grpc = grpc_client(grpc_addr).await;
    let (_h3_addr, h3) = http3::serve_and_connect(
        ServiceBuilder::new()
            .layer(cancellation_layer(&recorder))
            .service(app::<tower_cancel::http3::IncomingBody>(recorder.clone())),
    )
    .await;
    let mut bench = Bench {
        recorder,
        plain,
        read_ahead,
        body_watch,
        peer_watch,
        h2,
        tls,
        tls_tickets,
        tls_h1,
        tls_h2,
        grpc,
        h3,
        next_id: 0,
    };

    let mut rows = Vec::new();
    for scenario in Scenario::ALL {
        eprintln!("detection: {} …", scenario.name());
        let mut row = Row {
            scenario,
            client_to_callback: Vec::with_capacity(iterations),
            drop_to_callback: Vec::with_capacity(iterations),
        };
        for i in 0..WARM_UP_ITERATIONS + iterations {
            bench.next_id += 1;
            let id = bench.next_id;
            let (left, sample) = iteration(&mut bench, scenario, id).await;
            let (client_to_callback, drop_to_callback) =
                check(&bench.recorder, scenario, id, left, &sample);
            if i >= WARM_UP_ITERATIONS {
                row.client_to_callback.push(client_to_callback);
                row.drop_to_callback.extend(drop_to_callback);
            }
        }
        row.client_to_callback.sort_unstable();
        row.drop_to_callback.sort_unstable();
        rows.push(row);
    }
    rows
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let client = &self.client_to_callback;
        let drop = &self.drop_to_callback;
        let (drop_p50, drop_p99) = if drop.is_empty() {
            ("—".to_owned(), "—".to_owned())
        } else {
            (
                format_latency(percentile(drop, 0.50)),
                format_latency(percentile(drop, 0.99)),
            )
        };
        write!(
            f,
            "| {} | {} | {} | {} | {drop_p50} | {drop_p99} |",
            self.scenario.name(),
            client.len(),
            format_latency(percentile(client, 0.50)),
            format_latency(percentile(client, 0.99)),
        )
    }
}

/// The nearest-rank percentile `p` (0..=1) of `sorted`, which is not empty.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// µs below a millisecond, ms above.
fn format_latency(duration: Duration) -> String {
    let micros = duration.as_secs_f64() * 1e6;
    if micros < 1000.0 {
        format!("{micros:.1} µs")
    } else {
        format!("{:.2} ms", micros / 1000.0)
    }
}

/// One request of `scenario`: returns the instant just before the client left, and what the
/// server recorded for the request once the callback ran.
async fn iteration(bench: &mut Bench, scenario: Scenario, id: u64) -> (Instant, Sample) {
    match scenario {
        Scenario::H2RstStream | Scenario::TlsH2RstStream => {
            h2_rst_stream(bench, scenario, id).await
        }
        Scenario::H2ConnClose => h2_conn_close(bench, id).await,
        Scenario::GrpcClientCancel => grpc_client_cancel(bench, id).await,
        Scenario::H3StopSending => h3_stop_sending(bench, id).await,
        Scenario::H3MidBody => h3_mid_body(bench, id).await,
        _ => http1(bench, scenario, id).await,
    }
}

/// Checks the cancellation is the one the scenario is about and returns its latencies:
/// client action → callback, and hyper drop → callback where hyper dropped something.
fn check(
    recorder: &Recorder,
    scenario: Scenario,
    id: u64,
    left: Instant,
    sample: &Sample,
) -> (Duration, Option<Duration>) {
    let name = scenario.name();
    let anomalies = recorder.anomalies();
    if !anomalies.is_empty() {
        fail(format!("{name}: unexpected callbacks: {anomalies:?}"));
    }
    let Some(callback) = sample.callback else {
        fail(format!("{name}: request {id} was never cancelled"));
    };
    if callback.reason != CancelReason::Disconnected {
        fail(format!(
            "{name}: request {id} was cancelled with reason {}, expected disconnected",
            callback.reason
        ));
    }
    if callback.phase != scenario.expected_phase() {
        fail(format!(
            "{name}: request {id} was cancelled in phase {}, expected {}",
            callback.phase,
            scenario.expected_phase()
        ));
    }
    if callback.at < left {
        fail(format!(
            "{name}: request {id} was cancelled before the client left"
        ));
    }
    let dropped_first = sample.dropped.filter(|&dropped| dropped <= callback.at);
    let drop_to_callback = match (scenario.hyper_drops(), dropped_first) {
        (true, Some(dropped)) => Some(callback.at - dropped),
        (true, None) => fail(format!(
            "{name}: request {id} was cancelled, but hyper had not dropped its handler or body"
        )),
        (false, Some(_)) => fail(format!(
            "{name}: hyper dropped request {id} before the callback; expected the layer to \
             cancel while the handler runs"
        )),
        (false, None) => None,
    };
    (callback.at - left, drop_to_callback)
}

// ---------------------------------------------------------------------------------------
// Clients

/// HTTP/1.1 scenarios: one raw TCP connection per request, under TLS for the `tls_` ones.
async fn http1(bench: &Bench, scenario: Scenario, id: u64) -> (Instant, Sample) {
    let (addr, request) = match scenario {
        Scenario::H1SmallPostUnread => (bench.plain, post("/upload", id, 1000, 1000)),
        Scenario::H1UploadUnreadReadAhead => {
            (bench.read_ahead, post("/upload", id, UPLOAD, UPLOAD))
        }
        // 64 KiB of the body sent, none of it read: the client leaves with the rest still
        // due. (What the server's receive window holds: a FIN queued behind data the window
        // cannot take stays in the client's kernel until the server reads.)
        Scenario::H1UploadUnreadPeerWatch | Scenario::H1UploadUnreadPeerWatchRst => {
            (bench.peer_watch, post("/upload", id, UPLOAD, UPLOAD / 16))
        }
        Scenario::H1MidUploadReading => (bench.body_watch, post("/read", id, UPLOAD, UPLOAD / 2)),
        Scenario::H1MidBody => (bench.plain, get(&format!("/endless?id={id}"))),
        Scenario::TlsH1MidBody => (bench.tls, get(&format!("/endless?id={id}"))),
        Scenario::TlsH1Fin => (bench.tls, get(&format!("/slow?id={id}"))),
        _ => (bench.plain, get(&format!("/slow?id={id}"))),
    };
    let stream = connect(addr).await;
    if matches!(
        scenario,
        Scenario::H1Rst | Scenario::H1UploadUnreadPeerWatchRst
    ) {
        // Only the close reads SO_LINGER: set now, it makes the drop below a reset.
        stream.set_zero_linger().expect("failed to set SO_LINGER 0");
    }
    if scenario.tls() {
        let mut stream = tls_connect(&bench.tls_h1, stream, ALPN_H1).await;
        read_tickets(&mut stream, bench.tls_tickets).await;
        http1_exchange(&bench.recorder, scenario, id, stream, &request).await
    } else {
        http1_exchange(&bench.recorder, scenario, id, stream, &request).await
    }
}

/// Sends `request` on `stream`, waits for the moment the scenario leaves at, and leaves:
/// drops `stream` (a close, or a reset with SO_LINGER 0; over TLS without `close_notify`), or
/// half-closes it for `h1_half_close`.
async fn http1_exchange<S>(
    recorder: &Recorder,
    scenario: Scenario,
    id: u64,
    mut stream: S,
    request: &[u8],
) -> (Instant, Sample)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(request)
        .await
        .expect("failed to send the request");
    // A TLS stream buffers what it encrypts until flushed.
    stream.flush().await.expect("failed to send the request");
    match scenario {
        // Leave once the handler has read everything that was sent: the next read fails.
        Scenario::H1MidUploadReading => {
            recorder
                .wait(id, "the handler to read the first half", |s| {
                    s.body_bytes_read >= UPLOAD / 2
                })
                .await;
        }
        Scenario::H1MidBody | Scenario::TlsH1MidBody => read_chunks(&mut stream, 2).await,
        Scenario::H1UploadUnreadReadAhead => {
            recorder
                .wait(id, "the handler to start", |s| s.started)
                .await;
            tokio::time::sleep(READ_AHEAD_SETTLE).await;
        }
        _ => {
            recorder
                .wait(id, "the handler to start", |s| s.started)
                .await;
        }
    }
    // The half-closed stream stays open until the callback ran; the others go now.
    let mut half_closed = None;
    let left = match scenario {
        Scenario::H1HalfClose => {
            let left = Instant::now();
            stream.shutdown().await.expect("failed to half-close");
            half_closed = Some(stream);
            left
        }
        // A close, or a reset for `h1_rst` (SO_LINGER 0). A TLS stream dropped without
        // `shutdown()` sends no `close_notify`: the drop just closes the TCP socket, as a
        // client killed with ^C (curl, a browser tab) does.
        _ => {
            let left = Instant::now();
            drop(stream);
            left
        }
    };
    let sample = recorder
        .wait(id, "the callback", |s| s.callback.is_some())
        .await;
    drop(half_closed);
    (left, sample)
}

fn get(path_and_query: &str) -> Vec<u8> {
    format!("GET {path_and_query} HTTP/1.1\r\nhost: bench\r\n\r\n").into_bytes()
}

/// A POST to `path` declaring `declared` bytes and carrying `sent` of them.
fn post(path: &str, id: u64, declared: usize, sent: usize) -> Vec<u8> {
    let mut request = format!(
        "POST {path}?id={id} HTTP/1.1\r\nhost: bench\r\ncontent-length: {declared}\r\n\r\n"
    )
    .into_bytes();
    request.resize(request.len() + sent, b'x');
    request
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).await.expect("failed to connect");
    stream.set_nodelay(true).expect("failed to set TCP_NODELAY");
    stream
}

/// Reads the response head and at least `count` body chunks.
async fn read_chunks(stream: &mut (impl AsyncRead + Unpin), count: usize) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(CHUNK.len()).filter(|w| *w == CHUNK).count() < count {
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("timed out reading the streamed response")
            .expect("failed to read the streamed response");
        assert!(read > 0, "the server closed the streamed response early");
        seen.extend_from_slice(&buf[..read]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "unexpected response: {:?}",
        String::from_utf8_lossy(&seen)
    );
}

/// A TLS client that trusts the certificates in `cert_pem` and offers the one ALPN protocol
/// `alpn`.
fn tls_connector(cert_pem: &str, alpn: &[u8]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        let cert = cert.unwrap_or_else(|error| fail(format!("bad certificate PEM: {error}")));
        roots
            .add(cert)
            .unwrap_or_else(|error| fail(format!("untrustable certificate: {error}")));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|error| fail(format!("no TLS versions: {error}")))
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// The TLS handshake on `stream`; aborts unless the server chose `alpn`.
async fn tls_connect(
    connector: &TlsConnector,
    stream: TcpStream,
    alpn: &[u8],
) -> TlsStream<TcpStream> {
    let name = ServerName::try_from(TLS_NAME).expect("a valid server name");
    let tls = match tokio::time::timeout(PATIENCE, connector.connect(name, stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => fail(format!("TLS handshake failed: {error}")),
        Err(_) => fail(format!("the TLS handshake took more than {PATIENCE:?}")),
    };
    let chosen = tls.get_ref().1.alpn_protocol();
    if chosen != Some(alpn) {
        fail(format!(
            "the TLS server chose ALPN {:?}, expected {:?}",
            chosen.map(String::from_utf8_lossy),
            String::from_utf8_lossy(alpn)
        ));
    }
    tls
}

/// Reads the session tickets a TLS 1.3 server sends after the handshake (`tickets` of them),
/// so that the client's close later leaves nothing unread in the socket: unread data would
/// turn the FIN of `tls_h1_fin` into a reset. TLS 1.2 sends none.
async fn read_tickets(stream: &mut TlsStream<TcpStream>, tickets: u32) {
    if stream.get_ref().1.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return;
    }
    let mut buf = [0u8; 256];
    let read = std::future::poll_fn(|cx| {
        let received =
            |stream: &TlsStream<TcpStream>| stream.get_ref().1.tls13_tickets_received() >= tickets;
        if received(stream) {
            return Poll::Ready(Ok(()));
        }
        let mut unexpected = ReadBuf::new(&mut buf);
        match Pin::new(&mut *stream).poll_read(cx, &mut unexpected) {
            // Tickets carry no application data: anything read, or the end, is wrong.
            Poll::Ready(Ok(())) => Poll::Ready(Err(format!(
                "read {:?} instead of session tickets",
                String::from_utf8_lossy(unexpected.filled())
            ))),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error.to_string())),
            Poll::Pending if received(stream) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    });
    match tokio::time::timeout(PATIENCE, read).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => fail(format!("reading the TLS session tickets: {error}")),
        Err(_) => fail(format!(
            "waited {PATIENCE:?} for {tickets} TLS session tickets"
        )),
    }
}

/// HTTP/2 client over TLS (ALPN `h2`); hyper runs the connection in a task of its own.
async fn h2_tls_client(connector: &TlsConnector, addr: SocketAddr) -> H2Sender {
    let tls = tls_connect(connector, connect(addr).await, ALPN_H2).await;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake over TLS failed");
    tokio::spawn(connection);
    sender
}

/// HTTP/2 client over prior knowledge, with a clone of its socket so that the bench can close
/// the TCP connection under it (hyper runs the connection in a task of its own).
async fn h2_client(addr: SocketAddr) -> (H2Sender, std::net::TcpStream) {
    let socket = connect(addr)
        .await
        .into_std()
        .expect("failed to take the socket");
    let kill = socket.try_clone().expect("failed to clone the socket");
    let stream = TcpStream::from_std(socket).expect("failed to register the socket");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake failed");
    // The task ends when the connection closes.
    tokio::spawn(connection);
    (sender, kill)
}

fn h2_get(scheme: &str, addr: SocketAddr, id: u64) -> Request<Empty<Bytes>> {
    Request::get(format!("{scheme}://{addr}/slow?id={id}"))
        .body(Empty::new())
        .expect("valid request")
}

/// Polls `call` until the handler of request `id` started, then takes the client's gone-action
/// `leave` (given the call, it returns whatever must outlive the wait) and waits for the
/// layer's callback. Returns when the client left and what the server recorded.
async fn leave_once_started<F, K>(
    recorder: &Recorder,
    id: u64,
    mut call: Pin<Box<F>>,
    leave: impl FnOnce(Pin<Box<F>>) -> K,
) -> (Instant, Sample)
where
    F: Future<Output: fmt::Debug>,
{
    tokio::select! {
        answer = &mut call => fail(format!("request {id} returned: {answer:?}")),
        _ = recorder.wait(id, "the handler to start", |s| s.started) => {}
    }
    let left = Instant::now();
    let keep = leave(call);
    let sample = recorder
        .wait(id, "the callback", |s| s.callback.is_some())
        .await;
    drop(keep);
    (left, sample)
}

/// Drops the response future of an HTTP/2 request in flight: hyper's client sends
/// `RST_STREAM(CANCEL)`, on the cleartext connection or on the TLS one.
async fn h2_rst_stream(bench: &mut Bench, scenario: Scenario, id: u64) -> (Instant, Sample) {
    let request = if scenario.tls() {
        bench.tls_h2.send_request(h2_get("https", bench.tls, id))
    } else {
        bench.h2.send_request(h2_get("http", bench.plain, id))
    };
    leave_once_started(&bench.recorder, id, Box::pin(request), drop).await
}

/// Sends `STOP_SENDING(H3_REQUEST_CANCELLED)` and `RESET_STREAM` on an HTTP/3 request whose
/// handler runs (before any read, which h3-quinn's client needs for `stop_sending`).
async fn h3_stop_sending(bench: &mut Bench, id: u64) -> (Instant, Sample) {
    let mut stream = h3_request(bench, &format!("/slow?id={id}")).await;
    let _ = bench
        .recorder
        .wait(id, "the handler to start", |s| s.started)
        .await;
    let left = Instant::now();
    stream.stop_sending(h3::error::Code::H3_REQUEST_CANCELLED);
    stream.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
    let sample = bench
        .recorder
        .wait(id, "the callback", |s| s.callback.is_some())
        .await;
    (left, sample)
}

/// Drops an HTTP/3 request once its streamed body arrives: quinn sends `STOP_SENDING`.
async fn h3_mid_body(bench: &mut Bench, id: u64) -> (Instant, Sample) {
    let mut stream = h3_request(bench, &format!("/endless?id={id}")).await;
    stream
        .recv_response()
        .await
        .unwrap_or_else(|error| fail(format!("h3 response: {error}")));
    match stream.recv_data().await {
        Ok(Some(_)) => {}
        other => fail(format!("h3 body: {:?}", other.map(|d| d.is_some()))),
    }
    let left = Instant::now();
    drop(stream);
    let sample = bench
        .recorder
        .wait(id, "the callback", |s| s.callback.is_some())
        .await;
    (left, sample)
}

async fn h3_request(
    bench: &mut Bench,
    path_and_query: &str,
) -> h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes> {
    let request = Request::get(format!("https://localhost{path_and_query}"))
        .body(())
        .expect("valid request");
    let mut stream = bench
        .h3
        .send_request(request)
        .await
        .unwrap_or_else(|error| fail(format!("h3 request: {error}")));
    stream
        .finish()
        .await
        .unwrap_or_else(|error| fail(format!("h3 request end: {error}")));
    stream
}

/// Closes the TCP connection of an HTTP/2 client with one request in flight.
async fn h2_conn_close(bench: &Bench, id: u64) -> (Instant, Sample) {
    let (mut sender, socket) = h2_client(bench.plain).await;
    let call = Box::pin(sender.send_request(h2_get("http", bench.plain, id)));
    leave_once_started(&bench.recorder, id, call, |call| {
        socket
            .shutdown(std::net::Shutdown::Both)
            .expect("failed to close the connection");
        call
    })
    .await
}

/// Drops a tonic call in flight: tonic's channel resets the stream.
async fn grpc_client_cancel(bench: &mut Bench, id: u64) -> (Instant, Sample) {
    let mut request = tonic::Request::new(ReportRequest {
        name: id.to_string(),
        millis: u32::try_from(SLOW.as_millis()).expect("SLOW fits in u32 milliseconds"),
    });
    request.metadata_mut().insert(
        ID_HEADER,
        id.to_string().parse().expect("a number is valid metadata"),
    );
    let call = Box::pin(bench.grpc.generate(request));
    leave_once_started(&bench.recorder, id, call, drop).await
}

async fn grpc_client(addr: SocketAddr) -> ReportsClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("failed to connect to the gRPC server");
    ReportsClient::new(channel)
}

// ---------------------------------------------------------------------------------------
// What the server records

/// What happened to one request, as the server saw it.
#[derive(Clone, Debug, Default)]
struct Sample {
    started: bool,
    body_bytes_read: usize,
    /// When hyper dropped the handler future or the response body.
    dropped: Option<Instant>,
    callback: Option<Callback>,
}

#[derive(Clone, Copy, Debug)]
struct Callback {
    at: Instant,
    reason: CancelReason,
    phase: Phase,
}

/// Samples by request id, shared by handlers, bodies, the layer's callback and the clients.
#[derive(Clone, Default)]
struct Recorder {
    state: Arc<Mutex<RecorderState>>,
    changed: Arc<Notify>,
}

#[derive(Default)]
struct RecorderState {
    samples: HashMap<u64, Sample>,
    /// Callbacks without a request id, or a second callback for one request.
    anomalies: Vec<String>,
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderState> {
        self.state.lock().expect("recorder mutex poisoned")
    }

    fn update(&self, id: u64, change: impl FnOnce(&mut Sample)) {
        change(self.lock().samples.entry(id).or_default());
        self.changed.notify_waiters();
    }

    /// The layer's `on_cancel` callback.
    fn callback(&self, cancelled: &Cancelled) {
        // First thing, so that recording costs nothing in the measurement.
        let at = Instant::now();
        let callback = Callback {
            at,
            reason: cancelled.reason(),
            phase: cancelled.phase(),
        };
        let mut state = self.lock();
        match request_id(cancelled.uri()) {
            Some(id) => {
                let sample = state.samples.entry(id).or_default();
                if sample.callback.is_some() {
                    state
                        .anomalies
                        .push(format!("a second callback for request {id}"));
                } else {
                    sample.callback = Some(callback);
                }
            }
            None => state
                .anomalies
                .push(format!("a callback for {} without an id", cancelled.uri())),
        }
        drop(state);
        self.changed.notify_waiters();
    }

    fn anomalies(&self) -> Vec<String> {
        self.lock().anomalies.clone()
    }

    /// Waits until request `id`'s sample satisfies `done` and returns it.
    async fn wait(&self, id: u64, what: &str, done: impl Fn(&Sample) -> bool) -> Sample {
        let wait = async {
            loop {
                // Registered before the check, so that no change is missed.
                let changed = self.changed.notified();
                if let Some(sample) = self.lock().samples.get(&id).filter(|s| done(s)) {
                    return sample.clone();
                }
                changed.await;
            }
        };
        match tokio::time::timeout(PATIENCE, wait).await {
            Ok(sample) => sample,
            Err(_) => {
                let sample = self.lock().samples.get(&id).cloned();
                fail(format!(
                    "request {id}: waited {PATIENCE:?} for {what}; recorded: {sample:?}"
                ))
            }
        }
    }
}

/// The `id` query parameter.
fn request_id(uri: &Uri) -> Option<u64> {
    uri.query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("id="))?
        .parse()
        .ok()
}

/// Records when it is dropped, unless disarmed: owned by a handler future or a response
/// body, it tells when hyper dropped them.
struct DropStamp {
    recorder: Recorder,
    id: u64,
    armed: bool,
}

impl DropStamp {
    fn new(recorder: &Recorder, id: u64) -> Self {
        Self {
            recorder: recorder.clone(),
            id,
            armed: true,
        }
    }
}

impl Drop for DropStamp {
    fn drop(&mut self) {
        if self.armed {
            let at = Instant::now();
            // No notification: nobody waits for a drop alone, and waking a waiter here would
            // put a thread wake-up inside the measured drop → callback interval.
            let mut state = self.recorder.lock();
            state.samples.entry(self.id).or_default().dropped = Some(at);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Servers

fn cancellation_layer(recorder: &Recorder) -> CancellationLayer {
    let recorder = recorder.clone();
    CancellationLayer::new().on_cancel(move |c: &Cancelled| recorder.callback(c))
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on 127.0.0.1:0.
async fn serve_http<S, B>(service: S) -> SocketAddr
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
    serve_http_with(service, false).await
}

/// [`serve_http`], each connection's service wrapped by the connection's `tcp::PeerWatch`
/// if `watch`.
async fn serve_http_with<S, B>(service: S, watch: bool) -> SocketAddr
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
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("failed to bind");
    let addr = listener.local_addr().expect("bound socket has an address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let builder = auto::Builder::new(TokioExecutor::new());
            if watch {
                let watch = tower_cancel::tcp::PeerWatch::new(&stream).expect("a peer watch");
                let service = TowerToHyperService::new(watch.service(service.clone()));
                spawn_connection(
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned(),
                );
            } else {
                let service = TowerToHyperService::new(service.clone());
                spawn_connection(
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned(),
                );
            }
        }
    });
    addr
}

/// Serves one connection in a task of its own.
fn spawn_connection<C: Future + Send + 'static>(conn: C) {
    tokio::spawn(async move {
        let _ = conn.await;
    });
}

/// Serves `service` over TLS on 127.0.0.1:0 with the `https` example's code: a self-signed
/// certificate, ALPN `h2` then `http/1.1`, each connection served with the version ALPN
/// chose. Returns the address, the certificate (PEM) and how many session tickets the server
/// sends after a TLS 1.3 handshake.
async fn serve_tls<S, B>(service: S) -> (SocketAddr, String, u32)
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
    let (config, cert) = tls::server_config(None)
        .unwrap_or_else(|error| fail(format!("no TLS server configuration: {error}")));
    let cert = cert.unwrap_or_else(|| fail("no self-signed certificate".to_owned()));
    let tickets = u32::try_from(config.send_tls13_tickets).expect("a few tickets");
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("failed to bind");
    let addr = listener.local_addr().expect("bound socket has an address");
    tokio::spawn(tls::serve(listener, config, service));
    (addr, cert, tickets)
}

/// The HTTP app, generic over the request body (hyper's, or `RequestBodyLayer`'s).
fn app<B>(
    recorder: Recorder,
) -> impl Service<Request<B>, Response = Response<BenchBody>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static
where
    B: Body + Send + 'static,
    B::Data: Send,
{
    service_fn(move |req: Request<B>| handle(req, recorder.clone()))
}

/// `/slow`, `/upload`: never answers (30 s), leaves the body unread. `/read`: reads the body
/// frame by frame and answers when it ends or fails. `/endless`: answers at once with an
/// endless streamed body.
async fn handle<B: Body>(
    req: Request<B>,
    recorder: Recorder,
) -> Result<Response<BenchBody>, Infallible> {
    let Some(id) = request_id(req.uri()) else {
        return Ok(answer(StatusCode::BAD_REQUEST, "no id"));
    };
    recorder.update(id, |s| s.started = true);
    match req.uri().path() {
        "/endless" => Ok(Response::new(
            Chunks::new(DropStamp::new(&recorder, id)).boxed(),
        )),
        "/read" => {
            let mut dropped = DropStamp::new(&recorder, id);
            let mut body = std::pin::pin!(req.into_body());
            let status = loop {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        let len = frame.data_ref().map_or(0, Buf::remaining);
                        recorder.update(id, |s| s.body_bytes_read += len);
                    }
                    Some(Err(_)) => break StatusCode::BAD_REQUEST,
                    None => break StatusCode::OK,
                }
            };
            // A handler that learns of the failed read returns, as a real one would.
            dropped.armed = false;
            Ok(answer(status, "read"))
        }
        _ => {
            let mut dropped = DropStamp::new(&recorder, id);
            // Declared after the stamp, so dropped before it: the stamp is the last thing
            // the handler drops, as close as possible to the layer's reaction.
            let _request = req;
            tokio::time::sleep(SLOW).await;
            dropped.armed = false;
            Ok(answer(StatusCode::OK, "late"))
        }
    }
}

fn answer(status: StatusCode, text: &'static str) -> Response<BenchBody> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed());
    *response.status_mut() = status;
    response
}

/// An endless body: a chunk every `CHUNK_INTERVAL`. Its stamp records when hyper drops it.
struct Chunks {
    sleep: Pin<Box<tokio::time::Sleep>>,
    _dropped: DropStamp,
}

impl Chunks {
    fn new(dropped: DropStamp) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep(CHUNK_INTERVAL)),
            _dropped: dropped,
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
        std::task::ready!(self.sleep.as_mut().poll(cx));
        let next = tokio::time::Instant::now() + CHUNK_INTERVAL;
        self.sleep.as_mut().reset(next);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(CHUNK)))))
    }
}

/// The gRPC service: `generate` works for `millis` ms, with the request id as its name.
struct SlowReports {
    recorder: Recorder,
}

#[tonic::async_trait]
impl Reports for SlowReports {
    type WatchStream = futures_util::stream::Empty<Result<Tick, tonic::Status>>;

    async fn generate(
        &self,
        request: tonic::Request<ReportRequest>,
    ) -> Result<tonic::Response<Report>, tonic::Status> {
        let ReportRequest { name, millis } = request.into_inner();
        let id = name
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("the name must be the request id"))?;
        self.recorder.update(id, |s| s.started = true);
        let mut dropped = DropStamp::new(&self.recorder, id);
        tokio::time::sleep(Duration::from_millis(millis.into())).await;
        dropped.armed = false;
        Ok(tonic::Response::new(Report { text: name }))
    }

    async fn watch(
        &self,
        _request: tonic::Request<WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not used by the bench"))
    }
}

/// Moves the `bench-id` header into the URI's query, where the layer's callback sees it.
fn id_header_into_query(mut req: Request<tonic::body::Body>) -> Request<tonic::body::Body> {
    let Some(id) = req
        .headers()
        .get(ID_HEADER)
        .and_then(|value| value.to_str().ok())
    else {
        return req;
    };
    let path_and_query = format!("{}?id={id}", req.uri().path());
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().expect("valid path and query"));
    *req.uri_mut() = Uri::from_parts(parts).expect("valid URI");
    req
}

/// A tonic server on 127.0.0.1:0 with the id mover outside `CancellationLayer`.
async fn serve_grpc(recorder: &Recorder) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("failed to bind");
    let addr = listener.local_addr().expect("bound socket has an address");
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .layer(MapRequestLayer::new(id_header_into_query))
        .layer(cancellation_layer(recorder))
        .add_service(ReportsServer::new(SlowReports {
            recorder: recorder.clone(),
        }))
        .serve_with_incoming(incoming);
    tokio::spawn(async move {
        if let Err(error) = server.await {
            fail(format!("the gRPC server failed: {error}"));
        }
    });
    addr
}
