//! Pre-keys: the responder's signed pre-key and one-time pre-keys, and the
//! public bundle an initiator fetches.

use crate::encoding::{b64_decode, b64_url};
use crate::identity::{verify_signature, Identity, SignatureError};
use crate::keys::{Ed25519PublicKey, KeyPair, X25519PublicKey, X25519Secret};
use rand_core::CryptoRngCore;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// Numeric id of a one-time pre-key.
pub type OneTimeKeyId = u32;

/// A public pre-key bundle failed to parse or verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("bundle JSON: {0}")]
    /// The text is not a bundle's JSON (parser message).
    Json(String),
    #[error("{field} is not valid base64")]
    /// A field is not valid base64.
    Encoding {
        /// The field.
        field: &'static str,
    },
    #[error("{field} must be {expected} bytes, got {actual}")]
    /// A field decodes to the wrong length.
    Length {
        /// The field.
        field: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        actual: usize,
    },
    #[error("bundle has no Ed25519 identity key to verify the signed pre-key with")]
    /// No `identity_key_ed`: the signed pre-key cannot be verified.
    MissingSigningKey,
    #[error("the Ed25519 identity key is not a valid point")]
    /// `identity_key_ed` is not a valid Ed25519 point.
    InvalidSigningKey,
    #[error("signed pre-key signature does not verify")]
    /// The signed pre-key signature does not verify.
    BadSignature,
    /// The bundle's identity keys are not the DID's (see [`crate::binding`]).
    #[error("the bundle's identity keys do not belong to {did}: {reason}")]
    NotTheDidsKeys {
        /// The DID the bundle was fetched for.
        did: String,
        /// Which check failed.
        reason: crate::binding::BindingError,
    },
}

/// Managing local pre-keys failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreKeyError {
    #[error("one-time pre-key id {0} was already used")]
    /// The id is not above every id handed out before.
    IdReused(OneTimeKeyId),
    #[error("one-time pre-key ids are exhausted")]
    /// Every id up to `u32::MAX` was used.
    IdsExhausted,
    #[error("no one-time pre-key with id {0}")]
    /// No one-time key with that id is held.
    Unknown(OneTimeKeyId),
}

/// What an initiator knows of a responder: its public keys, as fetched.
#[derive(Clone, PartialEq, Eq)]
pub struct PreKeyBundle {
    /// The X25519 identity key.
    pub identity_key: X25519PublicKey,
    /// The Ed25519 identity key (signs the signed pre-key; derives the DID).
    pub identity_key_ed: Ed25519PublicKey,
    /// The signed pre-key's id.
    pub signed_pre_key_id: u32,
    /// The signed pre-key.
    pub signed_pre_key: X25519PublicKey,
    /// The Ed25519 signature of the signed pre-key's bytes.
    pub signed_pre_key_signature: [u8; 64],
    /// A one-time pre-key and its id, if the registry had one.
    pub one_time_pre_key: Option<(OneTimeKeyId, X25519PublicKey)>,
}

impl fmt::Debug for PreKeyBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreKeyBundle")
            .field("identity_key", &self.identity_key)
            .field("identity_key_ed", &self.identity_key_ed)
            .field("signed_pre_key_id", &self.signed_pre_key_id)
            .field("signed_pre_key", &self.signed_pre_key)
            .field("one_time_pre_key", &self.one_time_pre_key)
            .finish_non_exhaustive()
    }
}

fn fixed<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N], BundleError> {
    bytes.try_into().map_err(|_| BundleError::Length {
        field,
        expected: N,
        actual: bytes.len(),
    })
}

fn decode_fixed<const N: usize>(field: &'static str, text: &str) -> Result<[u8; N], BundleError> {
    let bytes = b64_decode(text).map_err(|_| BundleError::Encoding { field })?;
    fixed(field, &bytes)
}

