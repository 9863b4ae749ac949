//! curl as a real external client: `--max-time` gives up on a slow request.

mod common;

use std::process::Stdio;

use common::*;

/// curl, or `None` with the reason printed (CI installs curl, so there it must be present).
fn curl() -> Option<&'static str> {
    let found = std::process::Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some("curl");
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "curl is missing on CI: .ci/run must install it"
    );
    eprintln!("skipping: curl is not installed (apt-get install curl)");
    None
}

async fn run_curl(args: &[&str]) -> (Option<i32>, String) {
    let output = tokio::process::Command::new("curl")
        .args(["-sS"])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn curl_max_time_cancels_the_request() {
    let Some(_) = curl() else { return };
    for protocol in ["--http1.1", "--http2-prior-knowledge"] {
        let log = Log::default();
        let server = Server::app(&log).await;
        let (code, _) = run_curl(&[protocol, "--max-time", "0.5", &server.url("/slow")]).await;
        assert_eq!(code, Some(28), "curl {protocol} should time out (exit 28)");
        log.wait_for("layer /slow disconnected handler").await;
        server.idle().await;
        assert_eq!(
            log.entries()[1..],
            [
                "dropped /slow",
                "handler /slow disconnected handler",
                "layer /slow disconnected handler"
            ],
            "{protocol}"
        );
    }
}

#[tokio::test]
async fn curl_that_reads_the_whole_response_cancels_nothing() {
    let Some(_) = curl() else { return };
    for protocol in ["--http1.1", "--http2-prior-knowledge"] {
        let log = Log::default();
        let server = Server::app(&log).await;
        let (code, body) = run_curl(&[protocol, &server.url("/stream")]).await;
        assert_eq!(code, Some(0));
        assert_eq!(body.as_bytes(), CHUNK.repeat(3));
        server.idle().await;
        assert_eq!(log.entries(), ["start /stream"], "{protocol}");
        assert_all_completed(&log);
    }
}
