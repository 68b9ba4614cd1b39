//! [`MeshClient`]: registry, relay socket and the mesh state machine, driven
//! by tokio.
//!
//! One background task owns the relay connection (connect with proof,
//! heartbeats, reconnection with backoff, receipts and retransmission);
//! the state machine ([`meshwire_proto::mesh::Mesh`]) sits behind a mutex
//! that is only ever held for synchronous work.

use crate::registry::{DiscoverResult, RegistryClient, RegistryError, RegistryOptions};
use crate::store::{SessionStore, StoreError};
use futures_util::{SinkExt, StreamExt};
use meshwire_proto::encoding::{b64_decode, b64_std};
use meshwire_proto::frames::{self, ConnectFrame, FetchPendingFrame};
use meshwire_proto::mesh::{ErrorKind, Event, Mesh, MeshConfig, PeerInfo, RandomUuids, SendError, CONTROL_KEY};
use meshwire_proto::time::Timestamp;
use meshwire_proto::{Did, Identity, KdfDialect, PreKeys};
use rand_core::{OsRng, RngCore};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch, Notify};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Registry metadata key advertising the X3DH KDF dialect.
pub const META_KDF: &str = "agentmesh_kdf";
/// Registry metadata key advertising end-to-end delivery receipts.
pub const META_RECEIPTS: &str = "meshwire_receipts";
/// Registry metadata key of the display name (as the TypeScript client).
pub const META_DISPLAY_NAME: &str = "display_name";

/// Longest time a state change waits before it is saved to the store.
pub const PERSIST_INTERVAL: Duration = Duration::from_millis(100);

/// Relay close code: another connection took over this DID.
pub const CLOSE_TAKEOVER: u16 = 4006;
/// Relay close code: the connect proof was rejected.
pub const CLOSE_PROOF_REJECTED: u16 = 4005;
/// Relay close code: authentication failed.
pub const CLOSE_AUTH_FAILED: u16 = 4003;

/// Peers whose registry metadata is cached at once (a KNOCK from a new
/// DID adds one); beyond it an arbitrary entry is evicted and looked up
/// again when needed.
pub const PEER_INFO_CACHE: usize = 4096;

/// Longest wait the client schedules. Longer timeouts, intervals and
/// backoffs saturate to it rather than overflow the clock (`Instant +
/// Duration` panics past the end of the clock's range).
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// Room allowed on the relay socket beyond [`MeshConfig::max_frame_bytes`]
/// for a relay's envelope around a frame (`pending_messages`, an `error`
/// frame quoting one). The state machine rejects any frame longer than
/// `max_frame_bytes` anyway; this limit makes the socket refuse a longer
/// WebSocket message or frame before it is buffered.
pub const RELAY_ENVELOPE_SLACK: usize = 64 * 1024;

