//! tonic integration (feature `tonic`): cancellation outcomes as gRPC statuses.

use tonic::{Code, Status};

use crate::event::TARGET;
use crate::handle::MissingCancellationLayer;
use crate::record::{CancelReason, Cancelled};

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
        ] {
            let status = Status::from(reason);
            assert_eq!(status.code(), code, "{reason}");
            assert!(!status.message().is_empty());
        }
    }
}
