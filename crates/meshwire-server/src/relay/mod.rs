//! The relay: a WebSocket at `/ws` that routes frames between connected
//! agents and stores them for agents that are not live
//! (`agentmesh.relay` of AGT 5.0.0).
//!
//! A connection's first frame is `connect` (with proof of possession of the
//! DID's key unless [`ServerConfig::allow_unauthenticated_did`]). After it,
//! `message` / `knock` / `knock_accept` / `knock_reject` frames are
//! forwarded to `to` with the connection's DID as `from` (byte for byte
//! when the frame already says so, stamped otherwise: see [`frames`]):
//! live when the recipient is connected to this instance and not stale
//! (and its queue has room), otherwise into the offline store
//! ([`crate::storage::Mailboxes`]), where they stay until the recipient
//! sends `ack` for them or they expire. Stored frames are delivered at
//! least once (on every connect and `fetch_pending` until acknowledged).
//! Unlike the reference, whose live deliveries are at most once, a
//! `message` frame written live is held by its connection until the
//! recipient acknowledges it; when the connection ends first (the agent
//! died with the frame in its receive buffer, say), the frames it still
//! holds go to the offline store ahead of its queue, and the agent gets
//! them on its next connect (bounded: see `unacked`). Message ids are
//! deduplicated per recipient while stored; an agent may get a frame
//! twice when its `ack` was lost with the connection (clients deduplicate
//! by message id).
//!
//! **Cluster** (NATS storage, [`Storage::live`]). Each connection's
//! instance subscribes to the DID's live subject for as long as the
//! connection lives; a frame whose recipient is not connected to this
//! instance is offered to the cluster (request/reply, at most
//! [`ServerConfig::cluster_route_timeout`]); the instance holding the
//! recipient puts it on the same outbound queue as a local frame (same
//! slow-consumer rules) and answers whether it took it. No answer (nobody
//! subscribed, timeout, the holder refused: stale or closing, a NATS
//! error) means the frame is stored in the shared mailbox, as for an agent
//! connected nowhere. A connection for a DID held on another instance
//! displaces it there (4006) and waits until it handed its queue back, as
//! on one instance; two connections racing on two instances settle on the
//! newest (see `cluster`).
//!
//! The delivery contract is the same cluster-wide: a frame taken live is
//! held by the recipient's connection until acknowledged, as above; it is
//! lost only if the instance itself dies first (the sender's
//! retransmission covers that); a stored frame is delivered at least
//! once. A frame may be
//! both taken live and stored only when the holder's answer is lost or
//! late (timeout, NATS error) or when two connections of one DID briefly
//! coexist during a race: then the recipient may get it twice (clients
//! deduplicate by message id).
//!
//! **Order.** Frames from one connection to one recipient arrive in the
//! order sent: the connection routes them one after the other (a frame's
//! fate, live or stored, is settled before the next is routed); frames for
//! a closing slow consumer are parked and stored after its queue; and once
//! a frame of the connection was stored for a recipient, its next live
//! frame to that recipient makes the recipient's connection send its
//! stored frames first (`fetch_first`), so a live frame never overtakes a
//! stored one (a duplicate of a late-answered frame may arrive twice, in
//! both places). No order holds between different senders, nor across a
//! sender's reconnection.
//!
//! [`ServerConfig::allow_unauthenticated_did`]: crate::ServerConfig::allow_unauthenticated_did
//! [`ServerConfig::cluster_route_timeout`]: crate::ServerConfig::cluster_route_timeout
//! [`Storage::live`]: crate::storage::Storage::live

pub(crate) mod cluster;
mod connection;
pub(crate) mod frames;
mod handshake;
pub(crate) mod mailbox;
pub(crate) mod proof;
mod socket;
mod unacked;
mod upgrade;

use crate::http::ApiError;
use crate::server::Shared;
use axum::extract::{OriginalUri, Request, State};
use axum::http::header::HOST;
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use connection::{ConnHandle, Connection};
use futures_util::StreamExt;
use mailbox::RelayMail;
use meshwire_proto::auth::CHALLENGE_HEADER;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub(crate) use frames::{classify, Incoming};
pub(crate) use handshake::check_connect;

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
    /// The connection's outbound buffer overflowed: the peer does not read
    /// fast enough (`ServerConfig::outbound_queue`,
    /// `ServerConfig::outbound_queue_bytes`). Its mail is stored; reconnect.
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// Relay state: live connections of this instance, the offline store and
/// counters. The routing table's lock is never held across an `.await`.
#[derive(Debug)]
pub(crate) struct Relay {
    conns: Mutex<HashMap<String, ConnHandle>>,
    pub(crate) mail: RelayMail,
    next_id: AtomicU64,
    pub(crate) routed: AtomicU64,
    /// Live routing between instances (NATS storage only).
    pub(crate) cluster: Option<cluster::Cluster>,
}

