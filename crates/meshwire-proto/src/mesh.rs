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
//! - end-to-end delivery receipts between peers that both support them;
//! - between such peers, a session that stopped working (a peer restored
//!   from an older copy, frames lost beyond the skip window) is replaced by
//!   a new one ([`Mesh::resync`]) and what was not confirmed is resent on it.

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
use rand_core::{CryptoRngCore, OsRng, RngCore};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;

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
    /// KNOCKs awaiting the policy's verdict at once, over all peers; more
    /// are refused unasked (counted in [`MeshStats::knocks_refused`]).
    pub max_pending_knocks: usize,
    /// Peers with an established session; a KNOCK from a new peer beyond
    /// this is rejected (`knock_reject` reason `capacity`), counted in
    /// [`MeshStats::knocks_refused`]. Sessions the application opens are
    /// not limited.
    pub max_sessions: usize,
    /// Messages per peer awaiting an end-to-end receipt; a send beyond it
    /// fails with [`SendError::TooManyUnconfirmed`].
    pub max_unconfirmed_per_peer: usize,
    /// Payload bytes awaiting receipts, over all peers; a send beyond it
    /// fails with [`SendError::TooManyUnconfirmed`].
    pub max_unconfirmed_bytes: usize,
    /// Receipts owed to one peer between two
    /// [`Mesh::flush_receipts`]; the oldest are dropped beyond it (the
    /// sender retransmits and gets a receipt for the copy).
    pub max_receipts_due_per_peer: usize,
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
            max_pending_knocks: 100,
            max_sessions: 10_000,
            max_unconfirmed_per_peer: 1_000,
            max_unconfirmed_bytes: 16 * 1024 * 1024,
            max_receipts_due_per_peer: 1_000,
        }
    }
}

/// Where message, KNOCK and reply ids come from.
pub trait IdSource: Send {
    /// The next id: unique for the life of the agent.
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
    /// The session looks desynchronized: the peer reused message numbers
    /// (its state looks restored from an older copy, a backup or snapshot),
    /// its messages no longer decrypt on a verified session (restored
    /// across a ratchet step, or more than the skip window lost in
    /// transit), or it stopped confirming while it kept sending.
    Rollback,
}

/// A problem, reported and survived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshError {
    /// What kind of problem.
    pub kind: ErrorKind,
    /// The peer concerned, when known (unverified: from the frame).
    pub peer: Option<String>,
    /// What happened, for people (untrusted parts are quoted).
    pub detail: String,
}

/// What a [`Mesh`] dropped or refused, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// Frames that could not be parsed, or were not addressed to us.
    pub frames_rejected: u64,
    /// Messages dropped from the pre-KNOCK buffers (full, too many peers,
    /// or expired).
    pub buffered_dropped: u64,
    /// KNOCKs refused without asking the policy: identity key not the
    /// sender's, too many awaiting a verdict, or too many sessions.
    pub knocks_refused: u64,
    /// KNOCKs replaced by a newer one from the same peer before a verdict.
    pub knocks_superseded: u64,
    /// Verdicts that named a KNOCK no longer awaiting one.
    pub stale_verdicts: u64,
    /// Sends refused because too much awaited receipts.
    pub unconfirmed_refused: u64,
    /// Receipts owed but dropped because too many were due.
    pub receipts_dropped: u64,
    /// Messages that did not decrypt.
    pub decrypt_failures: u64,
    /// Messages whose number was already used: the peer's state looked
    /// restored from an older copy.
    pub rollbacks_detected: u64,
    /// New sessions asked for ([`Event::ResyncNeeded`]) because a session
    /// looked desynchronized: a rollback, messages that no longer decrypt,
    /// or messages left unconfirmed through several retransmissions.
    pub resyncs_requested: u64,
}

/// A message for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// The sender's DID (authenticated by the session).
    pub from: String,
    /// The message id.
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
        /// The knocking peer's DID.
        from: String,
        /// The KNOCK frame's id: pass it to [`Mesh::decide_knock`].
        knock_id: String,
        /// What the peer says it wants (plaintext, unauthenticated).
        intent: Value,
    },
    /// The peer accepted our KNOCK.
    KnockAccepted {
        /// The peer.
        from: String,
    },
    /// The peer rejected our latest KNOCK; the session opened for it is gone.
    KnockRejected {
        /// The peer.
        from: String,
        /// Its reason, if it gave one.
        reason: Option<String>,
    },
    /// The first message of an inbound session decrypted.
    SessionEstablished {
        /// The peer.
        peer: String,
    },
    /// An accepted re-KNOCK's session took over from the old one.
    SessionReplaced {
        /// The peer.
        peer: String,
    },
    /// A one-time pre-key was used up (persist the pre-keys, maybe replenish).
    OneTimeKeyConsumed {
        /// The consumed key's id.
        id: OneTimeKeyId,
    },
    /// The session with the peer looks desynchronized (its state restored
    /// from an older copy, frames lost beyond the skip window, or our
    /// messages left unconfirmed while it kept sending): open a new session
    /// with [`Mesh::resync`] (fetch its bundle first; it sends nothing if
    /// the peer's own new session arrived meanwhile). Emitted at most once
    /// per peer every 30 s, and only for receipt-capable peers.
    ResyncNeeded {
        /// The peer.
        peer: String,
    },
    /// Close the relay socket with this code and reason (after transmitting
    /// every frame before this event).
    Close {
        /// The WebSocket close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// The peer confirmed these messages end to end.
    Delivered {
        /// The peer.
        peer: String,
        /// The confirmed message ids.
        ids: Vec<String>,
    },
    /// A problem, reported and survived.
    Error(MeshError),
}

