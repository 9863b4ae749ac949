//! The completion matrix, over real sockets: every body shape a user can return × every way it
//! can be sent × every way the exchange can end, each cell asserting the exact outcome.
//!
//! What a user observes decides the outcome: the handler registers `rc.on_cancel(..)` with a
//! closure that owns a drop sentinel. A cancelled request runs the closure (which records the
//! reason and phase and disarms the sentinel); a completed one drops the registration unrun,
//! and the sentinel's `Drop` records "completed". The layer's own `on_cancel` is counted too.
//! Every cell must end in exactly one terminal event, with one layer callback if cancelled and
//! none if completed, and nothing may change afterwards: neither a few milliseconds later nor
//! once every connection is closed and every server stopped.
//!
//! Endings:
//! * read to the end: always completed;
//! * abandoned mid-body, after the first data frame: the body stays pending after that frame
//!   (a gate that never opens), so a body still streaming is `Disconnected`/`Body`; a body
//!   that was sent whole in one go (or whose declared length that frame reached), or that is
//!   not on the wire at all (HEAD, 204, 304), has completed;
//! * abandoned before the head, while the handler still runs (it never returns):
//!   `Disconnected`/`Handler`.
//!
//! HTTP/1.1 clients leave by closing the TCP connection (hyper's client connection task is
//! aborted); HTTP/2 clients drop the response future or body (RST_STREAM).
//!
//! Crosses left out because they cannot exist: tonic over anything but HTTP/2 POST with a 200
//! head (so no HTTP/1.1, HEAD, 204 or 304), and an explicit content-length on an SSE stream
//! (open-ended by design). Everything else is crossed, also where it changes nothing (an
//! explicit content-length on a `Full`) or is odd (a body on a 204: users return them).
//!
//! `cargo test --test completion -- --nocapture` prints the table.

mod common;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/tonic/reports.rs"]
mod reports;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::future::{Future, pending};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use axum::response::sse::{Event, Sse};
use bytes::{Buf, Bytes};
use common::{BoxError, PATIENCE, Server, h2_client_to};
use futures_util::Stream;
use http::header::{CONTENT_LENGTH, HOST, TE, TRAILER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use reports::reports_client::ReportsClient;
use reports::reports_server::{Reports, ReportsServer};
use reports::{Report, ReportRequest, Tick, WatchRequest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet, yield_now};
use tokio_util::sync::CancellationToken;
use tower_cancel::{CancelReason, CancellationLayer, Cancelled, Phase, RequestCancellation};

/// Cells in flight at once.
const CONCURRENCY: usize = 32;
/// How long a terminal event may take once the client is done; only reached when broken.
const TERMINAL_PATIENCE: Duration = Duration::from_secs(5);
/// How long a cell is watched after its terminal event for anything else to happen.
const SETTLE: Duration = Duration::from_millis(20);

/// The data frames of the streamed shapes.
const FRAMES: [&str; 3] = ["frame-0\n", "frame-1\n", "frame-2\n"];
const FULL: &str = "a full body\n";
const STRING: &str = "a string body\n";
const AXUM_STRING: &str = "an axum string body\n";
/// The trailer the trailers shapes send (and declare in a `trailer` header).
const CHECKSUM: &str = "x-checksum";

// ---------------------------------------------------------------------------------------------
// The matrix
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// `http_body_util::Full`.
    Full,
    /// `http_body_util::Empty`.
    Empty,
    /// `String`.
    String,
    /// `StreamBody` of data frames, no size hint.
    Stream,
    /// `StreamBody` of data frames and a trailers frame.
    StreamTrailers,
    /// `Full::with_trailers` (`BodyExt`).
    FullTrailers,
    /// Streamed data frames with an exact size hint.
    ExactStream,
    /// Streamed data frames with an inexact size hint (lower and upper set).
    InexactStream,
    /// Streamed data frames; `is_end_stream` turns true after the last one, before `None`.
    EarlyEnd,
    /// `axum::body::Body::from_stream`.
    AxumStream,
    /// `axum::body::Body::from(String)`.
    AxumString,
    /// `axum::response::Sse`.
    Sse,
    /// tonic unary (`Generate`).
    TonicUnary,
    /// tonic server streaming (`Watch`).
    TonicStream,
}

