//! Crash-consistent persistence: a transactional, incremental store for an
//! agent's mesh state, its durable inbox and outbox (issue 9).
//!
//! # The contract
//!
//! A driver commits, in **one transaction** ([`Commit`]), everything one
//! operation changed, before it lets the operation's effects out of the
//! process:
//!
//! - **sending**: the sender's ratchet step (the peer's row, from
//!   [`Commit::from_dirty`]) and, for a send the relay has not acked yet, an
//!   outbox row ([`OutboxEntry`]); only then the ciphertext goes out;
//! - **receiving**: the decrypted message as an inbox row ([`InboxEntry`]),
//!   the ratchet step and the duplicate-id record; only then the message is
//!   acked to the relay or confirmed by receipt;
//! - **the application's ack**: the inbox row is removed
//!   ([`Commit::remove_inbox`]); the **relay's ack** of a send removes the
//!   outbox row ([`Commit::remove_outbox`]).
//!
//! Only what changed is written: one peer's row (its session, a few KB),
//! not the whole state. The lists that grow with traffic are side rows
//! ([`meshwire_proto::mesh::Mesh::track_side_rows`]): the **duplicate-id
//! memory** (one row per message id, [`Commit::seen`]) and the
//! **unconfirmed messages** ([`Commit::unconfirmed`]), so a message costs a
//! few small rows, never a rewrite of thousands of entries. The id is
//! committed with the ratchet step that decrypted the message and with the
//! inbox row, atomically: after a crash a message is either in the inbox
//! *and* remembered as seen, or neither (the relay redelivers it).
//!
//! [`Persistence::load`] returns everything needed to rebuild a client
//! ([`Snapshot`]): the pre-keys, the peers, the unacknowledged inbox in
//! arrival order and the outbox in acceptance order (so in order per peer).
//! The identity is not part of it: it lives in its own file
//! ([`crate::store::save_identity`], or encrypted:
//! [`save_identity_encrypted`]).
//!
//! # The default store: [`SqliteStore`]
//!
//! SQLite (bundled) in WAL mode, one file per agent, created `0600`.
//! See [`SqliteStore`] for the schema, its versioning and the migration from
//! the JSON state file of [`crate::store::FileStore`].
//!
//! ## Durability levels and their cost
//!
//! - [`Durability::Process`] (default): WAL with `synchronous=NORMAL`. A
//!   commit that returned survives the process being killed (SIGKILL, OOM,
//!   panic): the transaction is in the WAL file, in the OS page cache. A
//!   power loss or kernel crash may lose the last commits (never corrupts
//!   the file).
//! - [`Durability::PowerLoss`]: `synchronous=FULL`: every commit fsyncs the
//!   WAL before it returns.
//!
//! Measured on the development machine (ext4 on a virtio disk, 2 busy
//! cores, release build, 2,000 commits each; `docs/STORAGE.md` has the
//! full table):
//!
//! | durability | commit | p50 | p99 |
//! | --- | --- | --- | --- |
//! | `Process` | one ~2 KB peer row | 0.012 ms | 0.05 ms |
//! | `Process` | peer row + 256 B inbox row + ack of the previous | 0.034 ms | 0.5 ms |
//! | `Process`, encrypted | peer row + inbox row + ack | 0.046 ms | 2.6 ms |
//! | `PowerLoss` | peer row (plain or encrypted) | 4.0-4.9 ms | 12-20 ms |
//! | `PowerLoss` | peer row + inbox row + ack | 3.9-4.0 ms | 13-15 ms |
//!
//! At the `Process` level the slow commits are rare (7 to 22 of 2,000
//! over 1 ms, on a loaded machine); the fsync-bound WAL checkpoint runs
//! when the client is idle ([`Persistence::idle`], from
//! [`WAL_AUTOCHECKPOINT_PAGES`] WAL pages), inside a commit only at
//! [`WAL_CHECKPOINT_IN_COMMIT_PAGES`]; at `PowerLoss` every commit
//! waits for the disk's flush (about 4 ms here: 160-260 commits/s).
//!
//! The cost of `PowerLoss` is the device's flush latency and varies by
//! orders of magnitude between disks (a few µs on a battery-backed NVMe
//! controller, tens of ms on a cloud network disk); measure on yours with
//! `cargo test --release -p meshwire --test persist_bench -- --ignored --nocapture`.
//!
//! ## Limits
//!
//! The inbox and the outbox grow with what peers send and what the
//! application sends while the relay is away, so both are bounded
//! ([`Limits`]: rows and payload bytes, defaults [`DEFAULT_MAX_INBOX_ROWS`],
//! [`DEFAULT_MAX_INBOX_BYTES`], [`DEFAULT_MAX_OUTBOX_ROWS`],
//! [`DEFAULT_MAX_OUTBOX_BYTES`]). A commit that would exceed one is refused
//! whole with [`PersistError::InboxFull`] or [`PersistError::OutboxFull`]
//! and counted ([`PersistStats`]); nothing of it is written. A driver then
//! does not ack the message (the relay keeps it and redelivers it later) or
//! refuses the send. A commit that only removes rows is never refused.
//! Application meta entries are bounded too ([`MAX_META_ENTRIES`],
//! [`MAX_META_KEY_BYTES`], [`MAX_META_VALUE_BYTES`]).
//!
//! # Encryption at rest
//!
//! With an [`AtRestKey`] (32 raw bytes, or a passphrase stretched with
//! Argon2id), the secret-bearing values are sealed with
//! XChaCha20-Poly1305: the pre-keys, the peer rows, the inbox and outbox
//! payloads, and (with [`save_identity_encrypted`]) the identity file.
//! Each value has its own random nonce and is bound to its row (table and
//! key as associated data), so rows cannot be swapped. A wrong key is
//! detected on open by a key-verification value before anything is
//! written: [`PersistError::WrongKey`], file unchanged. What is *not*
//! encrypted: DIDs of peers, message ids, timestamps, sizes, the order of
//! rows, and application meta values. See [`AtRestKey`] and
//! `docs/STORAGE.md` for key handling.

