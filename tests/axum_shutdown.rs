//! Runs `examples/axum_shutdown.rs` as a process, with real clients of each kind open when it
//! gets SIGTERM: `curl -N` on the event stream, WebSocket clients written with Python's
//! `websockets` (tests/websocket/client.py), and two reports, one that finishes within the
//! grace and one that cannot. Measures SIGTERM → each client's end → the process's exit.
#![cfg(unix)]

#[path = "common/process.rs"]
mod process;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use process::{KillOnDrop, Output, PATIENCE};

const PYTHON: &str = "/usr/bin/python3";
const GRACE: Duration = Duration::from_millis(1500);
const WEBSOCKETS: usize = 3;
const LAST_EVENT: &str = "event: shutdown\ndata: server restarting\nretry: 2000\n\n";

/// Whether `command --version`-like `probe` runs; on CI it must.
fn have(what: &str, probe: &mut Command) -> bool {
    let found = probe
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{what} is missing on CI: .ci/run must install it"
        );
        eprintln!("skipping: {what} is missing");
    }
    found
}

/// Sends a raw HTTP/1.1 request; the returned thread reads the response to its end.
fn request(addr: &str, path: &str) -> std::thread::JoinHandle<String> {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: example\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    std::thread::spawn(move || {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    })
}

#[test]
fn sigterm_drains_sse_websockets_and_work_then_exits_within_the_grace() {
    if !have("curl", Command::new("curl").arg("--version"))
        || !have(
            "python3-websockets",
            Command::new(PYTHON).args(["-c", "import websockets"]),
        )
    {
        return;
    }
    let grace_ms = GRACE.as_millis().to_string();
    let (mut server, mut output, addr) =
        process::start_with_env("axum_shutdown", &[("GRACE_MS", &grace_ms)]);

    // The event stream, with curl -N: its stdout is the stream, its exit status how it ended.
    let mut curl = KillOnDrop(
        Command::new("curl")
            .args(["-sN", "--max-time", "30", &format!("http://{addr}/events")])
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl starts"),
    );
    let mut events = Output::new(&mut curl.0);
    events.wait_for("data: tick 0");

    let mut clients = KillOnDrop(
        Command::new(PYTHON)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/websocket/client.py"
            ))
            .args([&format!("ws://{addr}/ws"), &WEBSOCKETS.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("the WebSocket clients start"),
    );
    let mut clients_out = Output::new(&mut clients.0);
    for _ in 0..WEBSOCKETS {
        clients_out.wait_for("open ");
    }

    let short = request(&addr, "/report?ms=500");
    let long = request(&addr, "/report?ms=60000");
    while output
        .seen
        .iter()
        .filter(|l| l.starts_with("report: started"))
        .count()
        < 2
    {
        output.wait_for("report: started");
    }

    let terminated = std::thread::spawn(move || {
        let exit = process::terminate(&mut server);
        (exit, server)
    });
    let signalled = Instant::now();

    // WebSockets: `1001` at the drain's start, well before the grace is over.
    for _ in 0..WEBSOCKETS {
        let line = clients_out.wait_for("closed ");
        let after = signalled.elapsed();
        assert!(
            line.ends_with(" 1001 server restarting"),
            "{line} after {after:?}"
        );
        assert!(after < GRACE, "{line} only after {after:?}");
    }

    // The report that fits in the grace completes; the other is cancelled at its end.
    let short = short.join().unwrap();
    assert!(short.starts_with("HTTP/1.1 200"), "{short}");
    assert!(short.ends_with("report done\n"), "{short}");
    let long = long.join().unwrap();
    let long_after = signalled.elapsed();
    assert!(long.starts_with("HTTP/1.1 503"), "{long}");
    assert!(long.ends_with("report abandoned: shutdown\n"), "{long}");
    assert!(
        long_after >= GRACE,
        "cancelled after {long_after:?}, before the grace"
    );

    // The event stream: ticks through the drain, then the last event and a clean end (curl
    // exits 0; a cut stream is exit 18).
    let status = curl.0.wait().unwrap();
    let sse_after = signalled.elapsed();
    let stream = events.rest().join("\n");
    assert!(status.success(), "curl: {status}; stream: {stream}");
    assert!(
        stream.trim_end().ends_with(LAST_EVENT.trim_end()),
        "{stream}"
    );
    assert!(sse_after >= GRACE, "the stream ended after {sse_after:?}");

    let ((exit, took), _server) = terminated.join().unwrap();
    assert!(exit.success(), "{exit}");
    let lines = output.rest();
    println!(
        "SIGTERM → WebSockets closed < {GRACE:?}; SSE ended after {sse_after:?}; \
         exit after {took:?} (grace {GRACE:?}); output: {lines:#?}"
    );
    assert!(
        took < GRACE + Duration::from_secs(3),
        "exit took {took:?} with a grace of {GRACE:?}"
    );
    // Cancelled: only what outlived the grace (the event stream's request and the long
    // report); the WebSockets and the short report completed.
    let mut cancelled: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("cancelled: "))
        .map(String::as_str)
        .collect();
    cancelled.sort_unstable();
    assert_eq!(
        cancelled,
        [
            "cancelled: GET /events (shutdown, phase body)",
            "cancelled: GET /report (shutdown, phase handler)",
        ],
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("shutdown: done")),
        "{lines:#?}"
    );
}
