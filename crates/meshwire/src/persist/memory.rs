//! An in-memory [`Persistence`], for tests and as a reference for
//! implementors.

use super::{Commit, InboxEntry, Limits, OutboxEntry, PersistError, PersistStats, Persistence, Snapshot};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use zeroize::Zeroizing;

#[derive(Default)]
struct State {
    prekeys: Option<Zeroizing<String>>,
    peers: BTreeMap<String, Zeroizing<String>>,
    seen: BTreeMap<String, VecDeque<String>>,
    unconfirmed: BTreeMap<String, Vec<(String, Zeroizing<String>)>>,
    inbox: Vec<InboxEntry>,
    outbox: Vec<OutboxEntry>,
    meta: BTreeMap<String, String>,
}

/// Keeps everything in memory (survives a reconnect, not a restart). A
/// commit is checked against the [`Limits`] before anything of it is
/// applied, so a refused commit changes nothing. The default store of a
/// client given none; its cost per commit grows with the inbox and outbox
/// it holds (they are scanned), not with the sessions.
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

impl Persistence for MemoryPersistence {
    fn load(&self) -> Result<Snapshot, PersistError> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Snapshot {
            prekeys: s.prekeys.clone(),
            peers: s.peers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            seen: s
                .seen
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().cloned().collect()))
                .collect(),
            unconfirmed: s
                .unconfirmed
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().map(|(_, row)| row.clone()).collect()))
                .collect(),
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
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        // Check everything first: a refused commit changes nothing.
        let mut meta_keys: BTreeSet<&String> = state.meta.keys().collect();
        for (k, v) in &c.meta {
            if v.is_some() {
                meta_keys.insert(k);
            } else {
                meta_keys.remove(k);
            }
        }
        if meta_keys.len() > super::MAX_META_ENTRIES {
            return Err(PersistError::Meta {
                key: c.meta.first().map(|(k, _)| k.clone()).unwrap_or_default(),
                reason: "more than MAX_META_ENTRIES entries".into(),
            });
        }
        let l = self.limits;
        if !c.inbox_add.is_empty() {
            let kept = state
                .inbox
                .iter()
                .filter(|m| !c.inbox_remove.iter().any(|(f, i)| *f == m.from && *i == m.id));
            let (mut rows, mut size) = (0u64, 0u64);
            let mut keys = BTreeSet::new();
            for m in kept {
                rows += 1;
                size += m.payload.len() as u64;
                keys.insert((m.from.as_str(), m.id.as_str()));
            }
            for m in &c.inbox_add {
                if keys.insert((m.from.as_str(), m.id.as_str())) {
                    rows += 1;
                    size += m.payload.len() as u64;
                }
            }
            if rows > l.max_inbox_rows || size > l.max_inbox_bytes {
                stats.refused_inbox_full += 1;
                return Err(PersistError::InboxFull {
                    rows,
                    bytes: size,
                    max_rows: l.max_inbox_rows,
                    max_bytes: l.max_inbox_bytes,
                });
            }
        }
        if !c.outbox_add.is_empty() {
            let kept = state
                .outbox
                .iter()
                .filter(|m| !c.outbox_remove.iter().any(|(p, i)| *p == m.peer && *i == m.id));
            let (mut rows, mut size) = (0u64, 0u64);
            let mut keys = BTreeSet::new();
            for m in kept {
                rows += 1;
                size += m.payload.len() as u64;
                keys.insert((m.peer.as_str(), m.id.as_str()));
            }
            for m in &c.outbox_add {
                if keys.insert((m.peer.as_str(), m.id.as_str())) {
                    rows += 1;
                    size += m.payload.len() as u64;
                }
            }
            if rows > l.max_outbox_rows || size > l.max_outbox_bytes {
                stats.refused_outbox_full += 1;
                return Err(PersistError::OutboxFull {
                    rows,
                    bytes: size,
                    max_rows: l.max_outbox_rows,
                    max_bytes: l.max_outbox_bytes,
                });
            }
        }
        let next = &mut *state;
        for (k, v) in &c.meta {
            match v {
                Some(v) => next.meta.insert(k.clone(), v.clone()),
                None => next.meta.remove(k),
            };
        }
        if let Some(p) = &c.prekeys {
            next.prekeys = Some(p.clone());
        }
        for (did, row) in &c.peers {
            match row {
                Some(row) => {
                    next.peers.insert(did.clone(), row.clone());
                }
                None => {
                    next.peers.remove(did);
                    next.seen.remove(did);
                    next.unconfirmed.remove(did);
                }
            };
        }
        for (peer, id) in &c.seen {
            let ids = next.seen.entry(peer.clone()).or_default();
            if !ids.contains(id) {
                ids.push_back(id.clone());
            }
            while ids.len() > c.seen_limit.max(1) {
                ids.pop_front();
            }
        }
        for (peer, id, row) in &c.unconfirmed {
            let list = next.unconfirmed.entry(peer.clone()).or_default();
            match (row, list.iter().position(|(have, _)| have == id)) {
                (Some(row), Some(i)) => {
                    if let Some(slot) = list.get_mut(i) {
                        slot.1 = row.clone();
                    }
                }
                (Some(row), None) => list.push((id.clone(), row.clone())),
                (None, Some(i)) => {
                    list.remove(i);
                }
                (None, None) => {}
            }
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
        stats.commits += 1;
        Ok(())
    }

    fn reset_mesh(&self) -> Result<(), PersistError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.prekeys = None;
        s.peers.clear();
        s.seen.clear();
        s.unconfirmed.clear();
        Ok(())
    }

    fn location(&self) -> String {
        "the in-memory persistence".into()
    }
}
