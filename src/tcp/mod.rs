//! What the kernel knows of a connection's peer, put to use on servers that accept TCP
//! connections themselves: [`PeerWatch`] sees a client close or reset its connection while
//! hyper is not reading (an upload left unread), and [`detect_vanished`] makes the kernel
//! notice a client that vanished without a word. Both need feature `socket2`.
//!
//! # A client that leaves an unread upload: `PeerWatch`
//!
//! Over HTTP/1.1, hyper reads the socket only when it wants the next bytes. While a request
//! body is unread (a handler still deciding, or waiting on a database before it reads the
//! upload), a client that closes or resets its connection is not seen, and the handler runs
//! to its end (Go's server has the same gap, golang/go#23262). The kernel knows at once: a
//! FIN raises `EPOLLRDHUP` and a RST `EPOLLERR`, whatever sits unread in the receive buffer.
//! [`PeerWatch`] takes that notice from a registration of its own, reads nothing, and drops
//! the connection's request in flight as hyper would, so a
//! [`CancellationLayer`](crate::CancellationLayer) inside cancels it with
//! [`Disconnected`](crate::CancelReason::Disconnected): nothing read ahead, no memory held,
//! `Expect: 100-continue` untouched. One line in the accept loop, beside `detect_vanished`:
//!
//! ```no_run
//! # async fn handler(_: http::Request<hyper::body::Incoming>)
//! #     -> Result<http::Response<String>, std::convert::Infallible> { unimplemented!() }
//! # use hyper_util::rt::{TokioExecutor, TokioIo};
//! # use hyper_util::server::conn::auto;
//! # use hyper_util::service::TowerToHyperService;
//! # use tower::ServiceBuilder;
//! # use tower_cancel::CancellationLayer;
//! # async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
//! # let svc = ServiceBuilder::new().layer(CancellationLayer::new()).service_fn(handler);
//! loop {
//!     let (stream, _) = listener.accept().await?;
//!     let svc = tower_cancel::tcp::PeerWatch::new(&stream)?.service(svc.clone());
//!     // ... serve `stream` with `svc`, as before
//! #   tokio::spawn(auto::Builder::new(TokioExecutor::new())
//! #       .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc)).into_owned());
//! }
//! # }
//! ```
//!
//! With axum, serve with `into_make_service_with_connect_info::<PeerWatch>()` and put a
//! [`PeerWatchLayer`] outside the `CancellationLayer` (features `axum` and `socket2`):
//!
//! ```toml
//! [dependencies]
//! tower-cancel = { version = "0.1", features = ["axum", "socket2"] }
//! axum = "0.8"
//! tokio = { version = "1", features = ["net"] }
//! ```
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # async fn run(app: axum::Router) -> std::io::Result<()> {
//! use std::time::Duration;
//!
//! use tower_cancel::CancellationLayer;
//! use tower_cancel::tcp::{PeerWatch, PeerWatchLayer};
//!
//! let app = app
//!     .layer(CancellationLayer::new())
//!     .layer(PeerWatchLayer::new()); // outside: it drops what the layer guards
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:3000").await?;
//! // `tap_io` and `Connected` do not combine; set on the listener, the options reach every
//! // connection it accepts (Linux).
//! tower_cancel::tcp::detect_vanished(&listener, Duration::from_secs(10))?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<PeerWatch>()).await
//! # }
//! ```
//!
//! Measured (`cargo bench --bench detection`, loopback, 200 iterations): a client that sends
//! 64 KiB of a 1 MiB upload nobody reads, then closes, is cancelled 8 µs p50 (41 µs p99)
//! after its close, and 8 µs / 29 µs after a reset; `RequestBodyLayer::read_ahead(2 MiB)`
//! takes 85 µs / 199 µs for a client that sent the whole upload, and holds it in memory. `tests/peer_watch.rs`
//! has the table (FIN, RST and half-close, with and without the watch, with half-close
//! allowed, handler and body phase), HTTP/2, curl giving up mid-upload (cleartext and TLS),
//! nginx in front (`proxy_request_buffering off`: it closes its upstream connection when its
//! client leaves), axum, and keep-alive and pipelined requests, which never cancel anything.
//!
//! What it cannot see, and when read-ahead is still the answer:
//!
//! * **A FIN stuck behind the upload.** A client that closes while flow control holds its
//!   upload (the server's receive window full, nothing read) queues its FIN behind the bytes
//!   still in its own send buffer: no FIN leaves its kernel until the server reads. A RST (a
//!   killed process, `SO_LINGER` 0) discards them and is seen at once. On loopback the window
//!   took about 4 MB; on the internet it is what the path's buffers hold.
//!   [`RequestBodyLayer::read_ahead`](crate::request_body::RequestBodyLayer::read_ahead) reads
//!   the window open, at the memory it holds.
//! * **A half-close.** The kernel reports a client that only shut down its sending half the
//!   same as one that closed: see [`PeerWatch`]'s half-close section, and
//!   [`PeerWatch::allowing_half_close`].
//! * **Platforms without the notice** (Windows): the watch never fires.
//!
//! # Clients that vanish: `detect_vanished`
//!
//! Clients that vanish without a word (a phone that goes offline, a cable pulled, a NAT that
//! forgets the connection) send no FIN and no RST: nothing arrives, and hyper, which only
//! learns of a closed connection from the socket, never drops the request. The kernel can
//! notice, if asked: TCP keepalive probes an idle connection, and `TCP_USER_TIMEOUT` bounds how
//! long sent data may stay unacknowledged. [`detect_vanished`] sets both from one number, so
//! that the connection fails within that bound, hyper drops the request, and the layer cancels
//! it with [`Disconnected`](crate::CancelReason::Disconnected).
//!
//! ```toml
//! [dependencies]
//! tower-cancel = { version = "0.1", features = ["socket2"] }
//! tokio = { version = "1", features = ["net"] }
//! ```
//!
//! ```no_run
//! use std::time::Duration;
//!
//! # async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
//! loop {
//!     let (stream, _) = listener.accept().await?;
//!     // A client that vanishes is noticed within 10 s, whether the connection is idle
//!     // (keepalive) or the server is writing to it (TCP_USER_TIMEOUT).
//!     tower_cancel::tcp::detect_vanished(&stream, Duration::from_secs(10))?;
//!     // ... serve the connection with hyper
//! }
//! # }
//! ```
//!
//! HTTP/2 has its own probe, which needs no socket option: hyper's
//! `http2().keep_alive_interval(..)` and `keep_alive_timeout(..)` close a connection whose
//! PING goes unanswered. Use both on a server that speaks both protocols.
//!
//! Without either, a client that vanishes mid-request leaves its handler running to its end
//! (Gin did the same in the write-up this crate answers).
//!
//! ## With axum
//!
//! `axum::serve` accepts the connections itself; its listener's `tap_io` reaches each one:
//!
//! ```toml
//! [dependencies]
//! tower-cancel = { version = "0.1", features = ["socket2"] }
//! axum = "0.8"
//! tokio = { version = "1", features = ["net"] }
//! ```
//!
//! ```no_run
//! # use std::time::Duration;
//! # async fn run(app: axum::Router) -> std::io::Result<()> {
//! use axum::serve::ListenerExt;
//!
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:3000").await?.tap_io(|tcp| {
//!     let _ = tower_cancel::tcp::detect_vanished(tcp, Duration::from_secs(10));
//! });
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! ## Measured
//!
//! `tests/vanish.rs` re-runs each test in a private network namespace (`unshare --net`) that
//! drops the client's packets with `iptables`, so the wire really goes silent: a 6 s bound
//! cancelled an HTTP/1.1 request in 6.0 s (handler running) and 6.5 s (body streaming), and a
//! 3 s PING with a 3 s timeout in 5.8 s; without the helper the HTTP/1.1 request still ran after
//! 8 s. `tests/keepalive.rs`: HTTP/2 PING every 100 ms with a 200 ms timeout saw a client
//! behind a relay that stopped forwarding about 0.2 s later.
//!
//! ## Platforms
//!
//! * Linux and Android: keepalive time, interval and probe count, and `TCP_USER_TIMEOUT`: the
//!   bound holds for idle connections and for connections the server writes to.
//! * Other Unix systems and Windows: keepalive time and interval where the system has them
//!   (the probe count stays the system's), no `TCP_USER_TIMEOUT`: idle connections are probed,
//!   but a connection the server writes to is only given up on by the system's own
//!   retransmission timeout (minutes).
//!
//! Keepalive settings count in whole seconds on most systems: the bound is rounded so that it
//! is never exceeded, with one second as the smallest step (a bound under 2 s probes every
//! second).

