//! Cleanup callbacks: the ones a layer is configured with, and how any callback is run
//! (panics contained and reported, async ones spawned on the request's runtime and tracked).

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span};

use crate::Cancelled;

type SyncHook = dyn Fn(&Cancelled) + Send + Sync;
type AsyncHook = dyn Fn(Cancelled) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync;

/// One callback registered on a layer.
#[derive(Clone)]
pub(crate) enum Hook {
    Sync(Arc<SyncHook>),
    Async(Arc<AsyncHook>),
}

/// The callbacks of one layer, in the order they were added, and where async ones are tracked.
#[derive(Clone)]
pub(crate) struct Hooks {
    list: Vec<Hook>,
    tracker: TaskTracker,
    has_async: bool,
}

impl Hooks {
    pub(crate) fn new() -> Self {
        Self {
            list: Vec::new(),
            tracker: TaskTracker::new(),
            has_async: false,
        }
    }

    pub(crate) fn push_sync<F>(&mut self, f: F)
    where
        F: Fn(&Cancelled) + Send + Sync + 'static,
    {
        self.list.push(Hook::Sync(Arc::new(f)));
    }

    pub(crate) fn push_async<F, Fut>(&mut self, f: F)
    where
        F: Fn(Cancelled) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.list
            .push(Hook::Async(Arc::new(move |c| Box::pin(f(c)))));
        self.has_async = true;
    }

    pub(crate) fn set_tracker(&mut self, tracker: TaskTracker) {
        self.tracker = tracker;
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }
}

/// A layer's callbacks, bound to the runtime the request arrived on.
///
/// The runtime handle is captured in `call` only when the layer has async callbacks, so the
/// common case costs one reference count.
pub(crate) struct Bound {
    hooks: Arc<Hooks>,
    runtime: Option<Handle>,
}

impl Bound {
    pub(crate) fn capture(hooks: &Arc<Hooks>) -> Self {
        let runtime = if hooks.has_async {
            Handle::try_current().ok()
        } else {
            None
        };
        Self {
            hooks: Arc::clone(hooks),
            runtime,
        }
    }

    /// Runs every callback of the layer, in order, once.
    pub(crate) fn run(&self, cancelled: &Cancelled, span: &Span) {
        for hook in &self.hooks.list {
            match hook {
                Hook::Sync(f) => {
                    contain("on_cancel callback", cancelled, || f(cancelled));
                }
                Hook::Async(f) => {
                    let Some(future) = contain("on_cancel_async callback", cancelled, || {
                        f(cancelled.clone())
                    }) else {
                        continue;
                    };
                    self.spawn(future, cancelled, span);
                }
            }
        }
    }

    fn spawn(
        &self,
        future: Pin<Box<dyn Future<Output = ()> + Send>>,
        cancelled: &Cancelled,
        span: &Span,
    ) {
        let runtime = match &self.runtime {
            Some(handle) => handle.clone(),
            None => match Handle::try_current() {
                Ok(handle) => handle,
                Err(_) => {
                    tracing::error!(
                        target: "tower_cancel",
                        reason = %cancelled.reason(),
                        method = %cancelled.method(),
                        path = cancelled.uri().path(),
                        "no Tokio runtime was reachable to run an async cancellation cleanup; it did not run",
                    );
                    return;
                }
            },
        };
        let contained = Contained {
            future,
            cancelled: cancelled.clone(),
        };
        self.hooks
            .tracker
            .spawn_on(contained.instrument(span.clone()), &runtime);
    }
}

/// Runs `f`, catching a panic and reporting it as an `error` event.
pub(crate) fn contain<R>(what: &str, cancelled: &Cancelled, f: impl FnOnce() -> R) -> Option<R> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => Some(value),
        Err(payload) => {
            report_panic(what, cancelled, payload.as_ref());
            None
        }
    }
}

fn report_panic(what: &str, cancelled: &Cancelled, payload: &(dyn Any + Send)) {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("<non-string panic payload>");
    tracing::error!(
        target: "tower_cancel",
        panic = message,
        reason = %cancelled.reason(),
        method = %cancelled.method(),
        path = cancelled.uri().path(),
        "{what} panicked; the remaining callbacks still run",
    );
}

pin_project! {
    /// An async cleanup whose panic is caught and reported like a sync callback's.
    struct Contained<F> {
        #[pin]
        future: F,
        cancelled: Cancelled,
    }
}

impl<F: Future<Output = ()>> Future for Contained<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        match catch_unwind(AssertUnwindSafe(|| this.future.poll(cx))) {
            Ok(poll) => poll,
            Err(payload) => {
                // Ready ends the task: it is never polled again.
                report_panic("on_cancel_async cleanup", this.cancelled, payload.as_ref());
                Poll::Ready(())
            }
        }
    }
}
