//! Headless Chromium for the browser tests: found (or the test skips, but not on CI),
//! launched in its own process group with a throwaway profile, killed with all its processes
//! on drop.
#![allow(dead_code, unreachable_pub)]

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::common::{AppBody, Log};

/// Chromium, or `None` with the reason printed (CI installs chromium, so there it must be
/// present).
pub fn chromium() -> Option<&'static str> {
    let found = Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some("chromium");
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "chromium is missing on CI: .ci/run must install it"
    );
    eprintln!("skipping: chromium is not installed (apt-get install chromium)");
    None
}

/// The running browser: killed (with every process it started) and reaped on drop, even when
/// the test panics; then its profile is removed. Prints its stderr if the test failed.
pub struct Browser {
    child: Child,
    dir: PathBuf,
}

impl Browser {
    /// Chromium over TCP only (`--disable-quic`), with `extra` flags.
    pub fn launch(program: &str, url: &str) -> Self {
        Self::launch_with(program, url, &[])
    }

    pub fn launch_with(program: &str, url: &str, extra: &[&str]) -> Self {
        Self::start(program, url, true, extra)
    }

    /// Chromium that may speak QUIC (`quic`), with `extra` flags (e.g. `--origin-to-force-quic-on`).
    pub fn start(program: &str, url: &str, disable_quic: bool, extra: &[&str]) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "tower-cancel-browser-{}-{nanos}",
            std::process::id()
        ));
        let profile = dir.join("profile");
        std::fs::create_dir_all(&profile).unwrap();
        let stderr = File::create(dir.join("stderr")).unwrap();
        let child = Command::new(program)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(disable_quic.then_some("--disable-quic"))
            .args(extra)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Its own process group, so that drop can kill the renderers and helpers too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Self { child, dir }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// Waits until `entry` is logged; panics if the browser exits first or `timeout` passes.
    pub async fn wait_for(&mut self, log: &Log, entry: &str, timeout: Duration) {
        self.wait_until(log, entry, timeout, |e| e == entry).await;
    }

    /// Waits until an entry matching `found` is logged and returns it; panics if the browser
    /// exits first or `timeout` passes.
    pub async fn wait_until(
        &mut self,
        log: &Log,
        what: &str,
        timeout: Duration,
        found: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(entry) = log.entries().into_iter().find(|e| found(e)) {
                return entry;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "chromium exited ({status}) before {what:?}; log: {:#?}",
                    log.entries()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what:?}; log: {:#?}",
                log.entries()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The group is still ours while its leader is unreaped: kill it, then the leader.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("chromium stderr:\n{}", self.stderr());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `b - a` in ms, negative if `b` came first.
pub fn signed(a: Instant, b: Instant) -> f64 {
    if b >= a {
        millis(b - a)
    } else {
        -millis(a - b)
    }
}

/// A page or helper answer: `body` with its content type, never cached.
pub fn text(
    status: StatusCode,
    content_type: &'static str,
    body: &'static str,
) -> Response<AppBody> {
    let mut res = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, content_type.parse().unwrap());
    res.headers_mut()
        .insert(header::CACHE_CONTROL, "no-store".parse().unwrap());
    res
}
