//! The relay: a WebSocket at `/ws` that routes frames between connected
//! agents and stores them for agents that are not live
//! (`agentmesh.relay` of AGT 5.0.0).
//!
//! A connection's first frame is `connect` (with proof of possession of the
//! DID's key unless [`ServerConfig::allow_unauthenticated_did`]). After it,
//! `message` / `knock` / `knock_accept` / `knock_reject` frames whose `from`
//! is the connection's DID are forwarded byte for byte to `to`: live when
//! the recipient is connected and not stale (and its queue has room),
//! otherwise into the inbox, where they stay until the recipient sends
//! `ack` for them or they expire. As in the reference, a live delivery is
//! not stored, so its delivery is at most once; stored frames are delivered
//! at least once (on every connect and `fetch_pending` until acknowledged).
//!
//! [`ServerConfig::allow_unauthenticated_did`]: crate::ServerConfig::allow_unauthenticated_did

pub(crate) mod inbox;
pub(crate) mod proof;

use crate::config::duration_ms;
use crate::http::ApiError;
use crate::replay::ClaimError;
use crate::server::Shared;
use crate::util::{constant_time_eq, Esc};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::OriginalUri;
use axum::extract::State;
use axum::http::header::HOST;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use inbox::{Inbox, InboxLimits, StoreOutcome};
use meshwire_proto::auth::CHALLENGE_HEADER;
use meshwire_proto::time::Timestamp;
use serde::Serialize;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// WebSocket close codes.
pub mod close_code {
    /// Normal closure (`disconnect` frame).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// No `connect` first frame (wrong type, invalid, or none in time).
    pub const CONNECT_REQUIRED: u16 = 4001;
    /// `connect` frame without `from`.
    pub const MISSING_FROM: u16 = 4002;
    /// Shared-secret `token` missing or wrong.
    pub const AUTH_FAILED: u16 = 4003;
    /// Nothing received for the idle timeout.
    pub const IDLE_TIMEOUT: u16 = 4004;
    /// DID proof of possession failed.
    pub const PROOF_FAILED: u16 = 4005;
    /// Another connection authenticated as the same DID.
    pub const SESSION_REPLACED: u16 = 4006;
}

/// How long a taking-over connection waits for the one it replaces to hand
/// its undelivered queue back to the inbox.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);
/// How long to wait for the peer's close frame after sending ours.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// A peer that does not take a frame within this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A frame queued for a live connection.
#[derive(Debug)]
struct Delivery {
    id: String,
    text: Arc<str>,
}

/// A live connection, as the router sees it.
#[derive(Debug)]
struct ConnHandle {
    id: u64,
    tx: mpsc::Sender<Delivery>,
    /// Bytes of frames in `tx`'s queue.
    queued_bytes: Arc<AtomicUsize>,
    /// Last time (server clock, ms) anything arrived on the connection.
    last_active: Arc<AtomicU64>,
    /// Tells the connection that another one replaced it.
    replaced: oneshot::Sender<()>,
    /// Becomes true once the connection handed its queue back.
    done: watch::Receiver<bool>,
}

/// Relay state: live connections, the inbox and counters.
#[derive(Debug)]
pub(crate) struct Relay {
    conns: Mutex<HashMap<String, ConnHandle>>,
    inbox: Mutex<Inbox>,
    next_id: AtomicU64,
    pub(crate) routed: AtomicU64,
    pub(crate) stored: AtomicU64,
    pub(crate) delivered: AtomicU64,
}

