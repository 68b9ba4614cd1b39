//! The SQLite store: one database file per agent.

use super::crypto::{aad, AtRestKey, DeriveError, KdfHeader, Sealer, KEY_CHECK};
use super::{
    split_state, unix_ms_now, Commit, Durability, InboxEntry, Limits, OutboxEntry, PersistError, PersistStats,
    Persistence, Snapshot, MAX_META_ENTRIES,
};
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use zeroize::{Zeroize, Zeroizing};

/// The schema version this build writes (`PRAGMA user_version`). Opening
/// an older store migrates it forward in one transaction; a newer one is
/// refused ([`PersistError::TooNew`]).
pub const SCHEMA_VERSION: i64 = 3;

/// `MIGRATIONS[v]` takes a store from version `v` to `v + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the first schema.
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
     CREATE TABLE prekeys (slot INTEGER PRIMARY KEY CHECK (slot = 1), data BLOB NOT NULL);
     CREATE TABLE peers (did TEXT PRIMARY KEY NOT NULL, data BLOB NOT NULL);
     CREATE TABLE inbox (
         seq INTEGER PRIMARY KEY,
         peer TEXT NOT NULL,
         id TEXT NOT NULL,
         received_at INTEGER NOT NULL,
         plaintext INTEGER NOT NULL,
         size INTEGER NOT NULL,
         payload BLOB NOT NULL,
         UNIQUE (peer, id));
     CREATE TABLE outbox (
         n INTEGER PRIMARY KEY,
         peer TEXT NOT NULL,
         seq INTEGER NOT NULL,
         id TEXT NOT NULL,
         created_at INTEGER NOT NULL,
         size INTEGER NOT NULL,
         payload BLOB NOT NULL,
         UNIQUE (peer, seq),
         UNIQUE (peer, id));",
    // 1 -> 2: the duplicate-id memory and the unconfirmed messages as side
    // rows (a message writes a row, not a peer's whole list). Version 1
    // peer rows hold both inline; the client moves them on first use.
    "CREATE TABLE seen (
         seq INTEGER PRIMARY KEY,
         peer TEXT NOT NULL,
         n INTEGER NOT NULL,
         id TEXT NOT NULL,
         UNIQUE (peer, id),
         UNIQUE (peer, n));
     CREATE TABLE unconfirmed (
         seq INTEGER PRIMARY KEY,
         peer TEXT NOT NULL,
         id TEXT NOT NULL,
         data BLOB NOT NULL,
         UNIQUE (peer, id));",
    // 2 -> 3: fewer b-trees written per message (each one written is a
    // WAL frame per commit). The outbox loses its per-peer `seq` and its
    // index, which only `n`'s order was ever read for; the duplicate-id
    // memory is keyed by (peer, n) itself instead of a rowid and two
    // indexes. Rows are copied as they are.
    "CREATE TABLE outbox_v3 (
         n INTEGER PRIMARY KEY,
         peer TEXT NOT NULL,
         id TEXT NOT NULL,
         created_at INTEGER NOT NULL,
         size INTEGER NOT NULL,
         payload BLOB NOT NULL,
         UNIQUE (peer, id));
     INSERT INTO outbox_v3 (n, peer, id, created_at, size, payload)
         SELECT n, peer, id, created_at, size, payload FROM outbox;
     DROP TABLE outbox;
     ALTER TABLE outbox_v3 RENAME TO outbox;
     CREATE TABLE seen_v3 (
         peer TEXT NOT NULL,
         n INTEGER NOT NULL,
         id TEXT NOT NULL,
         PRIMARY KEY (peer, n),
         UNIQUE (peer, id)) WITHOUT ROWID;
     INSERT INTO seen_v3 (peer, n, id) SELECT peer, n, id FROM seen;
     DROP TABLE seen;
     ALTER TABLE seen_v3 RENAME TO seen;",
];

const META_CIPHER: &str = "meshwire.cipher";
const META_KDF: &str = "meshwire.kdf";
const META_KEY_CHECK: &str = "meshwire.key_check";
const META_MIGRATED_FROM: &str = "meshwire.migrated_from";
const META_MIGRATED_AT: &str = "meshwire.migrated_at_ms";
const CIPHER_NONE: &str = "none";
const CIPHER_V1: &str = "xchacha20poly1305/1";
/// How long an operation waits for a lock held by another connection.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// WAL pages (4 KiB each, 32 MiB) from which the store checkpoints the WAL
/// into the database when the client is idle ([`Persistence::idle`]). A
/// checkpoint fsyncs and cuts the WAL back, which took 30-300 ms here, so
/// it is kept out of commits: done inside a commit, it stalled a burst of
/// 2,000 messages for up to a third of a second (AGT relay figures, four
/// rounds each: 8,100-10,200 msg/s with checkpoints in commits, 9,400-12,300
/// without).
pub const WAL_AUTOCHECKPOINT_PAGES: u32 = 8192;
/// WAL pages (128 MiB) at which a commit checkpoints anyway, for a client
/// that is never idle (`PRAGMA wal_autocheckpoint`): the WAL stays bounded.
pub const WAL_CHECKPOINT_IN_COMMIT_PAGES: u32 = 4 * WAL_AUTOCHECKPOINT_PAGES;
/// The size of a WAL frame: a 24-byte header and a 4 KiB page.
const WAL_FRAME_BYTES: u64 = 24 + 4096;
/// The size (bytes) the WAL file is cut back to when it starts over after
/// a checkpoint (`PRAGMA journal_size_limit`): none of it is kept, so new
/// frames are always appended. A frame is 24 bytes of header and a 4 KiB
/// page, so frames straddle the file's pages; rewriting a 32 MiB WAL from
/// its start writes parts of file pages that the OS may have dropped from
/// its cache since (they are seconds to minutes old), and each such write
/// first reads the page back from disk. Seen here as single `pwrite64`
/// calls of 24 bytes taking up to 3.9 ms in the middle of a commit (strace
/// of a receiver during the paced figures); appended frames never read.
const WAL_SIZE_LIMIT: i64 = 0;

