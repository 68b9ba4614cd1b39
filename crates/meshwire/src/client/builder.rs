//! [`MeshClientBuilder`] and the start of a client: load the durable state,
//! register, publish pre-keys, join the relay.

use super::config::{ClientConfig, META_DISPLAY_NAME, META_KDF, META_RECEIPTS};
use super::connection::run_connection;
use super::durable::{commit_new_state, InboxState};
use super::inner::{EventQueue, Inner, Registration, StatCounters};
use super::prekeys::maintain_prekeys;
use super::types::{ClientError, FrameCounters, KnockPolicy};
use super::util::{escape_log, now};
use super::MeshClient;
use crate::persist::{MemoryPersistence, PersistError, Persistence, Snapshot, SqliteOptions};
use crate::registry::RegistryClient;
use meshwire_proto::mesh::{Mesh, RandomUuids};
use meshwire_proto::{Identity, KdfDialect, PreKeys};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch, Notify};

/// Builds and connects a [`MeshClient`].
///
/// ```no_run
/// use meshwire::{knock_policy, Identity, MeshClient};
///
/// # async fn run() -> Result<(), meshwire::ClientError> {
/// let identity = Identity::generate(&mut rand::thread_rng());
/// let client = MeshClient::builder(identity, "ws://127.0.0.1:8765", "http://127.0.0.1:8766")
///     .display_name("alice")
///     .capabilities(["summarize"])
///     // Sessions, the inbox and the outbox survive restarts (SQLite).
///     .state_dir("/var/lib/my-agent/state")
///     .knock_policy(knock_policy(|knock| knock.intent["action"] == "summarize"))
///     .connect()
///     .await?;
/// # let _ = client;
/// # Ok(())
/// # }
/// ```
pub struct MeshClientBuilder {
    pub(crate) identity: Identity,
    pub(crate) config: ClientConfig,
    pub(crate) persistence: Option<Arc<dyn Persistence>>,
    pub(crate) state_dir: Option<(PathBuf, SqliteOptions)>,
    pub(crate) policy: Option<KnockPolicy>,
}

