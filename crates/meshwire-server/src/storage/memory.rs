//! The in-process backend: maps behind two mutexes (mail, registry), with
//! the indexes that keep every operation proportional to its answer
//! (ordered mailboxes, an expiry index, a capability index, a last-seen
//! index). Nothing survives the process.

use super::{
    apply_change, clamp_expiry, AgentChange, AgentRecord, Appended, Created, MailboxTotals, Mailboxes, NewMessage,
    OneTimeKey, Quota, ReadyCheck, Registry, StorageLimits, StorageResult, StoredMessage, MAX_FETCH_BATCH,
};
use crate::replay::{ClaimError, MemoryLedger, ProofLedger};
use async_trait::async_trait;
use meshwire_proto::time::Timestamp;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::{Mutex, MutexGuard};

#[derive(Debug)]
struct Queued {
    id: String,
    sender: String,
    frame: std::sync::Arc<str>,
    expires_at: u64,
    size: u64,
}

#[derive(Debug, Default)]
struct Mailbox {
    by_seq: BTreeMap<u64, Queued>,
    by_id: HashMap<String, u64>,
}

#[derive(Debug, Default)]
struct MailState {
    boxes: HashMap<String, Mailbox>,
    per_sender: HashMap<String, u64>,
    /// (expires_at, seq, recipient) of every queued message.
    by_expiry: BTreeSet<(u64, u64, String)>,
    totals: MailboxTotals,
    seq: u64,
}

impl MailState {
    fn remove(&mut self, recipient: &str, seq: u64) -> bool {
        let Some(mailbox) = self.boxes.get_mut(recipient) else {
            return false;
        };
        let Some(message) = mailbox.by_seq.remove(&seq) else {
            return false;
        };
        mailbox.by_id.remove(&message.id);
        if mailbox.by_seq.is_empty() {
            self.boxes.remove(recipient);
        }
        self.by_expiry.remove(&(message.expires_at, seq, recipient.to_owned()));
        if let Some(count) = self.per_sender.get_mut(&message.sender) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_sender.remove(&message.sender);
            }
        }
        self.totals.messages = self.totals.messages.saturating_sub(1);
        self.totals.bytes = self.totals.bytes.saturating_sub(message.size);
        true
    }

    fn expire(&mut self, now: u64, max: usize) -> u64 {
        let mut removed = 0;
        while removed < max as u64 {
            let Some((expires_at, seq, recipient)) = self.by_expiry.first().cloned() else {
                break;
            };
            if expires_at > now {
                break;
            }
            self.remove(&recipient, seq);
            removed += 1;
        }
        removed
    }

    fn refusal(&self, message: &NewMessage, limits: &super::MailboxLimits) -> Option<Quota> {
        let depth = self.boxes.get(&message.recipient).map_or(0, |b| b.by_seq.len() as u64);
        if depth >= limits.per_recipient {
            return Some(Quota::Recipient);
        }
        if self.per_sender.get(&message.sender).copied().unwrap_or(0) >= limits.per_sender {
            return Some(Quota::Sender);
        }
        if self.totals.messages >= limits.total {
            return Some(Quota::Total);
        }
        if self.totals.bytes.saturating_add(message.size()) > limits.total_bytes {
            return Some(Quota::Bytes);
        }
        None
    }
}

#[derive(Debug, Default)]
struct RegistryState {
    agents: HashMap<String, (u64, AgentRecord)>,
    /// capability → registration seq → DID.
    by_capability: HashMap<String, BTreeMap<u64, String>>,
    /// (last_seen, DID).
    by_last_seen: BTreeSet<(u64, String)>,
    one_time_keys: HashMap<String, VecDeque<OneTimeKey>>,
    seq: u64,
}

impl RegistryState {
    fn remove(&mut self, did: &str) -> bool {
        let Some((seq, record)) = self.agents.remove(did) else {
            return false;
        };
        for capability in &record.capabilities {
            if let Some(index) = self.by_capability.get_mut(capability) {
                index.remove(&seq);
                if index.is_empty() {
                    self.by_capability.remove(capability);
                }
            }
        }
        self.by_last_seen.remove(&(record.last_seen, record.did.clone()));
        self.one_time_keys.remove(did);
        true
    }
}

