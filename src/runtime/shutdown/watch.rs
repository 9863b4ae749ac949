//! The watcher task: one per layer with a shutdown token. It waits for the token, lets the
//! drain run for the grace period, then begins the hard phase: it closes every shard and
//! cancels the requests it found there.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::Poll;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Inner;
use super::signal::Signal;
use crate::event::TARGET;

/// Clears `watching` if the watcher task is dropped before it finished (its runtime shut down),
/// so that the next request spawns a new one on its own runtime.
pub(super) struct Watching(pub(super) Option<Weak<Inner>>);

impl Drop for Watching {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take().and_then(|inner| inner.upgrade()) {
            inner.watching.store(false, Ordering::Release);
        }
    }
}

/// Resolves with `true` when `event` is cancelled, `false` when `dropped` is (the layer's
/// configuration is gone: nothing is left to watch).
async fn either(event: impl Future<Output = ()>, dropped: &CancellationToken) -> bool {
    let mut event = pin!(event);
    let mut unused = pin!(dropped.cancelled());
    poll_fn(|cx| {
        if event.as_mut().poll(cx).is_ready() {
            return Poll::Ready(true);
        }
        if unused.as_mut().poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        Poll::Pending
    })
    .await
}

/// The watcher task. `guard` is an argument, not a local: it is dropped with the task even if
/// the task never ran.
pub(super) async fn watch(
    inner: Weak<Inner>,
    signal: Arc<Signal>,
    token: CancellationToken,
    dropped: CancellationToken,
    mut guard: Watching,
) {
    if !either(token.cancelled(), &dropped).await {
        guard.0 = None;
        return;
    }
    let grace = signal.grace();
    if !grace.is_zero() {
        // From the announcement, not from now: this task may run late (or be a new watcher
        // on another runtime).
        let announced = signal.announced().unwrap_or_else(Instant::now);
        if let Some(inner) = inner.upgrade() {
            tracing::debug!(
                target: TARGET,
                requests = inner.in_flight(),
                grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
                "shutdown: draining the requests in flight",
            );
        }
        if !either(tokio::time::sleep_until(announced + grace), &dropped).await {
            guard.0 = None;
            return;
        }
        signal.begin();
    }
    // Finished, one way or the other: no other watcher is needed.
    guard.0 = None;
    if let Some(inner) = inner.upgrade() {
        let cancelled = inner.cancel_all();
        tracing::debug!(
            target: TARGET,
            requests = cancelled,
            "shutdown: cancelled the requests in flight",
        );
    }
}
