//! The per-request state machine: armed → completed | cancelled(reason, phase).
//!
//! One `Scope` per request, shared through an `Arc` by the guard (inside the response future,
//! then the response body) and every `RequestCancellation` handle.
//!
//! * `state` is the single source of truth. Every transition out of an armed state is a
//!   compare-and-swap, so exactly one of "complete" and "cancel(reason)" wins, whatever races.
//!   A cancelled state encodes its reason and phase, so nothing else needs to be published.
//! * `callbacks` holds what runs on cancellation besides the creating layer's callbacks: the
//!   handler's registrations and the callbacks of layers deeper in the stack that joined. It is
//!   drained exactly once, by whoever moves the scope out of the armed state; after that,
//!   registrations run at once (cancelled) or are dropped (completed).
//! * The winner of a cancellation cancels the token, emits the event and runs the callbacks,
//!   all outside the lock.
//! * The deadline is an offset from the start, in an atomic, so that a deeper layer can
//!   shorten it; the guard's timer follows it. With a shutdown token, the scope is registered
//!   in the layer's shutdown registry until it leaves the armed state.
//! * After a cancellation, the request's work may run on (a shutdown, a deadline, an explicit
//!   cancel, a detached handler: nothing dropped it). When its last part stops (see [`tail`]),
//!   the scope reports how long it ran on after the cancellation: a `debug` event and a
//!   histogram. A drop that is itself the cancellation ran on for nothing, and the cancellation's
//!   own event says so. A request that completes never takes this path.

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{Method, Uri};
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Span;

use crate::event::request_event_at;
use crate::loom::atomic::{AtomicU8, AtomicU64, Ordering};
use crate::loom::{Mutex, MutexGuard, lock};
use crate::record::{CancelReason, Cancelled, Phase, Recorded};
use crate::runtime::callback::contain;
use crate::runtime::deadline::TimeLimit;
use crate::runtime::metrics;
use crate::runtime::shutdown::{InFlight, Slot};

use self::callbacks::{Callbacks, Lists};
use self::config::{Bound, Config};
use self::state::{
    ARMED_BODY, ARMED_HANDLER, ARMED_UPGRADED, COMPLETED, HELD, NO_DEADLINE, REGISTERED, base,
    decode, encode, is_armed, is_completed,
};

mod callbacks;
pub(crate) mod config;
mod drain;
#[cfg(all(test, tower_cancel_loom))]
mod loom;
mod register;
mod state;
mod tail;
mod upgrade;

pub(crate) use self::tail::Stopped;

/// The fields of the request's span that a cancellation records, if the span declares them.
pub(crate) const SPAN_REASON: &str = "tower_cancel.reason";
pub(crate) const SPAN_PHASE: &str = "tower_cancel.phase";

/// What only some requests carry: the span (when the layer's `debug` event is enabled) and
/// what the layer records of the request for its cancellation records.
struct Extras {
    /// The span that was current when the layer saw the request.
    span: Option<Span>,
    recorded: Option<Arc<Recorded>>,
    /// The runtime the request arrived on, where the creator's async callbacks run (captured
    /// only when it has some).
    runtime: Option<Handle>,
}

pub(crate) struct Scope {
    state: AtomicU8,
    token: CancellationToken,
    method: Method,
    uri: Uri,
    started: Instant,
    /// Nanoseconds from `started` to the deadline, or `NO_DEADLINE`.
    deadline: AtomicU64,
    /// Nanoseconds from `started` after which a drop counts as the deadline's doing: the
    /// earliest of the limits' `timed_out_from` (see [`TimeLimit`]), or `NO_DEADLINE`.
    timed_out_from: AtomicU64,
    /// What only some requests carry, boxed (most carry none, and a `Span` alone is 40 bytes).
    extras: Option<Box<Extras>>,
    /// The configuration of the layer that created the scope (the outermost one).
    creator: Arc<Config>,
    /// Where the creator's shutdown registry holds this scope, once registered.
    registration: Slot,
    callbacks: Mutex<Callbacks>,
}

