//! Session state as JSON, in the shape of the Python `agentmesh` package's
//! `RatchetState.to_dict`, so a session can move between runtimes.
//!
//! A ratchet exports exactly the Python keys (lowercase hex, `null` for
//! absent values, `skipped_keys` as `"<dh hex>:<n>" -> key hex` oldest
//! first). A channel adds its own fields beside them (`associated_data`,
//! `local_identity_key`, `remote_identity_key`, `kdf`), which Python's
//! `from_dict` ignores.

use crate::channel::SecureChannel;
use crate::encoding::hex_decode_array;
use crate::keys::{ChainKey, KeyPair, MessageKey, RootKey, X25519PublicKey, X25519Secret};
use crate::ratchet::{DoubleRatchet, MAX_SKIPPED_KEYS};
use crate::x3dh::KdfDialect;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// Importing session state failed; nothing was created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("state JSON: {0}")]
    /// Not the expected JSON (parser message).
    Json(String),
    #[error("{0} must be 32 bytes of hex")]
    /// A key field is not 32 bytes of hex (the field named).
    InvalidKey(&'static str),
    #[error("skipped key id {0:?} is not \"<64 hex>:<n>\"")]
    /// A skipped-key id is malformed.
    InvalidSkippedKeyId(String),
    #[error("{0} skipped keys, more than {MAX_SKIPPED_KEYS}")]
    /// More skipped keys than the cache holds.
    TooManySkippedKeys(usize),
    #[error("dh_self_public is not the public key of dh_self_private")]
    /// A private key does not match its public key.
    KeyPairMismatch,
    #[error("associated_data is not hex")]
    /// `associated_data` is not hex.
    InvalidAssociatedData,
    #[error("unknown kdf dialect {0:?}")]
    /// The `kdf` field names no known dialect.
    UnknownDialect(String),
}

#[derive(Serialize, Deserialize)]
pub(crate) struct RatchetJson {
    dh_self_private: String,
    dh_self_public: String,
    dh_remote_public: Option<String>,
    root_key: String,
    chain_key_send: Option<String>,
    chain_key_recv: Option<String>,
    send_message_number: u32,
    recv_message_number: u32,
    previous_send_chain_length: u32,
    #[serde(default)]
    skipped_keys: IndexMap<String, String>,
}

