//! Storage backends for the relay's offline mailboxes, the registry's
//! records and the once-only proof memory.
//!
//! Three interfaces, one facade:
//!
//! - [`Mailboxes`]: per-recipient queues of frames for agents that are not
//!   live. Appends are deduplicated per recipient, fetches cost O(batch)
//!   (a cursor, never a scan of the mailbox), only the recipient's own key
//!   `(recipient, id)` acknowledges, depths per recipient and per sender
//!   feed the quotas of [`MailboxLimits`].
//! - [`Registry`]: agent records, their signed pre-key (inside the record)
//!   and their one-time keys, consumed atomically (two server instances on
//!   one backend never hand out the same key), discovery by capability
//!   through an index, and expiry of agents not seen for a while.
//! - [`ProofLedger`] (the security work's trait, which
//!   is synchronous): "insert `(did, proof)` unless present, until
//!   `expires_at`".
//!
//! [`Storage`] bundles one implementation of each: [`Storage::memory`]
//! (tests, `--memory`), [`Storage::sqlite`] (the durable single-instance
//! default: a WAL database in a data directory) and [`Storage::nats`]
//! (NATS JetStream, for many instances; it also offers a
//! [`LiveRouter`](nats::LiveRouter) to reach an agent connected to another
//! instance).
//!
//! **Why async.** The relay and registry are tokio/axum handlers, and the
//! cluster backend is network I/O: an async trait lets a handler await the
//! store without blocking a worker thread. The SQLite backend runs its
//! statements on tokio's blocking pool (`spawn_blocking`), so a slow disk
//! never stalls the reactor. The traits use `async_trait` so that they
//! stay object-safe (`Arc<dyn Mailboxes>`), which `async fn` in traits is
//! not. The proof ledger stays synchronous because the security work
//! defined it so (it is called inside request validation); the NATS ledger
//! bridges with `tokio::task::block_in_place` and therefore needs the
//! multi-thread runtime that `meshwire serve` uses.
//!
//! **Time.** Every method that depends on time takes `now` (server clock,
//! ms since the epoch), as the rest of the server does, so tests can use a
//! manual clock. The NATS backend additionally lets the server drop data
//! physically after the configured maximum ages (real time).

pub mod memory;
pub mod nats;
pub mod nats_server;
pub mod sqlite;

use crate::replay::ProofLedger;
use async_trait::async_trait;
use indexmap::IndexMap;
use meshwire_proto::time::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Most messages one [`Mailboxes::fetch`] returns, whatever the caller asks.
pub const MAX_FETCH_BATCH: usize = 1_000;
/// Default of [`MailboxLimits::per_recipient`] (the relay's
/// `max_stored_per_recipient` default).
pub const DEFAULT_MAX_PER_RECIPIENT: u64 = 10_000;
/// Default of [`MailboxLimits::per_sender`]: one sender can hold at most a
/// fifth of one mailbox, so it cannot fill another agent's mailbox alone.
pub const DEFAULT_MAX_PER_SENDER: u64 = 2_000;
/// Default of [`MailboxLimits::total`].
pub const DEFAULT_MAX_TOTAL: u64 = 100_000;
/// Default of [`MailboxLimits::total_bytes`] (256 MiB).
pub const DEFAULT_MAX_TOTAL_BYTES: u64 = 256 * 1024 * 1024;
/// Default of [`MailboxLimits::max_ttl`] (72 hours, the relay's default
/// message TTL).
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(72 * 3600);
/// Default of [`StorageLimits::max_proof_lifetime`]: a proof timestamp may
/// be 5 minutes in the future and is then fresh for a 5-minute window, so
/// no proof needs to be remembered for more than 10 minutes; 15 leaves a
/// margin for clock skew between instances.
pub const DEFAULT_MAX_PROOF_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Longest message id, sender or recipient accepted by [`Mailboxes::append`]
/// (bytes); longer ones are [`StorageError::Invalid`].
pub const MAX_KEY_BYTES: usize = 512;

/// A storage operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The backend could not be reached or failed (disk, database, network).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The caller passed something the store refuses (an over-long key).
    #[error("invalid storage request: {0}")]
    Invalid(String),
    /// A compare-and-set kept losing to other writers (cluster backend).
    #[error("too much contention on {0}; retry")]
    Contention(String),
}

/// Shorthand for storage results.
pub type StorageResult<T> = Result<T, StorageError>;

// ── Mailboxes ────────────────────────────────────────────────────────

