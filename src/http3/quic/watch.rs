//! What the request task watches on its stream, and what the stream's halves tell it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;

use h3::quic::StreamId;
use quinn::VarInt;
use tokio::sync::Notify;

/// No `RESET_STREAM` yet: above every QUIC error code (those are varints, below 2^62).
pub(super) const NO_RESET: u64 = u64::MAX;

pub(super) type Stopped =
    Pin<Box<dyn Future<Output = Result<Option<VarInt>, quinn::StoppedError>> + Send>>;

/// Why the client is gone from one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gone {
    /// `STOP_SENDING` on the response, with its code.
    Stopped(u64),
    /// `RESET_STREAM` on the request body, with its code.
    Reset(u64),
    /// The whole connection closed or timed out.
    ConnectionLost,
    /// Not gone: the response was finished and the client acknowledged all of it (or the
    /// stream was reset by this side).
    Acknowledged,
}

/// What the request task races its handler and body against.
pub(crate) struct Watch {
    pub(super) stopped: Stopped,
    pub(super) signal: Arc<Signal>,
    pub(super) observed: Observed,
}

/// What the halves of one request stream tell the request task, and the reverse.
pub(super) struct Signal {
    /// The code of a `RESET_STREAM` the request body was read up to (`NO_RESET`: none yet).
    pub(super) reset: AtomicU64,
    pub(super) notify: Notify,
    /// The request task took the stream: from then on a send half dropped unfinished is reset.
    /// Before, it is h3's (a 431 it answered on its own is finished, as h3 meant).
    pub(super) claimed: AtomicBool,
    /// The request task is done watching (it saw the reset, or it ended): only then does the
    /// body's reader get the reset as its error, so that a handler cannot answer it first.
    pub(super) observed: AtomicBool,
    /// The body's reader, waiting for `observed`.
    pub(super) reader: Mutex<Option<Waker>>,
    /// This side ended the request stream as malformed or over a bound, with this code
    /// (`NO_RESET`: it did not): the response is reset with it, never sent.
    pub(super) refused: AtomicU64,
}

impl Signal {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Signal {
            reset: AtomicU64::new(NO_RESET),
            notify: Notify::new(),
            claimed: AtomicBool::new(false),
            observed: AtomicBool::new(false),
            reader: Mutex::new(None),
            refused: AtomicU64::new(NO_RESET),
        })
    }

    /// The code this side refused the stream with, if it did (the first one counts).
    pub(super) fn refused(&self) -> Option<u64> {
        let code = self.refused.load(Ordering::Acquire);
        (code != NO_RESET).then_some(code)
    }

    pub(super) fn refuse(&self, code: u64) {
        let _ = self
            .refused
            .compare_exchange(NO_RESET, code, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Lets the request body refuse its stream (a `content-length` the DATA frames do not match):
/// the response is then reset with that code.
#[derive(Clone)]
pub(crate) struct Refuser(Arc<Signal>);

impl Refuser {
    pub(crate) fn refuse(&self, code: u64) {
        self.0.refuse(code);
    }
}

/// Sets [`Signal::observed`] when dropped: held by the [`Watch`], and by its `gone()` future
/// until that returns or is dropped.
pub(super) struct Observed(pub(super) Arc<Signal>);

impl Drop for Observed {
    fn drop(&mut self) {
        self.0.observed.store(true, Ordering::Release);
        let reader = lock(&self.0.reader).take();
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

impl Watch {
    /// The handle with which the request body refuses the stream.
    pub(crate) fn refuser(&self) -> Refuser {
        Refuser(self.signal.clone())
    }

    /// Resolves when the client has gone from this request.
    pub(crate) async fn gone(self) -> Gone {
        let Watch {
            stopped,
            signal,
            observed,
        } = self;
        let _observed = observed;
        let stopped = async move {
            match stopped.await {
                Ok(Some(code)) => Gone::Stopped(code.into_inner()),
                Ok(None) => Gone::Acknowledged,
                Err(_) => Gone::ConnectionLost,
            }
        };
        let reset = async move {
            loop {
                let notified = signal.notify.notified();
                let code = signal.reset.load(Ordering::Acquire);
                if code != NO_RESET {
                    return Gone::Reset(code);
                }
                notified.await;
            }
        };
        tokio::select! {
            gone = stopped => gone,
            gone = reset => gone,
        }
    }
}

/// One connection's request streams as the backend accepted them, shared with the serve loop.
#[derive(Clone)]
pub(crate) struct Streams(pub(super) Arc<Shared>);

pub(super) struct Shared {
    /// Every accepted request stream's [`Watch`], until its request task takes it or the
    /// stream is dropped (a stream h3 rejected leaves no entry behind).
    pub(super) watches: Mutex<HashMap<u64, Watch>>,
    /// The id after the last request stream accepted (0 before the first).
    pub(super) next: AtomicU64,
    /// Streams from this id on are refused (`u64::MAX`: none is).
    pub(super) refuse_from: AtomicU64,
}

impl Streams {
    pub(crate) fn new() -> Self {
        Streams(Arc::new(Shared {
            watches: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            refuse_from: AtomicU64::new(u64::MAX),
        }))
    }

    /// The request task's [`Watch`] of stream `id`; the stream is the task's from now on.
    pub(crate) fn take(&self, id: StreamId) -> Option<Watch> {
        let watch = lock(&self.0.watches).remove(&id.into_inner())?;
        watch.signal.claimed.store(true, Ordering::Release);
        Some(watch)
    }

    /// Refuses, from now on, every request stream after those already accepted: called just
    /// before h3 sends `GOAWAY`, whose id (the stream after the last one h3 accepted) the client
    /// reads as "this one and later were not processed" (RFC 9114 §5.2). h3 itself would still
    /// serve that one stream.
    pub(crate) fn refuse_new(&self) {
        let next = self.0.next.load(Ordering::Acquire);
        self.0.refuse_from.store(next, Ordering::Release);
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while these locks are held; a poisoned one still holds valid data.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
