//! Panicking callbacks while the request is dropped during an unwind (the handler itself
//! panicked): the process must not abort, and every other callback still runs.
//!
//! A panic that escapes a destructor running during an unwind aborts the process, so this runs
//! in a child process (this same test binary, selected by an environment variable) and checks
//! how it exited.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};

use http::{Request, Response};
use tower::{Layer, Service};
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};

const CHILD: &str = "TOWER_CANCEL_PANICS_CHILD";

type Log = Arc<Mutex<Vec<String>>>;

fn push(log: &Log, line: impl Into<String>) {
    log.lock().unwrap().push(line.into());
}

/// In the child: a handler that registers two callbacks (the first panics) and then panics
/// itself, behind a layer with two callbacks (the first panics). The handler is polled on a
/// plain thread without `catch_unwind`, so its unwind drops the response future, whose guard
/// cancels the request and runs the callbacks while the thread is panicking.
fn child() {
    tracing_subscriber::fmt()
        .with_env_filter("tower_cancel=debug")
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let log: Log = Log::default();
    let layer = {
        let (a, b) = (log.clone(), log.clone());
        CancellationLayer::new()
            .on_cancel(move |c: &Cancelled| {
                push(&a, format!("layer 1 ({})", c.reason()));
                panic!("layer callback panics");
            })
            .on_cancel(move |c: &Cancelled| push(&b, format!("layer 2 ({})", c.reason())))
    };
    let handler_log = log.clone();
    let mut svc = layer.layer(tower::service_fn(move |req: Request<()>| {
        let log = handler_log.clone();
        async move {
            let rc = RequestCancellation::from_extensions(req.extensions()).unwrap();
            let (a, b) = (log.clone(), log.clone());
            rc.on_cancel(move |_| {
                push(&a, "handler 1");
                panic!("handler callback panics");
            });
            rc.on_cancel(move |_| push(&b, "handler 2"));
            push(&log, "handler panics");
            panic!("the handler panics");
            #[allow(unreachable_code)]
            Ok::<_, Infallible>(Response::new(String::new()))
        }
    }));

    let unwound = std::thread::spawn(move || {
        let mut cx = Context::from_waker(Waker::noop());
        let mut future = pin!(svc.call(Request::new(())));
        let _ = future.as_mut().poll(&mut cx);
    })
    .join();
    assert!(unwound.is_err(), "the handler's panic reached the thread");
    for line in log.lock().unwrap().iter() {
        println!("log: {line}");
    }
    println!("survived");
}

#[test]
fn a_panicking_callback_during_an_unwind_does_not_abort() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_panicking_callback_during_an_unwind_does_not_abort",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the child did not exit normally ({:?}); a signal 6 is an abort\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(stdout.contains("survived"), "stdout:\n{stdout}");
    // The harness prints `test <name> ... ` without a newline before the child's first line.
    let log: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.split_once("log: ").map(|(_, entry)| entry))
        .collect();
    assert_eq!(
        log,
        [
            "handler panics",
            "handler 1",
            "handler 2",
            "layer 1 (disconnected)",
            "layer 2 (disconnected)",
        ],
        "every callback ran once, in order, despite the panics"
    );
    // Both callback panics were reported as events, with the request they belong to.
    let reports = stderr
        .lines()
        .filter(|line| line.contains("panicked; the remaining callbacks still run"))
        .count();
    assert_eq!(reports, 2, "stderr:\n{stderr}");
}
