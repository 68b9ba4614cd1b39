//! Relay frames.
//!
//! Output is exactly what the TypeScript client writes: compact JSON in its
//! field order, keys and ciphertexts in standard base64 with padding. Input is
//! lenient where the references are (either base64 alphabet, padding optional,
//! unknown fields ignored, unknown frame types surfaced as
//! [`Frame::Unknown`]) and strict where safety needs it (key and header
//! lengths, `v`, a size limit checked before parsing).

use crate::channel::Establishment;
use crate::encoding::{b64_decode, b64_std};
use crate::identity::{Did, Identity};
use crate::keys::X25519PublicKey;
use crate::ratchet::{EncryptedMessage, Header};
use serde::Serialize;
use serde_json::{Map, Value};

/// Protocol version carried in every frame's `v`.
pub const FRAME_VERSION: u8 = 1;
/// Default size limit of one frame's text.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;

/// A frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the {limit}-byte limit")]
    /// The text is longer than the limit (it was not parsed).
    TooLarge {
        /// The size of the text, in bytes.
        size: usize,
        /// The limit, in bytes.
        limit: usize,
    },
    #[error("frame is not JSON: {0}")]
    /// Not JSON (the parser says why).
    Json(String),
    #[error("frame is not a JSON object")]
    /// JSON, but not an object.
    NotAnObject,
    #[error("frame has no \"type\"")]
    /// No `type` field.
    MissingType,
    #[error("unsupported frame version {0}")]
    /// A `v` this version does not speak.
    Version(String),
    #[error("field {field}: {reason}")]
    /// A field is missing or malformed.
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

fn field_error(field: &'static str, reason: &'static str) -> FrameError {
    FrameError::Field { field, reason }
}

/// `connect`. The proof fields are absent in legacy (npm 4.0.0) frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectFrame {
    /// The frame version (`1`).
    pub v: u8,
    #[serde(rename = "type")]
    /// The frame type (`type` on the wire).
    pub kind: &'static str,
    /// The sender's DID.
    pub from: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The Ed25519 public key, standard base64 (absent for legacy clients).
    pub public_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The signed timestamp (ISO-8601).
    pub timestamp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The Ed25519 signature of the timestamp, standard base64.
    pub signature: Option<String>,
    /// meshwire extension: `"meshwire-challenge-v1"` when `signature` is a
    /// challenge-bound proof (docs/specs/MESHWIRE-CHALLENGE-AUTH.md) rather
    /// than a signature over `timestamp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_scheme: Option<String>,
    /// meshwire extension: the nonce of the relay's upgrade response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// meshwire extension: the relay origin the proof is for
    /// (`wss://relay.example.com`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

impl ConnectFrame {
    /// With proof of possession: a signature over utf8(`timestamp`).
    pub fn new(identity: &Identity, timestamp: &str) -> Self {
        Self {
            v: FRAME_VERSION,
            kind: "connect",
            from: identity.did().to_string(),
            public_key: Some(b64_std(identity.ed25519_public().as_bytes())),
            timestamp: Some(timestamp.to_owned()),
            signature: Some(b64_std(&identity.sign(timestamp.as_bytes()))),
            auth_scheme: None,
            nonce: None,
            audience: None,
        }
    }

    /// With a challenge-bound proof (meshwire extension): the signature is
    /// over [`crate::auth::challenge_message`] of (`audience`, `GET`,
    /// `path`, `nonce`, the DID, an empty body), where `nonce` is the
    /// relay's `x-meshwire-challenge` upgrade response header, `audience`
    /// the relay URL's origin and `path` the upgrade request's target
    /// (`/ws`). Only for relays that sent the header.
    pub fn challenge(
        identity: &Identity,
        relay_url: &str,
        path: &str,
        nonce: &str,
    ) -> Result<Self, crate::auth::ChallengeError> {
        let audience = crate::auth::normalize_origin(relay_url)?;
        let did = identity.did().to_string();
        let signature = crate::auth::sign_challenge(
            identity,
            &crate::auth::ChallengeRequest {
                audience: &audience,
                method: "GET",
                path,
                nonce,
                did: &did,
                body: b"",
            },
        )?;
        Ok(Self {
            v: FRAME_VERSION,
            kind: "connect",
            from: did,
            public_key: Some(b64_std(identity.ed25519_public().as_bytes())),
            timestamp: None,
            signature: Some(b64_std(&signature)),
            auth_scheme: Some(crate::auth::CHALLENGE_AUTH_SCHEME.to_owned()),
            nonce: Some(nonce.to_owned()),
            audience: Some(audience),
        })
    }

