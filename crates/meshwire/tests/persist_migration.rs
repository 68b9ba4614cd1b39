//! Migration from the JSON state file of `FileStore` (today's format).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod persist_support;

use meshwire::persist::{AtRestKey, PersistError, Persistence, SqliteOptions, SqliteStore};
use meshwire::proto::mesh::MeshConfig;
use meshwire::store::SessionStore;
use meshwire::{FileStore, Identity};
use persist_support::*;
use rand_core::OsRng;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Bob after a conversation, his identity seed, and the JSON state file
/// today's `FileStore` wrote for him.
fn bob_with_json_state(dir: &Path) -> (meshwire::proto::mesh::Mesh, Zeroizing<[u8; 32]>, PathBuf) {
    let mut alice = agent("a", 2);
    let mut bob = agent("b", 3);
    converse(&mut alice, &mut bob);
    let files = FileStore::new(dir.join("state"));
    files.save(&did(&bob), &bob.export_state()).unwrap();
    let json = files.path(&did(&bob));
    assert!(json.exists());
    let seed = bob.identity().seed();
    (bob, seed, json)
}

fn restore(store: &dyn Persistence, seed: &[u8; 32]) -> meshwire::proto::mesh::Mesh {
    store
        .load()
        .unwrap()
        .restore_mesh(Identity::from_seed(seed), MeshConfig::default(), ids("r"))
        .unwrap()
        .expect("a migrated state")
}

#[test]
fn the_json_state_is_imported_once_and_set_aside() {
    let dir = temp_dir("migrate");
    let (bob, seed, json) = bob_with_json_state(&dir);
    let json_bytes = file_bytes(&json);
    let db = dir.join("bob.db");
    let store = SqliteStore::open_migrating(&db, Some(&json)).unwrap();
    let restored = restore(&store, &seed);
    assert_eq!(
        restored.export_state().as_str(),
        bob.export_state().as_str(),
        "the same sessions"
    );
    assert!(!json.exists(), "set aside");
    let aside = PathBuf::from(format!("{}.migrated", json.display()));
    assert_eq!(file_bytes(&aside), json_bytes, "renamed, not rewritten");
    drop(store);
    // Opening again: nothing to migrate, the state is still there.
    let store = SqliteStore::open_migrating(&db, Some(&json)).unwrap();
    assert_eq!(
        restore(&store, &seed).export_state().as_str(),
        bob.export_state().as_str()
    );
    drop(store);

    // A crash between the import's commit and the rename: the JSON file is
    // still in place on the next open. It is set aside again, not
    // imported a second time (the store has moved on meanwhile).
    let store = SqliteStore::open(&db).unwrap();
    store
        .commit(meshwire::persist::Commit::new().put_peer("did:mesh:new", Some(Zeroizing::new("{}".into()))))
        .unwrap();
    drop(store);
    std::fs::copy(&aside, &json).unwrap();
    let store = SqliteStore::open_migrating(&db, Some(&json)).unwrap();
    assert!(!json.exists());
    assert!(PathBuf::from(format!("{}.migrated.1", json.display())).exists());
    let peers: Vec<String> = store.load().unwrap().peers.into_iter().map(|(d, _)| d).collect();
    assert!(peers.contains(&"did:mesh:new".to_owned()), "not overwritten: {peers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_store_with_a_state_refuses_a_foreign_json_file() {
    let dir = temp_dir("migrate-conflict");
    let (_, _, json) = bob_with_json_state(&dir);
    let db = dir.join("bob.db");
    let store = SqliteStore::open(&db).unwrap();
    let mut c = meshwire::persist::Commit::new();
    c.prekeys = Some(Zeroizing::new(r#"{"other":1}"#.into()));
    store.commit(&c).unwrap();
    drop(store);
    let before = file_bytes(&json);
    let err = SqliteStore::open_migrating(&db, Some(&json)).unwrap_err();
    assert!(
        matches!(&err, PersistError::Migration { json: j, .. } if *j == json),
        "{err}"
    );
    assert!(err.to_string().contains("already holds a state"), "{err}");
    assert_eq!(file_bytes(&json), before, "left in place");
    assert_eq!(
        SqliteStore::open(&db)
            .unwrap()
            .load()
            .unwrap()
            .prekeys
            .unwrap()
            .as_str(),
        r#"{"other":1}"#
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_malformed_json_state_imports_nothing() {
    let dir = temp_dir("migrate-bad");
    let db = dir.join("agent.db");
    for (i, text) in [
        "not json",
        r#"{"format":"other/1","prekeys":{},"peers":{}}"#,
        r#"{"format":"meshwire-mesh/1","prekeys":[],"peers":{}}"#,
        r#"{"format":"meshwire-mesh/1","prekeys":{},"peers":{"did:mesh:a":3}}"#,
    ]
    .into_iter()
    .enumerate()
    {
        let json = dir.join(format!("bad{i}.json"));
        meshwire::store::write_private_atomic(&json, text.as_bytes()).unwrap();
        let err = SqliteStore::open_migrating(&db, Some(&json)).unwrap_err();
        assert!(matches!(err, PersistError::Migration { .. }), "{text}: {err}");
        assert!(json.exists(), "left in place");
        let s = SqliteStore::open(&db).unwrap().load().unwrap();
        assert!(
            s.prekeys.is_none() && s.peers.is_empty(),
            "nothing imported from {text}"
        );
    }
    // A missing JSON file is no error: nothing to migrate.
    SqliteStore::open_migrating(&db, Some(&dir.join("absent.json"))).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn migration_into_an_encrypted_store() {
    let dir = temp_dir("migrate-enc");
    let (bob, seed, json) = bob_with_json_state(&dir);
    let db = dir.join("bob.db");
    let key = AtRestKey::from_bytes(Zeroizing::new([4; 32]));
    let store = SqliteOptions::new()
        .key(key.clone())
        .migrate_from(&json)
        .open(&db)
        .unwrap();
    assert_eq!(
        restore(&store, &seed).export_state().as_str(),
        bob.export_state().as_str()
    );
    drop(store);
    // The pre-keys' private parts are not in the database in clear.
    let state = bob.export_state();
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    let spk = v["prekeys"].to_string();
    assert!(spk.len() > 40);
    let db_bytes = file_bytes(&db);
    assert!(!db_bytes.windows(40).any(|w| w == &spk.as_bytes()[..40]));
    assert!(matches!(SqliteStore::open(&db), Err(PersistError::KeyRequired { .. })));
    let store = SqliteOptions::new().key(key).open(&db).unwrap();
    assert_eq!(
        restore(&store, &seed).export_state().as_str(),
        bob.export_state().as_str()
    );
    let _ = OsRng;
    let _ = std::fs::remove_dir_all(&dir);
}
