//! What a layer is configured with, shared by every service it builds and every request scope,
//! and [`Bound`], that configuration as one request sees it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::header::HeaderName;
use http::{Extensions, HeaderMap};
use tokio_util::task::TaskTracker;

use std::future::Future;
use std::pin::Pin;

use tokio::runtime::Handle;
use tracing::Span;

use crate::event::request_event;
use crate::record::{Cancelled, Recorded};
use crate::runtime::callback::{Callback, contain, contain_async};
use crate::runtime::cleanup::{DEFAULT_MAX_QUEUED, DEFAULT_MAX_RUNNING, Limiter};
use crate::runtime::deadline::TimeLimit;
use crate::runtime::handlers::{self, Handlers};
use crate::runtime::shutdown::{Closed, InFlight, Registration, Shutdown};
use crate::timeout_header::Conventions;

/// Aligned so that, inside its `Arc`, the fields start on their own cache lines (128 bytes
/// covers adjacent-line prefetch): every request writes the `Arc`'s reference count, and
/// without the alignment the fields every request reads would share its cache line, which
/// costs a cache miss per read on multi-threaded servers.
#[derive(Clone)]
#[repr(align(128))]
pub(crate) struct Config {
    /// The layer's callbacks, in the order they were added.
    pub(crate) callbacks: Vec<Callback>,
    pub(crate) has_async: bool,
    pub(crate) tracker: TaskTracker,
    pub(crate) limiter: Arc<Limiter>,
    /// The detached handlers running (a detached layer's only).
    pub(crate) handlers: Arc<Handlers>,
    pub(crate) shutdown: Option<Shutdown>,
    /// The drain between the shutdown token's cancellation and the requests' (kept apart
    /// so that `shutdown_grace` and `shutdown_token` can come in either order).
    pub(crate) shutdown_grace: Duration,
    pub(crate) timeout: Option<Duration>,
    /// The deadline headers honoured.
    pub(crate) deadline_headers: Conventions,
    /// What of the request to keep for its cancellation record (usually nothing).
    pub(crate) recorders: Vec<Recorder>,
    /// The level of the event each cancellation emits, and of the request's span capture.
    pub(crate) event_level: tracing::Level,
}

/// One thing a layer keeps of each request for its cancellation record.
#[derive(Clone)]
pub(crate) enum Recorder {
    Header(HeaderName),
    /// Copies one extension type, if present (`copy_extension::<T>`).
    Extension(fn(&Extensions, &mut Extensions)),
}

/// What [`Recorder::Extension`] holds for `T`.
pub(crate) fn copy_extension<T: Clone + Send + Sync + 'static>(
    from: &Extensions,
    to: &mut Extensions,
) {
    if let Some(value) = from.get::<T>() {
        to.insert(value.clone());
    }
}

impl Config {
    pub(crate) fn new() -> Self {
        // Once per layer, on the recorder installed when it is built (feature `metrics`).
        crate::runtime::metrics::describe();
        Self {
            callbacks: Vec::new(),
            has_async: false,
            tracker: TaskTracker::new(),
            limiter: Arc::new(Limiter::new(DEFAULT_MAX_RUNNING, DEFAULT_MAX_QUEUED)),
            handlers: Arc::new(Handlers::new(handlers::DEFAULT_MAX)),
            shutdown: None,
            shutdown_grace: Duration::ZERO,
            timeout: None,
            deadline_headers: Conventions::default(),
            recorders: Vec::new(),
            event_level: tracing::Level::DEBUG,
        }
    }

    /// What the layer keeps of a request with these headers and extensions, if anything.
    #[inline]
    pub(crate) fn record(&self, headers: &HeaderMap, extensions: &Extensions) -> Option<Recorded> {
        if self.recorders.is_empty() {
            return None;
        }
        self.record_some(headers, extensions)
    }

    fn record_some(&self, headers: &HeaderMap, extensions: &Extensions) -> Option<Recorded> {
        let mut recorded = Recorded::default();
        for recorder in &self.recorders {
            match recorder {
                Recorder::Header(name) => {
                    for value in headers.get_all(name) {
                        recorded.headers.append(name.clone(), value.clone());
                    }
                }
                Recorder::Extension(copy) => copy(extensions, &mut recorded.extensions),
            }
        }
        Some(recorded)
    }