#[derive(Deserialize)]
struct WireBundle {
    identity_key: String,
    identity_key_ed: Option<String>,
    signed_pre_key: WireSignedPreKey,
    #[serde(default)]
    one_time_pre_key: Option<WireOneTimeKey>,
}

#[derive(Deserialize)]
struct WireSignedPreKey {
    key_id: u32,
    public_key: String,
    signature: String,
}

#[derive(Deserialize)]
struct WireOneTimeKey {
    key_id: u32,
    public_key: String,
}

impl PreKeyBundle {
    /// Builds a bundle from raw byte fields, checking every length.
    pub fn from_parts(
        identity_key: &[u8],
        identity_key_ed: &[u8],
        signed_pre_key_id: u32,
        signed_pre_key: &[u8],
        signed_pre_key_signature: &[u8],
        one_time_pre_key: Option<(OneTimeKeyId, &[u8])>,
    ) -> Result<Self, BundleError> {
        Ok(Self {
            identity_key: X25519PublicKey::from_bytes(fixed("identity_key", identity_key)?),
            identity_key_ed: Ed25519PublicKey::from_bytes(fixed("identity_key_ed", identity_key_ed)?),
            signed_pre_key_id,
            signed_pre_key: X25519PublicKey::from_bytes(fixed("signed_pre_key", signed_pre_key)?),
            signed_pre_key_signature: fixed("signed_pre_key_signature", signed_pre_key_signature)?,
            one_time_pre_key: match one_time_pre_key {
                Some((id, key)) => Some((id, X25519PublicKey::from_bytes(fixed("one_time_pre_key", key)?))),
                None => None,
            },
        })
    }

    /// Parses the registry's bundle JSON (`GET /v1/agents/{did}/prekeys`):
    /// base64 in either alphabet, `one_time_pre_key` null or absent for 3-DH.
    pub fn from_json(text: &str) -> Result<Self, BundleError> {
        let wire: WireBundle = serde_json::from_str(text).map_err(|e| BundleError::Json(e.to_string()))?;
        let identity_key_ed = wire.identity_key_ed.ok_or(BundleError::MissingSigningKey)?;
        Ok(Self {
            identity_key: X25519PublicKey::from_bytes(decode_fixed("identity_key", &wire.identity_key)?),
            identity_key_ed: Ed25519PublicKey::from_bytes(decode_fixed("identity_key_ed", &identity_key_ed)?),
            signed_pre_key_id: wire.signed_pre_key.key_id,
            signed_pre_key: X25519PublicKey::from_bytes(decode_fixed(
                "signed_pre_key",
                &wire.signed_pre_key.public_key,
            )?),
            signed_pre_key_signature: decode_fixed("signed_pre_key_signature", &wire.signed_pre_key.signature)?,
            one_time_pre_key: match wire.one_time_pre_key {
                Some(otk) => Some((
                    otk.key_id,
                    X25519PublicKey::from_bytes(decode_fixed("one_time_pre_key", &otk.public_key)?),
                )),
                None => None,
            },
        })
    }

    /// The registry's bundle JSON, base64url without padding.
    pub fn to_json(&self) -> String {
        let otk = match &self.one_time_pre_key {
            Some((id, key)) => {
                serde_json::json!({"key_id": id, "public_key": b64_url(key.as_bytes())})
            }
            None => serde_json::Value::Null,
        };
        serde_json::json!({
            "identity_key": b64_url(self.identity_key.as_bytes()),
            "identity_key_ed": b64_url(self.identity_key_ed.as_bytes()),
            "signed_pre_key": {
                "key_id": self.signed_pre_key_id,
                "public_key": b64_url(self.signed_pre_key.as_bytes()),
                "signature": b64_url(&self.signed_pre_key_signature),
            },
            "one_time_pre_key": otk,
        })
        .to_string()
    }

