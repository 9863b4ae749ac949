//! Runs `examples/axum.rs` (the README's router) as a real process: a client starts a payment
//! on the detached `/pay` route and leaves, the process gets SIGTERM, and it exits only once
//! the payment has committed. The app-wide layer creates every request's scope, so its tracker
//! tracks the per-route detached handler.
#![cfg(unix)]

#[path = "common/process.rs"]
mod process;

use std::io::Write;
use std::net::TcpStream;

#[test]
fn sigterm_during_a_payment_exits_only_after_the_payment_committed() {
    let (mut child, mut output, addr) = process::start("axum");
    let mut client = TcpStream::connect(&addr).unwrap();
    client
        .write_all(b"POST /pay HTTP/1.1\r\nhost: example\r\ncontent-length: 0\r\n\r\n")
        .unwrap();
    output.wait_for("pay: charging the card");
    drop(client); // the client leaves: the detached payment keeps running
    output.wait_for("layer: POST /pay cancelled: disconnected");

    let (exit, took) = process::terminate(&mut child);
    assert!(exit.success(), "{exit}");
    let lines = output.rest();
    let position = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in {lines:#?}"))
    };
    let steps = [
        position("shutdown: SIGTERM received"),
        position("shutdown: every connection closed"),
        position("pay: committed (client left"),
        position("shutdown: done"),
    ];
    assert!(steps.is_sorted(), "steps out of order: {lines:#?}");
    println!("exited {took:?} after SIGTERM: {lines:#?}");
}
