#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Unverified input in log lines (issue 8, item 7): its own test binary,
//! because it installs the process-wide tracing subscriber.

mod support;

use futures_util::SinkExt;
use serde_json::json;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::expect_event;
use support::fake_relay::{client_on_fake_relay, plaintext_frame, FakeRelay};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A relay (or a peer through a lax one) puts a newline in a `from`, a
/// frame type and an error detail: the log shows it escaped, never as a
/// second, forged line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverified_input_is_escaped_in_log_lines() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let registry = meshwire_server::start(Default::default()).await.unwrap();
    let mut relay = FakeRelay::start().await;
    let ((client, _), mut ws) = tokio::join!(
        client_on_fake_relay(relay.url.clone(), &registry, |_| {}),
        relay.accept()
    );
    let me = client.did().to_owned();
    ws.send(WsMessage::Text(
        json!({"type": "error", "detail": "boom\nFORGED-1 INFO meshwire: all good"}).to_string(),
    ))
    .await
    .unwrap();
    ws.send(WsMessage::Text(plaintext_frame(
        "did:mesh:evil\nFORGED-2 INFO x",
        "did:mesh:someone-else",
        "id1",
        &json!({}),
    )))
    .await
    .unwrap();
    ws.send(WsMessage::Text(format!("{{\"type\":\"x\nFORGED-3\",\"to\":\"{me}\"}}")))
        .await
        .unwrap();
    expect_event(
        &client,
        WAIT,
        |e| matches!(e, meshwire::ClientEvent::Error { peer: Some(p), .. } if p.contains("evil")),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.close().await;
    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("boom\\nFORGED-1"), "detail escaped:\n{text}");
    assert!(text.contains("evil\\nFORGED-2"), "peer escaped:\n{text}");
    assert!(text.contains("x\\nFORGED-3"), "frame kind escaped:\n{text}");
    for line in text.lines() {
        assert!(!line.starts_with("FORGED"), "forged log line: {line:?}");
    }
}
