//! What runs when a scope is cancelled, besides its creator's callbacks: the handler's
//! registrations and the layers deeper in the stack that joined. Drained exactly once.

use std::time::Duration;

use crate::record::Cancelled;
use crate::runtime::shutdown::Registration;
use crate::scope::config::Bound;
use crate::scope::tail::Tail;

pub(crate) type HandlerCallback = Box<dyn FnOnce(&Cancelled) + Send>;

pub(super) struct Callbacks {
    /// Set once the scope left the armed state and the lists were drained.
    pub(super) closed: bool,
    /// Once cancelled: the time from start to cancellation, in nanoseconds, for late
    /// registrations (`NOT_YET` before; 8 bytes where an `Option<Duration>` takes 16).
    elapsed: u64,
    /// Allocated by the first registration: most requests have none, and two empty `Vec`s
    /// would cost every request 48 bytes.
    lists: Option<Box<Lists>>,
    /// What still runs of the request, for the report of how long it ran on after a
    /// cancellation (in the padding of the fields above: it costs no space).
    pub(super) tail: Tail,
}

#[derive(Default)]
pub(super) struct Lists {
    /// The handler's `on_cancel` registrations, in registration order.
    pub(super) handler: Vec<HandlerCallback>,
    /// Layers deeper in the stack that joined this scope, outermost first.
    pub(super) joined: Vec<Joined>,
}

impl Default for Callbacks {
    fn default() -> Self {
        Self {
            closed: false,
            elapsed: Self::NOT_YET,
            lists: None,
            tail: Tail::default(),
        }
    }
}

impl Callbacks {
    const NOT_YET: u64 = u64::MAX;

    /// The time from start to cancellation, once cancelled.
    pub(super) fn elapsed(&self) -> Option<Duration> {
        (self.elapsed != Self::NOT_YET).then(|| Duration::from_nanos(self.elapsed))
    }

    /// Records the time from start to cancellation (saturating far beyond any real request).
    pub(super) fn set_elapsed(&mut self, elapsed: Duration) {
        self.elapsed = u64::try_from(elapsed.as_nanos())
            .map_or(Self::NOT_YET - 1, |n| n.min(Self::NOT_YET - 1));
    }

    /// The layers that joined, while the scope is armed (the lists are taken when it ends).
    pub(super) fn joined(&self) -> &[Joined] {
        self.lists.as_deref().map_or(&[], |lists| &lists.joined)
    }

    pub(super) fn lists(&mut self) -> &mut Lists {
        self.lists.get_or_insert_with(Box::default)
    }

    /// Closes the registry and takes what was registered.
    pub(super) fn close(&mut self) -> Lists {
        self.closed = true;
        self.lists.take().map(|lists| *lists).unwrap_or_default()
    }
}

/// A deeper layer that joined the scope, and its shutdown registration if it has a token.
pub(super) struct Joined {
    pub(super) bound: Bound,
    pub(super) registration: Option<Registration>,
}

/// What a late registration finds.
pub(super) enum Late {
    Cancelled(Cancelled),
    Completed,
}
