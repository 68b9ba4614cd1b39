//! Wiring: shared state, routers, listeners and shutdown.

use crate::challenge::Challenges;
use crate::config::ServerConfig;
use crate::http::{method_not_allowed_fallback, not_found_fallback};
use crate::metrics::{Metrics, Timed};
use crate::ratelimit::RateLimiter;
use crate::registry::recipients::RegisteredOnly;
use crate::registry::store::RegistryStore;
use crate::relay::mailbox::RelayMail;
use crate::relay::Relay;
use crate::replay::{Ledger, ProofLedger};
use crate::storage::{Mailboxes, Registry, Storage};
use crate::tls::TlsConfig;
use crate::{registry, relay};
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How long [`RunningServer::shutdown`] waits for listeners and for live
/// relay connections to close before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How often (real time) the background housekeeping runs (registry
/// expiry; the sweep itself is rate-limited by the server clock).
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(60);
/// How long flushing the store on shutdown may take.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Starting or running the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding or serving a socket failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Counters of a running server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Live relay connections.
    pub connected_agents: usize,
    /// Agents in the registry, as of this instance's last change to it.
    pub registered_agents: usize,
    /// Frames forwarded live.
    pub messages_routed: u64,
    /// Frames put into the store-and-forward inbox.
    pub messages_stored: u64,
    /// Stored frames sent to their recipient (once per send: a frame
    /// redelivered before its ack counts again).
    pub messages_delivered: u64,
    /// Frames in the offline store now (not yet acknowledged or expired),
    /// as of this instance's last change to it.
    pub pending_messages: usize,
    /// Frames the offline store refused (a quota was reached).
    pub messages_refused: u64,
    /// Proofs of possession in the once-only memory now.
    pub live_proofs: usize,
    /// Proofs refused because they were already used (replays).
    pub replayed_proofs_refused: u64,
    /// Proofs refused because the once-only memory was full.
    pub proofs_refused_full: u64,
    /// Pre-key bundle fetches refused by the per-requester rate limit.
    pub bundle_fetches_limited: u64,
    /// Frames handed live to an agent connected to another instance
    /// (NATS storage).
    pub cluster_routed_out: u64,
    /// Frames taken from another instance for an agent connected here.
    pub cluster_routed_in: u64,
    /// Frames for an agent not connected here stored in the mailbox after
    /// asking the cluster (nobody held it, no answer in time, refused).
    pub cluster_fallbacks: u64,
    /// Registrations refused by the per-requester rate limit.
    pub registrations_limited: u64,
    /// Discovery requests refused by the per-requester rate limit.
    pub discoveries_limited: u64,
}

/// State shared by every handler and connection.
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) registry: RegistryStore,
    /// The backend of registry, relay mail and (by default) the ledger.
    pub(crate) storage: Storage,
    pub(crate) relay: Relay,
    /// The once-only proof memory of relay and registry.
    pub(crate) ledger: Ledger,
    pub(crate) challenges: Challenges,
    pub(crate) bundle_limiter: RateLimiter,
    pub(crate) registration_limiter: RateLimiter,
    pub(crate) discovery_limiter: RateLimiter,
    pub(crate) metrics: Arc<Metrics>,
    /// Open relay WebSockets (handshaking included), for
    /// [`ServerConfig::max_connections`].
    pub(crate) sockets: AtomicUsize,
    /// Server-clock time of the last registry expiry sweep.
    last_agent_sweep: AtomicU64,
    shutdown: watch::Sender<bool>,
    /// Each relay connection holds a clone; taken on shutdown so that the
    /// receiver below sees the channel close once all connections ended.
    sessions: Mutex<Option<mpsc::Sender<()>>>,
    sessions_closed: tokio::sync::Mutex<mpsc::Receiver<()>>,
}

/// How often (server clock) the registry is swept for expired agents.
const AGENT_SWEEP_INTERVAL_MS: u64 = 60_000;
/// Most agents one sweep removes.
const AGENT_SWEEP_BATCH: usize = 1_000;

