//! The handler every server process serves, and the two ways it is served: with hyper alone
//! ("bare") or behind tower-cancel's layers ("layered"), each with its counters.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_cancel::request_body::IdleTimeout;
use tower_cancel::{CancellationLayer, Cancelled, RequestBodyLayer};

use crate::child::Config;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type AppBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;
pub(crate) type Route = BoxCloneService<Request<Incoming>, Response<AppBody>, Infallible>;

/// Boxes a service's response bodies (the layers wrap them in types of their own).
fn boxed<S, B>(svc: S) -> Route
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    BoxCloneService::new(
        svc.map_response(|r: Response<B>| r.map(|b| b.map_err(Into::into).boxed())),
    )
}

/// What the handlers and the accept loop saw.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) counts: Mutex<BTreeMap<String, u64>>,
    pub(crate) live: AtomicU64,
    pub(crate) conns: AtomicU64,
}

impl Counters {
    pub(crate) fn add(&self, key: &str, n: u64) {
        *self
            .counts
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_default() += n;
    }

    pub(crate) fn max(&self, key: &str, now: u64) {
        let mut counts = self.counts.lock().unwrap();
        let max = counts.entry(key.to_owned()).or_default();
        *max = (*max).max(now);
    }
}

/// A handler alive: counted from its first poll until it returns or is dropped.
struct Live {
    counters: Arc<Counters>,
    finished: bool,
}

impl Live {
    fn new(counters: &Arc<Counters>) -> Self {
        counters.add("started", 1);
        let now = counters.live.fetch_add(1, Ordering::SeqCst) + 1;
        counters.max("max_live", now);
        Self {
            counters: Arc::clone(counters),
            finished: false,
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.counters.live.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            self.counters.add("dropped", 1);
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// The one handler, bare or behind the layers: `…/wait[?wait=ms]` never reads its body and
/// answers after `ms` (60 s by default) or once its request is cancelled; `…/slow` takes 20 s
/// whatever happens; `…/read[?wait=ms]` reads its whole body (after `ms`); anything else
/// answers at once.
async fn handle<B>(req: Request<B>, counters: Arc<Counters>) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let mut live = Live::new(&counters);
    let path = req.uri().path().to_owned();
    // Behind the layers, a handler stops when its request is cancelled, as handlers that use
    // tower-cancel do; bare, it has no token and waits its whole time.
    let token = req.extensions().get::<CancellationToken>().cloned();
    let cancelled = async {
        match &token {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let wait = req.uri().query().and_then(|q| q.strip_prefix("wait="));
    let wait = wait
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis);
    let response = if path.ends_with("/wait") {
        tokio::select! {
            () = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(60))) => {}
            () = cancelled => counters.add("stopped", 1),
        }
        text(StatusCode::OK, "late".into())
    } else if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_secs(20)).await;
        text(StatusCode::OK, "slow".into())
    } else if path.ends_with("/read") {
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        match req.into_body().collect().await {
            Ok(body) => {
                let len = body.to_bytes().len();
                counters.add("read_ok", 1);
                if declared.is_some_and(|declared| declared != len) {
                    counters.add("wrong_size", 1);
                }
                text(StatusCode::OK, format!("{len} bytes"))
            }
            Err(error) => {
                let error: BoxError = error.into();
                if IdleTimeout::find(&*error).is_some() {
                    counters.add("read_timeout", 1);
                    text(StatusCode::REQUEST_TIMEOUT, error.to_string())
                } else {
                    counters.add("read_error", 1);
                    text(StatusCode::BAD_REQUEST, error.to_string())
                }
            }
        }
    } else {
        text(StatusCode::OK, "ok".into())
    };
    live.finished = true;
    response
}

/// [`handle`] as a service, for any request body.
fn handler<B>(
    counters: &Arc<Counters>,
) -> impl tower::Service<
    Request<B>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>>
             + Send
             + 'static,
> + Clone
+ Send
+ 'static
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let c = Arc::clone(counters);
    service_fn(move |req: Request<B>| {
        let c = Arc::clone(&c);
        async move { Ok::<_, Infallible>(handle(req, c).await) }
    })
}

/// The server's accounting, one `key=value` list: what the stats listener answers.
pub(crate) type Report = Box<dyn Fn() -> String + Send + Sync>;

pub(crate) fn bare(counters: &Arc<Counters>) -> (Route, Report) {
    (boxed(handler(counters)), Box::new(String::new))
}

pub(crate) fn layered(config: Config, counters: &Arc<Counters>) -> (Route, Report) {
    let c = Arc::clone(counters);
    let on_cancel = move |cancelled: &Cancelled| {
        c.add(cancelled.reason().as_str(), 1);
        c.add("cancelled", 1);
    };
    // Stands for a cleanup that does I/O: exercises the bounded cleanup queue.
    let cleanup = |_: Cancelled| tokio::time::sleep(Duration::from_millis(1));
    let cancel = CancellationLayer::new()
        .on_cancel(on_cancel.clone())
        .on_cancel_async(cleanup);
    let detached = CancellationLayer::new()
        .on_cancel(on_cancel)
        .on_cancel_async(cleanup)
        .detached()
        .detached_limit(config.detached_limit);
    let mut read_ahead = RequestBodyLayer::new()
        .read_ahead(config.read_ahead)
        .read_ahead_total(config.total);
    let mut plain = RequestBodyLayer::new();
    if let Some(ms) = config.idle_ms {
        read_ahead = read_ahead.idle_timeout(Duration::from_millis(ms));
        plain = plain.idle_timeout(Duration::from_millis(ms));
    }
    let ra = boxed(
        ServiceBuilder::new()
            .layer(cancel.clone())
            .layer(read_ahead.clone())
            .service(handler(counters)),
    );
    let no_ra = boxed(
        ServiceBuilder::new()
            .layer(cancel.clone())
            .layer(plain)
            .service(handler(counters)),
    );
    let det = boxed(
        ServiceBuilder::new()
            .layer(detached.clone())
            .service(handler(counters)),
    );
    let route = BoxCloneService::new(service_fn(move |req: Request<Incoming>| {
        let path = req.uri().path();
        let route = if path.starts_with("/ra/") {
            ra.clone()
        } else if path.starts_with("/detached/") {
            det.clone()
        } else {
            no_ra.clone()
        };
        route.oneshot(req)
    }));
    let report = move || {
        let (cleanups, det_cleanups) = (cancel.cleanup_counts(), detached.cleanup_counts());
        let running = detached.detached_counts();
        format!(
            "held={} peak={} det_running={} det_refused={} cl_running={} cl_queued={} \
             cl_refused={} cl_completed={}",
            read_ahead.read_ahead_held(),
            read_ahead.read_ahead_peak(),
            running.running,
            running.refused,
            cleanups.running + det_cleanups.running,
            cleanups.queued + det_cleanups.queued,
            cleanups.refused + det_cleanups.refused,
            cleanups.completed + det_cleanups.completed,
        )
    };
    (route, Box::new(report))
}