/// Sending failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("no session with {0}: open one first")]
    /// No session with the peer (open one first).
    NoSession(String),
    #[error(transparent)]
    /// The ratchet could not encrypt.
    Encrypt(#[from] crate::ratchet::EncryptError),
    #[error(transparent)]
    /// Opening the session failed (bundle or X3DH).
    X3dh(#[from] X3dhError),
    #[error("invalid peer DID: {0}")]
    /// The peer is not a DID.
    Did(#[from] crate::identity::DidError),
    /// Too many messages to the peer (or in all) await an end-to-end
    /// receipt; send again once some are confirmed.
    #[error("{peer} has {count} messages ({bytes} bytes in all) awaiting receipts: limit reached, try again later")]
    TooManyUnconfirmed {
        /// The peer.
        peer: String,
        /// Messages awaiting its receipts.
        count: usize,
        /// Payload bytes awaiting receipts over all peers.
        bytes: usize,
    },
}

#[derive(Clone, Serialize, Deserialize)]
struct Unconfirmed {
    id: String,
    /// The plaintext, kept for retransmission: zeroized on drop.
    payload: String,
    sent_at: u64,
}

impl Unconfirmed {
    /// Changes whenever a field a store keeps changes (the id aside).
    fn fingerprint(&self) -> u64 {
        self.sent_at ^ ((self.payload.len() as u64) << 48)
    }
}

impl Drop for Unconfirmed {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.payload.zeroize();
    }
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
    unconfirmed: UnconfirmedList,
    receipts_due: Vec<String>,
    /// When the oldest and the newest of `receipts_due` were owed (ms).
    receipts_owed_since: u64,
    receipts_owed_last: u64,
    /// The id of the last KNOCK we sent this peer.
    sent_knock: Option<String>,
    /// When we last asked this peer to resync.
    last_resync: Option<Timestamp>,
    /// A resync asked for ([`Event::ResyncNeeded`]) and not done yet:
    /// `true` once the peer's own new session replaced ours meanwhile,
    /// which heals what the resync was for (it is then moot).
    resync_asked: Option<bool>,
    /// The channel `channel` replaced (by our resync, or by the peer's
    /// accepted re-KNOCK), kept to decrypt messages still in flight on it;
    /// never used to encrypt. Not persisted.
    previous: Option<SecureChannel>,
    /// `channel` was opened by us ([`Mesh::open_session`]) and no message
    /// of the peer decrypted on it yet.
    fresh: bool,
    /// When we sent our latest resync KNOCK, until a message of the peer
    /// decrypts on its session (or another session replaces it).
    resync_sent: Option<Timestamp>,
    /// When an encrypted message from this peer last arrived (decrypted or
    /// not): it is online and sending.
    last_heard: Option<Timestamp>,
    /// Retransmission rounds, since the peer last confirmed anything, in
    /// which it had been heard from since the messages last went out.
    stalled_rounds: u32,
    /// Ids remembered in `seen` since this peer's entry was made.
    seen_total: u64,
    /// `seen_total` when the store last got this peer's new ids (side
    /// rows, [`Mesh::track_side_rows`]).
    seen_persisted: u64,
    /// What the store holds of `unconfirmed` (side rows): id and
    /// [`Unconfirmed::fingerprint`].
    unconfirmed_persisted: HashMap<String, u64>,
}

const ACCEPTED_EKS_KEPT: usize = 32;

/// The close code of a client that leaves on its own initiative.
pub const CLOSE_NORMAL: u16 = 1000;
/// The close reason the TypeScript client gives with [`CLOSE_NORMAL`].
pub const CLOSE_REASON_CLIENT: &str = "client disconnect";

/// The entry of `peer`, made with what the registry said of it if new (a
/// free function, so that callers keep their other fields borrowable).
fn peer_entry<'a>(peers: &'a mut HashMap<String, Peer>, info: &HashMap<String, PeerInfo>, peer: &str) -> &'a mut Peer {
    peers.entry(peer.to_owned()).or_insert_with(|| {
        let mut p = Peer::default();
        if let Some(info) = info.get(peer) {
            p.dialect = info.dialect;
            p.receipts = info.receipts;
        }
        p
    })
}

/// Peers without a session whose registry information is kept.
pub const PEER_INFO_KEPT: usize = 1024;

/// Receipts owed to one peer that make [`Mesh::flush_receipts_due`] send
/// them at once (an eighth of the default
/// [`MeshConfig::max_unconfirmed_per_peer`]).
pub const EAGER_RECEIPTS: usize = 125;

/// A peer's receipts go out once it sent nothing new for this long
/// ([`Mesh::flush_receipts_settled`]): a request or a short exchange is
/// confirmed about this soon, a steady stream once per
/// [`RECEIPT_MAX_DELAY_MS`].
pub const RECEIPT_QUIET_MS: u64 = 100;

/// Receipts owed to a peer go out at the latest this long after the oldest
/// of them was owed, however steadily the peer sends. Each receipt message
/// makes the peer's next message start a new DH ratchet step (two X25519
/// operations on our side), so a stream paced faster than
/// [`RECEIPT_QUIET_MS`] costs one such step per second, not one per
/// receipt tick.
pub const RECEIPT_MAX_DELAY_MS: u64 = 1_000;

/// At most one resync per peer this often.
pub const RESYNC_INTERVAL_MS: u64 = 30_000;

/// Retransmission rounds in which a receipt-capable peer kept sending but
/// confirmed nothing, after which its session is resynced.
pub const RESYNC_AFTER_STALLED_ROUNDS: u32 = 3;

impl Peer {
    /// Owes `id` a receipt, noting when.
    fn owe_receipt(&mut self, now: Timestamp, id: String) {
        if self.receipts_due.is_empty() {
            self.receipts_owed_since = now.0;
        }
        self.receipts_owed_last = now.0;
        self.receipts_due.push(id);
    }

    /// Whether the receipts owed are settled enough to send
    /// ([`Mesh::flush_receipts_settled`]).
    fn receipts_settled(&self, now: Timestamp) -> bool {
        !self.receipts_due.is_empty()
            && (self.receipts_due.len() >= EAGER_RECEIPTS
                || now.0.saturating_sub(self.receipts_owed_last) >= RECEIPT_QUIET_MS
                || now.0.saturating_sub(self.receipts_owed_since) >= RECEIPT_MAX_DELAY_MS)
    }

    /// Whether the entry holds nothing worth keeping: entries made by
    /// frames that led nowhere are dropped, so junk `from` values cannot
    /// grow the state.
    fn is_empty(&self) -> bool {
        self.channel.is_none()
            && self.pending.is_none()
            && self.awaiting_verdict.is_none()
            && self.buffer.is_empty()
            && self.unconfirmed.is_empty()
            && self.receipts_due.is_empty()
            && self.accepted_eks.is_empty()
            && self.seen.is_empty()
    }

    /// Whether none of the fields [`Mesh::export_state`] writes hold
    /// anything (buffers and KNOCKs awaiting a verdict are not persisted).
    fn persists_nothing(&self) -> bool {
        self.channel.is_none() && self.accepted_eks.is_empty() && self.seen.is_empty() && self.unconfirmed.is_empty()
    }

    /// Whether our latest resync KNOCK is unanswered and recent.
    fn resync_outstanding(&self, now: Timestamp) -> bool {
        self.resync_sent.is_some_and(|at| now < at.plus_ms(RESYNC_INTERVAL_MS))
    }

    /// Whether a resync may be asked for now: receipt-capable peers only
    /// (they resend on the new session), at most once per
    /// [`RESYNC_INTERVAL_MS`], and not while ours is unanswered.
    fn may_resync(&self, now: Timestamp) -> bool {
        self.receipts
            && self.last_resync.is_none_or(|at| at.plus_ms(RESYNC_INTERVAL_MS) <= now)
            && !self.resync_outstanding(now)
    }

