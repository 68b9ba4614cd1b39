//! The agent child process: the test binary run again with [`CHILD_ENV`]
//! set. A [`MeshClient`] with a SQLite state directory and manual
//! acknowledgement sends numbered messages to its peer and reports, one
//! flushed line each (prefixed [`MARK`]), what happened:
//!
//! - `READY <did>` once connected;
//! - `SENT <inc> <k> <id> <final>` once `send()` returned Ok;
//! - `RECV <inc> <k> <redelivered> <id> <final>` when the application is
//!   handed a message of the peer, then `ACKED <inc> <k>` once `ack()`
//!   returned Ok(true) (`ACKAGAIN` for Ok(false), `ACKERR` for an error);
//! - `SENDERR`, `CONNECTERR`, `ODD` for the record.
//!
//! It reads commands on stdin: `RUN` (send a message every `pace_ms`),
//! `PAUSE`, `ONE` (send one message marked final, while paused). Stdin at
//! its end (the parent is gone) ends the process.

use meshwire::{Identity, MeshClient};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

/// Set (to a JSON [`ChildSpec`]) in the environment of an agent child.
pub const CHILD_ENV: &str = "MESHWIRE_CRASH_CHILD";
/// Starts every protocol line of a child.
pub const MARK: &str = "@@ ";
/// How long a child lives at most, whatever happens to its parent.
const CHILD_MAX: Duration = Duration::from_secs(30 * 60);
/// How long a child keeps retrying its first connection.
const CONNECT_MAX: Duration = Duration::from_secs(60);

/// What an agent child is told.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildSpec {
    /// "A" or "B".
    pub role: String,
    /// The identity seed, hex (same across restarts).
    pub seed: String,
    /// The peer's DID.
    pub peer: String,
    /// Relay URL.
    pub relay_url: String,
    /// Registry URL.
    pub registry_url: String,
    /// The SQLite state directory.
    pub state_dir: String,
    /// This process's incarnation: part of every message it sends.
    pub inc: u64,
    /// Pause between two sends while running.
    pub pace_ms: u64,
    /// Start sending at once (else wait for `RUN`).
    pub running: bool,
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // The leading newline: libtest may have printed "test ... " without one.
    let _ = write!(out, "\n{MARK}{line}\n");
    let _ = out.flush();
}

/// An error on one line.
fn oneline(e: &dyn std::fmt::Display) -> String {
    e.to_string().replace(['\n', '\r'], " ")
}

/// Runs the agent child; never returns normally before its stdin ends.
pub fn run(spec: &str) {
    let spec: ChildSpec = serde_json::from_str(spec).expect("a JSON ChildSpec");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(agent(spec));
}

enum Command {
    Run,
    Pause,
    One,
}

fn parse_command(line: &str) -> Option<Command> {
    match line.trim() {
        "RUN" => Some(Command::Run),
        "PAUSE" => Some(Command::Pause),
        "ONE" => Some(Command::One),
        _ => None,
    }
}

async fn connect(spec: &ChildSpec) -> MeshClient {
    let seed: [u8; 32] = hex::decode(&spec.seed)
        .expect("hex seed")
        .try_into()
        .expect("32-byte seed");
    let started = Instant::now();
    loop {
        let attempt = MeshClient::builder(Identity::from_seed(&seed), &spec.relay_url, &spec.registry_url)
            .display_name(format!("crash-{}", spec.role))
            .state_dir(&spec.state_dir)
            .config(|c| {
                c.manual_ack = true;
                c.retransmit_after = Duration::from_secs(1);
                c.reconnect_base = Duration::from_millis(100);
                c.reconnect_max = Duration::from_millis(500);
                c.takeover_backoff = Duration::from_millis(400);
                c.registry_heartbeat = Duration::from_secs(2);
            })
            .connect()
            .await;
        match attempt {
            Ok(client) => return client,
            Err(e) => {
                say(&format!("CONNECTERR {}", oneline(&e)));
                if started.elapsed() > CONNECT_MAX {
                    std::process::exit(3);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

async fn agent(spec: ChildSpec) {
    let started = Instant::now();
    let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
        // The parent is gone (or closed our stdin): stop.
        std::process::exit(0);
    });
    let client = connect(&spec).await;
    say(&format!("READY {}", client.did()));

    let receiver = client.clone();
    let peer = spec.peer.clone();
    tokio::spawn(async move {
        while let Some(m) = receiver.recv().await {
            let json = m.payload.as_json();
            let field = |name: &str| json.and_then(|v| v.get(name)).and_then(|v| v.as_u64());
            let fin = json
                .and_then(|v| v.get("final"))
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            match (field("inc"), field("k")) {
                (Some(inc), Some(k)) if m.from == peer => {
                    say(&format!("RECV {inc} {k} {} {} {fin}", m.redelivered, m.id));
                    match receiver.ack(&m) {
                        Ok(true) => say(&format!("ACKED {inc} {k}")),
                        Ok(false) => say(&format!("ACKAGAIN {inc} {k}")),
                        Err(e) => say(&format!("ACKERR {inc} {k} {}", oneline(&e))),
                    }
                }
                _ => {
                    say(&format!("ODD {} {}", m.from, String::from_utf8_lossy(&m.raw)));
                    let _ = receiver.ack(&m);
                }
            }
        }
    });

    let mut running = spec.running;
    let mut one = 0u32;
    let mut k = 0u64;
    let apply = |c: Command, running: &mut bool, one: &mut u32| match c {
        Command::Run => *running = true,
        Command::Pause => *running = false,
        Command::One => *one += 1,
    };
    loop {
        if started.elapsed() > CHILD_MAX {
            std::process::exit(4);
        }
        while let Ok(line) = commands.try_recv() {
            if let Some(c) = parse_command(&line) {
                apply(c, &mut running, &mut one);
            }
        }
        if !running && one == 0 {
            if let Ok(Some(line)) = tokio::time::timeout(Duration::from_millis(100), commands.recv()).await {
                if let Some(c) = parse_command(&line) {
                    apply(c, &mut running, &mut one);
                }
            }
            continue;
        }
        let fin = !running;
        let payload = serde_json::json!({"inc": spec.inc, "k": k, "final": fin});
        match client.send(&spec.peer, &payload).await {
            Ok(id) => {
                say(&format!("SENT {} {k} {id} {fin}", spec.inc));
                if fin {
                    one -= 1;
                }
            }
            Err(e) => {
                say(&format!("SENDERR {} {k} {}", spec.inc, oneline(&e)));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // A number is never used twice, even after a failed send.
        k += 1;
        if running {
            tokio::time::sleep(Duration::from_millis(spec.pace_ms)).await;
        }
    }
}
