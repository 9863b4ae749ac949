//! The server process. The test binary re-runs itself (test `server_process`) with
//! [`ENV`] set to a [`Config`]: "bare" serves the handler with hyper alone, "layered" the same
//! handler behind tower-cancel's layers. It serves on 127.0.0.1:0 (hyper-util's `auto`
//! builder, as configured in the README: no timer, hyper's defaults), prints its ports, counts
//! what happens (every panic through a hook, handlers alive, cancellations by reason, the
//! layers' own accounting) and answers those counts on a second listener, outside the layers.
//! It exits when its stdin closes (the parent test ended, however it ended).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::app::{self, Counters};

/// The environment variable that makes the test binary a server process.
pub(crate) const ENV: &str = "TOWER_CANCEL_ATTACK_SERVER";

/// What a server process runs. The layered one routes `/ra/…` through a `RequestBodyLayer`
/// with read-ahead, `/detached/…` through a detached `CancellationLayer`, anything else
/// through a `RequestBodyLayer` without read-ahead; the bare one serves every path with the
/// same handler, no layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub(crate) layered: bool,
    /// `RequestBodyLayer::read_ahead` and `read_ahead_total` of the `/ra/` routes.
    pub(crate) read_ahead: usize,
    pub(crate) total: usize,
    /// `RequestBodyLayer::idle_timeout` of every route, in milliseconds.
    pub(crate) idle_ms: Option<u64>,
    /// `detached_limit` of the `/detached/` routes.
    pub(crate) detached_limit: usize,
    /// Each connection of the layered server watched by `tcp::PeerWatch`.
    pub(crate) peer_watch: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            layered: true,
            read_ahead: 1 << 20,
            total: 4 << 20,
            idle_ms: None,
            detached_limit: 256,
            peer_watch: false,
        }
    }
}

impl Config {
    pub(crate) fn bare(self) -> Self {
        Self {
            layered: false,
            ..self
        }
    }

    pub(crate) fn encode(&self) -> String {
        let kind = if self.layered { "layered" } else { "bare" };
        let idle = self.idle_ms.map_or("none".to_owned(), |ms| ms.to_string());
        format!(
            "{kind} {} {} {idle} {} {}",
            self.read_ahead, self.total, self.detached_limit, self.peer_watch
        )
    }

    fn decode(text: &str) -> Self {
        let fields: Vec<&str> = text.split(' ').collect();
        let number = |i: usize| fields[i].parse::<u64>().expect(text);
        Self {
            layered: fields[0] == "layered",
            read_ahead: number(1) as usize,
            total: number(2) as usize,
            idle_ms: (fields[3] != "none").then(|| number(3)),
            detached_limit: number(4) as usize,
            peer_watch: fields[5] == "true",
        }
    }
}

/// Every panic in the process, caught or not (the hook runs before any unwinding).
static PANICS: AtomicU64 = AtomicU64::new(0);

/// A connection open: counted until its task ends, however it ends (a panic included).
struct Open(Arc<Counters>);

impl Open {
    fn new(counters: &Arc<Counters>) -> Self {
        let now = counters.conns.fetch_add(1, Ordering::SeqCst) + 1;
        counters.max("max_conns", now);
        counters.add("accepted", 1);
        Self(Arc::clone(counters))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.conns.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How hyper ended a connection with an error, as a counter's name: `conn_h2_<reason>` for
/// an HTTP/2 error (`conn_h2_ENHANCE_YOUR_CALM`), `conn_io_<kind>` for an I/O error, else
/// hyper's kind of error.
fn connection_error(error: &(dyn std::error::Error + 'static)) -> String {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            if let Some(reason) = h2.reason() {
                return format!("conn_h2_{reason:?}");
            }
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return format!("conn_io_{:?}", io.kind());
        }
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            let kind = if hyper.is_parse_too_large() {
                "too_large"
            } else if hyper.is_parse() {
                "parse"
            } else if hyper.is_incomplete_message() {
                "incomplete"
            } else if hyper.is_timeout() {
                "timeout"
            } else if hyper.is_body_write_aborted() {
                "body_write_aborted"
            } else if hyper.is_closed() || hyper.is_canceled() {
                "closed"
            } else if hyper.is_user() {
                "user"
            } else {
                // Look further down: an h2 error may be its source.
                next = error.source();
                continue;
            };
            return format!("conn_{kind}");
        }
        next = error.source();
    }
    "conn_other".to_owned()
}

/// Serves one connection in a task of its own. A generic function rather than an `async`
/// block around the connection: with a body whose error is `Box<dyn Error>` behind
/// `PeerWatchService`, rustc cannot prove such a block `Send` (rust-lang/rust#102211,
/// "implementation of `From` is not general enough").
fn spawn_connection<C>(conn: C, open: Open)
where
    C: std::future::Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            open.0.add(&connection_error(&*error), 1);
        }
    });
}

/// Runs the server process described by `ENV`; never returns.
pub(crate) fn serve() -> ! {
    let config = Config::decode(&std::env::var(ENV).unwrap());
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    // The parent holds our stdin: when it goes, so do we.
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(config));
    unreachable!("the server stopped");
}

async fn run(config: Config) {
    let counters = Arc::new(Counters::default());
    let (route, report) = if config.layered {
        app::layered(config, &counters)
    } else {
        app::bare(&counters)
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stats = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ports = (
        listener.local_addr().unwrap().port(),
        stats.local_addr().unwrap().port(),
    );
    println!("attack-child: ready {} {}", ports.0, ports.1);
    std::io::stdout().flush().unwrap();

    let c = Arc::clone(&counters);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = stats.accept().await else {
                continue;
            };
            let mut line = format!(
                "panics={} live={} conns={} {}",
                PANICS.load(Ordering::SeqCst),
                c.live.load(Ordering::SeqCst),
                c.conns.load(Ordering::SeqCst),
                report(),
            );
            for (key, value) in c.counts.lock().unwrap().iter() {
                let _ = write!(line, " {key}={value}");
            }
            let _ = stream.write_all(line.trim_end().as_bytes()).await;
        }
    });

    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, for instance: keep serving the others.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let open = Open::new(&counters);
        let watch = (config.layered && config.peer_watch)
            .then(|| tower_cancel::tcp::PeerWatch::new(&stream).ok())
            .flatten();
        let builder = auto::Builder::new(TokioExecutor::new());
        match watch {
            Some(watch) => {
                let svc = TowerToHyperService::new(watch.service(route.clone()));
                let conn = builder
                    .serve_connection(TokioIo::new(stream), svc)
                    .into_owned();
                spawn_connection(conn, open);
            }
            None => {
                let svc = TowerToHyperService::new(route.clone());
                tokio::spawn(async move {
                    if let Err(error) = builder.serve_connection(TokioIo::new(stream), svc).await {
                        open.0.add(&connection_error(&*error), 1);
                    }
                });
            }
        }
    }
}
