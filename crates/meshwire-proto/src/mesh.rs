//! The mesh session state machine: everything a client decides about frames,
//! with no socket, clock or registry of its own (the quinn-proto pattern).
//!
//! A driver feeds it the text of every frame the relay delivers
//! ([`Mesh::handle_text`]), the policy verdict on each KNOCK
//! ([`Mesh::decide_knock`]), and the time ([`Mesh::handle_timeout`]); it asks
//! it to open sessions ([`Mesh::open_session`], with a bundle the driver
//! fetched) and to encrypt ([`Mesh::encrypt`]). It answers with [`Event`]s:
//! frame texts to transmit, messages for the application, KNOCKs awaiting a
//! verdict, and errors by kind.
//!
//! Behaviour beyond the TypeScript client:
//! - a failed decrypt drops that frame and keeps the session (the ratchet is
//!   transactional);
//! - an accepted KNOCK from a peer that already has a session (it restarted)
//!   replaces the session once the new session's first message decrypts, so a
//!   forged KNOCK cannot destroy a working session or burn a one-time key;
//! - duplicate frames (relay redelivery, retransmission) are dropped by id;
//! - end-to-end delivery receipts between peers that both support them.

use crate::channel::{Establishment, SecureChannel};
use crate::frames::{
    ConnectFrame, FetchPendingFrame, Frame, KnockAcceptFrame, KnockFrame, KnockRejectFrame, MessageBody, MessageFrame,
    DEFAULT_MAX_FRAME_BYTES,
};
use crate::identity::{Did, Identity};
use crate::keys::X25519PublicKey;
use crate::prekeys::{OneTimeKeyId, PreKeyBundle, PreKeys};
use crate::ratchet::DecryptError;
use crate::time::Timestamp;
use crate::x3dh::{KdfDialect, X3dhError};
use crate::StateError;
use rand_core::{CryptoRngCore, OsRng, RngCore};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use zeroize::Zeroizing;

/// The reserved key of meshwire's own control messages inside the
/// encrypted payload (never shown to the application).
pub const CONTROL_KEY: &str = "$meshwire";

/// Limits and options of a [`Mesh`].
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Messages kept per peer while its KNOCK is unresolved (TypeScript: 5).
    pub pre_knock_buffer_per_peer: usize,
    /// How long such a message is kept (TypeScript: 3 s).
    pub pre_knock_ttl_ms: u64,
    /// Peers with buffered messages at once.
    pub pre_knock_max_peers: usize,
    /// Messages kept per peer whose KNOCK arrived but awaits the policy's
    /// verdict (they are not dropped after `pre_knock_ttl_ms`).
    pub verdict_buffer_per_peer: usize,
    /// A KNOCK without a verdict after this long is rejected (TypeScript: 10 s).
    pub knock_timeout_ms: u64,
    /// Frames longer than this are rejected unread.
    pub max_frame_bytes: usize,
    /// Message ids remembered per peer for duplicate detection.
    pub seen_ids_per_peer: usize,
    /// Peers allowed to send plaintext, until they are seen encrypted.
    pub plaintext_peers: BTreeSet<String>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            pre_knock_buffer_per_peer: 5,
            pre_knock_ttl_ms: 3_000,
            pre_knock_max_peers: 100,
            verdict_buffer_per_peer: 1000,
            knock_timeout_ms: 10_000,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            seen_ids_per_peer: 4096,
            plaintext_peers: BTreeSet::new(),
        }
    }
}

/// Where message, KNOCK and reply ids come from.
pub trait IdSource: Send {
    fn next_id(&mut self) -> String;
}

/// Random UUIDv4 strings from the OS RNG, as `crypto.randomUUID()` makes them.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomUuids;

impl IdSource for RandomUuids {
    fn next_id(&mut self) -> String {
        let mut b = [0u8; 16];
        OsRng.fill_bytes(&mut b);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        format!(
            "{}-{}-{}-{}-{}",
            hex::encode(&b[..4]),
            hex::encode(&b[4..6]),
            hex::encode(&b[6..8]),
            hex::encode(&b[8..10]),
            hex::encode(&b[10..])
        )
    }
}

