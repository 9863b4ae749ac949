//! The per-request state machine: armed → completed | cancelled(reason, phase).
//!
//! One `Scope` per request, shared through an `Arc` by the guard (inside the response future,
//! then the response body) and every `RequestCancellation` handle.
//!
//! * `state` is the single source of truth. Every transition out of an armed state is a
//!   compare-and-swap, so exactly one of "complete" and "cancel(reason)" wins, whatever races.
//!   A cancelled state encodes its reason and phase, so nothing else needs to be published.
//! * `registry` holds what runs on cancellation besides the creating layer's callbacks: the
//!   handler's registrations and the callbacks of layers deeper in the stack that joined. It is
//!   drained exactly once, by whoever moves the scope out of the armed state; after that,
//!   registrations run at once (cancelled) or are dropped (completed).
//! * The winner of a cancellation cancels the token, emits the event and runs the callbacks,
//!   all outside the lock.
//! * The deadline is an offset from the start, in an atomic, so that a deeper layer can
//!   shorten it; the guard's timer follows it. With a shutdown token, the scope is registered
//!   in the layer's shutdown registry until it leaves the armed state.

use std::fmt;
use std::mem;
use std::sync::{Arc, PoisonError};
use std::task::Context;
use std::time::Duration;

use http::{Method, Uri};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Span;

use crate::deadline::{TimeLimit, Timer};
use crate::hooks::{Bound, contain};
use crate::shutdown::Slot;
use crate::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use crate::sync::{Mutex, MutexGuard};
use crate::{CancelReason, Cancelled, Phase};

const ARMED_HANDLER: u8 = 0;
const ARMED_BODY: u8 = 1;
const COMPLETED: u8 = 2;
/// Set on top of any state once something was added to the registry, so that completion
/// knows whether it must take the registry lock (see [`Scope::finish`]).
const REGISTERED: u8 = 0x40;
/// Set in every cancelled state; the low bits carry the phase (bit 0) and the reason.
const CANCELLED: u8 = 0x80;

/// `Scope::deadline` when the request has none.
const NO_DEADLINE: u64 = u64::MAX;

fn encode(reason: CancelReason, phase: Phase) -> u8 {
    let reason = match reason {
        CancelReason::Disconnected => 0,
        CancelReason::Shutdown => 1,
        CancelReason::DeadlineExceeded => 2,
        CancelReason::Explicit => 3,
    };
    let phase = match phase {
        Phase::Handler => 0,
        Phase::Body => 1,
    };
    CANCELLED | reason << 1 | phase
}

fn is_armed(state: u8) -> bool {
    let state = state & !REGISTERED;
    state == ARMED_HANDLER || state == ARMED_BODY
}

fn is_completed(state: u8) -> bool {
    state & !REGISTERED == COMPLETED
}

fn decode(state: u8) -> Option<(CancelReason, Phase)> {
    let state = state & !REGISTERED;
    if state & CANCELLED == 0 {
        return None;
    }
    let phase = if state & 1 == 0 {
        Phase::Handler
    } else {
        Phase::Body
    };
    let reason = match (state & !CANCELLED) >> 1 {
        0 => CancelReason::Disconnected,
        1 => CancelReason::Shutdown,
        2 => CancelReason::DeadlineExceeded,
        _ => CancelReason::Explicit,
    };
    Some((reason, phase))
}

type HandlerCallback = Box<dyn FnOnce(&Cancelled) + Send>;

#[derive(Default)]
struct Registry {
    /// Set once the scope left the armed state and the lists were drained.
    closed: bool,
    /// `Some` once cancelled: the time from start to cancellation, for late registrations.
    elapsed: Option<Duration>,
    /// Allocated by the first registration: most requests have none, and two empty `Vec`s
    /// would cost every request 48 bytes.
    lists: Option<Box<Lists>>,
}

#[derive(Default)]
struct Lists {
    /// The handler's `on_cancel` registrations, in registration order.
    handler: Vec<HandlerCallback>,
    /// Layers deeper in the stack that joined this scope, outermost first.
    joined: Vec<Joined>,
}

impl Registry {
    fn lists(&mut self) -> &mut Lists {
        self.lists.get_or_insert_with(Box::default)
    }

    /// Closes the registry and takes what was registered.
    fn close(&mut self) -> Lists {
        self.closed = true;
        self.lists.take().map(|lists| *lists).unwrap_or_default()
    }
}

/// A deeper layer that joined the scope, and its shutdown registration if it has a token.
struct Joined {
    bound: Bound,
    slot: Option<Slot>,
}

