//! `meshwire interop-peer`: the Rust peer of the interop harness, driven
//! over stdin/stdout with the line protocol of interop/PROTOCOL.md.

use meshwire::persist::{open_state_dir, SqliteOptions};
use meshwire::{ClientConfig, Identity, MemoryPersistence, MeshClient, Message, Persistence};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;

struct Peer {
    client: Option<MeshClient>,
    identity_seed: Option<[u8; 32]>,
    config: Option<ClientConfig>,
    store: Arc<dyn Persistence>,
    /// Messages as they arrived, stamped on arrival by a background task.
    inbox: Arc<Mutex<Vec<Value>>>,
    arrived: Arc<Notify>,
    collector: Option<tokio::task::JoinHandle<()>>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn message_json(m: &Message) -> Value {
    let payload = m.payload.as_json().cloned().unwrap_or(Value::Null);
    json!({"from": m.from, "id": m.id, "payload": payload, "t_us": now_us()})
}

/// Back-to-back sends go out in batches of this many (one durable commit
/// each: [`MeshClient::send_batch`]).
const SEND_BATCH: u64 = 64;

/// `{"seq", "t_us", "pad"}` padded so its JSON text is `size` bytes.
fn padded(seq: u64, size: usize) -> Value {
    let mut value = json!({"seq": seq, "t_us": now_us(), "pad": ""});
    let len = value.to_string().len();
    value["pad"] = json!("x".repeat(size.saturating_sub(len)));
    value
}

fn field<'a>(request: &'a Value, name: &str) -> Result<&'a str, String> {
    request
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string field {name:?}"))
}

