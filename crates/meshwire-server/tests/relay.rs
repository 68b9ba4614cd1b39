//! The relay over WebSocket, against a started server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{ack, expect_error, identity, iso_at, message, recv_close, recv_json, recv_text, send, TestServer, NOW};
use meshwire_proto::encoding::b64_std;
use meshwire_proto::frames::{self, ConnectFrame, FetchPendingFrame};
use meshwire_server::{close_code, ServerConfig};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn connect_with_proof() {
    let t = TestServer::start().await;
    let alice = identity(1);
    let mut ws = t.connect(&alice).await;
    assert_eq!(t.server.stats().connected_agents, 1);
    // A message to oneself comes back verbatim: the connection is live.
    let text = message(&alice, &alice, "self-1");
    send(&mut ws, &text).await;
    assert_eq!(recv_text(&mut ws).await, text);
}

#[tokio::test]
async fn connect_proof_failures_close_4005() {
    let t = TestServer::start().await;
    let alice = identity(1);
    let mallory = identity(2);

    let connect = |id: &meshwire_proto::Identity, ts: &str| serde_json::to_value(ConnectFrame::new(id, ts)).unwrap();
    let mut bad_signature = connect(&alice, NOW);
    bad_signature["signature"] = json!(b64_std(&mallory.sign(NOW.as_bytes())));
    let mut other_did = connect(&mallory, NOW);
    other_did["from"] = json!(alice.did().as_str());
    let stale = connect(&alice, &iso_at(-300_001));
    let mut missing = connect(&alice, NOW);
    missing.as_object_mut().unwrap().remove("public_key");
    let legacy = frames::to_text(&ConnectFrame::legacy(alice.did()));

    for (text, reason) in [
        (bad_signature.to_string(), "invalid signature"),
        (other_did.to_string(), "DID does not match public_key (sha256 mismatch)"),
        (stale.to_string(), "timestamp outside replay window"),
        (
            missing.to_string(),
            "connect frame missing did/public_key/timestamp/signature",
        ),
        (legacy, "connect frame missing did/public_key/timestamp/signature"),
    ] {
        let mut ws = t.ws().await;
        send(&mut ws, &text).await;
        expect_error(&mut ws, &format!("DID proof failed: {reason}")).await;
        assert_eq!(recv_close(&mut ws).await.0, close_code::PROOF_FAILED, "{reason}");
    }
    assert_eq!(t.server.stats().connected_agents, 0);
}

