//! Runs `examples/graceful_shutdown.rs` as a real process: a client waits on a 30 s report,
//! the process gets SIGTERM, and the whole shutdown (handler answers, connections close,
//! async cleanup runs) ends in well under a second.
#![cfg(unix)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PATIENCE: Duration = Duration::from_secs(20);

/// Builds the example with the profile of this test and returns its path.
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap(); // target/<profile>
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "--quiet", "--example", "graceful_shutdown"]);
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building the example failed");
    profile_dir.join("examples").join("graceful_shutdown")
}

/// The example's stdout, line by line.
struct Output {
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Output {
    fn new(child: &mut Child) -> Self {
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
        Self {
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix` and returns it.
    fn wait_for(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => panic!("no line {prefix:?}; output so far: {:#?}", self.seen),
            }
        }
    }

    /// Everything until the process closed its stdout.
    fn rest(mut self) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(PATIENCE) {
            self.seen.push(line);
        }
        self.seen
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sigterm_drains_a_30_second_request_in_well_under_a_second() {
    let mut child = KillOnDrop(
        Command::new(example())
            .env("PORT", "0")
            .stdout(Stdio::piped())
            .spawn()
            .expect("the example starts"),
    );
    let mut output = Output::new(&mut child.0);
    let listening = output.wait_for("listening on http://");
    let addr = listening
        .trim_start_matches("listening on http://")
        .to_owned();

    let mut client = TcpStream::connect(&addr).unwrap();
    client
        .write_all(b"GET /report?seconds=30 HTTP/1.1\r\nhost: example\r\n\r\n")
        .unwrap();
    output.wait_for("report: started");

    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());

    // The client gets the handler's own answer, not a reset.
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut response = String::new();
    client.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(
        response.ends_with("report abandoned: shutdown\n"),
        "{response}"
    );

    let exit = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < PATIENCE, "the example did not exit");
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = signalled.elapsed();
    assert!(exit.success(), "{exit}");
    let lines = output.rest();
    println!("shutdown took {took:?}; output: {lines:#?}");
    assert!(
        took < Duration::from_secs(1),
        "shutdown took {took:?}, the handler was meant to stop at once"
    );

    // Each step happened, in order, and the cleanup ran before the process ended.
    let position = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in {lines:#?}"))
    };
    let steps = [
        position("shutdown: SIGTERM received"),
        position("shutdown: cancelling the requests in flight"),
        position("report: stopped early (shutdown)"),
        position("shutdown: every connection closed"),
        position("cleanup: released what /report held (shutdown)"),
        position("shutdown: every cleanup finished"),
        position("shutdown: done"),
    ];
    assert!(steps.is_sorted(), "steps out of order: {lines:#?}");
    assert!(position("cancelled: GET /report (shutdown") > steps[1]);
}
