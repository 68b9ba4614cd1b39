#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Joining the relay (issue 11 §2): the `/ws` URL rule, failures that name
//! their cause within 2 s, the relay token, and 4003/4005 rejections that
//! fail `connect()`. Everything on 127.0.0.1.

mod support;

use futures_util::{SinkExt, StreamExt};
use meshwire::relay_connect::ConnectFailure;
use meshwire::{ClientConfig, ClientError, Identity, MeshClient};
use meshwire_server::{RunningServer, ServerConfig};
use rand_core::OsRng;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// How fast a failure must be reported.
const PROMPT: Duration = Duration::from_secs(2);

async fn server(f: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    let mut config = ServerConfig::default();
    f(&mut config);
    meshwire_server::start(config).await.unwrap()
}

async fn try_connect(
    relay_url: &str,
    registry_url: &str,
    f: impl FnOnce(&mut ClientConfig),
) -> (Result<MeshClient, ClientError>, Duration) {
    let mut config = ClientConfig::new(relay_url, registry_url);
    config.display_name = Some("joiner".into());
    f(&mut config);
    let started = Instant::now();
    let result = MeshClient::connect(Identity::generate(&mut OsRng), config, None, None).await;
    (result, started.elapsed())
}

fn failure(result: Result<MeshClient, ClientError>) -> ConnectFailure {
    match result {
        Err(ClientError::RelayConnect(f)) => f,
        Err(other) => panic!("expected a relay connect failure, got {other}"),
        Ok(_) => panic!("connect() succeeded"),
    }
}

#[tokio::test]
async fn every_form_of_the_relay_url_joins() {
    let s = server(|_| {}).await;
    let base = s.relay_url(); // ws://127.0.0.1:PORT
    let http = base.replacen("ws://", "http://", 1);
    for url in [
        base.clone(),
        format!("{base}/"),
        format!("{base}/ws"),
        http.clone(),
        format!("{http}/ws"),
    ] {
        let (result, _) = try_connect(&url, &s.registry_url(), |_| {}).await;
        let client = result.unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(client.is_connected(), "{url}");
        client.close().await;
    }
}

#[tokio::test]
async fn refused_is_named_at_once() {
    let s = server(|_| {}).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (result, took) = try_connect(&format!("ws://127.0.0.1:{port}"), &s.registry_url(), |_| {}).await;
    let f = failure(result);
    assert!(matches!(f, ConnectFailure::Refused { .. }), "{f:?}");
    let text = f.to_string();
    assert!(
        text.contains("connection refused") && text.contains(&format!("127.0.0.1:{port}")),
        "{text}"
    );
    assert!(took < PROMPT, "took {took:?}");
}

#[tokio::test]
async fn a_wrong_path_names_the_http_status() {
    let s = server(|_| {}).await;
    let wrong = format!("{}/not-the-relay", s.relay_url());
    let (result, took) = try_connect(&wrong, &s.registry_url(), |_| {}).await;
    let f = failure(result);
    let text = f.to_string();
    assert!(matches!(f, ConnectFailure::HttpStatus { .. }), "{f:?}");
    assert!(text.contains("HTTP 404"), "{text}");
    assert!(text.contains("/not-the-relay"), "{text}");
    assert!(took < PROMPT, "took {took:?}");
}

#[tokio::test]
async fn an_unresolvable_host_is_a_dns_failure() {
    let s = server(|_| {}).await;
    // `.invalid` never resolves (RFC 6761).
    let (result, took) = try_connect("ws://relay.meshwire-test.invalid:8765", &s.registry_url(), |_| {}).await;
    let f = failure(result);
    assert!(matches!(f, ConnectFailure::Dns { .. }), "{f:?}");
    assert!(f.to_string().contains("does not resolve"), "{f}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// `wss://` to a port that speaks plain HTTP: a TLS failure, named.
#[tokio::test]
async fn tls_failures_are_named() {
    let s = server(|_| {}).await;
    let wss = s.relay_url().replacen("ws://", "wss://", 1);
    let (result, took) = try_connect(&wss, &s.registry_url(), |_| {}).await;
    let f = failure(result);
    assert!(matches!(f, ConnectFailure::Tls { .. }), "{f:?}");
    assert!(f.to_string().contains("TLS failed"), "{f}");
    assert!(took < PROMPT, "took {took:?}");
}

#[tokio::test]
async fn a_bad_scheme_fails_before_anything_is_sent() {
    let (result, _) = try_connect("ftp://127.0.0.1:1", "http://127.0.0.1:1", |_| {}).await;
    let f = failure(result);
    assert!(matches!(f, ConnectFailure::Url(_)), "{f:?}");
    assert!(f.to_string().contains("scheme \"ftp\""), "{f}");
}

/// `serve --relay-token` used to lock meshwire's own clients out while
/// `connect()` reported success.
#[tokio::test]
async fn the_relay_token_is_sent_and_a_missing_one_fails_connect() {
    let s = server(|c| c.relay_token = Some("s3cret-token".into())).await;
    let (result, took) = try_connect(&s.relay_url(), &s.registry_url(), |_| {}).await;
    let f = failure(result);
    let text = f.to_string();
    assert!(matches!(f, ConnectFailure::Rejected { code: 4003, .. }), "{f:?}");
    assert!(
        text.contains("close code 4003") && text.contains("Authentication failed"),
        "{text}"
    );
    assert!(took < PROMPT, "took {took:?}");

    let (result, _) = try_connect(&s.relay_url(), &s.registry_url(), |c| {
        c.relay_token = Some(zeroize::Zeroizing::new("wrong".into()))
    })
    .await;
    assert!(matches!(failure(result), ConnectFailure::Rejected { code: 4003, .. }));

    let (result, _) = try_connect(&s.relay_url(), &s.registry_url(), |c| {
        c.relay_token = Some(zeroize::Zeroizing::new("s3cret-token".into()))
    })
    .await;
    let client = result.unwrap();
    assert!(client.is_connected());
    // The token never shows in Debug output.
    let mut config = ClientConfig::new("ws://x", "http://x");
    config.relay_token = Some(zeroize::Zeroizing::new("s3cret-token".into()));
    assert!(!format!("{config:?}").contains("s3cret"));
    client.close().await;
}

/// A relay that refuses the proof (4005) after the WebSocket answered.
#[tokio::test]
async fn a_rejected_proof_fails_connect_with_code_and_reason() {
    let s = server(|_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        let Some(Ok(WsMessage::Text(first))) = ws.next().await else {
            return;
        };
        assert!(first.contains("\"connect\""), "{first}");
        let _ = ws
            .send(WsMessage::Text(
                r#"{"type":"error","detail":"DID proof failed: stale timestamp"}"#.into(),
            ))
            .await;
        let _ = ws
            .send(WsMessage::Close(Some(CloseFrame {
                code: CloseCode::from(4005),
                reason: "".into(),
            })))
            .await;
        while let Some(Ok(_)) = ws.next().await {}
    });
    let (result, took) = try_connect(&url, &s.registry_url(), |_| {}).await;
    let f = failure(result);
    let text = f.to_string();
    assert!(matches!(f, ConnectFailure::Rejected { code: 4005, .. }), "{f:?}");
    assert!(text.contains("stale timestamp"), "{text}");
    assert!(took < PROMPT, "took {took:?}");
}