#[tokio::test]
async fn connect_frame_errors() {
    let t = TestServer::with_config(ServerConfig {
        relay_token: Some("sesame".into()),
        connect_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    })
    .await;
    let alice = identity(1);

    let mut ws = t.ws().await;
    send(&mut ws, r#"{"type":"heartbeat"}"#).await;
    expect_error(&mut ws, "First frame must be 'connect'").await;
    assert_eq!(recv_close(&mut ws).await.0, close_code::CONNECT_REQUIRED);

    let mut ws = t.ws().await;
    send(&mut ws, r#"{"type":"connect"}"#).await;
    expect_error(&mut ws, "Missing 'from' field").await;
    assert_eq!(recv_close(&mut ws).await.0, close_code::MISSING_FROM);

    let mut ws = t.ws().await;
    send(&mut ws, "{oops").await;
    expect_error(&mut ws, "Invalid JSON").await;
    assert_eq!(recv_close(&mut ws).await.0, close_code::CONNECT_REQUIRED);

    // Valid proof, no or wrong token.
    for token in [None, Some("wrong")] {
        let mut frame = serde_json::to_value(ConnectFrame::new(&alice, NOW)).unwrap();
        if let Some(token) = token {
            frame["token"] = json!(token);
        }
        let mut ws = t.ws().await;
        send(&mut ws, &frame.to_string()).await;
        expect_error(&mut ws, "Authentication failed").await;
        assert_eq!(recv_close(&mut ws).await.0, close_code::AUTH_FAILED);
    }
    let mut frame = serde_json::to_value(ConnectFrame::new(&alice, NOW)).unwrap();
    frame["token"] = json!("sesame");
    let mut ws = t.ws().await;
    send(&mut ws, &frame.to_string()).await;
    t.wait_connected(&alice).await;

    // Nothing sent: timed out.
    let mut ws = t.ws().await;
    expect_error(&mut ws, "Timed out waiting for 'connect' frame").await;
    assert_eq!(recv_close(&mut ws).await.0, close_code::CONNECT_REQUIRED);
}

#[tokio::test]
async fn unauthenticated_did_mode() {
    let t = TestServer::with_config(ServerConfig {
        allow_unauthenticated_did: true,
        ..ServerConfig::default()
    })
    .await;
    let mut ws = t.ws().await;
    send(&mut ws, r#"{"type":"connect","from":"did:mesh:legacy"}"#).await;
    send(
        &mut ws,
        r#"{"type":"message","from":"did:mesh:legacy","to":"did:mesh:legacy","id":"1"}"#,
    )
    .await;
    assert_eq!(
        recv_text(&mut ws).await,
        r#"{"type":"message","from":"did:mesh:legacy","to":"did:mesh:legacy","id":"1"}"#
    );
}

#[tokio::test]
async fn takeover_closes_the_old_connection_with_4006() {
    let t = TestServer::start().await;
    let alice = identity(1);
    let bob = identity(2);
    let mut bob_ws = t.connect(&bob).await;
    let stored = message(&bob, &alice, "stored");
    send(&mut bob_ws, &stored).await;
    while t.server.stats().messages_stored < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut first = t.connect(&alice).await;
    assert_eq!(recv_text(&mut first).await, stored);
    let mut second = t.ws().await;
    send(&mut second, &frames::to_text(&ConnectFrame::new(&alice, NOW))).await;
    assert_eq!(
        recv_close(&mut first).await,
        (close_code::SESSION_REPLACED, "session_replaced".to_owned())
    );
    // Not acknowledged: the new connection gets it again.
    assert_eq!(recv_text(&mut second).await, stored);
    assert_eq!(t.server.stats().connected_agents, 2, "alice once, bob");
    // The new connection is the one that receives.
    let text = message(&bob, &alice, "after-takeover");
    send(&mut bob_ws, &text).await;
    assert_eq!(recv_text(&mut second).await, text);
}

#[tokio::test]
async fn live_routing_is_verbatim() {
    let t = TestServer::start().await;
    let (alice, bob) = (identity(1), identity(2));
    let mut a = t.connect(&alice).await;
    let mut b = t.connect(&bob).await;
    // Odd spacing, key order and escapes survive untouched.
    let text = format!(
        "{{ \"id\" : \"m1\",\"to\":\"{}\",  \"type\":\"message\", \"from\":\"{}\", \"v\":1, \"x\":\"\\u00e9\" , \"n\": 1.50 }}",
        bob.did(),
        alice.did()
    );
    send(&mut a, &text).await;
    assert_eq!(recv_text(&mut b).await, text);
    for kind in ["knock", "knock_accept", "knock_reject"] {
        let text = message(&alice, &bob, kind).replace("\"message\"", &format!("\"{kind}\""));
        send(&mut a, &text).await;
        assert_eq!(recv_text(&mut b).await, text);
    }
    let stats = t.server.stats();
    assert_eq!(stats.messages_routed, 4);
    assert_eq!(stats.messages_stored, 0);
}

#[tokio::test]
async fn store_and_forward_until_ack() {
    let t = TestServer::start().await;
    let (alice, bob) = (identity(1), identity(2));
    let mut a = t.connect(&alice).await;
    let (m1, m2) = (message(&alice, &bob, "m1"), message(&alice, &bob, "m2"));
    send(&mut a, &m1).await;
    send(&mut a, &m2).await;
    send(&mut a, &m1).await; // duplicate id: stored once
    while t.server.stats().messages_stored < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Delivered on connect, oldest first; not deleted without an ack.
    let mut b = t.connect(&bob).await;
    assert_eq!(recv_text(&mut b).await, m1);
    assert_eq!(recv_text(&mut b).await, m2);
    b.close(None).await.unwrap();
    t.wait_disconnected(&bob).await;

    let mut b = t.connect(&bob).await;
    assert_eq!(recv_text(&mut b).await, m1);
    assert_eq!(recv_text(&mut b).await, m2);
    // Alice cannot acknowledge Bob's mail.
    send(&mut a, &ack("m1")).await;
    send(&mut b, &ack("m2")).await;
    // `fetch_pending` (TypeScript clients send it right after `connect`)
    // does not send again what this connection already got: a duplicate
    // would break clients whose ratchet advances before the tag check.
    send(&mut b, &frames::to_text(&FetchPendingFrame::new(&bob))).await;
    let marker = message(&alice, &bob, "marker");
    send(&mut a, &marker).await;
    assert_eq!(
        recv_text(&mut b).await,
        marker,
        "no stored frame sent twice on one connection"
    );
    send(&mut b, &ack("m1")).await;
    // (A live frame is held until acknowledged too.)
    send(&mut b, &ack("marker")).await;
    b.close(None).await.unwrap();
    t.wait_disconnected(&bob).await;

    // After the acks nothing is pending: the first frame is a live one.
    let mut b = t.connect(&bob).await;
    let live = message(&alice, &bob, "live");
    send(&mut a, &live).await;
    assert_eq!(recv_text(&mut b).await, live);
    let stats = t.server.stats();
    assert_eq!(stats.messages_stored, 2);
    assert_eq!(stats.messages_delivered, 4);
    assert_eq!(stats.pending_messages, 0);
}

/// A live `message` frame is held until the recipient acknowledges it: an
/// agent that dies with frames in its receive buffer (here: read, not
/// acknowledged, socket dropped without a close) gets them on its next
/// connect, oldest first. Without this they were lost until the sender
/// sent them again (the Python wheel's crash test lost m2 that way).
#[tokio::test]
async fn live_messages_not_acknowledged_come_back_on_the_next_connect() {
    let t = TestServer::start().await;
    let (alice, bob) = (identity(1), identity(2));
    let mut a = t.connect(&alice).await;
    let mut b = t.connect(&bob).await;
    let knock = message(&alice, &bob, "k1").replace("\"message\"", "\"knock\"");
    let sent = [
        message(&alice, &bob, "m1"),
        message(&alice, &bob, "m2"),
        knock.clone(),
        message(&alice, &bob, "m3"),
    ];
    for text in &sent {
        send(&mut a, text).await;
    }
    for text in &sent {
        assert_eq!(&recv_text(&mut b).await, text);
    }
    // Frames of one connection are handled in order: both acks before
    // the end of the socket.
    send(&mut b, &ack("m2")).await;
    send(&mut b, &ack("unknown")).await;
    assert_eq!(t.server.stats().messages_stored, 0, "held, not stored, while connected");
    drop(b);
    t.wait_disconnected(&bob).await;
    let stats = t.server.stats();
    assert_eq!((stats.messages_stored, stats.pending_messages), (2, 2), "{stats:?}");

    // m1 and m3 come back, in order; not m2 (acknowledged) nor the knock
    // (nobody acknowledges knocks).
    let mut b = t.connect(&bob).await;
    assert_eq!(recv_text(&mut b).await, sent[0]);
    assert_eq!(recv_text(&mut b).await, sent[3]);
    send(&mut b, &ack("m1")).await;
    send(&mut b, &ack("m3")).await;
    let marker = message(&alice, &bob, "marker");
    send(&mut a, &marker).await;
    assert_eq!(recv_text(&mut b).await, marker);
    send(&mut b, &ack("marker")).await;
    b.close(None).await.unwrap();
    t.wait_disconnected(&bob).await;

    // All acknowledged: nothing is stored or sent again.
    let stats = t.server.stats();
    assert_eq!((stats.messages_stored, stats.pending_messages), (2, 0), "{stats:?}");
    let mut b = t.connect(&bob).await;
    let live = message(&alice, &bob, "live");
    send(&mut a, &live).await;
    assert_eq!(recv_text(&mut b).await, live);
}

#[tokio::test]
async fn from_is_stamped_with_the_connection_did() {
    let t = TestServer::start().await;
    let (alice, bob, carol) = (identity(1), identity(2), identity(3));
    let mut a = t.connect(&alice).await;
    let mut b = t.connect(&bob).await;
    send(&mut a, &message(&carol, &bob, "spoofed")).await;
    assert_eq!(
        recv_text(&mut b).await,
        message(&alice, &bob, "spoofed"),
        "the claimed sender is replaced in place"
    );
    send(
        &mut a,
        &format!(r#"{{"type":"message","to":"{}","id":"nofrom"}}"#, bob.did()),
    )
    .await;
    assert_eq!(
        recv_text(&mut b).await,
        format!(
            r#"{{"type":"message","to":"{}","id":"nofrom","from":"{}"}}"#,
            bob.did(),
            alice.did()
        )
    );
    send(
        &mut a,
        &format!(r#"{{"type":"message","from":"{}","id":"noto"}}"#, alice.did()),
    )
    .await;
    expect_error(&mut a, "Frame must carry 'to' and 'id'").await;
    let real = message(&alice, &bob, "real");
    send(&mut a, &real).await;
    assert_eq!(
        recv_text(&mut b).await,
        real,
        "a correct frame is forwarded byte for byte"
    );
}

#[tokio::test]
async fn bad_frames_get_errors_and_the_connection_survives() {
    let t = TestServer::with_config(ServerConfig {
        max_frame_bytes: 2048,
        ..ServerConfig::default()
    })
    .await;
    let alice = identity(1);
    let mut a = t.connect(&alice).await;

    send(&mut a, r#"{"type":"bogus"}"#).await;
    expect_error(&mut a, "Unknown frame type: bogus").await;
    send(&mut a, r#"{"id":"x"}"#).await;
    expect_error(&mut a, "Unknown frame type: None").await;
    send(&mut a, "{not json").await;
    expect_error(&mut a, "Invalid JSON").await;
    send(&mut a, "[1,2]").await;
    expect_error(&mut a, "Frame must be a JSON object").await;
    let big = format!(
        r#"{{"type":"message","from":"{}","to":"{}","id":"big","pad":"{}"}}"#,
        alice.did(),
        alice.did(),
        "x".repeat(4096)
    );
    send(&mut a, &big).await;
    expect_error(&mut a, &format!("Frame too large ({} bytes; limit 2048)", big.len())).await;
    send(&mut a, r#"{"type":"connect"}"#).await;
    expect_error(&mut a, "Unknown frame type: connect").await;

    let text = message(&alice, &alice, "still-alive");
    send(&mut a, &text).await;
    assert_eq!(recv_text(&mut a).await, text);
    assert_eq!(t.server.stats().messages_routed, 1);
}

#[tokio::test]
async fn disconnect_and_idle_timeout() {
    let t = TestServer::with_config(ServerConfig {
        idle_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    let alice = identity(1);
    let mut a = t.connect(&alice).await;
    send(&mut a, r#"{"type":"disconnect"}"#).await;
    assert_eq!(recv_close(&mut a).await.0, close_code::NORMAL);

    let mut a = t.connect(&alice).await;
    // Heartbeats keep it open past the idle timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        send(&mut a, r#"{"type":"heartbeat"}"#).await;
    }
    // ...silence does not.
    assert_eq!(recv_close(&mut a).await.0, close_code::IDLE_TIMEOUT);
    t.wait_disconnected(&alice).await;
}

#[tokio::test]
async fn stale_recipients_get_mail_stored() {
    let t = TestServer::start().await;
    let (alice, bob) = (identity(1), identity(2));
    let mut b = t.connect(&bob).await;
    t.clock.advance(Duration::from_secs(91));
    let mut a = t.connect(&alice).await;
    let text = message(&alice, &bob, "to-stale");
    send(&mut a, &text).await;
    while t.server.stats().messages_stored < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A heartbeat makes Bob live again; his stored mail comes on request.
    send(&mut b, r#"{"type":"heartbeat"}"#).await;
    send(&mut b, &frames::to_text(&FetchPendingFrame::new(&bob))).await;
    assert_eq!(recv_text(&mut b).await, text);
    let live = message(&alice, &bob, "live");
    send(&mut a, &live).await;
    assert_eq!(recv_text(&mut b).await, live);
}

#[tokio::test]
async fn stored_messages_expire() {
    let t = TestServer::start().await;
    let (alice, bob) = (identity(1), identity(2));
    let mut a = t.connect(&alice).await;
    send(&mut a, &message(&alice, &bob, "old")).await;
    while t.server.stats().messages_stored < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t.clock.advance(Duration::from_secs(72 * 3600));
    // Keep Alice live after the jump, then connect Bob with a fresh proof.
    send(&mut a, r#"{"type":"heartbeat"}"#).await;
    let later = meshwire_proto::time::Timestamp(common::now().0 + 72 * 3600 * 1000).to_iso();
    let mut b = t.ws().await;
    send(&mut b, &frames::to_text(&ConnectFrame::new(&bob, &later))).await;
    t.wait_connected(&bob).await;
    let live = message(&alice, &bob, "new");
    send(&mut a, &live).await;
    assert_eq!(recv_text(&mut b).await, live, "the expired message is gone");
    assert_eq!(t.server.stats().pending_messages, 0);
}

#[tokio::test]
async fn shutdown_closes_connections() {
    let t = TestServer::start().await;
    let alice = identity(1);
    let mut a = t.connect(&alice).await;
    let health = t.get("/health").await.json::<serde_json::Value>().await.unwrap();
    assert_eq!(health["connected_agents"], 1);
    assert_eq!(health["registered_agents"], 0);
    let common::TestServer { server, .. } = t;
    let closing = tokio::spawn(async move { recv_close(&mut a).await });
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .unwrap();
    assert_eq!(closing.await.unwrap().0, close_code::GOING_AWAY);
}

#[tokio::test]
async fn error_frames_match_the_reference_shape() {
    let t = TestServer::start().await;
    let alice = identity(1);
    let mut a = t.connect(&alice).await;
    send(&mut a, r#"{"type":"nope"}"#).await;
    assert_eq!(
        recv_text(&mut a).await,
        r#"{"type":"error","detail":"Unknown frame type: nope"}"#
    );
    send(&mut a, r#"{"type":"heartbeat"}"#).await;
    send(&mut a, &message(&alice, &alice, "x")).await;
    assert_eq!(recv_json(&mut a).await["id"], "x");
}