    /// [`ConnectFrame::challenge`] for the WebSocket URL the client
    /// connected to (`wss://relay.example.com/ws`): the audience is its
    /// origin and the path its path and query.
    pub fn challenge_for_url(
        identity: &Identity,
        ws_url: &str,
        nonce: &str,
    ) -> Result<Self, crate::auth::ChallengeError> {
        let after_scheme = ws_url.split_once("://").map_or(ws_url, |(_, rest)| rest);
        let without_fragment = after_scheme.split('#').next().unwrap_or(after_scheme);
        let path = match without_fragment.find(['/', '?']) {
            Some(at) if without_fragment[at..].starts_with('/') => without_fragment[at..].to_owned(),
            Some(at) => format!("/{}", &without_fragment[at..]),
            None => "/".to_owned(),
        };
        Self::challenge(identity, ws_url, &path, nonce)
    }

    /// Without proof, as npm SDK 4.0.0 connects.
    pub fn legacy(did: &Did) -> Self {
        Self {
            v: FRAME_VERSION,
            kind: "connect",
            from: did.to_string(),
            public_key: None,
            timestamp: None,
            signature: None,
            auth_scheme: None,
            nonce: None,
            audience: None,
        }
    }
}

/// `fetch_pending`: asks the relay for stored messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FetchPendingFrame {
    /// The frame version (`1`).
    pub v: u8,
    #[serde(rename = "type")]
    /// The frame type (`type` on the wire).
    pub kind: &'static str,
    /// The sender's DID.
    pub from: String,
}

impl FetchPendingFrame {
    /// The frame for `identity`'s DID.
    pub fn new(identity: &Identity) -> Self {
        Self::for_did(identity.did())
    }

    /// The frame for `did`.
    pub fn for_did(did: &Did) -> Self {
        Self {
            v: FRAME_VERSION,
            kind: "fetch_pending",
            from: did.to_string(),
        }
    }
}

/// Compact JSON text of a frame, as `JSON.stringify` writes it.
pub fn to_text<T: Serialize>(frame: &T) -> String {
    // Frames hold only strings, integers and JSON values: this cannot fail.
    serde_json::to_string(frame).unwrap_or_default()
}

/// `knock`: asks to open a session, carrying the X3DH establishment.
#[derive(Debug, Clone, PartialEq)]
pub struct KnockFrame {
    /// The sender's DID.
    pub from: String,
    /// The recipient's DID.
    pub to: String,
    /// The frame id (a UUID).
    pub id: String,
    /// When it was sent (ISO-8601).
    pub ts: String,
    /// What the sender wants (`{"action": ...}`; plaintext, unauthenticated).
    pub intent: Value,
    /// The X3DH establishment `{ik, ek, otk}`, if the KNOCK opens a session.
    pub establishment: Option<Establishment>,
}

/// `knock_accept`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnockAcceptFrame {
    /// The sender's DID.
    pub from: String,
    /// The recipient's DID.
    pub to: String,
    /// The frame id (a UUID).
    pub id: String,
    /// The id of the KNOCK this answers.
    pub knock_id: String,
    /// When it was sent (ISO-8601).
    pub ts: String,
}

/// `knock_reject`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnockRejectFrame {
    /// The sender's DID.
    pub from: String,
    /// The recipient's DID.
    pub to: String,
    /// The frame id (a UUID).
    pub id: String,
    /// The id of the KNOCK this answers.
    pub knock_id: String,
    /// Why, if given.
    pub reason: Option<String>,
    /// When it was sent (ISO-8601).
    pub ts: String,
}

