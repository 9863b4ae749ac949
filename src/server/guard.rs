//! `Guard`: owned by the response future, then by the response body, it turns their drop
//! into the request's cancellation and enforces the deadline while they are pending.

use std::fmt;
use std::mem;
use std::sync::Arc;
use std::task::Context;

use tokio::time::Instant;

use crate::record::CancelReason;
use crate::runtime::deadline::Timer;

/// What the guard's timer enforces, as its error event names it.
const DEADLINE: &str = "the request's deadline";
use crate::scope::Scope;

/// Owned by the response future, then by the response body: dropping it while armed cancels
/// the request with `Disconnected`; its timer cancels it with `DeadlineExceeded`.
#[derive(Default)]
pub(crate) struct Guard {
    /// `None` when disarmed (or when a deeper layer only joined an outer layer's scope).
    scope: Option<Arc<Scope>>,
    /// Created when the request has a deadline and is first polled.
    timer: Timer,
    /// Set while the guarded future or body is being polled: still set when the guard is
    /// dropped, the poll unwound (a panic), and the request is recorded as `Panicked`.
    polling: bool,
}

impl Guard {
    #[inline]
    pub(crate) fn new(scope: Arc<Scope>) -> Self {
        Self {
            scope: Some(scope),
            timer: Timer::default(),
            polling: false,
        }
    }

    /// Runs `poll`, the guarded future's or body's poll: a panic that unwinds out of it leaves
    /// the mark, so that the guard's drop records `Panicked` rather than the client leaving.
    #[inline]
    pub(crate) fn polling<T>(&mut self, poll: impl FnOnce() -> T) -> T {
        self.polling = true;
        let output = poll();
        self.polling = false;
        output
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
        if scope.is_armed() && self.timer.poll_until(deadline, cx, DEADLINE).is_ready() {
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
    #[inline]
    pub(crate) fn take(&mut self) -> Self {
        mem::take(self)
    }

    pub(crate) fn scope(&self) -> Option<&Scope> {
        self.scope.as_deref()
    }

    /// Completes the request and disarms the guard (in place: the body that holds it is
    /// dropped soon, and its timer with it).
    #[inline]
    pub(crate) fn finish(&mut self) {
        if let Some(scope) = self.scope.take() {
            scope.finish();
        }
    }
}

impl Drop for Guard {
    #[inline]
    fn drop(&mut self) {
        if let Some(scope) = self.scope.take() {
            scope.abandon(self.polling);
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
