//! `meshwire serve` processes on 127.0.0.1 and a raw relay and registry
//! client for them, shared by `tests/serve_storage.rs` and
//! `tests/cluster.rs`.
#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use meshwire_proto::auth::{ed25519_timestamp_header, registration_proof};
use meshwire_proto::encoding::b64_url;
use meshwire_proto::frames::{self, ConnectFrame};
use meshwire_proto::time::Timestamp;
use meshwire_proto::{Identity, PreKeys};
use meshwire_server::storage::nats_server::NatsServer;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const BIN: &str = env!("CARGO_BIN_EXE_meshwire");
pub const WAIT: Duration = Duration::from_secs(20);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A nats-server with JetStream in `dir`, or `None` after printing
/// `SKIPPED <test>: ...` when no nats-server binary exists (a server that
/// exists but does not start fails the test).
pub fn start_nats(dir: &Path, test: &str) -> Option<NatsServer> {
    match NatsServer::start(&dir.join("jetstream")) {
        Ok(nats) => Some(nats),
        Err(reason) if meshwire_server::storage::nats_server::find_binary().is_err() => {
            println!("SKIPPED {test}: no nats-server ({reason})");
            None
        }
        Err(reason) => panic!("nats-server is installed but did not start: {reason}"),
    }
}

/// A `meshwire serve` process, killed (SIGKILL) when dropped.
pub struct Serve {
    child: Child,
    pub port: u16,
}

impl Serve {
    /// `meshwire serve` on a free port of 127.0.0.1 with `storage` arguments.
    pub fn start(storage: &[&str]) -> Self {
        Self::start_on(0, storage)
    }

    /// `meshwire serve` on 127.0.0.1:`port` (0: a free one), once it
    /// printed its relay URL.
    pub fn start_on(port: u16, storage: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(storage)
            .env("RUST_LOG", "warn")
            .env_remove("MESHWIRE_NATS_URL")
            .env_remove("MESHWIRE_RELAY_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx.recv_timeout(WAIT).expect("meshwire serve printed its relay URL");
        // "meshwire relay    ws://127.0.0.1:PORT/ws"
        let port = line
            .rsplit(':')
            .next()
            .and_then(|tail| tail.trim_end_matches("/ws").parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        Self { child, port }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The relay URL (as a client is given it).
    pub fn relay_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// The registry base URL.
    pub fn registry_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn ws(&self) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(self.relay_url()).await.unwrap();
        ws
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn identity(n: u8) -> Identity {
    Identity::from_seed(&[n; 32])
}

/// A timestamp near the real clock that no other call returned (each
/// proof of possession is accepted once).
pub fn fresh_ts() -> String {
    static OFFSET: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    Timestamp(now + OFFSET.fetch_add(1, Ordering::Relaxed)).to_iso()
}

pub async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.to_owned())).await.unwrap();
}

/// The next message (pings and pongs skipped), within [`WAIT`].
pub async fn next(ws: &mut Ws) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame");
        match message {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(message)) => return message,
            other => panic!("connection ended: {other:?}"),
        }
    }
}

pub async fn recv_text(ws: &mut Ws) -> String {
    match next(ws).await {
        Message::Text(text) => text,
        other => panic!("expected a text frame, got {other:?}"),
    }
}

pub fn message(from: &Identity, to: &Identity, id: &str) -> String {
    format!(
        r#"{{"v":1,"type":"message","from":"{}","to":"{}","id":"{id}","ciphertext":"AAEC","timestamp":"{}"}}"#,
        from.did(),
        to.did(),
        fresh_ts()
    )
}

/// Connects as `id` with the `connect` frame `text`; proves the connection
/// is live with a message to itself.
pub async fn connect_with(serve: &Serve, id: &Identity, text: &str) -> Ws {
    let mut ws = serve.ws().await;
    send(&mut ws, text).await;
    let probe = message(id, id, &format!("probe-{}", fresh_ts()));
    send(&mut ws, &probe).await;
    assert_eq!(recv_text(&mut ws).await, probe);
    ws
}

pub fn connect_frame(id: &Identity) -> String {
    frames::to_text(&ConnectFrame::new(id, &fresh_ts()))
}