impl Shared {
    /// Removes agents not seen within [`ServerConfig::agent_expiry`], at
    /// most every minute of server clock (one caller at a time gets the
    /// turn); called on registry requests and by a background timer.
    pub(crate) async fn sweep_agents_if_due(&self) {
        let expiry = crate::config::duration_ms(self.config.agent_expiry);
        if expiry == 0 {
            return;
        }
        let now = self.config.now().0;
        let last = self.last_agent_sweep.load(Ordering::Relaxed);
        if now < last.saturating_add(AGENT_SWEEP_INTERVAL_MS)
            || self
                .last_agent_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let cutoff = meshwire_proto::time::Timestamp(now.saturating_sub(expiry));
        match self.registry.store().expire_agents(cutoff, AGENT_SWEEP_BATCH).await {
            Ok(expired) if !expired.is_empty() => {
                self.metrics.agents_expired.inc_by(expired.len() as u64);
                tracing::info!(count = expired.len(), "removed agents not seen within the agent expiry");
                self.registry.refresh().await;
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "sweeping expired agents failed"),
        }
    }

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
    /// The state of a server with `config`: its storage is
    /// [`ServerConfig::storage`] (in memory when `None`).
    pub fn new(config: ServerConfig) -> Self {
        let storage = config
            .storage
            .clone()
            .unwrap_or_else(|| Storage::memory(config.storage_limits()));
        let (sessions_tx, sessions_rx) = mpsc::channel(1);
        let (shutdown, _) = watch::channel(false);
        let ledger: Arc<dyn ProofLedger> = match &config.proof_ledger {
            Some(ledger) => Arc::clone(ledger),
            None => Arc::clone(&storage.proofs),
        };
        let metrics = Arc::new(Metrics::new());
        let mut mailboxes: Arc<dyn Mailboxes> =
            Arc::new(Timed::new(Arc::clone(&storage.mailboxes), Arc::clone(&metrics)));
        let registry: Arc<dyn Registry> = Arc::new(Timed::new(Arc::clone(&storage.registry), Arc::clone(&metrics)));
        if config.route_only_registered {
            mailboxes = Arc::new(RegisteredOnly::new(
                mailboxes,
                Arc::clone(&registry),
                Arc::clone(&metrics),
            ));
        }
        let mail = RelayMail::new(mailboxes, config.message_ttl);
        let cluster = storage
            .live
            .clone()
            .map(|router| relay::cluster::Cluster::new(router, config.cluster_route_timeout));
        let challenges = Challenges::new(&config);
        let limiter = |per_minute: u32, label: &'static str| {
            RateLimiter::new(
                per_minute,
                config.max_rate_limited_requesters,
                metrics.rate_limited_counter(label),
            )
        };
        let bundle_limiter = limiter(config.bundle_fetches_per_minute, "bundle_fetch");
        let registration_limiter = limiter(config.registrations_per_minute, "registration");
        let discovery_limiter = limiter(config.discoveries_per_minute, "discovery");
        Self {
            shared: Arc::new(Shared {
                config,
                registry: RegistryStore::new(registry),
                relay: Relay::new(mail, cluster),
                storage,
                ledger: Ledger::new(ledger),
                challenges,
                bundle_limiter,
                registration_limiter,
                discovery_limiter,
                metrics,
                sockets: AtomicUsize::new(0),
                last_agent_sweep: AtomicU64::new(0),
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
            .route("/metrics", get(crate::ops::metrics))
            .route("/healthz", get(crate::ops::healthz))
            .route("/readyz", get(crate::ops::readyz))
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

    /// The counters now. The storage gauges (`registered_agents`,
    /// `pending_messages`) are as of this instance's last change to the
    /// store; [`Server::refresh_stats`] re-reads them.
    pub fn stats(&self) -> Stats {
        let relay = &self.shared.relay;
        let gauge = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Stats {
            connected_agents: relay.connected(),
            registered_agents: gauge(self.shared.registry.count()),
            messages_routed: relay.routed.load(Ordering::Relaxed),
            messages_stored: relay.mail.stored.load(Ordering::Relaxed),
            messages_delivered: relay.mail.delivered.load(Ordering::Relaxed),
            pending_messages: gauge(relay.mail.pending()),
            messages_refused: relay.mail.refused.load(Ordering::Relaxed),
            live_proofs: self.shared.ledger.live(),
            replayed_proofs_refused: self.shared.ledger.replays_refused.load(Ordering::Relaxed),
            proofs_refused_full: self.shared.ledger.full_refused.load(Ordering::Relaxed),
            bundle_fetches_limited: self.shared.bundle_limiter.refused.load(Ordering::Relaxed),
            cluster_routed_out: self.shared.metrics.cluster_out.get(),
            cluster_routed_in: self.shared.metrics.cluster_in.get(),
            cluster_fallbacks: self.shared.metrics.cluster_fallbacks_total(),
            registrations_limited: self.shared.registration_limiter.refused.load(Ordering::Relaxed),
            discoveries_limited: self.shared.discovery_limiter.refused.load(Ordering::Relaxed),
        }
    }

    /// Re-reads the storage gauges of [`Server::stats`] (agents, pending
    /// messages), which other instances on the same store may have changed.
    pub async fn refresh_stats(&self) {
        self.shared.registry.refresh().await;
        self.shared.relay.mail.refresh().await;
    }

    /// The storage the server runs on.
    pub fn storage(&self) -> &Storage {
        &self.shared.storage
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

    /// Reads the storage gauges once in the background (a reopened store
    /// already holds agents and mail).
    fn spawn_refresh(&self) {
        let this = self.clone();
        tokio::spawn(async move { this.refresh_stats().await });
    }

    /// Runs the registry expiry sweep every minute until shutdown (requests
    /// also trigger it).
    fn spawn_housekeeping(&self) {
        let this = self.clone();
        let stop = self.shutdown_signal();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let work = async {
                loop {
                    tick.tick().await;
                    this.shared.sweep_agents_if_due().await;
                }
            };
            tokio::select! {
                () = stop => {}
                () = work => {}
            }
        });
    }

    /// Flushes the store (after the connections closed and handed their
    /// queues back), logging a failure.
    pub async fn flush_storage(&self) {
        match tokio::time::timeout(FLUSH_TIMEOUT, self.shared.storage.flush()).await {
            Ok(Ok(())) => tracing::debug!("storage flushed"),
            Ok(Err(error)) => tracing::warn!(%error, "flushing the storage failed"),
            Err(_) => tracing::warn!("flushing the storage timed out"),
        }
    }

    fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut down = self.shared.shutdown_receiver();
        async move {
            let _ = down.wait_for(|down| *down).await;
        }
    }

    /// Serves `router` over TLS on `listener` until shutdown begins.
    fn spawn_tls_listener(
        &self,
        listener: TcpListener,
        router: Router,
        tls: TlsConfig,
    ) -> Result<JoinHandle<std::io::Result<()>>, ServerError> {
        self.spawn_refresh();
        let listener = listener.into_std()?;
        // Accepted sockets inherit TCP_NODELAY from the listener (Linux).
        socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
        let handle = axum_server::Handle::new();
        let stopper = handle.clone();
        let signal = self.shutdown_signal();
        tokio::spawn(async move {
            signal.await;
            stopper.graceful_shutdown(Some(SHUTDOWN_GRACE));
        });
        let config = axum_server::tls_rustls::RustlsConfig::from_config(tls.0);
        let server = axum_server::from_tcp_rustls(listener, config).handle(handle);
        Ok(tokio::spawn(async move {
            server
                .serve(router.into_make_service_with_connect_info::<SocketAddr>())
                .await
        }))
    }

    /// Serves `router` on `listener` until shutdown begins.
    fn spawn_listener(&self, listener: TcpListener, router: Router) -> JoinHandle<std::io::Result<()>> {
        self.spawn_refresh();
        let signal = self.shutdown_signal();
        tokio::spawn(async move {
            // TCP_NODELAY: relayed frames go out at once (Nagle's algorithm
            // would hold one behind an unacknowledged earlier segment).
            axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
                .tcp_nodelay(true)
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
        self.refresh_stats().await;
        self.spawn_housekeeping();
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
        .tcp_nodelay(true)
        .with_graceful_shutdown(signal)
        .await;
        self.begin_shutdown();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.connections_closed()).await;
        self.flush_storage().await;
        result.map_err(ServerError::from)
    }
}

/// Serves relay and registry on `listener`, on [`ServerConfig::storage`]
/// (in memory by default), until the future is
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
        Ok(Self::started(server, relay_addr, registry_addr, tasks))
    }

