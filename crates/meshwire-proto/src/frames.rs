//! Relay frames, serialized exactly as the TypeScript client writes them
//! (compact JSON, its field order, standard base64 with padding).

use crate::encoding::b64_std;
use crate::identity::Identity;
use serde::Serialize;

/// Protocol version carried in every frame's `v`.
pub const FRAME_VERSION: u8 = 1;

/// `connect`: proof of possession of the DID's key over the timestamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectFrame {
    pub v: u8,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub from: String,
    pub public_key: String,
    pub timestamp: String,
    pub signature: String,
}

impl ConnectFrame {
    /// Signs utf8(`timestamp`) (ISO-8601 UTC with milliseconds and `Z`).
    pub fn new(identity: &Identity, timestamp: &str) -> Self {
        Self {
            v: FRAME_VERSION,
            kind: "connect",
            from: identity.did().to_string(),
            public_key: b64_std(identity.ed25519_public().as_bytes()),
            timestamp: timestamp.to_owned(),
            signature: b64_std(&identity.sign(timestamp.as_bytes())),
        }
    }
}

/// `fetch_pending`: asks the relay for stored messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FetchPendingFrame {
    pub v: u8,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub from: String,
}

impl FetchPendingFrame {
    pub fn new(identity: &Identity) -> Self {
        Self {
            v: FRAME_VERSION,
            kind: "fetch_pending",
            from: identity.did().to_string(),
        }
    }
}

/// Compact JSON text of a frame, as `JSON.stringify` writes it.
pub fn to_text<T: Serialize>(frame: &T) -> String {
    // Frames hold only strings and integers: serialization cannot fail.
    serde_json::to_string(frame).unwrap_or_default()
}
