//! Limits under abuse (issue 10 §3): per-requester rate limits on
//! registration, discovery and bundle fetches (429 + `Retry-After`,
//! counted per route, other requesters unaffected), routing only to
//! registered DIDs, per-sender fairness of the offline store, and a
//! challenge secret shared by two instances on one storage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{expect_error, fresh_auth, identity, message, recv_text, send, TestServer, NOW};
use meshwire_proto::Identity;
use meshwire_server::storage::Storage;
use meshwire_server::{ChallengeSecret, ServerConfig};
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// Another loopback address: on Linux all of 127.0.0.0/8 reaches the
/// server on 127.0.0.1, from a different peer IP.
const OTHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn client_from(ip: IpAddr) -> reqwest::Client {
    reqwest::Client::builder().local_address(ip).build().unwrap()
}

async fn scrape(t: &TestServer) -> String {
    t.get("/metrics").await.text().await.unwrap()
}

/// The value of the sample `key` (`name{labels}`) in an exposition.
fn sample(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
}

fn rate_limited(text: &str, limit: &str) -> Option<f64> {
    sample(text, &format!("meshwire_rate_limited_total{{limit=\"{limit}\"}}"))
}

/// Asserts a 429 with a `Retry-After` of `retry_after` seconds and a detail
/// naming `what`.
async fn assert_429(response: reqwest::Response, retry_after: u64, what: &str) {
    assert_eq!(response.status(), 429);
    assert_eq!(
        response.headers()["retry-after"].to_str().unwrap(),
        retry_after.to_string()
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["detail"], format!("Too many {what}; retry after {retry_after} s"));
}

/// Waits (at most 2 s) until `done` holds.
async fn wait_for(done: impl Fn() -> bool) {
    for _ in 0..400 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not reached in 2 s");
}

/// A test server with the default configuration changed by `set`.
async fn server_with(set: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let mut config = ServerConfig::default();
    set(&mut config);
    TestServer::with_config(config).await
}

/// Like [`server_with`], with requesters on loopback rate-limited too.
async fn limited(set: impl FnOnce(&mut ServerConfig)) -> TestServer {
    server_with(|config| {
        config.rate_limit_loopback = true;
        set(config);
    })
    .await
}

/// `GET path` authenticated as `id` (a fresh timestamp header).
async fn get_as(t: &TestServer, path: &str, id: &Identity) -> reqwest::Response {
    let request = t.http.get(t.url(path)).header("Authorization", fresh_auth(id));
    request.send().await.unwrap()
}

#[tokio::test]
async fn registrations_are_rate_limited_per_ip() {
    let t = limited(|c| c.registrations_per_minute = 2).await;
    assert_eq!(t.register(&identity(1), &[]).await.status(), 201);
    assert_eq!(t.register(&identity(2), &[]).await.status(), 201);
    // Another key from the same IP: refused before anything is checked
    // (one token every 30 s).
    assert_429(t.register(&identity(3), &[]).await, 30, "registrations").await;
    // Junk from that IP is refused the same way (the limit comes first).
    let junk = t.http.post(t.url("/v1/agents")).body("{").send().await.unwrap();
    assert_429(junk, 30, "registrations").await;
    assert_eq!(t.server.stats().registrations_limited, 2);
    assert_eq!(t.server.stats().registered_agents, 2);
    assert_eq!(rate_limited(&scrape(&t).await, "registration"), Some(2.0));
    assert_eq!(rate_limited(&scrape(&t).await, "bundle_fetch"), Some(0.0));

    // Another requester (peer IP) is unaffected.
    let body = TestServer::registration_body(&identity(3), NOW, &[]);
    let other = client_from(OTHER_IP);
    let response = other.post(t.url("/v1/agents")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 201);

    // The budget refills: one token after 30 s.
    t.clock.advance(Duration::from_secs(29));
    assert_429(t.register(&identity(4), &[]).await, 1, "registrations").await;
    t.clock.advance(Duration::from_secs(1));
    assert_eq!(t.register(&identity(4), &[]).await.status(), 201);
    assert_eq!(rate_limited(&scrape(&t).await, "registration"), Some(3.0));
}

