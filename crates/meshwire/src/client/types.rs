//! What the client hands to the application: errors, messages, KNOCK
//! requests and events.

use crate::persist::PersistError;
use crate::registry::RegistryError;
use crate::store::StoreError;
use meshwire_proto::encoding::b64_decode;
use meshwire_proto::mesh::{ErrorKind, SendError, CONTROL_KEY};
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A client operation failed. `Display` names the cause in words meant for
/// a person.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A registry call failed.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// The relay connection failed after it was established, or the relay
    /// answered something unexpected.
    #[error("relay: {0}")]
    Relay(String),
    /// Joining the relay failed: refused, DNS, an HTTP status at the
    /// upgrade, TLS, a rejected `connect` (close code and reason), a
    /// timeout. [`crate::MeshClient::connect`] reports the first attempt's failure
    /// at once instead of retrying.
    #[error("{0}")]
    RelayConnect(#[from] crate::relay_connect::ConnectFailure),
    /// The state machine refused the send (no session, too many
    /// unconfirmed messages, ...).
    #[error("session: {0}")]
    Session(#[from] SendError),
    /// The registry served `peer` a pre-key bundle made of other keys than
    /// the DID's: no session was opened (a malicious or compromised
    /// registry, or whoever could write that bundle, would read it).
    #[error("refused the registry's pre-key bundle for {peer}: {source}")]
    UntrustedBundle {
        /// The peer whose bundle was refused.
        peer: String,
        /// Which key does not belong to the DID.
        source: meshwire_proto::BundleError,
    },
    /// Reading or writing the identity file failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The durable store refused or failed a commit: nothing of the
    /// operation left the process (see [`crate::persist`]).
    #[error("durable store: {0}")]
    Persist(#[from] PersistError),
    /// A state could not be exported or imported.
    #[error("state: {0}")]
    State(#[from] meshwire_proto::StateError),
    /// The saved state could not be loaded. Recovery (same identity, fresh
    /// pre-keys, peers KNOCK again):
    /// [`crate::persist::Persistence::reset_mesh`],
    /// [`crate::MeshClientBuilder::reset_corrupt_state`], or
    /// `meshwire state reset --state DIR`.
    #[error(
        "the saved state at {location} is corrupt ({reason}); to start over with the same identity, \
         reset it (`meshwire state reset --state DIR`, `Persistence::reset_mesh`) or connect with \
         `reset_corrupt_state`"
    )]
    CorruptState {
        /// Where the state lives.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A DID argument is not a `did:mesh:` DID.
    #[error("invalid DID: {0}")]
    Did(#[from] meshwire_proto::DidError),
    /// The payload could not be serialized to JSON.
    #[error("payload is not serializable: {0}")]
    Payload(String),
    /// [`crate::MeshClient::send_batch`] stopped at payload `failed`: the
    /// ones before it were sent (their ids are `sent`), it and the ones
    /// after it were not.
    #[error("batch stopped at payload {failed} ({} sent before it): {source}", sent.len())]
    Batch {
        /// Ids of the payloads sent, in order.
        sent: Vec<String>,
        /// Index of the payload that was refused.
        failed: usize,
        /// Why it was refused.
        source: Box<ClientError>,
    },
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
    /// Nothing happened within the time allowed.
    #[error("timed out")]
    Timeout,
}

/// An application payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A JSON value (what TypeScript and Python agents send).
    Json(serde_json::Value),
    /// Raw bytes sent with [`crate::MeshClient::send_bytes`].
    Bytes(Vec<u8>),
}

impl Payload {
    /// The JSON value, unless the payload is raw bytes.
    pub fn as_json(&self) -> Option<&serde_json::Value> {
        match self {
            Payload::Json(v) => Some(v),
            Payload::Bytes(_) => None,
        }
    }
}

/// A message for the application. It stays in the durable inbox until it
/// is acknowledged ([`crate::MeshClient::ack`], or automatically by the next
/// receive call: see [`crate::ClientConfig::manual_ack`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The sender's DID (authenticated by the session).
    pub from: String,
    /// The message id (unique per sender).
    pub id: String,
    /// The decoded payload.
    pub payload: Payload,
    /// The decrypted bytes exactly as the sender encrypted them.
    pub raw: Vec<u8>,
    /// Sent in plaintext by an allow-listed peer.
    pub plaintext: bool,
    /// Loaded from the store after a restart, unacknowledged: the process
    /// that stopped may have handed it to the application already (which
    /// may have acted on it), or not. Never set for a message handed over
    /// for the first time by the process that received it.
    pub redelivered: bool,
}

pub(crate) fn decode_payload(raw: &[u8]) -> Payload {
    match serde_json::from_slice::<serde_json::Value>(raw) {
        Ok(value) => {
            if value.get(CONTROL_KEY).and_then(|v| v.as_str()) == Some("bytes") {
                if let Some(bytes) = value
                    .get("data")
                    .and_then(|d| d.as_str())
                    .and_then(|d| b64_decode(d).ok())
                {
                    return Payload::Bytes(bytes);
                }
            }
            Payload::Json(value)
        }
        Err(_) => Payload::Bytes(raw.to_vec()),
    }
}

/// A KNOCK awaiting the policy's verdict.
#[derive(Debug, Clone)]
pub struct KnockInfo {
    /// The knocking agent's DID (its identity key was checked against it).
    pub from: String,
    /// The id of the KNOCK frame: the verdict applies to this KNOCK only (a
    /// newer KNOCK from the same peer supersedes it).
    pub knock_id: String,
    /// What the peer says it wants (`intent` of the KNOCK, unverified).
    pub intent: serde_json::Value,
    /// The knocking agent's registry metadata, when the registry has it.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Decides on KNOCKs: `true` accepts.
pub type KnockPolicy = Arc<dyn Fn(KnockInfo) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// A synchronous policy as a [`KnockPolicy`].
///
/// ```
/// use meshwire::knock_policy;
///
/// // Accept only peers that ask to read documents.
/// let policy = knock_policy(|knock| knock.intent["action"] == "read_docs");
/// # let _ = policy;
/// ```
pub fn knock_policy(f: impl Fn(&KnockInfo) -> bool + Send + Sync + 'static) -> KnockPolicy {
    let f = Arc::new(f);
    Arc::new(move |info| {
        let verdict = f(&info);
        Box::pin(async move { verdict })
    })
}

/// What happened, besides messages (those go to the inbox).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// Joined the relay (again, after `Disconnected`).
    Connected {
        /// Not the first connection of this client.
        reconnect: bool,
    },
    /// The relay connection was lost; the client reconnects with backoff.
    Disconnected {
        /// The WebSocket close code, if the relay sent one.
        code: Option<u16>,
        /// The close reason or the transport error.
        reason: String,
    },
    /// Joined a relay other than the one joined before (failover to the
    /// next of [`crate::ClientConfig::fallback_relay_urls`]), or, on the
    /// first connection, other than [`crate::ClientConfig::relay_url`].
    /// Comes right after the `Connected` of that connection; the client
    /// stays on this relay until its connection ends.
    RelayChanged {
        /// The relay joined now (the URL as configured).
        url: String,
        /// The relay joined before, if any.
        previous: Option<String>,
    },
    /// Another connection took this DID over (close 4006, or AGT's 1000
    /// `session_replaced`). The client does not go dark: it reconnects
    /// with a fresh proof after a randomized backoff
    /// ([`crate::ClientConfig::takeover_backoff`]), which takes the DID (and
    /// its stored mail) back from whoever replayed or stole a connect, and
    /// is followed by `Connected { reconnect: true }`. `attempt` counts the
    /// takeovers within [`crate::ClientConfig::takeover_window`].
    Displaced {
        /// The relay's close reason.
        reason: String,
        /// Takeovers within the window, this one included.
        attempt: u32,
    },
    /// Terminal: the DID was taken over more than
    /// [`crate::ClientConfig::takeover_limit`] times within
    /// [`crate::ClientConfig::takeover_window`], so another live instance
    /// of this agent holds it; this client stops reconnecting (the other
    /// keeps the DID). Two instances of one identity thus settle on one
    /// within about `takeover_limit` rounds instead of displacing each
    /// other forever.
    TakenOver {
        /// The relay's close reason.
        reason: String,
    },
    /// The relay refused us (4005 proof rejected, 4003 auth); no reconnection.
    Rejected {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// A peer knocked and the policy decided.
    Knock {
        /// The peer.
        from: String,
        /// The verdict.
        accepted: bool,
    },
    /// A peer accepted our KNOCK.
    KnockAccepted {
        /// The peer.
        from: String,
    },
    /// A peer rejected our KNOCK; the session is gone.
    KnockRejected {
        /// The peer.
        from: String,
        /// Its reason, if it gave one.
        reason: Option<String>,
    },
    /// A session with `peer` is established (its first message decrypted).
    SessionEstablished {
        /// The peer.
        peer: String,
    },
    /// The peer restarted: its new session replaced the old one.
    SessionReplaced {
        /// The peer.
        peer: String,
    },
    /// The peer confirmed these messages end to end.
    Delivered {
        /// The peer.
        peer: String,
        /// The confirmed message ids.
        ids: Vec<String>,
    },
    /// The registry no longer knew this agent (a heartbeat answered 404 or
    /// 401, or the registry restarted without its data): the client
    /// registered again and republished its pre-keys.
    Reregistered {
        /// What the registry answered.
        reason: String,
    },
    /// A registry call made in the background failed (heartbeat,
    /// re-registration, pre-key upkeep); the client retries with backoff.
    RegistryError {
        /// The call.
        operation: String,
        /// What went wrong.
        detail: String,
    },
    /// The durable store failed a commit. Nothing of that operation left
    /// the process: the in-memory state went back to the last commit, and
    /// a message being received was not acknowledged (the relay delivers
    /// it again).
    StoreError {
        /// What the store said.
        detail: String,
    },
    /// The state machine reported a problem with a frame or a peer.
    Error {
        /// Its class.
        kind: ErrorKind,
        /// The peer concerned, if known.
        peer: Option<String>,
        /// What happened.
        detail: String,
    },
}

/// Frames sent and received, by type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FrameCounters {
    /// Frames sent, by `type`.
    pub sent: BTreeMap<String, u64>,
    /// Frames received, by `type`.
    pub received: BTreeMap<String, u64>,
}

impl FrameCounters {
    /// Sent frames other than heartbeats.
    pub fn application_sent(&self) -> u64 {
        self.sent
            .iter()
            .filter(|(k, _)| *k != "heartbeat")
            .map(|(_, v)| v)
            .sum()
    }

    /// Received frames other than heartbeats.
    pub fn application_received(&self) -> u64 {
        self.received
            .iter()
            .filter(|(k, _)| *k != "heartbeat")
            .map(|(_, v)| v)
            .sum()
    }

    /// Heartbeat frames sent.
    pub fn heartbeats_sent(&self) -> u64 {
        self.sent.get("heartbeat").copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwire_proto::encoding::b64_std;

    #[test]
    fn payloads_decode() {
        assert_eq!(decode_payload(br#"{"a":1}"#), Payload::Json(serde_json::json!({"a":1})));
        let envelope = serde_json::json!({ CONTROL_KEY: "bytes", "data": b64_std(&[0, 255]) }).to_string();
        assert_eq!(decode_payload(envelope.as_bytes()), Payload::Bytes(vec![0, 255]));
        assert_eq!(decode_payload(&[0xff, 0]), Payload::Bytes(vec![0xff, 0]));
    }
}
