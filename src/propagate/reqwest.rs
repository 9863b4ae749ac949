//! `PropagateMiddleware`: [`PropagateLayer`](crate::PropagateLayer) for reqwest, as a
//! `reqwest-middleware` middleware.

use std::future::poll_fn;
use std::pin::pin;
use std::task::Poll;

use http::header::HeaderName;
use http::{Extensions, Uri};
use reqwest::ResponseBuilderExt;
use reqwest_middleware::{Middleware, Next};

use crate::handle::RequestCancellation;
use crate::propagate::{PropagateBody, Watch};
use crate::timeout_header;

/// A [`reqwest_middleware`] middleware that carries the inbound request's cancellation and
/// deadline to the reqwest calls made on its behalf, as [`PropagateLayer`](crate::PropagateLayer)
/// does for tower clients (hyper-util's `Client`, tonic). Feature `reqwest`.
///
/// A call carries the inbound request when its [`RequestCancellation`] is in the call's
/// extensions: `client.get(url).with_extension(inbound.clone())`. Then:
///
/// * **Deadline.** If the inbound request has a deadline, the call carries the time that
///   remains in the callee's convention, as `PropagateLayer` writes it: `grpc-timeout` for
///   gRPC, `connect-timeout-ms` for Connect, and for anything else the header set with
///   [`deadline_header`](Self::deadline_header), in milliseconds, or none.
/// * **Cancellation.** When the inbound request is cancelled (its client left, a shutdown, its
///   deadline, an explicit cancel) while the call waits for its answer, the call is dropped
///   (the callee sees its connection closed, or `RST_STREAM` over HTTP/2) and fails with
///   [`reqwest_middleware::Error::Middleware`] holding an
///   [`InboundCancelled`](crate::InboundCancelled), which says why. Once the call answered,
///   its body is watched the same way: the body is dropped, and reading it fails with a
///   `reqwest::Error` whose [`source`](std::error::Error::source) chain holds the
///   `InboundCancelled`. The response keeps its [`url`](reqwest::Response::url).
///
/// A call without a `RequestCancellation` in its extensions passes through unchanged. Work
/// that a dropped handler was awaiting stops anyway; this middleware matters for the handler
/// that keeps running (a shutdown, a deadline, an explicit cancel) and for calls that work
/// spawned by the handler makes: they stop with the request.
///
/// ```toml
/// [dependencies]
/// tower-cancel = { version = "0.1", features = ["reqwest"] }
/// reqwest = "0.13"
/// reqwest-middleware = "0.5"
/// ```
///
/// ```no_run
/// use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
/// use tower_cancel::propagate::PropagateMiddleware;
/// use tower_cancel::{InboundCancelled, RequestCancellation};
///
/// // Once, at start-up.
/// fn client() -> ClientWithMiddleware {
///     ClientBuilder::new(reqwest::Client::new())
///         .with(PropagateMiddleware::new())
///         .build()
/// }
///
/// // In a handler: the call stops with the inbound request.
/// async fn stock(client: &ClientWithMiddleware, inbound: &RequestCancellation) -> String {
///     let call = client
///         .get("http://inventory.internal/stock/42")
///         .with_extension(inbound.clone())
///         .send()
///         .await;
///     match call {
///         Ok(response) => response.text().await.unwrap_or_default(),
///         Err(reqwest_middleware::Error::Middleware(error)) => {
///             match error.downcast_ref::<InboundCancelled>() {
///                 Some(why) => format!("gave up: {}", why.reason()),
///                 None => format!("failed: {error}"),
///             }
///         }
///         Err(error) => format!("failed: {error}"),
///     }
/// }
/// ```
#[derive(Clone, Debug, Default)]
pub struct PropagateMiddleware {
    deadline_header: Option<HeaderName>,
}

impl PropagateMiddleware {
    /// A middleware that writes deadlines only in the gRPC and Connect conventions.
    pub fn new() -> Self {
        Self::default()
    }

    /// The header that carries the deadline, in milliseconds, to a callee that speaks neither
    /// gRPC nor Connect, as [`PropagateLayer::deadline_header`](crate::PropagateLayer::deadline_header).
    #[must_use]
    pub fn deadline_header(mut self, name: HeaderName) -> Self {
        self.deadline_header = Some(name);
        self
    }
}

#[async_trait::async_trait]
impl Middleware for PropagateMiddleware {
    async fn handle(
        &self,
        mut req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let Some(inbound) = extensions.get::<RequestCancellation>().cloned() else {
            return next.run(req, extensions).await;
        };
        if let Some(deadline) = inbound.deadline() {
            // Only the query is read (Connect's `connect=v1`); a URL is always a valid URI.
            let uri: Uri = req.url().as_str().parse().unwrap_or_default();
            let other = self.deadline_header.as_ref();
            timeout_header::propagate(req.headers_mut(), &uri, deadline, other);
        }
        let Some(mut watch) = Watch::new(Some(inbound)) else {
            return next.run(req, extensions).await;
        };
        let mut call = pin!(next.run(req, extensions));
        // The inbound request first: once it is cancelled, nobody wants the answer, and
        // dropping the call is what tells the callee.
        let response = poll_fn(|cx| {
            if let Poll::Ready(cancelled) = watch.poll(cx) {
                return Poll::Ready(Err(reqwest_middleware::Error::middleware(cancelled)));
            }
            call.as_mut().poll(cx)
        })
        .await?;
        // The body, watched until it ends; the URL kept (`Response::url`).
        let url = response.url().clone();
        let response: http::Response<reqwest::Body> = response.into();
        let (mut parts, body) = response.into_parts();
        let marked = http::Response::builder()
            .url(url)
            .body(())
            .unwrap_or_default();
        parts.extensions.extend(marked.into_parts().0.extensions);
        let body = reqwest::Body::wrap(PropagateBody {
            inner: Some(body),
            watch: Some(watch),
        });
        Ok(reqwest::Response::from(http::Response::from_parts(
            parts, body,
        )))
    }
}
