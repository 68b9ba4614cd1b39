//! Shared by the `meshwire serve` integration tests (`serve_ops.rs`,
//! `serve_storage.rs`, `cluster.rs`, `adversarial.rs`) and `agent_cli.rs`:
//! child processes with their output read line by line, a `meshwire serve`
//! on a port of 127.0.0.1 (no inherited `MESHWIRE_*` variables, killed
//! when dropped), and a raw relay and registry client for it.
//!
//! Each test file compiles this module on its own, hence the module-level
//! `dead_code` allowance.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures_util::{SinkExt, StreamExt};
use meshwire_proto::auth::ed25519_timestamp_header;
use meshwire_proto::frames::{self, ConnectFrame};
use meshwire_proto::registry_wire::{prekeys_body, register_body};
use meshwire_proto::time::Timestamp;
use meshwire_proto::{Identity, PreKeys};
use meshwire_server::storage::nats_server::NatsServer;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const BIN: &str = env!("CARGO_BIN_EXE_meshwire");
/// How long a server may take to start, and a test to wait for a frame.
pub const WAIT: Duration = Duration::from_secs(20);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The lines of `stream`, read on a thread of their own.
pub fn lines(stream: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Spawns `command` with no standard input; its stdout and stderr lines.
pub fn spawn_piped(command: &mut Command) -> (Child, Receiver<String>, Receiver<String>) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = lines(child.stdout.take().unwrap());
    let stderr = lines(child.stderr.take().unwrap());
    (child, stdout, stderr)
}

/// `meshwire serve ARGS` logging warnings and errors, without the test
/// process's `MESHWIRE_*` variables.
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.arg("serve").args(args).env("RUST_LOG", "warn");
    for (key, _) in std::env::vars() {
        if key.starts_with("MESHWIRE_") {
            command.env_remove(key);
        }
    }
    command
}

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

/// A running `meshwire serve`, killed (SIGKILL) when dropped; its stderr
/// lines are printed if the test is failing then.
pub struct Serve {
    child: Child,
    pub port: u16,
    relay_url: String,
    /// Behind a lock so that a `Serve` can be shared between tasks.
    stderr: Mutex<Receiver<String>>,
}

impl Serve {
    /// `meshwire serve ARGS` on a free port of 127.0.0.1.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(&mut command(args))
    }

    /// `meshwire serve ARGS` on 127.0.0.1:`port` (0: a free one).
    pub fn start_on(port: u16, args: &[&str]) -> Self {
        Self::spawn(command(args).args(["--listen", &format!("127.0.0.1:{port}")]))
    }

    /// `command` (from [`command`], adjusted) on a free port of 127.0.0.1.
    pub fn start_with(command: &mut Command) -> Self {
        Self::spawn(command.args(["--listen", "127.0.0.1:0"]))
    }

    /// Spawns `command` and waits for the relay URL it prints first.
    fn spawn(command: &mut Command) -> Self {
        let (child, stdout, stderr) = spawn_piped(command);
        let line = stdout.recv_timeout(WAIT).unwrap_or_else(|e| {
            let errors: Vec<String> = stderr.try_iter().collect();
            panic!("meshwire serve printed no relay URL ({e}); stderr: {errors:?}")
        });
        // "meshwire relay    ws://127.0.0.1:PORT/ws" (wss:// with TLS)
        let relay_url = line.split_whitespace().last().unwrap_or_default().to_owned();
        let port = relay_url
            .rsplit(':')
            .next()
            .and_then(|tail| tail.trim_end_matches("/ws").parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        Self {
            child,
            port,
            relay_url,
            stderr: Mutex::new(stderr),
        }
    }

    /// The next line it writes to stderr, within `timeout`.
    pub fn next_stderr(&self, timeout: Duration) -> Option<String> {
        self.stderr
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .recv_timeout(timeout)
            .ok()
    }

    /// The stderr lines written and not read yet.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .try_iter()
            .collect()
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The relay URL it printed (as a client is given it).
    pub fn relay_url(&self) -> String {
        self.relay_url.clone()
    }

    /// The registry base URL.
    pub fn registry_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A new (plain) WebSocket to the relay.
    pub async fn ws(&self) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", self.port))
            .await
            .unwrap();
        ws
    }

    /// `GET /metrics`: the exposition text.
    pub async fn metrics(&self, http: &reqwest::Client) -> String {
        let response = http.get(self.http("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET /metrics");
        response.text().await.unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory (kB) of the process.
    pub fn rss_kb(&self) -> u64 {
        rss_kb(self.pid()).expect("the server's VmRSS")
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status within `bound`.
    pub fn terminate(&mut self, bound: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "still running {bound:?} after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            for line in self.stderr_lines() {
                eprintln!("meshwire serve :{}: {line}", self.port);
            }
        }
    }
}

