//! [`PeerWatch`]: the kernel's notice that a connection's peer sent FIN or RST, taken from a
//! registration of its own, whatever hyper is reading.
//!
//! The watch registers a duplicate of the socket's descriptor with the runtime's reactor
//! (edge-triggered, as every tokio registration). A FIN raises `EPOLLRDHUP` (`EV_EOF` with
//! kqueue) and a RST `EPOLLERR`, whatever still sits unread in the receive buffer: the watch
//! sees them while the request body is unread, which hyper, reading only when it wants bytes,
//! cannot. Its registration is its own, so clearing its readiness never hides an edge from
//! hyper's, and it reads nothing: each new edge (new data, FIN, RST) wakes it once.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::event::TARGET;

/// How the peer left, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerLeft {
    /// The peer closed its side (FIN): it closed the connection, or only its sending half
    /// (a half-close), which the kernel cannot tell apart.
    Closed,
    /// The peer reset the connection (RST), or the connection failed.
    Reset,
}

impl fmt::Display for PeerLeft {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Closed => "the peer closed the connection (FIN)",
            Self::Reset => "the peer reset the connection (RST)",
        })
    }
}

const STAYS: u8 = 0;
const CLOSED: u8 = 1;
const RESET: u8 = 2;

/// One accepted TCP connection, watched for its peer leaving: the kernel's `EPOLLRDHUP` (FIN)
/// and `EPOLLERR` (RST), seen while hyper is not reading the socket.
///
/// Over HTTP/1.1, hyper reads the socket only when it wants the next bytes: while a request
/// body is unread (a handler still deciding, or waiting on a database before it reads the
/// upload), a client that leaves is not seen, and its request runs on (golang/go#23262 is the
/// same gap in Go). The watch sees it at once, with nothing read ahead: wrap the connection's
/// service with [`service`](Self::service), and when the peer leaves, the request in flight is
/// dropped as hyper drops it for a client it saw leave, so a
/// [`CancellationLayer`](crate::CancellationLayer) inside cancels it with
/// [`Disconnected`](crate::CancelReason::Disconnected), in whatever phase it is.
///
/// ```no_run
/// # async fn handler(_: http::Request<hyper::body::Incoming>)
/// #     -> Result<http::Response<String>, std::convert::Infallible> { unimplemented!() }
/// use hyper_util::rt::{TokioExecutor, TokioIo};
/// use hyper_util::server::conn::auto;
/// use hyper_util::service::TowerToHyperService;
/// use tower::ServiceBuilder;
/// use tower_cancel::CancellationLayer;
/// use tower_cancel::tcp::PeerWatch;
///
/// # async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
/// let svc = ServiceBuilder::new()
///     .layer(CancellationLayer::new())
///     .service_fn(handler);
/// loop {
///     let (stream, _) = listener.accept().await?;
///     // The peer's FIN or RST, seen even while a request body is unread.
///     let svc = PeerWatch::new(&stream)?.service(svc.clone());
///     tokio::spawn(
///         auto::Builder::new(TokioExecutor::new())
///             .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
///             .into_owned(),
///     );
/// }
/// # }
/// ```
///
/// # Half-closed connections
///
/// A client may shut down its sending half after the request (`shutdown(SHUT_WR)`) and still
/// read the response: legal HTTP/1.1 that a few clients use. The kernel reports it as a FIN,
/// the same as a client that closed the connection. By default the watch takes a FIN for a
/// client that left, as hyper does when it reads the end of the stream itself (its
/// `http1().half_close(false)` default), as Go's server does (golang/go#18527), and as nginx
/// does as a proxy (`proxy_ignore_client_abort off`, the default: the client's request is
/// abandoned with `499`). [`allowing_half_close`](Self::allowing_half_close) serves such
/// clients: only a RST then counts (a client that closed the whole connection answers the
/// server's next write with one). Pair it with hyper's `http1().half_close(true)`.
///
/// # Cost
///
/// Per connection: one duplicated descriptor (count it against the process's open-file
/// limit: a server that takes N connections needs room for 2N), one reactor registration
/// and one small task, which looks at the socket only while a request needs it.
///
/// Per request: nothing for the requests hyper watches itself: those without a body (hyper
/// reads for the end of the stream while it answers them) and every HTTP/2 request (hyper
/// reads the socket all along). An HTTP/1.x upload that is pending arms the watch until it
/// ends; the task is then woken once by each burst of new data (the upload's), and by the FIN
/// or RST. With [`allowing_half_close`](Self::allowing_half_close), every HTTP/1.x request
/// arms it (hyper then reads past a FIN without acting on it). On loopback with 32
/// keep-alive connections (`VARIANTS="bare layer peer-watch" scripts/load.sh`), the layer
/// with the watch served 0.86 of bare hyper's HTTP/1.1 requests per second, the layer alone
/// 0.86; over HTTP/2, 0.86 against 0.90.
///
/// # "implementation of `From` is not general enough"
///
/// With a response body whose error is `Box<dyn Error + Send + Sync>`, rustc may fail to see
/// that an `async` block serving a watched connection is `Send` (rust-lang/rust#102211; any
/// body wrapper with a boxed error hits it, tower-http's `TimeoutBody` too) and reject the
/// `tokio::spawn`. Spawn the connection's future through a generic function
/// instead, so that the block awaits a type parameter:
///
/// ```
/// fn spawn_connection<C>(conn: C)
/// where
///     C: std::future::Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>
///         + Send
///         + 'static,
/// {
///     tokio::spawn(async move {
///         let _ = conn.await;
///     });
/// }
/// ```
///
/// # Platforms
///
/// * Linux and Android (epoll, `EPOLLRDHUP`): as above, tested here.
/// * The BSDs and macOS (kqueue): tokio reports kqueue's `EV_EOF` as the same "read closed"
///   readiness, so the watch works the same way; not tested here.
/// * Elsewhere (Windows has no such notice): the watch never fires; the connection behaves as
///   without it. [`RequestBodyLayer::read_ahead`](crate::request_body::RequestBodyLayer::read_ahead)
///   is then the way to see a client leave an unread upload.
#[derive(Clone)]
pub struct PeerWatch {
    shared: Arc<Shared>,
}

