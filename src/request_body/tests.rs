//! Unit tests of the read-ahead: frames and hints exact under any interleaving of read-ahead
//! and handler polls, no wait on a body polled elsewhere, panics, and the budget.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::mem;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, mpsc};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use proptest::prelude::*;

use super::body::{Kind, RequestBody};
use super::read_ahead::*;
use super::*;

/// A waker that records that it was woken.
#[derive(Default)]
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Flag {
    fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

const SCRIPTED_PANIC: &str = "scripted body panics";

fn message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Keeps the panics these tests provoke out of the test output; others print as usual.
fn quiet_expected_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let text = message(info.payload());
            // Tokio's, when a timer is made on a runtime without the time driver.
            let no_timer = text.contains("timers are disabled");
            if text != SCRIPTED_PANIC && text != LOST && !no_timer {
                default(info);
            }
        }));
    });
}

/// One step of a scripted body's life.
#[derive(Debug, Clone)]
enum Step {
    Data(Vec<u8>),
    /// `Pending` once (waking at once).
    Pending,
    /// The handler polls its body from inside this body's `poll_frame` (so while the
    /// read-ahead has it checked out), then the script goes on.
    Reenter,
    /// `poll_frame` panics.
    Panic,
}

/// What a script's `Reenter` step calls, set once the handler's body exists.
type Callback = Rc<RefCell<Option<Box<dyn Fn()>>>>;

/// A body that plays a script. Its hints are exact: the data still in the script.
struct Script {
    steps: VecDeque<Step>,
    reenter: Callback,
}

impl Body for Script {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        loop {
            match self.steps.pop_front() {
                Some(Step::Data(data)) => {
                    return Poll::Ready(Some(Ok(Frame::data(data.into()))));
                }
                Some(Step::Pending) => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Some(Step::Reenter) => {
                    if let Some(reenter) = self.reenter.borrow().as_ref() {
                        reenter();
                    }
                }
                Some(Step::Panic) => panic!("{SCRIPTED_PANIC}"),
                None => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.steps.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let data = self.steps.iter().map(|step| match step {
            Step::Data(data) => data.len() as u64,
            _ => 0,
        });
        SizeHint::with_exact(data.sum())
    }
}

/// What the handler received.
#[derive(Default)]
struct Seen {
    bytes: Vec<u8>,
    ended: bool,
    panicked: Option<String>,
    /// The waker of the handler's last poll, if it returned `Pending`: it must have been
    /// woken by the time the operation that polled returns (a later poll supersedes it).
    waiting: Option<Arc<Flag>>,
    /// Bytes the whole body carries, when its hints can be checked (no panic).
    total: Option<u64>,
}

/// One poll of the handler's body; checks its hints against what is left.
fn handler_poll(body: &RefCell<RequestBody<Script>>, seen: &RefCell<Seen>) {
    // Re-entered from the handler's own poll (it took the body over): not a second handler.
    let Ok(mut body) = body.try_borrow_mut() else {
        return;
    };
    {
        let seen = seen.borrow();
        if seen.ended || seen.panicked.is_some() {
            return;
        }
        if let Some(total) = seen.total {
            let left = total - seen.bytes.len() as u64;
            let hint = body.size_hint();
            assert_eq!(
                (hint.lower(), hint.upper()),
                (left, Some(left)),
                "size_hint"
            );
        }
    }
    let said_end = body.is_end_stream();
    let flag = Arc::new(Flag::default());
    let waker = Waker::from(Arc::clone(&flag));
    let poll = catch_unwind(AssertUnwindSafe(|| {
        Pin::new(&mut *body).poll_frame(&mut Context::from_waker(&waker))
    }));
    let mut seen = seen.borrow_mut();
    assert!(
        !said_end || matches!(poll, Ok(Poll::Ready(None))),
        "is_end_stream, then more"
    );
    seen.waiting = None;
    match poll {
        Ok(Poll::Ready(Some(Ok(frame)))) => {
            seen.bytes.extend_from_slice(&frame.into_data().unwrap())
        }
        Ok(Poll::Ready(Some(Err(error)))) => panic!("a script never fails: {error}"),
        Ok(Poll::Ready(None)) => seen.ended = true,
        Ok(Poll::Pending) => seen.waiting = Some(flag),
        Err(panic) => seen.panicked = Some(message(&*panic)),
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Step::Data),
        2 => Just(Step::Pending),
        1 => Just(Step::Reenter),
    ]
}