    /// Whether a resync was asked for or sent within the last
    /// [`RESYNC_INTERVAL_MS`]: the peer will resend what we cannot read.
    fn resync_under_way(&self, now: Timestamp) -> bool {
        self.resync_outstanding(now) || self.last_resync.is_some_and(|at| now < at.plus_ms(RESYNC_INTERVAL_MS))
    }

    /// Installs `channel` in place of the current one. A channel that
    /// worked stays as `previous` for messages in flight on it; one we
    /// opened that never worked is dropped.
    fn replace_channel(&mut self, channel: SecureChannel, fresh: bool) {
        if let Some(old) = self.channel.take() {
            if !self.fresh {
                self.previous = Some(old);
            }
        }
        self.channel = Some(channel);
        self.fresh = fresh;
    }

    fn accepted(&mut self, ek: X25519PublicKey) {
        self.accepted_eks.push_back(ek);
        while self.accepted_eks.len() > ACCEPTED_EKS_KEPT {
            self.accepted_eks.pop_front();
        }
    }

    fn remember(&mut self, id: &str, limit: usize) {
        if self.seen_set.insert(id.to_owned()) {
            self.seen_total += 1;
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
    stats: MeshStats,
    /// Peers whose persisted state changed since [`Mesh::take_dirty`].
    dirty_peers: BTreeSet<String>,
    /// Whether the pre-keys changed since [`Mesh::take_dirty`].
    dirty_prekeys: bool,
    /// Whether the duplicate-id memory and the unconfirmed messages are
    /// kept as side rows ([`Mesh::track_side_rows`]).
    side_rows: bool,
    /// What the registry said of peers without an entry yet.
    peer_info: HashMap<String, PeerInfo>,
    /// `peer_info`'s keys, oldest first.
    peer_info_order: VecDeque<String>,
}

/// What changed since the last [`Mesh::take_dirty`]: the rows a store must
/// write ([`Mesh::export_prekeys`], [`Mesh::export_peer`]) to be current.
/// Debug shows counts only (unconfirmed rows hold plaintext).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Dirty {
    /// The pre-keys changed.
    pub prekeys: bool,
    /// These peers' rows changed (write [`Mesh::export_peer`], or delete
    /// the row, and its side rows, when it returns `None`), in DID order.
    pub peers: Vec<String>,
    /// With [`Mesh::track_side_rows`]: message ids newly remembered for
    /// duplicate detection, `(peer, id)` in the order they were seen. A
    /// store keeps the newest [`Dirty::seen_limit`] of each peer.
    pub seen: Vec<(String, String)>,
    /// [`MeshConfig::seen_ids_per_peer`].
    pub seen_limit: usize,
    /// With [`Mesh::track_side_rows`]: unconfirmed messages to write
    /// (`Some`: the entry's JSON, secret; insert or replace, keeping the
    /// original position) or delete (`None`), keyed `(peer, id)`.
    pub unconfirmed: Vec<(String, String, Option<zeroize::Zeroizing<String>>)>,
}

impl fmt::Debug for Dirty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dirty")
            .field("prekeys", &self.prekeys)
            .field("peers", &self.peers)
            .field("seen", &self.seen.len())
            .field("unconfirmed", &self.unconfirmed.len())
            .finish()
    }
}