/// What a `message` frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageBody {
    /// A Double Ratchet message.
    Encrypted(EncryptedMessage),
    /// Legacy plaintext peers: base64 of the JSON text, `plaintext: true`.
    Plaintext(Vec<u8>),
}

/// `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFrame {
    /// The sender's DID.
    pub from: String,
    /// The recipient's DID.
    pub to: String,
    /// The frame id (a UUID).
    pub id: String,
    /// When it was sent (ISO-8601).
    pub ts: String,
    /// The encrypted or plaintext payload.
    pub body: MessageBody,
}

/// Every frame that crosses the relay socket.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// `connect`: the first frame of a connection, with the proof of possession.
    Connect(ConnectFrame),
    /// `fetch_pending`: asks the relay for stored frames.
    FetchPending {
        /// The sender's DID.
        from: String,
    },
    /// `knock`.
    Knock(KnockFrame),
    /// `knock_accept`.
    KnockAccept(KnockAcceptFrame),
    /// `knock_reject`.
    KnockReject(KnockRejectFrame),
    /// `message`.
    Message(MessageFrame),
    /// `ack`: the recipient has the message with this id.
    Ack {
        /// The frame id (a UUID).
        id: String,
    },
    /// `heartbeat`: keeps the connection (and registry presence) alive.
    Heartbeat {
        /// The sender's DID.
        from: Option<String>,
        /// When it was sent (ISO-8601).
        ts: Option<String>,
    },
    /// `disconnect`: the client leaves.
    Disconnect {
        /// The sender's DID.
        from: Option<String>,
    },
    /// `error`: the relay refused something.
    Error {
        /// What the relay says went wrong.
        detail: String,
    },
    /// Stored messages replayed in one frame (`messages`: frames).
    PendingMessages {
        /// The stored frames, oldest first.
        messages: Vec<Value>,
    },
    /// A type this version does not know: surfaced, not fatal.
    Unknown {
        /// The frame type (`type` on the wire).
        kind: String,
    },
}

#[derive(Serialize)]
struct EstablishmentWire {
    ik: String,
    ek: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    otk: Option<u32>,
}

#[derive(Serialize)]
struct HeaderWire {
    dh: String,
    pn: u32,
    n: u32,
}

#[derive(Serialize)]
struct KnockWire<'a> {
    v: u8,
    #[serde(rename = "type")]
    kind: &'static str,
    from: &'a str,
    to: &'a str,
    id: &'a str,
    ts: &'a str,
    intent: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    establishment: Option<EstablishmentWire>,
}

#[derive(Serialize)]
struct KnockAnswerWire<'a> {
    v: u8,
    #[serde(rename = "type")]
    kind: &'static str,
    from: &'a str,
    to: &'a str,
    id: &'a str,
    knock_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    ts: &'a str,
}

#[derive(Serialize)]
struct MessageWire<'a> {
    v: u8,
    #[serde(rename = "type")]
    kind: &'static str,
    from: &'a str,
    to: &'a str,
    id: &'a str,
    ts: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<HeaderWire>,
    ciphertext: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext: Option<bool>,
}

#[derive(Serialize)]
struct AckWire<'a> {
    v: u8,
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
}

#[derive(Serialize)]
struct FromTsWire<'a> {
    v: u8,
    #[serde(rename = "type")]
    kind: &'static str,
    from: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ts: Option<&'a str>,
}

impl Frame {
    /// The frame's `type`.
    pub fn kind(&self) -> &str {
        match self {
            Frame::Connect(_) => "connect",
            Frame::FetchPending { .. } => "fetch_pending",
            Frame::Knock(_) => "knock",
            Frame::KnockAccept(_) => "knock_accept",
            Frame::KnockReject(_) => "knock_reject",
            Frame::Message(_) => "message",
            Frame::Ack { .. } => "ack",
            Frame::Heartbeat { .. } => "heartbeat",
            Frame::Disconnect { .. } => "disconnect",
            Frame::Error { .. } => "error",
            Frame::PendingMessages { .. } => "pending_messages",
            Frame::Unknown { kind } => kind,
        }
    }