proptest! {
    /// Any frame split, any interleaving of read-ahead and handler polls, the handler
    /// polling while the read-ahead has the body checked out, a body that panics, any
    /// per-request limit and any budget, partly held by another request: the handler
    /// receives exactly the original bytes in order (up to a panic, which it then sees),
    /// the hints stay exact, every `Pending` is woken, the buffer and the budget stay
    /// within their bounds, and every byte returns to the budget.
    #[test]
    fn read_ahead_reproduces_any_frame_split(
        mut steps in proptest::collection::vec(step(), 0..24),
        panic_at in proptest::option::weighted(0.25, 0usize..24),
        ops in proptest::collection::vec(any::<bool>(), 0..16),
        limit in 1usize..512,
        total in 1usize..512,
        neighbour in 0usize..512,
    ) {
        quiet_expected_panics();
        if let Some(at) = panic_at {
            steps.insert(at.min(steps.len()), Step::Panic);
        }
        let mut expected = Vec::new();
        for step in &steps {
            match step {
                Step::Data(data) => expected.extend_from_slice(data),
                Step::Panic => break,
                _ => {}
            }
        }
        let panics = panic_at.is_some();

        let budget = Arc::new(Budget::new(total));
        let mut other = Held::new(Arc::clone(&budget));
        other.add(neighbour);
        let reenter = Rc::new(RefCell::new(None));
        let script = Script { steps: steps.into(), reenter: Rc::clone(&reenter) };
        // `Kind::Shared` holds an `Arc`; this test stays on one thread.
        #[allow(clippy::arc_with_non_send_sync)]
        let shared = Arc::new(ReadAhead::new(script, None, limit, Arc::clone(&budget)));
        let body = Rc::new(RefCell::new(RequestBody {
            kind: Kind::Shared { shared: Arc::clone(&shared), own: None },
            idle: None,
            rate: None,
        }));
        let seen = Rc::new(RefCell::new(Seen {
            total: (!panics).then_some(expected.len() as u64),
            ..Seen::default()
        }));
        {
            let (body, seen): (Weak<_>, _) = (Rc::downgrade(&body), Rc::clone(&seen));
            *reenter.borrow_mut() = Some(Box::new(move || {
                if let Some(body) = body.upgrade() {
                    handler_poll(&body, &seen);
                }
            }) as Box<dyn Fn()>);
        }

        let mut cx = Context::from_waker(Waker::noop());
        let mut reading_ahead = true;
        let mut read_ahead_panicked = false;
        let check = |seen: &RefCell<Seen>| -> Result<(), TestCaseError> {
            if let Some(flag) = seen.borrow_mut().waiting.take() {
                prop_assert!(flag.is_set(), "a Pending handler poll was never woken");
            }
            let (mine, buffered) = {
                let state = shared.lock();
                (state.held.bytes, state.buffer.len)
            };
            prop_assert!(mine <= limit + 63, "bounded by the limit plus a frame");
            prop_assert!(mine <= limit.max(buffered), "no block reaches past the limit");
            prop_assert!(buffered <= mine, "every byte held is counted");
            let all = budget.held.load(Ordering::SeqCst);
            prop_assert_eq!(all, neighbour + mine);
            prop_assert!(mine == 0 || neighbour < total, "nothing read on a spent budget");
            prop_assert!(all <= neighbour.max(total + 63), "bounded by the budget plus a frame");
            Ok(())
        };
        for op in ops {
            if op {
                if reading_ahead {
                    match catch_unwind(AssertUnwindSafe(|| shared.read_ahead(&mut cx))) {
                        Ok(more) => reading_ahead = more,
                        Err(panic) => {
                            prop_assert_eq!(message(&*panic), SCRIPTED_PANIC);
                            reading_ahead = false;
                            read_ahead_panicked = true;
                        }
                    }
                }
            } else {
                handler_poll(&body, &seen);
            }
            check(&seen)?;
            if shared.lock().handler_started {
                // Once the handler reads, read-ahead stands down.
                prop_assert!(!shared.read_ahead(&mut cx));
                reading_ahead = false;
            }
        }
        for _ in 0..200 {
            handler_poll(&body, &seen);
            check(&seen)?;
            let seen = seen.borrow();
            if seen.ended || seen.panicked.is_some() {
                break;
            }
        }
        let seen = seen.borrow();
        prop_assert_eq!(&seen.bytes, &expected);
        if panics {
            let panicked = seen.panicked.as_deref();
            if read_ahead_panicked {
                prop_assert_eq!(panicked, Some(LOST), "the handler learns of the panic");
            } else {
                prop_assert!(panicked == Some(SCRIPTED_PANIC) || panicked == Some(LOST));
            }
        } else {
            prop_assert!(seen.ended && seen.panicked.is_none());
        }
        prop_assert!(budget.peak.load(Ordering::SeqCst) <= neighbour.max(total + 63));
        drop(seen);
        drop(body);
        drop(shared);
        prop_assert_eq!(budget.held.load(Ordering::SeqCst), neighbour, "all given back");
        drop(other);
        prop_assert_eq!(budget.held.load(Ordering::SeqCst), 0);
    }
}

/// A `Send` body whose first `poll_frame` blocks its thread until released.
struct Blocking {
    entered: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
    polled: bool,
}

impl Body for Blocking {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if mem::replace(&mut self.polled, true) {
            return Poll::Ready(None);
        }
        self.entered.send(()).unwrap();
        let _ = self.release.recv();
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"ahead")))))
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(if self.polled { 0 } else { 5 })
    }
}