    /// Registers `scope` as in flight with this layer's shutdown registry, if it has one.
    /// Fails once the shutdown began: the scope must then be cancelled.
    pub(crate) fn register(
        &self,
        request: Weak<dyn InFlight>,
    ) -> Result<Option<Registration>, Closed> {
        match &self.shutdown {
            Some(shutdown) => shutdown.register(request).map(Some),
            None => Ok(None),
        }
    }

    /// Whether this layer's shutdown has begun, without a lock.
    pub(crate) fn shutdown_begun(&self) -> bool {
        self.shutdown.as_ref().is_some_and(Shutdown::begun)
    }

    /// Undoes a successful [`register`](Self::register).
    pub(crate) fn deregister(&self, registration: Option<Registration>) {
        if let (Some(registration), Some(shutdown)) = (registration, &self.shutdown) {
            shutdown.deregister(registration);
        }
    }

    /// How long a request with these headers may run: the shortest of the layer's timeout and
    /// the well-formed deadline headers of the honoured conventions.
    #[inline]
    pub(crate) fn time_limit(&self, headers: &HeaderMap) -> Option<TimeLimit> {
        if self.timeout.is_none() && self.deadline_headers.is_empty() {
            return None;
        }
        self.time_limit_of(headers)
    }

    fn time_limit_of(&self, headers: &HeaderMap) -> Option<TimeLimit> {
        let header = if self.deadline_headers.is_empty() {
            None
        } else {
            self.deadline_headers.shortest(headers)
        };
        TimeLimit::earliest(
            self.timeout.map(TimeLimit::server),
            header.map(TimeLimit::client),
        )
    }
}

/// A layer's configuration, bound to the runtime the request arrived on.
///
/// The runtime handle is captured in `call` only when the layer has async callbacks, so the
/// common case costs one reference count.
pub(crate) struct Bound {
    config: Arc<Config>,
    runtime: Option<Handle>,
}

impl Bound {
    #[inline]
    pub(crate) fn capture(config: &Arc<Config>) -> Self {
        let runtime = if config.has_async {
            Handle::try_current().ok()
        } else {
            None
        };
        Self {
            config: Arc::clone(config),
            runtime,
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The configuration and the runtime, apart (the scope keeps the runtime aside: most
    /// layers have no async callback and capture none).
    pub(crate) fn into_parts(self) -> (Arc<Config>, Option<Handle>) {
        (self.config, self.runtime)
    }

    /// Runs every callback of the layer, in order, once: see [`run`].
    pub(crate) fn run(&self, cancelled: &Cancelled, span: &Span, owner: &Config) {
        run(&self.config, self.runtime.as_ref(), cancelled, span, owner);
    }
}

/// Runs every callback of the layer configured with `config`, in order, once; async cleanups
/// are spawned on `runtime` (the one the request arrived on), else on the current one. They
/// go through `owner`'s cleanup limit and tracker: the configuration of the layer that created
/// the request's scope (the outermost), which counts every task a request leaves running.
pub(crate) fn run(
    config: &Config,
    runtime: Option<&Handle>,
    cancelled: &Cancelled,
    span: &Span,
    owner: &Config,
) {
    for callback in &config.callbacks {
        match callback {
            Callback::Sync(f) => {
                contain("on_cancel callback", cancelled, || f(cancelled));
            }
            Callback::Async(f) => {
                let Some(future) = contain("on_cancel_async callback", cancelled, || {
                    f(cancelled.clone())
                }) else {
                    continue;
                };
                spawn(runtime, future, cancelled, span, owner);
            }
        }
    }
}

fn spawn(
    runtime: Option<&Handle>,
    future: Pin<Box<dyn Future<Output = ()> + Send>>,
    cancelled: &Cancelled,
    span: &Span,
    owner: &Config,
) {
    let runtime = match runtime {
        Some(handle) => handle.clone(),
        None => match Handle::try_current() {
            Ok(handle) => handle,
            Err(_) => {
                request_event!(
                    error,
                    cancelled,
                    "no Tokio runtime was reachable to run an async cancellation cleanup; it did not run",
                );
                return;
            }
        },
    };
    let job = contain_async(future, cancelled, span);
    owner
        .limiter
        .submit(job, &owner.tracker, &runtime, cancelled);
}
