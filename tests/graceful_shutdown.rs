//! Runs `examples/graceful_shutdown.rs` as a real process: a client waits on a 30 s report,
//! the process gets SIGTERM, and the whole shutdown (handler answers, connections close,
//! async cleanup runs) ends in well under a second.
#![cfg(unix)]

#[path = "common/process.rs"]
mod process;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use process::PATIENCE;

#[test]
fn sigterm_drains_a_30_second_request_in_well_under_a_second() {
    let (mut child, mut output, addr) = process::start("graceful_shutdown");

    let mut client = TcpStream::connect(&addr).unwrap();
    client
        .write_all(b"GET /report?seconds=30 HTTP/1.1\r\nhost: example\r\n\r\n")
        .unwrap();
    output.wait_for("report: started");

    let terminated = std::thread::spawn(move || {
        let exit = process::terminate(&mut child);
        (exit, child)
    });

    // The client gets the handler's own answer, not a reset.
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut response = String::new();
    client.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(
        response.ends_with("report abandoned: shutdown\n"),
        "{response}"
    );

    let ((exit, took), _child) = terminated.join().unwrap();
    assert!(exit.success(), "{exit}");
    let lines = output.rest();
    println!("shutdown took {took:?}; output: {lines:#?}");
    assert!(
        took < Duration::from_secs(1),
        "shutdown took {took:?}, the handler was meant to stop at once"
    );

    // Each step happened, in order, and the cleanup ran before the process ended.
    let position = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in {lines:#?}"))
    };
    let steps = [
        position("shutdown: SIGTERM received"),
        position("shutdown: cancelling the requests in flight"),
        position("report: stopped early (shutdown)"),
        position("shutdown: every connection closed"),
        position("cleanup: released what /report held (shutdown)"),
        position("shutdown: every cleanup finished"),
        position("shutdown: done"),
    ];
    assert!(steps.is_sorted(), "steps out of order: {lines:#?}");
    assert!(position("cancelled: GET /report (shutdown") > steps[1]);
}
