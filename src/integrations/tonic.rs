//! tonic integration (feature `tonic`): cancellation outcomes as gRPC statuses, and the
//! middleware as tonic `NamedService`s, so that a layer can wrap one service of a server.

use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::event::TARGET;
use crate::handle::MissingCancellationLayer;
use crate::record::{CancelReason, Cancelled};
use crate::request_body::RequestBodyService;
use crate::server::CancellationService;

/// The wrapped service's name, so that tonic's `add_service` takes a layered service: one
/// service of a server gets a layer of its own, its deadline, callbacks or
/// [`detached`](crate::CancellationLayer::detached) mode, and the others do not.
///
/// ```toml
/// [dependencies]
/// tower-cancel = { version = "0.1", features = ["tonic"] }
/// tonic = "0.14"
/// tower = "0.5"
/// tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
/// # and what the code tonic-build generates uses: prost = "0.14", tonic-prost = "0.14"
/// ```
///
/// ```no_run
/// # #[allow(dead_code, unreachable_pub)]
/// # mod reports { include!(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tonic/reports.rs")); }
/// # #[allow(dead_code, unreachable_pub)]
/// # mod payments { include!(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tonic/payments.rs")); }
/// # use reports::{Report, ReportRequest, Tick, WatchRequest};
/// # use reports::reports_server::{Reports, ReportsServer};
/// # use payments::{PayRequest, Receipt};
/// # use payments::payments_server::{Payments, PaymentsServer};
/// use std::time::Duration;
///
/// use tonic::transport::Server;
/// use tower::Layer;
/// use tower_cancel::{CancellationLayer, Cancelled};
///
/// # struct ReportService;
/// # #[tonic::async_trait]
/// # impl Reports for ReportService {
/// #     type WatchStream = futures_util::stream::Empty<Result<Tick, tonic::Status>>;
/// #     async fn generate(&self, _: tonic::Request<ReportRequest>)
/// #         -> Result<tonic::Response<Report>, tonic::Status> { unimplemented!() }
/// #     async fn watch(&self, _: tonic::Request<WatchRequest>)
/// #         -> Result<tonic::Response<Self::WatchStream>, tonic::Status> { unimplemented!() }
/// # }
/// # struct PaymentService;
/// # #[tonic::async_trait]
/// # impl Payments for PaymentService {
/// #     async fn pay(&self, _: tonic::Request<PayRequest>)
/// #         -> Result<tonic::Response<Receipt>, tonic::Status> { unimplemented!() }
/// # }
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     // A report nobody waits for is worth nothing: a 5 s deadline, cancelled with
///     // `DeadlineExceeded` (its method sees the token and answers DEADLINE_EXCEEDED).
///     let reports = CancellationLayer::new()
///         .timeout(Duration::from_secs(5))
///         .on_cancel(|c: &Cancelled| eprintln!("{} cancelled: {}", c.uri().path(), c.reason()))
///         .layer(ReportsServer::new(ReportService));
///     Server::builder()
///         .add_service(reports)
///         // No layer: no deadline, no `RequestCancellation` in the extensions.
///         .add_service(PaymentsServer::new(PaymentService))
///         .serve("127.0.0.1:50051".parse()?)
///         .await?;
///     Ok(())
/// }
/// ```
///
/// A server-wide `Server::builder().layer(CancellationLayer::new()..)` combines with it: the
/// service's layer joins the scope the server's layer created, and adds its callbacks and its
/// deadline, which can only shorten the server's. `tests/tonic.rs` runs both over sockets with a
/// tonic client.
impl<S: NamedService, M> NamedService for CancellationService<S, M> {
    const NAME: &'static str = S::NAME;
}

/// The wrapped service's name, so that a [`RequestBodyLayer`](crate::RequestBodyLayer) can wrap
/// one service of a tonic server (`add_service(layer.layer(..))`), as a
/// [`CancellationService`] can.
impl<S: NamedService> NamedService for RequestBodyService<S> {
    const NAME: &'static str = S::NAME;
}

