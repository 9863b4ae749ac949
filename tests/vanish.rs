//! Clients that vanish without FIN or RST, where the wire really goes silent: each test runs
//! inside a private network namespace it creates for itself (the test binary re-runs itself
//! under `unshare --net`, brings `lo` up, and drops the client's packets with `iptables`),
//! loopback only, nothing changed on the host.
//!
//! With `tcp::detect_vanished(&stream, 6 s)` on the accepted socket, an HTTP/1.1 client that
//! goes silent while its handler runs (keepalive) or while its response streams
//! (`TCP_USER_TIMEOUT`) is cancelled with `Disconnected` within the bound; HTTP/2 with PING
//! keepalive too. Without the helper, an HTTP/1.1 request whose client went silent is still
//! running after the bound: the gap Gin had.

use std::convert::Infallible;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower_cancel::{CancelReason, CancellationLayer, Cancelled, Phase};

/// The bound given to the helper and to HTTP/2's PING settings.
const BOUND: Duration = Duration::from_secs(6);
/// Scheduling and timer slack on a loaded machine.
const SLACK: Duration = Duration::from_secs(2);
const INSIDE: &str = "TOWER_CANCEL_IN_NETNS";

/// Runs `test` (this binary's test of that name) inside a new network namespace, and fails if
/// it fails there. Returns `false` if this call is already inside: the caller then runs the
/// scenario itself.
fn in_namespace(test: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        return false;
    }
    for tool in ["unshare", "ip", "iptables"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return skip(test, &format!("`{tool}` is not installed"));
        }
    }
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("unshare")
        .args(["--net", "--"])
        .arg(&exe)
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .output();
    let output = match output {
        Ok(output) => output,
        Err(error) => return skip(test, &format!("unshare could not run: {error}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("unshare failed") || stderr.contains("Operation not permitted") {
        return skip(test, &format!("no network namespace here: {stderr}"));
    }
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{test} failed inside its network namespace"
    );
    true
}

/// Where the namespace (or `iptables`) is not available: a failure on CI, a clear skip
/// elsewhere.
fn skip(test: &str, why: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why} (CI must run it: root, util-linux, iptables)");
    }
    // Straight to stderr, past the test harness's capture, so that the skip shows.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{test}: SKIPPED: {why}");
    true
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(status.success(), "{program} {args:?}: {status}");
}

/// Inside the namespace: loopback up.
fn loopback_up() {
    run("ip", &["link", "set", "lo", "up"]);
}

/// The client at `port` vanishes: every packet to or from it is dropped, nothing is sent.
fn silence(port: u16) {
    let port = port.to_string();
    for direction in ["--sport", "--dport"] {
        run(
            "iptables",
            &["-A", "INPUT", "-p", "tcp", direction, &port, "-j", "DROP"],
        );
    }
}

/// What the layer recorded, and when.
type Seen = Arc<Mutex<Option<(CancelReason, Phase, Instant)>>>;

/// A server on 127.0.0.1:0 whose accepted sockets get `detect_vanished(BOUND)` if `helper`,
/// and whose HTTP/2 side pings every `BOUND / 2`.
async fn server(helper: bool, seen: Seen) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let layer = CancellationLayer::new().on_cancel(move |c: &Cancelled| {
        *seen.lock().unwrap() = Some((c.reason(), c.phase(), Instant::now()));
    });
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(|req: Request<Incoming>| async move {
            if req.uri().path() == "/stream" {
                // Frames every 50 ms, forever: the server keeps writing.
                let frames = futures_util::stream::unfold((), |()| async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Some((
                        Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 16_384]))),
                        (),
                    ))
                });
                return Ok::<_, Infallible>(Response::new(StreamBody::new(frames).boxed()));
            }
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok(Response::new(
                http_body_util::Empty::new().map_err(|n| match n {}).boxed(),
            ))
        }));
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            if helper {
                tower_cancel::tcp::detect_vanished(&stream, BOUND).unwrap();
            }
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .keep_alive_interval(BOUND / 2)
                    .keep_alive_timeout(BOUND / 2);
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

/// Waits for the layer's record, for at most `within`.
async fn cancelled_within(seen: &Seen, within: Duration) -> Option<(CancelReason, Phase, Instant)> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(record) = *seen.lock().unwrap() {
            return Some(record);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    *seen.lock().unwrap()
}

