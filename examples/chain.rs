//! Cancellation across services: a client → A (plain hyper, HTTP/1.1) → B (tonic) → C (axum,
//! called over Connect),
//! three real servers on loopback in one process, each behind a `CancellationLayer`, each
//! calling the next through a `PropagateLayer`. Runs by itself and prints a timeline:
//!
//! 1. The client gives up on its request at A: A, B and C are cancelled in that order, within
//!    a fraction of a millisecond per hop.
//! 2. A has a 300 ms deadline: B receives it as a shorter `grpc-timeout` and C as a shorter
//!    `connect-timeout-ms`, and all three stop at it.
//! 3. A's server shuts down with the call in flight: A's handler is not dropped, so only its
//!    `PropagateLayer` can stop the call it waits on; it fails with `InboundCancelled`, which
//!    tonic reports as `UNAVAILABLE`, and A answers 503.
//!
//! Run with: cargo run --example chain

#[allow(dead_code, unreachable_pub)]
#[path = "tonic/reports.rs"]
mod reports;

#[allow(dead_code, unreachable_pub)]
#[path = "chain/services.rs"]
mod services;

use std::net::SocketAddr;
use std::time::Duration;

use services::{AOptions, Timeline, serve_chain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const CHAIN: &[u8] = b"GET /chain HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";

async fn send(a: SocketAddr) -> TcpStream {
    let mut client = TcpStream::connect(a).await.expect("connect to A");
    client.write_all(CHAIN).await.expect("send to A");
    client
}

/// A's status line.
async fn status_line(mut client: TcpStream) -> String {
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut answer)).await;
    answer.lines().next().unwrap_or("no answer").to_owned()
}

/// Lets the last callbacks of a scenario print before the next starts.
async fn pause() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::main]
async fn main() {
    println!("1. The client leaves while C works on its request.");
    let timeline = Timeline::new(true);
    let a = serve_chain(&timeline, AOptions::default()).await;
    let client = send(a).await;
    timeline.wait_for("C: request started").await;
    timeline.record("client: closing the connection");
    drop(client);
    let at_a = timeline.wait_for("A: cancelled").await;
    let at_b = timeline.wait_for("B: cancelled").await;
    let at_c = timeline.wait_for("C: cancelled").await;
    pause().await;
    println!(
        "   hop to hop: A → B {:.0} µs, B → C {:.0} µs\n",
        (at_b - at_a).as_secs_f64() * 1e6,
        (at_c - at_b).as_secs_f64() * 1e6,
    );

    println!("2. A gives every request 300 ms.");
    let timeline = Timeline::new(true);
    let a = serve_chain(
        &timeline,
        AOptions {
            timeout: Some(Duration::from_millis(300)),
            ..AOptions::default()
        },
    )
    .await;
    let answer = status_line(send(a).await).await;
    timeline.wait_for("C: cancelled").await;
    pause().await;
    println!("   the client got: {answer}\n");

    println!("3. A's server shuts down while the call is in flight.");
    let timeline = Timeline::new(true);
    let shutdown = CancellationToken::new();
    let a = serve_chain(
        &timeline,
        AOptions {
            shutdown: Some(shutdown.clone()),
            ..AOptions::default()
        },
    )
    .await;
    let client = send(a).await;
    timeline.wait_for("C: request started").await;
    timeline.record("A's server: shutting down");
    shutdown.cancel();
    let answer = status_line(client).await;
    timeline.wait_for("C: cancelled").await;
    pause().await;
    println!("   the client got: {answer}");
}
