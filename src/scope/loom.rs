//! Loom models of the scope state machine: every interleaving (loom's exhaustive search) of
//! completion, a drop before completion, shutdown, the deadline, the application cancelling the
//! token, handler registrations and a joining layer.
//!
//! Run with
//! `RUSTFLAGS="--cfg tower_cancel_loom -C debug-assertions" cargo test --release --lib loom`
//! (a separate target directory keeps the normal build: `CARGO_TARGET_DIR=target/loom`; debug
//! assertions on, so that a shutdown registration removed twice fails).
//! `LOOM_MAX_PREEMPTIONS` bounds the search. The cfg is the crate's own rather than
//! `loom`: under `--cfg loom`, Tokio leaves out `tokio::net`, which hyper-util needs.
//!
//! Invariants checked at the end of every interleaving:
//! * the scope ends in exactly one of completed and cancelled, and once cancelled, its recorded
//!   reason is one of the reasons that raced;
//! * the token is cancelled if and only if the scope was (or the application cancelled it);
//! * every callback (the layers' and the handler's) ran exactly once if the request was
//!   cancelled, and never if it completed;
//! * every registration was either run or dropped: nothing registered stays behind (the
//!   closures hold a marker whose count must return to one), and no layer keeps the scope in
//!   its shutdown registry.
//! * every model ends the response (the guard finishes or is dropped) and any detached handler:
//!   a cancelled request was then reported as stopped (how long it ran on after the
//!   cancellation) once, a completed one never.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use loom::thread;
use tokio_util::sync::CancellationToken;

use crate::record::{CancelReason, Cancelled};
use crate::runtime::callback::Callback;
use crate::runtime::deadline::TimeLimit;
use crate::runtime::shutdown::Shutdown;
use crate::scope::Scope;
use crate::scope::config::Bound;
use crate::scope::config::Config;

