//! Registry request bodies and paths, byte for byte as the TypeScript client
//! writes them (compact JSON in its field order, base64url without padding).
//! The async client sends these; vector replay compares them.

use crate::auth::registration_proof;
use crate::encoding::b64_url;
use crate::identity::{Did, Identity};
use crate::prekeys::{OneTimeKeyId, PreKeys};
use serde::Serialize;

#[derive(Serialize)]
struct RegisterBody<'a, M: Serialize> {
    public_key: String,
    proof: String,
    proof_timestamp: &'a str,
    capabilities: &'a [String],
    metadata: &'a M,
}

#[derive(Serialize)]
struct LegacyRegisterBody<'a, M: Serialize> {
    did: &'a str,
    public_key: String,
    capabilities: &'a [String],
    metadata: &'a M,
}

#[derive(Serialize)]
struct SignedPreKeyWire {
    key_id: u32,
    public_key: String,
    signature: String,
}

#[derive(Serialize)]
struct OneTimeKeyWire {
    key_id: OneTimeKeyId,
    public_key: String,
}

#[derive(Serialize)]
struct PreKeysBody {
    identity_key: String,
    identity_key_ed: String,
    signed_pre_key: SignedPreKeyWire,
    one_time_pre_keys: Vec<OneTimeKeyWire>,
}

fn text<T: Serialize>(body: &T) -> String {
    serde_json::to_string(body).unwrap_or_default()
}

/// `POST /v1/agents` with proof of possession signed at `timestamp`.
pub fn register_body(
    identity: &Identity,
    timestamp: &str,
    capabilities: &[String],
    metadata: &impl Serialize,
) -> String {
    let (public_key, proof) = registration_proof(identity, timestamp);
    text(&RegisterBody {
        public_key,
        proof,
        proof_timestamp: timestamp,
        capabilities,
        metadata,
    })
}

/// `POST /v1/agents` as npm SDK 4.0.0 sends it: the X25519 identity key and
/// no proof of possession.
pub fn legacy_register_body(identity: &Identity, capabilities: &[String], metadata: &impl Serialize) -> String {
    text(&LegacyRegisterBody {
        did: identity.did().as_str(),
        public_key: b64_url(identity.x25519_public().as_bytes()),
        capabilities,
        metadata,
    })
}

/// `PUT /v1/agents/{did}/prekeys` publishing the signed pre-key and the
/// one-time keys `one_time_ids` (those still held).
pub fn prekeys_body(identity: &Identity, prekeys: &PreKeys, one_time_ids: &[OneTimeKeyId]) -> String {
    let spk = prekeys.signed_pre_key();
    text(&PreKeysBody {
        identity_key: b64_url(identity.x25519_public().as_bytes()),
        identity_key_ed: b64_url(identity.ed25519_public().as_bytes()),
        signed_pre_key: SignedPreKeyWire {
            key_id: spk.id,
            public_key: b64_url(spk.pair.public().as_bytes()),
            signature: b64_url(&spk.signature),
        },
        one_time_pre_keys: one_time_ids
            .iter()
            .filter_map(|id| {
                prekeys.one_time_key(*id).map(|k| OneTimeKeyWire {
                    key_id: *id,
                    public_key: b64_url(k.public().as_bytes()),
                })
            })
            .collect(),
    })
}

/// `encodeURIComponent(did)`.
pub fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `/v1/agents/{did}` with the DID percent-encoded.
pub fn agent_path(did: &Did) -> String {
    format!("/v1/agents/{}", encode_component(did.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_component_matches_javascript() {
        assert_eq!(encode_component("did:mesh:ab12"), "did%3Amesh%3Aab12");
        assert_eq!(encode_component("a b/ü"), "a%20b%2F%C3%BC");
        assert_eq!(encode_component("-_.!~*'()"), "-_.!~*'()");
    }
}
