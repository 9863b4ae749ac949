//! Deadlines: how long a request may run (and from when a drop counts as the deadline's
//! doing), and the timer that enforces it.

use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::event::TARGET;

/// How long a request may run, and from when a drop already counts as the deadline's doing.
///
/// Others enforce the same deadline and may drop the request a moment before the layer's
/// timer fires, so a drop within a slack before the deadline is recorded as
/// `DeadlineExceeded`:
///
/// * the server's own limit (`timeout`): 1 ms, tokio's timer resolution (it rounds sleeps up
///   to the next millisecond), so that another layer outside this one with the same limit,
///   whose timer started a little earlier, counts;
/// * the client's (`grpc-timeout`): 20 ms. The client resets the stream at its deadline, on a
///   clock that started before the request reached us; the reset arrives early by the time
///   the request took to arrive minus the time the reset took (queueing on either side, not
///   the network latency, which cancels out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TimeLimit {
    /// From the start to the deadline.
    pub(crate) after: Duration,
    /// From the start to the point after which a drop counts as the deadline's doing.
    pub(crate) timed_out_from: Duration,
}

pub(crate) const SERVER_SLACK: Duration = Duration::from_millis(1);
pub(crate) const CLIENT_SLACK: Duration = Duration::from_millis(20);

impl TimeLimit {
    /// A limit the server chose.
    pub(crate) fn server(after: Duration) -> Self {
        Self {
            after,
            timed_out_from: after.saturating_sub(SERVER_SLACK),
        }
    }

    /// A deadline the client chose and enforces itself.
    pub(crate) fn client(after: Duration) -> Self {
        Self {
            after,
            timed_out_from: after.saturating_sub(CLIENT_SLACK),
        }
    }

    /// Both limits at once: the earlier deadline, and the earlier point from which a drop
    /// counts (so a tie keeps the client's wider slack).
    pub(crate) fn earliest(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(a), Some(b)) => Some(Self {
                after: a.after.min(b.after),
                timed_out_from: a.timed_out_from.min(b.timed_out_from),
            }),
            (a, b) => a.or(b),
        }
    }
}

/// A timer for a request (its deadline, its body's idle timeout), created on first use and
/// reset when the instant moves.
#[derive(Default)]
pub(crate) struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
    /// Set when no timer could be created (no Tokio timer here): nothing is enforced.
    unavailable: bool,
}

impl Timer {
    /// Polls the timer for `deadline`; `Ready` once it has passed. `what` names what the timer
    /// enforces, for the one error event if no Tokio timer is available.
    pub(crate) fn poll_until(
        &mut self,
        deadline: Instant,
        cx: &mut Context<'_>,
        what: &'static str,
    ) -> Poll<()> {
        if self.unavailable {
            return Poll::Pending;
        }
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => {
                // `sleep_until` panics outside a runtime with the time driver enabled. Report
                // that once for this request and leave `what` unenforced.
                match catch_unwind(AssertUnwindSafe(|| tokio::time::sleep_until(deadline))) {
                    Ok(sleep) => self.sleep.insert(Box::pin(sleep)),
                    Err(_) => {
                        self.unavailable = true;
                        tracing::error!(
                            target: TARGET,
                            "no Tokio timer is available (no runtime, or its time driver is \
                             disabled): {what} is not enforced",
                        );
                        return Poll::Pending;
                    }
                }
            }
        };
        sleep.as_mut().poll(cx)
    }
}

impl fmt::Debug for Timer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timer")
            .field("deadline", &self.sleep.as_ref().map(|s| s.deadline()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_limit_keeps_the_widest_slack_that_applies() {
        let ms = Duration::from_millis;
        let (server, client) = (TimeLimit::server(ms(100)), TimeLimit::client(ms(100)));
        assert_eq!(server.timed_out_from, ms(99));
        assert_eq!(client.timed_out_from, ms(80));
        // `.timeout(100ms)` and `grpc-timeout: 100m` on one layer: the client's slack holds.
        let tie = TimeLimit::earliest(Some(server), Some(client));
        assert_eq!(tie, Some(client));
        // A server limit well before the client's deadline keeps its own 1 ms.
        let shorter = TimeLimit::earliest(Some(TimeLimit::server(ms(50))), Some(client));
        assert_eq!(
            shorter.map(|l| (l.after, l.timed_out_from)),
            Some((ms(50), ms(49)))
        );
        assert_eq!(TimeLimit::earliest(None, Some(client)), Some(client));
        assert_eq!(TimeLimit::earliest(None, None), None);
        // Limits shorter than their slack count from the start.
        assert_eq!(TimeLimit::client(ms(5)).timed_out_from, Duration::ZERO);
    }
}
