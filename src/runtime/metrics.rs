//! The crate's metrics, on the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`):
//! what the layer's docs list, recorded only on the paths a cancellation takes.
//!
//! Without the feature every function here is empty, so callers need no `cfg`. Label values are
//! the `as_str` names of [`CancelReason`] and [`Phase`] and the cleanup outcomes: a fixed, small
//! set (no path, no method), so that no label can grow without bound.

// Without the feature, the names are only documentation.
#![cfg_attr(not(feature = "metrics"), allow(dead_code))]

use std::time::Duration;

use crate::record::{CancelReason, Phase};

/// Counter: requests cancelled, labelled `reason` and `phase`.
pub(crate) const CANCELLATIONS: &str = "tower_cancel_cancellations_total";
/// Counter: async cleanups by `outcome`: `run`, `refused` or `overrun`.
pub(crate) const CLEANUPS: &str = "tower_cancel_cleanups_total";
/// Counter: requests to a detached route refused (503) because its layer's detached handlers
/// were all running.
pub(crate) const DETACHED_REFUSED: &str = "tower_cancel_detached_refused_total";
/// Histogram, in seconds: how long a cancelled request's work ran on after its cancellation,
/// labelled `reason` and `phase`.
pub(crate) const RAN_AFTER_CANCEL: &str = "tower_cancel_ran_after_cancel_seconds";

/// What became of an async cleanup, as the `outcome` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cleanup {
    /// It ran to its end (or panicked, which is reported).
    Run,
    /// The queue was full, or its runtime shut down before it finished.
    Refused,
    /// A drain ran out of time while it was still running or queued.
    Overrun,
}

impl Cleanup {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Run => "run",
            Self::Refused => "refused",
            Self::Overrun => "overrun",
        }
    }
}

/// Tells the recorder installed now what the metrics mean (unit and help text), for exporters
/// that print it (Prometheus' `# HELP`). Called when a layer is built.
pub(crate) fn describe() {
    #[cfg(feature = "metrics")]
    {
        use ::metrics::Unit;
        ::metrics::describe_counter!(
            CANCELLATIONS,
            Unit::Count,
            "Requests cancelled, by why (reason) and where they were (phase)."
        );
        ::metrics::describe_counter!(
            CLEANUPS,
            Unit::Count,
            "Async cancellation cleanups that ran, were refused (queue full, runtime gone) or \
             were still unfinished when a drain ran out of time (overrun)."
        );
        ::metrics::describe_counter!(
            DETACHED_REFUSED,
            Unit::Count,
            "Requests to a detached route refused with 503 because as many detached handlers as \
             the layer's limit were still running."
        );
        ::metrics::describe_histogram!(
            RAN_AFTER_CANCEL,
            Unit::Seconds,
            "How long a cancelled request's handler or response body ran on after the \
             cancellation, until it returned, ended or was dropped (0 when dropped at once)."
        );
    }
}

/// A request was cancelled (once per request, by the winner of the cancellation).
#[inline]
pub(crate) fn cancelled(reason: CancelReason, phase: Phase) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(CANCELLATIONS, "reason" => reason.as_str(), "phase" => phase.as_str())
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (reason, phase);
}

/// A cancelled request's work stopped, `ran` after its cancellation (once per request).
#[inline]
pub(crate) fn ran_after_cancel(reason: CancelReason, phase: Phase, ran: Duration) {
    #[cfg(feature = "metrics")]
    ::metrics::histogram!(RAN_AFTER_CANCEL, "reason" => reason.as_str(), "phase" => phase.as_str())
        .record(ran);
    #[cfg(not(feature = "metrics"))]
    let _ = (reason, phase, ran);
}

/// An async cleanup ran, was refused, or overran a drain.
#[inline]
pub(crate) fn cleanup(outcome: Cleanup) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(CLEANUPS, "outcome" => outcome.as_str()).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}

/// A request to a detached route was refused: the layer's detached handlers were all running.
#[inline]
pub(crate) fn detached_refused() {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(DETACHED_REFUSED).increment(1);
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use ::metrics::Unit;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use metrics_util::{CompositeKey, MetricKind};

    use super::*;

    fn key(
        kind: MetricKind,
        name: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> CompositeKey {
        let labels: Vec<::metrics::Label> = labels
            .iter()
            .map(|&(k, v)| ::metrics::Label::new(k, v))
            .collect();
        CompositeKey::new(kind, ::metrics::Key::from_parts(name, labels))
    }

    #[test]
    fn names_labels_and_units() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        ::metrics::with_local_recorder(&recorder, || {
            describe();
            cancelled(CancelReason::DeadlineExceeded, Phase::Body);
            cancelled(CancelReason::DeadlineExceeded, Phase::Body);
            ran_after_cancel(
                CancelReason::Shutdown,
                Phase::Handler,
                Duration::from_millis(250),
            );
            cleanup(Cleanup::Refused);
            detached_refused();
        });
        let snapshot = snapshotter.snapshot().into_hashmap();
        let cancellations = key(
            MetricKind::Counter,
            CANCELLATIONS,
            &[("reason", "deadline_exceeded"), ("phase", "body")],
        );
        let (unit, description, value) = &snapshot[&cancellations];
        assert_eq!(*unit, Some(Unit::Count));
        assert!(description.is_some());
        assert_eq!(*value, DebugValue::Counter(2));
        let ran = key(
            MetricKind::Histogram,
            RAN_AFTER_CANCEL,
            &[("reason", "shutdown"), ("phase", "handler")],
        );
        let (unit, _, value) = &snapshot[&ran];
        assert_eq!(*unit, Some(Unit::Seconds));
        assert_eq!(*value, DebugValue::Histogram(vec![0.25.into()]));
        let refused = key(MetricKind::Counter, CLEANUPS, &[("outcome", "refused")]);
        assert_eq!(snapshot[&refused].2, DebugValue::Counter(1));
        let detached = key(MetricKind::Counter, DETACHED_REFUSED, &[]);
        assert_eq!(snapshot[&detached].0, Some(Unit::Count));
        assert_eq!(snapshot[&detached].2, DebugValue::Counter(1));
        assert_eq!(snapshot.len(), 4, "{snapshot:#?}");
    }
}