/// The oldest and the newest number of a peer's duplicate-id rows (`?1`
/// the peer): each a one-aggregate subquery, which SQLite answers with one
/// index seek. (`MAX(n) - MIN(n)` in one SELECT visits every row.)
const SEEN_ENDS_SQL: &str =
    "SELECT (SELECT MIN(n) FROM seen WHERE peer = ?1), (SELECT MAX(n) FROM seen WHERE peer = ?1)";

/// Keeps a peer's newest `limit` duplicate-id rows once they exceed that by
/// [`seen_trim_slack`]: a delete then writes a few pages once per `slack`
/// messages instead of three on every one. Below that it costs two index
/// seeks, whatever the number of rows (every commit that remembers an id
/// runs it; see `the_seen_trim_reads_two_index_ends_not_every_row`).
fn trim_seen(tx: &rusqlite::Connection, peer: &str, limit: usize) -> rusqlite::Result<()> {
    let limit = limit.max(1);
    let (oldest, newest): (Option<i64>, Option<i64>) = tx
        .prepare_cached(SEEN_ENDS_SQL)?
        .query_row([peer], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let (Some(oldest), Some(newest)) = (oldest, newest) else {
        return Ok(());
    };
    let keep = to_i64(limit as u64);
    if newest.saturating_sub(oldest) < keep.saturating_add(to_i64(seen_trim_slack(limit) as u64)) {
        return Ok(());
    }
    tx.prepare_cached("DELETE FROM seen WHERE peer = ?1 AND n <= ?2")?
        .execute(rusqlite::params![peer, newest.saturating_sub(keep)])?;
    Ok(())
}

/// How many ids beyond [`Commit::seen_limit`] a peer's duplicate-id rows
/// may grow to before a commit trims them back to the limit: a sixteenth
/// of the limit (256 for the default 4,096; none for a limit under 16).
/// Loading hands the state machine all of them, and it keeps the newest
/// `seen_limit`.
pub fn seen_trim_slack(seen_limit: usize) -> usize {
    seen_limit / 16
}
/// How long opening waits for another opener (a second process holding
/// the store is refused after this).
const OPEN_BUSY_TIMEOUT: Duration = Duration::from_millis(500);

/// How to open a [`SqliteStore`] (builder).
#[derive(Debug, Clone, Default)]
pub struct SqliteOptions {
    durability: Durability,
    limits: Limits,
    key: Option<AtRestKey>,
    migrate_from: Option<PathBuf>,
}

impl SqliteOptions {
    /// Defaults: [`Durability::Process`], [`Limits::default`], no
    /// encryption, no migration.
    pub fn new() -> Self {
        Self::default()
    }

    /// The durability level (see the module docs for its cost).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Bounds on the inbox and outbox.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Encrypts the secret-bearing values with `key`. A new store is
    /// created encrypted; an existing one must have been created with the
    /// same key ([`PersistError::WrongKey`], [`PersistError::NotEncrypted`]).
    pub fn key(mut self, key: AtRestKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Imports the JSON state file `json` (what [`crate::store::FileStore`]
    /// wrote) into a store that holds no state yet, then renames the file
    /// aside (see [`SqliteStore`]).
    pub fn migrate_from(mut self, json: impl Into<PathBuf>) -> Self {
        self.migrate_from = Some(json.into());
        self
    }

    /// Opens (or creates) the store at `path` with these options.
    pub fn open(self, path: impl AsRef<Path>) -> Result<SqliteStore, PersistError> {
        SqliteStore::open_inner(path.as_ref(), self)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    inbox_rows: u64,
    inbox_bytes: u64,
    outbox_rows: u64,
    outbox_bytes: u64,
}

struct Inner {
    conn: Connection,
    totals: Totals,
}

/// The default [`Persistence`]: an SQLite database (bundled SQLite, WAL
/// mode), one file per agent, created with mode `0600`.
///
/// - **Schema**: tables `meta`, `prekeys`, `peers`, `inbox`, `outbox`,
///   `seen` (duplicate ids), `unconfirmed` (messages awaiting receipts);
///   versioned with `PRAGMA user_version` ([`SCHEMA_VERSION`]), migrated
///   forward on open in one transaction.
/// - **From the JSON state file** of [`crate::store::FileStore`]:
///   [`SqliteStore::open_migrating`] imports it into a store that holds no
///   state yet, in one transaction that also records
///   `meshwire.migrated_from` in `meta`, then renames the JSON file to
///   `<name>.migrated` (`<name>.migrated.1`, `.2`, ... if taken) in the
///   same directory and syncs the directory. A crash between the two
///   steps is finished on the next open (the record says the import is
///   done; the file is only renamed). The renamed file still holds the
///   secrets in clear: delete it once the agent runs from the store. A
///   store that already holds a state and a JSON file it did not import
///   are refused ([`PersistError::Migration`]), never merged.
/// - **One process at a time**: the connection holds SQLite's exclusive
///   lock while the store is open; a second open of the same file fails
///   ([`PersistError::Database`], "database is locked").
/// - Deleted rows are overwritten (`secure_delete`), so old ratchet keys
///   do not linger in free pages.
///
/// ```
/// use meshwire::persist::{Commit, InboxEntry, Persistence, SqliteStore};
/// use zeroize::Zeroizing;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("meshwire-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// let store = SqliteStore::open(dir.join("agent.db"))?;
/// let mut commit = Commit::new();
/// commit.put_peer("did:mesh:peer", Some(Zeroizing::new(r#"{"channel":null}"#.to_owned())));
/// commit.add_inbox(InboxEntry {
///     from: "did:mesh:peer".into(),
///     id: "m1".into(),
///     payload: Zeroizing::new(b"{\"hello\":1}".to_vec()),
///     received_at_ms: 1_700_000_000_000,
///     plaintext: false,
/// });
/// store.commit(&commit)?; // one transaction; durable when it returns
/// let snapshot = store.load()?;
/// assert_eq!(snapshot.inbox[0].id, "m1");
/// store.commit(Commit::new().remove_inbox("did:mesh:peer", "m1"))?; // the application acked
/// assert!(store.load()?.inbox.is_empty());
/// # drop(store);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
pub struct SqliteStore {
    path: PathBuf,
    inner: Mutex<Inner>,
    sealer: Option<Sealer>,
    limits: Limits,
    durability: Durability,
    commits: AtomicU64,
    /// WAL checkpoints made by [`Persistence::idle`].
    idle_checkpoints: AtomicU64,
    /// [`WAL_AUTOCHECKPOINT_PAGES`]; smaller in tests.
    idle_checkpoint_pages: u32,
    refused_inbox: AtomicU64,
    refused_outbox: AtomicU64,
    /// Set by [`Persistence::close`]: the file is closed.
    closed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("encrypted", &self.sealer.is_some())
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

/// Maps an SQLite error on `path` to a typed error: damage and
/// not-a-database become [`PersistError::Corrupt`].
fn db(path: &Path) -> impl Fn(rusqlite::Error) -> PersistError + '_ {
    move |e| {
        let corrupt = match &e {
            rusqlite::Error::SqliteFailure(f, _) => {
                matches!(f.code, ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
            }
            rusqlite::Error::InvalidColumnType(..) | rusqlite::Error::FromSqlConversionFailure(..) => true,
            _ => false,
        };
        if corrupt {
            PersistError::Corrupt {
                path: path.to_owned(),
                reason: e.to_string(),
            }
        } else {
            PersistError::Database {
                path: path.to_owned(),
                reason: e.to_string(),
            }
        }
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> PersistError {
    PersistError::Corrupt {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_owned(),
        source,
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(unix)]
pub(super) fn check_private(path: &Path) -> Result<(), PersistError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PersistError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
pub(super) fn check_private(_: &Path) -> Result<(), PersistError> {
    Ok(())
}

/// Creates an empty private file at `path` (exclusively, without following
/// a link, mode 0600), so SQLite never creates it with the umask's mode.
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    }
    options.open(path).and_then(|f| f.sync_all())
}

fn sync_dir(dir: &Path) -> Result<(), PersistError> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn read_meta(conn: &Connection, path: &Path, key: &str) -> Result<Option<String>, PersistError> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(db(path))
}

fn write_meta(conn: &Connection, path: &Path, key: &str, value: &str) -> Result<(), PersistError> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )
    .map(drop)
    .map_err(db(path))
}

/// What an existing file holds, checked without writing anything.
enum Found {
    /// No schema yet (a new or empty file).
    Empty,
    /// A meshwire store of this version, opened by the supplied key (if
    /// it is encrypted).
    Store { version: i64, sealer: Option<Sealer> },
}

/// Reads the schema version and checks the key against the
/// key-verification value. Reads only.
fn inspect(conn: &Connection, path: &Path, key: Option<&AtRestKey>) -> Result<Found, PersistError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db(path))?;
    if version == 0 {
        let objects: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(db(path))?;
        if objects != 0 {
            return Err(corrupt(
                path,
                "an SQLite database, but not a meshwire store (no schema version)",
            ));
        }
        return Ok(Found::Empty);
    }
    if version < 0 {
        return Err(corrupt(path, format!("schema version {version}")));
    }
    if version > SCHEMA_VERSION {
        return Err(PersistError::TooNew {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    let cipher = read_meta(conn, path, META_CIPHER)?.ok_or_else(|| corrupt(path, "no cipher entry in meta"))?;
    let sealer = match (cipher.as_str(), key) {
        (CIPHER_NONE, None) => None,
        (CIPHER_NONE, Some(_)) => return Err(PersistError::NotEncrypted { path: path.to_owned() }),
        (CIPHER_V1, None) => return Err(PersistError::KeyRequired { path: path.to_owned() }),
        (CIPHER_V1, Some(key)) => {
            let header = read_meta(conn, path, META_KDF)?.ok_or_else(|| corrupt(path, "no key-derivation entry"))?;
            let header: KdfHeader =
                serde_json::from_str(&header).map_err(|e| corrupt(path, format!("key-derivation entry: {e}")))?;
            let check = read_meta(conn, path, META_KEY_CHECK)?
                .and_then(|c| hex::decode(c).ok())
                .ok_or_else(|| corrupt(path, "no key-verification value"))?;
            let sealer = key.derive(&header, "store").map_err(|e| match e {
                DeriveError::WrongKind(_) => PersistError::WrongKey { path: path.to_owned() },
                DeriveError::Bad(reason) => PersistError::Kdf {
                    path: path.to_owned(),
                    reason,
                },
            })?;
            match sealer.open(&aad("meta", &[META_KEY_CHECK]), &check) {
                Some(text) if text.as_slice() == KEY_CHECK => Some(sealer),
                _ => return Err(PersistError::WrongKey { path: path.to_owned() }),
            }
        }
        (other, _) => return Err(corrupt(path, format!("unknown cipher {other:?}"))),
    };
    Ok(Found::Store { version, sealer })
}

impl SqliteStore {
    /// Opens (or creates) the store at `path` with the default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, PersistError> {
        SqliteOptions::new().open(path)
    }

    /// Opens (or creates) the store at `path` with the default options
    /// and, if `json_state` names an existing file, migrates it (see the
    /// type's docs).
    pub fn open_migrating(path: impl AsRef<Path>, json_state: Option<&Path>) -> Result<Self, PersistError> {
        let mut options = SqliteOptions::new();
        if let Some(json) = json_state {
            options = options.migrate_from(json);
        }
        options.open(path)
    }

    fn open_inner(path: &Path, options: SqliteOptions) -> Result<Self, PersistError> {
        let dir = parent_dir(path);
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        match std::fs::symlink_metadata(path) {
            Ok(_) => check_private(path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_private(path).map_err(io(path))?;
                sync_dir(dir)?;
            }
            Err(e) => return Err(io(path)(e)),
        }
        let flags =
            OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_NOFOLLOW | OpenFlags::SQLITE_OPEN_READ_WRITE;
        let mut conn = Connection::open_with_flags(path, flags).map_err(db(path))?;
        conn.busy_timeout(OPEN_BUSY_TIMEOUT).map_err(db(path))?;
        // Exclusive before the first access: one process per store, and no
        // shared-memory file is ever created.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(db(path))?;
        // First look, reading only: a wrong key (or a damaged or foreign
        // file) is refused before anything is written. Dropping the
        // connection then leaves the directory as it was.
        // The exclusive lock taken by that first read is held from now on,
        // so what it found stays true.
        let found = inspect(&conn, path, options.key.as_ref())?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db(path))?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(db(path))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(PersistError::Database {
                path: path.to_owned(),
                reason: format!("cannot use WAL mode (journal mode {mode})"),
            });
        }
        let synchronous = match options.durability {
            Durability::Process => "NORMAL",
            Durability::PowerLoss => "FULL",
        };
        conn.pragma_update(None, "synchronous", synchronous).map_err(db(path))?;
        if options.durability == Durability::PowerLoss {
            conn.pragma_update(None, "fullfsync", "ON").map_err(db(path))?;
            conn.pragma_update(None, "checkpoint_fullfsync", "ON")
                .map_err(db(path))?;
        }
        conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_IN_COMMIT_PAGES)
            .map_err(db(path))?;
        // The WAL starts over empty after each checkpoint instead of
        // rewriting its own start: see `WAL_SIZE_LIMIT`.
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
            .map_err(db(path))?;
        conn.pragma_update(None, "secure_delete", "ON").map_err(db(path))?;
        conn.pragma_update(None, "trusted_schema", "OFF").map_err(db(path))?;

        let sealer = Self::migrate_schema(&mut conn, path, found, options.key.as_ref())?;
        let mut store = Self {
            path: path.to_owned(),
            inner: Mutex::new(Inner {
                conn,
                totals: Totals::default(),
            }),
            sealer,
            limits: options.limits,
            durability: options.durability,
            commits: AtomicU64::new(0),
            idle_checkpoints: AtomicU64::new(0),
            idle_checkpoint_pages: WAL_AUTOCHECKPOINT_PAGES,
            refused_inbox: AtomicU64::new(0),
            refused_outbox: AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
        };
        if let Some(json) = &options.migrate_from {
            store.migrate_json(json)?;
        }
        store.count_totals()?;
        Ok(store)
    }

    /// Brings the schema to [`SCHEMA_VERSION`] in one transaction; creates
    /// the encryption entries of a new store. Returns the value sealer.
    fn migrate_schema(
        conn: &mut Connection,
        path: &Path,
        found: Found,
        key: Option<&AtRestKey>,
    ) -> Result<Option<Sealer>, PersistError> {
        let (version, sealer) = match found {
            Found::Empty => (0, None),
            Found::Store { version, sealer } => (version, sealer),
        };
        if version == SCHEMA_VERSION {
            return Ok(sealer);
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db(path))?;
        for (from, step) in MIGRATIONS.iter().enumerate().skip(to_u64(version) as usize) {
            tx.execute_batch(step).map_err(|e| PersistError::Database {
                path: path.to_owned(),
                reason: format!("schema migration {from} -> {}: {e}", from + 1),
            })?;
        }
        let sealer = if version == 0 {
            match key {
                None => {
                    write_meta(&tx, path, META_CIPHER, CIPHER_NONE)?;
                    None
                }
                Some(key) => {
                    let header = key.new_header();
                    let sealer = key.derive(&header, "store").map_err(|e| PersistError::Kdf {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    })?;
                    let text = serde_json::to_string(&header).map_err(|e| PersistError::Kdf {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    })?;
                    write_meta(&tx, path, META_KDF, &text)?;
                    let check = sealer.seal(&aad("meta", &[META_KEY_CHECK]), KEY_CHECK);
                    write_meta(&tx, path, META_KEY_CHECK, &hex::encode(check))?;
                    write_meta(&tx, path, META_CIPHER, CIPHER_V1)?;
                    Some(sealer)
                }
            }
        } else {
            sealer
        };
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(db(path))?;
        tx.commit().map_err(db(path))?;
        Ok(sealer)
    }

    /// Imports the JSON state file at `json` (see the type's docs).
    fn migrate_json(&mut self, json: &Path) -> Result<(), PersistError> {
        let fail = |reason: String| PersistError::Migration {
            path: self.path.clone(),
            json: json.to_owned(),
            reason,
        };
        match std::fs::symlink_metadata(json) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(json)(e)),
            Ok(meta) if !meta.is_file() => return Err(fail("not a regular file".into())),
            Ok(_) => {}
        }
        let path = self.path.clone();
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        let tx = inner
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db(&path))?;
        let migrated = read_meta(&tx, &path, META_MIGRATED_FROM)?;
        let has_state: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM prekeys) OR EXISTS (SELECT 1 FROM peers)",
                [],
                |r| r.get(0),
            )
            .map_err(db(&path))?;
        let json_name = json.display().to_string();
        if migrated.as_deref() != Some(json_name.as_str()) {
            if has_state {
                return Err(fail(
                    "the store already holds a state; move the JSON file away (or reset the store) first".into(),
                ));
            }
            check_private(json)?;
            let text = Zeroizing::new(std::fs::read_to_string(json).map_err(io(json))?);
            let (prekeys, peers) = split_state(&text).map_err(fail)?;
            let prekeys = seal_or_copy(self.sealer.as_ref(), &aad("prekeys", &[]), prekeys.as_bytes());
            tx.execute("INSERT INTO prekeys (slot, data) VALUES (1, ?1)", [prekeys.as_ref()])
                .map_err(db(&path))?;
            for (did, row) in &peers {
                let data = seal_or_copy(self.sealer.as_ref(), &aad("peers", &[did]), row.as_bytes());
                tx.execute(
                    "INSERT INTO peers (did, data) VALUES (?1, ?2)",
                    rusqlite::params![did, data.as_ref()],
                )
                .map_err(db(&path))?;
            }
            write_meta(&tx, &path, META_MIGRATED_FROM, &json_name)?;
            write_meta(&tx, &path, META_MIGRATED_AT, &unix_ms_now().to_string())?;
            tx.commit().map_err(db(&path))?;
            tracing::info!(target: "meshwire", store = %path.display(), json = %json.display(),
                peers = peers.len(), "migrated the JSON state into the store");
        } else {
            drop(tx);
        }
        // Set the imported file aside (also when a crash came between the
        // import and this rename).
        let name = json
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut aside = json.with_file_name(format!("{name}.migrated"));
        let mut n = 0u32;
        while std::fs::symlink_metadata(&aside).is_ok() {
            n += 1;
            if n > 1000 {
                return Err(fail("no free name to set the JSON file aside".into()));
            }
            aside = json.with_file_name(format!("{name}.migrated.{n}"));
        }
        std::fs::rename(json, &aside).map_err(io(json))?;
        sync_dir(parent_dir(json))
    }

    fn count_totals(&mut self) -> Result<(), PersistError> {
        let path = self.path.clone();
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        let count = |table: &str| -> Result<(u64, u64), PersistError> {
            inner
                .conn
                .query_row(
                    &format!("SELECT count(*), COALESCE(SUM(size), 0) FROM {table}"),
                    [],
                    |r| Ok((to_u64(r.get(0)?), to_u64(r.get(1)?))),
                )
                .map_err(db(&path))
        };
        let (inbox_rows, inbox_bytes) = count("inbox")?;
        let (outbox_rows, outbox_bytes) = count("outbox")?;
        inner.totals = Totals {
            inbox_rows,
            inbox_bytes,
            outbox_rows,
            outbox_bytes,
        };
        Ok(())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether values are encrypted at rest.
    pub fn is_encrypted(&self) -> bool {
        self.sealer.is_some()
    }

    /// The durability level it was opened with.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Counters since it was opened.
    pub fn stats(&self) -> PersistStats {
        PersistStats {
            commits: self.commits.load(Ordering::Relaxed),
            refused_inbox_full: self.refused_inbox.load(Ordering::Relaxed),
            refused_outbox_full: self.refused_outbox.load(Ordering::Relaxed),
            idle_checkpoints: self.idle_checkpoints.load(Ordering::Relaxed),
        }
    }

    /// The write-ahead log beside the database file.
    fn wal_path(&self) -> PathBuf {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        PathBuf::from(wal)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The clear value of a stored one (authenticated when encrypted).
    fn reveal(
        &self,
        aad: &[u8],
        stored: Vec<u8>,
        what: impl FnOnce() -> String,
    ) -> Result<Zeroizing<Vec<u8>>, PersistError> {
        let stored = Zeroizing::new(stored);
        match &self.sealer {
            None => Ok(stored),
            Some(sealer) => sealer.open(aad, &stored).ok_or_else(|| {
                corrupt(
                    &self.path,
                    format!("{} fails authentication (tampered, or moved from another row)", what()),
                )
            }),
        }
    }

    fn reveal_text(
        &self,
        aad: &[u8],
        stored: Vec<u8>,
        what: impl Fn() -> String,
    ) -> Result<Zeroizing<String>, PersistError> {
        let mut bytes = self.reveal(aad, stored, &what)?;
        match String::from_utf8(std::mem::take(&mut *bytes)) {
            Ok(text) => Ok(Zeroizing::new(text)),
            Err(e) => {
                e.into_bytes().zeroize();
                Err(corrupt(&self.path, format!("{} is not UTF-8", what())))
            }
        }
    }

    fn apply(&self, tx: &rusqlite::Transaction<'_>, c: &Commit, t: &mut Totals) -> Result<(), PersistError> {
        let path = &self.path;
        let sealer = self.sealer.as_ref();
        let e = db(path);
        for (key, value) in &c.meta {
            match value {
                Some(v) => write_meta(tx, path, key, v)?,
                None => {
                    tx.execute("DELETE FROM meta WHERE key = ?1", [key]).map_err(&e)?;
                }
            }
        }
        if c.meta.iter().any(|(_, v)| v.is_some()) {
            let n: i64 = tx
                .query_row(
                    "SELECT count(*) FROM meta WHERE substr(key, 1, 9) <> 'meshwire.'",
                    [],
                    |r| r.get(0),
                )
                .map_err(&e)?;
            if to_u64(n) > MAX_META_ENTRIES as u64 {
                return Err(PersistError::Meta {
                    key: c
                        .meta
                        .iter()
                        .find(|(_, v)| v.is_some())
                        .map(|(k, _)| k.clone())
                        .unwrap_or_default(),
                    reason: format!("more than MAX_META_ENTRIES ({MAX_META_ENTRIES}) entries"),
                });
            }
        }
        if let Some(prekeys) = &c.prekeys {
            let data = seal_or_copy(sealer, &aad("prekeys", &[]), prekeys.as_bytes());
            tx.prepare_cached(
                "INSERT INTO prekeys (slot, data) VALUES (1, ?1) ON CONFLICT (slot) DO UPDATE SET data = excluded.data",
            )
            .and_then(|mut s| s.execute([data.as_ref()]))
            .map_err(&e)?;
        }
        for (did, row) in &c.peers {
            match row {
                Some(row) => {
                    let data = seal_or_copy(sealer, &aad("peers", &[did]), row.as_bytes());
                    tx.prepare_cached(
                        "INSERT INTO peers (did, data) VALUES (?1, ?2) ON CONFLICT (did) DO UPDATE SET data = excluded.data",
                    )
                    .and_then(|mut s| s.execute(rusqlite::params![did, data.as_ref()]))
                    .map_err(&e)?;
                }
                None => {
                    for sql in [
                        "DELETE FROM peers WHERE did = ?1",
                        "DELETE FROM seen WHERE peer = ?1",
                        "DELETE FROM unconfirmed WHERE peer = ?1",
                    ] {
                        tx.prepare_cached(sql).and_then(|mut s| s.execute([did])).map_err(&e)?;
                    }
                }
            }
        }
        let mut trimmed: Vec<&str> = Vec::new();
        for (peer, id) in &c.seen {
            // `n` numbers a peer's ids: trimming is an index range delete.
            tx.prepare_cached(
                "INSERT OR IGNORE INTO seen (peer, n, id)
                 VALUES (?1, (SELECT COALESCE(MAX(n), 0) + 1 FROM seen WHERE peer = ?1), ?2)",
            )
            .and_then(|mut s| s.execute([peer, id]))
            .map_err(&e)?;
            if !trimmed.contains(&peer.as_str()) {
                trimmed.push(peer);
            }
        }
        for peer in trimmed {
            trim_seen(tx, peer, c.seen_limit).map_err(&e)?;
        }
        for (peer, id, row) in &c.unconfirmed {
            match row {
                Some(row) => {
                    let data = seal_or_copy(sealer, &aad("unconfirmed", &[peer, id]), row.as_bytes());
                    tx.prepare_cached(
                        "INSERT INTO unconfirmed (peer, id, data) VALUES (?1, ?2, ?3)
                         ON CONFLICT (peer, id) DO UPDATE SET data = excluded.data",
                    )
                    .and_then(|mut s| s.execute(rusqlite::params![peer, id, data.as_ref()]))
                    .map_err(&e)?;
                }
                None => {
                    tx.prepare_cached("DELETE FROM unconfirmed WHERE peer = ?1 AND id = ?2")
                        .and_then(|mut s| s.execute([peer, id]))
                        .map_err(&e)?;
                }
            }
        }
        for (from, id) in &c.inbox_remove {
            let size: Option<i64> = tx
                .prepare_cached("DELETE FROM inbox WHERE peer = ?1 AND id = ?2 RETURNING size")
                .and_then(|mut s| s.query_row([from, id], |r| r.get(0)).optional())
                .map_err(&e)?;
            if let Some(size) = size {
                t.inbox_rows = t.inbox_rows.saturating_sub(1);
                t.inbox_bytes = t.inbox_bytes.saturating_sub(to_u64(size));
            }
        }
        for (peer, id) in &c.outbox_remove {
            let size: Option<i64> = tx
                .prepare_cached("DELETE FROM outbox WHERE peer = ?1 AND id = ?2 RETURNING size")
                .and_then(|mut s| s.query_row([peer, id], |r| r.get(0)).optional())
                .map_err(&e)?;
            if let Some(size) = size {
                t.outbox_rows = t.outbox_rows.saturating_sub(1);
                t.outbox_bytes = t.outbox_bytes.saturating_sub(to_u64(size));
            }
        }
        for m in &c.inbox_add {
            let data = seal_or_copy(sealer, &aad("inbox", &[&m.from, &m.id]), &m.payload);
            let size = m.payload.len() as u64;
            let added = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO inbox (peer, id, received_at, plaintext, size, payload)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .and_then(|mut s| {
                    s.execute(rusqlite::params![
                        m.from,
                        m.id,
                        to_i64(m.received_at_ms),
                        m.plaintext,
                        to_i64(size),
                        data.as_ref()
                    ])
                })
                .map_err(&e)?;
            if added == 1 {
                t.inbox_rows += 1;
                t.inbox_bytes += size;
            }
        }
        for m in &c.outbox_add {
            let data = seal_or_copy(sealer, &aad("outbox", &[&m.peer, &m.id]), &m.payload);
            let size = m.payload.len() as u64;
            let added = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO outbox (peer, id, created_at, size, payload)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .and_then(|mut s| {
                    s.execute(rusqlite::params![
                        m.peer,
                        m.id,
                        to_i64(m.created_at_ms),
                        to_i64(size),
                        data.as_ref()
                    ])
                })
                .map_err(&e)?;
            if added == 1 {
                t.outbox_rows += 1;
                t.outbox_bytes += size;
            }
        }
        let l = &self.limits;
        if !c.inbox_add.is_empty() && (t.inbox_rows > l.max_inbox_rows || t.inbox_bytes > l.max_inbox_bytes) {
            self.refused_inbox.fetch_add(1, Ordering::Relaxed);
            return Err(PersistError::InboxFull {
                rows: t.inbox_rows,
                bytes: t.inbox_bytes,
                max_rows: l.max_inbox_rows,
                max_bytes: l.max_inbox_bytes,
            });
        }
        if !c.outbox_add.is_empty() && (t.outbox_rows > l.max_outbox_rows || t.outbox_bytes > l.max_outbox_bytes) {
            self.refused_outbox.fetch_add(1, Ordering::Relaxed);
            return Err(PersistError::OutboxFull {
                rows: t.outbox_rows,
                bytes: t.outbox_bytes,
                max_rows: l.max_outbox_rows,
                max_bytes: l.max_outbox_bytes,
            });
        }
        Ok(())
    }
}

/// The value as stored: sealed for its place, or the bytes as they are.
fn seal_or_copy<'a>(sealer: Option<&Sealer>, aad: &[u8], plain: &'a [u8]) -> Cow<'a, [u8]> {
    match sealer {
        Some(s) => Cow::Owned(s.seal(aad, plain)),
        None => Cow::Borrowed(plain),
    }
}