    /// Serves relay and registry over TLS on `listener` (one port: `wss://`
    /// and `https://`). Must be called within a tokio runtime.
    pub fn spawn_tls(config: ServerConfig, listener: TcpListener, tls: TlsConfig) -> Result<Self, ServerError> {
        let server = Server::new(config);
        let addr = listener.local_addr()?;
        let task = server.spawn_tls_listener(listener, server.router(), tls)?;
        Ok(Self::started(server, addr, addr, vec![task]))
    }

    fn started(
        server: Server,
        relay_addr: SocketAddr,
        registry_addr: SocketAddr,
        tasks: Vec<JoinHandle<std::io::Result<()>>>,
    ) -> Self {
        server.spawn_housekeeping();
        tracing::info!(%relay_addr, %registry_addr, "meshwire server started");
        if server.shared.config.require_challenge {
            tracing::info!("timestamp proofs refused: challenge-bound proofs required");
        }
        Self {
            server,
            relay_addr,
            registry_addr,
            tasks,
        }
    }

    /// `ws://HOST:PORT`; clients append `/ws`.
    pub fn relay_url(&self) -> String {
        format!("ws://{}", self.relay_addr)
    }

    /// `http://HOST:PORT`.
    pub fn registry_url(&self) -> String {
        format!("http://{}", self.registry_addr)
    }

    /// Where the relay listens.
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay_addr
    }

    /// Where the registry listens (the relay's address when shared).
    pub fn registry_addr(&self) -> SocketAddr {
        self.registry_addr
    }

    /// The server's counters ([`Server::stats`]).
    pub fn stats(&self) -> Stats {
        self.server.stats()
    }

    /// The server behind the listeners.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Stops accepting, closes every relay connection (1001), waits for
    /// all of it (at most a few seconds, then the rest is aborted) and
    /// flushes the store. An in-memory state is gone afterwards; [`start`]
    /// again for a fresh server.
    pub async fn shutdown(mut self) {
        self.server.begin_shutdown();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.server.connections_closed()).await;
        for mut task in std::mem::take(&mut self.tasks) {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await.is_err() {
                task.abort();
            }
        }
        self.server.flush_storage().await;
        tracing::info!(relay_addr = %self.relay_addr, "meshwire server stopped");
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.server.begin_shutdown();
    }
}