impl Drop for RatchetJson {
    fn drop(&mut self) {
        self.dh_self_private.zeroize();
        self.root_key.zeroize();
        self.chain_key_send.zeroize();
        self.chain_key_recv.zeroize();
        for value in self.skipped_keys.values_mut() {
            value.zeroize();
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ChannelJson {
    #[serde(flatten)]
    ratchet: RatchetJson,
    associated_data: String,
    local_identity_key: String,
    remote_identity_key: String,
    kdf: String,
}

fn key32(field: &'static str, text: &str) -> Result<[u8; 32], StateError> {
    hex_decode_array::<32>(text).map_err(|_| StateError::InvalidKey(field))
}

fn opt_key32(field: &'static str, text: &Option<String>) -> Result<Option<[u8; 32]>, StateError> {
    text.as_deref().map(|t| key32(field, t)).transpose()
}

/// Serializes `value` into a buffer sized exactly once, so no reallocation
/// leaves a stray copy of secret text behind; the result zeroizes on drop.
pub(crate) fn to_json_text<T: Serialize>(value: &T) -> Zeroizing<String> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serializing plain structs of strings and numbers cannot fail.
    if serde_json::to_writer(&mut count, value).is_err() {
        return Zeroizing::new(String::new());
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(count.0));
    if serde_json::to_writer(&mut *bytes, value).is_err() {
        return Zeroizing::new(String::new());
    }
    let bytes = std::mem::take(&mut *bytes);
    // serde_json writes UTF-8 only.
    Zeroizing::new(String::from_utf8(bytes).unwrap_or_else(|e| {
        let mut bytes = e.into_bytes();
        bytes.zeroize();
        String::new()
    }))
}

impl DoubleRatchet {
    pub(crate) fn to_json_struct(&self) -> RatchetJson {
        RatchetJson {
            dh_self_private: hex::encode(self.dh_self.secret().as_bytes()),
            dh_self_public: self.dh_self.public().to_hex(),
            dh_remote_public: self.dh_remote.map(|k| k.to_hex()),
            root_key: hex::encode(self.root_key.as_bytes()),
            chain_key_send: self.chain_send.as_ref().map(|k| hex::encode(k.as_bytes())),
            chain_key_recv: self.chain_recv.as_ref().map(|k| hex::encode(k.as_bytes())),
            send_message_number: self.n_send,
            recv_message_number: self.n_recv,
            previous_send_chain_length: self.pn,
            skipped_keys: self
                .skipped
                .iter()
                .map(|((dh, n), mk)| (format!("{}:{n}", dh.to_hex()), hex::encode(mk.as_bytes())))
                .collect(),
        }
    }

    pub(crate) fn from_json_struct(json: &RatchetJson) -> Result<Self, StateError> {
        if json.skipped_keys.len() > MAX_SKIPPED_KEYS {
            return Err(StateError::TooManySkippedKeys(json.skipped_keys.len()));
        }
        let secret = X25519Secret::from_bytes(key32("dh_self_private", &json.dh_self_private)?);
        let public = X25519PublicKey::from_bytes(key32("dh_self_public", &json.dh_self_public)?);
        if secret.public_key() != public {
            return Err(StateError::KeyPairMismatch);
        }
        let mut skipped = IndexMap::with_capacity(json.skipped_keys.len());
        for (id, key) in &json.skipped_keys {
            let bad_id = || StateError::InvalidSkippedKeyId(id.clone());
            let (dh, n) = id.rsplit_once(':').ok_or_else(bad_id)?;
            let dh = hex_decode_array::<32>(dh).map_err(|_| bad_id())?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad_id());
            }
            let n: u32 = n.parse().map_err(|_| bad_id())?;
            skipped.insert(
                (X25519PublicKey::from_bytes(dh), n),
                MessageKey::from_bytes(key32("skipped_keys", key)?),
            );
        }
        Ok(Self {
            dh_self: KeyPair::from_parts(secret, public),
            dh_remote: opt_key32("dh_remote_public", &json.dh_remote_public)?.map(X25519PublicKey::from_bytes),
            root_key: RootKey::from_bytes(key32("root_key", &json.root_key)?),
            chain_send: opt_key32("chain_key_send", &json.chain_key_send)?.map(ChainKey::from_bytes),
            chain_recv: opt_key32("chain_key_recv", &json.chain_key_recv)?.map(ChainKey::from_bytes),
            n_send: json.send_message_number,
            n_recv: json.recv_message_number,
            pn: json.previous_send_chain_length,
            skipped,
        })
    }

    /// The state as JSON, in `RatchetState.to_dict` shape (contains secrets).
    pub fn export_state(&self) -> Zeroizing<String> {
        to_json_text(&self.to_json_struct())
    }

    /// The inverse of [`DoubleRatchet::export_state`]; also reads what the
    /// Python package's `to_dict` writes.
    pub fn import_state(text: &str) -> Result<Self, StateError> {
        let json: RatchetJson = serde_json::from_str(text).map_err(|e| StateError::Json(e.to_string()))?;
        Self::from_json_struct(&json)
    }
}

impl SecureChannel {
    /// The channel as JSON: the ratchet's `RatchetState.to_dict` keys plus
    /// the channel's own (contains secrets).
    pub fn export_state(&self) -> Zeroizing<String> {
        to_json_text(&ChannelJson {
            ratchet: self.ratchet().to_json_struct(),
            associated_data: hex::encode(self.associated_data()),
            local_identity_key: self.local_identity_key().to_hex(),
            remote_identity_key: self.remote_identity_key().to_hex(),
            kdf: self.dialect().as_str().to_owned(),
        })
    }