impl Persistence for SqliteStore {
    fn load(&self) -> Result<Snapshot, PersistError> {
        self.check_open()?;
        let path = &self.path;
        let e = db(path);
        let mut inner = self.lock();
        // One read transaction: a consistent view.
        let tx = inner.conn.transaction().map_err(&e)?;
        let mut snapshot = Snapshot::default();
        {
            let mut stmt = tx
                .prepare("SELECT key, value FROM meta WHERE substr(key, 1, 9) <> 'meshwire.' ORDER BY key")
                .map_err(&e)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(&e)?;
            for row in rows {
                let (k, v) = row.map_err(&e)?;
                snapshot.meta.insert(k, v);
            }
        }
        let prekeys: Option<Vec<u8>> = tx
            .query_row("SELECT data FROM prekeys WHERE slot = 1", [], |r| r.get(0))
            .optional()
            .map_err(&e)?;
        if let Some(stored) = prekeys {
            snapshot.prekeys = Some(self.reveal_text(&aad("prekeys", &[]), stored, || "the pre-keys row".into())?);
        }
        {
            let mut stmt = tx.prepare("SELECT did, data FROM peers ORDER BY did").map_err(&e)?;
            let mut rows = stmt.query([]).map_err(&e)?;
            while let Some(row) = rows.next().map_err(&e)? {
                let did: String = row.get(0).map_err(&e)?;
                let stored: Vec<u8> = row.get(1).map_err(&e)?;
                let text = self.reveal_text(&aad("peers", &[&did]), stored, || format!("peer row {did:?}"))?;
                snapshot.peers.push((did, text));
            }
        }
        {
            let mut stmt = tx.prepare("SELECT peer, id FROM seen ORDER BY peer, n").map_err(&e)?;
            let mut rows = stmt.query([]).map_err(&e)?;
            while let Some(row) = rows.next().map_err(&e)? {
                let peer: String = row.get(0).map_err(&e)?;
                let id: String = row.get(1).map_err(&e)?;
                snapshot.seen.entry(peer).or_default().push(id);
            }
        }
        {
            let mut stmt = tx
                .prepare("SELECT peer, id, data FROM unconfirmed ORDER BY seq")
                .map_err(&e)?;
            let mut rows = stmt.query([]).map_err(&e)?;
            while let Some(row) = rows.next().map_err(&e)? {
                let peer: String = row.get(0).map_err(&e)?;
                let id: String = row.get(1).map_err(&e)?;
                let stored: Vec<u8> = row.get(2).map_err(&e)?;
                let text = self.reveal_text(&aad("unconfirmed", &[&peer, &id]), stored, || {
                    format!("unconfirmed row ({peer:?}, {id:?})")
                })?;
                snapshot.unconfirmed.entry(peer).or_default().push(text);
            }
        }
        {
            let mut stmt = tx
                .prepare("SELECT peer, id, received_at, plaintext, payload FROM inbox ORDER BY seq")
                .map_err(&e)?;
            let mut rows = stmt.query([]).map_err(&e)?;
            while let Some(row) = rows.next().map_err(&e)? {
                let from: String = row.get(0).map_err(&e)?;
                let id: String = row.get(1).map_err(&e)?;
                let stored: Vec<u8> = row.get(4).map_err(&e)?;
                let payload = self.reveal(&aad("inbox", &[&from, &id]), stored, || {
                    format!("inbox row ({from:?}, {id:?})")
                })?;
                snapshot.inbox.push(InboxEntry {
                    received_at_ms: to_u64(row.get(2).map_err(&e)?),
                    plaintext: row.get(3).map_err(&e)?,
                    from,
                    id,
                    payload,
                });
            }
        }
        {
            let mut stmt = tx
                .prepare("SELECT peer, id, created_at, payload FROM outbox ORDER BY n")
                .map_err(&e)?;
            let mut rows = stmt.query([]).map_err(&e)?;
            while let Some(row) = rows.next().map_err(&e)? {
                let peer: String = row.get(0).map_err(&e)?;
                let id: String = row.get(1).map_err(&e)?;
                let stored: Vec<u8> = row.get(3).map_err(&e)?;
                let payload = self.reveal(&aad("outbox", &[&peer, &id]), stored, || {
                    format!("outbox row ({peer:?}, {id:?})")
                })?;
                snapshot.outbox.push(OutboxEntry {
                    created_at_ms: to_u64(row.get(2).map_err(&e)?),
                    peer,
                    id,
                    payload,
                });
            }
        }
        tx.finish().map_err(&e)?;
        Ok(snapshot)
    }

