//! The crash test: a child process commits numbered rows in a loop and
//! reports each number once its commit returned; the parent kills it with
//! SIGKILL at a random moment, reopens the store and checks that every
//! reported number is there, none twice, and that each commit's rows are
//! all there or all absent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod persist_support;

use meshwire::persist::{
    AtRestKey, Commit, Durability, InboxEntry, OutboxEntry, Persistence, SqliteOptions, SqliteStore,
};
use persist_support::*;
use rand::Rng;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

const CHILD_ENV: &str = "MESHWIRE_PERSIST_CRASH_CHILD";
const TEST_NAME: &str = "sigkill_loses_nothing_that_was_reported_committed";
const PEERS: u64 = 4;
/// How long a child runs at most if nobody kills it.
const CHILD_MAX: Duration = Duration::from_secs(20);

fn options(durability: &str, encrypted: bool) -> SqliteOptions {
    let mut o = SqliteOptions::new().durability(if durability == "power" {
        Durability::PowerLoss
    } else {
        Durability::Process
    });
    if encrypted {
        o = o.key(AtRestKey::from_bytes(Zeroizing::new([0x42; 32])));
    }
    o
}

fn peer(n: u64) -> String {
    format!("did:mesh:p{}", n % PEERS)
}

/// A ~2 KB peer row recording `n`.
fn peer_row(n: u64) -> Zeroizing<String> {
    Zeroizing::new(format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(2000)))
}

fn row_n(row: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(row).unwrap();
    v["n"].as_u64().unwrap()
}

/// The child: continue after the highest committed number, forever (until
/// killed, or CHILD_MAX).
fn child(spec: &str) {
    let mut parts = spec.split('|');
    let (db, durability, encrypted) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap() == "true",
    );
    let store = options(durability, encrypted).open(db).unwrap();
    let start = store
        .load()
        .unwrap()
        .inbox
        .iter()
        .map(|m| m.id.parse::<u64>().unwrap() + 1)
        .max()
        .unwrap_or(0);
    let began = Instant::now();
    let mut out = std::io::stdout();
    let mut n = start;
    while began.elapsed() < CHILD_MAX {
        let mut c = Commit::new();
        c.put_peer(peer(n), Some(peer_row(n)));
        c.add_inbox(InboxEntry {
            from: peer(n),
            id: n.to_string(),
            payload: Zeroizing::new(format!("message {n}").into_bytes()),
            received_at_ms: n,
            plaintext: false,
        });
        c.add_outbox(OutboxEntry {
            peer: peer(n),
            id: n.to_string(),
            payload: Zeroizing::new(vec![7; 200]),
            created_at_ms: n,
        });
        if n > 0 {
            c.remove_outbox(peer(n - 1), (n - 1).to_string());
        }
        store.commit(&c).unwrap();
        writeln!(out, "\nCOMMITTED#{n}").unwrap();
        out.flush().unwrap();
        n += 1;
    }
}

/// Checks the store after a kill; returns the highest committed number.
fn check(db: &Path, durability: &str, encrypted: bool, reported: &BTreeSet<u64>) -> Option<u64> {
    let snapshot = options(durability, encrypted).open(db).unwrap().load().unwrap();
    let ids: Vec<u64> = snapshot.inbox.iter().map(|m| m.id.parse().unwrap()).collect();
    let max = ids.last().copied();
    let expected: Vec<u64> = (0..max.map_or(0, |m| m + 1)).collect();
    assert_eq!(ids, expected, "every committed number once, in order");
    for n in reported {
        assert!(ids.binary_search(n).is_ok(), "reported {n} committed, not in the store");
    }
    if let (Some(max), Some(last)) = (max, reported.last()) {
        assert!(
            max <= last + 1,
            "at most one commit ({max}) was not reported yet ({last})"
        );
    }
    for m in &snapshot.inbox {
        assert_eq!(m.payload.as_slice(), format!("message {}", m.id).as_bytes());
    }
    // Each peer row holds the last number committed for it: the peer row
    // and the inbox row of one commit are there together.
    for k in 0..PEERS {
        let last = ids.iter().rev().find(|n| *n % PEERS == k).copied();
        let row = snapshot.peers.iter().find(|(d, _)| *d == format!("did:mesh:p{k}"));
        assert_eq!(row.map(|(_, r)| row_n(r)), last, "peer p{k}");
    }
    // The outbox holds exactly the last send (each commit removed the one
    // before).
    let outbox: Vec<u64> = snapshot.outbox.iter().map(|o| o.id.parse().unwrap()).collect();
    assert_eq!(outbox, max.into_iter().collect::<Vec<_>>());
    max
}

#[test]
fn sigkill_loses_nothing_that_was_reported_committed() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    let dir = temp_dir("crash");
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::thread_rng();
    let mut total_reported = 0;
    let mut last_max = None;
    for (round, (durability, encrypted)) in [
        ("process", false),
        ("power", false),
        ("process", true),
        ("power", true),
        ("process", false),
    ]
    .into_iter()
    .enumerate()
    {
        // Rounds 0-1 and 4 continue one plaintext store; 2-3 an encrypted one.
        let db = dir.join(if encrypted { "encrypted.db" } else { "plain.db" });
        let mut child = Command::new(&exe)
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{}|{durability}|{encrypted}", db.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.split("COMMITTED#").nth(1) {
                    let _ = tx.send(n.trim().parse::<u64>().unwrap());
                }
            }
        });
        // Kill at a random moment after the child is under way.
        let first = rx.recv_timeout(Duration::from_secs(30)).expect("the child commits");
        let mut reported = BTreeSet::from([first]);
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..400)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        for n in rx.try_iter() {
            assert!(reported.insert(n), "{n} reported twice");
        }
        let max = check(&db, durability, encrypted, &reported);
        eprintln!(
            "round {round} ({durability}, encrypted: {encrypted}): {} commits reported, {:?} in the store",
            reported.len(),
            max.map(|m| m + 1)
        );
        assert!(max.is_some());
        total_reported += reported.len();
        if round == 1 {
            last_max = max;
        }
        if round == 4 {
            assert!(max > last_max, "round 4 continued the plaintext store");
        }
    }
    assert!(total_reported >= 5);
    // The stores open normally afterwards.
    SqliteStore::open(dir.join("plain.db")).unwrap().load().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
