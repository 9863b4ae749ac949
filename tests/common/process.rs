//! Examples run as real processes, for `tests/graceful_shutdown.rs` and
//! `tests/https_example.rs` (included with `#[path]`): build one with the test's profile, read
//! its stdout line by line, kill it when the test ends.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bound for every wait: only reached when something is broken.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Builds the example `name` with the profile of this test and returns its path.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap(); // target/<profile>
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "--quiet", "--example", name]);
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building the example failed");
    profile_dir.join("examples").join(name)
}

/// The example's stdout, line by line.
pub struct Output {
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Output {
    pub fn new(child: &mut Child) -> Self {
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
    pub fn wait_for(&mut self, prefix: &str) -> String {
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
    pub fn rest(mut self) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(PATIENCE) {
            self.seen.push(line);
        }
        self.seen
    }
}

pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts example `name` on a port of its own (`PORT=0`) and waits for its
/// `listening on http://ADDR` line: the process, its output, and `ADDR`.
pub fn start(name: &str) -> (KillOnDrop, Output, String) {
    start_with_env(name, &[])
}

/// [`start`], with these environment variables set too.
pub fn start_with_env(name: &str, env: &[(&str, &str)]) -> (KillOnDrop, Output, String) {
    let mut child = KillOnDrop(
        Command::new(example(name))
            .env("PORT", "0")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the example starts"),
    );
    let mut output = Output::new(&mut child.0);
    let listening = output.wait_for("listening on http://");
    let addr = listening
        .trim_start_matches("listening on http://")
        .to_owned();
    (child, output, addr)
}

/// Sends SIGTERM and waits (at most [`PATIENCE`]) for the process to exit: its status, and the
/// time from the signal to the exit.
pub fn terminate(child: &mut KillOnDrop) -> (ExitStatus, Duration) {
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return (status, signalled.elapsed());
        }
        assert!(signalled.elapsed() < PATIENCE, "the example did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}
