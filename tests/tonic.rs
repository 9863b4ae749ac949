//! tonic over real sockets: a tonic server with the layer in `Server::builder().layer(..)` or
//! on one service (`add_service(layer.layer(..))`), and a tonic client (`Channel`) that
//! completes, cancels, stops reading a stream, sends a deadline, or is in flight at shutdown.
//! The services are the examples' (no `protoc` needed).

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/tonic/reports.rs"]
mod reports;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/tonic/payments.rs"]
mod payments;

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use common::{Log, PATIENCE, assert_all_completed, describe};
use futures_util::{Stream, stream};
use payments::payments_client::PaymentsClient;
use payments::payments_server::{Payments, PaymentsServer};
use payments::{PayRequest, Receipt};
use reports::reports_client::ReportsClient;
use reports::reports_server::{Reports, ReportsServer};
use reports::{Report, ReportRequest, Tick, WatchRequest};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic::{Code, Request, Response, Status};
use tower::Layer;
use tower_cancel::{CancelReason, CancellationLayer, RequestBodyLayer, RequestCancellation};

const GENERATE: &str = "/reports.Reports/Generate";
const WATCH: &str = "/reports.Reports/Watch";

/// Logs `start {name}`, `dropped {name}` if tonic drops the method, `handler ...` from its
/// own `on_cancel`, and answers the cancellation's status if it sees its token first.
struct Recorder {
    log: Log,
}

/// Logs a message when dropped, unless the method returned.
struct OnDrop(Option<(Log, String)>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some((log, message)) = self.0.take() {
            log.push(message);
        }
    }
}

#[tonic::async_trait]
impl Reports for Recorder {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<Tick, Status>> + Send>>;

    async fn generate(&self, request: Request<ReportRequest>) -> Result<Response<Report>, Status> {
        let cancel = RequestCancellation::from_extensions(request.extensions())?;
        let ReportRequest { name, millis } = request.into_inner();
        self.log.keep(cancel.clone());
        self.log.push(format!("start {name}"));
        let log = self.log.clone();
        cancel.on_cancel(move |c| log.push(describe("handler", c)));
        let mut dropped = OnDrop(Some((self.log.clone(), format!("dropped {name}"))));
        let answer = tokio::select! {
            reason = cancel.cancelled() => Err(reason.into()),
            _ = sleep(Duration::from_millis(millis.into())) => {
                Ok(Response::new(Report { text: format!("report {name}") }))
            }
        };
        dropped.0 = None;
        answer
    }

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let cancel = RequestCancellation::from_extensions(request.extensions())?;
        self.log.keep(cancel);
        let WatchRequest {
            interval_millis,
            count,
        } = request.into_inner();
        let ticks = stream::unfold(0u64, move |n| async move {
            if count != 0 && n >= u64::from(count) {
                return None;
            }
            sleep(Duration::from_millis(interval_millis.into())).await;
            Some((Ok(Tick { n }), n + 1))
        });
        Ok(Response::new(Box::pin(ticks)))
    }
}

/// A tonic server on 127.0.0.1:0, stopped gracefully through `stop`.
struct GrpcServer {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl GrpcServer {
    async fn spawn<F, Fut>(serve: F) -> Self
    where
        F: FnOnce(TcpIncoming, WaitForCancellationFutureOwned) -> Fut,
        Fut: Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let task = tokio::spawn(serve(incoming, stop.clone().cancelled_owned()));
        Self { addr, stop, task }
    }

    /// The `Recorder` service behind `layer`.
    async fn with_layer(log: &Log, layer: CancellationLayer) -> Self {
        let service = ReportsServer::new(Recorder { log: log.clone() });
        Self::spawn(|incoming, stop| {
            Server::builder()
                .layer(layer)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop)
        })
        .await
    }

    async fn client(&self) -> ReportsClient<tonic::transport::Channel> {
        ReportsClient::new(self.channel().await)
    }

    async fn channel(&self) -> tonic::transport::Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap()
    }

    /// Graceful shutdown: after this every connection was served and dropped, so everything
    /// a call could trigger has happened.
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the tonic server did not drain")
            .unwrap()
            .unwrap();
    }
}

fn report(name: &str, millis: u32) -> ReportRequest {
    ReportRequest {
        name: name.to_owned(),
        millis,
    }
}

/// Everything but the `start` entries.
fn cancellations(log: &Log) -> Vec<String> {
    log.entries()
        .into_iter()
        .filter(|e| !e.starts_with("start"))
        .collect()
}

