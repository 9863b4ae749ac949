//! axum integration (feature `axum`): [`RequestCancellation`] as an extractor.

use std::convert::Infallible;

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;

use crate::event::TARGET;
use crate::handle::{MissingCancellationLayer, RequestCancellation};

/// `RequestCancellation` extracts the request's cancellation scope in axum handlers.
///
/// It needs a [`CancellationLayer`](crate::CancellationLayer) around the route
/// (`Router::layer` for every route, or `route_layer` for some). Without one, extraction fails
/// with [`MissingCancellationLayer`]; extract `Option<RequestCancellation>` to make the layer
/// optional.
///
/// ```toml
/// [dependencies]
/// tower-cancel = { version = "0.1", features = ["axum"] }
/// axum = "0.8"
/// tokio = { version = "1", features = ["macros", "time"] }
/// ```
///
/// ```
/// use axum::{Router, routing::get};
/// use tower_cancel::{CancellationLayer, RequestCancellation};
///
/// async fn report(cancel: RequestCancellation) -> String {
///     tokio::select! {
///         reason = cancel.cancelled() => format!("stopped: {reason}"),
///         _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => "done".to_owned(),
///     }
/// }
///
/// let app: Router = Router::new()
///     .route("/report", get(report))
///     .layer(CancellationLayer::new());
/// ```
impl<S: Send + Sync> FromRequestParts<S> for RequestCancellation {
    type Rejection = MissingCancellationLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        RequestCancellation::from_extensions(&parts.extensions)
    }
}

/// `Option<RequestCancellation>`: `None` when no [`CancellationLayer`](crate::CancellationLayer)
/// wraps the route.
impl<S: Send + Sync> OptionalFromRequestParts<S> for RequestCancellation {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<RequestCancellation>().cloned())
    }
}

/// A missing layer is a server configuration error: `500 Internal Server Error`, with a body
/// that says which layer to add, and an `error` event on target `tower_cancel`.
impl IntoResponse for MissingCancellationLayer {
    fn into_response(self) -> Response {
        tracing::error!(target: TARGET, "{self}");
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}
