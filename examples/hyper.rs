//! A plain hyper 1 + hyper-util server with its own router and "actions", some of which may be
//! abandoned when the client leaves and some of which must run to the end.
//!
//! Run with: cargo run --example hyper
//!
//! Then, from another terminal:
//!
//! ```text
//! # a cancellable action: give up after 1 s, the loop stops at the next step and cleanup runs
//! curl --max-time 1 'http://127.0.0.1:3000/actions/reindex?steps=20'
//!
//! # a non-cancellable action: give up after 1 s, it still runs all its steps
//! curl --max-time 1 'http://127.0.0.1:3000/actions/charge?steps=8'
//!
//! # let either one finish
//! curl 'http://127.0.0.1:3000/actions/reindex?steps=3'
//! ```
//!
//! Set `PORT` to listen elsewhere.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceBuilder;
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What an action gets to work with.
struct ActionContext {
    steps: u32,
    /// Cancelled when the request is; never cancelled for non-cancellable actions.
    cancel: CancellationToken,
}

/// The application's own abstraction: a named unit of work behind an endpoint.
trait Action: Send + Sync + 'static {
    /// Whether the action may stop when its client leaves.
    fn cancellable(&self) -> bool;

    fn run(&self, ctx: ActionContext) -> BoxFuture<String>;
}

/// Rebuilds an index step by step; pointless to finish if nobody waits for the answer.
struct Reindex;

impl Action for Reindex {
    fn cancellable(&self) -> bool {
        true
    }

    fn run(&self, ctx: ActionContext) -> BoxFuture<String> {
        Box::pin(async move {
            for step in 1..=ctx.steps {
                tokio::select! {
                    _ = ctx.cancel.cancelled() => {
                        println!("reindex: cancelled before step {step}/{}, stopping", ctx.steps);
                        return format!("stopped before step {step}\n");
                    }
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {
                        println!("reindex: step {step}/{} done", ctx.steps);
                    }
                }
            }
            format!("reindexed in {} steps\n", ctx.steps)
        })
    }
}

/// Charges a card; once started it must finish, whether or not the client is still there.
struct Charge;

impl Action for Charge {
    fn cancellable(&self) -> bool {
        false
    }

    fn run(&self, ctx: ActionContext) -> BoxFuture<String> {
        Box::pin(async move {
            for step in 1..=ctx.steps {
                tokio::time::sleep(Duration::from_millis(250)).await;
                println!("charge: step {step}/{} done", ctx.steps);
            }
            println!("charge: committed");
            "charged\n".to_owned()
        })
    }
}

/// The application's router: path → action.
#[derive(Clone)]
struct Router {
    actions: Arc<HashMap<&'static str, Arc<dyn Action>>>,
    /// Actions run in tasks of their own, tracked so that shutdown can wait for them.
    tasks: TaskTracker,
}

impl Router {
    async fn handle(self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        let path = req.uri().path().trim_start_matches("/actions/").to_owned();
        let Some(action) = self.actions.get(path.as_str()).cloned() else {
            let mut res = Response::new(Full::new(Bytes::from("no such action\n")));
            *res.status_mut() = StatusCode::NOT_FOUND;
            return Ok(res);
        };
        let steps = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("steps="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);

        // Inserted by CancellationLayer.
        let rc = req.extensions().get::<RequestCancellation>().unwrap();
        let cancel = if action.cancellable() {
            rc.token().clone()
        } else {
            CancellationToken::new() // nobody cancels this one
        };
        rc.on_cancel(move |c| {
            println!(
                "{path}: handler cleanup ({} during {})",
                c.reason(),
                c.phase()
            )
        });

        // The action runs in its own task: if the client leaves, hyper drops this handler
        // future, but the task goes on; a cancellable action sees its token and stops, a
        // non-cancellable one runs to the end.
        let task = self
            .tasks
            .spawn(action.run(ActionContext { steps, cancel }));
        let body = task
            .await
            .unwrap_or_else(|e| format!("action failed: {e}\n"));
        Ok(Response::new(Full::new(Bytes::from(body))))
    }
}

#[tokio::main]
async fn main() {
    let tasks = TaskTracker::new();
    let mut actions: HashMap<&'static str, Arc<dyn Action>> = HashMap::new();
    actions.insert("reindex", Arc::new(Reindex));
    actions.insert("charge", Arc::new(Charge));
    let router = Router {
        actions: Arc::new(actions),
        tasks: tasks.clone(),
    };

    let layer = CancellationLayer::new().on_cancel(|c: &Cancelled| {
        // Runs after hyper dropped the handler future: the request is fully gone.
        println!(
            "layer: {} {} cancelled after {:?} ({})",
            c.method(),
            c.uri(),
            c.elapsed(),
            c.reason()
        );
    });
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |req| router.clone().handle(req));

    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());
    let listener = TcpListener::bind(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    println!("listening on http://{}", listener.local_addr().unwrap());
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        // A client that vanishes without a word (network gone) is noticed within 10 s: TCP
        // keepalive and TCP_USER_TIMEOUT for HTTP/1.1 (feature `socket2`), PING for HTTP/2.
        tower_cancel::tcp::detect_vanished(&stream, Duration::from_secs(10)).unwrap();
        // A client that closes or resets while its upload is still unread: the kernel says
        // so at once, and the watch drops the request as hyper would.
        let svc = match tower_cancel::tcp::PeerWatch::new(&stream) {
            Ok(watch) => TowerToHyperService::new(watch.service(svc.clone())),
            Err(error) => {
                eprintln!("peer watch: {error}; connection not served");
                continue;
            }
        };
        tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // hyper's HTTP/1.1 header_read_timeout (30 s) only runs with a timer.
            builder.http1().timer(TokioTimer::new());
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5));
            // A client that leaves mid-request ends its connection with an error; that is
            // exactly the case the layer reports, so it is not printed again here.
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
