//! HTTP/3 (`tower_cancel::http3::serve`) with the `h3` crate's own client over quinn: a client
//! that stops or resets a request is seen at once, in the handler and mid-body; a completed
//! request cancels nothing; a response cut short is reset, never finished; a graceful shutdown
//! sends GOAWAY, cancels with `Shutdown` and drains within its bound.

#[macro_use]
mod common;
#[path = "common/http3.rs"]
mod http3;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use h3::error::Code;
use http::{Request, StatusCode};
use http3::*;
use tokio_util::sync::CancellationToken;

async fn completed_requests_cancel_nothing() {
    let (log, server, in_flight) = start(Duration::from_secs(5)).await;
    let mut client = H3Client::connect(&server).await;
    let three = CHUNK.repeat(3);
    // method, path, request body, status, response body
    type Case<'a> = (&'a str, &'a str, &'a [u8], u16, &'a [u8]);
    let cases: [Case<'_>; 7] = [
        ("GET", "/full", b"", 200, b"hello"),
        ("GET", "/empty", b"", 200, b""),
        ("GET", "/stream", b"", 200, &three),
        ("GET", "/stream-with-length", b"", 200, &three),
        ("GET", "/no-content", b"", 204, b""),
        ("HEAD", "/stream", b"", 200, b""),
        ("POST", "/read", &[b'x'; 100_000], 200, b"read 100000"),
    ];
    for (method, path, body, status, expected) in cases {
        let mut stream = client.request(method, path, body).await;
        let response = stream.recv_response().await.unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        assert_eq!(response.version(), http::Version::HTTP_3);
        let (got, ending) = read_body(&mut stream).await;
        assert_eq!(ending, Ending::Finished, "{method} {path}");
        assert_eq!(got, expected, "{method} {path}");
    }
    // Trailers end a response whose body would go on: the stream is finished after them.
    let mut stream = client.get("/trailers").await;
    stream.recv_response().await.unwrap();
    assert_eq!(
        read_body(&mut stream).await,
        (CHUNK.to_vec(), Ending::Finished)
    );
    let trailers = stream.recv_trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    // Many at once on the one connection.
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(client.get("/stream").await);
    }
    for mut stream in streams {
        stream.recv_response().await.unwrap();
        assert_eq!(
            read_body(&mut stream).await,
            (three.clone(), Ending::Finished)
        );
    }
    client.conn.close(0u32.into(), b"done");
    in_flight.wait_for_none().await;
    assert_eq!(cancellations(&log), Vec::<String>::new());
}

