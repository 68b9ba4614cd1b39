//! How a client is configured, and what it counts.

use crate::registry::RegistryOptions;
use meshwire_proto::mesh::MeshConfig;
use meshwire_proto::KdfDialect;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Registry metadata key advertising the X3DH KDF dialect.
pub const META_KDF: &str = "agentmesh_kdf";
/// Registry metadata key advertising end-to-end delivery receipts.
pub const META_RECEIPTS: &str = "meshwire_receipts";
/// Registry metadata key of the display name (as the TypeScript client).
pub const META_DISPLAY_NAME: &str = "display_name";

/// Relay close code: another connection took over this DID.
pub const CLOSE_TAKEOVER: u16 = 4006;
/// Relay close code: the connect proof was rejected.
pub const CLOSE_PROOF_REJECTED: u16 = 4005;
/// Relay close code: authentication failed.
pub const CLOSE_AUTH_FAILED: u16 = 4003;

/// Peers whose registry metadata is cached at once (a KNOCK from a new
/// DID adds one); beyond it an arbitrary entry is evicted and looked up
/// again when needed.
pub const PEER_INFO_CACHE: usize = 4096;

/// Longest wait the client schedules. Longer timeouts, intervals and
/// backoffs saturate to it rather than overflow the clock (`Instant +
/// Duration` panics past the end of the clock's range).
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// Room allowed on the relay socket beyond [`MeshConfig::max_frame_bytes`]
/// for a relay's envelope around a frame (`pending_messages`, an `error`
/// frame quoting one). The state machine rejects any frame longer than
/// `max_frame_bytes` anyway; this limit makes the socket refuse a longer
/// WebSocket message or frame before it is buffered.
pub const RELAY_ENVELOPE_SLACK: usize = 64 * 1024;

