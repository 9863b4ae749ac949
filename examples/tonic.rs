//! A tonic server behind `CancellationLayer`, driven by a tonic client in the same process.
//!
//! Run with: cargo run --example tonic
//!
//! Five calls, each printed as it happens:
//!
//! 1. a call that completes: nothing is cancelled;
//! 2. the client cancels a call (drops it): the method stops at once, its cleanup runs;
//! 3. the client stops reading a server stream: cancelled in the body phase;
//! 4. a call whose deadline (`grpc-timeout`) passes: `DeadlineExceeded`, not a disconnect;
//! 5. shutdown with a call in flight: the method answers `UNAVAILABLE` and the server drains.
//!
//! In your own server, the lines that matter are the layer and `Server::builder().layer(..)`;
//! `tonic/reports.rs` is what `tonic-build` would generate from the `.proto` it quotes.
//! Set `PORT` to listen on a fixed port.

#[allow(dead_code, unreachable_pub)]
#[path = "tonic/reports.rs"]
mod reports;

use std::error::Error;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{Stream, stream};
use tokio::net::TcpListener;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic::{Code, Request, Response, Status};
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};

use reports::reports_client::ReportsClient;
use reports::reports_server::{Reports, ReportsServer};
use reports::{Report, ReportRequest, Tick, WatchRequest};

/// Prints a line with the time since the example started.
fn say(line: impl std::fmt::Display) {
    static START: OnceLock<Instant> = OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed();
    println!("{:>7.1} ms  {line}", t.as_secs_f64() * 1e3);
}

fn ms(millis: u32) -> Duration {
    Duration::from_millis(millis.into())
}

struct ReportService;

#[tonic::async_trait]
impl Reports for ReportService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<Tick, Status>> + Send>>;

    async fn generate(&self, request: Request<ReportRequest>) -> Result<Response<Report>, Status> {
        // `?` answers INTERNAL, naming the layer to add, if the server has no CancellationLayer.
        let cancel = RequestCancellation::from_extensions(request.extensions())?;
        let ReportRequest { name, millis } = request.into_inner();
        say(format!(
            "[server]  generate({name}): working for {millis} ms"
        ));
        let partial = name.clone();
        cancel.on_cancel(move |c| {
            say(format!(
                "[server]  generate({partial}): partial report discarded ({})",
                c.reason()
            ));
        });
        tokio::select! {
            // DeadlineExceeded, Shutdown, ... become the matching gRPC status (feature "tonic").
            reason = cancel.cancelled() => Err(reason.into()),
            _ = sleep(ms(millis)) => Ok(Response::new(Report { text: format!("report {name}") })),
        }
    }

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let WatchRequest {
            interval_millis,
            count,
        } = request.into_inner();
        // The stream knows nothing about cancellation: hyper drops it when the client leaves,
        // and the layer reports that as a cancellation in the body phase.
        let ticks = stream::unfold(0u64, move |n| async move {
            if count != 0 && n >= u64::from(count) {
                return None;
            }
            sleep(ms(interval_millis)).await;
            Some((Ok(Tick { n }), n + 1))
        });
        Ok(Response::new(Box::pin(ticks)))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let shutdown = CancellationToken::new();
    let layer = CancellationLayer::new()
        // Honour the deadline the client sends; tonic enforces it too, and the layer records
        // it as DeadlineExceeded either way.
        .grpc_timeout(true)
        .shutdown_token(shutdown.clone())
        .on_cancel(|c: &Cancelled| {
            say(format!(
                "[layer]   {} cancelled: {} during {} after {:.1?}",
                c.uri().path(),
                c.reason(),
                c.phase(),
                c.elapsed()
            ));
        });

    let port = std::env::var("PORT").unwrap_or_else(|_| "0".to_owned());
    let listener = TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    let addr = listener.local_addr()?;
    say(format!("serving reports.Reports on {addr}"));
    let server = tokio::spawn(
        Server::builder()
            .layer(layer)
            .add_service(ReportsServer::new(ReportService))
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown.clone().cancelled_owned(),
            ),
    );

    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = ReportsClient::new(channel);
    let request = |name: &str, millis| ReportRequest {
        name: name.to_owned(),
        millis,
    };

    say("1. a call that completes");
    let report = client.generate(request("q1", 50)).await?;
    say(format!(
        "[client]  got {:?}; no cleanup runs",
        report.get_ref().text
    ));

    say("2. the client cancels a call after 100 ms");
    let call = client.generate(request("q2", 10_000));
    let _ = tokio::time::timeout(Duration::from_millis(100), call).await;
    say("[client]  dropped the call: the channel resets the stream");
    sleep(Duration::from_millis(50)).await;

    say("3. the client stops reading a stream after 3 ticks");
    let mut ticks = client
        .watch(WatchRequest {
            interval_millis: 20,
            count: 0,
        })
        .await?
        .into_inner();
    while let Some(tick) = ticks.message().await? {
        say(format!("[client]  tick {}", tick.n));
        if tick.n == 2 {
            break;
        }
    }
    drop(ticks);
    sleep(Duration::from_millis(50)).await;

    say("4. a call with a 200 ms deadline on 10 s of work");
    let mut timed = Request::new(request("q4", 10_000));
    timed.set_timeout(Duration::from_millis(200));
    let status = client.generate(timed).await.unwrap_err();
    say(format!(
        "[client]  {:?}: {}",
        status.code(),
        status.message()
    ));
    sleep(Duration::from_millis(50)).await;

    say("5. shutdown with a call in flight");
    let mut second = client.clone();
    let call = tokio::spawn(async move { second.generate(request("q5", 10_000)).await });
    sleep(Duration::from_millis(100)).await;
    shutdown.cancel();
    let status = call.await?.unwrap_err();
    say(format!(
        "[client]  {:?}: {}",
        status.code(),
        status.message()
    ));
    assert_eq!(status.code(), Code::Unavailable);
    drop(client);
    server.await??;
    say("server drained and stopped");
    Ok(())
}
