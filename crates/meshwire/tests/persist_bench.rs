//! Commit latency of the SQLite store by durability level (no timed
//! assertions; prints figures). Run it optimized:
//!
//! ```sh
//! cargo test --release -p meshwire --test persist_bench -- --ignored --nocapture
//! ```
//!
//! `MESHWIRE_BENCH_DIR` chooses the directory (default: `target/`, on the
//! disk the project lives on; a tmpfs would make fsync free).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use meshwire::persist::{AtRestKey, Commit, Durability, InboxEntry, Persistence, SqliteOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

const COMMITS: usize = 2_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

#[test]
#[ignore = "a benchmark: run with --release -- --ignored --nocapture"]
fn commit_latency_by_durability() {
    let dir = std::env::var_os("MESHWIRE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/persist-bench"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    println!("{COMMITS} commits per line, store in {}", dir.display());
    println!("| durability | encrypted | commit | p50 | p99 | p99.9 | max | > 1 ms | commits/s |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    // A ~2 KB peer row, like a session's ratchet state with bookkeeping.
    let row = format!(r#"{{"channel":"{}"}}"#, "r".repeat(2_000));
    for durability in [Durability::Process, Durability::PowerLoss] {
        for encrypted in [false, true] {
            for kind in ["peer row", "peer row + inbox row"] {
                let path = dir.join(format!("{durability:?}-{encrypted}-{}.db", kind.len()));
                let mut options = SqliteOptions::new().durability(durability);
                if encrypted {
                    options = options.key(AtRestKey::from_bytes(Zeroizing::new([1; 32])));
                }
                let store = options.open(&path).unwrap();
                let mut times = Vec::with_capacity(COMMITS);
                let started = Instant::now();
                for i in 0..COMMITS {
                    let mut c = Commit::new();
                    // A different row each time: SQLite skips writing a
                    // row that is byte for byte the same.
                    let mut text = Zeroizing::new(row.clone());
                    text.replace_range(13..33, &format!("{i:020}"));
                    c.put_peer(format!("did:mesh:peer{}", i % 8), Some(text));
                    if kind != "peer row" {
                        c.add_inbox(InboxEntry {
                            from: "did:mesh:peer0".into(),
                            id: i.to_string(),
                            payload: Zeroizing::new(vec![b'x'; 256]),
                            received_at_ms: i as u64,
                            plaintext: false,
                        });
                        if i > 0 {
                            c.remove_inbox("did:mesh:peer0", (i - 1).to_string());
                        }
                    }
                    let t = Instant::now();
                    store.commit(&c).unwrap();
                    times.push(t.elapsed());
                }
                let total = started.elapsed();
                times.sort();
                println!(
                    "| {durability:?} | {encrypted} | {kind} | {} | {} | {} | {} | {} | {:.0} |",
                    ms(percentile(&times, 0.5)),
                    ms(percentile(&times, 0.99)),
                    ms(percentile(&times, 0.999)),
                    ms(*times.last().unwrap()),
                    times.iter().filter(|t| **t > Duration::from_millis(1)).count(),
                    COMMITS as f64 / total.as_secs_f64()
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