/// The instant `timeout` from now, saturating at [`MAX_WAIT`]: never panics,
/// whatever the timeout (`Duration::MAX` included).
pub fn deadline_after(timeout: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout.min(MAX_WAIT))
        .or_else(|| now.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

/// `period` capped at [`MAX_WAIT`] (and at least 1 ms), for intervals and
/// sleeps whose length comes from configuration.
pub fn saturating_period(period: Duration) -> Duration {
    period.clamp(Duration::from_millis(1), MAX_WAIT)
}

/// Unverified text (a `from`, a relay's error detail) as it may appear in a
/// log line: control characters, quotes and non-ASCII escaped, so that a
/// newline in a DID cannot forge a second log line.
pub fn escape_log(text: &str) -> String {
    text.escape_default().to_string()
}

fn now() -> Timestamp {
    Timestamp(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

/// A client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("relay: {0}")]
    Relay(String),
    /// Joining the relay failed: refused, DNS, an HTTP status at the
    /// upgrade, TLS, a rejected `connect` (close code and reason), a
    /// timeout. [`MeshClient::connect`] reports the first attempt's failure
    /// at once instead of retrying.
    #[error("{0}")]
    RelayConnect(#[from] crate::relay_connect::ConnectFailure),
    #[error("session: {0}")]
    Session(#[from] SendError),
    /// The registry served `peer` a pre-key bundle made of other keys than
    /// the DID's: no session was opened (a malicious or compromised
    /// registry, or whoever could write that bundle, would read it).
    #[error("refused the registry's pre-key bundle for {peer}: {source}")]
    UntrustedBundle {
        peer: String,
        source: meshwire_proto::BundleError,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("state: {0}")]
    State(#[from] meshwire_proto::StateError),
    /// The saved state could not be loaded. Recovery (same identity, fresh
    /// pre-keys, peers KNOCK again): [`SessionStore::reset`],
    /// [`MeshClientBuilder::reset_corrupt_state`], or
    /// `meshwire state reset --state PATH`.
    #[error(
        "the saved state at {location} is corrupt ({reason}); to start over with the same identity, \
         remove it (`meshwire state reset --state {location}`, `SessionStore::reset`) or connect with \
         `reset_corrupt_state`"
    )]
    CorruptState { location: String, reason: String },
    #[error("invalid DID: {0}")]
    Did(#[from] meshwire_proto::DidError),
    #[error("payload is not serializable: {0}")]
    Payload(String),
    #[error("the client is closed")]
    Closed,
    #[error("timed out")]
    Timeout,
}

/// An application payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A JSON value (what TypeScript and Python agents send).
    Json(serde_json::Value),
    /// Raw bytes sent with [`MeshClient::send_bytes`].
    Bytes(Vec<u8>),
}

impl Payload {
    pub fn as_json(&self) -> Option<&serde_json::Value> {
        match self {
            Payload::Json(v) => Some(v),
            Payload::Bytes(_) => None,
        }
    }
}

/// A message for the application.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub from: String,
    pub id: String,
    pub payload: Payload,
    /// The decrypted bytes exactly as the sender encrypted them.
    pub raw: Vec<u8>,
    /// Sent in plaintext by an allow-listed peer.
    pub plaintext: bool,
}

fn decode_payload(raw: &[u8]) -> Payload {
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
    pub from: String,
    /// The id of the KNOCK frame: the verdict applies to this KNOCK only (a
    /// newer KNOCK from the same peer supersedes it).
    pub knock_id: String,
    pub intent: serde_json::Value,
    /// The knocking agent's registry metadata, when the registry has it.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Decides on KNOCKs: `true` accepts.
pub type KnockPolicy = Arc<dyn Fn(KnockInfo) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// A synchronous policy as a [`KnockPolicy`].
pub fn knock_policy(f: impl Fn(&KnockInfo) -> bool + Send + Sync + 'static) -> KnockPolicy {
    let f = Arc::new(f);
    Arc::new(move |info| {
        let verdict = f(&info);
        Box::pin(async move { verdict })
    })
}

/// What happened, besides messages (those go to the inbox).
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// Joined the relay (again, after `Disconnected`).
    Connected {
        reconnect: bool,
    },
    Disconnected {
        code: Option<u16>,
        reason: String,
    },
    /// Another connection took this DID over (close 4006, or AGT's 1000
    /// `session_replaced`). The client does not go dark: it reconnects
    /// with a fresh proof after a randomized backoff
    /// ([`ClientConfig::takeover_backoff`]), which takes the DID (and its
    /// stored mail) back from whoever replayed or stole a connect, and is
    /// followed by `Connected { reconnect: true }`. `attempt` counts the
    /// takeovers within [`ClientConfig::takeover_window`].
    Displaced {
        reason: String,
        attempt: u32,
    },
    /// Terminal: the DID was taken over more than
    /// [`ClientConfig::takeover_limit`] times within
    /// [`ClientConfig::takeover_window`], so another live instance of this
    /// agent holds it; this client stops reconnecting (the other keeps the
    /// DID). Two instances of one identity thus settle on one within
    /// about `takeover_limit` rounds instead of displacing each other
    /// forever.
    TakenOver {
        reason: String,
    },
    /// The relay refused us (4005 proof rejected, 4003 auth); no reconnection.
    Rejected {
        code: u16,
        reason: String,
    },
    Knock {
        from: String,
        accepted: bool,
    },
    KnockAccepted {
        from: String,
    },
    KnockRejected {
        from: String,
        reason: Option<String>,
    },
    SessionEstablished {
        peer: String,
    },
    /// The peer restarted: its new session replaced the old one.
    SessionReplaced {
        peer: String,
    },
    /// The peer confirmed these messages end to end.
    Delivered {
        peer: String,
        ids: Vec<String>,
    },
    Error {
        kind: ErrorKind,
        peer: Option<String>,
        detail: String,
    },
}

/// Frames sent and received, by type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FrameCounters {
    pub sent: BTreeMap<String, u64>,
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

    pub fn heartbeats_sent(&self) -> u64 {
        self.sent.get("heartbeat").copied().unwrap_or(0)
    }
}

/// How a [`MeshClient`] connects and behaves.
#[derive(Clone)]
pub struct ClientConfig {
    /// The relay URL. With a path it is used as given
    /// (`http://127.0.0.1:8443/agt/relay`); a bare `ws(s)://host:port` or
    /// `http(s)://host:port` gets `/ws` (see [`crate::relay_connect`]).
    pub relay_url: String,
    /// Base URL of the registry (`http://host:port`).
    pub registry_url: String,
    pub display_name: Option<String>,
    pub capabilities: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// One-time pre-keys published at a time.
    pub one_time_keys: usize,
    pub mesh: MeshConfig,
    pub heartbeat_interval: Duration,
    pub reconnect_base: Duration,
    pub reconnect_max: Duration,
    /// Offer and use end-to-end delivery receipts with peers that do too.
    pub receipts: bool,
    /// Resend messages a receipt-capable peer has not confirmed after this.
    pub retransmit_after: Duration,
    /// Connect without proof of possession (npm 4.0.0 compatibility relays).
    pub legacy_connect: bool,
    /// Per-peer X3DH dialect overrides (else: advertised, learned, `spec`).
    pub dialects: BTreeMap<String, KdfDialect>,
    pub registry: RegistryOptions,
    /// How long [`MeshClient::connect`] waits for the first relay connection.
    pub connect_timeout: Duration,
    /// Messages held for the application (default 10,000). When the inbox
    /// is full the client stops reading the relay socket: nothing is
    /// decrypted, dropped or acknowledged, the relay keeps (stores) what it
    /// cannot deliver, and reading resumes (with a `fetch_pending`) once
    /// the application has taken messages. One frame read just before the
    /// limit can add at most [`MeshConfig::verdict_buffer_per_peer`]
    /// messages beyond it (a KNOCK verdict releases what was buffered).
    /// Counted in [`ClientStats::inbox_full_pauses`].
    pub inbox_capacity: usize,
    /// Events held for [`MeshClient::next_event`] (default 1,024); when
    /// full, the oldest is dropped and [`ClientStats::events_dropped`]
    /// counts it.
    pub event_capacity: usize,
    /// Takeovers (4006) tolerated within [`Self::takeover_window`] before
    /// giving up with [`ClientEvent::TakenOver`] (default 3).
    pub takeover_limit: u32,
    /// The window in which takeovers are counted (default 10 minutes).
    pub takeover_window: Duration,
    /// Base of the randomized wait before taking the DID back after a
    /// takeover: uniformly between 1x and 3x this, doubled per takeover in
    /// the window (default 1 s).
    pub takeover_backoff: Duration,
    /// How often the signed pre-key is replaced (default 7 days); the
    /// previous one keeps answering KNOCKs for the state machine's grace
    /// period.
    pub signed_pre_key_rotation: Duration,
    /// How often the registry's count of our one-time keys is checked (and
    /// the stock refilled when it fell below three quarters of
    /// [`Self::one_time_keys`]) even when no KNOCK consumed one (default 5
    /// minutes): bundle fetches drain keys without a KNOCK.
    pub one_time_key_check: Duration,
    /// Start over with the same identity when the saved state is corrupt
    /// (default false: fail with [`ClientError::CorruptState`]).
    pub reset_corrupt_state: bool,
    /// Shared-secret token sent in the `connect` frame's `token` field, for
    /// relays started with one (AGT's `AGENTMESH_RELAY_TOKEN`, `meshwire
    /// serve --relay-token`). Never printed. Default: none.
    pub relay_token: Option<zeroize::Zeroizing<String>>,
    /// Hold each message's relay `ack` until the application calls
    /// [`MeshClient::ack`] (once it printed or stored the message), instead
    /// of acking when the message enters the inbox (default false). The
    /// relay redelivers what was not acked on the next connection. At most
    /// [`Self::inbox_capacity`] acks are held; beyond that the oldest is
    /// sent anyway (and traced). Note that a redelivered message whose
    /// ratchet step was already saved is dropped as a duplicate.
    pub manual_ack: bool,
}

impl ClientConfig {
    pub fn new(relay_url: impl Into<String>, registry_url: impl Into<String>) -> Self {
        Self {
            relay_url: relay_url.into(),
            registry_url: registry_url.into(),
            display_name: None,
            capabilities: Vec::new(),
            metadata: BTreeMap::new(),
            one_time_keys: 20,
            mesh: MeshConfig::default(),
            heartbeat_interval: Duration::from_secs(30),
            reconnect_base: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            receipts: true,
            retransmit_after: Duration::from_secs(10),
            legacy_connect: false,
            dialects: BTreeMap::new(),
            registry: RegistryOptions::default(),
            connect_timeout: Duration::from_secs(10),
            inbox_capacity: 10_000,
            event_capacity: 1024,
            takeover_limit: 3,
            takeover_window: Duration::from_secs(600),
            takeover_backoff: Duration::from_secs(1),
            signed_pre_key_rotation: Duration::from_secs(7 * 24 * 3600),
            one_time_key_check: Duration::from_secs(300),
            reset_corrupt_state: false,
            relay_token: None,
            manual_ack: false,
        }
    }

    /// Largest WebSocket message (and frame) the relay socket accepts:
    /// the mesh's `max_frame_bytes` plus [`RELAY_ENVELOPE_SLACK`].
    pub fn max_relay_message_bytes(&self) -> usize {
        self.mesh.max_frame_bytes.saturating_add(RELAY_ENVELOPE_SLACK)
    }
}

/// What the client dropped, refused or noticed, besides frames (see
/// [`MeshClient::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClientStats {
    /// Messages waiting in the application inbox now.
    pub inbox_len: usize,
    /// Times reading the relay socket paused because the inbox was full.
    pub inbox_full_pauses: u64,
    /// Events dropped (oldest first) because the event queue was full.
    pub events_dropped: u64,
    /// Takeovers (4006) seen since the client started.
    pub takeovers: u64,
    /// Sessions we opened with a bundle that had no one-time key (the
    /// peer's stock was empty or drained).
    pub sessions_without_one_time_key: u64,
    /// Signed pre-key rotations done by this client.
    pub signed_pre_key_rotations: u64,
    /// One-time key refills made because the registry's count was low.
    pub one_time_key_refills: u64,
    /// Peers' registry metadata evicted from the cache (it holds at most
    /// [`PEER_INFO_CACHE`] peers).
    pub peer_info_evicted: u64,
    /// What the state machine dropped or refused.
    #[serde(skip)]
    pub mesh: meshwire_proto::mesh::MeshStats,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("relay_url", &self.relay_url)
            .field("registry_url", &self.registry_url)
            .field("display_name", &self.display_name)
            .finish_non_exhaustive()
    }
}

/// The bounded event queue: the oldest event makes room for a new one.
struct EventQueue {
    queue: Mutex<VecDeque<ClientEvent>>,
    notify: Notify,
    capacity: usize,
    dropped: AtomicU64,
}