    /// The inverse of [`SecureChannel::export_state`].
    pub fn import_state(text: &str) -> Result<Self, StateError> {
        let json: ChannelJson = serde_json::from_str(text).map_err(|e| StateError::Json(e.to_string()))?;
        let ratchet = DoubleRatchet::from_json_struct(&json.ratchet)?;
        let associated_data = hex::decode(&json.associated_data).map_err(|_| StateError::InvalidAssociatedData)?;
        let local = X25519PublicKey::from_bytes(key32("local_identity_key", &json.local_identity_key)?);
        let remote = X25519PublicKey::from_bytes(key32("remote_identity_key", &json.remote_identity_key)?);
        let dialect: KdfDialect = json
            .kdf
            .parse()
            .map_err(|_| StateError::UnknownDialect(json.kdf.clone()))?;
        Ok(SecureChannel::from_parts(
            ratchet,
            associated_data,
            local,
            remote,
            dialect,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SharedSecret;
    use rand_core::OsRng;

    fn busy_ratchets() -> (DoubleRatchet, DoubleRatchet) {
        let ss = SharedSecret::from_bytes([1u8; 32]);
        let spk = KeyPair::generate(&mut OsRng);
        let mut a = DoubleRatchet::init_sender(&mut OsRng, &ss, spk.public()).unwrap();
        let mut b = DoubleRatchet::init_receiver(&ss, spk);
        let msgs: Vec<_> = (0..4).map(|_| a.encrypt(&mut OsRng, b"x", b"").unwrap()).collect();
        b.decrypt(&mut OsRng, &msgs[3], b"").unwrap();
        (a, b)
    }

    #[test]
    fn round_trip_is_exact_and_python_shaped() {
        let (a, b) = busy_ratchets();
        for r in [&a, &b] {
            let text = r.export_state();
            let back = DoubleRatchet::import_state(&text).unwrap();
            assert!(back == *r);
            assert_eq!(*back.export_state(), *text);
        }
        let value: serde_json::Value = serde_json::from_str(&b.export_state()).unwrap();
        let keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
        let mut expected = vec![
            "dh_self_private",
            "dh_self_public",
            "dh_remote_public",
            "root_key",
            "chain_key_send",
            "chain_key_recv",
            "send_message_number",
            "recv_message_number",
            "previous_send_chain_length",
            "skipped_keys",
        ];
        expected.sort();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort();
        assert_eq!(keys_sorted, expected);
        assert_eq!(value["skipped_keys"].as_object().unwrap().len(), 3);
        let a_value: serde_json::Value = serde_json::from_str(&a.export_state()).unwrap();
        assert!(a_value["chain_key_recv"].is_null());
    }

    #[test]
    fn malformed_state_is_a_typed_error() {
        let (_, b) = busy_ratchets();
        let good: serde_json::Value = serde_json::from_str(&b.export_state()).unwrap();
        let mutate = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            f(&mut v);
            DoubleRatchet::import_state(&v.to_string()).unwrap_err()
        };
        assert_eq!(
            mutate(&|v| v["root_key"] = "00".into()),
            StateError::InvalidKey("root_key")
        );
        assert_eq!(
            mutate(&|v| v["chain_key_send"] = "zz".repeat(32).into()),
            StateError::InvalidKey("chain_key_send")
        );
        assert!(matches!(
            mutate(&|v| v["send_message_number"] = (-1).into()),
            StateError::Json(_)
        ));
        assert!(matches!(
            mutate(&|v| v["recv_message_number"] = 4294967296u64.into()),
            StateError::Json(_)
        ));
        assert!(matches!(
            mutate(&|v| {
                v.as_object_mut().unwrap().remove("root_key");
            }),
            StateError::Json(_)
        ));
        assert_eq!(
            mutate(&|v| v["dh_self_public"] = "11".repeat(32).into()),
            StateError::KeyPairMismatch
        );
        let bad_ids = [
            "nocolon",
            "aa:1",
            &format!("{}:-1", "aa".repeat(32)),
            &format!("{}:+1", "aa".repeat(32)),
            &format!("{}:", "aa".repeat(32)),
        ];
        for id in bad_ids {
            let id = id.to_string();
            assert_eq!(
                mutate(&|v| {
                    v["skipped_keys"] = serde_json::json!({ id.clone(): "00".repeat(32) });
                }),
                StateError::InvalidSkippedKeyId(id.clone())
            );
        }
        let many: serde_json::Map<String, serde_json::Value> = (0..2001)
            .map(|i| (format!("{}:{i}", "aa".repeat(32)), "00".repeat(32).into()))
            .collect();
        assert_eq!(
            mutate(&|v| v["skipped_keys"] = many.clone().into()),
            StateError::TooManySkippedKeys(2001)
        );
        assert!(matches!(DoubleRatchet::import_state("[]"), Err(StateError::Json(_))));
    }
}