/// How a [`crate::MeshClient`] connects and behaves.
#[derive(Clone)]
pub struct ClientConfig {
    /// The relay URL. With a path it is used as given
    /// (`http://127.0.0.1:8443/agt/relay`); a bare `ws(s)://host:port` or
    /// `http(s)://host:port` gets `/ws` (see [`crate::relay_connect`]).
    pub relay_url: String,
    /// Base URL of the registry (`http://host:port`).
    pub registry_url: String,
    /// More relays of the same cluster (instances sharing one store, as
    /// `meshwire serve --nats`), tried in this order after
    /// [`Self::relay_url`] when a connection attempt fails or a joined
    /// connection ends (see [`crate::client`], "Failover"). Default: none.
    pub fallback_relay_urls: Vec<String>,
    /// More registries of the same cluster, tried in this order after
    /// [`Self::registry_url`] when a registry call meets a network error,
    /// a timeout or a 5xx answer. Default: none.
    pub fallback_registry_urls: Vec<String>,
    /// The display name published in the registry (also a capability, as
    /// the TypeScript client does, so that `find` works).
    pub display_name: Option<String>,
    /// Capabilities published in the registry.
    pub capabilities: Vec<String>,
    /// Extra registry metadata.
    pub metadata: BTreeMap<String, String>,
    /// One-time pre-keys published at a time.
    pub one_time_keys: usize,
    /// The state machine's limits and policies.
    pub mesh: MeshConfig,
    /// Relay heartbeat period (default 30 s).
    pub heartbeat_interval: Duration,
    /// First reconnection delay (default 1 s), doubled per attempt.
    pub reconnect_base: Duration,
    /// Longest reconnection delay (default 60 s).
    pub reconnect_max: Duration,
    /// Offer and use end-to-end delivery receipts with peers that do too.
    pub receipts: bool,
    /// Resend messages a receipt-capable peer has not confirmed after this
    /// (default 10 s; checked four times per period, so a message goes out
    /// again 1 to 1.25 periods after it was last sent).
    pub retransmit_after: Duration,
    /// Connect without proof of possession (npm 4.0.0 compatibility relays).
    pub legacy_connect: bool,
    /// Per-peer X3DH dialect overrides (else: advertised, learned, `spec`).
    pub dialects: BTreeMap<String, KdfDialect>,
    /// Registry client options (timeouts, retries).
    pub registry: RegistryOptions,
    /// How long [`crate::MeshClient::connect`] waits for the first relay connection.
    pub connect_timeout: Duration,
    /// Messages held for the application (default 10,000). When the inbox
    /// is full the client stops reading the relay socket: nothing is
    /// decrypted, dropped or acknowledged, the relay keeps (stores) what it
    /// cannot deliver, and reading resumes (with a `fetch_pending`) once
    /// the application has taken messages. One frame read just before the
    /// limit can add at most [`MeshConfig::verdict_buffer_per_peer`]
    /// messages beyond it (a KNOCK verdict releases what was buffered).
    /// Counted in [`ClientStats::inbox_full_pauses`].
    pub inbox_capacity: usize,
    /// Events held for [`crate::MeshClient::next_event`] (default 1,024); when
    /// full, the oldest is dropped and [`ClientStats::events_dropped`]
    /// counts it.
    pub event_capacity: usize,
    /// Takeovers (4006) tolerated within [`Self::takeover_window`] before
    /// giving up with [`crate::ClientEvent::TakenOver`] (default 3).
    pub takeover_limit: u32,
    /// The window in which takeovers are counted (default 10 minutes).
    pub takeover_window: Duration,
    /// Base of the randomized wait before taking the DID back after a
    /// takeover: uniformly between 1x and 3x this, doubled per takeover in
    /// the window (default 1 s).
    pub takeover_backoff: Duration,
    /// How often the signed pre-key is replaced (default 7 days); the
    /// previous one keeps answering KNOCKs for the state machine's grace
    /// period.
    pub signed_pre_key_rotation: Duration,
    /// How often the registry's count of our one-time keys is checked (and
    /// the stock refilled when it fell below three quarters of
    /// [`Self::one_time_keys`]) even when no KNOCK consumed one (default 5
    /// minutes): bundle fetches drain keys without a KNOCK.
    pub one_time_key_check: Duration,
    /// Time between registry heartbeats while connected (default
    /// [`super::REGISTRY_HEARTBEAT_INTERVAL`], 60 s). A heartbeat answered
    /// 404 or 401 makes the client register again.
    pub registry_heartbeat: Duration,
    /// Start over with the same identity when the saved state is corrupt
    /// (default false: fail with [`crate::ClientError::CorruptState`]).
    pub reset_corrupt_state: bool,
    /// Shared-secret token sent in the `connect` frame's `token` field, for
    /// relays started with one (AGT's `AGENTMESH_RELAY_TOKEN`, `meshwire
    /// serve --relay-token`). Never printed. Default: none.
    pub relay_token: Option<zeroize::Zeroizing<String>>,
    /// Acknowledge messages only through [`crate::MeshClient::ack`]
    /// (default false). Either way a message is committed to the durable
    /// inbox before the relay is acked, and stays there until the
    /// application acknowledges it: after a crash it is handed over again
    /// (with [`crate::Message::redelivered`] set), and never after its
    /// acknowledgement. By default, each receive call ([`crate::MeshClient::recv`]
    /// and the others) first acknowledges the messages the previous receive
    /// calls handed over: a message counts as handled once the application
    /// asks for the next one. With `manual_ack`, only `ack` does; at most
    /// [`Self::inbox_capacity`] messages may wait unacknowledged (the
    /// client stops reading the relay beyond that).
    pub manual_ack: bool,
    /// How long [`crate::MeshClient::send_batch`] waits for receipts when
    /// the peer's window of messages awaiting them
    /// ([`MeshConfig::max_unconfirmed_per_peer`]) is full, before it stops
    /// with [`crate::ClientError::Batch`]. Default 30 s.
    pub send_window_wait: Duration,
}

impl ClientConfig {
    /// The defaults (documented on each field) for this relay and registry.
    pub fn new(relay_url: impl Into<String>, registry_url: impl Into<String>) -> Self {
        Self {
            relay_url: relay_url.into(),
            registry_url: registry_url.into(),
            fallback_relay_urls: Vec::new(),
            fallback_registry_urls: Vec::new(),
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
            inbox_capacity: 10_000,
            event_capacity: 1024,
            takeover_limit: 3,
            takeover_window: Duration::from_secs(600),
            takeover_backoff: Duration::from_secs(1),
            signed_pre_key_rotation: Duration::from_secs(7 * 24 * 3600),
            one_time_key_check: Duration::from_secs(300),
            registry_heartbeat: super::REGISTRY_HEARTBEAT_INTERVAL,
            reset_corrupt_state: false,
            relay_token: None,
            manual_ack: false,
            send_window_wait: Duration::from_secs(30),
        }
    }

    /// Every relay URL in the order they are tried: [`Self::relay_url`],
    /// then [`Self::fallback_relay_urls`].
    pub fn relay_urls(&self) -> Vec<&str> {
        std::iter::once(self.relay_url.as_str())
            .chain(self.fallback_relay_urls.iter().map(String::as_str))
            .collect()
    }

