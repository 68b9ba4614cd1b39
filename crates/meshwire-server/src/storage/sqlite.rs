//! The durable single-instance backend: one SQLite database
//! (`meshwire.sqlite3`, WAL journal) in a data directory.
//!
//! Every write is one transaction, committed before the call returns, so a
//! process killed with SIGKILL loses nothing it was told was stored (with
//! `synchronous=NORMAL` in WAL mode a committed transaction survives the
//! process; only a power loss can lose the last ones, see
//! [`SqliteOptions::synchronous_full`]). Depth counters are kept by
//! triggers in the same transactions, so quotas cost O(1); mailbox fetches
//! walk the `(recipient, seq)` index from a cursor; discovery walks the
//! `(capability, seq)` index; expiry walks the expiry / last-seen indexes.
//!
//! Statements run on tokio's blocking pool. Several handles (processes) may
//! open the same directory: writes are serialized by SQLite
//! (`BEGIN IMMEDIATE`, busy timeout [`BUSY_TIMEOUT`]), and
//! [`Registry::update_agent`] is a compare-and-set on a version column.

use super::{
    apply_change, clamp_expiry, AgentChange, AgentRecord, Appended, Created, MailboxTotals, Mailboxes, NewMessage,
    OneTimeKey, Quota, ReadyCheck, Registry, StorageError, StorageLimits, StorageResult, StoredMessage,
    MAX_FETCH_BATCH,
};
use crate::replay::{ClaimError, ProofLedger};
use async_trait::async_trait;
use meshwire_proto::time::Timestamp;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "meshwire.sqlite3";
/// How long a writer waits for another handle's transaction.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most compare-and-set attempts of [`Registry::update_agent`] before
/// [`StorageError::Contention`].
const MAX_CAS_ATTEMPTS: usize = 100;
/// Most expired messages deleted by one sweep inside an append.
const SWEEP_BATCH: usize = 10_000;

