//! [`MeshClient`]: registry, relay socket, durable store and the mesh state
//! machine, driven by tokio.
//!
//! One background task owns the relay connection (connect with proof,
//! heartbeats, reconnection with backoff, receipts and retransmission);
//! the state machine ([`meshwire_proto::mesh::Mesh`]) sits behind a mutex
//! that is only ever held for synchronous work.
//!
//! # Delivery contract
//!
//! - **Write-ahead.** Every change of the state machine is committed to
//!   the store ([`crate::persist::Persistence`]; SQLite with
//!   [`MeshClientBuilder::state_dir`]) before its effects leave the
//!   process: a message's ratchet step and its frame (as an outbox row)
//!   before the frame is written to the relay; a received message, its
//!   duplicate-id record and the ratchet step, in one commit, before the
//!   relay is acked.
//! - **At least once, never after an acknowledgement.** A received message
//!   stays in the durable inbox until the application acknowledges it
//!   ([`MeshClient::ack`]; by default each receive call acknowledges what
//!   earlier ones handed over, and [`MeshClient::close`] what was handed
//!   over before it). A process that dies before that gets the message
//!   again after a restart ([`Message::redelivered`]); after the
//!   acknowledgement, never.
//! - **Outbox.** A send accepted by [`MeshClient::send`] is in the outbox
//!   until the relay has read it (it answered a WebSocket ping written
//!   after the frame); after a restart or a lost connection, what was not
//!   confirmed goes out again first, in order per peer. A peer that
//!   already has a message drops the copy as a duplicate.
//! - **Without a store** the same rules hold in memory: nothing survives
//!   the process.
//!
//! A failed commit (disk full, the store's inbox or outbox limit) changes
//! nothing outside: the state goes back to the last commit, a send fails
//! with [`ClientError::Persist`], and a frame being received is not acked
//! (the client reconnects and the relay delivers it again);
//! [`ClientEvent::StoreError`] reports it.
//!
//! # Failover
//!
//! A client may know several relays and registries of one cluster
//! (instances sharing their store, as `meshwire serve --nats`):
//! [`MeshClientBuilder::relay_urls`] and [`MeshClientBuilder::registry_urls`]
//! (or [`ClientConfig::fallback_relay_urls`] and
//! [`ClientConfig::fallback_registry_urls`]), the "home" one first. Every
//! URL is checked when the client is built. When an attempt to join a relay
//! fails, the next of the list is dialled at once; when a joined
//! connection ends (close 1001 going away, 4008 slow consumer, network
//! loss), the next one is dialled after the usual reconnection backoff,
//! which grows only once every relay failed in a row. The client stays
//! where it joined ([`ClientEvent::RelayChanged`] says where that is) and
//! never gives up on the list because some of it is down. The outbox
//! rules above hold across relays: what the old relay did not confirm goes
//! out again on the new one, and peers drop duplicates. Registry calls
//! (registration, heartbeats, pre-key uploads, bundle fetches) move to the
//! next registry on network errors, timeouts and 5xx answers (see
//! [`crate::registry`]).

mod builder;
mod config;
mod connection;
mod durable;
mod inner;
mod prekeys;
mod registry_upkeep;
mod store_idle;
mod types;
mod util;

pub use builder::MeshClientBuilder;
pub use config::{
    ClientConfig, ClientStats, CLOSE_AUTH_FAILED, CLOSE_PROOF_REJECTED, CLOSE_TAKEOVER, MAX_WAIT, META_DISPLAY_NAME,
    META_KDF, META_RECEIPTS, PEER_INFO_CACHE, RELAY_ENVELOPE_SLACK,
};
pub use connection::{JOIN_CONFIRM_MAX, JOIN_SETTLE};
pub use registry_upkeep::{REGISTRY_HEARTBEAT_INTERVAL, REGISTRY_RETRY_BASE};
pub use store_idle::STORE_QUIET;
pub use types::{knock_policy, ClientError, ClientEvent, FrameCounters, KnockInfo, KnockPolicy, Message, Payload};
pub use util::{deadline_after, escape_log, saturating_period};

use crate::registry::DiscoverResult;
use inner::Inner;
use meshwire_proto::encoding::b64_std;
use meshwire_proto::mesh::{SendError, CONTROL_KEY};
use meshwire_proto::time::Timestamp;
use meshwire_proto::Did;
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use util::{lock, now};