impl EventQueue {
    fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
        }
    }

    fn push(&self, event: ClientEvent) {
        let mut queue = lock(&self.queue);
        while queue.len() >= self.capacity {
            queue.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(event);
        drop(queue);
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    fn pop(&self) -> Option<ClientEvent> {
        lock(&self.queue).pop_front()
    }
}

/// Counters behind [`ClientStats`].
#[derive(Default)]
struct StatCounters {
    inbox_full_pauses: AtomicU64,
    takeovers: AtomicU64,
    sessions_without_one_time_key: AtomicU64,
    signed_pre_key_rotations: AtomicU64,
    one_time_key_refills: AtomicU64,
    peer_info_evicted: AtomicU64,
}

struct Inner {
    did: String,
    config: ClientConfig,
    mesh: Mutex<Mesh>,
    registry: RegistryClient,
    store: Option<Arc<dyn SessionStore>>,
    policy: Mutex<Option<KnockPolicy>>,
    outgoing: Mutex<VecDeque<String>>,
    outgoing_notify: Notify,
    inbox: Mutex<VecDeque<Message>>,
    inbox_notify: Notify,
    events: EventQueue,
    stats: StatCounters,
    counters: Mutex<FrameCounters>,
    peer_info: Mutex<HashMap<String, Option<BTreeMap<String, String>>>>,
    open_locks: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    connected: watch::Sender<bool>,
    /// Acks held for [`MeshClient::ack`] (`manual_ack`): (from, id, frame).
    held_acks: Mutex<VecDeque<(String, String, String)>>,
    /// Why the first attempt to join the relay failed (read by `connect`).
    join_failure: watch::Sender<Option<crate::relay_connect::ConnectFailure>>,
    /// KNOCK verdicts, applied by the connection task so that messages are
    /// handed to the application in the order their frames arrived.
    verdicts: mpsc::UnboundedSender<(String, String, bool)>,
    verdicts_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<(String, String, bool)>>,
    closed: AtomicBool,
    shutdown: Notify,
    consumed_since_upload: AtomicU64,
    dirty: AtomicBool,
    /// Held while the state is exported and saved: the periodic save and
    /// `close()` take turns, so an older export never lands last.
    saving: Mutex<()>,
    replenishing: AtomicBool,
    published: Mutex<usize>,
}

/// An agent on the mesh. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct MeshClient {
    inner: Arc<Inner>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClient")
            .field("did", &self.inner.did)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    fn emit(&self, event: ClientEvent) {
        self.events.push(event);
    }

    /// Whether the application inbox is at [`ClientConfig::inbox_capacity`].
    fn inbox_full(&self) -> bool {
        lock(&self.inbox).len() >= self.config.inbox_capacity.max(1)
    }

    fn count(&self, sent: bool, text: &str) {
        let kind = frame_kind(text);
        tracing::trace!(
            target: "meshwire",
            direction = if sent { "sent" } else { "received" },
            kind = %escape_log(&kind),
            "frame"
        );
        let mut c = lock(&self.counters);
        let map = if sent { &mut c.sent } else { &mut c.received };
        *map.entry(kind).or_default() += 1;
    }

    fn enqueue(&self, texts: impl IntoIterator<Item = String>) {
        let mut q = lock(&self.outgoing);
        q.extend(texts);
        drop(q);
        self.outgoing_notify.notify_one();
    }

    /// Marks the state for saving; the persister task saves it within
    /// [`PERSIST_INTERVAL`], and [`MeshClient::close`] saves it at once.
    /// Saving after every message would re-serialize every session and
    /// the receipt bookkeeping per message. A crash loses at most that
    /// interval of ratchet progress: the peer's later messages still
    /// decrypt (the receiving chains only move forward), and a message we
    /// encrypt again with an old number is rejected by the peer as a
    /// duplicate rather than weakening anything (nonces are random).
    fn persist(&self) {
        if self.store.is_some() {
            self.dirty.store(true, Ordering::SeqCst);
        }
    }

    /// Saves the state now if it changed since the last save.
    fn flush_state(&self) {
        let _turn = lock(&self.saving);
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return;
        }
        if let Some(store) = &self.store {
            let state = lock(&self.mesh).export_state();
            if let Err(e) = store.save(&self.did, &state) {
                self.emit(ClientEvent::Error {
                    kind: ErrorKind::Frame,
                    peer: None,
                    detail: format!("saving state: {e}"),
                });
            }
        }
    }

    /// Applies state-machine events.
    fn process(self: &Arc<Self>, events: Vec<Event>) {
        let mut transmit = Vec::new();
        let mut changed = false;
        for event in events {
            match event {
                Event::Transmit(text) => {
                    changed = true;
                    transmit.push(text);
                }
                Event::Message(m) => {
                    changed = true;
                    if self.config.manual_ack {
                        let mut held = lock(&self.held_acks);
                        while held.len() >= self.config.inbox_capacity.max(1) {
                            if let Some((from, id, ack)) = held.pop_front() {
                                tracing::warn!(target: "meshwire", from = %escape_log(&from), id = %escape_log(&id), "too many unacknowledged messages: acking the oldest");
                                transmit.push(ack);
                            }
                        }
                        held.push_back((m.from.clone(), m.id.clone(), m.ack.clone()));
                    } else {
                        transmit.push(m.ack.clone());
                    }
                    let message = Message {
                        from: m.from,
                        id: m.id,
                        payload: decode_payload(&m.payload),
                        raw: m.payload,
                        plaintext: m.plaintext,
                    };
                    lock(&self.inbox).push_back(message);
                    self.inbox_notify.notify_waiters();
                    self.inbox_notify.notify_one();
                }
                Event::KnockRequest { from, knock_id, intent } => self.spawn_knock_decision(from, knock_id, intent),
                Event::ResyncNeeded { peer } => self.spawn_resync(peer),
                // Only `Mesh::disconnect` emits it; the connection task closes.
                Event::Close { .. } => {}
                Event::KnockAccepted { from } => self.emit(ClientEvent::KnockAccepted { from }),
                Event::KnockRejected { from, reason } => self.emit(ClientEvent::KnockRejected { from, reason }),
                Event::SessionEstablished { peer } => self.emit(ClientEvent::SessionEstablished { peer }),
                Event::SessionReplaced { peer } => self.emit(ClientEvent::SessionReplaced { peer }),
                Event::OneTimeKeyConsumed { .. } => {
                    changed = true;
                    self.consumed_since_upload.fetch_add(1, Ordering::SeqCst);
                    self.maybe_replenish();
                }
                Event::Delivered { peer, ids } => {
                    changed = true;
                    self.emit(ClientEvent::Delivered { peer, ids });
                }
                Event::Error(e) => {
                    tracing::debug!(
                        target: "meshwire",
                        kind = ?e.kind,
                        peer = %escape_log(e.peer.as_deref().unwrap_or("-")),
                        detail = %escape_log(&e.detail),
                        "mesh error"
                    );
                    self.emit(ClientEvent::Error {
                        kind: e.kind,
                        peer: e.peer,
                        detail: e.detail,
                    });
                }
            }
        }
        if changed {
            self.persist();
        }
        if !transmit.is_empty() {
            self.enqueue(transmit);
        }
    }

    /// Opens a session with `peer` from its bundle: refuses (and traces) a
    /// bundle that is not the DID's keys, counts and traces a session that
    /// starts without a one-time key.
    fn open_session(
        &self,
        mesh: &mut Mesh,
        peer: &str,
        bundle: &meshwire_proto::PreKeyBundle,
    ) -> Result<String, ClientError> {
        let knock = mesh
            .open_session(&mut rand::thread_rng(), now(), peer, bundle)
            .map_err(|e| match e {
                SendError::X3dh(meshwire_proto::X3dhError::Bundle(
                    bundle_error @ meshwire_proto::BundleError::NotTheDidsKeys { .. },
                )) => {
                    tracing::warn!(
                        target: "meshwire",
                        peer = %escape_log(peer),
                        error = %escape_log(&bundle_error.to_string()),
                        "refused a pre-key bundle that is not the peer's keys"
                    );
                    ClientError::UntrustedBundle {
                        peer: peer.to_owned(),
                        source: bundle_error,
                    }
                }
                other => ClientError::Session(other),
            })?;
        if bundle.one_time_pre_key.is_none() {
            self.stats.sessions_without_one_time_key.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                target: "meshwire",
                peer = %escape_log(peer),
                "session opened without a one-time pre-key (the peer's stock is empty or was drained)"
            );
        }
        Ok(knock)
    }

    /// Opens a new session to a peer whose state looked restored from an
    /// older copy, so that it resends what we did not confirm.
    fn spawn_resync(self: &Arc<Self>, peer: String) {
        let inner = self.clone();
        tokio::spawn(async move {
            let result = async {
                let did = Did::parse(&peer).map_err(|e| e.to_string())?;
                let bundle = inner.registry.fetch_bundle(&did).await.map_err(|e| e.to_string())?;
                let frames = lock(&inner.mesh)
                    .resync(&mut rand::thread_rng(), now(), &peer, &bundle)
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(frames)
            }
            .await;
            match result {
                Ok(frames) => {
                    inner.persist();
                    inner.enqueue(frames);
                }
                Err(e) => inner.emit(ClientEvent::Error {
                    kind: ErrorKind::Rollback,
                    peer: Some(peer),
                    detail: format!("resync failed: {e}"),
                }),
            }
        });
    }

    fn spawn_knock_decision(self: &Arc<Self>, from: String, knock_id: String, intent: serde_json::Value) {
        let inner = self.clone();
        tokio::spawn(async move {
            let metadata = inner.peer_metadata(&from).await;
            let policy = lock(&inner.policy).clone();
            let accepted = match policy {
                Some(policy) => {
                    policy(KnockInfo {
                        from: from.clone(),
                        knock_id: knock_id.clone(),
                        intent,
                        metadata,
                    })
                    .await
                }
                None => true,
            };
            inner.emit(ClientEvent::Knock {
                from: from.clone(),
                accepted,
            });
            let _ = inner.verdicts.send((from, knock_id, accepted));
        });
    }

    /// The peer's registry metadata (cached), and what it says about
    /// receipts and the KDF dialect recorded in the state machine.
    async fn peer_metadata(&self, peer: &str) -> Option<BTreeMap<String, String>> {
        if let Some(cached) = lock(&self.peer_info).get(peer).cloned() {
            return cached;
        }
        let metadata = match Did::parse(peer) {
            Ok(did) => self.registry.get_agent(&did).await.ok().map(|record| record.metadata),
            Err(_) => None,
        };
        let info = PeerInfo {
            dialect: self.config.dialects.get(peer).copied().or_else(|| {
                metadata
                    .as_ref()
                    .and_then(|m| m.get(META_KDF))
                    .and_then(|d| d.parse().ok())
            }),
            receipts: self.config.receipts
                && metadata
                    .as_ref()
                    .and_then(|m| m.get(META_RECEIPTS))
                    .is_some_and(|v| v == "1"),
        };
        lock(&self.mesh).set_peer_info(peer, info);
        {
            let mut cache = lock(&self.peer_info);
            while cache.len() >= PEER_INFO_CACHE && !cache.contains_key(peer) {
                let Some(victim) = cache.keys().next().cloned() else {
                    break;
                };
                cache.remove(&victim);
                self.stats.peer_info_evicted.fetch_add(1, Ordering::Relaxed);
            }
            cache.insert(peer.to_owned(), metadata.clone());
        }
        metadata
    }

    fn maybe_replenish(self: &Arc<Self>) {
        let published = *lock(&self.published);
        let low_water = published.saturating_sub(published / 4).max(1) as u64;
        if self.consumed_since_upload.load(Ordering::SeqCst) < low_water {
            return;
        }
        if self.replenishing.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = self.clone();
        tokio::spawn(async move {
            if let Err(e) = inner.publish_one_time_keys().await {
                inner.emit(ClientEvent::Error {
                    kind: ErrorKind::Frame,
                    peer: None,
                    detail: format!("replenishing one-time keys: {e}"),
                });
            }
            inner.replenishing.store(false, Ordering::SeqCst);
        });
    }

    /// Rotates the signed pre-key if it is older than
    /// [`ClientConfig::signed_pre_key_rotation`] (and forgets the previous
    /// one past its grace period); returns whether it rotated. The caller
    /// uploads the new bundle.
    fn rotate_signed_pre_key_if_due(&self) -> bool {
        let now_ms = now().0;
        let interval_ms = u64::try_from(self.config.signed_pre_key_rotation.as_millis()).unwrap_or(u64::MAX);
        let rotated = {
            let mut mesh = lock(&self.mesh);
            let identity = Identity::from_seed(&mesh.identity().seed());
            let prekeys = mesh.prekeys_mut();
            let forgot =
                prekeys.forget_expired_signed_pre_key(now_ms, meshwire_proto::prekeys::SIGNED_PRE_KEY_GRACE_MS);
            if forgot {
                self.persist();
            }
            prekeys
                .signed_pre_key_rotation_due(now_ms, interval_ms)
                .then(|| prekeys.rotate_signed_pre_key(&mut rand::thread_rng(), &identity, now_ms))
        };
        if let Some(id) = rotated {
            self.persist();
            self.stats.signed_pre_key_rotations.fetch_add(1, Ordering::Relaxed);
            tracing::info!(target: "meshwire", signed_pre_key_id = id, "rotated the signed pre-key");
        }
        rotated.is_some()
    }

    /// One round of pre-key upkeep: rotate the signed pre-key when due,
    /// and refill the one-time keys when the registry's count of them
    /// (meshwire-server reports `otk_count` on the agent record; AGT 5.0.0
    /// does not, and there the refill follows consumed keys only) fell
    /// below three quarters of [`ClientConfig::one_time_keys`].
    async fn maintain_prekeys(self: &Arc<Self>) -> Result<(), ClientError> {
        if self.rotate_signed_pre_key_if_due() {
            self.publish_one_time_keys().await?;
            return Ok(());
        }
        let Ok(did) = Did::parse(&self.did) else { return Ok(()) };
        let record = self.registry.get_agent(&did).await?;
        let Some(held) = record.extra.get("otk_count").and_then(serde_json::Value::as_u64) else {
            return Ok(());
        };
        let wanted = self.config.one_time_keys as u64;
        let low_water = wanted.saturating_sub(wanted / 4);
        if held < low_water && !self.replenishing.swap(true, Ordering::SeqCst) {
            tracing::info!(
                target: "meshwire",
                held,
                wanted,
                "the registry holds few of our one-time keys; refilling"
            );
            let published = self.publish_one_time_keys().await;
            self.replenishing.store(false, Ordering::SeqCst);
            published?;
            self.stats.one_time_key_refills.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Draws a fresh batch of one-time keys and publishes exactly that batch.
    /// Older keys keep their privates (a peer may hold one already) until
    /// used, up to a cap.
    async fn publish_one_time_keys(self: &Arc<Self>) -> Result<(), ClientError> {
        const MAX_HELD: usize = 500;
        let (prekeys, ids) = {
            let mut mesh = lock(&self.mesh);
            let ids = mesh
                .prekeys_mut()
                .generate_one_time_keys(&mut rand::thread_rng(), self.config.one_time_keys)
                .map_err(|e| ClientError::Relay(format!("one-time keys: {e}")))?;
            let held: Vec<u32> = mesh.prekeys().one_time_key_ids().collect();
            for old in held.iter().take(held.len().saturating_sub(MAX_HELD)) {
                let _ = mesh.prekeys_mut().remove_one_time_key(*old);
            }
            (mesh.prekeys().clone(), ids)
        };
        self.persist();
        let identity = Identity::from_seed(&lock(&self.mesh).identity().seed());
        self.registry.upload_prekeys(&identity, &prekeys, &ids).await?;
        self.consumed_since_upload.store(0, Ordering::SeqCst);
        *lock(&self.published) = ids.len();
        Ok(())
    }
}

/// Pre-key upkeep until the client is dropped or closed: every
/// [`ClientConfig::one_time_key_check`] (or sooner when the signed pre-key
/// rotation interval is shorter).
async fn maintain_prekeys(inner: std::sync::Weak<Inner>) {
    let period = {
        let Some(inner) = inner.upgrade() else { return };
        saturating_period(
            inner
                .config
                .one_time_key_check
                .min(inner.config.signed_pre_key_rotation / 2)
                .max(Duration::from_millis(100)),
        )
    };
    let mut tick = tokio::time::interval(period);
    tick.reset();
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = inner.maintain_prekeys().await {
            tracing::debug!(target: "meshwire", error = %escape_log(&e.to_string()), "pre-key upkeep failed");
            inner.emit(ClientEvent::Error {
                kind: ErrorKind::Frame,
                peer: None,
                detail: format!("pre-key upkeep: {e}"),
            });
        }
    }
}

