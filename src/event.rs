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

/// Whether an event of the crate at `level` would be recorded (a subscriber is interested).
pub(crate) fn enabled(level: tracing::Level) -> bool {
    match level {
        tracing::Level::ERROR => tracing::enabled!(target: TARGET, tracing::Level::ERROR),
        tracing::Level::WARN => tracing::enabled!(target: TARGET, tracing::Level::WARN),
        tracing::Level::INFO => tracing::enabled!(target: TARGET, tracing::Level::INFO),
        tracing::Level::DEBUG => tracing::enabled!(target: TARGET, tracing::Level::DEBUG),
        tracing::Level::TRACE => tracing::enabled!(target: TARGET, tracing::Level::TRACE),
    }
}

/// [`request_event!`] at a level chosen at run time (a `tracing` callsite has a fixed level:
/// one per level).
macro_rules! request_event_at {
    ($level:expr, $cancelled:expr, $($rest:tt)+) => {{
        match $level {
            tracing::Level::ERROR => $crate::event::request_event!(error, $cancelled, $($rest)+),
            tracing::Level::WARN => $crate::event::request_event!(warn, $cancelled, $($rest)+),
            tracing::Level::INFO => $crate::event::request_event!(info, $cancelled, $($rest)+),
            tracing::Level::DEBUG => $crate::event::request_event!(debug, $cancelled, $($rest)+),
            tracing::Level::TRACE => $crate::event::request_event!(trace, $cancelled, $($rest)+),
        }
    }};
}

pub(crate) use request_event_at;