#[tokio::test]
async fn calls_and_streams_that_complete_are_not_cancelled() {
    let log = Log::default();
    let server = GrpcServer::with_layer(&log, log.layer("layer")).await;
    let mut client = server.client().await;

    let answer = client.generate(report("a", 5)).await.unwrap();
    assert_eq!(answer.into_inner().text, "report a");
    let mut ticks = client
        .watch(WatchRequest {
            interval_millis: 2,
            count: 3,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(tick) = ticks.message().await.unwrap() {
        seen.push(tick.n);
    }
    assert_eq!(seen, [0, 1, 2]);

    drop((ticks, client));
    server.stop().await;
    assert_eq!(cancellations(&log), Vec::<String>::new());
    assert_eq!(log.handles().len(), 2);
    assert_all_completed(&log);
}

#[tokio::test]
async fn a_call_the_client_drops_is_disconnected_in_the_handler() {
    let log = Log::default();
    let server = GrpcServer::with_layer(&log, log.layer("layer")).await;
    let mut client = server.client().await;

    let mut call = Box::pin(client.generate(report("gone", 30_000)));
    tokio::select! {
        result = &mut call => panic!("the call returned: {result:?}"),
        () = log.wait_for("start gone") => {}
    }
    let dropped_at = Instant::now();
    drop(call); // tonic's channel resets the HTTP/2 stream (RST_STREAM CANCEL)
    log.wait_for(&format!("layer {GENERATE} disconnected handler"))
        .await;
    eprintln!(
        "tonic client drop -> layer callback: {:?}",
        dropped_at.elapsed()
    );
    assert_eq!(
        cancellations(&log),
        [
            "dropped gone".to_owned(),
            format!("handler {GENERATE} disconnected handler"),
            format!("layer {GENERATE} disconnected handler"),
        ]
    );

    // The channel still works, and the next call completes.
    let answer = client.generate(report("next", 1)).await.unwrap();
    assert_eq!(answer.into_inner().text, "report next");
    drop(client);
    server.stop().await;
    let handles = log.handles();
    assert_eq!(handles[0].reason(), Some(CancelReason::Disconnected));
    assert_eq!(handles[1].reason(), None);
}

#[tokio::test]
async fn a_stream_the_client_stops_reading_is_disconnected_in_the_body() {
    let log = Log::default();
    let server = GrpcServer::with_layer(&log, log.layer("layer")).await;
    let mut client = server.client().await;

    let mut ticks = client
        .watch(WatchRequest {
            interval_millis: 5,
            count: 0,
        })
        .await
        .unwrap()
        .into_inner();
    for expected in 0..3 {
        assert_eq!(ticks.message().await.unwrap().unwrap().n, expected);
    }
    drop(ticks);
    log.wait_for(&format!("layer {WATCH} disconnected body"))
        .await;
    drop(client);
    server.stop().await;
    assert_eq!(
        cancellations(&log),
        [format!("layer {WATCH} disconnected body")]
    );
}

/// Delays every call by 3 ms before passing it on, as an authentication layer would.
#[derive(Clone)]
struct Delay<S>(S);

impl<S, R> tower::Service<R> for Delay<S>
where
    S: tower::Service<R> + Clone + Send + 'static,
    S::Future: Send,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let mut inner = self.0.clone();
        Box::pin(async move {
            sleep(Duration::from_millis(3)).await;
            inner.call(req).await
        })
    }
}

/// Besides the layer, two others enforce `grpc-timeout`: tonic's server, in a layer outside
/// the user's, and tonic's client, which resets the stream at its own deadline. Both timers
/// started before the layer's: here by 3 ms more, because a slow layer sits in front of it, so
/// one of them always drops the call before the layer's timer fires. The layer still records
/// `DeadlineExceeded`, not `Disconnected`.
#[tokio::test]
async fn grpc_timeout_is_a_deadline_even_when_tonic_drops_the_call_first() {
    let log = Log::default();
    let service = ReportsServer::new(Recorder { log: log.clone() });
    let layer = log.layer("layer").grpc_timeout(true);
    let server = GrpcServer::spawn(|incoming, stop| {
        Server::builder()
            .layer(tower::layer::layer_fn(Delay))
            .layer(layer)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, stop)
    })
    .await;
    let mut client = server.client().await;

    for i in 0..5 {
        let mut request = Request::new(report(&format!("t{i}"), 30_000));
        request.set_timeout(Duration::from_millis(30));
        let status = client
            .generate(request)
            .await
            .expect_err("the deadline passed");
        // tonic reports its own timeouts as CANCELLED: the method's answer never leaves.
        assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    }
    drop(client);
    server.stop().await;
    assert_every_call_timed_out(&log, 5);
    // Every one was dropped: the layer's timer never fired first.
    assert_eq!(log.with_prefix("dropped").len(), 5, "{:#?}", log.entries());
}