/// What a late registration finds.
enum Late {
    Cancelled(Cancelled),
    Completed,
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
    /// The span that was current when the layer saw the request, if the event is enabled
    /// (boxed: most requests carry none, and a `Span` is 40 bytes).
    span: Option<Box<Span>>,
    /// The configuration of the layer that created the scope (the outermost one).
    creator: Bound,
    /// Where the creator's shutdown registry holds this scope.
    slot: Option<Slot>,
    registry: Mutex<Registry>,
}

impl Scope {
    /// A new armed scope. It starts cancelled with `Shutdown` if the creator's shutdown has
    /// begun.
    pub(crate) fn new(
        method: Method,
        uri: Uri,
        creator: Bound,
        time_limit: Option<TimeLimit>,
    ) -> Arc<Self> {
        let span = if tracing::enabled!(target: "tower_cancel", tracing::Level::DEBUG) {
            Some(Box::new(Span::current()))
        } else {
            None
        };
        let mut shutting_down = false;
        let scope = Arc::new_cyclic(|this| {
            let slot = creator.config().register(this.clone()).unwrap_or_else(|_| {
                shutting_down = true;
                None
            });
            Self {
                state: AtomicU8::new(ARMED_HANDLER),
                token: CancellationToken::new(),
                method,
                uri,
                started: Instant::now(),
                deadline: AtomicU64::new(time_limit.map_or(NO_DEADLINE, |l| nanos(l.after))),
                timed_out_from: AtomicU64::new(
                    time_limit.map_or(NO_DEADLINE, |l| nanos(l.timed_out_from)),
                ),
                span,
                creator,
                slot,
                registry: Mutex::new(Registry::default()),
            }
        });
        #[cfg(debug_assertions)]
        LIVE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if shutting_down {
            scope.cancel(CancelReason::Shutdown);
        }
        scope
    }

