//! The first phase of a shutdown as a request sees it: whether a layer it passed through
//! announced a drain (its shutdown token was cancelled; the hard cancel follows after the
//! layer's grace).

use crate::loom::lock;
use crate::record::CancelReason;
use crate::runtime::shutdown::{Draining, Shutdown};
use crate::scope::Scope;

impl Scope {
    /// Resolves when the shutdown token of the creator, or of a layer that joined while the
    /// request runs, is cancelled.
    pub(crate) fn draining(&self) -> Draining {
        let callbacks = lock(&self.callbacks);
        let joined = callbacks
            .joined()
            .iter()
            .filter_map(|joined| joined.bound.config().shutdown.as_ref());
        Draining::new(self.creator.shutdown.iter().chain(joined))
    }

    /// Whether a drain was announced: one atomic load for the creator, a lock only if deeper
    /// layers joined.
    pub(crate) fn is_draining(&self) -> bool {
        if self
            .creator
            .shutdown
            .as_ref()
            .is_some_and(Shutdown::announced)
        {
            return true;
        }
        let callbacks = lock(&self.callbacks);
        callbacks.joined().iter().any(|joined| {
            joined
                .bound
                .config()
                .shutdown
                .as_ref()
                .is_some_and(Shutdown::announced)
        })
    }

    /// Whether the request was cancelled with `Shutdown` (`Some(false)`: for another reason;
    /// `None`: nothing recorded yet). One atomic load.
    pub(crate) fn shut_down(&self) -> Option<bool> {
        self.cancellation()
            .map(|(reason, _)| reason == CancelReason::Shutdown)
    }
}
