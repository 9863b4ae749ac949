//! nginx as a real reverse proxy in front of the server: a client that gives up at nginx
//! cancels the request behind it, over `proxy_pass` (HTTP/1.1 to the server) and `grpc_pass`
//! (HTTP/2 to the server). Each test runs its own nginx on a free port.
#![cfg(unix)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tower_cancel::CancelReason;

/// The nginx binary, or `None` with the reason printed (CI installs nginx, so there it must be
/// present). Debian puts it in /usr/sbin, which is not on a normal user's PATH.
fn nginx() -> Option<&'static str> {
    let found = |bin: &str| {
        Command::new(bin)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if let Some(bin) = ["nginx", "/usr/sbin/nginx"].into_iter().find(|b| found(b)) {
        return Some(bin);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "nginx is missing on CI: .ci/run must install it"
    );
    eprintln!("skipping: nginx not found (apt-get install nginx)");
    None
}

/// How nginx talks to the test server.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pass {
    /// HTTP/1.1 from the client, `proxy_pass` with HTTP/1.1 to the server.
    Proxy,
    /// Cleartext HTTP/2 (prior knowledge) from the client, `grpc_pass` to the server.
    Grpc,
}

/// nginx's upstream: `pass`, and whether it keeps idle connections to the server open
/// (`keepalive` in the `upstream` block, the usual production setup).
#[derive(Clone, Copy, Debug)]
struct Upstream {
    pass: Pass,
    keepalive: bool,
}

const PROXY: Upstream = Upstream {
    pass: Pass::Proxy,
    keepalive: false,
};
const PROXY_KEEPALIVE: Upstream = Upstream {
    pass: Pass::Proxy,
    keepalive: true,
};
const GRPC: Upstream = Upstream {
    pass: Pass::Grpc,
    keepalive: false,
};
const GRPC_KEEPALIVE: Upstream = Upstream {
    pass: Pass::Grpc,
    keepalive: true,
};

/// A private nginx process in a temp dir; killed (and the dir removed) on drop. If the test
/// panicked, the dir is kept and nginx's config and logs are printed.
struct Nginx {
    addr: SocketAddr,
    dir: PathBuf,
    child: Child,
}

impl Nginx {
    /// Starts nginx in front of `server`. The port is picked free and then handed to nginx,
    /// so another socket may take it in between: then nginx fails to bind, and we try again.
    async fn start(bin: &str, upstream: Upstream, server: &Server) -> Self {
        for attempt in 1.. {
            let mut nginx = Self::spawn(bin, upstream, server);
            match nginx.wait_until_listening().await {
                Ok(()) => return nginx,
                Err(status) if attempt < 3 && nginx.logs().contains("Address already in use") => {
                    eprintln!("nginx exited with {status} (port taken); retrying");
                }
                Err(status) => panic!("nginx exited with {status}"),
            }
        }
        unreachable!()
    }

