//! In-memory agent records. One mutex guards everything, and no lock is
//! held across an `.await`, so every read-modify-write (one-time key
//! consumption, heartbeat throttling, reputation updates) is atomic.

use indexmap::IndexMap;
use meshwire_proto::keys::Ed25519PublicKey;
use meshwire_proto::time::Timestamp;
use serde_json::Number;
use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

/// The signed pre-key of an uploaded bundle.
#[derive(Debug, Clone)]
pub(crate) struct StoredSignedPreKey {
    pub(crate) key_id: Number,
    pub(crate) public_key: [u8; 32],
    pub(crate) signature: [u8; 64],
}

/// One uploaded one-time pre-key (only the protocol's fields are kept).
#[derive(Debug, Clone)]
pub(crate) struct StoredOneTimeKey {
    pub(crate) key_id: Number,
    pub(crate) public_key: [u8; 32],
}

/// One registered agent.
#[derive(Debug, Clone)]
pub(crate) struct AgentRecord {
    pub(crate) did: String,
    /// The Ed25519 key the DID derives from; `None` for an agent registered
    /// with the legacy (npm 4.0.0) body, which carries only an X25519 key.
    pub(crate) signing_key: Option<Ed25519PublicKey>,
    pub(crate) capabilities: Vec<String>,
    pub(crate) metadata: IndexMap<String, String>,
    pub(crate) registered_at: Timestamp,
    pub(crate) last_seen: Timestamp,
    pub(crate) last_heartbeat: Option<Timestamp>,

    pub(crate) identity_key: Option<[u8; 32]>,
    pub(crate) identity_key_ed: Option<[u8; 32]>,
    /// The newest signed pre-key, served in bundles.
    pub(crate) signed_pre_key: Option<StoredSignedPreKey>,
    /// The one it replaced and when it was retired: kept for
    /// [`ServerConfig::signed_pre_key_retention`](crate::ServerConfig::signed_pre_key_retention)
    /// (AGT spec 6.2), then forgotten.
    pub(crate) previous_signed_pre_key: Option<(StoredSignedPreKey, Timestamp)>,
    /// Retention of the previous signed pre-key, in ms.
    pub(crate) retention_ms: u64,
    /// Uploaded one-time keys, served first-in first-out.
    pub(crate) one_time_pre_keys: VecDeque<StoredOneTimeKey>,

    pub(crate) reputation_score: f64,
    pub(crate) total_sessions: u64,
    pub(crate) successful_sessions: u64,
    pub(crate) failed_sessions: u64,
    pub(crate) timeout_sessions: u64,
    pub(crate) last_session_at: Option<Timestamp>,
}

impl AgentRecord {
    pub(crate) fn new(
        did: String,
        signing_key: Option<Ed25519PublicKey>,
        capabilities: Vec<String>,
        metadata: IndexMap<String, String>,
        now: Timestamp,
    ) -> Self {
        Self {
            did,
            signing_key,
            capabilities,
            metadata,
            registered_at: now,
            last_seen: now,
            last_heartbeat: None,
            identity_key: None,
            identity_key_ed: None,
            signed_pre_key: None,
            previous_signed_pre_key: None,
            retention_ms: 0,
            one_time_pre_keys: VecDeque::new(),
            reputation_score: 0.5,
            total_sessions: 0,
            successful_sessions: 0,
            failed_sessions: 0,
            timeout_sessions: 0,
            last_session_at: None,
        }
    }

    /// Installs an uploaded signed pre-key. A new key id is a rotation: the
    /// current key becomes the previous one (kept `retention_ms`); the same
    /// id replaces the current key in place (a client re-uploading).
    pub(crate) fn install_signed_pre_key(&mut self, key: StoredSignedPreKey, now: Timestamp, retention_ms: u64) {
        self.retention_ms = retention_ms;
        self.forget_expired_signed_pre_key(now);
        match self.signed_pre_key.take() {
            Some(current) if current.key_id != key.key_id => {
                self.previous_signed_pre_key = Some((current, now));
            }
            _ => {}
        }
        self.signed_pre_key = Some(key);
    }

    /// Drops the previous signed pre-key once its retention has passed.
    pub(crate) fn forget_expired_signed_pre_key(&mut self, now: Timestamp) {
        if let Some((_, retired)) = &self.previous_signed_pre_key {
            if now.0 > retired.0.saturating_add(self.retention_ms) {
                self.previous_signed_pre_key = None;
            }
        }
    }

    /// Registered with the legacy body, without proof of possession.
    pub(crate) fn is_legacy(&self) -> bool {
        self.signing_key.is_none()
    }
}

/// Session outcome buckets of the reputation endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Failed,
    Timeout,
}

/// All agents, in registration order (discovery returns them in it).
#[derive(Debug, Default)]
pub(crate) struct Agents {
    pub(crate) by_did: IndexMap<String, AgentRecord>,
}

impl Agents {
    /// EMA update of the reputation score plus the session counters;
    /// the new score rounded to 4 places, or `None` for an unknown DID.
    pub(crate) fn apply_reputation(
        &mut self,
        did: &str,
        target: f64,
        alpha: f64,
        outcome: Option<Outcome>,
        now: Timestamp,
    ) -> Option<f64> {
        let agent = self.by_did.get_mut(did)?;
        agent.reputation_score = alpha * target + (1.0 - alpha) * agent.reputation_score;
        agent.total_sessions += 1;
        match outcome {
            Some(Outcome::Success) => agent.successful_sessions += 1,
            Some(Outcome::Failed) => agent.failed_sessions += 1,
            Some(Outcome::Timeout) => agent.timeout_sessions += 1,
            None => {}
        }
        agent.last_session_at = Some(now);
        Some((agent.reputation_score * 10_000.0).round() / 10_000.0)
    }
}

/// The registry's state.
#[derive(Debug, Default)]
pub(crate) struct RegistryStore {
    agents: Mutex<Agents>,
}

impl RegistryStore {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Agents> {
        self.agents.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().by_did.len()
    }
}