mod crypto;
mod identity;
mod memory;
mod sqlite;

pub use crypto::{Argon2Params, AtRestKey};
pub use identity::{load_identity_encrypted, load_or_create_identity_encrypted, save_identity_encrypted};
pub use memory::MemoryPersistence;
pub use sqlite::{
    seen_trim_slack, SqliteOptions, SqliteStore, SCHEMA_VERSION, WAL_AUTOCHECKPOINT_PAGES,
    WAL_CHECKPOINT_IN_COMMIT_PAGES,
};

use crate::store::StoreError;
use meshwire_proto::mesh::{IdSource, Mesh, MeshConfig};
use meshwire_proto::{Identity, StateError};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Default of [`Limits::max_inbox_rows`].
pub const DEFAULT_MAX_INBOX_ROWS: u64 = 10_000;
/// Default of [`Limits::max_inbox_bytes`] (64 MiB of payload).
pub const DEFAULT_MAX_INBOX_BYTES: u64 = 64 << 20;
/// Default of [`Limits::max_outbox_rows`].
pub const DEFAULT_MAX_OUTBOX_ROWS: u64 = 10_000;
/// Default of [`Limits::max_outbox_bytes`] (64 MiB of payload).
pub const DEFAULT_MAX_OUTBOX_BYTES: u64 = 64 << 20;
/// Most application meta entries a store keeps.
pub const MAX_META_ENTRIES: usize = 1024;
/// Longest application meta key, in bytes.
pub const MAX_META_KEY_BYTES: usize = 256;
/// Longest application meta value, in bytes.
pub const MAX_META_VALUE_BYTES: usize = 64 * 1024;
/// Meta keys starting with this are the store's own; applications may not
/// set them.
pub const RESERVED_META_PREFIX: &str = "meshwire.";

