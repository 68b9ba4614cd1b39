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
    Json(String),
    #[error("{field} is not valid base64")]
    Encoding { field: &'static str },
    #[error("{field} must be {expected} bytes, got {actual}")]
    Length {
        field: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("bundle has no Ed25519 identity key to verify the signed pre-key with")]
    MissingSigningKey,
    #[error("the Ed25519 identity key is not a valid point")]
    InvalidSigningKey,
    #[error("signed pre-key signature does not verify")]
    BadSignature,
}

/// Managing local pre-keys failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreKeyError {
    #[error("one-time pre-key id {0} was already used")]
    IdReused(OneTimeKeyId),
    #[error("one-time pre-key ids are exhausted")]
    IdsExhausted,
    #[error("no one-time pre-key with id {0}")]
    Unknown(OneTimeKeyId),
}

/// What an initiator knows of a responder: its public keys, as fetched.
#[derive(Clone, PartialEq, Eq)]
pub struct PreKeyBundle {
    pub identity_key: X25519PublicKey,
    pub identity_key_ed: Ed25519PublicKey,
    pub signed_pre_key_id: u32,
    pub signed_pre_key: X25519PublicKey,
    pub signed_pre_key_signature: [u8; 64],
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

    /// Checks the signed pre-key signature against the Ed25519 identity key.
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
    pub id: u32,
    pub pair: KeyPair,
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
#[derive(Clone)]
pub struct PreKeys {
    signed: SignedPreKey,
    one_time: BTreeMap<OneTimeKeyId, KeyPair>,
    next_one_time_id: OneTimeKeyId,
}

impl fmt::Debug for PreKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreKeys")
            .field("signed", &self.signed)
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
            one_time: BTreeMap::new(),
            next_one_time_id: 0,
        }
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

    pub fn signed_pre_key(&self) -> &SignedPreKey {
        &self.signed
    }

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
    one_time_pre_keys: Vec<(OneTimeKeyId, String)>,
    next_one_time_id: OneTimeKeyId,
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
            one_time_pre_keys: self
                .one_time
                .iter()
                .map(|(id, k)| (*id, hex::encode(k.secret().as_bytes())))
                .collect(),
            next_one_time_id: self.next_one_time_id,
        };
        zeroize::Zeroizing::new(serde_json::to_string(&json).unwrap_or_default())
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
