//! Agent identity: an Ed25519 key, the X25519 key derived from it, and the DID.

use crate::keys::{Ed25519PublicKey, KeyPair, X25519PublicKey, X25519Secret};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha256, Sha512};
use std::fmt;
use std::str::FromStr;
use zeroize::{Zeroize, Zeroizing};

const DID_PREFIX: &str = "did:mesh:";
const MAX_DID_ID_LEN: usize = 128;

/// An agent identifier, `did:mesh:<id>`.
///
/// DIDs this crate derives are `did:mesh:` followed by the first 32 hex
/// characters of sha256(Ed25519 public key); parsing also accepts any
/// identifier made of DID id characters, as registries assign others.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Did(String);

/// A string is not a `did:mesh:` DID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DidError {
    #[error("DID must start with \"did:mesh:\"")]
    /// The text does not start with `did:mesh:`.
    WrongMethod,
    #[error("DID has an empty identifier")]
    /// Nothing follows `did:mesh:`.
    Empty,
    #[error("DID identifier is longer than {MAX_DID_ID_LEN} characters")]
    /// The identifier is longer than the limit.
    TooLong,
    #[error("DID identifier contains {0:?}")]
    /// The identifier has a character outside `[A-Za-z0-9._-]`.
    InvalidCharacter(char),
}

impl Did {
    /// Parses `did:mesh:<id>`, where `<id>` is 1 to 128 of `[A-Za-z0-9._-]`.
    pub fn parse(text: &str) -> Result<Self, DidError> {
        let id = text.strip_prefix(DID_PREFIX).ok_or(DidError::WrongMethod)?;
        if id.is_empty() {
            return Err(DidError::Empty);
        }
        if id.len() > MAX_DID_ID_LEN {
            return Err(DidError::TooLong);
        }
        if let Some(bad) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(DidError::InvalidCharacter(bad));
        }
        Ok(Self(text.to_owned()))
    }

    /// The DID an Ed25519 public key derives.
    pub fn from_public_key(key: &Ed25519PublicKey) -> Self {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = hex::encode(digest);
        id.truncate(32);
        Self(format!("{DID_PREFIX}{id}"))
    }

    /// Whether this DID is the one `key` derives.
    pub fn is_derived_from(&self, key: &Ed25519PublicKey) -> bool {
        *self == Self::from_public_key(key)
    }

    /// The DID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Did {
    type Err = DidError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Did {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Did {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Did({})", self.0)
    }
}

/// An Ed25519 signature did not verify, or was not 64 bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("signature must be 64 bytes, got {0}")]
    /// The signature is not 64 bytes (the length given).
    InvalidLength(usize),
    #[error("invalid Ed25519 public key")]
    /// The public key is not a valid Ed25519 point.
    InvalidKey,
    #[error("signature does not verify")]
    /// The signature does not verify.
    Mismatch,
}

/// An agent's long-term identity.
///
/// One Ed25519 key signs (registry requests, signed pre-keys, relay
/// proofs); its Montgomery image is the X25519 identity key of X3DH; the
/// DID is derived from the Ed25519 public key. Persist [`Identity::seed`]
/// (a zeroizing secret) and rebuild with [`Identity::from_seed`].
///
/// ```
/// use meshwire_proto::identity::verify_signature;
/// use meshwire_proto::Identity;
/// use rand_core::OsRng;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let agent = Identity::generate(&mut OsRng);
/// assert!(agent.did().as_str().starts_with("did:mesh:"));
/// assert!(agent.did().is_derived_from(&agent.ed25519_public()));
///
/// // The seed is all there is to persist: the same seed, the same agent.
/// let restored = Identity::from_seed(&agent.seed());
/// assert_eq!(restored.did(), agent.did());
/// assert_eq!(restored.x25519_public(), agent.x25519_public());
///
/// let signature = agent.sign(b"register me");
/// verify_signature(&agent.ed25519_public(), b"register me", &signature)?;
/// assert!(verify_signature(&agent.ed25519_public(), b"register you", &signature).is_err());
/// # Ok(())
/// # }
/// ```
pub struct Identity {
    signing: SigningKey,
    x25519: KeyPair,
    did: Did,
}

