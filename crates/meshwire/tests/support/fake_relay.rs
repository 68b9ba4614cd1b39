//! A relay under the test's control (malicious or broken), for attacks
//! that a well-behaved relay would filter.

use futures_util::StreamExt;
use meshwire::proto::encoding::b64_std;
use meshwire::{ClientConfig, Identity, MeshClient};
use meshwire_server::RunningServer;
use rand_core::OsRng;
use serde_json::json;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

const WAIT: Duration = Duration::from_secs(20);

/// A relay under the test's control: every accepted WebSocket is handed
/// over (a malicious or broken relay).
pub struct FakeRelay {
    pub url: String,
    conns: mpsc::UnboundedReceiver<WebSocketStream<TcpStream>>,
}

impl FakeRelay {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let (tx, conns) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(ws) = tokio_tungstenite::accept_async(stream).await {
                        let _ = tx.send(ws);
                    }
                });
            }
        });
        Self { url, conns }
    }

    /// The next client connection, after its connect and fetch_pending.
    pub async fn accept(&mut self) -> WebSocketStream<TcpStream> {
        let mut ws = tokio::time::timeout(WAIT, self.conns.recv()).await.unwrap().unwrap();
        for _ in 0..2 {
            let first = next_text(&mut ws).await;
            assert!(
                first.contains("\"connect\"") || first.contains("\"fetch_pending\""),
                "{first}"
            );
        }
        ws
    }
}

pub async fn next_text(ws: &mut WebSocketStream<TcpStream>) -> String {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(WsMessage::Text(t))) => return t,
            Some(Ok(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    }
}

/// A client of `registry` (embedded) on the fake relay.
pub async fn client_on_fake_relay(
    relay_url: String,
    registry: &RunningServer,
    f: impl FnOnce(&mut ClientConfig),
) -> (MeshClient, Identity) {
    let identity = Identity::generate(&mut OsRng);
    let mut c = ClientConfig::new(relay_url, registry.registry_url());
    c.display_name = Some("victim".into());
    c.reconnect_base = Duration::from_millis(100);
    c.reconnect_max = Duration::from_millis(500);
    f(&mut c);
    let client = MeshClient::connect(Identity::from_seed(&identity.seed()), c, None, None);
    (client.await.unwrap(), identity)
}

pub fn plaintext_frame(from: &str, to: &str, id: &str, payload: &serde_json::Value) -> String {
    json!({
        "v": 1, "type": "message", "from": from, "to": to, "id": id,
        "ts": "2026-01-01T00:00:00.000Z",
        "ciphertext": b64_std(payload.to_string().as_bytes()), "plaintext": true,
    })
    .to_string()
}