#[tokio::test]
async fn loopback_is_not_limited_unless_configured() {
    let t = server_with(|c| {
        c.registrations_per_minute = 1;
        c.discoveries_per_minute = 1;
    })
    .await;
    for n in 1..=3 {
        assert_eq!(t.register(&identity(n), &[]).await.status(), 201);
        assert_eq!(t.get("/v1/discover?capability=x").await.status(), 200);
    }
    assert_eq!(t.server.stats().registrations_limited, 0);
    assert_eq!(t.server.stats().discoveries_limited, 0);
}

#[tokio::test]
async fn discovery_is_rate_limited_per_requester() {
    let t = limited(|c| c.discoveries_per_minute = 3).await;
    let alice = identity(1);
    assert_eq!(t.register(&alice, &["search"]).await.status(), 201);
    let path = "/v1/discover?capability=search";
    for _ in 0..3 {
        let response = t.get(path).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["total"], 1);
    }
    assert_429(t.get(path).await, 20, "discovery requests").await;
    // An authenticated requester has its own budget (its DID), even from
    // the same IP.
    for _ in 0..3 {
        assert_eq!(get_as(&t, path, &alice).await.status(), 200);
    }
    assert_429(get_as(&t, path, &alice).await, 20, "discovery requests").await;
    // Another IP is unaffected.
    let other = client_from(OTHER_IP);
    assert_eq!(other.get(t.url(path)).send().await.unwrap().status(), 200);
    assert_eq!(t.server.stats().discoveries_limited, 2);
    let text = scrape(&t).await;
    assert_eq!(rate_limited(&text, "discovery"), Some(2.0));
    assert_eq!(rate_limited(&text, "registration"), Some(0.0));
}

#[tokio::test]
async fn bundle_fetches_of_another_ip_are_unaffected() {
    let t = limited(|c| c.bundle_fetches_per_minute = 2).await;
    let bob = identity(2);
    assert_eq!(t.register(&bob, &[]).await.status(), 201);
    assert_eq!(t.upload_prekeys(&bob, 10).await.0.status(), 200);
    let path = format!("/v1/agents/{}/prekeys", bob.did());
    assert_eq!(t.get(&path).await.status(), 200);
    assert_eq!(t.get(&path).await.status(), 200);
    assert_429(t.get(&path).await, 30, "pre-key bundle fetches").await;
    let other = client_from(OTHER_IP);
    assert_eq!(other.get(t.url(&path)).send().await.unwrap().status(), 200);
    assert_eq!(t.server.stats().bundle_fetches_limited, 1);
    assert_eq!(rate_limited(&scrape(&t).await, "bundle_fetch"), Some(1.0));
}

#[tokio::test]
async fn route_only_registered_refuses_mail_for_unknown_dids() {
    let t = server_with(|c| c.route_only_registered = true).await;
    let (alice, bob, ghost) = (identity(1), identity(2), identity(9));
    assert_eq!(t.register(&bob, &[]).await.status(), 201);
    let mut a = t.connect(&alice).await;
    // Bob is registered but offline: stored.
    send(&mut a, &message(&alice, &bob, "to-bob")).await;
    // Nobody registered the ghost: refused, with an error frame.
    send(&mut a, &message(&alice, &ghost, "to-ghost")).await;
    expect_error(&mut a, "Recipient is not registered; message dropped").await;
    let stats = t.server.stats();
    assert_eq!((stats.messages_stored, stats.messages_refused), (1, 1));
    let text = scrape(&t).await;
    assert_eq!(
        sample(&text, "meshwire_limit_refusals_total{limit=\"unregistered_recipient\"}"),
        Some(1.0)
    );
    // Live delivery to a connected recipient is unchanged, registered or not.
    let mut g = t.connect(&ghost).await;
    send(&mut a, &message(&alice, &ghost, "live")).await;
    assert_eq!(recv_text(&mut g).await, message(&alice, &ghost, "live"));
    // Bob gets his stored mail.
    let mut b = t.connect(&bob).await;
    assert_eq!(recv_text(&mut b).await, message(&alice, &bob, "to-bob"));

    // Off (the default), mail for any DID is stored.
    let open = TestServer::start().await;
    let mut a = open.connect(&alice).await;
    send(&mut a, &message(&alice, &ghost, "to-ghost")).await;
    wait_for(|| open.server.stats().messages_stored == 1).await;
}

