//! [`PeerWatchService`]: a connection's service, whose request in flight is dropped when the
//! connection's [`PeerWatch`] sees the peer leave, as hyper drops it when it reads the end.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tower_layer::Layer;
use tower_service::Service;

use crate::event::TARGET;

use super::peer::{PeerLeft, PeerWatch, Shared};

type BoxError = Box<dyn Error + Send + Sync>;

/// Why a [`PeerWatchService`] dropped a request: its peer left. The response it then gives
/// hyper, which nobody reads, has status `499` (nginx's "client closed request") and this in
/// its extensions, for the logs of layers outside; a response body cut this way fails with
/// it. hyper then closes the connection (HTTP/1.1) or resets the stream (HTTP/2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerGone(pub PeerLeft);

impl fmt::Display for PeerGone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request dropped: {}", self.0)
    }
}

impl Error for PeerGone {}

impl PeerWatch {
    /// Wraps the connection's service: when the peer leaves, the request in flight (its
    /// handler future, or its response body) is dropped at once.
    pub fn service<S>(&self, inner: S) -> PeerWatchService<S> {
        PeerWatchService {
            inner,
            watch: Some(self.clone()),
            warned: None,
        }
    }
}

/// Drops a request when its connection's [`PeerWatch`] sees the peer leave, for servers that
/// hand each request its connection's watch in the extensions: axum's
/// `into_make_service_with_connect_info::<PeerWatch>()` (as `ConnectInfo<PeerWatch>`, feature
/// `axum`), or a plain `PeerWatch` extension. A request without one passes through, and a
/// `warn` event says so once per layer.
///
/// Put it outside the [`CancellationLayer`](crate::CancellationLayer) (with axum, a later
/// `.layer(..)` call), so that what it drops is the layer's future or body.
#[derive(Clone, Debug, Default)]
pub struct PeerWatchLayer {
    warned: Arc<AtomicBool>,
}

impl PeerWatchLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for PeerWatchLayer {
    type Service = PeerWatchService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerWatchService {
            inner,
            watch: None,
            warned: Some(Arc::clone(&self.warned)),
        }
    }
}

/// The service of one connection watched by a [`PeerWatch`] ([`PeerWatch::service`]), or of
/// a [`PeerWatchLayer`], which finds each request's watch in its extensions.
#[derive(Clone, Debug)]
pub struct PeerWatchService<S> {
    inner: S,
    /// The connection's watch (`PeerWatch::service`), or `None`: the request's extensions.
    watch: Option<PeerWatch>,
    /// The layer's "no watch found" warning, given once.
    warned: Option<Arc<AtomicBool>>,
}

/// The watch of the request's connection, from its extensions.
fn find(extensions: &http::Extensions) -> Option<&PeerWatch> {
    if let Some(watch) = extensions.get::<PeerWatch>() {
        return Some(watch);
    }
    #[cfg(feature = "axum")]
    if let Some(info) = extensions.get::<axum::extract::ConnectInfo<PeerWatch>>() {
        return Some(&info.0);
    }
    None
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for PeerWatchService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: Body,
{
    type Response = Response<PeerWatchBody<ResBody>>;
    type Error = S::Error;
    type Future = PeerWatchFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let watch = match &self.watch {
            Some(watch) => Some(watch),
            None => find(req.extensions()),
        };
        if watch.is_none()
            && self
                .warned
                .as_ref()
                .is_some_and(|w| !w.swap(true, Ordering::Relaxed))
        {
            tracing::warn!(
                target: TARGET,
                "PeerWatchLayer found no PeerWatch in the request: serve with \
                 into_make_service_with_connect_info::<PeerWatch>() (axum) or insert one per \
                 connection; requests pass through unwatched",
            );
        }
        // Checked before anything is cloned: most requests need no watch.
        let notice = watch
            .filter(|watch| needs_watch(&req, watch))
            .map(|watch| Notice::new(Arc::clone(watch.shared())));
        PeerWatchFuture {
            state: Running::Running {
                inner: self.inner.call(req),
            },
            notice,
        }
    }
}

