//! The scope's state byte: armed (in the handler or the body), completed, or cancelled with
//! its reason and phase, plus a flag saying that something was registered.

use crate::record::{CancelReason, Phase};

pub(super) const ARMED_HANDLER: u8 = 0;
pub(super) const ARMED_BODY: u8 = 1;
pub(super) const COMPLETED: u8 = 2;
/// Set on top of any state once something was added to the callbacks, so that completion
/// knows whether it must take the callbacks' lock (see
/// [`Scope::finish`](super::Scope::finish)).
pub(super) const REGISTERED: u8 = 0x40;
/// Set in every cancelled state; the low bits carry the phase (bit 0) and the reason.
pub(super) const CANCELLED: u8 = 0x80;

/// `Scope::deadline` when the request has none.
pub(super) const NO_DEADLINE: u64 = u64::MAX;

pub(super) fn encode(reason: CancelReason, phase: Phase) -> u8 {
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

pub(super) fn is_armed(state: u8) -> bool {
    let state = state & !REGISTERED;
    state == ARMED_HANDLER || state == ARMED_BODY
}

pub(super) fn is_completed(state: u8) -> bool {
    state & !REGISTERED == COMPLETED
}

pub(super) fn decode(state: u8) -> Option<(CancelReason, Phase)> {
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
