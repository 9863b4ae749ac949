//! The crate's `tracing` events: one target, and one way to name the request an event is about.

/// The target of every event the crate emits (filter with `tower_cancel=debug`).
pub(crate) const TARGET: &str = "tower_cancel";

/// An event about one request's cancellation, carrying its `reason`, `method` and `path`
/// before the other fields and the message:
/// `request_event!(warn, cancelled, limit = 4, "refused")`.
macro_rules! request_event {
    ($level:ident, $cancelled:expr, $($rest:tt)+) => {{
        let cancelled: &$crate::record::Cancelled = &$cancelled;
        tracing::$level!(
            target: $crate::event::TARGET,
            reason = %cancelled.reason(),
            method = %cancelled.method(),
            path = cancelled.uri().path(),
            $($rest)+
        )
    }};
}

pub(crate) use request_event;
