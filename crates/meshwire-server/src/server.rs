//! Wiring: shared state, routers, listeners and shutdown.

use crate::challenge::Challenges;
use crate::config::{duration_ms, ServerConfig};
use crate::http::{method_not_allowed_fallback, not_found_fallback};
use crate::ratelimit::RateLimiter;
use crate::registry::store::RegistryStore;
use crate::relay::inbox::InboxLimits;
use crate::relay::Relay;
use crate::replay::{Ledger, MemoryLedger, ProofLedger};
use crate::{registry, relay};
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How long [`RunningServer::shutdown`] waits for listeners and for live
/// relay connections to close before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Starting or running the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Counters of a running server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Live relay connections.
    pub connected_agents: usize,
    /// Agents in the registry.
    pub registered_agents: usize,
    /// Frames forwarded live.
    pub messages_routed: u64,
    /// Frames put into the store-and-forward inbox.
    pub messages_stored: u64,
    /// Stored frames sent to their recipient (once per send: a frame
    /// redelivered before its ack counts again).
    pub messages_delivered: u64,
    /// Frames in the inbox now (not yet acknowledged or expired).
    pub pending_messages: usize,
    /// Proofs of possession in the once-only memory now.
    pub live_proofs: usize,
    /// Proofs refused because they were already used (replays).
    pub replayed_proofs_refused: u64,
    /// Proofs refused because the once-only memory was full.
    pub proofs_refused_full: u64,
    /// Pre-key bundle fetches refused by the per-requester rate limit.
    pub bundle_fetches_limited: u64,
}

/// State shared by every handler and connection.
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) registry: RegistryStore,
    pub(crate) relay: Relay,
    /// The once-only proof memory of relay and registry.
    pub(crate) ledger: Ledger,
    pub(crate) challenges: Challenges,
    pub(crate) bundle_limiter: RateLimiter,
    shutdown: watch::Sender<bool>,
    /// Each relay connection holds a clone; taken on shutdown so that the
    /// receiver below sees the channel close once all connections ended.
    sessions: Mutex<Option<mpsc::Sender<()>>>,
    sessions_closed: tokio::sync::Mutex<mpsc::Receiver<()>>,
}

impl Shared {
    pub(crate) fn shutdown_receiver(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// A token held for a relay connection's lifetime; `None` once shutting
    /// down.
    pub(crate) fn session_guard(&self) -> Option<mpsc::Sender<()>> {
        if *self.shutdown.borrow() {
            return None;
        }
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .cloned()
    }
}

/// The relay and registry state, with routers to mount it. Clones share
/// the state. Most users want [`start`] or [`serve`] instead.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        let limits = InboxLimits {
            per_recipient: config.max_stored_per_recipient,
            total: config.max_stored_total,
            bytes: config.max_stored_bytes,
            ttl_ms: duration_ms(config.message_ttl),
        };
        let (sessions_tx, sessions_rx) = mpsc::channel(1);
        let (shutdown, _) = watch::channel(false);
        let ledger: Arc<dyn ProofLedger> = match &config.proof_ledger {
            Some(ledger) => Arc::clone(ledger),
            None => Arc::new(MemoryLedger::new(
                config.max_live_proofs,
                config.max_live_proofs_per_did,
            )),
        };
        let challenges = Challenges::new(&config);
        let bundle_limiter = RateLimiter::new(config.bundle_fetches_per_minute, config.max_rate_limited_requesters);
        Self {
            shared: Arc::new(Shared {
                config,
                registry: RegistryStore::default(),
                relay: Relay::new(limits),
                ledger: Ledger::new(ledger),
                challenges,
                bundle_limiter,
                shutdown,
                sessions: Mutex::new(Some(sessions_tx)),
                sessions_closed: tokio::sync::Mutex::new(sessions_rx),
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    fn finish(&self, routes: Router<Arc<Shared>>) -> Router {
        routes
            .fallback(not_found_fallback)
            .method_not_allowed_fallback(method_not_allowed_fallback)
            .layer(DefaultBodyLimit::max(self.shared.config.max_body_bytes))
            .with_state(Arc::clone(&self.shared))
    }

    /// Relay (`/ws`) and registry (`/v1/...`) on one router; `/health`
    /// reports both. Serve it with
    /// `into_make_service_with_connect_info::<SocketAddr>()` so that bundle
    /// fetches are rate-limited per peer IP (without connect info only
    /// authenticated fetches are).
    pub fn router(&self) -> Router {
        self.finish(
            self.registry_routes()
                .route("/ws", get(relay::ws_handler))
                .route("/health", get(relay::combined_health)),
        )
    }

    /// The relay alone: `/ws` and `/health`.
    pub fn relay_router(&self) -> Router {
        self.finish(
            Router::new()
                .route("/ws", get(relay::ws_handler))
                .route("/health", get(relay::health)),
        )
    }

    /// The registry alone: `/v1/...` and `/health`.
    pub fn registry_router(&self) -> Router {
        self.finish(self.registry_routes().route("/health", get(registry::health)))
    }

    /// The registry routes; every answer carries a fresh challenge nonce
    /// in `x-meshwire-challenge` (how the registry advertises
    /// challenge-bound proofs; reference clients ignore the header).
    fn registry_routes(&self) -> Router<Arc<Shared>> {
        registry::routes().layer(axum::middleware::from_fn_with_state(
            Arc::clone(&self.shared),
            registry::advertise_challenge,
        ))
    }

    pub fn stats(&self) -> Stats {
        let relay = &self.shared.relay;
        Stats {
            connected_agents: relay.connected(),
            registered_agents: self.shared.registry.len(),
            messages_routed: relay.routed.load(Ordering::Relaxed),
            messages_stored: relay.stored.load(Ordering::Relaxed),
            messages_delivered: relay.delivered.load(Ordering::Relaxed),
            pending_messages: relay.pending_messages(),
            live_proofs: self.shared.ledger.live(),
            replayed_proofs_refused: self.shared.ledger.replays_refused.load(Ordering::Relaxed),
            proofs_refused_full: self.shared.ledger.full_refused.load(Ordering::Relaxed),
            bundle_fetches_limited: self.shared.bundle_limiter.refused.load(Ordering::Relaxed),
        }
    }

    /// DIDs with a live relay connection, sorted.
    pub fn connected_dids(&self) -> Vec<String> {
        self.shared.relay.connected_dids()
    }

    /// Starts shutting down: listeners stop accepting and every relay
    /// connection is closed with 1001. Returns at once.
    pub fn begin_shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// Whether [`Server::begin_shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        *self.shared.shutdown.borrow()
    }

    /// Waits until every relay connection has ended (after
    /// [`Server::begin_shutdown`]).
    pub async fn connections_closed(&self) {
        let sender = self.shared.sessions.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(sender);
        let mut closed = self.shared.sessions_closed.lock().await;
        while closed.recv().await.is_some() {}
    }

    fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut down = self.shared.shutdown_receiver();
        async move {
            let _ = down.wait_for(|down| *down).await;
        }
    }

    /// Serves `router` on `listener` until shutdown begins.
    fn spawn_listener(&self, listener: TcpListener, router: Router) -> JoinHandle<std::io::Result<()>> {
        let signal = self.shutdown_signal();
        tokio::spawn(async move {
            axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(signal)
                .await
        })
    }

    /// Serves relay and registry on `listener` until `signal` completes (or
    /// [`Server::begin_shutdown`]), then closes every relay connection.
    pub async fn serve_until(
        &self,
        listener: TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let this = self.clone();
        let signal = async move {
            tokio::select! {
                () = signal => {}
                () = this.shutdown_signal() => {}
            }
            this.begin_shutdown();
        };
        let result = axum::serve(
            listener,
            self.router().into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(signal)
        .await;
        self.begin_shutdown();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.connections_closed()).await;
        result.map_err(ServerError::from)
    }
}

