//! The accept loops: endpoint → connections → request streams, and the graceful shutdown.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::event::TARGET;
use crate::http3::body::IncomingBody;
use crate::http3::quic::{Connection, Watches};
use crate::http3::request::serve_request;
use crate::propagate::BoxError;

/// The default bound on a graceful shutdown's drain.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `service` on every connection `endpoint` accepts, over HTTP/3.
///
/// The endpoint needs a server config whose TLS config offers ALPN `h3` (see the
/// [module docs](crate::http3)). Await the returned [`Serve`] to run it; it resolves when the
/// endpoint is closed, or after the graceful shutdown set with
/// [`with_graceful_shutdown`](Serve::with_graceful_shutdown).
pub fn serve<S, B>(endpoint: quinn::Endpoint, service: S) -> Serve<S>
where
    S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Serve {
        endpoint,
        service,
        shutdown: None,
        drain: DRAIN,
        max_field_section_size: None,
    }
}

/// An HTTP/3 server being configured; await it to run it. Made by [`serve`].
#[must_use = "a server does nothing until it is awaited"]
pub struct Serve<S> {
    endpoint: quinn::Endpoint,
    service: S,
    shutdown: Option<CancellationToken>,
    drain: Duration,
    max_field_section_size: Option<u64>,
}

impl<S> Serve<S> {
    /// Shuts down gracefully when `token` is cancelled: no new connection is accepted, every
    /// connection sends `GOAWAY`, its requests in flight may finish for at most the
    /// [`drain`](Self::drain) bound, then the connections and the endpoint are closed.
    ///
    /// Give the same token to [`CancellationLayer::shutdown_token`](crate::CancellationLayer::shutdown_token),
    /// so that those requests are cancelled with `Shutdown` and can stop early.
    pub fn with_graceful_shutdown(mut self, token: CancellationToken) -> Self {
        self.shutdown = Some(token);
        self
    }

    /// How long a graceful shutdown waits for requests in flight (10 s unless set). Those
    /// still running then are dropped, and their streams reset.
    pub fn drain(mut self, bound: Duration) -> Self {
        self.drain = bound;
        self
    }

    /// The largest request header section accepted, in bytes (h3's default unless set).
    pub fn max_field_section_size(mut self, bytes: u64) -> Self {
        self.max_field_section_size = Some(bytes);
        self
    }
}

impl<S> fmt::Debug for Serve<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serve")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .field("graceful_shutdown", &self.shutdown.is_some())
            .field("drain", &self.drain)
            .finish_non_exhaustive()
    }
}

impl<S, B> IntoFuture for Serve<S>
where
    S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = ();
    type IntoFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

impl<S, B> Serve<S>
where
    S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    async fn run(self) {
        let shutdown = self.shutdown.clone().unwrap_or_default();
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let connection = serve_connection(
                        incoming,
                        self.max_field_section_size,
                        self.service.clone(),
                        shutdown.clone(),
                        self.drain,
                    );
                    connections.spawn(connection);
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        if shutdown.is_cancelled() {
            // New handshakes are refused from here on; each connection drains on its own.
            self.endpoint.set_server_config(None);
            let deadline = Instant::now() + self.drain + Duration::from_millis(500);
            loop {
                tokio::select! {
                    joined = connections.join_next() => if joined.is_none() { break },
                    () = sleep_until(deadline) => break,
                }
            }
        }
        connections.shutdown().await;
        self.endpoint.close(quinn::VarInt::from_u32(0x100), b"");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// One connection: its request streams, each on a task of its own.
async fn serve_connection<S, B>(
    incoming: quinn::Incoming,
    max_field_section_size: Option<u64>,
    service: S,
    shutdown: CancellationToken,
    drain: Duration,
) where
    S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let quic = match incoming.await {
        Ok(quic) => quic,
        Err(error) => {
            tracing::debug!(target: TARGET, %error, "QUIC handshake failed");
            return;
        }
    };
    let watches = Watches::default();
    let mut h3 = h3::server::builder();
    if let Some(bytes) = max_field_section_size {
        h3.max_field_section_size(bytes);
    }
    let mut conn = match h3
        .build::<_, Bytes>(Connection::new(quic, watches.clone()))
        .await
    {
        Ok(conn) => conn,
        Err(error) => {
            tracing::debug!(target: TARGET, %error, "HTTP/3 connection failed to start");
            return;
        }
    };
    // Aborted with the connection: a request outliving it is dropped, which is a cancellation.
    let mut requests = JoinSet::new();
    let mut draining: Option<Instant> = None;
    loop {
        let drained = async {
            match draining {
                Some(deadline) => sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled(), if draining.is_none() => {
                draining = Some(Instant::now() + drain);
                if let Err(error) = conn.shutdown(1).await {
                    tracing::debug!(target: TARGET, %error, "HTTP/3 GOAWAY not sent");
                    break;
                }
                if requests.is_empty() {
                    break;
                }
            }
            () = drained => break,
            Some(_) = requests.join_next(), if !requests.is_empty() => {
                if draining.is_some() && requests.is_empty() {
                    break;
                }
            }
            accepted = conn.accept() => match accepted {
                Ok(Some(resolver)) => {
                    let request =
                        serve_request(resolver, service.clone(), watches.clone(), shutdown.clone());
                    requests.spawn(request);
                }
                Ok(None) => break,
                Err(error) => {
                    if !error.is_h3_no_error() {
                        tracing::debug!(target: TARGET, %error, "HTTP/3 connection ended");
                    }
                    break;
                }
            },
        }
    }
    // Let requests that were finishing write their last frames before the connection closes
    // (bounded: those of a lost connection end on their own, as their streams fail).
    if draining.is_none() {
        let all = async { while requests.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(drain, all).await;
    }
    requests.shutdown().await;
    drop(conn);
}