    /// Checks that the bundle speaks for `did` (the Ed25519 key derives it
    /// and the X25519 identity key is that key's Montgomery image) and that
    /// the signed pre-key signature verifies under that key. Use this, not
    /// [`PreKeyBundle::verify`], before opening a session to `did`.
    pub fn verify_for(&self, did: &crate::Did) -> Result<(), BundleError> {
        crate::binding::check_identity_keys(did, &self.identity_key_ed, &self.identity_key).map_err(|reason| {
            match reason {
                crate::binding::BindingError::InvalidEd25519Key => BundleError::InvalidSigningKey,
                _ => BundleError::NotTheDidsKeys {
                    did: did.to_string(),
                    reason,
                },
            }
        })?;
        self.verify()
    }

    /// Checks the signed pre-key signature against the Ed25519 identity key
    /// only; it says nothing of whose keys these are (see
    /// [`PreKeyBundle::verify_for`]).
    pub fn verify(&self) -> Result<(), BundleError> {
        verify_signature(
            &self.identity_key_ed,
            self.signed_pre_key.as_bytes(),
            &self.signed_pre_key_signature,
        )
        .map_err(|e| match e {
            SignatureError::InvalidKey => BundleError::InvalidSigningKey,
            SignatureError::InvalidLength(_) | SignatureError::Mismatch => BundleError::BadSignature,
        })
    }
}

/// A signed pre-key with its id and signature.
#[derive(Clone)]
pub struct SignedPreKey {
    /// Its id (sent in bundles).
    pub id: u32,
    /// The key pair (secret).
    pub pair: KeyPair,
    /// The identity's Ed25519 signature of the public key.
    pub signature: [u8; 64],
}

impl fmt::Debug for SignedPreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedPreKey")
            .field("id", &self.id)
            .field("pair", &self.pair)
            .finish_non_exhaustive()
    }
}

/// A responder's private pre-key material.
///
/// One-time pre-key ids only ever increase, so an id is never reused even
/// after its key was consumed. A one-time key is removed only by
/// [`PreKeys::remove_one_time_key`], which [`crate::SecureChannel::accept`]
/// calls once the first message of the session decrypted.
///
/// The signed pre-key rotates ([`PreKeys::rotate_signed_pre_key`]); the
/// previous one is kept ([`PreKeys::previous_signed_pre_key`]) until
/// [`PreKeys::forget_expired_signed_pre_key`] drops it, so that sessions
/// initiated from a bundle fetched before the rotation still establish (AGT
/// spec section 6.2: rotate every 7 days, keep the previous key 14 days).
///
/// ```
/// use meshwire_proto::{Identity, PreKeyBundle, PreKeys};
/// use rand_core::OsRng;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bob = Identity::generate(&mut OsRng);
/// let mut keys = PreKeys::generate(&mut OsRng, &bob);
/// let ids = keys.generate_one_time_keys(&mut OsRng, 3)?;
/// assert_eq!(keys.one_time_key_count(), 3);
///
/// // What the registry serves: public keys only, signed pre-key signed by Bob.
/// let bundle = keys.bundle(&bob, Some(ids[0]));
/// let served = PreKeyBundle::from_json(&bundle.to_json())?;
/// served.verify_for(bob.did())?;
/// assert!(served.verify_for(Identity::generate(&mut OsRng).did()).is_err());
///
/// // The private half persists as JSON (a zeroizing secret) and comes back
/// // only under the identity that signed it.
/// let saved = keys.export_json();
/// let restored = PreKeys::import_json(&bob, &saved)?;
/// assert_eq!(restored.one_time_key_ids().collect::<Vec<_>>(), ids);
/// assert!(PreKeys::import_json(&Identity::generate(&mut OsRng), &saved).is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PreKeys {
    signed: SignedPreKey,
    /// When the current signed pre-key was made (ms since the epoch; 0 when
    /// unknown, for keys made by [`PreKeys::generate`] or older state).
    signed_created_ms: u64,
    /// The signed pre-key before the last rotation, with the time it was
    /// retired.
    previous: Option<(SignedPreKey, u64)>,
    one_time: BTreeMap<OneTimeKeyId, KeyPair>,
    next_one_time_id: OneTimeKeyId,
}