#[test]
fn the_handler_never_waits_for_a_body_polled_on_another_thread() {
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let body = Blocking {
        entered: entered_tx,
        release: release_rx,
        polled: false,
    };
    let budget = Arc::new(Budget::new(1 << 20));
    let shared = Arc::new(ReadAhead::new(body, None, 1024, Arc::clone(&budget)));
    let reader = {
        let shared = Arc::clone(&shared);
        thread::spawn(move || shared.read_ahead(&mut Context::from_waker(Waker::noop())))
    };
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the read-ahead polls the body");
    // Releases the body after 3 s if the test has not, and says it had to: a handler that
    // waits for the read-ahead's poll fails this test instead of hanging it.
    let (stop, stopped) = mpsc::channel::<()>();
    let watchdog = {
        let release = release.clone();
        thread::spawn(move || {
            let fired = stopped.recv_timeout(Duration::from_secs(3)).is_err();
            if fired {
                let _ = release.send(());
            }
            fired
        })
    };

    let woken = Arc::new(Flag::default());
    let waker = Waker::from(Arc::clone(&woken));
    let mut body = RequestBody {
        kind: Kind::Shared {
            shared: Arc::clone(&shared),
            own: None,
        },
        idle: None,
        rate: None,
    };
    let started = Instant::now();
    let poll = Pin::new(&mut body).poll_frame(&mut Context::from_waker(&waker));
    let end = body.is_end_stream();
    let hint = body.size_hint();
    let took = started.elapsed();
    let _ = stop.send(());
    let fired = watchdog.join().unwrap();
    assert!(
        !fired,
        "the handler's poll_frame, is_end_stream and size_hint returned after {took:?}, \
         only once the watchdog released the body the read-ahead was polling"
    );
    assert!(
        poll.is_pending(),
        "the body is checked out: Pending, not {poll:?}"
    );
    assert!(!end);
    assert_eq!((hint.lower(), hint.upper()), (5, Some(5)));
    assert!(!woken.is_set(), "woken before the body is back");

    release.send(()).unwrap();
    assert!(
        !reader.join().unwrap(),
        "the read-ahead stands down once the handler has polled"
    );
    assert!(woken.is_set(), "putting the body back wakes the handler");
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(&mut body).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => assert_eq!(frame.into_data().unwrap(), "ahead"),
        other => panic!("expected the frame read ahead, got {other:?}"),
    }
    assert!(matches!(
        Pin::new(&mut body).poll_frame(&mut cx),
        Poll::Ready(None)
    ));
    drop((body, shared));
    assert_eq!(budget.held.load(Ordering::SeqCst), 0);
}

/// Yields `Data` frames with a `Pending` before each, then panics if `panics`, or ends.
struct Frames {
    frames: VecDeque<&'static [u8]>,
    pending: bool,
    panics: bool,
}

impl Frames {
    fn new(frames: &[&'static [u8]], panics: bool) -> Self {
        Self {
            frames: frames.iter().copied().collect(),
            pending: false,
            panics,
        }
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if !mem::replace(&mut self.pending, true) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.pending = false;
        match self.frames.pop_front() {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data))))),
            None if self.panics => panic!("{SCRIPTED_PANIC}"),
            None => Poll::Ready(None),
        }
    }
}

#[test]
fn a_body_that_panics_while_read_ahead_fails_the_handler_loudly() {
    quiet_expected_panics();
    let budget = Arc::new(Budget::new(1 << 20));
    let shared = Arc::new(ReadAhead::new(
        Frames::new(&[b"first"], true),
        None,
        1024,
        Arc::clone(&budget),
    ));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(shared.read_ahead(&mut cx), "pending");
    assert!(shared.read_ahead(&mut cx), "read `first`, then pending");
    let panic = catch_unwind(AssertUnwindSafe(|| shared.read_ahead(&mut cx))).unwrap_err();
    assert_eq!(
        message(&*panic),
        SCRIPTED_PANIC,
        "the body's panic, unchanged"
    );
    assert!(!shared.read_ahead(&mut cx), "a lost body is not read again");
    // `first` was copied into a block as large as the request's limit (the body gives no
    // size): what is held is that block.
    assert_eq!(budget.held.load(Ordering::SeqCst), 1024);

    let mut body = RequestBody {
        kind: Kind::Shared {
            shared: Arc::clone(&shared),
            own: None,
        },
        idle: None,
        rate: None,
    };
    assert!(!body.is_end_stream());
    match Pin::new(&mut body).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => assert_eq!(frame.into_data().unwrap(), "first"),
        other => panic!("expected the frame read ahead, got {other:?}"),
    }
    assert!(!body.is_end_stream(), "a panic is not the end of the body");
    let panic =
        catch_unwind(AssertUnwindSafe(|| Pin::new(&mut body).poll_frame(&mut cx))).unwrap_err();
    assert_eq!(message(&*panic), LOST);
    assert!(
        !shared.state.is_poisoned(),
        "no lock was held across a panic"
    );
    drop((body, shared));
    assert_eq!(budget.held.load(Ordering::SeqCst), 0);
}

/// Pending `n` times (waking at once), then ready.
struct Yield(usize);