/// Runs `f` under loom, exhaustively unless `LOOM_MAX_PREEMPTIONS` bounds the search, and
/// prints how many interleavings it explored (shown with `--nocapture`).
fn model<F: Fn() + Sync + Send + 'static>(name: &str, f: F) {
    let builder = loom::model::Builder::new();
    let explored = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&explored);
    builder.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    println!(
        "{name}: {} interleavings",
        explored.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// Runs `f` on a new loom thread, with its own handle to `scope`.
fn on_thread<T, F>(scope: &Arc<Scope>, f: F) -> thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce(Arc<Scope>) -> T + Send + 'static,
{
    let scope = Arc::clone(scope);
    thread::spawn(move || f(scope))
}

/// Counts how often the callbacks of one layer (or the handler's) ran.
#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

impl Runs {
    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn hit(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A layer configuration with one sync callback counting into `runs`, and the shutdown
/// registry if `shutdown` is given.
fn config(runs: &Runs, shutdown: Option<&Shutdown>) -> Arc<Config> {
    let mut config = Config::new();
    let runs = runs.clone();
    config
        .callbacks
        .push(Callback::sync(move |_: &Cancelled| runs.hit()));
    config.shutdown = shutdown.cloned();
    Arc::new(config)
}

fn scope(config: &Arc<Config>) -> Arc<Scope> {
    Scope::for_test(config, None)
}

/// Registers a handler callback counting into `runs` and holding `marker`, as a handler's
/// closure would hold its state.
fn register(scope: &Scope, runs: &Runs, marker: &Arc<()>) {
    let (runs, marker) = (runs.clone(), Arc::clone(marker));
    scope.on_cancel(Box::new(move |_| {
        let _held = marker;
        runs.hit();
    }));
}

/// The invariants every model ends with.
fn check(scope: &Scope, layers: &[&Runs], handler: &Runs, marker: &Arc<()>) {
    assert!(
        !scope.is_armed(),
        "the request neither completed nor was cancelled"
    );
    let cancelled = usize::from(scope.cancellation().is_some());
    for runs in layers {
        assert_eq!(
            runs.count(),
            cancelled,
            "a layer's callbacks ran {} times",
            runs.count()
        );
    }
    assert_eq!(
        handler.count(),
        cancelled,
        "the handler's callback ran {} times",
        handler.count()
    );
    assert_eq!(
        Arc::strong_count(marker),
        1,
        "a registration was neither run nor dropped"
    );
    if cancelled == 1 {
        assert!(
            scope.token().is_cancelled(),
            "cancelled without cancelling the token"
        );
    }
    // Every model ends the response (its guard finishes or is dropped) before this, and any
    // detached handler or hold: a cancelled request was reported as stopped, a completed one
    // never. Only a cancelled request, or a held one (its response's end is marked so that a
    // later cancellation can report), tracks its response's end.
    let (over, detached, reported) = scope.tail();
    assert_eq!(
        detached, 0,
        "a detached handler or a hold still counted as running"
    );
    assert_eq!(
        reported,
        cancelled == 1,
        "stopped work: reported {reported}, cancelled {cancelled}"
    );
    assert!(
        over || cancelled == 0,
        "a cancelled request's response is not marked over"
    );
}

#[test]
fn loom_completion_races_shutdown_and_a_registration() {
    model("completion_races_shutdown_and_a_registration", || {
        let (layer, handler, marker) = (Runs::default(), Runs::default(), Arc::new(()));
        let shutdown = Shutdown::new(CancellationToken::new());
        let scope = scope(&config(&layer, Some(&shutdown)));

        let owner = on_thread(&scope, move |scope| {
            scope.enter_body();
            scope.finish();
        });
        let closer = {
            let shutdown = shutdown.clone();
            thread::spawn(move || {
                shutdown.close();
            })
        };
        register(&scope, &handler, &marker);
        owner.join().unwrap();
        closer.join().unwrap();

        check(&scope, &[&layer], &handler, &marker);
        if let Some((reason, _)) = scope.cancellation() {
            assert_eq!(reason, CancelReason::Shutdown);
        } else {
            assert!(
                !scope.token().is_cancelled(),
                "a completed request's token was cancelled"
            );
        }
    });
}

#[test]
fn loom_completion_races_the_application_cancelling_the_token() {
    model(
        "completion_races_the_application_cancelling_the_token",
        || {
            let (layer, handler, marker) = (Runs::default(), Runs::default(), Arc::new(()));
            let scope = scope(&config(&layer, None));

            let owner = on_thread(&scope, move |scope| {
                scope.enter_body();
                scope.finish();
            });
            let application = on_thread(&scope, move |scope| {
                scope.token().cancel();
                scope.reason()
            });
            register(&scope, &handler, &marker);
            owner.join().unwrap();
            application.join().unwrap();

            check(&scope, &[&layer], &handler, &marker);
            // Cancelled before the end: `Explicit`, and the callbacks ran (`check`). After it:
            // completed, and they did not.
            if let Some((reason, _)) = scope.cancellation() {
                assert_eq!(reason, CancelReason::Explicit);
            }
        },
    );
}

#[test]
fn loom_completion_races_the_deadline() {
    model("completion_races_the_deadline", || {
        let (layer, handler, marker) = (Runs::default(), Runs::default(), Arc::new(()));
        let scope = scope(&config(&layer, None));
        register(&scope, &handler, &marker);

        let timer = on_thread(&scope, move |scope| {
            scope.cancel(CancelReason::DeadlineExceeded)
        });
        scope.enter_body();
        scope.finish();
        let fired = timer.join().unwrap();

        check(&scope, &[&layer], &handler, &marker);
        // The timer learns what was recorded: its own deadline, or nothing if the request
        // completed first.
        assert_eq!(fired, scope.cancellation());
        if let Some((reason, _)) = fired {
            assert_eq!(reason, CancelReason::DeadlineExceeded);
        }
    });
}

#[test]
fn loom_completion_races_a_registration_and_leaves_no_entry() {
    model(
        "completion_races_a_registration_and_leaves_no_entry",
        || {
            let (layer, handler, marker) = (Runs::default(), Runs::default(), Arc::new(()));
            // A shutdown registry that is never closed: only completion can take the request out.
            let shutdown = Shutdown::new(CancellationToken::new());
            let scope = scope(&config(&layer, Some(&shutdown)));
            assert_eq!(shutdown.in_flight(), 1);

            let owner = on_thread(&scope, move |scope| {
                scope.enter_body();
                scope.finish();
            });
            register(&scope, &handler, &marker);
            owner.join().unwrap();

            check(&scope, &[&layer], &handler, &marker);
            assert_eq!(scope.cancellation(), None);
            assert_eq!(
                shutdown.in_flight(),
                0,
                "the completed request stayed registered"
            );
        },
    );
}

#[test]
fn loom_a_joining_layer_alone_races_completion() {
    model("a_joining_layer_alone_races_completion", || {
        let (outer, inner, handler, marker) = (
            Runs::default(),
            Runs::default(),
            Runs::default(),
            Arc::new(()),
        );
        let inner_shutdown = Shutdown::new(CancellationToken::new());
        let scope = scope(&config(&outer, None));
        let joining = config(&inner, Some(&inner_shutdown));

        let owner = on_thread(&scope, move |scope| scope.finish());
        // Nothing registers after the join on this thread: if the join lands after the
        // completion, the join alone must undo its registration.
        scope.join(Bound::capture(&joining), None);
        owner.join().unwrap();

        check(&scope, &[&outer, &inner], &handler, &marker);
        assert_eq!(
            inner_shutdown.in_flight(),
            0,
            "the joined layer kept the scope"
        );
    });
}

#[test]
fn loom_a_drop_races_the_deadline_and_the_application_cancelling_the_token() {
    model(
        "a_drop_races_the_deadline_and_the_application_cancelling_the_token",
        || {
            let (layer, handler, marker) = (Runs::default(), Runs::default(), Arc::new(()));
            let scope = scope(&config(&layer, None));
            register(&scope, &handler, &marker);

            let owner = on_thread(&scope, move |scope| scope.abandon(false));
            let timer = on_thread(&scope, move |scope| {
                scope.cancel(CancelReason::DeadlineExceeded);
            });
            scope.token().cancel();
            let seen = scope.reason();
            owner.join().unwrap();
            timer.join().unwrap();

            check(&scope, &[&layer], &handler, &marker);
            let (reason, _) = scope.cancellation().expect("every path cancels");
            assert!(matches!(
                reason,
                CancelReason::Disconnected
                    | CancelReason::DeadlineExceeded
                    | CancelReason::Explicit
            ));
            // What the application read right after cancelling is what stays recorded.
            assert_eq!(seen, Some(reason));
        },
    );
}

#[test]
fn loom_a_registration_races_a_drop() {
    model("a_registration_races_a_drop", || {
        let (layer, handler, marker) = (Runs::default(), Runs::default(), Arc::new(()));
        let scope = scope(&config(&layer, None));

        let owner = on_thread(&scope, move |scope| scope.abandon(false));
        register(&scope, &handler, &marker);
        owner.join().unwrap();

        // Registered before or after the drop, the callback runs exactly once.
        check(&scope, &[&layer], &handler, &marker);
        assert_eq!(handler.count(), 1);
    });
}

#[test]
fn loom_a_joining_layer_races_completion_or_a_drop() {
    for drop_it in [false, true] {
        let name = if drop_it {
            "a joining layer races a drop"
        } else {
            "a joining layer races completion"
        };
        model(name, move || {
            let (outer, inner, handler, marker) = (
                Runs::default(),
                Runs::default(),
                Runs::default(),
                Arc::new(()),
            );
            let inner_shutdown = Shutdown::new(CancellationToken::new());
            let scope = scope(&config(&outer, None));
            let joining = config(&inner, Some(&inner_shutdown));

            let owner = on_thread(&scope, move |scope| {
                if drop_it {
                    scope.abandon(false);
                } else {
                    scope.finish();
                }
            });
            scope.join(
                Bound::capture(&joining),
                Some(TimeLimit::server(std::time::Duration::from_secs(1))),
            );
            register(&scope, &handler, &marker);
            owner.join().unwrap();

            check(&scope, &[&outer, &inner], &handler, &marker);
            assert_eq!(scope.cancellation().is_some(), drop_it);
            assert_eq!(
                inner_shutdown.in_flight(),
                0,
                "the joined layer kept the scope"
            );
        });
    }
}

#[test]
fn loom_shutdown_races_a_new_request() {
    model("shutdown_races_a_new_request", || {
        let (layer, handler, marker) = (Runs::default(), Runs::default(), Arc::new(()));
        let shutdown = Shutdown::new(CancellationToken::new());
        let config = config(&layer, Some(&shutdown));

        let closer = {
            let shutdown = shutdown.clone();
            thread::spawn(move || {
                shutdown.close();
            })
        };
        let scope = scope(&config);
        register(&scope, &handler, &marker);
        closer.join().unwrap();
        // The request either was registered before the close, which cancelled it, or arrived
        // after it and started cancelled: it cannot miss the shutdown.
        let (reason, _) = scope
            .cancellation()
            .expect("the shutdown reached the request");
        assert_eq!(reason, CancelReason::Shutdown);
        scope.finish();

        check(&scope, &[&layer], &handler, &marker);
    });
}

/// The token's `cancel()` returns on one thread while a request arrives on another: if the
/// request's thread saw `cancel()` return before the request arrived, the request starts
/// cancelled, with no watcher having run; otherwise it is registered in flight and the
/// watcher's close (after `cancel()`, as the watcher runs once woken) cancels it. Either way
/// exactly once.
#[test]
fn loom_a_registration_after_cancel_returned_is_refused() {
    use crate::loom::atomic::{AtomicBool, Ordering};

    model("a_registration_after_cancel_returned_is_refused", || {
        let (layer, handler, marker) = (Runs::default(), Runs::default(), Arc::new(()));
        let token = CancellationToken::new();
        let shutdown = Shutdown::new(token.clone());
        let config = config(&layer, Some(&shutdown));
        let returned = Arc::new(AtomicBool::new(false));

        let canceller = {
            let returned = Arc::clone(&returned);
            thread::spawn(move || {
                token.cancel();
                returned.store(true, Ordering::Release);
            })
        };
        let after = returned.load(Ordering::Acquire);
        let scope = scope(&config);
        if after {
            assert_eq!(
                scope.cancellation(),
                Some((CancelReason::Shutdown, crate::Phase::Handler)),
                "a request that arrived after cancel() returned did not start cancelled"
            );
            assert_eq!(layer.count(), 1, "its callbacks did not run at once");
            assert!(scope.token().is_cancelled());
        }
        register(&scope, &handler, &marker);
        canceller.join().unwrap();
        // What the watcher does once it runs.
        shutdown.close();
        let (reason, _) = scope
            .cancellation()
            .expect("the shutdown reached the request");
        assert_eq!(reason, CancelReason::Shutdown);
        scope.finish();

        check(&scope, &[&layer], &handler, &marker);
    });
}

#[test]
fn loom_a_detached_handler_returning_races_the_drop_and_the_shutdown() {
    model(
        "a_detached_handler_returning_races_the_drop_and_the_shutdown",
        || {
            let (layer, handler, marker) = (Runs::default(), Runs::default(), Arc::new(()));
            let scope = scope(&config(&layer, None));
            register(&scope, &handler, &marker);
            scope.detach();

            let owner = on_thread(&scope, move |scope| scope.abandon(false));
            let shutdown = on_thread(&scope, move |scope| {
                scope.cancel(CancelReason::Shutdown);
            });
            scope.detached_stopped(crate::scope::Stopped::Ended);
            owner.join().unwrap();
            shutdown.join().unwrap();

            check(&scope, &[&layer], &handler, &marker);
            assert_eq!(
                scope.tail(),
                (true, 0, true),
                "reported once everything stopped"
            );
        },
    );
}

#[test]
fn loom_a_held_request_outlives_its_response_until_released_or_shut_down() {
    model(
        "a_held_request_outlives_its_response_until_released_or_shut_down",
        || {
            let (layer, handler, marker) = (Runs::default(), Runs::default(), Arc::new(()));
            let shutdown = Shutdown::new(CancellationToken::new());
            let scope = scope(&config(&layer, Some(&shutdown)));
            register(&scope, &handler, &marker);
            assert!(scope.hold());
            assert!(!scope.hold(), "held twice");

            // The response ends first: the request is still running, in phase Upgraded.
            on_thread(&scope, |scope| scope.finish()).join().unwrap();
            assert!(scope.is_armed(), "completed at the end of a held response");

            let releaser = on_thread(&scope, |scope| scope.release());
            let closer = {
                let shutdown = shutdown.clone();
                thread::spawn(move || shutdown.close())
            };
            releaser.join().unwrap();
            closer.join().unwrap();

            check(&scope, &[&layer], &handler, &marker);
            assert_eq!(scope.token().is_cancelled(), scope.cancellation().is_some());
            if let Some(cancellation) = scope.cancellation() {
                assert_eq!(
                    cancellation,
                    (CancelReason::Shutdown, crate::record::Phase::Upgraded)
                );
            }
        },
    );
}

#[test]
fn loom_the_end_of_a_held_response_races_the_release_and_the_shutdown() {
    model(
        "the_end_of_a_held_response_races_the_release_and_the_shutdown",
        || {
            let (layer, handler, marker) = (Runs::default(), Runs::default(), Arc::new(()));
            let shutdown = Shutdown::new(CancellationToken::new());
            let scope = scope(&config(&layer, Some(&shutdown)));
            register(&scope, &handler, &marker);
            assert!(scope.hold());

            let owner = on_thread(&scope, |scope| scope.finish());
            let releaser = on_thread(&scope, |scope| scope.release());
            let closer = {
                let shutdown = shutdown.clone();
                thread::spawn(move || shutdown.close())
            };
            owner.join().unwrap();
            releaser.join().unwrap();
            closer.join().unwrap();

            check(&scope, &[&layer], &handler, &marker);
            assert_eq!(scope.token().is_cancelled(), scope.cancellation().is_some());
            if let Some((reason, _)) = scope.cancellation() {
                assert_eq!(reason, CancelReason::Shutdown);
            }
        },
    );
}
