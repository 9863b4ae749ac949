//! The crate's synchronisation primitives: std's, or loom's when built with
//! `--cfg tower_cancel_loom`, so that the loom models in `src/scope/loom.rs` explore every
//! interleaving of their atomics and locks; and [`lock`], the one way the crate takes a lock.
//!
//! Only what the models need to see goes through here. `Arc` stays std's (loom's has no
//! `Weak`), and so does the token's own mutex inside tokio-util.

#[cfg(tower_cancel_loom)]
pub(crate) use ::loom::sync::{Mutex, MutexGuard, atomic};
#[cfg(not(tower_cancel_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard, atomic};

/// Locks `mutex`, ignoring poisoning. No user code (callbacks, bodies, `Drop` of user values,
/// `tracing` events) runs under any of the crate's locks, and the crate's own code under them
/// does not panic, so a poisoned lock cannot hold a half-made change: poisoning means nothing.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