/// Sends `text` on a new connection and expects close 4005 with the
/// replay detail.
pub async fn expect_replay_refused(serve: &Serve, text: &str) {
    let mut ws = serve.ws().await;
    send(&mut ws, text).await;
    let error: Value = serde_json::from_str(&recv_text(&mut ws).await).unwrap();
    assert_eq!(
        error,
        json!({"type": "error", "detail": "DID proof failed: proof already used (replayed connect frame)"})
    );
    match next(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4005),
        other => panic!("expected close 4005, got {other:?}"),
    }
}

/// A connect proof used on the first instance is refused on every one
/// (the first included).
pub async fn replay_refused_on_all(instances: &[&Serve], id: &Identity) {
    let proof = connect_frame(id);
    let ws = connect_with(instances[0], id, &proof).await;
    for serve in instances {
        expect_replay_refused(serve, &proof).await;
    }
    drop(ws);
}

pub async fn register(http: &reqwest::Client, serve: &Serve, id: &Identity) {
    let ts = fresh_ts();
    let (public_key, proof) = registration_proof(id, &ts);
    let body = json!({
        "public_key": public_key, "proof": proof, "proof_timestamp": ts,
        "capabilities": ["storage-test"], "metadata": {"name": "bob"},
    });
    let response = http.post(serve.http("/v1/agents")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
}

/// Uploads a signed pre-key and `otks` one-time keys; their ids.
pub async fn upload_prekeys(http: &reqwest::Client, serve: &Serve, id: &Identity, otks: usize) -> Vec<u64> {
    let mut keys = PreKeys::generate(&mut rand_core::OsRng, id);
    let ids = keys.generate_one_time_keys(&mut rand_core::OsRng, otks).unwrap();
    let bundle = keys.bundle(id, None);
    let one_time: Vec<Value> = ids
        .iter()
        .map(|otk| {
            let public = keys.one_time_key(*otk).unwrap().public();
            json!({"key_id": otk, "public_key": b64_url(public.as_bytes())})
        })
        .collect();
    let body = json!({
        "identity_key": b64_url(bundle.identity_key.as_bytes()),
        "identity_key_ed": b64_url(bundle.identity_key_ed.as_bytes()),
        "signed_pre_key": {
            "key_id": bundle.signed_pre_key_id,
            "public_key": b64_url(bundle.signed_pre_key.as_bytes()),
            "signature": b64_url(&bundle.signed_pre_key_signature),
        },
        "one_time_pre_keys": one_time,
    });
    let response = http
        .put(serve.http(&format!("/v1/agents/{}/prekeys", id.did())))
        .header("Authorization", ed25519_timestamp_header(id, &fresh_ts()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    ids.iter().map(|i| u64::from(*i)).collect()
}

/// One bundle fetch: the one-time key id served, if any.
pub async fn fetch_bundle(http: &reqwest::Client, serve: &Serve, id: &Identity) -> Option<u64> {
    let response = http
        .get(serve.http(&format!("/v1/agents/{}/prekeys", id.did())))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let bundle: Value = response.json().await.unwrap();
    bundle["one_time_pre_key"]["key_id"].as_u64()
}

/// Registers `id` through the first instance, uploads `keys` one-time
/// keys through the last, then fetches its bundle `keys + 8` times at
/// once, spread over every instance: each key is served exactly once.
/// Returns how many keys were served.
pub async fn one_time_keys_served_once(
    http: &reqwest::Client,
    instances: &[Arc<Serve>],
    id: &Identity,
    keys: usize,
) -> usize {
    register(http, &instances[0], id).await;
    let last = instances.len() - 1;
    let uploaded: HashSet<u64> = upload_prekeys(http, &instances[last], id, keys)
        .await
        .into_iter()
        .collect();
    let mut tasks = Vec::new();
    for i in 0..(keys + 8) {
        let serve = instances[i % instances.len()].clone();
        let http = http.clone();
        let id = Identity::from_seed(&id.seed());
        tasks.push(tokio::spawn(async move { fetch_bundle(&http, &serve, &id).await }));
    }
    let mut served = Vec::new();
    for task in tasks {
        if let Some(key) = task.await.unwrap() {
            served.push(key);
        }
    }
    let distinct: HashSet<u64> = served.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        served.len(),
        "a one-time key was served twice: {served:?}"
    );
    assert_eq!(distinct, uploaded, "every key served once");
    served.len()
}

pub async fn agent(http: &reqwest::Client, serve: &Serve, id: &Identity) -> Value {
    let response = http
        .get(serve.http(&format!("/v1/agents/{}", id.did())))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}