impl Relay {
    pub(crate) fn new(mail: RelayMail, cluster: Option<cluster::Cluster>) -> Self {
        Self {
            conns: Mutex::new(HashMap::new()),
            mail,
            cluster,
            next_id: AtomicU64::new(1),
            routed: AtomicU64::new(0),
        }
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<String, ConnHandle>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn connected(&self) -> usize {
        self.conns().len()
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
    registered_agents: Option<u64>,
}

pub(crate) async fn health_body(shared: &Shared, combined: bool) -> Json<RelayHealth> {
    let relay = &shared.relay;
    let registered_agents = if combined {
        shared.registry.refresh().await;
        Some(shared.registry.count())
    } else {
        None
    };
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
            messages_stored: relay.mail.stored.load(Ordering::Relaxed),
            messages_delivered: relay.mail.delivered.load(Ordering::Relaxed),
        },
        registered_agents,
    })
}

pub(crate) async fn health(State(shared): State<Arc<Shared>>) -> Json<RelayHealth> {
    health_body(&shared, false).await
}

pub(crate) async fn combined_health(State(shared): State<Arc<Shared>>) -> Json<RelayHealth> {
    health_body(&shared, true).await
}

/// `GET /ws`. The 101 answer carries a fresh challenge nonce in
/// `x-meshwire-challenge` (meshwire extension; reference clients ignore
/// the header).
pub(crate) async fn ws_handler(State(shared): State<Arc<Shared>>, uri: OriginalUri, mut request: Request) -> Response {
    let Some(upgrade) = upgrade::WsUpgrade::take(&mut request) else {
        // Starlette answers plain HTTP on a WebSocket route with 404.
        return ApiError::not_found("Not Found").into_response();
    };
    let Some(slot) = SocketSlot::take(&shared) else {
        shared.metrics.limit_refused("connections");
        tracing::warn!(
            max_connections = shared.config.max_connections,
            "refusing a relay connection: too many open"
        );
        let mut response =
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Too many connections; retry later").into_response();
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("5"));
        return response;
    };
    let limit = shared.config.max_frame_bytes;
    // Frames up to this size are read and answered with an error frame when
    // over `limit`; anything larger ends the connection.
    let hard_limit = limit.saturating_mul(2).max(limit.saturating_add(64 * 1024));
    let (nonce, _) = shared.challenges.issue(shared.config.now());
    let context = proof::Upgrade {
        nonce: nonce.clone(),
        host: request
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned),
        target: uri.0.path_and_query().map_or("/ws", |pq| pq.as_str()).to_owned(),
    };
    let config = WebSocketConfig {
        max_message_size: Some(hard_limit),
        max_frame_size: Some(hard_limit),
        ..WebSocketConfig::default()
    };
    let mut response = upgrade.on_upgrade(config, move |socket| {
        // Split here: the socket itself is then not part of the
        // session's (every connection's) task state.
        let (sink, stream) = socket.split();
        async move {
            let _slot = slot;
            session(shared, sink, stream, context).await;
        }
    });
    if let Ok(value) = HeaderValue::from_str(&nonce) {
        response.headers_mut().insert(CHALLENGE_HEADER, value);
    }
    response
}

/// One of [`ServerConfig::max_connections`](crate::ServerConfig::max_connections)
/// socket slots, given back when dropped.
struct SocketSlot(Arc<Shared>);

impl SocketSlot {
    fn take(shared: &Arc<Shared>) -> Option<Self> {
        let max = shared.config.max_connections;
        shared
            .sockets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(shared)))
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn session(shared: Arc<Shared>, mut sink: socket::Sink, mut stream: socket::Stream, upgrade: proof::Upgrade) {
    let Some(_guard) = shared.session_guard() else {
        Box::pin(socket::send_close(
            &mut sink,
            close_code::GOING_AWAY,
            "server shutting down",
        ))
        .await;
        return;
    };
    // The handshake and the registration are boxed: their state is freed
    // once done instead of sizing every connection's task.
    let Some(did) = Box::pin(handshake::handshake(&shared, &upgrade, &mut sink, &mut stream)).await else {
        return;
    };
    drop(upgrade);
    shared.metrics.accepted.inc();
    let connection = Box::pin(Connection::open(&shared, did)).await;
    connection.run(&shared, sink, stream).await;
}