/// Quotas of the offline mailboxes. Each one refused is reported as a
/// [`Quota`] in [`Appended::Refused`] (the caller counts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxLimits {
    /// Messages queued for one recipient.
    pub per_recipient: u64,
    /// Messages one sender has queued, all recipients together.
    pub per_sender: u64,
    /// Messages queued in total.
    pub total: u64,
    /// Bytes queued in total (frame + id + sender + recipient).
    pub total_bytes: u64,
    /// Longest a message is kept: `expires_at` is clamped to `now + max_ttl`
    /// (the NATS backend also drops messages physically after it).
    pub max_ttl: Duration,
}

impl Default for MailboxLimits {
    fn default() -> Self {
        Self {
            per_recipient: DEFAULT_MAX_PER_RECIPIENT,
            per_sender: DEFAULT_MAX_PER_SENDER,
            total: DEFAULT_MAX_TOTAL,
            total_bytes: DEFAULT_MAX_TOTAL_BYTES,
            max_ttl: DEFAULT_MAX_TTL,
        }
    }
}

/// A frame to queue for an offline recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// The recipient's DID (the mailbox).
    pub recipient: String,
    /// The sender's DID, as the relay authenticated it (quota accounting).
    pub sender: String,
    /// The frame's message id: unique per recipient while queued.
    pub id: String,
    /// The frame, verbatim.
    pub frame: Arc<str>,
    /// When the message may be dropped (clamped to `now + max_ttl`).
    pub expires_at: Timestamp,
}

impl NewMessage {
    /// Bytes the message counts against [`MailboxLimits::total_bytes`].
    pub fn size(&self) -> u64 {
        (self.frame.len() + self.id.len() + self.sender.len() + self.recipient.len()) as u64
    }

    pub(crate) fn check(&self) -> StorageResult<()> {
        for (name, value) in [
            ("recipient", &self.recipient),
            ("sender", &self.sender),
            ("id", &self.id),
        ] {
            if value.is_empty() || value.len() > MAX_KEY_BYTES {
                return Err(StorageError::Invalid(format!(
                    "{name} must be 1 to {MAX_KEY_BYTES} bytes (got {})",
                    value.len()
                )));
            }
        }
        Ok(())
    }
}

/// A queued message, as fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Position in the backend's order: increasing in arrival order within
    /// a mailbox. Pass the last one seen as `after` to continue a fetch.
    pub seq: u64,
    /// The frame's message id.
    pub id: String,
    /// The sender's DID.
    pub sender: String,
    /// The frame, verbatim.
    pub frame: Arc<str>,
    /// When it expires.
    pub expires_at: Timestamp,
}

/// A quota that refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// [`MailboxLimits::per_recipient`].
    Recipient,
    /// [`MailboxLimits::per_sender`].
    Sender,
    /// [`MailboxLimits::total`].
    Total,
    /// [`MailboxLimits::total_bytes`].
    Bytes,
    /// The recipient is not registered and the server routes only to
    /// registered DIDs ([`crate::ServerConfig::route_only_registered`]).
    Unregistered,
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Quota::Recipient => "the recipient's mailbox is full",
            Quota::Sender => "the sender has too many messages queued",
            Quota::Total => "the server's offline store is full",
            Quota::Bytes => "the server's offline store is out of bytes",
            Quota::Unregistered => "the recipient is not registered",
        })
    }
}

/// What [`Mailboxes::append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Queued at this position.
    Stored {
        /// Its [`StoredMessage::seq`].
        seq: u64,
    },
    /// A message with this id is already queued for this recipient; nothing
    /// changed.
    Duplicate,
    /// A quota is reached; nothing changed.
    Refused(Quota),
}

/// Totals of the offline store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MailboxTotals {
    /// Messages queued (may include expired ones not yet swept).
    pub messages: u64,
    /// Their bytes, as counted by [`NewMessage::size`].
    pub bytes: u64,
}

