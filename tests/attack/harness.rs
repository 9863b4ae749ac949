//! The parent's side: a bare and a layered server process started side by side, their memory
//! read from `/proc/<pid>/status`, their counters read from their stats listener, and the
//! row each cell adds to the table of figures.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::child::{Config, ENV};

pub(crate) const KIB: u64 = 1024;
pub(crate) const MIB: u64 = 1024 * KIB;
/// Bound for every wait: only reached when something is broken.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

/// The test that runs the server process (see `tests/attack.rs`).
const SERVER_TEST: &str = "server_process";

/// `/proc` is where the memory figures come from: without it the cells cannot measure.
/// Elsewhere they are skipped, loudly; on CI (`CI` set) that is a failure.
pub(crate) fn proc_available(test: &str) -> bool {
    if std::fs::read_to_string("/proc/self/status").is_ok_and(|s| s.contains("VmHWM")) {
        return true;
    }
    let why = "no /proc/<pid>/status with VmRSS and VmHWM (Linux only)";
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why}; CI must run it");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{test}: SKIPPED: {why}");
    false
}

/// A server process, bare or layered.
pub(crate) struct Server {
    pub(crate) label: &'static str,
    child: Child,
    pub(crate) addr: SocketAddr,
    stats_addr: SocketAddr,
    /// VmRSS when the attack began.
    pub(crate) baseline: u64,
    /// The counters when the attack began (the warm-up's requests).
    pub(crate) before: Stats,
}

