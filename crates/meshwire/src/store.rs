//! The identity file, and the whole-state session stores of earlier
//! meshwire versions.
//!
//! The identity file holds the Ed25519 seed; it is created `0600` and
//! refused when group or others may read it (see
//! [`crate::persist::save_identity_encrypted`] for an encrypted one).
//!
//! A [`SessionStore`] keeps the whole mesh state as one JSON text. The
//! client no longer uses it: [`crate::MeshClient`] commits each change
//! incrementally through [`crate::persist::Persistence`] (SQLite by
//! default), which a JSON text rewritten whole cannot do crash-consistently.
//! [`FileStore`]'s files are migrated into the SQLite store on first use
//! ([`crate::persist::open_state_dir`]); the types stay for that migration
//! and for tools that read old files.
//!
//! Every write ([`write_private_atomic`]) goes to a temporary file with an
//! unpredictable name beside the target, created exclusively, without
//! following a link and with mode `0600` from the start; it is synced,
//! renamed over the target, and the directory is synced. The temporary
//! file is removed if anything fails, and writes to one path are made one
//! at a time within the process. A link or a stale file planted at any
//! temporary name therefore cannot receive the secrets or lend its mode.
//!
//! **A corrupt state** (truncated, edited, from an incompatible version)
//! makes [`crate::MeshClient::connect`] fail with
//! [`crate::ClientError::CorruptState`], naming the store. To start over
//! with the same identity (fresh pre-keys; peers KNOCK again): call
//! [`crate::persist::Persistence::reset_mesh`], set
//! [`crate::MeshClientBuilder::reset_corrupt_state`], or run
//! `meshwire state reset --state PATH`.

use meshwire_proto::Identity;
use rand_core::RngCore;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use zeroize::{Zeroize, Zeroizing};

/// Loading or saving persisted state failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file may be read by group or others.
    #[error("{path} is readable by group or others (mode {mode:04o}); run `chmod 600` on it")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not what it should be.
    #[error("{path}: not a meshwire identity file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A state could not be used or handled where it is (not a file, a
    /// store that cannot reset).
    #[error("{path}: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    format: String,
    did: String,
    ed25519_seed: String,
}

impl Drop for IdentityFile {
    fn drop(&mut self) {
        self.ed25519_seed.zeroize();
    }
}

const IDENTITY_FORMAT: &str = "meshwire-identity/1";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_: &Path) -> Result<(), StoreError> {
    Ok(())
}

/// The lock serializing writes to `path` within this process.
fn write_lock(path: &Path) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    let locks = LOCKS.get_or_init(Default::default);
    let mut locks = locks.lock().unwrap_or_else(|p| p.into_inner());
    // Bounded by the number of distinct files this process writes.
    locks.entry(path.to_owned()).or_default().clone()
}

/// Opens a new private file at `path`: fails if anything (a file, a link,
/// a dangling link) is there already; mode 0600 from creation.
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    }
    options.open(path)
}

/// Syncs the directory `dir` so that a rename in it survives a crash.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `contents` to a private temporary file beside `path`, then renames
/// it over `path`, so a crash leaves the old file or the new one, never half.
/// The temporary name is random and created exclusively without following
/// links, mode 0600; file and directory are synced; the temporary file is
/// removed on failure; writers of one path take turns.
pub fn write_private_atomic(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lock = write_lock(path);
    let _turn = lock.lock().unwrap_or_else(|p| p.into_inner());
    let mut random = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut random);
    let tmp = dir.join(format!(".{name}.{}.tmp", hex::encode(random)));
    let mut file = create_private(&tmp).map_err(io(&tmp))?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io(&tmp))
        .and_then(|()| {
            drop(file);
            std::fs::rename(&tmp, path).map_err(io(path))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Removes the state file at `path` (a regular file; a link there is
/// removed, never followed). `Ok(false)` if there was none.
pub fn reset_state_file(path: &Path) -> Result<bool, StoreError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(path)(e)),
        Ok(meta) if meta.is_dir() => Err(StoreError::State {
            path: path.to_owned(),
            reason: "a directory, not a state file".into(),
        }),
        Ok(_) => {
            let lock = write_lock(path);
            let _turn = lock.lock().unwrap_or_else(|p| p.into_inner());
            std::fs::remove_file(path).map_err(io(path))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                sync_dir(dir)?;
            }
            Ok(true)
        }
    }
}

/// Saves `identity` to `path` (mode 0600).
pub fn save_identity(identity: &Identity, path: &Path) -> Result<(), StoreError> {
    let file = IdentityFile {
        format: IDENTITY_FORMAT.into(),
        did: identity.did().to_string(),
        ed25519_seed: hex::encode(*identity.seed()),
    };
    let text = Zeroizing::new(serde_json::to_string_pretty(&file).unwrap_or_default());
    write_private_atomic(path, text.as_bytes())
}

