//! The SQLite store: round trips, incremental commits, limits, damage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod persist_support;

use meshwire::persist::seen_trim_slack;
use meshwire::persist::{
    Commit, InboxEntry, Limits, MemoryPersistence, OutboxEntry, PersistError, Persistence, Snapshot, SqliteOptions,
    SqliteStore, MAX_META_ENTRIES, SCHEMA_VERSION,
};
use meshwire::proto::mesh::MeshConfig;
use persist_support::*;
use rand_core::OsRng;
use zeroize::Zeroizing;

fn inbox(from: &str, id: &str, payload: &[u8]) -> InboxEntry {
    InboxEntry {
        from: from.into(),
        id: id.into(),
        payload: Zeroizing::new(payload.to_vec()),
        received_at_ms: 1_700_000_000_000,
        plaintext: false,
    }
}

fn outbox(peer: &str, id: &str, payload: &[u8]) -> OutboxEntry {
    OutboxEntry {
        peer: peer.into(),
        id: id.into(),
        payload: Zeroizing::new(payload.to_vec()),
        created_at_ms: 1_700_000_000_001,
    }
}

fn text(s: &str) -> Option<Zeroizing<String>> {
    Some(Zeroizing::new(s.to_owned()))
}

fn plain_inbox() -> InboxEntry {
    let mut plain = inbox("did:mesh:a", "m3", b"{}");
    plain.plaintext = true;
    plain.received_at_ms = 7;
    plain
}

