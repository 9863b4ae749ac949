//! What a layer is configured with, shared by every service it builds and every request scope.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::HeaderMap;
use tokio_util::task::TaskTracker;

use crate::cleanup::{DEFAULT_MAX_QUEUED, DEFAULT_MAX_RUNNING, Limiter};
use crate::deadline::{self, TimeLimit};
use crate::hooks::Hook;
use crate::scope::Scope;
use crate::shutdown::{Closed, Shutdown, Slot};

/// Aligned so that, inside its `Arc`, the fields start on their own cache lines (128 bytes
/// covers adjacent-line prefetch): every request writes the `Arc`'s reference count, and
/// without the alignment the fields every request reads would share its cache line, which
/// costs a cache miss per read on multi-threaded servers.
#[derive(Clone)]
#[repr(align(128))]
pub(crate) struct Config {
    /// The layer's callbacks, in the order they were added.
    pub(crate) hooks: Vec<Hook>,
    pub(crate) has_async: bool,
    pub(crate) tracker: TaskTracker,
    pub(crate) limiter: Arc<Limiter>,
    pub(crate) shutdown: Option<Shutdown>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) grpc_timeout: bool,
}

impl Config {
    pub(crate) fn new() -> Self {
        Self {
            hooks: Vec::new(),
            has_async: false,
            tracker: TaskTracker::new(),
            limiter: Arc::new(Limiter::new(DEFAULT_MAX_RUNNING, DEFAULT_MAX_QUEUED)),
            shutdown: None,
            timeout: None,
            grpc_timeout: false,
        }
    }

    /// Registers `scope` as in flight with this layer's shutdown registry, if it has one.
    /// Fails once the shutdown began: the scope must then be cancelled.
    pub(crate) fn register(&self, scope: Weak<Scope>) -> Result<Option<Slot>, Closed> {
        match &self.shutdown {
            Some(shutdown) => shutdown.register(scope).map(Some),
            None => Ok(None),
        }
    }

    /// Undoes a successful [`register`](Self::register).
    pub(crate) fn deregister(&self, slot: Option<Slot>) {
        if let (Some(slot), Some(shutdown)) = (slot, &self.shutdown) {
            shutdown.deregister(slot);
        }
    }

    /// How long a request with these headers may run: the shorter of the layer's timeout and
    /// a valid `grpc-timeout` header (when honoured).
    pub(crate) fn time_limit(&self, headers: &HeaderMap) -> Option<TimeLimit> {
        let header = if self.grpc_timeout {
            deadline::grpc_timeout(headers)
        } else {
            None
        };
        TimeLimit::earliest(
            self.timeout.map(TimeLimit::server),
            header.map(TimeLimit::client),
        )
    }
}
