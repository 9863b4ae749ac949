//! `RequestCancellation::run` over a real socket: work bound to its request stops when the
//! request is cancelled by something that does not drop the handler (here its deadline), and
//! the handler answers with the record of why.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tower::{Layer, service_fn};
use tower_cancel::{CancelReason, CancellationLayer, RequestCancellation};

#[tokio::test]
async fn run_stops_the_work_at_the_deadline_and_says_why() {
    let log = Log::default();
    let l = log.clone();
    let handler = service_fn(move |req: Request<Incoming>| {
        let log = l.clone();
        async move {
            let rc = RequestCancellation::from_extensions(req.extensions()).unwrap();
            let work = async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                log.push("work finished");
            };
            let response = match rc.run(work).await {
                Ok(()) => Response::new(Full::new(Bytes::from_static(b"done"))),
                Err(cancelled) => {
                    assert_eq!(cancelled.reason(), CancelReason::DeadlineExceeded);
                    assert!(cancelled.elapsed() >= Duration::from_millis(100));
                    log.push(format!("stopped: {cancelled}"));
                    let mut response = Response::new(Full::new(Bytes::from(cancelled.to_string())));
                    *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
                    response
                }
            };
            Ok::<_, Infallible>(response)
        }
    });
    let layer = CancellationLayer::new().timeout(Duration::from_millis(100));
    let server = Server::start(layer.layer(handler)).await;

    let mut stream = raw_request(&server, &get("/report")).await;
    let answer = read_until(&mut stream, "after").await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(
        answer.contains("GET /report cancelled (deadline_exceeded) in handler after"),
        "{answer}"
    );
    assert_eq!(log.with_prefix("work finished"), Vec::<String>::new());
    assert_eq!(log.with_prefix("stopped:").len(), 1);
}

#[tokio::test]
async fn run_on_a_cancelled_request_does_not_start_the_work() {
    let svc = CancellationLayer::new().layer(service_fn(|req: Request<()>| async move {
        let rc = RequestCancellation::from_extensions(req.extensions()).unwrap();
        rc.token().cancel();
        let started = rc.run(async { unreachable!("not started") }).await;
        let cancelled = started.unwrap_err();
        assert_eq!(cancelled.reason(), CancelReason::Explicit);
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let response = tower::ServiceExt::oneshot(svc, Request::new(()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}