/// Writes every kind of row, in two commits.
fn write_all(store: &dyn Persistence) {
    let mut c = Commit::new();
    c.prekeys = text(r#"{"pk":1}"#);
    c.put_peer("did:mesh:b", text(r#"{"peer":"b"}"#));
    c.put_peer("did:mesh:a", text(r#"{"peer":"a"}"#));
    c.put_peer("did:mesh:gone", text(r#"{"peer":"gone"}"#));
    c.add_inbox(inbox("did:mesh:b", "m2", b"second?"));
    c.add_inbox(inbox("did:mesh:a", "m1", b"\x00\xffbinary"));
    c.add_inbox(inbox("did:mesh:a", "acked", b"x"));
    c.add_outbox(outbox("did:mesh:b", "o1", b"to b 1"));
    c.add_outbox(outbox("did:mesh:a", "o2", b"to a 1"));
    c.add_outbox(outbox("did:mesh:b", "sent", b"relay acked"));
    c.add_outbox(outbox("did:mesh:b", "o3", b"to b 2"));
    c.set_meta("app.cursor", Some("41".into()));
    c.set_meta("app.gone", Some("x".into()));
    store.commit(&c).unwrap();
    let mut c = Commit::new();
    c.add_inbox(plain_inbox());
    c.add_inbox(inbox("did:mesh:b", "m2", b"a duplicate is not stored twice"));
    c.remove_inbox("did:mesh:a", "acked");
    c.remove_outbox("did:mesh:b", "sent");
    c.put_peer("did:mesh:gone", None);
    c.set_meta("app.cursor", Some("42".into()));
    c.set_meta("app.gone", None);
    store.commit(&c).unwrap();
}

fn check_all(s: &Snapshot) {
    assert_eq!(s.prekeys.as_deref().map(String::as_str), Some(r#"{"pk":1}"#));
    let peers: Vec<(&str, &str)> = s.peers.iter().map(|(d, r)| (d.as_str(), r.as_str())).collect();
    assert_eq!(
        peers,
        [("did:mesh:a", r#"{"peer":"a"}"#), ("did:mesh:b", r#"{"peer":"b"}"#)]
    );
    assert_eq!(
        s.inbox,
        [
            inbox("did:mesh:b", "m2", b"second?"),
            inbox("did:mesh:a", "m1", b"\x00\xffbinary"),
            plain_inbox()
        ],
        "arrival order, acked row gone, duplicate ignored"
    );
    let order: Vec<&str> = s.outbox.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(order, ["o1", "o2", "o3"]);
    assert_eq!(s.outbox[2], outbox("did:mesh:b", "o3", b"to b 2"));
    assert_eq!(s.meta.len(), 1, "the store's own entries are not listed: {:?}", s.meta);
    assert_eq!(s.meta.get("app.cursor").map(String::as_str), Some("42"));
}

#[test]
fn sqlite_round_trip_across_reopen() {
    let dir = temp_dir("round-trip");
    let path = dir.join("agent.db");
    let store = SqliteStore::open(&path).unwrap();
    assert!(!store.is_encrypted());
    let empty = store.load().unwrap();
    assert!(empty.prekeys.is_none() && empty.peers.is_empty() && empty.inbox.is_empty());
    write_all(&store);
    check_all(&store.load().unwrap());
    assert_eq!(store.stats().commits, 2);
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    check_all(&store.load().unwrap());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    drop(store);
    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Schema 2 -> 3: a store written by the previous release (rebuilt here
/// from a current one: the outbox with its per-peer `seq` and index, the
/// duplicate-id memory with a rowid) opens, migrates in place and loads
/// the same rows in the same order, and takes new ones.
#[test]
fn a_schema_2_store_is_migrated_with_its_rows() {
    let dir = temp_dir("schema-2");
    let path = dir.join("agent.db");
    let store = SqliteStore::open(&path).unwrap();
    write_all(&store);
    let mut c = Commit::new();
    c.seen_limit = 100;
    for id in ["s1", "s2", "s3"] {
        c.seen.push(("did:mesh:b".into(), id.into()));
    }
    c.seen.push(("did:mesh:a".into(), "sa".into()));
    store.commit(&c).unwrap();
    drop(store);
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE outbox_v2 (n INTEGER PRIMARY KEY, peer TEXT NOT NULL, seq INTEGER NOT NULL,
                 id TEXT NOT NULL, created_at INTEGER NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL,
                 UNIQUE (peer, seq), UNIQUE (peer, id));
             INSERT INTO outbox_v2 SELECT n, peer, n, id, created_at, size, payload FROM outbox;
             DROP TABLE outbox;
             ALTER TABLE outbox_v2 RENAME TO outbox;
             CREATE TABLE seen_v2 (seq INTEGER PRIMARY KEY, peer TEXT NOT NULL, n INTEGER NOT NULL,
                 id TEXT NOT NULL, UNIQUE (peer, id), UNIQUE (peer, n));
             INSERT INTO seen_v2 (peer, n, id) SELECT peer, n, id FROM seen ORDER BY peer DESC, n;
             DROP TABLE seen;
             ALTER TABLE seen_v2 RENAME TO seen;
             PRAGMA user_version = 2;",
        )
        .unwrap();
    }
    let schema = |path: &std::path::Path| -> String {
        let conn = rusqlite::Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT sql FROM sqlite_master WHERE name IN ('outbox', 'seen') ORDER BY name")
            .unwrap();
        let rows: Vec<String> = stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        rows.join("\n")
    };
    assert!(schema(&path).contains("seq INTEGER NOT NULL"), "the rebuilt schema 2");

    let store = SqliteStore::open(&path).unwrap();
    let s = store.load().unwrap();
    check_all(&s);
    assert_eq!(s.seen["did:mesh:b"], ["s1", "s2", "s3"]);
    assert_eq!(s.seen["did:mesh:a"], ["sa"]);
    // New rows go after the migrated ones.
    let mut c = Commit::new();
    c.seen_limit = 100;
    c.seen.push(("did:mesh:b".into(), "s4".into()));
    c.seen.push(("did:mesh:b".into(), "s2".into())); // already there: one row
    c.add_outbox(outbox("did:mesh:a", "o4", b"to a 2"));
    store.commit(&c).unwrap();
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    let s = store.load().unwrap();
    assert_eq!(s.seen["did:mesh:b"], ["s1", "s2", "s3", "s4"]);
    let order: Vec<&str> = s.outbox.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(order, ["o1", "o2", "o3", "o4"]);
    drop(store);
    let schema = schema(&path);
    assert!(!schema.contains("seq") && schema.contains("WITHOUT ROWID"), "{schema}");
    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn memory_persistence_round_trip() {
    let store = MemoryPersistence::new();
    write_all(&store);
    check_all(&store.load().unwrap());
}

/// The mesh rows round-trip into a working mesh: a restored agent goes on
/// with its session.
#[test]
fn a_restored_mesh_continues_its_session() {
    let dir = temp_dir("mesh");
    let path = dir.join("bob.db");
    let mut alice = agent("a", 2);
    let mut bob = agent("b", 3);
    converse(&mut alice, &mut bob);
    let seed = bob.identity().seed();
    let store = SqliteStore::open(&path).unwrap();
    // Bob's pre-keys changed (a one-time key was consumed) and so did his
    // peer: the dirty rows are the whole state here.
    let first = Commit::from_dirty(&mut bob);
    assert!(first.prekeys.is_some());
    assert_eq!(first.peers.len(), 1);
    store.commit(&first).unwrap();
    assert!(Commit::from_dirty(&mut bob).is_empty(), "nothing changed since");
    drop(store);
    let snapshot = SqliteStore::open(&path).unwrap().load().unwrap();
    let identity = meshwire::Identity::from_seed(&seed);
    let mut restored = snapshot
        .restore_mesh(identity, MeshConfig::default(), ids("b2"))
        .unwrap()
        .expect("a state");
    assert_eq!(restored.export_state().as_str(), bob.export_state().as_str());
    let (_, m) = alice.encrypt(&mut OsRng, T0, &did(&restored), b"[2]").unwrap();
    assert_eq!(messages(&deliver(&mut restored, &m)), ["[2]"]);
    // A store that never held a state restores nothing.
    let fresh = SqliteStore::open(dir.join("new.db")).unwrap().load().unwrap();
    assert!(fresh
        .restore_mesh(
            meshwire::Identity::generate(&mut OsRng),
            MeshConfig::default(),
            ids("x")
        )
        .unwrap()
        .is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A commit of one peer's ratchet step writes that row only: the other
/// rows keep their exact stored bytes (with encryption every rewrite
/// would change them: a fresh nonce per value).
#[test]
fn an_incremental_commit_touches_one_row() {
    let dir = temp_dir("incremental");
    let path = dir.join("alice.db");
    let key = meshwire::persist::AtRestKey::from_bytes(Zeroizing::new([9; 32]));
    let open = || SqliteOptions::new().key(key.clone()).open(&path).unwrap();
    let mut alice = agent("a", 2);
    let mut bob = agent("b", 3);
    let mut carol = agent("c", 3);
    let mut dave = agent("d", 3);
    converse(&mut alice, &mut bob);
    converse(&mut alice, &mut carol);
    converse(&mut alice, &mut dave);
    let store = open();
    let all = Commit::full(&mut alice);
    assert_eq!(all.peers.len(), 3);
    assert!(all.prekeys.is_some());
    assert!(Commit::from_dirty(&mut alice).is_empty(), "full() clears the dirty set");
    store.commit(&all).unwrap();
    drop(store);
    let before = raw_rows(&path, "SELECT did, data FROM peers ORDER BY did");
    let prekeys_before = raw_rows(&path, "SELECT 'p', data FROM prekeys");

    // One message to carol.
    alice.encrypt(&mut OsRng, T0, &did(&carol), b"[3]").unwrap();
    let step = Commit::from_dirty(&mut alice);
    assert_eq!(step.peers.len(), 1, "{step:?}");
    assert_eq!(step.peers[0].0, did(&carol));
    assert!(step.prekeys.is_none());
    let store = open();
    store.commit(&step).unwrap();
    drop(store);
    let after = raw_rows(&path, "SELECT did, data FROM peers ORDER BY did");
    assert_eq!(raw_rows(&path, "SELECT 'p', data FROM prekeys"), prekeys_before);
    assert_eq!(before.len(), 3);
    for ((d0, b0), (d1, b1)) in before.iter().zip(&after) {
        assert_eq!(d0, d1);
        if *d0 == did(&carol) {
            assert_ne!(b0, b1, "carol's row was written");
        } else {
            assert_eq!(b0, b1, "{d0}'s row untouched");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inbox_and_outbox_limits_refuse_the_whole_commit() {
    let dir = temp_dir("limits");
    let limits = Limits {
        max_inbox_rows: 3,
        max_inbox_bytes: 100,
        max_outbox_rows: 2,
        max_outbox_bytes: 1000,
    };
    let path = dir.join("agent.db");
    let store = SqliteOptions::new().limits(limits).open(&path).unwrap();
    let memory = MemoryPersistence::with_limits(limits);
    for s in [&store as &dyn Persistence, &memory] {
        let mut c = Commit::new();
        c.add_inbox(inbox("did:mesh:a", "1", &[1; 40]));
        c.add_inbox(inbox("did:mesh:a", "2", &[2; 40]));
        s.commit(&c).unwrap();
        // Bytes: 40 + 40 + 40 > 100. The peer row of the same commit is
        // not written either.
        let mut c = Commit::new();
        c.put_peer("did:mesh:a", text("{}"));
        c.add_inbox(inbox("did:mesh:a", "3", &[3; 40]));
        let err = s.commit(&c).unwrap_err();
        assert!(
            matches!(
                err,
                PersistError::InboxFull {
                    rows: 3,
                    bytes: 120,
                    max_rows: 3,
                    max_bytes: 100
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("inbox full"), "{err}");
        let snap = s.load().unwrap();
        assert_eq!(snap.inbox.len(), 2);
        assert!(snap.peers.is_empty(), "nothing of a refused commit is written");
        // Rows: a third small one fits, a fourth does not.
        s.commit(Commit::new().add_inbox(inbox("did:mesh:a", "3", &[3; 10])))
            .unwrap();
        let err = s
            .commit(Commit::new().add_inbox(inbox("did:mesh:a", "4", &[4; 1])))
            .unwrap_err();
        assert!(matches!(err, PersistError::InboxFull { rows: 4, .. }), "{err}");
        // An ack in the same commit makes room.
        let mut c = Commit::new();
        c.remove_inbox("did:mesh:a", "1");
        c.add_inbox(inbox("did:mesh:a", "4", &[4; 1]));
        s.commit(&c).unwrap();
        // Outbox.
        s.commit(Commit::new().add_outbox(outbox("did:mesh:b", "o1", b"x")))
            .unwrap();
        s.commit(Commit::new().add_outbox(outbox("did:mesh:b", "o2", b"x")))
            .unwrap();
        let err = s
            .commit(Commit::new().add_outbox(outbox("did:mesh:b", "o3", b"x")))
            .unwrap_err();
        assert!(
            matches!(
                err,
                PersistError::OutboxFull {
                    rows: 3,
                    max_rows: 2,
                    ..
                }
            ),
            "{err}"
        );
        let ids: Vec<String> = s.load().unwrap().outbox.into_iter().map(|o| o.id).collect();
        assert_eq!(ids, ["o1", "o2"]);
    }
    assert_eq!(store.stats().refused_inbox_full, 2);
    assert_eq!(store.stats().refused_outbox_full, 1);
    assert_eq!(memory.stats().refused_inbox_full, 2);
    drop(store);
    // The totals are counted again on open: still full.
    let store = SqliteOptions::new().limits(limits).open(&path).unwrap();
    let err = store
        .commit(Commit::new().add_outbox(outbox("did:mesh:b", "o3", b"x")))
        .unwrap_err();
    assert!(matches!(err, PersistError::OutboxFull { .. }), "{err}");
    // Removing only is never refused, even over a lowered limit.
    drop(store);
    let tight = Limits {
        max_inbox_rows: 0,
        max_outbox_rows: 0,
        ..limits
    };
    let store = SqliteOptions::new().limits(tight).open(&path).unwrap();
    store.commit(Commit::new().remove_outbox("did:mesh:b", "o1")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn meta_keys_are_checked() {
    let dir = temp_dir("meta");
    let store = SqliteStore::open(dir.join("agent.db")).unwrap();
    for (key, value) in [
        ("meshwire.cipher", "none".to_owned()),
        ("", "x".to_owned()),
        ("big", "x".repeat(meshwire::persist::MAX_META_VALUE_BYTES + 1)),
    ] {
        let err = store.commit(Commit::new().set_meta(key, Some(value))).unwrap_err();
        assert!(matches!(err, PersistError::Meta { .. }), "{err}");
    }
    let mut c = Commit::new();
    for i in 0..MAX_META_ENTRIES {
        c.set_meta(format!("k{i}"), Some(String::new()));
    }
    store.commit(&c).unwrap();
    let err = store
        .commit(Commit::new().set_meta("one.more", Some("x".into())))
        .unwrap_err();
    assert!(matches!(err, PersistError::Meta { .. }), "{err}");
    assert_eq!(store.load().unwrap().meta.len(), MAX_META_ENTRIES);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reset_mesh_keeps_inbox_and_outbox() {
    let dir = temp_dir("reset");
    let store = SqliteStore::open(dir.join("agent.db")).unwrap();
    write_all(&store);
    store.reset_mesh().unwrap();
    let s = store.load().unwrap();
    assert!(s.prekeys.is_none() && s.peers.is_empty());
    assert_eq!((s.inbox.len(), s.outbox.len(), s.meta.len()), (3, 3, 1));
    let _ = std::fs::remove_dir_all(&dir);
}

fn expect_corrupt(result: Result<impl std::fmt::Debug, PersistError>, path: &std::path::Path) -> String {
    match result {
        Err(e @ PersistError::Corrupt { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&path.display().to_string()), "names the file: {text}");
            text
        }
        other => panic!("expected Corrupt naming {}, got {other:?}", path.display()),
    }
}

#[test]
fn a_corrupt_database_file_is_a_typed_error_naming_it() {
    let dir = temp_dir("corrupt");
    // Not a database at all.
    let garbage = dir.join("garbage.db");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let before = file_bytes(&garbage);
    let message = expect_corrupt(SqliteStore::open(&garbage), &garbage);
    assert!(message.contains("not a database"), "{message}");
    assert_eq!(file_bytes(&garbage), before, "left as it was");

    // An SQLite database that is not a meshwire store.
    let foreign = dir.join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    expect_corrupt(SqliteStore::open(&foreign), &foreign);

    // A real store, truncated in the middle of its pages.
    let path = dir.join("agent.db");
    let store = SqliteStore::open(&path).unwrap();
    let mut c = Commit::new();
    for i in 0..200 {
        c.add_inbox(inbox("did:mesh:a", &i.to_string(), &[7; 1000]));
    }
    store.commit(&c).unwrap();
    drop(store);
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len > 100_000, "{len}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let result = SqliteStore::open(&path).and_then(|s| s.load());
    expect_corrupt(result, &path);

    // A row value edited on disk (plaintext store): a peer row that is not
    // UTF-8 is refused, naming the row.
    let path = dir.join("edited.db");
    SqliteStore::open(&path)
        .unwrap()
        .commit(Commit::new().put_peer("did:mesh:a", text("{}")))
        .unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("UPDATE peers SET data = x'ff00ff'", [])
        .unwrap();
    let message = expect_corrupt(SqliteStore::open(&path).unwrap().load(), &path);
    assert!(message.contains("did:mesh:a"), "{message}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = temp_dir("newer");
    let path = dir.join("agent.db");
    drop(SqliteStore::open(&path).unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(
        matches!(err, PersistError::TooNew { found, supported, .. } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(unix)]
#[test]
fn a_world_readable_store_or_a_second_opener_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("perms");
    let path = dir.join("agent.db");
    let store = SqliteStore::open(&path).unwrap();
    store.commit(Commit::new().put_peer("did:mesh:a", text("{}"))).unwrap();
    // One process at a time: a second opener is refused while the first
    // holds the store.
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, PersistError::Database { .. }), "{err}");
    assert!(err.to_string().contains("locked"), "{err}");
    drop(store);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, PersistError::Permissions { mode: 0o644, .. }), "{err}");
    // A link at the path is not followed.
    let link = dir.join("link.db");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(SqliteStore::open(&link).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Side rows (schema 2): the duplicate-id memory keeps the newest
/// `seen_limit` ids per peer, unconfirmed rows keep their position when
/// rewritten, and deleting a peer's row deletes its side rows, in both
/// stores alike.
#[test]
fn side_rows_are_trimmed_rewritten_in_place_and_deleted_with_their_peer() {
    let dir = temp_dir("side-rows");
    let sqlite = SqliteStore::open(dir.join("agent.db")).unwrap();
    let memory = MemoryPersistence::new();
    for store in [&sqlite as &dyn Persistence, &memory] {
        let mut c = Commit::new();
        c.put_peer("did:mesh:p", text("{}"));
        c.seen_limit = 3;
        for i in 0..5 {
            c.seen.push(("did:mesh:p".into(), format!("m{i}")));
        }
        c.seen.push(("did:mesh:p".into(), "m4".into())); // a duplicate id is one row
        for id in ["u1", "u2", "u3"] {
            c.unconfirmed.push((
                "did:mesh:p".into(),
                id.into(),
                text(&format!("{{\"id\":\"{id}\",\"v\":1}}")),
            ));
        }
        store.commit(&c).unwrap();
        let mut c = Commit::new();
        c.seen_limit = 3;
        c.unconfirmed
            .push(("did:mesh:p".into(), "u1".into(), text("{\"id\":\"u1\",\"v\":2}")));
        c.unconfirmed.push(("did:mesh:p".into(), "u2".into(), None));
        store.commit(&c).unwrap();
        let s = store.load().unwrap();
        assert_eq!(s.seen["did:mesh:p"], ["m2", "m3", "m4"], "{}", store.location());
        let rows: Vec<&str> = s.unconfirmed["did:mesh:p"].iter().map(|r| r.as_str()).collect();
        assert_eq!(rows, ["{\"id\":\"u1\",\"v\":2}", "{\"id\":\"u3\",\"v\":1}"]);
        let mut c = Commit::new();
        c.put_peer("did:mesh:p", None);
        store.commit(&c).unwrap();
        let s = store.load().unwrap();
        assert!(s.seen.is_empty() && s.unconfirmed.is_empty() && s.peers.is_empty());
    }
}

/// The duplicate-id rows of a peer are trimmed in steps: they grow to
/// `seen_limit + seen_trim_slack` and the commit that would pass that
/// deletes back to the newest `seen_limit` (one delete per few messages,
/// not one per message). What loads is always the newest ids, in order,
/// and a state machine restored from it keeps the newest `seen_limit`.
#[test]
fn duplicate_ids_are_trimmed_in_steps_and_always_keep_the_newest() {
    let dir = temp_dir("seen-slack");
    let store = SqliteStore::open(dir.join("agent.db")).unwrap();
    let limit = 32;
    let slack = seen_trim_slack(limit);
    assert_eq!(slack, 2);
    assert_eq!(seen_trim_slack(4096), 256);
    assert_eq!(seen_trim_slack(15), 0, "a small limit is kept exactly");
    let mut c = Commit::new();
    c.put_peer("did:mesh:p", text("{}"));
    store.commit(&c).unwrap();
    let mut lens = Vec::new();
    for i in 0..44usize {
        let mut c = Commit::new();
        c.seen_limit = limit;
        c.seen.push(("did:mesh:p".into(), format!("m{i:02}")));
        store.commit(&c).unwrap();
        let ids = store.load().unwrap().seen.remove("did:mesh:p").unwrap_or_default();
        let newest: Vec<String> = ((i + 1 - ids.len())..=i).map(|k| format!("m{k:02}")).collect();
        assert_eq!(ids, newest, "after m{i:02}: the newest ids, oldest first");
        lens.push(ids.len());
    }
    // 1..=34 rows, then the 35th trims to 32; then 33, 34, trim again.
    let mut expected: Vec<usize> = (1..=limit + slack).collect();
    while expected.len() < 44 {
        expected.extend([limit, limit + 1, limit + 2]);
    }
    expected.truncate(44);
    assert_eq!(lens, expected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An unconfirmed row is sealed for its place: moved to another key, it
/// fails authentication instead of feeding another peer's retransmission.
#[test]
fn encrypted_unconfirmed_rows_cannot_be_moved() {
    let dir = temp_dir("side-rows-sealed");
    let path = dir.join("agent.db");
    let key = || meshwire::persist::AtRestKey::from_bytes(Zeroizing::new([7u8; 32]));
    {
        let store = meshwire::persist::SqliteOptions::new().key(key()).open(&path).unwrap();
        let mut c = Commit::new();
        c.put_peer("did:mesh:p", text("{}"));
        c.unconfirmed
            .push(("did:mesh:p".into(), "u1".into(), text("{\"payload\":\"secret\"}")));
        store.commit(&c).unwrap();
        assert!(!String::from_utf8_lossy(&file_bytes(&path)).contains("secret"));
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE unconfirmed SET id = 'u2'", []).unwrap();
    drop(conn);
    let store = meshwire::persist::SqliteOptions::new().key(key()).open(&path).unwrap();
    let err = store.load().unwrap_err();
    assert!(matches!(err, PersistError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("unconfirmed row"), "{err}");
}