impl Identity {
    /// The identity of a 32-byte Ed25519 seed (RFC 8032 secret key).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(seed);
        // The X25519 identity key is the clamped lower half of sha512(seed),
        // the scalar Ed25519 itself signs with (libsodium's sk_to_curve25519).
        let mut hash = Zeroizing::new([0u8; 64]);
        hash.copy_from_slice(&Sha512::digest(seed));
        let mut scalar = [0u8; 32];
        scalar.copy_from_slice(hash.get(..32).unwrap_or(&[0u8; 32]));
        scalar[0] &= 248;
        scalar[31] &= 127;
        scalar[31] |= 64;
        let x25519 = KeyPair::from_secret(X25519Secret::from_bytes(scalar));
        scalar.zeroize();
        let did = Did::from_public_key(&Ed25519PublicKey::from_bytes(signing.verifying_key().to_bytes()));
        Self { signing, x25519, did }
    }

    /// A new identity from 32 bytes of `rng`.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Self::from_seed(&seed)
    }

    /// The Ed25519 seed, for persistence.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// The DID this identity's key derives.
    pub fn did(&self) -> &Did {
        &self.did
    }

    /// The Ed25519 public key.
    pub fn ed25519_public(&self) -> Ed25519PublicKey {
        Ed25519PublicKey::from_bytes(self.signing.verifying_key().to_bytes())
    }

    /// The X25519 identity public key (the Ed25519 key's Montgomery image).
    pub fn x25519_public(&self) -> &X25519PublicKey {
        self.x25519.public()
    }

    /// The X25519 identity private key (secret).
    pub fn x25519_secret(&self) -> &X25519Secret {
        self.x25519.secret()
    }

    /// Ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("did", &self.did)
            .field("ed25519_public", &self.ed25519_public())
            .finish_non_exhaustive()
    }
}

/// Verifies an Ed25519 `signature` of `message` by `key` (strict RFC 8032
/// checks: no malleable or small-order signatures).
pub fn verify_signature(key: &Ed25519PublicKey, message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
    let signature: [u8; 64] = signature
        .try_into()
        .map_err(|_| SignatureError::InvalidLength(signature.len()))?;
    let key = VerifyingKey::from_bytes(key.as_bytes()).map_err(|_| SignatureError::InvalidKey)?;
    key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&signature))
        .map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_parsing() {
        assert!(Did::parse("did:mesh:c21a9c70179305f87b7fbd85edb98079").is_ok());
        assert!(Did::parse("did:mesh:alice").is_ok());
        assert_eq!(Did::parse("did:web:x"), Err(DidError::WrongMethod));
        assert_eq!(Did::parse("did:mesh:"), Err(DidError::Empty));
        assert_eq!(Did::parse("did:mesh:a|b"), Err(DidError::InvalidCharacter('|')));
        assert_eq!(
            Did::parse(&format!("did:mesh:{}", "a".repeat(129))),
            Err(DidError::TooLong)
        );
        assert_eq!(Did::parse("did:mesh:é"), Err(DidError::InvalidCharacter('é')));
    }

    #[test]
    fn identity_debug_hides_the_seed() {
        let seed = [0x5au8; 32];
        let id = Identity::from_seed(&seed);
        let text = format!("{id:?}");
        assert!(!text.contains("5a5a5a5a"), "{text}");
        assert!(text.contains(id.did().as_str()));
    }

    #[test]
    fn sign_and_verify() {
        let id = Identity::from_seed(&[1u8; 32]);
        let sig = id.sign(b"msg");
        verify_signature(&id.ed25519_public(), b"msg", &sig).unwrap();
        assert_eq!(
            verify_signature(&id.ed25519_public(), b"msh", &sig),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(&id.ed25519_public(), b"msg", &sig[..63]),
            Err(SignatureError::InvalidLength(63))
        );
        assert!(Did::from_public_key(&id.ed25519_public()).is_derived_from(&id.ed25519_public()));
    }
}