impl Relay {
    pub(crate) fn new(limits: InboxLimits) -> Self {
        Self {
            conns: Mutex::new(HashMap::new()),
            inbox: Mutex::new(Inbox::new(limits)),
            next_id: AtomicU64::new(1),
            routed: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        }
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<String, ConnHandle>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn connected(&self) -> usize {
        self.conns().len()
    }

    pub(crate) fn pending_messages(&self) -> usize {
        self.inbox().len()
    }

    pub(crate) fn connected_dids(&self) -> Vec<String> {
        let mut dids: Vec<String> = self.conns().keys().cloned().collect();
        dids.sort();
        dids
    }
}

#[derive(Serialize)]
pub(crate) struct RelayCounters {
    messages_routed: u64,
    messages_stored: u64,
    messages_delivered: u64,
}

#[derive(Serialize)]
pub(crate) struct RelayHealth {
    status: &'static str,
    service: &'static str,
    connected_agents: usize,
    verified_agents: usize,
    entra_verify_enabled: bool,
    stats: RelayCounters,
    #[serde(skip_serializing_if = "Option::is_none")]
    registered_agents: Option<usize>,
}

pub(crate) fn health_body(shared: &Shared, combined: bool) -> Json<RelayHealth> {
    let relay = &shared.relay;
    Json(RelayHealth {
        status: "healthy",
        service: if combined {
            "agentmesh-relay+registry"
        } else {
            "agentmesh-relay"
        },
        connected_agents: relay.connected(),
        verified_agents: 0,
        entra_verify_enabled: false,
        stats: RelayCounters {
            messages_routed: relay.routed.load(Ordering::Relaxed),
            messages_stored: relay.stored.load(Ordering::Relaxed),
            messages_delivered: relay.delivered.load(Ordering::Relaxed),
        },
        registered_agents: combined.then(|| shared.registry.len()),
    })
}

pub(crate) async fn health(State(shared): State<Arc<Shared>>) -> Json<RelayHealth> {
    health_body(&shared, false)
}

pub(crate) async fn combined_health(State(shared): State<Arc<Shared>>) -> Json<RelayHealth> {
    health_body(&shared, true)
}

/// `GET /ws`. The 101 answer carries a fresh challenge nonce in
/// `x-meshwire-challenge` (meshwire extension; reference clients ignore
/// the header).
pub(crate) async fn ws_handler(
    State(shared): State<Arc<Shared>>,
    uri: OriginalUri,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(upgrade) = upgrade else {
        // Starlette answers plain HTTP on a WebSocket route with 404.
        return ApiError::not_found("Not Found").into_response();
    };
    let limit = shared.config.max_frame_bytes;
    // Frames up to this size are read and answered with an error frame when
    // over `limit`; anything larger ends the connection.
    let hard_limit = limit.saturating_mul(2).max(limit.saturating_add(64 * 1024));
    let (nonce, _) = shared.challenges.issue(shared.config.now());
    let context = proof::Upgrade {
        nonce: nonce.clone(),
        host: headers.get(HOST).and_then(|h| h.to_str().ok()).map(str::to_owned),
        target: uri.0.path_and_query().map_or("/ws", |pq| pq.as_str()).to_owned(),
    };
    let mut response = upgrade
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        .on_upgrade(move |socket| session(shared, socket, context));
    if let Ok(value) = HeaderValue::from_str(&nonce) {
        response.headers_mut().insert(CHALLENGE_HEADER, value);
    }
    response
}

type Sink = SplitSink<WebSocket, Message>;
type Stream = SplitStream<WebSocket>;

/// The socket went away while we were writing to it.
#[derive(Debug)]
struct Gone;

fn error_frame(detail: &str) -> String {
    // Key order as the reference writes it: {"type":"error","detail":...}.
    let detail = serde_json::to_string(detail).unwrap_or_else(|_| "\"\"".to_owned());
    format!("{{\"type\":\"error\",\"detail\":{detail}}}")
}

async fn send_text(sink: &mut Sink, text: String) -> Result<(), Gone> {
    match tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(Gone),
    }
}

async fn send_error(sink: &mut Sink, detail: &str) -> Result<(), Gone> {
    send_text(sink, error_frame(detail)).await
}

async fn send_close(sink: &mut Sink, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Cow::Borrowed(reason),
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Close(Some(frame)))).await;
}

/// Reads until the peer's close frame (or end of stream), briefly, so our
/// close frame gets its reply and queued writes are flushed.
async fn linger(stream: &mut Stream) {
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Completes once the server shuts down (without holding the watch guard).
async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}

enum FirstFrame {
    Text(String),
    Binary,
    Gone,
}

async fn first_frame(stream: &mut Stream) -> FirstFrame {
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => return FirstFrame::Text(text),
            Some(Ok(Message::Binary(_))) => return FirstFrame::Binary,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_)) | Err(_)) | None => return FirstFrame::Gone,
        }
    }
}

/// Sends an error frame and closes with `code`.
async fn reject(sink: &mut Sink, stream: &mut Stream, code: u16, detail: &str) {
    reject_with_reason(sink, stream, code, detail, "").await;
}

