//! The storage conformance suite on SQLite (two handles = two connections
//! to one database), durability across a reopen, and a writer killed with
//! SIGKILL that loses nothing it reported stored.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod storage_support;

use meshwire_proto::time::Timestamp;
use meshwire_server::storage::{Appended, Created, Storage, StorageLimits};
use meshwire_server::ClaimError;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use storage_support::{agent, msg, otk, Pair, NOW};

async fn open(limits: StorageLimits) -> Option<Pair> {
    let dir = tempfile::tempdir().unwrap();
    let a = Storage::sqlite(dir.path(), limits).await.unwrap();
    let b = Storage::sqlite(dir.path(), limits).await.unwrap();
    Some(Pair {
        a,
        b,
        guard: Box::new(dir),
        sweeps: true,
    })
}

conformance!(open);

const CHILD_DIR_ENV: &str = "MESHWIRE_STORAGE_CHILD_DIR";
const PROOF: [u8; 64] = [5; 64];

/// Not a test by itself: the child process of
/// `kill9_loses_nothing_committed`, which runs this binary with
/// `--ignored --exact child_writer`. It registers an agent with pre-keys,
/// claims a proof, then appends messages forever, printing `stored N`
/// after each committed append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by kill9_loses_nothing_committed as a child process"]
async fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let store = Storage::sqlite(&dir, StorageLimits::default()).await.unwrap();
    let mut record = agent("did:mesh:child", &["work"], NOW.0);
    record.metadata.insert("k".into(), "v".into());
    assert_eq!(store.registry.create_agent(record, 10).await.unwrap(), Created::Created);
    store
        .registry
        .set_one_time_keys("did:mesh:child", (0..5).map(otk).collect())
        .await
        .unwrap();
    store
        .proofs
        .claim("did:mesh:child", &PROOF, Timestamp(NOW.0 + 600_000), NOW)
        .unwrap();
    println!("registered");
    for i in 0..1_000_000u64 {
        let out = store
            .mailboxes
            .append(
                msg(
                    "did:mesh:s",
                    &format!("did:mesh:r{}", i % 7),
                    &format!("m{i}"),
                    Timestamp(NOW.0 + 3_600_000),
                ),
                NOW,
            )
            .await
            .unwrap();
        assert!(matches!(out, Appended::Stored { .. }), "{out:?}");
        println!("stored {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "child_writer",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut last = None;
    let mut registered = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        // libtest may print "test child_writer ... " before the first line.
        if line.ends_with("registered") {
            registered = true;
        }
        if let Some(n) = line.split("stored ").nth(1) {
            let n: u64 = n.parse().unwrap();
            last = Some(n);
            if n >= 2_000 {
                break;
            }
        }
    }
    // SIGKILL, mid-stream: the child is still appending.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child was killed, not finished: {status:?}");
    assert!(registered);
    let last = last.expect("the child stored messages");

    let store = Storage::sqlite(dir.path(), StorageLimits::default()).await.unwrap();
    // Every message reported stored is there, in order per mailbox.
    let mut seen = 0u64;
    for r in 0..7 {
        let mut after = 0;
        let mut ids = Vec::new();
        loop {
            let batch = store
                .mailboxes
                .fetch(&format!("did:mesh:r{r}"), after, 1000, NOW)
                .await
                .unwrap();
            let Some(tail) = batch.last() else { break };
            after = tail.seq;
            ids.extend(batch.into_iter().map(|m| m.id[1..].parse::<u64>().unwrap()));
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order");
        assert!(ids.iter().all(|i| i % 7 == r));
        seen += ids.iter().filter(|&&i| i <= last).count() as u64;
    }
    assert_eq!(seen, last + 1, "every message reported stored survived");
    let agent = store.registry.get_agent("did:mesh:child").await.unwrap().unwrap();
    assert_eq!(agent.metadata.get("k").map(String::as_str), Some("v"));
    assert!(agent.signed_pre_key.is_some());
    assert_eq!(store.registry.one_time_key_count("did:mesh:child").await.unwrap(), 5);
    assert_eq!(
        store
            .proofs
            .claim("did:mesh:child", &PROOF, Timestamp(NOW.0 + 600_000), NOW),
        Err(ClaimError::Replayed),
        "the proof memory survived too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Storage::sqlite(dir.path(), StorageLimits::default()).await.unwrap();
        for i in 0..3 {
            store
                .mailboxes
                .append(msg("did:s", "did:r", &format!("m{i}"), Timestamp(NOW.0 + 1000)), NOW)
                .await
                .unwrap();
        }
        store.mailboxes.ack("did:r", "m1").await.unwrap();
        store
            .registry
            .create_agent(agent("did:mesh:x", &["c"], NOW.0), 10)
            .await
            .unwrap();
        store
            .registry
            .set_one_time_keys("did:mesh:x", vec![otk(1), otk(2)])
            .await
            .unwrap();
        store.registry.consume_one_time_key("did:mesh:x").await.unwrap();
    }
    let store = Storage::sqlite(dir.path(), StorageLimits::default()).await.unwrap();
    let ids: Vec<String> = store
        .mailboxes
        .fetch("did:r", 0, 10, NOW)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, ["m0", "m2"]);
    assert_eq!(store.mailboxes.depth("did:r").await.unwrap(), 2);
    assert_eq!(store.mailboxes.sender_depth("did:s").await.unwrap(), 2);
    assert_eq!(
        store.registry.consume_one_time_key("did:mesh:x").await.unwrap(),
        Some(otk(2))
    );
    assert_eq!(store.registry.discover("c", 5).await.unwrap().len(), 1);
    assert!(store.ready().await.is_ok());
}