/// Kinds of problems a [`Mesh`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A frame that could not be parsed or was not for us.
    Frame,
    /// A frame type this version does not know.
    UnknownFrame,
    /// A message that did not decrypt; it was dropped, the session kept.
    Decrypt,
    /// An encrypted message with no session; dropped after buffering.
    NoSession,
    /// A KNOCK whose establishment could not be used.
    Knock,
    /// Plaintext from a peer not allowed to send it.
    Plaintext,
    /// An `error` frame from the relay.
    Relay,
}

/// A problem, reported and survived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshError {
    pub kind: ErrorKind,
    pub peer: Option<String>,
    pub detail: String,
}

/// A message for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    pub from: String,
    pub id: String,
    /// The decrypted payload: the UTF-8 JSON text the sender encrypted.
    pub payload: Vec<u8>,
    /// Sent in plaintext by an allow-listed peer.
    pub plaintext: bool,
    /// The `ack` frame to transmit once the application has the message.
    pub ack: String,
}

/// What the driver must do or report.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Send this frame text on the relay socket.
    Transmit(String),
    /// Hand this message to the application, then transmit its `ack`.
    Message(InboundMessage),
    /// A peer knocks: call [`Mesh::decide_knock`] with the policy's verdict.
    KnockRequest {
        from: String,
        knock_id: String,
        intent: Value,
    },
    KnockAccepted {
        from: String,
    },
    KnockRejected {
        from: String,
        reason: Option<String>,
    },
    /// The first message of an inbound session decrypted.
    SessionEstablished {
        peer: String,
    },
    /// An accepted re-KNOCK's session took over from the old one.
    SessionReplaced {
        peer: String,
    },
    /// A one-time pre-key was used up (persist the pre-keys, maybe replenish).
    OneTimeKeyConsumed {
        id: OneTimeKeyId,
    },
    /// The peer confirmed these messages end to end.
    Delivered {
        peer: String,
        ids: Vec<String>,
    },
    Error(MeshError),
}

