//! [`UpgradeGuard`]: a request held for its upgraded connection (a WebSocket after its `101`),
//! so that the server's shutdown and the request's deadline still reach it.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::event::TARGET;
use crate::handle::RequestCancellation;
use crate::record::CancelReason;

/// Holds a request in its cancellation scope after its response, for the connection it
/// upgraded to: a WebSocket, or any protocol after `101 Switching Protocols`. Get one from
/// [`RequestCancellation::hold_for_upgrade`] before the response goes out, and move it into
/// the task that serves the upgraded connection.
///
/// While the guard lives, the request is not over: the layer's shutdown token and the
/// request's deadline still cancel it (reason `Shutdown` or `DeadlineExceeded`, phase
/// [`Upgraded`](crate::Phase::Upgraded)), its callbacks run then, and its token is cancelled,
/// so the task learns of it through [`cancelled`](Self::cancelled) and can close the
/// connection properly (a WebSocket close frame `1001 going away`). The guard is counted by
/// the layer's [`TaskTracker`](tokio_util::task::TaskTracker) (see
/// [`CancellationLayer::tracker`](crate::CancellationLayer::tracker)), so a graceful shutdown
/// that waits on the tracker waits for upgraded connections too.
///
/// Dropping the guard completes the request: nothing is cancelled, no callback runs. A task
/// that saw its peer vanish (the connection failed under it) calls
/// [`peer_left`](Self::peer_left) instead, which cancels the request with `Disconnected`.
/// If the client leaves before the response is over, the request is cancelled with
/// `Disconnected` as without a guard.
///
/// With a deadline (the layer's `timeout` or a deadline header), the guard runs a timer task
/// for it on the runtime it was created on, stopped when the guard is dropped.
///
/// ```
/// use tower_cancel::{CancelReason, RequestCancellation, UpgradeGuard};
///
/// // In the handler, before returning the `101`:
/// fn hold(cancel: &RequestCancellation) -> Option<UpgradeGuard> {
///     cancel.hold_for_upgrade() // `None`: the request is no longer running
/// }
///
/// // In the task that serves the upgraded connection:
/// async fn serve(guard: UpgradeGuard) {
///     tokio::select! {
///         reason = guard.cancelled() => {
///             // Shutdown or deadline: close the connection with a code that says why.
///             let _ = reason;
///         }
///         () = std::future::pending::<()>() => {} // the connection's own work
///     }
///     // Dropping the guard ends the request.
/// }
/// ```
pub struct UpgradeGuard {
    request: RequestCancellation,
    timer: Option<AbortHandle>,
    _tracked: TaskTrackerToken,
}

impl UpgradeGuard {
    /// Holds `request` if it is armed and not held yet.
    pub(crate) fn hold(request: &RequestCancellation) -> Option<Self> {
        let scope = request.scope_arc();
        if !scope.hold() {
            return None;
        }
        let tracked = scope.tracker().token();
        let timer = scope.deadline().and_then(|deadline| {
            let Ok(runtime) = Handle::try_current() else {
                tracing::error!(
                    target: TARGET,
                    "no Tokio runtime: the deadline of a request held for an upgrade is not \
                     enforced once its response is over",
                );
                return None;
            };
            let scope = Arc::downgrade(scope);
            let timer = runtime.spawn(async move {
                tokio::time::sleep_until(deadline).await;
                if let Some(scope) = scope.upgrade() {
                    scope.cancel(CancelReason::DeadlineExceeded);
                }
            });
            Some(timer.abort_handle())
        });
        Some(Self {
            request: request.clone(),
            timer,
            _tracked: tracked,
        })
    }

    /// The request this guard holds.
    pub fn request(&self) -> &RequestCancellation {
        &self.request
    }

    /// The request's token: cancelled when the request is.
    pub fn token(&self) -> &CancellationToken {
        self.request.token()
    }

    /// Waits until the request is cancelled, and says why; see
    /// [`RequestCancellation::cancelled`].
    pub fn cancelled(&self) -> impl Future<Output = CancelReason> + Send + '_ {
        self.request.cancelled()
    }

    /// The peer vanished (the upgraded connection failed under the task): cancels the
    /// request with `Disconnected`, phase `Upgraded`, and ends the hold.
    pub fn peer_left(self) {
        self.request.client_left();
    }
}

impl Drop for UpgradeGuard {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
        self.request.scope_arc().release();
    }
}

impl RequestCancellation {
    /// Holds the request in its scope past its response, for the connection it upgrades to (a
    /// WebSocket): see [`UpgradeGuard`]. Call it in the handler, before the `101` goes out, and
    /// move the guard into the task that serves the upgraded connection; the request ends when
    /// the guard is dropped.
    ///
    /// `None` if the request is no longer running (cancelled, say by a shutdown that began
    /// while the handler ran, or completed) or is already held.
    pub fn hold_for_upgrade(&self) -> Option<UpgradeGuard> {
        UpgradeGuard::hold(self)
    }
}

impl fmt::Debug for UpgradeGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpgradeGuard")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}
