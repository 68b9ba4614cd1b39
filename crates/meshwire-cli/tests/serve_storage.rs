#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `meshwire serve` on durable and shared storage (issue 10 section 1),
//! with real processes on 127.0.0.1, bounded in time:
//!
//! - `--data-dir`: killed with SIGKILL after a message was queued for an
//!   offline agent and an agent registered with pre-keys; after a restart
//!   the message is delivered, the registration and the remaining one-time
//!   keys are intact, and a connect proof used before the kill is refused.
//! - `--nats`: two instances on one nats-server (started here; the test is
//!   skipped, saying why, only when no nats-server binary exists): a
//!   message queued through one is fetched through the other, concurrent
//!   bundle fetches through both never hand out a one-time key twice, and
//!   a connect proof used on one is refused on the other.

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
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const BIN: &str = env!("CARGO_BIN_EXE_meshwire");
const WAIT: Duration = Duration::from_secs(20);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A `meshwire serve` process, killed (SIGKILL) when dropped.
struct Serve {
    child: Child,
    port: u16,
}

impl Serve {
    fn start(storage: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
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
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn ws(&self) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", self.port))
            .await
            .unwrap();
        ws
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn identity(n: u8) -> Identity {
    Identity::from_seed(&[n; 32])
}

/// A timestamp near the real clock that no other call returned (each
/// proof of possession is accepted once).
fn fresh_ts() -> String {
    static OFFSET: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    Timestamp(now + OFFSET.fetch_add(1, Ordering::Relaxed)).to_iso()
}

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.to_owned())).await.unwrap();
}

