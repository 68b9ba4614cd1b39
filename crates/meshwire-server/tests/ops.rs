//! Operations and limits (issue 10, sections 3 and 5), in process on
//! 127.0.0.1, bounded in count and time: `/metrics` after known traffic,
//! `/healthz` and `/readyz` (NATS down: 503), the connection limit, slow
//! consumers, registry expiry on a manual clock, registration and pre-key
//! upload field limits, and validation errors that do not echo the input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{fresh_auth, fresh_connect, handled, identity, message, recv_close, recv_text, send, TestServer, NOW};
use futures_util::StreamExt;
use meshwire_proto::auth::ed25519_timestamp_header;
use meshwire_proto::time::Timestamp;
use meshwire_server::storage::nats::NatsOptions;
use meshwire_server::storage::nats_server::NatsServer;
use meshwire_server::storage::Storage;
use meshwire_server::{close_code, Clock, ServerConfig};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite;

/// The value of the sample `key` (`name{labels}` exactly as exposed).
fn sample(text: &str, key: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(key)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

async fn scrape(t: &TestServer) -> String {
    let response = t.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert!(response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/openmetrics-text")));
    response.text().await.unwrap()
}

/// Scrapes until every `(key, value)` holds (counters updated right after
/// a frame went out may lag the client by a moment), at most 5 s.
async fn expect_metrics(t: &TestServer, expected: &[(&str, f64)]) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(t).await;
        let wrong: Vec<String> = expected
            .iter()
            .filter(|(key, value)| sample(&text, key) != Some(*value))
            .map(|(key, value)| format!("{key}: want {value}, got {:?}", sample(&text, key)))
            .collect();
        if wrong.is_empty() {
            return text;
        }
        assert!(Instant::now() < deadline, "{wrong:?}\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_count_known_traffic() {
    let t = TestServer::with_config(ServerConfig {
        bundle_fetches_per_minute: 1,
        rate_limit_loopback: true,
        ..Default::default()
    })
    .await;
    let (alice, bob, carol, dave) = (identity(1), identity(2), identity(3), identity(4));
    let mut a = t.connect(&alice).await;
    let mut b = t.connect(&bob).await;
    for i in 0..3 {
        send(&mut a, &message(&alice, &bob, &format!("m{i}"))).await;
    }
    for i in 0..3 {
        assert_eq!(recv_text(&mut b).await, message(&alice, &bob, &format!("m{i}")));
    }
    // Carol is offline: stored.
    send(&mut a, &message(&alice, &carol, "offline")).await;
    send(&mut a, "not json").await;
    assert_eq!(
        serde_json::from_str::<Value>(&recv_text(&mut a).await).unwrap()["detail"],
        "Invalid JSON"
    );
    // A connect frame whose signature does not cover its timestamp.
    let mut forged: Value = serde_json::from_str(&fresh_connect(&carol)).unwrap();
    forged["timestamp"] = json!(common::fresh_ts());
    let mut c = t.ws().await;
    send(&mut c, &forged.to_string()).await;
    let _error = recv_text(&mut c).await;
    assert_eq!(recv_close(&mut c).await.0, close_code::PROOF_FAILED);
    // Registry: an unknown agent's Authorization, and a rate-limited fetch.
    let response = t
        .http
        .delete(t.url(&format!("/v1/agents/{}", identity(7).did())))
        .header("Authorization", fresh_auth(&identity(7)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(t.register(&dave, &["x"]).await.status(), 201);
    assert_eq!(t.upload_prekeys(&dave, 2).await.0.status(), 200);
    let bundle = format!("/v1/agents/{}/prekeys", dave.did());
    assert_eq!(t.get(&bundle).await.status(), 200);
    assert_eq!(t.get(&bundle).await.status(), 429);

    let text = expect_metrics(
        &t,
        &[
            ("meshwire_connections", 2.0),
            ("meshwire_connections_accepted_total", 2.0),
            ("meshwire_frames_in_total{type=\"message\"}", 4.0),
            ("meshwire_frames_in_total{type=\"invalid\"}", 1.0),
            ("meshwire_frames_in_total{type=\"connect\"}", 3.0),
            ("meshwire_frames_out_total{type=\"message\"}", 3.0),
            ("meshwire_frames_out_total{type=\"error\"}", 1.0),
            ("meshwire_messages_routed_total", 3.0),
            ("meshwire_messages_stored_total", 1.0),
            ("meshwire_mailbox_messages", 1.0),
            ("meshwire_registered_agents", 1.0),
            ("meshwire_auth_failures_total{reason=\"proof\"}", 1.0),
            ("meshwire_auth_failures_total{reason=\"registry_unknown_agent\"}", 1.0),
            ("meshwire_rate_limited_total{limit=\"bundle_fetch\"}", 1.0),
            ("meshwire_store_seconds_count{op=\"mail_append\"}", 1.0),
            ("meshwire_store_seconds_count{op=\"agent_create\"}", 1.0),
        ],
    )
    .await;
    assert!(
        sample(&text, "meshwire_mailbox_bytes").is_some_and(|b| b > 100.0),
        "{text}"
    );
    assert!(text.contains("meshwire_store_seconds_bucket{le="), "{text}");
    // The AGT health answer is unchanged.
    let health: Value = t.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["connected_agents"], 2);
}

#[tokio::test]
async fn healthz_and_readyz() {
    let t = TestServer::start().await;
    let healthz = t.get("/healthz").await;
    assert_eq!(healthz.status(), 200);
    assert_eq!(healthz.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    let readyz = t.get("/readyz").await;
    assert_eq!(readyz.status(), 200);
    assert_eq!(readyz.json::<Value>().await.unwrap(), json!({"status": "ready"}));
    // Draining: not ready any more (a load balancer stops sending).
    t.server.server().begin_shutdown();
    // The listener may already be gone; if it answers, it says 503.
    if let Ok(response) = t.http.get(t.url("/readyz")).send().await {
        assert_eq!(response.status(), 503);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_when_nats_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = match NatsServer::start(&dir.path().join("js")) {
        Ok(nats) => nats,
        Err(reason) if meshwire_server::storage::nats_server::find_binary().is_err() => {
            println!("SKIPPED readyz_is_503_when_nats_is_down: no nats-server ({reason})");
            return;
        }
        Err(reason) => panic!("nats-server is installed but did not start: {reason}"),
    };
    let config = ServerConfig::default();
    let storage = Storage::nats(NatsOptions::new(nats.url()), config.storage_limits())
        .await
        .unwrap();
    let t = TestServer::with_config(ServerConfig {
        storage: Some(storage),
        ..config
    })
    .await;
    assert_eq!(t.get("/readyz").await.status(), 200);
    nats.stop();
    let started = Instant::now();
    let response = t.get("/readyz").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "unavailable", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "readyz answers within its timeout"
    );
    // Alive all the same.
    assert_eq!(t.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn connections_over_the_limit_get_503() {
    let t = TestServer::with_config(ServerConfig {
        max_connections: 2,
        ..Default::default()
    })
    .await;
    let first = t.ws().await;
    let _second = t.connect(&identity(2)).await;
    let url = format!("{}/ws", t.server.relay_url());
    match tokio_tungstenite::connect_async(&url).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            assert_eq!(response.headers().get("retry-after").unwrap(), "5");
        }
        other => panic!("a third connection was not refused: {:?}", other.map(|_| ())),
    }
    expect_metrics(&t, &[("meshwire_limit_refusals_total{limit=\"connections\"}", 1.0)]).await;
    // A closed socket gives its slot back.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if tokio_tungstenite::connect_async(&url).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_reader_that_never_reads_is_disconnected() {
    let t = TestServer::with_config(ServerConfig {
        outbound_queue_bytes: 256 * 1024,
        ..Default::default()
    })
    .await;
    let (alice, bob) = (identity(1), identity(2));
    let mut a = t.connect(&alice).await;
    // Bob connects and never reads again.
    let _bob = t.connect(&bob).await;
    let padding = "A".repeat(16 * 1024);
    const FLOOD: usize = 1500;
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.server.server().connected_dids().contains(&bob.did().to_string()) {
        assert!(sent < FLOOD, "still connected after {FLOOD} frames of 16 KiB");
        assert!(Instant::now() < deadline, "still connected after 30 s");
        let frame = format!(
            r#"{{"v":1,"type":"message","from":"{}","to":"{}","id":"f{sent}","ciphertext":"{padding}","timestamp":"{NOW}"}}"#,
            alice.did(),
            bob.did()
        );
        send(&mut a, &frame).await;
        sent += 1;
        if sent % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let text = scrape(&t).await;
    assert!(
        sample(&text, "meshwire_limit_refusals_total{limit=\"outbound_buffer\"}").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    // What did not reach bob waits for him in the offline store.
    let stats = t.server.stats();
    assert!(stats.messages_stored > 0, "{stats:?}");
    assert!(stats.messages_routed < sent as u64, "{stats:?} after {sent}");
}

/// What a connection holds unacknowledged is bounded by its outbound
/// queue's limits: past them the oldest frame is forgotten and counted.
#[tokio::test]
async fn unacknowledged_live_frames_are_bounded_and_counted() {
    let t = TestServer::with_config(ServerConfig {
        outbound_queue: 2,
        ..Default::default()
    })
    .await;
    let (alice, bob) = (identity(1), identity(2));
    let mut a = t.connect(&alice).await;
    let mut b = t.connect(&bob).await;
    let sent: Vec<String> = (1..=3).map(|n| message(&alice, &bob, &format!("m{n}"))).collect();
    for text in &sent {
        send(&mut a, text).await;
        // One at a time: the queue of 2 never overflows.
        assert_eq!(&recv_text(&mut b).await, text);
    }
    drop(b);
    t.wait_disconnected(&bob).await;
    expect_metrics(&t, &[("meshwire_limit_refusals_total{limit=\"unacked\"}", 1.0)]).await;
    assert_eq!(t.server.stats().messages_stored, 2);
    let mut b = t.connect(&bob).await;
    assert_eq!(recv_text(&mut b).await, sent[1]);
    assert_eq!(recv_text(&mut b).await, sent[2]);
}

/// A slow consumer's mail stays in order: its queue goes to the store
/// first, then the frames that arrived while it was being closed, then
/// later ones; on reconnecting it gets one contiguous, increasing run
/// ending with the last frame sent (a frame stored ahead of older queued
/// ones used to break ratchets that cannot skip far, as Python's).
#[tokio::test]
async fn a_slow_consumers_mail_is_stored_in_order() {
    let t = TestServer::with_config(ServerConfig {
        outbound_queue: 64,
        ..Default::default()
    })
    .await;
    let (alice, bob) = (identity(1), identity(2));
    let mut a = t.connect(&alice).await;
    let bob_ws = t.connect(&bob).await;
    let frame = |n: usize| {
        format!(
            r#"{{"v":1,"type":"message","from":"{}","to":"{}","id":"f{n:05}","ciphertext":"{}","timestamp":"{NOW}"}}"#,
            alice.did(),
            bob.did(),
            "B".repeat(4096)
        )
    };
    // Bob reads nothing; alice sends until his buffer overflowed (in
    // chunks, staying under the per-sender store quota), then a few more
    // while he is being closed, and more once he is gone.
    let mut sent = 0;
    let overflowed = "meshwire_limit_refusals_total{limit=\"outbound_buffer\"}";
    while sample(&scrape(&t).await, overflowed).is_none_or(|n| n < 1.0) {
        assert!(sent < 1500, "no overflow after {sent} frames");
        for _ in 0..50 {
            send(&mut a, &frame(sent)).await;
            sent += 1;
        }
    }
    for _ in 0..20 {
        send(&mut a, &frame(sent)).await;
        sent += 1;
    }
    t.wait_disconnected(&bob).await;
    for _ in 0..20 {
        send(&mut a, &frame(sent)).await;
        sent += 1;
    }
    drop(bob_ws);
    // Alice's frames are all routed once her connection answered a ping.
    handled(&mut a).await;
    let mut bob_ws = t.connect(&bob).await;
    let mut got = Vec::new();
    loop {
        let Ok(Some(Ok(tungstenite::Message::Text(text)))) =
            tokio::time::timeout(Duration::from_secs(5), bob_ws.next()).await
        else {
            panic!(
                "after {} frames ({:?}..): stats {:?}, sent {sent}",
                got.len(),
                got.first(),
                t.server.stats()
            );
        };
        let value: Value = serde_json::from_str(&text).unwrap();
        let id = value["id"].as_str().unwrap().to_owned();
        let n: usize = id[1..].parse().unwrap();
        got.push(n);
        if n == sent - 1 {
            break;
        }
    }
    let first = got[0];
    assert_eq!(
        got,
        (first..sent).collect::<Vec<_>>(),
        "in order, none missing, after {sent} sent"
    );
    assert!(got.len() >= 40, "{} stored of {sent}", got.len());
    assert_eq!(t.server.stats().messages_refused, 0);
}

#[tokio::test]
async fn agents_that_stop_heartbeating_expire() {
    let t = TestServer::with_config(ServerConfig {
        agent_expiry: Duration::from_secs(30 * 24 * 3600),
        ..Default::default()
    })
    .await;
    let (gone, alive) = (identity(1), identity(2));
    assert_eq!(t.register(&gone, &["x"]).await.status(), 201);
    assert_eq!(t.register(&alive, &["x"]).await.status(), 201);
    let day = Duration::from_secs(24 * 3600);
    t.clock.advance(day * 20);
    let ts = Timestamp(t.clock.now().0).to_iso();
    let response = t
        .http
        .post(t.url(&format!("/v1/agents/{}/heartbeat", alive.did())))
        .header("Authorization", ed25519_timestamp_header(&alive, &ts))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    t.clock.advance(day * 11);
    assert_eq!(t.get(&format!("/v1/agents/{}", gone.did())).await.status(), 404);
    assert_eq!(t.get(&format!("/v1/agents/{}", alive.did())).await.status(), 200);
    expect_metrics(
        &t,
        &[
            ("meshwire_agents_expired_total", 1.0),
            ("meshwire_registered_agents", 1.0),
        ],
    )
    .await;
}

#[tokio::test]
async fn registrations_and_uploads_accept_only_the_protocol_fields() {
    let t = TestServer::start().await;
    let id = identity(1);
    let mut body = TestServer::registration_body(&id, NOW, &["x"]);
    body["nickname"] = json!("eve");
    let response = t.post_json("/v1/agents", &body).await;
    assert_eq!(response.status(), 400);
    let detail = response.json::<Value>().await.unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(detail.contains("unknown field 'nickname'"), "{detail}");

    let caps: Vec<String> = (0..65).map(|i| format!("c{i}")).collect();
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    let response = t
        .post_json(
            "/v1/agents",
            &TestServer::registration_body(&id, &common::fresh_ts(), &caps),
        )
        .await;
    assert_eq!(response.status(), 400);
    let mut body = TestServer::registration_body(&id, &common::fresh_ts(), &["x"]);
    body["metadata"] = json!({"k": "v".repeat(2000)});
    assert_eq!(t.post_json("/v1/agents", &body).await.status(), 400);

    // The same agent registers once its body is within the limits.
    assert_eq!(t.register(&id, &["x"]).await.status(), 201);
    let (mut upload, _) = common::prekey_upload(&id, 1);
    upload["extra"] = json!(1);
    let response = t
        .http
        .put(t.url(&format!("/v1/agents/{}/prekeys", id.did())))
        .header("Authorization", fresh_auth(&id))
        .json(&upload)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    expect_metrics(
        &t,
        &[
            ("meshwire_limit_refusals_total{limit=\"registration\"}", 3.0),
            ("meshwire_limit_refusals_total{limit=\"prekey_upload\"}", 1.0),
        ],
    )
    .await;
}

#[tokio::test]
async fn validation_errors_do_not_echo_the_input() {
    let t = TestServer::start().await;
    let big = "A".repeat(240 * 1024);
    // 422: wrong types and a missing field (FastAPI echoed the whole body).
    let response = t
        .post_json(
            "/v1/agents",
            &json!({"public_key": big, "proof": 5, "capabilities": "x"}),
        )
        .await;
    assert_eq!(response.status(), 422);
    let text = response.text().await.unwrap();
    assert!(text.len() < 1024, "{} bytes", text.len());
    assert!(!text.contains("AAAAAAAA"), "{text}");
    // 400: an unknown field whose name is the bulk.
    let mut body = TestServer::registration_body(&identity(1), NOW, &["x"]);
    body[big.as_str()] = json!(1);
    let response = t.post_json("/v1/agents", &body).await;
    assert_eq!(response.status(), 400);
    let text = response.text().await.unwrap();
    assert!(text.len() < 1024, "{} bytes", text.len());
    // A relay error frame for an unknown type of 100 KB.
    let mut ws = t.connect(&identity(2)).await;
    send(&mut ws, &json!({"type": "Z".repeat(100 * 1024)}).to_string()).await;
    let error = recv_text(&mut ws).await;
    assert!(error.len() < 512, "{} bytes", error.len());
}