/// Sends an error frame and closes with `code` and `reason`.
async fn reject_with_reason(sink: &mut Sink, stream: &mut Stream, code: u16, detail: &str, reason: &'static str) {
    if send_error(sink, detail).await.is_ok() {
        send_close(sink, code, reason).await;
        linger(stream).await;
    }
}

/// Reads and checks the `connect` frame; the connection's DID on success.
/// A proof is claimed in the once-only memory only once everything else
/// passed, and before the connection replaces any other: a replayed frame
/// never displaces the live socket.
async fn handshake(shared: &Shared, upgrade: &proof::Upgrade, sink: &mut Sink, stream: &mut Stream) -> Option<String> {
    let mut shutdown = shared.shutdown_receiver();
    let first = tokio::select! {
        first = tokio::time::timeout(shared.config.connect_timeout, first_frame(stream)) => first,
        () = shutting_down(&mut shutdown) => {
            send_close(sink, close_code::GOING_AWAY, "server shutting down").await;
            return None;
        }
    };
    let text = match first {
        Err(_elapsed) => {
            tracing::debug!("no connect frame in time");
            reject(
                sink,
                stream,
                close_code::CONNECT_REQUIRED,
                "Timed out waiting for 'connect' frame",
            )
            .await;
            return None;
        }
        Ok(FirstFrame::Gone) => return None,
        Ok(FirstFrame::Binary) => {
            reject(
                sink,
                stream,
                close_code::CONNECT_REQUIRED,
                "First frame must be 'connect'",
            )
            .await;
            return None;
        }
        Ok(FirstFrame::Text(text)) => text,
    };
    let (did, proven) = match check_connect(shared, upgrade, &text, shared.config.now()) {
        Ok(accepted) => accepted,
        Err(rejection) => {
            if rejection.code == close_code::PROOF_FAILED {
                tracing::warn!(did = %Esc(&rejection.did), reason = %rejection.detail, "rejecting connect frame");
            }
            reject_with_reason(sink, stream, rejection.code, &rejection.detail, rejection.reason).await;
            return None;
        }
    };
    if let Some(proof) = proven {
        if let Err(error) = shared
            .ledger
            .claim(&did, &proof.id, proof.expires_at, shared.config.now())
        {
            tracing::warn!(did = %Esc(&did), %error, "rejecting connect frame");
            let (detail, reason) = match error {
                ClaimError::Replayed => (
                    "DID proof failed: proof already used (replayed connect frame)".to_owned(),
                    "replayed proof",
                ),
                other => (format!("DID proof failed: {other}"), "proof memory full"),
            };
            reject_with_reason(sink, stream, close_code::PROOF_FAILED, &detail, reason).await;
            return None;
        }
    }
    Some(did)
}

/// Why a first frame was refused: the close code, the error frame's detail
/// and the close reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub(crate) code: u16,
    pub(crate) detail: String,
    pub(crate) reason: &'static str,
    /// The `from` claimed, if any (for the log line).
    pub(crate) did: String,
}

fn rejection(code: u16, detail: impl Into<String>) -> Rejection {
    Rejection {
        code,
        detail: detail.into(),
        reason: "",
        did: String::new(),
    }
}

/// Checks a first frame (pure: no I/O, nothing recorded): size, JSON,
/// `type` `connect`, `from`, the proof of possession (timestamp or
/// challenge form, unless unauthenticated DIDs are allowed) and the shared
/// token. On success the DID and the proof to claim.
pub(crate) fn check_connect(
    shared: &Shared,
    upgrade: &proof::Upgrade,
    text: &str,
    now: Timestamp,
) -> Result<(String, Option<proof::Proof>), Rejection> {
    if text.len() > shared.config.max_frame_bytes {
        let detail = too_large(text.len(), shared.config.max_frame_bytes);
        return Err(rejection(close_code::CONNECT_REQUIRED, detail));
    }
    let frame = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(frame)) => frame,
        Ok(_) => Map::new(),
        Err(_) => return Err(rejection(close_code::CONNECT_REQUIRED, "Invalid JSON")),
    };
    if frame.get("type").and_then(Value::as_str) != Some("connect") {
        return Err(rejection(close_code::CONNECT_REQUIRED, "First frame must be 'connect'"));
    }
    let Some(did) = frame.get("from").and_then(Value::as_str).filter(|d| !d.is_empty()) else {
        return Err(rejection(close_code::MISSING_FROM, "Missing 'from' field"));
    };
    let mut proven = None;
    if !shared.config.allow_unauthenticated_did {
        let checked = if frame.contains_key("auth_scheme") {
            proof::check_challenge_proof(&frame, upgrade, &shared.challenges, &shared.config, now)
        } else if shared.config.require_challenge {
            Err("challenge-bound proof required (auth_scheme meshwire-challenge-v1); timestamp proofs are disabled")
        } else {
            proof::check_connect_proof(&frame, now, shared.config.window_ms())
        };
        match checked {
            Ok(proof) => proven = Some(proof),
            Err(reason) => {
                return Err(Rejection {
                    did: did.to_owned(),
                    ..rejection(close_code::PROOF_FAILED, format!("DID proof failed: {reason}"))
                })
            }
        }
    }
    if let Some(expected) = &shared.config.relay_token {
        let presented = frame.get("token").and_then(Value::as_str).unwrap_or("");
        if presented.is_empty() || !constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            return Err(rejection(close_code::AUTH_FAILED, "Authentication failed"));
        }
    }
    Ok((did.to_owned(), proven))
}