    fn spawn(bin: &str, upstream: Upstream, server: &Server) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tower-cancel-nginx-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let conf = dir.join("nginx.conf");
        // nginx ≥ 1.25.1 enables HTTP/2 with `http2 on;` (and deprecates the listen parameter);
        // older ones, like Debian bookworm's 1.22, only know `listen … http2`.
        let configs = match upstream.pass {
            Pass::Proxy => vec![config(&dir, addr, upstream, server.addr, Http2::Off)],
            Pass::Grpc => vec![
                config(&dir, addr, upstream, server.addr, Http2::On),
                config(&dir, addr, upstream, server.addr, Http2::ListenParameter),
            ],
        };
        let mut rejected = Vec::new();
        for text in configs {
            std::fs::write(&conf, &text).unwrap();
            let test = Command::new(bin)
                .arg("-t")
                .args(args(&dir, &conf))
                .output()
                .unwrap();
            if test.status.success() {
                rejected.clear();
                break;
            }
            rejected.push(format!("{text}\n{}", String::from_utf8_lossy(&test.stderr)));
        }
        assert!(
            rejected.is_empty(),
            "nginx accepts none of the configs:\n{}",
            rejected.join("\n")
        );
        let stderr = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let child = Command::new(bin)
            .args(args(&dir, &conf))
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().unwrap())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Self { addr, dir, child }
    }

    /// Waits until nginx listens; `Err` if it exited. nginx writes its pid file after it bound
    /// its port, so a connection that succeeds before that went to someone else's socket.
    async fn wait_until_listening(&mut self) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + PATIENCE;
        let pid = self.child.id().to_string();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(status);
            }
            let written = std::fs::read_to_string(self.dir.join("nginx.pid"))
                .is_ok_and(|text| text.trim() == pid);
            if written && TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "nginx does not accept connections"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "--- {}/nginx.conf\n{}--- error.log\n{}--- stderr\n{}",
            self.dir.display(),
            read("nginx.conf"),
            read("error.log"),
            read("stderr.log")
        )
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // `master_process off`: the child is the only nginx process, so SIGKILL leaves nothing.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("nginx logs (dir kept):\n{}", self.logs());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn args(dir: &Path, conf: &Path) -> Vec<String> {
    vec![
        "-p".into(),
        format!("{}/", dir.display()),
        "-c".into(),
        conf.display().to_string(),
        "-g".into(),
        "daemon off;".into(),
    ]
}

/// How a config turns on HTTP/2 for the client side.
#[derive(Clone, Copy)]
enum Http2 {
    Off,
    /// `http2 on;` (nginx ≥ 1.25.1).
    On,
    /// `listen … http2;` (older nginx).
    ListenParameter,
}

/// A self-contained config: everything nginx writes goes to `dir`. A single process
/// (`master_process off`) runs as whoever starts it, so it needs no `user` as root, and
/// killing it leaves no worker behind.
fn config(
    dir: &Path,
    addr: SocketAddr,
    upstream: Upstream,
    server: SocketAddr,
    h2: Http2,
) -> String {
    let d = dir.display();
    let (listen, http2) = match h2 {
        Http2::Off => ("", ""),
        Http2::On => ("", "http2 on;"),
        Http2::ListenParameter => (" http2", ""),
    };
    let keepalive = if upstream.keepalive {
        "keepalive 4;"
    } else {
        ""
    };
    let pass = match (upstream.pass, upstream.keepalive) {
        (Pass::Proxy, false) => "proxy_pass http://backend;\n            proxy_http_version 1.1;",
        // Without `Connection: close` (nginx's default header) nginx can reuse connections.
        (Pass::Proxy, true) => {
            "proxy_pass http://backend;\n            proxy_http_version 1.1;\n            \
             proxy_set_header Connection \"\";"
        }
        (Pass::Grpc, _) => "grpc_pass grpc://backend;",
    };
    format!(
        "master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{
    worker_connections 64;
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream backend {{
        server {server};
        {keepalive}
    }}
    server {{
        listen {addr}{listen};
        {http2}
        location / {{
            {pass}
        }}
    }}
}}
"
    )
}