    /// Every registry URL in the order they are tried:
    /// [`Self::registry_url`], then [`Self::fallback_registry_urls`].
    pub fn registry_urls(&self) -> Vec<&str> {
        std::iter::once(self.registry_url.as_str())
            .chain(self.fallback_registry_urls.iter().map(String::as_str))
            .collect()
    }

    /// Replaces the relay list: the first URL becomes [`Self::relay_url`]
    /// (the "home" relay, tried first), the others
    /// [`Self::fallback_relay_urls`]. An empty list changes nothing.
    pub fn set_relay_urls(&mut self, urls: impl IntoIterator<Item = impl Into<String>>) {
        let mut urls = urls.into_iter().map(Into::into);
        if let Some(first) = urls.next() {
            self.relay_url = first;
            self.fallback_relay_urls = urls.collect();
        }
    }

    /// Replaces the registry list as [`Self::set_relay_urls`] does the
    /// relay list. An empty list changes nothing.
    pub fn set_registry_urls(&mut self, urls: impl IntoIterator<Item = impl Into<String>>) {
        let mut urls = urls.into_iter().map(Into::into);
        if let Some(first) = urls.next() {
            self.registry_url = first;
            self.fallback_registry_urls = urls.collect();
        }
    }

    /// Checks every relay and registry URL, in list order; the error
    /// names the first unusable one
    /// ([`crate::relay_connect::RelayUrlError`] inside
    /// [`crate::ClientError::RelayConnect`] for a relay,
    /// [`crate::registry::RegistryError::InvalidRequest`] for a registry).
    /// [`crate::MeshClientBuilder::connect`] runs it before anything else.
    ///
    /// ```
    /// use meshwire::ClientConfig;
    /// let mut config = ClientConfig::new("ws://127.0.0.1:8765", "http://127.0.0.1:8765");
    /// config.fallback_relay_urls = vec!["ws://127.0.0.1:8766".into(), "ftp://127.0.0.1:8767".into()];
    /// let error = config.validate_urls().unwrap_err();
    /// assert!(error.to_string().contains("ftp://127.0.0.1:8767"), "{error}");
    /// ```
    pub fn validate_urls(&self) -> Result<(), crate::ClientError> {
        for url in self.relay_urls() {
            crate::relay_connect::RelayEndpoint::parse(url).map_err(crate::relay_connect::ConnectFailure::from)?;
        }
        for url in self.registry_urls() {
            crate::registry::validate_base_url(url)?;
        }
        Ok(())
    }

    /// Largest WebSocket message (and frame) the relay socket accepts:
    /// the mesh's `max_frame_bytes` plus [`RELAY_ENVELOPE_SLACK`].
    pub fn max_relay_message_bytes(&self) -> usize {
        self.mesh.max_frame_bytes.saturating_add(RELAY_ENVELOPE_SLACK)
    }
}

/// What the client dropped, refused or noticed, besides frames (see
/// [`crate::MeshClient::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClientStats {
    /// Messages waiting in the application inbox now.
    pub inbox_len: usize,
    /// Times reading the relay socket paused because the inbox was full.
    pub inbox_full_pauses: u64,
    /// Events dropped (oldest first) because the event queue was full.
    pub events_dropped: u64,
    /// Takeovers (4006) seen since the client started.
    pub takeovers: u64,
    /// Sessions we opened with a bundle that had no one-time key (the
    /// peer's stock was empty or drained).
    pub sessions_without_one_time_key: u64,
    /// Signed pre-key rotations done by this client.
    pub signed_pre_key_rotations: u64,
    /// One-time key refills made because the registry's count was low.
    pub one_time_key_refills: u64,
    /// Peers' registry metadata evicted from the cache (it holds at most
    /// [`PEER_INFO_CACHE`] peers).
    pub peer_info_evicted: u64,
    /// Durable commits made (write-ahead: before frames leave and before
    /// messages are acked).
    pub store_commits: u64,
    /// Commits the store failed or refused (inbox or outbox full, disk
    /// error); each rolled the state back to the last commit.
    pub store_failures: u64,
    /// Messages handed over again after a restart because they had not
    /// been acknowledged.
    pub redelivered: u64,
    /// Sends waiting in the durable outbox for the relay.
    pub outbox_len: usize,
    /// Times the client registered again because the registry had lost it.
    pub reregistrations: u64,
    /// What the state machine dropped or refused.
    #[serde(skip)]
    pub mesh: meshwire_proto::mesh::MeshStats,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("relay_url", &self.relay_url)
            .field("registry_url", &self.registry_url)
            .field("fallback_relay_urls", &self.fallback_relay_urls)
            .field("fallback_registry_urls", &self.fallback_registry_urls)
            .field("display_name", &self.display_name)
            .finish_non_exhaustive()
    }
}
