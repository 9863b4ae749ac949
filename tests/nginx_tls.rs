//! nginx as deployed in front of the server: `listen … ssl` with HTTP/2 (ALPN), the setup of
//! the Gin write-up this crate answers. A client over HTTP/2 gives up at nginx, and the request
//! behind nginx is cancelled, whatever nginx speaks to the server:
//!
//! - `proxy_pass http://`, HTTP/1.1 (the write-up's `/http1` location);
//! - `proxy_pass https://` with `proxy_ssl_verify off`, HTTP/1.1 over TLS, with and without
//!   upstream keepalive;
//! - `proxy_pass https://` with nginx's default HTTP/1.0 (the write-up's `/http2` location);
//! - `grpc_pass grpc://`, HTTP/2.
//!
//! Clients: hyper's HTTP/2 client over rustls (ALPN `h2`, nginx's certificate trusted), which
//! resets its stream (`RST_STREAM`) when its response future or body is dropped, and curl
//! `-k --http2` giving up with `--max-time`, in the handler and mid-body, or reading to the
//! end. Every cell asserts the reason and phase the server recorded, and that nothing else
//! was cancelled.
#![cfg(unix)]

mod common;
#[path = "common/nginx.rs"]
mod nginx;
#[allow(dead_code)]
#[path = "../examples/https/tls.rs"]
mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nginx::*;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Every way nginx talks to the server, behind the TLS front.
const UPSTREAMS: [Upstream; 5] = [PROXY, PROXY_TLS, PROXY_TLS_KEEPALIVE, PROXY_TLS_10, GRPC];

/// One cell's setup: the server (over TLS if the upstream wants it), nginx in front of it.
async fn start(bin: &str, upstream: Upstream) -> (Log, Server, Nginx) {
    let log = Log::default();
    let server = backend(&log, upstream).await;
    let nginx = Nginx::start_with(bin, Front::Tls, upstream, &server).await;
    (log, server, nginx)
}