fn assert_every_call_timed_out(log: &Log, calls: usize) {
    let layer_entries = log.with_prefix("layer");
    assert_eq!(layer_entries.len(), calls, "{:#?}", log.entries());
    for entry in &layer_entries {
        assert_eq!(
            entry,
            &format!("layer {GENERATE} deadline_exceeded handler")
        );
    }
    for rc in log.handles() {
        assert!(rc.deadline().is_some());
        assert_eq!(rc.reason(), Some(CancelReason::DeadlineExceeded));
    }
}

/// Without `grpc_timeout(true)` the layer knows no deadline: tonic's own enforcement drops the
/// method, which the layer can only see as the request going away.
#[tokio::test]
async fn without_grpc_timeout_tonics_enforcement_looks_like_a_disconnect() {
    let log = Log::default();
    let server = GrpcServer::with_layer(&log, log.layer("layer")).await;
    let mut client = server.client().await;

    let mut request = Request::new(report("t", 30_000));
    request.set_timeout(Duration::from_millis(20));
    client.generate(request).await.expect_err("tonic's timeout");
    drop(client);
    server.stop().await;
    assert_eq!(
        log.with_prefix("layer"),
        [format!("layer {GENERATE} disconnected handler")]
    );
    assert_eq!(log.handles()[0].deadline(), None);
}

#[tokio::test]
async fn shutdown_answers_unavailable_and_the_server_drains() {
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let layer = log.layer("layer").shutdown_token(shutdown.clone());
    let server = GrpcServer::with_layer(&log, layer).await;
    let mut client = server.client().await;

    let call = tokio::spawn(async move { client.generate(report("busy", 30_000)).await });
    log.wait_for("start busy").await;
    shutdown.cancel();
    let status = call.await.unwrap().expect_err("cancelled by the shutdown");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "the server is shutting down");
    server.stop().await;
    assert_eq!(
        cancellations(&log),
        [
            format!("handler {GENERATE} shutdown handler"),
            format!("layer {GENERATE} shutdown handler"),
        ]
    );
}

#[tokio::test]
async fn a_server_without_the_layer_answers_internal_naming_the_layer() {
    let log = Log::default();
    let service = ReportsServer::new(Recorder { log: log.clone() });
    let server = GrpcServer::spawn(|incoming, stop| {
        Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, stop)
    })
    .await;
    let mut client = server.client().await;

    let status = client.generate(report("x", 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(
        status
            .message()
            .contains("CancellationLayer::new()` (axum: `.layer(..)` on the Router")
            && status
                .message()
                .contains("tonic: `Server::builder().layer(..)`"),
        "{}",
        status.message()
    );
    drop(client);
    server.stop().await;
    assert_eq!(log.entries(), Vec::<String>::new());
}

/// The second service: logs `pay {id} {scope}`, where `scope` says whether a layer gave the call
/// a scope and a deadline, then takes `millis` to settle. It never looks at a token: the client
/// leaving drops it (tonic's behaviour), which it logs as `dropped {id}`.
struct Payer {
    log: Log,
}

#[tonic::async_trait]
impl Payments for Payer {
    async fn pay(&self, request: Request<PayRequest>) -> Result<Response<Receipt>, Status> {
        let scope = match request.extensions().get::<RequestCancellation>() {
            None => "no scope",
            Some(rc) if rc.deadline().is_some() => "deadline",
            Some(_) => "no deadline",
        };
        let PayRequest { id, millis } = request.into_inner();
        self.log.push(format!("pay {id} {scope}"));
        let mut dropped = OnDrop(Some((self.log.clone(), format!("dropped {id}"))));
        sleep(Duration::from_millis(millis.into())).await;
        dropped.0 = None;
        Ok(Response::new(Receipt {
            text: format!("paid {id}"),
        }))
    }
}

fn payment(id: &str, millis: u32) -> PayRequest {
    PayRequest {
        id: id.to_owned(),
        millis,
    }
}

/// The reports service's deadline, set on its layer only.
const REPORTS_DEADLINE: Duration = Duration::from_millis(50);

/// `add_service(layer.layer(ReportsServer::new(..)))`: the layer (tonic's `NamedService`
/// forwarded through it) is on the reports service only. Its calls get a scope, the layer's
/// deadline and the client's cancellation; the payments service beside it, with no layer, gets
/// none of it: its calls outlive the reports deadline, and a call its client drops is dropped
/// without a cancellation.
#[tokio::test]
async fn a_layer_on_one_service_gives_its_calls_a_deadline_and_the_other_service_none() {
    let log = Log::default();
    let reports = log
        .layer("reports")
        .timeout(REPORTS_DEADLINE)
        .layer(ReportsServer::new(Recorder { log: log.clone() }));
    let payments = PaymentsServer::new(Payer { log: log.clone() });
    let server = GrpcServer::spawn(|incoming, stop| {
        Server::builder()
            .add_service(reports)
            .add_service(payments)
            .serve_with_incoming_shutdown(incoming, stop)
    })
    .await;
    let channel = server.channel().await;
    let mut reports = ReportsClient::new(channel.clone());
    let mut payments = PaymentsClient::new(channel);

    // Reports: the layer's deadline cancels the call, and the method answers with it.
    let started = Instant::now();
    let status = reports
        .generate(report("late", 30_000))
        .await
        .expect_err("the reports deadline passed");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() >= REPORTS_DEADLINE);
    // Reports: a call the client drops is cancelled.
    let mut call = Box::pin(reports.generate(report("gone", 30_000)));
    tokio::select! {
        result = &mut call => panic!("the call returned: {result:?}"),
        () = log.wait_for("start gone") => {}
    }
    drop(call);
    log.wait_for(&format!("reports {GENERATE} disconnected handler"))
        .await;

    // Payments: no scope, no deadline; four times the reports deadline, and it completes.
    let receipt = payments.pay(payment("p1", 200)).await.unwrap();
    assert_eq!(receipt.into_inner().text, "paid p1");
    // Payments: a call the client drops is dropped, and nothing is cancelled.
    let mut call = Box::pin(payments.pay(payment("p2", 30_000)));
    tokio::select! {
        result = &mut call => panic!("the call returned: {result:?}"),
        () = log.wait_for("pay p2 no scope") => {}
    }
    drop(call);
    log.wait_for("dropped p2").await;

    drop((reports, payments));
    server.stop().await;
    assert_eq!(
        cancellations(&log),
        [
            format!("handler {GENERATE} deadline_exceeded handler"),
            format!("reports {GENERATE} deadline_exceeded handler"),
            "dropped gone".to_owned(),
            format!("handler {GENERATE} disconnected handler"),
            format!("reports {GENERATE} disconnected handler"),
            "pay p1 no scope".to_owned(),
            "pay p2 no scope".to_owned(),
            "dropped p2".to_owned(),
        ]
    );
    let handles = log.handles();
    assert_eq!(handles.len(), 2);
    for rc in &handles {
        assert!(rc.deadline().is_some());
    }
    assert_eq!(handles[0].reason(), Some(CancelReason::DeadlineExceeded));
    assert_eq!(handles[1].reason(), Some(CancelReason::Disconnected));
}

