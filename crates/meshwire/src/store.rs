//! Persistence: the identity file and session stores.
//!
//! The identity file holds the Ed25519 seed; it is created `0600` and
//! refused when group or others may read it. A [`SessionStore`] keeps the
//! mesh state (sessions, pre-keys, delivery bookkeeping) so that an agent
//! that restarts continues its conversations without a new KNOCK.

use meshwire_proto::Identity;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use zeroize::{Zeroize, Zeroizing};

/// Loading or saving persisted state failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is readable by group or others (mode {mode:o}); run `chmod 600` on it")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}: not a meshwire identity file: {reason}")]
    Format { path: PathBuf, reason: String },
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

/// Writes `contents` to a private temporary file beside `path`, then renames
/// it over `path`, so a crash leaves the old file or the new one, never half.
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
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io(&tmp))?;
    file.write_all(contents).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
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
    fn load(&self, did: &str) -> Result<Option<Zeroizing<String>>, StoreError>;
    fn save(&self, did: &str, state: &str) -> Result<(), StoreError>;
}

/// Keeps state in memory (survives a reconnect, not a restart of the process).
#[derive(Default)]
pub struct MemoryStore {
    states: Mutex<HashMap<String, Zeroizing<String>>>,
}

impl MemoryStore {
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
}

/// One file per agent in a directory, written atomically, mode 0600.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, did: &str) -> PathBuf {
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
}