impl Future for Yield {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 == 0 {
            return Poll::Ready(());
        }
        self.0 -= 1;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Collects the `message` of every event, prefixed by its level and target.
struct Events(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Events {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        let meta = event.metadata();
        let line = format!("{} {} {}", meta.level(), meta.target(), message.0);
        self.0.lock().unwrap().push(line);
    }
}

#[test]
fn a_request_that_finds_the_budget_spent_reads_no_further_and_says_so_once() {
    use http_body_util::BodyExt;
    use tracing_subscriber::layer::SubscriberExt;

    let events = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Events(Arc::clone(&events)));
    let layer = RequestBodyLayer::new().read_ahead(100).read_ahead_total(4);
    let handler = tower::service_fn(|req: Request<RequestBody<Frames>>| async move {
        Yield(20).await;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Ok::<_, Infallible>(http::Response::new(body))
    });
    let mut svc = layer.layer(handler);
    let frames: &[&[u8]] = &[b"abc", b"def", b"ghi", b"jkl"];
    let body = tracing::subscriber::with_default(subscriber, || {
        let mut future = std::pin::pin!(svc.call(Request::new(Frames::new(frames, false))));
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(body) = future.as_mut().poll(&mut cx) {
                break body.unwrap().into_body();
            }
        }
    });
    assert_eq!(body, "abcdefghijkl");
    let spent: Vec<_> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.contains("budget spent"))
        .cloned()
        .collect();
    assert_eq!(
        spent,
        [
            "DEBUG tower_cancel read-ahead budget spent: the rest of this request body is not read ahead"
        ]
    );
    // `abc` is copied into a block no larger than what the budget had left (4 bytes), which
    // spends it: nothing more is read ahead.
    assert_eq!(layer.read_ahead_peak(), 4);
    assert_eq!(layer.read_ahead_held(), 0);
}

/// Frames of `len` bytes, forever; before the first, runs `before` (once).
struct Frames1 {
    len: usize,
    before: Option<Box<dyn FnOnce()>>,
}

impl Body for Frames1 {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(before) = self.before.take() {
            before();
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![7; self.len])))))
    }
}

#[test]
fn a_request_that_read_while_another_spent_the_budget_takes_no_more_than_its_frame() {
    // Request A checks its body out, and while A's body is being polled (another thread, in a
    // server), request B reads ahead until the budget is spent. A's frame then gets a block of
    // its own size only (the budget is reserved when the block is made, not when the body was
    // checked out): the budget holds, plus that one frame.
    const TOTAL: usize = 10 * 1024;
    let budget = Arc::new(Budget::new(TOTAL));
    let limit = 64 * 1024;
    let b_body = Frames1 {
        len: 1024,
        before: None,
    };
    #[allow(clippy::arc_with_non_send_sync)]
    let b = Arc::new(ReadAhead::new(b_body, None, limit, Arc::clone(&budget)));
    let b_in_a = Arc::clone(&b);
    let a_body = Frames1 {
        len: 100,
        before: Some(Box::new(move || {
            let mut cx = Context::from_waker(Waker::noop());
            assert!(!b_in_a.read_ahead(&mut cx), "B stops: the budget is spent");
        })),
    };
    #[allow(clippy::arc_with_non_send_sync)]
    let a = Arc::new(ReadAhead::new(a_body, None, limit, Arc::clone(&budget)));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(
        !a.read_ahead(&mut cx),
        "A stops after its frame: the budget is spent"
    );
    assert_eq!(b.lock().held.bytes, TOTAL, "B holds exactly the budget");
    assert_eq!(a.lock().buffer.len, 100);
    assert_eq!(
        a.lock().held.bytes,
        100,
        "A's frame, in a block of its own size"
    );
    assert_eq!(budget.peak.load(Ordering::SeqCst), TOTAL + 100);
    drop((a, b));
    assert_eq!(budget.held.load(Ordering::SeqCst), 0);
}

#[test]
fn one_budget_per_layer_shared_by_every_clone_before_and_after_read_ahead_total() {
    let layer = RequestBodyLayer::new().read_ahead(10);
    let earlier = layer.clone();
    let later = layer.clone().read_ahead_total(100);
    assert!(Arc::ptr_eq(&layer.budget, &earlier.budget));
    assert!(Arc::ptr_eq(&layer.budget, &later.budget));
    assert!(Arc::ptr_eq(&layer.budget, &layer.layer(()).budget));
    assert_eq!(
        earlier.budget.total(),
        100,
        "a clone made earlier follows the new total"
    );
    let other = RequestBodyLayer::new();
    assert!(
        !Arc::ptr_eq(&layer.budget, &other.budget),
        "new() makes a budget of its own"
    );
    assert_eq!(
        other.budget.total(),
        RequestBodyLayer::DEFAULT_READ_AHEAD_TOTAL
    );
    assert_eq!(RequestBodyLayer::DEFAULT_READ_AHEAD_TOTAL, 64 << 20);
}

// The idle timeout, on Tokio's paused clock.

mod idle_timeout {
    use http_body_util::BodyExt;
    use tokio::time::{Instant, sleep};

    use super::*;
    use crate::record::{CancelReason, Phase};
    use crate::request_body::idle::BoxError;

    const IDLE: Duration = Duration::from_millis(200);

    /// What the test feeds the body with.
    #[derive(Default)]
    struct FeedState {
        frames: VecDeque<Result<Frame<Bytes>, Refused>>,
        ended: bool,
        waker: Option<Waker>,
        polls: usize,
    }

    /// The sending side of a [`Fed`] body.
    #[derive(Clone, Default)]
    struct Feed(Arc<Mutex<FeedState>>);