impl Dirty {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        !self.prekeys && self.peers.is_empty() && self.seen.is_empty() && self.unconfirmed.is_empty()
    }
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
    /// A mesh for `identity` with its `prekeys`, limits and id source.
    pub fn new(identity: Identity, prekeys: PreKeys, config: MeshConfig, ids: Box<dyn IdSource>) -> Self {
        Self {
            identity,
            prekeys,
            config,
            ids,
            peers: HashMap::new(),
            stats: MeshStats::default(),
            dirty_peers: BTreeSet::new(),
            dirty_prekeys: false,
            side_rows: false,
            peer_info: HashMap::new(),
            peer_info_order: VecDeque::new(),
        }
    }

    /// What changed since the last call (and forgets it). A driver that
    /// persists incrementally calls it after every operation and commits
    /// those rows before it transmits the operation's frames or acks its
    /// messages: then a crash never loses a ratchet step the peer saw.
    pub fn take_dirty(&mut self) -> Dirty {
        let peers: Vec<String> = std::mem::take(&mut self.dirty_peers).into_iter().collect();
        let mut dirty = Dirty {
            prekeys: std::mem::take(&mut self.dirty_prekeys),
            seen_limit: self.config.seen_ids_per_peer,
            ..Dirty::default()
        };
        if self.side_rows {
            for did in &peers {
                let Some(p) = self.peers.get_mut(did) else { continue };
                // The ids remembered since the last call: the newest ones.
                let new = usize::try_from(p.seen_total.saturating_sub(p.seen_persisted))
                    .unwrap_or(usize::MAX)
                    .min(p.seen.len());
                for id in p.seen.iter().skip(p.seen.len() - new) {
                    dirty.seen.push((did.clone(), id.clone()));
                }
                p.seen_persisted = p.seen_total;
                // Unconfirmed entries: what differs from the store's image.
                // After sends only, that is the entries appended since the
                // last look (the store has exactly the others); otherwise
                // the whole list is compared.
                match p.unconfirmed.appended() {
                    Some(new) if p.unconfirmed_persisted.len() + new.len() == p.unconfirmed.len() => {
                        for u in new {
                            p.unconfirmed_persisted.insert(u.id.clone(), u.fingerprint());
                            dirty
                                .unconfirmed
                                .push((did.clone(), u.id.clone(), Some(crate::state::to_json_text(u))));
                        }
                    }
                    _ => {
                        let mut current = HashSet::with_capacity(p.unconfirmed.len());
                        for u in p.unconfirmed.as_slice() {
                            current.insert(u.id.as_str());
                            let print = u.fingerprint();
                            if p.unconfirmed_persisted.get(&u.id) != Some(&print) {
                                p.unconfirmed_persisted.insert(u.id.clone(), print);
                                dirty.unconfirmed.push((
                                    did.clone(),
                                    u.id.clone(),
                                    Some(crate::state::to_json_text(u)),
                                ));
                            }
                        }
                        let gone: Vec<String> = p
                            .unconfirmed_persisted
                            .keys()
                            .filter(|id| !current.contains(id.as_str()))
                            .cloned()
                            .collect();
                        for id in gone {
                            p.unconfirmed_persisted.remove(&id);
                            dirty.unconfirmed.push((did.clone(), id, None));
                        }
                    }
                }
                p.unconfirmed.mark_clean();
            }
        }
        dirty.peers = peers;
        dirty
    }

    /// Keeps the duplicate-id memory and the unconfirmed messages out of
    /// the peer rows of [`Mesh::export_peer`] and reports their changes in
    /// [`Dirty::seen`] and [`Dirty::unconfirmed`] instead, so that a
    /// message costs a store a few small rows rather than a rewrite of
    /// lists thousands of entries long. Every peer is marked changed, with
    /// all of its entries new: the next [`Mesh::take_dirty`] moves what a
    /// store held inline into side rows. [`Mesh::import_parts`] turns it
    /// on. Without it, nothing is tracked (no memory grows).
    pub fn track_side_rows(&mut self) {
        self.side_rows = true;
        let dids: Vec<String> = self.peers.keys().cloned().collect();
        for did in dids {
            if let Some(p) = self.peers.get_mut(&did) {
                p.seen_persisted = p.seen_total.saturating_sub(p.seen.len() as u64);
                p.unconfirmed_persisted.clear();
            }
            self.touch(&did);
        }
    }

    fn touch(&mut self, peer: &str) {
        if !self.dirty_peers.contains(peer) {
            self.dirty_peers.insert(peer.to_owned());
        }
    }

    /// What was dropped or refused so far.
    pub fn stats(&self) -> MeshStats {
        self.stats
    }

    /// Peers with any state (sessions, buffered messages, KNOCKs awaiting
    /// a verdict, registry information).
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Drops the entry of `peer` if it holds nothing.
    fn prune(&mut self, peer: &str) {
        if self.peers.get(peer).is_some_and(Peer::is_empty) {
            self.peers.remove(peer);
        }
    }

    /// This agent's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// This agent's pre-keys.
    pub fn prekeys(&self) -> &PreKeys {
        &self.prekeys
    }

    /// The pre-keys, to change them (counted as changed for
    /// [`Mesh::take_dirty`]).
    pub fn prekeys_mut(&mut self) -> &mut PreKeys {
        self.dirty_prekeys = true;
        &mut self.prekeys
    }

    /// The limits and options, to change them.
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

    /// Leaving the relay on the application's initiative: the receipts
    /// still owed (so that a peer waiting for one does not wait for a
    /// retransmission), then [`Mesh::disconnect`]. The driver transmits,
    /// then closes the socket.
    pub fn leave(&mut self, rng: &mut impl CryptoRngCore, now: Timestamp) -> Vec<Event> {
        let mut events = self.flush_receipts(rng, now);
        events.extend(self.disconnect());
        events
    }

    /// The `disconnect` frame, then the WebSocket close (1000, `client
    /// disconnect`), as the TypeScript client does. Messages buffered
    /// before their KNOCK are dropped (reported). [`Mesh::leave`] also
    /// sends the receipts still owed first.
    pub fn disconnect(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        for (did, p) in &mut self.peers {
            for (_, m) in p.buffer.drain(..) {
                events.push(error(
                    ErrorKind::NoSession,
                    Some(did),
                    format!("message {:?} dropped: disconnecting before its KNOCK", m.id),
                ));
            }
        }
        self.count_errors(&events);
        events.push(Event::Transmit(
            Frame::Disconnect {
                from: Some(self.identity.did().to_string()),
            }
            .to_text(),
        ));
        events.push(Event::Close {
            code: CLOSE_NORMAL,
            reason: CLOSE_REASON_CLIENT.to_owned(),
        });
        events
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

    /// Records what the registry says of `peer`. For a peer without state
    /// yet it is kept aside (at most [`PEER_INFO_KEPT`] peers, oldest
    /// forgotten) until a session with it begins, so lookups cannot grow the
    /// persisted state.
    pub fn set_peer_info(&mut self, peer: &str, info: PeerInfo) {
        match self.peers.get_mut(peer) {
            Some(p) => {
                if info.dialect.is_some() {
                    p.dialect = info.dialect;
                }
                p.receipts = info.receipts;
                self.touch(peer);
            }
            None => {
                let merged = PeerInfo {
                    dialect: info
                        .dialect
                        .or_else(|| self.peer_info.get(peer).and_then(|i| i.dialect)),
                    receipts: info.receipts,
                };
                self.stash_info(peer, merged);
            }
        }
    }

    fn stash_info(&mut self, peer: &str, info: PeerInfo) {
        if self.peer_info.insert(peer.to_owned(), info).is_none() {
            self.peer_info_order.push_back(peer.to_owned());
            while self.peer_info_order.len() > PEER_INFO_KEPT {
                if let Some(old) = self.peer_info_order.pop_front() {
                    self.peer_info.remove(&old);
                }
            }
        }
    }

    /// The dialect used or learned for `peer`, if any.
    pub fn peer_dialect(&self, peer: &str) -> Option<KdfDialect> {
        match self.peers.get(peer) {
            Some(p) => p.dialect,
            None => self.peer_info.get(peer).and_then(|i| i.dialect),
        }
    }

    /// Sets the dialect for `peer` explicitly.
    pub fn set_peer_dialect(&mut self, peer: &str, dialect: KdfDialect) {
        match self.peers.get_mut(peer) {
            Some(p) => {
                p.dialect = Some(dialect);
                self.touch(peer);
            }
            None => {
                let receipts = self.peer_info.get(peer).is_some_and(|i| i.receipts);
                self.stash_info(
                    peer,
                    PeerInfo {
                        dialect: Some(dialect),
                        receipts,
                    },
                );
            }
        }
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
        let dialect = self.peer_dialect(peer).unwrap_or_default();
        let (channel, establishment) = SecureChannel::initiate(rng, &self.identity, &peer_did, bundle, dialect)?;
        let knock_id = self.ids.next_id();
        let p = peer_entry(&mut self.peers, &self.peer_info, peer);
        p.replace_channel(channel, true);
        p.resync_sent = None;
        p.pending = None;
        p.dialect = Some(dialect);
        p.sent_knock = Some(knock_id.clone());
        self.touch(peer);
        Ok(Frame::Knock(KnockFrame {
            from: self.identity.did().to_string(),
            to: peer.to_owned(),
            id: knock_id,
            ts: now.to_iso(),
            intent: serde_json::json!({"action": "establish_session"}),
            establishment: Some(establishment),
        })
        .to_text())
    }

    /// Heals a desynchronized session (see [`Event::ResyncNeeded`]): opens a
    /// new session from `bundle` and returns the KNOCK and a first (control)
    /// message that makes the peer replace its session and resend what we
    /// did not confirm. Transmit both, in order. What we did not have
    /// confirmed goes out again on the new session at the next
    /// [`Mesh::retransmit`]; the replaced session still decrypts messages
    /// in flight on it. When both sides resync at once (crossing KNOCKs),
    /// the side with the smaller DID keeps its own session and ignores the
    /// other's KNOCK; the other accepts it, so one session remains.
    ///
    /// Returns no frames when the resync asked for is moot: the peer's own
    /// new session replaced ours after [`Event::ResyncNeeded`] (the driver
    /// fetched the bundle meanwhile). Opening another session then would
    /// replace the one both sides share by one the peer ignores (its
    /// resync KNOCK wins a crossing), and our messages would stop
    /// decrypting there.
    pub fn resync(
        &mut self,
        rng: &mut impl CryptoRngCore,
        now: Timestamp,
        peer: &str,
        bundle: &PreKeyBundle,
    ) -> Result<Vec<String>, SendError> {
        if let Some(p) = self.peers.get_mut(peer) {
            if p.resync_asked.take() == Some(true) {
                // Accepting the peer's session already set what it did not
                // confirm to go out again on it.
                return Ok(Vec::new());
            }
        }
        // A KNOCK of the peer's own accepted meanwhile stays pending: if
        // our KNOCKs cross, the DID order decides which session both keep.
        let theirs = self.peers.get(peer).and_then(|p| p.pending.clone());
        let knock = self.open_session(rng, now, peer, bundle)?;
        let payload = serde_json::json!({ CONTROL_KEY: "resync" }).to_string();
        let id = self.ids.next_id();
        let message = self.encrypt_with_id(rng, now, peer, &id, payload.as_bytes())?;
        if let Some(p) = self.peers.get_mut(peer) {
            p.pending = theirs;
            p.resync_sent = Some(now);
            p.last_resync = Some(now);
            p.stalled_rounds = 0;
            // What the peer did not confirm may not have decrypted there:
            // it goes out again on the new session at the next retransmit.
            p.unconfirmed.resend_all();
        }
        Ok(vec![knock, message])
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
        let tracked = self.peers.get(peer).is_some_and(|p| p.receipts && p.channel.is_some());
        if tracked {
            let count = self.unconfirmed_count(peer);
            let bytes: usize = self.peers.values().map(|p| p.unconfirmed.bytes()).sum();
            if count >= self.config.max_unconfirmed_per_peer
                || bytes.saturating_add(payload.len()) > self.config.max_unconfirmed_bytes
            {
                self.stats.unconfirmed_refused += 1;
                return Err(SendError::TooManyUnconfirmed {
                    peer: peer.to_owned(),
                    count,
                    bytes,
                });
            }
        }
        let id = self.ids.next_id();
        let text = self.encrypt_with_id(rng, now, peer, &id, payload)?;
        if let Some(p) = self.peers.get_mut(peer) {
            if tracked {
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
            let encrypted = channel.encrypt(rng, payload)?;
            self.touch(peer);
            MessageBody::Encrypted(encrypted)
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
            Err(e) => {
                self.stats.frames_rejected += 1;
                vec![error(ErrorKind::Frame, None, e.to_string())]
            }
        }
    }

    /// Handles one parsed frame.
    pub fn handle_frame(&mut self, rng: &mut impl CryptoRngCore, now: Timestamp, frame: Frame) -> Vec<Event> {
        let mut events = Vec::new();
        let me = self.identity.did().as_str();
        let before = events.len();
        match frame {
            Frame::Message(m) if m.to == me => {
                let from = m.from.clone();
                self.on_message(rng, now, m, &mut events);
                self.prune(&from);
            }
            Frame::Knock(k) if k.to == me => {
                let from = k.from.clone();
                self.on_knock(now, k, &mut events);
                self.prune(&from);
            }
            Frame::KnockAccept(a) if a.to == me => events.push(Event::KnockAccepted { from: a.from }),
            Frame::KnockReject(r) if r.to == me => self.on_knock_reject(r, &mut events),
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
        self.count_errors(events.get(before..).unwrap_or_default());
        events
    }

    fn count_errors(&mut self, events: &[Event]) {
        for event in events {
            if let Event::Error(e) = event {
                match e.kind {
                    ErrorKind::Frame | ErrorKind::UnknownFrame | ErrorKind::Plaintext => {
                        self.stats.frames_rejected += 1
                    }
                    ErrorKind::Decrypt => self.stats.decrypt_failures += 1,
                    ErrorKind::NoSession => self.stats.buffered_dropped += 1,
                    ErrorKind::Rollback => self.stats.rollbacks_detected += 1,
                    ErrorKind::Knock | ErrorKind::Relay => {}
                }
            }
        }
    }

    /// A `knock_reject` ends the session we opened only when it answers our
    /// latest KNOCK (or names none, as older peers do).
    fn on_knock_reject(&mut self, r: KnockRejectFrame, events: &mut Vec<Event>) {
        let Some(p) = self.peers.get_mut(&r.from) else {
            events.push(error(
                ErrorKind::Knock,
                Some(&r.from),
                "knock_reject for a KNOCK we never sent",
            ));
            return;
        };
        let answers_ours = r.knock_id.is_empty() || p.sent_knock.as_deref() == Some(r.knock_id.as_str());
        if !answers_ours {
            events.push(error(
                ErrorKind::Knock,
                Some(&r.from),
                format!("knock_reject for {:?}, not our latest KNOCK: ignored", r.knock_id),
            ));
            return;
        }
        if p.resync_sent.take().is_some() && p.fresh {
            if let Some(previous) = p.previous.take() {
                // The peer refused our resync: keep the session we had (what
                // it did not confirm goes out again on it).
                p.channel = Some(previous);
                p.fresh = false;
                p.sent_knock = None;
                self.touch(&r.from);
                events.push(Event::KnockRejected {
                    from: r.from.clone(),
                    reason: r.reason,
                });
                return;
            }
        }
        p.channel = None;
        p.previous = None;
        p.unconfirmed.clear();
        p.sent_knock = None;
        self.touch(&r.from);
        events.push(Event::KnockRejected {
            from: r.from.clone(),
            reason: r.reason,
        });
        self.prune(&r.from);
    }

    fn on_knock(&mut self, now: Timestamp, knock: KnockFrame, events: &mut Vec<Event>) {
        if let Some(e) = &knock.establishment {
            // The establishment's identity key must be the sender's: a KNOCK
            // claiming a DID with another identity's key is refused before
            // the policy sees it.
            let bound = Did::parse(&knock.from).map_err(|e| e.to_string()).and_then(|did| {
                crate::binding::check_x25519_identity(&did, &e.identity_key).map_err(|e| e.to_string())
            });
            if let Err(reason) = bound {
                self.stats.knocks_refused += 1;
                events.push(error(
                    ErrorKind::Knock,
                    Some(&knock.from),
                    format!("KNOCK {:?} refused: {reason}", knock.id),
                ));
                return;
            }
        }
        let known_peer = self.peers.get(&knock.from);
        if let (Some(p), Some(e)) = (known_peer, &knock.establishment) {
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
        if let (Some(e), Some(p)) = (&knock.establishment, self.peers.get_mut(&knock.from)) {
            // Crossing resync KNOCKs (both sides found the session broken at
            // once): the side with the smaller DID keeps its own new session
            // and ignores the other's KNOCK, which the other side's
            // acceptance of ours makes moot. Remembered as handled, so that
            // the relay's redeliveries of it are ignored too.
            if p.receipts && p.resync_outstanding(now) && self.identity.did().as_str() < knock.from.as_str() {
                p.accepted(e.ephemeral_key);
                self.touch(&knock.from);
                events.push(error(
                    ErrorKind::Knock,
                    Some(&knock.from),
                    format!(
                        "KNOCK {:?} crosses our resync KNOCK: ours is kept (smaller DID), this one ignored",
                        knock.id
                    ),
                ));
                return;
            }
        }
        let known_peer = self.peers.get(&knock.from);
        let has_session = known_peer.is_some_and(|p| p.channel.is_some());
        let awaiting = known_peer.is_some_and(|p| p.awaiting_verdict.is_some());
        let pending_knocks = self.peers.values().filter(|p| p.awaiting_verdict.is_some()).count();
        let sessions = self.peers.values().filter(|p| p.channel.is_some()).count();
        if !awaiting && pending_knocks >= self.config.max_pending_knocks {
            self.stats.knocks_refused += 1;
            events.push(error(
                ErrorKind::Knock,
                Some(&knock.from),
                format!(
                    "KNOCK {:?} refused: {pending_knocks} KNOCKs already await a verdict",
                    knock.id
                ),
            ));
            return;
        }
        if !has_session && sessions >= self.config.max_sessions {
            self.stats.knocks_refused += 1;
            events.push(error(
                ErrorKind::Knock,
                Some(&knock.from),
                format!("KNOCK {:?} refused: {sessions} sessions, the limit", knock.id),
            ));
            let reply = self.reject_frame(now, &knock.from, &knock.id, "capacity");
            events.push(Event::Transmit(reply));
            return;
        }
        let p = peer_entry(&mut self.peers, &self.peer_info, &knock.from);
        if let Some((_, old)) = &p.awaiting_verdict {
            // A newer KNOCK replaces one still awaiting a verdict; a verdict
            // on the old one then applies to nothing.
            self.stats.knocks_superseded += 1;
            events.push(error(
                ErrorKind::Knock,
                Some(&knock.from),
                format!("KNOCK {:?} superseded by KNOCK {:?}", old.id, knock.id),
            ));
        }
        events.push(Event::KnockRequest {
            from: knock.from.clone(),
            knock_id: knock.id.clone(),
            intent: knock.intent.clone(),
        });
        p.awaiting_verdict = Some((now, knock));
    }

    fn reject_frame(&mut self, now: Timestamp, to: &str, knock_id: &str, reason: &str) -> String {
        Frame::KnockReject(KnockRejectFrame {
            from: self.identity.did().to_string(),
            to: to.to_owned(),
            id: self.ids.next_id(),
            knock_id: knock_id.to_owned(),
            reason: Some(reason.to_owned()),
            ts: now.to_iso(),
        })
        .to_text()
    }

    /// The KNOCK from `from` awaiting a verdict, if any: its id.
    pub fn pending_knock(&self, from: &str) -> Option<&str> {
        self.peers
            .get(from)
            .and_then(|p| p.awaiting_verdict.as_ref())
            .map(|(_, k)| k.id.as_str())
    }

    /// Applies the policy's verdict on KNOCK `knock_id` from `from`. A
    /// verdict on a KNOCK that no longer awaits one (a newer KNOCK from the
    /// same peer superseded it, it timed out, or it was decided) applies to
    /// nothing: it returns only an error event.
    pub fn decide_knock(
        &mut self,
        rng: &mut impl CryptoRngCore,
        now: Timestamp,
        from: &str,
        knock_id: &str,
        accept: bool,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        let me = self.identity.did().to_string();
        let Some(p) = self.peers.get_mut(from) else {
            self.stats.stale_verdicts += 1;
            events.push(error(
                ErrorKind::Knock,
                Some(from),
                format!("verdict on KNOCK {knock_id:?}, which awaits none: ignored"),
            ));
            return events;
        };
        let awaiting = p.awaiting_verdict.as_ref().map(|(_, k)| k.id.as_str());
        if awaiting != Some(knock_id) {
            let detail = match awaiting {
                Some(id) => format!("verdict on KNOCK {knock_id:?}, but {id:?} is the one awaiting: ignored"),
                None => format!("verdict on KNOCK {knock_id:?}, which awaits none: ignored"),
            };
            self.stats.stale_verdicts += 1;
            events.push(error(ErrorKind::Knock, Some(from), detail));
            return events;
        }
        let Some((_, knock)) = p.awaiting_verdict.take() else {
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
        self.count_errors(&events);
        self.prune(from);
        events
    }

    fn on_message(&mut self, rng: &mut impl CryptoRngCore, now: Timestamp, m: MessageFrame, events: &mut Vec<Event>) {
        let limit = self.config.seen_ids_per_peer;
        let plaintext_allowed = self.is_plaintext_peer(&m.from);
        // Only a message that may be buffered needs the count (a scan).
        let may_buffer = !self
            .peers
            .get(&m.from)
            .is_some_and(|p| p.awaiting_verdict.is_none() && (p.channel.is_some() || p.pending.is_some()));
        let buffered_peers = if may_buffer {
            self.peers.values().filter(|p| !p.buffer.is_empty()).count()
        } else {
            0
        };
        // Made only for the length of this call unless something is kept
        // (`prune` drops an empty entry afterwards).
        let p = peer_entry(&mut self.peers, &self.peer_info, &m.from);
        if p.seen_set.contains(&m.id) {
            // A copy of a message we have. A retransmitted copy took a new
            // message number: read it anyway (and drop what it says), so
            // that our receiving chain keeps in step with the sender's;
            // copies left unread leave gaps that add up past the skip
            // window. A relay's redelivery of a frame already read fails
            // here, as expected.
            if let (MessageBody::Encrypted(e), None) = (&m.body, &p.awaiting_verdict) {
                let read = match p.channel.as_mut().map(|c| c.decrypt(rng, e)) {
                    Some(Ok(_)) => true,
                    _ => p.previous.as_mut().is_some_and(|c| c.decrypt(rng, e).is_ok()),
                };
                if read && !self.dirty_peers.contains(&m.from) {
                    self.dirty_peers.insert(m.from.clone());
                }
            }
            // The sender may not have our receipt (it retransmits until it
            // does), so confirm again.
            if p.receipts
                && p.receipts_due.len() < self.config.max_receipts_due_per_peer
                && !p.receipts_due.contains(&m.id)
            {
                p.owe_receipt(now, m.id.clone());
            }
            events.push(Event::Transmit(ack_text(&m.id)));
            return;
        }
        let encrypted = match m.body {
            MessageBody::Plaintext(payload) => {
                if plaintext_allowed {
                    p.remember(&m.id, limit);
                    if !self.dirty_peers.contains(&m.from) {
                        self.dirty_peers.insert(m.from.clone());
                    }
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

        p.last_heard = Some(now);
        if p.pending.is_some()
            && p.receipts
            && p.resync_outstanding(now)
            && self.identity.did().as_str() < m.from.as_str()
        {
            // Crossing resyncs: the peer's KNOCK was accepted before ours
            // went out. Ours is kept (smaller DID); the peer takes ours.
            // Remembered as handled: a redelivered copy is ignored.
            if let Some(e) = p.pending.take() {
                p.accepted(e.ephemeral_key);
            }
            if !self.dirty_peers.contains(&m.from) {
                self.dirty_peers.insert(m.from.clone());
            }
            events.push(error(
                ErrorKind::Knock,
                Some(&m.from),
                "the peer's new session crosses our resync: ours is kept (smaller DID), its session dropped",
            ));
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
                            // The peer's new session wins over one we
                            // opened that it never answered.
                            p.replace_channel(channel, false);
                            p.resync_sent = None;
                            if let Some(moot) = &mut p.resync_asked {
                                *moot = true;
                            }
                            p.stalled_rounds = 0;
                            p.accepted(establishment.ephemeral_key);
                            p.pending = None;
                            p.dialect = Some(dialect);
                            // What the peer has not confirmed goes out again
                            // on the new session (its ids let it drop copies).
                            p.unconfirmed.resend_all();
                            if let Some(id) = establishment.one_time_key_id {
                                self.dirty_prekeys = true;
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
        let mut channel_error = None;
        if plaintext.is_none() {
            if let Some(channel) = p.channel.as_mut() {
                match channel.decrypt(rng, &encrypted) {
                    Ok(text) => {
                        plaintext = Some(text);
                        // The peer answered on the session we opened.
                        p.fresh = false;
                        p.resync_sent = None;
                    }
                    // Sent before the peer saw the session that replaced
                    // this one?
                    Err(e) => match p.previous.as_mut().map(|c| c.decrypt(rng, &encrypted)) {
                        Some(Ok(text)) => plaintext = Some(text),
                        _ => channel_error = Some(e),
                    },
                }
            }
        }
        if let Some(e) = channel_error {
            match e {
                DecryptError::DuplicateOrExpired { .. } if last_error.is_none() => {
                    // A message id we never saw, with a message number whose
                    // key is used up: the sender's state was restored from an
                    // older copy (or the relay redelivered a message older
                    // than our id memory). It cannot be decrypted; let the
                    // relay drop it, and say so.
                    events.push(Event::Transmit(ack_text(&m.id)));
                    let heal = p.may_resync(now);
                    events.push(error(
                        ErrorKind::Rollback,
                        Some(&m.from),
                        format!(
                            "message {:?} reuses a message number already consumed: the peer's session state \
                             looks restored from an older copy; {}",
                            m.id,
                            if p.receipts {
                                "opening a new session so it resends what we did not confirm"
                            } else {
                                "this message is lost (the peer does not support receipts)"
                            }
                        ),
                    ));
                    if heal {
                        p.last_resync = Some(now);
                        p.resync_asked = Some(false);
                        self.stats.resyncs_requested += 1;
                        events.push(Event::ResyncNeeded { peer: m.from.clone() });
                    }
                    return;
                }
                DecryptError::AuthenticationFailed
                | DecryptError::TooManySkipped { .. }
                | DecryptError::NoReceivingChain
                    if p.receipts && p.verified_encrypted && p.pending.is_none() =>
                {
                    // A session this peer proved it holds no longer decrypts
                    // its messages: its state was restored from a copy older
                    // than a ratchet step, or more frames than the skip
                    // window were lost in transit. Retrying cannot help
                    // (every resend takes a newer number); a new session
                    // does, and the peer resends on it what we did not
                    // confirm. A forged frame costs at most one resync per
                    // interval: the session we share stays usable for what
                    // is in flight until the new one decrypts.
                    if p.may_resync(now) {
                        p.last_resync = Some(now);
                        p.resync_asked = Some(false);
                        self.stats.resyncs_requested += 1;
                        events.push(Event::Transmit(ack_text(&m.id)));
                        events.push(error(
                            ErrorKind::Rollback,
                            Some(&m.from),
                            format!(
                                "message {:?} does not decrypt on the verified session ({e}): the session looks \
                                 desynchronized (the peer's state restored from an older copy, or more than \
                                 the skip window lost in transit); opening a new session so it resends what \
                                 we did not confirm (this message acknowledged to the relay)",
                                m.id
                            ),
                        ));
                        events.push(Event::ResyncNeeded { peer: m.from.clone() });
                        return;
                    }
                    if p.resync_under_way(now) {
                        events.push(Event::Transmit(ack_text(&m.id)));
                        events.push(error(
                            ErrorKind::Decrypt,
                            Some(&m.from),
                            format!(
                                "message {:?}: {e}; a new session is under way: acknowledged to the relay (the \
                                 peer resends it on the new session)",
                                m.id
                            ),
                        ));
                        return;
                    }
                    last_error = Some(e.to_string());
                }
                e => last_error = Some(e.to_string()),
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
        if !self.dirty_peers.contains(&m.from) {
            self.dirty_peers.insert(m.from.clone());
        }
        if let Some(control) = control_message(&payload) {
            match control {
                Control::Receipt(ids) => {
                    if p.unconfirmed.confirm(&ids) {
                        p.stalled_rounds = 0;
                        events.push(Event::Delivered {
                            peer: m.from.clone(),
                            ids,
                        });
                    }
                }
                Control::Resync => {
                    // Resend everything unconfirmed on the next retransmit.
                    p.stalled_rounds = 0;
                    p.unconfirmed.resend_all();
                }
            }
            events.push(Event::Transmit(ack_text(&m.id)));
            return;
        }
        if p.receipts {
            p.owe_receipt(now, m.id.clone());
            if p.receipts_due.len() > self.config.max_receipts_due_per_peer {
                p.receipts_due.remove(0);
                self.stats.receipts_dropped += 1;
            }
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
            if let Some((since, knock)) = &p.awaiting_verdict {
                if since.plus_ms(knock_timeout) <= now {
                    expired_knocks.push((did.clone(), knock.id.clone()));
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
        self.count_errors(&events);
        for (did, knock_id) in expired_knocks {
            events.push(error(
                ErrorKind::Knock,
                Some(&did),
                format!("no verdict on KNOCK {knock_id:?} within {knock_timeout} ms: rejected"),
            ));
            events.extend(self.decide_knock(rng, now, &did, &knock_id, false));
        }
        let emptied: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.is_empty())
            .map(|(d, _)| d.clone())
            .collect();
        for did in emptied {
            self.peers.remove(&did);
        }
        events
    }

    /// Encrypted receipts for the messages delivered since the last call, one
    /// control message per peer that supports them.
    pub fn flush_receipts(&mut self, rng: &mut impl CryptoRngCore, now: Timestamp) -> Vec<Event> {
        self.flush_receipts_of(rng, now, |p| !p.receipts_due.is_empty())
    }

    /// Encrypted receipts for the peers that `send_now` picks.
    fn flush_receipts_of(
        &mut self,
        rng: &mut impl CryptoRngCore,
        now: Timestamp,
        send_now: impl Fn(&Peer) -> bool,
    ) -> Vec<Event> {
        if !self.peers.values().any(&send_now) {
            return Vec::new();
        }
        let due: Vec<(String, Vec<String>)> = self
            .peers
            .iter_mut()
            .filter(|(_, p)| send_now(p))
            .map(|(d, p)| (d.clone(), std::mem::take(&mut p.receipts_due)))
            .collect();
        self.encrypt_receipts(rng, now, due)
    }

    /// One encrypted receipt control message per `(peer, ids)`.
    fn encrypt_receipts(
        &mut self,
        rng: &mut impl CryptoRngCore,
        now: Timestamp,
        due: Vec<(String, Vec<String>)>,
    ) -> Vec<Event> {
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

    /// [`Mesh::flush_receipts`] for the peers whose receipts are settled:
    /// owed [`EAGER_RECEIPTS`] or more, or the peer sent nothing new for
    /// [`RECEIPT_QUIET_MS`], or the oldest has waited
    /// [`RECEIPT_MAX_DELAY_MS`]. A driver calls it on a timer (the async
    /// client: every 100 ms); [`Mesh::flush_receipts`] sends all at once.
    pub fn flush_receipts_settled(&mut self, rng: &mut impl CryptoRngCore, now: Timestamp) -> Vec<Event> {
        self.flush_receipts_of(rng, now, |p| p.receipts_settled(now))
    }

    /// [`Mesh::flush_receipts`] for the peers that are owed at least
    /// [`EAGER_RECEIPTS`] receipts: called after a burst is handled, so a
    /// fast sender's window of messages awaiting receipts reopens before
    /// the periodic flush (the rest wait for it: one receipt message covers
    /// many messages).
    pub fn flush_receipts_due(&mut self, rng: &mut impl CryptoRngCore, now: Timestamp) -> Vec<Event> {
        self.flush_receipts_of(rng, now, |p| p.receipts_due.len() >= EAGER_RECEIPTS)
    }

    /// Re-encrypts messages to receipt-capable peers not confirmed within
    /// `older_than_ms` (the relay lost them, e.g. in a restart). They keep
    /// their ids, so the receiver drops copies it already has.
    ///
    /// A peer that kept sending through [`RESYNC_AFTER_STALLED_ROUNDS`] such
    /// rounds yet confirmed nothing has a session that no longer decrypts our
    /// messages: [`Event::ResyncNeeded`] (with a [`ErrorKind::Rollback`]
    /// error), at most once per [`RESYNC_INTERVAL_MS`]. A peer that is
    /// silent (offline) is not resynced: the relay keeps our messages.
    pub fn retransmit(&mut self, rng: &mut impl CryptoRngCore, now: Timestamp, older_than_ms: u64) -> Vec<Event> {
        let mut due = Vec::new();
        let mut resyncs = Vec::new();
        for (peer, p) in &mut self.peers {
            let before = due.len();
            // When the messages due now last went out.
            let mut sent = u64::MAX;
            p.unconfirmed.stamp_due(now.0, older_than_ms, |last, u| {
                sent = sent.min(last);
                due.push((peer.clone(), u.id.clone(), zeroize::Zeroizing::new(u.payload.clone())));
            });
            if due.len() == before || !p.receipts || p.channel.is_none() {
                continue;
            }
            // A round: was the peer heard from since these went out?
            if p.last_heard.is_some_and(|heard| heard.0 > sent) {
                p.stalled_rounds = p.stalled_rounds.saturating_add(1);
            }
            if p.stalled_rounds >= RESYNC_AFTER_STALLED_ROUNDS
                && p.pending.is_none()
                && p.awaiting_verdict.is_none()
                && p.may_resync(now)
            {
                p.stalled_rounds = 0;
                p.last_resync = Some(now);
                p.resync_asked = Some(false);
                self.stats.resyncs_requested += 1;
                resyncs.push(error(
                    ErrorKind::Rollback,
                    Some(peer),
                    format!(
                        "{} messages still unconfirmed after {RESYNC_AFTER_STALLED_ROUNDS} retransmissions while the \
                         peer kept sending: the session looks desynchronized (our messages no longer decrypt \
                         there); opening a new session so they go out again on it",
                        p.unconfirmed.len()
                    ),
                ));
                resyncs.push(Event::ResyncNeeded { peer: peer.clone() });
            }
        }
        self.count_errors(&resyncs);
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
        events.extend(resyncs);
        events
    }

    /// Messages to `peer` sent but not yet confirmed by a receipt.
    pub fn unconfirmed_count(&self, peer: &str) -> usize {
        self.peers.get(peer).map_or(0, |p| p.unconfirmed.len())
    }
}

/// One of meshwire's own control messages (never shown to the application).
#[derive(Debug, PartialEq, Eq)]
enum Control {
    /// End-to-end receipts for these message ids.
    Receipt(Vec<String>),
    /// The sender opened a new session because ours looked restored from an
    /// older copy: resend what it has not confirmed.
    Resync,
}

/// The control message `payload` is, if it is one.
fn control_message(payload: &[u8]) -> Option<Control> {
    // Cheap checks first: most payloads are not control messages.
    if !payload.starts_with(b"{") || !payload.windows(CONTROL_KEY.len()).any(|w| w == CONTROL_KEY.as_bytes()) {
        return None;
    }
    let value: Value = serde_json::from_slice(payload).ok()?;
    let kind = value.get(CONTROL_KEY)?.as_str()?;
    Some(match kind {
        "receipt" => Control::Receipt(
            value
                .get("ids")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
        ),
        "resync" => Control::Resync,
        // Other `$meshwire` kinds (`bytes`, ...) are payload encodings the
        // application decodes: not control messages.
        _ => return None,
    })
}

mod persist;
pub use persist::SideRows;
mod unconfirmed;
use unconfirmed::UnconfirmedList;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod resync_tests;