/// Loading or committing persisted state failed. Every variant that
/// concerns a file names it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PersistError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A secret-bearing file may be read by group or others.
    #[error("{path} is readable by group or others (mode {mode:o}); run `chmod 600` on it")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a meshwire store, is damaged, or a value in it fails
    /// authentication (tampered, or moved from another row).
    #[error("{path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The database refused an operation (locked, disk full, read-only...).
    #[error("{path}: database error: {reason}")]
    Database {
        /// The file.
        path: PathBuf,
        /// SQLite's message.
        reason: String,
    },
    /// The store was written by a newer meshwire.
    #[error("{path} has schema version {found}, newer than this meshwire supports ({supported}); upgrade meshwire")]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// The key does not open the file. Nothing was written.
    #[error(
        "{path}: the key does not open it (wrong key or passphrase, or the file was altered); nothing was changed"
    )]
    WrongKey {
        /// The file.
        path: PathBuf,
    },
    /// The file is encrypted and no key was supplied.
    #[error("{path} is encrypted at rest; supply its key")]
    KeyRequired {
        /// The file.
        path: PathBuf,
    },
    /// A key was supplied but the file was created without encryption
    /// (it is never downgraded or upgraded silently).
    #[error("{path} is not encrypted but a key was supplied; open it without a key (or migrate it to a new encrypted store)")]
    NotEncrypted {
        /// The file.
        path: PathBuf,
    },
    /// The key-derivation parameters stored in the file are invalid or out
    /// of bounds, or Argon2 failed.
    #[error("{path}: key derivation: {reason}")]
    Kdf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The JSON state file could not be migrated into the store (the store
    /// and the JSON file are left as they were).
    #[error("{path}: migrating {json}: {reason}")]
    Migration {
        /// The store.
        path: PathBuf,
        /// The JSON state file.
        json: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The commit would make the inbox exceed its limit; nothing of it was
    /// written.
    #[error("inbox full: the commit would hold {rows} messages / {bytes} bytes (limits {max_rows} / {max_bytes})")]
    InboxFull {
        /// Rows after the commit.
        rows: u64,
        /// Payload bytes after the commit.
        bytes: u64,
        /// [`Limits::max_inbox_rows`].
        max_rows: u64,
        /// [`Limits::max_inbox_bytes`].
        max_bytes: u64,
    },
    /// The commit would make the outbox exceed its limit; nothing of it was
    /// written.
    #[error("outbox full: the commit would hold {rows} messages / {bytes} bytes (limits {max_rows} / {max_bytes})")]
    OutboxFull {
        /// Rows after the commit.
        rows: u64,
        /// Payload bytes after the commit.
        bytes: u64,
        /// [`Limits::max_outbox_rows`].
        max_rows: u64,
        /// [`Limits::max_outbox_bytes`].
        max_bytes: u64,
    },
    /// An application meta entry is refused (reserved prefix, too long, or
    /// too many entries); nothing of the commit was written.
    #[error("meta key {key:?}: {reason}")]
    Meta {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// An error of an application's own [`Persistence`] implementation.
    #[error("{location}: {source}")]
    Backend {
        /// Where the state lives.
        location: String,
        /// The implementation's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Writing or reading the identity file failed.
    #[error(transparent)]
    File(#[from] StoreError),
}

/// Bounds on what the durable inbox and outbox hold (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most unacknowledged messages in the inbox.
    pub max_inbox_rows: u64,
    /// Most payload bytes (plaintext) in the inbox.
    pub max_inbox_bytes: u64,
    /// Most unsent or unacked messages in the outbox.
    pub max_outbox_rows: u64,
    /// Most payload bytes in the outbox.
    pub max_outbox_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_inbox_rows: DEFAULT_MAX_INBOX_ROWS,
            max_inbox_bytes: DEFAULT_MAX_INBOX_BYTES,
            max_outbox_rows: DEFAULT_MAX_OUTBOX_ROWS,
            max_outbox_bytes: DEFAULT_MAX_OUTBOX_BYTES,
        }
    }
}

/// How hard a commit tries to reach stable storage before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Survives the process being killed; a power loss may lose the last
    /// commits (WAL, `synchronous=NORMAL`).
    #[default]
    Process,
    /// Survives a power loss: fsync per commit (WAL, `synchronous=FULL`,
    /// `fullfsync` where the platform has it).
    PowerLoss,
}

