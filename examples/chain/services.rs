// The three services of `examples/chain.rs` and `tests/chain.rs`:
//
//   client → A (plain hyper, HTTP/1.1) → B (tonic, HTTP/2) → C (axum, HTTP/2)
//
// Each has a `CancellationLayer` whose callback records the cancellation on a shared
// timeline, and each calls the next through a `PropagateLayer`, so that a cancellation or a
// deadline at A reaches B and C. Used with `#[path]` next to `examples/tonic/reports.rs`
// (mounted as `crate::reports`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_cancel::propagate::PropagateService;
use tower_cancel::{
    CancellationLayer, Cancelled, InboundCancelled, PropagateLayer, RequestCancellation,
};

use crate::reports::reports_client::ReportsClient;
use crate::reports::reports_server::{Reports, ReportsServer};
use crate::reports::{Report, ReportRequest, Tick, WatchRequest};

/// What happened where, and when (from the timeline's start).
#[derive(Clone)]
pub struct Timeline {
    start: Instant,
    events: Arc<Mutex<Vec<(Duration, String)>>>,
    changed: Arc<Notify>,
    print: bool,
}

impl Timeline {
    /// A new timeline; with `print`, every event is also printed as it happens.
    pub fn new(print: bool) -> Self {
        Self {
            start: Instant::now(),
            events: Arc::default(),
            changed: Arc::default(),
            print,
        }
    }

    pub fn record(&self, event: impl Into<String>) {
        let at = self.start.elapsed();
        let event = event.into();
        if self.print {
            println!("[{:>9.3} ms] {event}", at.as_secs_f64() * 1000.0);
        }
        self.events.lock().unwrap().push((at, event));
        self.changed.notify_waiters();
    }

    pub fn events(&self) -> Vec<(Duration, String)> {
        self.events.lock().unwrap().clone()
    }

    /// When the first event starting with `prefix` happened.
    pub fn find(&self, prefix: &str) -> Option<Duration> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|(_, event)| event.starts_with(prefix))
            .map(|(at, _)| *at)
    }

    /// Waits (at most 10 s) for an event starting with `prefix`; returns when it happened.
    pub async fn wait_for(&self, prefix: &str) -> Duration {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if let Some(at) = self.find(prefix) {
                    return at;
                }
                changed.await;
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), wait).await {
            Ok(at) => at,
            Err(_) => panic!("no {prefix:?} on the timeline: {:#?}", self.events()),
        }
    }

    /// A layer whose callback records `"{name}: cancelled ({reason}, {phase})"`.
    fn layer(&self, name: &'static str) -> CancellationLayer {
        let timeline = self.clone();
        CancellationLayer::new().on_cancel(move |c: &Cancelled| {
            timeline.record(format!("{name}: cancelled ({}, {})", c.reason(), c.phase()));
        })
    }
}

/// The value of deadline header `name`, or `none`.
fn deadline_header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("none")
        .to_owned()
}