/// An agent on the mesh. Cheap to clone; all clones share one connection.
///
/// ```no_run
/// use meshwire::{Identity, MeshClient};
/// use std::time::Duration;
///
/// # async fn run() -> Result<(), meshwire::ClientError> {
/// let alice = MeshClient::builder(Identity::generate(&mut rand::thread_rng()), "ws://127.0.0.1:8765", "http://127.0.0.1:8766")
///     .display_name("alice")
///     .connect()
///     .await?;
/// let bob = alice.find("bob").await?.expect("bob is registered");
/// let id = alice.send(&bob, &serde_json::json!({"question": "status?"})).await?;
/// let reply = alice.recv_from_any(&[bob.as_str()], Duration::from_secs(10)).await?;
/// println!("{id} answered by {}: {:?}", reply.id, reply.payload);
/// alice.close().await;
/// # Ok(())
/// # }
/// ```
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

/// The error of a batch that stopped after `sent`.
fn batch_error(sent: Vec<String>, source: ClientError) -> ClientError {
    ClientError::Batch {
        failed: sent.len(),
        sent,
        source: Box::new(source),
    }
}

impl MeshClient {
    /// This agent's DID.
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
    /// a session first if needed; returns the message id. The ratchet step
    /// and the frame are committed to the store before the frame goes out;
    /// queued (in the durable outbox) while the relay is unreachable.
    ///
    /// ```no_run
    /// # async fn run(client: meshwire::MeshClient, peer: &str) -> Result<(), meshwire::ClientError> {
    /// let id = client.send(peer, &serde_json::json!({"task": "summarize", "doc": 42})).await?;
    /// // Optional: wait until the relay has it.
    /// client.flush(std::time::Duration::from_secs(5)).await?;
    /// println!("sent {id}");
    /// # Ok(())
    /// # }
    /// ```
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
        let mut ids = self.send_json_texts(peer, &[json]).await?;
        ids.pop().ok_or(ClientError::Closed)
    }

    /// Sends `payloads` to `peer`, in order, as one durable commit: what a
    /// loop of [`MeshClient::send`] does, at the cost of one store write
    /// for the batch instead of one per message (group commit; the
    /// fastest way to stream). Returns the message ids in order. When the
    /// peer has [`meshwire_proto::mesh::MeshConfig::max_unconfirmed_per_peer`]
    /// messages awaiting receipts, the batch waits for receipts (flow
    /// control; at most [`ClientConfig::send_window_wait`] at a time)
    /// instead of failing.
    /// When a payload is refused, the ones before it are sent and
    /// [`ClientError::Batch`] says which one failed.
    ///
    /// ```no_run
    /// # async fn run(client: meshwire::MeshClient, peer: &str) -> Result<(), meshwire::ClientError> {
    /// let rows: Vec<serde_json::Value> = (0..100).map(|i| serde_json::json!({"row": i})).collect();
    /// let ids = client.send_batch(peer, &rows).await?;
    /// assert_eq!(ids.len(), 100);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send_batch<T: Serialize>(&self, peer: &str, payloads: &[T]) -> Result<Vec<String>, ClientError> {
        let jsons = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| {
                serde_json::to_vec(p).map_err(|e| ClientError::Batch {
                    sent: Vec::new(),
                    failed: i,
                    source: Box::new(ClientError::Payload(e.to_string())),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let texts: Vec<&[u8]> = jsons.iter().map(Vec::as_slice).collect();
        self.send_json_texts(peer, &texts).await
    }

    /// Encrypts and commits `jsons` for `peer` in one state step. A refused
    /// payload after the first ends the batch with [`ClientError::Batch`];
    /// a refused single payload is returned as its own error. A batch that
    /// fills the window of messages awaiting receipts waits for receipts
    /// (at most [`ClientConfig::send_window_wait`] each time) and goes on.
    async fn send_json_texts(&self, peer: &str, jsons: &[&[u8]]) -> Result<Vec<String>, ClientError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(ClientError::Closed);
        }
        if jsons.is_empty() {
            return Ok(Vec::new());
        }
        let peer_did = Did::parse(peer)?;
        let peer_lock = {
            let mut locks = self.inner.open_locks.lock().await;
            locks.entry(peer.to_owned()).or_default().clone()
        };
        let _guard = peer_lock.lock().await;
        let single = jsons.len() == 1;
        let mut bundle = None;
        let mut sent: Vec<String> = Vec::with_capacity(jsons.len());
        loop {
            let rest = jsons.get(sent.len()..).unwrap_or_default();
            // Registered before the step: a receipt handled meanwhile wakes it.
            let receipts = self.inner.receipts_notify.notified();
            // Opening the session and encrypting happen under one lock, so
            // no frame handled in between (a knock_reject) can come between;
            // the ratchet steps and the frames are committed before they go.
            let inner = &self.inner;
            let stepped = inner.send_step(peer, |mesh| {
                let mut texts = Vec::with_capacity(rest.len() + 1);
                if !(mesh.has_session(peer) || mesh.is_plaintext_peer(peer)) {
                    let Some(bundle) = bundle.take() else {
                        return Ok((None, Vec::new()));
                    };
                    texts.push(inner.open_session(mesh, peer, &bundle)?);
                }
                let mut rng = rand::thread_rng();
                let mut ids = Vec::with_capacity(rest.len());
                for json in rest {
                    match mesh.encrypt(&mut rng, now(), peer, json) {
                        Ok((id, text)) => {
                            ids.push(id);
                            texts.push(text);
                        }
                        // Nothing of a single send is sent.
                        Err(e) if single => return Err(e.into()),
                        Err(e) => return Ok((Some((ids, Some(e))), texts)),
                    }
                }
                Ok((Some((ids, None)), texts))
            });
            let (ids, refused) = match stepped {
                Ok(Some(step)) => step,
                Ok(None) => {
                    bundle = Some(self.fetch_bundle(&peer_did).await?);
                    continue;
                }
                Err(e) if sent.is_empty() => return Err(e),
                Err(e) => return Err(batch_error(sent, e)),
            };
            sent.extend(ids);
            match refused {
                None => return Ok(sent),
                Some(SendError::TooManyUnconfirmed { .. }) => {
                    // Flow control: wait for receipts, then send the rest.
                    if tokio::time::timeout(self.inner.config.send_window_wait, receipts)
                        .await
                        .is_err()
                    {
                        let e = SendError::TooManyUnconfirmed {
                            peer: peer.to_owned(),
                            count: self.unconfirmed(peer),
                            bytes: 0,
                        };
                        return Err(batch_error(sent, e.into()));
                    }
                }
                Some(e) => return Err(batch_error(sent, e.into())),
            }
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
        let inner = &self.inner;
        inner.send_step(&key, |mesh| Ok(((), vec![inner.open_session(mesh, &key, &bundle)?])))
    }

    /// The peer's bundle, after learning what its registry metadata says
    /// about receipts and its KDF dialect.
    async fn fetch_bundle(&self, peer: &Did) -> Result<meshwire_proto::PreKeyBundle, ClientError> {
        self.inner.peer_metadata(peer.as_str()).await;
        Ok(self.inner.registry.fetch_bundle(peer).await?)
    }

    /// The next message, waiting for one; `None` once the client is closed.
    /// Unless [`ClientConfig::manual_ack`] is set, first acknowledges the
    /// messages earlier receive calls handed over.
    ///
    /// ```no_run
    /// # async fn run(client: meshwire::MeshClient) {
    /// while let Some(message) = client.recv().await {
    ///     println!("{} says {:?}", message.from, message.payload);
    ///     // Acknowledged when the loop asks for the next message: after a
    ///     // crash in between, this message is handed over again.
    /// }
    /// # }
    /// ```
    pub async fn recv(&self) -> Option<Message> {
        loop {
            let notified = self.inner.inbox_notify.notified();
            if let Some(m) = self.inner.take_message(|_| true) {
                return Some(m);
            }
            if self.inner.closed.load(Ordering::SeqCst) {
                return None;
            }
            notified.await;
        }
    }

    /// The messages waiting, at most `max` (at least one: it waits for the
    /// first); empty once the client is closed. Like [`MeshClient::recv`],
    /// asking acknowledges what earlier calls handed over, all in one
    /// durable commit, so a batch costs the store one acknowledgement
    /// instead of one per message.
    ///
    /// ```no_run
    /// # async fn run(client: meshwire::MeshClient) {
    /// loop {
    ///     let batch = client.recv_batch(64).await;
    ///     if batch.is_empty() {
    ///         break; // closed
    ///     }
    ///     for message in &batch {
    ///         println!("{} says {:?}", message.from, message.payload);
    ///     }
    ///     // The whole batch is acknowledged by the next call: after a
    ///     // crash before it, the batch is handed over again.
    /// }
    /// # }
    /// ```
    pub async fn recv_batch(&self, max: usize) -> Vec<Message> {
        loop {
            let notified = self.inner.inbox_notify.notified();
            let batch = self.inner.take_batch(max.max(1));
            if !batch.is_empty() || self.inner.closed.load(Ordering::SeqCst) {
                return batch;
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
    ///
    /// ```no_run
    /// # async fn run(client: meshwire::MeshClient, worker: &str, backup: &str) -> Result<(), meshwire::ClientError> {
    /// use std::time::Duration;
    /// let answer = client.recv_from_any(&[worker, backup], Duration::from_secs(30)).await?;
    /// println!("{} answered first: {:?}", answer.from, answer.payload);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn recv_from_any(&self, senders: &[&str], timeout: Duration) -> Result<Message, ClientError> {
        let wait = async {
            loop {
                let notified = self.inner.inbox_notify.notified();
                if let Some(m) = self.inner.take_message(|m| senders.contains(&m.from.as_str())) {
                    return Ok(m);
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
        self.inner.take_all()
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
            store_commits: c.store_commits.load(Ordering::Relaxed),
            store_failures: c.store_failures.load(Ordering::Relaxed),
            redelivered: c.redelivered.load(Ordering::Relaxed),
            outbox_len: self.inner.outbox_len(),
            reregistrations: c.reregistrations.load(Ordering::Relaxed),
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

    /// Acknowledges `message`: it leaves the durable inbox and is never
    /// handed over again, even after a crash. `Ok(false)` if it was not
    /// waiting for an acknowledgement (acknowledged already). Needed with
    /// [`ClientConfig::manual_ack`]; otherwise the next receive call does it.
    ///
    /// ```no_run
    /// # async fn run(client: meshwire::MeshClient) -> Result<(), meshwire::ClientError> {
    /// // With `manual_ack`: acknowledge once the message is safely handled.
    /// if let Some(message) = client.recv().await {
    ///     std::fs::write("/tmp/last-message.json", &message.raw).ok();
    ///     client.ack(&message)?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn ack(&self, message: &Message) -> Result<bool, ClientError> {
        self.inner.acknowledge(&message.from, &message.id)
    }

    /// Frames sent and received so far, by type.
    pub fn counters(&self) -> FrameCounters {
        lock(&self.inner.counters).clone()
    }

    /// Messages to `peer` not yet confirmed by a receipt.
    pub fn unconfirmed(&self, peer: &str) -> usize {
        lock(&self.inner.mesh).unconfirmed_count(peer)
    }

    /// Sends (and the KNOCKs opening their sessions) the relay has not
    /// confirmed yet: written or not, they are in the durable outbox and go
    /// out again after a reconnection or a restart. `0` means the relay has
    /// everything [`MeshClient::send`] accepted.
    pub fn unconfirmed_by_relay(&self) -> usize {
        self.inner.outbox_len()
    }

    /// Waits until the relay has confirmed every send
    /// ([`MeshClient::unconfirmed_by_relay`] is 0), at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), ClientError> {
        let deadline = deadline_after(timeout);
        while self.unconfirmed_by_relay() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Timeout);
            }
            if self.inner.closed.load(Ordering::SeqCst) {
                return Err(ClientError::Closed);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Frames waiting to be written to the relay socket.
    pub fn queued(&self) -> usize {
        lock(&self.inner.outgoing).len()
    }

    /// The mesh state as JSON (secret), e.g. for a custom store.
    pub fn export_state(&self) -> zeroize::Zeroizing<String> {
        lock(&self.inner.mesh).export_state()
    }

    /// Sends `disconnect`, closes the socket, stops the background task and
    /// releases a store the client opened itself
    /// ([`MeshClientBuilder::state_dir`]), so that a new client can open it.
    pub async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        if !self.inner.config.manual_ack {
            // A graceful close: what the application was handed is handled.
            let _ = self.inner.take_message(|_| false);
        }
        self.inner.shutdown.notify_one();
        self.inner.inbox_notify.notify_waiters();
        self.inner.events.notify.notify_waiters();
        let task = lock(&self.task).take();
        if let Some(task) = task {
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                tracing::warn!("relay task did not stop in time");
            }
        }
        if self.inner.owns_persistence {
            // Another client (this process or another) may open it now.
            self.inner.persistence.close();
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
