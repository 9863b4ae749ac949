//! HTTP/3 under a hostile client (issue 22), with the hand-written client of
//! tests/common/http3.rs: each case asserts what the client sees (the stream's reset code, the
//! connection's close), what the handler sees (never called, or its body read failing), how
//! much the server let the client send (quinn's flow control: the client's UDP bytes), and
//! that nothing panicked anywhere in the process, caught or not.

#[macro_use]
mod common;
#[path = "common/http3.rs"]
mod http3;

use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http3::*;
use tokio_util::sync::CancellationToken;

const H3_FRAME_ERROR: u64 = 0x106;
const H3_EXCESSIVE_LOAD: u64 = 0x107;
const H3_MESSAGE_ERROR: u64 = 0x10e;

/// Every panic in this test process, caught (`catch_unwind`) or not.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

fn assert_no_panic() {
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic in the process");
}

/// A frame header: type and length.
fn frame_header(ty: u64, len: u64) -> Vec<u8> {
    let mut header = Vec::new();
    varint(ty, &mut header);
    varint(len, &mut header);
    header
}

/// Writes up to `total` bytes in 64 KiB writes until the server stops the stream: the bytes
/// the client's UDP socket sent meanwhile (what the server's flow control let through, plus
/// packet overhead), and the stop code.
async fn stream_until_stopped(
    raw: &RawClient,
    send: &mut quinn::SendStream,
    total: usize,
) -> (u64, Option<u64>) {
    let before = raw.conn.stats().udp_tx.bytes;
    let block = vec![0u8; 64 * 1024];
    let mut written = 0;
    let stopped = tokio::time::timeout(PATIENCE, async {
        while written < total {
            match send.write_all(&block).await {
                Ok(()) => written += block.len(),
                Err(quinn::WriteError::Stopped(code)) => return Some(code.into_inner()),
                Err(other) => panic!("{other}"),
            }
        }
        // All of it was taken: give the server the time to say no anyway.
        match tokio::time::timeout(Duration::from_secs(1), send.stopped()).await {
            Ok(Ok(Some(code))) => Some(code.into_inner()),
            _ => None,
        }
    })
    .await
    .expect("the stream neither took the bytes nor was stopped");
    (raw.conn.stats().udp_tx.bytes - before, stopped)
}

/// Whether a response's raw bytes (frames undecoded; h3 may add a grease frame) hold `text`.
fn contains(bytes: &[u8], text: &[u8]) -> bool {
    bytes.windows(text.len()).any(|window| window == text)
}

/// The connection still serves a plain request.
async fn still_serves(raw: &RawClient) {
    let (_send, mut recv) = raw.send(&headers_frame("GET", "/full", &[]), true).await;
    let (bytes, ending) = read_raw(&mut recv).await;
    assert_eq!(ending, Ending::Finished);
    assert!(contains(&bytes, b"hello"), "{bytes:?}");
}

/// A DATA frame announcing 100 bytes, 10 of them, a pause (h3 has read them all), then FIN:
/// h3 0.0.8 would report a clean end of the body and then assert. The connection is closed
/// with `H3_FRAME_ERROR` (RFC 9114 §7.1), the handler's read fails, nothing panics.
#[tokio::test]
async fn a_stream_ending_inside_a_data_frame_closes_the_connection() {
    count_panics();
    let (log, server, _in_flight) = start(Duration::from_secs(5)).await;
    let raw = RawClient::connect(&server).await;
    let mut request = headers_frame("POST", "/read", &[]);
    request.extend(data_frame_header(100));
    request.extend_from_slice(&[b'x'; 10]);
    let (mut send, mut recv) = raw.send(&request, false).await;
    log.wait_for("start /read").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    send.finish().unwrap();
    let (_, ending) = read_raw(&mut recv).await;
    assert_ne!(ending, Ending::Finished);
    let closed = tokio::time::timeout(PATIENCE, raw.conn.closed())
        .await
        .unwrap();
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(close) if close.error_code.into_inner() == H3_FRAME_ERROR),
        "{closed}"
    );
    log.wait_for_count("read-error /read", 1).await;
    assert!(!log.entries().iter().any(|e| e.starts_with("read 10")));
    assert_no_panic();
}