impl Shape {
    const ALL: [Self; 14] = [
        Self::Full,
        Self::Empty,
        Self::String,
        Self::Stream,
        Self::StreamTrailers,
        Self::FullTrailers,
        Self::ExactStream,
        Self::InexactStream,
        Self::EarlyEnd,
        Self::AxumStream,
        Self::AxumString,
        Self::Sse,
        Self::TonicUnary,
        Self::TonicStream,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Empty => "empty",
            Self::String => "string",
            Self::Stream => "stream",
            Self::StreamTrailers => "stream+trailers",
            Self::FullTrailers => "full.with_trailers",
            Self::ExactStream => "stream exact-hint",
            Self::InexactStream => "stream inexact-hint",
            Self::EarlyEnd => "stream early-end",
            Self::AxumStream => "axum from_stream",
            Self::AxumString => "axum from(String)",
            Self::Sse => "axum sse",
            Self::TonicUnary => "tonic unary",
            Self::TonicStream => "tonic streaming",
        }
    }

    fn server(self) -> Family {
        match self {
            Self::AxumStream | Self::AxumString | Self::Sse => Family::Axum,
            Self::TonicUnary | Self::TonicStream => Family::Tonic,
            _ => Family::Hyper,
        }
    }

    fn has_trailers(self) -> bool {
        matches!(self, Self::StreamTrailers | Self::FullTrailers)
    }

    /// Whether the body is still streaming after its first data frame, i.e. whether the gate
    /// can hold it there. Bodies produced whole in one go are over with their first frame.
    fn streams_after_first_frame(self) -> bool {
        match self {
            Self::Full | Self::Empty | Self::String | Self::AxumString | Self::TonicUnary => false,
            // The trailers future is the gate, after a body with an exact size hint (the
            // `Full`'s): see `Cell::expected`.
            _ => true,
        }
    }

    /// What a client that reads to the end receives (the body, for tonic the messages).
    fn data(self, id: usize) -> Vec<u8> {
        match self {
            Self::Full => FULL.into(),
            Self::Empty => Vec::new(),
            Self::String => STRING.into(),
            Self::FullTrailers => FULL.into(),
            Self::AxumString => AXUM_STRING.into(),
            Self::Sse => FRAMES
                .iter()
                .map(|f| format!("data: {}\n\n", f.trim_end()))
                .collect::<String>()
                .into(),
            Self::TonicUnary => format!("report {id}").into(),
            Self::TonicStream => b"0,1,2".to_vec(),
            _ => FRAMES.concat().into(),
        }
    }

    /// The length a user would declare in a `content-length` header.
    fn content_length(self) -> usize {
        self.data(0).len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Hyper,
    Axum,
    Tonic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// HTTP/1.1 as the shape gives it: content-length for exact sizes, chunked otherwise.
    H1,
    /// HTTP/1.1 with an explicit `content-length` header set by the handler.
    H1Length,
    /// HTTP/1.1, the client sending `TE: trailers`.
    H1Te,
    /// HTTP/2, prior knowledge (hyper's client; tonic's for the tonic shapes).
    H2,
    HeadH1,
    HeadH2,
    NoContentH1,
    NoContentH2,
    NotModifiedH1,
    NotModifiedH2,
}

