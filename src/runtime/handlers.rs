//! How many detached handlers a layer runs at once: a count with a bound, and a permit each
//! running handler holds until its task ends.
//!
//! A detached handler outlives its client, so a client that opens and abandons requests as
//! fast as it can (HTTP/2 rapid reset, CVE-2023-44487) would otherwise leave one running task
//! behind per request. The count starts when the handler is spawned and ends when its task
//! does (it returned, panicked, or its runtime dropped it), whether or not its client is still
//! there: a request that finds every permit taken is refused before its handler starts.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::event::TARGET;
use crate::runtime::metrics;

/// The default bound: 1024 detached handlers running at once, per layer.
pub(crate) const DEFAULT_MAX: usize = 1024;

/// The detached handlers of a layer and its clones.
pub(crate) struct Handlers {
    max: usize,
    running: AtomicUsize,
    refused: AtomicU64,
    /// Set at the first refusal, cleared once the count fell to half the bound: one `warn`
    /// event per episode, not one per refused request.
    saturated: AtomicBool,
}

/// One running detached handler: dropped with its task.
pub(crate) struct Permit(Arc<Handlers>);

/// How a detached layer's handlers are doing: a snapshot for metrics and health checks.
///
/// Returned by [`CancellationLayer::detached_counts`](crate::CancellationLayer::detached_counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct DetachedCounts {
    /// Detached handlers running now, whether or not their client is still there (at most
    /// the layer's [`detached_limit`](crate::CancellationLayer::detached_limit)).
    pub running: usize,
    /// Requests refused with 503 since the limit was set, because that many handlers ran.
    pub refused: u64,
}

impl Handlers {
    /// A bound of `max` handlers at once (at least 1).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            running: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            saturated: AtomicBool::new(false),
        }
    }

    /// A permit for one more handler, or `None` (counted, reported) if `max` already run.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let taken = self
            .running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |running| {
                (running < self.max).then_some(running + 1)
            });
        if taken.is_ok() {
            return Some(Permit(Arc::clone(self)));
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        metrics::detached_refused();
        if !self.saturated.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                target: TARGET,
                limit = self.max,
                "detached handler limit reached: new requests to this route are refused with \
                 503 until handlers finish",
            );
        }
        None
    }

    pub(crate) fn counts(&self) -> DetachedCounts {
        DetachedCounts {
            running: self.running.load(Ordering::Acquire),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let handlers = &self.0;
        let running = handlers.running.fetch_sub(1, Ordering::AcqRel) - 1;
        if running <= handlers.max / 2 && handlers.saturated.load(Ordering::Acquire) {
            handlers.saturated.store(false, Ordering::Release);
        }
    }
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts = self.counts();
        f.debug_struct("Handlers")
            .field("max", &self.max)
            .field("running", &counts.running)
            .field("refused", &counts.refused)
            .finish()
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Permit")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_bounded_and_come_back() {
        let handlers = Arc::new(Handlers::new(2));
        let a = handlers.try_acquire().unwrap();
        let b = handlers.try_acquire().unwrap();
        assert!(handlers.try_acquire().is_none());
        assert!(handlers.try_acquire().is_none());
        assert_eq!(
            handlers.counts(),
            DetachedCounts {
                running: 2,
                refused: 2
            }
        );
        drop(a);
        let c = handlers.try_acquire().unwrap();
        drop((b, c));
        assert_eq!(handlers.counts().running, 0);
        assert!(!handlers.saturated.load(Ordering::Acquire), "episode over");
        assert_eq!(Handlers::new(0).max, 1);
    }
}
