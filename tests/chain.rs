//! Cancellation across services: client → A (hyper, HTTP/1.1) → B (tonic) → C (axum), three
//! real servers on loopback (`examples/chain/services.rs`), each behind a `CancellationLayer`,
//! each calling the next through a `PropagateLayer`.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/tonic/reports.rs"]
mod reports;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/chain/services.rs"]
mod services;

use std::time::Duration;

use services::{AOptions, Timeline, serve_chain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const CHAIN: &[u8] = b"GET /chain HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";

/// How many events start with `prefix`.
fn count(timeline: &Timeline, prefix: &str) -> usize {
    timeline
        .events()
        .iter()
        .filter(|(_, event)| event.starts_with(prefix))
        .count()
}

/// A's whole answer (it closes the connection after it).
async fn answer(client: &mut TcpStream) -> String {
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut answer))
        .await
        .expect("A answered within 10 s")
        .unwrap();
    answer
}

/// Lets late events (a second callback run, say) arrive before counting.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_a_cancels_b_then_c() {
    let timeline = Timeline::new(false);
    let a = serve_chain(&timeline, AOptions::default()).await;

    let mut client = TcpStream::connect(a).await.unwrap();
    client.write_all(CHAIN).await.unwrap();
    timeline.wait_for("C: request started").await;
    timeline.record("client: closing the connection");
    drop(client);

    let at_a = timeline
        .wait_for("A: cancelled (disconnected, handler)")
        .await;
    let at_b = timeline
        .wait_for("B: cancelled (disconnected, handler)")
        .await;
    let at_c = timeline
        .wait_for("C: cancelled (disconnected, handler)")
        .await;
    settle().await;
    println!(
        "hop to hop: A → B {:?}, B → C {:?} (client close → A {:?})",
        at_b - at_a,
        at_c - at_b,
        at_a - timeline.find("client: closing").unwrap()
    );
    // B's reset goes out when A's handler (holding the call) is dropped, a moment before A's
    // own callback runs: B may record first by a hair. C can only follow B.
    assert!(at_b <= at_c, "{:#?}", timeline.events());
    assert!(
        at_b + Duration::from_millis(5) >= at_a,
        "{:#?}",
        timeline.events()
    );
    // "A few milliseconds": generous, for a loaded CI machine.
    assert!(
        at_c - at_a < Duration::from_secs(1),
        "{:#?}",
        timeline.events()
    );
    for once in [
        "A: cancelled",
        "B: cancelled",
        "C: cancelled",
        "B: handler cleanup ran",
        "C: handler cleanup ran",
    ] {
        assert_eq!(
            count(&timeline, once),
            1,
            "{once}: {:#?}",
            timeline.events()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_at_a_arrives_at_b_as_grpc_timeout_and_at_c_as_connect_timeout_ms() {
    let timeline = Timeline::new(false);
    let a = serve_chain(
        &timeline,
        AOptions {
            timeout: Some(Duration::from_millis(600)),
            ..AOptions::default()
        },
    )
    .await;

    let mut client = TcpStream::connect(a).await.unwrap();
    client.write_all(CHAIN).await.unwrap();
    let answer = answer(&mut client).await;
    timeline.wait_for("C: cancelled").await;
    settle().await;

    let header_at = |prefix: &str, header: &str| -> String {
        let events = timeline.events();
        let (_, event) = events
            .iter()
            .find(|(_, event)| event.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}: {events:#?}"));
        let value = event
            .rsplit(&format!("{header} "))
            .next()
            .unwrap()
            .trim_end_matches(')');
        value.to_owned()
    };
    let at_b = parse(&header_at("B: call started", "grpc-timeout"));
    let at_c = header_at("C: request started", "connect-timeout-ms");
    let at_c = Duration::from_millis(
        at_c.parse()
            .unwrap_or_else(|_| panic!("connect-timeout-ms {at_c:?}")),
    );
    println!("grpc-timeout {at_b:?} at B, connect-timeout-ms {at_c:?} at C (A's timeout: 600 ms)");
    assert!(at_b < Duration::from_millis(600), "B got {at_b:?}");
    assert!(at_c < at_b, "C got {at_c:?}, B {at_b:?}");
    // B and C stop at their deadline, or when the hop before them resets the call at its own
    // deadline: that counts as theirs only if it comes within 20 ms of it, and cold
    // connections on a loaded machine can make the forward path slower than that.
    for hop in ["B", "C"] {
        let at_deadline = count(&timeline, &format!("{hop}: cancelled (deadline_exceeded"));
        let reset = count(&timeline, &format!("{hop}: cancelled (disconnected"));
        assert_eq!(at_deadline + reset, 1, "{hop}: {:#?}", timeline.events());
    }
    // At A the deadline is enforced twice: by A's layer, and by tonic's client, which enforces
    // the `grpc-timeout` the PropagateLayer set (a hair shorter, as time passed). Whichever
    // fires first, A answers with a failed call; A's scope is either cancelled at its deadline
    // or completed by that answer just before it.
    let a_cancelled = count(&timeline, "A: cancelled (deadline_exceeded, handler)");
    assert!(a_cancelled <= 1 && count(&timeline, "A: cancelled") == a_cancelled);
    assert_eq!(
        count(&timeline, "A: call to B failed"),
        1,
        "{:#?}",
        timeline.events()
    );
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
}

/// `grpc-timeout` values as the layers write them (digits, then one unit letter).
fn parse(value: &str) -> Duration {
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("grpc-timeout {value:?}"));
    match unit {
        "n" => Duration::from_nanos(n),
        "u" => Duration::from_micros(n),
        "m" => Duration::from_millis(n),
        "S" => Duration::from_secs(n),
        "M" => Duration::from_secs(n * 60),
        "H" => Duration::from_secs(n * 3600),
        _ => panic!("grpc-timeout {value:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_at_a_abandons_the_calls_it_made_with_a_typed_error() {
    let timeline = Timeline::new(false);
    let shutdown = CancellationToken::new();
    let a = serve_chain(
        &timeline,
        AOptions {
            shutdown: Some(shutdown.clone()),
            ..AOptions::default()
        },
    )
    .await;

    let mut client = TcpStream::connect(a).await.unwrap();
    client.write_all(CHAIN).await.unwrap();
    timeline.wait_for("C: request started").await;
    // A's handler is not dropped by a shutdown: it keeps running, so only the PropagateLayer
    // can stop the call it is waiting on.
    shutdown.cancel();
    let answer = answer(&mut client).await;
    timeline.wait_for("C: cancelled").await;
    settle().await;

    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains(
            "the outbound call was abandoned: the inbound request was cancelled (shutdown)"
        ),
        "{answer}"
    );
    assert_eq!(count(&timeline, "A: cancelled (shutdown, handler)"), 1);
    assert_eq!(
        count(&timeline, "A: call to B failed: Unavailable"),
        1,
        "tonic reports the typed error as the reason's status: {:#?}",
        timeline.events()
    );
    assert_eq!(count(&timeline, "B: cancelled (disconnected, handler)"), 1);
    assert_eq!(count(&timeline, "C: cancelled (disconnected, handler)"), 1);
}
