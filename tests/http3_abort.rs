//! The hostile HTTP/3 cases of issue 22 against a server process built with `panic = "abort"`
//! (tests/http3/abort-server): one panic reachable from the wire would end it. After each case
//! the process must still be alive and answer; its RSS growth under the memory attacks is
//! printed and bounded.
//!
//! `.ci/run` builds the server (`cargo build --manifest-path tests/http3/abort-server/Cargo.toml
//! --target-dir target/abort-server`); elsewhere the test skips without it, saying so.

#[macro_use]
mod common;
#[path = "common/http3.rs"]
mod http3;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use http3::*;
use rustls::pki_types::CertificateDer;

const H3_MESSAGE_ERROR: u64 = 0x10e;

/// The server process, killed when dropped.
struct Server {
    child: Child,
    addr: std::net::SocketAddr,
    cert: CertificateDer<'static>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts the server with a header read timeout of `header_timeout`; `None` if it was not
    /// built (outside CI).
    fn start(header_timeout: Duration) -> Option<Self> {
        let default = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target/abort-server/debug/tower-cancel-h3-abort-server");
        let binary =
            std::env::var_os("TOWER_CANCEL_H3_ABORT_SERVER").map_or(default, PathBuf::from);
        if !binary.exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{} is missing on CI: .ci/run must build it",
                binary.display()
            );
            eprintln!(
                "skipping: {} is not built (cargo build --manifest-path \
                 tests/http3/abort-server/Cargo.toml --target-dir target/abort-server)",
                binary.display()
            );
            return None;
        }
        let mut child = Command::new(&binary)
            .arg(header_timeout.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let (port, hex) = line.trim().split_once(' ').expect("PORT CERT_HEX");
        let der = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>();
        Some(Server {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            cert: CertificateDer::from(der),
        })
    }

    /// The resident set size, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    /// The process is alive and serves a plain request on a new connection.
    async fn answers(&mut self) -> RawClient {
        assert!(self.child.try_wait().unwrap().is_none(), "the server died");
        let raw = RawClient::connect_to(&self.cert, self.addr).await;
        let (_send, mut recv) = raw.send(&headers_frame("GET", "/", &[]), true).await;
        let (bytes, ending) = read_raw(&mut recv).await;
        assert_eq!(ending, Ending::Finished);
        assert!(bytes.windows(5).any(|w| w == b"hello"), "{bytes:?}");
        raw
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A frame header: type and length.
fn frame_header(ty: u64, len: u64) -> Vec<u8> {
    let mut header = Vec::new();
    varint(ty, &mut header);
    varint(len, &mut header);
    header
}

/// Announces a 64 MiB frame of type `ty` after `prefix` and streams 32 MiB into it (or until
/// the server stops the stream): the server's RSS growth.
async fn streamed_frame_attack(server: &mut Server, prefix: &[u8], ty: u64) -> u64 {
    let raw = server.answers().await;
    let before = server.rss();
    let (mut send, _recv) = raw.send(prefix, false).await;
    send.write_all(&frame_header(ty, 64 << 20)).await.unwrap();
    let block = vec![0u8; 256 * 1024];
    let mut written = 0u64;
    let streamed = tokio::time::timeout(Duration::from_secs(60), async {
        while written < 32 << 20 {
            if send.write_all(&block).await.is_err() {
                break;
            }
            written += block.len() as u64;
        }
    });
    streamed.await.expect("32 MiB neither taken nor stopped");
    // What the server holds once the client's bytes have arrived.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let growth = server.rss().saturating_sub(before);
    println!(
        "frame {ty:#x} announcing 64 MiB: client wrote {:.1} MiB, server RSS +{:.1} MiB",
        mib(written),
        mib(growth)
    );
    growth
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_do_not_take_down_a_panic_abort_server() {
    let Some(mut server) = Server::start(Duration::from_secs(2)) else {
        return;
    };
    let raw = server.answers().await;

    // Ends inside a DATA frame, after a pause (h3 alone asserts): the connection is closed.
    let mut request = headers_frame("POST", "/read", &[]);
    request.extend(data_frame_header(100));
    request.extend_from_slice(&[b'x'; 10]);
    let (mut send, _recv) = raw.send(&request, false).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    send.finish().unwrap();
    tokio::time::timeout(PATIENCE, raw.conn.closed())
        .await
        .unwrap();
    let raw = server.answers().await;

    // content-length against the DATA; an empty DATA frame mid-body.
    for (length, sent, expected) in [
        ("100", 10, Ending::Reset(H3_MESSAGE_ERROR)),
        ("100", 200, Ending::Reset(H3_MESSAGE_ERROR)),
        ("10", 10, Ending::Finished),
    ] {
        let mut request = headers_frame("POST", "/read", &[("content-length", length)]);
        request.extend(data_frame_header(5));
        request.extend(vec![b'x'; 5]);
        request.extend(data_frame_header(0));
        request.extend(data_frame_header(sent as u64 - 5));
        request.extend(vec![b'x'; sent - 5]);
        let (_send, mut recv) = raw.send(&request, true).await;
        assert_eq!(read_raw(&mut recv).await.1, expected, "{length} vs {sent}");
    }

    server.answers().await;
}

/// One memory attack on a fresh server: 64 MiB announced, 32 MiB streamed, in a frame of type
/// `ty` after `prefix`. Its RSS growth is printed (`--nocapture`) and bounded (quinn's stream
/// window, 1.25 MB, is what a stopped stream may still bring in).
async fn frame_attack(prefix: &[u8], ty: u64) {
    let Some(mut server) = Server::start(Duration::from_secs(2)) else {
        return;
    };
    let growth = streamed_frame_attack(&mut server, prefix, ty).await;
    assert!(growth < 8 << 20, "RSS grew by {:.1} MiB", mib(growth));
    server.answers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_64_mib_headers_frame() {
    frame_attack(b"", 0x01).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_64_mib_unknown_frame_before_the_headers() {
    frame_attack(b"", 0x21).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_64_mib_unknown_frame_in_a_body() {
    let mut prefix = headers_frame("POST", "/read", &[]);
    prefix.extend(data_frame_header(10));
    prefix.extend_from_slice(&[b'x'; 10]);
    frame_attack(&prefix, 0x21).await;
}

/// 500 streams (5 connections of quinn's default 100) with half a HEADERS frame each: what the
/// server holds for them, and their end at the header deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_500_half_headers_frames() {
    let Some(mut server) = Server::start(Duration::from_secs(2)) else {
        return;
    };
    server.answers().await;
    let before = server.rss();
    let mut clients = Vec::new();
    let mut held = Vec::new();
    for _ in 0..5 {
        let raw = RawClient::connect_to(&server.cert, server.addr).await;
        for _ in 0..100 {
            let mut half = frame_header(0x01, 2000);
            half.extend_from_slice(&[0; 1000]);
            held.push(raw.send(&half, false).await);
        }
        clients.push(raw);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let growth = server.rss().saturating_sub(before);
    println!(
        "500 half HEADERS frames: server RSS +{:.1} MiB while held",
        mib(growth)
    );
    // All of them ended at the header deadline (2 s), the connections still open.
    for (_send, recv) in &mut held {
        let (_, ending) = read_raw(recv).await;
        assert_eq!(ending, Ending::Reset(H3_REQUEST_REJECTED));
    }
    assert!(growth < 6 << 20, "RSS grew by {:.1} MiB", mib(growth));
    server.answers().await;
}