fn too_large(size: usize, limit: usize) -> String {
    format!("Frame too large ({size} bytes; limit {limit})")
}

async fn session(shared: Arc<Shared>, socket: WebSocket, upgrade: proof::Upgrade) {
    let (mut sink, mut stream) = socket.split();
    let Some(_guard) = shared.session_guard() else {
        send_close(&mut sink, close_code::GOING_AWAY, "server shutting down").await;
        return;
    };
    let Some(did) = handshake(&shared, &upgrade, &mut sink, &mut stream).await else {
        return;
    };
    Connection::open(&shared, did).await.run(&shared, sink, stream).await;
}

/// How a connection's main loop ended.
enum End {
    /// The peer closed or the socket failed.
    Gone,
    /// We close with this code and reason.
    Close(u16, &'static str),
}

enum Flow {
    Continue,
    Close(u16),
}

/// A registered live connection.
struct Connection {
    did: String,
    id: u64,
    rx: mpsc::Receiver<Delivery>,
    queued_bytes: Arc<AtomicUsize>,
    replaced: oneshot::Receiver<()>,
    done: watch::Sender<bool>,
    last_active: Arc<AtomicU64>,
    /// Stored frames already sent on this connection: `fetch_pending` (which
    /// TypeScript clients send right after `connect`) must not send them
    /// again, or clients whose ratchet is not transactional break.
    sent_stored: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Connection {
    /// Registers the connection for `did`, replacing (closing with 4006)
    /// any previous one and waiting for it to hand its queue back.
    async fn open(shared: &Shared, did: String) -> Self {
        let relay = &shared.relay;
        let id = relay.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(shared.config.outbound_queue.max(1));
        let (replaced_tx, replaced) = oneshot::channel();
        let (done, done_rx) = watch::channel(false);
        let last_active = Arc::new(AtomicU64::new(shared.config.now().0));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let previous = relay.conns().insert(
            did.clone(),
            ConnHandle {
                id,
                tx,
                queued_bytes: Arc::clone(&queued_bytes),
                last_active: Arc::clone(&last_active),
                replaced: replaced_tx,
                done: done_rx,
            },
        );
        if let Some(previous) = previous {
            tracing::info!(did = %Esc(&did), "closing the previous connection (session replaced)");
            let _ = previous.replaced.send(());
            let mut previous_done = previous.done;
            let _ = tokio::time::timeout(TAKEOVER_WAIT, previous_done.wait_for(|done| *done)).await;
        }
        tracing::info!(did = %Esc(&did), "agent connected");
        Self {
            did,
            id,
            rx,
            queued_bytes,
            replaced,
            done,
            last_active,
            sent_stored: Default::default(),
        }
    }

    async fn run(mut self, shared: &Shared, mut sink: Sink, mut stream: Stream) {
        let end = self.main_loop(shared, &mut sink, &mut stream).await;
        if let End::Close(code, reason) = end {
            send_close(&mut sink, code, reason).await;
        }
        self.release(shared);
        // Also flushes the reply to a close frame the peer sent.
        linger(&mut stream).await;
        tracing::info!(did = %Esc(&self.did), "agent disconnected");
    }

    async fn main_loop(&mut self, shared: &Shared, sink: &mut Sink, stream: &mut Stream) -> End {
        if deliver_pending(shared, &self.did, &self.sent_stored, sink)
            .await
            .is_err()
        {
            return End::Gone;
        }
        let idle_timeout = shared.config.idle_timeout;
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let mut shutdown = shared.shutdown_receiver();
        loop {
            tokio::select! {
                biased;
                () = shutting_down(&mut shutdown) => {
                    return End::Close(close_code::GOING_AWAY, "server shutting down");
                }
                _ = &mut self.replaced => {
                    return End::Close(close_code::SESSION_REPLACED, "session_replaced");
                }
                incoming = stream.next() => {
                    let Some(Ok(message)) = incoming else {
                        return End::Gone;
                    };
                    idle.as_mut().reset(Instant::now() + idle_timeout);
                    self.last_active.store(shared.config.now().0, Ordering::Relaxed);
                    let flow = match message {
                        Message::Text(text) => self.handle_text(shared, sink, text).await,
                        Message::Binary(_) => send_error(sink, "Binary frames are not supported")
                            .await
                            .map(|()| Flow::Continue),
                        Message::Ping(_) | Message::Pong(_) => Ok(Flow::Continue),
                        Message::Close(_) => return End::Gone,
                    };
                    match flow {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Close(code)) => return End::Close(code, ""),
                        Err(Gone) => return End::Gone,
                    }
                }
                delivery = self.rx.recv() => {
                    let Some(delivery) = delivery else {
                        // Our handle left the routing table: replaced.
                        return End::Close(close_code::SESSION_REPLACED, "session_replaced");
                    };
                    self.queued_bytes.fetch_sub(delivery.text.len(), Ordering::Relaxed);
                    let text = delivery.text.to_string();
                    if send_text(sink, text).await.is_err() {
                        store(shared, &self.did, delivery);
                        return End::Gone;
                    }
                }
                () = &mut idle => {
                    tracing::info!(did = %Esc(&self.did), "idle timeout");
                    return End::Close(close_code::IDLE_TIMEOUT, "");
                }
            }
        }
    }

