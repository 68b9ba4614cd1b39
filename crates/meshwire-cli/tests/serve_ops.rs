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

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{
    command, connect, connect_frame, identity, message, message_to, next, recv_text, sample, send, Serve, WAIT,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// `meshwire serve ARGS` logging at `info` (the shutdown and start-up
/// lines are asserted).
fn serve(args: &[&str]) -> Serve {
    Serve::start_with(command(args).env("RUST_LOG", "info"))
}

#[tokio::test]
async fn sigterm_closes_with_1001_exits_0_and_keeps_the_mail() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--data-dir", data.to_str().unwrap()];
    let (alice, bob) = (identity(1), identity(2));
    let mut first = serve(&args);
    let mut a = first.ws().await;
    connect(&mut a, &alice).await;
    let queued = message(&alice, &bob, "queued-before-sigterm");
    send(&mut a, &queued).await;
    let flush = message(&alice, &alice, "flush");
    send(&mut a, &flush).await;
    assert_eq!(recv_text(&mut a).await, flush);

    let started = Instant::now();
    let status = first.terminate(Duration::from_secs(10));
    match next(&mut a).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001, "{frame:?}"),
        other => panic!("expected close 1001, got {other:?}"),
    }
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    println!("SIGTERM to exit: {:?}", started.elapsed());
    let logs = first.stderr_lines();
    assert!(logs.iter().any(|l| l.contains("stopping")), "{logs:?}");

    let second = serve(&args);
    let mut b = second.ws().await;
    send(&mut b, &connect_frame(&bob)).await;
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
    let serve = serve(&["--memory", "--log-format", "json"]);
    let line = serve.next_stderr(WAIT).expect("a log line");
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
    let serve = serve(&["--memory", "--tls-cert", &cert, "--tls-key", &key]);
    assert!(
        serve.relay_url().starts_with("wss://127.0.0.1:"),
        "{}",
        serve.relay_url()
    );

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
    let serve = serve(&[
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
        send(
            &mut a,
            &message_to(&alice, bob.did().as_str(), &format!("f{sent}"), &body),
        )
        .await;
        sent += 1;
        if sent % 100 == 0 {
            peak = peak.max(serve.rss_kb());
            let metrics = serve.metrics(&http).await;
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
        send(&mut a, &message_to(&alice, bob.did().as_str(), &format!("g{i}"), &body)).await;
    }
    let probe = message(&alice, &alice, "probe-end");
    send(&mut a, &probe).await;
    assert_eq!(recv_text(&mut a).await, probe);
    peak = peak.max(serve.rss_kb());
    let metrics = serve.metrics(&http).await;
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
    send(&mut b, &connect_frame(&bob)).await;
    let first: Value = serde_json::from_str(&recv_text(&mut b).await).unwrap();
    assert_eq!(first["type"], "message");
}
