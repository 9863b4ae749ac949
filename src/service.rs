//! `CancellationService`: creates (or joins) the scope of each request and fills the
//! request extensions.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::hooks::{Bound, Hooks};
use crate::scope::{Guard, Scope};
use crate::{CancellableBody, CancellationLayer, RequestCancellation, ResponseFuture};

/// Middleware that gives each request a cancellation scope. Built by [`CancellationLayer`].
///
/// For each request it inserts a [`RequestCancellation`] and its
/// [`CancellationToken`](tokio_util::sync::CancellationToken) into the request extensions,
/// then guards the response future and the response body: if either is dropped before the
/// body reached its end, the request is cancelled with
/// [`CancelReason::Disconnected`](crate::CancelReason::Disconnected).
///
/// If the request already carries a `RequestCancellation` (an outer `CancellationLayer`
/// created it), this service joins that scope instead of creating a second one.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
///
/// use http::{Request, Response};
/// use tokio_util::sync::CancellationToken;
/// use tower::{ServiceExt, service_fn};
/// use tower_cancel::CancellationService;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = CancellationService::new(service_fn(|req: Request<()>| async move {
///     let token = req.extensions().get::<CancellationToken>().unwrap();
///     Ok::<_, Infallible>(Response::new(format!("cancelled: {}", token.is_cancelled())))
/// }));
/// let response = svc.oneshot(Request::new(())).await.unwrap();
/// assert_eq!(response.status(), 200);
/// # }
/// ```
pub struct CancellationService<S> {
    inner: S,
    hooks: Arc<Hooks>,
}

impl<S> CancellationService<S> {
    /// Wraps `inner` with a default [`CancellationLayer`] (no callbacks).
    pub fn new(inner: S) -> Self {
        Self::from_hooks(inner, Arc::new(Hooks::new()))
    }

    /// A [`CancellationLayer`] to configure, for use with `ServiceBuilder`.
    pub fn layer() -> CancellationLayer {
        CancellationLayer::new()
    }

    pub(crate) fn from_hooks(inner: S, hooks: Arc<Hooks>) -> Self {
        Self { inner, hooks }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for CancellationService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            hooks: Arc::clone(&self.hooks),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for CancellationService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancellationService")
            .field("inner", &self.inner)
            .field("callbacks", &self.hooks.len())
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CancellationService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body,
{
    type Response = Response<CancellableBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let bound = Bound::capture(&self.hooks);
        let guard = match req.extensions().get::<RequestCancellation>() {
            Some(outer) => {
                // An outer layer owns the scope and its guard; add our callbacks to it.
                outer.scope().join(bound);
                Guard::default()
            }
            None => {
                let scope = Scope::new(req.method().clone(), req.uri().clone(), bound);
                let extensions = req.extensions_mut();
                extensions.insert(scope.token().clone());
                extensions.insert(RequestCancellation::new(Arc::clone(&scope)));
                Guard::new(scope)
            }
        };
        ResponseFuture::new(self.inner.call(req), guard)
    }
}