    fn commit(&self, commit: &Commit) -> Result<(), PersistError> {
        if commit.is_empty() {
            return Ok(());
        }
        commit.check_meta()?;
        self.check_open()?;
        let mut inner = self.lock();
        let Inner { conn, totals } = &mut *inner;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db(&self.path))?;
        let mut after = *totals;
        // On error the transaction rolls back when dropped.
        self.apply(&tx, commit, &mut after)?;
        tx.commit().map_err(db(&self.path))?;
        *totals = after;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Checkpoints the WAL into the database and cuts it to nothing, once
    /// it holds [`WAL_AUTOCHECKPOINT_PAGES`] pages (a smaller one is left
    /// alone: checkpoints cost an fsync each).
    fn idle(&self) -> Result<(), PersistError> {
        self.check_open()?;
        let inner = self.lock();
        let wal = self.wal_path();
        let frames = std::fs::metadata(&wal).map(|m| m.len() / WAL_FRAME_BYTES).unwrap_or(0);
        if frames < u64::from(self.idle_checkpoint_pages) {
            return Ok(());
        }
        let busy: i64 = inner
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(db(&self.path))?;
        if busy != 0 {
            return Err(PersistError::Database {
                path: self.path.clone(),
                reason: "the WAL checkpoint could not finish (the database is busy)".into(),
            });
        }
        self.idle_checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn reset_mesh(&self) -> Result<(), PersistError> {
        self.check_open()?;
        let mut inner = self.lock();
        let tx = inner
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db(&self.path))?;
        tx.execute_batch("DELETE FROM prekeys; DELETE FROM peers; DELETE FROM seen; DELETE FROM unconfirmed;")
            .map_err(db(&self.path))?;
        tx.commit().map_err(db(&self.path))
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn close(&self) {
        let mut inner = self.lock();
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Dropping the connection closes the file and its exclusive lock
        // (a stand-in keeps the type; it is never used).
        if let Ok(stand_in) = Connection::open_in_memory() {
            drop(std::mem::replace(&mut inner.conn, stand_in));
        }
    }
}

impl SqliteStore {
    fn check_open(&self) -> Result<(), PersistError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(PersistError::Database {
                path: self.path.clone(),
                reason: "the store was closed".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::{trim_seen, SqliteStore, MIGRATIONS, SEEN_ENDS_SQL, WAL_CHECKPOINT_IN_COMMIT_PAGES, WAL_FRAME_BYTES};
    use crate::persist::{Commit, Persistence};
    use rusqlite::{Connection, StatementStatus};
    use zeroize::Zeroizing;

    /// An empty directory for one test's store: (directory, database, WAL).
    fn store_dir(name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("meshwire-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (dir.clone(), dir.join("agent.db"), dir.join("agent.db-wal"))
    }

    /// Commits the peer rows numbered `range` in one commit, 3,000 bytes
    /// each (a page each).
    fn put_peers(store: &SqliteStore, range: std::ops::Range<usize>) {
        let mut c = Commit::new();
        for i in range {
            c.put_peer(format!("did:mesh:{i:032}"), Some(Zeroizing::new("x".repeat(3_000))));
        }
        store.commit(&c).expect("commit");
    }

    /// After a checkpoint the WAL is cut back to nothing and the next
    /// commit appends from its start: no frame ever rewrites part of an
    /// older, possibly evicted, file page (see `WAL_SIZE_LIMIT`). Without
    /// the limit the file keeps its size and is rewritten from the start.
    #[test]
    fn the_wal_starts_over_empty_after_a_checkpoint() {
        let (dir, path, wal) = store_dir("wal-limit");
        let store = SqliteStore::open(&path).expect("open");
        put_peers(&store, 0..50);
        let grown = std::fs::metadata(&wal).expect("wal").len();
        assert!(grown > 50 * 4_096, "50 pages of rows: {grown} bytes of WAL");
        let (busy, _, _): (i64, i64, i64) = store
            .lock()
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .expect("checkpoint");
        assert_eq!(busy, 0);
        let mut c = Commit::new();
        c.set_meta("app.after", Some("checkpoint".into()));
        store.commit(&c).expect("commit after the checkpoint");
        let after = std::fs::metadata(&wal).expect("wal").len();
        assert!(after < 5 * 4_096, "the WAL started over at {after} bytes, was {grown}");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Commits leave the WAL to grow up to the in-commit limit; `idle`
    /// checkpoints it and cuts it to nothing once it holds the idle
    /// threshold, leaves a smaller one alone, and loses nothing.
    #[test]
    fn idle_checkpoints_a_large_wal_out_of_the_commit_path() {
        let (dir, path, wal) = store_dir("wal-idle");
        let mut store = SqliteStore::open(&path).expect("open");
        let limit: i64 = store
            .lock()
            .conn
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .expect("pragma");
        assert_eq!(limit, i64::from(WAL_CHECKPOINT_IN_COMMIT_PAGES));
        store.idle_checkpoint_pages = 40;
        put_peers(&store, 0..10);
        let small = std::fs::metadata(&wal).expect("wal").len();
        assert!(small > 0 && small < 40 * WAL_FRAME_BYTES, "{small}");
        store.idle().expect("idle");
        assert_eq!(
            std::fs::metadata(&wal).expect("wal").len(),
            small,
            "a small WAL is left alone"
        );
        assert_eq!(store.stats().idle_checkpoints, 0);
        put_peers(&store, 10..60);
        assert!(std::fs::metadata(&wal).expect("wal").len() >= 40 * WAL_FRAME_BYTES);
        store.idle().expect("idle");
        assert_eq!(
            std::fs::metadata(&wal).expect("wal").len(),
            0,
            "checkpointed and cut back"
        );
        assert_eq!(store.stats().idle_checkpoints, 1);
        put_peers(&store, 60..61);
        store.close();
        assert!(store.idle().is_err(), "a closed store refuses");
        drop(store);
        let reopened = SqliteStore::open(&path).expect("reopen");
        assert_eq!(reopened.load().expect("load").peers.len(), 61);
        drop(reopened);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A database in the current schema with `rows` duplicate-id rows of
    /// peer `a` (numbered from 1) and three of peer `b`.
    fn seen_rows(rows: i64) -> Connection {
        let conn = Connection::open_in_memory().expect("in-memory database");
        for migration in MIGRATIONS {
            conn.execute_batch(migration).expect("schema");
        }
        let mut insert = conn
            .prepare("INSERT INTO seen (peer, n, id) VALUES (?1, ?2, ?3)")
            .expect("insert");
        for n in 1..=rows {
            insert
                .execute(rusqlite::params!["a", n, format!("id-{n}")])
                .expect("row");
        }
        for n in 1..=3_i64 {
            insert
                .execute(rusqlite::params!["b", n, format!("id-{n}")])
                .expect("row");
        }
        drop(insert);
        conn
    }

    fn count(conn: &Connection, peer: &str) -> i64 {
        conn.query_row("SELECT count(*) FROM seen WHERE peer = ?1", [peer], |r| r.get(0))
            .expect("count")
    }

    /// Every commit that remembers an id runs the trim, so below the
    /// limit it must cost a couple of index seeks, not a pass over the
    /// peer's rows. It was one statement with `MAX(n) - MIN(n)`, which
    /// defeats SQLite's min/max optimization: it visited all of them
    /// (4,300 here, about 0.3 ms), so a receiver's commits grew slower
    /// with every id it remembered, up to the limit.
    #[test]
    fn the_seen_trim_reads_two_index_ends_not_every_row() {
        let conn = seen_rows(4_300);
        trim_seen(&conn, "a", 4_096).expect("trim");
        assert_eq!(
            count(&conn, "a"),
            4_300,
            "under limit + slack (4,352) nothing is trimmed"
        );
        let steps = conn
            .prepare_cached(SEEN_ENDS_SQL)
            .expect("cached")
            .get_status(StatementStatus::VmStep);
        assert!(
            steps < 100,
            "reading the ends took {steps} VM steps for 4,300 rows: a scan"
        );

        // The form it replaced, for the record: a step or more per row.
        let mut scan = conn
            .prepare("SELECT MAX(n) - MIN(n) FROM seen WHERE peer = ?1")
            .expect("scan");
        let span: i64 = scan.query_row(["a"], |r| r.get(0)).expect("span");
        assert_eq!(span, 4_299);
        assert!(scan.get_status(StatementStatus::VmStep) > 4_300);
    }

    /// Past the limit and its slack the oldest go and the newest `limit`
    /// stay; another peer's rows are untouched; no rows is no error.
    #[test]
    fn the_seen_trim_keeps_the_newest_limit() {
        let conn = seen_rows(4_096 + 256 + 1);
        trim_seen(&conn, "a", 4_096).expect("trim");
        assert_eq!(count(&conn, "a"), 4_096);
        let oldest: i64 = conn
            .query_row("SELECT MIN(n) FROM seen WHERE peer = 'a'", [], |r| r.get(0))
            .expect("oldest");
        assert_eq!(oldest, 4_096 + 256 + 1 - 4_096 + 1);
        assert_eq!(count(&conn, "b"), 3);

        let conn = seen_rows(40);
        trim_seen(&conn, "a", 16).expect("trim");
        assert_eq!(count(&conn, "a"), 16, "slack 1 for a limit of 16: 40 rows exceed 17");
        trim_seen(&conn, "nobody", 16).expect("a peer without rows");
        trim_seen(&conn, "b", 0).expect("limit 0 counts as 1");
        assert_eq!(count(&conn, "b"), 1, "a limit of 0 keeps the newest id");
    }
}
