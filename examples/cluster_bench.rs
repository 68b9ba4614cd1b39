//! Cross-instance forwarding through NATS (issue 10 section 6): the CPU
//! and latency a frame costs when its recipient is connected to another
//! relay instance, against the same traffic within one instance, in one
//! run on loopback.
//!
//! Two in-process servers (`A`, `B`) share one `nats-server -js` started
//! here (127.0.0.1, free port, temporary store; killed at the end).
//! Receivers are connected to `A`; senders to `A` ("same instance") or to
//! `B` ("cross instance"). Two figures per mode:
//!
//! - latency: one pair, one frame in flight at a time; one-way time from
//!   the sender's write to the receiver's read of each `message` frame
//!   (client, relay, NATS and back, all in this process), p50/p99;
//! - CPU: `--pairs` pairs send `--frames` frames in all (256-byte payload,
//!   at most `--window` in flight per pair); CPU time of this process
//!   (servers and clients: the client work is the same in both modes, so
//!   the difference is the relay's) and of the nats-server, from
//!   `/proc/PID/stat`, divided by the frames delivered.
//!
//! ```sh
//! nice -n 19 cargo run --release -p meshwire-server --example cluster_bench -- \
//!     [--frames 20000] [--pairs 4] [--window 64] [--latency 2000]
//! ```
//!
//! Needs a `nats-server` binary (`apt-get install nats-server`, or
//! `$MESHWIRE_NATS_SERVER`). Linux only (`/proc`). Bounded: every phase
//! gives up after two minutes.

use futures_util::{SinkExt, StreamExt};
use meshwire_proto::frames::{self, ConnectFrame};
use meshwire_proto::time::Timestamp;
use meshwire_proto::Identity;
use meshwire_server::storage::nats::NatsOptions;
use meshwire_server::storage::nats_server::NatsServer;
use meshwire_server::storage::Storage;
use meshwire_server::{RunningServer, ServerConfig};
use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
#[path = "common/procstat.rs"]
mod procstat;

use procstat::{clock_ticks_per_s, cpu_ticks};

type BoxError = Box<dyn Error + Send + Sync>;

/// How long one phase may take before it is abandoned.
const PHASE_LIMIT: Duration = Duration::from_secs(120);
/// Payload bytes of every `message` frame.
const PAYLOAD: usize = 256;