/// C: an axum app whose `/work` (a Connect unary method, called with `GET`) runs until its
/// request is cancelled; it honours the caller's `connect-timeout-ms`.
pub async fn serve_c(timeline: Timeline) -> SocketAddr {
    async fn work(
        State(timeline): State<Timeline>,
        cancel: RequestCancellation,
        headers: HeaderMap,
    ) -> String {
        timeline.record(format!(
            "C: request started (connect-timeout-ms {})",
            deadline_header(&headers, "connect-timeout-ms")
        ));
        let t = timeline.clone();
        cancel.on_cancel(move |_| t.record("C: handler cleanup ran"));
        // Stands for work that only stops when nobody wants it any more.
        let reason = cancel.cancelled().await;
        format!("C stopped: {reason}")
    }

    let layer = timeline.layer("C").connect_timeout(true);
    let app = axum::Router::new()
        .route("/work", get(work))
        .layer(layer)
        .with_state(timeline);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// B's client for C: hyper-util's pooled client, HTTP/2.
type CClient = Client<HttpConnector, Empty<Bytes>>;

/// B: a tonic service whose `generate` calls C on behalf of its caller.
struct B {
    timeline: Timeline,
    c: SocketAddr,
    client: CClient,
}

#[tonic::async_trait]
impl Reports for B {
    type WatchStream = futures_util::stream::Empty<Result<Tick, Status>>;

    async fn generate(
        &self,
        request: tonic::Request<ReportRequest>,
    ) -> Result<tonic::Response<Report>, Status> {
        let cancel = RequestCancellation::from_extensions(request.extensions())?;
        self.timeline.record(format!(
            "B: call started (grpc-timeout {})",
            deadline_header(request.metadata().as_ref(), "grpc-timeout"),
        ));
        let t = self.timeline.clone();
        cancel.on_cancel(move |_| t.record("B: handler cleanup ran"));

        // The call to C carries this call's cancellation and deadline. It speaks Connect (a
        // unary `GET`, `connect=v1` in its query), so the deadline goes in `connect-timeout-ms`.
        let mut c: PropagateService<CClient> =
            PropagateLayer::from_inbound(cancel).layer(self.client.clone());
        let call = Request::get(format!(
            "http://{}/work?connect=v1&encoding=json&message=%7B%7D",
            self.c
        ))
        .body(Empty::new())
        .unwrap();
        let response = match c.ready().await.map_err(internal)?.call(call).await {
            Ok(response) => response,
            Err(error) => {
                if let Some(why) = error.downcast_ref::<InboundCancelled>() {
                    self.timeline
                        .record(format!("B: call to C abandoned ({})", why.reason()));
                    return Err(why.reason().into());
                }
                return Err(internal(error));
            }
        };
        let text = response
            .into_body()
            .collect()
            .await
            .map_err(internal)?
            .to_bytes();
        Ok(tonic::Response::new(Report {
            text: String::from_utf8_lossy(&text).into_owned(),
        }))
    }

    async fn watch(
        &self,
        _: tonic::Request<WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not part of the chain"))
    }
}

fn internal(error: impl std::fmt::Display) -> Status {
    Status::internal(error.to_string())
}

/// B: serves the tonic service, honouring `grpc-timeout`.
pub async fn serve_b(timeline: Timeline, c: SocketAddr) -> SocketAddr {
    // Without `TCP_NODELAY`, a lone RST_STREAM can wait ~40 ms for a delayed ACK.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector);
    let service = ReportsServer::new(B {
        timeline: timeline.clone(),
        c,
        client,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let layer = timeline.layer("B").grpc_timeout(true);
    tokio::spawn(
        Server::builder()
            .layer(layer)
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    addr
}

/// How A's layer is configured.
#[derive(Default)]
pub struct AOptions {
    /// A deadline for every request at A.
    pub timeout: Option<Duration>,
    /// A's shutdown token.
    pub shutdown: Option<CancellationToken>,
}

/// A: a plain hyper server (HTTP/1.1) whose `/chain` calls B with tonic.
pub async fn serve_a(timeline: Timeline, b: SocketAddr, options: AOptions) -> SocketAddr {
    let channel = Endpoint::from_shared(format!("http://{b}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect_lazy();
    // Every call takes the inbound request's cancellation from its extensions.
    let client = ReportsClient::new(PropagateLayer::new().layer(channel));

    let mut layer = timeline.layer("A");
    if let Some(timeout) = options.timeout {
        layer = layer.timeout(timeout);
    }
    if let Some(shutdown) = options.shutdown {
        layer = layer.shutdown_token(shutdown);
    }
    let t = timeline.clone();
    let svc = ServiceBuilder::new().layer(layer).service_fn(move |req| {
        let (timeline, client) = (t.clone(), client.clone());
        handle_a(req, timeline, client)
    });

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = tower_cancel::tcp::detect_vanished(&stream, Duration::from_secs(10));
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn handle_a(
    req: Request<Incoming>,
    timeline: Timeline,
    mut client: ReportsClient<PropagateService<Channel>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let cancel = RequestCancellation::from_extensions(req.extensions())
        .expect("A is served behind its CancellationLayer");
    timeline.record("A: request started");
    let mut call = tonic::Request::new(ReportRequest {
        name: "chain".to_owned(),
        millis: 0,
    });
    call.extensions_mut().insert(cancel);
    let (status, text) = match client.generate(call).await {
        Ok(report) => (StatusCode::OK, report.into_inner().text),
        Err(status) => {
            timeline.record(format!(
                "A: call to B failed: {:?}: {}",
                status.code(),
                status.message()
            ));
            (StatusCode::SERVICE_UNAVAILABLE, status.message().to_owned())
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    Ok(response)
}

/// The whole chain on one timeline; returns A's address.
pub async fn serve_chain(timeline: &Timeline, options: AOptions) -> SocketAddr {
    let c = serve_c(timeline.clone()).await;
    let b = serve_b(timeline.clone(), c).await;
    serve_a(timeline.clone(), b, options).await
}
