//! The server side, in request order: [`CancellationLayer`] builds a [`CancellationService`],
//! whose `call` creates the request's scope (or joins the one an outer layer created), puts a
//! [`RequestCancellation`](crate::RequestCancellation) and its token into the extensions, and
//! returns a [`ResponseFuture`] holding the handler's future and the scope's guard. When the
//! handler answers, the guard moves into the response's [`CancellableBody`], which completes the
//! scope at the body's end. Whichever holds the guard when hyper drops it cancels the request:
//! phase `Handler` from the future, phase `Body` from the body.
//!
//! ```text
//! CancellationLayer ──layer──▶ CancellationService ──call──▶ Scope (created or joined)
//!                                                   └──────▶ ResponseFuture { handler, Guard }
//!                                                              └─ answer ─▶ CancellableBody { body, Guard }
//!                                                                             └─ end ─▶ completed
//! dropped early (either one) ─▶ Guard ─▶ cancelled(Disconnected | DeadlineExceeded | Explicit)
//! ```
//!
//! [`Detach`] is the handler future of a [`detached`](CancellationLayer::detached) service: the
//! handler runs in a task of its own and outlives its client.

pub(crate) mod body;
mod detach;
mod future;
mod guard;
mod layer;
mod service;

pub use self::body::CancellableBody;
pub use self::detach::Detach;
pub use self::future::ResponseFuture;
pub use self::layer::CancellationLayer;
pub use self::service::{Attached, CancellationService, Detached};
