//! The storage conformance suite, written once and run per backend
//! (`storage_memory.rs`, `storage_sqlite.rs`, `storage_nats.rs`). Each
//! check gets two handles on one backend ("two instances"): clones for
//! memory, two connections to one database for SQLite, two connections in
//! one namespace for NATS.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use meshwire_proto::time::Timestamp;
use meshwire_server::storage::{
    AgentRecord, Appended, Created, MailboxLimits, NewMessage, OneTimeKey, Quota, Storage, StorageLimits,
    MAX_FETCH_BATCH,
};
use meshwire_server::ClaimError;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// Two handles on one backend, and whatever must live as long (temp dirs,
/// a nats-server).
pub struct Pair {
    pub a: Storage,
    pub b: Storage,
    pub guard: Box<dyn std::any::Any + Send>,
    /// Whether `Mailboxes::expire` sweeps (the NATS backend relies on the
    /// stream's maximum age instead).
    pub sweeps: bool,
}

pub const NOW: Timestamp = Timestamp(1_800_000_000_000);
const HOUR: u64 = 3_600_000;

/// Small quotas for the quota test; roomy ones elsewhere.
pub fn limits() -> StorageLimits {
    StorageLimits {
        mailbox: MailboxLimits {
            per_recipient: 1_500,
            per_sender: 1_500,
            total: 5_000,
            total_bytes: 64 * 1024 * 1024,
            max_ttl: Duration::from_secs(72 * 3600),
        },
        ..StorageLimits::default()
    }
}

pub fn quota_limits() -> StorageLimits {
    StorageLimits {
        mailbox: MailboxLimits {
            per_recipient: 3,
            per_sender: 4,
            total: 6,
            total_bytes: 64 * 1024 * 1024,
            max_ttl: Duration::from_secs(72 * 3600),
        },
        ..StorageLimits::default()
    }
}

pub fn msg(from: &str, to: &str, id: &str, expires_at: Timestamp) -> NewMessage {
    NewMessage {
        recipient: to.to_owned(),
        sender: from.to_owned(),
        id: id.to_owned(),
        frame: Arc::from(format!(
            r#"{{"type":"message","from":"{from}","to":"{to}","id":"{id}"}}"#
        )),
        expires_at,
    }
}

fn later() -> Timestamp {
    Timestamp(NOW.0 + HOUR)
}

pub fn agent(did: &str, capabilities: &[&str], seen: u64) -> AgentRecord {
    let mut metadata = indexmap::IndexMap::new();
    metadata.insert("name".to_owned(), did.to_owned());
    let mut record = AgentRecord::new(
        did.to_owned(),
        Some([7; 32]),
        capabilities.iter().map(|c| (*c).to_owned()).collect(),
        metadata,
        Timestamp(seen),
    );
    record.identity_key = Some([1; 32]);
    record.signed_pre_key = Some(meshwire_server::storage::SignedPreKey {
        key_id: serde_json::Number::from(1),
        public_key: [2; 32],
        signature: [3; 64],
    });
    record
}

pub fn otk(id: u64) -> OneTimeKey {
    let mut public_key = [0u8; 32];
    public_key[..8].copy_from_slice(&id.to_be_bytes());
    OneTimeKey {
        key_id: serde_json::Number::from(id),
        public_key,
    }
}

// ── Mailboxes ────────────────────────────────────────────────────────