/// A server-wide layer for every service, and a deadline on one: the service's layer joins the
/// scope the server's layer created, so the reports calls get the deadline and both layers'
/// callbacks (innermost first); the payments calls get a scope without a deadline.
#[tokio::test]
async fn a_deadline_on_one_service_under_a_server_wide_layer() {
    let log = Log::default();
    let reports = log
        .layer("reports")
        .timeout(REPORTS_DEADLINE)
        .layer(ReportsServer::new(Recorder { log: log.clone() }));
    let payments = PaymentsServer::new(Payer { log: log.clone() });
    let everything = log.layer("server");
    let server = GrpcServer::spawn(|incoming, stop| {
        Server::builder()
            .layer(everything)
            .add_service(reports)
            .add_service(payments)
            .serve_with_incoming_shutdown(incoming, stop)
    })
    .await;
    let channel = server.channel().await;
    let mut reports = ReportsClient::new(channel.clone());
    let mut payments = PaymentsClient::new(channel);

    let status = reports
        .generate(report("late", 30_000))
        .await
        .expect_err("the reports deadline passed");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let receipt = payments.pay(payment("p1", 200)).await.unwrap();
    assert_eq!(receipt.into_inner().text, "paid p1");

    drop((reports, payments));
    server.stop().await;
    assert_eq!(
        cancellations(&log),
        [
            format!("handler {GENERATE} deadline_exceeded handler"),
            format!("reports {GENERATE} deadline_exceeded handler"),
            format!("server {GENERATE} deadline_exceeded handler"),
            "pay p1 no deadline".to_owned(),
        ]
    );
}

/// Compiles only if tonic's `add_service` takes the service of every server-side layer of the
/// crate, alone and stacked: each forwards its service's name (`NamedService`), and its
/// response body and future are what tonic's router needs.
fn _every_server_layer_fits_add_service(log: Log) {
    let detached = CancellationLayer::new()
        .detached()
        .layer(ReportsServer::new(Recorder { log: log.clone() }));
    let stacked = CancellationLayer::new()
        .timeout(REPORTS_DEADLINE)
        .layer(RequestBodyLayer::new().layer(PaymentsServer::new(Payer { log })));
    let _router = Server::builder().add_service(detached).add_service(stacked);
}
