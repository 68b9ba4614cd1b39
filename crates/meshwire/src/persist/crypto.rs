//! Sealing values at rest: key derivation (Argon2id for passphrases, then
//! HKDF-SHA256 per file) and XChaCha20-Poly1305 per value.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand_core::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::fmt;
use zeroize::Zeroizing;

/// Argon2id cost parameters for a passphrase ([`AtRestKey::from_passphrase`]).
/// They are stored beside the data (with a random salt), so a file is
/// always opened with the parameters it was created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Argon2Params {
    /// Memory, KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl Argon2Params {
    /// Highest memory cost accepted from a file (1 GiB): a file cannot
    /// make the opener allocate more.
    pub const MAX_M_KIB: u32 = 1 << 20;
    /// Highest pass count accepted from a file.
    pub const MAX_T: u32 = 64;
    /// Highest lane count accepted from a file.
    pub const MAX_P: u32 = 16;

    fn check(&self) -> Result<Params, String> {
        if self.m_kib > Self::MAX_M_KIB || self.t > Self::MAX_T || self.p > Self::MAX_P {
            return Err(format!(
                "argon2 parameters m={} KiB t={} p={} exceed the bounds (m <= {}, t <= {}, p <= {})",
                self.m_kib,
                self.t,
                self.p,
                Self::MAX_M_KIB,
                Self::MAX_T,
                Self::MAX_P
            ));
        }
        Params::new(self.m_kib, self.t, self.p, Some(32)).map_err(|e| format!("argon2 parameters: {e}"))
    }
}

impl Default for Argon2Params {
    /// 19 MiB, 2 passes, 1 lane (the OWASP recommendation for Argon2id).
    fn default() -> Self {
        Self {
            m_kib: 19 * 1024,
            t: 2,
            p: 1,
        }
    }
}

#[derive(Clone)]
enum KeyMaterial {
    Raw(Zeroizing<[u8; 32]>),
    Passphrase(Zeroizing<String>, Argon2Params),
}

/// The application's key for data at rest: 32 raw bytes (from a KMS, a
/// secret manager, the OS keyring) or a passphrase stretched with Argon2id.
/// The material is zeroized on drop; Debug never shows it.
///
/// The key itself is never stored. Each file stores a random salt and the
/// derivation parameters, and a key-verification value; the key used for
/// values is `HKDF-SHA256(salt, root, "meshwire at-rest/1 <purpose>")`
/// where `root` is the raw key or the Argon2id output, so one application
/// key gives independent keys to the store and the identity file.
#[derive(Clone)]
pub struct AtRestKey(KeyMaterial);

impl fmt::Debug for AtRestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            KeyMaterial::Raw(_) => f.write_str("AtRestKey(raw, redacted)"),
            KeyMaterial::Passphrase(_, p) => write!(f, "AtRestKey(passphrase, redacted, {p:?})"),
        }
    }
}

impl AtRestKey {
    /// A raw 256-bit key (use a random one: `OsRng`, a KMS data key).
    pub fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> Self {
        Self(KeyMaterial::Raw(bytes))
    }

    /// A passphrase, stretched with Argon2id ([`Argon2Params::default`]
    /// for new files; existing files use the parameters stored in them).
    pub fn from_passphrase(passphrase: Zeroizing<String>) -> Self {
        Self(KeyMaterial::Passphrase(passphrase, Argon2Params::default()))
    }

    /// The Argon2id cost used when this key creates a new file (no effect
    /// on a raw key).
    pub fn with_argon2_params(self, params: Argon2Params) -> Self {
        match self.0 {
            KeyMaterial::Passphrase(text, _) => Self(KeyMaterial::Passphrase(text, params)),
            raw => Self(raw),
        }
    }

    /// A header for a new file: a fresh salt and this key's parameters.
    pub(crate) fn new_header(&self) -> KdfHeader {
        let mut salt = [0u8; 16];
        rand_core::OsRng.fill_bytes(&mut salt);
        match &self.0 {
            KeyMaterial::Raw(_) => KdfHeader {
                kdf: KDF_RAW.into(),
                salt: hex::encode(salt),
                argon2: None,
            },
            KeyMaterial::Passphrase(_, params) => KdfHeader {
                kdf: KDF_ARGON2ID.into(),
                salt: hex::encode(salt),
                argon2: Some(*params),
            },
        }
    }