/// Per-recipient offline mailboxes.
#[async_trait]
pub trait Mailboxes: Send + Sync + 'static {
    /// Queues `message` unless its id is already queued for its recipient
    /// ([`Appended::Duplicate`]) or a quota is reached
    /// ([`Appended::Refused`]). Expired messages are swept before a quota
    /// refuses.
    async fn append(&self, message: NewMessage, now: Timestamp) -> StorageResult<Appended>;

    /// Up to `max` (at most [`MAX_FETCH_BATCH`]) unexpired messages of
    /// `recipient` after position `after` (0: from the start), oldest
    /// first. Costs O(batch), not O(mailbox). Messages stay queued until
    /// acknowledged; expired ones met on the way are deleted.
    async fn fetch(&self, recipient: &str, after: u64, max: usize, now: Timestamp)
        -> StorageResult<Vec<StoredMessage>>;

    /// Deletes message `id` from `recipient`'s mailbox. Only that mailbox is
    /// searched, so an agent can acknowledge only its own mail: the relay
    /// passes the connection's authenticated DID. `false` if absent.
    async fn ack(&self, recipient: &str, id: &str) -> StorageResult<bool>;

    /// Messages queued for `recipient`.
    async fn depth(&self, recipient: &str) -> StorageResult<u64>;

    /// Messages `sender` has queued, all recipients together.
    async fn sender_depth(&self, sender: &str) -> StorageResult<u64>;

    /// Messages and bytes queued in total.
    async fn totals(&self) -> StorageResult<MailboxTotals>;

    /// Deletes up to `max` messages expired at `now`; returns how many.
    /// (The NATS backend also relies on the stream's maximum age.)
    async fn expire(&self, now: Timestamp, max: usize) -> StorageResult<u64>;
}

// ── Registry ─────────────────────────────────────────────────────────

/// A signed pre-key as uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPreKey {
    /// Its id, as the JSON number the client sent.
    pub key_id: serde_json::Number,
    /// X25519 public key.
    pub public_key: [u8; 32],
    /// Ed25519 signature over the public key.
    #[serde(with = "bytes64")]
    pub signature: [u8; 64],
}

/// A signed pre-key replaced by a rotation, kept for a retention period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredSignedPreKey {
    /// The key.
    pub key: SignedPreKey,
    /// When it was replaced (ms).
    pub retired_at: u64,
}

/// A one-time pre-key (only the protocol's fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneTimeKey {
    /// Its id, as the JSON number the client sent.
    pub key_id: serde_json::Number,
    /// X25519 public key.
    pub public_key: [u8; 32],
}

/// Reputation counters of an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reputation {
    /// Exponential moving average in [0, 1].
    pub score: f64,
    /// Sessions reported.
    pub total_sessions: u64,
    /// Of which successful.
    pub successful_sessions: u64,
    /// Of which failed.
    pub failed_sessions: u64,
    /// Of which timed out.
    pub timeout_sessions: u64,
    /// Last report (ms).
    pub last_session_at: Option<u64>,
}

impl Default for Reputation {
    fn default() -> Self {
        Self {
            score: 0.5,
            total_sessions: 0,
            successful_sessions: 0,
            failed_sessions: 0,
            timeout_sessions: 0,
            last_session_at: None,
        }
    }
}

/// One registered agent, with its signed pre-key (its one-time keys are
/// kept apart: see [`Registry::consume_one_time_key`]). Times are ms since
/// the epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The agent's DID (the key).
    pub did: String,
    /// Ed25519 key the DID derives from; `None` for a legacy registration.
    pub signing_key: Option<[u8; 32]>,
    /// Capabilities (indexed for [`Registry::discover`]; fixed at
    /// registration).
    pub capabilities: Vec<String>,
    /// Free-form metadata, in the order sent.
    pub metadata: IndexMap<String, String>,
    /// Registration time.
    pub registered_at: u64,
    /// Last time the agent was seen (drives [`Registry::expire_agents`]).
    pub last_seen: u64,
    /// Last heartbeat, for throttling.
    pub last_heartbeat: Option<u64>,
    /// X25519 identity key of the uploaded bundle.
    pub identity_key: Option<[u8; 32]>,
    /// Ed25519 identity key of the uploaded bundle.
    pub identity_key_ed: Option<[u8; 32]>,
    /// The signed pre-key served in bundles.
    pub signed_pre_key: Option<SignedPreKey>,
    /// The one a rotation replaced, while retained.
    pub previous_signed_pre_key: Option<RetiredSignedPreKey>,
    /// Reputation counters.
    pub reputation: Reputation,
}

impl AgentRecord {
    /// A fresh record registered and seen at `now`.
    pub fn new(
        did: String,
        signing_key: Option<[u8; 32]>,
        capabilities: Vec<String>,
        metadata: IndexMap<String, String>,
        now: Timestamp,
    ) -> Self {
        Self {
            did,
            signing_key,
            capabilities,
            metadata,
            registered_at: now.0,
            last_seen: now.0,
            last_heartbeat: None,
            identity_key: None,
            identity_key_ed: None,
            signed_pre_key: None,
            previous_signed_pre_key: None,
            reputation: Reputation::default(),
        }
    }