/// The saved mesh state of `identity`: `None` if there is none (or it was
/// corrupt and `reset_corrupt_state` is set); a corrupt one is a
/// [`ClientError::CorruptState`] naming where it is.
fn load_state(
    store: &dyn SessionStore,
    identity: &Identity,
    config: &ClientConfig,
) -> Result<Option<Mesh>, ClientError> {
    let did = identity.did().as_str();
    let loaded = store.load(did).map_err(|e| match e {
        StoreError::Io { .. } | StoreError::Permissions { .. } | StoreError::State { .. } => ClientError::Store(e),
        StoreError::Format { reason, .. } => ClientError::CorruptState {
            location: store.location(did),
            reason,
        },
    });
    let imported = loaded.and_then(|saved| {
        saved
            .map(|state| {
                Mesh::import_state(
                    Identity::from_seed(&identity.seed()),
                    &state,
                    config.mesh.clone(),
                    Box::new(RandomUuids),
                )
                .map_err(|e| ClientError::CorruptState {
                    location: store.location(did),
                    reason: e.to_string(),
                })
            })
            .transpose()
    });
    match imported {
        Err(ClientError::CorruptState { location, reason }) if config.reset_corrupt_state => {
            tracing::warn!(
                target: "meshwire",
                location = %escape_log(&location),
                reason = %escape_log(&reason),
                "corrupt saved state: starting over with the same identity"
            );
            store.reset(did)?;
            Ok(None)
        }
        other => other,
    }
}

fn frame_kind(text: &str) -> String {
    // The type is near the start of every frame; avoid a full parse.
    let head = text.get(..text.len().min(200)).unwrap_or(text);
    head.split("\"type\":")
        .nth(1)
        .and_then(|rest| rest.trim_start().strip_prefix('"'))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("unknown")
        .to_owned()
}

/// Builds and connects a [`MeshClient`].
pub struct MeshClientBuilder {
    identity: Identity,
    config: ClientConfig,
    store: Option<Arc<dyn SessionStore>>,
    policy: Option<KnockPolicy>,
}

impl MeshClientBuilder {
    /// Starts over with the same identity when the saved state cannot be
    /// loaded (it is reset in the store, and a warning is logged), instead
    /// of failing with [`ClientError::CorruptState`].
    pub fn reset_corrupt_state(mut self, reset: bool) -> Self {
        self.config.reset_corrupt_state = reset;
        self
    }

    pub fn display_name(mut self, name: impl Into<String>) -> Self {
        self.config.display_name = Some(name.into());
        self
    }

    pub fn capabilities(mut self, caps: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.config.capabilities = caps.into_iter().map(Into::into).collect();
        self
    }

    pub fn store(mut self, store: Arc<dyn SessionStore>) -> Self {
        self.store = Some(store);
        self
    }

    pub fn store_opt(mut self, store: Option<Arc<dyn SessionStore>>) -> Self {
        self.store = store;
        self
    }

