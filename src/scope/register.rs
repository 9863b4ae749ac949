//! Adding to a scope while it runs: the handler's callbacks ([`Scope::on_cancel`]) and the
//! layers deeper in the stack that join it ([`Scope::join`]), and what happens to the
//! registrations when the request completes instead.

use std::sync::{Arc, Weak};

use crate::loom::atomic::Ordering;
use crate::record::CancelReason;
use crate::runtime::callback::contain;
use crate::runtime::deadline::TimeLimit;
use crate::runtime::shutdown::InFlight;
use crate::scope::callbacks::{Callbacks, HandlerCallback, Joined, Late, Lists};
use crate::scope::config::Bound;
use crate::scope::state::{REGISTERED, is_completed};
use crate::scope::{Scope, nanos};

impl Scope {
    /// Registers a handler callback: runs on cancellation, at once if already cancelled, never
    /// if the request completes.
    /// A token that application code cancelled, and the layer has not noticed yet, does not
    /// count as cancelled here: the callback is registered, and runs when the layer records the
    /// `Explicit` cancellation (nothing runs on the caller's thread but this callback).
    pub(crate) fn on_cancel(&self, callback: HandlerCallback) {
        let late = {
            let mut callbacks = self.callbacks();
            if !callbacks.closed {
                callbacks.lists().handler.push(callback);
                let completed = self.flag_registered();
                drop(callbacks);
                if completed {
                    self.drop_registrations();
                }
                return;
            }
            self.late(&callbacks)
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
            let mut callbacks = self.callbacks();
            if !callbacks.closed {
                let registration = bound
                    .config()
                    .register(Arc::downgrade(self) as Weak<dyn InFlight>)
                    .unwrap_or_else(|_| {
                        shutting_down = true;
                        None
                    });
                callbacks.lists().joined.push(Joined {
                    bound,
                    registration,
                });
                completed = self.flag_registered();
                None
            } else {
                Some((self.late(&callbacks), bound))
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
                let owner = &self.creator;
                self.span()
                    .in_scope(|| bound.run(&cancelled, self.span(), owner));
            }
            Some((Late::Completed, _)) => {}
        }
    }

    /// Leaves the shutdown registries: the scope is no longer armed.
    pub(super) fn deregister(&self, joined: &[Joined]) {
        self.creator.deregister(self.registration.take());
        for layer in joined {
            layer.bound.config().deregister(layer.registration);
        }
    }

    fn late(&self, callbacks: &Callbacks) -> Late {
        match (callbacks.elapsed(), self.cancellation()) {
            (Some(elapsed), Some((reason, phase))) => {
                Late::Cancelled(self.cancelled(reason, phase, elapsed))
            }
            _ => Late::Completed,
        }
    }

    /// After completion: drops the registrations (outside the lock); joined layers leave their
    /// shutdown registries. They will never run, and a closure holding a handle to this scope would
    /// otherwise keep it alive.
    pub(super) fn drop_registrations(&self) {
        let Lists { handler, joined } = self.callbacks().close();
        for layer in &joined {
            layer.bound.config().deregister(layer.registration);
        }
        drop((handler, joined));
    }

    /// Called after adding to the callbacks: flags the state, and returns whether the request
    /// had completed meanwhile, in which case its `finish` may not have seen the addition and
    /// the caller must drop the registrations (see [`Scope::finish`]).
    fn flag_registered(&self) -> bool {
        is_completed(self.state.fetch_or(REGISTERED, Ordering::AcqRel))
    }
}
