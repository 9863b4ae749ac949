//! Unit tests of the scope state machine: transitions, callback order, late registration,
//! joining layers, and the races of completion against registration (std threads).

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::thread;

use super::*;
use crate::runtime::callback::Callback;
use crate::runtime::shutdown::Shutdown;
use crate::scope::config::Config;

type Log = Arc<Mutex<Vec<String>>>;

fn hooks_logging(log: &Log, name: &'static str) -> Arc<Config> {
    let mut config = Config::new();
    for i in 1..=2 {
        let log = log.clone();
        config.callbacks.push(Callback::sync(move |c: &Cancelled| {
            log.lock()
                .unwrap()
                .push(format!("{name}{i}:{}", c.reason()));
        }));
    }
    Arc::new(config)
}

fn scope_with(config: &Arc<Config>) -> Arc<Scope> {
    Scope::for_test(config, None)
}

fn scope() -> Arc<Scope> {
    scope_with(&Arc::new(Config::new()))
}

fn counter(scope: &Scope) -> Arc<AtomicUsize> {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    scope.on_cancel(Box::new(move |_| {
        r.fetch_add(1, Ordering::SeqCst);
    }));
    runs
}

#[test]
fn state_encoding_round_trips() {
    for reason in [
        CancelReason::Disconnected,
        CancelReason::Shutdown,
        CancelReason::DeadlineExceeded,
        CancelReason::Explicit,
        CancelReason::Panicked,
    ] {
        for phase in [Phase::Handler, Phase::Body, Phase::Upgraded] {
            let state = encode(reason, phase);
            assert!(!is_armed(state) && state != COMPLETED);
            assert_eq!(state & (REGISTERED | HELD), 0, "no flag bit is taken");
            assert_eq!(decode(state), Some((reason, phase)));
            assert_eq!(decode(state | REGISTERED | HELD), Some((reason, phase)));
        }
    }
    assert_eq!(decode(ARMED_HANDLER), None);
    assert_eq!(decode(ARMED_BODY), None);
    assert_eq!(decode(COMPLETED), None);
    // The registered flag changes nothing a reader sees.
    for reason in [CancelReason::Disconnected, CancelReason::Explicit] {
        for phase in [Phase::Handler, Phase::Body] {
            let state = encode(reason, phase) | REGISTERED;
            assert_eq!(decode(state), Some((reason, phase)));
            assert!(!is_armed(state) && !is_completed(state));
        }
    }
    assert!(is_armed(ARMED_HANDLER | REGISTERED) && is_armed(ARMED_BODY | REGISTERED));
    assert!(is_completed(COMPLETED | REGISTERED) && !is_armed(COMPLETED | REGISTERED));
    assert_eq!(decode(COMPLETED | REGISTERED), None);
}

