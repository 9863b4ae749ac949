//! A real browser as the client: headless Chromium loads a page whose script starts a slow
//! `fetch` and aborts it with an `AbortController`; the server must see the request cancelled
//! as `Disconnected` while the browser is still running.

#[path = "common/browser.rs"]
mod browser;
mod common;
#[path = "../examples/https/tls.rs"]
mod tls;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tower::ServiceExt;
use tower_cancel::{CancellationLayer, Cancelled};

use browser::*;
use common::*;

/// The first browser request can wait for a cold Chromium start.
const BROWSER_START: Duration = Duration::from_secs(30);

/// The page: starts `fetch('/slow')`, polls `/started` until the server has seen it, aborts it,
/// and reports the error the fetch failed with (and how long after the abort, in ms).
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>abort a fetch</title>
<script>
(async () => {
  const controller = new AbortController();
  const slow = fetch('/slow', {signal: controller.signal, cache: 'no-store'});
  // Abort only once the handler runs, so that the abort cancels a request in flight.
  while ((await (await fetch('/started', {cache: 'no-store'})).text()) !== 'yes') {
    await new Promise(resolve => setTimeout(resolve, 20));
  }
  const aborted = performance.now();
  controller.abort();
  let outcome;
  try {
    await slow;
    outcome = 'aborted=none';
  } catch (e) {
    outcome = 'aborted=' + encodeURIComponent(e.name);
  }
  const ms = (performance.now() - aborted).toFixed(1);
  await fetch('/report?' + outcome + '&ms=' + ms, {cache: 'no-store'});
})().catch(e => fetch('/report?error=' + encodeURIComponent(String(e))));
</script>
"#;

/// The page over HTTPS: an `XMLHttpRequest` to `/slow?n=1`, aborted with `xhr.abort()` as soon
/// as `/started?n=1` says the server runs it, then a `fetch` to `/slow?n=2` aborted through an
/// `AbortController` as soon as `/started?n=2` says yes; it reports both. The `n` tells the
/// server which abort a cancellation belongs to, and each abort follows the first "yes" for its
/// `n` by the page's half round trip.
const PAGE_TLS: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>abort an XHR and a fetch</title>
<script>
const started = async n => {
  while ((await (await fetch('/started?n=' + n, {cache: 'no-store'})).text()) !== 'yes') {
    await new Promise(resolve => setTimeout(resolve, 20));
  }
};
(async () => {
  const xhr = new XMLHttpRequest();
  const xhrDone = new Promise(resolve => { xhr.onabort = () => resolve('abort'); xhr.onload = () => resolve('load'); xhr.onerror = () => resolve('error'); });
  xhr.open('GET', '/slow?n=1');
  xhr.send();
  await started(1);
  xhr.abort();
  const xhrOutcome = await xhrDone;
  const controller = new AbortController();
  const slow = fetch('/slow?n=2', {signal: controller.signal, cache: 'no-store'});
  await started(2);
  controller.abort();
  let fetchOutcome;
  try { await slow; fetchOutcome = 'none'; } catch (e) { fetchOutcome = e.name; }
  await fetch('/report?xhr=' + xhrOutcome + '&fetch=' + encodeURIComponent(fetchOutcome), {cache: 'no-store'});
})().catch(e => fetch('/report?error=' + encodeURIComponent(String(e))));
</script>
"#;

/// What the router saw, beside the log: every request's version, and when things happened.
/// The maps are keyed by the `n` of `?n=` (1 without one): which `/slow` of the page.
#[derive(Default)]
struct Seen {
    requests: Vec<(String, Version)>,
    /// When `/started?n=` first answered "yes": the page aborts `/slow?n=` right after it reads
    /// that.
    started_yes: BTreeMap<usize, Instant>,
    /// When `/slow?n=` reached the router.
    slow_arrived: BTreeMap<usize, Instant>,
    report: Option<Instant>,
    /// When the layer's `on_cancel` ran for `/slow?n=`.
    cancelled: BTreeMap<usize, Instant>,
}