impl Scope {
    /// A new armed scope. It starts cancelled with `Shutdown` if the creator's shutdown has
    /// begun.
    pub(crate) fn new(
        method: Method,
        uri: Uri,
        creator: Bound,
        time_limit: Option<TimeLimit>,
        recorded: Option<Recorded>,
    ) -> Arc<Self> {
        let (creator, runtime) = creator.into_parts();
        let span = crate::event::enabled(creator.event_level).then(Span::current);
        let extras = (span.is_some() || recorded.is_some() || runtime.is_some()).then(|| {
            Box::new(Extras {
                span,
                recorded: recorded.map(Arc::new),
                runtime,
            })
        });
        let scope = Arc::new(Self {
            state: AtomicU8::new(ARMED_HANDLER),
            token: CancellationToken::new(),
            method,
            uri,
            started: Instant::now(),
            deadline: AtomicU64::new(time_limit.map_or(NO_DEADLINE, |l| nanos(l.after))),
            timed_out_from: AtomicU64::new(
                time_limit.map_or(NO_DEADLINE, |l| nanos(l.timed_out_from)),
            ),
            extras,
            creator,
            registration: Slot::empty(),
            callbacks: Mutex::new(Callbacks::default()),
        });
        #[cfg(debug_assertions)]
        LIVE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Registered once the `Arc` exists: from here the shutdown's watcher can reach (and
        // cancel) the scope as soon as it sits in its shard. A watcher that takes the shard
        // before the registration is stored cancels the scope all the same; its cancellation
        // then finds no registration to remove, and needs none (the watcher emptied the shard).
        let config = &scope.creator;
        if config.shutdown.is_none() {
            return scope;
        }
        let request: Weak<dyn InFlight> = Arc::downgrade(&scope) as Weak<dyn InFlight>;
        let refused = match config.register(request) {
            Ok(Some(registration)) => {
                scope.registration.set(registration);
                false
            }
            Ok(None) => false,
            Err(_) => true,
        };
        #[cfg(test)]
        after_register();
        // Checked again after registering: a shutdown that began meanwhile cancels the
        // request now, not when the watcher gets to run.
        if refused || config.shutdown_begun() {
            scope.cancel(CancelReason::Shutdown);
        }
        scope
    }

    /// The request's span, or no span.
    fn span(&self) -> &Span {
        static NONE: Span = Span::none();
        self.extras
            .as_ref()
            .and_then(|extras| extras.span.as_ref())
            .unwrap_or(&NONE)
    }

    /// The runtime the request arrived on, if the creator has async callbacks.
    fn runtime(&self) -> Option<&Handle> {
        self.extras
            .as_ref()
            .and_then(|extras| extras.runtime.as_ref())
    }

    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub(crate) fn method(&self) -> &Method {
        &self.method
    }

