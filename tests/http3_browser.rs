//! A real browser over HTTP/3: headless Chromium loads a page from `tower_cancel::http3::serve`
//! (QUIC only: there is no TCP listener) and aborts a `fetch` with an `AbortController`, once
//! while the handler runs and once while the page reads the streamed body; the server must see
//! each request cancelled as `Disconnected` in the right phase while the browser still runs,
//! and every request, the page included, must have gone over HTTP/3.

#[path = "common/browser.rs"]
mod browser;
mod common;
#[path = "common/http3.rs"]
mod http3;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{Request, Response, StatusCode, Version};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_cancel::http3::IncomingBody;
use tower_cancel::{CancellationLayer, Cancelled};

use browser::*;
use common::*;
use http3::H3Server;

/// The first browser request can wait for a cold Chromium start.
const BROWSER_START: Duration = Duration::from_secs(30);

/// The page. `?case=handler`: a `fetch('/slow')` aborted once the server says its handler
/// runs. `?case=body`: a `fetch('/endless')` whose body the page reads, aborted after three
/// chunks (42 bytes: `common::CHUNK` is 14). Right before each abort it sends the beacon
/// `/aborting?sent=` (its own clock, ms since the epoch); then it reports the error the fetch
/// (or the read) failed with, the wall-clock time of the abort (`at`), how long the rejection
/// took (`ms`), and the `nextHopProtocol` of its navigation and resource timing entries (once
/// the beacon's is there).
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>abort a fetch over HTTP/3</title>
<script>
const now = () => performance.timeOrigin + performance.now();
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));
const get = async path => (await fetch(path, {cache: 'no-store'})).text();
const entries = () => performance.getEntriesByType('navigation')
  .concat(performance.getEntriesByType('resource'))
  .map(e => new URL(e.name).pathname + ':' + e.nextHopProtocol);
(async () => {
  const which = new URLSearchParams(location.search).get('case');
  const controller = new AbortController();
  let beacon, at, outcome;
  const abort = () => {
    beacon = get('/aborting?sent=' + now().toFixed(3));
    at = now();
    controller.abort();
  };
  if (which === 'handler') {
    const slow = fetch('/slow', {signal: controller.signal, cache: 'no-store'});
    // Abort only once the handler runs, so that the abort cancels a request in flight.
    while ((await get('/started')) !== 'yes') await sleep(20);
    abort();
    try { await slow; outcome = 'none'; } catch (e) { outcome = e.name; }
  } else {
    const response = await fetch('/endless', {signal: controller.signal, cache: 'no-store'});
    const reader = response.body.getReader();
    for (let got = 0; got < 3 * 14;) {
      const {value, done} = await reader.read();
      if (done) throw new Error('/endless ended');
      got += value.length;
    }
    abort();
    try {
      for (;;) {
        if ((await reader.read()).done) { outcome = 'done'; break; }
      }
    } catch (e) { outcome = e.name; }
  }
  const ms = (now() - at).toFixed(1);
  await beacon;
  for (let i = 0; i < 100 && !entries().some(e => e.startsWith('/aborting:')); i++) await sleep(20);
  await fetch('/report?aborted=' + encodeURIComponent(outcome) + '&at=' + at.toFixed(3) +
    '&ms=' + ms + '&protocols=' + encodeURIComponent(entries().join(',')), {cache: 'no-store'});
})().catch(e => fetch('/report?error=' + encodeURIComponent(String(e))));
</script>
"#;

// The page counts on it.
const _: () = assert!(CHUNK.len() == 14);

/// What the router saw, beside the log: every request's path and version, and when things
/// happened (monotonic, and wall-clock for the page's own timestamps).
#[derive(Default)]
struct Seen {
    requests: Vec<(String, Version)>,
    /// When `/started` first answered "yes": the page aborts `/slow` right after it reads it.
    started_yes: Option<Instant>,
    /// When the beacon the page sends right before its abort arrived, and the page's clock
    /// when it sent it (ms since the epoch).
    aborting: Option<(Instant, SystemTime, f64)>,
    report: Option<Instant>,
    /// When the layer's `on_cancel` first ran for a path.
    cancelled: BTreeMap<String, (Instant, SystemTime)>,
}