impl Mode {
    const ALL: [Self; 10] = [
        Self::H1,
        Self::H1Length,
        Self::H1Te,
        Self::H2,
        Self::HeadH1,
        Self::HeadH2,
        Self::NoContentH1,
        Self::NoContentH2,
        Self::NotModifiedH1,
        Self::NotModifiedH2,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::H1 => "h1",
            Self::H1Length => "h1+len",
            Self::H1Te => "h1+te",
            Self::H2 => "h2",
            Self::HeadH1 => "HEAD1",
            Self::HeadH2 => "HEAD2",
            Self::NoContentH1 => "204/1",
            Self::NoContentH2 => "204/2",
            Self::NotModifiedH1 => "304/1",
            Self::NotModifiedH2 => "304/2",
        }
    }

    fn is_h2(self) -> bool {
        matches!(
            self,
            Self::H2 | Self::HeadH2 | Self::NoContentH2 | Self::NotModifiedH2
        )
    }

    fn method(self) -> Method {
        match self {
            Self::HeadH1 | Self::HeadH2 => Method::HEAD,
            _ => Method::GET,
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::NoContentH1 | Self::NoContentH2 => StatusCode::NO_CONTENT,
            Self::NotModifiedH1 | Self::NotModifiedH2 => StatusCode::NOT_MODIFIED,
            _ => StatusCode::OK,
        }
    }

    /// HEAD, 204 and 304 carry no body on the wire.
    fn body_on_wire(self) -> bool {
        self.method() != Method::HEAD && self.status() == StatusCode::OK
    }

    /// Whether the cross with `shape` can exist; the others are left out.
    fn applies_to(self, shape: Shape) -> bool {
        match shape.server() {
            // gRPC is HTTP/2 POST with a 200 head, always: no HTTP/1.1, HEAD, 204 or 304.
            Family::Tonic => self == Self::H2,
            // An event stream has no length a handler could declare: it is open-ended by
            // design (and axum's `Sse` sets none).
            _ if shape == Shape::Sse => self != Self::H1Length,
            _ => true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    ReadToEnd,
    MidBody,
    BeforeHead,
}

impl Ending {
    const ALL: [Self; 3] = [Self::ReadToEnd, Self::MidBody, Self::BeforeHead];

    fn name(self) -> &'static str {
        match self {
            Self::ReadToEnd => "read to end",
            Self::MidBody => "left mid-body",
            Self::BeforeHead => "left before head",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Completed,
    Cancelled(CancelReason, Phase),
}

impl Outcome {
    /// One or two letters for the table.
    fn short(self) -> &'static str {
        match self {
            Self::Completed => "ok",
            Self::Cancelled(CancelReason::Disconnected, Phase::Handler) => "H",
            Self::Cancelled(CancelReason::Disconnected, Phase::Body) => "B",
            Self::Cancelled(_, Phase::Handler) => "xH",
            Self::Cancelled(_, Phase::Body) => "xB",
            // `Phase` is non-exhaustive.
            Self::Cancelled(..) => "x?",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Completed => f.write_str("completed"),
            Self::Cancelled(reason, phase) => write!(f, "cancelled {reason}/{phase}"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Cell {
    id: usize,
    shape: Shape,
    mode: Mode,
    ending: Ending,
}

impl Cell {
    fn expected(&self) -> Outcome {
        match self.ending {
            Ending::ReadToEnd => Outcome::Completed,
            Ending::BeforeHead => Outcome::Cancelled(CancelReason::Disconnected, Phase::Handler),
            // Over HTTP/1.1 the exact size hint of `Full::with_trailers` is its declared length
            // (hyper sends it as content-length) and hyper stops polling once it is written:
            // the request completes with the data frame, and the trailers are never asked for.
            // Over HTTP/2 hyper asks for them, so a client that leaves before they come left
            // a response that had not ended.
            Ending::MidBody if self.shape == Shape::FullTrailers && self.mode != Mode::H2 => {
                Outcome::Completed
            }
            Ending::MidBody
                if self.mode.body_on_wire() && self.shape.streams_after_first_frame() =>
            {
                Outcome::Cancelled(CancelReason::Disconnected, Phase::Body)
            }
            Ending::MidBody => Outcome::Completed,
        }
    }

    /// Whether the handler holds the body at the gate after its first data frame.
    fn gated(&self) -> bool {
        self.ending == Ending::MidBody
    }

    /// What a client reading to the end must receive: (data, trailers).
    fn expected_read(&self) -> (Vec<u8>, bool) {
        if !self.mode.body_on_wire() {
            return (Vec::new(), false);
        }
        let trailers = match self.shape {
            Shape::StreamTrailers => match self.mode {
                Mode::H2 => true,
                // hyper's HTTP/1.1 server sends trailers only to a client that sent
                // `TE: trailers`, for fields declared in the `trailer` header, and only on a
                // chunked body (not after a content-length).
                Mode::H1Te => true,
                _ => false,
            },
            // Over HTTP/1.1 the exact size hint means content-length: no trailers.
            Shape::FullTrailers => self.mode == Mode::H2,
            _ => false,
        };
        (self.shape.data(self.id), trailers)
    }

    fn describe(&self) -> String {
        format!(
            "cell #{} (shape {}, mode {}, ending {})",
            self.id,
            self.shape.name(),
            self.mode.name(),
            self.ending.name()
        )
    }

    fn path(&self) -> String {
        format!("/cell/{}", self.id)
    }
}

fn cells() -> Vec<Cell> {
    let mut cells = Vec::new();
    for shape in Shape::ALL {
        for mode in Mode::ALL {
            if !mode.applies_to(shape) {
                continue;
            }
            for ending in Ending::ALL {
                cells.push(Cell {
                    id: cells.len(),
                    shape,
                    mode,
                    ending,
                });
            }
        }
    }
    cells
}

fn cell_id(path: &str) -> Option<usize> {
    path.strip_prefix("/cell/")?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// What the server side records
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Record {
    /// Handler invocations.
    starts: usize,
    /// Terminal events: the handler's `on_cancel` ran, or its registration was dropped.
    events: Vec<Outcome>,
    /// The layer's `on_cancel` callback.
    layer_calls: usize,
    handle: Option<RequestCancellation>,
}

#[derive(Default)]
struct Recorder {
    records: Mutex<Vec<Record>>,
    /// Layer callbacks for a path that names no cell.
    unkeyed: AtomicUsize,
    changed: Notify,
}

impl Recorder {
    fn new(cells: usize) -> Arc<Self> {
        let recorder = Self::default();
        recorder
            .records
            .lock()
            .unwrap()
            .resize_with(cells, Record::default);
        Arc::new(recorder)
    }

    fn update(&self, id: usize, f: impl FnOnce(&mut Record)) {
        f(&mut self.records.lock().unwrap()[id]);
        self.changed.notify_waiters();
    }

    /// What the cell's record says now: (starts, events, layer calls, the token's reason).
    fn snapshot(&self, id: usize) -> Snapshot {
        let (starts, events, layer_calls, handle) = {
            let records = self.records.lock().unwrap();
            let r = &records[id];
            (r.starts, r.events.clone(), r.layer_calls, r.handle.clone())
        };
        // Outside the lock: `reason()` may record a cancellation and run callbacks.
        let token = handle.map(|rc| (rc.token().is_cancelled(), rc.reason()));
        Snapshot {
            starts,
            events,
            layer_calls,
            token,
        }
    }

    /// Waits until `done` holds for the cell's record; false after `patience`.
    async fn wait(&self, id: usize, patience: Duration, done: impl Fn(&Record) -> bool) -> bool {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if done(&self.records.lock().unwrap()[id]) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(patience, wait).await.is_ok()
    }

    /// A layer whose callback counts per cell (by the request path).
    fn layer(self: &Arc<Self>) -> CancellationLayer {
        let rec = self.clone();
        CancellationLayer::new().on_cancel(move |c: &Cancelled| match cell_id(c.uri().path()) {
            Some(id) => rec.update(id, |r| r.layer_calls += 1),
            None => {
                rec.unkeyed.fetch_add(1, Ordering::SeqCst);
            }
        })
    }

    /// In the handler: registers the sentinel, keeps the handle, counts the start (after
    /// registering, so a client waiting for the start leaves only once it is registered).
    fn enter(self: &Arc<Self>, id: usize, rc: &RequestCancellation) {
        let mut sentinel = Sentinel {
            rec: self.clone(),
            id,
            armed: true,
        };
        rc.on_cancel(move |c| {
            sentinel.armed = false;
            let outcome = Outcome::Cancelled(c.reason(), c.phase());
            sentinel.rec.update(sentinel.id, |r| r.events.push(outcome));
        });
        self.update(id, |r| {
            r.starts += 1;
            r.handle = Some(rc.clone());
        });
    }
}

/// Owned by the handler's `on_cancel` closure: dropped unrun (the request completed), it
/// records "completed".
struct Sentinel {
    rec: Arc<Recorder>,
    id: usize,
    armed: bool,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if self.armed {
            self.rec
                .update(self.id, |r| r.events.push(Outcome::Completed));
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Snapshot {
    starts: usize,
    events: Vec<Outcome>,
    layer_calls: usize,
    /// (token cancelled, `rc.reason()`)
    token: Option<(bool, Option<CancelReason>)>,
}

impl Snapshot {
    fn check(&self, expected: Outcome) -> Result<(), String> {
        let got = self
            .events
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let got = if got.is_empty() {
            "no terminal event".to_owned()
        } else {
            got
        };
        if self.starts != 1 {
            return Err(format!(
                "expected 1 handler start, got {} (events: {got})",
                self.starts
            ));
        }
        if self.events != [expected] {
            return Err(format!("expected {expected}, got {got}"));
        }
        let (layer_calls, token) = match expected {
            Outcome::Completed => (0, (false, None)),
            Outcome::Cancelled(reason, _) => (1, (true, Some(reason))),
        };
        if self.layer_calls != layer_calls {
            return Err(format!(
                "expected {expected} with {layer_calls} layer callback(s), got {got} with {}",
                self.layer_calls
            ));
        }
        if self.token != Some(token) {
            return Err(format!(
                "expected {expected}, got {got} but (token cancelled, rc.reason()) = {:?}",
                self.token
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

enum Step<T> {
    Item(T),
    /// Never opens: the stream stays pending here for good.
    Gate,
}

/// A stream that goes pending once (waking itself at once) before each item and before its
/// end, and stays pending at a gate.
struct Scripted<T> {
    steps: VecDeque<Step<T>>,
    paused: bool,
}

impl<T> Scripted<T> {
    /// `items`, with the gate after the first one if `gated`.
    fn new(items: impl IntoIterator<Item = T>, gated: bool) -> Self {
        let mut steps: VecDeque<_> = items.into_iter().map(Step::Item).collect();
        if gated {
            steps.insert(1, Step::Gate);
        }
        Self {
            steps,
            paused: false,
        }
    }
}

impl<T: Unpin> Stream for Scripted<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        if !this.paused {
            this.paused = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match this.steps.front() {
            None => Poll::Ready(None),
            Some(Step::Gate) => Poll::Pending,
            Some(Step::Item(_)) => {
                this.paused = false;
                match this.steps.pop_front() {
                    Some(Step::Item(item)) => Poll::Ready(Some(item)),
                    _ => unreachable!(),
                }
            }
        }
    }
}

type PlainBody = UnsyncBoxBody<Bytes, BoxError>;
type FrameStream = StreamBody<Scripted<Result<Frame<Bytes>, BoxError>>>;

fn never(never: Infallible) -> BoxError {
    match never {}
}

fn trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert(CHECKSUM, HeaderValue::from_static("42"));
    trailers
}

fn frames(gated: bool, with_trailers: bool) -> FrameStream {
    let mut items: Vec<_> = FRAMES
        .iter()
        .map(|f| Ok(Frame::data(Bytes::from_static(f.as_bytes()))))
        .collect();
    if with_trailers {
        items.push(Ok(Frame::trailers(trailers())));
    }
    StreamBody::new(Scripted::new(items, gated))
}

#[derive(Clone, Copy)]
enum Hint {
    /// Exact: the bytes still to come.
    Exact,
    /// Lower and upper bounds around the bytes still to come, never equal.
    Inexact,
    /// No size hint; `is_end_stream` is true once the last data frame was yielded.
    EarlyEnd,
}

/// A streamed body with a size hint or an early `is_end_stream`.
struct Hinted {
    inner: FrameStream,
    hint: Hint,
    frames_left: usize,
    bytes_left: u64,
}

impl Hinted {
    fn new(inner: FrameStream, hint: Hint) -> Self {
        Self {
            inner,
            hint,
            frames_left: FRAMES.len(),
            bytes_left: FRAMES.concat().len() as u64,
        }
    }
}

impl Body for Hinted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll {
            if let Some(data) = frame.data_ref() {
                let len = data.remaining() as u64;
                self.frames_left -= 1;
                self.bytes_left -= len;
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.hint, Hint::EarlyEnd) && self.frames_left == 0
    }

    fn size_hint(&self) -> SizeHint {
        match self.hint {
            Hint::Exact => SizeHint::with_exact(self.bytes_left),
            Hint::Inexact => {
                let mut hint = SizeHint::new();
                hint.set_lower(self.bytes_left / 2);
                hint.set_upper(self.bytes_left + 64);
                hint
            }
            Hint::EarlyEnd => SizeHint::new(),
        }
    }
}

type TrailersFuture = Pin<Box<dyn Future<Output = Option<Result<HeaderMap, Infallible>>> + Send>>;

fn plain_body(shape: Shape, gated: bool) -> PlainBody {
    match shape {
        Shape::Full => Full::new(Bytes::from_static(FULL.as_bytes()))
            .map_err(never)
            .boxed_unsync(),
        Shape::Empty => Empty::new().map_err(never).boxed_unsync(),
        Shape::String => String::from(STRING).map_err(never).boxed_unsync(),
        Shape::Stream => frames(gated, false).boxed_unsync(),
        Shape::StreamTrailers => frames(gated, true).boxed_unsync(),
        Shape::FullTrailers => {
            let trailers: TrailersFuture = if gated {
                Box::pin(pending())
            } else {
                Box::pin(async {
                    yield_now().await;
                    Some(Ok(trailers()))
                })
            };
            Full::new(Bytes::from_static(FULL.as_bytes()))
                .with_trailers(trailers)
                .map_err(never)
                .boxed_unsync()
        }
        Shape::ExactStream => Hinted::new(frames(gated, false), Hint::Exact).boxed_unsync(),
        Shape::InexactStream => Hinted::new(frames(gated, false), Hint::Inexact).boxed_unsync(),
        Shape::EarlyEnd => Hinted::new(frames(gated, false), Hint::EarlyEnd).boxed_unsync(),
        _ => unreachable!("{shape:?} is not served by the hyper server"),
    }
}

/// The status, the explicit content-length and the `trailer` declaration of the cell's mode.
fn apply_mode<B>(cell: &Cell, response: &mut Response<B>) {
    *response.status_mut() = cell.mode.status();
    if cell.mode == Mode::H1Length {
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, cell.shape.content_length().into());
    }
    if cell.shape.has_trailers() {
        response
            .headers_mut()
            .insert(TRAILER, HeaderValue::from_static(CHECKSUM));
    }
}

// ---------------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------------

struct Shared {
    cells: Vec<Cell>,
    rec: Arc<Recorder>,
}

impl Shared {
    /// The cell a request names, registered with the recorder; the handler then never
    /// returns if the client is to leave before the head.
    async fn enter(&self, path: &str, rc: &RequestCancellation) -> Cell {
        let cell = self.cells[cell_id(path).expect("a cell path")];
        self.rec.enter(cell.id, rc);
        if cell.ending == Ending::BeforeHead {
            pending::<()>().await;
        }
        // The response future goes pending once too.
        yield_now().await;
        cell
    }
}

/// A plain hyper service (tower `service_fn`) behind the layer.
async fn hyper_server(shared: &Arc<Shared>) -> Server {
    let s = shared.clone();
    let service = tower::ServiceBuilder::new()
        .layer(shared.rec.layer())
        .service(tower::service_fn(move |req: Request<Incoming>| {
            let s = s.clone();
            async move {
                let rc = req
                    .extensions()
                    .get::<RequestCancellation>()
                    .expect("the layer")
                    .clone();
                let cell = s.enter(req.uri().path(), &rc).await;
                let mut response = Response::new(plain_body(cell.shape, cell.gated()));
                apply_mode(&cell, &mut response);
                Ok::<_, Infallible>(response)
            }
        }));
    Server::start(service).await
}

/// An axum `Router` with the layer in `Router::layer`, the handler using the extractor.
async fn axum_server(shared: &Arc<Shared>) -> Server {
    let s = shared.clone();
    let router = axum::Router::new()
        .route(
            "/cell/{id}",
            axum::routing::get(move |uri: Uri, rc: RequestCancellation| {
                let s = s.clone();
                async move {
                    let cell = s.enter(uri.path(), &rc).await;
                    let gated = cell.gated();
                    let mut response = match cell.shape {
                        Shape::AxumStream => {
                            let chunks =
                                FRAMES.map(|f| Ok::<_, BoxError>(Bytes::from_static(f.as_bytes())));
                            axum::body::Body::from_stream(Scripted::new(chunks, gated))
                                .into_response()
                        }
                        Shape::AxumString => {
                            axum::body::Body::from(String::from(AXUM_STRING)).into_response()
                        }
                        Shape::Sse => {
                            let events = FRAMES
                                .map(|f| Ok::<_, Infallible>(Event::default().data(f.trim_end())));
                            Sse::new(Scripted::new(events, gated)).into_response()
                        }
                        shape => unreachable!("{shape:?} is not served by axum"),
                    };
                    apply_mode(&cell, &mut response);
                    response
                }
            }),
        )
        .layer(shared.rec.layer());
    Server::start(router).await
}

/// The tonic service of one cell (the layer's callback is that server's: `Cancelled` names
/// the gRPC method, not the cell).
struct TonicCell {
    rec: Arc<Recorder>,
    cell: Cell,
}

impl TonicCell {
    async fn enter<T>(&self, request: &tonic::Request<T>) -> Result<(), tonic::Status> {
        let rc = RequestCancellation::from_extensions(request.extensions())?;
        let id = request
            .metadata()
            .get("x-cell")
            .and_then(|v| v.to_str().ok());
        if id != Some(self.cell.id.to_string().as_str()) {
            return Err(tonic::Status::invalid_argument(format!("x-cell {id:?}")));
        }
        self.rec.enter(self.cell.id, &rc);
        if self.cell.ending == Ending::BeforeHead {
            pending::<()>().await;
        }
        yield_now().await;
        Ok(())
    }
}

#[tonic::async_trait]
impl Reports for TonicCell {
    type WatchStream = Scripted<Result<Tick, tonic::Status>>;

    async fn generate(
        &self,
        request: tonic::Request<ReportRequest>,
    ) -> Result<tonic::Response<Report>, tonic::Status> {
        self.enter(&request).await?;
        let text = format!("report {}", request.into_inner().name);
        Ok(tonic::Response::new(Report { text }))
    }

    async fn watch(
        &self,
        request: tonic::Request<WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        self.enter(&request).await?;
        let ticks = (0..3).map(|n| Ok(Tick { n }));
        Ok(tonic::Response::new(Scripted::new(
            ticks,
            self.cell.gated(),
        )))
    }
}

struct GrpcServer {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl GrpcServer {
    async fn start(rec: &Arc<Recorder>, cell: Cell) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let stop = CancellationToken::new();
        let r = rec.clone();
        let layer = CancellationLayer::new().on_cancel(move |_: &Cancelled| {
            r.update(cell.id, |r| r.layer_calls += 1);
        });
        let service = ReportsServer::new(TonicCell {
            rec: rec.clone(),
            cell,
        });
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(layer)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
        );
        Self { addr, stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the tonic server did not drain")
            .unwrap()
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// What the client saw.
#[derive(Debug, Default)]
struct Seen {
    status: Option<u16>,
    data: Vec<u8>,
    /// A trailers frame carrying the checksum.
    trailers: bool,
    /// Reading the body failed.
    body_error: Option<String>,
}

impl Seen {
    /// Whether anything but the head reached the client.
    fn got_body(&self) -> bool {
        !self.data.is_empty() || self.trailers || self.body_error.is_some()
    }
}

type ClientResult = Result<Seen, String>;

fn request(cell: &Cell, uri: String) -> Request<Empty<Bytes>> {
    let mut builder = Request::builder()
        .method(cell.mode.method())
        .uri(uri)
        .header("x-cell", cell.id);
    if !cell.mode.is_h2() {
        builder = builder.header(HOST, "completion.test");
    }
    if cell.mode == Mode::H1Te {
        builder = builder.header(TE, "trailers");
    }
    builder.body(Empty::new()).unwrap()
}

/// Reads frames to the end, or only the first one.
async fn read(body: &mut Incoming, seen: &mut Seen, only_first: bool) {
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                seen.body_error = Some(format!("{e:?}"));
                return;
            }
        };
        if let Some(data) = frame.data_ref() {
            seen.data.extend_from_slice(data);
        } else if let Some(trailers) = frame.trailers_ref() {
            seen.trailers = trailers.get(CHECKSUM).is_some_and(|v| v == "42");
        }
        if only_first {
            break;
        }
    }
}

async fn h1_client(cell: Cell, addr: SocketAddr, rec: &Recorder) -> ClientResult {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    // Aborting the connection task drops the socket: the TCP connection closes.
    let close = |conn: JoinHandle<()>| async move {
        conn.abort();
        let _ = conn.await;
    };
    let mut seen = Seen::default();
    let req = request(&cell, cell.path());
    if cell.ending == Ending::BeforeHead {
        let response = tokio::spawn(send.send_request(req));
        if !rec.wait(cell.id, PATIENCE, |r| r.starts > 0).await {
            return Err("the handler never started".into());
        }
        close(conn).await;
        response.abort();
        return Ok(seen);
    }
    let response = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    seen.status = Some(response.status().as_u16());
    let mut body = response.into_body();
    read(&mut body, &mut seen, cell.ending == Ending::MidBody).await;
    if cell.ending == Ending::ReadToEnd {
        // Leave the way a client does when it is done: drop the connection.
        drop(send);
        let _ = tokio::time::timeout(PATIENCE, conn).await;
    } else {
        close(conn).await;
    }
    Ok(seen)
}

async fn h2_client(cell: Cell, addr: SocketAddr, rec: &Recorder) -> ClientResult {
    let (mut send, conn, _socket) = h2_client_to(addr).await;
    let mut seen = Seen::default();
    let req = request(&cell, format!("http://{addr}{}", cell.path()));
    let result = async {
        if cell.ending == Ending::BeforeHead {
            let response = tokio::spawn(send.send_request(req));
            if !rec.wait(cell.id, PATIENCE, |r| r.starts > 0).await {
                return Err("the handler never started".into());
            }
            // Drops the response future: RST_STREAM.
            response.abort();
            let _ = response.await;
            return Ok(());
        }
        let response = send
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        seen.status = Some(response.status().as_u16());
        let mut body = response.into_body();
        // Dropping the body mid-stream resets the stream.
        read(&mut body, &mut seen, cell.ending == Ending::MidBody).await;
        Ok(())
    }
    .await;
    drop(send);
    let _ = tokio::time::timeout(PATIENCE, conn).await;
    result.map(|()| seen)
}

/// A tonic request naming its cell in the `x-cell` metadata.
fn tagged<T>(cell: &Cell, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-cell", cell.id.to_string().parse().unwrap());
    request
}

async fn tonic_client(cell: Cell, addr: SocketAddr, rec: &Recorder) -> ClientResult {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = ReportsClient::new(channel);
    let mut seen = Seen::default();
    let name = cell.id.to_string();
    match (cell.shape, cell.ending) {
        (Shape::TonicUnary, Ending::BeforeHead) => {
            let request = tagged(&cell, ReportRequest { name, millis: 0 });
            let call = tokio::spawn(async move { client.generate(request).await });
            if !rec.wait(cell.id, PATIENCE, |r| r.starts > 0).await {
                return Err("the handler never started".into());
            }
            call.abort(); // tonic's channel resets the stream
            let _ = call.await;
        }
        (Shape::TonicUnary, _) => {
            // A unary call resolves with the whole answer (message and trailers): leaving
            // "after the first data frame" is leaving after all of it.
            let request = tagged(&cell, ReportRequest { name, millis: 0 });
            let report = client
                .generate(request)
                .await
                .map_err(|s| format!("generate: {s:?}"))?;
            seen.status = Some(200);
            seen.data = report.into_inner().text.into();
        }
        (Shape::TonicStream, Ending::BeforeHead) => {
            let request = tagged(
                &cell,
                WatchRequest {
                    interval_millis: 0,
                    count: 3,
                },
            );
            let call = tokio::spawn(async move { client.watch(request).await });
            if !rec.wait(cell.id, PATIENCE, |r| r.starts > 0).await {
                return Err("the handler never started".into());
            }
            call.abort();
            let _ = call.await;
        }
        (Shape::TonicStream, ending) => {
            let request = tagged(
                &cell,
                WatchRequest {
                    interval_millis: 0,
                    count: 3,
                },
            );
            let mut ticks = client
                .watch(request)
                .await
                .map_err(|s| format!("watch: {s:?}"))?
                .into_inner();
            seen.status = Some(200);
            let mut got = Vec::new();
            while let Some(tick) = ticks.message().await.map_err(|s| format!("tick: {s:?}"))? {
                got.push(tick.n.to_string());
                if ending == Ending::MidBody {
                    break; // dropping the stream resets it
                }
            }
            seen.data = got.join(",").into();
        }
        (shape, _) => unreachable!("{shape:?} is not a tonic shape"),
    }
    Ok(seen)
}

/// What the client must have seen for the cell.
fn check_client(cell: &Cell, seen: &ClientResult) -> Result<(), String> {
    let seen = match seen {
        Err(error) => return Err(format!("client failed: {error}")),
        Ok(seen) => seen,
    };
    if cell.ending == Ending::BeforeHead {
        return Ok(());
    }
    if !cell.mode.body_on_wire() && cell.mode.is_h2() {
        // hyper's HTTP/2 server sends the body of a HEAD, 204 or 304 response anyway: hyper's
        // client passes it on for 204 and 304 and resets the stream (PROTOCOL_ERROR) for
        // HEAD. Not the layer's business (it completed the request with the head, as it
        // must: a client resetting that body is not leaving early); only the head is checked.
        // Marked `~` in the table.
        return match seen.status {
            Some(status) if status == cell.mode.status().as_u16() => Ok(()),
            status => Err(format!(
                "client: expected status {}, got {status:?}",
                cell.mode.status()
            )),
        };
    }
    if let Some(error) = &seen.body_error {
        return Err(format!("client: reading the body failed: {error}"));
    }
    if seen.status != Some(cell.mode.status().as_u16()) {
        return Err(format!(
            "client: expected status {}, got {:?}",
            cell.mode.status(),
            seen.status
        ));
    }
    let (data, trailers) = cell.expected_read();
    let expected = match cell.ending {
        Ending::ReadToEnd => (data, trailers),
        // What the first data frame carries.
        _ if !cell.mode.body_on_wire() => (Vec::new(), false),
        // The whole data frame, then the gated trailers.
        _ if cell.shape == Shape::FullTrailers => (data, false),
        _ if cell.shape.streams_after_first_frame() => {
            let first = match cell.shape {
                Shape::Sse => format!("data: {}\n\n", FRAMES[0].trim_end()).into(),
                Shape::TonicStream => b"0".to_vec(),
                _ => FRAMES[0].into(),
            };
            (first, false)
        }
        _ => (data, false),
    };
    let got = (seen.data.clone(), seen.trailers);
    if got != expected {
        return Err(format!(
            "client: expected (data {:?}, trailers {}), got (data {:?}, trailers {})",
            String::from_utf8_lossy(&expected.0),
            expected.1,
            String::from_utf8_lossy(&got.0),
            got.1
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

struct Run {
    shared: Arc<Shared>,
    hyper: Server,
    axum: Server,
    tonic: Mutex<Vec<(usize, GrpcServer)>>,
}

/// What a cell ended with.
struct CellResult {
    cell: Cell,
    seen: ClientResult,
    /// Right after the terminal event (and `SETTLE`), then after every connection closed.
    settled: Snapshot,
    failures: Vec<String>,
}

async fn run_cell(run: &Run, cell: Cell) -> CellResult {
    let rec = &run.shared.rec;
    let seen = match cell.shape.server() {
        Family::Hyper | Family::Axum => {
            let server = if cell.shape.server() == Family::Hyper {
                &run.hyper
            } else {
                &run.axum
            };
            let client = async {
                if cell.mode.is_h2() {
                    h2_client(cell, server.addr, rec).await
                } else {
                    h1_client(cell, server.addr, rec).await
                }
            };
            tokio::time::timeout(PATIENCE, client)
                .await
                .unwrap_or_else(|_| Err("client timed out".into()))
        }
        Family::Tonic => {
            let addr = {
                let servers = run.tonic.lock().unwrap();
                servers
                    .iter()
                    .find(|(id, _)| *id == cell.id)
                    .unwrap()
                    .1
                    .addr
            };
            tokio::time::timeout(PATIENCE, tonic_client(cell, addr, rec))
                .await
                .unwrap_or_else(|_| Err("client timed out".into()))
        }
    };
    // The client is gone (its connection closed or its stream reset): wait for the terminal
    // event (a cancellation runs the handler's callbacks, then the layer's: wait for both,
    // the thread may be preempted in between), then a little more to catch a second event
    // or a late callback.
    let mut failures = Vec::new();
    let terminal = |r: &Record| match r.events.first() {
        None => false,
        Some(Outcome::Completed) => true,
        Some(Outcome::Cancelled(..)) => r.layer_calls > 0,
    };
    if !rec.wait(cell.id, TERMINAL_PATIENCE, terminal).await {
        failures.push(format!(
            "no terminal event (or no layer callback after a cancellation) within \
             {TERMINAL_PATIENCE:?} of the client leaving"
        ));
    }
    tokio::time::sleep(SETTLE).await;
    let settled = rec.snapshot(cell.id);
    if let Err(e) = settled.check(cell.expected()) {
        failures.push(e);
    }
    if let Err(e) = check_client(&cell, &seen) {
        failures.push(e);
    }
    CellResult {
        cell,
        seen,
        settled,
        failures,
    }
}

/// The matrix on a multi-thread runtime: the server's connection tasks, the clients and the
/// callbacks run on different threads, so a completion racing the client's reading is real.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completion_matrix() {
    matrix("multi-thread").await;
}

/// The same matrix with everything on one thread, as a `current_thread` server runs.
#[tokio::test(flavor = "current_thread")]
async fn completion_matrix_on_the_current_thread_runtime() {
    matrix("current-thread").await;
}

async fn matrix(runtime: &str) {
    println!("runtime: {runtime}");
    let started = Instant::now();
    let cells = cells();
    let rec = Recorder::new(cells.len());
    let shared = Arc::new(Shared {
        cells: cells.clone(),
        rec: rec.clone(),
    });
    let mut tonic = Vec::new();
    for cell in cells.iter().filter(|c| c.shape.server() == Family::Tonic) {
        tonic.push((cell.id, GrpcServer::start(&rec, *cell).await));
    }
    let run = Arc::new(Run {
        hyper: hyper_server(&shared).await,
        axum: axum_server(&shared).await,
        tonic: Mutex::new(tonic),
        shared,
    });

    let limit = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = JoinSet::new();
    for cell in cells.iter().copied() {
        let (run, limit) = (run.clone(), limit.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.unwrap();
            run_cell(&run, cell).await
        });
    }
    let mut results = Vec::new();
    while let Some(result) = tasks.join_next().await {
        results.push(result.expect("a cell's task panicked"));
    }
    results.sort_by_key(|r| r.cell.id);

    // Never late: once every connection is closed and every server stopped, nothing changed.
    run.hyper.idle().await;
    run.axum.idle().await;
    let servers = std::mem::take(&mut *run.tonic.lock().unwrap());
    for (_, server) in servers {
        server.stop().await;
    }
    for result in &mut results {
        let last = rec.snapshot(result.cell.id);
        if last != result.settled {
            result.failures.push(format!(
                "changed after settling: {:?} -> {:?}",
                result.settled, last
            ));
            result.settled = last;
        }
    }
    let unkeyed = rec.unkeyed.load(Ordering::SeqCst);
    let elapsed = started.elapsed();

    print_table(&results);
    let failures: Vec<String> = results
        .iter()
        .filter(|r| !r.failures.is_empty())
        .map(|r| format!("{}: {}", r.cell.describe(), r.failures.join("; ")))
        .collect();
    println!(
        "{} cells, {} failed, {elapsed:.2?}",
        results.len(),
        failures.len()
    );
    assert_eq!(unkeyed, 0, "layer callbacks for requests that name no cell");
    assert!(
        failures.is_empty(),
        "{} of {} cells failed:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n")
    );
}

/// Rows: shape × ending; columns: modes. `ok` completed, `H` Disconnected/Handler, `B`
/// Disconnected/Body (`x..` another reason), `+t` the client received the trailers, `!` the
/// cell failed (the list follows), `·` a cross that cannot exist.
fn print_table(results: &[CellResult]) {
    let mut out = String::new();
    out.push_str(&format!("{:<20} {:<17}", "shape", "ending"));
    for mode in Mode::ALL {
        out.push_str(&format!(" {:>6}", mode.name()));
    }
    out.push('\n');
    for shape in Shape::ALL {
        for ending in Ending::ALL {
            out.push_str(&format!("{:<20} {:<17}", shape.name(), ending.name()));
            for mode in Mode::ALL {
                let found = results.iter().find(|r| {
                    r.cell.shape == shape && r.cell.mode == mode && r.cell.ending == ending
                });
                let text = match found {
                    None => "·".to_owned(),
                    Some(r) => {
                        let mut text = match r.settled.events.as_slice() {
                            [] => "none".to_owned(),
                            [one] => one.short().to_owned(),
                            many => many.iter().map(|o| o.short()).collect::<Vec<_>>().join("+"),
                        };
                        if r.seen.as_ref().is_ok_and(|s| s.trailers) {
                            text.push_str("+t");
                        }
                        if !r.cell.mode.body_on_wire() && r.seen.as_ref().is_ok_and(Seen::got_body)
                        {
                            text.push('~');
                        }
                        if !r.failures.is_empty() {
                            text.push('!');
                        }
                        text
                    }
                };
                out.push_str(&format!(" {text:>6}"));
            }
            out.push('\n');
        }
    }
    out.push_str("ok completed, H Disconnected/Handler, B Disconnected/Body, +t trailers received, ~ body bytes, trailers or a reset after a head that has no body, ! failed, · no such cross\n");
    for r in results.iter().filter(|r| !r.failures.is_empty()) {
        out.push_str(&format!(
            "FAILED {}: {}\n",
            r.cell.describe(),
            r.failures.join("; ")
        ));
    }
    println!("{out}");
}