    /// The exact text the TypeScript client would send for this frame.
    pub fn to_text(&self) -> String {
        match self {
            Frame::Connect(c) => to_text(c),
            Frame::FetchPending { from } => to_text(&FromTsWire {
                v: FRAME_VERSION,
                kind: "fetch_pending",
                from,
                ts: None,
            }),
            Frame::Knock(k) => to_text(&KnockWire {
                v: FRAME_VERSION,
                kind: "knock",
                from: &k.from,
                to: &k.to,
                id: &k.id,
                ts: &k.ts,
                intent: &k.intent,
                establishment: k.establishment.as_ref().map(|e| EstablishmentWire {
                    ik: b64_std(e.identity_key.as_bytes()),
                    ek: b64_std(e.ephemeral_key.as_bytes()),
                    otk: e.one_time_key_id,
                }),
            }),
            Frame::KnockAccept(a) => to_text(&KnockAnswerWire {
                v: FRAME_VERSION,
                kind: "knock_accept",
                from: &a.from,
                to: &a.to,
                id: &a.id,
                knock_id: &a.knock_id,
                reason: None,
                ts: &a.ts,
            }),
            Frame::KnockReject(r) => to_text(&KnockAnswerWire {
                v: FRAME_VERSION,
                kind: "knock_reject",
                from: &r.from,
                to: &r.to,
                id: &r.id,
                knock_id: &r.knock_id,
                reason: r.reason.as_deref(),
                ts: &r.ts,
            }),
            Frame::Message(m) => {
                let (header, ciphertext, plaintext) = match &m.body {
                    MessageBody::Encrypted(e) => (
                        Some(HeaderWire {
                            dh: b64_std(e.header.dh.as_bytes()),
                            pn: e.header.pn,
                            n: e.header.n,
                        }),
                        b64_std(&e.ciphertext),
                        None,
                    ),
                    MessageBody::Plaintext(text) => (None, b64_std(text), Some(true)),
                };
                to_text(&MessageWire {
                    v: FRAME_VERSION,
                    kind: "message",
                    from: &m.from,
                    to: &m.to,
                    id: &m.id,
                    ts: &m.ts,
                    header,
                    ciphertext,
                    plaintext,
                })
            }
            Frame::Ack { id } => to_text(&AckWire {
                v: FRAME_VERSION,
                kind: "ack",
                id,
            }),
            Frame::Heartbeat { from, ts } => to_text(&FromTsWire {
                v: FRAME_VERSION,
                kind: "heartbeat",
                from: from.as_deref().unwrap_or_default(),
                ts: ts.as_deref(),
            }),
            Frame::Disconnect { from } => to_text(&FromTsWire {
                v: FRAME_VERSION,
                kind: "disconnect",
                from: from.as_deref().unwrap_or_default(),
                ts: None,
            }),
            Frame::Error { detail } => serde_json::json!({"type": "error", "detail": detail}).to_string(),
            Frame::PendingMessages { messages } => {
                serde_json::json!({"v": FRAME_VERSION, "type": "pending_messages", "messages": messages}).to_string()
            }
            Frame::Unknown { kind } => serde_json::json!({"v": FRAME_VERSION, "type": kind}).to_string(),
        }
    }

    /// Parses one frame's text, rejecting it unread if it exceeds `max_bytes`.
    pub fn parse(text: &str, max_bytes: usize) -> Result<Self, FrameError> {
        if text.len() > max_bytes {
            return Err(FrameError::TooLarge {
                size: text.len(),
                limit: max_bytes,
            });
        }
        let value: Value = serde_json::from_str(text).map_err(|e| FrameError::Json(e.to_string()))?;
        Self::from_value(&value)
    }