#[tokio::test]
async fn one_sender_cannot_fill_another_agents_mailbox() {
    let t = server_with(|c| {
        c.max_stored_per_sender = 3;
        c.max_stored_per_recipient = 10;
    })
    .await;
    let (mallory, carol, bob) = (identity(1), identity(3), identity(2));
    let mut m = t.connect(&mallory).await;
    for i in 0..3 {
        send(&mut m, &message(&mallory, &bob, &format!("m{i}"))).await;
    }
    for i in 3..6 {
        send(&mut m, &message(&mallory, &bob, &format!("m{i}"))).await;
        expect_error(&mut m, "Too many of your messages are queued; message dropped").await;
    }
    // Another sender still reaches bob's mailbox.
    let mut c = t.connect(&carol).await;
    send(&mut c, &message(&carol, &bob, "c0")).await;
    wait_for(|| t.server.stats().messages_stored == 4).await;
    let mut b = t.connect(&bob).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let frame: Value = serde_json::from_str(&recv_text(&mut b).await).unwrap();
        got.push(frame["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, ["m0", "m1", "m2", "c0"]);
    let stats = t.server.stats();
    assert_eq!((stats.messages_stored, stats.messages_refused), (4, 3));
    assert_eq!(
        sample(
            &scrape(&t).await,
            "meshwire_limit_refusals_total{limit=\"mailbox_quota\"}"
        ),
        Some(3.0)
    );
}

/// A heartbeat authenticated with a challenge proof over `nonce`, sent to
/// `to` (the proof names `to`'s origin).
async fn challenge_heartbeat(to: &TestServer, id: &Identity, nonce: &str) -> (u16, String) {
    let path = format!("/v1/agents/{}/heartbeat", id.did());
    let header = to.challenge_auth(id, "POST", &path, nonce, b"");
    let request = to.http.post(to.url(&path)).header("Authorization", header);
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or_default();
    (status, body["detail"].as_str().unwrap_or_default().to_owned())
}

async fn nonce(t: &TestServer) -> String {
    let body: Value = t.get("/v1/auth/challenge").await.json().await.unwrap();
    body["nonce"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_shared_challenge_secret_works_across_instances_once() {
    let storage = Storage::memory(ServerConfig::default().storage_limits());
    let replica = |secret: [u8; 32]| ServerConfig {
        require_challenge: true,
        challenge_secret: Some(ChallengeSecret::parse(hex::encode(secret).as_bytes()).unwrap()),
        storage: Some(storage.clone()),
        ..Default::default()
    };
    let a = TestServer::with_config(replica([7; 32])).await;
    let b = TestServer::with_config(replica([7; 32])).await;
    let stranger = TestServer::with_config(replica([8; 32])).await;
    let alice = identity(1);
    assert_eq!(a.register(&alice, &[]).await.status(), 201);

    // Issued by A, verified by B (one storage: B knows alice).
    let from_a = nonce(&a).await;
    assert_eq!(challenge_heartbeat(&b, &alice, &from_a).await.0, 200);
    // Single use across the replicas: the ledger is in the shared storage.
    for replica in [&a, &b] {
        let (status, detail) = challenge_heartbeat(replica, &alice, &from_a).await;
        assert_eq!(status, 401);
        assert!(detail.contains("already used"), "{detail}");
    }
    // An instance with another secret does not accept A's nonces.
    let another = nonce(&a).await;
    let (status, detail) = challenge_heartbeat(&stranger, &alice, &another).await;
    assert_eq!(status, 401);
    assert!(detail.contains("not issued by this server"), "{detail}");
    // ... but they stay usable where the secret is shared (past the
    // heartbeat throttle of 10 s).
    a.clock.advance(Duration::from_secs(11));
    assert_eq!(challenge_heartbeat(&a, &alice, &another).await.0, 200);
}
