//! The minimum data rate of a request body: the bytes that reached the handler, averaged over
//! the time it waited for them, and the error its read fails with when they fall behind.

use std::error::Error;
use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::request_body::idle::TimedOut;
use crate::runtime::deadline::Timer;

/// The request body arrived below the [`min_rate`](super::RequestBodyLayer::min_rate): once
/// the handler had waited for its bytes longer than the grace period, they averaged less than
/// the minimum over the time it waited.
///
/// The handler's read of its [`RequestBody`](super::RequestBody) fails with this error, boxed
/// (find it with `error.downcast_ref::<TooSlow>()`, or through wrappers such as `axum::Error`
/// with [`TooSlow::find`]); the request was cancelled with
/// [`CancelReason::SlowClient`](crate::CancelReason::SlowClient), and the client gets
/// `408 Request Timeout`, as after an [`IdleTimeout`](super::IdleTimeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooSlow {
    min_rate: u64,
    received: u64,
    waited: Duration,
}

impl TooSlow {
    /// The minimum, in bytes per second: the layer's [`min_rate`](super::RequestBodyLayer::min_rate).
    pub fn min_rate(&self) -> u64 {
        self.min_rate
    }

    /// The body bytes that had reached the handler.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// How long the handler had waited for them, in all.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Finds a `TooSlow` in `error` or its chain of [`source`](Error::source)s, as
    /// [`IdleTimeout::find`](super::IdleTimeout::find) does.
    pub fn find<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a TooSlow> {
        let mut next = Some(error);
        while let Some(error) = next {
            if let Some(slow) = error.downcast_ref::<TooSlow>() {
                return Some(slow);
            }
            next = error.source();
        }
        None
    }
}

impl fmt::Display for TooSlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the request body arrived too slowly: {} bytes in {:?} of waiting, below {} bytes/s",
            self.received, self.waited, self.min_rate
        )
    }
}

impl Error for TooSlow {}

/// The clock of one request body's minimum rate (Kestrel's `MinRequestBodyDataRate`): it runs
/// while the handler waits for body bytes (from a read that finds no frame ready until a frame
/// reaches the handler), so that a handler that is slow to read does not make its client look
/// slow. Once it has run for `grace`, the bytes received must keep up with `min_rate` times the
/// time it ran; a timer fires at the moment they would fall behind if nothing else arrived.
pub(crate) struct RateClock {
    /// Bytes per second (at least 1).
    min_rate: u64,
    grace: Duration,
    timed_out: TimedOut,
    /// Body bytes that reached the handler.
    received: u64,
    /// Waiting time of the waits that ended.
    waited: Duration,
    /// When the wait that is running started; `None` while the handler is not waiting.
    wait_started: Option<Instant>,
    timer: Timer,
    /// The rate fell behind: the body is over.
    expired: bool,
}

impl RateClock {
    pub(crate) fn new(min_rate: u64, grace: Duration, timed_out: TimedOut) -> Self {
        Self {
            min_rate: min_rate.max(1),
            grace,
            timed_out,
            received: 0,
            waited: Duration::ZERO,
            wait_started: None,
            timer: Timer::default(),
            expired: false,
        }
    }

    /// The rate fell behind: the body yields nothing more.
    pub(crate) fn expired(&self) -> bool {
        self.expired
    }

    /// A frame, the end or an error reached the handler, with `bytes` of data: the wait that
    /// was running (if any) is over.
    pub(crate) fn stop(&mut self, bytes: usize) {
        if let Some(started) = self.wait_started.take() {
            self.waited = self.waited.saturating_add(started.elapsed());
        }
        self.received = self.received.saturating_add(bytes as u64);
    }

    /// The waiting time at which the bytes received so far fall behind the rate: never before
    /// the grace period has run out.
    fn behind_at(&self) -> Duration {
        let nanos = u128::from(self.received) * 1_000_000_000 / u128::from(self.min_rate);
        let keeps_up = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        keeps_up.max(self.grace)
    }

    /// The handler's read found no frame ready: starts the clock if it is not running, and
    /// returns the error once the bytes fell behind (from then on, [`expired`](Self::expired)).
    pub(crate) fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<TooSlow> {
        if self.expired {
            return Poll::Pending;
        }
        let started = *self.wait_started.get_or_insert_with(Instant::now);
        // The moment this wait brings the total to `behind_at`; strictly after it, the bytes
        // are behind (`received` bytes in more than `received / min_rate` seconds).
        let Some(left) = self.behind_at().checked_sub(self.waited) else {
            return self.fail(started);
        };
        let Some(deadline) = started.checked_add(left) else {
            // Beyond any clock: never.
            return Poll::Pending;
        };
        match self
            .timer
            .poll_until(deadline, cx, "the request body's minimum rate")
        {
            Poll::Ready(()) => self.fail(started),
            Poll::Pending => Poll::Pending,
        }
    }

    fn fail(&mut self, started: Instant) -> Poll<TooSlow> {
        self.expired = true;
        self.timed_out.set();
        self.timer = Timer::default();
        Poll::Ready(TooSlow {
            min_rate: self.min_rate,
            received: self.received,
            waited: self.waited.saturating_add(started.elapsed()),
        })
    }
}

impl fmt::Debug for RateClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateClock")
            .field("min_rate", &self.min_rate)
            .field("grace", &self.grace)
            .field("received", &self.received)
            .field("waited", &self.waited)
            .field("expired", &self.expired)
            .finish_non_exhaustive()
    }
}
