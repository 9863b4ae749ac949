//! Cleanup callbacks: the ones a layer is configured with, and how any callback is run
//! (panics contained and reported, also for async ones).

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tracing::{Instrument, Span};

use crate::event::request_event;
use crate::record::Cancelled;

type SyncCallback = dyn Fn(&Cancelled) + Send + Sync;
type AsyncCallback = dyn Fn(Cancelled) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync;

/// One callback registered on a layer.
#[derive(Clone)]
pub(crate) enum Callback {
    Sync(Arc<SyncCallback>),
    Async(Arc<AsyncCallback>),
}

impl Callback {
    pub(crate) fn sync<F>(f: F) -> Self
    where
        F: Fn(&Cancelled) + Send + Sync + 'static,
    {
        Self::Sync(Arc::new(f))
    }

    pub(crate) fn asynchronous<F, Fut>(f: F) -> Self
    where
        F: Fn(Cancelled) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self::Async(Arc::new(move |c| Box::pin(f(c))))
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
    request_event!(
        error,
        cancelled,
        panic = message,
        "{what} panicked; the remaining callbacks still run",
    );
}

/// An async cleanup ready for the limiter: its panic contained and reported like a sync
/// callback's, inside the request's span.
pub(crate) fn contain_async(
    future: Pin<Box<dyn Future<Output = ()> + Send>>,
    cancelled: &Cancelled,
    span: &Span,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(
        Contained {
            future,
            cancelled: cancelled.clone(),
        }
        .instrument(span.clone()),
    )
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
