//! An in-memory [`Persistence`], for tests and as a reference for
//! implementors.

use super::{Commit, InboxEntry, Limits, OutboxEntry, PersistError, PersistStats, Persistence, Snapshot};
use std::collections::BTreeMap;
use std::sync::Mutex;
use zeroize::Zeroizing;

#[derive(Default, Clone)]
struct State {
    prekeys: Option<Zeroizing<String>>,
    peers: BTreeMap<String, Zeroizing<String>>,
    inbox: Vec<InboxEntry>,
    outbox: Vec<OutboxEntry>,
    meta: BTreeMap<String, String>,
}

/// Keeps everything in memory (survives a reconnect, not a restart). Each
/// commit is applied to a copy that replaces the state only when it
/// stays within the [`Limits`], so a refused commit changes nothing.
/// Meant for tests; its cost per commit grows with the state.
#[derive(Default)]
pub struct MemoryPersistence {
    state: Mutex<State>,
    limits: Limits,
    stats: Mutex<PersistStats>,
}

impl std::fmt::Debug for MemoryPersistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryPersistence")
    }
}

impl MemoryPersistence {
    /// An empty store with the default limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store with `limits`.
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Counters since it was created.
    pub fn stats(&self) -> PersistStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn bytes<'a>(payloads: impl Iterator<Item = &'a Zeroizing<Vec<u8>>>) -> u64 {
    payloads.map(|p| p.len() as u64).sum()
}

impl Persistence for MemoryPersistence {
    fn load(&self) -> Result<Snapshot, PersistError> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Snapshot {
            prekeys: s.prekeys.clone(),
            peers: s.peers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            inbox: s.inbox.clone(),
            outbox: s.outbox.clone(),
            meta: s.meta.clone(),
        })
    }

    fn commit(&self, c: &Commit) -> Result<(), PersistError> {
        if c.is_empty() {
            return Ok(());
        }
        c.check_meta()?;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = state.clone();
        for (k, v) in &c.meta {
            match v {
                Some(v) => next.meta.insert(k.clone(), v.clone()),
                None => next.meta.remove(k),
            };
        }
        if next.meta.len() > super::MAX_META_ENTRIES {
            return Err(PersistError::Meta {
                key: c.meta.first().map(|(k, _)| k.clone()).unwrap_or_default(),
                reason: "more than MAX_META_ENTRIES entries".into(),
            });
        }
        if let Some(p) = &c.prekeys {
            next.prekeys = Some(p.clone());
        }
        for (did, row) in &c.peers {
            match row {
                Some(row) => next.peers.insert(did.clone(), row.clone()),
                None => next.peers.remove(did),
            };
        }
        next.inbox
            .retain(|m| !c.inbox_remove.iter().any(|(f, i)| *f == m.from && *i == m.id));
        next.outbox
            .retain(|m| !c.outbox_remove.iter().any(|(p, i)| *p == m.peer && *i == m.id));
        for m in &c.inbox_add {
            if !next.inbox.iter().any(|x| x.from == m.from && x.id == m.id) {
                next.inbox.push(m.clone());
            }
        }
        for m in &c.outbox_add {
            if !next.outbox.iter().any(|x| x.peer == m.peer && x.id == m.id) {
                next.outbox.push(m.clone());
            }
        }
        let l = self.limits;
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let (rows, size) = (next.inbox.len() as u64, bytes(next.inbox.iter().map(|m| &m.payload)));
        if !c.inbox_add.is_empty() && (rows > l.max_inbox_rows || size > l.max_inbox_bytes) {
            stats.refused_inbox_full += 1;
            return Err(PersistError::InboxFull {
                rows,
                bytes: size,
                max_rows: l.max_inbox_rows,
                max_bytes: l.max_inbox_bytes,
            });
        }
        let (rows, size) = (next.outbox.len() as u64, bytes(next.outbox.iter().map(|m| &m.payload)));
        if !c.outbox_add.is_empty() && (rows > l.max_outbox_rows || size > l.max_outbox_bytes) {
            stats.refused_outbox_full += 1;
            return Err(PersistError::OutboxFull {
                rows,
                bytes: size,
                max_rows: l.max_outbox_rows,
                max_bytes: l.max_outbox_bytes,
            });
        }
        *state = next;
        stats.commits += 1;
        Ok(())
    }

    fn reset_mesh(&self) -> Result<(), PersistError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.prekeys = None;
        s.peers.clear();
        Ok(())
    }

    fn location(&self) -> String {
        "the in-memory persistence".into()
    }
}
