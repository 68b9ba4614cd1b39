//! A `meshwire serve` child process for integration tests: started on a
//! free 127.0.0.1 port with the caller's flags (no inherited `MESHWIRE_*`
//! variables), its URLs, PID and resident memory, killed when dropped.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_meshwire");
/// How long the server may take to print its URLs.
pub const START_WAIT: Duration = Duration::from_secs(20);

/// `meshwire serve ARGS` without the test process's `MESHWIRE_*` variables.
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.arg("serve").args(args).env("RUST_LOG", "warn");
    for (key, _) in std::env::vars() {
        if key.starts_with("MESHWIRE_") {
            command.env_remove(key);
        }
    }
    command
}

/// The lines of `stream`, read on a thread.
pub fn lines(stream: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running `meshwire serve`, killed when dropped.
pub struct Serve {
    pub child: Child,
    pub port: u16,
    pub stderr: std::sync::mpsc::Receiver<String>,
}

impl Serve {
    pub fn start(args: &[&str]) -> Self {
        let mut child = command(args)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        let line = stdout
            .recv_timeout(START_WAIT)
            .expect("meshwire serve printed its relay URL");
        // "meshwire relay    ws://127.0.0.1:PORT/ws"
        let port = line
            .rsplit(':')
            .next()
            .and_then(|tail| tail.trim_end_matches("/ws").parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        Self { child, port, stderr }
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory (kB) of the process.
    pub fn rss_kb(&self) -> u64 {
        rss_kb(self.pid())
    }
}

/// VmRSS (kB) of process `pid` (0 once it is gone).
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `key` (`name{labels}`) in a Prometheus
/// exposition.
pub fn sample(text: &str, key: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(key)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}
