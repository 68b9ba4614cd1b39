#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The interop peer reads requests from stdin: a huge `timeout_ms` used to
//! panic (`Instant::now() + timeout` overflow) and kill the peer.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

#[test]
fn huge_timeout_on_stdin_saturates() {
    let mut peer = Command::new(env!("CARGO_BIN_EXE_meshwire"))
        .arg("interop-peer")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = peer.stdin.take().unwrap();
    let mut stdout = BufReader::new(peer.stdout.take().unwrap());
    writeln!(
        stdin,
        "{}",
        serde_json::json!({"cmd": "recv", "count": 0, "timeout_ms": u64::MAX})
    )
    .unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(answer["ok"], true, "{line}");
    assert_eq!(answer["messages"], serde_json::json!([]));
    // Still alive and answering.
    writeln!(stdin, "{}", serde_json::json!({"cmd": "hello"})).unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    drop(stdin);
    assert!(peer.wait().unwrap().success());
}