/// The gRPC status a method answers when it stops because its request was cancelled.
///
/// | reason | code | why |
/// |---|---|---|
/// | `Disconnected` | `CANCELLED` | the client cancelled the call (nobody reads the answer) |
/// | `Shutdown` | `UNAVAILABLE` | the server is going away; gRPC clients may retry elsewhere |
/// | `DeadlineExceeded` | `DEADLINE_EXCEEDED` | the call's deadline passed |
/// | `Explicit` | `CANCELLED` | application code cancelled the request (`ABORTED` means a concurrency conflict in gRPC) |
///
/// With `grpc-timeout`, tonic's server enforces the deadline itself and answers the client
/// `CANCELLED` "Timeout expired", discarding the method's answer: `DEADLINE_EXCEEDED` from a
/// method reaches the client when the layer's own [`timeout`](crate::CancellationLayer::timeout)
/// is the shorter deadline.
///
/// ```toml
/// [dependencies]
/// tower-cancel = { version = "0.1", features = ["tonic"] }
/// tonic = "0.14"
/// tokio = { version = "1", features = ["macros", "time"] }
/// ```
///
/// ```
/// use tonic::{Code, Request, Response, Status};
/// use tower_cancel::{CancelReason, RequestCancellation};
///
/// async fn generate(request: Request<String>) -> Result<Response<String>, Status> {
///     let cancel = RequestCancellation::from_extensions(request.extensions())?;
///     tokio::select! {
///         reason = cancel.cancelled() => Err(reason.into()),
///         _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {
///             Ok(Response::new("report".to_owned()))
///         }
///     }
/// }
///
/// assert_eq!(Status::from(CancelReason::Shutdown).code(), Code::Unavailable);
/// assert_eq!(Status::from(CancelReason::DeadlineExceeded).code(), Code::DeadlineExceeded);
/// ```
impl From<CancelReason> for Status {
    fn from(reason: CancelReason) -> Self {
        let (code, message) = match reason {
            CancelReason::Disconnected => (Code::Cancelled, "the client cancelled the call"),
            CancelReason::Shutdown => (Code::Unavailable, "the server is shutting down"),
            CancelReason::DeadlineExceeded => (Code::DeadlineExceeded, "the deadline passed"),
            CancelReason::Explicit => (Code::Cancelled, "the call was cancelled"),
            CancelReason::Panicked => (Code::Internal, "the server failed"),
            CancelReason::SlowClient => (
                Code::DeadlineExceeded,
                "the client sent its request too slowly",
            ),
        };
        Status::new(code, message)
    }
}

/// What [`RequestCancellation::run`](crate::RequestCancellation::run) returns when the request
/// was cancelled: the reason's status (see `From<CancelReason>`), so a tonic method can write
/// `cancel.run(work).await?`.
///
/// ```
/// use tonic::{Request, Response, Status};
/// use tower_cancel::RequestCancellation;
///
/// async fn generate(request: Request<String>) -> Result<Response<String>, Status> {
///     let cancel = RequestCancellation::from_extensions(request.extensions())?;
///     let report = cancel
///         .run(async {
///             tokio::time::sleep(std::time::Duration::from_millis(5)).await;
///             "report".to_owned()
///         })
///         .await?;
///     Ok(Response::new(report))
/// }
/// ```
impl From<Cancelled> for Status {
    fn from(cancelled: Cancelled) -> Self {
        cancelled.reason().into()
    }
}

/// A missing layer is a server configuration error: `INTERNAL`, with the message that says
/// which layer to add. Lets a tonic method write
/// `RequestCancellation::from_extensions(request.extensions())?`.
///
/// ```
/// use tonic::{Code, Request, Status};
/// use tower_cancel::RequestCancellation;
///
/// let request = Request::new(()); // served without a CancellationLayer
/// let status: Status = RequestCancellation::from_extensions(request.extensions())
///     .unwrap_err()
///     .into();
/// assert_eq!(status.code(), Code::Internal);
/// assert!(status.message().contains("Server::builder().layer"));
/// ```
impl From<MissingCancellationLayer> for Status {
    fn from(missing: MissingCancellationLayer) -> Self {
        tracing::error!(target: TARGET, "{missing}");
        Status::internal(missing.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_code() {
        for (reason, code) in [
            (CancelReason::Disconnected, Code::Cancelled),
            (CancelReason::Shutdown, Code::Unavailable),
            (CancelReason::DeadlineExceeded, Code::DeadlineExceeded),
            (CancelReason::Explicit, Code::Cancelled),
            (CancelReason::Panicked, Code::Internal),
            (CancelReason::SlowClient, Code::DeadlineExceeded),
        ] {
            let status = Status::from(reason);
            assert_eq!(status.code(), code, "{reason}");
            assert!(!status.message().is_empty());
        }
    }
}