#[test]
fn completion_never_cancels() {
    let scope = scope();
    let runs = counter(&scope);
    scope.enter_body();
    scope.finish();
    assert_eq!(scope.cancel(CancelReason::Disconnected), None);
    scope.abandon(false);
    assert!(!scope.token().is_cancelled());
    assert_eq!(scope.reason(), None);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[test]
fn first_cause_wins_and_callbacks_run_once() {
    let scope = scope();
    let runs = counter(&scope);
    assert_eq!(
        scope.cancel(CancelReason::Shutdown),
        Some((CancelReason::Shutdown, Phase::Handler))
    );
    assert_eq!(
        scope.cancel(CancelReason::Disconnected),
        Some((CancelReason::Shutdown, Phase::Handler))
    );
    scope.abandon(false);
    scope.finish();
    assert!(scope.token().is_cancelled());
    assert_eq!(scope.reason(), Some(CancelReason::Shutdown));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn phase_follows_the_response_head() {
    let scope = scope();
    scope.enter_body();
    scope.abandon(false);
    assert_eq!(
        scope.cancellation(),
        Some((CancelReason::Disconnected, Phase::Body))
    );
}

#[test]
fn registration_after_cancellation_runs_at_once() {
    let scope = scope();
    scope.cancel(CancelReason::Disconnected);
    let seen = Arc::new(Mutex::new(None));
    let s = seen.clone();
    scope.on_cancel(Box::new(move |c| {
        *s.lock().unwrap() = Some((c.reason(), c.phase(), c.uri().clone()));
    }));
    assert_eq!(
        seen.lock().unwrap().take(),
        Some((
            CancelReason::Disconnected,
            Phase::Handler,
            Uri::from_static("/test")
        ))
    );
}

#[test]
fn registration_after_completion_is_dropped_and_breaks_cycles() {
    let scope = scope();
    // A callback that holds the scope itself: a cycle until the callbacks are dropped.
    let held = Arc::clone(&scope);
    scope.on_cancel(Box::new(move |_| drop(held)));
    assert_eq!(Arc::strong_count(&scope), 2);
    scope.finish();
    assert_eq!(
        Arc::strong_count(&scope),
        1,
        "completion drops registrations"
    );

    let late = Arc::clone(&scope);
    scope.on_cancel(Box::new(move |_| drop(late)));
    assert_eq!(Arc::strong_count(&scope), 1, "late registration is dropped");
}

#[test]
fn order_is_handler_then_innermost_layer_to_outermost() {
    let log: Log = Arc::default();
    let scope = scope_with(&hooks_logging(&log, "outer"));
    scope.join(Bound::capture(&hooks_logging(&log, "middle")), None);
    scope.join(Bound::capture(&hooks_logging(&log, "inner")), None);
    for name in ["h1", "h2"] {
        let log = log.clone();
        scope.on_cancel(Box::new(move |c| {
            log.lock().unwrap().push(format!("{name}:{}", c.reason()));
        }));
    }
    scope.abandon(false);
    scope.abandon(false);
    assert_eq!(
        *log.lock().unwrap(),
        [
            "h1:disconnected",
            "h2:disconnected",
            "inner1:disconnected",
            "inner2:disconnected",
            "middle1:disconnected",
            "middle2:disconnected",
            "outer1:disconnected",
            "outer2:disconnected",
        ]
    );
}

#[test]
fn joining_a_cancelled_scope_runs_the_layer_at_once() {
    let log: Log = Arc::default();
    let scope = scope();
    scope.cancel(CancelReason::Shutdown);
    scope.join(Bound::capture(&hooks_logging(&log, "late")), None);
    assert_eq!(*log.lock().unwrap(), ["late1:shutdown", "late2:shutdown"]);
}

#[test]
fn token_cancelled_by_application_code_is_explicit() {
    let scope = scope();
    let runs = counter(&scope);
    scope.token().cancel();
    scope.notice_token();
    scope.notice_token();
    scope.abandon(false);
    assert_eq!(scope.reason(), Some(CancelReason::Explicit));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn the_transitions_do_not_ask_the_token() {
    // The scope's transitions never ask the token (its `is_cancelled` takes a mutex): the
    // guard asks it when the handler or body is pending (`notice_token`; over sockets in
    // tests/callbacks.rs). A request that reaches its end first completes.
    for head_then_body in [false, true] {
        let scope = scope();
        let runs = counter(&scope);
        scope.token().cancel();
        if head_then_body {
            scope.enter_body();
        }
        scope.finish();
        assert_eq!(scope.cancellation(), None, "completed");
        assert!(!scope.is_armed());
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }
    // Found pending in the body: an `Explicit` cancellation there.
    let scope = scope();
    let runs = counter(&scope);
    scope.enter_body();
    scope.token().cancel();
    scope.notice_token();
    scope.finish();
    assert_eq!(
        scope.cancellation(),
        Some((CancelReason::Explicit, Phase::Body))
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn the_getters_record_nothing_and_the_layer_records_the_application_s_cancel() {
    // A token cancelled by application code: the getters report `Explicit` and run nothing
    // (a callback taking a lock its caller holds would deadlock); a registration waits; the
    // layer records it when it notices, also if the deadline fires first.
    for noticed_by in ["pending poll", "deadline", "drop"] {
        let scope = scope();
        let runs = counter(&scope);
        scope.token().cancel();
        assert_eq!(scope.reason(), Some(CancelReason::Explicit));
        assert_eq!(scope.record().reason(), CancelReason::Explicit);
        assert_eq!(scope.record().phase(), Phase::Handler);
        let late = counter(&scope);
        assert_eq!(
            scope.cancellation(),
            None,
            "{noticed_by}: nothing recorded yet"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0, "{noticed_by}: nothing ran");
        assert_eq!(
            late.load(Ordering::SeqCst),
            0,
            "{noticed_by}: registered, not run"
        );
        match noticed_by {
            "pending poll" => scope.notice_token(),
            "deadline" => drop(scope.cancel(CancelReason::DeadlineExceeded)),
            _ => scope.abandon(false),
        }
        assert_eq!(
            scope.cancellation(),
            Some((CancelReason::Explicit, Phase::Handler)),
            "{noticed_by}: what the getters said is what is recorded"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(late.load(Ordering::SeqCst), 1);
    }
}

#[test]
fn token_cancelled_after_completion_runs_nothing() {
    let scope = scope();
    let runs = counter(&scope);
    scope.finish();
    scope.token().cancel();
    assert_eq!(scope.reason(), Some(CancelReason::Explicit));
    assert_eq!(scope.cancellation(), None, "the request had completed");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[test]
fn a_panicking_callback_does_not_stop_the_others() {
    let log: Log = Arc::default();
    let scope = scope_with(&hooks_logging(&log, "layer"));
    scope.on_cancel(Box::new(|_| panic!("boom")));
    let l = log.clone();
    scope.on_cancel(Box::new(move |_| l.lock().unwrap().push("after".into())));
    scope.abandon(false);
    assert_eq!(
        *log.lock().unwrap(),
        ["after", "layer1:disconnected", "layer2:disconnected"]
    );
}

#[test]
fn racing_causes_settle_on_exactly_one_outcome() {
    for round in 0..500 {
        let scope = scope();
        let runs = counter(&scope);
        let late_runs = Arc::new(AtomicUsize::new(0));
        thread::scope(|s| {
            s.spawn(|| scope.finish());
            s.spawn(|| scope.abandon(false));
            s.spawn(|| {
                scope.cancel(CancelReason::Shutdown);
            });
            s.spawn(|| {
                let r = late_runs.clone();
                scope.on_cancel(Box::new(move |_| {
                    r.fetch_add(1, Ordering::SeqCst);
                }));
            });
            if round % 2 == 0 {
                s.spawn(|| scope.token().cancel());
            }
        });
        let cancelled = scope.cancellation().is_some();
        let expected = usize::from(cancelled);
        assert_eq!(runs.load(Ordering::SeqCst), expected, "round {round}");
        assert_eq!(late_runs.load(Ordering::SeqCst), expected, "round {round}");
        if cancelled {
            assert!(scope.token().is_cancelled());
        } else if round % 2 == 1 {
            assert!(
                !scope.token().is_cancelled(),
                "completed token stays uncancelled"
            );
        }
    }
}

fn with_shutdown() -> (Arc<Config>, Shutdown) {
    let shutdown = Shutdown::new(CancellationToken::new());
    let mut config = Config::new();
    config.shutdown = Some(shutdown.clone());
    (Arc::new(config), shutdown)
}

fn server(after: Duration) -> Option<TimeLimit> {
    Some(TimeLimit::server(after))
}

fn client(after: Duration) -> Option<TimeLimit> {
    Some(TimeLimit::client(after))
}

fn limited(config: &Arc<Config>, limit: Option<TimeLimit>) -> Arc<Scope> {
    Scope::for_test(config, limit)
}

#[test]
fn a_joined_layer_can_only_shorten_the_deadline() {
    let config = Arc::new(Config::new());
    let scope = limited(&config, server(Duration::from_secs(10)));
    let start = scope.deadline().unwrap() - Duration::from_secs(10);
    scope.join(Bound::capture(&config), client(Duration::from_secs(1)));
    assert_eq!(scope.deadline(), Some(start + Duration::from_secs(1)));
    scope.join(Bound::capture(&config), server(Duration::from_secs(20)));
    scope.join(Bound::capture(&config), None);
    assert_eq!(scope.deadline(), Some(start + Duration::from_secs(1)));
    assert_eq!(self::scope().deadline(), None);
    // Absurd limits saturate instead of wrapping.
    let forever = limited(&config, client(Duration::MAX));
    assert!(forever.deadline().unwrap() > start + Duration::from_secs(100 * 365 * 86_400));
}

/// A drop at the deadline, or within its slack before it, is `DeadlineExceeded`: 1 ms for
/// the server's own limit, 20 ms for a deadline the client chose and enforces itself.
#[tokio::test(start_paused = true)]
async fn a_drop_at_the_deadline_is_a_deadline_not_a_disconnect() {
    let config = Arc::new(Config::new());
    let ms = Duration::from_millis;
    let server_early = limited(&config, server(ms(100)));
    let server_at_slack = limited(&config, server(ms(100)));
    let client_early = limited(&config, client(ms(100)));
    let client_at_slack = limited(&config, client(ms(100)));
    let after = limited(&config, server(ms(100)));
    let unlimited = limited(&config, None);
    tokio::time::advance(Duration::from_micros(79_999)).await;
    client_early.abandon(false);
    tokio::time::advance(Duration::from_micros(1)).await; // 80 ms: exactly 20 ms before
    client_at_slack.abandon(false);
    tokio::time::advance(Duration::from_micros(18_999)).await; // 1 ms and 1 µs before
    server_early.abandon(false);
    tokio::time::advance(Duration::from_micros(1)).await; // exactly 1 ms before
    server_at_slack.abandon(false);
    tokio::time::advance(ms(5)).await;
    after.abandon(false);
    unlimited.abandon(false);
    let reason = |scope: &Scope| scope.cancellation().map(|(reason, _)| reason);
    assert_eq!(reason(&client_early), Some(CancelReason::Disconnected));
    assert_eq!(
        reason(&client_at_slack),
        Some(CancelReason::DeadlineExceeded)
    );
    assert_eq!(reason(&server_early), Some(CancelReason::Disconnected));
    assert_eq!(
        reason(&server_at_slack),
        Some(CancelReason::DeadlineExceeded)
    );
    assert_eq!(reason(&after), Some(CancelReason::DeadlineExceeded));
    assert_eq!(reason(&unlimited), Some(CancelReason::Disconnected));
}

/// With both a server limit and a client deadline, each keeps its own slack: a tie or a
/// near-tie does not lose the client's.
#[tokio::test(start_paused = true)]
async fn mixed_deadlines_keep_the_widest_slack_that_applies() {
    let config = Arc::new(Config::new());
    let ms = Duration::from_millis;
    // The server's layer and a stacked client deadline, equal.
    let tie = limited(&config, server(ms(100)));
    tie.join(Bound::capture(&config), client(ms(100)));
    // The client's deadline half a millisecond after the server's.
    let near = limited(&config, server(ms(100)));
    near.join(
        Bound::capture(&config),
        client(Duration::from_micros(100_500)),
    );
    // A server deadline well before the client's: its own 1 ms slack applies.
    let server_first = limited(&config, client(ms(200)));
    server_first.join(Bound::capture(&config), server(ms(100)));
    tokio::time::advance(ms(85)).await;
    tie.abandon(false);
    near.abandon(false);
    server_first.abandon(false);
    let reason = |scope: &Scope| scope.cancellation().map(|(reason, _)| reason);
    assert_eq!(reason(&tie), Some(CancelReason::DeadlineExceeded));
    assert_eq!(reason(&near), Some(CancelReason::DeadlineExceeded));
    assert_eq!(reason(&server_first), Some(CancelReason::Disconnected));
    assert_eq!(tie.deadline(), near.deadline());
}

#[test]
fn shutdown_cancels_armed_scopes_and_later_ones_start_cancelled() {
    let log: Log = Arc::default();
    let (config, shutdown) = with_shutdown();
    let armed = scope_with(&config);
    let runs = counter(&armed);
    let completed = scope_with(&config);
    completed.finish();
    assert_eq!(shutdown.in_flight(), 1, "completion leaves the registry");

    assert_eq!(shutdown.close(), 1);
    assert_eq!(armed.reason(), Some(CancelReason::Shutdown));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(completed.reason(), None);

    let mut late_config = Config::clone(&config);
    late_config.callbacks = hooks_logging(&log, "late").callbacks.clone();
    let late = scope_with(&Arc::new(late_config));
    assert_eq!(
        late.cancellation(),
        Some((CancelReason::Shutdown, Phase::Handler))
    );
    assert!(late.token().is_cancelled());
    assert_eq!(*log.lock().unwrap(), ["late1:shutdown", "late2:shutdown"]);
}

/// The watcher may close the creator's shard right after the scope registered there, before
/// the scope itself is complete: the scope must still be cancelled with `Shutdown`, with its
/// callbacks run, never left armed through the shutdown.
#[test]
fn a_shutdown_right_after_registering_cancels_the_new_scope() {
    let log: Log = Arc::default();
    let (config, shutdown) = with_shutdown();
    let mut logging = Config::clone(&config);
    logging.callbacks = hooks_logging(&log, "cb").callbacks.clone();
    let config = Arc::new(logging);
    let watcher = shutdown.clone();
    let close = move || {
        watcher.close();
    };
    AFTER_REGISTER.with(|hook| hook.set(Some(Box::new(close))));
    let scope = scope_with(&config);
    assert_eq!(
        scope.cancellation(),
        Some((CancelReason::Shutdown, Phase::Handler))
    );
    assert!(scope.token().is_cancelled());
    assert_eq!(*log.lock().unwrap(), ["cb1:shutdown", "cb2:shutdown"]);
}

/// A shutdown that begins right after the scope registered, with no watcher to run (none was
/// spawned: no runtime here), still cancels the new scope before `Scope::new` returns.
#[test]
fn a_shutdown_beginning_right_after_registering_is_seen_without_the_watcher() {
    let token = CancellationToken::new();
    let mut config = Config::new();
    config.shutdown = Some(Shutdown::new(token.clone()));
    let config = Arc::new(config);
    AFTER_REGISTER.with(|hook| hook.set(Some(Box::new(move || token.cancel()))));
    let scope = scope_with(&config);
    assert_eq!(
        scope.cancellation(),
        Some((CancelReason::Shutdown, Phase::Handler))
    );
}

#[test]
fn a_joined_layer_with_a_shutdown_token_cancels_the_outer_scope() {
    let (config, shutdown) = with_shutdown();
    let scope = self::scope();
    let runs = counter(&scope);
    scope.join(Bound::capture(&config), None);
    assert_eq!(shutdown.in_flight(), 1);
    shutdown.close();
    assert_eq!(scope.reason(), Some(CancelReason::Shutdown));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Joining after that layer's shutdown began cancels at once.
    let scope = self::scope();
    scope.join(Bound::capture(&config), None);
    assert_eq!(scope.reason(), Some(CancelReason::Shutdown));
}

#[test]
fn shutdown_racing_completion_and_drop_settles_once_and_leaves_no_entry() {
    for round in 0..500 {
        let (config, shutdown) = with_shutdown();
        let scopes: Vec<_> = (0..4).map(|_| scope_with(&config)).collect();
        let runs: Vec<_> = scopes.iter().map(|s| counter(s)).collect();
        // Odd rounds: no shutdown during the race, so the registry must hold exactly the
        // one scope still in flight once the others ended concurrently.
        let racing_shutdown = round % 2 == 0;
        thread::scope(|s| {
            if racing_shutdown {
                s.spawn(|| shutdown.close());
            }
            s.spawn(|| scopes[0].finish());
            s.spawn(|| scopes[1].abandon(false));
            s.spawn(|| {
                scopes[2].enter_body();
                scopes[2].finish();
            });
            // scopes[3] stays in flight: only the shutdown can end it.
        });
        if !racing_shutdown {
            assert_eq!(shutdown.in_flight(), 1, "round {round}");
            assert_eq!(shutdown.close(), 1, "round {round}");
        }
        assert_eq!(
            scopes[3].reason(),
            Some(CancelReason::Shutdown),
            "round {round}"
        );
        for (scope, runs) in scopes.iter().zip(&runs) {
            let expected = usize::from(scope.cancellation().is_some());
            assert_eq!(runs.load(Ordering::SeqCst), expected, "round {round}");
        }
        assert_eq!(shutdown.in_flight(), 0, "round {round}");
    }
}

#[test]
fn a_registration_keeps_the_phase() {
    let scope = scope();
    let runs = counter(&scope);
    scope.enter_body();
    assert_eq!(
        scope.cancel(CancelReason::Disconnected),
        Some((CancelReason::Disconnected, Phase::Body))
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn a_registration_racing_completion_is_dropped_not_stranded() {
    for round in 0..2000 {
        let (config, shutdown) = with_shutdown();
        let scope = scope();
        // The registration holds a handle to the scope, as a handler's closure would: if
        // neither side dropped it, the scope would keep itself alive.
        let held = Arc::clone(&scope);
        thread::scope(|s| {
            s.spawn(|| scope.finish());
            s.spawn(|| {
                scope.on_cancel(Box::new(move |_| drop(held)));
                scope.join(Bound::capture(&config), None);
            });
        });
        assert_eq!(scope.cancellation(), None, "round {round}");
        assert_eq!(
            Arc::strong_count(&scope),
            1,
            "round {round}: a registration leaked"
        );
        assert_eq!(
            shutdown.in_flight(),
            0,
            "round {round}: a joined layer stayed registered"
        );
    }
}

#[test]
fn a_drop_that_cancels_is_its_own_report_and_a_completion_makes_none() {
    let dropped = scope();
    dropped.abandon(false);
    assert_eq!(dropped.tail(), (true, 0, true));
    let completed = scope();
    completed.enter_body();
    completed.finish();
    assert_eq!(completed.tail(), (false, 0, false));
}

#[test]
fn a_detached_handler_keeps_the_report_until_it_returns() {
    let scope = scope();
    scope.detach();
    scope.abandon(false);
    assert_eq!(scope.tail(), (true, 1, false), "the handler still runs");
    scope.detached_stopped(Stopped::Ended);
    assert_eq!(scope.tail(), (true, 0, true));
    // A second end changes nothing.
    scope.finish();
    assert_eq!(scope.tail(), (true, 0, true));
}

/// The time ran on, on the paused clock: from the cancellation to the response's end.
#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn the_time_ran_on_runs_from_the_cancellation_to_the_end_of_the_response() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _recording = ::metrics::set_default_local_recorder(&recorder);
    let values = || {
        let mut values: Vec<(String, String, Vec<f64>)> = Vec::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            // A snapshot drains; a histogram drained earlier shows up empty.
            let DebugValue::Histogram(v) = value else {
                continue;
            };
            if !v.is_empty() {
                let labels: Vec<String> =
                    key.key().labels().map(|l| l.value().to_owned()).collect();
                let name = key.key().name().to_owned();
                values.push((
                    name,
                    labels.join(","),
                    v.iter().map(|v| v.into_inner()).collect(),
                ));
            }
        }
        values
    };
    let ran_after = |labels: &str, seconds: Vec<f64>| {
        (
            "tower_cancel_ran_after_cancel_seconds".to_owned(),
            labels.to_owned(),
            seconds,
        )
    };

    // In the handler: cancelled at 1 s, the handler answers 0.2 s later, its body ends 0.3 s
    // after that.
    let handler = scope();
    tokio::time::sleep(Duration::from_secs(1)).await;
    handler.cancel(CancelReason::Shutdown);
    tokio::time::sleep(Duration::from_millis(200)).await;
    handler.enter_body();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(values(), []);
    handler.finish();
    assert_eq!(values(), [ran_after("shutdown,handler", vec![0.5])]);

    // In the body: the deadline passes, the server drops the body 0.25 s later.
    let body = scope();
    body.enter_body();
    body.cancel(CancelReason::DeadlineExceeded);
    tokio::time::sleep(Duration::from_millis(250)).await;
    body.abandon(false);
    assert_eq!(values(), [ran_after("deadline_exceeded,body", vec![0.25])]);

    // Dropped: it stopped at once.
    let dropped = scope();
    tokio::time::sleep(Duration::from_millis(100)).await;
    dropped.abandon(false);
    assert_eq!(values(), [ran_after("disconnected,handler", vec![0.0])]);
}

/// The tail of a cancellation lives in the callbacks' padding: every request pays no byte for it.
#[cfg(target_pointer_width = "64")]
#[test]
fn the_tail_costs_no_space() {
    assert_eq!(std::mem::size_of::<Callbacks>(), 24);
}

/// Every in-flight request holds one scope: its size is the crate's share of the memory per
/// request (the `scale` bench). Grows only on purpose.
#[cfg(target_pointer_width = "64")]
#[test]
fn the_scope_stays_small() {
    assert!(
        std::mem::size_of::<Scope>() <= 216,
        "{}",
        std::mem::size_of::<Scope>()
    );
}