/// A gRPC-style request: nginx's `grpc_pass` forwards anything, but this is what it is for.
fn grpc_request(nginx: &Nginx, path: &str) -> http::Request<http_body_util::Empty<Bytes>> {
    http::Request::post(nginx.url(path))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// Waits for the layer's callback on `/slow` and prints how long it took since the client
/// left; then checks the story: the handler was dropped, then both callbacks ran, once, and
/// the token says why.
async fn assert_slow_cancelled(log: &Log, left: Instant, how: &str) {
    log.wait_for("layer /slow disconnected handler").await;
    eprintln!(
        "{how}: layer callback {:?} after the client left",
        left.elapsed()
    );
    assert_eq!(
        log.entries(),
        [
            "start /slow",
            "dropped /slow",
            "handler /slow disconnected handler",
            "layer /slow disconnected handler",
        ],
        "{how}"
    );
    let handles = log.handles();
    assert_eq!(handles.len(), 1, "{how}");
    assert!(handles[0].token().is_cancelled(), "{how}");
    assert_eq!(
        handles[0].reason(),
        Some(CancelReason::Disconnected),
        "{how}"
    );
}

/// After a cancelled `/slow`: nothing else was cancelled, and the later requests completed.
fn assert_only_slow_cancelled(log: &Log, requests: usize) {
    assert_eq!(
        log.entries()
            .into_iter()
            .filter(|e| !e.starts_with("start"))
            .collect::<Vec<_>>(),
        [
            "dropped /slow",
            "handler /slow disconnected handler",
            "layer /slow disconnected handler",
        ]
    );
    let handles = log.handles();
    assert_eq!(handles.len(), requests);
    assert_eq!(handles[0].reason(), Some(CancelReason::Disconnected));
    for rc in &handles[1..] {
        assert_eq!(rc.reason(), None, "a later request was cancelled");
    }
}

/// An HTTP/1.1 client at nginx asks for `/slow` and leaves once the handler runs.
async fn abandon_slow_http1(nginx: &Nginx, log: &Log, rst: bool) -> Instant {
    let mut client = TcpStream::connect(nginx.addr).await.unwrap();
    client.write_all(get("/slow").as_bytes()).await.unwrap();
    log.wait_for("start /slow").await;
    if rst {
        client.set_zero_linger().unwrap();
    }
    let left = Instant::now();
    drop(client); // FIN (or RST): nginx gives up (499) and leaves the server
    left
}

/// An HTTP/1.1 request through nginx, read to the end of its body.
async fn full_http1(nginx: &Nginx) {
    let mut client = TcpStream::connect(nginx.addr).await.unwrap();
    client.write_all(get("/full").as_bytes()).await.unwrap();
    let response = read_until(&mut client, "hello").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
    assert!(
        response.contains("\r\nContent-Length: 5\r\n"),
        "{response:?}"
    );
}

/// A gRPC-style request through nginx, read to the end of its body.
async fn full_h2(client: &mut H2Sender, nginx: &Nginx) {
    let response = client
        .send_request(grpc_request(nginx, "/full"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello");
}

#[tokio::test]
async fn proxy_pass_client_fin_cancels_the_request() {
    let Some(bin) = nginx() else { return };
    let log = Log::default();
    let server = Server::app(&log).await;
    let nginx = Nginx::start(bin, PROXY, &server).await;
    let left = abandon_slow_http1(&nginx, &log, false).await;
    assert_slow_cancelled(&log, left, "proxy_pass, client FIN").await;
    server.idle().await; // nginx closed its connection to the server
    assert_eq!(log.entries().len(), 4, "{:?}", log.entries());
}

#[tokio::test]
async fn proxy_pass_client_rst_cancels_the_request() {
    let Some(bin) = nginx() else { return };
    let log = Log::default();
    let server = Server::app(&log).await;
    let nginx = Nginx::start(bin, PROXY, &server).await;
    let left = abandon_slow_http1(&nginx, &log, true).await;
    assert_slow_cancelled(&log, left, "proxy_pass, client RST").await;
    server.idle().await;
    assert_eq!(log.entries().len(), 4, "{:?}", log.entries());
}

#[tokio::test]
async fn proxy_pass_with_upstream_keepalive_cancels_the_request() {
    let Some(bin) = nginx() else { return };
    let log = Log::default();
    let server = Server::app(&log).await;
    let nginx = Nginx::start(bin, PROXY_KEEPALIVE, &server).await;
    let left = abandon_slow_http1(&nginx, &log, false).await;
    assert_slow_cancelled(&log, left, "proxy_pass keepalive, client FIN").await;
    // Requests after it complete, over kept-alive upstream connections.
    full_http1(&nginx).await;
    full_http1(&nginx).await;
    drop(nginx);
    server.idle().await;
    assert_only_slow_cancelled(&log, 3);
}

#[tokio::test]
async fn grpc_pass_reset_stream_cancels_the_request() {
    let Some(bin) = nginx() else { return };
    let log = Log::default();
    let server = Server::app(&log).await;
    let nginx = Nginx::start(bin, GRPC, &server).await;
    let (mut client, conn, _socket) = h2_client_to(nginx.addr).await;
    let pending = tokio::spawn(client.send_request(grpc_request(&nginx, "/slow")));
    log.wait_for("start /slow").await;
    let left = Instant::now();
    pending.abort(); // drops the response future: hyper's client sends RST_STREAM(CANCEL)
    assert_slow_cancelled(&log, left, "grpc_pass, RST_STREAM").await;
    server.idle().await; // nginx closed its connection to the server
    // The client's connection to nginx survives the reset: the next request completes.
    full_h2(&mut client, &nginx).await;
    drop(client);
    tokio::time::timeout(PATIENCE, conn).await.unwrap().unwrap();
    server.idle().await;
    assert_only_slow_cancelled(&log, 2);
}

#[tokio::test]
async fn grpc_pass_connection_close_cancels_the_request() {
    let Some(bin) = nginx() else { return };
    let log = Log::default();
    let server = Server::app(&log).await;
    let nginx = Nginx::start(bin, GRPC, &server).await;
    let (mut client, _conn, socket) = h2_client_to(nginx.addr).await;
    let pending = tokio::spawn(client.send_request(grpc_request(&nginx, "/slow")));
    log.wait_for("start /slow").await;
    let left = Instant::now();
    socket.shutdown(std::net::Shutdown::Both).unwrap(); // the TCP connection to nginx closes
    assert_slow_cancelled(&log, left, "grpc_pass, connection close").await;
    server.idle().await;
    let result = tokio::time::timeout(PATIENCE, pending)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_err(), "the client got no response: {result:?}");
    assert_eq!(log.entries().len(), 4, "{:?}", log.entries());
}

#[tokio::test]
async fn grpc_pass_with_upstream_keepalive_cancels_the_request() {
    let Some(bin) = nginx() else { return };
    let log = Log::default();
    let server = Server::app(&log).await;
    let nginx = Nginx::start(bin, GRPC_KEEPALIVE, &server).await;
    let (mut client, conn, _socket) = h2_client_to(nginx.addr).await;
    let pending = tokio::spawn(client.send_request(grpc_request(&nginx, "/slow")));
    log.wait_for("start /slow").await;
    let left = Instant::now();
    pending.abort();
    assert_slow_cancelled(&log, left, "grpc_pass keepalive, RST_STREAM").await;
    full_h2(&mut client, &nginx).await;
    full_h2(&mut client, &nginx).await;
    drop(client);
    tokio::time::timeout(PATIENCE, conn).await.unwrap().unwrap();
    drop(nginx);
    server.idle().await;
    assert_only_slow_cancelled(&log, 3);
}

#[tokio::test]
async fn requests_through_nginx_that_complete_cancel_nothing() {
    let Some(bin) = nginx() else { return };
    for upstream in [PROXY, PROXY_KEEPALIVE, GRPC, GRPC_KEEPALIVE] {
        let log = Log::default();
        let server = Server::app(&log).await;
        let nginx = Nginx::start(bin, upstream, &server).await;
        match upstream.pass {
            Pass::Proxy => full_http1(&nginx).await,
            Pass::Grpc => {
                let (mut client, conn, _socket) = h2_client_to(nginx.addr).await;
                full_h2(&mut client, &nginx).await;
                drop(client);
                tokio::time::timeout(PATIENCE, conn).await.unwrap().unwrap();
            }
        }
        if !upstream.keepalive {
            // nginx closes its upstream connection after the response: still no cancel.
            server.idle().await;
        }
        drop(nginx);
        server.idle().await;
        assert_eq!(log.entries(), ["start /full"], "{upstream:?}");
        assert_eq!(log.handles().len(), 1, "{upstream:?}");
        assert_all_completed(&log);
    }
}
