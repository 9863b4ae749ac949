//! Examples run as real processes, for `tests/graceful_shutdown.rs` and
//! `tests/https_example.rs` (included with `#[path]`): build one with the test's profile, read
//! its stdout line by line, kill it when the test ends.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command};
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