    async fn handle_text(&self, shared: &Shared, sink: &mut Sink, text: String) -> Result<Flow, Gone> {
        match classify(&self.did, &text, shared.config.max_frame_bytes) {
            Incoming::Error(detail) => send_error(sink, &detail).await?,
            Incoming::Route { to, id } => {
                if let Err(detail) = route(shared, &to, id, text) {
                    send_error(sink, detail).await?;
                }
            }
            Incoming::Ack(id) => {
                if let Some(id) = id {
                    shared.relay.inbox().ack(&self.did, &id);
                }
            }
            // Any frame refreshes liveness; nothing else to do.
            Incoming::Heartbeat => {}
            Incoming::Disconnect => return Ok(Flow::Close(close_code::NORMAL)),
            Incoming::FetchPending => deliver_pending(shared, &self.did, &self.sent_stored, sink).await?,
        }
        Ok(Flow::Continue)
    }

    /// Leaves the routing table (unless already replaced) and hands frames
    /// still queued for this connection back to the inbox.
    fn release(&mut self, shared: &Shared) {
        {
            let mut conns = shared.relay.conns();
            if conns.get(&self.did).is_some_and(|h| h.id == self.id) {
                conns.remove(&self.did);
            }
        }
        self.rx.close();
        while let Ok(delivery) = self.rx.try_recv() {
            store(shared, &self.did, delivery);
        }
        self.done.send_replace(true);
    }
}

/// Sends every stored frame for `did` not yet sent on this connection,
/// oldest first. They stay stored until acknowledged (and are sent again on
/// the next connection).
async fn deliver_pending(
    shared: &Shared,
    did: &str,
    sent: &std::sync::Mutex<std::collections::HashSet<String>>,
    sink: &mut Sink,
) -> Result<(), Gone> {
    let pending = shared.relay.inbox().pending(did, shared.config.now());
    for (id, text) in pending {
        let fresh = sent.lock().map(|mut s| s.insert(id)).unwrap_or(true);
        if !fresh {
            continue;
        }
        send_text(sink, text.to_string()).await?;
        shared.relay.delivered.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn store(shared: &Shared, recipient: &str, delivery: Delivery) -> StoreOutcome {
    let outcome = shared
        .relay
        .inbox()
        .store(recipient, &delivery.id, delivery.text, shared.config.now());
    match outcome {
        StoreOutcome::Stored => {
            shared.relay.stored.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(recipient = %Esc(recipient), id = %Esc(&delivery.id), "stored message");
        }
        StoreOutcome::Duplicate => {}
        StoreOutcome::Full => tracing::warn!(
            recipient = %Esc(recipient),
            id = %Esc(&delivery.id),
            "inbox full, message dropped"
        ),
    }
    outcome
}

/// What a text frame on an open connection asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// Answer with an error frame carrying this detail.
    Error(String),
    /// Forward the frame to `to` (its `from` is the connection's DID, `to`
    /// and `id` are non-empty strings).
    Route {
        to: String,
        id: String,
    },
    /// Acknowledge a stored frame (an `ack` without a string `id` does
    /// nothing).
    Ack(Option<String>),
    Heartbeat,
    Disconnect,
    FetchPending,
}

/// Reads a text frame of the connection authenticated as `sender` (pure).
pub(crate) fn classify(sender: &str, text: &str, max_frame_bytes: usize) -> Incoming {
    if text.len() > max_frame_bytes {
        return Incoming::Error(too_large(text.len(), max_frame_bytes));
    }
    let frame = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(frame)) => frame,
        Ok(_) => return Incoming::Error("Frame must be a JSON object".to_owned()),
        Err(_) => return Incoming::Error("Invalid JSON".to_owned()),
    };
    match frame.get("type") {
        Some(Value::String(kind)) => match kind.as_str() {
            "message" | "knock" | "knock_accept" | "knock_reject" => {
                if frame.get("from").and_then(Value::as_str) != Some(sender) {
                    return Incoming::Error("'from' does not match the connection's DID".to_owned());
                }
                let field = |name: &str| frame.get(name).and_then(Value::as_str).filter(|s| !s.is_empty());
                match (field("to"), field("id")) {
                    (Some(to), Some(id)) => Incoming::Route {
                        to: to.to_owned(),
                        id: id.to_owned(),
                    },
                    _ => Incoming::Error("Frame must carry 'to' and 'id'".to_owned()),
                }
            }
            "ack" => Incoming::Ack(frame.get("id").and_then(Value::as_str).map(str::to_owned)),
            "heartbeat" => Incoming::Heartbeat,
            "disconnect" => Incoming::Disconnect,
            "fetch_pending" => Incoming::FetchPending,
            other => Incoming::Error(format!("Unknown frame type: {other}")),
        },
        // Python formats a missing type as None.
        None | Some(Value::Null) => Incoming::Error("Unknown frame type: None".to_owned()),
        Some(other) => Incoming::Error(format!("Unknown frame type: {other}")),
    }
}

