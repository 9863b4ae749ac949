//! How the registry learns, without a lock, that its token was cancelled.
//!
//! The token's `cancelled()` future parks its waker in the token's `Notify`; `cancel()` marks
//! the token cancelled, then wakes every parked waker on the calling thread (outside the
//! token's locks) before it returns. The registry parks a [`Signal`] there when it is built.
//! Its waker records when the drain was announced and, without a grace period, sets the flag
//! that refuses registrations: a registration that happens after `cancel()` returned (on any
//! thread that synchronised with the canceller, as a request arriving over a socket does)
//! reads it, with no lock and no task in between. With a grace period the watcher sets that
//! flag when the grace ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::loom::atomic::AtomicBool as ModelledBool;

/// The shutdown's two moments as the registry sees them: announced (the token was cancelled,
/// the drain began) and begun (the hard phase: requests are cancelled with `Shutdown`).
pub(super) struct Signal {
    begun: ModelledBool,
    announced: OnceLock<Instant>,
    grace: Duration,
}

impl Signal {
    pub(super) fn new(grace: Duration) -> Self {
        Self {
            begun: ModelledBool::new(false),
            announced: OnceLock::new(),
            grace,
        }
    }

    /// Whether the hard phase began: registrations are refused.
    pub(super) fn begun(&self) -> bool {
        self.begun.load(Ordering::Acquire)
    }

    pub(super) fn begin(&self) {
        self.begun.store(true, Ordering::Release);
    }

    /// When the drain was announced, if it was.
    pub(super) fn announced(&self) -> Option<Instant> {
        self.announced.get().copied()
    }

    pub(super) fn grace(&self) -> Duration {
        self.grace
    }

    pub(super) fn announce(&self) {
        self.announced.get_or_init(Instant::now);
        if self.grace.is_zero() {
            self.begin();
        }
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.announce();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.announce();
    }
}

/// Parks `signal`'s waker on `token`, or announces at once if the token is already cancelled.
/// Returns the future that must stay alive for the waker to stay parked.
pub(super) fn park(
    token: &CancellationToken,
    signal: &Arc<Signal>,
) -> Pin<Box<WaitForCancellationFutureOwned>> {
    let mut cancelled = Box::pin(token.clone().cancelled_owned());
    let waker = Waker::from(Arc::clone(signal));
    // Pending means the waker is parked: a later `cancel()` calls it. Ready means the token
    // was cancelled already (also if that happened while the future was being made).
    if cancelled
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_ready()
    {
        signal.announce();
    }
    cancelled
}
