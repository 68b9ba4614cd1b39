//! Server-side benchmarks of `meshwire serve` (issue 10 section 6), on
//! loopback, bounded in count and time:
//!
//! - `cpu`: server CPU time per forwarded frame, `meshwire serve --memory`
//!   and the AGT 5.0.0 relay under the same load in one run. N sender
//!   connections (authenticated `connect` frames) write pre-serialized
//!   `message` frames (256-byte payload) to N receivers that only read; at
//!   most `--window` frames per pair are in flight. The figure is the
//!   server process's utime+stime (`/proc/PID/stat`) over the measured run
//!   divided by the frames delivered.
//! - `idle`: N idle authenticated connections on one `meshwire serve
//!   --memory`; server VmRSS (`/proc/PID/status`) before and after, per
//!   connection.
//!
//! ```sh
//! nice -n 19 cargo build --release -p meshwire-cli
//! nice -n 19 cargo run --release -p meshwire-server --example server_bench -- \
//!     [--only cpu|idle] [--senders 8] [--frames 50000] [--window 256] [--idle 10000] \
//!     [--meshwire target/release/meshwire] [--agt $AGT_VENV/bin/python]
//! ```
//!
//! Without `--agt`, `$AGT_VENV/bin/python` is used when it exists; the AGT
//! half is skipped (with the reason printed) otherwise. The idle count is
//! capped by the open-file limit (this crate forbids `unsafe`, so the limit
//! is not raised in-process: raise it with `ulimit -n` first). Every child
//! process is killed when the benchmark ends, fails or is interrupted
//! (SIGINT, SIGTERM). Linux only (`/proc`).

use futures_util::{SinkExt, StreamExt};
use meshwire_proto::frames::{self, ConnectFrame, Frame, MessageBody, MessageFrame};
use meshwire_proto::time::Timestamp;
use meshwire_proto::Identity;
use std::error::Error;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
#[path = "common/procstat.rs"]
mod procstat;

use procstat::{clock_ticks_per_s, cpu_ticks, rss_kib};

type BoxError = Box<dyn Error + Send + Sync>;

/// How long one benchmark phase may take before it is abandoned.
const PHASE_LIMIT: Duration = Duration::from_secs(180);
/// Payload bytes of every `message` frame.
const PAYLOAD: usize = 256;

