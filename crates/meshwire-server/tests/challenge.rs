//! Challenge-bound proofs (docs/specs/MESHWIRE-CHALLENGE-AUTH.md): relay and
//! registry, success, replay, every bound field, `require_challenge`, and
//! the spec's worked example.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{fresh_auth, fresh_connect, identity, prekey_upload, recv_close, recv_json, send, TestServer, Ws};
use meshwire_proto::auth::{
    challenge_header, challenge_message, parse_challenge_message, ChallengeRequest, CHALLENGE_HEADER,
};
use meshwire_proto::encoding::hex_encode;
use meshwire_proto::frames::{self, ConnectFrame};
use meshwire_proto::Identity;
use meshwire_server::{close_code, ChallengeSecret, ServerConfig};
use serde_json::{json, Value};
use std::time::Duration;

fn detail(text: &str) -> Value {
    json!({ "detail": text })
}

/// A WebSocket to the relay and the nonce of its upgrade answer.
async fn ws_with_nonce(t: &TestServer) -> (Ws, String, String) {
    let url = format!("{}/ws", t.server.relay_url());
    let (ws, response) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    let nonce = response.headers()[CHALLENGE_HEADER].to_str().unwrap().to_owned();
    (ws, nonce, url)
}

fn challenge_connect(id: &Identity, url: &str, nonce: &str) -> String {
    frames::to_text(&ConnectFrame::challenge_for_url(id, url, nonce).unwrap())
}

#[tokio::test]
async fn relay_challenge_success_and_replay() {
    let t = TestServer::start().await;
    let alice = identity(1);
    let (mut ws, nonce, url) = ws_with_nonce(&t).await;
    let frame = challenge_connect(&alice, &url, &nonce);
    let parsed: Value = serde_json::from_str(&frame).unwrap();
    assert_eq!(parsed["auth_scheme"], "meshwire-challenge-v1");
    assert_eq!(parsed["audience"], t.server.relay_url());
    assert!(parsed.get("timestamp").is_none());
    send(&mut ws, &frame).await;
    t.wait_connected(&alice).await;

    // The captured frame, replayed on a new connection: that connection has
    // its own nonce, so the proof is refused and alice stays connected.
    let (mut replay, other_nonce, _) = ws_with_nonce(&t).await;
    assert_ne!(other_nonce, nonce);
    send(&mut replay, &frame).await;
    let error = recv_json(&mut replay).await;
    assert_eq!(
        error["detail"],
        "DID proof failed: nonce is not the one issued for this connection"
    );
    assert_eq!(recv_close(&mut replay).await.0, close_code::PROOF_FAILED);
    assert_eq!(t.server.server().connected_dids(), [alice.did().to_string()]);
    // The socket is still alive: a heartbeat gets no error and the
    // connection stays.
    send(&mut ws, r#"{"type":"heartbeat"}"#).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(t.server.stats().connected_agents, 1);
}

#[tokio::test]
async fn relay_challenge_proofs_are_bound_to_audience_path_and_expiry() {
    let t = TestServer::start().await;
    let alice = identity(1);
    type MakeFrame<'a> = Box<dyn Fn(&str, &str) -> String + 'a>;
    let cases: Vec<(MakeFrame, &str)> = vec![
        (
            Box::new(|_url, nonce| {
                frames::to_text(&ConnectFrame::challenge(&alice, "ws://elsewhere.example:8765", "/ws", nonce).unwrap())
            }),
            "DID proof failed: audience is not this relay",
        ),
        (
            Box::new(|url, nonce| frames::to_text(&ConnectFrame::challenge(&alice, url, "/other", nonce).unwrap())),
            "DID proof failed: invalid challenge signature",
        ),
        (
            Box::new(|url, nonce| {
                let mut frame: Value = serde_json::from_str(&challenge_connect(&alice, url, nonce)).unwrap();
                frame["from"] = json!(identity(2).did().as_str());
                frame.to_string()
            }),
            "DID proof failed: DID does not match public_key (sha256 mismatch)",
        ),
        (
            Box::new(|url, nonce| {
                let mut frame: Value = serde_json::from_str(&challenge_connect(&alice, url, nonce)).unwrap();
                frame["auth_scheme"] = json!("meshwire-challenge-v0");
                frame.to_string()
            }),
            "DID proof failed: unsupported auth_scheme",
        ),
    ];
    for (make, expected) in cases {
        let (mut ws, nonce, url) = ws_with_nonce(&t).await;
        send(&mut ws, &make(&url, &nonce)).await;
        let error = recv_json(&mut ws).await;
        assert_eq!(error["detail"], expected);
    }
    // A nonce past its 60 s lifetime.
    let (mut ws, nonce, url) = ws_with_nonce(&t).await;
    t.clock.advance(Duration::from_secs(61));
    send(&mut ws, &challenge_connect(&alice, &url, &nonce)).await;
    let error = recv_json(&mut ws).await;
    assert_eq!(error["detail"], "DID proof failed: challenge nonce expired or invalid");
    assert_eq!(t.server.stats().connected_agents, 0);
}

#[tokio::test]
async fn require_challenge_refuses_the_timestamp_forms() {
    let t = TestServer::with_config(ServerConfig {
        require_challenge: true,
        ..Default::default()
    })
    .await;
    let alice = identity(1);
    let mut ws = t.ws().await;
    send(&mut ws, &fresh_connect(&alice)).await;
    let error = recv_json(&mut ws).await;
    assert_eq!(
        error["detail"],
        "DID proof failed: challenge-bound proof required (auth_scheme meshwire-challenge-v1); \
         timestamp proofs are disabled"
    );
    assert_eq!(recv_close(&mut ws).await.0, close_code::PROOF_FAILED);
    let (mut ws, nonce, url) = ws_with_nonce(&t).await;
    send(&mut ws, &challenge_connect(&alice, &url, &nonce)).await;
    t.wait_connected(&alice).await;

    // Registry: the timestamp header is refused, the challenge one accepted.
    assert_eq!(t.register(&alice, &[]).await.status(), 201);
    let (body, _) = prekey_upload(&alice, 1);
    let path = format!("/v1/agents/{}/prekeys", alice.did());
    let response = t
        .http
        .put(t.url(&path))
        .header("Authorization", fresh_auth(&alice))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        detail("Meshwire-Challenge authorization required: timestamp proofs are disabled on this registry")
    );
    let body = body.to_string();
    let header = registry_header(&t, &alice, "PUT", &path, &body).await;
    assert_eq!(put(&t, &path, &header, &body).await.0, 200);
}