/// Counters of a store (since it was opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PersistStats {
    /// Commits written.
    pub commits: u64,
    /// Commits refused because the inbox was full.
    pub refused_inbox_full: u64,
    /// Commits refused because the outbox was full.
    pub refused_outbox_full: u64,
    /// WAL checkpoints made while the client was idle
    /// ([`Persistence::idle`]).
    pub idle_checkpoints: u64,
}

/// A decrypted message handed to the application and not yet acknowledged
/// by it. Debug shows the payload's length only.
#[derive(Clone, PartialEq, Eq)]
pub struct InboxEntry {
    /// The sender's DID.
    pub from: String,
    /// The message id (unique per sender).
    pub id: String,
    /// The decrypted payload bytes (secret).
    pub payload: Zeroizing<Vec<u8>>,
    /// When it arrived, Unix milliseconds.
    pub received_at_ms: u64,
    /// Sent in plaintext by an allow-listed peer.
    pub plaintext: bool,
}

impl fmt::Debug for InboxEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxEntry")
            .field("from", &self.from)
            .field("id", &self.id)
            .field("payload_len", &self.payload.len())
            .field("received_at_ms", &self.received_at_ms)
            .field("plaintext", &self.plaintext)
            .finish()
    }
}

/// A send accepted from the application and not yet acked by the relay.
/// The payload is opaque to the store (the plaintext to encrypt once a
/// session exists, or the frame already encrypted: the driver's choice).
/// Debug shows the payload's length only.
#[derive(Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The recipient's DID.
    pub peer: String,
    /// The message id (unique among this agent's sends).
    pub id: String,
    /// The payload bytes (secret).
    pub payload: Zeroizing<Vec<u8>>,
    /// When the application handed it over, Unix milliseconds.
    pub created_at_ms: u64,
}

impl fmt::Debug for OutboxEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxEntry")
            .field("peer", &self.peer)
            .field("id", &self.id)
            .field("payload_len", &self.payload.len())
            .field("created_at_ms", &self.created_at_ms)
            .finish()
    }
}

/// Everything one operation changed, written in one transaction by
/// [`Persistence::commit`]. Debug shows counts only.
///
/// Within a commit, removals are applied before additions; adding an inbox
/// row whose `(from, id)` is already in the inbox, or an outbox row whose
/// `(peer, id)` is already in the outbox, leaves the existing row (no
/// duplicate is ever stored).
#[derive(Default, Clone)]
pub struct Commit {
    /// The new pre-keys JSON ([`Mesh::export_prekeys`]), if they changed.
    pub prekeys: Option<Zeroizing<String>>,
    /// Peer rows to write (`Some`: the JSON of [`Mesh::export_peer`]) or
    /// delete (`None`, with the peer's side rows).
    pub peers: Vec<(String, Option<Zeroizing<String>>)>,
    /// Message ids newly remembered for duplicate detection, `(peer, id)`
    /// in order (side rows: [`Mesh::track_side_rows`]); a store keeps the
    /// newest [`Commit::seen_limit`] per peer.
    pub seen: Vec<(String, String)>,
    /// How many remembered ids a store keeps per peer.
    pub seen_limit: usize,
    /// Unconfirmed messages to write (`Some`: JSON, secret; a rewrite keeps
    /// the original position) or delete (`None`), keyed `(peer, id)`.
    pub unconfirmed: Vec<(String, String, Option<Zeroizing<String>>)>,
    /// Messages to add to the inbox, in arrival order.
    pub inbox_add: Vec<InboxEntry>,
    /// Inbox rows the application acknowledged: `(from, id)`.
    pub inbox_remove: Vec<(String, String)>,
    /// Sends to add to the outbox, in order.
    pub outbox_add: Vec<OutboxEntry>,
    /// Outbox rows the relay acked: `(peer, id)`.
    pub outbox_remove: Vec<(String, String)>,
    /// Application meta entries to set (`Some`) or delete (`None`). Not
    /// encrypted: no secrets here. Keys must not start with
    /// [`RESERVED_META_PREFIX`].
    pub meta: Vec<(String, Option<String>)>,
}