/// Sending failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("no session with {0}: open one first")]
    NoSession(String),
    #[error(transparent)]
    Encrypt(#[from] crate::ratchet::EncryptError),
    #[error(transparent)]
    X3dh(#[from] X3dhError),
    #[error("invalid peer DID: {0}")]
    Did(#[from] crate::identity::DidError),
}

#[derive(Clone, Serialize, Deserialize)]
struct Unconfirmed {
    id: String,
    payload: String,
    sent_at: u64,
}

#[derive(Default)]
struct Peer {
    channel: Option<SecureChannel>,
    /// Ephemeral keys of inbound establishments already accepted (newest
    /// last): the relay redelivers stored KNOCKs on every reconnect.
    accepted_eks: VecDeque<X25519PublicKey>,
    /// An accepted inbound establishment not yet confirmed by a message.
    pending: Option<Establishment>,
    awaiting_verdict: Option<(Timestamp, KnockFrame)>,
    buffer: VecDeque<(Timestamp, MessageFrame)>,
    seen: VecDeque<String>,
    seen_set: HashSet<String>,
    verified_encrypted: bool,
    dialect: Option<KdfDialect>,
    receipts: bool,
    unconfirmed: Vec<Unconfirmed>,
    receipts_due: Vec<String>,
}

const ACCEPTED_EKS_KEPT: usize = 32;

impl Peer {
    fn accepted(&mut self, ek: X25519PublicKey) {
        self.accepted_eks.push_back(ek);
        while self.accepted_eks.len() > ACCEPTED_EKS_KEPT {
            self.accepted_eks.pop_front();
        }
    }

    fn remember(&mut self, id: &str, limit: usize) {
        if self.seen_set.insert(id.to_owned()) {
            self.seen.push_back(id.to_owned());
            while self.seen.len() > limit {
                if let Some(old) = self.seen.pop_front() {
                    self.seen_set.remove(&old);
                }
            }
        }
    }
}

/// What the driver knows of a peer from the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerInfo {
    /// The dialect it advertises (`agentmesh_kdf` metadata), if any.
    pub dialect: Option<KdfDialect>,
    /// Whether it advertises end-to-end receipts.
    pub receipts: bool,
}

/// One agent's side of the mesh.
pub struct Mesh {
    identity: Identity,
    prekeys: PreKeys,
    config: MeshConfig,
    ids: Box<dyn IdSource>,
    peers: HashMap<String, Peer>,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("did", self.identity.did())
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

fn ack_text(id: &str) -> String {
    Frame::Ack { id: id.to_owned() }.to_text()
}

fn error(kind: ErrorKind, peer: Option<&str>, detail: impl Into<String>) -> Event {
    Event::Error(MeshError {
        kind,
        peer: peer.map(str::to_owned),
        detail: detail.into(),
    })
}

impl Mesh {
    pub fn new(identity: Identity, prekeys: PreKeys, config: MeshConfig, ids: Box<dyn IdSource>) -> Self {
        Self {
            identity,
            prekeys,
            config,
            ids,
            peers: HashMap::new(),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn prekeys(&self) -> &PreKeys {
        &self.prekeys
    }

    pub fn prekeys_mut(&mut self) -> &mut PreKeys {
        &mut self.prekeys
    }

    pub fn config_mut(&mut self) -> &mut MeshConfig {
        &mut self.config
    }

    /// The `connect` frame with proof of possession, then `fetch_pending`.
    pub fn connect_frames(&self, now: Timestamp) -> [String; 2] {
        [
            crate::frames::to_text(&ConnectFrame::new(&self.identity, &now.to_iso())),
            crate::frames::to_text(&FetchPendingFrame::new(&self.identity)),
        ]
    }

    /// A `heartbeat` frame.
    pub fn heartbeat_frame(&self, now: Timestamp) -> String {
        Frame::Heartbeat {
            from: Some(self.identity.did().to_string()),
            ts: Some(now.to_iso()),
        }
        .to_text()
    }

    /// Whether an encrypted session with `peer` exists.
    pub fn has_session(&self, peer: &str) -> bool {
        self.peers.get(peer).is_some_and(|p| p.channel.is_some())
    }

    /// The peers with a session.
    pub fn session_peers(&self) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(_, p)| p.channel.is_some())
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// Records what the registry says of `peer`.
    pub fn set_peer_info(&mut self, peer: &str, info: PeerInfo) {
        let p = self.peers.entry(peer.to_owned()).or_default();
        if info.dialect.is_some() {
            p.dialect = info.dialect;
        }
        p.receipts = info.receipts;
    }

    /// The dialect used or learned for `peer`, if any.
    pub fn peer_dialect(&self, peer: &str) -> Option<KdfDialect> {
        self.peers.get(peer).and_then(|p| p.dialect)
    }

    /// Sets the dialect for `peer` explicitly.
    pub fn set_peer_dialect(&mut self, peer: &str, dialect: KdfDialect) {
        self.peers.entry(peer.to_owned()).or_default().dialect = Some(dialect);
    }

    /// Whether `peer` may send or receive plaintext right now.
    pub fn is_plaintext_peer(&self, peer: &str) -> bool {
        self.config.plaintext_peers.contains(peer) && !self.peers.get(peer).is_some_and(|p| p.verified_encrypted)
    }

    /// Opens (or replaces) the session with `peer` from its `bundle`; returns
    /// the KNOCK frame to transmit before any message.
    pub fn open_session(
        &mut self,
        rng: &mut impl CryptoRngCore,
        now: Timestamp,
        peer: &str,
        bundle: &PreKeyBundle,
    ) -> Result<String, SendError> {
        let peer_did = Did::parse(peer)?;
        let dialect = self.peers.get(peer).and_then(|p| p.dialect).unwrap_or_default();
        let (channel, establishment) = SecureChannel::initiate(rng, &self.identity, &peer_did, bundle, dialect)?;
        let p = self.peers.entry(peer.to_owned()).or_default();
        p.channel = Some(channel);
        p.pending = None;
        p.dialect = Some(dialect);
        Ok(Frame::Knock(KnockFrame {
            from: self.identity.did().to_string(),
            to: peer.to_owned(),
            id: self.ids.next_id(),
            ts: now.to_iso(),
            intent: serde_json::json!({"action": "establish_session"}),
            establishment: Some(establishment),
        })
        .to_text())
    }

    /// Encrypts `payload` (the JSON text for the peer's application) into a
    /// `message` frame; returns its id and text. Plaintext for allow-listed
    /// peers not yet seen encrypted.
    pub fn encrypt(
        &mut self,
        rng: &mut impl CryptoRngCore,
        now: Timestamp,
        peer: &str,
        payload: &[u8],
    ) -> Result<(String, String), SendError> {
        let id = self.ids.next_id();
        let text = self.encrypt_with_id(rng, now, peer, &id, payload)?;
        if let Some(p) = self.peers.get_mut(peer) {
            if p.receipts && p.channel.is_some() {
                p.unconfirmed.push(Unconfirmed {
                    id: id.clone(),
                    payload: String::from_utf8_lossy(payload).into_owned(),
                    sent_at: now.0,
                });
            }
        }
        Ok((id, text))
    }

    fn encrypt_with_id(
        &mut self,
        rng: &mut impl CryptoRngCore,
        now: Timestamp,
        peer: &str,
        id: &str,
        payload: &[u8],
    ) -> Result<String, SendError> {
        let body = if self.is_plaintext_peer(peer) && !self.has_session(peer) {
            MessageBody::Plaintext(payload.to_vec())
        } else {
            let channel = self
                .peers
                .get_mut(peer)
                .and_then(|p| p.channel.as_mut())
                .ok_or_else(|| SendError::NoSession(peer.to_owned()))?;
            MessageBody::Encrypted(channel.encrypt(rng, payload)?)
        };
        Ok(Frame::Message(MessageFrame {
            from: self.identity.did().to_string(),
            to: peer.to_owned(),
            id: id.to_owned(),
            ts: now.to_iso(),
            body,
        })
        .to_text())
    }

    /// Handles one frame's text from the relay.
    pub fn handle_text(&mut self, rng: &mut impl CryptoRngCore, now: Timestamp, text: &str) -> Vec<Event> {
        match Frame::parse(text, self.config.max_frame_bytes) {
            Ok(frame) => self.handle_frame(rng, now, frame),
            Err(e) => vec![error(ErrorKind::Frame, None, e.to_string())],
        }
    }

    /// Handles one parsed frame.
    pub fn handle_frame(&mut self, rng: &mut impl CryptoRngCore, now: Timestamp, frame: Frame) -> Vec<Event> {
        let mut events = Vec::new();
        let me = self.identity.did().as_str();
        match frame {
            Frame::Message(m) if m.to == me => self.on_message(rng, now, m, &mut events),
            Frame::Knock(k) if k.to == me => self.on_knock(now, k, &mut events),
            Frame::KnockAccept(a) if a.to == me => events.push(Event::KnockAccepted { from: a.from }),
            Frame::KnockReject(r) if r.to == me => {
                if let Some(p) = self.peers.get_mut(&r.from) {
                    p.channel = None;
                    p.unconfirmed.clear();
                }
                events.push(Event::KnockRejected {
                    from: r.from,
                    reason: r.reason,
                });
            }
            Frame::Message(m) => events.push(error(ErrorKind::Frame, Some(&m.from), "message not addressed to us")),
            Frame::Knock(k) => events.push(error(ErrorKind::Frame, Some(&k.from), "knock not addressed to us")),
            Frame::KnockAccept(a) => events.push(error(
                ErrorKind::Frame,
                Some(&a.from),
                "knock_accept not addressed to us",
            )),
            Frame::KnockReject(r) => events.push(error(
                ErrorKind::Frame,
                Some(&r.from),
                "knock_reject not addressed to us",
            )),
            Frame::PendingMessages { messages } => {
                for value in messages {
                    match Frame::from_value(&value) {
                        Ok(inner) => events.extend(self.handle_frame(rng, now, inner)),
                        Err(e) => events.push(error(ErrorKind::Frame, None, e.to_string())),
                    }
                }
            }
            Frame::Error { detail } => events.push(error(ErrorKind::Relay, None, detail)),
            Frame::Unknown { kind } => events.push(error(
                ErrorKind::UnknownFrame,
                None,
                format!("unknown frame type {kind:?}"),
            )),
            Frame::Ack { .. } | Frame::Heartbeat { .. } => {}
            Frame::Connect(_) | Frame::FetchPending { .. } | Frame::Disconnect { .. } => {
                events.push(error(ErrorKind::Frame, None, "unexpected client frame from the relay"))
            }
        }
        events
    }

    fn on_knock(&mut self, now: Timestamp, knock: KnockFrame, events: &mut Vec<Event>) {
        let p = self.peers.entry(knock.from.clone()).or_default();
        if let Some(e) = &knock.establishment {
            // A relay redelivers stored KNOCKs: one already accepted (or
            // pending) is not put to the policy again.
            let known = p.accepted_eks.contains(&e.ephemeral_key)
                || p.pending
                    .as_ref()
                    .is_some_and(|pending| pending.ephemeral_key == e.ephemeral_key);
            if known {
                return;
            }
        }
        events.push(Event::KnockRequest {
            from: knock.from.clone(),
            knock_id: knock.id.clone(),
            intent: knock.intent.clone(),
        });
        p.awaiting_verdict = Some((now, knock));
    }

    /// Applies the policy's verdict on the KNOCK `from` sent.
    pub fn decide_knock(
        &mut self,
        rng: &mut impl CryptoRngCore,
        now: Timestamp,
        from: &str,
        accept: bool,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        let me = self.identity.did().to_string();
        let Some((_, knock)) = self.peers.get_mut(from).and_then(|p| p.awaiting_verdict.take()) else {
            return events;
        };
        let mut accept = accept;
        if accept {
            if let Some(e) = &knock.establishment {
                if let Some(id) = e.one_time_key_id {
                    if self.prekeys.one_time_key(id).is_none() {
                        events.push(error(
                            ErrorKind::Knock,
                            Some(from),
                            format!("one-time pre-key {id} is unknown or used"),
                        ));
                        accept = false;
                    }
                }
            }
        }
        let reply_id = self.ids.next_id();
        let ts = now.to_iso();
        let Some(p) = self.peers.get_mut(from) else {
            return events;
        };
        if accept {
            if let Some(e) = knock.establishment {
                p.pending = Some(e);
            }
            events.push(Event::Transmit(
                Frame::KnockAccept(KnockAcceptFrame {
                    from: me,
                    to: from.to_owned(),
                    id: reply_id,
                    knock_id: knock.id.clone(),
                    ts,
                })
                .to_text(),
            ));
            let buffered: Vec<_> = p.buffer.drain(..).map(|(_, m)| m).collect();
            for message in buffered {
                self.on_message(rng, now, message, &mut events);
            }
        } else {
            p.buffer.clear();
            events.push(Event::Transmit(
                Frame::KnockReject(KnockRejectFrame {
                    from: me,
                    to: from.to_owned(),
                    id: reply_id,
                    knock_id: knock.id.clone(),
                    reason: Some("policy_denied".into()),
                    ts,
                })
                .to_text(),
            ));
        }
        events
    }

    fn on_message(&mut self, rng: &mut impl CryptoRngCore, now: Timestamp, m: MessageFrame, events: &mut Vec<Event>) {
        let limit = self.config.seen_ids_per_peer;
        let plaintext_allowed = self.is_plaintext_peer(&m.from);
        let buffered_peers = self.peers.values().filter(|p| !p.buffer.is_empty()).count();
        let p = self.peers.entry(m.from.clone()).or_default();
        if p.seen_set.contains(&m.id) {
            // A copy of a message we have: the sender may not have our
            // receipt (it retransmits until it does), so confirm again.
            if p.receipts && !p.receipts_due.contains(&m.id) {
                p.receipts_due.push(m.id.clone());
            }
            events.push(Event::Transmit(ack_text(&m.id)));
            return;
        }
        let encrypted = match m.body {
            MessageBody::Plaintext(payload) => {
                if plaintext_allowed {
                    p.remember(&m.id, limit);
                    let ack = ack_text(&m.id);
                    events.push(Event::Message(InboundMessage {
                        from: m.from,
                        id: m.id,
                        payload,
                        plaintext: true,
                        ack,
                    }));
                } else {
                    events.push(error(
                        ErrorKind::Plaintext,
                        Some(&m.from),
                        "plaintext from a peer not allowed to send it",
                    ));
                }
                return;
            }
            MessageBody::Encrypted(e) => e,
        };
        if p.awaiting_verdict.is_some() || (p.channel.is_none() && p.pending.is_none()) {
            let m = MessageFrame {
                body: MessageBody::Encrypted(encrypted),
                ..m
            };
            if p.buffer.is_empty() && buffered_peers >= self.config.pre_knock_max_peers {
                events.push(error(
                    ErrorKind::NoSession,
                    Some(&m.from),
                    "no session, and too many peers buffered: dropped",
                ));
                return;
            }
            if self.config.pre_knock_buffer_per_peer == 0 && p.awaiting_verdict.is_none() {
                events.push(error(
                    ErrorKind::NoSession,
                    Some(&m.from),
                    "no session for encrypted message: dropped",
                ));
                return;
            }
            // Messages after a KNOCK wait for its verdict (as TypeScript's do);
            // before any KNOCK only a few are kept, briefly.
            let limit = if p.awaiting_verdict.is_some() {
                self.config.verdict_buffer_per_peer
            } else {
                self.config.pre_knock_buffer_per_peer
            };
            while p.buffer.len() >= limit {
                if let Some((_, old)) = p.buffer.pop_front() {
                    events.push(error(
                        ErrorKind::NoSession,
                        Some(&old.from),
                        format!("message {} evicted from the pre-KNOCK buffer", old.id),
                    ));
                }
            }
            p.buffer.push_back((now, m));
            return;
        }

        let mut plaintext = None;
        let mut last_error = None;
        if let Some(establishment) = p.pending.clone() {
            let initiator = Did::parse(&m.from);
            // The AEAD tag tells which KDF the initiator used (npm 4.0.0 peers
            // use the legacy one): try the expected dialect, then the other.
            let first = p.dialect.unwrap_or_default();
            let second = match first {
                KdfDialect::Spec => KdfDialect::LegacyFfSalt,
                KdfDialect::LegacyFfSalt => KdfDialect::Spec,
            };
            let dialects = [first, second];
            if let Ok(initiator) = initiator {
                for dialect in dialects {
                    match SecureChannel::accept(
                        rng,
                        &self.identity,
                        &mut self.prekeys,
                        &initiator,
                        &establishment,
                        &encrypted,
                        dialect,
                    ) {
                        Ok((channel, text)) => {
                            let replaced = p.channel.is_some();
                            p.channel = Some(channel);
                            p.accepted(establishment.ephemeral_key);
                            p.pending = None;
                            p.dialect = Some(dialect);
                            p.unconfirmed.clear();
                            if let Some(id) = establishment.one_time_key_id {
                                events.push(Event::OneTimeKeyConsumed { id });
                            }
                            events.push(if replaced {
                                Event::SessionReplaced { peer: m.from.clone() }
                            } else {
                                Event::SessionEstablished { peer: m.from.clone() }
                            });
                            plaintext = Some(text);
                            break;
                        }
                        Err(e) => last_error = Some(e.to_string()),
                    }
                }
            } else {
                last_error = Some("sender is not a DID".into());
            }
        }
        if plaintext.is_none() {
            if let Some(channel) = p.channel.as_mut() {
                match channel.decrypt(rng, &encrypted) {
                    Ok(text) => plaintext = Some(text),
                    Err(DecryptError::DuplicateOrExpired { .. }) if last_error.is_none() => {
                        // Already delivered (its id was forgotten): let the relay drop it.
                        events.push(Event::Transmit(ack_text(&m.id)));
                        return;
                    }
                    Err(e) => last_error = Some(e.to_string()),
                }
            }
        }
        let Some(payload) = plaintext else {
            events.push(error(
                ErrorKind::Decrypt,
                Some(&m.from),
                format!("message {}: {}", m.id, last_error.unwrap_or_default()),
            ));
            return;
        };
        p.verified_encrypted = true;
        p.remember(&m.id, limit);
        if let Some(ids) = control_receipts(&payload) {
            let before = p.unconfirmed.len();
            p.unconfirmed.retain(|u| !ids.contains(&u.id));
            if p.unconfirmed.len() != before {
                events.push(Event::Delivered {
                    peer: m.from.clone(),
                    ids,
                });
            }
            events.push(Event::Transmit(ack_text(&m.id)));
            return;
        }
        if p.receipts {
            p.receipts_due.push(m.id.clone());
        }
        let ack = ack_text(&m.id);
        events.push(Event::Message(InboundMessage {
            from: m.from,
            id: m.id,
            payload,
            plaintext: false,
            ack,
        }));
    }

    /// When [`Mesh::handle_timeout`] next has work.
    pub fn next_timeout(&self) -> Option<Timestamp> {
        self.peers
            .values()
            .filter_map(|p| match &p.awaiting_verdict {
                Some((since, _)) => Some(since.plus_ms(self.config.knock_timeout_ms)),
                None => p.buffer.front().map(|(at, _)| at.plus_ms(self.config.pre_knock_ttl_ms)),
            })
            .min()
    }

    /// Drops buffered messages whose KNOCK did not come in time, and rejects
    /// KNOCKs left without a verdict for too long.
    pub fn handle_timeout(&mut self, rng: &mut impl CryptoRngCore, now: Timestamp) -> Vec<Event> {
        let ttl = self.config.pre_knock_ttl_ms;
        let knock_timeout = self.config.knock_timeout_ms;
        let mut events = Vec::new();
        let mut expired_knocks = Vec::new();
        for (did, p) in &mut self.peers {
            if let Some((since, _)) = &p.awaiting_verdict {
                if since.plus_ms(knock_timeout) <= now {
                    expired_knocks.push(did.clone());
                }
                continue;
            }
            while p.buffer.front().is_some_and(|(at, _)| at.plus_ms(ttl) <= now) {
                if let Some((_, m)) = p.buffer.pop_front() {
                    events.push(error(
                        ErrorKind::NoSession,
                        Some(&m.from),
                        format!("message {}: no session after {ttl} ms: dropped", m.id),
                    ));
                }
            }
        }
        for did in expired_knocks {
            events.push(error(
                ErrorKind::Knock,
                Some(&did),
                format!("no verdict within {knock_timeout} ms: rejected"),
            ));
            events.extend(self.decide_knock(rng, now, &did, false));
        }
        events
    }

    /// Encrypted receipts for the messages delivered since the last call, one
    /// control message per peer that supports them.
    pub fn flush_receipts(&mut self, rng: &mut impl CryptoRngCore, now: Timestamp) -> Vec<Event> {
        let due: Vec<(String, Vec<String>)> = self
            .peers
            .iter_mut()
            .filter(|(_, p)| !p.receipts_due.is_empty())
            .map(|(d, p)| (d.clone(), std::mem::take(&mut p.receipts_due)))
            .collect();
        let mut events = Vec::new();
        for (peer, ids) in due {
            let payload = serde_json::json!({ CONTROL_KEY: "receipt", "ids": ids }).to_string();
            let id = self.ids.next_id();
            match self.encrypt_with_id(rng, now, &peer, &id, payload.as_bytes()) {
                Ok(text) => events.push(Event::Transmit(text)),
                Err(e) => events.push(error(ErrorKind::Frame, Some(&peer), format!("receipt not sent: {e}"))),
            }
        }
        events
    }

    /// Re-encrypts messages to receipt-capable peers not confirmed within
    /// `older_than_ms` (the relay lost them, e.g. in a restart). They keep
    /// their ids, so the receiver drops copies it already has.
    pub fn retransmit(&mut self, rng: &mut impl CryptoRngCore, now: Timestamp, older_than_ms: u64) -> Vec<Event> {
        let mut due = Vec::new();
        for (peer, p) in &mut self.peers {
            for u in &mut p.unconfirmed {
                if now.0.saturating_sub(u.sent_at) >= older_than_ms {
                    u.sent_at = now.0;
                    due.push((peer.clone(), u.id.clone(), u.payload.clone()));
                }
            }
        }
        let mut events = Vec::new();
        for (peer, id, payload) in due {
            match self.encrypt_with_id(rng, now, &peer, &id, payload.as_bytes()) {
                Ok(text) => events.push(Event::Transmit(text)),
                Err(e) => events.push(error(
                    ErrorKind::Frame,
                    Some(&peer),
                    format!("retransmit of {id} failed: {e}"),
                )),
            }
        }
        events
    }

    /// Messages to `peer` sent but not yet confirmed by a receipt.
    pub fn unconfirmed_count(&self, peer: &str) -> usize {
        self.peers.get(peer).map_or(0, |p| p.unconfirmed.len())
    }

    /// Sessions, pre-keys and delivery bookkeeping as JSON (contains secrets).
    pub fn export_state(&self) -> Zeroizing<String> {
        let mut peers = serde_json::Map::new();
        for (did, p) in &self.peers {
            let channel = p
                .channel
                .as_ref()
                .map(|c| serde_json::from_str::<Value>(&c.export_state()).unwrap_or(Value::Null));
            peers.insert(
                did.clone(),
                serde_json::json!({
                    "channel": channel,
                    "accepted_eks": p.accepted_eks.iter().map(|k| k.to_hex()).collect::<Vec<_>>(),
                    "dialect": p.dialect.map(|d| d.as_str()),
                    "receipts": p.receipts,
                    "verified_encrypted": p.verified_encrypted,
                    "seen": p.seen,
                    "unconfirmed": p.unconfirmed,
                }),
            );
        }
        let prekeys: Value = serde_json::from_str(&self.prekeys.export_json()).unwrap_or(Value::Null);
        Zeroizing::new(serde_json::json!({"format": "meshwire-mesh/1", "prekeys": prekeys, "peers": peers}).to_string())
    }

    /// Restores [`Mesh::export_state`] for `identity`.
    pub fn import_state(
        identity: Identity,
        text: &str,
        config: MeshConfig,
        ids: Box<dyn IdSource>,
    ) -> Result<Self, StateError> {
        let value: Value = serde_json::from_str(text).map_err(|e| StateError::Json(e.to_string()))?;
        if value.get("format").and_then(Value::as_str) != Some("meshwire-mesh/1") {
            return Err(StateError::Json("not a meshwire-mesh/1 state".into()));
        }
        let prekeys = PreKeys::import_json(
            &identity,
            &value.get("prekeys").map(Value::to_string).unwrap_or_default(),
        )?;
        let mut mesh = Self::new(identity, prekeys, config, ids);
        let peers = value
            .get("peers")
            .and_then(Value::as_object)
            .ok_or(StateError::Json("peers missing".into()))?;
        for (did, v) in peers {
            let bad = |what: &'static str| StateError::Json(format!("peer {did}: {what}"));
            let mut p = Peer::default();
            if let Some(channel) = v.get("channel").filter(|c| !c.is_null()) {
                p.channel = Some(SecureChannel::import_state(&channel.to_string())?);
            }
            for ek in v.get("accepted_eks").and_then(Value::as_array).into_iter().flatten() {
                let ek = ek.as_str().ok_or_else(|| bad("accepted_eks"))?;
                let bytes = crate::encoding::hex_decode_array::<32>(ek).map_err(|_| bad("accepted_eks"))?;
                p.accepted(X25519PublicKey::from_bytes(bytes));
            }
            if let Some(d) = v.get("dialect").and_then(Value::as_str) {
                p.dialect = Some(d.parse().map_err(|_| bad("dialect"))?);
            }
            p.receipts = v.get("receipts").and_then(Value::as_bool).unwrap_or(false);
            p.verified_encrypted = v.get("verified_encrypted").and_then(Value::as_bool).unwrap_or(false);
            for id in v.get("seen").and_then(Value::as_array).into_iter().flatten() {
                p.remember(id.as_str().ok_or_else(|| bad("seen"))?, mesh.config.seen_ids_per_peer);
            }
            if let Some(u) = v.get("unconfirmed") {
                p.unconfirmed = serde_json::from_value(u.clone()).map_err(|_| bad("unconfirmed"))?;
            }
            mesh.peers.insert(did.clone(), p);
        }
        Ok(mesh)
    }
}

/// The ids a receipt control message confirms, if `payload` is one.
fn control_receipts(payload: &[u8]) -> Option<Vec<String>> {
    if !payload.starts_with(b"{") {
        return None;
    }
    let value: Value = serde_json::from_slice(payload).ok()?;
    if value.get(CONTROL_KEY)?.as_str()? != "receipt" {
        return None;
    }
    Some(
        value
            .get("ids")?
            .as_array()?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
    )
}

#[cfg(test)]
mod tests;