/// Child processes, killed (and reaped) on drop.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A server under test: its base URLs, the PID to measure and the
/// processes to kill.
struct Server {
    name: &'static str,
    ws_url: String,
    health_url: String,
    pid: u32,
    _children: Children,
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn now_iso() -> Result<String, BoxError> {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    Ok(Timestamp(u64::try_from(ms)?).to_iso())
}

/// Polls `url` (a `/health` endpoint) until `ready` accepts its JSON.
async fn wait_health(
    http: &reqwest::Client,
    url: &str,
    limit: Duration,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value, BoxError> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(response) = http.get(url).send().await {
            if let Ok(body) = response.json::<serde_json::Value>().await {
                if ready(&body) {
                    return Ok(body);
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{url} not ready within {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_meshwire(bin: &str, max_connections: usize) -> Result<Server, BoxError> {
    let port = free_port()?;
    let child = Command::new(bin)
        .args(["serve", "--memory", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--max-connections", &max_connections.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {bin} (build it with `cargo build --release -p meshwire-cli`): {e}"))?;
    let pid = child.id();
    let server = Server {
        name: "meshwire serve --memory",
        ws_url: format!("ws://127.0.0.1:{port}/ws"),
        health_url: format!("http://127.0.0.1:{port}/health"),
        pid,
        _children: Children(vec![child]),
    };
    wait_health(
        &reqwest::Client::new(),
        &server.health_url,
        Duration::from_secs(30),
        |_| true,
    )
    .await?;
    Ok(server)
}

async fn start_agt(python: &str) -> Result<Server, BoxError> {
    let (registry, relay) = (free_port()?, free_port()?);
    let mut children = Children(Vec::new());
    for (module, port) in [("relay", relay), ("registry", registry)] {
        children.0.push(
            Command::new(python)
                .args(["-m", &format!("agentmesh.{module}")])
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--log-level", "warning"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start {python} -m agentmesh.{module}: {e}"))?,
        );
    }
    let pid = children.0.first().map(Child::id).ok_or("no relay process")?;
    let http = reqwest::Client::new();
    for port in [registry, relay] {
        wait_health(
            &http,
            &format!("http://127.0.0.1:{port}/health"),
            Duration::from_secs(60),
            |_| true,
        )
        .await?;
    }
    Ok(Server {
        name: "AGT 5.0.0 agentmesh.relay",
        ws_url: format!("ws://127.0.0.1:{relay}/ws"),
        health_url: format!("http://127.0.0.1:{relay}/health"),
        pid,
        _children: children,
    })
}

/// The soft open-file limit of this process (`/proc/self/limits`).
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A relay connection that sent an authenticated `connect` frame for `id`.
async fn connect(url: &str, id: &Identity) -> Result<Ws, BoxError> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let frame = frames::to_text(&ConnectFrame::new(id, &now_iso()?));
    ws.send(Message::Text(frame)).await?;
    Ok(ws)
}

/// Waits until the relay reports at least `n` connected agents.
async fn wait_connected(server: &Server, n: usize) -> Result<(), BoxError> {
    let http = reqwest::Client::new();
    wait_health(&http, &server.health_url, Duration::from_secs(60), |body| {
        body["connected_agents"].as_u64().unwrap_or(0) >= n as u64
    })
    .await
    .map(|_| ())
}

/// One sender→receiver pair's pre-serialized frames.
fn frames_for(from: &Identity, to: &Identity, pair: usize, count: usize) -> Result<Vec<String>, BoxError> {
    let ts = now_iso()?;
    let payload = vec![b'x'; PAYLOAD];
    Ok((0..count)
        .map(|seq| {
            Frame::Message(MessageFrame {
                from: from.did().to_string(),
                to: to.did().to_string(),
                id: format!("{pair:08x}-0000-4000-8000-{seq:012x}"),
                ts: ts.clone(),
                body: MessageBody::Plaintext(payload.clone()),
            })
            .to_text()
        })
        .collect())
}

struct Pair {
    received: AtomicU64,
    progress: Notify,
}

struct Load {
    frames: u64,
    errors: usize,
    wall: Duration,
    cpu_us: f64,
    client_cpu_us: f64,
}

/// Sends `per_pair` frames on each of `senders` pairs through `server`;
/// returns the server CPU time spent while they were delivered.
async fn forward_load(server: &Server, senders: usize, per_pair: usize, window: u64) -> Result<Load, BoxError> {
    let mut rng = rand_core::OsRng;
    let ids: Vec<(Identity, Identity)> = (0..senders)
        .map(|_| (Identity::generate(&mut rng), Identity::generate(&mut rng)))
        .collect();
    // Receivers first, then senders; all must be registered before sending.
    let mut receivers = Vec::new();
    for (_, to) in &ids {
        receivers.push(connect(&server.ws_url, to).await?);
    }
    let mut sender_ws = Vec::new();
    for (from, _) in &ids {
        sender_ws.push(connect(&server.ws_url, from).await?);
    }
    wait_connected(server, 2 * senders).await?;

    let warmup = 100.min(per_pair);
    let mut batches = Vec::new();
    for (pair, (from, to)) in ids.iter().enumerate() {
        batches.push(frames_for(from, to, pair, warmup + per_pair)?);
    }
    let errors = Arc::new(AtomicUsize::new(0));
    let pairs: Vec<Arc<Pair>> = (0..senders)
        .map(|_| {
            Arc::new(Pair {
                received: AtomicU64::new(0),
                progress: Notify::new(),
            })
        })
        .collect();
    let start_gate = Arc::new(tokio::sync::Barrier::new(senders + 1));
    let warm_gate = Arc::new(tokio::sync::Barrier::new(senders + 1));
    let mut tasks: JoinSet<Result<(), BoxError>> = JoinSet::new();
    let total = (warmup + per_pair) as u64;

    for (ws, pair) in receivers.into_iter().zip(&pairs) {
        let (pair, errors) = (Arc::clone(pair), Arc::clone(&errors));
        tasks.spawn(async move {
            let (_sink, mut stream) = ws.split();
            while pair.received.load(Ordering::Relaxed) < total {
                match stream.next().await {
                    Some(Ok(Message::Text(text))) => {
                        if text.contains("\"error\"") {
                            errors.fetch_add(1, Ordering::Relaxed);
                        } else {
                            pair.received.fetch_add(1, Ordering::Relaxed);
                            pair.progress.notify_one();
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err("receiver closed by the server".into()),
                }
            }
            Ok(())
        });
    }
    for ((ws, batch), pair) in sender_ws.into_iter().zip(batches).zip(&pairs) {
        let (pair, errors) = (Arc::clone(pair), Arc::clone(&errors));
        let (start_gate, warm_gate) = (Arc::clone(&start_gate), Arc::clone(&warm_gate));
        tasks.spawn(async move {
            let (mut sink, mut stream) = ws.split();
            // Anything the relay answers a sender is an error frame.
            let watch = tokio::spawn(async move {
                while let Some(Ok(message)) = stream.next().await {
                    if let Message::Text(text) = message {
                        errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("sender got: {text}");
                    }
                }
            });
            let mut sent = 0u64;
            for (n, frame) in batch.into_iter().enumerate() {
                if n == warmup {
                    sink.flush().await?;
                    while pair.received.load(Ordering::Relaxed) < sent {
                        pair.progress.notified().await;
                    }
                    warm_gate.wait().await;
                    start_gate.wait().await;
                }
                while sent.saturating_sub(pair.received.load(Ordering::Relaxed)) >= window {
                    sink.flush().await?;
                    pair.progress.notified().await;
                }
                sink.feed(Message::Text(frame)).await?;
                sent += 1;
                if sent % 32 == 0 {
                    sink.flush().await?;
                }
            }
            sink.flush().await?;
            while pair.received.load(Ordering::Relaxed) < sent {
                pair.progress.notified().await;
            }
            watch.abort();
            Ok(())
        });
    }
    // Everything warmed up: measure from here.
    warm_gate.wait().await;
    let ticks_before = cpu_ticks(&server.pid.to_string())?;
    let own_before = cpu_ticks("self")?;
    let started = Instant::now();
    start_gate.wait().await;
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    let wall = started.elapsed();
    let ticks = cpu_ticks(&server.pid.to_string())?.saturating_sub(ticks_before);
    let own = cpu_ticks("self")?.saturating_sub(own_before);
    let delivered: u64 =
        pairs.iter().map(|p| p.received.load(Ordering::Relaxed)).sum::<u64>() - (warmup * senders) as u64;
    Ok(Load {
        frames: delivered,
        errors: errors.load(Ordering::Relaxed),
        wall,
        cpu_us: ticks as f64 * 1e6 / clock_ticks_per_s() as f64,
        client_cpu_us: own as f64 * 1e6 / clock_ticks_per_s() as f64,
    })
}

async fn bench_cpu(args: &Args) -> Result<(), BoxError> {
    let per_pair = (args.frames / args.senders).max(1);
    println!(
        "# CPU per forwarded frame: {} senders -> {} receivers, {} frames of {PAYLOAD}-byte payload, window {}",
        args.senders,
        args.senders,
        per_pair * args.senders,
        args.window
    );
    let mut results = Vec::new();
    let mut servers: Vec<(&str, Option<String>)> = vec![("meshwire", None)];
    match &args.agt {
        Some(python) => servers.push(("agt", Some(python.clone()))),
        None => println!("AGT relay skipped: no --agt and no $AGT_VENV/bin/python"),
    }
    for (kind, python) in servers {
        let server = match python {
            Some(python) => start_agt(&python).await?,
            None => start_meshwire(&args.meshwire, 1000).await?,
        };
        let load = tokio::time::timeout(PHASE_LIMIT, forward_load(&server, args.senders, per_pair, args.window))
            .await
            .map_err(|_| format!("{}: load not delivered within {PHASE_LIMIT:?}", server.name))??;
        let per_frame = load.cpu_us / load.frames.max(1) as f64;
        println!(
            "{}",
            serde_json::json!({
                "server": server.name,
                "frames_delivered": load.frames,
                "error_frames": load.errors,
                "wall_s": (load.wall.as_secs_f64() * 1000.0).round() / 1000.0,
                "frames_per_s": (load.frames as f64 / load.wall.as_secs_f64()).round(),
                "server_cpu_s": load.cpu_us / 1e6,
                "server_cpu_us_per_frame": (per_frame * 100.0).round() / 100.0,
                "load_generator_cpu_s": load.client_cpu_us / 1e6,
            })
        );
        results.push((kind, per_frame));
    }
    if let [(_, meshwire), (_, agt)] = results[..] {
        println!(
            "AGT / meshwire CPU per frame: {:.1}x (meshwire {:.2} us, AGT {:.2} us)",
            agt / meshwire,
            meshwire,
            agt
        );
    }
    Ok(())
}

async fn bench_idle(args: &Args) -> Result<(), BoxError> {
    let mut n = args.idle;
    if let Some(limit) = open_file_limit() {
        let usable = limit.saturating_sub(200);
        if n > usable {
            println!("idle: open-file limit {limit}: {usable} connections instead of {n} (raise it with `ulimit -n`)");
            n = usable;
        }
    }
    println!("# Idle connections: {n} authenticated, idle connections on one meshwire serve --memory");
    let server = start_meshwire(&args.meshwire, n + 100).await?;
    // One connection first so that the listener and runtime are warm.
    let mut rng = rand_core::OsRng;
    let first = connect(&server.ws_url, &Identity::generate(&mut rng)).await?;
    wait_connected(&server, 1).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(&server.pid.to_string())?;
    let started = Instant::now();
    let mut held = vec![first];
    let run = async {
        let mut left = n - 1;
        while left > 0 {
            let mut set = JoinSet::new();
            for _ in 0..left.min(100) {
                let url = server.ws_url.clone();
                set.spawn(async move { connect(&url, &Identity::generate(&mut rand_core::OsRng)).await });
            }
            left -= left.min(100);
            while let Some(joined) = set.join_next().await {
                held.push(joined??);
            }
        }
        wait_connected(&server, n).await
    };
    tokio::time::timeout(PHASE_LIMIT, run)
        .await
        .map_err(|_| format!("idle: {n} connections not open within {PHASE_LIMIT:?}"))??;
    let connect_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(&server.pid.to_string())?;
    let per_conn = (after.saturating_sub(before)) as f64 / n as f64;
    println!(
        "{}",
        serde_json::json!({
            "server": server.name,
            "idle_connections": held.len(),
            "connect_s": (connect_s * 100.0).round() / 100.0,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "rss_kib_per_connection": (per_conn * 100.0).round() / 100.0,
        })
    );
    drop(held);
    Ok(())
}

struct Args {
    only: Option<String>,
    senders: usize,
    frames: usize,
    window: u64,
    idle: usize,
    meshwire: String,
    agt: Option<String>,
}

fn parse_args() -> Result<Args, BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let default_bin = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/meshwire");
    let agt = arg("--agt").or_else(|| {
        let python = format!("{}/bin/python", std::env::var("AGT_VENV").ok()?);
        std::path::Path::new(&python).exists().then_some(python)
    });
    Ok(Args {
        only: arg("--only"),
        senders: arg("--senders").map(|v| v.parse()).transpose()?.unwrap_or(8).max(1),
        frames: arg("--frames").map(|v| v.parse()).transpose()?.unwrap_or(50_000),
        window: arg("--window").map(|v| v.parse()).transpose()?.unwrap_or(256).max(1),
        idle: arg("--idle").map(|v| v.parse()).transpose()?.unwrap_or(10_000).max(1),
        meshwire: arg("--meshwire").unwrap_or_else(|| default_bin.to_owned()),
        agt,
    })
}

async fn run(args: Args) -> Result<(), BoxError> {
    if args.only.as_deref() != Some("idle") {
        bench_cpu(&args).await?;
    }
    if args.only.as_deref() != Some("cpu") {
        bench_idle(&args).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Interrupted: dropping `run` kills every child it started.
    tokio::select! {
        result = run(args) => result,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        _ = term.recv() => Err("terminated".into()),
    }
}
