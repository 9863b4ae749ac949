//! Runs `examples/https.rs` as a real process and follows the `curl` lines of its header: with
//! a self-signed certificate of its own (`curl -k`) and with PEM files given on the command
//! line (curl verifying the certificate with `--cacert`). Each give-up is printed by the
//! example as a cancellation with its phase; a request read to the end prints none.
#![cfg(unix)]

#[path = "common/process.rs"]
mod process;

use std::path::Path;
use std::process::{Command, Stdio};

use process::{KillOnDrop, Output, example};

/// The example, started with `args` on a free port; returns it, its output and its address.
fn start(args: &[&Path]) -> (KillOnDrop, Output, String) {
    let mut child = KillOnDrop(
        Command::new(example("https"))
            .args(args)
            .env("PORT", "0")
            .stdout(Stdio::piped())
            .spawn()
            .expect("the example starts"),
    );
    let mut output = Output::new(&mut child.0);
    let listening = output.wait_for("listening on https://");
    let addr = listening
        .trim_start_matches("listening on https://")
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    (child, output, addr)
}

/// curl with `args` at `path`; returns its stdout.
fn curl(args: &[&str], addr: &str, path: &str) -> String {
    let output = Command::new("curl")
        .arg("-s")
        .args(args)
        .arg(format!("https://{addr}{path}"))
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn curl_available() -> bool {
    if Command::new("curl").arg("--version").output().is_ok() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "curl is missing on CI");
    eprintln!("skipping: curl is not installed");
    false
}

#[test]
fn the_https_example_reports_what_its_header_says() {
    if !curl_available() {
        return;
    }
    let (_child, mut output, addr) = start(&[]);
    assert!(
        output
            .seen
            .iter()
            .any(|l| l.starts_with("using a self-signed")),
        "{:?}",
        output.seen
    );
    // (curl's flags, path, the version the example prints, the phase it reports)
    let cells = [
        (
            &["-k", "--http2", "--max-time", "1"][..],
            "/slow",
            "HTTP/2.0",
            "handler",
        ),
        (
            &["-k", "--http1.1", "--max-time", "1"],
            "/slow",
            "HTTP/1.1",
            "handler",
        ),
        (
            &["-k", "--http2", "-N", "--max-time", "1"],
            "/stream",
            "HTTP/2.0",
            "body",
        ),
    ];
    for (args, path, version, phase) in cells {
        curl(args, &addr, path);
        output.wait_for(&format!("{version} {path} started"));
        let cancelled = output.wait_for("GET ");
        assert!(
            cancelled.contains(&format!("{path} cancelled: disconnected, phase {phase}")),
            "{args:?} {path}: {cancelled}"
        );
    }
    // Read to the end: no cancellation follows. The /slow request after it tells when the
    // example has handled everything before it (its lines arrive in order).
    assert_eq!(curl(&["-k"], &addr, "/fast"), "hello over TLS\n");
    output.wait_for("HTTP/2.0 /fast started");
    curl(&["-k", "--max-time", "1"], &addr, "/slow");
    let next = output.wait_for("GET ");
    assert!(next.contains("/slow cancelled"), "{next}");
    assert!(
        !output.seen.iter().any(|l| l.contains("/fast cancelled")),
        "{:?}",
        output.seen
    );
}

#[test]
fn the_https_example_serves_a_certificate_from_pem_files() {
    if !curl_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tower-cancel-https-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();

    let (_child, mut output, addr) = start(&[&cert, &key]);
    assert!(
        !output
            .seen
            .iter()
            .any(|l| l.starts_with("using a self-signed")),
        "{:?}",
        output.seen
    );
    // curl verifies the server against the file's certificate: no `-k`.
    let cacert = cert.to_str().unwrap();
    let body = curl(&["--cacert", cacert, "--http2"], &addr, "/fast");
    assert_eq!(body, "hello over TLS\n", "{:?}", output.seen);
    curl(&["--cacert", cacert, "--max-time", "1"], &addr, "/slow");
    output.wait_for("HTTP/2.0 /slow started");
    let cancelled = output.wait_for("GET ");
    assert!(
        cancelled.contains("/slow cancelled: disconnected, phase handler"),
        "{cancelled}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