type Shared = Arc<Mutex<Seen>>;

/// A layer whose first callback stamps when it ran for a path, and whose second logs as
/// `layer`: when the log shows the cancellation, the stamp is there.
fn stamping_layer(log: &Log, seen: &Shared) -> CancellationLayer {
    let (log, seen) = (log.clone(), seen.clone());
    CancellationLayer::new()
        .on_cancel(move |c: &Cancelled| {
            let stamp = (Instant::now(), SystemTime::now());
            seen.lock()
                .unwrap()
                .cancelled
                .entry(c.uri().path().to_owned())
                .or_insert(stamp);
        })
        .on_cancel(move |c: &Cancelled| log.push(describe("layer", c)))
}

/// Serves the page and its helper endpoints; forwards every other path (`/slow`, `/endless`)
/// to the test app.
fn router(
    log: Log,
    seen: Shared,
) -> impl tower::Service<
    Request<IncomingBody>,
    Response = Response<AppBody>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    let app = app_any::<IncomingBody>(log.clone());
    tower::service_fn(move |req: Request<IncomingBody>| {
        let (log, seen, app) = (log.clone(), seen.clone(), app.clone());
        async move {
            let path = req.uri().path().to_owned();
            seen.lock()
                .unwrap()
                .requests
                .push((path.clone(), req.version()));
            Ok(match path.as_str() {
                "/page" => text(StatusCode::OK, "text/html; charset=utf-8", PAGE),
                "/started" => {
                    if log.entries().iter().any(|e| e == "start /slow") {
                        // The first "yes" is the one the page aborts after.
                        seen.lock()
                            .unwrap()
                            .started_yes
                            .get_or_insert_with(Instant::now);
                        text(StatusCode::OK, "text/plain", "yes")
                    } else {
                        text(StatusCode::OK, "text/plain", "no")
                    }
                }
                "/aborting" => {
                    let sent = req
                        .uri()
                        .query()
                        .and_then(|q| q.strip_prefix("sent="))
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(f64::NAN);
                    seen.lock()
                        .unwrap()
                        .aborting
                        .get_or_insert_with(|| (Instant::now(), SystemTime::now(), sent));
                    text(StatusCode::NO_CONTENT, "text/plain", "")
                }
                "/report" => {
                    seen.lock().unwrap().report = Some(Instant::now());
                    log.push(format!("report {}", req.uri().query().unwrap_or("")));
                    text(StatusCode::NO_CONTENT, "text/plain", "")
                }
                // Kept out of the app so that its log holds only the aborted request.
                "/favicon.ico" => text(StatusCode::NOT_FOUND, "text/plain", ""),
                _ => app.oneshot(req).await?,
            })
        }
    })
}

/// The TLV at the start of `der`: its header's length and its content's length.
fn der_header(der: &[u8]) -> (usize, usize) {
    match der[1] {
        short @ 0..=0x7f => (2, usize::from(short)),
        long => {
            let n = usize::from(long & 0x7f);
            let len = der[2..2 + n]
                .iter()
                .fold(0, |len, &b| (len << 8) | usize::from(b));
            (2 + n, len)
        }
    }
}

/// The TLV at the start of `der`, and what follows it.
fn der_next(der: &[u8]) -> (&[u8], &[u8]) {
    let (header, len) = der_header(der);
    der.split_at(header + len)
}

/// The content of the TLV at the start of `der`.
fn der_content(der: &[u8]) -> &[u8] {
    let (header, len) = der_header(der);
    &der[header..header + len]
}