async fn nonce(t: &TestServer) -> String {
    let response = t.get("/v1/auth/challenge").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["scheme"], "Meshwire-Challenge");
    assert_eq!(body["version"], 1);
    assert_eq!(body["expires_at"], "2026-11-21T12:01:00.000Z");
    body["nonce"].as_str().unwrap().to_owned()
}

fn origin(t: &TestServer) -> String {
    t.server.registry_url()
}

async fn registry_header(t: &TestServer, id: &Identity, method: &str, path: &str, body: &str) -> String {
    let nonce = nonce(t).await;
    t.challenge_auth(id, method, path, &nonce, body.as_bytes())
}

async fn put(t: &TestServer, path: &str, header: &str, body: &str) -> (u16, Value) {
    let response = t
        .http
        .put(t.url(path))
        .header("Authorization", header)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn registry_challenge_success_replay_and_binding() {
    let t = TestServer::start().await;
    let alice = identity(1);
    let bob = identity(2);
    t.register(&alice, &[]).await;
    t.register(&bob, &[]).await;
    let path = format!("/v1/agents/{}/prekeys", alice.did());
    let body = prekey_upload(&alice, 2).0.to_string();
    let header = registry_header(&t, &alice, "PUT", &path, &body).await;
    assert_eq!(
        put(&t, &path, &header, &body).await,
        (200, json!({"did": alice.did().as_str(), "otk_count": 2}))
    );

    // The same proof again.
    assert_eq!(
        put(&t, &path, &header, &body).await,
        (401, detail("Proof already used: replayed challenge nonce"))
    );

    // A proof for one body, method, path or audience is refused for another.
    let other_body = prekey_upload(&alice, 5).0.to_string();
    let header = registry_header(&t, &alice, "PUT", &path, &body).await;
    let (status, got) = put(&t, &path, &header, &other_body).await;
    assert_eq!(
        (status, got),
        (401, detail("Invalid signature: challenge signature does not verify"))
    );
    let header = registry_header(&t, &alice, "POST", &path, &body).await;
    assert_eq!(put(&t, &path, &header, &body).await.0, 401);
    let header = registry_header(&t, &alice, "PUT", &format!("/v1/agents/{}/prekeys", bob.did()), &body).await;
    assert_eq!(put(&t, &path, &header, &body).await.0, 401);
    let nonce_text = nonce(&t).await;
    let did = alice.did().to_string();
    let elsewhere = challenge_header(
        &alice,
        &ChallengeRequest {
            audience: "https://registry.elsewhere.example",
            method: "PUT",
            path: &path,
            nonce: &nonce_text,
            did: &did,
            body: body.as_bytes(),
        },
    )
    .unwrap();
    assert_eq!(
        put(&t, &path, &elsewhere, &body).await,
        (
            401,
            detail("Challenge refused: audience https://registry.elsewhere.example is not this registry")
        )
    );
    // A forged nonce, and an expired one.
    let forged = header.replacen(&header.split(' ').nth(2).unwrap().to_owned(), &"A".repeat(54), 1);
    assert_eq!(
        put(&t, &path, &forged, &body).await,
        (401, detail("Challenge refused: nonce was not issued by this server"))
    );
    let header = registry_header(&t, &alice, "PUT", &path, &other_body).await;
    t.clock.advance(Duration::from_secs(61));
    assert_eq!(
        put(&t, &path, &header, &other_body).await,
        (401, detail("Challenge refused: nonce expired"))
    );
    // Nothing of the refused requests was stored.
    let agent: Value = t
        .get(&format!("/v1/agents/{}", alice.did()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(agent["otk_count"], 2);
}

#[tokio::test]
async fn every_registry_answer_advertises_a_fresh_nonce() {
    let t = TestServer::start().await;
    let mut seen = Vec::new();
    for path in [
        "/v1/discover?capability=x",
        "/v1/agents/did:mesh:00",
        "/v1/auth/challenge",
    ] {
        let response = t.get(path).await;
        let nonce = response.headers()[CHALLENGE_HEADER].to_str().unwrap().to_owned();
        assert_eq!(nonce.len(), 54);
        seen.push(nonce);
    }
    seen.dedup();
    assert_eq!(seen.len(), 3, "nonces are fresh");
    // The nonce of an answer authenticates the next request.
    let alice = identity(1);
    let response = t.register(&alice, &[]).await;
    let nonce_text = response.headers()[CHALLENGE_HEADER].to_str().unwrap().to_owned();
    let path = format!("/v1/agents/{}/heartbeat", alice.did());
    let header = t.challenge_auth(&alice, "POST", &path, &nonce_text, b"");
    let response = t.http.post(t.url(&path)).header("Authorization", header).send().await;
    assert_eq!(response.unwrap().status(), 200);
}

#[tokio::test]
async fn registry_origins_behind_a_proxy() {
    let t = TestServer::with_config(ServerConfig {
        public_origins: vec!["https://mesh.example.com".into()],
        challenge_secret: Some(ChallengeSecret::new([9; 32])),
        ..Default::default()
    })
    .await;
    let alice = identity(1);
    t.register(&alice, &[]).await;
    let path = format!("/v1/agents/{}/heartbeat", alice.did());
    let nonce_text = nonce(&t).await;
    let did = alice.did().to_string();
    let sign = |audience: &str| {
        challenge_header(
            &alice,
            &ChallengeRequest {
                audience,
                method: "POST",
                path: &path,
                nonce: &nonce_text,
                did: &did,
                body: b"",
            },
        )
        .unwrap()
    };
    let post = |header: String| t.http.post(t.url(&path)).header("Authorization", header).send();
    // The Host the server sees is not the public origin: refused.
    assert_eq!(post(sign(&origin(&t))).await.unwrap().status(), 401);
    assert_eq!(post(sign("https://mesh.example.com")).await.unwrap().status(), 200);
}

/// The worked example of docs/specs/MESHWIRE-CHALLENGE-AUTH.md, byte for
/// byte.
#[test]
fn the_spec_worked_example() {
    let spec = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/specs/MESHWIRE-CHALLENGE-AUTH.md"
    ))
    .unwrap();
    let agent = Identity::from_seed(&[0x01; 32]);
    let did = agent.did().to_string();
    let body = br#"{"identity_key":"x"}"#;
    // The nonce a server with the secret 32 × 0x42 issues at
    // 2026-11-21T12:00:00Z with the random bytes 16 × 0x5a (60 s lifetime).
    let nonce = &meshwire_server::fuzzing::relay_nonce();
    let path = format!(
        "/v1/agents/{}/prekeys",
        meshwire_proto::registry_wire::encode_component(&did)
    );
    let request = ChallengeRequest {
        audience: "https://registry.example.com",
        method: "PUT",
        path: &path,
        nonce,
        did: &did,
        body,
    };
    let message = challenge_message(&request).unwrap();
    let header = challenge_header(&agent, &request).unwrap();
    let signature = agent.sign(message.as_bytes());
    let fields = parse_challenge_message(message.as_bytes()).unwrap();
    assert_eq!(fields.path, path);
    for expected in [
        did.clone(),
        hex_encode(agent.ed25519_public().as_bytes()),
        message.clone(),
        hex_encode(&signature),
        header.clone(),
        fields.body_sha256.clone(),
    ] {
        assert!(spec.contains(&expected), "the spec lacks:\n{expected}");
    }
    // The relay form of the same agent.
    let frame = frames::to_text(&ConnectFrame::challenge(&agent, "wss://relay.example.com", "/ws", nonce).unwrap());
    assert!(spec.contains(&frame), "the spec lacks:\n{frame}");
}