    pub fn knock_policy(mut self, policy: KnockPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The relay's shared-secret token ([`ClientConfig::relay_token`]).
    pub fn relay_token(mut self, token: impl Into<String>) -> Self {
        self.config.relay_token = Some(zeroize::Zeroizing::new(token.into()));
        self
    }

    pub fn config(mut self, f: impl FnOnce(&mut ClientConfig)) -> Self {
        f(&mut self.config);
        self
    }

    /// Registers, publishes pre-keys and joins the relay.
    pub async fn connect(self) -> Result<MeshClient, ClientError> {
        MeshClient::connect(self.identity, self.config, self.store, self.policy).await
    }
}

impl MeshClient {
    pub fn builder(
        identity: Identity,
        relay_url: impl Into<String>,
        registry_url: impl Into<String>,
    ) -> MeshClientBuilder {
        MeshClientBuilder {
            identity,
            config: ClientConfig::new(relay_url, registry_url),
            store: None,
            policy: None,
        }
    }

    /// Registers `identity` (proof of possession), publishes its pre-keys,
    /// joins the relay and starts the background connection task. With a
    /// `store` holding earlier state, sessions and pending one-time keys
    /// carry on where they were.
    pub async fn connect(
        identity: Identity,
        config: ClientConfig,
        store: Option<Arc<dyn SessionStore>>,
        policy: Option<KnockPolicy>,
    ) -> Result<Self, ClientError> {
        let did = identity.did().to_string();
        crate::relay_connect::RelayEndpoint::parse(&config.relay_url)
            .map_err(crate::relay_connect::ConnectFailure::from)?;
        let registry = RegistryClient::new(&config.registry_url, config.registry.clone())?;
        let saved = match &store {
            Some(store) => load_state(store.as_ref(), &identity, &config)?,
            None => None,
        };
        let restored = saved.is_some();
        let mut mesh = match saved {
            Some(mesh) => mesh,
            None => {
                let mut prekeys = PreKeys::generate(&mut rand::thread_rng(), &identity);
                prekeys.set_signed_pre_key_created_ms(now().0);
                Mesh::new(
                    Identity::from_seed(&identity.seed()),
                    prekeys,
                    config.mesh.clone(),
                    Box::new(RandomUuids),
                )
            }
        };
        for (peer, dialect) in &config.dialects {
            mesh.set_peer_dialect(peer, *dialect);
        }

        let mut capabilities = Vec::new();
        if let Some(name) = &config.display_name {
            capabilities.push(name.clone());
        }
        for c in &config.capabilities {
            if !capabilities.contains(c) {
                capabilities.push(c.clone());
            }
        }
        let mut metadata = config.metadata.clone();
        if let Some(name) = &config.display_name {
            metadata.entry(META_DISPLAY_NAME.into()).or_insert_with(|| name.clone());
        }
        metadata.insert(META_KDF.into(), KdfDialect::Spec.as_str().into());
        if config.receipts {
            metadata.insert(META_RECEIPTS.into(), "1".into());
        }
        let registered = registry.register(&identity, &capabilities, &metadata).await?;
        if registered.as_str() != did {
            return Err(ClientError::Relay(format!(
                "registry assigned {registered}, expected {did}"
            )));
        }

        let event_capacity = config.event_capacity;
        let (verdicts, verdicts_rx) = mpsc::unbounded_channel();
        let (connected, mut connected_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            did,
            config,
            mesh: Mutex::new(mesh),
            registry,
            store,
            policy: Mutex::new(policy),
            outgoing: Mutex::new(VecDeque::new()),
            outgoing_notify: Notify::new(),
            inbox: Mutex::new(VecDeque::new()),
            inbox_notify: Notify::new(),
            events: EventQueue::new(event_capacity),
            stats: StatCounters::default(),
            counters: Mutex::new(FrameCounters::default()),
            peer_info: Mutex::new(HashMap::new()),
            open_locks: tokio::sync::Mutex::new(HashMap::new()),
            connected,
            join_failure: watch::Sender::new(None),
            held_acks: Mutex::new(VecDeque::new()),
            verdicts,
            verdicts_rx: tokio::sync::Mutex::new(verdicts_rx),
            closed: AtomicBool::new(false),
            shutdown: Notify::new(),
            consumed_since_upload: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            saving: Mutex::new(()),
            replenishing: AtomicBool::new(false),
            published: Mutex::new(0),
        });

        if restored && inner.rotate_signed_pre_key_if_due() {
            // A signed pre-key older than the rotation interval (or of
            // unknown age: states saved before rotation existed) is
            // replaced before it is published again.
            inner.publish_one_time_keys().await?;
        } else if restored {
            // Republish what we hold: the registry may have lost it, and
            // these are the keys we can still answer.
            let (prekeys, held) = {
                let mesh = lock(&inner.mesh);
                (
                    mesh.prekeys().clone(),
                    mesh.prekeys().one_time_key_ids().collect::<Vec<_>>(),
                )
            };
            if held.len() < inner.config.one_time_keys / 2 {
                inner.publish_one_time_keys().await?;
            } else {
                inner.registry.upload_prekeys(&identity, &prekeys, &held).await?;
                *lock(&inner.published) = held.len();
            }
        } else {
            inner.publish_one_time_keys().await?;
        }

