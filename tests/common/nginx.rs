//! nginx as a real reverse proxy, for `tests/nginx.rs` (plain-text fronts) and
//! `tests/nginx_tls.rs` (`listen … ssl` with HTTP/2, as deployed): a private nginx process per
//! test on a free port, its config and logs in a temp dir of its own.
//!
//! Included with `#[path]` by the tests that need it, beside `mod common;` and the `https`
//! example's `mod tls;`.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tower_cancel::CancelReason;

use crate::common::{Log, PATIENCE, Server};

/// The nginx binary, or `None` with the reason printed (CI installs nginx, so there it must be
/// present). Debian puts it in /usr/sbin, which is not on a normal user's PATH.
pub fn nginx() -> Option<&'static str> {
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
pub enum Pass {
    /// `proxy_pass http://`, HTTP/1.1 to the server.
    Proxy,
    /// `proxy_pass https://` with `proxy_ssl_verify off`, HTTP/1.1 over TLS to the server.
    ProxyTls,
    /// `proxy_pass https://` with nginx's default `proxy_http_version` (1.0), as the Gin
    /// write-up's `nginx.conf` has it: HTTP/1.0 over TLS, one connection per request.
    ProxyTls10,
    /// `grpc_pass grpc://`, cleartext HTTP/2 to the server.
    Grpc,
    /// `proxy_pass http://` with `proxy_request_buffering off`: the request body streams to
    /// the server as it arrives, instead of being read whole before the server sees the head.
    ProxyStreaming,
}

impl Pass {
    /// Whether the server behind nginx must speak TLS.
    pub fn tls(self) -> bool {
        matches!(self, Self::ProxyTls | Self::ProxyTls10)
    }
}

/// What nginx listens with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Front {
    /// Plain text: HTTP/1.1, or HTTP/2 by prior knowledge in front of `grpc_pass`.
    Plain,
    /// `listen … ssl` with HTTP/2 on (ALPN `h2` and `http/1.1`), a self-signed certificate for
    /// `127.0.0.1` and `localhost`.
    Tls,
}

/// nginx's upstream: `pass`, and whether it keeps idle connections to the server open
/// (`keepalive` in the `upstream` block, the usual production setup).
#[derive(Clone, Copy, Debug)]
pub struct Upstream {
    pub pass: Pass,
    pub keepalive: bool,
}

pub const PROXY: Upstream = Upstream {
    pass: Pass::Proxy,
    keepalive: false,
};
pub const PROXY_KEEPALIVE: Upstream = Upstream {
    pass: Pass::Proxy,
    keepalive: true,
};
pub const GRPC: Upstream = Upstream {
    pass: Pass::Grpc,
    keepalive: false,
};
pub const GRPC_KEEPALIVE: Upstream = Upstream {
    pass: Pass::Grpc,
    keepalive: true,
};
pub const PROXY_TLS: Upstream = Upstream {
    pass: Pass::ProxyTls,
    keepalive: false,
};
pub const PROXY_TLS_KEEPALIVE: Upstream = Upstream {
    pass: Pass::ProxyTls,
    keepalive: true,
};
pub const PROXY_STREAMING: Upstream = Upstream {
    pass: Pass::ProxyStreaming,
    keepalive: false,
};
pub const PROXY_TLS_10: Upstream = Upstream {
    pass: Pass::ProxyTls10,
    keepalive: false,
};

/// A private nginx process in a temp dir; killed (and the dir removed) on drop. If the test
/// panicked, the dir is kept and nginx's config and logs are printed.
pub struct Nginx {
    pub addr: SocketAddr,
    /// With [`Front::Tls`]: nginx's certificate, PEM, for clients that verify it.
    pub cert_pem: Option<String>,
    front: Front,
    dir: PathBuf,
    child: Child,
}

impl Nginx {
    /// Starts nginx in front of `server`. The port is picked free and then handed to nginx,
    /// so another socket may take it in between: then nginx fails to bind, and we try again.
    pub async fn start(bin: &str, upstream: Upstream, server: &Server) -> Self {
        Self::start_with(bin, Front::Plain, upstream, server).await
    }