use std::io;
use std::time::Duration;

mod peer;
mod service;

pub use self::peer::{PeerLeft, PeerWatch};
pub use self::service::{
    PeerGone, PeerWatchBody, PeerWatchFuture, PeerWatchLayer, PeerWatchService,
};

use socket2::{SockRef, TcpKeepalive};

/// Keepalive probes sent before the connection is given up, on systems where it can be set.
const PROBES: u32 = 3;

/// The keepalive settings for `bound`: the first probe after half of it, then [`PROBES`]
/// probes spread over the other half, each in whole seconds, at least one.
fn keepalive(bound: Duration) -> (Duration, Duration) {
    let secs = bound.as_secs().max(2);
    let idle = Duration::from_secs((secs / 2).max(1));
    let interval = Duration::from_secs(((secs - secs / 2) / u64::from(PROBES)).max(1));
    (idle, interval)
}

/// Sets TCP keepalive and, where the system has it, `TCP_USER_TIMEOUT` on an accepted
/// connection, so that a peer that vanished without FIN or RST makes the connection fail
/// within about `bound`: whether the connection is idle (keepalive) or the server is writing
/// to it (`TCP_USER_TIMEOUT`).
///
/// Works on anything that owns a TCP socket: `tokio::net::TcpStream`, `std::net::TcpStream`,
/// the stream axum's `ListenerExt::tap_io` hands over. See the [module docs](self) for what
/// each platform supports.
///
/// # Errors
///
/// The error of the first socket option the system refused.
#[cfg(unix)]
// One function on Unix and one on Windows (below): the docs, built on Linux, name both (an
// explicit `doc(cfg)` replaces the derived one, so it repeats the feature).
#[cfg_attr(docsrs, doc(cfg(all(feature = "socket2", any(unix, windows)))))]
pub fn detect_vanished<S: std::os::fd::AsFd>(stream: &S, bound: Duration) -> io::Result<()> {
    apply(&SockRef::from(stream), bound)
}

