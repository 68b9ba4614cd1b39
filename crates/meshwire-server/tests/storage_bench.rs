//! Durable mailbox throughput (figures, no timed assertions): store,
//! fetch and acknowledge 100,000 messages with SQLite and with JetStream.
//!
//! ```sh
//! cargo test --release -p meshwire-server --test storage_bench -- --ignored --nocapture --test-threads=1
//! ```
//!
//! `MESHWIRE_BENCH_MESSAGES` changes the count (default 100,000).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use meshwire_proto::time::Timestamp;
use meshwire_server::storage::nats::NatsOptions;
use meshwire_server::storage::nats_server::NatsServer;
use meshwire_server::storage::{Appended, MailboxLimits, NewMessage, Storage, StorageLimits, MAX_FETCH_BATCH};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RECIPIENTS: usize = 100;
const WRITERS: usize = 32;
const NOW: Timestamp = Timestamp(1_800_000_000_000);

fn messages() -> usize {
    std::env::var("MESHWIRE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn limits() -> StorageLimits {
    let messages = messages() as u64;
    StorageLimits {
        mailbox: MailboxLimits {
            per_recipient: messages,
            per_sender: messages,
            total: 2 * messages,
            total_bytes: 1 << 30,
            max_ttl: Duration::from_secs(3600),
        },
        ..StorageLimits::default()
    }
}

async fn run(name: &str, store: Storage) {
    let total = messages();
    let frame: Arc<str> = Arc::from(format!(r#"{{"type":"message","ciphertext":"{}"}}"#, "A".repeat(160)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        let frame = frame.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..total).step_by(WRITERS) {
                let message = NewMessage {
                    recipient: format!("did:mesh:r{}", i % RECIPIENTS),
                    sender: format!("did:mesh:s{w}"),
                    id: format!("m{i}"),
                    frame: frame.clone(),
                    expires_at: Timestamp(NOW.0 + 3_000_000),
                };
                let out = store.mailboxes.append(message, NOW).await.unwrap();
                assert!(matches!(out, Appended::Stored { .. }), "{out:?}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stored = started.elapsed();

    let started = Instant::now();
    let mut fetched = Vec::new();
    for r in 0..RECIPIENTS {
        let recipient = format!("did:mesh:r{r}");
        let mut after = 0;
        loop {
            let batch = store
                .mailboxes
                .fetch(&recipient, after, MAX_FETCH_BATCH, NOW)
                .await
                .unwrap();
            let Some(last) = batch.last() else { break };
            after = last.seq;
            fetched.extend(batch.into_iter().map(|m| (r, m.id)));
        }
    }
    let fetch = started.elapsed();
    assert_eq!(fetched.len(), total);

    let started = Instant::now();
    let fetched = Arc::new(fetched);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        let fetched = fetched.clone();
        tasks.push(tokio::spawn(async move {
            for (r, id) in fetched.iter().skip(w).step_by(WRITERS) {
                assert!(store.mailboxes.ack(&format!("did:mesh:r{r}"), id).await.unwrap());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let acked = started.elapsed();
    assert_eq!(store.mailboxes.totals().await.unwrap().messages, 0);

    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    println!(
        "{name}: {total} messages ({RECIPIENTS} mailboxes, {WRITERS} concurrent writers): \
         store {:.2} s ({:.0} msg/s), fetch {:.2} s ({:.0} msg/s, batches of {MAX_FETCH_BATCH}), \
         ack {:.2} s ({:.0} msg/s)",
        stored.as_secs_f64(),
        rate(stored),
        fetch.as_secs_f64(),
        rate(fetch),
        acked.as_secs_f64(),
        rate(acked)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn mailbox_throughput_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = Storage::sqlite(dir.path(), limits()).await.unwrap();
    run("sqlite (WAL, synchronous=NORMAL)", store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn mailbox_throughput_nats() {
    let dir = tempfile::tempdir().unwrap();
    let server = match NatsServer::start(&dir.path().join("js")) {
        Ok(server) => server,
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
    let version = meshwire_server::storage::nats_server::find_binary()
        .ok()
        .and_then(|b| meshwire_server::storage::nats_server::version(&b))
        .unwrap_or_default();
    let store = Storage::nats(NatsOptions::new(server.url()), limits()).await.unwrap();
    run(&format!("nats-server {version} JetStream (file store)"), store).await;
}