        let task = tokio::spawn(run_connection(inner.clone()));
        tokio::spawn(maintain_prekeys(Arc::downgrade(&inner)));
        if inner.store.is_some() {
            let persister = Arc::downgrade(&inner);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(PERSIST_INTERVAL).await;
                    let Some(inner) = persister.upgrade() else { return };
                    inner.flush_state();
                    if inner.closed.load(Ordering::SeqCst) {
                        return;
                    }
                }
            });
        }
        let client = Self {
            inner: inner.clone(),
            task: Arc::new(Mutex::new(Some(task))),
        };
        // Joined, or the first attempt failed (its cause is reported at
        // once: no retry), or the connect timeout passed.
        let mut failure_rx = inner.join_failure.subscribe();
        let wait = async {
            loop {
                if *connected_rx.borrow_and_update() {
                    return Ok(());
                }
                if let Some(failure) = failure_rx.borrow_and_update().clone() {
                    return Err(Some(failure));
                }
                tokio::select! {
                    changed = connected_rx.changed() => if changed.is_err() { return Err(None) },
                    changed = failure_rx.changed() => if changed.is_err() { return Err(None) },
                }
            }
        };
        let url = crate::relay_connect::RelayEndpoint::parse(&inner.config.relay_url)
            .map(|e| e.to_string())
            .unwrap_or_else(|_| inner.config.relay_url.clone());
        let failure = match tokio::time::timeout(inner.config.connect_timeout, wait).await {
            Ok(Ok(())) => return Ok(client),
            Ok(Err(Some(failure))) => failure,
            Ok(Err(None)) => crate::relay_connect::ConnectFailure::Closed {
                url,
                detail: "the connection task stopped".into(),
            },
            Err(_) => crate::relay_connect::ConnectFailure::Timeout {
                url,
                after: inner.config.connect_timeout,
            },
        };
        client.close().await;
        Err(ClientError::RelayConnect(failure))
    }

    pub fn did(&self) -> &str {
        &self.inner.did
    }

    /// Whether the relay connection is up right now.
    pub fn is_connected(&self) -> bool {
        *self.inner.connected.borrow()
    }

    /// Replaces the KNOCK policy (default: accept every KNOCK).
    pub fn set_knock_policy(&self, policy: Option<KnockPolicy>) {
        *lock(&self.inner.policy) = policy;
    }

    /// Allows `peer` to exchange plaintext until it is seen encrypted.
    pub fn allow_plaintext_peer(&self, peer: &str) {
        lock(&self.inner.mesh)
            .config_mut()
            .plaintext_peers
            .insert(peer.to_owned());
    }

    /// Sends a JSON-serializable payload (as `JSON.stringify` would), opening
    /// a session first if needed; returns the message id. Queued while the
    /// relay is unreachable.
    pub async fn send(&self, peer: &str, payload: &impl Serialize) -> Result<String, ClientError> {
        let bytes = serde_json::to_vec(payload).map_err(|e| ClientError::Payload(e.to_string()))?;
        self.send_json_text(peer, &bytes).await
    }

    /// Sends raw bytes (received by meshwire peers as [`Payload::Bytes`]).
    pub async fn send_bytes(&self, peer: &str, data: &[u8]) -> Result<String, ClientError> {
        let envelope = serde_json::json!({ CONTROL_KEY: "bytes", "data": b64_std(data) });
        self.send_json_text(peer, envelope.to_string().as_bytes()).await
    }

    /// Sends already serialized JSON text as it is.
    pub async fn send_json_text(&self, peer: &str, json: &[u8]) -> Result<String, ClientError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(ClientError::Closed);
        }
        let peer_did = Did::parse(peer)?;
        let peer_lock = {
            let mut locks = self.inner.open_locks.lock().await;
            locks.entry(peer.to_owned()).or_default().clone()
        };
        let _guard = peer_lock.lock().await;
        let mut bundle = None;
        loop {
            // Opening the session and encrypting happen under one lock, so
            // no frame handled in between (a knock_reject) can come between.
            let sent = {
                let mut mesh = lock(&self.inner.mesh);
                if mesh.has_session(peer) || mesh.is_plaintext_peer(peer) {
                    let (id, text) = mesh.encrypt(&mut rand::thread_rng(), now(), peer, json)?;
                    Some((id, vec![text]))
                } else if let Some(bundle) = bundle.take() {
                    let knock = self.inner.open_session(&mut mesh, peer, &bundle)?;
                    let (id, text) = mesh.encrypt(&mut rand::thread_rng(), now(), peer, json)?;
                    Some((id, vec![knock, text]))
                } else {
                    None
                }
            };
            if let Some((id, texts)) = sent {
                self.inner.persist();
                self.inner.enqueue(texts);
                return Ok(id);
            }
            bundle = Some(self.fetch_bundle(&peer_did).await?);
        }
    }

    /// Opens a session with `peer` unless one exists (fetches its bundle,
    /// runs X3DH, sends the KNOCK).
    pub async fn ensure_session(&self, peer: &Did) -> Result<(), ClientError> {
        let key = peer.to_string();
        let peer_lock = {
            let mut locks = self.inner.open_locks.lock().await;
            locks.entry(key.clone()).or_default().clone()
        };
        let _guard = peer_lock.lock().await;
        if lock(&self.inner.mesh).has_session(&key) {
            return Ok(());
        }
        let bundle = self.fetch_bundle(peer).await?;
        let knock = self.inner.open_session(&mut lock(&self.inner.mesh), &key, &bundle)?;
        self.inner.persist();
        self.inner.enqueue([knock]);
        Ok(())
    }

    /// The peer's bundle, after learning what its registry metadata says
    /// about receipts and its KDF dialect.
    async fn fetch_bundle(&self, peer: &Did) -> Result<meshwire_proto::PreKeyBundle, ClientError> {
        self.inner.peer_metadata(peer.as_str()).await;
        Ok(self.inner.registry.fetch_bundle(peer).await?)
    }

    /// The next message, waiting for one; `None` once the client is closed.
    pub async fn recv(&self) -> Option<Message> {
        loop {
            let notified = self.inner.inbox_notify.notified();
            if let Some(m) = lock(&self.inner.inbox).pop_front() {
                return Some(m);
            }
            if self.inner.closed.load(Ordering::SeqCst) {
                return None;
            }
            notified.await;
        }
    }

    /// The next message within `timeout`.
    pub async fn recv_timeout(&self, timeout: Duration) -> Result<Message, ClientError> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| ClientError::Timeout)?
            .ok_or(ClientError::Closed)
    }

    /// The next message from any of `senders` within `timeout`; messages from
    /// others stay in the inbox, in order.
    pub async fn recv_from_any(&self, senders: &[&str], timeout: Duration) -> Result<Message, ClientError> {
        let wait = async {
            loop {
                let notified = self.inner.inbox_notify.notified();
                {
                    let mut inbox = lock(&self.inner.inbox);
                    if let Some(i) = inbox.iter().position(|m| senders.contains(&m.from.as_str())) {
                        return inbox.remove(i).ok_or(ClientError::Closed);
                    }
                }
                if self.inner.closed.load(Ordering::SeqCst) {
                    return Err(ClientError::Closed);
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// One message from each of `senders`, waiting at most `timeout` in all;
    /// returns what arrived (fewer on timeout), in arrival order.
    pub async fn gather(&self, senders: &[&str], timeout: Duration) -> Vec<Message> {
        let deadline = deadline_after(timeout);
        let mut waiting: Vec<&str> = senders.to_vec();
        let mut out = Vec::new();
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_from_any(&waiting, left).await {
                Ok(m) => {
                    waiting.retain(|s| *s != m.from);
                    out.push(m);
                }
                Err(_) => break,
            }
        }
        out
    }

    /// Every message already received, without waiting.
    pub fn drain(&self) -> Vec<Message> {
        lock(&self.inner.inbox).drain(..).collect()
    }

    /// The next event (connection changes, KNOCKs, errors...); `None` once
    /// the client is closed and every queued event was taken. At most
    /// [`ClientConfig::event_capacity`] events wait; older ones are dropped
    /// (counted in [`ClientStats::events_dropped`]).
    pub async fn next_event(&self) -> Option<ClientEvent> {
        let events = &self.inner.events;
        loop {
            let notified = events.notify.notified();
            if let Some(event) = events.pop() {
                return Some(event);
            }
            if self.inner.closed.load(Ordering::SeqCst) {
                return None;
            }
            notified.await;
        }
    }

    /// The next event within `timeout`.
    pub async fn next_event_timeout(&self, timeout: Duration) -> Option<ClientEvent> {
        tokio::time::timeout(timeout, self.next_event()).await.ok().flatten()
    }

    /// Events already queued, without waiting.
    pub fn try_events(&self) -> Vec<ClientEvent> {
        lock(&self.inner.events.queue).drain(..).collect()
    }

    /// What the client dropped, refused or noticed so far.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.stats;
        ClientStats {
            inbox_len: lock(&self.inner.inbox).len(),
            inbox_full_pauses: c.inbox_full_pauses.load(Ordering::Relaxed),
            events_dropped: self.inner.events.dropped.load(Ordering::Relaxed),
            takeovers: c.takeovers.load(Ordering::Relaxed),
            sessions_without_one_time_key: c.sessions_without_one_time_key.load(Ordering::Relaxed),
            signed_pre_key_rotations: c.signed_pre_key_rotations.load(Ordering::Relaxed),
            one_time_key_refills: c.one_time_key_refills.load(Ordering::Relaxed),
            peer_info_evicted: c.peer_info_evicted.load(Ordering::Relaxed),
            mesh: lock(&self.inner.mesh).stats(),
        }
    }

    /// Agents advertising `capability`.
    pub async fn discover(&self, capability: &str) -> Result<Vec<DiscoverResult>, ClientError> {
        Ok(self.inner.registry.discover(capability, None).await?)
    }

    /// The DID of the agent published as `display_name`; when several carry
    /// it (restarted agents leave stale registrations behind), the most
    /// recently seen.
    ///
    /// **A hint, not an identity.** Registration metadata (the display name,
    /// capabilities, the advertised KDF and receipts support) is not covered
    /// by the registration proof: whoever registers, or the registry itself,
    /// can claim any name. The DID returned is bound to its keys (sessions
    /// to it are refused unless its bundle carries that DID's keys), but
    /// nothing says it is the agent you meant: pin DIDs you trust, and decide
    /// who may do what in the KNOCK policy, which sees authenticated DIDs.
    /// See `docs/SECURITY.md`.
    pub async fn find(&self, display_name: &str) -> Result<Option<String>, ClientError> {
        let mut best: Option<(Option<Timestamp>, String)> = None;
        for hit in self.inner.registry.discover(display_name, Some(200)).await? {
            if hit.did.as_str() == self.inner.did {
                continue;
            }
            let (seen, named) = match self.inner.registry.get_agent(&hit.did).await {
                Ok(record) => (
                    record.last_seen.or(hit.last_seen),
                    record.metadata.get(META_DISPLAY_NAME).is_none_or(|n| n == display_name),
                ),
                Err(_) => (hit.last_seen, true),
            };
            if named && best.as_ref().is_none_or(|(s, _)| seen > *s) {
                best = Some((seen, hit.did.to_string()));
            }
        }
        Ok(best.map(|(_, did)| did))
    }

    /// Sends the relay `ack` held for `message` (with
    /// [`ClientConfig::manual_ack`]); `false` if none was held (acked
    /// already, or `manual_ack` is off).
    pub fn ack(&self, message: &Message) -> bool {
        let ack = {
            let mut held = lock(&self.inner.held_acks);
            let Some(i) = held
                .iter()
                .position(|(f, id, _)| *f == message.from && *id == message.id)
            else {
                return false;
            };
            held.remove(i).map(|(_, _, ack)| ack)
        };
        match ack {
            Some(ack) => {
                self.inner.enqueue([ack]);
                true
            }
            None => false,
        }
    }

    /// Frames sent and received so far, by type.
    pub fn counters(&self) -> FrameCounters {
        lock(&self.inner.counters).clone()
    }

    /// Messages to `peer` not yet confirmed by a receipt.
    pub fn unconfirmed(&self, peer: &str) -> usize {
        lock(&self.inner.mesh).unconfirmed_count(peer)
    }

    /// Frames waiting for the relay.
    pub fn queued(&self) -> usize {
        lock(&self.inner.outgoing).len()
    }

    /// The mesh state as JSON (secret), e.g. for a custom store.
    pub fn export_state(&self) -> zeroize::Zeroizing<String> {
        lock(&self.inner.mesh).export_state()
    }

    /// Sends `disconnect`, closes the socket and stops the background task.
    pub async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.inner.persist();
        self.inner.flush_state();
        self.inner.shutdown.notify_one();
        self.inner.inbox_notify.notify_waiters();
        self.inner.events.notify.notify_waiters();
        let task = lock(&self.task).take();
        if let Some(task) = task {
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                tracing::warn!("relay task did not stop in time");
            }
        }
    }

    /// Drops the relay connection without a `disconnect` (for tests of
    /// reconnection).
    pub fn abort_connection(&self) {
        if let Some(task) = lock(&self.task).as_ref() {
            task.abort();
        }
        let _ = self.inner.connected.send_replace(false);
    }
}