/// VmRSS (kB) of process `pid`; `None` once it is gone.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The value of the sample `key` (`name{labels}`) in a Prometheus
/// exposition.
pub fn sample(text: &str, key: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(key)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

pub fn identity(n: u8) -> Identity {
    Identity::from_seed(&[n; 32])
}

/// A timestamp near the real clock that no other call returned (each
/// proof of possession is accepted once): the clock, or one millisecond
/// past the last one handed out.
pub fn fresh_ts() -> String {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_ms();
    let previous = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(now.max(last + 1)))
        .unwrap_or_default();
    Timestamp(now.max(previous + 1)).to_iso()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

pub fn connect_frame(id: &Identity) -> String {
    frames::to_text(&ConnectFrame::new(id, &fresh_ts()))
}

/// A `message` frame from `from` to the DID `to` with ciphertext `body`,
/// stamped with the clock (message timestamps need not be unique).
pub fn message_to(from: &Identity, to: &str, id: &str, body: &str) -> String {
    format!(
        r#"{{"v":1,"type":"message","from":"{}","to":"{to}","id":"{id}","ciphertext":"{body}","timestamp":"{}"}}"#,
        from.did(),
        Timestamp(now_ms()).to_iso()
    )
}

/// A small `message` frame from `from` to `to`.
pub fn message(from: &Identity, to: &Identity, id: &str) -> String {
    message_to(from, to.did().as_str(), id, "AAEC")
}

pub async fn send<S>(ws: &mut WebSocketStream<S>, text: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::Text(text.to_owned())).await.unwrap();
}

/// The next message (pings and pongs skipped), within [`WAIT`].
pub async fn next<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
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

pub async fn recv_text<S>(ws: &mut WebSocketStream<S>) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match next(ws).await {
        Message::Text(text) => text,
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Proves the connection authenticated as `id` is live: a message to
/// itself comes back, first.
async fn probe_self<S>(ws: &mut WebSocketStream<S>, id: &Identity)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let probe = message(id, id, &format!("probe-{}", fresh_ts()));
    send(ws, &probe).await;
    assert_eq!(recv_text(ws).await, probe);
}

/// Authenticates `ws` as `id` with a fresh `connect` frame, and proves the
/// connection live.
pub async fn connect<S>(ws: &mut WebSocketStream<S>, id: &Identity)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send(ws, &connect_frame(id)).await;
    probe_self(ws, id).await;
}

/// Connects to `serve` as `id` with the `connect` frame `text`, and proves
/// the connection live.
pub async fn connect_with(serve: &Serve, id: &Identity, text: &str) -> Ws {
    let mut ws = serve.ws().await;
    send(&mut ws, text).await;
    probe_self(&mut ws, id).await;
    ws
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

/// A `POST /v1/agents` body for `id` with capability `storage-test`.
pub fn registration(id: &Identity) -> String {
    let metadata = BTreeMap::from([("name", "test-agent")]);
    register_body(id, &fresh_ts(), &["storage-test".to_owned()], &metadata)
}

/// Registers `id` (201 expected) with `http` (whose local address is the
/// requester's IP).
pub async fn register(http: &reqwest::Client, serve: &Serve, id: &Identity) {
    let response = http
        .post(serve.http("/v1/agents"))
        .header("Content-Type", "application/json")
        .body(registration(id))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
}

/// Uploads a signed pre-key and `otks` one-time keys; their ids.
pub async fn upload_prekeys(http: &reqwest::Client, serve: &Serve, id: &Identity, otks: usize) -> Vec<u64> {
    let mut keys = PreKeys::generate(&mut rand_core::OsRng, id);
    let ids = keys.generate_one_time_keys(&mut rand_core::OsRng, otks).unwrap();
    let response = http
        .put(serve.http(&format!("/v1/agents/{}/prekeys", id.did())))
        .header("Authorization", ed25519_timestamp_header(id, &fresh_ts()))
        .header("Content-Type", "application/json")
        .body(prekeys_body(id, &keys, &ids))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    ids.iter().map(|i| u64::from(*i)).collect()
}

/// `GET path` of `serve`: the JSON answer (200 expected).
async fn get_json(http: &reqwest::Client, serve: &Serve, path: &str) -> Value {
    let response = http.get(serve.http(path)).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

/// One bundle fetch: the one-time key id served, if any.
pub async fn fetch_bundle(http: &reqwest::Client, serve: &Serve, id: &Identity) -> Option<u64> {
    let bundle = get_json(http, serve, &format!("/v1/agents/{}/prekeys", id.did())).await;
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

/// `GET /v1/agents/{did}`: the agent's record (200 expected).
pub async fn agent_record(http: &reqwest::Client, serve: &Serve, id: &Identity) -> Value {
    get_json(http, serve, &format!("/v1/agents/{}", id.did())).await
}