/// What `--ignore-certificate-errors-spki-list` takes for `cert`: base64 of the SHA-256 of its
/// DER `SubjectPublicKeyInfo` (hashed with rustls' own SHA-256).
fn spki_pin(cert: &[u8]) -> String {
    // Certificate ::= SEQUENCE { tbsCertificate, .. }; TBSCertificate ::= SEQUENCE {
    // [0] version OPTIONAL, serialNumber, signature, issuer, validity, subject,
    // subjectPublicKeyInfo, .. }
    let mut fields = der_content(der_content(cert));
    if fields[0] == 0xa0 {
        fields = der_next(fields).1;
    }
    for _ in 0..5 {
        fields = der_next(fields).1;
    }
    let (spki, _) = der_next(fields);
    let rustls::SupportedCipherSuite::Tls13(suite) =
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
    else {
        unreachable!("a TLS 1.3 suite")
    };
    base64(suite.common.hash_provider.hash(spki).as_ref())
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The value of `name` in the page's report (`report a=1&b=2`), percent-decoded for the
/// characters the page's values can hold.
fn field(report: &str, name: &str) -> Option<String> {
    let query = report.strip_prefix("report ")?;
    let value = query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))?;
    Some(
        value
            .replace("%3A", ":")
            .replace("%2C", ",")
            .replace("%2F", "/")
            .replace("%3F", "?")
            .replace("%3D", "=")
            .replace("%26", "&"),
    )
}

/// What one run of the page saw.
struct Run {
    log: Log,
    seen: Shared,
    report: String,
    browser: Browser,
    _server: H3Server,
}

