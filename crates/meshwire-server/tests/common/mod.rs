//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures_util::{SinkExt, StreamExt};
use meshwire_proto::auth::{challenge_header, ed25519_timestamp_header, registration_proof, ChallengeRequest};
use meshwire_proto::frames::{self, ConnectFrame};
use meshwire_proto::registry_wire::prekeys_body;
use meshwire_proto::time::Timestamp;
use meshwire_proto::{Identity, PreKeys};
use meshwire_server::{ManualClock, RunningServer, ServerConfig};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The fixed wall-clock time of every test server.
pub const NOW: &str = "2026-11-21T12:00:00.000Z";

pub fn now() -> Timestamp {
    Timestamp::parse_iso(NOW).unwrap()
}

static NEXT_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);

/// A timestamp no other call returned (NOW plus a few ms, within the
/// replay window): every proof of possession is accepted once only.
pub fn fresh_ts() -> String {
    iso_at(NEXT_MS.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// An `Ed25519-Timestamp` header over a fresh timestamp.
pub fn fresh_auth(id: &Identity) -> String {
    ed25519_timestamp_header(id, &fresh_ts())
}

/// A `connect` frame over a fresh timestamp.
pub fn fresh_connect(id: &Identity) -> String {
    frames::to_text(&ConnectFrame::new(id, &fresh_ts()))
}

/// `now() + ms` as ISO-8601 (negative offsets go back).
pub fn iso_at(offset_ms: i64) -> String {
    Timestamp(now().0.checked_add_signed(offset_ms).unwrap()).to_iso()
}

pub struct TestServer {
    pub server: RunningServer,
    pub clock: ManualClock,
    pub http: reqwest::Client,
}

impl TestServer {
    /// A `Meshwire-Challenge` Authorization header from `id` for
    /// `method path` with `body`, over `nonce`, addressed to this
    /// server's registry.
    pub fn challenge_auth(&self, id: &Identity, method: &str, path: &str, nonce: &str, body: &[u8]) -> String {
        let did = id.did().to_string();
        let request = ChallengeRequest {
            audience: &self.server.registry_url(),
            method,
            path,
            nonce,
            did: &did,
            body,
        };
        challenge_header(id, &request).unwrap()
    }

    pub async fn start() -> Self {
        Self::with_config(ServerConfig::default()).await
    }

    pub async fn with_config(config: ServerConfig) -> Self {
        let clock = ManualClock::new(now());
        let server = meshwire_server::start(config.with_clock(clock.clone())).await.unwrap();
        Self {
            server,
            clock,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.registry_url())
    }

    /// The registration body with a proof made at `timestamp`.
    pub fn registration_body(id: &Identity, timestamp: &str, capabilities: &[&str]) -> Value {
        let (public_key, proof) = registration_proof(id, timestamp);
        json!({
            "public_key": public_key,
            "proof": proof,
            "proof_timestamp": timestamp,
            "capabilities": capabilities,
            "metadata": {"name": "test", "zeta": "1", "alpha": "2"},
        })
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http.post(self.url(path)).json(body).send().await.unwrap()
    }

    pub async fn register(&self, id: &Identity, capabilities: &[&str]) -> reqwest::Response {
        self.post_json("/v1/agents", &Self::registration_body(id, NOW, capabilities))
            .await
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    /// Uploads a signed pre-key and `otks` one-time keys for `id`.
    pub async fn upload_prekeys(&self, id: &Identity, otks: usize) -> (reqwest::Response, PreKeys) {
        let (body, keys) = prekey_upload(id, otks);
        let response = self
            .http
            .put(self.url(&format!("/v1/agents/{}/prekeys", id.did())))
            .header("Authorization", fresh_auth(id))
            .json(&body)
            .send()
            .await
            .unwrap();
        (response, keys)
    }

    pub async fn ws(&self) -> Ws {
        let url = format!("{}/ws", self.server.relay_url());
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws
    }

    /// A relay connection that sent a valid `connect` frame for `id`.
    pub async fn connect(&self, id: &Identity) -> Ws {
        let mut ws = self.ws().await;
        send(&mut ws, &fresh_connect(id)).await;
        self.wait_connected(id).await;
        ws
    }

    /// Waits until the relay has `id` registered as connected.
    pub async fn wait_connected(&self, id: &Identity) {
        for _ in 0..500 {
            if self.server.server().connected_dids().contains(&id.did().to_string()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{} never connected", id.did());
    }

    /// Waits until nobody is connected as `id`.
    pub async fn wait_disconnected(&self, id: &Identity) {
        for _ in 0..500 {
            if !self.server.server().connected_dids().contains(&id.did().to_string()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{} never disconnected", id.did());
    }
}

pub fn identity(n: u8) -> Identity {
    Identity::from_seed(&[n; 32])
}

/// A `PUT /v1/agents/{did}/prekeys` body as the client sends it (a signed
/// pre-key and `otks` one-time keys), and the keys.
pub fn prekey_upload(id: &Identity, otks: usize) -> (Value, PreKeys) {
    let mut keys = PreKeys::generate(&mut rand_core::OsRng, id);
    let ids = keys.generate_one_time_keys(&mut rand_core::OsRng, otks).unwrap();
    let body = serde_json::from_str(&prekeys_body(id, &keys, &ids)).unwrap();
    (body, keys)
}

pub async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.to_owned())).await.unwrap();
}

/// The next message (pings and pongs skipped), within 5 s.
pub async fn next_message(ws: &mut Ws) -> Option<Message> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("timed out waiting for a frame");
        match message {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(message)) => return Some(message),
            Some(Err(_)) | None => return None,
        }
    }
}

/// The next text frame.
pub async fn recv_text(ws: &mut Ws) -> String {
    match next_message(ws).await {
        Some(Message::Text(text)) => text,
        other => panic!("expected a text frame, got {other:?}"),
    }
}

pub async fn recv_json(ws: &mut Ws) -> Value {
    serde_json::from_str(&recv_text(ws).await).unwrap()
}

/// The close frame's code and reason.
pub async fn recv_close(ws: &mut Ws) -> (u16, String) {
    match next_message(ws).await {
        Some(Message::Close(Some(frame))) => (u16::from(frame.code), frame.reason.to_string()),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// Asserts an error frame with `detail`.
pub async fn expect_error(ws: &mut Ws, detail: &str) {
    let frame = recv_json(ws).await;
    assert_eq!(frame, json!({"type": "error", "detail": detail}));
}

/// An `ack` frame for message `id`.
pub fn ack(id: &str) -> String {
    format!(r#"{{"type":"ack","id":"{id}"}}"#)
}

/// Returns once the relay has handled every frame sent on `ws` before
/// this call: it handles a connection's frames in order and answers the
/// ping sent after them. Returns the other frames (not pings or pongs)
/// that arrived meanwhile.
pub async fn handled(ws: &mut Ws) -> Vec<Message> {
    ws.send(Message::Ping(b"handled".to_vec())).await.unwrap();
    let mut others = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap() {
            Some(Ok(Message::Pong(p))) if p == b"handled" => return others,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(other)) => others.push(other),
            other => panic!("waiting for the relay to handle the frames sent: {other:?}"),
        }
    }
}

/// A `message` frame as a client would write it.
pub fn message(from: &Identity, to: &Identity, id: &str) -> String {
    format!(
        r#"{{"v":1,"type":"message","from":"{}","to":"{}","id":"{id}","ciphertext":"AAEC","timestamp":"{NOW}"}}"#,
        from.did(),
        to.did()
    )
}