    impl Feed {
        fn with(&self, f: impl FnOnce(&mut FeedState)) {
            let waker = {
                let mut state = self.0.lock().unwrap();
                f(&mut state);
                state.waker.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }

        fn data(&self, data: &'static str) {
            self.with(|s| s.frames.push_back(Ok(Frame::data(Bytes::from(data)))));
        }

        fn trailers(&self) {
            self.with(|s| {
                s.frames
                    .push_back(Ok(Frame::trailers(http::HeaderMap::new())))
            });
        }

        fn fail(&self) {
            self.with(|s| s.frames.push_back(Err(Refused)));
        }

        fn end(&self) {
            self.with(|s| s.ended = true);
        }

        fn polls(&self) -> usize {
            self.0.lock().unwrap().polls
        }

        fn body(&self) -> Fed {
            Fed(self.clone())
        }
    }

    /// The inner body's own error.
    #[derive(Debug, PartialEq)]
    struct Refused;

    impl fmt::Display for Refused {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("refused")
        }
    }

    impl std::error::Error for Refused {}

    /// A body that yields what its [`Feed`] is given, and is `Pending` while it has nothing.
    struct Fed(Feed);

    impl Body for Fed {
        type Data = Bytes;
        type Error = Refused;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Refused>>> {
            let mut state = (self.0).0.lock().unwrap();
            state.polls += 1;
            if let Some(frame) = state.frames.pop_front() {
                return Poll::Ready(Some(frame));
            }
            if state.ended {
                return Poll::Ready(None);
            }
            state.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    fn direct(feed: &Feed, request: Option<&RequestCancellation>) -> RequestBody<Fed> {
        RequestBody {
            kind: Kind::Direct {
                inner: feed.body(),
                request: request.cloned(),
            },
            idle: Some(IdleClock::new(IDLE, TimedOut::default())),
            rate: None,
        }
    }

    fn timeout_of(error: &BoxError) -> IdleTimeout {
        *error
            .downcast_ref::<IdleTimeout>()
            .unwrap_or_else(|| panic!("not an IdleTimeout: {error}"))
    }

    /// `future`'s output, or a failure after an hour (of paused time: at once) instead of a
    /// hang, when the clock never fires.
    async fn within_an_hour<F: Future>(future: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(3600), future)
            .await
            .expect("still waiting after an hour")
    }

    async fn read(body: &mut RequestBody<Fed>) -> Option<Result<Frame<Bytes>, BoxError>> {
        within_an_hour(body.frame()).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_that_waits_idle_fails_cancels_and_ends_the_body() {
        let rc = RequestCancellation::for_test();
        let feed = Feed::default();
        feed.data("head");
        let mut body = direct(&feed, Some(&rc));
        // Busy first: a body that is all there never starts the clock.
        sleep(IDLE * 5).await;
        let frame = read(&mut body).await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "head");
        let started = Instant::now();
        let error = read(&mut body).await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), IDLE, "the clock starts at the wait");
        assert_eq!(timeout_of(&error).idle(), IDLE);
        assert_eq!(error.to_string(), "no request body bytes arrived for 200ms");
        assert_eq!(rc.reason(), Some(CancelReason::SlowClient));
        assert_eq!(rc.record().phase(), Phase::Handler);