pub(super) struct Shared {
    pub(super) signal: Arc<Signal>,
    /// A FIN alone does not count.
    pub(super) half_close: bool,
    /// The watcher task, stopped when the last handle is dropped.
    task: Option<tokio::task::AbortHandle>,
}

/// What the watcher task and the handles share.
pub(super) struct Signal {
    /// Cancelled when the peer left.
    pub(super) left: CancellationToken,
    /// `STAYS`, `CLOSED` or `RESET`, set before `left` is cancelled.
    how: AtomicU8,
    /// Requests pending that need the watch. While there are none, the watcher does not wait
    /// on the socket, so a connection's new requests (each a burst of new data) do not wake
    /// it; what came meanwhile (a FIN) stays in the reactor's readiness for the next look.
    demand: AtomicUsize,
    wanted: Notify,
}

impl Signal {
    fn new() -> Self {
        Self {
            left: CancellationToken::new(),
            how: AtomicU8::new(STAYS),
            demand: AtomicUsize::new(0),
            wanted: Notify::new(),
        }
    }

    /// A request needs the watch until [`release`](Self::release).
    pub(super) fn want(&self) {
        if self.demand.fetch_add(1, Ordering::AcqRel) == 0 {
            // A permit if the watcher is not waiting yet: it cannot miss this.
            self.wanted.notify_one();
        }
    }

    /// How the peer left, once `left` is cancelled (`how` is stored before it is).
    pub(super) fn how(&self) -> PeerLeft {
        match self.how.load(Ordering::Acquire) {
            RESET => PeerLeft::Reset,
            _ => PeerLeft::Closed,
        }
    }

    pub(super) fn release(&self) {
        self.demand.fetch_sub(1, Ordering::AcqRel);
    }

