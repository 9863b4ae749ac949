//! Service A (axum) calls service B (axum) with reqwest, through `PropagateMiddleware`. A's
//! handler hands the call to a task of its own (work that outlives the handler future); the
//! client of A gives up after 100 ms; the call to B stops with A's request, and B's request is
//! cancelled a moment later. Then A's deadline (500 ms) reaches B in B's own convention.
//!
//! Run with: cargo run --example reqwest --features axum,reqwest
//!
//! ```toml
//! [dependencies]
//! tower-cancel = { version = "0.1", features = ["axum", "reqwest"] }
//! axum = "0.8"
//! reqwest = "0.13"
//! reqwest-middleware = "0.5"
//! tokio = { version = "1", features = ["full"] }
//! ```

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::net::TcpListener;
use tower_cancel::propagate::PropagateMiddleware;
use tower_cancel::{CancellationLayer, Cancelled, InboundCancelled, RequestCancellation};

#[derive(Clone)]
struct A {
    client: ClientWithMiddleware,
    b: String,
    started: Instant,
}

/// A's handler: the call to B runs in a task of its own, bound to A's request by the
/// middleware, and the handler waits for it.
async fn a_handler(State(a): State<A>, inbound: RequestCancellation) -> String {
    let call = a
        .client
        .get(format!("{}/report", a.b))
        .with_extension(inbound.clone())
        .send();
    let started = a.started;
    let task = tokio::spawn(async move {
        let outcome = match call.await {
            Ok(response) => response.text().await.map_err(|e| e.to_string()),
            Err(reqwest_middleware::Error::Middleware(error)) => {
                Err(match error.downcast_ref::<InboundCancelled>() {
                    Some(why) => format!("abandoned ({})", why.reason()),
                    None => error.to_string(),
                })
            }
            Err(error) => Err(error.to_string()),
        };
        println!("{:>8.1} ms  A: the call to B: {outcome:?}", ms(started));
        outcome.unwrap_or_default()
    });
    task.await.unwrap_or_default()
}

/// B's handler: a report that takes 2 s, unless its request is cancelled first.
async fn b_handler(cancel: RequestCancellation) -> String {
    if let Some(deadline) = cancel.deadline() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        println!("          B: request received with a deadline {left:.0?} away");
    }
    tokio::select! {
        reason = cancel.cancelled() => format!("stopped: {reason}"),
        () = tokio::time::sleep(Duration::from_secs(2)) => "the report".to_owned(),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let started = Instant::now();
    let b = Router::new().route("/report", get(b_handler)).layer(
        CancellationLayer::new()
            .connect_timeout(true) // B honours `connect-timeout-ms`
            .on_cancel(move |c: &Cancelled| {
                println!(
                    "{:>8.1} ms  B: cancelled ({}, {})",
                    ms(started),
                    c.reason(),
                    c.phase()
                );
            }),
    );
    let b_listener = TcpListener::bind("127.0.0.1:0").await?;
    let b_url = format!("http://{}", b_listener.local_addr()?);
    tokio::spawn(async move { axum::serve(b_listener, b).await });

    let client = ClientBuilder::new(reqwest::Client::new())
        // B speaks Connect's header for deadlines.
        .with(
            PropagateMiddleware::new()
                .deadline_header(http::HeaderName::from_static("connect-timeout-ms")),
        )
        .build();
    let a_state = A {
        client,
        b: b_url,
        started,
    };
    let a = Router::new()
        .route("/", get(a_handler))
        .with_state(a_state)
        .layer(
            CancellationLayer::new()
                .timeout(Duration::from_millis(500))
                .on_cancel(move |c: &Cancelled| {
                    println!(
                        "{:>8.1} ms  A: cancelled ({}, {})",
                        ms(started),
                        c.reason(),
                        c.phase()
                    );
                }),
        );
    let a_listener = TcpListener::bind("127.0.0.1:0").await?;
    let a_url = format!("http://{}/", a_listener.local_addr()?);
    tokio::spawn(async move { axum::serve(a_listener, a).await });

    // 1. The client gives up after 100 ms.
    println!(
        "{:>8.1} ms  client: GET A, gives up after 100 ms",
        ms(started)
    );
    let give_up = tokio::time::timeout(Duration::from_millis(100), reqwest::get(&a_url)).await;
    assert!(give_up.is_err(), "A answered within 100 ms");
    println!("{:>8.1} ms  client: gone", ms(started));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 2. The client waits: A's deadline (500 ms) stops A and, through the header, B.
    println!("{:>8.1} ms  client: GET A, waits", ms(started));
    let answer = reqwest::get(&a_url).await.map_err(std::io::Error::other)?;
    println!(
        "{:>8.1} ms  client: A answered {}",
        ms(started),
        answer.status()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}
