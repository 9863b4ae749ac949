//! Runs `examples/websocket.rs` as a process with WebSocket clients written with Python's
//! `websockets` (tests/websocket/client.py; Debian's python3-websockets): SIGTERM to the
//! example → every client receives a close frame `1001 going away` (the request of each
//! upgraded connection is cancelled with `Shutdown`, phase `upgraded`), and the process exits.
//! A client that closed its WebSocket before completes its request: nothing is cancelled.
#![cfg(unix)]

#[path = "common/process.rs"]
mod process;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use process::{KillOnDrop, Output, PATIENCE, example};

const PYTHON: &str = "/usr/bin/python3";
const CLIENTS: usize = 5;
/// Of the clients, how many close their WebSocket themselves before the shutdown.
const CLOSERS: usize = 1;
/// The clients still open at the shutdown.
const OPEN: usize = CLIENTS - CLOSERS;

/// Whether Debian's python3 with `websockets` is there; on CI it must be.
fn python_websockets() -> bool {
    let found = Command::new(PYTHON)
        .args(["-c", "import websockets"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3-websockets is missing on CI: .ci/run must install it"
        );
        eprintln!(
            "skipping: {PYTHON} cannot import websockets (apt-get install python3-websockets)"
        );
    }
    found
}

#[test]
fn sigterm_closes_every_websocket_with_going_away_and_the_process_exits() {
    if !python_websockets() {
        return;
    }
    let mut server = KillOnDrop(
        Command::new(example("websocket"))
            .env("PORT", "0")
            .stdout(Stdio::piped())
            .spawn()
            .expect("the example starts"),
    );
    let mut server_out = Output::new(&mut server.0);
    let listening = server_out.wait_for("listening on ws://");
    let url = listening.trim_start_matches("listening on ").to_owned();

    let mut clients = KillOnDrop(
        Command::new(PYTHON)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/websocket/client.py"
            ))
            .args([url.as_str(), &CLIENTS.to_string(), &CLOSERS.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("the clients start"),
    );
    let mut clients_out = Output::new(&mut clients.0);
    for _ in 0..CLIENTS {
        clients_out.wait_for("open ");
        server_out.wait_for("websocket open");
    }
    // (The server may have printed these among the `open` lines, already read.)
    let closed_by_client = "websocket closed by the client";
    while server_out
        .seen
        .iter()
        .filter(|l| *l == closed_by_client)
        .count()
        < CLOSERS
    {
        server_out.wait_for(closed_by_client);
    }

    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());

    // Every client gets `1001 going away`; the lines are timestamped as they arrive.
    let mut closed_after = Vec::new();
    for _ in 0..OPEN {
        let line = clients_out.wait_for("closed ");
        closed_after.push(signalled.elapsed());
        let mut words = line.split(' ').skip(2);
        assert_eq!(words.next(), Some("1001"), "{line}");
        assert_eq!(words.collect::<Vec<_>>().join(" "), "going away", "{line}");
    }
    let exit = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < PATIENCE, "the example did not exit");
        std::thread::sleep(Duration::from_millis(5));
    };
    let exited_after = signalled.elapsed();
    assert!(exit.success(), "{exit}");
    let lines = server_out.rest();
    println!(
        "SIGTERM → close frames after {closed_after:?}; exit after {exited_after:?}; output: {lines:#?}"
    );
    // Every cancellation printed is a shutdown of an open WebSocket: the one that its client
    // closed first completed.
    let cancelled: Vec<_> = lines
        .iter()
        .filter(|l| l.contains(" cancelled: "))
        .collect();
    assert_eq!(cancelled.len(), OPEN, "{lines:#?}");
    assert!(
        cancelled
            .iter()
            .all(|l| l.ends_with("cancelled: shutdown, phase upgraded")),
        "{lines:#?}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.as_str() == "websocket closed by the server: shutdown")
            .count(),
        OPEN,
        "{lines:#?}"
    );
    // Generous: the figure is printed above; the example itself sends its close frames at once.
    assert!(
        closed_after.iter().all(|t| *t < Duration::from_secs(2)),
        "{closed_after:?}"
    );
}
