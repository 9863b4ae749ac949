//! What the attackers send: raw HTTP/1.1 over TCP, HTTP/2 with the `h2` crate's client (which
//! sends what hyper's client would not: a reset right behind HEADERS, one-byte DATA frames, a
//! wrong content-length, empty DATA frames), and a few HTTP/2 frames written by hand where
//! even `h2` would not (a header block that never ends).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub(crate) async fn write(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).await.unwrap();
}

/// Writes `data` as fast as the socket takes it, and stops once a write made no progress for
/// `stall` (the server no longer reads) or failed (the server closed). Returns the bytes
/// written.
pub(crate) async fn flood(stream: &mut TcpStream, data: &[u8], stall: Duration) -> usize {
    let mut written = 0;
    while written < data.len() {
        let end = data.len().min(written + 64 * 1024);
        match tokio::time::timeout(stall, stream.write(&data[written..end])).await {
            Ok(Ok(n)) if n > 0 => written += n,
            _ => break,
        }
    }
    written
}

/// Everything the server sends until it closes (or resets) the connection, or `within`
/// passes.
pub(crate) async fn read_all(stream: &mut TcpStream, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = vec![0; 16 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// The status line's code of an HTTP/1.1 answer ("-" if none: the server closed silently).
pub(crate) fn status_of(answer: &str) -> String {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .unwrap_or("-")
        .to_owned()
}

pub(crate) type H2 = h2::client::SendRequest<Bytes>;

/// An `h2` client connection over prior knowledge; its driver runs in a task.
pub(crate) async fn h2_connect(addr: SocketAddr) -> (H2, JoinHandle<Result<(), h2::Error>>) {
    let (client, driver, _) = h2_connect_socket(addr).await;
    (client, driver)
}

/// [`h2_connect`], with a clone of the socket (to reset the connection under the client).
pub(crate) async fn h2_connect_socket(
    addr: SocketAddr,
) -> (H2, JoinHandle<Result<(), h2::Error>>, TcpStream) {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let std = stream.into_std().unwrap();
    let clone = TcpStream::from_std(std.try_clone().unwrap()).unwrap();
    let stream = TcpStream::from_std(std).unwrap();
    let (client, connection) = h2::client::handshake(stream).await.unwrap();
    (client, tokio::spawn(connection), clone)
}

pub(crate) fn h2_request(addr: SocketAddr, method: &str, path: &str) -> http::request::Builder {
    http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
}

/// The response's status and body, or the error that ended the stream, as text.
pub(crate) async fn h2_answer(
    response: h2::client::ResponseFuture,
) -> Result<(u16, String), String> {
    let response = tokio::time::timeout(super::harness::PATIENCE, response)
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(data) = body.data().await {
        let data = data.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(data.len());
        text.extend_from_slice(&data);
    }
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

/// Sends `data` on `stream` as `count` DATA frames of `data.len()` bytes each, as fast as the
/// flow-control window opens, and stops once it stays shut for `stall` or the stream fails.
/// Returns the frames sent and the error, if any.
pub(crate) async fn h2_frames(
    stream: &mut h2::SendStream<Bytes>,
    data: Bytes,
    count: usize,
    stall: Duration,
    pace: Option<(usize, Duration)>,
) -> (usize, Option<String>) {
    let mut sent = 0;
    while sent < count {
        stream.reserve_capacity((count - sent).min(16 * 1024) * data.len());
        let capacity =
            tokio::time::timeout(stall, std::future::poll_fn(|cx| stream.poll_capacity(cx))).await;
        let capacity = match capacity {
            Err(_) => return (sent, Some("window stayed shut".into())),
            Ok(None) => return (sent, Some("stream closed".into())),
            Ok(Some(Err(e))) => return (sent, Some(e.to_string())),
            Ok(Some(Ok(n))) => n,
        };
        for _ in 0..(capacity / data.len()).min(count - sent) {
            if let Err(e) = stream.send_data(data.clone(), false) {
                return (sent, Some(e.to_string()));
            }
            sent += 1;
            if let Some((burst, pause)) = pace {
                if sent % burst == 0 {
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
    (sent, None)
}

/// The HTTP/2 connection preface and an empty SETTINGS frame: what a client sends first.
pub(crate) fn h2_preface() -> Vec<u8> {
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(h2_frame(0x4, 0, 0, &[]));
    bytes
}

/// One HTTP/2 frame: 24-bit length, type, flags, stream id, payload (RFC 9113 §4.1).
pub(crate) fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.push(kind);
    frame.push(flags);
    frame.extend(stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}