const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS mail (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient TEXT NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    frame TEXT NOT NULL,
    size INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    UNIQUE (recipient, id)
);
CREATE INDEX IF NOT EXISTS mail_by_recipient ON mail (recipient, seq);
CREATE INDEX IF NOT EXISTS mail_by_expiry ON mail (expires_at);
CREATE TABLE IF NOT EXISTS mail_depth (
    kind INTEGER NOT NULL,
    who TEXT NOT NULL,
    messages INTEGER NOT NULL,
    PRIMARY KEY (kind, who)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mail_totals (
    one INTEGER PRIMARY KEY CHECK (one = 0),
    messages INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO mail_totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS mail_inserted AFTER INSERT ON mail BEGIN
    INSERT INTO mail_depth VALUES (0, NEW.recipient, 1)
        ON CONFLICT (kind, who) DO UPDATE SET messages = messages + 1;
    INSERT INTO mail_depth VALUES (1, NEW.sender, 1)
        ON CONFLICT (kind, who) DO UPDATE SET messages = messages + 1;
    UPDATE mail_totals SET messages = messages + 1, bytes = bytes + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS mail_deleted AFTER DELETE ON mail BEGIN
    UPDATE mail_depth SET messages = messages - 1 WHERE kind = 0 AND who = OLD.recipient;
    UPDATE mail_depth SET messages = messages - 1 WHERE kind = 1 AND who = OLD.sender;
    DELETE FROM mail_depth WHERE messages <= 0
        AND ((kind = 0 AND who = OLD.recipient) OR (kind = 1 AND who = OLD.sender));
    UPDATE mail_totals SET messages = messages - 1, bytes = bytes - OLD.size;
END;

CREATE TABLE IF NOT EXISTS agents (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    did TEXT NOT NULL UNIQUE,
    record BLOB NOT NULL,
    last_seen INTEGER NOT NULL,
    version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS agents_by_last_seen ON agents (last_seen);
CREATE TABLE IF NOT EXISTS capabilities (
    capability TEXT NOT NULL,
    seq INTEGER NOT NULL,
    did TEXT NOT NULL,
    PRIMARY KEY (capability, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS capabilities_by_seq ON capabilities (seq);
CREATE TABLE IF NOT EXISTS one_time_keys (
    did TEXT NOT NULL,
    pos INTEGER NOT NULL,
    key BLOB NOT NULL,
    PRIMARY KEY (did, pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS registry_totals (
    one INTEGER PRIMARY KEY CHECK (one = 0),
    agents INTEGER NOT NULL
);
INSERT OR IGNORE INTO registry_totals VALUES (0, 0);
CREATE TRIGGER IF NOT EXISTS agent_inserted AFTER INSERT ON agents BEGIN
    UPDATE registry_totals SET agents = agents + 1;
END;
CREATE TRIGGER IF NOT EXISTS agent_deleted AFTER DELETE ON agents BEGIN
    UPDATE registry_totals SET agents = agents - 1;
    DELETE FROM capabilities WHERE seq = OLD.seq;
    DELETE FROM one_time_keys WHERE did = OLD.did;
END;

CREATE TABLE IF NOT EXISTS proofs (
    did TEXT NOT NULL,
    proof BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (did, proof)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS proofs_by_expiry ON proofs (expires_at);
CREATE TABLE IF NOT EXISTS proof_totals (
    one INTEGER PRIMARY KEY CHECK (one = 0),
    live INTEGER NOT NULL
);
INSERT OR IGNORE INTO proof_totals VALUES (0, 0);
CREATE TRIGGER IF NOT EXISTS proof_inserted AFTER INSERT ON proofs BEGIN
    UPDATE proof_totals SET live = live + 1;
END;
CREATE TRIGGER IF NOT EXISTS proof_deleted AFTER DELETE ON proofs BEGIN
    UPDATE proof_totals SET live = live - 1;
END;
";

/// Options of the SQLite backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SqliteOptions {
    /// `synchronous=FULL` (an fsync per commit: survives power loss, slower)
    /// instead of the default `NORMAL` (survives a killed process).
    pub synchronous_full: bool,
}

/// The SQLite backend (see [`Storage::sqlite`](super::Storage::sqlite)).
pub struct SqliteStorage {
    path: PathBuf,
    limits: StorageLimits,
    conn: Arc<Mutex<Connection>>,
}

impl fmt::Debug for SqliteStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStorage")
            .field("path", &self.path)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn db_error(e: rusqlite::Error) -> StorageError {
    StorageError::Unavailable(format!("sqlite: {e}"))
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl SqliteStorage {
    /// Opens (creating if needed) the database in `dir` with default options.
    pub async fn open(dir: &Path, limits: StorageLimits) -> StorageResult<Self> {
        Self::open_with(dir, limits, SqliteOptions::default()).await
    }

    /// Opens (creating if needed) the database in `dir`.
    pub async fn open_with(dir: &Path, limits: StorageLimits, options: SqliteOptions) -> StorageResult<Self> {
        let dir = dir.to_path_buf();
        let path = dir.join(DB_FILE);
        let db_path = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> StorageResult<Connection> {
            std::fs::create_dir_all(&dir)
                .map_err(|e| StorageError::Unavailable(format!("creating {}: {e}", dir.display())))?;
            let conn = Connection::open(&db_path).map_err(db_error)?;
            conn.busy_timeout(BUSY_TIMEOUT).map_err(db_error)?;
            conn.pragma_update(None, "journal_mode", "WAL").map_err(db_error)?;
            let synchronous = if options.synchronous_full { "FULL" } else { "NORMAL" };
            conn.pragma_update(None, "synchronous", synchronous).map_err(db_error)?;
            conn.execute_batch(SCHEMA).map_err(db_error)?;
            Ok(conn)
        })
        .await
        .map_err(|e| StorageError::Unavailable(format!("opening the database: {e}")))??;
        Ok(Self {
            path,
            limits,
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the connection on the blocking pool.
    async fn run<T, F>(&self, f: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StorageResult<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|e| StorageError::Unavailable(format!("storage task failed: {e}")))?
    }
}

fn refusal(
    tx: &rusqlite::Transaction<'_>,
    message: &NewMessage,
    limits: &super::MailboxLimits,
) -> StorageResult<Option<Quota>> {
    let depth = |kind: i64, who: &str| -> StorageResult<u64> {
        tx.prepare_cached("SELECT messages FROM mail_depth WHERE kind = ?1 AND who = ?2")
            .and_then(|mut st| st.query_row(params![kind, who], |row| row.get::<_, i64>(0)).optional())
            .map(|v| v.map_or(0, to_u64))
            .map_err(db_error)
    };
    if depth(0, &message.recipient)? >= limits.per_recipient {
        return Ok(Some(Quota::Recipient));
    }
    if depth(1, &message.sender)? >= limits.per_sender {
        return Ok(Some(Quota::Sender));
    }
    let totals = totals(tx)?;
    if totals.messages >= limits.total {
        return Ok(Some(Quota::Total));
    }
    if totals.bytes.saturating_add(message.size()) > limits.total_bytes {
        return Ok(Some(Quota::Bytes));
    }
    Ok(None)
}

fn totals(conn: &Connection) -> StorageResult<MailboxTotals> {
    conn.prepare_cached("SELECT messages, bytes FROM mail_totals WHERE one = 0")
        .and_then(|mut st| {
            st.query_row([], |row| {
                Ok(MailboxTotals {
                    messages: to_u64(row.get(0)?),
                    bytes: to_u64(row.get(1)?),
                })
            })
        })
        .map_err(db_error)
}

fn sweep(conn: &Connection, now: Timestamp, max: usize) -> StorageResult<u64> {
    let removed = conn
        .execute(
            "DELETE FROM mail WHERE seq IN (SELECT seq FROM mail WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
            params![to_i64(now.0), to_i64(max as u64)],
        )
        .map_err(db_error)?;
    Ok(removed as u64)
}

#[async_trait]
impl Mailboxes for SqliteStorage {
    async fn append(&self, message: NewMessage, now: Timestamp) -> StorageResult<Appended> {
        message.check()?;
        let limits = self.limits.mailbox;
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_error)?;
            let exists = tx
                .prepare_cached("SELECT 1 FROM mail WHERE recipient = ?1 AND id = ?2")
                .and_then(|mut st| {
                    st.query_row(params![message.recipient, message.id], |_| Ok(()))
                        .optional()
                })
                .map_err(db_error)?
                .is_some();
            if exists {
                return Ok(Appended::Duplicate);
            }
            if refusal(&tx, &message, &limits)?.is_some() {
                sweep(&tx, now, SWEEP_BATCH)?;
                if let Some(quota) = refusal(&tx, &message, &limits)? {
                    tx.commit().map_err(db_error)?;
                    return Ok(Appended::Refused(quota));
                }
            }
            let expires_at = clamp_expiry(message.expires_at, now, limits.max_ttl);
            tx.prepare_cached(
                "INSERT INTO mail (recipient, id, sender, frame, size, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    message.recipient,
                    message.id,
                    message.sender,
                    &*message.frame,
                    to_i64(message.size()),
                    to_i64(expires_at.0)
                ])
            })
            .map_err(db_error)?;
            let seq = to_u64(tx.last_insert_rowid());
            tx.commit().map_err(db_error)?;
            Ok(Appended::Stored { seq })
        })
        .await
    }

    async fn fetch(
        &self,
        recipient: &str,
        after: u64,
        max: usize,
        now: Timestamp,
    ) -> StorageResult<Vec<StoredMessage>> {
        let max = max.min(MAX_FETCH_BATCH);
        let recipient = recipient.to_owned();
        self.run(move |conn| {
            let mut out = Vec::with_capacity(max);
            {
                let mut statement = conn
                    .prepare_cached(
                        "SELECT seq, id, sender, frame, expires_at FROM mail \
                         WHERE recipient = ?1 AND seq > ?2 AND expires_at > ?3 ORDER BY seq LIMIT ?4",
                    )
                    .map_err(db_error)?;
                let rows = statement
                    .query_map(
                        params![recipient, to_i64(after), to_i64(now.0), to_i64(max as u64)],
                        |row| {
                            Ok(StoredMessage {
                                seq: to_u64(row.get(0)?),
                                id: row.get(1)?,
                                sender: row.get(2)?,
                                frame: Arc::from(row.get::<_, String>(3)?),
                                expires_at: Timestamp(to_u64(row.get(4)?)),
                            })
                        },
                    )
                    .map_err(db_error)?;
                for row in rows {
                    out.push(row.map_err(db_error)?);
                }
            }
            // Expired messages the walk stepped over (or all remaining
            // expired ones when the batch is not full) are deleted.
            let upto = if out.len() < max {
                i64::MAX
            } else {
                out.last().map_or(i64::MAX, |m| to_i64(m.seq))
            };
            conn.execute(
                "DELETE FROM mail WHERE recipient = ?1 AND seq > ?2 AND seq <= ?3 AND expires_at <= ?4",
                params![recipient, to_i64(after), upto, to_i64(now.0)],
            )
            .map_err(db_error)?;
            Ok(out)
        })
        .await
    }

    async fn ack(&self, recipient: &str, id: &str) -> StorageResult<bool> {
        let (recipient, id) = (recipient.to_owned(), id.to_owned());
        self.run(move |conn| {
            let removed = conn
                .prepare_cached("DELETE FROM mail WHERE recipient = ?1 AND id = ?2")
                .and_then(|mut st| st.execute(params![recipient, id]))
                .map_err(db_error)?;
            Ok(removed > 0)
        })
        .await
    }

    async fn depth(&self, recipient: &str) -> StorageResult<u64> {
        let recipient = recipient.to_owned();
        self.run(move |conn| depth_of(conn, 0, &recipient)).await
    }

    async fn sender_depth(&self, sender: &str) -> StorageResult<u64> {
        let sender = sender.to_owned();
        self.run(move |conn| depth_of(conn, 1, &sender)).await
    }

    async fn totals(&self) -> StorageResult<MailboxTotals> {
        self.run(|conn| totals(conn)).await
    }

    async fn expire(&self, now: Timestamp, max: usize) -> StorageResult<u64> {
        self.run(move |conn| sweep(conn, now, max)).await
    }
}

fn depth_of(conn: &Connection, kind: i64, who: &str) -> StorageResult<u64> {
    conn.query_row(
        "SELECT messages FROM mail_depth WHERE kind = ?1 AND who = ?2",
        params![kind, who],
        |row| row.get::<_, i64>(0),
    )
    .optional()
    .map(|v| v.map_or(0, to_u64))
    .map_err(db_error)
}

fn encode_key(key: &OneTimeKey) -> StorageResult<Vec<u8>> {
    serde_json::to_vec(key).map_err(|e| StorageError::Corrupt(format!("encoding a one-time key: {e}")))
}

fn decode_key(bytes: &[u8]) -> StorageResult<OneTimeKey> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt(format!("decoding a one-time key: {e}")))
}

fn load_agent(conn: &Connection, did: &str) -> StorageResult<Option<(AgentRecord, i64)>> {
    let row = conn
        .query_row(
            "SELECT record, version FROM agents WHERE did = ?1",
            params![did],
            |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?)),
        )
        .optional()
        .map_err(db_error)?;
    row.map(|(bytes, version)| Ok((AgentRecord::decode(&bytes)?, version)))
        .transpose()
}

