//! Holding a request for its upgraded connection (a WebSocket after its `101`).
//!
//! `hold` sets `HELD` on an armed scope; from then on the end of the response (`finish`) moves
//! the scope to `ARMED_UPGRADED` instead of completing it, so it stays in its layers' shutdown
//! registries and can still be cancelled, in phase `Upgraded`. `release` (the guard's drop)
//! completes an upgraded scope, or clears `HELD` if the response is not over yet, in which case
//! `finish` completes it as usual. Every step is a read-modify-write of the state, so `finish`,
//! `release` and any cancellation are ordered: exactly one outcome, and the request completes
//! only once both the response and the hold are over.

use crate::loom::atomic::Ordering;
use crate::record::CancelReason;
use crate::scope::Scope;
use crate::scope::state::{ARMED_UPGRADED, COMPLETED, HELD, base, is_armed};
use crate::scope::tail::Stopped;

impl Scope {
    /// Holds the request for an upgrade. `false` if it is no longer armed or already held.
    pub(crate) fn hold(&self) -> bool {
        // The hold is a part of the request that must stop before it is over, like a detached
        // handler task; counted in first, so that a cancellation racing the hold cannot find
        // every part stopped while the hold runs on.
        self.detach();
        let held = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                let free = is_armed(state) && base(state) != ARMED_UPGRADED && state & HELD == 0;
                free.then_some(state | HELD)
            })
            .is_ok();
        if !held {
            self.detached_stopped(Stopped::Ended);
        }
        held
    }

    /// The peer of the upgraded connection vanished: the hold stopped (dropped), then the
    /// request is cancelled with `Disconnected`, so that the one report says nothing ran on.
    /// Ends the hold: [`release`](Self::release) must not follow.
    pub(crate) fn peer_left(&self) {
        self.detached_stopped(Stopped::Dropped);
        self.cancel(CancelReason::Disconnected);
    }

    /// The hold ends (its guard was dropped). Completes an upgraded request, unless application
    /// code cancelled its token (then `Explicit`, as at the end of a response).
    pub(crate) fn release(&self) {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let next = match base(current) {
                ARMED_UPGRADED if self.token.is_cancelled() => {
                    self.cancel(CancelReason::Explicit);
                    break;
                }
                ARMED_UPGRADED => COMPLETED,
                _ if is_armed(current) && current & HELD != 0 => current & !HELD,
                // Completed or cancelled: nothing to release.
                _ => break,
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) if next == COMPLETED => {
                    self.complete(current);
                    break;
                }
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.detached_stopped(Stopped::Ended);
    }
}

impl Scope {
    /// The tracker of the layer that created the scope (the outermost): every task the request
    /// leaves running is tracked there (a detached handler, a held upgraded connection, the
    /// async cleanups of every layer of the request).
    pub(crate) fn tracker(&self) -> &tokio_util::task::TaskTracker {
        &self.creator.tracker
    }
}