/// The `n` of a `?n=` query: which of the page's `/slow` requests (1 without one).
fn query_n(uri: &Uri) -> usize {
    uri.query()
        .and_then(|q| q.strip_prefix("n="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// A layer whose first callback stamps, per `n`, when it ran for a cancelled `/slow?n=`, and
/// whose second logs as `name`: when the log shows the cancellation, the stamp is there.
fn stamping_layer(log: &Log, seen: &Shared, name: &'static str) -> CancellationLayer {
    let (log, seen) = (log.clone(), seen.clone());
    CancellationLayer::new()
        .on_cancel(move |c: &Cancelled| {
            let now = Instant::now();
            seen.lock()
                .unwrap()
                .cancelled
                .entry(query_n(c.uri()))
                .or_insert(now);
        })
        .on_cancel(move |c: &Cancelled| log.push(describe(name, c)))
}

type Shared = Arc<Mutex<Seen>>;

/// Serves the page and its helper endpoints; forwards every other path to the test app.
fn router(
    log: Log,
    seen: Shared,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<AppBody>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    let app = app(log.clone());
    tower::service_fn(move |req: Request<Incoming>| {
        let (log, seen, app) = (log.clone(), seen.clone(), app.clone());
        async move {
            let arrived = Instant::now();
            let path = req.uri().path().to_owned();
            {
                let mut s = seen.lock().unwrap();
                s.requests.push((path.clone(), req.version()));
                if path == "/slow" {
                    s.slow_arrived.entry(query_n(req.uri())).or_insert(arrived);
                }
            }
            Ok(match path.as_str() {
                "/page" => text(StatusCode::OK, "text/html; charset=utf-8", PAGE),
                "/page-tls" => text(StatusCode::OK, "text/html; charset=utf-8", PAGE_TLS),
                "/started" => {
                    // `n=2`: the second `/slow` has started.
                    let n = query_n(req.uri());
                    let starts = log.entries().iter().filter(|e| *e == "start /slow").count();
                    if starts >= n {
                        // The first "yes" for `n` is the one the page aborts after.
                        seen.lock()
                            .unwrap()
                            .started_yes
                            .entry(n)
                            .or_insert_with(Instant::now);
                        text(StatusCode::OK, "text/plain", "yes")
                    } else {
                        text(StatusCode::OK, "text/plain", "no")
                    }
                }
                "/report" => {
                    seen.lock().unwrap().report = Some(Instant::now());
                    log.push(format!("report {}", req.uri().query().unwrap_or("")));
                    text(StatusCode::NO_CONTENT, "text/plain", "")
                }
                // Kept out of the app so that its log holds only `/slow`.
                "/favicon.ico" => text(StatusCode::NOT_FOUND, "text/plain", ""),
                _ => app.oneshot(req).await?,
            })
        }
    })
}

#[tokio::test]
async fn aborted_fetch_in_chromium_cancels_the_request() {
    let Some(chromium) = chromium() else { return };
    let log = Log::default();
    let seen = Shared::default();
    let server = Server::start(
        tower::ServiceBuilder::new()
            .layer(stamping_layer(&log, &seen, "layer"))
            .service(router(log.clone(), seen.clone())),
    )
    .await;

    let mut browser = Browser::launch(chromium, &server.url("/page"));
    browser.wait_for(&log, "start /slow", BROWSER_START).await;
    browser
        .wait_for(&log, "layer /slow disconnected handler", PATIENCE)
        .await;
    // The abort cancelled the request, not the browser going away.
    assert!(
        browser.is_running(),
        "chromium exited before the request was cancelled"
    );
    let report = browser
        .wait_until(&log, "the page's report", PATIENCE, |e| {
            e.starts_with("report ")
        })
        .await;
    assert!(
        report.starts_with("report aborted=AbortError&ms="),
        "the page reported {report:?}"
    );
    assert!(browser.is_running(), "chromium exited during the test");

    // Everything the app logged: the one `/slow` request, dropped, then both callbacks.
    let app_entries: Vec<_> = log
        .entries()
        .into_iter()
        .filter(|e| !e.starts_with("report "))
        .collect();
    assert_eq!(
        app_entries,
        [
            "start /slow",
            "dropped /slow",
            "handler /slow disconnected handler",
            "layer /slow disconnected handler",
        ]
    );
    let handles = log.handles();
    assert_eq!(handles.len(), 1);
    assert_eq!(
        handles[0].reason(),
        Some(tower_cancel::CancelReason::Disconnected)
    );

    let seen = seen.lock().unwrap();
    // Chromium speaks HTTP/2 only over TLS: to a plain http:// origin it uses HTTP/1.1.
    assert!(seen.requests.iter().any(|(path, _)| path == "/slow"));
    assert!(
        seen.requests.iter().all(|(_, v)| *v == Version::HTTP_11),
        "versions: {:?}",
        seen.requests
    );
    let (yes, cancelled, reported) = (
        seen.started_yes[&1],
        seen.cancelled[&1],
        seen.report.unwrap(),
    );
    eprintln!(
        "requests: {:?}\n/started said yes → cancelled: {:.1} ms; report → cancelled: {:+.1} ms; \
         page: {report}",
        seen.requests,
        signed(yes, cancelled),
        signed(reported, cancelled),
    );
    drop(browser);
}

/// Over HTTPS (rustls, ALPN), where Chromium speaks HTTP/2: an `XMLHttpRequest` aborted with
/// `xhr.abort()` and a `fetch` aborted through an `AbortController` each cancel their request
/// with `Disconnected` while the browser runs, and the server saw HTTP/2.
#[tokio::test]
async fn aborted_xhr_and_fetch_over_https_cancel_their_requests_over_http2() {
    let Some(chromium) = chromium() else { return };
    let log = Log::default();
    let seen = Shared::default();
    let svc = tower::ServiceBuilder::new()
        .layer(stamping_layer(&log, &seen, "layer"))
        .service(router(log.clone(), seen.clone()));
    let (config, _) = tls::server_config(None).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(tls::serve(listener, config, svc));

    let url = format!("https://127.0.0.1:{}/page-tls", addr.port());
    let mut browser = Browser::launch_with(chromium, &url, &["--ignore-certificate-errors"]);
    let report = browser
        .wait_until(&log, "the page's report", BROWSER_START, |e| {
            e.starts_with("report ")
        })
        .await;
    assert_eq!(
        report,
        "report xhr=abort&fetch=AbortError",
        "{:#?}",
        log.entries()
    );
    log.wait_for_count("layer /slow disconnected handler", 2)
        .await;
    assert!(browser.is_running(), "chromium exited during the test");
    assert_eq!(
        log.with_prefix("layer"),
        ["layer /slow disconnected handler"; 2]
    );
    let seen = seen.lock().unwrap();
    let slow: Vec<_> = seen.requests.iter().filter(|(p, _)| p == "/slow").collect();
    assert_eq!(slow.len(), 2, "{:?}", seen.requests);
    assert!(
        seen.requests.iter().all(|(_, v)| *v == Version::HTTP_2),
        "Chromium speaks HTTP/2 over TLS: {:?}",
        seen.requests
    );
    // Each abort follows the first "yes" for its `n` by the page's half round trip (the answer
    // travelling to the page, the script reading it): "yes → cancelled" is the browser's
    // give-up → on_cancel plus that. "→ next request" is signed: negative when the server
    // cancelled the aborted request before the page's next request (the fetch, the report)
    // arrived. Printed, not asserted: the machines are shared.
    let stamp = |n: usize, what: &str| {
        *seen
            .cancelled
            .get(&n)
            .unwrap_or_else(|| panic!("on_cancel stamped no cancellation for the {what} (n={n})"))
    };
    let (xhr, fetch) = (stamp(1, "XHR"), stamp(2, "fetch"));
    let (yes1, yes2) = (seen.started_yes[&1], seen.started_yes[&2]);
    let (next1, report) = (seen.slow_arrived[&2], seen.report.unwrap());
    eprintln!(
        "https h2 xhr: /started said yes → cancelled: {:.1} ms; next request → cancelled: {:+.1} ms\n\
         https h2 fetch: /started said yes → cancelled: {:.1} ms; report → cancelled: {:+.1} ms",
        signed(yes1, xhr),
        signed(next1, xhr),
        signed(yes2, fetch),
        signed(report, fetch),
    );
    drop(seen);
    drop(browser);
    server.abort();
}