/// A frame that announces 64 MiB, 32 MiB of it streamed: the stream is stopped and reset with
/// `H3_EXCESSIVE_LOAD` at its length, long before quinn's window lets the 32 MiB through; no
/// handler is called, the connection serves on.
async fn oversized_frame_is_stopped(prefix: &[u8], ty: u64, handler_reads: bool) {
    count_panics();
    let (log, server, _in_flight) = start(Duration::from_secs(5)).await;
    let raw = RawClient::connect(&server).await;
    let (mut send, mut recv) = raw.send(prefix, false).await;
    if handler_reads {
        log.wait_for("start /read").await;
    }
    // The announced length is enough: the stream is reset with nothing more sent.
    send.write_all(&frame_header(ty, 64 << 20)).await.unwrap();
    send.write_all(&[0; 1000]).await.unwrap();
    let (_, ending) = read_raw(&mut recv).await;
    assert_eq!(ending, Ending::Reset(H3_EXCESSIVE_LOAD));
    let (sent, stopped) = stream_until_stopped(&raw, &mut send, 32 << 20).await;
    println!(
        "frame type {ty:#x} announcing 64 MiB: the client sent {sent} bytes, stopped: {stopped:?}"
    );
    assert_eq!(stopped, Some(H3_EXCESSIVE_LOAD));
    // quinn's stream window (1.25 MB by default) at most, not the 32 MiB.
    assert!(sent < 4 << 20, "{sent} bytes got through");
    still_serves(&raw).await;
    if handler_reads {
        log.wait_for_count("read-error /read", 1).await;
    } else {
        assert!(!log.entries().iter().any(|e| e.contains("/read")));
    }
    assert_no_panic();
}

#[tokio::test]
async fn a_headers_frame_over_the_bound_is_stopped_at_its_length() {
    oversized_frame_is_stopped(b"", 0x01, false).await;
}

#[tokio::test]
async fn an_unknown_frame_over_the_bound_is_stopped_before_the_headers() {
    oversized_frame_is_stopped(b"", 0x21, false).await;
}

#[tokio::test]
async fn an_unknown_frame_over_the_bound_is_stopped_inside_a_body() {
    let mut prefix = headers_frame("POST", "/read", &[]);
    prefix.extend(data_frame_header(10));
    prefix.extend_from_slice(&[b'x'; 10]);
    oversized_frame_is_stopped(&prefix, 0x21, true).await;
}

/// Small unknown frames before the HEADERS frame count against the same bound: 100 of 1000
/// bytes are refused once they pass 64 KiB.
#[tokio::test]
async fn many_small_unknown_frames_count_against_the_head() {
    count_panics();
    let (log, server, _in_flight) = start(Duration::from_secs(5)).await;
    let raw = RawClient::connect(&server).await;
    let mut request = Vec::new();
    for _ in 0..100 {
        request.extend(frame_header(0x21, 1000));
        request.extend_from_slice(&[0; 1000]);
    }
    request.extend(headers_frame("GET", "/full", &[]));
    let (_send, mut recv) = raw.send(&request, true).await;
    let (_, ending) = read_raw(&mut recv).await;
    assert_eq!(ending, Ending::Reset(H3_EXCESSIVE_LOAD));
    assert_eq!(log.with_prefix("start /full"), Vec::<String>::new());
    still_serves(&raw).await;
    assert_no_panic();
}

/// Streams that never finish their HEADERS frame are ended at the header deadline with
/// `H3_REQUEST_REJECTED`, each of them, and what they sent is freed; no handler is called.
#[tokio::test]
async fn half_a_headers_frame_is_ended_at_the_header_deadline() {
    count_panics();
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let svc = stack(&log, &shutdown, &InFlight::default());
    let transport = quinn::TransportConfig::default();
    let server = H3Server::start_tuned(svc, shutdown, transport, |serve| {
        serve.header_read_timeout(Duration::from_millis(300))
    })
    .await;
    let raw = RawClient::connect(&server).await;
    let began = Instant::now();
    let mut streams = Vec::new();
    for _ in 0..50 {
        let mut half = frame_header(0x01, 2000);
        half.extend_from_slice(&[0; 1000]);
        streams.push(raw.send(&half, false).await);
    }
    for (_send, recv) in &mut streams {
        let (_, ending) = read_raw(recv).await;
        assert_eq!(ending, Ending::Reset(H3_REQUEST_REJECTED));
    }
    let (send, _) = &streams[0];
    let stopped = tokio::time::timeout(PATIENCE, send.stopped())
        .await
        .unwrap();
    assert_eq!(
        stopped.unwrap().map(|code| code.into_inner()),
        Some(H3_REQUEST_REJECTED)
    );
    let elapsed = began.elapsed();
    println!("50 half HEADERS frames ended after {elapsed:?} (deadline 300 ms)");
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    still_serves(&raw).await;
    assert!(
        log.entries().iter().all(|e| e.contains("/full")),
        "{:?}",
        log.entries()
    );
    assert_no_panic();
}

