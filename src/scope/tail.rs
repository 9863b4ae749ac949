//! What runs on after a cancellation: the request's parts still running, and the one moment the
//! last of them stops, when the scope reports how long they ran on.
//!
//! A request has one part for its response (the guard, in the response future and then in the
//! body) and one more per [`detached`](crate::CancellationLayer::detached) handler task. The
//! response part ends when the guard finishes or is dropped; a detached task's part ends when
//! its handler returns or the task is dropped. Kept under the scope's lock beside the
//! callbacks; nothing here is touched by a request that is never cancelled, except that a
//! detached handler counts its task in and out, and a request held for an upgrade counts its
//! hold in and out (and marks its response over, in `finish`).

use std::time::Duration;

use crate::event::{TARGET, request_event};
use crate::runtime::metrics;
use crate::scope::Scope;

/// How a part of the request stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// Dropped before its end: hyper dropped the handler future or the response body (the
    /// work stopped at its last `.await`), or a detached task's runtime shut down.
    Dropped,
    /// Ran to its end: the handler returned and the response body (if the guard was in it)
    /// reached its end or failed.
    Ended,
}

impl Stopped {
    /// `"dropped"` or `"ended"`, as the events say it.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Dropped => "dropped",
            Self::Ended => "ended",
        }
    }
}

#[derive(Default, Debug)]
pub(super) struct Tail {
    /// Detached handler tasks still running.
    detached: u16,
    /// The response part is over: its guard finished or was dropped.
    response_over: bool,
    /// How the part that stopped last did.
    last: Option<Stopped>,
    /// The report was made (or taken by the cancellation itself).
    reported: bool,
}

impl Tail {
    /// A detached handler task starts: the request is not over until it stops.
    pub(super) fn detach(&mut self) {
        self.detached = self.detached.saturating_add(1);
    }

    /// The response part stopped. Returns how the request stopped if it is now over and was
    /// cancelled (`cancelled`: its cancellation was recorded), once.
    pub(super) fn response_stopped(&mut self, how: Stopped, cancelled: bool) -> Option<Stopped> {
        if self.response_over {
            return None;
        }
        self.response_over = true;
        self.last = Some(how);
        self.report(cancelled)
    }

    /// A detached handler task stopped; as [`response_stopped`](Self::response_stopped).
    pub(super) fn detached_stopped(&mut self, how: Stopped, cancelled: bool) -> Option<Stopped> {
        self.detached = self.detached.saturating_sub(1);
        self.last = Some(how);
        self.report(cancelled)
    }

    /// The cancellation is being recorded: returns how the request stopped if every part had
    /// stopped already (a drop that is the cancellation, or an end that raced it), in which
    /// case nothing ran on and the cancellation makes the one report.
    pub(super) fn cancelling(&mut self) -> Option<Stopped> {
        self.report(true)
    }

    /// For the tests: whether the response is over, the detached tasks still running, and
    /// whether the report was made.
    #[cfg(test)]
    pub(super) fn state(&self) -> (bool, u16, bool) {
        (self.response_over, self.detached, self.reported)
    }

    fn report(&mut self, cancelled: bool) -> Option<Stopped> {
        if !cancelled || self.reported || !self.response_over || self.detached > 0 {
            return None;
        }
        self.reported = true;
        self.last
    }
}

impl Scope {
    /// The response part of the request (its guard) finished or was dropped after the
    /// cancellation began; reports how long the work ran on if nothing else still runs.
    pub(super) fn response_stopped(&self, how: Stopped) {
        let report = {
            let mut callbacks = self.callbacks();
            let cancelled_after = callbacks.elapsed();
            let stopped = callbacks
                .tail
                .response_stopped(how, cancelled_after.is_some());
            stopped.zip(cancelled_after)
        };
        if let Some((how, cancelled_after)) = report {
            self.report_stopped(how, cancelled_after);
        }
    }

    /// A detached handler task starts, on a runtime: the request's work is not over until the
    /// task stops too ([`detached_stopped`](Self::detached_stopped)).
    pub(crate) fn detach(&self) {
        self.callbacks().tail.detach();
    }

    /// A detached handler task returned (`Ended`) or was dropped (`Dropped`).
    pub(crate) fn detached_stopped(&self, how: Stopped) {
        let report = {
            let mut callbacks = self.callbacks();
            let cancelled_after = callbacks.elapsed();
            let stopped = callbacks
                .tail
                .detached_stopped(how, cancelled_after.is_some());
            stopped.zip(cancelled_after)
        };
        if let Some((how, cancelled_after)) = report {
            self.report_stopped(how, cancelled_after);
        }
    }

    /// The last part of a cancelled request stopped now, `cancelled_after` the start: reports
    /// how long it ran on after the cancellation. Once per cancelled request.
    fn report_stopped(&self, how: Stopped, cancelled_after: Duration) {
        // Recorded before `elapsed` was set, which the caller saw.
        let Some((reason, phase)) = self.cancellation() else {
            return;
        };
        let ran = self.started.elapsed().saturating_sub(cancelled_after);
        metrics::ran_after_cancel(reason, phase, ran);
        if tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
            let cancelled = self.cancelled(reason, phase, cancelled_after);
            self.span().in_scope(|| {
                request_event!(
                    debug,
                    cancelled,
                    phase = %phase,
                    ran_after_cancel = ?ran,
                    stopped = how.as_str(),
                    "cancelled request stopped",
                );
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_that_cancels_is_reported_by_the_cancellation() {
        let mut tail = Tail::default();
        assert_eq!(tail.response_stopped(Stopped::Dropped, false), None);
        assert_eq!(tail.cancelling(), Some(Stopped::Dropped));
        assert_eq!(tail.cancelling(), None, "once");
    }

    #[test]
    fn work_that_runs_on_is_reported_when_it_stops() {
        let mut tail = Tail::default();
        assert_eq!(tail.cancelling(), None);
        assert_eq!(
            tail.response_stopped(Stopped::Ended, true),
            Some(Stopped::Ended)
        );
        assert_eq!(tail.response_stopped(Stopped::Dropped, true), None, "once");
    }

    #[test]
    fn a_detached_handler_is_waited_for() {
        let mut tail = Tail::default();
        tail.detach();
        // The client leaves: the response future is dropped, the handler task runs on.
        assert_eq!(tail.response_stopped(Stopped::Dropped, false), None);
        assert_eq!(tail.cancelling(), None);
        assert_eq!(
            tail.detached_stopped(Stopped::Ended, true),
            Some(Stopped::Ended)
        );
        assert_eq!(tail.cancelling(), None);
    }

    #[test]
    fn a_detached_handler_that_returned_before_the_cancellation_is_not_waited_for() {
        let mut tail = Tail::default();
        tail.detach();
        assert_eq!(tail.detached_stopped(Stopped::Ended, false), None);
        // Cancelled while the body streams, then the body is dropped.
        assert_eq!(tail.cancelling(), None);
        assert_eq!(
            tail.response_stopped(Stopped::Dropped, true),
            Some(Stopped::Dropped)
        );
    }

    #[test]
    fn nothing_is_reported_without_a_cancellation() {
        let mut tail = Tail::default();
        tail.detach();
        assert_eq!(tail.detached_stopped(Stopped::Ended, false), None);
        assert_eq!(tail.response_stopped(Stopped::Ended, false), None);
    }
}