        // Over: `None` forever, the inner body never polled again, even with more to give.
        let polls = feed.polls();
        feed.data("late");
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        for _ in 0..3 {
            assert!(read(&mut body).await.is_none());
        }
        assert_eq!(feed.polls(), polls);
    }

    #[tokio::test(start_paused = true)]
    async fn every_frame_restarts_the_clock() {
        let rc = RequestCancellation::for_test();
        let feed = Feed::default();
        let body = direct(&feed, Some(&rc));
        let sender = {
            let feed = feed.clone();
            tokio::spawn(async move {
                for _ in 0..6 {
                    sleep(IDLE * 3 / 4).await;
                    feed.data("tick");
                }
                sleep(IDLE * 3 / 4).await;
                feed.trailers();
                sleep(IDLE * 3 / 4).await;
                feed.end();
            })
        };
        let started = Instant::now();
        let collected = within_an_hour(body.collect()).await.expect("no timeout");
        assert_eq!(started.elapsed(), IDLE * 3 / 4 * 8, "6 idle times long");
        assert!(collected.trailers().is_some(), "trailers restart it too");
        assert_eq!(collected.to_bytes(), "tick".repeat(6));
        assert_eq!(rc.reason(), None);
        sender.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_handler_spends_elsewhere_does_not_count() {
        let rc = RequestCancellation::for_test();
        let feed = Feed::default();
        let mut body = direct(&feed, Some(&rc));
        let sender = {
            let feed = feed.clone();
            tokio::spawn(async move {
                sleep(IDLE * 5 / 2).await;
                feed.data("one");
                sleep(IDLE * 2).await;
                feed.data("two");
                sleep(IDLE * 10).await;
                feed.data("three");
                sleep(IDLE * 7 / 2).await;
                feed.end();
            })
        };
        // Busy for 2 × IDLE before the first read, which then waits IDLE / 2 for `one`.
        sleep(IDLE * 2).await;
        let started = Instant::now();
        assert_eq!(
            read(&mut body).await.unwrap().unwrap().into_data().unwrap(),
            "one"
        );
        assert_eq!(started.elapsed(), IDLE / 2);
        // t = 2.5 × IDLE: busy for 5 × IDLE while `two` arrives.
        sleep(IDLE * 5).await;
        assert_eq!(
            read(&mut body).await.unwrap().unwrap().into_data().unwrap(),
            "two"
        );
        // t = 7.5 × IDLE: busy past the arrival of `three`, then waits IDLE / 2 for the end.
        sleep(IDLE * 10).await;
        assert_eq!(
            read(&mut body).await.unwrap().unwrap().into_data().unwrap(),
            "three"
        );
        let started = Instant::now();
        assert!(read(&mut body).await.is_none());
        assert_eq!(started.elapsed(), IDLE / 2);
        assert_eq!(rc.reason(), None);
        sender.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_body_s_own_errors_pass_boxed_and_unchanged() {
        let rc = RequestCancellation::for_test();
        let feed = Feed::default();
        feed.fail();
        let mut body = direct(&feed, Some(&rc));
        let error = read(&mut body).await.unwrap().unwrap_err();
        assert_eq!(error.downcast_ref::<Refused>(), Some(&Refused));
        assert!(IdleTimeout::find(&*error).is_none());
        assert_eq!(rc.reason(), Some(CancelReason::Disconnected));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_scope_the_read_fails_all_the_same() {
        let feed = Feed::default();
        let layer = RequestBodyLayer::new().idle_timeout(IDLE);
        let handler = tower::service_fn(|req: Request<RequestBody<Fed>>| async move {
            let started = Instant::now();
            let error = within_an_hour(req.into_body().collect()).await.unwrap_err();
            let answer = (timeout_of(&error), started.elapsed());
            Ok::<_, Infallible>(http::Response::new(answer))
        });
        // No `CancellationLayer`: no scope in the extensions.
        let (timeout, took) =
            tower::ServiceExt::oneshot(layer.layer(handler), Request::new(feed.body()))
                .await
                .unwrap()
                .into_body();
        assert_eq!((timeout.idle(), took), (IDLE, IDLE));
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_option_a_read_waits_as_long_as_it_takes() {
        let feed = Feed::default();
        let layer = RequestBodyLayer::new();
        let mut request = Request::new(feed.body());
        request
            .extensions_mut()
            .insert(RequestCancellation::for_test());
        let handler = tower::service_fn(|req: Request<RequestBody<Fed>>| async move {
            let mut body = req.into_body();
            let waited = tokio::time::timeout(Duration::from_secs(3600), body.frame()).await;
            Ok::<_, Infallible>(http::Response::new(waited.is_err()))
        });
        assert!(
            tower::ServiceExt::oneshot(layer.layer(handler), request)
                .await
                .unwrap()
                .into_body()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn read_ahead_frames_come_at_once_and_waits_on_it_count() {
        for steady in [false, true] {
            let feed = Feed::default();
            feed.data("ahead-1");
            feed.data("ahead-2");
            let rc = RequestCancellation::for_test();
            let layer = RequestBodyLayer::new().idle_timeout(IDLE).read_ahead(1024);
            let handler = tower::service_fn(|req: Request<RequestBody<Fed>>| async move {
                // Busy for 5 × IDLE: the response future reads the body ahead meanwhile.
                sleep(IDLE * 5).await;
                let mut body = req.into_body();
                let mut got = Vec::new();
                let mut waited = Vec::new();
                loop {
                    let started = Instant::now();
                    match within_an_hour(body.frame()).await {
                        Some(Ok(frame)) => got.push(frame.into_data().unwrap()),
                        Some(Err(error)) => {
                            waited.push(started.elapsed());
                            let answer = (got, Some(timeout_of(&error)), waited);
                            return Ok::<_, Infallible>(http::Response::new(answer));
                        }
                        None => return Ok(http::Response::new((got, None, waited))),
                    }
                    waited.push(started.elapsed());
                }
            });
            let sender = steady.then(|| {
                let feed = feed.clone();
                tokio::spawn(async move {
                    sleep(IDLE * 5).await;
                    for _ in 0..4 {
                        sleep(IDLE / 2).await;
                        feed.data("steady");
                    }
                    feed.end();
                })
            });
            let mut request = Request::new(feed.body());
            request.extensions_mut().insert(rc.clone());
            let mut svc = layer.layer(handler);
            let (got, timeout, waited) = svc.call(request).await.unwrap().into_body();
            let zero = Duration::ZERO;
            if steady {
                // What was read ahead comes as one chunk.
                assert_eq!(
                    got,
                    ["ahead-1ahead-2", "steady", "steady", "steady", "steady"]
                );
                assert_eq!(timeout, None);
                assert_eq!(waited, [zero, IDLE / 2, IDLE / 2, IDLE / 2, IDLE / 2]);
                assert_eq!(rc.reason(), None);
                sender.unwrap().await.unwrap();
            } else {
                assert_eq!(got, ["ahead-1ahead-2"]);
                assert_eq!(timeout.map(|t| t.idle()), Some(IDLE));
                assert_eq!(waited, [zero, IDLE], "read ahead: at once; then the clock");
                assert_eq!(rc.reason(), Some(CancelReason::SlowClient));
            }
        }
    }

    /// The handler's answer, once it has read its body (`read`) and the body has (`stalled`) or
    /// has not timed out: what the layer hands on.
    async fn answer(
        read: bool,
        stalled: bool,
        status: http::StatusCode,
        version: http::Version,
    ) -> (http::Response<&'static str>, RequestCancellation) {
        let rc = RequestCancellation::for_test();
        let feed = Feed::default();
        feed.data("half");
        if !stalled {
            feed.end();
        }
        let handler = tower::service_fn(move |req: Request<RequestBody<Fed>>| async move {
            if read {
                let started = Instant::now();
                let read = within_an_hour(req.into_body().collect()).await;
                let waited = if stalled { IDLE } else { Duration::ZERO };
                assert_eq!((read.is_err(), started.elapsed()), (stalled, waited));
            }
            let response = http::Response::builder()
                .status(status)
                .header("content-type", "text/plain")
                .header("content-length", "4")
                .body("kept")
                .unwrap();
            Ok::<_, Infallible>(response)
        });
        let mut request = Request::new(feed.body());
        *request.version_mut() = version;
        request.extensions_mut().insert(rc.clone());
        let layer = RequestBodyLayer::new().idle_timeout(IDLE);
        let response = tower::ServiceExt::oneshot(layer.layer(handler), request).await;
        (response.unwrap(), rc)
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_timeout_a_400_or_500_becomes_408_with_the_handler_s_headers_and_body() {
        use http::{StatusCode, Version};
        use tracing_subscriber::layer::SubscriberExt;

        let events = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Events(Arc::clone(&events)));
        let _events = tracing::subscriber::set_default(subscriber);
        let cases = [
            (StatusCode::BAD_REQUEST, Version::HTTP_11),
            (StatusCode::INTERNAL_SERVER_ERROR, Version::HTTP_10),
            (StatusCode::BAD_REQUEST, Version::HTTP_2),
            (StatusCode::INTERNAL_SERVER_ERROR, Version::HTTP_3),
        ];
        for (status, version) in cases {
            let (response, rc) = answer(true, true, status, version).await;
            assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT, "{status}");
            // The handler's headers and body: the length stays true.
            assert_eq!(response.headers()["content-length"], "4");
            assert_eq!(response.headers()["content-type"], "text/plain");
            assert_eq!(*response.body(), "kept");
            // RFC 9110 §15.5.9 over HTTP/1.x; a connection header is not HTTP/2's or 3's.
            let connection = response.headers().get("connection");
            if version <= Version::HTTP_11 {
                assert_eq!(connection.unwrap(), "close", "{version:?}");
            } else {
                assert_eq!(connection, None, "{version:?}");
            }
            // The recorded cancellation is the read's, unchanged.
            assert_eq!(rc.reason(), Some(CancelReason::SlowClient));
            assert_eq!(rc.record().phase(), Phase::Handler);
        }
        let answered: Vec<_> = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.contains("408"))
            .cloned()
            .collect();
        let event = "DEBUG tower_cancel the request body's idle timeout or minimum rate ran \
                     out: answering 408 Request Timeout in place of the handler's status";
        assert_eq!(answered, [event; 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn any_other_answer_and_any_answer_without_a_timeout_pass_unchanged() {
        use http::{StatusCode, Version};

        // After the timeout: statuses the handler chose for a reason of its own, its own 408
        // (no `connection` added), and success.
        for status in [200, 204, 302, 408, 413, 415, 422, 429, 503, 504] {
            let status = StatusCode::from_u16(status).unwrap();
            let (response, rc) = answer(true, true, status, Version::HTTP_11).await;
            assert_eq!(response.status(), status);
            assert_eq!(response.headers().get("connection"), None, "{status}");
            assert_eq!(rc.reason(), Some(CancelReason::SlowClient));
        }
        // No timeout: a handler that answered before reading, and one whose body came whole.
        for (read, stalled) in [(false, true), (true, false)] {
            for status in [StatusCode::BAD_REQUEST, StatusCode::INTERNAL_SERVER_ERROR] {
                let (response, rc) = answer(read, stalled, status, Version::HTTP_11).await;
                assert_eq!(response.status(), status, "read {read}, stalled {stalled}");
                assert_eq!(response.headers().get("connection"), None);
                assert_eq!(rc.reason(), None);
            }
        }
    }

    #[test]
    fn without_a_timer_the_timeout_is_not_enforced_and_says_so_once() {
        use tracing_subscriber::layer::SubscriberExt;

        quiet_expected_panics();
        let events = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Events(Arc::clone(&events)));
        // A runtime without the time driver.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let rc = RequestCancellation::for_test();
        let feed = Feed::default();
        let mut body = direct(&feed, Some(&rc));
        tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(async {
                let mut cx = Context::from_waker(Waker::noop());
                for _ in 0..3 {
                    assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
                }
            });
        });
        feed.data("late");
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => assert_eq!(frame.into_data().unwrap(), "late"),
            other => panic!("expected the frame, got {other:?}"),
        }
        let unenforced: Vec<_> = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.contains("idle timeout"))
            .cloned()
            .collect();
        assert_eq!(
            unenforced,
            [
                "ERROR tower_cancel no Tokio timer is available (no runtime, or its time driver \
                 is disabled): the request body's idle timeout is not enforced"
            ]
        );
        assert_eq!(rc.reason(), None);
    }

    #[test]
    fn the_body_stays_send_sync_and_unpin() {
        fn check<T: Send + Sync + Unpin>() {}
        check::<RequestBody<http_body_util::Full<Bytes>>>();
        check::<IdleTimeout>();
        let body = direct(&Feed::default(), None);
        assert!(format!("{body:?}").contains("idle: Some(IdleClock { idle: 200ms"));
    }

    /// Wraps an error as its source, as `axum::Error` does.
    #[derive(Debug)]
    struct Wrapper(BoxError);

    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "wrapped: {}", self.0)
        }
    }

    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn find_walks_the_source_chain() {
        let timeout = IdleTimeout::new(Duration::from_secs(30));
        assert_eq!(timeout.to_string(), "no request body bytes arrived for 30s");
        let wrapped = Wrapper(Box::new(Wrapper(Box::new(timeout))));
        assert_eq!(IdleTimeout::find(&wrapped), Some(&timeout));
        assert_eq!(IdleTimeout::find(&Wrapper(Box::new(Refused))), None);
        assert_eq!(IdleTimeout::find(&Refused), None);
    }

    // The minimum rate, on the same paused clock and fed bodies.

    fn rated(feed: &Feed, request: &RequestCancellation) -> RequestBody<Fed> {
        RequestBody {
            kind: Kind::Direct {
                inner: feed.body(),
                request: Some(request.clone()),
            },
            idle: None,
            // 100 B/s once the handler has waited 1 s.
            rate: Some(RateClock::new(
                100,
                Duration::from_secs(1),
                TimedOut::default(),
            )),
        }
    }

    /// Feeds 10 bytes every `every`, `frames` times, then ends the body.
    fn trickle(feed: &Feed, every: Duration, frames: usize) -> tokio::task::JoinHandle<()> {
        let feed = feed.clone();
        tokio::spawn(async move {
            for _ in 0..frames {
                sleep(every).await;
                feed.data("0123456789");
            }
            feed.end();
        })
    }

    /// Reads to the end or the first error: the bytes read, and the error.
    async fn read_all(body: &mut RequestBody<Fed>) -> (usize, Option<BoxError>) {
        let mut bytes = 0;
        while let Some(frame) = read(body).await {
            match frame {
                Ok(frame) => bytes += frame.into_data().map_or(0, |data| data.len()),
                Err(error) => return (bytes, Some(error)),
            }
        }
        (bytes, None)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_below_the_minimum_rate_fails_when_it_falls_behind() {
        // 10 bytes every 300 ms is 33 B/s: when the 1 s of grace runs out, 30 bytes in 1 s of
        // waiting are behind 100 B/s, and the read fails then.
        let rc = RequestCancellation::for_test();
        let feed = Feed::default();
        let mut body = rated(&feed, &rc);
        let _sender = trickle(&feed, Duration::from_millis(300), 100);
        let started = Instant::now();
        let (bytes, error) = read_all(&mut body).await;
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(bytes, 30);
        let error = error.expect("too slow");
        let slow = error.downcast_ref::<TooSlow>().expect("a TooSlow");
        assert_eq!(
            (slow.min_rate(), slow.received(), slow.waited()),
            (100, 30, Duration::from_secs(1))
        );
        assert_eq!(TooSlow::find(&*error), Some(slow));
        assert_eq!(rc.reason(), Some(CancelReason::SlowClient));
        assert!(body.is_end_stream());
        assert!(read(&mut body).await.is_none(), "over");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_just_above_the_minimum_rate_never_fails() {
        // 10 bytes every 90 ms is 111 B/s, for 9 s.
        let rc = RequestCancellation::for_test();
        let feed = Feed::default();
        let mut body = rated(&feed, &rc);
        let _sender = trickle(&feed, Duration::from_millis(90), 100);
        let (bytes, error) = read_all(&mut body).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(bytes, 1000);
        assert_eq!(rc.reason(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_body_fails_at_the_end_of_the_grace() {
        let rc = RequestCancellation::for_test();
        let feed = Feed::default();
        let mut body = rated(&feed, &rc);
        let started = Instant::now();
        let (bytes, error) = read_all(&mut body).await;
        assert_eq!((bytes, started.elapsed()), (0, Duration::from_secs(1)));
        assert!(error.unwrap().is::<TooSlow>());
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_time_the_handler_waits_counts() {
        // Every byte is there at once; the handler takes 1 s per frame: the client is not
        // slow, the handler is, and nothing fails.
        let rc = RequestCancellation::for_test();
        let feed = Feed::default();
        for _ in 0..20 {
            feed.data("0123456789");
        }
        feed.end();
        let mut body = rated(&feed, &rc);
        let mut bytes = 0;
        while let Some(frame) = read(&mut body).await {
            bytes += frame.unwrap().into_data().unwrap().len();
            sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(bytes, 200);
        assert_eq!(rc.reason(), None);
    }
}