/// An HTTP/1.1 client sends `GET path`, reads `read` bytes of the answer (0: none), then
/// vanishes. Returns when it vanished, and keeps the socket open (silent) until dropped.
async fn h1_client_vanishes(
    addr: std::net::SocketAddr,
    path: &str,
    read: usize,
) -> (TcpStream, Instant) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = vec![0u8; read];
    stream.read_exact(&mut got).await.unwrap();
    // Let the handler start before the wire goes silent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    silence(stream.local_addr().unwrap().port());
    (stream, Instant::now())
}

#[tokio::test]
async fn http1_client_vanishing_while_the_handler_runs_is_cancelled_within_the_bound() {
    if in_namespace("http1_client_vanishing_while_the_handler_runs_is_cancelled_within_the_bound") {
        return;
    }
    loopback_up();
    let seen = Seen::default();
    let addr = server(true, seen.clone()).await;
    let (_client, vanished) = h1_client_vanishes(addr, "/slow", 0).await;
    let (reason, phase, at) = cancelled_within(&seen, BOUND + SLACK)
        .await
        .expect("cancelled within the bound");
    println!(
        "HTTP/1.1 handler, keepalive: cancelled {:?} after the client vanished",
        at - vanished
    );
    assert_eq!(
        (reason, phase),
        (CancelReason::Disconnected, Phase::Handler)
    );
    assert!(at - vanished <= BOUND + SLACK, "{:?}", at - vanished);
}

#[tokio::test]
async fn http1_client_vanishing_while_the_body_streams_is_cancelled_within_the_bound() {
    if in_namespace("http1_client_vanishing_while_the_body_streams_is_cancelled_within_the_bound") {
        return;
    }
    loopback_up();
    let seen = Seen::default();
    let addr = server(true, seen.clone()).await;
    let (_client, vanished) = h1_client_vanishes(addr, "/stream", 1).await;
    let (reason, phase, at) = cancelled_within(&seen, BOUND + SLACK)
        .await
        .expect("cancelled within the bound");
    println!(
        "HTTP/1.1 body, TCP_USER_TIMEOUT: cancelled {:?} after the client vanished",
        at - vanished
    );
    assert_eq!((reason, phase), (CancelReason::Disconnected, Phase::Body));
    assert!(at - vanished <= BOUND + SLACK, "{:?}", at - vanished);
}

#[tokio::test]
async fn http2_client_vanishing_is_cancelled_by_ping_within_the_bound() {
    if in_namespace("http2_client_vanishing_is_cancelled_by_ping_within_the_bound") {
        return;
    }
    loopback_up();
    let seen = Seen::default();
    // Without the socket helper: HTTP/2's PING alone.
    let addr = server(false, seen.clone()).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let port = stream.local_addr().unwrap().port();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let call = tokio::spawn(
        send.send_request(
            Request::get(format!("http://{addr}/slow"))
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        ),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    silence(port);
    let vanished = Instant::now();
    let (reason, phase, at) = cancelled_within(&seen, BOUND + SLACK)
        .await
        .expect("cancelled within the bound");
    println!(
        "HTTP/2, PING: cancelled {:?} after the client vanished",
        at - vanished
    );
    assert_eq!(
        (reason, phase),
        (CancelReason::Disconnected, Phase::Handler)
    );
    assert!(at - vanished <= BOUND + SLACK, "{:?}", at - vanished);
    call.abort();
}

#[tokio::test]
async fn without_the_helper_an_http1_client_that_vanished_is_still_served_after_the_bound() {
    if in_namespace(
        "without_the_helper_an_http1_client_that_vanished_is_still_served_after_the_bound",
    ) {
        return;
    }
    loopback_up();
    let seen = Seen::default();
    let addr = server(false, seen.clone()).await;
    let (_client, _) = h1_client_vanishes(addr, "/slow", 0).await;
    assert_eq!(
        cancelled_within(&seen, BOUND + SLACK).await,
        None,
        "without keepalive nothing tells the server"
    );
    println!(
        "HTTP/1.1 without the helper: still running {:?} after the client vanished",
        BOUND + SLACK
    );
}