    pub(crate) fn encode(&self) -> StorageResult<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| StorageError::Corrupt(format!("encoding an agent record: {e}")))
    }

    pub(crate) fn decode(bytes: &[u8]) -> StorageResult<Self> {
        serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt(format!("decoding an agent record: {e}")))
    }
}

/// What [`Registry::create_agent`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The record was stored.
    Created,
    /// An agent with this DID exists; nothing changed.
    Exists,
    /// The registry holds `max_agents` agents; nothing changed.
    Full,
}

/// A change applied by [`Registry::update_agent`]: returns whether to write.
/// It may run more than once (the cluster backend retries on a conflict),
/// so it must depend only on the record it is given.
pub type AgentChange<'a> = &'a (dyn Fn(&mut AgentRecord) -> bool + Send + Sync);

/// Agent records, pre-keys and one-time keys.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Stores `record` unless its DID exists or `max_agents` are stored
    /// (the cluster backend's count is approximate: see its docs).
    async fn create_agent(&self, record: AgentRecord, max_agents: u64) -> StorageResult<Created>;

    /// The record of `did`.
    async fn get_agent(&self, did: &str) -> StorageResult<Option<AgentRecord>>;

    /// Applies `change` to the record of `did` atomically (a transaction,
    /// or compare-and-set with retries) and returns the record as stored
    /// after it and whether it was written; `None` for an unknown DID. The
    /// DID, capabilities and registration time cannot be changed (changes
    /// to them are discarded).
    async fn update_agent(&self, did: &str, change: AgentChange<'_>) -> StorageResult<Option<(AgentRecord, bool)>>;

    /// Deletes the agent with its one-time keys and index entries; `false`
    /// if unknown.
    async fn delete_agent(&self, did: &str) -> StorageResult<bool>;

    /// Agents stored.
    async fn agent_count(&self) -> StorageResult<u64>;

    /// Up to `limit` agents with `capability`, in registration order,
    /// through an index: O(limit), no scan of the registry.
    async fn discover(&self, capability: &str, limit: usize) -> StorageResult<Vec<AgentRecord>>;

    /// Replaces the one-time keys of `did` (served first in, first out);
    /// `false` for an unknown DID.
    async fn set_one_time_keys(&self, did: &str, keys: Vec<OneTimeKey>) -> StorageResult<bool>;

    /// Removes and returns the oldest one-time key of `did`, atomically
    /// across every handle on the backend: each key is handed out once.
    async fn consume_one_time_key(&self, did: &str) -> StorageResult<Option<OneTimeKey>>;

    /// One-time keys held for `did`.
    async fn one_time_key_count(&self, did: &str) -> StorageResult<u64>;

    /// Deletes up to `max` agents whose `last_seen` is before
    /// `not_seen_since` (with their keys); returns their DIDs.
    async fn expire_agents(&self, not_seen_since: Timestamp, max: usize) -> StorageResult<Vec<String>>;
}

// ── Facade ───────────────────────────────────────────────────────────

/// Limits of a [`Storage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageLimits {
    /// Mailbox quotas.
    pub mailbox: MailboxLimits,
    /// Live proofs held in total ([`ClaimError::Full`](crate::ClaimError::Full) beyond).
    pub max_live_proofs: usize,
    /// Live proofs held per DID (memory and SQLite backends).
    pub max_live_proofs_per_did: usize,
    /// Longest a proof is remembered; a claim whose `expires_at` lies
    /// further ahead is refused by the NATS ledger, which keeps entries for
    /// exactly this long (its bucket's maximum age).
    pub max_proof_lifetime: Duration,
}

impl Default for StorageLimits {
    fn default() -> Self {
        Self {
            mailbox: MailboxLimits::default(),
            max_live_proofs: crate::replay::DEFAULT_MAX_LIVE_PROOFS,
            max_live_proofs_per_did: crate::replay::DEFAULT_MAX_LIVE_PROOFS_PER_DID,
            max_proof_lifetime: DEFAULT_MAX_PROOF_LIFETIME,
        }
    }
}

/// Which backend a [`Storage`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// In process, lost on exit.
    Memory,
    /// SQLite in a data directory.
    Sqlite,
    /// NATS JetStream.
    Nats,
}