impl fmt::Debug for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Commit")
            .field("prekeys", &self.prekeys.is_some())
            .field("peers", &self.peers.len())
            .field("seen", &self.seen.len())
            .field("unconfirmed", &self.unconfirmed.len())
            .field("inbox_add", &self.inbox_add.len())
            .field("inbox_remove", &self.inbox_remove.len())
            .field("outbox_add", &self.outbox_add.len())
            .field("outbox_remove", &self.outbox_remove.len())
            .field("meta", &self.meta.len())
            .finish()
    }
}

impl Commit {
    /// An empty commit.
    pub fn new() -> Self {
        Self::default()
    }

    /// The rows `mesh` changed since the last [`Mesh::take_dirty`] (which
    /// this calls): the pre-keys if they changed, and each changed peer's
    /// row, or its deletion when the peer now holds nothing.
    pub fn from_dirty(mesh: &mut Mesh) -> Self {
        let dirty = mesh.take_dirty();
        let mut commit = Self::new();
        if dirty.prekeys {
            commit.prekeys = Some(mesh.export_prekeys());
        }
        for did in dirty.peers {
            let row = mesh.export_peer(&did);
            commit.peers.push((did, row));
        }
        commit.seen = dirty.seen;
        commit.seen_limit = dirty.seen_limit;
        commit.unconfirmed = dirty.unconfirmed;
        commit
    }

    /// The whole state of `mesh` (pre-keys, every peer that holds
    /// something and its side rows), for a store that does not have it
    /// yet: the first commit of a new agent. Turns
    /// [`Mesh::track_side_rows`] on. Rows of peers the store holds but
    /// `mesh` does not are not deleted: use it on an empty store.
    pub fn full(mesh: &mut Mesh) -> Self {
        mesh.track_side_rows();
        // Marks the pre-keys changed.
        let _ = mesh.prekeys_mut();
        Self::from_dirty(mesh)
    }

    /// Whether the commit changes nothing.
    pub fn is_empty(&self) -> bool {
        self.prekeys.is_none()
            && self.peers.is_empty()
            && self.seen.is_empty()
            && self.unconfirmed.is_empty()
            && self.inbox_add.is_empty()
            && self.inbox_remove.is_empty()
            && self.outbox_add.is_empty()
            && self.outbox_remove.is_empty()
            && self.meta.is_empty()
    }

    /// Writes `did`'s row (`Some`) or deletes it (`None`).
    pub fn put_peer(&mut self, did: impl Into<String>, row: Option<Zeroizing<String>>) -> &mut Self {
        self.peers.push((did.into(), row));
        self
    }

    /// Adds a message to the inbox.
    pub fn add_inbox(&mut self, entry: InboxEntry) -> &mut Self {
        self.inbox_add.push(entry);
        self
    }

    /// Removes the inbox row of message `id` from `from` (application ack).
    pub fn remove_inbox(&mut self, from: impl Into<String>, id: impl Into<String>) -> &mut Self {
        self.inbox_remove.push((from.into(), id.into()));
        self
    }

    /// Adds a send to the outbox.
    pub fn add_outbox(&mut self, entry: OutboxEntry) -> &mut Self {
        self.outbox_add.push(entry);
        self
    }

    /// Removes the outbox row of message `id` to `peer` (relay ack).
    pub fn remove_outbox(&mut self, peer: impl Into<String>, id: impl Into<String>) -> &mut Self {
        self.outbox_remove.push((peer.into(), id.into()));
        self
    }

    /// Sets (`Some`) or deletes (`None`) an application meta entry.
    pub fn set_meta(&mut self, key: impl Into<String>, value: Option<String>) -> &mut Self {
        self.meta.push((key.into(), value));
        self
    }