pub async fn mailbox_order_and_cursor(p: Pair) {
    for i in 0..10 {
        let store = if i % 2 == 0 { &p.a } else { &p.b };
        let out = store
            .mailboxes
            .append(msg("did:s", "did:r", &format!("m{i}"), later()), NOW)
            .await
            .unwrap();
        assert!(matches!(out, Appended::Stored { .. }), "{out:?}");
        // Another mailbox interleaved: never returned for did:r.
        store
            .mailboxes
            .append(msg("did:s", "did:other", &format!("m{i}"), later()), NOW)
            .await
            .unwrap();
    }
    let first = p.a.mailboxes.fetch("did:r", 0, 4, NOW).await.unwrap();
    let ids: Vec<&str> = first.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m0", "m1", "m2", "m3"]);
    assert_eq!(
        &*first[0].frame,
        r#"{"type":"message","from":"did:s","to":"did:r","id":"m0"}"#
    );
    assert_eq!(first[0].sender, "did:s");
    assert!(first.windows(2).all(|w| w[0].seq < w[1].seq));
    // Continue from the cursor on the other handle.
    let rest = p.b.mailboxes.fetch("did:r", first[3].seq, 100, NOW).await.unwrap();
    let ids: Vec<&str> = rest.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m4", "m5", "m6", "m7", "m8", "m9"]);
    // Fetching does not remove: from the start again, all ten.
    assert_eq!(p.a.mailboxes.fetch("did:r", 0, 100, NOW).await.unwrap().len(), 10);
    assert_eq!(p.b.mailboxes.depth("did:r").await.unwrap(), 10);
    assert_eq!(p.b.mailboxes.sender_depth("did:s").await.unwrap(), 20);
    assert!(p.a.mailboxes.fetch("did:nobody", 0, 10, NOW).await.unwrap().is_empty());
}

