//! The smallest server behind `CancellationLayer`: every request gets `hello`, over HTTP/1.1
//! and HTTP/2 (prior knowledge) on the same port. `scripts/load.sh` measures it with and
//! without the layer.
//!
//! Run with: cargo run --release --example load_server -- layer   (or `bare`: no layer; or
//! `hand-written`: the pattern of tonic's cancellation example, a token per request in the
//! extensions and a `DropGuard` disarmed when the handler returns, for comparison; or
//! `peer-watch`: the layer, each connection watched by `tcp::PeerWatch`)
//!
//! Then: `curl http://127.0.0.1:3000/` or `curl --http2-prior-knowledge http://127.0.0.1:3000/`.
//! Set `PORT` to listen elsewhere (`PORT=0` picks a free port; the address is printed).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use pin_project_lite::pin_project;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};
use tower::{Service, ServiceBuilder, service_fn};
use tower_cancel::CancellationLayer;
use tower_cancel::tcp::PeerWatch;

async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"hello"))))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let variant = std::env::args().nth(1).unwrap_or_default();
    if !["bare", "layer", "hand-written", "peer-watch"].contains(&variant.as_str()) {
        eprintln!("usage: load_server bare|layer|hand-written|peer-watch");
        std::process::exit(2);
    }
    let port: u16 = match std::env::var("PORT") {
        Ok(port) => port.parse().expect("PORT is a port number"),
        Err(_) => 3000,
    };
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on {}", listener.local_addr()?);

    match variant.as_str() {
        "layer" | "peer-watch" => {
            let svc = ServiceBuilder::new()
                .layer(CancellationLayer::new())
                .service(service_fn(hello));
            serve(listener, svc, variant == "peer-watch").await
        }
        "hand-written" => serve(listener, HandWritten(service_fn(hello)), false).await,
        _ => serve(listener, service_fn(hello), false).await,
    }
}

/// tonic's cancellation example as a service, for comparison: a token per request in the
/// extensions, cancelled if the response future is dropped before the handler returns (no
/// reason, no body guard, no shutdown, no deadline, no callbacks).
#[derive(Clone)]
struct HandWritten<S>(S);

impl<S, B> Service<Request<B>> for HandWritten<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = HandWrittenFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let token = CancellationToken::new();
        req.extensions_mut().insert(token.clone());
        HandWrittenFuture {
            inner: self.0.call(req),
            guard: Some(token.drop_guard()),
        }
    }
}

pin_project! {
    struct HandWrittenFuture<F> {
        #[pin]
        inner: F,
        guard: Option<DropGuard>,
    }
}

impl<F: Future> Future for HandWrittenFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        if let Some(guard) = this.guard.take() {
            guard.disarm();
        }
        Poll::Ready(output)
    }
}

/// Accepts connections forever, each served by hyper-util's `auto` builder: it answers
/// HTTP/1.1, and HTTP/2 when the client opens with the HTTP/2 preface. With `watch`, each
/// connection's service is wrapped by its `tcp::PeerWatch`.
async fn serve<S, B>(listener: TcpListener, svc: S, watch: bool) -> std::io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = listener.accept().await?;
        // Small responses: send them now rather than waiting for Nagle.
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        if watch {
            let svc = TowerToHyperService::new(PeerWatch::new(&stream)?.service(svc.clone()));
            tokio::spawn(async move {
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
            continue;
        }
        let svc = TowerToHyperService::new(svc.clone());
        tokio::spawn(async move {
            // Errors are the client's doing (a reset, a malformed request): nothing to do.
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
