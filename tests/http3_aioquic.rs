//! HTTP/3 with a client nobody here wrote the stack of: Python's `aioquic` (from PyPI, pinned
//! 1.7.2; `.ci/run` installs it in `target/aioquic-venv`), driven by tests/http3/client.py.
//! A request cancelled in the handler is `Disconnected`, phase `Handler`; mid-body, phase
//! `Body`; completed requests cancel nothing; a body cut short reaches the client as a reset.

mod common;
#[path = "common/http3.rs"]
mod http3;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use http3::*;

/// The Python that can import aioquic: `AIOQUIC_PYTHON`, or the venv `.ci/run` makes. On CI
/// it must be there; elsewhere the tests skip with the command that installs it.
fn python() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/aioquic-venv/bin/python");
    let python = std::env::var_os("AIOQUIC_PYTHON").map_or(venv, PathBuf::from);
    let works = Command::new(&python)
        .args(["-c", "import aioquic"])
        .status()
        .is_ok_and(|status| status.success());
    if works {
        return Some(python);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} cannot import aioquic on CI: .ci/run must install it",
        python.display()
    );
    eprintln!(
        "skipping: {} cannot import aioquic (python3 -m venv target/aioquic-venv && \
         target/aioquic-venv/bin/pip install aioquic==1.7.2)",
        python.display()
    );
    None
}

/// One line of the client's output.
#[derive(Debug)]
struct Event {
    event: String,
    line: String,
}

impl Event {
    fn parse(line: &str) -> Self {
        let mut event = Event {
            event: String::new(),
            line: line.to_owned(),
        };
        event.event = event.field("event").unwrap_or_default().to_owned();
        event
    }

    fn field(&self, name: &str) -> Option<&str> {
        // The client prints flat JSON objects: `"name": value` with a string, number or null.
        let key = format!("\"{name}\": ");
        let rest = &self.line[self.line.find(&key)? + key.len()..];
        let end = if let Some(quoted) = rest.strip_prefix('"') {
            return quoted.split('"').next();
        } else {
            rest.find([',', '}']).unwrap_or(rest.len())
        };
        Some(rest[..end].trim())
    }
}

/// Runs the client against `server` and returns its events; it must exit 0.
async fn run(python: &PathBuf, server: &H3Server, args: &[&str]) -> Vec<Event> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/http3/client.py");
    let port = server.addr.port().to_string();
    let mut command = tokio::process::Command::new(python);
    command.arg(script).args(["--port", &port]).args(args);
    let output = tokio::time::timeout(PATIENCE, command.output())
        .await
        .expect("the aioquic client hung")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "client {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout.lines().map(Event::parse).collect()
}

fn ends(events: &[Event]) -> Vec<&Event> {
    events.iter().filter(|e| e.event == "end").collect()
}

#[tokio::test]
async fn aioquic_completed_requests_cancel_nothing() {
    let Some(python) = python() else { return };
    let (log, server, in_flight) = start(Duration::from_secs(5)).await;
    let three = (3 * CHUNK.len()).to_string();
    let cases: [(&[&str], &str); 5] = [
        (&["--path", "/full"], "5"),
        (&["--path", "/empty"], "0"),
        (&["--path", "/stream"], &three),
        (&["--path", "/stream-with-length"], &three),
        (
            &[
                "--path",
                "/read",
                "--method",
                "POST",
                "--body-bytes",
                "100000",
            ],
            "11",
        ),
    ];
    for (args, total) in cases {
        let events = run(&python, &server, &[args, &["--mode", "complete"]].concat()).await;
        let ends = ends(&events);
        assert_eq!(ends.len(), 1, "{events:?}");
        assert_eq!(ends[0].field("how"), Some("fin"), "{args:?}: {events:?}");
        assert_eq!(ends[0].field("total"), Some(total), "{args:?}: {events:?}");
    }
    let events = run(
        &python,
        &server,
        &[
            "--path",
            "/stream",
            "--mode",
            "complete",
            "--requests",
            "10",
        ],
    )
    .await;
    assert_eq!(ends(&events).len(), 10);
    assert!(ends(&events).iter().all(|e| e.field("how") == Some("fin")));
    in_flight.wait_for_none().await;
    assert_eq!(cancellations(&log), Vec::<String>::new());
}

#[tokio::test]
async fn aioquic_cancels_in_the_handler_and_mid_body() {
    let Some(python) = python() else { return };
    let (log, server, in_flight) = start(Duration::from_secs(5)).await;

    // In the handler: STOP_SENDING with or without RESET_STREAM (a GET's reset is a no-op
    // once its FIN was acknowledged, so STOP_SENDING is what carries it).
    for send in ["stop", "stop,reset"] {
        let args = [
            "--path",
            "/honour",
            "--mode",
            "cancel-after-ms",
            "--after-ms",
            "150",
        ];
        let events = run(&python, &server, &[&args[..], &["--send", send]].concat()).await;
        assert!(events.iter().any(|e| e.event == "cancelled"), "{events:?}");
        assert_ne!(ends(&events)[0].field("how"), Some("fin"), "{events:?}");
        log.wait_for("layer /honour disconnected handler").await;
        log.wait_for("dropped /honour").await;
        assert_eq!(
            cancellations(&log),
            [
                "handler /honour disconnected handler",
                "layer /honour disconnected handler"
            ]
        );
        log.clear();
    }

    // Mid-body, on several requests of one connection at once: each is cancelled in the body
    // phase, and none of them is seen finished.
    let args = [
        "--path",
        "/endless",
        "--mode",
        "cancel-after-bytes",
        "--after-bytes",
        "42",
    ];
    let events = run(
        &python,
        &server,
        &[&args[..], &["--requests", "5"]].concat(),
    )
    .await;
    let ends = ends(&events);
    assert_eq!(ends.len(), 5, "{events:?}");
    assert!(
        ends.iter().all(|e| e.field("how") != Some("fin")),
        "{events:?}"
    );
    log.wait_for_count("layer /endless disconnected body", 5)
        .await;
    log.wait_for_count("body-dropped /endless", 5).await;

    // A request whose upload is reset mid-way while the handler reads it.
    let args = [
        "--path",
        "/read",
        "--method",
        "POST",
        "--body-bytes",
        "5000000",
    ];
    let cancel = [
        "--mode",
        "cancel-after-ms",
        "--after-ms",
        "30",
        "--send",
        "reset",
    ];
    run(&python, &server, &[&args[..], &cancel[..]].concat()).await;
    log.wait_for("layer /read disconnected handler").await;
    assert!(!log.entries().iter().any(|e| e.starts_with("read-error")));

    in_flight.wait_for_none().await;
}

#[tokio::test]
async fn aioquic_sees_a_body_cut_short_as_reset() {
    let Some(python) = python() else { return };
    let (_log, server, _in_flight) = start(Duration::from_secs(5)).await;
    let events = run(
        &python,
        &server,
        &["--path", "/broken", "--mode", "complete"],
    )
    .await;
    let ends = ends(&events);
    assert_eq!(ends[0].field("how"), Some("reset"), "{events:?}");
    assert_eq!(
        ends[0].field("code"),
        Some(H3_INTERNAL_ERROR.to_string().as_str())
    );
}