/// Routes a checked frame to `to`, live or into the inbox. The error is the
/// detail of the error frame for the sender.
fn route(shared: &Shared, to: &str, id: String, text: String) -> Result<(), &'static str> {
    let mut delivery = Delivery {
        id,
        text: Arc::from(text),
    };
    let now = shared.config.now();
    let stale_ms = duration_ms(shared.config.stale_after);
    let live = shared.relay.conns().get(to).and_then(|h| {
        let last = h.last_active.load(Ordering::Relaxed);
        (now.0.saturating_sub(last) <= stale_ms).then(|| (h.tx.clone(), Arc::clone(&h.queued_bytes)))
    });
    if let Some((tx, queued_bytes)) = live {
        // Bound what a slow reader can make us hold: past the byte budget
        // (one frame always fits an empty queue), store instead.
        let size = delivery.text.len();
        let before = queued_bytes.fetch_add(size, Ordering::Relaxed);
        if before == 0 || before.saturating_add(size) <= shared.config.outbound_queue_bytes {
            match tx.try_send(delivery) {
                Ok(()) => {
                    shared.relay.routed.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(TrySendError::Full(back) | TrySendError::Closed(back)) => delivery = back,
            }
        }
        queued_bytes.fetch_sub(size, Ordering::Relaxed);
    }
    match store(shared, to, delivery) {
        StoreOutcome::Stored | StoreOutcome::Duplicate => Ok(()),
        StoreOutcome::Full => Err("Recipient inbox is full; message dropped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_frames_keep_the_reference_key_order() {
        assert_eq!(
            error_frame("Unknown frame type: x\"y"),
            r#"{"type":"error","detail":"Unknown frame type: x\"y"}"#
        );
    }
}
