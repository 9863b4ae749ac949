//! The idle timeout of a request body: the clock that runs while the handler waits for body
//! bytes, and the error its read fails with when the clock runs out.

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::runtime::deadline::Timer;

/// The error type of [`RequestBody`](super::RequestBody) (the same as `tower::BoxError`): the
/// original body's error, or [`IdleTimeout`].
pub(crate) use crate::propagate::BoxError;

/// No request-body bytes arrived for the [`idle_timeout`](super::RequestBodyLayer::idle_timeout)
/// while the handler waited for them.
///
/// The handler's read of its [`RequestBody`](super::RequestBody) fails with this error, boxed:
/// find it with `error.downcast_ref::<IdleTimeout>()`, or, through any wrapper that keeps it as
/// a [`source`](Error::source) (axum's `axum::Error`, for one), with
/// [`IdleTimeout::find`]. The request was cancelled with
/// [`CancelReason::SlowClient`](crate::CancelReason::SlowClient) when the read
/// failed.
///
/// The client gets `408 Request Timeout` without the handler finding it: the layer answers
/// `408` in place of the `400` or `500` a handler makes of a failed read (axum's body
/// extractors answer `400`; see [`idle_timeout`](super::RequestBodyLayer::idle_timeout)).
/// Find it to answer `408` with a response of your own, or to tell a stall from other
/// failures in the handler's logs or cleanup; a handler's own `408` passes unchanged.
///
/// With axum, on a route behind the layer, a handler that writes its own answer:
///
/// ```
/// use std::time::Duration;
///
/// use axum::Router;
/// use axum::body::Body;
/// use axum::http::{Request, StatusCode};
/// use axum::routing::post;
/// use http_body_util::BodyExt;
/// use tower::ServiceExt;
/// use tower_cancel::request_body::{IdleTimeout, RequestBodyLayer};
///
/// async fn upload(body: Body) -> Result<String, (StatusCode, String)> {
///     let body = body.collect().await.map_err(|error| match IdleTimeout::find(&error) {
///         Some(timeout) => (StatusCode::REQUEST_TIMEOUT, timeout.to_string()),
///         None => (StatusCode::BAD_REQUEST, error.to_string()),
///     })?;
///     Ok(format!("{} bytes", body.to_bytes().len()))
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let layer = RequestBodyLayer::new().idle_timeout(Duration::from_secs(30));
/// let app = Router::new().route("/upload", post(upload).route_layer(layer));
///
/// // A client that sends nothing, and does not leave.
/// let silent = futures_util::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
/// let request = Request::post("/upload").body(Body::from_stream(silent)).unwrap();
/// let response = app.oneshot(request).await.unwrap();
/// assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
/// let text = response.into_body().collect().await.unwrap().to_bytes();
/// assert_eq!(text, "no request body bytes arrived for 30s");
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleTimeout {
    idle: Duration,
}

impl IdleTimeout {
    pub(crate) fn new(idle: Duration) -> Self {
        Self { idle }
    }

    /// The idle timeout that passed: the layer's
    /// [`idle_timeout`](super::RequestBodyLayer::idle_timeout).
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// Finds an `IdleTimeout` in `error` or its chain of [`source`](Error::source)s: the way to
    /// recognise it through wrappers, such as the `axum::Error` an axum handler's body read
    /// fails with. For the boxed error of a [`RequestBody`](super::RequestBody) itself, pass
    /// `&*error` (or use `error.downcast_ref::<IdleTimeout>()`).
    pub fn find<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a IdleTimeout> {
        let mut next = Some(error);
        while let Some(error) = next {
            if let Some(timeout) = error.downcast_ref::<IdleTimeout>() {
                return Some(timeout);
            }
            next = error.source();
        }
        None
    }
}

impl fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no request body bytes arrived for {:?}", self.idle)
    }
}

impl Error for IdleTimeout {}

/// Whether one request's idle timeout has fired: set by its body's clock, read by its response
/// future when the handler answers (they may run on different threads, if the handler reads its
/// body on a task of its own).
#[derive(Debug, Clone, Default)]
pub(crate) struct TimedOut(Arc<AtomicBool>);

impl TimedOut {
    pub(crate) fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The clock of one request body's idle timeout. It runs from the first read of the handler
/// that finds no frame ready until a frame reaches the handler; the timer is created on first
/// use and reused by later waits.
pub(crate) struct IdleClock {
    idle: Duration,
    /// Set when the timeout fires, for the response future.
    timed_out: TimedOut,
    /// When the wait that is running times out; `None` while the handler is not waiting.
    deadline: Option<Instant>,
    timer: Timer,
    /// The timeout passed: the body is over.
    expired: bool,
}

impl IdleClock {
    pub(crate) fn new(idle: Duration, timed_out: TimedOut) -> Self {
        Self {
            idle,
            timed_out,
            deadline: None,
            timer: Timer::default(),
            expired: false,
        }
    }

    /// The timeout passed: the body yields nothing more.
    pub(crate) fn expired(&self) -> bool {
        self.expired
    }

    /// A frame, the end or an error reached the handler: the wait is over, and the next one
    /// starts a fresh clock.
    pub(crate) fn stop(&mut self) {
        self.deadline = None;
    }

    /// The handler's read found no frame ready: starts the clock if it is not running, and
    /// returns the error once it has run for `idle` (from then on, [`expired`](Self::expired)).
    pub(crate) fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<IdleTimeout> {
        if self.expired {
            return Poll::Pending;
        }
        let idle = self.idle;
        let deadline = match self.deadline {
            Some(deadline) => deadline,
            None => match Instant::now().checked_add(idle) {
                Some(deadline) => *self.deadline.insert(deadline),
                // Beyond any clock: never.
                None => return Poll::Pending,
            },
        };
        match self
            .timer
            .poll_until(deadline, cx, "the request body's idle timeout")
        {
            Poll::Ready(()) => {
                self.expired = true;
                self.timed_out.set();
                self.deadline = None;
                // The timer's registration goes with it.
                self.timer = Timer::default();
                Poll::Ready(IdleTimeout::new(idle))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl fmt::Debug for IdleClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdleClock")
            .field("idle", &self.idle)
            .field("deadline", &self.deadline)
            .field("expired", &self.expired)
            .finish()
    }
}