impl Server {
    pub(crate) fn start(config: Config) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", SERVER_TEST, "--nocapture", "--test-threads=1"])
            .env(ENV, config.encode())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the test binary runs as a server");
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + PATIENCE;
        let ports = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .expect("the server printed its ports");
            // The harness may print "running 1 test" first, or on the same line.
            if let Some(at) = line.find("attack-child: ready ") {
                let rest = &line[at + "attack-child: ready ".len()..];
                let ports: Vec<u16> = rest.split(' ').map(|p| p.parse().unwrap()).collect();
                break ports;
            }
        };
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            label: if config.layered { "layered" } else { "bare" },
            child,
            addr: addr(ports[0]),
            stats_addr: addr(ports[1]),
            baseline: 0,
            before: Stats(BTreeMap::new()),
        }
    }

    /// (VmRSS, VmHWM) in bytes.
    pub(crate) fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server process is alive");
        let field = |name: &str| {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            kb * KIB
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Starts the measure: the baseline is the RSS now, and the peak is reset to it
    /// (`clear_refs` 5 resets VmHWM).
    pub(crate) async fn mark(&mut self) {
        self.before = self.stats().await;
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5");
        self.baseline = self.memory().0;
    }

    /// Handlers started since the attack began.
    pub(crate) async fn handlers_started(&self) -> u64 {
        self.stats().await.get("started") - self.before.get("started")
    }

    /// The peak RSS since [`mark`](Self::mark), above the baseline.
    pub(crate) fn growth(&self) -> u64 {
        self.memory().1.saturating_sub(self.baseline)
    }

    pub(crate) async fn stats(&self) -> Stats {
        let mut stream = TcpStream::connect(self.stats_addr).await.unwrap();
        let mut text = String::new();
        tokio::time::timeout(PATIENCE, stream.read_to_string(&mut text))
            .await
            .expect("the stats listener answered")
            .unwrap();
        Stats(
            text.split(' ')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
                .collect(),
        )
    }

    /// Waits until `done` holds for the server's counters; panics after [`PATIENCE`] with them.
    pub(crate) async fn until(&self, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
        self.until_within(PATIENCE, what, done).await
    }

    /// [`until`](Self::until), waiting at most `within`.
    pub(crate) async fn until_within(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&Stats) -> bool,
    ) -> Stats {
        let deadline = Instant::now() + within;
        loop {
            let stats = self.stats().await;
            if done(&stats) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out waiting for {what}: {stats:?}",
                self.label
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One request over HTTP/1.1 and one over HTTP/2, so that both code paths are warm
    /// before the baseline is taken.
    async fn warm_up(&self) {
        let mut h1 = TcpStream::connect(self.addr).await.unwrap();
        crate::wire::write(
            &mut h1,
            b"GET /hello HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        )
        .await;
        let answer = crate::wire::read_all(&mut h1, PATIENCE).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        let (mut h2, driver) = crate::wire::h2_connect(self.addr).await;
        let request = http::Request::get(format!("http://{}/hello", self.addr))
            .body(())
            .unwrap();
        let (response, _) = h2.send_request(request, true).unwrap();
        assert_eq!(response.await.unwrap().status(), 200);
        // The client's connection ends once its last handle is gone.
        drop(h2);
        let _ = driver.await;
        self.until("the warm-up's connections closed", |s| s.get("conns") == 0)
            .await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server's counters, as its stats listener reported them; a missing key is 0.
#[derive(Debug, Clone)]
pub(crate) struct Stats(pub(crate) BTreeMap<String, u64>);

impl Stats {
    pub(crate) fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }
}

/// How the server's connections ended in error, by kind (`conn_*` counters), as text.
pub(crate) fn connection_errors(stats: &Stats) -> String {
    let errors: Vec<String> = stats
        .0
        .iter()
        .filter_map(|(k, v)| Some(format!("{v} × {}", k.strip_prefix("conn_")?)))
        .collect();
    if errors.is_empty() {
        "no connection error".to_owned()
    } else {
        format!("connections ended: {}", errors.join(", "))
    }
}

/// The two servers of a cell, started side by side, warmed up and marked.
pub(crate) struct Pair {
    pub(crate) bare: Server,
    pub(crate) layered: Server,
}

impl Pair {
    pub(crate) async fn start(config: Config) -> Self {
        let bare = tokio::task::spawn_blocking(move || Server::start(config.bare()));
        let layered = tokio::task::spawn_blocking(move || Server::start(config));
        let (mut bare, mut layered) = (bare.await.unwrap(), layered.await.unwrap());
        tokio::join!(bare.warm_up(), layered.warm_up());
        tokio::time::sleep(Duration::from_millis(50)).await;
        bare.mark().await;
        layered.mark().await;
        Self { bare, layered }
    }

    pub(crate) fn both(&self) -> [&Server; 2] {
        [&self.bare, &self.layered]
    }

    /// Prints the cell's row, and starts its checks with the first of all: no panic in
    /// either process.
    pub(crate) async fn report(&self, cell: &str, accounting: &str) -> Checks<'_> {
        let (bare, layered) = (self.bare.stats().await, self.layered.stats().await);
        let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / MIB as f64);
        println!(
            "\n| {cell} | {} | {} | {accounting} | {} / {} |",
            mib(self.bare.growth()),
            mib(self.layered.growth()),
            bare.get("panics"),
            layered.get("panics"),
        );
        let mut checks = Checks {
            cell: cell.to_owned(),
            pair: self,
            failed: Vec::new(),
        };
        for (label, stats) in [("bare", &bare), ("layered", &layered)] {
            let panics = stats.get("panics");
            checks.that(panics == 0, || format!("{label}: {panics} panics"));
        }
        checks
    }
}

/// A cell's assertions, all checked before it fails: a failure lists every one that did not
/// hold.
#[must_use = "call done()"]
pub(crate) struct Checks<'a> {
    cell: String,
    pair: &'a Pair,
    failed: Vec<String>,
}

impl Checks<'_> {
    pub(crate) fn that(&mut self, holds: bool, what: impl FnOnce() -> String) {
        if !holds {
            self.failed.push(what());
        }
    }

    pub(crate) fn equal<T: PartialEq + std::fmt::Debug>(&mut self, left: T, right: T, what: &str) {
        self.that(left == right, || format!("{what}: {left:?}, not {right:?}"));
    }

    /// The layered server's RSS grew at most `slack` more than the bare one's.
    pub(crate) fn growth_within(&mut self, slack: u64) {
        let (bare, layered) = (self.pair.bare.growth(), self.pair.layered.growth());
        self.that(layered <= bare + slack, || {
            format!(
                "the layered server grew {:.1} MiB, bare {:.1} MiB: more than {:.1} MiB apart",
                layered as f64 / MIB as f64,
                bare as f64 / MIB as f64,
                slack as f64 / MIB as f64,
            )
        });
    }

    pub(crate) fn done(self) {
        assert!(
            self.failed.is_empty(),
            "{}:\n  {}",
            self.cell,
            self.failed.join("\n  ")
        );
    }
}
