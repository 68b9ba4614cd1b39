//! An echo agent: joins a relay and registry under a display name, prints
//! its DID as the first line of stdout, and answers every JSON message with
//! `{"echo": <payload>}` (bytes payloads are sent back as the same bytes),
//! except echoes: a JSON object with an `echo` key gets no answer, so two
//! echo agents (one started with `--greet` toward the other) exchange one
//! greeting and one echo, not an endless bounce. Each message is logged on
//! stderr (`answered` or `not answering an echo`).
//!
//! ```text
//! cargo run -p meshwire --example echo -- --relay ws://127.0.0.1:8765 \
//!     --registry http://127.0.0.1:8765 --name echo [--identity FILE] [--greet DID]
//! ```
//!
//! Each option can also come from the environment: `MESHWIRE_RELAY`,
//! `MESHWIRE_REGISTRY`, `MESHWIRE_NAME`, `MESHWIRE_IDENTITY`,
//! `MESHWIRE_GREET`. With `--greet DID` it first sends
//! `{"greeting": "hello from rust", "from": <own DID>}` to DID (opening the
//! session itself). It stops on Ctrl-C or SIGTERM.

use meshwire::{load_or_create_identity, ClientConfig, ClientEvent, Identity, MeshClient, Payload};
use serde_json::json;
use serde_json::Value;
use std::error::Error;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Default)]
struct Options {
    relay: Option<String>,
    registry: Option<String>,
    name: Option<String>,
    identity: Option<PathBuf>,
    greet: Option<String>,
}

const USAGE: &str =
    "usage: echo --relay ws://HOST:PORT --registry http://HOST:PORT --name NAME [--identity FILE] [--greet DID]";

fn options() -> Result<Options, String> {
    let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
    let mut o = Options {
        relay: env("MESHWIRE_RELAY"),
        registry: env("MESHWIRE_REGISTRY"),
        name: env("MESHWIRE_NAME"),
        identity: env("MESHWIRE_IDENTITY").map(PathBuf::from),
        greet: env("MESHWIRE_GREET"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        if key == "-h" || key == "--help" {
            return Err(USAGE.into());
        }
        let value = match inline {
            Some(v) => v,
            None => args.next().ok_or_else(|| format!("{key} needs a value\n{USAGE}"))?,
        };
        match key.as_str() {
            "--relay" => o.relay = Some(value),
            "--registry" => o.registry = Some(value),
            "--name" => o.name = Some(value),
            "--identity" => o.identity = Some(PathBuf::from(value)),
            "--greet" => o.greet = Some(value),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    Ok(o)
}

/// An echo (a JSON object with an `echo` key) is never answered.
fn is_echo(value: &Value) -> bool {
    value.as_object().is_some_and(|o| o.contains_key("echo"))
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let o = match options() {
        Ok(o) => o,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let (Some(relay), Some(registry), Some(name)) = (o.relay, o.registry, o.name) else {
        eprintln!("--relay, --registry and --name are required\n{USAGE}");
        std::process::exit(2);
    };
    let identity = match &o.identity {
        Some(path) => load_or_create_identity(path)?,
        None => Identity::generate(&mut rand_core::OsRng),
    };
    let mut config = ClientConfig::new(relay, registry);
    config.display_name = Some(name.clone());
    config.capabilities = vec!["echo".to_owned()];
    let client = MeshClient::connect(identity, config, None, None).await?;

    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", client.did())?;
    stdout.flush()?;
    eprintln!("echo agent {name:?} is {}", client.did());

    if let Some(peer) = &o.greet {
        let id = client
            .send(peer, &json!({"greeting": "hello from rust", "from": client.did()}))
            .await?;
        eprintln!("greeted {peer} ({id})");
    }

    let events = {
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(event) = client.next_event().await {
                if let ClientEvent::Error { detail, .. } = &event {
                    eprintln!("event: error: {detail}");
                }
            }
        })
    };

    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        let message = tokio::select! {
            m = client.recv() => m,
            _ = &mut stop => break,
        };
        let Some(message) = message else { break };
        let sent = match &message.payload {
            Payload::Json(value) if is_echo(value) => {
                eprintln!("from {}: not answering an echo", message.from);
                continue;
            }
            Payload::Json(value) => client.send(&message.from, &json!({ "echo": value })).await,
            Payload::Bytes(bytes) => client.send_bytes(&message.from, bytes).await,
        };
        if sent.is_ok() {
            eprintln!("from {}: answered", message.from);
        }
        if let Err(e) = sent {
            eprintln!("could not answer {}: {e}", message.from);
        }
    }
    events.abort();
    client.close().await;
    Ok(())
}