/// The next message (pings and pongs skipped), within [`WAIT`].
async fn next(ws: &mut Ws) -> Message {
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

async fn recv_text(ws: &mut Ws) -> String {
    match next(ws).await {
        Message::Text(text) => text,
        other => panic!("expected a text frame, got {other:?}"),
    }
}

fn message(from: &Identity, to: &Identity, id: &str) -> String {
    format!(
        r#"{{"v":1,"type":"message","from":"{}","to":"{}","id":"{id}","ciphertext":"AAEC","timestamp":"{}"}}"#,
        from.did(),
        to.did(),
        fresh_ts()
    )
}

/// Connects as `id` with the `connect` frame `text`; proves the connection
/// is live with a message to itself.
async fn connect_with(serve: &Serve, id: &Identity, text: &str) -> Ws {
    let mut ws = serve.ws().await;
    send(&mut ws, text).await;
    let probe = message(id, id, &format!("probe-{}", fresh_ts()));
    send(&mut ws, &probe).await;
    assert_eq!(recv_text(&mut ws).await, probe);
    ws
}

fn connect_frame(id: &Identity) -> String {
    frames::to_text(&ConnectFrame::new(id, &fresh_ts()))
}

/// Sends `text` on a new connection and expects close 4005 with the
/// replay detail.
async fn expect_replay_refused(serve: &Serve, text: &str) {
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

async fn register(http: &reqwest::Client, serve: &Serve, id: &Identity) {
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
async fn upload_prekeys(http: &reqwest::Client, serve: &Serve, id: &Identity, otks: usize) -> Vec<u64> {
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
async fn fetch_bundle(http: &reqwest::Client, serve: &Serve, id: &Identity) -> Option<u64> {
    let response = http
        .get(serve.http(&format!("/v1/agents/{}/prekeys", id.did())))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let bundle: Value = response.json().await.unwrap();
    bundle["one_time_pre_key"]["key_id"].as_u64()
}

async fn agent(http: &reqwest::Client, serve: &Serve, id: &Identity) -> Value {
    let response = http
        .get(serve.http(&format!("/v1/agents/{}", id.did())))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn sqlite_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--data-dir", data.to_str().unwrap()];
    let http = reqwest::Client::new();
    let (alice, bob) = (identity(1), identity(2));

    let first = Serve::start(&args);
    register(&http, &first, &bob).await;
    let otks = upload_prekeys(&http, &first, &bob, 5).await;
    let served = fetch_bundle(&http, &first, &bob).await.expect("a one-time key");
    assert_eq!(served, otks[0]);
    let alice_connect = connect_frame(&alice);
    let mut a = connect_with(&first, &alice, &alice_connect).await;
    let queued = message(&alice, &bob, "queued-before-kill");
    send(&mut a, &queued).await;
    // The relay handles a connection's frames in order: once this comes
    // back, the message above was committed.
    let flush = message(&alice, &alice, "flush");
    send(&mut a, &flush).await;
    assert_eq!(recv_text(&mut a).await, flush);
    first.kill();
    assert!(data.join("meshwire.sqlite3").is_file());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the data directory is private");
    }

    let second = Serve::start(&args);
    // The proof used before the kill is still remembered.
    expect_replay_refused(&second, &alice_connect).await;
    let view = agent(&http, &second, &bob).await;
    assert_eq!(view["capabilities"], json!(["storage-test"]));
    assert_eq!(view["otk_count"], 4, "{view}");
    let mut b = second.ws().await;
    send(&mut b, &connect_frame(&bob)).await;
    assert_eq!(recv_text(&mut b).await, queued, "the queued message survived the kill");
    let mut rest = Vec::new();
    for _ in 0..5 {
        rest.push(fetch_bundle(&http, &second, &bob).await);
    }
    let expected: Vec<Option<u64>> = otks[1..].iter().copied().map(Some).chain([None]).collect();
    assert_eq!(rest, expected, "the remaining one-time keys, each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_nats() {
    let dir = tempfile::tempdir().unwrap();
    let nats = match NatsServer::start(&dir.path().join("jetstream")) {
        Ok(nats) => nats,
        Err(reason) if meshwire_server::storage::nats_server::find_binary().is_err() => {
            println!("SKIPPED two_instances_share_nats: no nats-server ({reason})");
            return;
        }
        Err(reason) => panic!("nats-server is installed but did not start: {reason}"),
    };
    let url = nats.url();
    let args = ["--nats", url.as_str()];
    let one = Serve::start(&args);
    let two = Serve::start(&args);
    let http = reqwest::Client::new();
    let (alice, bob) = (identity(1), identity(2));

    // Queued through instance 1, fetched through instance 2.
    let alice_connect = connect_frame(&alice);
    let mut a = connect_with(&one, &alice, &alice_connect).await;
    let queued = message(&alice, &bob, "via-one");
    send(&mut a, &queued).await;
    let flush = message(&alice, &alice, "flush");
    send(&mut a, &flush).await;
    assert_eq!(recv_text(&mut a).await, flush);
    let mut b = two.ws().await;
    send(&mut b, &connect_frame(&bob)).await;
    assert_eq!(recv_text(&mut b).await, queued);

    // A proof used on instance 1 is refused on instance 2.
    expect_replay_refused(&two, &alice_connect).await;

    // Concurrent bundle fetches through both instances: each key once.
    register(&http, &one, &bob).await;
    const KEYS: usize = 40;
    let uploaded: HashSet<u64> = upload_prekeys(&http, &two, &bob, KEYS).await.into_iter().collect();
    let one = std::sync::Arc::new(one);
    let two = std::sync::Arc::new(two);
    let mut tasks = Vec::new();
    for i in 0..(KEYS + 8) {
        let serve = if i % 2 == 0 { one.clone() } else { two.clone() };
        let http = http.clone();
        tasks.push(tokio::spawn(
            async move { fetch_bundle(&http, &serve, &identity(2)).await },
        ));
    }
    let mut served = Vec::new();
    for task in tasks {
        if let Some(id) = task.await.unwrap() {
            served.push(id);
        }
    }
    let distinct: HashSet<u64> = served.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        served.len(),
        "a one-time key was served twice: {served:?}"
    );
    assert_eq!(distinct, uploaded, "every key served once");
    drop(nats);
}