/// Serves relay and registry on `listener`, in memory, until the future is
/// dropped or an I/O error ends it.
pub async fn serve(config: ServerConfig, listener: TcpListener) -> Result<(), ServerError> {
    serve_with_shutdown(config, listener, std::future::pending()).await
}

/// Like [`serve`], shutting down gracefully when `signal` completes.
pub async fn serve_with_shutdown(
    config: ServerConfig,
    listener: TcpListener,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::new(config).serve_until(listener, signal).await
}

/// Binds `127.0.0.1:0` and serves relay and registry there, in the
/// background.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    RunningServer::spawn(config, listener, None)
}

/// Like [`start`], with relay and registry on two ports.
pub async fn start_split(config: ServerConfig) -> Result<RunningServer, ServerError> {
    let relay = TcpListener::bind(("127.0.0.1", 0)).await?;
    let registry = TcpListener::bind(("127.0.0.1", 0)).await?;
    RunningServer::spawn(config, relay, Some(registry))
}

/// A server running in the background. Dropping it begins shutdown without
/// waiting; [`RunningServer::shutdown`] waits.
#[derive(Debug)]
pub struct RunningServer {
    server: Server,
    relay_addr: SocketAddr,
    registry_addr: SocketAddr,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
}

impl RunningServer {
    /// Serves the relay on `relay` and the registry on `registry`, or both
    /// on `relay` when `registry` is `None`. Must be called within a tokio
    /// runtime.
    pub fn spawn(config: ServerConfig, relay: TcpListener, registry: Option<TcpListener>) -> Result<Self, ServerError> {
        let server = Server::new(config);
        let relay_addr = relay.local_addr()?;
        let (registry_addr, tasks) = match registry {
            None => (relay_addr, vec![server.spawn_listener(relay, server.router())]),
            Some(registry) => {
                let registry_addr = registry.local_addr()?;
                let tasks = vec![
                    server.spawn_listener(relay, server.relay_router()),
                    server.spawn_listener(registry, server.registry_router()),
                ];
                (registry_addr, tasks)
            }
        };
        tracing::info!(%relay_addr, %registry_addr, "meshwire server started");
        if server.shared.config.require_challenge {
            tracing::info!("timestamp proofs refused: challenge-bound proofs required");
        }
        Ok(Self {
            server,
            relay_addr,
            registry_addr,
            tasks,
        })
    }

    /// `ws://HOST:PORT`; clients append `/ws`.
    pub fn relay_url(&self) -> String {
        format!("ws://{}", self.relay_addr)
    }

    /// `http://HOST:PORT`.
    pub fn registry_url(&self) -> String {
        format!("http://{}", self.registry_addr)
    }

    pub fn relay_addr(&self) -> SocketAddr {
        self.relay_addr
    }

    pub fn registry_addr(&self) -> SocketAddr {
        self.registry_addr
    }

    pub fn stats(&self) -> Stats {
        self.server.stats()
    }

    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Stops accepting, closes every relay connection (1001) and waits for
    /// all of it (at most a few seconds, then the rest is aborted). The
    /// state is gone afterwards; [`start`] again for a fresh server.
    pub async fn shutdown(mut self) {
        self.server.begin_shutdown();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.server.connections_closed()).await;
        for mut task in std::mem::take(&mut self.tasks) {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await.is_err() {
                task.abort();
            }
        }
        tracing::info!(relay_addr = %self.relay_addr, "meshwire server stopped");
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.server.begin_shutdown();
    }
}
