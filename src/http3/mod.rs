//! HTTP/3: any tower `Service` on a [`quinn::Endpoint`], with the client's cancellations
//! reaching [`CancellationLayer`](crate::CancellationLayer) as hyper's do (feature `http3`).
//!
//! An HTTP/3 client that gives up on one request says so on that request's stream: it sends
//! `STOP_SENDING` (it will not read the response) and `RESET_STREAM` (it will not finish the
//! request body), usually with `H3_REQUEST_CANCELLED`. [`serve`] polls each request's service
//! future and response body on a task of its own and races them against those frames and
//! against the loss of the connection; the moment one arrives, the future (or the body) is
//! dropped, and the layer records [`Disconnected`](crate::CancelReason::Disconnected) in the
//! right [`Phase`](crate::Phase) and runs its callbacks.
//!
//! What this adds to `h3` and `h3-quinn`, and why:
//!
//! * **`STOP_SENDING` while nothing is written.** `h3`'s request stream only reports it as the
//!   error of the next write, so a handler that is still thinking, or a body waiting on its
//!   source, would never learn of it. The request streams here are accepted by a small backend
//!   of `h3`'s QUIC traits that keeps quinn's `SendStream::stopped()` for each one.
//! * **`RESET_STREAM` on the request body** (any code but `H3_NO_ERROR`) counts as the client
//!   leaving when it is read. A reset that comes after the client finished its body carries no
//!   information in QUIC (the receiver ignores it); clients that cancel send `STOP_SENDING`
//!   with it.
//! * **No silent truncation.** quinn *finishes* a send stream that is dropped, so a response
//!   cut short would look complete (h3#262). Here a response whose body fails is reset with
//!   `H3_INTERNAL_ERROR`, and one dropped for any other reason with `H3_REQUEST_CANCELLED`.
//!   Only a body that reached its end is finished.
//! * **Graceful shutdown.** [`Serve::with_graceful_shutdown`]: `GOAWAY` on every connection,
//!   a bounded drain ([`Serve::drain`]), then the connections and the endpoint are closed.
//!   Give the same token to the layer's
//!   [`shutdown_token`](crate::CancellationLayer::shutdown_token) and the requests in flight
//!   are cancelled with `Shutdown`. A request on the stream `GOAWAY` names, which the client
//!   takes as not processed, is refused with `H3_REQUEST_REJECTED` (h3 alone would serve it).
//! * **Finished means delivered.** Closing a QUIC connection discards what was not sent yet, so
//!   a finished response waits (at most the drain bound) for the client's acknowledgement
//!   before its connection may close.
//! * **A hostile request stream costs little.** Every byte a client sends on a request stream
//!   passes a frame filter before h3 sees it (h3 0.0.8 buffers whole frames, checks the header
//!   size only after, ends a body at an empty DATA frame, and panics on a stream that ends
//!   inside a DATA frame). So: a request head (its HEADERS frame and any unknown frames before
//!   it) over [`max_request_head_bytes`](Serve::max_request_head_bytes) (64 KiB), and trailers
//!   or any other frame but DATA that announces more, end the stream at once with
//!   `H3_EXCESSIVE_LOAD`, unbuffered; a head not complete within
//!   [`header_read_timeout`](Serve::header_read_timeout) (30 s) ends it with
//!   `H3_REQUEST_REJECTED`; unknown frames are dropped as they arrive; empty DATA frames are
//!   skipped; a stream that ends inside a frame closes the connection with `H3_FRAME_ERROR`
//!   (RFC 9114 §7.1) and the body's read fails. A decoded header section over
//!   [`max_field_section_size`](Serve::max_field_section_size) (16 KiB) gets `431`. Before
//!   the head is complete no handler is called; later (a frame in the body), the handler's
//!   body read fails. Request heads held per connection stay under `max_request_head_bytes`
//!   times quinn's `max_concurrent_bidi_streams`. A request whose DATA does not match its
//!   `content-length` (or whose `content-length` is not a number) is malformed (RFC 9114
//!   §4.1.2): the body's read fails and the stream is reset with `H3_MESSAGE_ERROR`. What
//!   quinn buffers for a stream before it is read is bounded by its own `TransportConfig`
//!   (`stream_receive_window`, 1.25 MB by default, times `max_concurrent_bidi_streams`, 100,
//!   and `receive_window`, unbounded by default): set those for the open internet.
//! * **Bounded per connection.** quinn keeps a little state per stream for a connection's
//!   lifetime, so a connection ends with `GOAWAY` after
//!   [`max_requests_per_connection`](Serve::max_requests_per_connection) requests. Stream
//!   counts, windows, the idle timeout and keep-alive are quinn's `TransportConfig`, set in
//!   the endpoint's `ServerConfig`; a client that vanishes is seen when the idle timeout
//!   passes.
//!
//! The request body is an [`IncomingBody`] (`Data = Bytes`), which an axum `Router` takes as
//! it is. Request extensions carry nothing from the transport apart from what the layer adds.
//!
//! # Example
//!
//! ```toml
//! [dependencies]
//! tower-cancel = { version = "0.1", features = ["http3", "axum"] }
//! axum = "0.8"
//! quinn = "0.11"
//! rustls = { version = "0.23", default-features = false, features = ["ring", "std"] }
//! tokio = { version = "1", features = ["time"] }
//! tokio-util = "0.7"
//! ```
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # mod example {
//! use std::sync::Arc;
//!
//! use axum::{Router, routing::get};
//! use tokio_util::sync::CancellationToken;
//! use tower_cancel::{CancellationLayer, RequestCancellation};
//!
//! # async fn run(tls: rustls::ServerConfig) -> Result<(), Box<dyn std::error::Error>> {
//! let shutdown = CancellationToken::new();
//! let app = Router::new()
//!     .route("/", get(|cancel: RequestCancellation| async move {
//!         // Resolves early if the client sends STOP_SENDING.
//!         cancel.run(tokio::time::sleep(std::time::Duration::from_secs(5))).await.ok();
//!         "done"
//!     }))
//!     .layer(CancellationLayer::new().shutdown_token(shutdown.clone()));
//!
//! // `tls` offers ALPN "h3" (`tls.alpn_protocols = vec![b"h3".to_vec()]`).
//! let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
//! let config = quinn::ServerConfig::with_crypto(Arc::new(quic));
//! let endpoint = quinn::Endpoint::server(config, "127.0.0.1:4433".parse()?)?;
//!
//! // `Err` if the endpoint stops without the graceful shutdown (closed, or its socket failed).
//! tower_cancel::http3::serve(endpoint, app)
//!     .with_graceful_shutdown(shutdown.cancelled_owned())
//!     .await?;
//! # Ok(())
//! # }
//! # }
//! ```
//!
//! # A complete server
//!
//! The certificate from PEM files, TLS 1.3 (QUIC's only version), the shutdown on Ctrl-C and a
//! bounded drain:
//!
//! ```toml
//! [dependencies]
//! tower-cancel = { version = "0.1", features = ["http3", "axum"] }
//! axum = "0.8"
//! quinn = "0.11"
//! rustls = { version = "0.23", default-features = false, features = ["ring", "std"] }
//! tokio = { version = "1", features = ["macros", "rt-multi-thread", "signal", "time"] }
//! tokio-util = "0.7"
//! ```
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # mod example {
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use axum::{Router, routing::get};
//! use rustls::pki_types::pem::PemObject;
//! use rustls::pki_types::{CertificateDer, PrivateKeyDer};
//! use tokio_util::sync::CancellationToken;
//! use tower_cancel::{CancellationLayer, RequestCancellation};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let shutdown = CancellationToken::new();
//!     let app = Router::new()
//!         .route("/slow", get(|cancel: RequestCancellation| async move {
//!             match cancel.run(tokio::time::sleep(Duration::from_secs(10))).await {
//!                 Ok(()) => "done".to_owned(),
//!                 Err(cancelled) => cancelled.to_string(),
//!             }
//!         }))
//!         .layer(CancellationLayer::new().shutdown_token(shutdown.clone()));
//!
//!     let chain = CertificateDer::pem_file_iter("cert.pem")?.collect::<Result<Vec<_>, _>>()?;
//!     let key = PrivateKeyDer::from_pem_file("key.pem")?;
//!     let provider = Arc::new(rustls::crypto::ring::default_provider());
//!     let mut tls = rustls::ServerConfig::builder_with_provider(provider)
//!         .with_protocol_versions(&[&rustls::version::TLS13])? // QUIC is TLS 1.3 only
//!         .with_no_client_auth()
//!         .with_single_cert(chain, key)?;
//!     tls.alpn_protocols = vec![b"h3".to_vec()];
//!     let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
//!     let config = quinn::ServerConfig::with_crypto(Arc::new(quic));
//!     let endpoint = quinn::Endpoint::server(config, "0.0.0.0:4433".parse()?)?;
//!
//!     // GOAWAY, requests cancelled with `Shutdown`, a bounded drain, then the endpoint closed.
//!     let signal = shutdown.clone();
//!     tokio::spawn(async move {
//!         let _ = tokio::signal::ctrl_c().await;
//!         signal.cancel();
//!     });
//!     tower_cancel::http3::serve(endpoint, app)
//!         .with_graceful_shutdown(shutdown.cancelled_owned())
//!         .drain(Duration::from_secs(10))
//!         .await?; // an error if the endpoint stops accepting without the shutdown
//!     Ok(())
//! }
//! # }
//! # fn main() {}
//! ```
//!
//! `cargo run --example http3` serves one router over TCP (HTTPS, HTTP/1.1 and HTTP/2,
//! advertising `alt-svc: h3`) and over QUIC, and prints the timeline of an HTTP/3 client giving
//! up. The tests drive [`serve`] with h3's client, Python's aioquic and headless Chromium over
//! QUIC (`tests/http3.rs`, `tests/http3_aioquic.rs`, `tests/http3_browser.rs`); the
//! [transport page](crate::guide::transport) has their figures.
//!
//! # Build cost
//!
//! The feature costs build time, not the default build: a clean debug build of the crate took
//! 7.5 s with 27 crates, 23 s with 74 crates with `http3` (2-core VM; `cargo build` vs
//! `cargo build --features http3`, each in an empty target directory).

mod body;
mod frames;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
mod quic;
mod request;
mod serve;

pub use self::body::IncomingBody;
pub use self::serve::{Serve, serve};