/// Field `name` as one URL or several (a JSON array of strings, or one
/// string of comma-separated URLs); at least one.
fn url_list(request: &Value, name: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = match request.get(name) {
        Some(Value::String(text)) => text.split(',').map(str::trim).map(str::to_owned).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(|u| u.trim().to_owned())
                    .ok_or_else(|| format!("field {name:?}: not a list of strings"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(format!("missing string field {name:?}")),
    };
    let urls: Vec<String> = urls.into_iter().filter(|u| !u.is_empty()).collect();
    if urls.is_empty() {
        return Err(format!("field {name:?}: no URL"));
    }
    Ok(urls)
}

impl Peer {
    fn client(&self) -> Result<&MeshClient, String> {
        self.client.as_ref().ok_or_else(|| "not connected".to_owned())
    }

    async fn join(&mut self) -> Result<String, String> {
        let (Some(seed), Some(config)) = (self.identity_seed, self.config.clone()) else {
            return Err("connect first".into());
        };
        let client = MeshClient::connect(Identity::from_seed(&seed), config, Some(self.store.clone()), None)
            .await
            .map_err(|e| e.to_string())?;
        let did = client.did().to_owned();
        let (collector, inbox, arrived) = (client.clone(), self.inbox.clone(), self.arrived.clone());
        self.collector = Some(tokio::spawn(async move {
            // Everything waiting is taken at once, and the next call
            // acknowledges it in one commit. Stamped on arrival.
            loop {
                let batch = collector.recv_batch(usize::MAX).await;
                if batch.is_empty() {
                    break;
                }
                if let Ok(mut inbox) = inbox.lock() {
                    inbox.extend(batch.iter().map(message_json));
                }
                arrived.notify_one();
            }
        }));
        self.client = Some(client);
        Ok(did)
    }

    async fn handle(&mut self, request: &Value) -> Result<Value, String> {
        match field(request, "cmd")? {
            "hello" => Ok(
                json!({"runtime": format!("meshwire-rust {}", env!("CARGO_PKG_VERSION")),
                                 "features": ["receipts", "persist"]}),
            ),
            "connect" => {
                let mut seed = [0u8; 32];
                hex::decode_to_slice(field(request, "seed")?, &mut seed).map_err(|e| format!("seed: {e}"))?;
                let mut config = ClientConfig::new(String::new(), String::new());
                // A list (JSON array or comma-separated): the cluster's
                // instances, home first; the client fails over along it.
                config.set_relay_urls(url_list(request, "relay")?);
                config.set_registry_urls(url_list(request, "registry")?);
                config.display_name = Some(field(request, "name")?.to_owned());
                config.reconnect_base = Duration::from_millis(200);
                config.reconnect_max = Duration::from_secs(2);
                config.retransmit_after = Duration::from_secs(3);
                if let Some(dir) = request.get("state_dir").and_then(Value::as_str) {
                    let did = Identity::from_seed(&seed).did().to_string();
                    let store = open_state_dir(std::path::Path::new(dir), &did, SqliteOptions::new())
                        .map_err(|e| format!("state_dir: {e}"))?;
                    self.store = Arc::new(store);
                }
                self.identity_seed = Some(seed);
                self.config = Some(config);
                Ok(json!({"did": self.join().await?}))
            }
            "send" => {
                let to = field(request, "to")?;
                let payload = request.get("payload").ok_or("missing payload")?;
                let id = self.client()?.send(to, payload).await.map_err(|e| e.to_string())?;
                Ok(json!({"id": id}))
            }
            "send_many" => {
                let to = field(request, "to")?.to_owned();
                let count = request.get("count").and_then(Value::as_u64).unwrap_or(1);
                let size = request.get("payload_bytes").and_then(Value::as_u64).unwrap_or(256) as usize;
                let interval = Duration::from_millis(request.get("interval_ms").and_then(Value::as_u64).unwrap_or(0));
                let client = self.client()?.clone();
                if interval.is_zero() {
                    // Back to back: in batches, one durable commit each.
                    let mut seq = 0;
                    while seq < count {
                        let end = count.min(seq + SEND_BATCH);
                        let batch: Vec<Value> = (seq..end).map(|s| padded(s, size)).collect();
                        client.send_batch(&to, &batch).await.map_err(|e| e.to_string())?;
                        seq = end;
                        // Let the connection task write this batch while
                        // the next one is encrypted and committed.
                        tokio::task::yield_now().await;
                    }
                    return Ok(json!({"sent": count}));
                }
                let mut tick = tokio::time::interval(meshwire::client::saturating_period(interval));
                for seq in 0..count {
                    tick.tick().await;
                    client.send(&to, &padded(seq, size)).await.map_err(|e| e.to_string())?;
                }
                Ok(json!({"sent": count}))
            }
            "recv" => {
                let count = request.get("count").and_then(Value::as_u64).unwrap_or(1) as usize;
                let timeout =
                    Duration::from_millis(request.get("timeout_ms").and_then(Value::as_u64).unwrap_or(10_000));
                // Saturates: a huge `timeout_ms` on stdin must not panic.
                let deadline = meshwire::client::deadline_after(timeout);
                loop {
                    let notified = self.arrived.notified();
                    let have = self.inbox.lock().map(|i| i.len()).unwrap_or(0);
                    if have >= count || tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    let _ = tokio::time::timeout_at(deadline, notified).await;
                }
                let mut inbox = self.inbox.lock().map_err(|_| "inbox poisoned")?;
                let take = inbox.len().min(count);
                let messages: Vec<Value> = inbox.drain(..take).collect();
                Ok(json!({"messages": messages}))
            }
            "drain" => {
                let messages: Vec<Value> = self.inbox.lock().map(|mut i| i.drain(..).collect()).unwrap_or_default();
                Ok(json!({"messages": messages}))
            }
            "disconnect" => {
                if let Some(client) = self.client.take() {
                    client.close().await;
                }
                if let Some(collector) = self.collector.take() {
                    let _ = collector.await;
                }
                Ok(json!({}))
            }
            "reconnect" => {
                self.join().await?;
                Ok(json!({}))
            }
            "close" => {
                if let Some(client) = self.client.take() {
                    client.close().await;
                }
                Ok(json!({}))
            }
            other => Err(format!("unknown cmd {other:?}")),
        }
    }
}

/// Runs the peer until stdin closes.
pub async fn run() -> std::io::Result<()> {
    let mut peer = Peer {
        client: None,
        identity_seed: None,
        config: None,
        store: Arc::new(MemoryPersistence::new()),
        inbox: Arc::new(Mutex::new(Vec::new())),
        arrived: Arc::new(Notify::new()),
        collector: None,
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Value>(&line) {
            Ok(request) => match peer.handle(&request).await {
                Ok(mut body) => {
                    body["ok"] = json!(true);
                    body
                }
                Err(error) => json!({"ok": false, "error": error}),
            },
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        stdout.write_all(format!("{response}\n").as_bytes()).await?;
        stdout.flush().await?;
    }
    if let Some(client) = peer.client.take() {
        client.close().await;
    }
    Ok(())
}