/// Waits for the connection's notice. Made when a request is watched; wants the watch from its
/// first pending poll until it is dropped.
struct Notice {
    shared: Arc<Shared>,
    left: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl Notice {
    fn new(shared: Arc<Shared>) -> Self {
        Self { shared, left: None }
    }

    /// Whether the peer left; parks the task's waker if not.
    fn poll_left(this: &mut Option<Self>, cx: &mut Context<'_>) -> Option<PeerGone> {
        let this = this.as_mut()?;
        this.poll(cx)
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Option<PeerGone> {
        let signal = &self.shared.signal;
        let left = self.left.get_or_insert_with(|| {
            signal.want();
            Box::pin(signal.left.clone().cancelled_owned())
        });
        left.as_mut()
            .poll(cx)
            .is_ready()
            .then(|| PeerGone(signal.how()))
    }
}

impl Drop for Notice {
    fn drop(&mut self) {
        if self.left.is_some() {
            self.shared.signal.release();
        }
    }
}

/// Whether `req` needs the watch: over HTTP/1.x, a request whose body is not over (hyper does
/// not read the socket while it is unread), or any request on a connection that allows
/// half-close (hyper then reads past a FIN without closing). Over HTTP/2 hyper reads the
/// socket all along and sees the peer leave itself.
fn needs_watch<B: Body>(req: &Request<B>, watch: &PeerWatch) -> bool {
    req.version() < Version::HTTP_2 && (watch.shared().half_close || !req.body().is_end_stream())
}

pin_project! {
    #[project = RunningProj]
    enum Running<T> {
        Running { #[pin] inner: T },
        Dropped,
    }
}

pin_project! {
    /// Response future of [`PeerWatchService`].
    #[must_use = "futures do nothing unless polled"]
    pub struct PeerWatchFuture<F> {
        #[pin]
        state: Running<F>,
        // `None`: no watch for this request.
        notice: Option<Notice>,
    }
}

impl<F, B, E> Future for PeerWatchFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<PeerWatchBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let RunningProj::Running { inner } = this.state.as_mut().project() else {
            return Poll::Ready(Ok(gone(PeerGone(PeerLeft::Closed))));
        };
        // The handler first: a response that is ready goes out, whatever the peer did.
        if let Poll::Ready(result) = inner.poll(cx) {
            let notice = this
                .notice
                .take()
                .map(|notice| Notice::new(Arc::clone(&notice.shared)));
            return Poll::Ready(match result {
                Ok(response) => Ok(response.map(|body| PeerWatchBody {
                    state: Running::Running { inner: body },
                    notice,
                })),
                Err(error) => Err(error),
            });
        }
        match Notice::poll_left(this.notice, cx) {
            None => Poll::Pending,
            Some(reason) => {
                // Dropped here and now, as hyper drops the future of a client it saw leave.
                this.state.set(Running::Dropped);
                Poll::Ready(Ok(gone(reason)))
            }
        }
    }
}

/// The response to a request dropped because its peer left: nobody reads it.
fn gone<B>(reason: PeerGone) -> Response<PeerWatchBody<B>> {
    let mut response = Response::new(PeerWatchBody {
        state: Running::Dropped,
        notice: None,
    });
    *response.status_mut() = StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST);
    response.extensions_mut().insert(reason);
    response
}

impl<F> fmt::Debug for PeerWatchFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerWatchFuture").finish_non_exhaustive()
    }
}

pin_project! {
    /// Response body of [`PeerWatchService`]: dropped, and failed with [`PeerGone`], when the
    /// peer leaves while it streams.
    pub struct PeerWatchBody<B> {
        #[pin]
        state: Running<B>,
        notice: Option<Notice>,
    }
}

impl<B> Body for PeerWatchBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let mut this = self.project();
        let RunningProj::Running { inner } = this.state.as_mut().project() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        match Notice::poll_left(this.notice, cx) {
            None => Poll::Pending,
            Some(gone) => {
                this.state.set(Running::Dropped);
                Poll::Ready(Some(Err(Box::new(gone))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            Running::Running { inner } => inner.is_end_stream(),
            Running::Dropped => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            Running::Running { inner } => inner.size_hint(),
            Running::Dropped => SizeHint::with_exact(0),
        }
    }
}

impl<B> fmt::Debug for PeerWatchBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerWatchBody").finish_non_exhaustive()
    }
}
