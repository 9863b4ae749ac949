//! `CancellationService`: creates (or joins) the scope of each request and fills the
//! request extensions.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::handle::RequestCancellation;
use crate::macros::inner_service_accessors;
use crate::scope::Scope;
use crate::scope::config::Bound;
use crate::scope::config::Config;
use crate::server::body::CancellationBody;
use crate::server::detached::DetachedFuture;
use crate::server::future::CancellationFuture;
use crate::server::guard::Guard;

/// The default mode: when the client leaves, the handler future is dropped (hyper's
/// behaviour) and the request is cancelled.
#[derive(Debug)]
pub enum Attached {}

/// The mode of [`CancellationLayer::detached`](crate::CancellationLayer::detached): when the client leaves, the request is
/// cancelled, but the handler keeps running to its end on the runtime, tracked by the layer's
/// [`TaskTracker`](tokio_util::task::TaskTracker); its response is discarded.
#[derive(Debug)]
pub enum Detached {}

/// Middleware that gives each request a cancellation scope. Built by
/// [`CancellationLayer`](crate::CancellationLayer).
///
/// For each request it inserts a [`RequestCancellation`] and its
/// [`CancellationToken`](tokio_util::sync::CancellationToken) into the request extensions,
/// then guards the response future and the response body: if either is dropped before the
/// body reached its end, the request is cancelled with
/// [`CancelReason::Disconnected`](crate::CancelReason::Disconnected).
///
/// If the request already carries a `RequestCancellation` (an outer `CancellationLayer`
/// created it), this service joins that scope instead of creating a second one: its
/// callbacks, shutdown token and deadline apply to it as well.
///
/// Extensions are keyed by type, so there is one `CancellationToken` per request: the
/// request's. An application that also passes a token of its own through the extensions (a
/// shutdown token in axum's `Extension`, say) collides with it. Inserted *outside* this layer,
/// the application's token is replaced by the request's, with a `warn` event (target
/// `tower_cancel`) each time; inserted *inside* it, the application's token replaces the
/// request's, silently, and handlers that take the `CancellationToken` get the application's.
/// Wrap an application token in a type of its own (`struct Shutdown(CancellationToken)`), or
/// take the request's through [`RequestCancellation`], whose type is the crate's.
///
/// `M` is [`Attached`] (the default) or [`Detached`]; see
/// [`CancellationLayer::detached`](crate::CancellationLayer::detached).
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
///
/// use http::{Request, Response};
/// use tokio_util::sync::CancellationToken;
/// use tower::{ServiceExt, service_fn};
/// use tower_cancel::server::CancellationService;
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
pub struct CancellationService<S, M = Attached> {
    inner: S,
    config: Arc<Config>,
    mode: PhantomData<fn() -> M>,
}

impl<S> CancellationService<S> {
    /// Wraps `inner` with a default [`CancellationLayer`](crate::CancellationLayer) (no
    /// callbacks).
    pub fn new(inner: S) -> Self {
        Self::from_config(inner, Arc::new(Config::new()))
    }
}

impl<S, M> CancellationService<S, M> {
    pub(crate) fn from_config(inner: S, config: Arc<Config>) -> Self {
        Self {
            inner,
            config,
            mode: PhantomData,
        }
    }

    inner_service_accessors!();

    /// Creates or joins the request's scope and fills the extensions. The guard is armed
    /// only if this service created the scope.
    fn enter<B>(&self, req: &mut Request<B>) -> Guard {
        let bound = Bound::capture(&self.config);
        let time_limit = self.config.time_limit(req.headers());
        match req.extensions().get::<RequestCancellation>() {
            Some(outer) => {
                // An outer layer owns the scope and its guard; add our configuration to it.
                outer.scope_arc().join(bound, time_limit);
                Guard::default()
            }
            None => {
                let recorded = self.config.record(req.headers(), req.extensions());
                let scope = Scope::new(
                    req.method().clone(),
                    req.uri().clone(),
                    bound,
                    time_limit,
                    recorded,
                );
                let extensions = req.extensions_mut();
                if extensions.insert(scope.token().clone()).is_some() {
                    // Extensions are keyed by type: a token of the application's (an
                    // `Extension(token)` layer outside this one) is replaced by the request's.
                    tracing::warn!(
                        target: crate::event::TARGET,
                        method = %req.method(),
                        path = req.uri().path(),
                        "the request already carried a CancellationToken in its extensions: \
                         CancellationLayer replaced it with the request's own token; pass an \
                         application token in a type of its own",
                    );
                }
                let extensions = req.extensions_mut();
                extensions.insert(RequestCancellation::new(Arc::clone(&scope)));
                Guard::new(scope)
            }
        }
    }
}

impl<S: Clone, M> Clone for CancellationService<S, M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
            mode: PhantomData,
        }
    }
}

impl<S: fmt::Debug, M> fmt::Debug for CancellationService<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancellationService")
            .field("inner", &self.inner)
            .field("mode", &std::any::type_name::<M>())
            .field("callbacks", &self.config.callbacks.len())
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CancellationService<S, Attached>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body,
{
    type Response = Response<CancellationBody<ResBody>>;
    type Error = S::Error;
    type Future = CancellationFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let guard = self.enter(&mut req);
        let version = req.version();
        CancellationFuture::new(self.inner.call(req), guard, version)
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CancellationService<S, Detached>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: http_body::Body + Default + Send + 'static,
{
    type Response = Response<CancellationBody<ResBody>>;
    type Error = S::Error;
    type Future = CancellationFuture<DetachedFuture<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let guard = self.enter(&mut req);
        let version = req.version();
        let Some(permit) = self.config.handlers.try_acquire() else {
            // As many detached handlers as the limit still run: this one does not start. The
            // 503 completes the request; nothing is cancelled.
            tracing::debug!(
                target: crate::event::TARGET,
                method = %req.method(),
                path = req.uri().path(),
                "detached handler limit reached: request refused with 503",
            );
            return CancellationFuture::new(DetachedFuture::refused(), guard, version);
        };
        // The scope this request created or joined: it waits for the handler's task too, and
        // its creator's tracker (the outermost layer's) tracks it, where a graceful shutdown
        // waits for the request's tasks.
        let scope = req
            .extensions()
            .get::<RequestCancellation>()
            .map(|rc| Arc::clone(rc.scope_arc()));
        let tracker = scope.as_ref().map_or_else(
            || self.config.tracker.clone(),
            |scope| scope.tracker().clone(),
        );
        let handler = DetachedFuture::spawn(self.inner.call(req), &tracker, scope, permit);
        CancellationFuture::new(handler, guard, version)
    }
}