/// hyper's HTTP/2 client over TLS to nginx, trusting nginx's certificate; asserts that ALPN
/// chose `h2`.
async fn h2_tls_client(nginx: &Nginx) -> (H2Sender, tokio::task::JoinHandle<()>) {
    let mut roots = rustls::RootCertStore::empty();
    let pem = nginx.cert_pem.as_deref().expect("a TLS front");
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(nginx.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

fn get(nginx: &Nginx, path: &str) -> http::Request<http_body_util::Empty<Bytes>> {
    http::Request::get(nginx.url(path))
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// curl `-k --http2` at nginx; returns what it printed: the body, then (`-w`) a line with the
/// HTTP version nginx answered with.
async fn curl(nginx: &Nginx, max_time: &str, path: &str) -> String {
    let output = tokio::process::Command::new("curl")
        .args(["-sk", "-N", "--http2", "--max-time", max_time])
        .args(["-w", "\nversion=%{http_version}"])
        .arg(nginx.url(path))
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn curl_available() -> bool {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "curl is missing on CI: .ci/run must install it"
    );
    eprintln!("skipping: curl is not installed");
    false
}

/// After a cell: nginx and its connections to the server are gone, so everything a request
/// could trigger has happened; returns the layer's entries.
async fn settle(log: &Log, server: Server, nginx: Nginx) -> Vec<String> {
    drop(nginx);
    server.idle().await;
    log.with_prefix("layer")
}

#[tokio::test]
async fn http2_reset_stream_at_nginx_cancels_the_request_behind_it() {
    let Some(bin) = nginx() else { return };
    for upstream in UPSTREAMS {
        let (log, server, nginx) = start(bin, upstream).await;
        let (mut client, conn) = h2_tls_client(&nginx).await;
        let pending = tokio::spawn(client.send_request(get(&nginx, "/slow")));
        log.wait_for("start /slow").await;
        let left = Instant::now();
        pending.abort(); // drops the response future: RST_STREAM(CANCEL) to nginx
        let how = format!("TLS + HTTP/2 RST_STREAM at nginx, {upstream:?}");
        assert_slow_cancelled(&log, left, &how).await;
        // The client's connection to nginx survives the reset: the next request completes.
        let response = client.send_request(get(&nginx, "/full")).await.unwrap();
        assert_eq!(response.status(), 200, "{how}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello", "{how}");
        drop(client);
        tokio::time::timeout(PATIENCE, conn).await.unwrap().unwrap();
        assert_eq!(
            settle(&log, server, nginx).await,
            ["layer /slow disconnected handler"],
            "{how}"
        );
        assert_only_slow_cancelled(&log, 2);
    }
}

#[tokio::test]
async fn http2_body_dropped_at_nginx_cancels_the_body_behind_it() {
    let Some(bin) = nginx() else { return };
    for upstream in UPSTREAMS {
        let (log, server, nginx) = start(bin, upstream).await;
        let (mut client, conn) = h2_tls_client(&nginx).await;
        let response = client.send_request(get(&nginx, "/endless")).await.unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(first.starts_with(b"chunk"), "{first:?}");
        let left = Instant::now();
        drop(body); // RST_STREAM(CANCEL) mid-body
        log.wait_for("layer /endless disconnected body").await;
        eprintln!(
            "TLS + HTTP/2 body dropped at nginx, {upstream:?}: layer callback {:?} after",
            left.elapsed()
        );
        drop(client);
        tokio::time::timeout(PATIENCE, conn).await.unwrap().unwrap();
        let how = format!("{upstream:?}");
        assert_eq!(
            settle(&log, server, nginx).await,
            ["layer /endless disconnected body"],
            "{how}"
        );
        assert_eq!(
            log.with_prefix("handler"),
            ["handler /endless disconnected body"],
            "{how}"
        );
        assert_eq!(log.with_prefix("body-dropped"), ["body-dropped /endless"]);
    }
}

#[tokio::test]
async fn curl_over_http2_giving_up_at_nginx_cancels_the_request_behind_it() {
    let Some(bin) = nginx() else { return };
    if !curl_available() {
        return;
    }
    // (path, curl's --max-time, what the layer records); curl leaves at --max-time, closing
    // its connection. Mid-body waits 2 s: over HTTP/1.0 nginx buffers the server's
    // close-delimited body and forwards its first 4 KiB after about 1.5 s.
    let cells = [
        ("/slow", "0.5", "layer /slow disconnected handler"),
        ("/endless", "2", "layer /endless disconnected body"),
    ];
    // The cells run at once, each with its own server and nginx: curl's waits add up otherwise.
    let cells = UPSTREAMS
        .into_iter()
        .flat_map(|upstream| cells.map(|cell| (upstream, cell)))
        .map(|(upstream, (path, max_time, expected))| async move {
            let (log, server, nginx) = start(bin, upstream).await;
            let out = curl(&nginx, max_time, path).await;
            if path == "/endless" {
                assert!(out.starts_with("chunk"), "{upstream:?}: {out:?}");
            }
            log.wait_for(expected).await;
            assert_eq!(
                settle(&log, server, nginx).await,
                [expected],
                "curl --http2 {path}, {upstream:?}"
            );
            let handles = log.handles();
            assert_eq!(handles.len(), 1);
            assert_eq!(
                handles[0].reason(),
                Some(tower_cancel::CancelReason::Disconnected)
            );
        });
    futures_util::future::join_all(cells).await;
}

#[tokio::test]
async fn requests_through_nginx_over_tls_that_complete_cancel_nothing() {
    let Some(bin) = nginx() else { return };
    if !curl_available() {
        return;
    }
    let expected_stream = String::from_utf8(CHUNK.repeat(3)).unwrap();
    for upstream in UPSTREAMS {
        for (path, body) in [("/full", "hello"), ("/stream", expected_stream.as_str())] {
            let (log, server, nginx) = start(bin, upstream).await;
            let out = curl(&nginx, "10", path).await;
            // nginx answered over HTTP/2, and the whole body arrived.
            assert_eq!(out, format!("{body}\nversion=2"), "{path}, {upstream:?}");
            // Then the hyper client over TLS, on one connection, twice.
            let (mut client, conn) = h2_tls_client(&nginx).await;
            for _ in 0..2 {
                let response = client.send_request(get(&nginx, path)).await.unwrap();
                let got = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(got, body.as_bytes(), "{path}, {upstream:?}");
            }
            drop(client);
            tokio::time::timeout(PATIENCE, conn).await.unwrap().unwrap();
            // Nothing cancelled, even once nginx and its upstream connections are gone.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(
                settle(&log, server, nginx).await.is_empty(),
                "{path}, {upstream:?}: {:?}",
                log.entries()
            );
            assert_eq!(log.handles().len(), 3, "{path}, {upstream:?}");
            assert_all_completed(&log);
        }
    }
}