    /// Checks the application meta entries' keys and sizes (the count is
    /// checked by the store).
    pub(crate) fn check_meta(&self) -> Result<(), PersistError> {
        for (key, value) in &self.meta {
            let refuse = |reason: &str| {
                Err(PersistError::Meta {
                    key: key.chars().take(64).collect(),
                    reason: reason.into(),
                })
            };
            if key.starts_with(RESERVED_META_PREFIX) {
                return refuse("reserved for the store (prefix \"meshwire.\")");
            }
            if key.is_empty() || key.len() > MAX_META_KEY_BYTES {
                return refuse("empty or longer than MAX_META_KEY_BYTES");
            }
            if value.as_ref().is_some_and(|v| v.len() > MAX_META_VALUE_BYTES) {
                return refuse("value longer than MAX_META_VALUE_BYTES");
            }
        }
        Ok(())
    }
}

/// What a store holds: everything needed to rebuild a client except its
/// identity. Debug shows counts only.
#[derive(Default, Clone)]
pub struct Snapshot {
    /// The pre-keys JSON; `None` for a store that never held a state.
    pub prekeys: Option<Zeroizing<String>>,
    /// Each peer's row, in DID order.
    pub peers: Vec<(String, Zeroizing<String>)>,
    /// Each peer's remembered message ids, oldest first.
    pub seen: BTreeMap<String, Vec<String>>,
    /// Each peer's unconfirmed messages (JSON, secret), in sending order.
    pub unconfirmed: BTreeMap<String, Vec<Zeroizing<String>>>,
    /// Unacknowledged messages, in arrival order.
    pub inbox: Vec<InboxEntry>,
    /// Unacked sends, in the order they were accepted (so in order per
    /// peer).
    pub outbox: Vec<OutboxEntry>,
    /// Application meta entries.
    pub meta: BTreeMap<String, String>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("prekeys", &self.prekeys.is_some())
            .field("peers", &self.peers.len())
            .field("seen", &self.seen.values().map(Vec::len).sum::<usize>())
            .field("unconfirmed", &self.unconfirmed.values().map(Vec::len).sum::<usize>())
            .field("inbox", &self.inbox.len())
            .field("outbox", &self.outbox.len())
            .field("meta", &self.meta.len())
            .finish()
    }
}

impl Snapshot {
    /// Rebuilds the mesh of `identity` from the stored rows; `Ok(None)`
    /// when the store holds no state yet (a new agent).
    pub fn restore_mesh(
        &self,
        identity: Identity,
        config: MeshConfig,
        ids: Box<dyn IdSource>,
    ) -> Result<Option<Mesh>, StateError> {
        let Some(prekeys) = &self.prekeys else {
            return Ok(None);
        };
        let peers = self.peers.iter().map(|(did, row)| (did.clone(), row.as_str()));
        let side = meshwire_proto::mesh::SideRows {
            seen: self.seen.clone(),
            unconfirmed: self
                .unconfirmed
                .iter()
                .map(|(did, rows)| (did.clone(), rows.iter().map(|r| r.as_str()).collect()))
                .collect(),
        };
        Mesh::import_parts(identity, prekeys, peers, &side, config, ids).map(Some)
    }
}

/// Where a client keeps its state between runs, transactionally. The
/// default implementation is [`SqliteStore`]; an application may supply its
/// own (the trait is object-safe: `Arc<dyn Persistence>`).
///
/// Implementations must make each [`Persistence::commit`] atomic (all of it
/// or nothing, also across a crash) and durable when it returns (at least
/// against the process being killed), and apply it in the order commits
/// are made. Values are secret: keep them private (and encrypted if the
/// application asked for it).
pub trait Persistence: Send + Sync {
    /// Everything stored (see [`Snapshot`]).
    fn load(&self) -> Result<Snapshot, PersistError>;

    /// Applies `commit` atomically; an empty commit may return at once.
    /// On error nothing of it was applied.
    fn commit(&self, commit: &Commit) -> Result<(), PersistError>;

    /// Forgets the mesh state (pre-keys and peer rows): the recovery from a
    /// state that cannot be imported; the agent starts over with the same
    /// identity. The inbox, the outbox and the meta entries are kept.
    fn reset_mesh(&self) -> Result<(), PersistError>;

    /// Where the state lives, for messages.
    fn location(&self) -> String;