/// How often a client rotates its signed pre-key by default (7 days).
pub const SIGNED_PRE_KEY_ROTATION_MS: u64 = 7 * 24 * 3600 * 1000;
/// How long the previous signed pre-key is kept after a rotation by default
/// (14 days), for sessions initiated from older bundles.
pub const SIGNED_PRE_KEY_GRACE_MS: u64 = 14 * 24 * 3600 * 1000;

impl fmt::Debug for PreKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreKeys")
            .field("signed", &self.signed)
            .field("signed_created_ms", &self.signed_created_ms)
            .field("previous", &self.previous.as_ref().map(|(k, at)| (k.id, at)))
            .field("one_time_ids", &self.one_time.keys().collect::<Vec<_>>())
            .field("next_one_time_id", &self.next_one_time_id)
            .finish()
    }
}

impl PreKeys {
    /// Draws a signed pre-key (id 0) and signs it with `identity`.
    pub fn generate(rng: &mut impl CryptoRngCore, identity: &Identity) -> Self {
        Self::with_signed_pre_key(identity, 0, X25519Secret::generate(rng))
    }

    /// Uses a known signed pre-key secret.
    pub fn with_signed_pre_key(identity: &Identity, id: u32, secret: X25519Secret) -> Self {
        let pair = KeyPair::from_secret(secret);
        let signature = identity.sign(pair.public().as_bytes());
        Self {
            signed: SignedPreKey { id, pair, signature },
            signed_created_ms: 0,
            previous: None,
            one_time: BTreeMap::new(),
            next_one_time_id: 0,
        }
    }

    /// Records when the current signed pre-key was made (ms since the
    /// epoch), for [`PreKeys::signed_pre_key_rotation_due`].
    pub fn set_signed_pre_key_created_ms(&mut self, now_ms: u64) {
        self.signed_created_ms = now_ms;
    }

    /// When the current signed pre-key was made (0: unknown).
    pub fn signed_pre_key_created_ms(&self) -> u64 {
        self.signed_created_ms
    }

    /// Whether the signed pre-key is older than `interval_ms` at `now_ms`
    /// (always true when its age is unknown).
    pub fn signed_pre_key_rotation_due(&self, now_ms: u64, interval_ms: u64) -> bool {
        self.signed_created_ms == 0 || now_ms.saturating_sub(self.signed_created_ms) >= interval_ms
    }

    /// Replaces the signed pre-key with a new one (32 bytes of `rng`, id one
    /// more than the current one's) made at `now_ms`, keeping the current
    /// one as the previous key; returns the new id. Upload the new bundle
    /// afterwards.
    pub fn rotate_signed_pre_key(&mut self, rng: &mut impl CryptoRngCore, identity: &Identity, now_ms: u64) -> u32 {
        let id = self.signed.id.wrapping_add(1);
        let pair = KeyPair::from_secret(X25519Secret::generate(rng));
        let signature = identity.sign(pair.public().as_bytes());
        let old = std::mem::replace(&mut self.signed, SignedPreKey { id, pair, signature });
        self.previous = Some((old, now_ms));
        self.signed_created_ms = now_ms;
        id
    }

    /// The signed pre-key before the last rotation, while it is kept.
    pub fn previous_signed_pre_key(&self) -> Option<&SignedPreKey> {
        self.previous.as_ref().map(|(key, _)| key)
    }

    /// Drops the previous signed pre-key once it was retired `grace_ms` ago
    /// or longer; returns whether it did.
    pub fn forget_expired_signed_pre_key(&mut self, now_ms: u64, grace_ms: u64) -> bool {
        let expired = self
            .previous
            .as_ref()
            .is_some_and(|(_, retired)| now_ms.saturating_sub(*retired) >= grace_ms);
        if expired {
            self.previous = None;
        }
        expired
    }

