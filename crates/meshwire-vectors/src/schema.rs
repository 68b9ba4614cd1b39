//! The `agentmesh-golden/1` file format (see SCHEMA.md beside the shared
//! vectors). Byte strings are lowercase hex. Unknown fields are ignored.
//!
//! meshwire's own files use one extension: a decrypt event may carry
//! `expect_error` (and no plaintext): the decrypt must fail with that kind
//! and leave the party's state as it was.

use serde::{Deserialize, Serialize};

/// The value every file's `schema` field must hold.
pub const SCHEMA: &str = "agentmesh-golden/1";

/// One vector file: a header and its cases, which are parsed by `kind`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Document {
    /// Schema identifier; must equal [`SCHEMA`] or the file is refused.
    pub schema: String,
    /// Which case type `cases` holds: `"x3dh"`, `"ratchet"`, `"identity"` or
    /// `"mesh-session"`; any other value refuses the file.
    pub kind: String,
    /// Free text naming the runtime and package version that produced the file.
    #[serde(default)]
    pub producer: Option<String>,
    /// X3DH KDF dialect the cases use: `"spec"` (also when absent) or
    /// `"legacy-ff-salt"` (published TypeScript SDK 4.0.0, older Python).
    #[serde(default)]
    pub kdf: Option<String>,
    /// The cases, kept as raw JSON so that a case which does not match its
    /// kind's shape fails alone instead of refusing the whole file.
    pub cases: Vec<serde_json::Value>,
}

/// A `kind = "x3dh"` case: Alice initiates X3DH to Bob's pre-key bundle.
///
/// Every byte field is lowercase hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct X3dhCase {
    /// Case name; its labelled inputs are `agentmesh-golden/<name>/<role>`.
    pub name: String,
    /// Alice's Ed25519 secret seed (RFC 8032, 32 bytes).
    pub alice_ed25519_seed: String,
    /// Alice's Ed25519 public key (32 bytes).
    pub alice_ed25519_public: String,
    /// Alice's X25519 identity private key, `sha512(seed)[0..32]` clamped (32 bytes).
    pub alice_x25519_private: String,
    /// Alice's X25519 identity public key, `IK_a` (32 bytes).
    pub alice_x25519_public: String,
    /// Bob's Ed25519 secret seed (RFC 8032, 32 bytes).
    pub bob_ed25519_seed: String,
    /// Bob's Ed25519 public key (32 bytes).
    pub bob_ed25519_public: String,
    /// Bob's X25519 identity private key, `sha512(seed)[0..32]` clamped (32 bytes).
    pub bob_x25519_private: String,
    /// Bob's X25519 identity public key, `IK_b` (32 bytes).
    pub bob_x25519_public: String,
    /// Id of Bob's signed pre-key.
    pub bob_spk_id: u32,
    /// Bob's signed pre-key, X25519 private (32 bytes).
    pub bob_spk_private: String,
    /// Bob's signed pre-key, X25519 public (32 bytes).
    pub bob_spk_public: String,
    /// Ed25519 signature by Bob's identity over the 32 raw SPK public bytes (64 bytes).
    pub bob_spk_signature: String,
    /// Id of the one-time pre-key Alice uses; `None` when the case uses none.
    pub bob_otk_id: Option<u32>,
    /// Bob's one-time pre-key, X25519 private (32 bytes); `None` when unused.
    pub bob_otk_private: Option<String>,
    /// Bob's one-time pre-key, X25519 public (32 bytes); `None` when unused.
    pub bob_otk_public: Option<String>,
    /// Alice's X3DH ephemeral `EK_a`, X25519 private (32 bytes): the
    /// only random value `initiate` draws.
    pub alice_ephemeral_private: String,
    /// Alice's X3DH ephemeral `EK_a`, X25519 public (32 bytes).
    pub alice_ephemeral_public: String,
    /// `DH(IK_a, SPK_b)` (32 bytes).
    pub dh1: String,
    /// `DH(EK_a, IK_b)` (32 bytes).
    pub dh2: String,
    /// `DH(EK_a, SPK_b)` (32 bytes).
    pub dh3: String,
    /// `DH(EK_a, OPK_b)` (32 bytes); `None` without a one-time pre-key.
    pub dh4: Option<String>,
    /// The X3DH shared secret `SK` (32 bytes), per the document's `kdf`.
    pub shared_secret: String,
    /// X3DH associated data `IK_a || IK_b` (X25519 publics, 64 bytes).
    pub associated_data: String,
    /// Free-text description of the case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

/// A party's Double Ratchet state as the schema records it
/// (`initial_state` and `state_after`). Keys are lowercase hex; they are
/// compared case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSnapshot {
    /// Root key (32 bytes).
    pub root_key: String,
    /// Current sending chain key (32 bytes); `None` before the party has a sending chain.
    pub chain_key_send: Option<String>,
    /// Current receiving chain key (32 bytes); `None` before the party has received.
    pub chain_key_recv: Option<String>,
    /// The party's current ratchet X25519 public key (32 bytes).
    pub dh_self_public: String,
    /// The peer's latest ratchet X25519 public key (32 bytes); `None` before one is known.
    pub dh_remote_public: Option<String>,
    /// Messages sent in the current sending chain (`Ns`).
    pub n_send: u32,
    /// Messages received in the current receiving chain (`Nr`).
    pub n_recv: u32,
    /// Length of the previous sending chain (`PN`).
    pub pn: u32,
    /// Cached skipped message keys as `"<dh hex>:<n>"`, in insertion order (oldest first).
    pub skipped: Vec<String>,
}

/// Both parties' states at one point of a ratchet case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartyStates {
    /// Alice's state (the initiator, who sends first).
    pub alice: StateSnapshot,
    /// Bob's state (the responder).
    pub bob: StateSnapshot,
}