/// The in-process backend (see [`Storage::memory`](super::Storage::memory)).
pub struct MemoryStorage {
    limits: StorageLimits,
    mail: Mutex<MailState>,
    registry: Mutex<RegistryState>,
    proofs: MemoryLedger,
}

impl fmt::Debug for MemoryStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStorage")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl MemoryStorage {
    /// An empty store.
    pub fn new(limits: StorageLimits) -> Self {
        Self {
            limits,
            mail: Mutex::new(MailState::default()),
            registry: Mutex::new(RegistryState::default()),
            proofs: MemoryLedger::new(limits.max_live_proofs, limits.max_live_proofs_per_did),
        }
    }

    fn mail(&self) -> MutexGuard<'_, MailState> {
        self.mail.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn registry(&self) -> MutexGuard<'_, RegistryState> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Mailboxes for MemoryStorage {
    async fn append(&self, message: NewMessage, now: Timestamp) -> StorageResult<Appended> {
        message.check()?;
        let limits = self.limits.mailbox;
        let mut state = self.mail();
        if state
            .boxes
            .get(&message.recipient)
            .is_some_and(|b| b.by_id.contains_key(&message.id))
        {
            return Ok(Appended::Duplicate);
        }
        if state.refusal(&message, &limits).is_some() {
            state.expire(now.0, usize::MAX);
            if let Some(quota) = state.refusal(&message, &limits) {
                return Ok(Appended::Refused(quota));
            }
        }
        let expires_at = clamp_expiry(message.expires_at, now, limits.max_ttl).0;
        let size = message.size();
        state.seq += 1;
        let seq = state.seq;
        state.by_expiry.insert((expires_at, seq, message.recipient.clone()));
        *state.per_sender.entry(message.sender.clone()).or_insert(0) += 1;
        state.totals.messages += 1;
        state.totals.bytes += size;
        let mailbox = state.boxes.entry(message.recipient).or_default();
        mailbox.by_id.insert(message.id.clone(), seq);
        mailbox.by_seq.insert(
            seq,
            Queued {
                id: message.id,
                sender: message.sender,
                frame: message.frame,
                expires_at,
                size,
            },
        );
        Ok(Appended::Stored { seq })
    }

    async fn fetch(
        &self,
        recipient: &str,
        after: u64,
        max: usize,
        now: Timestamp,
    ) -> StorageResult<Vec<StoredMessage>> {
        let max = max.min(MAX_FETCH_BATCH);
        let mut state = self.mail();
        let mut out = Vec::with_capacity(max);
        let mut expired = Vec::new();
        if let Some(mailbox) = state.boxes.get(recipient) {
            for (&seq, message) in mailbox.by_seq.range(after.saturating_add(1)..) {
                if out.len() >= max {
                    break;
                }
                if message.expires_at <= now.0 {
                    expired.push(seq);
                    continue;
                }
                out.push(StoredMessage {
                    seq,
                    id: message.id.clone(),
                    sender: message.sender.clone(),
                    frame: message.frame.clone(),
                    expires_at: Timestamp(message.expires_at),
                });
            }
        }
        for seq in expired {
            state.remove(recipient, seq);
        }
        Ok(out)
    }

    async fn ack(&self, recipient: &str, id: &str) -> StorageResult<bool> {
        let mut state = self.mail();
        let Some(seq) = state.boxes.get(recipient).and_then(|b| b.by_id.get(id).copied()) else {
            return Ok(false);
        };
        Ok(state.remove(recipient, seq))
    }

    async fn depth(&self, recipient: &str) -> StorageResult<u64> {
        Ok(self.mail().boxes.get(recipient).map_or(0, |b| b.by_seq.len() as u64))
    }

    async fn sender_depth(&self, sender: &str) -> StorageResult<u64> {
        Ok(self.mail().per_sender.get(sender).copied().unwrap_or(0))
    }

    async fn totals(&self) -> StorageResult<MailboxTotals> {
        Ok(self.mail().totals)
    }

    async fn expire(&self, now: Timestamp, max: usize) -> StorageResult<u64> {
        Ok(self.mail().expire(now.0, max))
    }
}