/// Sets TCP keepalive on an accepted connection so that a peer that vanished without FIN or
/// RST makes an idle connection fail within about `bound` (Windows has no `TCP_USER_TIMEOUT`).
///
/// # Errors
///
/// The error of the first socket option the system refused.
#[cfg(windows)]
pub fn detect_vanished<S: std::os::windows::io::AsSocket>(
    stream: &S,
    bound: Duration,
) -> io::Result<()> {
    apply(&SockRef::from(stream), bound)
}

fn apply(socket: &SockRef<'_>, bound: Duration) -> io::Result<()> {
    let (idle, interval) = keepalive(bound);
    let params = TcpKeepalive::new().with_time(idle);
    // Where socket2 can set the probe interval (and, but for Windows, the count).
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_vendor = "apple",
        windows
    ))]
    let params = params.with_interval(interval);
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_vendor = "apple"
    ))]
    let params = params.with_retries(PROBES);
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_vendor = "apple",
        windows
    )))]
    let _ = interval;
    socket.set_tcp_keepalive(&params)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket.set_tcp_user_timeout(Some(bound.max(Duration::from_secs(1))))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probes_fit_in_the_bound() {
        let s = Duration::from_secs;
        for (bound, idle, interval) in [
            (s(10), s(5), s(1)),
            (s(30), s(15), s(5)),
            (s(3), s(1), s(1)),
            (Duration::from_millis(500), s(1), s(1)),
        ] {
            assert_eq!(keepalive(bound), (idle, interval), "{bound:?}");
            if bound >= s(4) {
                assert!(idle + interval * PROBES <= bound, "{bound:?}");
            }
        }
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn the_options_are_set_on_the_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        detect_vanished(&stream, Duration::from_secs(10)).unwrap();
        assert_set_for_10_s(&SockRef::from(&stream));
    }

    /// The options `detect_vanished(_, 10 s)` sets.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn assert_set_for_10_s(socket: &SockRef<'_>) {
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(5));
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(1)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), PROBES);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(10))
        );
    }

    /// Set on a listening socket, the options reach every connection it accepts: the way to
    /// combine them with axum's per-connection `Connected` (which rules out `tap_io`).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn the_options_set_on_a_listener_are_inherited() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        detect_vanished(&listener, Duration::from_secs(10)).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, _) = listener.accept().unwrap();
        assert_set_for_10_s(&SockRef::from(&stream));
    }
}