    /// The request's span, or no span.
    fn span(&self) -> &Span {
        static NONE: Span = Span::none();
        self.span.as_deref().unwrap_or(&NONE)
    }

    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub(crate) fn method(&self) -> &Method {
        &self.method
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // User code never runs under this lock, so poisoning carries no meaning here.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// The reason, noticing a token that application code cancelled directly.
    pub(crate) fn reason(&self) -> Option<CancelReason> {
        let state = self.state.load(Ordering::Acquire);
        if let Some((reason, _)) = decode(state) {
            return Some(reason);
        }
        if !self.token.is_cancelled() {
            return None;
        }
        // Cancelled by application code. While armed this records `Explicit` and runs the
        // callbacks; after completion it only reports it.
        Some(
            self.cancel(CancelReason::Explicit)
                .map_or(CancelReason::Explicit, |(r, _)| r),
        )
    }

    /// The handler returned a response head and its body starts streaming. A token the
    /// handler cancelled before returning is recorded now, as a cancellation in the handler.
    pub(crate) fn enter_body(&self) {
        self.notice_token();
        // Fails only if the scope already left the armed state, which is then final.
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                (state & !REGISTERED == ARMED_HANDLER).then_some(ARMED_BODY | state & REGISTERED)
            });
    }

    /// Records `reason` if the scope is still armed and, if so, cancels the token and runs
    /// every callback. Returns the recorded cancellation (this one or an earlier one), or
    /// `None` if the request had completed.
    pub(crate) fn cancel(&self, reason: CancelReason) -> Option<(CancelReason, Phase)> {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let phase = match current & !REGISTERED {
                ARMED_HANDLER => Phase::Handler,
                ARMED_BODY => Phase::Body,
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

    /// The request reached its end. A token that application code cancelled meanwhile makes it
    /// an `Explicit` cancellation instead.
    ///
    /// Completion leaves the registry alone unless something was registered: the common
    /// request takes no lock. Registering sets `REGISTERED` in the state after adding to the
    /// registry, and reads the state it replaced; completion replaces the state and reads
    /// whether it carried `REGISTERED`. Both are read-modify-writes of the same atomic, so one
    /// comes first: either completion sees the flag, or the registration sees the completion,
    /// and that side drops the registrations (both doing it is harmless).
    pub(crate) fn finish(&self) {
        if self.token.is_cancelled() {
            self.cancel(CancelReason::Explicit);
            return;
        }
        let mut current = self.state.load(Ordering::Acquire);
        while is_armed(current) {
            match self.state.compare_exchange_weak(
                current,
                COMPLETED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.creator.config().deregister(self.slot);
                    if current & REGISTERED != 0 {
                        self.drop_registrations();
                    }
                    return;
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// After completion: drops the registrations (outside the lock); joined layers leave their
    /// shutdown registries. They will never run, and a closure holding a handle to this scope would
    /// otherwise keep it alive.
    fn drop_registrations(&self) {
        let Lists { handler, joined } = self.registry().close();
        for layer in &joined {
            layer.bound.config().deregister(layer.slot);
        }
        drop((handler, joined));
    }

    /// Called after adding to the registry: flags the state, and returns whether the request
    /// had completed meanwhile, in which case its `finish` may not have seen the addition and
    /// the caller must drop the registrations (see [`Scope::finish`]).
    fn flag_registered(&self) -> bool {
        is_completed(self.state.fetch_or(REGISTERED, Ordering::AcqRel))
    }

    /// The guard was dropped before the request completed.
    ///
    /// A drop at the deadline is the deadline's doing, not the client's whim: a layer outside
    /// this one that enforces the same deadline (tonic's server does, for `grpc-timeout`), or
    /// the client enforcing its own deadline, dropped the request first.
    pub(crate) fn abandon(&self) {
        let reason = if self.token.is_cancelled() {
            CancelReason::Explicit
        } else if self.deadline_reached() {
            CancelReason::DeadlineExceeded
        } else {
            CancelReason::Disconnected
        };
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

    /// Registers a handler callback: runs on cancellation, at once if already cancelled, never
    /// if the request completes.
    pub(crate) fn on_cancel(&self, callback: HandlerCallback) {
        // A token cancelled by application code must be recorded before deciding.
        self.reason();
        let late = {
            let mut registry = self.registry();
            if !registry.closed {
                registry.lists().handler.push(callback);
                let completed = self.flag_registered();
                drop(registry);
                if completed {
                    self.drop_registrations();
                }
                return;
            }
            self.late(&registry)
        };
        if let Late::Cancelled(cancelled) = late {
            self.span().in_scope(|| {
                contain("on_cancel callback", &cancelled, || callback(&cancelled));
            });
        }
    }

    /// A layer deeper in the stack joins this scope: its time limit can only shorten the
    /// deadline, its shutdown token cancels the request too, and its callbacks run with the
    /// others. If the scope was already cancelled, its callbacks run at once.
    pub(crate) fn join(self: &Arc<Self>, bound: Bound, time_limit: Option<TimeLimit>) {
        if let Some(limit) = time_limit {
            self.deadline
                .fetch_min(nanos(limit.after), Ordering::AcqRel);
            self.timed_out_from
                .fetch_min(nanos(limit.timed_out_from), Ordering::AcqRel);
        }
        let mut shutting_down = false;
        let mut completed = false;
        let late = {
            let mut registry = self.registry();
            if !registry.closed {
                let slot = bound
                    .config()
                    .register(Arc::downgrade(self))
                    .unwrap_or_else(|_| {
                        shutting_down = true;
                        None
                    });
                registry.lists().joined.push(Joined { bound, slot });
                completed = self.flag_registered();
                None
            } else {
                Some((self.late(&registry), bound))
            }
        };
        match late {
            // Completed first: a completed request is not cancelled by a shutdown.
            None if completed => self.drop_registrations(),
            None if shutting_down => {
                self.cancel(CancelReason::Shutdown);
            }
            None => {}
            Some((Late::Cancelled(cancelled), bound)) => {
                self.span().in_scope(|| bound.run(&cancelled, self.span()));
            }
            Some((Late::Completed, _)) => {}
        }
    }

    /// Leaves the shutdown registries: the scope is no longer armed.
    fn deregister(&self, joined: &[Joined]) {
        self.creator.config().deregister(self.slot);
        for layer in joined {
            layer.bound.config().deregister(layer.slot);
        }
    }

    fn late(&self, registry: &Registry) -> Late {
        match (registry.elapsed, self.cancellation()) {
            (Some(elapsed), Some((reason, phase))) => {
                Late::Cancelled(self.cancelled(reason, phase, elapsed))
            }
            _ => Late::Completed,
        }
    }

    /// The record of this request's cancellation, for code that saw its token cancelled: the
    /// recorded reason and phase (with the time until now if the winner of the cancellation
    /// has not recorded its own yet), or, for a token that application code cancelled after
    /// the request had completed, `Explicit` in phase `Body` with the time until now.
    pub(crate) fn record(&self) -> Cancelled {
        let reason = self.reason().unwrap_or(CancelReason::Explicit);
        let elapsed = self.registry().elapsed;
        let elapsed = elapsed.unwrap_or_else(|| self.started.elapsed());
        match self.cancellation() {
            Some((reason, phase)) => self.cancelled(reason, phase, elapsed),
            None => self.cancelled(reason, Phase::Body, elapsed),
        }
    }

    fn cancelled(&self, reason: CancelReason, phase: Phase, elapsed: Duration) -> Cancelled {
        Cancelled {
            reason,
            phase,
            method: self.method.clone(),
            uri: self.uri.clone(),
            elapsed,
        }
    }

    /// Runs once, by the winner of the transition to cancelled.
    fn fire(&self, reason: CancelReason, phase: Phase) {
        let elapsed = self.started.elapsed();
        let cancelled = self.cancelled(reason, phase, elapsed);
        let Lists { handler, joined } = {
            let mut registry = self.registry();
            registry.elapsed = Some(elapsed);
            registry.close()
        };
        // After the elapsed time is recorded: whoever wakes on the token finds the whole
        // record (see `record`).
        self.token.cancel();
        self.deregister(&joined);
        self.span().in_scope(|| {
            tracing::debug!(
                target: "tower_cancel",
                reason = %reason,
                phase = %phase,
                method = %self.method,
                path = self.uri.path(),
                elapsed = ?elapsed,
                "request cancelled",
            );
            // The handler's registrations first, in registration order; then each layer's
            // callbacks, from the innermost layer to the outermost.
            for callback in handler {
                contain("on_cancel callback", &cancelled, || callback(&cancelled));
            }
            for layer in joined.iter().rev() {
                layer.bound.run(&cancelled, self.span());
            }
            self.creator.run(&cancelled, self.span());
        });
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

/// Owned by the response future, then by the response body: dropping it while armed cancels
/// the request with `Disconnected`; its timer cancels it with `DeadlineExceeded`.
#[derive(Default)]
pub(crate) struct Guard {
    /// `None` when disarmed (or when a deeper layer only joined an outer layer's scope).
    scope: Option<Arc<Scope>>,
    /// Created when the request has a deadline and is first polled.
    timer: Timer,
}

impl Guard {
    pub(crate) fn new(scope: Arc<Scope>) -> Self {
        Self {
            scope: Some(scope),
            timer: Timer::default(),
        }
    }

    /// The response future or body is pending: notices a token cancelled by application code
    /// and enforces the deadline.
    pub(crate) fn pending(&mut self, cx: &mut Context<'_>) {
        if let Some(scope) = self.scope.as_deref() {
            scope.notice_token();
        }
        self.poll_deadline(cx);
    }

    /// Cancels the request with `DeadlineExceeded` once its deadline passed; until then the
    /// timer wakes the task when it does. Costs one atomic load without a deadline.
    pub(crate) fn poll_deadline(&mut self, cx: &mut Context<'_>) {
        let Some(scope) = self.scope.as_deref() else {
            return;
        };
        let Some(deadline) = scope.deadline() else {
            return;
        };
        if scope.is_armed() && self.timer.poll_until(deadline, cx).is_ready() {
            scope.cancel(CancelReason::DeadlineExceeded);
        }
    }

    /// Cancels the request with `DeadlineExceeded` if its deadline passed, without arming a
    /// timer: for a body that produced a frame and is polled again at once.
    pub(crate) fn check_deadline(&self) {
        let Some(scope) = self.scope.as_deref() else {
            return;
        };
        // `cancel` does nothing to a request that completed or was already cancelled.
        if scope
            .deadline()
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            scope.cancel(CancelReason::DeadlineExceeded);
        }
    }

    /// Moves the guard out (from the response future into the body), leaving a disarmed one.
    pub(crate) fn take(&mut self) -> Self {
        mem::take(self)
    }

    pub(crate) fn scope(&self) -> Option<&Scope> {
        self.scope.as_deref()
    }

    /// Completes the request and disarms the guard.
    pub(crate) fn finish(mut self) {
        if let Some(scope) = self.scope.take() {
            scope.finish();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(scope) = self.scope.take() {
            scope.abandon();
        }
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Some(scope) => fmt::Debug::fmt(scope, f),
            None => f.write_str("Guard(disarmed)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Mutex};
    use std::thread;

    use super::*;
    use crate::config::Config;
    use crate::hooks::Hook;
    use crate::shutdown::Shutdown;

    type Log = Arc<Mutex<Vec<String>>>;

    fn hooks_logging(log: &Log, name: &'static str) -> Arc<Config> {
        let mut config = Config::new();
        for i in 1..=2 {
            let log = log.clone();
            config.hooks.push(Hook::sync(move |c: &Cancelled| {
                log.lock()
                    .unwrap()
                    .push(format!("{name}{i}:{}", c.reason()));
            }));
        }
        Arc::new(config)
    }

    fn scope_with(config: &Arc<Config>) -> Arc<Scope> {
        Scope::new(
            Method::GET,
            Uri::from_static("/x"),
            Bound::capture(config),
            None,
        )
    }

    fn scope() -> Arc<Scope> {
        scope_with(&Arc::new(Config::new()))
    }

    fn counter(scope: &Scope) -> Arc<AtomicUsize> {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        scope.on_cancel(Box::new(move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        runs
    }

    #[test]
    fn state_encoding_round_trips() {
        for reason in [
            CancelReason::Disconnected,
            CancelReason::Shutdown,
            CancelReason::DeadlineExceeded,
            CancelReason::Explicit,
        ] {
            for phase in [Phase::Handler, Phase::Body] {
                let state = encode(reason, phase);
                assert!(!is_armed(state) && state != COMPLETED);
                assert_eq!(decode(state), Some((reason, phase)));
            }
        }
        assert_eq!(decode(ARMED_HANDLER), None);
        assert_eq!(decode(ARMED_BODY), None);
        assert_eq!(decode(COMPLETED), None);
        // The registered flag changes nothing a reader sees.
        for reason in [CancelReason::Disconnected, CancelReason::Explicit] {
            for phase in [Phase::Handler, Phase::Body] {
                let state = encode(reason, phase) | REGISTERED;
                assert_eq!(decode(state), Some((reason, phase)));
                assert!(!is_armed(state) && !is_completed(state));
            }
        }
        assert!(is_armed(ARMED_HANDLER | REGISTERED) && is_armed(ARMED_BODY | REGISTERED));
        assert!(is_completed(COMPLETED | REGISTERED) && !is_armed(COMPLETED | REGISTERED));
        assert_eq!(decode(COMPLETED | REGISTERED), None);
    }

    #[test]
    fn completion_never_cancels() {
        let scope = scope();
        let runs = counter(&scope);
        scope.enter_body();
        scope.finish();
        assert_eq!(scope.cancel(CancelReason::Disconnected), None);
        scope.abandon();
        assert!(!scope.token().is_cancelled());
        assert_eq!(scope.reason(), None);
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn first_cause_wins_and_callbacks_run_once() {
        let scope = scope();
        let runs = counter(&scope);
        assert_eq!(
            scope.cancel(CancelReason::Shutdown),
            Some((CancelReason::Shutdown, Phase::Handler))
        );
        assert_eq!(
            scope.cancel(CancelReason::Disconnected),
            Some((CancelReason::Shutdown, Phase::Handler))
        );
        scope.abandon();
        scope.finish();
        assert!(scope.token().is_cancelled());
        assert_eq!(scope.reason(), Some(CancelReason::Shutdown));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn phase_follows_the_response_head() {
        let scope = scope();
        scope.enter_body();
        scope.abandon();
        assert_eq!(
            scope.cancellation(),
            Some((CancelReason::Disconnected, Phase::Body))
        );
    }

    #[test]
    fn registration_after_cancellation_runs_at_once() {
        let scope = scope();
        scope.cancel(CancelReason::Disconnected);
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        scope.on_cancel(Box::new(move |c| {
            *s.lock().unwrap() = Some((c.reason(), c.phase(), c.uri().clone()));
        }));
        assert_eq!(
            seen.lock().unwrap().take(),
            Some((
                CancelReason::Disconnected,
                Phase::Handler,
                Uri::from_static("/x")
            ))
        );
    }

    #[test]
    fn registration_after_completion_is_dropped_and_breaks_cycles() {
        let scope = scope();
        // A callback that holds the scope itself: a cycle until the registry drops it.
        let held = Arc::clone(&scope);
        scope.on_cancel(Box::new(move |_| drop(held)));
        assert_eq!(Arc::strong_count(&scope), 2);
        scope.finish();
        assert_eq!(
            Arc::strong_count(&scope),
            1,
            "completion drops registrations"
        );

        let late = Arc::clone(&scope);
        scope.on_cancel(Box::new(move |_| drop(late)));
        assert_eq!(Arc::strong_count(&scope), 1, "late registration is dropped");
    }

    #[test]
    fn order_is_handler_then_innermost_layer_to_outermost() {
        let log: Log = Arc::default();
        let scope = scope_with(&hooks_logging(&log, "outer"));
        scope.join(Bound::capture(&hooks_logging(&log, "middle")), None);
        scope.join(Bound::capture(&hooks_logging(&log, "inner")), None);
        for name in ["h1", "h2"] {
            let log = log.clone();
            scope.on_cancel(Box::new(move |c| {
                log.lock().unwrap().push(format!("{name}:{}", c.reason()));
            }));
        }
        scope.abandon();
        scope.abandon();
        assert_eq!(
            *log.lock().unwrap(),
            [
                "h1:disconnected",
                "h2:disconnected",
                "inner1:disconnected",
                "inner2:disconnected",
                "middle1:disconnected",
                "middle2:disconnected",
                "outer1:disconnected",
                "outer2:disconnected",
            ]
        );
    }

    #[test]
    fn joining_a_cancelled_scope_runs_the_layer_at_once() {
        let log: Log = Arc::default();
        let scope = scope();
        scope.cancel(CancelReason::Shutdown);
        scope.join(Bound::capture(&hooks_logging(&log, "late")), None);
        assert_eq!(*log.lock().unwrap(), ["late1:shutdown", "late2:shutdown"]);
    }

    #[test]
    fn token_cancelled_by_application_code_is_explicit() {
        let scope = scope();
        let runs = counter(&scope);
        scope.token().cancel();
        scope.notice_token();
        scope.notice_token();
        scope.abandon();
        assert_eq!(scope.reason(), Some(CancelReason::Explicit));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn token_cancelled_by_the_handler_before_the_end_is_a_handler_phase_cancel() {
        // Noticed when the head is out (a streaming body follows) or when the request ends.
        for head_then_body in [false, true] {
            let scope = scope();
            let runs = counter(&scope);
            scope.token().cancel();
            if head_then_body {
                scope.enter_body();
            }
            scope.finish();
            assert_eq!(
                scope.cancellation(),
                Some((CancelReason::Explicit, Phase::Handler))
            );
            assert_eq!(runs.load(Ordering::SeqCst), 1);
        }
    }

    #[test]
    fn token_cancelled_after_completion_runs_nothing() {
        let scope = scope();
        let runs = counter(&scope);
        scope.finish();
        scope.token().cancel();
        assert_eq!(scope.reason(), Some(CancelReason::Explicit));
        assert_eq!(scope.cancellation(), None, "the request had completed");
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_panicking_callback_does_not_stop_the_others() {
        let log: Log = Arc::default();
        let scope = scope_with(&hooks_logging(&log, "layer"));
        scope.on_cancel(Box::new(|_| panic!("boom")));
        let l = log.clone();
        scope.on_cancel(Box::new(move |_| l.lock().unwrap().push("after".into())));
        scope.abandon();
        assert_eq!(
            *log.lock().unwrap(),
            ["after", "layer1:disconnected", "layer2:disconnected"]
        );
    }

    #[test]
    fn racing_causes_settle_on_exactly_one_outcome() {
        for round in 0..500 {
            let scope = scope();
            let runs = counter(&scope);
            let late_runs = Arc::new(AtomicUsize::new(0));
            thread::scope(|s| {
                s.spawn(|| scope.finish());
                s.spawn(|| scope.abandon());
                s.spawn(|| {
                    scope.cancel(CancelReason::Shutdown);
                });
                s.spawn(|| {
                    let r = late_runs.clone();
                    scope.on_cancel(Box::new(move |_| {
                        r.fetch_add(1, Ordering::SeqCst);
                    }));
                });
                if round % 2 == 0 {
                    s.spawn(|| scope.token().cancel());
                }
            });
            let cancelled = scope.cancellation().is_some();
            let expected = usize::from(cancelled);
            assert_eq!(runs.load(Ordering::SeqCst), expected, "round {round}");
            assert_eq!(late_runs.load(Ordering::SeqCst), expected, "round {round}");
            if cancelled {
                assert!(scope.token().is_cancelled());
            } else if round % 2 == 1 {
                assert!(
                    !scope.token().is_cancelled(),
                    "completed token stays uncancelled"
                );
            }
        }
    }

    fn with_shutdown() -> (Arc<Config>, Shutdown) {
        let shutdown = Shutdown::new(CancellationToken::new());
        let mut config = Config::new();
        config.shutdown = Some(shutdown.clone());
        (Arc::new(config), shutdown)
    }

    fn server(after: Duration) -> Option<TimeLimit> {
        Some(TimeLimit::server(after))
    }

    fn client(after: Duration) -> Option<TimeLimit> {
        Some(TimeLimit::client(after))
    }

    fn limited(config: &Arc<Config>, limit: Option<TimeLimit>) -> Arc<Scope> {
        Scope::new(
            Method::GET,
            Uri::from_static("/x"),
            Bound::capture(config),
            limit,
        )
    }

    #[test]
    fn a_joined_layer_can_only_shorten_the_deadline() {
        let config = Arc::new(Config::new());
        let scope = limited(&config, server(Duration::from_secs(10)));
        let start = scope.deadline().unwrap() - Duration::from_secs(10);
        scope.join(Bound::capture(&config), client(Duration::from_secs(1)));
        assert_eq!(scope.deadline(), Some(start + Duration::from_secs(1)));
        scope.join(Bound::capture(&config), server(Duration::from_secs(20)));
        scope.join(Bound::capture(&config), None);
        assert_eq!(scope.deadline(), Some(start + Duration::from_secs(1)));
        assert_eq!(self::scope().deadline(), None);
        // Absurd limits saturate instead of wrapping.
        let forever = limited(&config, client(Duration::MAX));
        assert!(forever.deadline().unwrap() > start + Duration::from_secs(100 * 365 * 86_400));
    }

    /// A drop at the deadline, or within its slack before it, is `DeadlineExceeded`: 1 ms for
    /// the server's own limit, 20 ms for a deadline the client chose and enforces itself.
    #[tokio::test(start_paused = true)]
    async fn a_drop_at_the_deadline_is_a_deadline_not_a_disconnect() {
        let config = Arc::new(Config::new());
        let ms = Duration::from_millis;
        let server_early = limited(&config, server(ms(100)));
        let server_at_slack = limited(&config, server(ms(100)));
        let client_early = limited(&config, client(ms(100)));
        let client_at_slack = limited(&config, client(ms(100)));
        let after = limited(&config, server(ms(100)));
        let unlimited = limited(&config, None);
        tokio::time::advance(Duration::from_micros(79_999)).await;
        client_early.abandon();
        tokio::time::advance(Duration::from_micros(1)).await; // 80 ms: exactly 20 ms before
        client_at_slack.abandon();
        tokio::time::advance(Duration::from_micros(18_999)).await; // 1 ms and 1 µs before
        server_early.abandon();
        tokio::time::advance(Duration::from_micros(1)).await; // exactly 1 ms before
        server_at_slack.abandon();
        tokio::time::advance(ms(5)).await;
        after.abandon();
        unlimited.abandon();
        let reason = |scope: &Scope| scope.cancellation().map(|(reason, _)| reason);
        assert_eq!(reason(&client_early), Some(CancelReason::Disconnected));
        assert_eq!(
            reason(&client_at_slack),
            Some(CancelReason::DeadlineExceeded)
        );
        assert_eq!(reason(&server_early), Some(CancelReason::Disconnected));
        assert_eq!(
            reason(&server_at_slack),
            Some(CancelReason::DeadlineExceeded)
        );
        assert_eq!(reason(&after), Some(CancelReason::DeadlineExceeded));
        assert_eq!(reason(&unlimited), Some(CancelReason::Disconnected));
    }

    /// With both a server limit and a client deadline, each keeps its own slack: a tie or a
    /// near-tie does not lose the client's.
    #[tokio::test(start_paused = true)]
    async fn mixed_deadlines_keep_the_widest_slack_that_applies() {
        let config = Arc::new(Config::new());
        let ms = Duration::from_millis;
        // The server's layer and a stacked client deadline, equal.
        let tie = limited(&config, server(ms(100)));
        tie.join(Bound::capture(&config), client(ms(100)));
        // The client's deadline half a millisecond after the server's.
        let near = limited(&config, server(ms(100)));
        near.join(
            Bound::capture(&config),
            client(Duration::from_micros(100_500)),
        );
        // A server deadline well before the client's: its own 1 ms slack applies.
        let server_first = limited(&config, client(ms(200)));
        server_first.join(Bound::capture(&config), server(ms(100)));
        tokio::time::advance(ms(85)).await;
        tie.abandon();
        near.abandon();
        server_first.abandon();
        let reason = |scope: &Scope| scope.cancellation().map(|(reason, _)| reason);
        assert_eq!(reason(&tie), Some(CancelReason::DeadlineExceeded));
        assert_eq!(reason(&near), Some(CancelReason::DeadlineExceeded));
        assert_eq!(reason(&server_first), Some(CancelReason::Disconnected));
        assert_eq!(tie.deadline(), near.deadline());
    }

    #[test]
    fn shutdown_cancels_armed_scopes_and_later_ones_start_cancelled() {
        let log: Log = Arc::default();
        let (config, shutdown) = with_shutdown();
        let armed = scope_with(&config);
        let runs = counter(&armed);
        let completed = scope_with(&config);
        completed.finish();
        assert_eq!(shutdown.in_flight(), 1, "completion leaves the registry");

        assert_eq!(shutdown.close(), 1);
        assert_eq!(armed.reason(), Some(CancelReason::Shutdown));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(completed.reason(), None);

        let mut late_config = Config::clone(&config);
        late_config.hooks = hooks_logging(&log, "late").hooks.clone();
        let late = scope_with(&Arc::new(late_config));
        assert_eq!(
            late.cancellation(),
            Some((CancelReason::Shutdown, Phase::Handler))
        );
        assert!(late.token().is_cancelled());
        assert_eq!(*log.lock().unwrap(), ["late1:shutdown", "late2:shutdown"]);
    }

    #[test]
    fn a_joined_layer_with_a_shutdown_token_cancels_the_outer_scope() {
        let (config, shutdown) = with_shutdown();
        let scope = self::scope();
        let runs = counter(&scope);
        scope.join(Bound::capture(&config), None);
        assert_eq!(shutdown.in_flight(), 1);
        shutdown.close();
        assert_eq!(scope.reason(), Some(CancelReason::Shutdown));
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        // Joining after that layer's shutdown began cancels at once.
        let scope = self::scope();
        scope.join(Bound::capture(&config), None);
        assert_eq!(scope.reason(), Some(CancelReason::Shutdown));
    }

    #[test]
    fn shutdown_racing_completion_and_drop_settles_once_and_leaves_no_entry() {
        for round in 0..500 {
            let (config, shutdown) = with_shutdown();
            let scopes: Vec<_> = (0..4).map(|_| scope_with(&config)).collect();
            let runs: Vec<_> = scopes.iter().map(|s| counter(s)).collect();
            // Odd rounds: no shutdown during the race, so the registry must hold exactly the
            // one scope still in flight once the others ended concurrently.
            let racing_shutdown = round % 2 == 0;
            thread::scope(|s| {
                if racing_shutdown {
                    s.spawn(|| shutdown.close());
                }
                s.spawn(|| scopes[0].finish());
                s.spawn(|| scopes[1].abandon());
                s.spawn(|| {
                    scopes[2].enter_body();
                    scopes[2].finish();
                });
                // scopes[3] stays in flight: only the shutdown can end it.
            });
            if !racing_shutdown {
                assert_eq!(shutdown.in_flight(), 1, "round {round}");
                assert_eq!(shutdown.close(), 1, "round {round}");
            }
            assert_eq!(
                scopes[3].reason(),
                Some(CancelReason::Shutdown),
                "round {round}"
            );
            for (scope, runs) in scopes.iter().zip(&runs) {
                let expected = usize::from(scope.cancellation().is_some());
                assert_eq!(runs.load(Ordering::SeqCst), expected, "round {round}");
            }
            assert_eq!(shutdown.in_flight(), 0, "round {round}");
        }
    }

    #[test]
    fn a_registration_keeps_the_phase() {
        let scope = scope();
        let runs = counter(&scope);
        scope.enter_body();
        assert_eq!(
            scope.cancel(CancelReason::Disconnected),
            Some((CancelReason::Disconnected, Phase::Body))
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_registration_racing_completion_is_dropped_not_stranded() {
        for round in 0..2000 {
            let (config, shutdown) = with_shutdown();
            let scope = scope();
            // The registration holds a handle to the scope, as a handler's closure would: if
            // neither side dropped it, the scope would keep itself alive.
            let held = Arc::clone(&scope);
            thread::scope(|s| {
                s.spawn(|| scope.finish());
                s.spawn(|| {
                    scope.on_cancel(Box::new(move |_| drop(held)));
                    scope.join(Bound::capture(&config), None);
                });
            });
            assert_eq!(scope.cancellation(), None, "round {round}");
            assert_eq!(
                Arc::strong_count(&scope),
                1,
                "round {round}: a registration leaked"
            );
            assert_eq!(
                shutdown.in_flight(),
                0,
                "round {round}: a joined layer stayed registered"
            );
        }
    }
}