/// Serves the page over HTTP/3 only, has Chromium load `/page?case={case}` over QUIC and waits
/// until the layer recorded `expected` and the page reported.
async fn run(chromium: &str, case: &str, expected: &str) -> Run {
    let log = Log::default();
    let seen = Shared::default();
    let shutdown = CancellationToken::new();
    let svc = tower::ServiceBuilder::new()
        .layer(stamping_layer(&log, &seen).shutdown_token(shutdown.clone()))
        .service(router(log.clone(), seen.clone()));
    let server = H3Server::start(svc, shutdown, Duration::from_secs(1)).await;
    // Not `localhost`: Chromium resolves it to [::1] first and QUIC does not fall back to
    // 127.0.0.1, where the endpoint listens (the certificate names both).
    let origin = format!("127.0.0.1:{}", server.addr.port());
    let flags = [
        format!("--origin-to-force-quic-on={origin}"),
        format!(
            "--ignore-certificate-errors-spki-list={}",
            spki_pin(&server.cert)
        ),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let url = format!("https://{origin}/page?case={case}");
    let mut browser = Browser::start(chromium, &url, false, &flags);
    // The page itself first: without it, Chromium could not speak QUIC to the endpoint.
    let deadline = Instant::now() + BROWSER_START;
    while seen.lock().unwrap().requests.is_empty() {
        assert!(
            browser.is_running(),
            "chromium exited before it requested the page"
        );
        assert!(
            Instant::now() < deadline,
            "Chromium never reached the HTTP/3 endpoint (QUIC handshake failed?); its netlog \
             (--log-net-log=FILE --net-log-capture-mode=Everything) says why"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    browser.wait_for(&log, expected, PATIENCE).await;
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
    assert!(browser.is_running(), "chromium exited during the test");
    Run {
        log,
        seen,
        report,
        browser,
        _server: server,
    }
}

impl Run {
    /// Asserts that everything went over HTTP/3, as the server and the page saw it, and prints
    /// the time from the abort to the layer's callback for `path`.
    fn check_http3_and_print(&mut self, case: &str, path: &str) {
        assert!(self.browser.is_running(), "chromium exited during the test");
        let seen = self.seen.lock().unwrap();
        assert!(
            seen.requests.iter().any(|(p, _)| p == path),
            "{:?}",
            seen.requests
        );
        assert!(
            seen.requests.iter().all(|(_, v)| *v == Version::HTTP_3),
            "every request over HTTP/3: {:?}",
            seen.requests
        );
        let protocols = field(&self.report, "protocols").unwrap_or_default();
        let entries: Vec<_> = protocols.split(',').filter(|e| !e.is_empty()).collect();
        assert!(
            entries.contains(&"/page:h3") && entries.contains(&"/aborting:h3"),
            "the page's and the beacon's timing entries: {protocols:?}"
        );
        // A fetch aborted before its response head arrived has an entry without a protocol.
        let headless = format!("{path}:");
        assert!(
            entries
                .iter()
                .all(|e| e.ends_with(":h3") || (case == "handler" && *e == headless)),
            "the page's nextHopProtocol: {protocols:?}"
        );

        // The page's clock and the server's are the same machine's wall clock: the abort, as
        // the page stamped it, to the layer's callback. The beacon's own trip (page → router)
        // shows how well the two agree; the monotonic ones are the server's alone.
        let epoch_ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1e3;
        let (cancelled, cancelled_wall) = seen.cancelled[path];
        let at: f64 = field(&self.report, "at").unwrap().parse().unwrap();
        let (beacon, beacon_wall, beacon_sent) =
            seen.aborting.expect("the page's /aborting beacon arrived");
        let mut line = format!(
            "http3 {case}: abort (page clock) → on_cancel: {:+.1} ms; /aborting beacon → \
             on_cancel: {:+.1} ms; report → on_cancel: {:+.1} ms",
            epoch_ms(cancelled_wall) - at,
            signed(beacon, cancelled),
            signed(seen.report.unwrap(), cancelled),
        );
        if let Some(yes) = seen.started_yes {
            line += &format!(
                "; /started said yes → on_cancel: {:.1} ms",
                signed(yes, cancelled)
            );
        }
        eprintln!(
            "{line}\nhttp3 {case}: the beacon's trip (page clock → server clock): {:.1} ms; \
             the page's abort → rejection: {} ms\nhttp3 {case}: page: {}\nhttp3 {case}: \
             requests: {:?}",
            epoch_ms(beacon_wall) - beacon_sent,
            field(&self.report, "ms").unwrap_or_default(),
            self.report,
            seen.requests
        );
    }
}

/// A `fetch` aborted while its handler runs: `Disconnected` in phase `Handler`, over HTTP/3.
#[tokio::test]
async fn aborted_fetch_over_http3_in_chromium_is_disconnected_handler() {
    let Some(chromium) = chromium() else { return };
    let mut run = run(chromium, "handler", "layer /slow disconnected handler").await;
    assert_eq!(
        field(&run.report, "aborted").as_deref(),
        Some("AbortError"),
        "the page reported {:?}",
        run.report
    );
    let app_entries: Vec<_> = run
        .log
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
    let handles = run.log.handles();
    assert_eq!(handles.len(), 1);
    assert_eq!(
        handles[0].reason(),
        Some(tower_cancel::CancelReason::Disconnected)
    );
    run.check_http3_and_print("handler", "/slow");
    drop(run);
}

/// A `fetch` whose streamed body the page is reading, aborted mid-body: `Disconnected` in
/// phase `Body`, over HTTP/3.
#[tokio::test]
async fn aborted_fetch_mid_body_over_http3_in_chromium_is_disconnected_body() {
    let Some(chromium) = chromium() else { return };
    let mut run = run(chromium, "body", "layer /endless disconnected body").await;
    assert_eq!(
        field(&run.report, "aborted").as_deref(),
        Some("AbortError"),
        "the page reported {:?}",
        run.report
    );
    run.log.wait_for("body-dropped /endless").await;
    let app_entries: Vec<_> = run
        .log
        .entries()
        .into_iter()
        .filter(|e| !e.starts_with("report "))
        .collect();
    assert_eq!(
        app_entries,
        [
            "start /endless",
            "body-dropped /endless",
            "handler /endless disconnected body",
            "layer /endless disconnected body",
        ]
    );
    run.check_http3_and_print("body", "/endless");
    drop(run);
}