/// `content-length` against the DATA received (RFC 9114 §4.1.2): fewer or more bytes, or a
/// length that is not a number, is malformed. The handler's read fails (or it is never called),
/// and the client sees the stream reset with `H3_MESSAGE_ERROR`, never a response.
#[tokio::test]
async fn a_body_that_does_not_match_its_content_length_is_malformed() {
    count_panics();
    let (log, server, _in_flight) = start(Duration::from_secs(5)).await;
    let raw = RawClient::connect(&server).await;
    for (length, sent) in [("100", 10), ("100", 200), ("10", 10)] {
        let mut request = headers_frame("POST", "/read", &[("content-length", length)]);
        request.extend(data_frame_header(sent as u64));
        request.extend(vec![b'x'; sent]);
        let (_send, mut recv) = raw.send(&request, true).await;
        let (bytes, ending) = read_raw(&mut recv).await;
        if length == sent.to_string() {
            assert_eq!(ending, Ending::Finished);
            assert!(contains(&bytes, b"read 10"), "{bytes:?}");
            continue;
        }
        assert_eq!(
            ending,
            Ending::Reset(H3_MESSAGE_ERROR),
            "{length} vs {sent}"
        );
    }
    log.wait_for_count("read-error /read", 2).await;
    assert_eq!(log.with_prefix("read-error /read").len(), 2);
    // Not a number: no handler sees it.
    let request = headers_frame("POST", "/read", &[("content-length", "ten")]);
    let (_send, mut recv) = raw.send(&request, true).await;
    assert_eq!(read_raw(&mut recv).await.1, Ending::Reset(H3_MESSAGE_ERROR));
    assert_eq!(log.with_prefix("start /read").len(), 3);
    still_serves(&raw).await;
    assert_no_panic();
}

/// Zero-length DATA frames, and small unknown frames, anywhere in a body: the body goes on to
/// its end (h3 alone would end it at the empty frame, then close the connection on the next
/// DATA frame).
#[tokio::test]
async fn empty_data_frames_and_unknown_frames_in_a_body_are_skipped() {
    count_panics();
    let (log, server, _in_flight) = start(Duration::from_secs(5)).await;
    let raw = RawClient::connect(&server).await;
    let mut request = frame_header(0x21, 3);
    request.extend_from_slice(b"abc");
    request.extend(headers_frame("POST", "/read", &[("content-length", "10")]));
    request.extend(data_frame_header(0));
    request.extend(data_frame_header(5));
    request.extend_from_slice(b"xxxxx");
    request.extend(data_frame_header(0));
    request.extend(frame_header(0x21, 2));
    request.extend_from_slice(b"zz");
    request.extend(data_frame_header(5));
    request.extend_from_slice(b"yyyyy");
    request.extend(data_frame_header(0));
    let (_send, mut recv) = raw.send(&request, true).await;
    let (bytes, ending) = read_raw(&mut recv).await;
    assert_eq!(ending, Ending::Finished);
    assert!(contains(&bytes, b"read 10"), "{bytes:?}");
    still_serves(&raw).await;
    assert!(!log.entries().iter().any(|e| e.starts_with("read-error")));
    assert_no_panic();
}

/// `Serve` resolves to an error when its endpoint stops without the graceful shutdown.
#[tokio::test]
async fn serve_returns_the_endpoint_stopping() {
    let (_log, server, _in_flight) = start(Duration::from_secs(1)).await;
    server.endpoint.close(0u32.into(), b"closed elsewhere");
    let result = tokio::time::timeout(PATIENCE, server.task)
        .await
        .unwrap()
        .unwrap();
    let error = result.expect_err("an endpoint closed elsewhere is an error");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionAborted);
}
