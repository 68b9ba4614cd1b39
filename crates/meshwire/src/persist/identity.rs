//! The identity file, encrypted at rest (`meshwire-identity-encrypted/1`).
//!
//! The same write hygiene as [`crate::store::save_identity`]: the file is
//! written to a temporary file with a random name, created exclusively
//! without following links with mode `0600`, synced, renamed over the
//! target, and the directory is synced ([`crate::store::write_private_atomic`]).
//! The file holds, in JSON: the format, the DID (public; bound to the
//! sealed seed as associated data), the key-derivation header (salt and
//! Argon2id parameters, or the marker of a raw key) and the sealed
//! Ed25519 seed (XChaCha20-Poly1305).

use super::crypto::{aad, AtRestKey, DeriveError, KdfHeader};
use super::sqlite::check_private;
use super::PersistError;
use crate::store::write_private_atomic;
use meshwire_proto::Identity;
use serde::{Deserialize, Serialize};
use std::path::Path;
use zeroize::Zeroizing;

const FORMAT: &str = "meshwire-identity-encrypted/1";

#[derive(Serialize, Deserialize)]
struct EncryptedIdentityFile {
    format: String,
    did: String,
    kdf: KdfHeader,
    sealed: String,
}

/// Saves `identity` to `path`, its seed encrypted with `key` (mode 0600,
/// atomic replace; see the module docs).
pub fn save_identity_encrypted(identity: &Identity, path: &Path, key: &AtRestKey) -> Result<(), PersistError> {
    let kdf = key.new_header();
    let sealer = key.derive(&kdf, "identity").map_err(|e| PersistError::Kdf {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let did = identity.did().to_string();
    let seed = identity.seed();
    let sealed = sealer.seal(&aad("identity", &[FORMAT, &did]), seed.as_ref());
    let file = EncryptedIdentityFile {
        format: FORMAT.into(),
        did,
        kdf,
        sealed: hex::encode(sealed),
    };
    let text = serde_json::to_string_pretty(&file).map_err(|e| PersistError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    write_private_atomic(path, text.as_bytes())?;
    Ok(())
}

/// Loads an identity saved by [`save_identity_encrypted`]. Refuses a file
/// readable by group or others; a wrong key gives
/// [`PersistError::WrongKey`] (the file is only read).
pub fn load_identity_encrypted(path: &Path, key: &AtRestKey) -> Result<Identity, PersistError> {
    check_private(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| PersistError::Io {
        path: path.to_owned(),
        source,
    })?;
    let corrupt = |reason: String| PersistError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let file: EncryptedIdentityFile =
        serde_json::from_str(&text).map_err(|e| corrupt(format!("not an encrypted identity file: {e}")))?;
    if file.format != FORMAT {
        return Err(corrupt(format!("format {:?}, expected {FORMAT:?}", file.format)));
    }
    let sealer = key.derive(&file.kdf, "identity").map_err(|e| match e {
        DeriveError::WrongKind(_) => PersistError::WrongKey { path: path.to_owned() },
        DeriveError::Bad(reason) => PersistError::Kdf {
            path: path.to_owned(),
            reason,
        },
    })?;
    let sealed = hex::decode(&file.sealed).map_err(|_| corrupt("the sealed seed is not hex".into()))?;
    let seed = sealer
        .open(&aad("identity", &[FORMAT, &file.did]), &sealed)
        .ok_or_else(|| PersistError::WrongKey { path: path.to_owned() })?;
    let seed: Zeroizing<[u8; 32]> = Zeroizing::new(
        seed.as_slice()
            .try_into()
            .map_err(|_| corrupt("the seed is not 32 bytes".into()))?,
    );
    let identity = Identity::from_seed(&seed);
    if identity.did().as_str() != file.did {
        return Err(corrupt("the DID does not match the seed".into()));
    }
    Ok(identity)
}

/// Loads the encrypted identity at `path`, or creates, encrypts and saves
/// a new one there.
pub fn load_or_create_identity_encrypted(path: &Path, key: &AtRestKey) -> Result<Identity, PersistError> {
    if std::fs::symlink_metadata(path).is_ok() {
        return load_identity_encrypted(path, key);
    }
    let identity = Identity::generate(&mut rand_core::OsRng);
    save_identity_encrypted(&identity, path, key)?;
    Ok(identity)
}
