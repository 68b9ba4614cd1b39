//! Untrusted strings cannot forge log lines (issue 8, item 7).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{identity, send, TestServer};
use serde_json::json;
use std::io::Write;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn a_did_with_a_newline_cannot_forge_a_log_line() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .init();

    let t = TestServer::start().await;
    let bob = identity(2);
    let mut bob_ws = t.connect(&bob).await;
    let forged = "did:mesh:x\n2026-11-21T12:00:00Z  INFO meshwire_server: agent connected did=did:mesh:admin";
    // A connect frame whose unverified `from` carries a forged line...
    let mut ws = t.ws().await;
    send(
        &mut ws,
        &json!({"type": "connect", "from": forged, "public_key": "AAAA", "timestamp": "x", "signature": "y"})
            .to_string(),
    )
    .await;
    let _ = common::next_message(&mut ws).await;
    // ...and a message to a recipient whose DID carries one (stored, logged).
    send(
        &mut bob_ws,
        &json!({"v": 1, "type": "message", "from": bob.did().as_str(), "to": forged, "id": "m\r\n1", "ciphertext": "AA"})
            .to_string(),
    )
    .await;
    while t.server.stats().messages_stored < 1 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    t.server.shutdown().await;

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("rejecting connect frame"), "{text}");
    assert!(text.contains("stored message"), "{text}");
    // The value is escaped, and no line starts with the forged text.
    assert!(text.contains(r"did:mesh:x\n2026-11-21T12:00:00Z  INFO"), "{text}");
    assert!(text.contains(r#"id=m\r\n1"#), "{text}");
    for line in text.lines() {
        assert!(!line.starts_with("2026-11-21T12:00:00Z  INFO"), "forged line: {line}");
        assert!(!line.starts_with('1'), "forged line: {line}");
    }
}
