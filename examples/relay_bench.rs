//! Throughput and latency between two meshwire agents through a relay on
//! loopback, 256-byte payloads: through the embedded relay, and through the
//! AGT 5.0.0 relay and registry when `--agt PYTHON` names the Python of a
//! venv that has `agent-governance-toolkit-core` (see interop/python/setup_venv.sh).
//!
//! `cargo run --release --example relay_bench -- [--agt PYTHON] [--messages N] [--paced N] [--durable] [--batch N]`
//!
//! `--durable`: both agents keep their state in an SQLite store (every
//! message committed before it is sent, acked or handed over).
//!
//! `--batch N`: Alice sends with `send_batch` (N messages per durable
//! commit) and Bob takes what is waiting with `drain` (one acknowledgement
//! commit per batch); without it, one `send` and one `recv` per message.
//!
//! Throughput: Alice sends N messages back to back, rate = N / time until
//! Bob has all of them; `cpu_us_per_message` is the CPU time of the whole
//! process (both agents and the embedded relay) per message. Latency: one-way, Alice paced at 50 msg/s, measured
//! in one process with one clock; p50 and p99.

#[path = "common/procstat.rs"]
mod procstat;

use meshwire::{Identity, MeshClient};
use serde_json::json;
use std::error::Error;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Agt(Vec<Child>);

impl Drop for Agt {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16, Box<dyn Error>> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start_agt(python: &str) -> Result<(Agt, String, String), Box<dyn Error>> {
    let (registry, relay) = (free_port()?, free_port()?);
    let mut children = Agt(Vec::new());
    for (module, port) in [("registry", registry), ("relay", relay)] {
        children.0.push(
            Command::new(python)
                .args([
                    "-m",
                    &format!("agentmesh.{module}"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                ])
                .args(["--log-level", "warning"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let http = reqwest::Client::new();
    for port in [registry, relay] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while http
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err(format!("AGT service on {port} did not start").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok((
        children,
        format!("ws://127.0.0.1:{relay}"),
        format!("http://127.0.0.1:{registry}"),
    ))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let messages: usize = arg("--messages").map(|v| v.parse()).transpose()?.unwrap_or(2000);
    let paced: usize = arg("--paced").map(|v| v.parse()).transpose()?.unwrap_or(500);
    let batch: usize = arg("--batch").map(|v| v.parse()).transpose()?.unwrap_or(1).max(1);

    let mut _agt = None;
    let mut _server = None;
    let (relay, registry, name) = match arg("--agt") {
        Some(python) => {
            let (children, relay, registry) = start_agt(&python).await?;
            _agt = Some(children);
            (relay, registry, "AGT 5.0.0 relay")
        }
        None => {
            let server = meshwire_server::start(Default::default()).await?;
            let urls = (server.relay_url(), server.registry_url());
            _server = Some(server);
            (urls.0, urls.1, "embedded relay")
        }
    };
    let durable = args.iter().any(|a| a == "--durable");
    let state = std::env::temp_dir().join(format!("meshwire-relay-bench-{}", std::process::id()));
    let connect = |n: &'static str| {
        let builder = MeshClient::builder(
            Identity::generate(&mut rand_core::OsRng),
            relay.clone(),
            registry.clone(),
        )
        .display_name(n)
        .config(|c| c.receipts = false);
        let builder = if durable {
            builder.state_dir(state.join(n))
        } else {
            builder
        };
        builder.connect()
    };
    let alice = connect("bench-alice").await?;
    let bob = connect("bench-bob").await?;
    let filler = "x".repeat(200);
    let payload = |seq: usize, t: u128| {
        let mut p = json!({"seq": seq, "t": t, "pad": filler});
        let len = serde_json::to_string(&p).map(|s| s.len()).unwrap_or(0);
        p["pad"] = json!("x".repeat(200 + 256usize.saturating_sub(len)));
        p
    };
    // Warm up the session (KNOCK, first ratchet step).
    alice.send(bob.did(), &payload(0, 0)).await?;
    bob.recv_timeout(Duration::from_secs(10)).await?;

    let cpu_before = procstat::cpu_seconds("self").unwrap_or(0.0);
    let start = Instant::now();
    let receiving = {
        let bob = bob.clone();
        tokio::spawn(async move {
            let mut got = 0;
            while got < messages {
                if bob.recv_timeout(Duration::from_secs(60)).await.is_err() {
                    break;
                }
                got += 1;
                if batch > 1 {
                    got += bob.drain().len();
                }
            }
            got
        })
    };
    if batch > 1 {
        let mut seq = 0;
        while seq < messages {
            let end = messages.min(seq + batch);
            let payloads: Vec<_> = (seq..end).map(|s| payload(s, 0)).collect();
            alice.send_batch(bob.did(), &payloads).await?;
            seq = end;
        }
    } else {
        for seq in 0..messages {
            alice.send(bob.did(), &payload(seq, 0)).await?;
        }
    }
    let received = receiving.await?;
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_us = (procstat::cpu_seconds("self").unwrap_or(0.0) - cpu_before) * 1e6 / messages as f64;
    if received < messages {
        return Err(format!("Bob received {received} of {messages}").into());
    }
    let rate = messages as f64 / elapsed;

    let origin = Instant::now();
    let receiver = {
        let bob = bob.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(paced);
            for _ in 0..paced {
                let Ok(m) = bob.recv_timeout(Duration::from_secs(30)).await else {
                    break;
                };
                let sent = m.payload.as_json().and_then(|p| p["t"].as_u64()).unwrap_or(0);
                let now = origin.elapsed().as_micros() as u64;
                latencies.push(now.saturating_sub(sent) as f64 / 1000.0);
            }
            latencies
        })
    };
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for seq in 0..paced {
        tick.tick().await;
        alice
            .send(bob.did(), &payload(seq, origin.elapsed().as_micros()))
            .await?;
    }
    let mut latencies = receiver.await?;
    latencies.sort_by(|a, b| a.total_cmp(b));
    let summary = json!({
        "relay": name,
        "provider": meshwire::proto::crypto::active_provider_name(),
        "durable": durable,
        "payload_bytes": 256,
        "messages": messages,
        "send_batch": batch,
        "messages_per_s": (rate * 10.0).round() / 10.0,
        "cpu_us_per_message": cpu_us.round(),
        "paced_messages": latencies.len(),
        "latency_ms_p50": (percentile(&latencies, 50.0) * 1000.0).round() / 1000.0,
        "latency_ms_p99": (percentile(&latencies, 99.0) * 1000.0).round() / 1000.0,
    });
    println!("{summary}");
    alice.close().await;
    bob.close().await;
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}