#[async_trait]
impl Registry for MemoryStorage {
    async fn create_agent(&self, record: AgentRecord, max_agents: u64) -> StorageResult<Created> {
        let mut state = self.registry();
        if state.agents.contains_key(&record.did) {
            return Ok(Created::Exists);
        }
        if state.agents.len() as u64 >= max_agents {
            return Ok(Created::Full);
        }
        state.seq += 1;
        let seq = state.seq;
        for capability in &record.capabilities {
            state
                .by_capability
                .entry(capability.clone())
                .or_default()
                .insert(seq, record.did.clone());
        }
        state.by_last_seen.insert((record.last_seen, record.did.clone()));
        state.agents.insert(record.did.clone(), (seq, record));
        Ok(Created::Created)
    }

    async fn get_agent(&self, did: &str) -> StorageResult<Option<AgentRecord>> {
        Ok(self.registry().agents.get(did).map(|(_, r)| r.clone()))
    }

    async fn update_agent(&self, did: &str, change: AgentChange<'_>) -> StorageResult<Option<(AgentRecord, bool)>> {
        let mut state = self.registry();
        let Some((_, record)) = state.agents.get(did) else {
            return Ok(None);
        };
        let before_seen = record.last_seen;
        let (next, write) = apply_change(record, change);
        if !write {
            return Ok(Some((record.clone(), false)));
        }
        state.by_last_seen.remove(&(before_seen, did.to_owned()));
        state.by_last_seen.insert((next.last_seen, did.to_owned()));
        if let Some((_, stored)) = state.agents.get_mut(did) {
            *stored = next.clone();
        }
        Ok(Some((next, true)))
    }

    async fn delete_agent(&self, did: &str) -> StorageResult<bool> {
        Ok(self.registry().remove(did))
    }

    async fn agent_count(&self) -> StorageResult<u64> {
        Ok(self.registry().agents.len() as u64)
    }

    async fn discover(&self, capability: &str, limit: usize) -> StorageResult<Vec<AgentRecord>> {
        let state = self.registry();
        let Some(index) = state.by_capability.get(capability) else {
            return Ok(Vec::new());
        };
        Ok(index
            .values()
            .filter_map(|did| state.agents.get(did).map(|(_, r)| r.clone()))
            .take(limit)
            .collect())
    }

    async fn set_one_time_keys(&self, did: &str, keys: Vec<OneTimeKey>) -> StorageResult<bool> {
        let mut state = self.registry();
        if !state.agents.contains_key(did) {
            return Ok(false);
        }
        state.one_time_keys.insert(did.to_owned(), keys.into());
        Ok(true)
    }

    async fn consume_one_time_key(&self, did: &str) -> StorageResult<Option<OneTimeKey>> {
        Ok(self.registry().one_time_keys.get_mut(did).and_then(VecDeque::pop_front))
    }

    async fn one_time_key_count(&self, did: &str) -> StorageResult<u64> {
        Ok(self.registry().one_time_keys.get(did).map_or(0, |k| k.len() as u64))
    }

    async fn expire_agents(&self, not_seen_since: Timestamp, max: usize) -> StorageResult<Vec<String>> {
        let mut state = self.registry();
        let stale: Vec<String> = state
            .by_last_seen
            .iter()
            .take_while(|(seen, _)| *seen < not_seen_since.0)
            .take(max)
            .map(|(_, did)| did.clone())
            .collect();
        for did in &stale {
            state.remove(did);
        }
        Ok(stale)
    }
}

impl ProofLedger for MemoryStorage {
    fn claim(&self, did: &str, proof: &[u8], expires_at: Timestamp, now: Timestamp) -> Result<(), ClaimError> {
        self.proofs.claim(did, proof, expires_at, now)
    }

    fn live(&self) -> usize {
        self.proofs.live()
    }
}

#[async_trait]
impl ReadyCheck for MemoryStorage {
    async fn ready(&self) -> StorageResult<()> {
        Ok(())
    }
}