#[async_trait]
impl Registry for SqliteStorage {
    async fn create_agent(&self, record: AgentRecord, max_agents: u64) -> StorageResult<Created> {
        let encoded = record.encode()?;
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_error)?;
            let exists = tx
                .query_row("SELECT 1 FROM agents WHERE did = ?1", params![record.did], |_| Ok(()))
                .optional()
                .map_err(db_error)?
                .is_some();
            if exists {
                return Ok(Created::Exists);
            }
            let count: i64 = tx
                .query_row("SELECT agents FROM registry_totals WHERE one = 0", [], |row| row.get(0))
                .map_err(db_error)?;
            if to_u64(count) >= max_agents {
                return Ok(Created::Full);
            }
            tx.execute(
                "INSERT INTO agents (did, record, last_seen, version) VALUES (?1, ?2, ?3, 0)",
                params![record.did, encoded, to_i64(record.last_seen)],
            )
            .map_err(db_error)?;
            let seq = tx.last_insert_rowid();
            for capability in &record.capabilities {
                tx.execute(
                    "INSERT OR IGNORE INTO capabilities (capability, seq, did) VALUES (?1, ?2, ?3)",
                    params![capability, seq, record.did],
                )
                .map_err(db_error)?;
            }
            tx.commit().map_err(db_error)?;
            Ok(Created::Created)
        })
        .await
    }

    async fn get_agent(&self, did: &str) -> StorageResult<Option<AgentRecord>> {
        let did = did.to_owned();
        self.run(move |conn| Ok(load_agent(conn, &did)?.map(|(r, _)| r))).await
    }

    async fn update_agent(&self, did: &str, change: AgentChange<'_>) -> StorageResult<Option<(AgentRecord, bool)>> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let owned = did.to_owned();
            let Some((record, version)) = self.run(move |conn| load_agent(conn, &owned)).await? else {
                return Ok(None);
            };
            let (next, write) = apply_change(&record, change);
            if !write {
                return Ok(Some((record, false)));
            }
            let encoded = next.encode()?;
            let owned = did.to_owned();
            let last_seen = to_i64(next.last_seen);
            let updated = self
                .run(move |conn| {
                    conn.execute(
                        "UPDATE agents SET record = ?1, last_seen = ?2, version = version + 1 \
                         WHERE did = ?3 AND version = ?4",
                        params![encoded, last_seen, owned, version],
                    )
                    .map_err(db_error)
                })
                .await?;
            if updated == 1 {
                return Ok(Some((next, true)));
            }
        }
        Err(StorageError::Contention(format!("agent record {}", super::token(did))))
    }

    async fn delete_agent(&self, did: &str) -> StorageResult<bool> {
        let did = did.to_owned();
        self.run(move |conn| {
            let removed = conn
                .execute("DELETE FROM agents WHERE did = ?1", params![did])
                .map_err(db_error)?;
            Ok(removed > 0)
        })
        .await
    }

    async fn agent_count(&self) -> StorageResult<u64> {
        self.run(|conn| {
            conn.query_row("SELECT agents FROM registry_totals WHERE one = 0", [], |row| {
                row.get::<_, i64>(0)
            })
            .map(to_u64)
            .map_err(db_error)
        })
        .await
    }

    async fn discover(&self, capability: &str, limit: usize) -> StorageResult<Vec<AgentRecord>> {
        let capability = capability.to_owned();
        self.run(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT a.record FROM capabilities c JOIN agents a ON a.seq = c.seq \
                     WHERE c.capability = ?1 ORDER BY c.seq LIMIT ?2",
                )
                .map_err(db_error)?;
            let rows = statement
                .query_map(params![capability, to_i64(limit as u64)], |row| {
                    row.get::<_, Vec<u8>>(0)
                })
                .map_err(db_error)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(AgentRecord::decode(&row.map_err(db_error)?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn set_one_time_keys(&self, did: &str, keys: Vec<OneTimeKey>) -> StorageResult<bool> {
        let did = did.to_owned();
        let encoded = keys.iter().map(encode_key).collect::<StorageResult<Vec<_>>>()?;
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_error)?;
            let exists = tx
                .query_row("SELECT 1 FROM agents WHERE did = ?1", params![did], |_| Ok(()))
                .optional()
                .map_err(db_error)?
                .is_some();
            if !exists {
                return Ok(false);
            }
            tx.execute("DELETE FROM one_time_keys WHERE did = ?1", params![did])
                .map_err(db_error)?;
            for (pos, key) in encoded.iter().enumerate() {
                tx.execute(
                    "INSERT INTO one_time_keys (did, pos, key) VALUES (?1, ?2, ?3)",
                    params![did, to_i64(pos as u64), key],
                )
                .map_err(db_error)?;
            }
            tx.commit().map_err(db_error)?;
            Ok(true)
        })
        .await
    }

    async fn consume_one_time_key(&self, did: &str) -> StorageResult<Option<OneTimeKey>> {
        let did = did.to_owned();
        self.run(move |conn| {
            // One statement: atomic against every other connection.
            let key = conn
                .query_row(
                    "DELETE FROM one_time_keys WHERE did = ?1 \
                     AND pos = (SELECT MIN(pos) FROM one_time_keys WHERE did = ?1) RETURNING key",
                    params![did],
                    |row| row.get::<_, Vec<u8>>(0),
                )
                .optional()
                .map_err(db_error)?;
            key.map(|bytes| decode_key(&bytes)).transpose()
        })
        .await
    }

    async fn one_time_key_count(&self, did: &str) -> StorageResult<u64> {
        let did = did.to_owned();
        self.run(move |conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM one_time_keys WHERE did = ?1",
                params![did],
                |row| row.get::<_, i64>(0),
            )
            .map(to_u64)
            .map_err(db_error)
        })
        .await
    }

    async fn expire_agents(&self, not_seen_since: Timestamp, max: usize) -> StorageResult<Vec<String>> {
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_error)?;
            let mut dids = Vec::new();
            {
                let mut statement = tx
                    .prepare("DELETE FROM agents WHERE seq IN (SELECT seq FROM agents WHERE last_seen < ?1 ORDER BY last_seen LIMIT ?2) RETURNING did")
                    .map_err(db_error)?;
                let rows = statement
                    .query_map(params![to_i64(not_seen_since.0), to_i64(max as u64)], |row| {
                        row.get::<_, String>(0)
                    })
                    .map_err(db_error)?;
                for row in rows {
                    dids.push(row.map_err(db_error)?);
                }
            }
            tx.commit().map_err(db_error)?;
            Ok(dids)
        })
        .await
    }
}