    /// Parses an already decoded JSON frame.
    pub fn from_value(value: &Value) -> Result<Self, FrameError> {
        let obj = value.as_object().ok_or(FrameError::NotAnObject)?;
        let kind = obj.get("type").and_then(Value::as_str).ok_or(FrameError::MissingType)?;
        match obj.get("v") {
            None => {}
            Some(v) if v.as_u64() == Some(u64::from(FRAME_VERSION)) => {}
            Some(v) => return Err(FrameError::Version(v.to_string().chars().take(32).collect())),
        }
        let f = Fields(obj);
        Ok(match kind {
            "connect" => Frame::Connect(ConnectFrame {
                v: FRAME_VERSION,
                kind: "connect",
                from: f.string("from")?,
                public_key: f.opt_string("public_key")?,
                timestamp: f.opt_string("timestamp")?,
                signature: f.opt_string("signature")?,
                auth_scheme: f.opt_string("auth_scheme")?,
                nonce: f.opt_string("nonce")?,
                audience: f.opt_string("audience")?,
            }),
            "fetch_pending" => Frame::FetchPending {
                from: f.string("from")?,
            },
            "knock" => Frame::Knock(KnockFrame {
                from: f.string("from")?,
                to: f.string("to")?,
                id: f.string("id")?,
                ts: f.opt_string("ts")?.unwrap_or_default(),
                intent: obj.get("intent").cloned().unwrap_or(Value::Null),
                establishment: match obj.get("establishment") {
                    None | Some(Value::Null) => None,
                    Some(e) => Some(parse_establishment(e)?),
                },
            }),
            "knock_accept" => Frame::KnockAccept(KnockAcceptFrame {
                from: f.string("from")?,
                to: f.string("to")?,
                id: f.string("id")?,
                knock_id: f.opt_string("knock_id")?.unwrap_or_default(),
                ts: f.opt_string("ts")?.unwrap_or_default(),
            }),
            "knock_reject" => Frame::KnockReject(KnockRejectFrame {
                from: f.string("from")?,
                to: f.string("to")?,
                id: f.string("id")?,
                knock_id: f.opt_string("knock_id")?.unwrap_or_default(),
                reason: f.opt_string("reason")?,
                ts: f.opt_string("ts")?.unwrap_or_default(),
            }),
            "message" => Frame::Message(parse_message(&f)?),
            "ack" => Frame::Ack { id: f.string("id")? },
            "heartbeat" => Frame::Heartbeat {
                from: f.opt_string("from")?,
                ts: f.opt_string("ts")?,
            },
            "disconnect" => Frame::Disconnect {
                from: f.opt_string("from")?,
            },
            "error" => Frame::Error {
                detail: f.opt_string("detail")?.or(f.opt_string("message")?).unwrap_or_default(),
            },
            "pending_messages" => Frame::PendingMessages {
                messages: match obj.get("messages") {
                    Some(Value::Array(items)) => items.clone(),
                    _ => return Err(field_error("messages", "must be an array")),
                },
            },
            other => Frame::Unknown {
                kind: other.chars().take(64).collect(),
            },
        })
    }
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn opt_string(&self, field: &'static str) -> Result<Option<String>, FrameError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(field_error(field, "must be a string")),
        }
    }

    fn string(&self, field: &'static str) -> Result<String, FrameError> {
        self.opt_string(field)?.ok_or(field_error(field, "missing"))
    }

    fn bytes(&self, field: &'static str) -> Result<Vec<u8>, FrameError> {
        b64_decode(&self.string(field)?).map_err(|_| field_error(field, "not base64"))
    }
}

fn key(field: &'static str, value: Option<&Value>) -> Result<X25519PublicKey, FrameError> {
    let text = value.and_then(Value::as_str).ok_or(field_error(field, "missing"))?;
    let bytes = b64_decode(text).map_err(|_| field_error(field, "not base64"))?;
    X25519PublicKey::from_slice(&bytes).map_err(|_| field_error(field, "must be 32 bytes"))
}

fn u32_field(field: &'static str, value: Option<&Value>) -> Result<u32, FrameError> {
    value
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(field_error(field, "must be an integer in 0..2^32"))
}

