//! Write-ahead persistence of a client: every state change is committed
//! before its effects leave the process, the durable inbox holds messages
//! until the application acknowledges them, and the durable outbox holds
//! sends until the relay has them (see [`crate::persist`] for the store).

use super::inner::Inner;
use super::types::{decode_payload, ClientError, ClientEvent, Message};
use super::util::{escape_log, lock};
use crate::persist::{unix_ms_now, Commit, InboxEntry, OutboxEntry, PersistError, Snapshot};
use meshwire_proto::mesh::{Event, Mesh, RandomUuids};
use meshwire_proto::Identity;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use zeroize::Zeroizing;

/// A frame waiting for the relay socket. `outbox` names its durable
/// outbox row, removed once the relay showed it has the frame.
#[derive(Clone)]
pub(crate) struct Outgoing {
    pub(crate) text: String,
    pub(crate) outbox: Option<(String, String)>,
}

impl Outgoing {
    /// A frame that need not survive a restart (acks, receipts, verdicts,
    /// heartbeats: the state machine makes them again if needed).
    pub(crate) fn frame(text: String) -> Self {
        Self { text, outbox: None }
    }
}

/// The application's side of the durable inbox.
#[derive(Default)]
pub(crate) struct InboxState {
    /// Committed, not handed to the application yet, in arrival order.
    pub(crate) queue: VecDeque<Message>,
    /// Handed to the application and not acknowledged: `(from, id)`.
    pub(crate) handed: VecDeque<(String, String)>,
    /// The store refused an inbox row (its byte limit): stop reading the
    /// relay until the application acknowledges something.
    pub(crate) store_full: bool,
}

impl InboxState {
    /// Messages in the durable inbox (handed or not).
    pub(crate) fn len(&self) -> usize {
        self.queue.len() + self.handed.len()
    }
}

pub(crate) fn message_of(from: String, id: String, payload: Vec<u8>, plaintext: bool, redelivered: bool) -> Message {
    Message {
        from,
        id,
        payload: decode_payload(&payload),
        raw: payload,
        plaintext,
        redelivered,
    }
}