impl SqliteStorage {
    fn claim_sync(&self, did: &str, proof: &[u8], expires_at: Timestamp, now: Timestamp) -> Result<(), ClaimError> {
        let unavailable = |e: rusqlite::Error| ClaimError::Unavailable(format!("sqlite: {e}"));
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(unavailable)?;
        // Forgotten only after expiry (the instant itself still counts).
        tx.execute("DELETE FROM proofs WHERE expires_at < ?1", params![to_i64(now.0)])
            .map_err(unavailable)?;
        let exists = tx
            .query_row(
                "SELECT 1 FROM proofs WHERE did = ?1 AND proof = ?2",
                params![did, proof],
                |_| Ok(()),
            )
            .optional()
            .map_err(unavailable)?
            .is_some();
        if exists {
            tx.commit().map_err(unavailable)?;
            return Err(ClaimError::Replayed);
        }
        let live: i64 = tx
            .query_row("SELECT live FROM proof_totals WHERE one = 0", [], |row| row.get(0))
            .map_err(unavailable)?;
        if to_u64(live) >= self.limits.max_live_proofs as u64 {
            tx.commit().map_err(unavailable)?;
            return Err(ClaimError::Full {
                limit: self.limits.max_live_proofs,
            });
        }
        let for_did: i64 = tx
            .query_row("SELECT COUNT(*) FROM proofs WHERE did = ?1", params![did], |row| {
                row.get(0)
            })
            .map_err(unavailable)?;
        if to_u64(for_did) >= self.limits.max_live_proofs_per_did as u64 {
            tx.commit().map_err(unavailable)?;
            return Err(ClaimError::Full {
                limit: self.limits.max_live_proofs_per_did,
            });
        }
        tx.execute(
            "INSERT INTO proofs (did, proof, expires_at) VALUES (?1, ?2, ?3)",
            params![did, proof, to_i64(expires_at.0)],
        )
        .map_err(unavailable)?;
        tx.commit().map_err(unavailable)
    }
}

impl ProofLedger for SqliteStorage {
    /// Runs on the calling thread (the trait is synchronous): one short
    /// transaction.
    fn claim(&self, did: &str, proof: &[u8], expires_at: Timestamp, now: Timestamp) -> Result<(), ClaimError> {
        self.claim_sync(did, proof, expires_at, now)
    }

    fn live(&self) -> usize {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.query_row("SELECT live FROM proof_totals WHERE one = 0", [], |row| {
            row.get::<_, i64>(0)
        })
        .map(|v| usize::try_from(v).unwrap_or(0))
        .unwrap_or(0)
    }
}

#[async_trait]
impl ReadyCheck for SqliteStorage {
    async fn ready(&self) -> StorageResult<()> {
        self.run(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(db_error))
            .await
    }

    async fn flush(&self) -> StorageResult<()> {
        self.run(|conn| {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(db_error)
        })
        .await
    }
}