fn parse_establishment(value: &Value) -> Result<Establishment, FrameError> {
    let obj = value
        .as_object()
        .ok_or(field_error("establishment", "must be an object"))?;
    Ok(Establishment {
        identity_key: key("establishment.ik", obj.get("ik"))?,
        ephemeral_key: key("establishment.ek", obj.get("ek"))?,
        one_time_key_id: match obj.get("otk") {
            None | Some(Value::Null) => None,
            Some(v) => Some(u32_field("establishment.otk", Some(v))?),
        },
    })
}

fn parse_message(f: &Fields<'_>) -> Result<MessageFrame, FrameError> {
    let plaintext = matches!(f.0.get("plaintext"), Some(Value::Bool(true)));
    let body = if plaintext {
        MessageBody::Plaintext(f.bytes("ciphertext")?)
    } else {
        let header =
            f.0.get("header")
                .and_then(Value::as_object)
                .ok_or(field_error("header", "missing"))?;
        let header = Header {
            dh: key("header.dh", header.get("dh"))?,
            pn: u32_field("header.pn", header.get("pn"))?,
            n: u32_field("header.n", header.get("n"))?,
        };
        MessageBody::Encrypted(EncryptedMessage {
            header,
            ciphertext: f.bytes("ciphertext")?,
        })
    };
    Ok(MessageFrame {
        from: f.string("from")?,
        to: f.string("to")?,
        id: f.string("id")?,
        ts: f.opt_string("ts")?.unwrap_or_default(),
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &str = r#"{"v":1,"type":"message","from":"did:mesh:c0194546b0ed1f9208978afc62ce76d0","to":"did:mesh:3f9ecbfa4984f862f761633915cf35ea","id":"00000000-0000-4000-8000-000000000002","ts":"2026-11-21T12:00:00.000Z","header":{"dh":"4NHbRUkebjhpnJtBU/y5pfGxUdY4GbNqSkvD2c74nWI=","pn":0,"n":0},"ciphertext":"atKIQLnIAsKdTC+4dXw67l0n+8AI/HXkduBwZJZ92o2LLJubscSusMaEzJxOtALS"}"#;
    const KNOCK: &str = r#"{"v":1,"type":"knock","from":"did:mesh:c0194546b0ed1f9208978afc62ce76d0","to":"did:mesh:3f9ecbfa4984f862f761633915cf35ea","id":"00000000-0000-4000-8000-000000000001","ts":"2026-11-21T12:00:00.000Z","intent":{"action":"establish_session"},"establishment":{"ik":"Zyj729RNVXXuKTI85j7LIhCMeRAZEJwm2AWlTM1AdzI=","ek":"GAkllkK+gtNN9Cntv4uT182OB83DIrN1qnmzYmIR6SU=","otk":7}}"#;

    #[test]
    fn typescript_frames_round_trip_byte_for_byte() {
        for text in [
            MESSAGE,
            KNOCK,
            r#"{"v":1,"type":"knock_accept","from":"did:mesh:a","to":"did:mesh:b","id":"x","knock_id":"y","ts":"2026-11-21T12:00:00.000Z"}"#,
            r#"{"v":1,"type":"knock_reject","from":"did:mesh:a","to":"did:mesh:b","id":"x","knock_id":"y","reason":"policy_denied","ts":"t"}"#,
            r#"{"v":1,"type":"ack","id":"00000000-0000-4000-8000-000000000002"}"#,
            r#"{"v":1,"type":"fetch_pending","from":"did:mesh:a"}"#,
            r#"{"v":1,"type":"heartbeat","from":"did:mesh:a","ts":"t"}"#,
            r#"{"v":1,"type":"disconnect","from":"did:mesh:a"}"#,
            r#"{"v":1,"type":"connect","from":"did:mesh:a"}"#,
            r#"{"v":1,"type":"message","from":"a","to":"b","id":"i","ts":"t","ciphertext":"eyJhIjoxfQ==","plaintext":true}"#,
        ] {
            let frame = Frame::parse(text, DEFAULT_MAX_FRAME_BYTES).unwrap();
            assert_eq!(frame.to_text(), text);
        }
    }

    #[test]
    fn lenient_on_what_python_relays_and_other_encodings() {
        // The AGT relay re-serializes with json.dumps: spaces, reordered, unknown fields.
        let relayed = r#"{"ciphertext": "atKIQLnIAsKdTC-4dXw67l0n-8AI_HXkduBwZJZ92o2LLJubscSusMaEzJxOtALS", "extra": [1], "header": {"n": 0, "pn": 0, "dh": "4NHbRUkebjhpnJtBU_y5pfGxUdY4GbNqSkvD2c74nWI"}, "v": 1, "type": "message", "from": "did:mesh:c0194546b0ed1f9208978afc62ce76d0", "to": "did:mesh:3f9ecbfa4984f862f761633915cf35ea", "id": "00000000-0000-4000-8000-000000000002", "ts": "2026-11-21T12:00:00.000Z"}"#;
        assert_eq!(
            Frame::parse(relayed, DEFAULT_MAX_FRAME_BYTES).unwrap(),
            Frame::parse(MESSAGE, DEFAULT_MAX_FRAME_BYTES).unwrap()
        );
        assert_eq!(
            Frame::parse(r#"{"type":"error","detail":"Unknown frame type: fetch_pending"}"#, 100).unwrap(),
            Frame::Error {
                detail: "Unknown frame type: fetch_pending".into()
            }
        );
        assert_eq!(
            Frame::parse(r#"{"v":1,"type":"presence"}"#, 100).unwrap(),
            Frame::Unknown {
                kind: "presence".into()
            }
        );
    }

    #[test]
    fn strict_where_safety_needs_it() {
        assert_eq!(
            Frame::parse(MESSAGE, 100),
            Err(FrameError::TooLarge {
                size: MESSAGE.len(),
                limit: 100
            })
        );
        assert!(matches!(Frame::parse("{", 100), Err(FrameError::Json(_))));
        assert_eq!(Frame::parse("[1]", 100), Err(FrameError::NotAnObject));
        assert_eq!(Frame::parse(r#"{"v":1}"#, 100), Err(FrameError::MissingType));
        assert_eq!(
            Frame::parse(r#"{"v":2,"type":"ack","id":"x"}"#, 100),
            Err(FrameError::Version("2".into()))
        );
        let cases = [
            (
                MESSAGE.replace("4NHbRUkebjhpnJtBU/y5pfGxUdY4GbNqSkvD2c74nWI=", "AAAA"),
                "header.dh",
            ),
            (MESSAGE.replace(r#""pn":0"#, r#""pn":-1"#), "header.pn"),
            (MESSAGE.replace(r#""n":0"#, r#""n":4294967296"#), "header.n"),
            (MESSAGE.replace(r#""n":0"#, r#""n":"0""#), "header.n"),
            (MESSAGE.replace("atKIQ", "at*IQ"), "ciphertext"),
            (
                MESSAGE.replace(r#""id":"00000000-0000-4000-8000-000000000002","#, ""),
                "id",
            ),
            (
                MESSAGE.replace(
                    r#""header":{"dh":"4NHbRUkebjhpnJtBU/y5pfGxUdY4GbNqSkvD2c74nWI=","pn":0,"n":0},"#,
                    "",
                ),
                "header",
            ),
            (KNOCK.replace(r#""otk":7"#, r#""otk":-7"#), "establishment.otk"),
            (
                KNOCK.replace("GAkllkK+gtNN9Cntv4uT182OB83DIrN1qnmzYmIR6SU=", "GAkl"),
                "establishment.ek",
            ),
            (
                KNOCK.replace(r#""from":"did:mesh:c0194546b0ed1f9208978afc62ce76d0""#, r#""from":7"#),
                "from",
            ),
        ];
        for (text, field) in cases {
            match Frame::parse(&text, DEFAULT_MAX_FRAME_BYTES) {
                Err(FrameError::Field { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
