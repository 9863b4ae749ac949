//! [`PeerWatchService`]: a connection's service, whose request in flight is dropped when the
//! connection's [`PeerWatch`] sees the peer leave, as hyper drops it when it reads the end.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tower_service::Service;

use super::peer::{PeerLeft, PeerWatch, Shared};

type BoxError = Box<dyn Error + Send + Sync>;

/// The error a [`PeerWatchService`] answers hyper with once it dropped a request whose peer
/// left: hyper then closes the connection (HTTP/1.1) or resets the stream (HTTP/2).
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
            watch: self.clone(),
        }
    }
}

/// The service of one connection watched by a [`PeerWatch`]; see [`PeerWatch::service`].
#[derive(Clone, Debug)]
pub struct PeerWatchService<S> {
    inner: S,
    watch: PeerWatch,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for PeerWatchService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<PeerWatchBody<ResBody>>;
    type Error = BoxError;
    type Future = PeerWatchFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        PeerWatchFuture {
            state: Running::Running {
                inner: self.inner.call(req),
            },
            notice: Notice::new(Arc::clone(self.watch.shared())),
        }
    }
}

/// Waits for the connection's notice, made the first time the request is pending.
struct Notice {
    shared: Arc<Shared>,
    left: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl Notice {
    fn new(shared: Arc<Shared>) -> Self {
        Self { shared, left: None }
    }

    /// Whether the peer left; parks the task's waker if not.
    fn poll_left(&mut self, cx: &mut Context<'_>) -> Option<PeerGone> {
        let shared = &self.shared;
        let left = self
            .left
            .get_or_insert_with(|| Box::pin(shared.left.clone().cancelled_owned()));
        left.as_mut()
            .poll(cx)
            .is_ready()
            .then(|| PeerGone(PeerWatch::from_shared(shared).peer_left().unwrap_or(PeerLeft::Closed)))
    }
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
        notice: Notice,
    }
}

impl<F, B, E> Future for PeerWatchFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<PeerWatchBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let RunningProj::Running { inner } = this.state.as_mut().project() else {
            return Poll::Ready(Err(Box::new(PeerGone(PeerLeft::Closed))));
        };
        // The handler first: a response that is ready goes out, whatever the peer did.
        if let Poll::Ready(result) = inner.poll(cx) {
            let shared = Arc::clone(&this.notice.shared);
            return Poll::Ready(match result {
                Ok(response) => Ok(response.map(|body| PeerWatchBody {
                    state: Running::Running { inner: body },
                    notice: Notice::new(shared),
                })),
                Err(error) => Err(error.into()),
            });
        }
        match this.notice.poll_left(cx) {
            None => Poll::Pending,
            Some(gone) => {
                // Dropped here and now, as hyper drops the future of a client it saw leave.
                this.state.set(Running::Dropped);
                Poll::Ready(Err(Box::new(gone)))
            }
        }
    }
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
        notice: Notice,
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
        match this.notice.poll_left(cx) {
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
