//! HTTPS with ALPN, over real sockets, with a client nobody here wrote: curl over HTTP/1.1 and
//! HTTP/2 (`-k`: the server's certificate is self-signed), giving up mid-handler and mid-body
//! (`--max-time`), and reading to the end. The server is the `https` example's: rustls with
//! ring, and the HTTP version ALPN chose.

#[path = "../examples/https/tls.rs"]
mod tls;

use std::convert::Infallible;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_cancel::{CancelReason, CancellationLayer, Cancelled, Phase, RequestCancellation};

/// What the server saw of one request: its HTTP version, and the layer's record if cancelled.
#[derive(Debug, Default, Clone)]
struct Seen {
    version: Option<Version>,
    cancelled: Option<(CancelReason, Phase)>,
    handle: Option<RequestCancellation>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

async fn server(log: Log) -> std::net::SocketAddr {
    let (config, _) = tls::server_config(None).unwrap();
    let cancels = log.clone();
    let layer = CancellationLayer::new().on_cancel(move |c: &Cancelled| {
        let mut log = cancels.lock().unwrap();
        let last = log.last_mut().expect("a request was seen");
        assert!(last.cancelled.is_none(), "cancelled twice");
        last.cancelled = Some((c.reason(), c.phase()));
    });
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(move |req: Request<Incoming>| {
            let log = log.clone();
            async move {
                let rc = RequestCancellation::from_extensions(req.extensions()).unwrap();
                log.lock().unwrap().push(Seen {
                    version: Some(req.version()),
                    cancelled: None,
                    handle: Some(rc.clone()),
                });
                let body: BoxBody<Bytes, Infallible> = match req.uri().path() {
                    "/slow" => {
                        let _ = rc.run(tokio::time::sleep(Duration::from_secs(30))).await;
                        Full::new(Bytes::from_static(b"late")).boxed()
                    }
                    "/stream" => {
                        let ticks = futures_util::stream::unfold((), |()| async {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Some((Ok(Frame::data(Bytes::from_static(b"tick\n"))), ()))
                        });
                        StreamBody::new(ticks).boxed()
                    }
                    "/stream3" => {
                        let ticks = futures_util::StreamExt::then(
                            futures_util::stream::iter(0..3),
                            |n| async move {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                Ok(Frame::data(Bytes::from(format!("tick {n}\n"))))
                            },
                        );
                        StreamBody::new(ticks).boxed()
                    }
                    _ => Full::new(Bytes::from_static(b"hello over TLS")).boxed(),
                };
                Ok::<_, Infallible>(Response::new(body))
            }
        }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tls::serve(listener, config, svc));
    addr
}

fn curl_available() -> bool {
    if Command::new("curl").arg("--version").output().is_ok() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "curl is missing on CI");
    eprintln!("curl is not installed: tests/tls.rs skipped");
    false
}

/// Runs curl with `args` against `path`; returns its output.
async fn curl(addr: std::net::SocketAddr, args: &[&str], path: &str) -> String {
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["-sk", "-N"])
        .args(args)
        .arg(format!("https://127.0.0.1:{}{path}", addr.port()));
    let output = command.output().await.unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until the last request's outcome is known: cancelled, or `done` for a completion.
async fn last_outcome(log: &Log) -> Seen {
    for _ in 0..500 {
        let last = log.lock().unwrap().last().cloned();
        if let Some(seen) = last {
            if seen.cancelled.is_some() {
                return seen;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    log.lock()
        .unwrap()
        .last()
        .cloned()
        .expect("a request reached the server")
}

#[tokio::test]
async fn curl_over_tls_gives_up_or_completes_and_the_layer_records_exactly_that() {
    if !curl_available() {
        return;
    }
    // (curl's protocol flag, the version the server must see)
    let protocols = [
        ("--http1.1", Version::HTTP_11),
        ("--http2", Version::HTTP_2),
    ];
    for (flag, version) in protocols {
        // Gives up while the handler runs.
        let log = Log::default();
        let addr = server(log.clone()).await;
        curl(addr, &[flag, "--max-time", "0.5"], "/slow").await;
        let seen = last_outcome(&log).await;
        assert_eq!(seen.version, Some(version), "{flag}");
        assert_eq!(
            seen.cancelled,
            Some((CancelReason::Disconnected, Phase::Handler)),
            "{flag} mid-handler"
        );

        // Gives up while the body streams.
        let log = Log::default();
        let addr = server(log.clone()).await;
        let out = curl(addr, &[flag, "--max-time", "0.5"], "/stream").await;
        assert!(out.starts_with("tick"), "{flag}: {out:?}");
        let seen = last_outcome(&log).await;
        assert_eq!(
            seen.cancelled,
            Some((CancelReason::Disconnected, Phase::Body)),
            "{flag} mid-body"
        );

        // Reads to the end: a full body and a streamed one. Nothing is cancelled, then or later.
        for (path, expected) in [
            ("/fast", "hello over TLS"),
            ("/stream3", "tick 0\ntick 1\ntick 2\n"),
        ] {
            let log = Log::default();
            let addr = server(log.clone()).await;
            let out = curl(addr, &[flag, "--max-time", "10"], path).await;
            assert_eq!(out, expected, "{flag} {path}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let seen = log.lock().unwrap().last().cloned().unwrap();
            assert_eq!(seen.version, Some(version), "{flag} {path}");
            assert_eq!(seen.cancelled, None, "{flag} {path} completed");
            assert!(!seen.handle.unwrap().is_cancelled(), "{flag} {path}");
        }
    }
}
