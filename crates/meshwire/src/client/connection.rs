//! The relay connection driver: joins with proof, moves frames between the
//! socket and the state machine, reconnects with backoff, and confirms to
//! the durable outbox what the relay has taken. It decides nothing about
//! frames: the state machine does.

use super::config::{ClientConfig, CLOSE_AUTH_FAILED, CLOSE_PROOF_REJECTED, CLOSE_TAKEOVER, MAX_WAIT};
use super::durable::Outgoing;
use super::inner::Inner;
use super::types::ClientEvent;
use super::util::{deadline_after, escape_log, lock, now, saturating_period};
use futures_util::{FutureExt, SinkExt, StreamExt};
use meshwire_proto::frames::{self, ConnectFrame, FetchPendingFrame};
use meshwire_proto::mesh::{ErrorKind, Event};
use meshwire_proto::Did;
use rand_core::{OsRng, RngCore};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub(crate) enum Ended {
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

/// Which relay of [`ClientConfig::relay_urls`] the connection task dials:
/// the next one after a failed attempt or an ended connection, the same
/// one after a takeover.
struct RelayCursor {
    urls: Vec<String>,
    index: usize,
    /// Attempts since the last join (or the start) that did not join.
    misses: usize,
    /// The relay joined last.
    joined: Option<String>,
    /// Why the first relay of the list failed, while no join happened yet
    /// (reported by `connect()` once every relay was tried).
    first_failure: Option<crate::relay_connect::ConnectFailure>,
}

impl RelayCursor {
    fn new(config: &ClientConfig) -> Self {
        Self {
            urls: config.relay_urls().into_iter().map(str::to_owned).collect(),
            index: 0,
            misses: 0,
            joined: None,
            first_failure: None,
        }
    }

    fn url(&self) -> &str {
        self.urls.get(self.index).map_or("", String::as_str)
    }

    /// Moves to the next relay.
    fn advance(&mut self) {
        self.index = (self.index + 1) % self.urls.len().max(1);
    }

    /// An attempt did not join: moves on; whether every relay was tried
    /// since the last join (then the backoff applies before the next).
    fn missed(&mut self) -> bool {
        self.misses = self.misses.saturating_add(1);
        self.advance();
        self.misses % self.urls.len().max(1) == 0
    }

    /// The [`ClientEvent::RelayChanged`] that joining the current relay
    /// makes: it is another than the one joined last (or, on the first
    /// join, not the first of the list).
    fn change(&self) -> Option<ClientEvent> {
        let url = self.url();
        let changed = match &self.joined {
            Some(previous) => previous != url,
            None => self.index != 0,
        };
        changed.then(|| ClientEvent::RelayChanged {
            url: url.to_owned(),
            previous: self.joined.clone(),
        })
    }

    /// The current relay took us.
    fn joined_now(&mut self) {
        self.misses = 0;
        self.first_failure = None;
        self.joined = Some(self.url().to_owned());
    }

    /// The failure `connect()` reports for a failed attempt before any
    /// join: once every relay was tried, the first relay's (the others are
    /// logged).
    fn first_round_failure(
        &mut self,
        failure: crate::relay_connect::ConnectFailure,
    ) -> Option<crate::relay_connect::ConnectFailure> {
        if self.urls.len() < 2 {
            return Some(failure);
        }
        tracing::debug!(target: "meshwire", error = %escape_log(&failure.to_string()), "relay unavailable; trying the next");
        if self.index == 0 {
            self.first_failure = Some(failure.clone());
        }
        if self.index + 1 == self.urls.len() {
            return Some(self.first_failure.take().unwrap_or(failure));
        }
        None
    }
}

pub(crate) async fn run_connection(inner: Arc<Inner>) {
    let mut attempt: u32 = 0;
    let mut ever_connected = false;
    let mut takeovers = Takeovers::default();
    let mut relays = RelayCursor::new(&inner.config);
    loop {
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let endpoint = match crate::relay_connect::RelayEndpoint::parse(relays.url()) {
            Ok(endpoint) => endpoint,
            Err(e) => {
                inner.join_failure.send_replace(Some(e.into()));
                return;
            }
        };
        let url = endpoint.to_string();
        let connecting =
            // TCP_NODELAY: a frame goes out at once, not held by Nagle's
            // algorithm behind an unacknowledged earlier segment (the relay's
            // delayed ACK made that up to 40 ms).
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(socket_config(&inner.config)), true);
        let attempt_timeout = inner.config.connect_timeout.min(MAX_WAIT);
        let result = tokio::select! {
            r = tokio::time::timeout(attempt_timeout, connecting) => r,
            _ = inner.shutdown.notified() => return,
        };
        // Whether the wait before the next attempt applies: after a joined
        // connection ended, and once every relay failed since the last join;
        // a relay of the list not tried yet is dialled at once.
        let back_off = match result {
            Ok(Ok((socket, response))) => {
                attempt = 0;
                // A meshwire relay offers a challenge nonce in the upgrade
                // answer (docs/specs/MESHWIRE-CHALLENGE-AUTH.md); AGT's sends none.
                let challenge = response
                    .headers()
                    .get(meshwire_proto::auth::CHALLENGE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(|nonce| (url.clone(), nonce.to_owned()));
                let ended = drive(&inner, socket, ever_connected, challenge, relays.change()).await;
                let joined = inner.connected.send_replace(false);
                if joined {
                    relays.joined_now();
                }
                if !ever_connected && !joined {
                    // The first attempt ended before the relay took us:
                    // `connect()` reports why (once every relay was tried).
                    let failure = match &ended {
                        Ended::Rejected(code, reason) | Ended::RejectedBeforeJoin(code, reason) => {
                            Some(crate::relay_connect::ConnectFailure::rejected(&url, *code, reason))
                        }
                        Ended::Lost { code, reason } => {
                            relays.first_round_failure(crate::relay_connect::ConnectFailure::Closed {
                                url: url.clone(),
                                detail: match code {
                                    Some(code) => format!("close code {code}, {reason:?}"),
                                    None => reason.clone(),
                                },
                            })
                        }
                        Ended::TakenOver(reason) => Some(crate::relay_connect::ConnectFailure::Closed {
                            url: url.clone(),
                            detail: format!("taken over: {reason:?}"),
                        }),
                        Ended::Shutdown => return,
                    };
                    if let Some(failure) = failure {
                        inner.join_failure.send_replace(Some(failure));
                    }
                }
                ever_connected |= joined;
                match ended {
                    Ended::Shutdown => return,
                    Ended::TakenOver(reason) => {
                        // Same relay: the DID is taken back where it was.
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
                    Ended::Lost { code, reason } => {
                        inner.emit(ClientEvent::Disconnected { code, reason });
                        // Going away (1001), slow consumer (4008), network
                        // loss: the next relay of the list, after the wait.
                        if joined {
                            relays.advance();
                            true
                        } else {
                            relays.missed()
                        }
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(target: "meshwire", url = %escape_log(&url), error = %escape_log(&e.to_string()), "relay connection failed");
                if !ever_connected {
                    let failure = crate::relay_connect::ConnectFailure::from_handshake(&endpoint, &e).await;
                    if let Some(failure) = relays.first_round_failure(failure) {
                        inner.join_failure.send_replace(Some(failure));
                    }
                }
                relays.missed()
            }
            Err(_) => {
                tracing::debug!(target: "meshwire", url = %escape_log(&url), "relay connection timed out");
                if !ever_connected {
                    let failure = crate::relay_connect::ConnectFailure::Timeout {
                        url: url.clone(),
                        after: attempt_timeout,
                    };
                    if let Some(failure) = relays.first_round_failure(failure) {
                        inner.join_failure.send_replace(Some(failure));
                    }
                }
                relays.missed()
            }
        };
        if !back_off {
            continue;
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

async fn drive(
    inner: &Arc<Inner>,
    mut socket: Socket,
    reconnect: bool,
    challenge: Option<(String, String)>,
    moved: Option<ClientEvent>,
) -> Ended {
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
    if let Some(moved) = moved {
        inner.emit(moved);
    }
    if reconnect {
        // The relay may have lost what it held (AGT keeps it in memory):
        // resend what receipt-capable peers have not confirmed.
        let older_than_ms = inner.config.retransmit_after.as_millis() as u64;
        inner.mesh_step(|mesh| mesh.retransmit(&mut rand::thread_rng(), now(), older_than_ms));
    }
    // Aborted however this connection ends (also when the connection task
    // itself is aborted: a dropped JoinHandle would detach it).
    let _registry_upkeep = AbortOnDrop(tokio::spawn(super::registry_upkeep::registry_upkeep(inner.clone())));
    let mut awaiting = VecDeque::new();
    let ended = drive_loop(inner, &mut socket, &mut awaiting).await;
    // Frames the relay never confirmed go out again first on the next
    // connection (a peer drops what it already has as a duplicate).
    if !awaiting.is_empty() {
        let mut outgoing = lock(&inner.outgoing);
        for (_, frame) in awaiting.into_iter().rev() {
            outgoing.push_front(frame);
        }
    }
    ended
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
                let events = inner.commit_step(|mesh| mesh.handle_text(&mut rand::thread_rng(), now(), &text));
                let relay_error = events.as_deref().and_then(relay_error);
                if let Some(events) = events {
                    inner.process(events);
                }
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

/// The first relay `error` frame's detail among `events`.
fn relay_error(events: &[Event]) -> Option<String> {
    events.iter().find_map(|e| match e {
        Event::Error(m) if m.kind == ErrorKind::Relay => Some(m.detail.clone()),
        _ => None,
    })
}

/// Prefix of the WebSocket pings that ask the relay to confirm it read
/// the frames sent before them (then their outbox rows go).
const OUTBOX_PING: &[u8] = b"meshwire-outbox:";

/// Outbox frames written to the socket, each with the number of the ping
/// sent (or to be sent) after it.
type Awaiting = VecDeque<(u64, Outgoing)>;

/// A ping unanswered for this long no longer holds the next one back.
const PING_PATIENCE: Duration = Duration::from_secs(5);

/// The outbox pings of one connection: at most one is in flight, so a
/// burst of writes costs the relay one ping per round trip, not one per
/// write (frames written meanwhile wait for the next ping, sent when the
/// pong comes).
#[derive(Default)]
struct OutboxPings {
    /// The number of the last ping sent.
    sent: u64,
    /// When the last ping was sent, while its pong has not come.
    in_flight: Option<tokio::time::Instant>,
}

impl OutboxPings {
    /// The number the next ping will carry: frames written now are
    /// confirmed by it.
    fn next(&self) -> u64 {
        self.sent.wrapping_add(1)
    }

    /// Whether a ping should go now: frames wait for one, and none is in
    /// flight (or the one in flight was not answered in time).
    fn due(&self, awaiting: &Awaiting) -> bool {
        awaiting.back().is_some_and(|(s, _)| *s == self.next())
            && self.in_flight.is_none_or(|at| at.elapsed() >= PING_PATIENCE)
    }

    /// The payload of the next ping, counted as sent.
    fn send(&mut self) -> Vec<u8> {
        self.sent = self.next();
        self.in_flight = Some(tokio::time::Instant::now());
        let mut payload = OUTBOX_PING.to_vec();
        payload.extend_from_slice(self.sent.to_string().as_bytes());
        payload
    }

    /// Ping `seq` was answered.
    fn answered(&mut self, seq: u64) {
        if seq == self.sent {
            self.in_flight = None;
        }
    }
}

/// The ping sequence number in a pong's payload, if it is one of ours.
fn outbox_pong(payload: &[u8]) -> Option<u64> {
    let rest = payload.strip_prefix(OUTBOX_PING)?;
    std::str::from_utf8(rest).ok()?.parse().ok()
}

async fn drive_loop(inner: &Arc<Inner>, socket: &mut Socket, awaiting: &mut Awaiting) -> Ended {
    let mut pings = OutboxPings::default();
    let mut heartbeat = tokio::time::interval(saturating_period(inner.config.heartbeat_interval));
    heartbeat.reset();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    // Checked four times per `retransmit_after`: a message goes out again
    // between 1 and 1.25 times that after it was sent (checked once per
    // period, that could take twice as long).
    let mut retransmit = tokio::time::interval(saturating_period(
        (inner.config.retransmit_after / 4).max(Duration::from_millis(100)),
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
                lock(&inner.outgoing).push_back(Outgoing::frame(frames::to_text(&FetchPendingFrame::for_did(&did))));
            }
        }
        paused = full;
        if inner.reconnect_now.swap(false, Ordering::SeqCst) {
            // A commit failed while receiving: what was not acked comes
            // again on the next connection.
            return Ended::Lost {
                code: None,
                reason: "the durable store failed a commit; reconnecting for redelivery".into(),
            };
        }
        // Flush before waiting: a notification may have come while busy.
        // Frames are written without a flush each; one flush (a single
        // write to the socket, in the common case) ends the batch.
        let mut wrote = match feed_queued(inner, socket, awaiting, &pings).await {
            Ok(wrote) => wrote,
            Err(reason) => return Ended::Lost { code: None, reason },
        };
        if pings.due(awaiting) {
            wrote = true;
            if let Err(e) = socket.feed(WsMessage::Ping(pings.send())).await {
                return Ended::Lost {
                    code: None,
                    reason: e.to_string(),
                };
            }
        }
        if wrote {
            if let Err(e) = socket.flush().await {
                return Ended::Lost {
                    code: None,
                    reason: e.to_string(),
                };
            }
        }
        tokio::select! {
            incoming = socket.next(), if !paused => {
                let was_text = matches!(incoming, Some(Ok(WsMessage::Text(_))));
                if let Some(ended) = receive(inner, socket, awaiting, &mut pings, &mut last_error, incoming) {
                    return ended;
                }
                if was_text {
                    // The messages are committed: let the application
                    // take them before this task writes the acks and
                    // receipts they owe (the relay keeps them until acked,
                    // so only latency is at stake in the order).
                    tokio::task::yield_now().await;
                }
            }
            _ = inner.outgoing_notify.notified() => {}
            Some((from, knock_id, accepted)) = verdicts.recv() => {
                inner.mesh_step(|mesh| mesh.decide_knock(&mut rand::thread_rng(), now(), &from, &knock_id, accepted));
            }
            _ = heartbeat.tick() => {
                let text = lock(&inner.mesh).heartbeat_frame(now());
                if let Err(e) = send_text(inner, socket, text).await {
                    return Ended::Lost { code: None, reason: e };
                }
            }
            _ = tick.tick() => {
                let t = now();
                inner.mesh_step(|mesh| {
                    let mut events = Vec::new();
                    if mesh.next_timeout().is_some_and(|at| at <= t) {
                        events.extend(mesh.handle_timeout(&mut rand::thread_rng(), t));
                    }
                    events.extend(mesh.flush_receipts_settled(&mut rand::thread_rng(), t));
                    events
                });
                inner.store_idle_work();
            }
            _ = retransmit.tick() => {
                let older_than_ms = inner.config.retransmit_after.as_millis() as u64;
                inner.mesh_step(|mesh| mesh.retransmit(&mut rand::thread_rng(), now(), older_than_ms));
            }
            _ = inner.shutdown.notified() => {
                // The core decides what leaving means: frames (the step
                // queued them, after any still waiting), then the close.
                let events = inner.commit_step(|mesh| mesh.leave(&mut rand::thread_rng(), now())).unwrap_or_default();
                let _ = feed_queued(inner, socket, awaiting, &pings).await;
                let _ = socket.flush().await;
                for event in events {
                    match event {
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

/// Feeds every queued frame to the socket (without flushing); outbox
/// frames wait in `awaiting` for the relay's confirmation. Whether any was
/// written; on a socket error the frame goes back to the queue's front.
async fn feed_queued(
    inner: &Arc<Inner>,
    socket: &mut Socket,
    awaiting: &mut Awaiting,
    pings: &OutboxPings,
) -> Result<bool, String> {
    let mut wrote = false;
    loop {
        let next = lock(&inner.outgoing).pop_front();
        let Some(frame) = next else { return Ok(wrote) };
        inner.count(true, &frame.text);
        if let Err(e) = socket.feed(WsMessage::Text(frame.text.clone())).await {
            lock(&inner.outgoing).push_front(frame);
            return Err(e.to_string());
        }
        wrote = true;
        if frame.outbox.is_some() {
            awaiting.push_back((pings.next(), frame));
        }
    }
}

/// At most this many text frames already read from the socket are handled
/// in one state step, that is one durable commit (group commit: a burst of
/// messages costs one transaction, not one each).
const READ_BATCH: usize = 64;

type Incoming = Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>;

/// Handles what the socket gave, together with the text frames that are
/// already waiting behind it (up to [`READ_BATCH`], and no more than the
/// inbox has room for): they go through the state machine in one commit,
/// in order, then the first other frame is handled. `Some` when the
/// connection ended.
fn receive(
    inner: &Arc<Inner>,
    socket: &mut Socket,
    awaiting: &mut Awaiting,
    pings: &mut OutboxPings,
    last_error: &mut String,
    first: Incoming,
) -> Option<Ended> {
    let mut texts = Vec::new();
    let mut other = None;
    match first {
        Some(Ok(WsMessage::Text(text))) => texts.push(text),
        incoming => other = Some(incoming),
    }
    if !texts.is_empty() {
        let room = inner.inbox_room().clamp(1, READ_BATCH);
        while texts.len() < room {
            match socket.next().now_or_never() {
                Some(Some(Ok(WsMessage::Text(text)))) => texts.push(text),
                Some(incoming) => {
                    other = Some(incoming);
                    break;
                }
                None => break,
            }
        }
        for text in &texts {
            inner.count(false, text);
        }
        let stepped = inner.commit_step(|mesh| {
            let mut rng = rand::thread_rng();
            let mut events = Vec::new();
            for text in &texts {
                events.extend(mesh.handle_text(&mut rng, now(), text));
            }
            events.extend(mesh.flush_receipts_due(&mut rng, now()));
            events
        });
        if let Some(events) = stepped {
            if let Some(detail) = relay_error(&events) {
                *last_error = detail;
            }
            inner.process(events);
        }
    }
    match other? {
        Some(Ok(WsMessage::Text(_))) => None,
        Some(Ok(WsMessage::Pong(payload))) => {
            if let Some(seq) = outbox_pong(&payload) {
                pings.answered(seq);
                let mut confirmed = Vec::new();
                while awaiting.front().is_some_and(|(s, _)| *s <= seq) {
                    if let Some((_, frame)) = awaiting.pop_front() {
                        confirmed.extend(frame.outbox);
                    }
                }
                inner.relay_has(&confirmed);
            }
            None
        }
        Some(Ok(WsMessage::Binary(_))) => {
            inner.emit(ClientEvent::Error {
                kind: ErrorKind::Frame,
                peer: None,
                detail: "binary frame ignored".into(),
            });
            None
        }
        Some(Ok(WsMessage::Close(frame))) => Some(closed(frame, std::mem::take(last_error))),
        Some(Ok(_)) => None,
        Some(Err(e)) => Some(Ended::Lost {
            code: None,
            reason: e.to_string(),
        }),
        None => Some(Ended::Lost {
            code: None,
            reason: "connection closed".into(),
        }),
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame(n: u32) -> Outgoing {
        Outgoing {
            text: format!("frame {n}"),
            outbox: Some(("peer".into(), n.to_string())),
        }
    }

    #[test]
    fn one_outbox_ping_is_in_flight_and_frames_written_meanwhile_wait_for_the_next() {
        let mut pings = OutboxPings::default();
        let mut awaiting = Awaiting::new();
        assert!(!pings.due(&awaiting), "nothing written, no ping");
        awaiting.push_back((pings.next(), frame(1)));
        assert!(pings.due(&awaiting));
        let first = pings.send();
        assert_eq!(outbox_pong(&first), Some(1));
        // Written while ping 1 is in flight: no second ping yet.
        awaiting.push_back((pings.next(), frame(2)));
        awaiting.push_back((pings.next(), frame(3)));
        assert!(!pings.due(&awaiting));
        // An answer to another (older) ping changes nothing.
        pings.answered(0);
        assert!(!pings.due(&awaiting));
        // Pong 1: frame 1 is confirmed by it, frames 2 and 3 get ping 2.
        pings.answered(1);
        assert!(pings.due(&awaiting));
        assert_eq!(outbox_pong(&pings.send()), Some(2));
        assert_eq!(awaiting.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 2]);
        assert!(!pings.due(&awaiting));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_ping_does_not_hold_the_outbox_forever() {
        let mut pings = OutboxPings::default();
        let mut awaiting = Awaiting::new();
        awaiting.push_back((pings.next(), frame(1)));
        pings.send();
        awaiting.push_back((pings.next(), frame(2)));
        assert!(!pings.due(&awaiting));
        tokio::time::advance(PING_PATIENCE).await;
        assert!(pings.due(&awaiting), "the lost pong is given up on");
        assert_eq!(outbox_pong(&pings.send()), Some(2));
    }
}