/// A fetch returns at most its batch (and at most MAX_FETCH_BATCH) from a
/// larger mailbox, and the cursor reaches the rest.
pub async fn fetch_is_bounded_by_batch(p: Pair) {
    let total = MAX_FETCH_BATCH + 100;
    let mut tasks = Vec::new();
    for chunk in 0..10 {
        let store = if chunk % 2 == 0 { p.a.clone() } else { p.b.clone() };
        tasks.push(tokio::spawn(async move {
            for i in (chunk..total).step_by(10) {
                let out = store
                    .mailboxes
                    .append(msg("did:s", "did:big", &format!("m{i}"), later()), NOW)
                    .await
                    .unwrap();
                assert!(matches!(out, Appended::Stored { .. }), "{out:?}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(p.a.mailboxes.depth("did:big").await.unwrap(), total as u64);
    let five = p.a.mailboxes.fetch("did:big", 0, 5, NOW).await.unwrap();
    assert_eq!(five.len(), 5);
    let capped = p.a.mailboxes.fetch("did:big", 0, 5_000, NOW).await.unwrap();
    assert_eq!(capped.len(), MAX_FETCH_BATCH);
    let last = capped.last().unwrap().seq;
    let rest = p.b.mailboxes.fetch("did:big", last, 5_000, NOW).await.unwrap();
    assert_eq!(rest.len(), 100);
    let ids: BTreeSet<String> = capped.iter().chain(&rest).map(|m| m.id.clone()).collect();
    assert_eq!(ids.len(), total, "every message once");
}

/// Only the recipient's key acknowledges (AGT main after 5.0.0).
pub async fn ack_only_by_recipient(p: Pair) {
    p.a.mailboxes
        .append(msg("did:s", "did:r", "m1", later()), NOW)
        .await
        .unwrap();
    assert!(
        !p.b.mailboxes.ack("did:s", "m1").await.unwrap(),
        "the sender cannot ack"
    );
    assert!(
        !p.b.mailboxes.ack("did:x", "m1").await.unwrap(),
        "a third party cannot ack"
    );
    assert_eq!(p.a.mailboxes.depth("did:r").await.unwrap(), 1);
    assert!(p.b.mailboxes.ack("did:r", "m1").await.unwrap());
    assert_eq!(p.a.mailboxes.depth("did:r").await.unwrap(), 0);
    assert_eq!(p.a.mailboxes.sender_depth("did:s").await.unwrap(), 0);
    assert!(!p.a.mailboxes.ack("did:r", "m1").await.unwrap(), "already acked");
    assert!(p.a.mailboxes.fetch("did:r", 0, 10, NOW).await.unwrap().is_empty());
}

/// Message ids are deduplicated per recipient, not globally (AGT PR #3573).
pub async fn dedupe_per_recipient(p: Pair) {
    let first =
        p.a.mailboxes
            .append(msg("did:s", "did:r", "same", later()), NOW)
            .await
            .unwrap();
    assert!(matches!(first, Appended::Stored { .. }));
    assert_eq!(
        p.b.mailboxes
            .append(msg("did:s", "did:r", "same", later()), NOW)
            .await
            .unwrap(),
        Appended::Duplicate,
        "the same id for the same recipient, through the other handle"
    );
    assert_eq!(
        p.a.mailboxes
            .append(msg("did:t", "did:r", "same", later()), NOW)
            .await
            .unwrap(),
        Appended::Duplicate,
        "another sender reusing the id"
    );
    let other =
        p.b.mailboxes
            .append(msg("did:s", "did:q", "same", later()), NOW)
            .await
            .unwrap();
    assert!(
        matches!(other, Appended::Stored { .. }),
        "same id, other recipient: {other:?}"
    );
    assert_eq!(p.a.mailboxes.depth("did:r").await.unwrap(), 1);
    assert_eq!(p.a.mailboxes.depth("did:q").await.unwrap(), 1);
    let fetched = p.a.mailboxes.fetch("did:r", 0, 10, NOW).await.unwrap();
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].sender, "did:s", "the first copy is kept");
}

/// Per-recipient, per-sender and total quotas (pair opened with
/// `quota_limits`).
pub async fn quotas(p: Pair) {
    let send = |from: &'static str, to: &'static str, id: String| {
        let a = p.a.clone();
        async move { a.mailboxes.append(msg(from, to, &id, later()), NOW).await.unwrap() }
    };
    for i in 0..3 {
        assert!(matches!(
            send("did:s1", "did:r1", format!("a{i}")).await,
            Appended::Stored { .. }
        ));
    }
    assert_eq!(
        send("did:s1", "did:r1", "a3".into()).await,
        Appended::Refused(Quota::Recipient)
    );
    assert!(matches!(
        send("did:s1", "did:r2", "b0".into()).await,
        Appended::Stored { .. }
    ));
    assert_eq!(
        send("did:s1", "did:r3", "c0".into()).await,
        Appended::Refused(Quota::Sender)
    );
    assert!(matches!(
        send("did:s2", "did:r3", "c1".into()).await,
        Appended::Stored { .. }
    ));
    assert!(matches!(
        send("did:s2", "did:r3", "c2".into()).await,
        Appended::Stored { .. }
    ));
    assert_eq!(
        send("did:s3", "did:r4", "d0".into()).await,
        Appended::Refused(Quota::Total)
    );
    assert_eq!(p.b.mailboxes.depth("did:r1").await.unwrap(), 3);
    assert_eq!(p.b.mailboxes.sender_depth("did:s1").await.unwrap(), 4);
    assert_eq!(p.b.mailboxes.totals().await.unwrap().messages, 6);
    // Room again once the recipient acknowledges.
    assert!(p.b.mailboxes.ack("did:r1", "a0").await.unwrap());
    assert!(matches!(
        send("did:s3", "did:r1", "a4".into()).await,
        Appended::Stored { .. }
    ));
}

pub async fn expiry(p: Pair) {
    let soon = Timestamp(NOW.0 + 10);
    p.a.mailboxes
        .append(msg("did:s", "did:r", "short", soon), NOW)
        .await
        .unwrap();
    p.a.mailboxes
        .append(msg("did:s", "did:r", "long", later()), NOW)
        .await
        .unwrap();
    // An expiry beyond max_ttl is clamped.
    p.a.mailboxes
        .append(msg("did:s", "did:r2", "far", Timestamp(u64::MAX)), NOW)
        .await
        .unwrap();
    let far = p.a.mailboxes.fetch("did:r2", 0, 10, NOW).await.unwrap();
    assert_eq!(far[0].expires_at, Timestamp(NOW.0 + 72 * HOUR));

    let at = Timestamp(NOW.0 + 50);
    let fetched = p.b.mailboxes.fetch("did:r", 0, 10, at).await.unwrap();
    let ids: Vec<&str> = fetched.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["long"]);
    assert_eq!(
        p.a.mailboxes.depth("did:r").await.unwrap(),
        1,
        "the fetch deleted the expired one"
    );
    if p.sweeps {
        let removed = p.a.mailboxes.expire(Timestamp(NOW.0 + 2 * HOUR), 100).await.unwrap();
        assert_eq!(removed, 1);
        assert_eq!(p.b.mailboxes.depth("did:r").await.unwrap(), 0);
        assert_eq!(p.b.mailboxes.depth("did:r2").await.unwrap(), 1);
    }
}

// ── Registry ─────────────────────────────────────────────────────────

pub async fn registry_crud(p: Pair) {
    let record = agent("did:mesh:one", &["search", "summarize"], NOW.0);
    assert_eq!(
        p.a.registry.create_agent(record.clone(), 10).await.unwrap(),
        Created::Created
    );
    assert_eq!(
        p.b.registry.create_agent(record.clone(), 10).await.unwrap(),
        Created::Exists
    );
    assert_eq!(
        p.b.registry.get_agent("did:mesh:one").await.unwrap(),
        Some(record.clone())
    );
    assert_eq!(p.b.registry.agent_count().await.unwrap(), 1);

    // A heartbeat through the other handle.
    let seen = NOW.0 + 5_000;
    let (updated, written) =
        p.b.registry
            .update_agent("did:mesh:one", &move |r: &mut AgentRecord| {
                r.last_seen = seen;
                r.last_heartbeat = Some(seen);
                r.capabilities.push("sneaky".into());
                true
            })
            .await
            .unwrap()
            .unwrap();
    assert!(written);
    assert_eq!(updated.last_seen, seen);
    assert_eq!(updated.capabilities, ["search", "summarize"], "capabilities are fixed");
    let stored = p.a.registry.get_agent("did:mesh:one").await.unwrap().unwrap();
    assert_eq!(stored, updated);
    // A change that declines to write leaves the record.
    let (same, written) =
        p.a.registry
            .update_agent("did:mesh:one", &|r: &mut AgentRecord| {
                r.last_seen = 0;
                false
            })
            .await
            .unwrap()
            .unwrap();
    assert!(!written);
    assert_eq!(same.last_seen, seen);
    assert_eq!(
        p.a.registry
            .update_agent("did:mesh:none", &|_: &mut AgentRecord| true)
            .await
            .unwrap(),
        None
    );

    // The cap.
    assert_eq!(
        p.a.registry
            .create_agent(agent("did:mesh:two", &[], NOW.0), 1)
            .await
            .unwrap(),
        Created::Full
    );
    assert_eq!(
        p.a.registry
            .create_agent(agent("did:mesh:two", &[], NOW.0), 2)
            .await
            .unwrap(),
        Created::Created
    );

    assert!(p
        .a
        .registry
        .set_one_time_keys("did:mesh:one", vec![otk(1), otk(2)])
        .await
        .unwrap());
    assert!(!p
        .a
        .registry
        .set_one_time_keys("did:mesh:none", vec![otk(1)])
        .await
        .unwrap());
    assert!(p.b.registry.delete_agent("did:mesh:one").await.unwrap());
    assert!(!p.a.registry.delete_agent("did:mesh:one").await.unwrap());
    assert_eq!(p.a.registry.get_agent("did:mesh:one").await.unwrap(), None);
    assert_eq!(p.a.registry.one_time_key_count("did:mesh:one").await.unwrap(), 0);
    assert!(p.a.registry.discover("search", 10).await.unwrap().is_empty());
    assert_eq!(p.a.registry.agent_count().await.unwrap(), 1);
    // Registering again after deletion works.
    assert_eq!(p.b.registry.create_agent(record, 10).await.unwrap(), Created::Created);
}

pub async fn discovery_by_capability(p: Pair) {
    for (i, caps) in [&["x", "y"][..], &["y"], &["x"], &["x", "z"], &["z"]]
        .iter()
        .enumerate()
    {
        let store = if i % 2 == 0 { &p.a } else { &p.b };
        let out = store
            .registry
            .create_agent(agent(&format!("did:mesh:{i}"), caps, NOW.0), 100)
            .await
            .unwrap();
        assert_eq!(out, Created::Created);
    }
    let dids = |records: Vec<AgentRecord>| records.into_iter().map(|r| r.did).collect::<Vec<_>>();
    assert_eq!(
        dids(p.a.registry.discover("x", 10).await.unwrap()),
        ["did:mesh:0", "did:mesh:2", "did:mesh:3"]
    );
    assert_eq!(
        dids(p.b.registry.discover("x", 2).await.unwrap()),
        ["did:mesh:0", "did:mesh:2"]
    );
    assert!(p.a.registry.discover("nothing", 10).await.unwrap().is_empty());
    assert!(p.b.registry.delete_agent("did:mesh:2").await.unwrap());
    assert_eq!(
        dids(p.a.registry.discover("x", 10).await.unwrap()),
        ["did:mesh:0", "did:mesh:3"]
    );
}

/// 200 concurrent consumes of 100 keys through two handles: each key is
/// handed out exactly once.
pub async fn one_time_keys_consumed_once(p: Pair) {
    p.a.registry
        .create_agent(agent("did:mesh:bob", &[], NOW.0), 10)
        .await
        .unwrap();
    // FIFO first.
    p.a.registry
        .set_one_time_keys("did:mesh:bob", vec![otk(10), otk(11), otk(12)])
        .await
        .unwrap();
    assert_eq!(
        p.b.registry.consume_one_time_key("did:mesh:bob").await.unwrap(),
        Some(otk(10))
    );
    assert_eq!(p.b.registry.one_time_key_count("did:mesh:bob").await.unwrap(), 2);

    let keys: Vec<OneTimeKey> = (0..100).map(otk).collect();
    assert!(p.a.registry.set_one_time_keys("did:mesh:bob", keys).await.unwrap());
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = if i % 2 == 0 { p.a.clone() } else { p.b.clone() };
        tasks.push(tokio::spawn(async move {
            store.registry.consume_one_time_key("did:mesh:bob").await.unwrap()
        }));
    }
    let mut handed = Vec::new();
    let mut none = 0;
    for task in tasks {
        match task.await.unwrap() {
            Some(key) => handed.push(key.key_id.as_u64().unwrap()),
            None => none += 1,
        }
    }
    let distinct: BTreeSet<u64> = handed.iter().copied().collect();
    assert_eq!(handed.len(), 100, "every key handed out");
    assert_eq!(distinct.len(), 100, "no key handed out twice");
    assert_eq!(distinct, (0..100).collect::<BTreeSet<u64>>());
    assert_eq!(none, 100);
    assert_eq!(p.a.registry.one_time_key_count("did:mesh:bob").await.unwrap(), 0);
    assert_eq!(p.b.registry.consume_one_time_key("did:mesh:bob").await.unwrap(), None);
}

pub async fn agent_expiry(p: Pair) {
    p.a.registry
        .create_agent(agent("did:mesh:old", &["x"], 1_000), 10)
        .await
        .unwrap();
    p.a.registry
        .create_agent(agent("did:mesh:new", &["x"], 5_000), 10)
        .await
        .unwrap();
    p.a.registry
        .set_one_time_keys("did:mesh:old", vec![otk(1)])
        .await
        .unwrap();
    // A heartbeat keeps "old2" alive.
    p.b.registry
        .create_agent(agent("did:mesh:old2", &[], 1_000), 10)
        .await
        .unwrap();
    p.b.registry
        .update_agent("did:mesh:old2", &|r: &mut AgentRecord| {
            r.last_seen = 9_000;
            true
        })
        .await
        .unwrap();
    let expired = p.b.registry.expire_agents(Timestamp(3_000), 100).await.unwrap();
    assert_eq!(expired, ["did:mesh:old"]);
    assert_eq!(p.a.registry.get_agent("did:mesh:old").await.unwrap(), None);
    assert_eq!(p.a.registry.one_time_key_count("did:mesh:old").await.unwrap(), 0);
    let found: Vec<String> =
        p.a.registry
            .discover("x", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.did)
            .collect();
    assert_eq!(found, ["did:mesh:new"]);
    assert_eq!(p.a.registry.agent_count().await.unwrap(), 2);
}

// ── Proof memory ─────────────────────────────────────────────────────

/// A proof claimed through one handle is refused through the other.
pub async fn proof_replay_refused_across_handles(p: Pair) {
    let expires = Timestamp(NOW.0 + 600_000);
    let sig = [9u8; 64];
    assert_eq!(p.a.proofs.claim("did:mesh:a", &sig, expires, NOW), Ok(()));
    assert_eq!(
        p.b.proofs.claim("did:mesh:a", &sig, expires, NOW),
        Err(ClaimError::Replayed)
    );
    assert_eq!(
        p.a.proofs.claim("did:mesh:a", &sig, expires, NOW),
        Err(ClaimError::Replayed)
    );
    // Same bytes, another DID: another proof.
    assert_eq!(p.b.proofs.claim("did:mesh:b", &sig, expires, NOW), Ok(()));
    // Remembered at the expiry instant, claimable after it.
    assert_eq!(
        p.b.proofs
            .claim("did:mesh:a", &sig, Timestamp(expires.0 + 600_000), expires),
        Err(ClaimError::Replayed)
    );
    let after = Timestamp(expires.0 + 1);
    assert_eq!(
        p.b.proofs.claim("did:mesh:a", &sig, Timestamp(after.0 + 1000), after),
        Ok(())
    );
    assert!(p.a.proofs.live() >= 1);
}

/// Runs the whole suite for a backend; `$open` is an async fn
/// `(StorageLimits) -> Pair`.
#[macro_export]
macro_rules! conformance {
    ($open:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn mailbox_order_and_cursor() {
            let Some(p) = $open(storage_support::limits()).await else {
                return;
            };
            storage_support::mailbox_order_and_cursor(p).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn fetch_is_bounded_by_batch() {
            let Some(p) = $open(storage_support::limits()).await else {
                return;
            };
            storage_support::fetch_is_bounded_by_batch(p).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn ack_only_by_recipient() {
            let Some(p) = $open(storage_support::limits()).await else {
                return;
            };
            storage_support::ack_only_by_recipient(p).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn dedupe_per_recipient() {
            let Some(p) = $open(storage_support::limits()).await else {
                return;
            };
            storage_support::dedupe_per_recipient(p).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn quotas() {
            let Some(p) = $open(storage_support::quota_limits()).await else {
                return;
            };
            storage_support::quotas(p).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn expiry() {
            let Some(p) = $open(storage_support::limits()).await else {
                return;
            };
            storage_support::expiry(p).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn registry_crud() {
            let Some(p) = $open(storage_support::limits()).await else {
                return;
            };
            storage_support::registry_crud(p).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn discovery_by_capability() {
            let Some(p) = $open(storage_support::limits()).await else {
                return;
            };
            storage_support::discovery_by_capability(p).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn one_time_keys_consumed_once() {
            let Some(p) = $open(storage_support::limits()).await else {
                return;
            };
            storage_support::one_time_keys_consumed_once(p).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn agent_expiry() {
            let Some(p) = $open(storage_support::limits()).await else {
                return;
            };
            storage_support::agent_expiry(p).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn proof_replay_refused_across_handles() {
            let Some(p) = $open(storage_support::limits()).await else {
                return;
            };
            storage_support::proof_replay_refused_across_handles(p).await;
        }
    };
}
