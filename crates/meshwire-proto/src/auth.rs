//! The registry's `Authorization: Ed25519-Timestamp <did> <ts> <sig>` header.

use crate::encoding::b64_url;
use crate::identity::Identity;

/// The header value: the DID, the ISO-8601 timestamp and the base64url
/// (unpadded) Ed25519 signature over utf8(timestamp).
pub fn ed25519_timestamp_header(identity: &Identity, timestamp: &str) -> String {
    format!(
        "Ed25519-Timestamp {} {} {}",
        identity.did(),
        timestamp,
        b64_url(&identity.sign(timestamp.as_bytes()))
    )
}