    fn callbacks(&self) -> MutexGuard<'_, Callbacks> {
        lock(&self.callbacks)
    }

    /// When the request's deadline passes, if it has one.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.at(&self.deadline)
    }

    /// `started` plus one of the offsets, if set.
    fn at(&self, offset: &AtomicU64) -> Option<Instant> {
        match offset.load(Ordering::Acquire) {
            NO_DEADLINE => None,
            nanos => self.started.checked_add(Duration::from_nanos(nanos)),
        }
    }

    /// Whether the request is still running (neither completed nor cancelled).
    pub(crate) fn is_armed(&self) -> bool {
        is_armed(self.state.load(Ordering::Acquire))
    }

    /// The recorded outcome, if the scope was cancelled.
    pub(crate) fn cancellation(&self) -> Option<(CancelReason, Phase)> {
        decode(self.state.load(Ordering::Acquire))
    }

    /// Why the request was cancelled, recording nothing: the recorded reason, or `Explicit`
    /// for a token that application code cancelled and the layer has not noticed yet (it
    /// records `Explicit` when it does: [`cancel`](Self::cancel) takes a cancelled token's
    /// word over any other reason). One atomic load, then, while nothing is recorded, the
    /// token's mutex.
    pub(crate) fn reason(&self) -> Option<CancelReason> {
        if let Some((reason, _)) = self.cancellation() {
            return Some(reason);
        }
        self.token.is_cancelled().then_some(CancelReason::Explicit)
    }

    /// The phase the request is in: where a cancellation now would be recorded (`Body` once
    /// it completed).
    fn phase(&self) -> Phase {
        match base(self.state.load(Ordering::Acquire)) {
            ARMED_HANDLER => Phase::Handler,
            ARMED_UPGRADED => Phase::Upgraded,
            state => decode(state).map_or(Phase::Body, |(_, phase)| phase),
        }
    }

    /// The handler returned a response head and its body starts streaming.
    ///
    /// The token is not asked here (its `is_cancelled` takes its mutex): a token cancelled
    /// directly is noticed when the handler or body is pending, or dropped.
    pub(crate) fn enter_body(&self) {
        // Fails only if the scope already left the armed state, which is then final.
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                (base(state) == ARMED_HANDLER).then_some(ARMED_BODY | state & (REGISTERED | HELD))
            });
    }

    /// Records `reason` if the scope is still armed and, if so, cancels the token and runs
    /// every callback. Returns the recorded cancellation (this one or an earlier one), or
    /// `None` if the request had completed.
    ///
    /// A token that application code cancelled first is the cause, whoever notices it: the
    /// reason recorded is then `Explicit`, as [`reason`](Self::reason) reported meanwhile.
    pub(crate) fn cancel(&self, reason: CancelReason) -> Option<(CancelReason, Phase)> {
        let mut current = self.state.load(Ordering::Acquire);
        if !is_armed(current) {
            return decode(current);
        }
        // The winner cancels the token after its transition, so a cancelled token seen while
        // armed was cancelled by application code.
        let reason = if reason != CancelReason::Explicit && self.token.is_cancelled() {
            CancelReason::Explicit
        } else {
            reason
        };
        loop {
            let phase = match base(current) {
                ARMED_HANDLER => Phase::Handler,
                ARMED_BODY => Phase::Body,
                ARMED_UPGRADED => Phase::Upgraded,
                COMPLETED => return None,
                done => return decode(done),
            };
            match self.state.compare_exchange_weak(
                current,
                encode(reason, phase),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.fire(reason, phase);
                    return Some((reason, phase));
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// The request reached its end: it completes, unless it was cancelled first.
    ///
    /// The token is not asked: a token cancelled directly is noticed when the handler or body
    /// is pending, or when either is dropped; a request that gets here first completes.
    /// [`RequestCancellation::cancel`](crate::RequestCancellation::cancel) cancels at once.
    ///
    /// Completion leaves the callbacks alone unless something was registered: the common
    /// request takes no lock. Registering sets `REGISTERED` in the state after adding to the
    /// callbacks, and reads the state it replaced; completion replaces the state and reads
    /// whether it carried `REGISTERED`. Both are read-modify-writes of the same atomic, so one
    /// comes first: either completion sees the flag, or the registration sees the completion,
    /// and that side drops the registrations (both doing it is harmless).
    pub(crate) fn finish(&self) {
        let mut current = self.state.load(Ordering::Acquire);
        while is_armed(current) && base(current) != ARMED_UPGRADED {
            // Held for an upgrade: the response is over, the request is not (see `upgrade.rs`).
            let next = if current & HELD != 0 {
                ARMED_UPGRADED | current & (REGISTERED | HELD)
            } else {
                COMPLETED
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) if next != COMPLETED => {
                    self.response_stopped(Stopped::Ended);
                    return;
                }
                Ok(_) => {
                    self.complete(current);
                    return;
                }
                Err(actual) => current = actual,
            }
        }
        // Cancelled earlier (a scope completes once, here or when its upgrade guard goes):
        // the response ran on until now.
        self.response_stopped(Stopped::Ended);
    }

    /// After the transition out of `previous` (an armed state) to `COMPLETED`: leaves the
    /// shutdown registries and drops what was registered.
    fn complete(&self, previous: u8) {
        if self.creator.shutdown.is_some() {
            self.creator.deregister(self.registration.take());
        }
        if previous & REGISTERED != 0 {
            self.drop_registrations();
        }
    }

    /// The guard was dropped before the request completed; `panicked`: while the handler
    /// future or body was being polled (a panic unwound out of it).
    ///
    /// A drop at the deadline is the deadline's doing, not the client's whim: a layer outside
    /// this one that enforces the same deadline (tonic's server does, for `grpc-timeout`), or
    /// the client enforcing its own deadline, dropped the request first.
    pub(crate) fn abandon(&self, panicked: bool) {
        let reason = if self.token.is_cancelled() {
            CancelReason::Explicit
        } else if panicked {
            CancelReason::Panicked
        } else if self.deadline_reached() {
            CancelReason::DeadlineExceeded
        } else {
            CancelReason::Disconnected
        };
        // The handler future or body is gone: it stopped before (or as) the cancellation is
        // recorded, so a drop that cancels reports that nothing ran on.
        self.response_stopped(Stopped::Dropped);
        self.cancel(reason);
    }

    /// Whether the deadline passed, or is no further away than its slack.
    fn deadline_reached(&self) -> bool {
        self.at(&self.timed_out_from)
            .is_some_and(|from| Instant::now() >= from)
    }

    /// Notices a token that application code cancelled while the handler or body was pending.
    pub(crate) fn notice_token(&self) {
        if is_armed(self.state.load(Ordering::Acquire)) && self.token.is_cancelled() {
            self.cancel(CancelReason::Explicit);
        }
    }

    /// The record of this request's cancellation, for code that saw its token cancelled,
    /// recording nothing: the recorded reason and phase (with the time until now if the winner
    /// of the cancellation has not recorded its own yet), or, for a token that application
    /// code cancelled and the layer has not noticed yet, `Explicit` in the current phase
    /// (`Body` after completion) with the time until now.
    pub(crate) fn record(&self) -> Cancelled {
        let elapsed = self.callbacks().elapsed();
        let elapsed = elapsed.unwrap_or_else(|| self.started.elapsed());
        match self.cancellation() {
            Some((reason, phase)) => self.cancelled(reason, phase, elapsed),
            None => self.cancelled(CancelReason::Explicit, self.phase(), elapsed),
        }
    }

    fn cancelled(&self, reason: CancelReason, phase: Phase, elapsed: Duration) -> Cancelled {
        Cancelled {
            reason,
            phase,
            method: self.method.clone(),
            uri: self.uri.clone(),
            elapsed,
            recorded: self
                .extras
                .as_ref()
                .and_then(|extras| extras.recorded.clone()),
        }
    }

    /// Runs once, by the winner of the transition to cancelled.
    fn fire(&self, reason: CancelReason, phase: Phase) {
        let elapsed = self.started.elapsed();
        let cancelled = self.cancelled(reason, phase, elapsed);
        let (Lists { handler, joined }, stopped) = {
            let mut callbacks = self.callbacks();
            callbacks.set_elapsed(elapsed);
            // Whatever stopped before this (the drop that cancels) did not run on.
            let stopped = callbacks.tail.cancelling();
            (callbacks.close(), stopped)
        };
        // After the elapsed time is recorded: whoever wakes on the token finds the whole
        // record (see `record`).
        self.token.cancel();
        self.deregister(&joined);
        metrics::cancelled(reason, phase);
        if stopped.is_some() {
            metrics::ran_after_cancel(reason, phase, Duration::ZERO);
        }
        let span = self.span();
        // Only recorded if the span declares the fields (as `tracing::field::Empty`): see
        // `CancellationLayer::event_level`.
        span.record(SPAN_REASON, reason.as_str());
        span.record(SPAN_PHASE, phase.as_str());
        span.in_scope(|| {
            let level = self.creator.event_level;
            match stopped {
                None => request_event_at!(
                    level,
                    cancelled,
                    phase = %phase,
                    elapsed = ?elapsed,
                    "request cancelled",
                ),
                // The request's work had stopped already: this is also the report of how long
                // it ran on after the cancellation.
                Some(how) => request_event_at!(
                    level,
                    cancelled,
                    phase = %phase,
                    elapsed = ?elapsed,
                    ran_after_cancel = ?Duration::ZERO,
                    stopped = how.as_str(),
                    "request cancelled",
                ),
            }
            // The handler's registrations first, in registration order; then each layer's
            // callbacks, from the innermost layer to the outermost.
            for callback in handler {
                contain("on_cancel callback", &cancelled, || callback(&cancelled));
            }
            let owner = &self.creator;
            for layer in joined.iter().rev() {
                layer.bound.run(&cancelled, self.span(), owner);
            }
            config::run(owner, self.runtime(), &cancelled, self.span(), owner);
        });
    }
}

#[cfg(test)]
thread_local! {
    /// Run once, right after the next scope made on this thread registered with its creator's
    /// shutdown registry: the tests put a shutdown in that window.
    pub(crate) static AFTER_REGISTER: std::cell::Cell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::Cell::new(None) };
}

