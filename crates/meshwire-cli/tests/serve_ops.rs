#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `meshwire serve` in production (issue 10, sections 3 and 5), with real
//! processes on 127.0.0.1, bounded in time:
//!
//! - SIGTERM: a connected client sees close 1001, the process exits 0
//!   within a bound, and mail queued before is there after a restart on
//!   the same `--data-dir`;
//! - settings by flag, environment and `--config` file, in that precedence;
//!   an unknown file key is an error naming it;
//! - `--log-format json` writes one JSON object a line on stderr;
//! - `--tls-cert/--tls-key`: wss:// and https:// with a self-signed
//!   certificate made here, trusted through a custom root store;
//! - a reader that never reads is disconnected while messages flood to it,
//!   and the server's resident memory stays bounded.

use futures_util::{SinkExt, StreamExt};
use meshwire_proto::frames::{self, ConnectFrame};
use meshwire_proto::time::Timestamp;
use meshwire_proto::Identity;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const BIN: &str = env!("CARGO_BIN_EXE_meshwire");
const WAIT: Duration = Duration::from_secs(20);

/// A `meshwire serve` process, killed when dropped.
struct Serve {
    child: Child,
    port: u16,
    relay_url: String,
    stderr: std::sync::mpsc::Receiver<String>,
}

fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.arg("serve").args(args).env("RUST_LOG", "info");
    for (key, _) in std::env::vars() {
        if key.starts_with("MESHWIRE_") {
            command.env_remove(key);
        }
    }
    command
}