/// The client's cancel in the handler, as each client can send it: STOP_SENDING alone, or with
/// RESET_STREAM; and a request whose body is still being uploaded, reset while the handler
/// reads it.
async fn a_cancel_in_the_handler_is_disconnected_handler() {
    let (log, server, _in_flight) = start(Duration::from_secs(5)).await;
    let mut client = H3Client::connect(&server).await;
    for how in ["stop", "stop and reset", "drop"] {
        let mut stream = client.get("/honour").await;
        log.wait_for("start /honour").await;
        let sent = Instant::now();
        match how {
            "stop" => stream.stop_sending(Code::H3_REQUEST_CANCELLED),
            "stop and reset" => {
                stream.stop_sending(Code::H3_REQUEST_CANCELLED);
                stream.stop_stream(Code::H3_REQUEST_CANCELLED);
            }
            // What a Rust client does when its request future is dropped: quinn stops the
            // stream with code 0.
            _ => drop(stream),
        }
        log.wait_for("layer /honour disconnected handler").await;
        println!("{how} in the handler -> callback: {:?}", sent.elapsed());
        log.wait_for("dropped /honour").await;
        assert_eq!(
            cancellations(&log),
            [
                "handler /honour disconnected handler",
                "layer /honour disconnected handler"
            ]
        );
        assert!(
            !log.entries()
                .iter()
                .any(|e| e.starts_with("stopped /honour"))
        );
        log.clear();
    }

    // RESET_STREAM alone, mid-upload, while the handler reads: the handler is dropped, it
    // never answers 400.
    let mut stream = client.open("POST", "/read").await;
    stream
        .send_data(Bytes::from_static(&[b'x'; 1000]))
        .await
        .unwrap();
    log.wait_for("start /read").await;
    stream.stop_stream(Code::H3_REQUEST_CANCELLED);
    log.wait_for("layer /read disconnected handler").await;
    assert!(!log.entries().iter().any(|e| e.starts_with("read-error")));

    // The same with the body read on a task of its own: the handler is dropped, and the
    // reader, which lives on, gets the reset as its error, never a short body.
    let mut stream = client.open("POST", "/read-elsewhere").await;
    stream
        .send_data(Bytes::from_static(&[b'x'; 1000]))
        .await
        .unwrap();
    log.wait_for("start /read-elsewhere").await;
    stream.stop_stream(Code::H3_REQUEST_CANCELLED);
    log.wait_for("layer /read-elsewhere disconnected handler")
        .await;
    let outcome = tokio::time::timeout(PATIENCE, async {
        loop {
            let found = log.with_prefix("spawned reader /read-elsewhere: ");
            if let Some(found) = found.into_iter().next() {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the spawned reader never ended");
    assert!(outcome.contains("read-error"), "{outcome}");

    // The connection is still good.
    let mut stream = client.get("/full").await;
    stream.recv_response().await.unwrap();
    assert_eq!(
        read_body(&mut stream).await,
        (b"hello".to_vec(), Ending::Finished)
    );
}

async fn a_cancel_mid_body_is_disconnected_body() {
    let (log, server, _in_flight) = start(Duration::from_secs(5)).await;
    let mut client = H3Client::connect(&server).await;
    for path in ["/endless", "/stream-with-length"] {
        let mut stream = client.get(path).await;
        stream.recv_response().await.unwrap();
        read_at_least(&mut stream, CHUNK.len()).await;
        // h3-quinn's client panics on `stop_sending` while h3 has a read pending, which it may
        // have after any `recv_data`; dropping the stream makes quinn send STOP_SENDING (0).
        let sent = Instant::now();
        drop(stream);
        log.wait_for(&format!("layer {path} disconnected body"))
            .await;
        println!("drop mid-body {path} -> callback: {:?}", sent.elapsed());
        log.wait_for(&format!("body-dropped {path}")).await;
        assert_eq!(
            cancellations(&log),
            [
                format!("handler {path} disconnected body"),
                format!("layer {path} disconnected body")
            ]
        );
        log.clear();
    }
}

async fn losing_the_connection_cancels_its_requests() {
    let (log, server, _in_flight) = start(Duration::from_secs(5)).await;
    let mut client = H3Client::connect(&server).await;
    let _honour = client.get("/honour").await;
    let mut endless = client.get("/endless").await;
    endless.recv_response().await.unwrap();
    read_at_least(&mut endless, CHUNK.len()).await;
    log.wait_for("start /honour").await;
    client.conn.close(0x10c_u32.into(), b"gone");
    log.wait_for("layer /honour disconnected handler").await;
    log.wait_for("layer /endless disconnected body").await;
}

async fn a_body_cut_short_is_reset_never_finished() {
    let (log, server, _in_flight) = start(Duration::from_millis(300)).await;
    let mut client = H3Client::connect(&server).await;

    // The body fails after two chunks: the client sees a reset, never a finished response. A
    // reset discards what was not yet delivered, so the head itself may be lost with it.
    for _ in 0..10 {
        let mut stream = client.get("/broken").await;
        let ending = match stream.recv_response().await {
            Ok(_) => read_body(&mut stream).await.1,
            Err(error) => ending(&error),
        };
        assert_eq!(ending, Ending::Reset(H3_INTERNAL_ERROR));
    }

    // A body still streaming when the drain bound runs out is dropped: reset, not finished.
    let mut stream = client.get("/endless").await;
    stream.recv_response().await.unwrap();
    read_at_least(&mut stream, CHUNK.len()).await;
    server.shutdown.cancel();
    let (_, ending) = read_body(&mut stream).await;
    // The stream's reset, or the connection's close if that went out first (a close discards
    // the frames queued before it): never a finished response.
    assert!(
        ending == Ending::Reset(H3_REQUEST_CANCELLED)
            || matches!(&ending, Ending::Failed(e) if e.contains("ApplicationClose(H3_NO_ERROR)")),
        "{ending:?}"
    );
    // The shutdown came first: that is the reason recorded, once.
    log.wait_for("body-dropped /endless").await;
    assert_eq!(
        log.with_prefix("layer /endless"),
        ["layer /endless shutdown body"]
    );
    tokio::time::timeout(PATIENCE, server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

async fn a_graceful_shutdown_sends_goaway_cancels_with_shutdown_and_drains() {
    let (log, server, _in_flight) = start(Duration::from_secs(5)).await;
    let mut client = H3Client::connect(&server).await;
    let mut honour = client.get("/honour").await;
    log.wait_for("start /honour").await;
    let began = Instant::now();
    server.shutdown.cancel();

    // The handler honours its token: its 503 reaches the client, finished.
    let response = honour.recv_response().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        read_body(&mut honour).await,
        (b"stopped".to_vec(), Ending::Finished)
    );
    assert_eq!(
        cancellations(&log),
        [
            "handler /honour shutdown handler",
            "layer /honour shutdown handler"
        ]
    );
    // GOAWAY: the client opens no new request on this connection.
    let refused = tokio::time::timeout(PATIENCE, async {
        loop {
            let req = Request::get("https://localhost/full").body(()).unwrap();
            match client.send.send_request(req).await {
                Err(error) => return error,
                Ok(mut stream) => {
                    // Sent before the GOAWAY arrived: the server refuses it.
                    let _ = stream.finish().await;
                    assert!(stream.recv_response().await.is_err());
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the client never saw GOAWAY");
    println!("new request after GOAWAY: {refused}");

    // The server resolves once drained, long before its bound, and the endpoint is closed.
    tokio::time::timeout(PATIENCE, server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    println!("shutdown -> serve returned: {:?}", began.elapsed());
    assert!(began.elapsed() < Duration::from_secs(4));
    let closed = tokio::time::timeout(PATIENCE, client.conn.closed())
        .await
        .unwrap();
    println!("client saw: {closed}");
    // The endpoint's socket is gone (its driver task ends on its own, maybe on another
    // worker): its port can be bound again.
    let addr = server.addr;
    drop(server.endpoint);
    eventually("the endpoint's UDP socket to close", || {
        std::net::UdpSocket::bind(addr).is_ok()
    })
    .await;
}

/// A UDP relay between one client and `server` that forwards until told to stop: the client
/// then vanishes without a word, as a phone that lost its network does.
async fn relay(server: std::net::SocketAddr) -> (std::net::SocketAddr, CancellationToken) {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    let silenced = CancellationToken::new();
    let silence = silenced.clone();
    tokio::spawn(async move {
        let (mut up, mut down) = ([0u8; 65536], [0u8; 65536]);
        let mut client = None;
        loop {
            tokio::select! {
                received = front.recv_from(&mut up) => {
                    let (n, from) = received.unwrap();
                    client = Some(from);
                    if !silence.is_cancelled() {
                        let _ = back.send(&up[..n]).await;
                    }
                }
                received = back.recv(&mut down) => {
                    let Ok(n) = received else { continue };
                    if let (Some(client), false) = (client, silence.is_cancelled()) {
                        let _ = front.send_to(&down[..n], client).await;
                    }
                }
            }
        }
    });
    (addr, silenced)
}

/// A client that vanishes (its relay stops forwarding) is seen when the connection's idle
/// timeout passes, with the server's keep-alive PINGs keeping a healthy one open.
#[tokio::test]
async fn a_client_that_vanishes_is_seen_at_the_idle_timeout() {
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let in_flight = InFlight::default();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(100)));
    transport.max_idle_timeout(Some(Duration::from_millis(400).try_into().unwrap()));
    let svc = stack(&log, &shutdown, &in_flight);
    let server = H3Server::start_with(svc, shutdown, Duration::from_secs(1), transport, None).await;
    let (relay, silenced) = relay(server.addr).await;
    let mut client = H3Client::connect_to(&server, relay).await;
    let _honour = client.get("/honour").await;
    log.wait_for("start /honour").await;
    // Healthy and idle for longer than the idle timeout: the PINGs keep it open.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(cancellations(&log), Vec::<String>::new());
    let vanished = Instant::now();
    silenced.cancel();
    log.wait_for("layer /honour disconnected handler").await;
    let seen = vanished.elapsed();
    println!("vanished -> callback: {seen:?} (idle timeout 400 ms)");
    assert!(seen >= Duration::from_millis(300), "{seen:?}");
}

/// What the h3 client will not send, by hand. A request stream that ends inside a DATA frame is
/// a connection error (RFC 9114 §7.1: `H3_FRAME_ERROR`): the handler's read fails, it never
/// sees a shorter body as complete. Headers over the server's limit get h3's 431, finished,
/// not reset, and the connection serves on.
#[tokio::test]
async fn malformed_requests_get_clear_outcomes() {
    let (log, server, _in_flight) = start(Duration::from_secs(5)).await;
    let raw = RawClient::connect(&server).await;
    let mut request = headers_frame("POST", "/read", &[]);
    request.extend(data_frame_header(100));
    request.extend_from_slice(&[b'x'; 10]);
    let (_send, mut recv) = raw.send(&request, true).await;
    let (_, ending) = read_raw(&mut recv).await;
    assert_ne!(ending, Ending::Finished);
    let closed = tokio::time::timeout(PATIENCE, raw.conn.closed())
        .await
        .unwrap();
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(close) if close.error_code.into_inner() == 0x106),
        "{closed}"
    );
    log.wait_for_count("read-error /read", 1).await;
    assert!(!log.entries().iter().any(|e| e.starts_with("read 10")));

    let raw = RawClient::connect(&server).await;
    let big = "x".repeat(20_000);
    let request = headers_frame("GET", "/full", &[("x-big", &big)]);
    let (_send, mut recv) = raw.send(&request, true).await;
    let (bytes, ending) = read_raw(&mut recv).await;
    assert_eq!(ending, Ending::Finished, "h3's 431 must arrive whole");
    // `:status` by static name reference (index 24), its value "431" Huffman-coded.
    let status_431 = [0x5f, 0x09, 0x83, 0x69, 0x90, 0xff];
    assert!(bytes.windows(6).any(|w| w == status_431), "{bytes:?}");
    let (_send, mut recv) = raw.send(&headers_frame("GET", "/full", &[]), true).await;
    let (bytes, ending) = read_raw(&mut recv).await;
    assert_eq!(ending, Ending::Finished);
    assert!(bytes.ends_with(b"hello"), "{bytes:?}");
    assert!(!cancellations(&log).iter().any(|e| e.contains("/full")));
}

/// After GOAWAY, a request on the stream GOAWAY named (the first the client must consider not
/// processed) is refused with `H3_REQUEST_REJECTED`, never served.
#[tokio::test]
async fn a_request_on_the_goaway_stream_is_refused() {
    let (log, server, _in_flight) = start(Duration::from_secs(1)).await;
    let raw = RawClient::connect(&server).await;
    // A handler that ignores its token keeps the connection draining.
    let (_first_send, mut first) = raw.send(&headers_frame("GET", "/slow", &[]), true).await;
    log.wait_for("start /slow").await;
    server.shutdown.cancel();
    // h3 sends GOAWAY(4): stream 4 and later are not processed. The connection task sends it
    // when it wakes on the token, as the layer records the shutdown; some slack for the frame.
    log.wait_for("layer /slow shutdown handler").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_second_send, mut second) = raw.send(&headers_frame("GET", "/full", &[]), true).await;
    let (_, ending) = read_raw(&mut second).await;
    assert_eq!(ending, Ending::Reset(H3_REQUEST_REJECTED));
    assert!(!log.entries().iter().any(|e| e == "start /full"));
    // The one in flight is dropped at the drain bound: reset, not finished.
    let (_, ending) = read_raw(&mut first).await;
    assert_eq!(ending, Ending::Reset(H3_REQUEST_CANCELLED));
}

/// A connection serves `max_requests_per_connection` requests, then sends GOAWAY; those in
/// flight complete, and the client goes on on a new connection.
#[tokio::test]
async fn a_connection_ends_after_its_request_limit() {
    let log = Log::default();
    let shutdown = CancellationToken::new();
    let in_flight = InFlight::default();
    let svc = stack(&log, &shutdown, &in_flight);
    let transport = quinn::TransportConfig::default();
    let server =
        H3Server::start_with(svc, shutdown, Duration::from_secs(5), transport, Some(3)).await;
    let mut client = H3Client::connect(&server).await;
    for _ in 0..3 {
        let mut stream = client.get("/full").await;
        stream.recv_response().await.unwrap();
        assert_eq!(
            read_body(&mut stream).await,
            (b"hello".to_vec(), Ending::Finished)
        );
    }
    let refused = tokio::time::timeout(PATIENCE, async {
        loop {
            let req = Request::get("https://localhost/full").body(()).unwrap();
            if client.send.send_request(req).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    refused.await.expect("no GOAWAY after the limit");
    let mut again = H3Client::connect(&server).await;
    let mut stream = again.get("/full").await;
    stream.recv_response().await.unwrap();
    assert_eq!(
        read_body(&mut stream).await,
        (b"hello".to_vec(), Ending::Finished)
    );
    assert_eq!(cancellations(&log), Vec::<String>::new());
}

// The cells whose tasks race: on both runtime flavours.
both_flavours!(
    completed_requests_cancel_nothing,
    a_cancel_in_the_handler_is_disconnected_handler,
    a_cancel_mid_body_is_disconnected_body,
    losing_the_connection_cancels_its_requests,
    a_body_cut_short_is_reset_never_finished,
    a_graceful_shutdown_sends_goaway_cancels_with_shutdown_and_drains,
);

#[tokio::test]
async fn connection_specific_headers_never_reach_the_client() {
    // RFC 9114 §4.2: `connection`, `keep-alive`, `transfer-encoding`, `upgrade` make an HTTP/3
    // message malformed. A handler written for HTTP/1.1 (or a layer answering for it) may set
    // them: the server strips them, as hyper does for HTTP/2.
    let svc = tower::service_fn(|_: Request<tower_cancel::http3::IncomingBody>| async {
        let response = http::Response::builder()
            .header("connection", "close")
            .header("keep-alive", "timeout=5")
            .header("transfer-encoding", "chunked")
            .header("x-kept", "yes")
            .body(http_body_util::Full::new(Bytes::from_static(b"hi")))
            .unwrap();
        Ok::<_, std::convert::Infallible>(response)
    });
    let server = H3Server::start(svc, CancellationToken::new(), Duration::from_secs(1)).await;
    let mut client = H3Client::connect(&server).await;
    let mut stream = client.get("/").await;
    let response = stream.recv_response().await.unwrap();
    let names: Vec<_> = response.headers().keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["x-kept"], "{response:?}");
    assert_eq!(
        read_body(&mut stream).await,
        (b"hi".to_vec(), Ending::Finished)
    );
}

#[tokio::test]
async fn a_handler_or_body_that_panics_is_recorded_as_panicked_not_disconnected() {
    // The request task panics (the handler, or the response body after its first chunk): the
    // server failed, the client did not leave. The stream is reset, the connection serves on.
    let (log, server, in_flight) = start(Duration::from_secs(1)).await;
    let mut client = H3Client::connect(&server).await;
    for (path, phase) in [("/panic", "handler"), ("/panic-body", "body")] {
        let mut stream = client.get(path).await;
        let ending = match stream.recv_response().await {
            Ok(_) => read_body(&mut stream).await.1,
            Err(error) => ending(&error),
        };
        assert_ne!(
            ending,
            Ending::Finished,
            "{path}: never a complete response"
        );
        log.wait_for(&format!("layer {path} panicked {phase}"))
            .await;
    }
    in_flight.wait_for_none().await;
    assert_eq!(
        log.with_prefix("layer "),
        [
            "layer /panic panicked handler",
            "layer /panic-body panicked body"
        ]
    );
    let mut stream = client.get("/full").await;
    stream.recv_response().await.unwrap();
    assert_eq!(
        read_body(&mut stream).await,
        (b"hello".to_vec(), Ending::Finished)
    );
}