    /// How many one-time keys are held.
    pub fn one_time_key_count(&self) -> usize {
        self.one_time.len()
    }

    /// Draws `count` one-time pre-keys with fresh ids and returns the ids.
    pub fn generate_one_time_keys(
        &mut self,
        rng: &mut impl CryptoRngCore,
        count: usize,
    ) -> Result<Vec<OneTimeKeyId>, PreKeyError> {
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            let id = self.next_one_time_id;
            self.add_one_time_key(id, X25519Secret::generate(rng))?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// Adds a known one-time key secret under `id`, which must be greater
    /// than every id handed out before.
    pub fn add_one_time_key(&mut self, id: OneTimeKeyId, secret: X25519Secret) -> Result<(), PreKeyError> {
        if id < self.next_one_time_id {
            return Err(PreKeyError::IdReused(id));
        }
        self.next_one_time_id = id.checked_add(1).ok_or(PreKeyError::IdsExhausted)?;
        self.one_time.insert(id, KeyPair::from_secret(secret));
        Ok(())
    }

    /// Forgets a one-time key once a session established with it.
    pub fn remove_one_time_key(&mut self, id: OneTimeKeyId) -> Result<(), PreKeyError> {
        self.one_time.remove(&id).map(drop).ok_or(PreKeyError::Unknown(id))
    }

    /// The current signed pre-key.
    pub fn signed_pre_key(&self) -> &SignedPreKey {
        &self.signed
    }

    /// The one-time key `id`, if still held.
    pub fn one_time_key(&self, id: OneTimeKeyId) -> Option<&KeyPair> {
        self.one_time.get(&id)
    }

    /// Ids of the one-time keys still held, ascending.
    pub fn one_time_key_ids(&self) -> impl Iterator<Item = OneTimeKeyId> + '_ {
        self.one_time.keys().copied()
    }

    /// The id the next generated one-time key gets.
    pub fn next_one_time_id(&self) -> OneTimeKeyId {
        self.next_one_time_id
    }

