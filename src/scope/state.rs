//! The scope's state byte: armed (in the handler, the body, or an upgraded connection),
//! completed, or cancelled with its reason and phase, plus flags saying that something was
//! registered and that the request is held for an upgrade.

use crate::record::{CancelReason, Phase};

pub(super) const ARMED_HANDLER: u8 = 0;
pub(super) const ARMED_BODY: u8 = 1;
pub(super) const COMPLETED: u8 = 2;
/// The response is over, and an [`UpgradeGuard`](crate::UpgradeGuard) holds the request for
/// its upgraded connection (entered only with `HELD` set).
pub(super) const ARMED_UPGRADED: u8 = 3;
/// Set on top of an armed state while an `UpgradeGuard` holds the request: the end of the
/// response moves it to `ARMED_UPGRADED` instead of completing it.
pub(super) const HELD: u8 = 0x20;
/// Set on top of any state once something was added to the callbacks, so that completion
/// knows whether it must take the callbacks' lock (see
/// [`Scope::finish`](super::Scope::finish)).
pub(super) const REGISTERED: u8 = 0x40;
/// Set in every cancelled state; the low bits carry the phase (bits 0–1) and the reason
/// (bits 2–4).
pub(super) const CANCELLED: u8 = 0x80;

/// `Scope::deadline` when the request has none.
pub(super) const NO_DEADLINE: u64 = u64::MAX;

pub(super) fn encode(reason: CancelReason, phase: Phase) -> u8 {
    let reason = match reason {
        CancelReason::Disconnected => 0,
        CancelReason::Shutdown => 1,
        CancelReason::DeadlineExceeded => 2,
        CancelReason::Explicit => 3,
        CancelReason::Panicked => 4,
        CancelReason::SlowClient => 5,
    };
    let phase = match phase {
        Phase::Handler => 0,
        Phase::Body => 1,
        Phase::Upgraded => 2,
    };
    CANCELLED | reason << 2 | phase
}

/// The state without its flags (`REGISTERED`, `HELD`).
pub(super) fn base(state: u8) -> u8 {
    state & !(REGISTERED | HELD)
}

pub(super) fn is_armed(state: u8) -> bool {
    matches!(base(state), ARMED_HANDLER | ARMED_BODY | ARMED_UPGRADED)
}

pub(super) fn is_completed(state: u8) -> bool {
    base(state) == COMPLETED
}

pub(super) fn decode(state: u8) -> Option<(CancelReason, Phase)> {
    let state = base(state);
    if state & CANCELLED == 0 {
        return None;
    }
    let phase = match state & 0b11 {
        0 => Phase::Handler,
        1 => Phase::Body,
        _ => Phase::Upgraded,
    };
    let reason = match (state & !CANCELLED) >> 2 {
        0 => CancelReason::Disconnected,
        1 => CancelReason::Shutdown,
        2 => CancelReason::DeadlineExceeded,
        3 => CancelReason::Explicit,
        4 => CancelReason::Panicked,
        _ => CancelReason::SlowClient,
    };
    Some((reason, phase))
}