/// A Double Ratchet message header as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderJson {
    /// The sender's current ratchet X25519 public key, lowercase hex (32 bytes).
    pub dh: String,
    /// Length of the sender's previous sending chain.
    pub pn: u32,
    /// Message number in the sender's current sending chain.
    pub n: u32,
}

/// One step of a ratchet case: a party encrypts or decrypts a message.
/// Byte fields are lowercase hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Index of the event in the case; a decrypt names the encrypt it consumes by it.
    pub i: usize,
    /// `"encrypt"` or `"decrypt"`; any other value fails the case.
    pub op: String,
    /// Who acts: `"alice"` or `"bob"`; any other value fails the case.
    pub party: String,
    /// Encrypt: the plaintext encrypted; decrypt: the plaintext expected.
    /// Absent on a decrypt that carries `expect_error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<String>,
    /// Encrypt only: the AEAD nonce the party draws (12 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Encrypt only: the message key taken from the sending chain (32 bytes);
    /// checked when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_key: Option<String>,
    /// Encrypt: the header the message carries (checked when present).
    /// Decrypt: when present, replaces the header of the consumed message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderJson>,
    /// Encrypt only: the 40-byte header encoding
    /// `dh(32) || u32_be(pn) || u32_be(n)`; checked when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_bytes: Option<String>,
    /// `nonce(12) || ciphertext || tag(16)`. Encrypt: the expected output.
    /// Decrypt: when present, replaces the consumed message's ciphertext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphertext: Option<String>,
    /// Decrypt only: the `i` of the encrypt event whose message is decrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<usize>,
    /// meshwire extension, decrypt only: the decrypt must fail with this
    /// kind (see [`crate::verify::error_kind`]) and leave the party's state unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_error: Option<String>,
    /// X25519 private keys (32 bytes each) of the ratchet DH pairs the party
    /// generates while handling this event, in draw order; empty when none.
    #[serde(default)]
    pub generated_ratchet_private: Vec<String>,
    /// The party's state after the event; checked when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_after: Option<StateSnapshot>,
}

/// A `kind = "ratchet"` case: one Double Ratchet conversation between
/// Alice (sender-initialised) and Bob (receiver-initialised). Byte fields
/// are lowercase hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RatchetCase {
    /// Case name; its labelled inputs are `agentmesh-golden/<name>/<role>`.
    pub name: String,
    /// Name of the x3dh case whose shared secret and signed pre-key this
    /// conversation continues from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_x3dh: Option<String>,
    /// The X3DH shared secret both ratchets start from (32 bytes).
    pub shared_secret: String,
    /// Bob's signed pre-key, X25519 private (32 bytes): his first ratchet key pair.
    pub bob_spk_private: String,
    /// Bob's signed pre-key, X25519 public (32 bytes).
    pub bob_spk_public: String,
    /// Alice's DID. With `bob_did`, `associated_data` must be
    /// `utf8(alice_did + "|" + bob_did)` followed by 64 key bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alice_did: Option<String>,
    /// Bob's DID (see `alice_did`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bob_did: Option<String>,
    /// The ratchet key pair Alice draws when her channel is created, before
    /// any event: X25519 private (32 bytes).
    pub alice_ratchet_0_private: String,
    /// Public key of `alice_ratchet_0_private` (32 bytes); checked when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alice_ratchet_0_public: Option<String>,
    /// Associated data given to every encrypt and decrypt: the mesh channel
    /// AD `utf8(alice_did|bob_did) || IK_a || IK_b`.
    pub associated_data: String,
    /// Both states right after channel setup; checked when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_state: Option<PartyStates>,
    /// Free-text description of the conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// The events, applied in order.
    pub events: Vec<Event>,
}

/// The fields of a relay `connect` frame as the relay checks them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayConnect {
    /// Frame type (JSON `type`): `"connect"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The connecting agent's DID.
    pub from: String,
    /// The agent's Ed25519 public key, standard base64 with padding.
    pub public_key: String,
    /// The signed timestamp text (RFC 3339, e.g. `2026-11-21T12:00:00.000Z`).
    pub timestamp: String,
    /// Ed25519 signature over `utf8(timestamp)`, standard base64 with padding.
    pub signature: String,
}

/// A `kind = "identity"` case: keys, DID and the signed proofs an agent
/// shows the registry and the relay. Byte fields are lowercase hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityCase {
    /// Case name; its labelled inputs are `agentmesh-golden/<name>/<role>`.
    pub name: String,
    /// Ed25519 secret seed (RFC 8032, 32 bytes).
    pub ed25519_seed: String,
    /// Ed25519 public key (32 bytes).
    pub ed25519_public: String,
    /// X25519 identity private key, `sha512(seed)[0..32]` clamped (32 bytes).
    pub x25519_private: String,
    /// X25519 identity public key (32 bytes).
    pub x25519_public: String,
    /// The DID: `did:mesh:` + first 32 hex chars of `sha256(ed25519_public)`.
    pub did: String,
    /// The timestamp text the registry proof signs (RFC 3339).
    pub timestamp: String,
    /// Ed25519 signature over `utf8(timestamp)` (64 bytes).
    pub timestamp_signature: String,
    /// The registry `Authorization` header value:
    /// `Ed25519-Timestamp <did> <timestamp> <base64url-no-pad signature>`.
    pub authorization: String,
    /// The relay `connect` frame's fields for this identity.
    pub relay_connect: RelayConnect,
    /// The `connect` frame's exact JSON text, byte for byte; checked when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_frame_json: Option<String>,
    /// The `fetch_pending` frame's exact JSON text, byte for byte; checked when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_pending_frame_json: Option<String>,
    /// Free-text description of the case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}