/// Loads an identity saved by [`save_identity`]; refuses a file readable by
/// group or others.
pub fn load_identity(path: &Path) -> Result<Identity, StoreError> {
    if path.is_dir() {
        return Err(StoreError::Format {
            path: path.to_owned(),
            reason: "this is a folder; give the path of the identity file".into(),
        });
    }
    check_private(path)?;
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io(path))?);
    let format_error = |reason: String| StoreError::Format {
        path: path.to_owned(),
        reason,
    };
    let file: IdentityFile = serde_json::from_str(&text).map_err(|e| format_error(e.to_string()))?;
    if file.format != IDENTITY_FORMAT {
        return Err(format_error(format!("format {:?}", file.format)));
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(&file.ed25519_seed, seed.as_mut()).map_err(|_| format_error("bad seed".into()))?;
    let identity = Identity::from_seed(&seed);
    if identity.did().as_str() != file.did {
        return Err(format_error("the DID does not match the seed".into()));
    }
    Ok(identity)
}

/// Loads the identity at `path`, or creates and saves a new one there.
pub fn load_or_create_identity(path: &Path) -> Result<Identity, StoreError> {
    if path.exists() {
        return load_identity(path);
    }
    let identity = Identity::generate(&mut rand_core::OsRng);
    save_identity(&identity, path)?;
    Ok(identity)
}

/// Where a client keeps its mesh state between runs. The state is secret
/// (ratchet keys, pre-key privates).
pub trait SessionStore: Send + Sync {
    /// The state saved for `did`, if any.
    fn load(&self, did: &str) -> Result<Option<Zeroizing<String>>, StoreError>;
    /// Replaces the state saved for `did`.
    fn save(&self, did: &str, state: &str) -> Result<(), StoreError>;
    /// Forgets the state saved for `did` (the recovery from a corrupt
    /// state: the agent starts over with the same identity). The default
    /// cannot forget and says so.
    fn reset(&self, did: &str) -> Result<(), StoreError> {
        Err(StoreError::State {
            path: PathBuf::from(self.location(did)),
            reason: "this store cannot reset a state".into(),
        })
    }
    /// Where the state of `did` lives, for error messages.
    fn location(&self, did: &str) -> String {
        let _ = did;
        "the session store".into()
    }
}

/// Keeps state in memory (survives a reconnect, not a restart of the process).
#[derive(Default)]
pub struct MemoryStore {
    states: Mutex<HashMap<String, Zeroizing<String>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryStore")
    }
}

impl SessionStore for MemoryStore {
    fn load(&self, did: &str) -> Result<Option<Zeroizing<String>>, StoreError> {
        Ok(self.states.lock().ok().and_then(|s| s.get(did).cloned()))
    }

    fn save(&self, did: &str, state: &str) -> Result<(), StoreError> {
        if let Ok(mut s) = self.states.lock() {
            s.insert(did.to_owned(), Zeroizing::new(state.to_owned()));
        }
        Ok(())
    }

    fn reset(&self, did: &str) -> Result<(), StoreError> {
        if let Ok(mut s) = self.states.lock() {
            s.remove(did);
        }
        Ok(())
    }

    fn location(&self, did: &str) -> String {
        format!("the memory store's state of {did}")
    }
}

/// One file per agent in a directory, written atomically, mode 0600.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// A store keeping one file per agent in `dir` (created on first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Removes the state file of `did` so that the agent starts over with
    /// the same identity (see the module documentation). `Ok(false)` if
    /// there was none.
    pub fn reset(&self, did: &str) -> Result<bool, StoreError> {
        reset_state_file(&self.path(did))
    }

    /// The file holding the state of `did`.
    pub fn path(&self, did: &str) -> PathBuf {
        let name: String = did
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        self.dir.join(format!("{name}.session.json"))
    }
}

impl SessionStore for FileStore {
    fn load(&self, did: &str) -> Result<Option<Zeroizing<String>>, StoreError> {
        let path = self.path(did);
        if !path.exists() {
            return Ok(None);
        }
        check_private(&path)?;
        std::fs::read_to_string(&path)
            .map(|t| Some(Zeroizing::new(t)))
            .map_err(io(&path))
    }

    fn save(&self, did: &str, state: &str) -> Result<(), StoreError> {
        write_private_atomic(&self.path(did), state.as_bytes())
    }

    fn reset(&self, did: &str) -> Result<(), StoreError> {
        FileStore::reset(self, did).map(drop)
    }