/// One backend's mailboxes, registry and proof memory. Cloning shares them.
#[derive(Clone)]
pub struct Storage {
    /// Offline mailboxes.
    pub mailboxes: Arc<dyn Mailboxes>,
    /// Agent records and keys.
    pub registry: Arc<dyn Registry>,
    /// The once-only proof memory (pass as
    /// [`ServerConfig::proof_ledger`](crate::ServerConfig::proof_ledger)).
    pub proofs: Arc<dyn ProofLedger>,
    /// Cross-instance routing (NATS only).
    pub live: Option<nats::LiveRouter>,
    backend: Backend,
    ready: Arc<dyn ReadyCheck>,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// A backend's readiness probe.
#[async_trait]
pub(crate) trait ReadyCheck: Send + Sync + 'static {
    async fn ready(&self) -> StorageResult<()>;

    /// Makes every committed write durable in the backend's own files or
    /// servers (on shutdown). Nothing to do by default.
    async fn flush(&self) -> StorageResult<()> {
        Ok(())
    }
}

impl Storage {
    /// In-process storage (tests, `--memory`).
    pub fn memory(limits: StorageLimits) -> Self {
        let store = Arc::new(memory::MemoryStorage::new(limits));
        Self {
            mailboxes: store.clone(),
            registry: store.clone(),
            proofs: store.clone(),
            live: None,
            backend: Backend::Memory,
            ready: store,
        }
    }

    /// SQLite storage in `dir` (created if missing): a WAL database
    /// `meshwire.sqlite3` that survives a kill -9 with every committed
    /// write.
    pub async fn sqlite(dir: impl AsRef<std::path::Path>, limits: StorageLimits) -> StorageResult<Self> {
        let store = Arc::new(sqlite::SqliteStorage::open(dir.as_ref(), limits).await?);
        Ok(Self {
            mailboxes: store.clone(),
            registry: store.clone(),
            proofs: store.clone(),
            live: None,
            backend: Backend::Sqlite,
            ready: store,
        })
    }

    /// NATS JetStream storage (streams and KV buckets are created if
    /// missing). Must be called inside a multi-thread tokio runtime.
    pub async fn nats(options: nats::NatsOptions, limits: StorageLimits) -> StorageResult<Self> {
        let store = Arc::new(nats::NatsStorage::connect(options, limits).await?);
        Ok(Self {
            mailboxes: store.clone(),
            registry: store.clone(),
            proofs: store.clone(),
            live: Some(store.router()),
            backend: Backend::Nats,
            ready: store,
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether the store is reachable now (for `/readyz`).
    pub async fn ready(&self) -> StorageResult<()> {
        self.ready.ready().await
    }

    /// Flushes the backend on shutdown: SQLite checkpoints its WAL into
    /// the database file, NATS flushes pending publishes to the server.
    /// Every acknowledged write is durable without it; it leaves the data
    /// directory compact and the NATS connection drained.
    pub async fn flush(&self) -> StorageResult<()> {
        self.ready.flush().await
    }
}

/// Hex SHA-256 of an untrusted string: a fixed-size token safe in file
/// names, NATS subjects and KV keys.
pub(crate) fn token(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

/// `now + max_ttl`, the latest expiry accepted.
pub(crate) fn clamp_expiry(expires_at: Timestamp, now: Timestamp, max_ttl: Duration) -> Timestamp {
    let ceiling = now
        .0
        .saturating_add(u64::try_from(max_ttl.as_millis()).unwrap_or(u64::MAX));
    Timestamp(expires_at.0.min(ceiling))
}

/// Applies an [`AgentChange`], keeping the fields it may not change.
pub(crate) fn apply_change(record: &AgentRecord, change: AgentChange<'_>) -> (AgentRecord, bool) {
    let mut next = record.clone();
    let write = change(&mut next);
    next.did.clone_from(&record.did);
    next.capabilities.clone_from(&record.capabilities);
    next.registered_at = record.registered_at;
    (next, write)
}

/// Serde for `[u8; 64]` (serde derives arrays up to 32 only).
mod bytes64 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &[u8; 64], serializer: S) -> Result<S::Ok, S::Error> {
        value.as_slice().serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<[u8; 64], D::Error> {
        let bytes = Vec::<u8>::deserialize(deserializer)?;
        <[u8; 64]>::try_from(bytes.as_slice()).map_err(|_| serde::de::Error::invalid_length(bytes.len(), &"64 bytes"))
    }
}