struct Args {
    frames: usize,
    pairs: usize,
    window: usize,
    latency: usize,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        frames: 20_000,
        pairs: 4,
        window: 64,
        latency: 2_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value: usize = it.next().ok_or(format!("{flag} needs a value"))?.parse()?;
        match flag.as_str() {
            "--frames" => args.frames = value,
            "--pairs" => args.pairs = value.max(1),
            "--window" => args.window = value.max(1),
            "--latency" => args.latency = value,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(args)
}

fn now_iso() -> Result<String, BoxError> {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    Ok(Timestamp(u64::try_from(ms)?).to_iso())
}

async fn start_instance(nats_url: &str) -> Result<RunningServer, BoxError> {
    let mut config = ServerConfig::default();
    config.storage = Some(Storage::nats(NatsOptions::new(nats_url), config.storage_limits()).await?);
    Ok(meshwire_server::start(config).await?)
}

/// An authenticated relay connection of `id` to `server`.
async fn connect(server: &RunningServer, id: &Identity) -> Result<Ws, BoxError> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/ws", server.relay_url())).await?;
    ws.send(Message::Text(frames::to_text(&ConnectFrame::new(id, &now_iso()?))))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.server().connected_dids().contains(&id.did().to_string()) {
        if Instant::now() > deadline {
            return Err(format!("{} never connected", id.did()).into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(ws)
}

fn frame(from: &Identity, to: &Identity, id: &str, payload: &str) -> String {
    format!(
        r#"{{"v":1,"type":"message","from":"{}","to":"{}","id":"{id}","ciphertext":"{payload}","timestamp":"2026-01-01T00:00:00.000Z"}}"#,
        from.did(),
        to.did()
    )
}

/// The next text frame (pings skipped).
async fn next_text(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Result<String, BoxError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => return Err(format!("receiver: unexpected {other:?}").into()),
        }
    }
}

struct Identities(u8);

impl Identities {
    fn next(&mut self) -> Identity {
        self.0 = self.0.wrapping_add(1);
        Identity::from_seed(&[self.0; 32])
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// One-way latency of `n` frames, one in flight.
async fn latency(
    receivers: &RunningServer,
    senders: &RunningServer,
    ids: &mut Identities,
    n: usize,
    payload: &str,
) -> Result<Vec<Duration>, BoxError> {
    let (sender, receiver) = (ids.next(), ids.next());
    let mut rx = connect(receivers, &receiver).await?;
    let mut tx = connect(senders, &sender).await?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let text = frame(&sender, &receiver, &format!("l{i}"), payload);
        let started = Instant::now();
        tx.send(Message::Text(text)).await?;
        next_text(&mut rx).await?;
        // The first tenth warms up.
        if i >= n / 10 {
            samples.push(started.elapsed());
        }
    }
    samples.sort();
    Ok(samples)
}

struct Load {
    frames: usize,
    elapsed: Duration,
    process_ticks: u64,
    nats_ticks: u64,
}

/// `frames` frames over `pairs` pairs, at most `window` in flight each.
async fn load(
    receivers: &RunningServer,
    senders: &RunningServer,
    ids: &mut Identities,
    args: &Args,
    nats_pid: &str,
    payload: &str,
) -> Result<Load, BoxError> {
    let per_pair = args.frames / args.pairs;
    let mut pairs = Vec::new();
    for _ in 0..args.pairs {
        let (sender, receiver) = (ids.next(), ids.next());
        let rx = connect(receivers, &receiver).await?;
        let tx = connect(senders, &sender).await?;
        let texts: Vec<String> = (0..per_pair)
            .map(|i| frame(&sender, &receiver, &format!("c{i}"), payload))
            .collect();
        pairs.push((tx, rx, texts));
    }
    let (process0, nats0) = (cpu_ticks("self")?, cpu_ticks(nats_pid)?);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (mut tx, rx, texts) in pairs {
        let window = Arc::new(Semaphore::new(args.window));
        let credit = Arc::clone(&window);
        tasks.spawn(async move {
            let (_, mut rx) = rx.split();
            let reader = tokio::spawn(async move {
                for _ in 0..per_pair {
                    next_text(&mut rx).await?;
                    credit.add_permits(1);
                }
                Ok::<(), BoxError>(())
            });
            for text in texts {
                window.acquire().await?.forget();
                tx.send(Message::Text(text)).await?;
            }
            reader.await??;
            Ok::<(), BoxError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let elapsed = started.elapsed();
    Ok(Load {
        frames: per_pair * args.pairs,
        elapsed,
        process_ticks: cpu_ticks("self")? - process0,
        nats_ticks: cpu_ticks(nats_pid)? - nats0,
    })
}

async fn run(args: Args) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let nats = NatsServer::start(&dir.path().join("js"))?;
    let nats_pid = nats.pid().ok_or("nats-server has no pid")?.to_string();
    let a = start_instance(&nats.url()).await?;
    let b = start_instance(&nats.url()).await?;
    let payload = "A".repeat(PAYLOAD);
    let hz = clock_ticks_per_s() as f64;
    let mut ids = Identities(0);
    println!(
        "cluster_bench: {} frames over {} pairs (window {}), latency over {} frames, {PAYLOAD}-byte payload, nats-server {}",
        args.frames,
        args.pairs,
        args.window,
        args.latency,
        nats.url()
    );
    println!("| mode | one-way p50 | p99 | frames/s | process CPU µs/frame | nats-server CPU µs/frame |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut rows = Vec::new();
    for (mode, senders) in [("same instance", &a), ("cross instance (NATS)", &b)] {
        let samples = tokio::time::timeout(PHASE_LIMIT, latency(&a, senders, &mut ids, args.latency, &payload))
            .await
            .map_err(|_| "latency phase timed out")??;
        let load = tokio::time::timeout(PHASE_LIMIT, load(&a, senders, &mut ids, &args, &nats_pid, &payload))
            .await
            .map_err(|_| "load phase timed out")??;
        let per_frame = |ticks: u64| ticks as f64 / hz / load.frames.max(1) as f64 * 1e6;
        let (p50, p99) = (percentile(&samples, 0.50), percentile(&samples, 0.99));
        let row = (p50, p99, per_frame(load.process_ticks), per_frame(load.nats_ticks));
        println!(
            "| {mode} | {:.0} µs | {:.0} µs | {:.0} | {:.1} | {:.1} |",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            load.frames as f64 / load.elapsed.as_secs_f64(),
            row.2,
            row.3
        );
        rows.push(row);
    }
    if let [same, cross] = rows.as_slice() {
        println!(
            "added by cross-instance forwarding: {:+.1} µs CPU per frame (this process {:+.1}, nats-server {:+.1}); one-way latency p50 {:+.0} µs, p99 {:+.0} µs",
            (cross.2 - same.2) + (cross.3 - same.3),
            cross.2 - same.2,
            cross.3 - same.3,
            (cross.0.as_secs_f64() - same.0.as_secs_f64()) * 1e6,
            (cross.1.as_secs_f64() - same.1.as_secs_f64()) * 1e6,
        );
    }
    let (sa, sb) = (a.stats(), b.stats());
    println!(
        "check: stored A {} B {}, cross-instance routed out of B {}, fallbacks {}",
        sa.messages_stored,
        sb.messages_stored,
        sb.cluster_routed_out,
        sa.cluster_fallbacks + sb.cluster_fallbacks
    );
    a.shutdown().await;
    b.shutdown().await;
    drop(nats);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    tokio::select! {
        result = run(args) => result,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    }
}
