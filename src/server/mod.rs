//! The server side, in request order: [`CancellationLayer`] builds a [`CancellationService`],
//! whose `call` creates the request's scope (or joins the one an outer layer created), puts a
//! [`RequestCancellation`](crate::RequestCancellation) and its token into the extensions, and
//! returns a [`CancellationFuture`] holding the handler's future and the scope's guard. When the
//! handler answers, the guard moves into the response's [`CancellationBody`], which completes the
//! scope at the body's end. Whichever holds the guard when hyper drops it cancels the request:
//! phase `Handler` from the future, phase `Body` from the body.
//!
//! ```text
//! CancellationLayer ──layer──▶ CancellationService ──call──▶ Scope (created or joined)
//!                                                   └──────▶ CancellationFuture { handler, Guard }
//!                                                              └─ answer ─▶ CancellationBody { body, Guard }
//!                                                                             └─ end ─▶ completed
//! dropped early (either one) ─▶ Guard ─▶ cancelled(Disconnected | DeadlineExceeded | Explicit)
//! ```
//!
//! [`DetachedFuture`] is the handler future of a [`detached`](CancellationLayer::detached)
//! service: the handler runs in a task of its own and outlives its client.
//!
//! The types of this module show up in signatures, not in code one writes:
//!
//! ```
//! use std::convert::Infallible;
//!
//! use http::{Request, Response};
//! use tower::{Layer, ServiceExt, service_fn};
//! use tower_cancel::CancellationLayer;
//! use tower_cancel::server::{CancellationBody, CancellationService};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let handler = service_fn(|_: Request<()>| async {
//!     Ok::<_, Infallible>(Response::new(String::from("hello")))
//! });
//! let svc: CancellationService<_> = CancellationLayer::new().layer(handler);
//! let response: Response<CancellationBody<String>> = svc.oneshot(Request::new(())).await.unwrap();
//! assert_eq!(response.status(), 200);
//! # }
//! ```

pub(crate) mod body;
mod detached;
mod end_on_shutdown;
pub(crate) mod future;
mod guard;
mod layer;
mod service;

pub use self::body::CancellationBody;
pub use self::detached::DetachedFuture;
pub use self::end_on_shutdown::{
    EndOnShutdownBody, EndOnShutdownFuture, EndOnShutdownLayer, EndOnShutdownService,
};
pub use self::future::CancellationFuture;
pub use self::layer::CancellationLayer;
pub use self::service::{Attached, CancellationService, Detached};
pub use crate::runtime::handlers::DetachedCounts;
