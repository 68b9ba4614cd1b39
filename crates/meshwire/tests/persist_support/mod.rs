//! Shared helpers of the `persist_*` tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use meshwire::proto::mesh::{Event, IdSource, Mesh, MeshConfig};
use meshwire::proto::time::Timestamp;
use meshwire::proto::{Identity, PreKeyBundle, PreKeys};
use rand_core::OsRng;
use std::path::{Path, PathBuf};

pub const T0: Timestamp = Timestamp(1_795_262_400_000);

/// A fresh directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshwire-persist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct Counter(pub String, pub u32);

impl IdSource for Counter {
    fn next_id(&mut self) -> String {
        self.1 += 1;
        format!("{}-{}", self.0, self.1)
    }
}

pub fn ids(name: &str) -> Box<dyn IdSource> {
    Box::new(Counter(name.into(), 1000))
}

/// An agent with `otks` one-time keys.
pub fn agent(name: &str, otks: usize) -> Mesh {
    let identity = Identity::generate(&mut OsRng);
    agent_with(identity, name, otks)
}

pub fn agent_with(identity: Identity, name: &str, otks: usize) -> Mesh {
    let mut prekeys = PreKeys::generate(&mut OsRng, &identity);
    prekeys.generate_one_time_keys(&mut OsRng, otks).unwrap();
    Mesh::new(
        identity,
        prekeys,
        MeshConfig::default(),
        Box::new(Counter(name.into(), 0)),
    )
}

pub fn did(m: &Mesh) -> String {
    m.identity().did().to_string()
}

pub fn bundle(m: &Mesh) -> PreKeyBundle {
    let otk = m.prekeys().one_time_key_ids().next();
    m.prekeys().bundle(m.identity(), otk)
}

pub fn messages(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(String::from_utf8(m.payload.clone()).unwrap()),
            _ => None,
        })
        .collect()
}

/// Delivers `text` to `to`, accepting any KNOCK.
pub fn deliver(to: &mut Mesh, text: &str) -> Vec<Event> {
    let mut events = to.handle_text(&mut OsRng, T0, text);
    let knocks: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match e {
            Event::KnockRequest { from, knock_id, .. } => Some((from.clone(), knock_id.clone())),
            _ => None,
        })
        .collect();
    for (from, knock_id) in knocks {
        events.extend(to.decide_knock(&mut OsRng, T0, &from, &knock_id, true));
    }
    events
}

/// `alice` opens a session to `bob` and they exchange one message each way.
pub fn converse(alice: &mut Mesh, bob: &mut Mesh) {
    let knock = alice.open_session(&mut OsRng, T0, &did(bob), &bundle(bob)).unwrap();
    let (_, m1) = alice
        .encrypt(&mut OsRng, T0, &did(bob), br#"{"text":"hello"}"#)
        .unwrap();
    deliver(bob, &knock);
    assert_eq!(messages(&deliver(bob, &m1)), [r#"{"text":"hello"}"#]);
    let (_, reply) = bob.encrypt(&mut OsRng, T0, &did(alice), b"[1]").unwrap();
    assert_eq!(messages(&deliver(alice, &reply)), ["[1]"]);
}

pub fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// The raw `data` column of `table` rows, read with a plain SQLite
/// connection (the store must be closed: it holds an exclusive lock).
pub fn raw_rows(db: &Path, sql: &str) -> Vec<(String, Vec<u8>)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    rows
}