    /// The public bundle, with the one-time key `otk` if it is still held.
    pub fn bundle(&self, identity: &Identity, otk: Option<OneTimeKeyId>) -> PreKeyBundle {
        PreKeyBundle {
            identity_key: *identity.x25519_public(),
            identity_key_ed: identity.ed25519_public(),
            signed_pre_key_id: self.signed.id,
            signed_pre_key: *self.signed.pair.public(),
            signed_pre_key_signature: self.signed.signature,
            one_time_pre_key: otk.and_then(|id| self.one_time.get(&id).map(|pair| (id, *pair.public()))),
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PreKeysJson {
    signed_pre_key_id: u32,
    signed_pre_key_private: String,
    signed_pre_key_signature: String,
    #[serde(default)]
    signed_pre_key_created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_signed_pre_key: Option<PreviousJson>,
    one_time_pre_keys: Vec<(OneTimeKeyId, String)>,
    next_one_time_id: OneTimeKeyId,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PreviousJson {
    id: u32,
    private: String,
    signature: String,
    retired_ms: u64,
}

impl Drop for PreviousJson {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.private.zeroize();
    }
}

impl Drop for PreKeysJson {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.signed_pre_key_private.zeroize();
        for (_, key) in &mut self.one_time_pre_keys {
            key.zeroize();
        }
    }
}

impl PreKeys {
    /// The private pre-key material as JSON, for persistence (secret).
    pub fn export_json(&self) -> zeroize::Zeroizing<String> {
        let json = PreKeysJson {
            signed_pre_key_id: self.signed.id,
            signed_pre_key_private: hex::encode(self.signed.pair.secret().as_bytes()),
            signed_pre_key_signature: hex::encode(self.signed.signature),
            signed_pre_key_created_ms: self.signed_created_ms,
            previous_signed_pre_key: self.previous.as_ref().map(|(key, retired_ms)| PreviousJson {
                id: key.id,
                private: hex::encode(key.pair.secret().as_bytes()),
                signature: hex::encode(key.signature),
                retired_ms: *retired_ms,
            }),
            one_time_pre_keys: self
                .one_time
                .iter()
                .map(|(id, k)| (*id, hex::encode(k.secret().as_bytes())))
                .collect(),
            next_one_time_id: self.next_one_time_id,
        };
        crate::state::to_json_text(&json)
    }

    /// The inverse of [`PreKeys::export_json`]; the signature is checked
    /// against `identity`.
    pub fn import_json(identity: &Identity, text: &str) -> Result<Self, crate::StateError> {
        use crate::encoding::hex_decode_array;
        use crate::StateError;
        let json: PreKeysJson = serde_json::from_str(text).map_err(|e| StateError::Json(e.to_string()))?;
        let secret = hex_decode_array::<32>(&json.signed_pre_key_private)
            .map_err(|_| StateError::InvalidKey("signed_pre_key_private"))?;
        let mut keys = Self::with_signed_pre_key(identity, json.signed_pre_key_id, X25519Secret::from_bytes(secret));
        let signature = hex_decode_array::<64>(&json.signed_pre_key_signature)
            .map_err(|_| StateError::InvalidKey("signed_pre_key_signature"))?;
        if signature != keys.signed.signature {
            return Err(StateError::KeyPairMismatch);
        }
        keys.signed_created_ms = json.signed_pre_key_created_ms;
        if let Some(previous) = &json.previous_signed_pre_key {
            let secret = hex_decode_array::<32>(&previous.private)
                .map_err(|_| StateError::InvalidKey("previous_signed_pre_key.private"))?;
            let pair = KeyPair::from_secret(X25519Secret::from_bytes(secret));
            let signature = identity.sign(pair.public().as_bytes());
            let stored = hex_decode_array::<64>(&previous.signature)
                .map_err(|_| StateError::InvalidKey("previous_signed_pre_key.signature"))?;
            if stored != signature {
                return Err(StateError::KeyPairMismatch);
            }
            keys.previous = Some((
                SignedPreKey {
                    id: previous.id,
                    pair,
                    signature,
                },
                previous.retired_ms,
            ));
        }
        for (id, key) in &json.one_time_pre_keys {
            let secret = hex_decode_array::<32>(key).map_err(|_| StateError::InvalidKey("one_time_pre_keys"))?;
            keys.add_one_time_key(*id, X25519Secret::from_bytes(secret))
                .map_err(|_| StateError::InvalidKey("one_time_pre_keys"))?;
        }
        if json.next_one_time_id < keys.next_one_time_id {
            return Err(StateError::InvalidKey("next_one_time_id"));
        }
        keys.next_one_time_id = json.next_one_time_id;
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    #[test]
    fn export_import_round_trip() {
        let (id, mut keys, _) = sample();
        keys.remove_one_time_key(0).unwrap();
        let text = keys.export_json();
        let back = PreKeys::import_json(&id, &text).unwrap();
        assert_eq!(*back.export_json(), *text);
        assert_eq!(back.next_one_time_id(), 2);
        let other = Identity::from_seed(&[1u8; 32]);
        assert!(PreKeys::import_json(&other, &text).is_err());
        assert!(PreKeys::import_json(&id, "{}").is_err());
    }

    fn sample() -> (Identity, PreKeys, PreKeyBundle) {
        let id = Identity::from_seed(&[9u8; 32]);
        let mut keys = PreKeys::generate(&mut OsRng, &id);
        let ids = keys.generate_one_time_keys(&mut OsRng, 2).unwrap();
        let bundle = keys.bundle(&id, Some(ids[1]));
        (id, keys, bundle)
    }

    #[test]
    fn bundle_json_round_trip_and_verify() {
        let (_, _, bundle) = sample();
        let parsed = PreKeyBundle::from_json(&bundle.to_json()).unwrap();
        assert_eq!(parsed, bundle);
        parsed.verify().unwrap();
        assert_eq!(parsed.one_time_pre_key.unwrap().0, 1);
    }

    #[test]
    fn bundle_errors_are_typed() {
        let (_, _, bundle) = sample();
        let mut forged = bundle.clone();
        forged.signed_pre_key_signature[0] ^= 1;
        assert_eq!(forged.verify(), Err(BundleError::BadSignature));
        let mut other_spk = bundle.clone();
        other_spk.signed_pre_key = bundle.identity_key;
        assert_eq!(other_spk.verify(), Err(BundleError::BadSignature));

        let mut value: serde_json::Value = serde_json::from_str(&bundle.to_json()).unwrap();
        value["signed_pre_key"]["public_key"] = "AAAA".into();
        assert_eq!(
            PreKeyBundle::from_json(&value.to_string()),
            Err(BundleError::Length {
                field: "signed_pre_key",
                expected: 32,
                actual: 3
            })
        );
        value["signed_pre_key"]["public_key"] = "!!".into();
        assert_eq!(
            PreKeyBundle::from_json(&value.to_string()),
            Err(BundleError::Encoding {
                field: "signed_pre_key"
            })
        );
        value["identity_key_ed"] = serde_json::Value::Null;
        assert_eq!(
            PreKeyBundle::from_json(&value.to_string()),
            Err(BundleError::MissingSigningKey)
        );
        assert!(matches!(PreKeyBundle::from_json("{"), Err(BundleError::Json(_))));
        assert!(matches!(
            PreKeyBundle::from_parts(&[0; 32], &[0; 31], 0, &[0; 32], &[0; 64], None),
            Err(BundleError::Length {
                field: "identity_key_ed",
                expected: 32,
                actual: 31
            })
        ));
        assert!(matches!(
            PreKeyBundle::from_parts(&[0; 32], &[0; 32], 0, &[0; 32], &[0; 63], None),
            Err(BundleError::Length {
                field: "signed_pre_key_signature",
                ..
            })
        ));
        assert!(matches!(
            PreKeyBundle::from_parts(&[0; 32], &[0; 32], 0, &[0; 32], &[0; 64], Some((1, &[0; 33]))),
            Err(BundleError::Length {
                field: "one_time_pre_key",
                ..
            })
        ));
    }

    #[test]
    fn signed_pre_key_rotation_keeps_the_previous_key_for_the_grace_period() {
        let (id, mut keys, old_bundle) = sample();
        assert!(keys.signed_pre_key_rotation_due(1_000, SIGNED_PRE_KEY_ROTATION_MS));
        keys.set_signed_pre_key_created_ms(1_000);
        assert!(!keys.signed_pre_key_rotation_due(1_000 + SIGNED_PRE_KEY_ROTATION_MS - 1, SIGNED_PRE_KEY_ROTATION_MS));
        let now = 1_000 + SIGNED_PRE_KEY_ROTATION_MS;
        assert!(keys.signed_pre_key_rotation_due(now, SIGNED_PRE_KEY_ROTATION_MS));
        assert_eq!(keys.rotate_signed_pre_key(&mut OsRng, &id, now), 1);
        let new_bundle = keys.bundle(&id, None);
        assert_eq!(new_bundle.signed_pre_key_id, 1);
        assert_ne!(new_bundle.signed_pre_key, old_bundle.signed_pre_key);
        new_bundle.verify_for(id.did()).unwrap();
        assert_eq!(
            keys.previous_signed_pre_key().map(|k| *k.pair.public()),
            Some(old_bundle.signed_pre_key)
        );
        assert_eq!(keys.signed_pre_key_created_ms(), now);
        // Both survive export/import; the previous key's signature is checked.
        let text = keys.export_json();
        let back = PreKeys::import_json(&id, &text).unwrap();
        assert_eq!(*back.export_json(), *text);
        assert!(PreKeys::import_json(&Identity::from_seed(&[1; 32]), &text).is_err());
        assert!(!keys.forget_expired_signed_pre_key(now + SIGNED_PRE_KEY_GRACE_MS - 1, SIGNED_PRE_KEY_GRACE_MS));
        assert!(keys.previous_signed_pre_key().is_some());
        assert!(keys.forget_expired_signed_pre_key(now + SIGNED_PRE_KEY_GRACE_MS, SIGNED_PRE_KEY_GRACE_MS));
        assert!(keys.previous_signed_pre_key().is_none());
        // State written before rotation existed still imports.
        let legacy = r#"{"signed_pre_key_id":0,"signed_pre_key_private":"PRIV","signed_pre_key_signature":"SIG","one_time_pre_keys":[],"next_one_time_id":0}"#;
        let fresh = PreKeys::with_signed_pre_key(&id, 0, X25519Secret::from_bytes([7; 32]));
        let legacy = legacy
            .replace("PRIV", &hex::encode([7u8; 32]))
            .replace("SIG", &hex::encode(fresh.signed_pre_key().signature));
        let imported = PreKeys::import_json(&id, &legacy).unwrap();
        assert_eq!(imported.signed_pre_key_created_ms(), 0);
        assert!(imported.previous_signed_pre_key().is_none());
    }

    #[test]
    fn a_bundle_must_speak_for_its_did() {
        let (id, keys, bundle) = sample();
        bundle.verify_for(id.did()).unwrap();
        let mallory = Identity::from_seed(&[66; 32]);
        let mallory_keys = PreKeys::generate(&mut OsRng, &mallory);
        // Mallory's own, validly signed bundle served for the victim's DID.
        let forged = mallory_keys.bundle(&mallory, None);
        forged.verify().unwrap();
        assert!(matches!(
            forged.verify_for(id.did()),
            Err(BundleError::NotTheDidsKeys {
                reason: crate::binding::BindingError::DidMismatch,
                ..
            })
        ));
        // The victim's Ed25519 key with Mallory's X25519 identity key.
        let mut mixed = keys.bundle(&id, None);
        mixed.identity_key = *mallory.x25519_public();
        assert!(matches!(
            mixed.verify_for(id.did()),
            Err(BundleError::NotTheDidsKeys {
                reason: crate::binding::BindingError::IdentityKeyMismatch,
                ..
            })
        ));
        // The victim's keys with Mallory's signed pre-key.
        let mut spk = keys.bundle(&id, None);
        spk.signed_pre_key = forged.signed_pre_key;
        spk.signed_pre_key_signature = forged.signed_pre_key_signature;
        assert_eq!(spk.verify_for(id.did()), Err(BundleError::BadSignature));
    }

    #[test]
    fn one_time_ids_are_never_reused() {
        let (_, mut keys, _) = sample();
        keys.remove_one_time_key(1).unwrap();
        assert_eq!(keys.remove_one_time_key(1), Err(PreKeyError::Unknown(1)));
        assert_eq!(keys.generate_one_time_keys(&mut OsRng, 1).unwrap(), vec![2]);
        assert_eq!(
            keys.add_one_time_key(1, X25519Secret::from_bytes([3; 32])),
            Err(PreKeyError::IdReused(1))
        );
        keys.add_one_time_key(10, X25519Secret::from_bytes([3; 32])).unwrap();
        assert_eq!(keys.next_one_time_id(), 11);
        assert_eq!(keys.one_time_key_ids().collect::<Vec<_>>(), vec![0, 2, 10]);
        keys.add_one_time_key(u32::MAX, X25519Secret::from_bytes([3; 32]))
            .unwrap_err();
    }
}