#[cfg(test)]
fn after_register() {
    if let Some(hook) = AFTER_REGISTER.with(std::cell::Cell::take) {
        hook();
    }
}

/// The scope of a test request, `GET /test`, for the unit tests, the loom models and the
/// handles of feature `test-util`.
#[cfg(any(test, feature = "test-util"))]
impl Scope {
    pub(crate) fn for_test(config: &Arc<config::Config>, limit: Option<TimeLimit>) -> Arc<Self> {
        Self::new(
            Method::GET,
            Uri::from_static("/test"),
            Bound::capture(config),
            limit,
            None,
        )
    }
}

/// What the tests read of the tail: whether the response is over, how many detached handler
/// tasks still run, and whether the report of how long the work ran on was made.
#[cfg(test)]
impl Scope {
    pub(crate) fn tail(&self) -> (bool, u16, bool) {
        self.callbacks().tail.state()
    }
}

impl InFlight for Scope {
    fn shut_down(&self) {
        self.cancel(CancelReason::Shutdown);
    }
}

/// Scopes alive in this process, counted in debug builds only (an atomic every request would
/// write is not free): the soak test checks that it returns to zero.
#[cfg(debug_assertions)]
static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[cfg(debug_assertions)]
pub(crate) fn live() -> usize {
    LIVE.load(std::sync::atomic::Ordering::SeqCst)
}

#[cfg(debug_assertions)]
impl Drop for Scope {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.load(Ordering::Acquire);
        let mut d = f.debug_struct("Scope");
        match decode(state) {
            Some((reason, phase)) => d.field("cancelled", &reason).field("phase", &phase),
            None if is_completed(state) => d.field("completed", &true),
            None => d.field("armed", &true),
        };
        d.field("method", &self.method)
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

/// An offset from the start in nanoseconds; saturates far beyond any real deadline.
fn nanos(offset: Duration) -> u64 {
    u64::try_from(offset.as_nanos()).map_or(NO_DEADLINE - 1, |n| n.min(NO_DEADLINE - 1))
}

#[cfg(test)]
mod tests;