enum Ended {
    Lost {
        code: Option<u16>,
        reason: String,
    },
    /// Closed with 4003/4005 (or any rejection) before the join was confirmed.
    RejectedBeforeJoin(u16, String),
    TakenOver(String),
    Rejected(u16, String),
    Shutdown,
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The relay socket's limits: no WebSocket message or frame longer than
/// [`ClientConfig::max_relay_message_bytes`] is buffered (tungstenite's
/// default would be 64 MiB).
fn socket_config(config: &ClientConfig) -> WebSocketConfig {
    let limit = config.max_relay_message_bytes();
    WebSocketConfig {
        max_message_size: Some(limit),
        max_frame_size: Some(limit),
        ..WebSocketConfig::default()
    }
}

/// Takeovers (4006) within [`ClientConfig::takeover_window`].
#[derive(Default)]
struct Takeovers {
    recent: VecDeque<tokio::time::Instant>,
}

impl Takeovers {
    /// Records a takeover and reports it: the wait before taking the DID
    /// back, or `None` (after emitting the terminal
    /// [`ClientEvent::TakenOver`]) once the limit is passed.
    fn displaced(&mut self, inner: &Inner, reason: String) -> Option<Duration> {
        inner.stats.takeovers.fetch_add(1, Ordering::Relaxed);
        let now = tokio::time::Instant::now();
        let window = inner.config.takeover_window.min(MAX_WAIT);
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > window) {
            self.recent.pop_front();
        }
        // Never more entries than the limit allows (bounded memory).
        let limit = inner.config.takeover_limit;
        while self.recent.len() > limit as usize {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        let attempt = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        if attempt > limit {
            tracing::warn!(
                target: "meshwire",
                takeovers = attempt,
                reason = %escape_log(&reason),
                "another live instance holds this DID; not taking it back"
            );
            inner.emit(ClientEvent::TakenOver { reason });
            return None;
        }
        let base = inner
            .config
            .takeover_backoff
            .min(MAX_WAIT / 8)
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(MAX_WAIT / 4);
        let factor = 1.0 + f64::from(OsRng.next_u32() % 20_001) / 10_000.0;
        let wait = base.mul_f64(factor);
        tracing::info!(
            target: "meshwire",
            attempt,
            ?wait,
            reason = %escape_log(&reason),
            "relay connection taken over; taking the DID back with a fresh proof"
        );
        inner.emit(ClientEvent::Displaced { reason, attempt });
        Some(wait)
    }
}

async fn run_connection(inner: Arc<Inner>) {
    let mut attempt: u32 = 0;
    let mut ever_connected = false;
    let mut takeovers = Takeovers::default();
    loop {
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let endpoint = match crate::relay_connect::RelayEndpoint::parse(&inner.config.relay_url) {
            Ok(endpoint) => endpoint,
            Err(e) => {
                inner.join_failure.send_replace(Some(e.into()));
                return;
            }
        };
        let url = endpoint.to_string();
        let connecting =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(socket_config(&inner.config)), false);
        let attempt_timeout = inner.config.connect_timeout.min(MAX_WAIT);
        let result = tokio::select! {
            r = tokio::time::timeout(attempt_timeout, connecting) => r,
            _ = inner.shutdown.notified() => return,
        };
        match result {
            Ok(Ok((socket, response))) => {
                attempt = 0;
                // A meshwire relay offers a challenge nonce in the upgrade
                // answer (docs/specs/MESHWIRE-CHALLENGE-AUTH.md); AGT's sends none.
                let challenge = response
                    .headers()
                    .get(meshwire_proto::auth::CHALLENGE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(|nonce| (url.clone(), nonce.to_owned()));
                let ended = drive(&inner, socket, ever_connected, challenge).await;
                let joined = inner.connected.send_replace(false);
                if !ever_connected && !joined {
                    // The first attempt ended before the relay took us:
                    // `connect()` reports why.
                    let failure = match &ended {
                        Ended::Rejected(code, reason) | Ended::RejectedBeforeJoin(code, reason) => {
                            crate::relay_connect::ConnectFailure::rejected(&url, *code, reason)
                        }
                        Ended::Lost { code, reason } => crate::relay_connect::ConnectFailure::Closed {
                            url: url.clone(),
                            detail: match code {
                                Some(code) => format!("close code {code}, {reason:?}"),
                                None => reason.clone(),
                            },
                        },
                        Ended::TakenOver(reason) => crate::relay_connect::ConnectFailure::Closed {
                            url: url.clone(),
                            detail: format!("taken over: {reason:?}"),
                        },
                        Ended::Shutdown => return,
                    };
                    inner.join_failure.send_replace(Some(failure));
                }
                ever_connected |= joined;
                match ended {
                    Ended::Shutdown => return,
                    Ended::TakenOver(reason) => {
                        let Some(wait) = takeovers.displaced(&inner, reason) else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = inner.shutdown.notified() => return,
                        }
                        continue;
                    }
                    Ended::Rejected(code, reason) | Ended::RejectedBeforeJoin(code, reason) => {
                        inner.emit(ClientEvent::Rejected { code, reason });
                        return;
                    }
                    Ended::Lost { code, reason } => inner.emit(ClientEvent::Disconnected { code, reason }),
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(target: "meshwire", error = %escape_log(&e.to_string()), "relay connection failed");
                if !ever_connected {
                    let failure = crate::relay_connect::ConnectFailure::from_handshake(&endpoint, &e).await;
                    inner.join_failure.send_replace(Some(failure));
                }
            }
            Err(_) => {
                tracing::debug!(target: "meshwire", "relay connection timed out");
                if !ever_connected {
                    inner
                        .join_failure
                        .send_replace(Some(crate::relay_connect::ConnectFailure::Timeout {
                            url: url.clone(),
                            after: attempt_timeout,
                        }));
                }
            }
        }
        let exp = inner
            .config
            .reconnect_base
            .saturating_mul(2u32.saturating_pow(attempt.min(16)));
        let capped = exp.min(inner.config.reconnect_max).min(MAX_WAIT / 2);
        let jitter = 0.8 + f64::from(OsRng.next_u32() % 4001) / 10_000.0;
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(capped.mul_f64(jitter)) => {}
            _ = inner.shutdown.notified() => return,
        }
    }
}

async fn send_text(inner: &Inner, socket: &mut Socket, text: String) -> Result<(), String> {
    inner.count(true, &text);
    socket.send(WsMessage::Text(text)).await.map_err(|e| e.to_string())
}

