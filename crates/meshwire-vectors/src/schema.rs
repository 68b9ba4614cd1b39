//! The `agentmesh-golden/1` file format (see SCHEMA.md beside the shared
//! vectors). Byte strings are lowercase hex. Unknown fields are ignored.
//!
//! meshwire's own files use one extension: a decrypt event may carry
//! `expect_error` (and no plaintext): the decrypt must fail with that kind
//! and leave the party's state as it was.

use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "agentmesh-golden/1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Document {
    pub schema: String,
    pub kind: String,
    #[serde(default)]
    pub producer: Option<String>,
    #[serde(default)]
    pub kdf: Option<String>,
    pub cases: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct X3dhCase {
    pub name: String,
    pub alice_ed25519_seed: String,
    pub alice_ed25519_public: String,
    pub alice_x25519_private: String,
    pub alice_x25519_public: String,
    pub bob_ed25519_seed: String,
    pub bob_ed25519_public: String,
    pub bob_x25519_private: String,
    pub bob_x25519_public: String,
    pub bob_spk_id: u32,
    pub bob_spk_private: String,
    pub bob_spk_public: String,
    pub bob_spk_signature: String,
    pub bob_otk_id: Option<u32>,
    pub bob_otk_private: Option<String>,
    pub bob_otk_public: Option<String>,
    pub alice_ephemeral_private: String,
    pub alice_ephemeral_public: String,
    pub dh1: String,
    pub dh2: String,
    pub dh3: String,
    pub dh4: Option<String>,
    pub shared_secret: String,
    pub associated_data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSnapshot {
    pub root_key: String,
    pub chain_key_send: Option<String>,
    pub chain_key_recv: Option<String>,
    pub dh_self_public: String,
    pub dh_remote_public: Option<String>,
    pub n_send: u32,
    pub n_recv: u32,
    pub pn: u32,
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartyStates {
    pub alice: StateSnapshot,
    pub bob: StateSnapshot,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderJson {
    pub dh: String,
    pub pn: u32,
    pub n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub i: usize,
    pub op: String,
    pub party: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_bytes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphertext: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_error: Option<String>,
    #[serde(default)]
    pub generated_ratchet_private: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_after: Option<StateSnapshot>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RatchetCase {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_x3dh: Option<String>,
    pub shared_secret: String,
    pub bob_spk_private: String,
    pub bob_spk_public: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alice_did: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bob_did: Option<String>,
    pub alice_ratchet_0_private: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alice_ratchet_0_public: Option<String>,
    pub associated_data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_state: Option<PartyStates>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayConnect {
    #[serde(rename = "type")]
    pub kind: String,
    pub from: String,
    pub public_key: String,
    pub timestamp: String,
    pub signature: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityCase {
    pub name: String,
    pub ed25519_seed: String,
    pub ed25519_public: String,
    pub x25519_private: String,
    pub x25519_public: String,
    pub did: String,
    pub timestamp: String,
    pub timestamp_signature: String,
    pub authorization: String,
    pub relay_connect: RelayConnect,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_frame_json: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_pending_frame_json: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}
