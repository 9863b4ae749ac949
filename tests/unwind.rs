//! A request dropped while its thread unwinds from a panic: callbacks that panic too must be
//! contained, or the process aborts. Run in a child process so that an abort is observed as
//! an exit status instead of killing the test harness.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::process::Command;
use std::task::{Context, Waker};

use http::{Request, Response};
use tower::{Layer, Service, service_fn};
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};

const CHILD: &str = "TOWER_CANCEL_UNWIND_CHILD";

#[test]
fn panicking_callbacks_during_an_unwind_do_not_abort() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "panicking_callbacks_during_an_unwind_do_not_abort",
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
        "child failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    // The harness may print "test <name> ... " just before the child's first line.
    let lines: Vec<_> = stdout
        .lines()
        .filter_map(|l| l.find("child:").map(|at| &l[at..]))
        .collect();
    assert_eq!(
        lines,
        [
            "child: handler callback ran: panicked handler",
            "child: layer callback ran: panicked handler",
            "child: the handler's panic reached the caller",
        ],
        "stderr:\n{stderr}"
    );
}

fn child() {
    let layer = CancellationLayer::new()
        .on_cancel(|_: &Cancelled| panic!("layer callback panics during the unwind"))
        .on_cancel(|c: &Cancelled| {
            println!("child: layer callback ran: {} {}", c.reason(), c.phase())
        });
    let mut svc = layer.layer(service_fn(|req: Request<()>| {
        let rc = req.extensions().get::<RequestCancellation>().unwrap();
        rc.on_cancel(|_| panic!("handler callback panics during the unwind"));
        rc.on_cancel(|c| println!("child: handler callback ran: {} {}", c.reason(), c.phase()));
        async move {
            panic!("the handler panics");
            #[allow(unreachable_code)]
            Ok::<_, std::convert::Infallible>(Response::new(String::new()))
        }
    }));
    let result = catch_unwind(AssertUnwindSafe(|| {
        // The response future lives on this stack frame, so the unwind drops it.
        let mut future = pin!(svc.call(Request::new(())));
        let _ = future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()));
    }));
    assert!(result.is_err());
    println!("child: the handler's panic reached the caller");
}