    /// Called by the client when it has committed nothing for a while
    /// ([`crate::client::STORE_QUIET`], checked every 100 ms, and only
    /// after new commits): work a store can defer out of the commit path
    /// goes here. [`SqliteStore`] checkpoints its write-ahead log once it
    /// holds [`WAL_AUTOCHECKPOINT_PAGES`] pages. It runs on a blocking
    /// thread; a commit made meanwhile waits for it. An error is reported
    /// as an event and changes nothing stored. Default: nothing.
    fn idle(&self) -> Result<(), PersistError> {
        Ok(())
    }

    /// Releases what the store holds (files, locks), so that another
    /// store can open the same state, in this process or another; later
    /// calls fail. A client calls it on `close()` for a store it opened
    /// itself ([`crate::MeshClientBuilder::state_dir`]). Default: nothing.
    fn close(&self) {}
}

/// The store file of `did` in a state directory:
/// `<dir>/<did with every character but ASCII letters and digits as _>.db`.
pub fn state_file(dir: &Path, did: &str) -> PathBuf {
    dir.join(format!("{}.db", file_stem(did)))
}

/// The JSON state file an older meshwire ([`crate::store::FileStore`])
/// kept for `did` in `dir`.
pub fn legacy_state_file(dir: &Path, did: &str) -> PathBuf {
    crate::store::FileStore::new(dir).path(did)
}

fn file_stem(did: &str) -> String {
    did.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Opens (or creates) the SQLite store of `did` in `dir` with `options`,
/// creating the directory (`0700`) if missing, and migrating the JSON
/// state file of an older meshwire found there
/// ([`legacy_state_file`]). A path that exists and is not a directory is
/// refused with an error that says so.
pub fn open_state_dir(dir: &Path, did: &str, options: SqliteOptions) -> Result<SqliteStore, PersistError> {
    let io = |source: std::io::Error| PersistError::Io {
        path: dir.to_owned(),
        source,
    };
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "the state path is not a directory",
            )))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder.create(dir).map_err(io)?;
        }
        Err(e) => return Err(io(e)),
    }
    let legacy = legacy_state_file(dir, did);
    let options = if legacy.exists() {
        options.migrate_from(legacy)
    } else {
        options
    };
    options.open(state_file(dir, did))
}

/// The JSON state format of [`Mesh::export_state`] (and of the files
/// [`crate::store::FileStore`] writes).
pub(crate) const JSON_STATE_FORMAT: &str = "meshwire-mesh/1";

/// A whole-state JSON split into rows without copying the secrets into an
/// untyped value.
#[derive(serde::Deserialize)]
struct JsonState<'a> {
    format: String,
    #[serde(borrow)]
    prekeys: &'a serde_json::value::RawValue,
    #[serde(borrow, default)]
    peers: BTreeMap<String, &'a serde_json::value::RawValue>,
}

/// The pre-keys row and the peer rows of a [`Mesh::export_state`] text.
pub(crate) type Rows = (Zeroizing<String>, Vec<(String, Zeroizing<String>)>);

/// Splits a whole-state JSON (`meshwire-mesh/1`) into its rows.
pub(crate) fn split_state(text: &str) -> Result<Rows, String> {
    let state: JsonState<'_> = serde_json::from_str(text).map_err(|e| format!("not a state file: {e}"))?;
    if state.format != JSON_STATE_FORMAT {
        return Err(format!("format {:?}, expected {JSON_STATE_FORMAT:?}", state.format));
    }
    if !state.prekeys.get().trim_start().starts_with('{') {
        return Err("the pre-keys are not an object".into());
    }
    let mut peers = Vec::with_capacity(state.peers.len());
    for (did, row) in state.peers {
        if !row.get().trim_start().starts_with('{') {
            return Err(format!("peer {did:?} is not an object"));
        }
        peers.push((did, Zeroizing::new(row.get().to_owned())));
    }
    Ok((Zeroizing::new(state.prekeys.get().to_owned()), peers))
}

/// The current time in Unix milliseconds (0 before 1970).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