    fn location(&self, did: &str) -> String {
        self.path(did).display().to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshwire-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn identity_file_round_trip_and_permissions() {
        let dir = temp_dir("identity");
        let path = dir.join("agent.json");
        let identity = load_or_create_identity(&path).unwrap();
        assert_eq!(load_identity(&path).unwrap().did(), identity.did());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                load_identity(&path),
                Err(StoreError::Permissions { mode: 0o644, .. })
            ));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        std::fs::write(&path, "{}").unwrap();
        assert!(matches!(load_identity(&path), Err(StoreError::Format { .. })));
        assert!(matches!(
            load_identity(&dir.join("missing.json")),
            Err(StoreError::Io { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn file_store_is_atomic_and_private() {
        let dir = temp_dir("sessions");
        let store = FileStore::new(&dir);
        assert!(store.load("did:mesh:a").unwrap().is_none());
        store.save("did:mesh:a", "one").unwrap();
        store.save("did:mesh:a", "two").unwrap();
        assert_eq!(store.load("did:mesh:a").unwrap().unwrap().as_str(), "two");
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files.len(), 1, "no temporary file left behind: {files:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The temporary name writes used before (`.<name>.<pid>.tmp`).
    fn old_temp_path(path: &Path) -> PathBuf {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
    }

    /// A symlink planted at the temporary path used to receive the seed
    /// (written through the link into the attacker's target).
    #[cfg(unix)]
    #[test]
    fn a_symlink_at_the_temp_path_receives_nothing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("symlink");
        let target = dir.join("attacker-owned.txt");
        std::fs::write(&target, "untouched").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = dir.join("agent.json");
        std::os::unix::fs::symlink(&target, old_temp_path(&path)).unwrap();
        let identity = Identity::generate(&mut rand_core::OsRng);
        save_identity(&identity, &path).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o644);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_identity(&path).unwrap().did(), identity.did());
        // The exclusive, no-follow creation itself refuses a link, even a
        // dangling one, and leaves its target alone.
        let link = dir.join("link");
        std::os::unix::fs::symlink(dir.join("nowhere"), &link).unwrap();
        assert!(create_private(&link).is_err());
        assert!(!dir.join("nowhere").exists());
        std::os::unix::fs::symlink(&target, dir.join("link2")).unwrap();
        assert!(create_private(&dir.join("link2")).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A stale 0644 temporary file used to lend its mode to the state file.
    #[cfg(unix)]
    #[test]
    fn a_stale_world_readable_temp_does_not_lend_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("stale");
        let store = FileStore::new(&dir);
        let path = store.path("did:mesh:a");
        let stale = old_temp_path(&path);
        std::fs::write(&stale, "stale").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
        store.save("did:mesh:a", "secret state").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(store.load("did:mesh:a").unwrap().unwrap().as_str(), "secret state");
        assert_eq!(std::fs::read_to_string(&stale).unwrap(), "stale", "not reused");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Concurrent saves of one file (the periodic save and `close()`) take
    /// turns: no error, an intact file, no temporary file left. With one
    /// temporary name per process they truncated each other's temp file
    /// and failed to rename a temp another writer had already moved.
    #[test]
    fn concurrent_saves_serialize() {
        let dir = temp_dir("concurrent");
        let store = Arc::new(FileStore::new(&dir));
        let contents: Vec<String> = (0..4u8)
            .map(|i| char::from(b'a' + i).to_string().repeat(256 * 1024))
            .collect();
        let threads: Vec<_> = contents
            .iter()
            .cloned()
            .map(|text| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        store.save("did:mesh:a", &text).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let saved = store.load("did:mesh:a").unwrap().unwrap();
        assert!(contents.iter().any(|c| c.as_str() == saved.as_str()), "an intact save");
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A failed write removes its temporary file (here the rename fails:
    /// a directory stands at the target path).
    #[test]
    fn a_failed_write_leaves_no_temp_file() {
        let dir = temp_dir("failed");
        let path = dir.join("state.json");
        std::fs::create_dir_all(path.join("occupied")).unwrap();
        assert!(matches!(
            write_private_atomic(&path, b"secret"),
            Err(StoreError::Io { .. })
        ));
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, vec![std::ffi::OsString::from("state.json")]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reset_removes_the_state_file_only() {
        let dir = temp_dir("reset");
        let store = FileStore::new(&dir);
        assert!(!store.reset("did:mesh:a").unwrap());
        store.save("did:mesh:a", "corrupt").unwrap();
        store.save("did:mesh:b", "other").unwrap();
        assert!(store.reset("did:mesh:a").unwrap());
        assert!(store.load("did:mesh:a").unwrap().is_none());
        assert_eq!(store.load("did:mesh:b").unwrap().unwrap().as_str(), "other");
        assert!(reset_state_file(&dir).is_err(), "a directory is not a state file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