    /// The value key for a file with `header`, for `purpose`.
    pub(crate) fn derive(&self, header: &KdfHeader, purpose: &str) -> Result<Sealer, DeriveError> {
        let salt = hex::decode(&header.salt).map_err(|_| DeriveError::Bad("the salt is not hex".into()))?;
        if salt.len() < 16 || salt.len() > 64 {
            return Err(DeriveError::Bad("the salt has a bad length".into()));
        }
        let mut root = Zeroizing::new([0u8; 32]);
        match (&self.0, header.kdf.as_str(), &header.argon2) {
            (KeyMaterial::Raw(bytes), KDF_RAW, None) => *root = **bytes,
            (KeyMaterial::Passphrase(text, _), KDF_ARGON2ID, Some(params)) => {
                let params = params.check().map_err(DeriveError::Bad)?;
                Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                    .hash_password_into(text.as_bytes(), &salt, root.as_mut())
                    .map_err(|e| DeriveError::Bad(format!("argon2: {e}")))?;
            }
            (KeyMaterial::Raw(_), KDF_ARGON2ID, _) => {
                return Err(DeriveError::WrongKind(
                    "the file was encrypted with a passphrase, a raw key was supplied".into(),
                ))
            }
            (KeyMaterial::Passphrase(..), KDF_RAW, _) => {
                return Err(DeriveError::WrongKind(
                    "the file was encrypted with a raw key, a passphrase was supplied".into(),
                ))
            }
            (_, other, _) => return Err(DeriveError::Bad(format!("unknown key derivation {other:?}"))),
        }
        let hk = Hkdf::<Sha256>::new(Some(&salt), root.as_ref());
        let mut key = Zeroizing::new([0u8; 32]);
        hk.expand(format!("meshwire at-rest/1 {purpose}").as_bytes(), key.as_mut())
            .map_err(|_| DeriveError::Bad("hkdf output length".into()))?;
        Ok(Sealer { key })
    }
}

/// Why a key could not be derived for a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DeriveError {
    /// The file wants the other kind of key (raw vs passphrase).
    #[error("{0}")]
    WrongKind(String),
    /// The stored parameters are invalid or out of bounds.
    #[error("{0}")]
    Bad(String),
}

pub(crate) const KDF_RAW: &str = "raw+hkdf-sha256";
pub(crate) const KDF_ARGON2ID: &str = "argon2id+hkdf-sha256";

/// How a file's key is derived: stored beside the data, not secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KdfHeader {
    pub kdf: String,
    pub salt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argon2: Option<Argon2Params>,
}

/// The first byte of a sealed value: the format.
const SEALED_V1: u8 = 1;
const NONCE_LEN: usize = 24;

/// Seals and opens values with one derived key. Debug never shows it.
#[derive(Clone)]
pub(crate) struct Sealer {
    key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer(redacted)")
    }
}

/// The associated data binding a value to its place: length-prefixed
/// parts, so that no two places share it.
pub(crate) fn aad(table: &str, key: &[&str]) -> Vec<u8> {
    let mut out = b"meshwire-at-rest/1".to_vec();
    for part in std::iter::once(table).chain(key.iter().copied()) {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out
}

impl Sealer {
    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.key.as_ref().into())
    }

    /// `version || nonce || ciphertext+tag`, with a random nonce.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand_core::OsRng.fill_bytes(&mut nonce);
        // Encryption of an in-memory buffer cannot fail for sizes below
        // the cipher's 256 GiB bound.
        let sealed = self
            .cipher()
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad })
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// The plaintext of `sealed`, or `None` when it fails authentication
    /// (wrong key, tampered, moved from another place, truncated).
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEALED_V1 || rest.len() < NONCE_LEN + 16 {
            return None;
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        self.cipher()
            .decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad })
            .ok()
            .map(Zeroizing::new)
    }
}

/// The plaintext of the key-verification value.
pub(crate) const KEY_CHECK: &[u8] = b"meshwire at-rest key check/1";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fast() -> Argon2Params {
        Argon2Params { m_kib: 64, t: 1, p: 1 }
    }

    #[test]
    fn seal_open_binds_the_place() {
        let key = AtRestKey::from_bytes(Zeroizing::new([7; 32]));
        let header = key.new_header();
        let s = key.derive(&header, "store").unwrap();
        let sealed = s.seal(&aad("peers", &["did:a"]), b"secret");
        assert_eq!(
            s.open(&aad("peers", &["did:a"]), &sealed).unwrap().as_slice(),
            b"secret"
        );
        assert!(s.open(&aad("peers", &["did:b"]), &sealed).is_none());
        assert!(s.open(&aad("inbox", &["did", ":a"]), &sealed).is_none());
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(s.open(&aad("peers", &["did:a"]), &flipped).is_none());
        assert!(s.open(&aad("peers", &["did:a"]), &sealed[..20]).is_none());
        // Another purpose, another key.
        let other = key.derive(&header, "identity").unwrap();
        assert!(other.open(&aad("peers", &["did:a"]), &sealed).is_none());
    }

    #[test]
    fn passphrase_keys_depend_on_salt_and_passphrase() {
        let key = AtRestKey::from_passphrase(Zeroizing::new("correct horse".into())).with_argon2_params(fast());
        let header = key.new_header();
        let s = key.derive(&header, "store").unwrap();
        let sealed = s.seal(b"ad", b"x");
        let again = key.derive(&header, "store").unwrap();
        assert!(again.open(b"ad", &sealed).is_some());
        let wrong = AtRestKey::from_passphrase(Zeroizing::new("wrong horse".into()));
        assert!(wrong.derive(&header, "store").unwrap().open(b"ad", &sealed).is_none());
        let mut huge = header.clone();
        huge.argon2 = Some(Argon2Params {
            m_kib: u32::MAX,
            t: 1,
            p: 1,
        });
        assert!(key.derive(&huge, "store").unwrap_err().to_string().contains("exceed"));
        let raw = AtRestKey::from_bytes(Zeroizing::new([1; 32]));
        assert!(matches!(raw.derive(&header, "store"), Err(DeriveError::WrongKind(_))));
        assert!(!format!("{key:?}").contains("horse"));
        assert!(!format!("{raw:?}").contains('1'));
    }
}
