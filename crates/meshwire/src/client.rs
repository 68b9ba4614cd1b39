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
use meshwire_proto::frames::{self, ConnectFrame, FetchPendingFrame, Frame};
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
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
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
    #[error("session: {0}")]
    Session(#[from] SendError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("state: {0}")]
    State(#[from] meshwire_proto::StateError),
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
    /// Another connection took this DID over (close 4006); no reconnection.
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
    /// Base URL of the relay (`ws://host:port`); `/ws` is appended.
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
        }
    }
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
    events: mpsc::UnboundedSender<ClientEvent>,
    counters: Mutex<FrameCounters>,
    peer_info: Mutex<HashMap<String, Option<BTreeMap<String, String>>>>,
    open_locks: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    connected: watch::Sender<bool>,
    /// KNOCK verdicts, applied by the connection task so that messages are
    /// handed to the application in the order their frames arrived.
    verdicts: mpsc::UnboundedSender<(String, bool)>,
    verdicts_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<(String, bool)>>,
    closed: AtomicBool,
    shutdown: Notify,
    consumed_since_upload: AtomicU64,
    dirty: AtomicBool,
    replenishing: AtomicBool,
    published: Mutex<usize>,
}

/// An agent on the mesh. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct MeshClient {
    inner: Arc<Inner>,
    events: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<ClientEvent>>>,
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
        let _ = self.events.send(event);
    }

    fn count(&self, sent: bool, text: &str) {
        let kind = frame_kind(text);
        tracing::trace!(direction = if sent { "sent" } else { "received" }, kind, "frame");
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
                    transmit.push(m.ack);
                }
                Event::KnockRequest { from, intent, .. } => self.spawn_knock_decision(from, intent),
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
                    tracing::debug!(kind = ?e.kind, peer = ?e.peer, detail = %e.detail, "mesh error");
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

    fn spawn_knock_decision(self: &Arc<Self>, from: String, intent: serde_json::Value) {
        let inner = self.clone();
        tokio::spawn(async move {
            let metadata = inner.peer_metadata(&from).await;
            let policy = lock(&inner.policy).clone();
            let accepted = match policy {
                Some(policy) => {
                    policy(KnockInfo {
                        from: from.clone(),
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
            let _ = inner.verdicts.send((from, accepted));
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
        lock(&self.peer_info).insert(peer.to_owned(), metadata.clone());
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
        let registry = RegistryClient::new(&config.registry_url, config.registry.clone())?;
        let saved = match &store {
            Some(store) => store.load(&did)?,
            None => None,
        };
        let restored = saved.is_some();
        let mut mesh = match saved {
            Some(state) => Mesh::import_state(
                Identity::from_seed(&identity.seed()),
                &state,
                config.mesh.clone(),
                Box::new(RandomUuids),
            )?,
            None => {
                let prekeys = PreKeys::generate(&mut rand::thread_rng(), &identity);
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

        let (events_tx, events_rx) = mpsc::unbounded_channel();
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
            events: events_tx,
            counters: Mutex::new(FrameCounters::default()),
            peer_info: Mutex::new(HashMap::new()),
            open_locks: tokio::sync::Mutex::new(HashMap::new()),
            connected,
            verdicts,
            verdicts_rx: tokio::sync::Mutex::new(verdicts_rx),
            closed: AtomicBool::new(false),
            shutdown: Notify::new(),
            consumed_since_upload: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            replenishing: AtomicBool::new(false),
            published: Mutex::new(0),
        });

        if restored {
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
            events: Arc::new(tokio::sync::Mutex::new(events_rx)),
            task: Arc::new(Mutex::new(Some(task))),
        };
        let wait = async {
            while !*connected_rx.borrow_and_update() {
                if connected_rx.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        match tokio::time::timeout(inner.config.connect_timeout, wait).await {
            Ok(true) => Ok(client),
            _ => {
                client.close().await;
                Err(ClientError::Relay(format!(
                    "could not join the relay at {}",
                    inner.config.relay_url
                )))
            }
        }
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
                    let knock = mesh.open_session(&mut rand::thread_rng(), now(), peer, &bundle)?;
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
        let knock = lock(&self.inner.mesh).open_session(&mut rand::thread_rng(), now(), &key, &bundle)?;
        self.inner.persist();
        self.inner.enqueue([knock]);
        Ok(())
    }

    /// The peer's bundle, after learning what its registry metadata says
    /// about receipts and its KDF dialect.
    async fn fetch_bundle(&self, peer: &Did) -> Result<meshwire_proto::PreKeyBundle, ClientError> {
        self.inner.peer_metadata(peer.as_str()).await;
        let identity = Identity::from_seed(&lock(&self.inner.mesh).identity().seed());
        Ok(self.inner.registry.fetch_bundle(&identity, peer).await?)
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
        let deadline = tokio::time::Instant::now() + timeout;
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

    /// The next event (connection changes, KNOCKs, errors...).
    pub async fn next_event(&self) -> Option<ClientEvent> {
        self.events.lock().await.recv().await
    }

    /// The next event within `timeout`.
    pub async fn next_event_timeout(&self, timeout: Duration) -> Option<ClientEvent> {
        tokio::time::timeout(timeout, self.next_event()).await.ok().flatten()
    }

    /// Events already queued, without waiting.
    pub fn try_events(&self) -> Vec<ClientEvent> {
        let Ok(mut rx) = self.events.try_lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(e);
        }
        out
    }

    /// Agents advertising `capability`.
    pub async fn discover(&self, capability: &str) -> Result<Vec<DiscoverResult>, ClientError> {
        Ok(self.inner.registry.discover(capability, None).await?)
    }

    /// The DID of the agent published as `display_name`; when several carry
    /// it (restarted agents leave stale registrations behind), the most
    /// recently seen.
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
    Lost { code: Option<u16>, reason: String },
    TakenOver(String),
    Rejected(u16, String),
    Shutdown,
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn run_connection(inner: Arc<Inner>) {
    let mut attempt: u32 = 0;
    let mut ever_connected = false;
    loop {
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let url = format!("{}/ws", inner.config.relay_url.trim_end_matches('/'));
        let connecting = tokio_tungstenite::connect_async(url.as_str());
        let result = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(10), connecting) => r,
            _ = inner.shutdown.notified() => return,
        };
        match result {
            Ok(Ok((socket, _))) => {
                attempt = 0;
                let ended = drive(&inner, socket, ever_connected).await;
                ever_connected = true;
                let _ = inner.connected.send_replace(false);
                match ended {
                    Ended::Shutdown => return,
                    Ended::TakenOver(reason) => {
                        inner.emit(ClientEvent::TakenOver { reason });
                        return;
                    }
                    Ended::Rejected(code, reason) => {
                        inner.emit(ClientEvent::Rejected { code, reason });
                        return;
                    }
                    Ended::Lost { code, reason } => inner.emit(ClientEvent::Disconnected { code, reason }),
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "relay connection failed"),
            Err(_) => tracing::debug!("relay connection timed out"),
        }
        let exp = inner
            .config
            .reconnect_base
            .saturating_mul(2u32.saturating_pow(attempt.min(16)));
        let capped = exp.min(inner.config.reconnect_max);
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

async fn drive(inner: &Arc<Inner>, mut socket: Socket, reconnect: bool) -> Ended {
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
        lock(&inner.mesh).connect_frames(now()).to_vec()
    };
    for text in connect {
        if let Err(e) = send_text(inner, &mut socket, text).await {
            return Ended::Lost { code: None, reason: e };
        }
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

async fn drive_loop(inner: &Arc<Inner>, socket: &mut Socket) -> Ended {
    let mut heartbeat = tokio::time::interval(inner.config.heartbeat_interval);
    heartbeat.reset();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut retransmit = tokio::time::interval(inner.config.retransmit_after.max(Duration::from_millis(100)));
    retransmit.reset();
    let mut last_error = String::new();
    let mut verdicts = inner.verdicts_rx.lock().await;
    loop {
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
            incoming = socket.next() => match incoming {
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
            Some((from, accepted)) = verdicts.recv() => {
                let events = lock(&inner.mesh).decide_knock(&mut rand::thread_rng(), now(), &from, accepted);
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
                let from = Some(inner.did.clone());
                let _ = send_text(inner, socket, Frame::Disconnect { from }.to_text()).await;
                let _ = socket.close(Some(CloseFrame { code: CloseCode::Normal, reason: "client disconnect".into() })).await;
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