async fn drive(inner: &Arc<Inner>, mut socket: Socket, reconnect: bool, challenge: Option<(String, String)>) -> Ended {
    let identity_did = inner.did.clone();
    let connect = if inner.config.legacy_connect {
        match Did::parse(&identity_did) {
            Ok(did) => vec![
                frames::to_text(&ConnectFrame::legacy(&did)),
                frames::to_text(&FetchPendingFrame::for_did(&did)),
            ],
            Err(e) => return Ended::Rejected(0, e.to_string()),
        }
    } else {
        let mesh = lock(&inner.mesh);
        // The challenge form where the relay offered it, else a timestamp
        // proof on the registry client's monotonic proof clock (no two
        // proofs of ours share a signature).
        let challenged =
            challenge.and_then(|(url, nonce)| ConnectFrame::challenge_for_url(mesh.identity(), &url, &nonce).ok());
        match challenged {
            Some(frame) => vec![
                frames::to_text(&frame),
                frames::to_text(&FetchPendingFrame::new(mesh.identity())),
            ],
            None => mesh.connect_frames(inner.registry.next_proof_timestamp()).to_vec(),
        }
    };
    for (i, text) in connect.into_iter().enumerate() {
        let text = match (&inner.config.relay_token, i) {
            (Some(token), 0) => crate::relay_connect::with_token(&text, token),
            _ => text,
        };
        if let Err(e) = send_text(inner, &mut socket, text).await {
            return Ended::Lost { code: None, reason: e };
        }
        if i == 0 {
            // Right behind the `connect` frame: see `confirm_join`.
            if let Err(e) = socket.send(WsMessage::Ping(JOIN_PING.to_vec())).await {
                return Ended::Lost {
                    code: None,
                    reason: e.to_string(),
                };
            }
        }
    }
    if let Err(ended) = confirm_join(inner, &mut socket).await {
        return ended;
    }
    let _ = inner.connected.send_replace(true);
    inner.emit(ClientEvent::Connected { reconnect });
    if reconnect {
        // The relay may have lost what it held (AGT keeps it in memory):
        // resend what receipt-capable peers have not confirmed.
        let events = lock(&inner.mesh).retransmit(
            &mut rand::thread_rng(),
            now(),
            inner.config.retransmit_after.as_millis() as u64,
        );
        inner.process(events);
    }
    let registry_heartbeat = {
        let inner = inner.clone();
        tokio::spawn(async move {
            let identity = Identity::from_seed(&lock(&inner.mesh).identity().seed());
            loop {
                let _ = inner.registry.heartbeat(&identity).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        })
    };
    let ended = drive_loop(inner, &mut socket).await;
    registry_heartbeat.abort();
    ended
}

/// The payload of the WebSocket ping sent right after the `connect` frame.
const JOIN_PING: &[u8] = b"meshwire-join";

/// How long after the relay's pong the client still waits for a rejection
/// (a relay whose WebSocket layer answers pings before its application
/// read the `connect` frame, as AGT's does, rejects within this).
pub const JOIN_SETTLE: Duration = Duration::from_millis(100);

/// Longest wait for the relay's answer to the join ping; a relay silent
/// that long is taken as having accepted the `connect` frame.
pub const JOIN_CONFIRM_MAX: Duration = Duration::from_secs(2);

/// Waits until the relay shows that it took the `connect` frame. The
/// client sends a WebSocket ping right after it: meshwire's relay reads
/// frames in order and answers the ping only once it accepted the
/// `connect`, so its pong (plus [`JOIN_SETTLE`], for relays that pong
/// earlier) means joined, as does any frame that is not an error. A close
/// first (4003 token, 4005 proof...) is a rejection; silence for
/// [`JOIN_CONFIRM_MAX`] (or half the connect timeout) counts as joined.
/// Frames that arrive meanwhile are handled as usual.
async fn confirm_join(inner: &Arc<Inner>, socket: &mut Socket) -> Result<(), Ended> {
    let deadline = deadline_after(JOIN_CONFIRM_MAX.min(inner.config.connect_timeout / 2));
    let mut settle: Option<tokio::time::Instant> = None;
    let mut last_error = String::new();
    loop {
        let until = settle.map_or(deadline, |s| s.min(deadline));
        let incoming = match tokio::time::timeout_at(until, socket.next()).await {
            Err(_) => return Ok(()),
            Ok(incoming) => incoming,
        };
        match incoming {
            Some(Ok(WsMessage::Pong(payload))) if payload == JOIN_PING => {
                settle.get_or_insert_with(|| deadline_after(JOIN_SETTLE));
            }
            Some(Ok(WsMessage::Text(text))) => {
                inner.count(false, &text);
                let events = lock(&inner.mesh).handle_text(&mut rand::thread_rng(), now(), &text);
                let relay_error = events.iter().find_map(|e| match e {
                    Event::Error(m) if m.kind == ErrorKind::Relay => Some(m.detail.clone()),
                    _ => None,
                });
                inner.process(events);
                match relay_error {
                    Some(detail) => last_error = detail,
                    None => return Ok(()),
                }
            }
            Some(Ok(WsMessage::Close(frame))) => {
                return Err(match closed(frame, last_error) {
                    Ended::Rejected(code, reason) => Ended::RejectedBeforeJoin(code, reason),
                    other => other,
                })
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                return Err(Ended::Lost {
                    code: None,
                    reason: e.to_string(),
                })
            }
            None => {
                return Err(Ended::Lost {
                    code: None,
                    reason: "connection closed".into(),
                })
            }
        }
    }
}

async fn drive_loop(inner: &Arc<Inner>, socket: &mut Socket) -> Ended {
    let mut heartbeat = tokio::time::interval(saturating_period(inner.config.heartbeat_interval));
    heartbeat.reset();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut retransmit = tokio::time::interval(saturating_period(
        inner.config.retransmit_after.max(Duration::from_millis(100)),
    ));
    retransmit.reset();
    let mut last_error = String::new();
    let mut verdicts = inner.verdicts_rx.lock().await;
    let mut paused = false;
    loop {
        // A full inbox stops reading: what the relay cannot deliver stays
        // in its store. Once there is room again, ask for it.
        let full = inner.inbox_full();
        if full && !paused {
            inner.stats.inbox_full_pauses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                target: "meshwire",
                capacity = inner.config.inbox_capacity,
                "application inbox full; not reading the relay until messages are taken"
            );
        } else if paused && !full {
            if let Ok(did) = Did::parse(&inner.did) {
                lock(&inner.outgoing).push_back(frames::to_text(&FetchPendingFrame::for_did(&did)));
            }
        }
        paused = full;
        // Flush before waiting: a notification may have come while busy.
        loop {
            let next = lock(&inner.outgoing).pop_front();
            let Some(text) = next else { break };
            if let Err(e) = send_text(inner, socket, text.clone()).await {
                lock(&inner.outgoing).push_front(text);
                return Ended::Lost { code: None, reason: e };
            }
        }
        tokio::select! {
            incoming = socket.next(), if !paused => match incoming {
                Some(Ok(WsMessage::Text(text))) => {
                    inner.count(false, &text);
                    let events = lock(&inner.mesh).handle_text(&mut rand::thread_rng(), now(), &text);
                    if let Some(detail) = events.iter().find_map(|e| match e {
                        Event::Error(m) if m.kind == ErrorKind::Relay => Some(m.detail.clone()),
                        _ => None,
                    }) {
                        last_error = detail;
                    }
                    inner.process(events);
                }
                Some(Ok(WsMessage::Binary(_))) => {
                    inner.emit(ClientEvent::Error { kind: ErrorKind::Frame, peer: None, detail: "binary frame ignored".into() });
                }
                Some(Ok(WsMessage::Close(frame))) => return closed(frame, last_error),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Ended::Lost { code: None, reason: e.to_string() },
                None => return Ended::Lost { code: None, reason: "connection closed".into() },
            },
            _ = inner.outgoing_notify.notified() => {}
            Some((from, knock_id, accepted)) = verdicts.recv() => {
                let events =
                    lock(&inner.mesh).decide_knock(&mut rand::thread_rng(), now(), &from, &knock_id, accepted);
                inner.process(events);
            }
            _ = heartbeat.tick() => {
                let text = lock(&inner.mesh).heartbeat_frame(now());
                if let Err(e) = send_text(inner, socket, text).await {
                    return Ended::Lost { code: None, reason: e };
                }
            }
            _ = tick.tick() => {
                let t = now();
                let mut events = {
                    let mut mesh = lock(&inner.mesh);
                    let mut events = Vec::new();
                    if mesh.next_timeout().is_some_and(|at| at <= t) {
                        events.extend(mesh.handle_timeout(&mut rand::thread_rng(), t));
                    }
                    events.extend(mesh.flush_receipts(&mut rand::thread_rng(), t));
                    events
                };
                if !events.is_empty() {
                    inner.process(std::mem::take(&mut events));
                }
            }
            _ = retransmit.tick() => {
                let events = lock(&inner.mesh).retransmit(&mut rand::thread_rng(), now(), inner.config.retransmit_after.as_millis() as u64);
                inner.process(events);
            }
            _ = inner.shutdown.notified() => {
                // The core decides what leaving means: frames, then the close.
                let events = lock(&inner.mesh).disconnect();
                for event in events {
                    match event {
                        Event::Transmit(text) => {
                            let _ = send_text(inner, socket, text).await;
                        }
                        Event::Close { code, reason } => {
                            let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
                            let _ = socket.close(Some(frame)).await;
                        }
                        other => inner.process(vec![other]),
                    }
                }
                return Ended::Shutdown;
            }
        }
    }
}

fn closed(frame: Option<CloseFrame<'_>>, last_error: String) -> Ended {
    let (code, reason) = match frame {
        Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
        None => (None, String::new()),
    };
    let reason = if reason.is_empty() { last_error } else { reason };
    match code {
        Some(CLOSE_TAKEOVER) => Ended::TakenOver(reason),
        // The AGT relay closes the replaced connection with 1000 "session_replaced".
        Some(1000) if reason == "session_replaced" => Ended::TakenOver(reason),
        Some(c @ (CLOSE_PROOF_REJECTED | CLOSE_AUTH_FAILED)) => Ended::Rejected(c, reason),
        code => Ended::Lost { code, reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_kinds_are_read_without_parsing() {
        assert_eq!(frame_kind(r#"{"v":1,"type":"message","from":"x"}"#), "message");
        assert_eq!(frame_kind(r#"{"ciphertext": "AAAA", "type": "ack"}"#), "ack");
        assert_eq!(frame_kind("garbage"), "unknown");
    }

    #[test]
    fn payloads_decode() {
        assert_eq!(decode_payload(br#"{"a":1}"#), Payload::Json(serde_json::json!({"a":1})));
        let envelope = serde_json::json!({ CONTROL_KEY: "bytes", "data": b64_std(&[0, 255]) }).to_string();
        assert_eq!(decode_payload(envelope.as_bytes()), Payload::Bytes(vec![0, 255]));
        assert_eq!(decode_payload(&[0xff, 0]), Payload::Bytes(vec![0xff, 0]));
    }
}