/// The frame id of a frame text (every frame we send has one).
fn frame_id(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

impl Inner {
    /// Runs `f` on the state machine and commits, under the state lock,
    /// the rows it changed together with what `f` added to the commit
    /// (inbox or outbox rows). On a failed commit the state machine is put
    /// back to the last commit (so nothing of `f` happened, as far as
    /// anyone outside the process can tell) and the error is returned.
    pub(crate) fn state_step<R>(&self, f: impl FnOnce(&mut Mesh, &mut Commit) -> R) -> Result<R, PersistError> {
        self.queued_step(|mesh, rows| (f(mesh, rows), Vec::new()))
    }

    /// [`Inner::state_step`] whose frames are queued for the relay once
    /// committed, before the state lock is released: frames leave in the
    /// order of the steps that made them, whichever task stepped. (Queued
    /// after the lock, an application's send could overtake the resync
    /// KNOCK of another task, and its message, on the new session, reach
    /// the peer before the session's KNOCK: the peer then took the session
    /// for broken.)
    fn queued_step<R>(&self, f: impl FnOnce(&mut Mesh, &mut Commit) -> (R, Vec<Outgoing>)) -> Result<R, PersistError> {
        let mut mesh = lock(&self.mesh);
        let mut rows = Commit::new();
        let (result, frames) = f(&mut mesh, &mut rows);
        let mut commit = Commit::from_dirty(&mut mesh);
        commit.inbox_add.append(&mut rows.inbox_add);
        commit.outbox_add.append(&mut rows.outbox_add);
        match self.commit(&commit) {
            Ok(()) => {
                if !frames.is_empty() {
                    let durable = frames.iter().filter(|f| f.outbox.is_some()).count();
                    self.outbox_pending.fetch_add(durable as u64, Ordering::SeqCst);
                    self.enqueue(frames);
                }
                drop(mesh);
                Ok(result)
            }
            Err(e) => {
                self.rollback(&mut mesh);
                Err(e)
            }
        }
    }

    /// [`Inner::state_step`] for frames from the relay and timers: each
    /// decrypted message becomes an inbox row of the same commit, and its
    /// ack is queued with the frames the step made (see
    /// [`Inner::queued_step`]); the other events are returned for
    /// [`Inner::process`]. `None` when the commit failed: the messages'
    /// keys are not spent, and the connection is dropped so that the relay
    /// delivers again what was not acked.
    pub(crate) fn commit_step(&self, f: impl FnOnce(&mut Mesh) -> Vec<Event>) -> Option<Vec<Event>> {
        let stepped = self.queued_step(|mesh, rows| {
            let events = f(mesh);
            let received_at_ms = unix_ms_now();
            let mut frames = Vec::new();
            let mut rest = Vec::with_capacity(events.len());
            for event in events {
                match event {
                    Event::Transmit(text) => frames.push(Outgoing::frame(text)),
                    Event::Message(m) => {
                        rows.add_inbox(InboxEntry {
                            from: m.from.clone(),
                            id: m.id.clone(),
                            payload: Zeroizing::new(m.payload.clone()),
                            received_at_ms,
                            plaintext: m.plaintext,
                        });
                        // Committed to the durable inbox: the relay may
                        // forget it.
                        frames.push(Outgoing::frame(m.ack.clone()));
                        rest.push(Event::Message(m));
                    }
                    other => rest.push(other),
                }
            }
            (rest, frames)
        });
        match stepped {
            Ok(events) => Some(events),
            Err(e) => {
                if matches!(e, PersistError::InboxFull { .. }) {
                    lock(&self.inbox).store_full = true;
                }
                self.reconnect_now.store(true, Ordering::SeqCst);
                self.outgoing_notify.notify_one();
                None
            }
        }
    }

    /// [`Inner::state_step`] for a send: `f` returns frames for `peer`,
    /// each committed as an outbox row with the ratchet step that made it
    /// and queued (see [`Inner::queued_step`]). A refused send commits what
    /// it changed anyway (a session opened before the encryption failed).
    pub(crate) fn send_step<R>(
        &self,
        peer: &str,
        f: impl FnOnce(&mut Mesh) -> Result<(R, Vec<String>), ClientError>,
    ) -> Result<R, ClientError> {
        self.queued_step(|mesh, rows| {
            let (result, texts) = match f(mesh) {
                Ok(stepped) => stepped,
                Err(e) => return (Err(e), Vec::new()),
            };
            let created_at_ms = unix_ms_now();
            let frames: Vec<Outgoing> = texts
                .into_iter()
                .map(|text| {
                    let key = (peer.to_owned(), frame_id(&text));
                    rows.add_outbox(OutboxEntry {
                        peer: key.0.clone(),
                        id: key.1.clone(),
                        payload: Zeroizing::new(text.clone().into_bytes()),
                        created_at_ms,
                    });
                    Outgoing {
                        text,
                        outbox: Some(key),
                    }
                })
                .collect();
            (Ok(result), frames)
        })?
    }

    /// Commits `commit`, counting it; a failure is reported as an event.
    pub(crate) fn commit(&self, commit: &Commit) -> Result<(), PersistError> {
        if commit.is_empty() {
            return Ok(());
        }
        match self.persistence.commit(commit) {
            Ok(()) => {
                self.stats.store_commits.fetch_add(1, Ordering::Relaxed);
                self.store_idle.committed();
                Ok(())
            }
            Err(e) => {
                self.stats.store_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "meshwire", error = %escape_log(&e.to_string()), "durable commit failed");
                self.emit(ClientEvent::StoreError { detail: e.to_string() });
                Err(e)
            }
        }
    }

    /// Puts the state machine back to what the store holds (after a failed
    /// commit). Peer metadata and configuration are kept; KNOCKs awaiting a
    /// verdict and buffered frames that were never committed are lost (the
    /// relay delivers unacked frames again).
    fn rollback(&self, mesh: &mut Mesh) {
        let restored = self.persistence.load().and_then(|snapshot| {
            snapshot
                .restore_mesh(
                    Identity::from_seed(&mesh.identity().seed()),
                    mesh.config_mut().clone(),
                    Box::new(RandomUuids),
                )
                .map_err(|e| PersistError::Backend {
                    location: self.persistence.location(),
                    source: Box::new(e),
                })
        });
        match restored {
            Ok(Some(restored)) => *mesh = restored,
            Ok(None) => {}
            Err(e) => {
                tracing::error!(target: "meshwire", error = %escape_log(&e.to_string()), "could not roll back to the store");
                self.emit(ClientEvent::StoreError {
                    detail: format!("rolling back to the store: {e}"),
                });
            }
        }
    }

    /// Hands committed messages to the application.
    pub(crate) fn deliver(&self, messages: Vec<Message>) {
        lock(&self.inbox).queue.extend(messages);
        self.inbox_notify.notify_waiters();
        self.inbox_notify.notify_one();
    }

    /// Whether the inbox is full: the client stops reading the relay.
    pub(crate) fn inbox_full(&self) -> bool {
        let inbox = lock(&self.inbox);
        inbox.store_full || inbox.len() >= self.config.inbox_capacity.max(1)
    }

    /// How many more messages the inbox takes before it is full.
    pub(crate) fn inbox_room(&self) -> usize {
        let inbox = lock(&self.inbox);
        self.config.inbox_capacity.max(1).saturating_sub(inbox.len())
    }

    /// Takes the next message for the application (the first one `pick`
    /// selects), recording it as handed over; without `manual_ack`, first
    /// acknowledges what earlier calls handed over.
    pub(crate) fn take_message(&self, pick: impl Fn(&Message) -> bool) -> Option<Message> {
        self.auto_ack();
        let mut inbox = lock(&self.inbox);
        let i = inbox.queue.iter().position(pick)?;
        let message = inbox.queue.remove(i)?;
        inbox.handed.push_back((message.from.clone(), message.id.clone()));
        Some(message)
    }

    /// Takes every waiting message (see [`Inner::take_message`]).
    pub(crate) fn take_all(&self) -> Vec<Message> {
        self.take_batch(usize::MAX)
    }

    /// Takes the oldest `max` waiting messages (see [`Inner::take_message`]).
    pub(crate) fn take_batch(&self, max: usize) -> Vec<Message> {
        self.auto_ack();
        let mut inbox = lock(&self.inbox);
        let take = inbox.queue.len().min(max);
        let messages: Vec<Message> = inbox.queue.drain(..take).collect();
        for m in &messages {
            inbox.handed.push_back((m.from.clone(), m.id.clone()));
        }
        messages
    }

    /// Acknowledges what was handed over, unless acks are manual.
    fn auto_ack(&self) {
        if self.config.manual_ack {
            return;
        }
        let handed: Vec<(String, String)> = lock(&self.inbox).handed.iter().cloned().collect();
        if handed.is_empty() {
            return;
        }
        let mut commit = Commit::new();
        for (from, id) in &handed {
            commit.remove_inbox(from.clone(), id.clone());
        }
        if self.commit(&commit).is_ok() {
            let mut inbox = lock(&self.inbox);
            let acked: std::collections::HashSet<&(String, String)> = handed.iter().collect();
            inbox.handed.retain(|key| !acked.contains(key));
            inbox.store_full = false;
            drop(inbox);
            self.outgoing_notify.notify_one();
        }
    }

    /// The application acknowledges message `id` from `from`: its inbox row
    /// is removed durably. `Ok(false)` if it was not waiting for one.
    pub(crate) fn acknowledge(&self, from: &str, id: &str) -> Result<bool, ClientError> {
        let held = {
            let inbox = lock(&self.inbox);
            inbox.handed.iter().any(|(f, i)| f == from && i == id)
                || inbox.queue.iter().any(|m| m.from == from && m.id == id)
        };
        if !held {
            return Ok(false);
        }
        let mut commit = Commit::new();
        commit.remove_inbox(from, id);
        self.commit(&commit)?;
        let mut inbox = lock(&self.inbox);
        inbox.handed.retain(|(f, i)| !(f == from && i == id));
        inbox.queue.retain(|m| !(m.from == from && m.id == id));
        inbox.store_full = false;
        drop(inbox);
        // Reading the relay may resume.
        self.outgoing_notify.notify_one();
        Ok(true)
    }

    /// The relay has these frames (it answered a ping sent after them):
    /// their outbox rows go.
    pub(crate) fn relay_has(&self, keys: &[(String, String)]) {
        if keys.is_empty() {
            return;
        }
        let mut commit = Commit::new();
        for (peer, id) in keys {
            commit.remove_outbox(peer.clone(), id.clone());
        }
        // A failure only means the frames are sent again after a restart,
        // and the peer drops them as duplicates.
        let _ = self.commit(&commit);
        let confirmed = keys.len() as u64;
        let _ = self
            .outbox_pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(confirmed))
            });
    }

    /// Loads what the store held at start: unacknowledged messages are
    /// handed over again (marked redelivered) and unsent frames go out
    /// first, in the order they were accepted.
    pub(crate) fn restore_queues(&self, snapshot: &Snapshot) {
        let messages: Vec<Message> = snapshot
            .inbox
            .iter()
            .map(|e| message_of(e.from.clone(), e.id.clone(), e.payload.to_vec(), e.plaintext, true))
            .collect();
        if !messages.is_empty() {
            self.stats
                .redelivered
                .fetch_add(messages.len() as u64, Ordering::Relaxed);
            tracing::info!(target: "meshwire", count = messages.len(), "handing over unacknowledged messages again");
            self.deliver(messages);
        }
        let frames: Vec<Outgoing> = snapshot
            .outbox
            .iter()
            .filter_map(|e| {
                let text = String::from_utf8(e.payload.to_vec()).ok()?;
                Some(Outgoing {
                    text,
                    outbox: Some((e.peer.clone(), e.id.clone())),
                })
            })
            .collect();
        if !frames.is_empty() {
            tracing::info!(target: "meshwire", count = frames.len(), "sending what the relay had not taken before the restart");
            self.outbox_pending.fetch_add(frames.len() as u64, Ordering::SeqCst);
            self.enqueue(frames);
        }
    }

    /// Outbox frames the relay has not confirmed yet.
    pub(crate) fn outbox_len(&self) -> usize {
        usize::try_from(self.outbox_pending.load(Ordering::SeqCst)).unwrap_or(usize::MAX)
    }
}

/// Commits the state of a new agent (nothing stored yet) in full.
pub(crate) fn commit_new_state(inner: &Arc<Inner>) -> Result<(), PersistError> {
    let commit = Commit::full(&mut lock(&inner.mesh));
    inner.commit(&commit)
}
