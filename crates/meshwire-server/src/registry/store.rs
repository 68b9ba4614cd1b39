//! The registry's handle on the storage's [`Registry`]: agent records
//! (with their signed pre-keys) and one-time keys, plus the record logic
//! the handlers share (signed pre-key rotation and retention, reputation).
//! Every read-modify-write is one [`Registry::update_agent`] (atomic in
//! every backend); no lock of the server is held while the store works.

use crate::http::ApiError;
use crate::storage::{AgentRecord, Registry, RetiredSignedPreKey, SignedPreKey, StorageError};
use axum::http::StatusCode;
use meshwire_proto::time::Timestamp;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Session outcome buckets of the reputation endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Failed,
    Timeout,
}

/// The registry's storage, with the agent count gauge of the stats.
pub(crate) struct RegistryStore {
    store: Arc<dyn Registry>,
    agents: AtomicU64,
}

impl std::fmt::Debug for RegistryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryStore")
            .field("agents", &self.count())
            .finish_non_exhaustive()
    }
}

/// A storage failure as the HTTP answer (503).
pub(crate) fn unavailable(error: StorageError) -> ApiError {
    tracing::warn!(%error, "registry storage failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("Registry storage unavailable ({error})"),
    )
}

impl RegistryStore {
    pub(crate) fn new(store: Arc<dyn Registry>) -> Self {
        Self {
            store,
            agents: AtomicU64::new(0),
        }
    }

    /// The storage.
    pub(crate) fn store(&self) -> &dyn Registry {
        &*self.store
    }

    /// Agents stored, as of this instance's last change (or
    /// [`RegistryStore::refresh`]).
    pub(crate) fn count(&self) -> u64 {
        self.agents.load(Ordering::Relaxed)
    }

    /// Re-reads the agent count.
    pub(crate) async fn refresh(&self) {
        match self.store.agent_count().await {
            Ok(count) => self.agents.store(count, Ordering::Relaxed),
            Err(error) => tracing::warn!(%error, "reading the agent count failed"),
        }
    }

    /// The record of `did` (503 when the store fails).
    pub(crate) async fn get(&self, did: &str) -> Result<Option<AgentRecord>, ApiError> {
        self.store.get_agent(did).await.map_err(unavailable)
    }
}

/// Installs an uploaded signed pre-key. A new key id is a rotation: the
/// current key becomes the previous one (kept `retention_ms`); the same id
/// replaces the current key in place (a client re-uploading).
pub(crate) fn install_signed_pre_key(record: &mut AgentRecord, key: SignedPreKey, now: Timestamp, retention_ms: u64) {
    forget_expired_signed_pre_key(record, now, retention_ms);
    match record.signed_pre_key.take() {
        Some(current) if current.key_id != key.key_id => {
            record.previous_signed_pre_key = Some(RetiredSignedPreKey {
                key: current,
                retired_at: now.0,
            });
        }
        _ => {}
    }
    record.signed_pre_key = Some(key);
}

/// Drops the previous signed pre-key once its retention has passed;
/// whether it did.
pub(crate) fn forget_expired_signed_pre_key(record: &mut AgentRecord, now: Timestamp, retention_ms: u64) -> bool {
    let expired = record
        .previous_signed_pre_key
        .as_ref()
        .is_some_and(|previous| now.0 > previous.retired_at.saturating_add(retention_ms));
    if expired {
        record.previous_signed_pre_key = None;
    }
    expired
}

/// EMA update of the reputation score towards `target` plus the session
/// counters.
pub(crate) fn apply_reputation(
    record: &mut AgentRecord,
    target: f64,
    alpha: f64,
    outcome: Option<Outcome>,
    now: Timestamp,
) {
    let reputation = &mut record.reputation;
    reputation.score = alpha * target + (1.0 - alpha) * reputation.score;
    reputation.total_sessions += 1;
    match outcome {
        Some(Outcome::Success) => reputation.successful_sessions += 1,
        Some(Outcome::Failed) => reputation.failed_sessions += 1,
        Some(Outcome::Timeout) => reputation.timeout_sessions += 1,
        None => {}
    }
    reputation.last_session_at = Some(now.0);
}

/// A score as the reference reports it: rounded to 4 places.
pub(crate) fn rounded(score: f64) -> f64 {
    (score * 10_000.0).round() / 10_000.0
}
