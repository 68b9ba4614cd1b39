//! Encryption at rest: the store's secret values and the identity file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod persist_support;

use meshwire::persist::{
    load_identity_encrypted, load_or_create_identity_encrypted, save_identity_encrypted, Argon2Params, AtRestKey,
    Commit, InboxEntry, OutboxEntry, PersistError, Persistence, SqliteOptions, SqliteStore,
};
use meshwire::Identity;
use persist_support::*;
use rand_core::OsRng;
use std::collections::BTreeMap;
use std::path::Path;
use zeroize::Zeroizing;

const MARKER: &str = "SECRET-MARKER-7f3a";

fn raw_key(byte: u8) -> AtRestKey {
    AtRestKey::from_bytes(Zeroizing::new([byte; 32]))
}

/// Cheap Argon2id parameters: the tests run unoptimized.
fn passphrase(text: &str) -> AtRestKey {
    AtRestKey::from_passphrase(Zeroizing::new(text.to_owned())).with_argon2_params(Argon2Params {
        m_kib: 256,
        t: 1,
        p: 1,
    })
}

fn secret_commit() -> Commit {
    let mut c = Commit::new();
    c.prekeys = Some(Zeroizing::new(format!(r#"{{"prekeys":"{MARKER}"}}"#)));
    c.put_peer("did:mesh:a", Some(Zeroizing::new(format!(r#"{{"a":"{MARKER}"}}"#))));
    c.put_peer("did:mesh:b", Some(Zeroizing::new(r#"{"b":1}"#.to_owned())));
    c.add_inbox(InboxEntry {
        from: "did:mesh:a".into(),
        id: "m1".into(),
        payload: Zeroizing::new(format!("inbox {MARKER}").into_bytes()),
        received_at_ms: 1,
        plaintext: false,
    });
    c.add_inbox(InboxEntry {
        from: "did:mesh:b".into(),
        id: "m2".into(),
        payload: Zeroizing::new(b"other".to_vec()),
        received_at_ms: 2,
        plaintext: false,
    });
    c.add_outbox(OutboxEntry {
        peer: "did:mesh:a".into(),
        id: "o1".into(),
        payload: Zeroizing::new(format!("outbox {MARKER}").into_bytes()),
        created_at_ms: 3,
    });
    c
}

/// Every file in `dir` and its bytes.
fn dir_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Asserts that the files of `dir` and their bytes are as `before`,
/// naming the ones that differ.
fn assert_unchanged(dir: &Path, before: &BTreeMap<String, Vec<u8>>, after_what: &str) {
    let now = dir_bytes(dir);
    let differ: Vec<&String> = now
        .keys()
        .chain(before.keys())
        .filter(|k| now.get(*k) != before.get(*k))
        .collect();
    assert!(differ.is_empty(), "changed on disk after {after_what}: {differ:?}");
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn encrypted_values_round_trip_and_are_not_on_disk_in_clear() {
    let dir = temp_dir("enc-round-trip");
    for (name, key) in [
        ("plain", None),
        ("raw", Some(raw_key(1))),
        ("pass", Some(passphrase("hunter2"))),
    ] {
        let path = dir.join(format!("{name}.db"));
        let open = || {
            let mut o = SqliteOptions::new();
            if let Some(k) = &key {
                o = o.key(k.clone());
            }
            o.open(&path).unwrap()
        };
        let store = open();
        assert_eq!(store.is_encrypted(), key.is_some());
        store.commit(&secret_commit()).unwrap();
        // Before close: the WAL holds the commit.
        let on_disk: Vec<u8> = dir_bytes(&dir)
            .into_iter()
            .filter(|(n, _)| n.starts_with(name))
            .flat_map(|(_, b)| b)
            .collect();
        assert_eq!(
            contains(&on_disk, MARKER),
            key.is_none(),
            "{name}: marker in clear only without a key"
        );
        drop(store);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(contains(&on_disk, MARKER), key.is_none(), "{name} after checkpoint");
        let s = open().load().unwrap();
        assert!(s.prekeys.as_ref().unwrap().contains(MARKER));
        assert!(s.peers[0].1.contains(MARKER));
        assert_eq!(s.inbox[0].payload.as_slice(), format!("inbox {MARKER}").as_bytes());
        assert_eq!(s.outbox[0].payload.as_slice(), format!("outbox {MARKER}").as_bytes());
        assert_eq!(s.inbox[1].payload.as_slice(), b"other");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wrong_key_is_a_typed_error_and_changes_nothing_on_disk() {
    let dir = temp_dir("wrong-key");
    let raw = dir.join("raw.db");
    let pass = dir.join("pass.db");
    let plain = dir.join("plain.db");
    SqliteOptions::new()
        .key(raw_key(1))
        .open(&raw)
        .unwrap()
        .commit(&secret_commit())
        .unwrap();
    SqliteOptions::new()
        .key(passphrase("right"))
        .open(&pass)
        .unwrap()
        .commit(&secret_commit())
        .unwrap();
    SqliteStore::open(&plain).unwrap().commit(&secret_commit()).unwrap();
    let before = dir_bytes(&dir);
    assert_eq!(
        before.len(),
        3,
        "closed stores leave no side files: {:?}",
        before.keys()
    );

    let cases: Vec<(&Path, Option<AtRestKey>, &str)> = vec![
        (&raw, Some(raw_key(2)), "WrongKey"),
        (&raw, Some(passphrase("right")), "WrongKey"),
        (&raw, None, "KeyRequired"),
        (&pass, Some(passphrase("wrong")), "WrongKey"),
        (&pass, Some(raw_key(1)), "WrongKey"),
        (&pass, None, "KeyRequired"),
        (&plain, Some(raw_key(1)), "NotEncrypted"),
    ];
    for (path, key, expected) in cases {
        let mut options = SqliteOptions::new();
        if let Some(k) = key {
            options = options.key(k);
        }
        let err = options.open(path).unwrap_err();
        let kind = match &err {
            PersistError::WrongKey { path: p }
            | PersistError::KeyRequired { path: p }
            | PersistError::NotEncrypted { path: p } => {
                assert_eq!(p, path);
                format!("{err:?}").split_whitespace().next().unwrap().to_owned()
            }
            other => panic!("{}: {other}", path.display()),
        };
        assert_eq!(kind, expected, "{}: {err}", path.display());
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        assert_unchanged(&dir, &before, &err.to_string());
    }
    // The right keys still open.
    assert_eq!(
        SqliteOptions::new()
            .key(raw_key(1))
            .open(&raw)
            .unwrap()
            .load()
            .unwrap()
            .inbox
            .len(),
        2
    );
    assert_eq!(
        SqliteOptions::new()
            .key(passphrase("right"))
            .open(&pass)
            .unwrap()
            .load()
            .unwrap()
            .inbox
            .len(),
        2
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn swapped_or_edited_rows_fail_authentication() {
    let dir = temp_dir("swap");
    let path = dir.join("agent.db");
    let open = || SqliteOptions::new().key(raw_key(1)).open(&path).unwrap();
    open().commit(&secret_commit()).unwrap();
    let attacks = [
        // Swap two peers' rows.
        "UPDATE peers SET data = (SELECT data FROM peers p WHERE p.did <> peers.did)",
        // Move an inbox payload to another row.
        "UPDATE inbox SET payload = (SELECT payload FROM inbox WHERE id = 'm1') WHERE id = 'm2'",
        // Rename a row (the key is part of the associated data).
        "UPDATE outbox SET id = 'o2'",
        // Flip a byte.
        "UPDATE prekeys SET data = unhex(substr(hex(data), 1, 60) || '00' || substr(hex(data), 63))",
    ];
    let expected = ["peer row", "inbox row", "outbox row", "pre-keys row"];
    for (attack, what) in attacks.iter().zip(expected) {
        let copy = dir.join("copy.db");
        std::fs::copy(&path, &copy).unwrap();
        rusqlite::Connection::open(&copy)
            .unwrap()
            .execute_batch(attack)
            .unwrap();
        let err = SqliteOptions::new()
            .key(raw_key(1))
            .open(&copy)
            .unwrap()
            .load()
            .unwrap_err();
        assert!(matches!(err, PersistError::Corrupt { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(what) && text.contains("fails authentication"),
            "{attack}: {text}"
        );
        assert!(text.contains(&copy.display().to_string()), "{text}");
        std::fs::remove_file(&copy).unwrap();
    }
    assert_eq!(open().load().unwrap().peers.len(), 2, "the original is intact");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stored_kdf_parameters_are_bounded() {
    let dir = temp_dir("kdf-bounds");
    let path = dir.join("agent.db");
    SqliteOptions::new().key(passphrase("p")).open(&path).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let header: String = conn
        .query_row("SELECT value FROM meta WHERE key = 'meshwire.kdf'", [], |r| r.get(0))
        .unwrap();
    assert!(header.contains("argon2id") && header.contains("salt"), "{header}");
    let huge = header.replace("\"m_kib\":256", "\"m_kib\":4000000000");
    assert_ne!(huge, header);
    conn.execute("UPDATE meta SET value = ?1 WHERE key = 'meshwire.kdf'", [&huge])
        .unwrap();
    drop(conn);
    let err = SqliteOptions::new().key(passphrase("p")).open(&path).unwrap_err();
    assert!(matches!(err, PersistError::Kdf { .. }), "{err}");
    assert!(err.to_string().contains("exceed"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn encrypted_identity_file() {
    let dir = temp_dir("identity");
    let path = dir.join("agent.identity.json");
    let key = passphrase("correct horse battery staple");
    let identity = load_or_create_identity_encrypted(&path, &key).unwrap();
    assert_eq!(load_identity_encrypted(&path, &key).unwrap().did(), identity.did());
    assert_eq!(
        load_or_create_identity_encrypted(&path, &key).unwrap().did(),
        identity.did()
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains(&hex::encode(*identity.seed())),
        "the seed is not in clear"
    );
    assert!(text.contains("meshwire-identity-encrypted/1"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // Wrong key: typed error, file unchanged, nothing else written.
    let before = dir_bytes(&dir);
    for wrong in [passphrase("wrong horse"), raw_key(3)] {
        let err = load_identity_encrypted(&path, &wrong).unwrap_err();
        assert!(
            matches!(&err, PersistError::WrongKey { path: p } if *p == path),
            "{err}"
        );
        assert_unchanged(&dir, &before, &err.to_string());
    }
    let err = load_or_create_identity_encrypted(&path, &raw_key(3)).unwrap_err();
    assert!(matches!(err, PersistError::WrongKey { .. }), "{err}");
    assert_unchanged(&dir, &before, "load_or_create never overwrites on a wrong key");
    // The plain loader refuses it with a format error.
    assert!(meshwire::load_identity(&path).is_err());
    // A raw-key file, and a DID swapped for another identity's.
    let raw_path = dir.join("raw.json");
    let other = Identity::generate(&mut OsRng);
    save_identity_encrypted(&identity, &raw_path, &raw_key(5)).unwrap();
    assert_eq!(
        load_identity_encrypted(&raw_path, &raw_key(5)).unwrap().did(),
        identity.did()
    );
    let swapped = std::fs::read_to_string(&raw_path)
        .unwrap()
        .replace(identity.did().as_str(), other.did().as_str());
    std::fs::write(&raw_path, swapped).unwrap();
    assert!(matches!(
        load_identity_encrypted(&raw_path, &raw_key(5)),
        Err(PersistError::WrongKey { .. })
    ));
    std::fs::write(&raw_path, "{}").unwrap();
    assert!(matches!(
        load_identity_encrypted(&raw_path, &raw_key(5)),
        Err(PersistError::Corrupt { .. })
    ));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            load_identity_encrypted(&path, &key),
            Err(PersistError::Permissions { mode: 0o640, .. })
        ));
    }
    // Debug never shows key material.
    let shown = format!("{key:?} {:?}", raw_key(0xab));
    assert!(
        !shown.contains("horse") && !shown.contains("ab, ") && !shown.contains("171"),
        "{shown}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