impl std::fmt::Debug for MeshClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClientBuilder")
            .field("did", &self.identity.did().as_str())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl MeshClientBuilder {
    /// Starts over with the same identity when the saved state cannot be
    /// loaded (it is reset in the store, and a warning is logged), instead
    /// of failing with [`ClientError::CorruptState`].
    pub fn reset_corrupt_state(mut self, reset: bool) -> Self {
        self.config.reset_corrupt_state = reset;
        self
    }

    /// The display name published in the registry.
    pub fn display_name(mut self, name: impl Into<String>) -> Self {
        self.config.display_name = Some(name.into());
        self
    }

    /// Capabilities published in the registry.
    pub fn capabilities(mut self, caps: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.config.capabilities = caps.into_iter().map(Into::into).collect();
        self
    }

    /// Where the state is committed (see [`crate::persist`]); replaces
    /// [`Self::state_dir`]. Without either, the state lives in memory
    /// and is gone when the process ends.
    pub fn persistence(mut self, persistence: Arc<dyn Persistence>) -> Self {
        self.persistence = Some(persistence);
        self.state_dir = None;
        self
    }

    /// [`Self::persistence`] when `persistence` is `Some`; in memory
    /// otherwise.
    pub fn persistence_opt(mut self, persistence: Option<Arc<dyn Persistence>>) -> Self {
        if persistence.is_some() {
            self.state_dir = None;
        }
        self.persistence = persistence;
        self
    }

    /// Keeps the state in an SQLite store in `dir` (created `0700` if
    /// missing), one file per agent ([`crate::persist::state_file`]); a
    /// JSON state file of an older meshwire there is migrated into it.
    pub fn state_dir(self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir_with(dir, SqliteOptions::new())
    }

    /// [`Self::state_dir`] with store options (durability level,
    /// encryption at rest, limits).
    pub fn state_dir_with(mut self, dir: impl Into<PathBuf>, options: SqliteOptions) -> Self {
        self.state_dir = Some((dir.into(), options));
        self.persistence = None;
        self
    }

    /// Decides on KNOCKs (default: accept every KNOCK).
    pub fn knock_policy(mut self, policy: KnockPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Every relay of the cluster, the "home" relay first: the client
    /// joins the first that takes it and, when that connection ends or an
    /// attempt fails, tries the next in the list (wrapping around) with
    /// the usual backoff ([`ClientConfig::fallback_relay_urls`]). Replaces
    /// the URL given to [`MeshClient::builder`]; an empty list changes
    /// nothing. Each URL is checked by [`Self::connect`].
    ///
    /// ```no_run
    /// use meshwire::{Identity, MeshClient};
    ///
    /// # async fn run() -> Result<(), meshwire::ClientError> {
    /// let identity = Identity::generate(&mut rand::thread_rng());
    /// // Three `meshwire serve --nats ...` instances sharing one NATS.
    /// let client = MeshClient::builder(identity, "ws://10.0.0.1:8765", "http://10.0.0.1:8765")
    ///     .relay_urls(["ws://10.0.0.1:8765", "ws://10.0.0.2:8765", "ws://10.0.0.3:8765"])
    ///     .registry_urls(["http://10.0.0.1:8765", "http://10.0.0.2:8765", "http://10.0.0.3:8765"])
    ///     .state_dir("/var/lib/my-agent/state")
    ///     .connect()
    ///     .await?;
    /// # let _ = client;
    /// # Ok(())
    /// # }
    /// ```
    pub fn relay_urls(mut self, urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.config.set_relay_urls(urls);
        self
    }

    /// Every registry of the cluster, in the order they are tried: a call
    /// that meets a network error, a timeout or a 5xx answer moves to the
    /// next ([`ClientConfig::fallback_registry_urls`]; see
    /// [`Self::relay_urls`] for an example). Replaces the URL given to
    /// [`MeshClient::builder`]; an empty list changes nothing.
    pub fn registry_urls(mut self, urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.config.set_registry_urls(urls);
        self
    }

    /// The relay's shared-secret token ([`ClientConfig::relay_token`]).
    pub fn relay_token(mut self, token: impl Into<String>) -> Self {
        self.config.relay_token = Some(zeroize::Zeroizing::new(token.into()));
        self
    }

    /// Changes any other setting.
    pub fn config(mut self, f: impl FnOnce(&mut ClientConfig)) -> Self {
        f(&mut self.config);
        self
    }

    /// Checks every relay and registry URL
    /// ([`ClientConfig::validate_urls`]), opens the store, registers,
    /// publishes pre-keys and joins the relay.
    pub async fn connect(self) -> Result<MeshClient, ClientError> {
        self.config.validate_urls()?;
        let owned = self.state_dir.is_some();
        let persistence = match self.state_dir {
            Some((dir, options)) => {
                let did = self.identity.did().to_string();
                let opened = tokio::task::spawn_blocking(move || crate::persist::open_state_dir(&dir, &did, options))
                    .await
                    .map_err(|e| ClientError::Relay(format!("opening the store: {e}")))?;
                Some(Arc::new(opened?) as Arc<dyn Persistence>)
            }
            None => self.persistence,
        };
        MeshClient::start(self.identity, self.config, persistence, owned, self.policy).await
    }
}

/// The mesh the store holds (`None` for a new agent); a state that cannot
/// be used is a [`ClientError::CorruptState`], or is reset with
/// `reset_corrupt_state`.
fn load_mesh(
    persistence: &dyn Persistence,
    identity: &Identity,
    config: &ClientConfig,
) -> Result<(Snapshot, Option<Mesh>), ClientError> {
    let corrupt = |reason: String| ClientError::CorruptState {
        location: persistence.location(),
        reason,
    };
    let loaded = persistence.load().map_err(|e| match e {
        PersistError::Corrupt { reason, .. } => corrupt(reason),
        other => ClientError::Persist(other),
    });
    let restored = loaded.and_then(|snapshot| {
        let mesh = snapshot
            .restore_mesh(
                Identity::from_seed(&identity.seed()),
                config.mesh.clone(),
                Box::new(RandomUuids),
            )
            .map_err(|e| corrupt(e.to_string()))?;
        Ok((snapshot, mesh))
    });
    match restored {
        Err(ClientError::CorruptState { location, reason }) if config.reset_corrupt_state => {
            tracing::warn!(
                target: "meshwire",
                location = %escape_log(&location),
                reason = %escape_log(&reason),
                "corrupt saved state: starting over with the same identity"
            );
            persistence.reset_mesh()?;
            Ok((persistence.load()?, None))
        }
        other => other,
    }
}

impl MeshClient {
    /// A builder for a client of `identity` on the relay and registry at
    /// these URLs.
    pub fn builder(
        identity: Identity,
        relay_url: impl Into<String>,
        registry_url: impl Into<String>,
    ) -> MeshClientBuilder {
        MeshClientBuilder {
            identity,
            config: ClientConfig::new(relay_url, registry_url),
            persistence: None,
            state_dir: None,
            policy: None,
        }
    }

    /// Registers `identity` (proof of possession), publishes its pre-keys,
    /// joins the relay and starts the background connection task. With a
    /// store holding earlier state, sessions, pending one-time keys,
    /// unacknowledged messages and unsent frames carry on where they were.
    pub async fn connect(
        identity: Identity,
        config: ClientConfig,
        persistence: Option<Arc<dyn Persistence>>,
        policy: Option<KnockPolicy>,
    ) -> Result<Self, ClientError> {
        Self::start(identity, config, persistence, false, policy).await
    }

    /// [`MeshClient::connect`]; `owned`: the client opened `persistence`
    /// and releases it on `close()`.
    async fn start(
        identity: Identity,
        config: ClientConfig,
        persistence: Option<Arc<dyn Persistence>>,
        owned: bool,
        policy: Option<KnockPolicy>,
    ) -> Result<Self, ClientError> {
        let did = identity.did().to_string();
        config.validate_urls()?;
        let registry = RegistryClient::with_fallbacks(&config.registry_urls(), config.registry.clone())?;
        let persistence = persistence.unwrap_or_else(|| Arc::new(MemoryPersistence::new()));
        let (snapshot, saved) = load_mesh(persistence.as_ref(), &identity, &config)?;
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
        let registration = registration(&config);

        let event_capacity = config.event_capacity;
        let (verdicts, verdicts_rx) = mpsc::unbounded_channel();
        let (connected, mut connected_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            did,
            config,
            mesh: Mutex::new(mesh),
            registry,
            registration,
            persistence,
            owns_persistence: owned,
            policy: Mutex::new(policy),
            outgoing: Mutex::new(VecDeque::new()),
            outgoing_notify: Notify::new(),
            receipts_notify: Notify::new(),
            inbox: Mutex::new(InboxState::default()),
            inbox_notify: Notify::new(),
            events: EventQueue::new(event_capacity),
            stats: StatCounters::default(),
            counters: Mutex::new(FrameCounters::default()),
            peer_info: Mutex::new(HashMap::new()),
            open_locks: tokio::sync::Mutex::new(HashMap::new()),
            connected,
            join_failure: watch::Sender::new(None),
            verdicts,
            verdicts_rx: tokio::sync::Mutex::new(verdicts_rx),
            closed: AtomicBool::new(false),
            shutdown: Notify::new(),
            reconnect_now: AtomicBool::new(false),
            outbox_pending: AtomicU64::new(0),
            consumed_since_upload: AtomicU64::new(0),
            replenishing: AtomicBool::new(false),
            published: Mutex::new(0),
            store_idle: Default::default(),
        });
        if !restored {
            commit_new_state(&inner)?;
        }
        inner.restore_queues(&snapshot);
        drop(snapshot);

        inner.register().await?;
        if restored && inner.rotate_signed_pre_key_if_due()? {
            // A signed pre-key older than the rotation interval (or of
            // unknown age: states saved before rotation existed) is
            // replaced before it is published again.
            inner.publish_one_time_keys().await?;
        } else if restored {
            // Republish what we hold: the registry may have lost it, and
            // these are the keys we can still answer.
            inner.republish_prekeys().await?;
        } else {
            inner.publish_one_time_keys().await?;
        }

        let task = tokio::spawn(run_connection(inner.clone()));
        tokio::spawn(maintain_prekeys(Arc::downgrade(&inner)));
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
}

/// The capabilities and metadata published for `config`.
fn registration(config: &ClientConfig) -> Registration {
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
    Registration { capabilities, metadata }
}