    /// [`Nginx::start`] with the given front.
    pub async fn start_with(bin: &str, front: Front, upstream: Upstream, server: &Server) -> Self {
        Self::start_at(bin, front, upstream, server.addr).await
    }

    /// [`Nginx::start_with`] in front of the server at `server`.
    pub async fn start_at(bin: &str, front: Front, upstream: Upstream, server: SocketAddr) -> Self {
        for attempt in 1.. {
            let mut nginx = Self::spawn(bin, front, upstream, server);
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

    fn spawn(bin: &str, front: Front, upstream: Upstream, server: SocketAddr) -> Self {
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
        let cert_pem = (front == Front::Tls).then(|| write_certificate(&dir));
        // nginx ≥ 1.25.1 enables HTTP/2 with `http2 on;` (and deprecates the listen parameter);
        // older ones, like Debian bookworm's 1.22, only know `listen … http2`.
        let configs = if front == Front::Tls || upstream.pass == Pass::Grpc {
            vec![
                config(&dir, addr, front, upstream, server, Http2::On),
                config(&dir, addr, front, upstream, server, Http2::ListenParameter),
            ]
        } else {
            vec![config(&dir, addr, front, upstream, server, Http2::Off)]
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
        Self {
            addr,
            cert_pem,
            front,
            dir,
            child,
        }
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

    pub fn url(&self, path: &str) -> String {
        let scheme = match self.front {
            Front::Plain => "http",
            Front::Tls => "https",
        };
        format!("{scheme}://{}{path}", self.addr)
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
    front: Front,
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
    let (ssl, certificate) = match front {
        Front::Plain => ("", String::new()),
        Front::Tls => (
            " ssl",
            format!("ssl_certificate {d}/cert.pem;\n        ssl_certificate_key {d}/key.pem;"),
        ),
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
        (Pass::ProxyTls, false) => {
            "proxy_pass https://backend;\n            proxy_http_version 1.1;\n            \
             proxy_ssl_verify off;"
        }
        (Pass::ProxyTls, true) => {
            "proxy_pass https://backend;\n            proxy_http_version 1.1;\n            \
             proxy_set_header Connection \"\";\n            proxy_ssl_verify off;"
        }
        // nginx keeps no HTTP/1.0 connection alive: `keepalive` has nothing to reuse.
        (Pass::ProxyTls10, _) => "proxy_pass https://backend;\n            proxy_ssl_verify off;",
        (Pass::Grpc, _) => "grpc_pass grpc://backend;",
        (Pass::ProxyStreaming, _) => {
            "proxy_pass http://backend;\n            proxy_http_version 1.1;\n            \
             proxy_request_buffering off;"
        }
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
        listen {addr}{ssl}{listen};
        {http2}
        {certificate}
        location / {{
            {pass}
        }}
    }}
}}
"
    )
}

/// The test app behind a `CancellationLayer`, over TLS if `upstream` needs it.
pub async fn backend(log: &Log, upstream: Upstream) -> Server {
    if upstream.pass.tls() {
        let (config, _) = crate::tls::server_config(None).unwrap();
        Server::app_tls(log, config).await
    } else {
        Server::app(log).await
    }
}

/// Writes a self-signed certificate for `127.0.0.1` and `localhost` and its key into `dir`
/// (`cert.pem`, `key.pem`, as the config names them); returns the certificate.
fn write_certificate(dir: &Path) -> String {
    let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    let cert = certified.cert.pem();
    std::fs::write(dir.join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
    cert
}

/// Waits for the layer's callback on `/slow` and prints how long it took since the client
/// left; then checks the story: the handler was dropped, then both callbacks ran, once, and
/// the token says why.
pub async fn assert_slow_cancelled(log: &Log, left: Instant, how: &str) {
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
pub fn assert_only_slow_cancelled(log: &Log, requests: usize) {
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
