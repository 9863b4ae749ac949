//! The synchronisation primitives of the scope state machine and the shutdown registry: std's,
//! or loom's when built with `--cfg tower_cancel_loom`, so that the loom models in `src/scope/loom.rs` explore
//! every interleaving of their atomics and locks.
//!
//! Only what the models need to see goes through here. `Arc` stays std's (loom's has no
//! `new_cyclic` nor `Weak`), and so does the token's own mutex inside tokio-util.

#[cfg(tower_cancel_loom)]
pub(crate) use ::loom::sync::{Mutex, MutexGuard, atomic};
#[cfg(not(tower_cancel_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard, atomic};
