//! [`UpgradeGuard`]: a request held for its upgraded connection (a WebSocket after its `101`),
//! so that the server's shutdown and the request's deadline still reach it.

use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::event::TARGET;
use crate::handle::RequestCancellation;
use crate::record::CancelReason;
use crate::runtime::shutdown::Draining;
use crate::scope::Scope;

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
/// the [`TaskTracker`](tokio_util::task::TaskTracker) of the outermost
/// [`CancellationLayer`](crate::CancellationLayer) (see
/// [`CancellationLayer::get_task_tracker`](crate::CancellationLayer::get_task_tracker)), so a graceful shutdown
/// that waits on that tracker waits for upgraded connections too.
///
/// Dropping the guard once the response is over completes the request: nothing is cancelled,
/// no callback runs (unless application code cancelled the token: then the request is
/// cancelled with `Explicit`, as at the end of any response). Dropped before the response is
/// over, it only ends the hold, and the response's end completes the request as usual. A task
/// that saw its peer vanish (the connection failed under it) calls
/// [`peer_left`](Self::peer_left) instead, which cancels the request with `Disconnected`. If
/// the client leaves before the response is over, the request is cancelled with
/// `Disconnected` as without a guard.
///
/// The guard runs a small task on the runtime it was created on, stopped when the guard is
/// dropped: it enforces the request's deadline (the layer's `timeout` or a deadline header)
/// and records a token that application code cancelled at once, since nothing else polls an
/// upgraded request.
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
///
/// The guard is the hold: dropping it at once (`cancel.hold_for_upgrade();`) ends it at
/// once, so not using it is a warning:
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// fn handler(cancel: &tower_cancel::RequestCancellation) {
///     cancel.hold_for_upgrade(); // error: unused `Option` that must be used
/// }
/// ```
///
/// # A WebSocket with axum
///
/// Without a guard, the `101 Switching Protocols` ends the response, so the request would
/// complete and the task serving the WebSocket would have no token: shutdown would not reach
/// it, and a graceful shutdown could not wait for it.
///
/// ```toml
/// [dependencies]
/// tower-cancel = { version = "0.1", features = ["axum"] }
/// axum = { version = "0.8", features = ["ws"] }
/// http = "1"
/// tokio = { version = "1", features = ["macros"] }
/// ```
///
/// ```no_run
/// use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
/// use axum::response::{IntoResponse, Response};
/// use tower_cancel::{RequestCancellation, UpgradeGuard};
///
/// async fn ws(upgrade: WebSocketUpgrade, cancel: RequestCancellation) -> Response {
///     let Some(guard) = cancel.hold_for_upgrade() else {
///         return http::StatusCode::SERVICE_UNAVAILABLE.into_response(); // already shutting down
///     };
///     upgrade.on_upgrade(move |socket| session(socket, guard))
/// }
///
/// async fn session(mut socket: WebSocket, guard: UpgradeGuard) {
///     loop {
///         tokio::select! {
///             _ = guard.cancelled() => { // shutdown or deadline
///                 let close = CloseFrame { code: close_code::AWAY, reason: "going away".into() };
///                 let _ = socket.send(Message::Close(Some(close))).await;
///                 return;
///             }
///             message = socket.recv() => match message {
///                 Some(Ok(Message::Close(_))) | None => return, // dropping the guard completes
///                 Some(Ok(message)) => { let _ = socket.send(message).await; }
///                 Some(Err(_)) => return guard.peer_left(),    // `Disconnected`
///             },
///         }
///     }
/// }
/// ```
///
/// `examples/websocket.rs` (axum, `cargo run --example websocket`) serves WebSockets this way;
/// `tests/websocket.rs` runs it as a process with five clients written with Python's
/// `websockets`: on SIGTERM every client received `1001 going away` 2.1–2.4 ms later and the
/// process exited after 7.5 ms. `tests/upgrade.rs` covers each ending over a raw HTTP/1.1
/// upgrade, and two loom models race the end of the response, the guard's drop and the
/// shutdown.
#[must_use = "the request is held only while the guard lives: move it into the connection's task"]
pub struct UpgradeGuard {
    request: RequestCancellation,
    /// The task that enforces the deadline and notices an application cancel while nothing
    /// else polls the request; stopped with the guard.
    watcher: Option<AbortHandle>,
    /// `peer_left` ended the hold already.
    released: bool,
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
        let watcher = watch(scope);
        Some(Self {
            request: request.clone(),
            watcher,
            released: false,
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

    /// Resolves when the server announces its shutdown, before the grace's hard cancel; see
    /// [`RequestCancellation::draining`]. The moment to send a WebSocket close frame `1001`.
    pub fn draining(&self) -> Draining {
        self.request.draining()
    }

    /// The peer vanished (the upgraded connection failed under the task): cancels the
    /// request with `Disconnected` (phase `Upgraded` once the response is over) and ends the
    /// hold.
    pub fn peer_left(mut self) {
        self.released = true;
        self.request.scope_arc().peer_left();
    }
}

impl Drop for UpgradeGuard {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
        if !self.released {
            self.request.scope_arc().release();
        }
    }
}

/// Spawns the task that watches a held request once nothing else polls it: at its deadline it
/// cancels the request with `DeadlineExceeded`, and it records a token that application code
/// cancelled (`Explicit`) at once. It holds the scope weakly. `None`, with an `error` event, if
/// there is no Tokio runtime, or a deadline but no timer.
fn watch(scope: &Arc<Scope>) -> Option<AbortHandle> {
    let Ok(runtime) = Handle::try_current() else {
        tracing::error!(
            target: TARGET,
            "no Tokio runtime: once its response is over, a request held for an upgrade is \
             cancelled only by a shutdown or when its guard is dropped",
        );
        return None;
    };
    let deadline = match scope.deadline() {
        // `sleep_until` panics on a runtime without the time driver.
        Some(at) => match catch_unwind(AssertUnwindSafe(|| {
            let _entered = runtime.enter();
            tokio::time::sleep_until(at)
        })) {
            Ok(sleep) => Some(sleep),
            Err(_) => {
                tracing::error!(
                    target: TARGET,
                    "no Tokio timer is available (no runtime, or its time driver is disabled): \
                     the deadline of a request held for an upgrade is not enforced once its \
                     response is over",
                );
                None
            }
        },
        None => None,
    };
    let token = scope.token().clone();
    let scope = Arc::downgrade(scope);
    let task = runtime.spawn(async move {
        let deadline = async {
            match deadline {
                Some(sleep) => sleep.await,
                None => std::future::pending().await,
            }
        };
        let deadline_passed = token.run_until_cancelled(deadline).await.is_some();
        let Some(scope) = scope.upgrade() else {
            return;
        };
        if deadline_passed {
            scope.cancel(CancelReason::DeadlineExceeded);
        } else {
            scope.notice_token();
        }
    });
    Some(task.abort_handle())
}

impl RequestCancellation {
    /// Holds the request in its scope past its response, for the connection it upgrades to (a
    /// WebSocket): see [`UpgradeGuard`]. Call it in the handler, before the `101` goes out, and
    /// move the guard into the task that serves the upgraded connection; the request ends when
    /// the guard is dropped.
    ///
    /// `None` if the request is no longer running (cancelled, say by a shutdown that began
    /// while the handler ran, or completed) or is already held.
    #[must_use = "the request is held only while the guard lives: move it into the connection's task"]
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
