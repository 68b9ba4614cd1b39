//! The state shared by a client's handles and its background tasks, and
//! how the driver applies what the state machine decided.

use super::config::{ClientConfig, PEER_INFO_CACHE};
use super::durable::{InboxState, Outgoing};
use super::types::{ClientError, ClientEvent, FrameCounters, KnockInfo, KnockPolicy};
use super::util::{escape_log, frame_kind, lock, now};
use crate::persist::Persistence;
use crate::registry::RegistryClient;
use meshwire_proto::mesh::{ErrorKind, Event, Mesh, PeerInfo, SendError};
use meshwire_proto::Did;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch, Notify};

/// The bounded event queue: the oldest event makes room for a new one.
pub(crate) struct EventQueue {
    pub(crate) queue: Mutex<VecDeque<ClientEvent>>,
    pub(crate) notify: Notify,
    capacity: usize,
    pub(crate) dropped: AtomicU64,
}

impl EventQueue {
    pub(crate) fn new(capacity: usize) -> Self {
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

    pub(crate) fn pop(&self) -> Option<ClientEvent> {
        lock(&self.queue).pop_front()
    }
}

/// Counters behind [`super::ClientStats`].
#[derive(Default)]
pub(crate) struct StatCounters {
    pub(crate) inbox_full_pauses: AtomicU64,
    pub(crate) takeovers: AtomicU64,
    pub(crate) sessions_without_one_time_key: AtomicU64,
    pub(crate) signed_pre_key_rotations: AtomicU64,
    pub(crate) one_time_key_refills: AtomicU64,
    pub(crate) peer_info_evicted: AtomicU64,
    pub(crate) store_commits: AtomicU64,
    pub(crate) store_failures: AtomicU64,
    pub(crate) redelivered: AtomicU64,
    pub(crate) reregistrations: AtomicU64,
}

/// What the registry is told at registration (and again after it lost us).
pub(crate) struct Registration {
    pub(crate) capabilities: Vec<String>,
    pub(crate) metadata: BTreeMap<String, String>,
}

pub(crate) struct Inner {
    pub(crate) did: String,
    pub(crate) config: ClientConfig,
    pub(crate) mesh: Mutex<Mesh>,
    pub(crate) registry: RegistryClient,
    pub(crate) registration: Registration,
    /// Where every state change is committed before its effects leave the
    /// process (an in-memory store when the application gave none).
    pub(crate) persistence: Arc<dyn Persistence>,
    /// The client opened the store itself (`state_dir`): `close()`
    /// releases it.
    pub(crate) owns_persistence: bool,
    pub(crate) policy: Mutex<Option<KnockPolicy>>,
    pub(crate) outgoing: Mutex<VecDeque<Outgoing>>,
    pub(crate) outgoing_notify: Notify,
    /// Woken when receipts confirm messages (room in the send window).
    pub(crate) receipts_notify: Notify,
    pub(crate) inbox: Mutex<InboxState>,
    pub(crate) inbox_notify: Notify,
    pub(crate) events: EventQueue,
    pub(crate) stats: StatCounters,
    pub(crate) counters: Mutex<FrameCounters>,
    pub(crate) peer_info: Mutex<HashMap<String, Option<BTreeMap<String, String>>>>,
    pub(crate) open_locks: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) connected: watch::Sender<bool>,
    /// Why the first attempt to join the relay failed (read by `connect`).
    pub(crate) join_failure: watch::Sender<Option<crate::relay_connect::ConnectFailure>>,
    /// KNOCK verdicts, applied by the connection task so that messages are
    /// handed to the application in the order their frames arrived.
    pub(crate) verdicts: mpsc::UnboundedSender<(String, String, bool)>,
    pub(crate) verdicts_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<(String, String, bool)>>,
    pub(crate) closed: AtomicBool,
    pub(crate) shutdown: Notify,
    /// Set when a commit failed while a frame was received: the connection
    /// is dropped so that the relay delivers what was not acked again.
    pub(crate) reconnect_now: AtomicBool,
    /// Outbox frames the relay has not confirmed yet.
    pub(crate) outbox_pending: AtomicU64,
    pub(crate) consumed_since_upload: AtomicU64,
    pub(crate) replenishing: AtomicBool,
    pub(crate) published: Mutex<usize>,
    /// When the store's idle work (a WAL checkpoint) may run.
    pub(crate) store_idle: super::store_idle::StoreIdle,
}

impl Inner {
    pub(crate) fn emit(&self, event: ClientEvent) {
        self.events.push(event);
    }

    pub(crate) fn count(&self, sent: bool, text: &str) {
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

    /// Queues frames for the relay (their state is committed already).
    pub(crate) fn enqueue(&self, frames: impl IntoIterator<Item = Outgoing>) {
        let mut q = lock(&self.outgoing);
        q.extend(frames);
        drop(q);
        self.outgoing_notify.notify_one();
    }

    /// Runs `f` on the state machine and commits what it changed (with the
    /// messages it decrypted, as inbox rows) before anything of it leaves
    /// the process, then applies the events: frames are queued, messages
    /// handed to the application. If the commit fails, the state goes back
    /// to the last commit and the events are dropped (see
    /// [`Inner::commit_step`]).
    pub(crate) fn mesh_step(self: &Arc<Self>, f: impl FnOnce(&mut Mesh) -> Vec<Event>) {
        if let Some(events) = self.commit_step(f) {
            self.process(events);
        }
    }

    /// Applies the events of a committed [`Inner::commit_step`]: its frames
    /// and the acks of its messages are queued already (in step order).
    pub(crate) fn process(self: &Arc<Self>, events: Vec<Event>) {
        let mut transmit = Vec::new();
        let mut delivered = Vec::new();
        for event in events {
            match event {
                Event::Transmit(text) => transmit.push(Outgoing::frame(text)),
                Event::Message(m) => {
                    delivered.push(super::durable::message_of(m.from, m.id, m.payload, m.plaintext, false));
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
                    self.consumed_since_upload.fetch_add(1, Ordering::SeqCst);
                    self.maybe_replenish();
                }
                Event::Delivered { peer, ids } => {
                    self.receipts_notify.notify_waiters();
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
        if !delivered.is_empty() {
            self.deliver(delivered);
        }
        if !transmit.is_empty() {
            self.enqueue(transmit);
        }
    }

    /// Opens a session with `peer` from its bundle: refuses (and traces) a
    /// bundle that is not the DID's keys, counts and traces a session that
    /// starts without a one-time key.
    pub(crate) fn open_session(
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
                inner
                    .send_step(&peer, |mesh| {
                        let frames = mesh
                            .resync(&mut rand::thread_rng(), now(), &peer, &bundle)
                            .map_err(ClientError::Session)?;
                        Ok(((), frames))
                    })
                    .map_err(|e| e.to_string())
            }
            .await;
            if let Err(e) = result {
                inner.emit(ClientEvent::Error {
                    kind: ErrorKind::Rollback,
                    peer: Some(peer),
                    detail: format!("resync failed: {e}"),
                });
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
    pub(crate) async fn peer_metadata(&self, peer: &str) -> Option<BTreeMap<String, String>> {
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
                    .and_then(|m| m.get(super::config::META_KDF))
                    .and_then(|d| d.parse().ok())
            }),
            receipts: self.config.receipts
                && metadata
                    .as_ref()
                    .and_then(|m| m.get(super::config::META_RECEIPTS))
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
}