    /// Returns once a request needs the watch.
    #[cfg(unix)]
    async fn wanted(&self) {
        loop {
            if self.demand.load(Ordering::Acquire) > 0 {
                return;
            }
            self.wanted.notified().await;
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl PeerWatch {
    /// Watches `stream` for its peer's FIN or RST (see [Half-closed
    /// connections](Self#half-closed-connections)). Call it inside a tokio runtime, on the
    /// accepted connection, before hyper takes it (or TLS wraps it: the watch reads nothing,
    /// so it works under TLS too).
    ///
    /// # Errors
    ///
    /// Duplicating the descriptor or registering it with the reactor failed (too many open
    /// files, say). Serve the connection without the watch then.
    #[cfg(unix)]
    pub fn new<S: std::os::fd::AsFd>(stream: &S) -> io::Result<Self> {
        Self::start(stream, false)
    }

    /// As [`new`](Self::new), but a FIN alone (a half-close) does not count: only a RST or a
    /// failed connection does.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    #[cfg(unix)]
    pub fn allowing_half_close<S: std::os::fd::AsFd>(stream: &S) -> io::Result<Self> {
        Self::start(stream, true)
    }

    /// A watch that never fires, where the system gives no notice (Windows).
    ///
    /// # Errors
    ///
    /// Never.
    #[cfg(not(unix))]
    pub fn new<S>(_stream: &S) -> io::Result<Self> {
        Ok(Self::unwatched())
    }

    /// A watch that never fires, where the system gives no notice (Windows).
    ///
    /// # Errors
    ///
    /// Never.
    #[cfg(not(unix))]
    pub fn allowing_half_close<S>(_stream: &S) -> io::Result<Self> {
        Ok(Self::unwatched())
    }

    /// A watch that never fires.
    #[cfg(any(not(unix), feature = "axum"))]
    fn unwatched() -> Self {
        Self {
            shared: Arc::new(Shared {
                signal: Arc::new(Signal::new()),
                half_close: false,
                task: None,
            }),
        }
    }

    #[cfg(unix)]
    fn start<S: std::os::fd::AsFd>(stream: &S, half_close: bool) -> io::Result<Self> {
        use tokio::io::Interest;
        use tokio::io::unix::AsyncFd;

        // `AsyncFd` would panic outside a runtime: an error says so instead.
        tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let fd = stream.as_fd().try_clone_to_owned()?;
        // Deprecated in newer tokio for types whose descriptor can change under the `AsyncFd`
        // (tokio#8587); an `OwnedFd` owns one descriptor for its whole life, and the unsafe
        // replacement is not in the tokio versions this crate supports (from 1.40).
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(fd, Interest::READABLE | Interest::ERROR)?;
        let signal = Arc::new(Signal::new());
        let watched = Arc::clone(&signal);
        let task = tokio::spawn(async move {
            let how = watch(&fd, &watched, half_close).await;
            watched.how.store(how, Ordering::Release);
            tracing::trace!(target: TARGET, how, "tcp: the peer left");
            watched.left.cancel();
        });
        Ok(Self {
            shared: Arc::new(Shared {
                signal,
                half_close,
                task: Some(task.abort_handle()),
            }),
        })
    }

    /// Whether the peer left, and how.
    pub fn peer_left(&self) -> Option<PeerLeft> {
        let signal = &self.shared.signal;
        signal.left.is_cancelled().then(|| signal.how())
    }

    /// Resolves when the peer left.
    pub async fn left(&self) -> PeerLeft {
        self.shared.signal.left.cancelled().await;
        self.shared.signal.how()
    }

    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// Waits until the peer left: `CLOSED` or `RESET`. Looks at the socket only while a request
/// needs it.
#[cfg(unix)]
async fn watch(
    fd: &tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    signal: &Signal,
    half_close: bool,
) -> u8 {
    use tokio::io::{Interest, Ready};

    // After a FIN that does not count (half-close), only an error can end the watch: waiting
    // for readability again would return at once, the end of the stream being readable.
    let mut interest = Interest::READABLE | Interest::ERROR;
    loop {
        signal.wanted().await;
        let mut guard = match fd.ready(interest).await {
            Ok(guard) => guard,
            // The reactor is gone (its runtime shut down): so is the connection's task.
            Err(_) => return RESET,
        };
        let ready = guard.ready();
        if ready.is_error() {
            return RESET;
        }
        if ready.is_read_closed() {
            if !half_close {
                return CLOSED;
            }
            interest = Interest::ERROR;
        }
        // New data only (hyper's to read), or a half-close: wait for the next edge.
        guard.clear_ready_matching(Ready::READABLE | Ready::READ_CLOSED);
    }
}

impl fmt::Debug for PeerWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerWatch")
            .field("peer_left", &self.peer_left())
            .finish()
    }
}

/// axum's per-connection information: `app.into_make_service_with_connect_info::<PeerWatch>()`
/// gives every request its connection's watch, for [`PeerWatchLayer`](super::PeerWatchLayer).
/// A connection whose watch cannot be made (see [`PeerWatch::new`]) is served unwatched, with
/// a `warn` event.
#[cfg(all(feature = "axum", unix))]
impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for PeerWatch
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Self::for_axum(stream.io())
    }
}

#[cfg(all(feature = "axum", unix))]
impl PeerWatch {
    fn for_axum(stream: &tokio::net::TcpStream) -> Self {
        Self::new(stream).unwrap_or_else(|error| {
            tracing::warn!(target: TARGET, %error, "tcp: connection served without its PeerWatch");
            Self::unwatched()
        })
    }
}