fn lines(stream: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
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

impl Serve {
    fn start(args: &[&str]) -> Self {
        Self::start_with(command(args))
    }

    fn start_with(mut command: Command) -> Self {
        let mut child = command
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        let line = stdout.recv_timeout(WAIT).expect("meshwire serve printed its relay URL");
        // "meshwire relay    ws://127.0.0.1:PORT/ws"
        let relay_url = line.split_whitespace().last().unwrap().to_owned();
        let port = relay_url
            .rsplit(':')
            .next()
            .and_then(|tail| tail.trim_end_matches("/ws").parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        Self {
            child,
            port,
            relay_url,
            stderr,
        }
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

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit status within `bound`.
    fn terminate(&mut self, bound: Duration) -> std::process::ExitStatus {
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

    /// Resident memory (kB) of the process.
    fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Ws = WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

fn identity(n: u8) -> Identity {
    Identity::from_seed(&[n; 32])
}

fn fresh_ts() -> String {
    static OFFSET: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    Timestamp(now + OFFSET.fetch_add(1, Ordering::Relaxed)).to_iso()
}

fn connect_frame(id: &Identity) -> String {
    frames::to_text(&ConnectFrame::new(id, &fresh_ts()))
}

fn message(from: &Identity, to: &Identity, id: &str, body: &str) -> String {
    format!(
        r#"{{"v":1,"type":"message","from":"{}","to":"{}","id":"{id}","ciphertext":"{body}","timestamp":"{}"}}"#,
        from.did(),
        to.did(),
        fresh_ts()
    )
}

async fn next<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
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

async fn recv_text<S>(ws: &mut WebSocketStream<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match next(ws).await {
        Message::Text(text) => text,
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Connects `id` and proves the connection live with a message to itself.
async fn connect<S>(ws: &mut WebSocketStream<S>, id: &Identity)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::Text(connect_frame(id))).await.unwrap();
    let probe = message(id, id, &format!("probe-{}", fresh_ts()), "AA");
    ws.send(Message::Text(probe.clone())).await.unwrap();
    assert_eq!(recv_text(ws).await, probe);
}

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

#[tokio::test]
async fn sigterm_closes_with_1001_exits_0_and_keeps_the_mail() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--data-dir", data.to_str().unwrap()];
    let (alice, bob) = (identity(1), identity(2));
    let mut first = Serve::start(&args);
    let mut a = first.ws().await;
    connect(&mut a, &alice).await;
    let queued = message(&alice, &bob, "queued-before-sigterm", "AAEC");
    a.send(Message::Text(queued.clone())).await.unwrap();
    let flush = message(&alice, &alice, "flush", "AA");
    a.send(Message::Text(flush.clone())).await.unwrap();
    assert_eq!(recv_text(&mut a).await, flush);

    let started = Instant::now();
    let status = first.terminate(Duration::from_secs(10));
    match next(&mut a).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001, "{frame:?}"),
        other => panic!("expected close 1001, got {other:?}"),
    }
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    println!("SIGTERM to exit: {:?}", started.elapsed());
    let logs: Vec<String> = first.stderr.try_iter().collect();
    assert!(logs.iter().any(|l| l.contains("stopping")), "{logs:?}");

    let second = Serve::start(&args);
    let mut b = second.ws().await;
    b.send(Message::Text(connect_frame(&bob))).await.unwrap();
    assert_eq!(
        recv_text(&mut b).await,
        queued,
        "the queued message survived the restart"
    );
}

fn print_config(command: &mut Command) -> Result<Value, String> {
    let output = command.arg("--print-config").output().unwrap();
    if output.status.success() {
        Ok(serde_json::from_slice(&output.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn settings_come_from_flags_then_environment_then_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("meshwire.toml");
    std::fs::write(
        &file,
        "memory = true\nmax-connections = 1\nagent-expiry-days = 7\nlog-format = \"json\"\n",
    )
    .unwrap();
    let file_arg = file.to_str().unwrap();
    let from_file = print_config(&mut command(&["--config", file_arg])).unwrap();
    assert_eq!(from_file["max-connections"], 1);
    assert_eq!(from_file["agent-expiry-days"], 7);
    assert_eq!(from_file["log-format"], "json");
    assert!(from_file["storage"].as_str().unwrap().starts_with("memory"));
    let from_env = print_config(command(&["--config", file_arg]).env("MESHWIRE_MAX_CONNECTIONS", "2")).unwrap();
    assert_eq!(from_env["max-connections"], 2);
    assert_eq!(from_env["agent-expiry-days"], 7, "the file still sets the rest");
    let from_flag =
        print_config(command(&["--config", file_arg, "--max-connections", "3"]).env("MESHWIRE_MAX_CONNECTIONS", "2"))
            .unwrap();
    assert_eq!(from_flag["max-connections"], 3);
    // The configuration file itself can come from the environment.
    let via_env = print_config(command(&[]).env("MESHWIRE_CONFIG", file_arg)).unwrap();
    assert_eq!(via_env["max-connections"], 1);
    let defaults = print_config(&mut command(&["--memory"])).unwrap();
    assert_eq!(defaults["max-connections"], 10_000);
    assert_eq!(defaults["agent-expiry-days"], 30);
    assert_eq!(defaults["listen"], "127.0.0.1:8765");

    std::fs::write(&file, "memory = true\nmax-conections = 5\n").unwrap();
    let error = print_config(&mut command(&["--config", file_arg])).unwrap_err();
    assert!(error.contains("max-conections"), "{error}");
    let secret = print_config(command(&["--memory"]).env("MESHWIRE_RELAY_TOKEN", "hunter2")).unwrap();
    assert_eq!(secret["relay-token"], "<set>");
    assert!(!secret.to_string().contains("hunter2"));
}

#[tokio::test]
async fn json_logs_on_stderr() {
    let serve = Serve::start(&["--memory", "--log-format", "json"]);
    let line = serve.stderr.recv_timeout(WAIT).expect("a log line");
    let record: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert!(record["level"].is_string(), "{record}");
    assert!(record["message"].is_string(), "{record}");
}

/// A self-signed certificate for localhost and 127.0.0.1, written as PEM
/// files; the certificate's DER for the client's root store.
fn self_signed(dir: &Path) -> (String, String, Vec<u8>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
        certified.cert.der().to_vec(),
    )
}

#[tokio::test]
async fn tls_serves_wss_and_https() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = self_signed(dir.path());
    let serve = Serve::start(&["--memory", "--tls-cert", &cert, "--tls-key", &key]);
    assert!(serve.relay_url.starts_with("wss://127.0.0.1:"), "{}", serve.relay_url);

    // wss:// through a client that trusts only this certificate.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(der.clone().into()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let client = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(("127.0.0.1", serve.port)).await.unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let url = format!("wss://localhost:{}/ws", serve.port);
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    connect(&mut ws, &identity(1)).await;

    // https:// for the registry, same root.
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_der(&der).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], serve.port).into())
        .build()
        .unwrap();
    let response = http
        .get(format!("https://localhost:{}/health", serve.port))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let health: Value = response.json().await.unwrap();
    assert_eq!(health["connected_agents"], 1);
    let response = http
        .get(format!("https://localhost:{}/v1/agents/did:mesh:nobody", serve.port))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(serve.http("/health"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    // And a client that does not trust the certificate cannot connect.
    let untrusting = reqwest::Client::new()
        .get(format!("https://127.0.0.1:{}/health", serve.port))
        .send()
        .await;
    assert!(untrusting.is_err());
}

#[tokio::test]
async fn a_reader_that_never_reads_is_disconnected_and_memory_stays_bounded() {
    const FRAME: usize = 32 * 1024;
    const MAX_FRAMES: usize = 1_500; // 48 MiB at most
    const BOUND_KB: u64 = 32 * 1024; // growth allowed: 32 MiB
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let serve = Serve::start(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--outbound-queue-bytes",
        "1048576",
    ]);
    let http = reqwest::Client::new();
    let (alice, bob) = (identity(1), identity(2));
    let mut a = serve.ws().await;
    connect(&mut a, &alice).await;
    let mut b = serve.ws().await;
    connect(&mut b, &bob).await;
    // From here on bob reads nothing.
    let before = serve.rss_kb();
    let body = "A".repeat(FRAME);
    let mut sent = 0;
    let mut peak = before;
    let deadline = Instant::now() + Duration::from_secs(60);
    let disconnected = loop {
        assert!(Instant::now() < deadline, "flood not done in 60 s");
        if sent >= MAX_FRAMES {
            break false;
        }
        a.send(Message::Text(message(&alice, &bob, &format!("f{sent}"), &body)))
            .await
            .unwrap();
        sent += 1;
        if sent % 100 == 0 {
            peak = peak.max(serve.rss_kb());
            let metrics = http
                .get(serve.http("/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if sample(&metrics, "meshwire_connections") == Some(1.0) {
                break true;
            }
        }
    };
    assert!(
        disconnected,
        "the reader was not disconnected after {sent} frames of {FRAME} bytes"
    );
    // Keep flooding the (now offline) reader: stored on disk, not in memory.
    for i in 0..300 {
        a.send(Message::Text(message(&alice, &bob, &format!("g{i}"), &body)))
            .await
            .unwrap();
    }
    let probe = message(&alice, &alice, "probe-end", "AA");
    a.send(Message::Text(probe.clone())).await.unwrap();
    assert_eq!(recv_text(&mut a).await, probe);
    peak = peak.max(serve.rss_kb());
    let metrics = http
        .get(serve.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        sample(&metrics, "meshwire_limit_refusals_total{limit=\"outbound_buffer\"}").is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    println!(
        "slow reader: disconnected after {sent} frames of {FRAME} B (+300 more stored); RSS {before} kB -> peak {peak} kB"
    );
    assert!(
        peak.saturating_sub(before) < BOUND_KB,
        "RSS grew from {before} kB to {peak} kB while {} MiB flooded",
        (sent + 300) * FRAME / (1024 * 1024)
    );
    // The reader, reconnecting, finds its mail.
    drop(b);
    let mut b = serve.ws().await;
    b.send(Message::Text(connect_frame(&bob))).await.unwrap();
    let first: Value = serde_json::from_str(&recv_text(&mut b).await).unwrap();
    assert_eq!(first["type"], "message");
}
