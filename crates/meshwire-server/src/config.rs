//! Server configuration and the injectable wall clock.

use crate::replay::ProofLedger;
use crate::storage::{MailboxLimits, Storage, StorageLimits, DEFAULT_MAX_PROOF_LIFETIME};
use meshwire_proto::time::Timestamp;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The wall clock the server reads: replay windows, registration and
/// presence timestamps, heartbeat throttling, relay liveness and the
/// store-and-forward TTL all go through it. Socket timeouts (connect, idle)
/// are real timers and are configured separately.
pub trait Clock: Send + Sync + 'static {
    /// The current time, ms since the Unix epoch.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Timestamp(ms)
    }
}

/// A clock that only moves when told to, for deterministic tests. Clones
/// share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> Self {
        Self(Arc::new(AtomicU64::new(start.0)))
    }

    /// Moves the clock to `now` (backwards too).
    pub fn set(&self, now: Timestamp) {
        self.0.store(now.0, Ordering::SeqCst);
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        // fetch_update with a total closure never fails.
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| Some(t.saturating_add(ms)));
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// Relay and registry settings. `Default` matches the reference servers'
/// constants (and their defaults for the environment switches).
#[derive(Clone)]
pub struct ServerConfig {
    /// Shared secret that `connect` frames must carry in `token`
    /// (`AGENTMESH_RELAY_TOKEN`); `None` accepts any connection.
    pub relay_token: Option<String>,
    /// Accept `connect` frames without DID proof of possession
    /// (`AGENTMESH_RELAY_ALLOW_UNAUTHED_DID=1`). Anyone can then connect as
    /// any DID and read its mail: local development with legacy clients only.
    pub allow_unauthenticated_did: bool,
    /// Accept the npm SDK 4.0.0 registration body `{did, public_key,
    /// capabilities, metadata}` (no proof of possession, X25519 key) and
    /// unauthenticated pre-key uploads for agents registered that way.
    ///
    /// **Risk:** nothing binds such a DID to a key, so anyone can register
    /// any unclaimed DID and replace the pre-keys of a legacy-registered
    /// agent, which lets them impersonate it to new peers. A proper
    /// (proof-carrying) registration of the same DID replaces a legacy
    /// record, so a real key holder can always reclaim its DID. Off by
    /// default; use only on trusted networks.
    pub legacy_registration: bool,
    /// Largest relay frame that is parsed; larger text frames get an error
    /// frame. Frames over twice this (and at least 64 KiB more) end the
    /// connection at the WebSocket layer.
    pub max_frame_bytes: usize,
    /// Time for a new WebSocket to send its `connect` frame.
    pub connect_timeout: Duration,
    /// A relay connection that sends nothing for this long is closed (4004).
    pub idle_timeout: Duration,
    /// A connected agent silent for longer than this (by [`Clock`]) is
    /// stale: messages for it are stored instead of sent live.
    pub stale_after: Duration,
    /// How long the relay keeps an unacknowledged stored message.
    pub message_ttl: Duration,
    /// Stored messages per recipient.
    pub max_stored_per_recipient: usize,
    /// Stored messages one sender may have queued, all recipients
    /// together (so one sender cannot fill another agent's mailbox alone).
    /// Default [`DEFAULT_MAX_PER_SENDER`](crate::storage::DEFAULT_MAX_PER_SENDER).
    pub max_stored_per_sender: usize,
    /// Stored messages in total.
    pub max_stored_total: usize,
    /// Bytes of stored frames in total.
    pub max_stored_bytes: usize,
    /// Frames queued for one live connection (its outbound buffer). A
    /// reader that lets more pile up is a slow consumer: the message that
    /// does not fit is stored, the connection is closed with
    /// [`SLOW_CONSUMER`](crate::close_code::SLOW_CONSUMER) and its queue
    /// goes back to the offline store (the agent gets it on reconnecting),
    /// followed by what arrived meanwhile, in order. Default 8192 (a burst
    /// of thousands of frames to a reader that keeps up is not slow).
    /// The same count, and [`ServerConfig::outbound_queue_bytes`], also
    /// bound the `message` frames a connection wrote and holds until the
    /// agent acknowledges them (stored if the connection ends first); past
    /// either the oldest is forgotten, counted as
    /// `meshwire_limit_refusals_total{limit="unacked"}`.
    pub outbound_queue: usize,
    /// Bytes of frames queued for one live connection; past it, as past
    /// [`ServerConfig::outbound_queue`]. Default 16 MiB.
    pub outbound_queue_bytes: usize,
    /// How long the relay waits for another instance to take a frame for
    /// an agent connected there (NATS storage only: [`Storage::live`])
    /// before storing the frame in the mailbox instead. Default 500 ms.
    pub cluster_route_timeout: Duration,
    /// Open relay WebSockets (handshaking ones included). Further upgrades
    /// get HTTP 503 with `Retry-After`. Default 10,000.
    pub max_connections: usize,
    /// Registered agents.
    pub max_agents: usize,
    /// One-time pre-keys in one upload.
    pub max_one_time_keys: usize,
    /// Largest HTTP request body (larger ones get 413). Together with
    /// `max_agents` this bounds the registry's memory.
    pub max_body_bytes: usize,
    /// Minimum time between two accepted registry heartbeats of one agent.
    pub heartbeat_min_interval: Duration,
    /// An agent not seen (registration, heartbeat) for this long is
    /// removed from the registry with its keys. Default 30 days;
    /// `Duration::ZERO` keeps agents forever.
    pub agent_expiry: Duration,
    /// Capabilities one registration may list. Default 64.
    pub max_capabilities: usize,
    /// Metadata entries one registration may carry. Default 32.
    pub max_metadata_entries: usize,
    /// Longest capability, metadata key or metadata value (bytes).
    /// Default 1024.
    pub max_registration_string_bytes: usize,
    /// How far a signed timestamp (relay `connect`, `Ed25519-Timestamp`
    /// header, registration proof) may be from the server clock, either
    /// way. Default 5 minutes, as the reference servers. A proof is
    /// remembered (and refused a second time) until its timestamp leaves
    /// this window.
    pub replay_window: Duration,
    /// Live proofs the once-only memory holds in total; when full, new
    /// proofs are refused (503 / close 4005) until some expire. Default
    /// [`DEFAULT_MAX_LIVE_PROOFS`](crate::DEFAULT_MAX_LIVE_PROOFS).
    pub max_live_proofs: usize,
    /// Live proofs the once-only memory holds for one DID. Default
    /// [`DEFAULT_MAX_LIVE_PROOFS_PER_DID`](crate::DEFAULT_MAX_LIVE_PROOFS_PER_DID).
    pub max_live_proofs_per_did: usize,
    /// A once-only memory to use instead of the storage's; `None` uses
    /// [`Storage::proofs`] of [`ServerConfig::storage`] (in process when
    /// that is `None`, bounded by the two limits above).
    pub proof_ledger: Option<Arc<dyn ProofLedger>>,
    /// Where offline mailboxes, agent records, pre-keys, one-time keys and
    /// (unless [`ServerConfig::proof_ledger`] is set) the once-only proof
    /// memory live: [`Storage::sqlite`] (durable), [`Storage::nats`]
    /// (several instances on one NATS JetStream) or [`Storage::memory`].
    /// `None`: in memory, with the limits of this configuration
    /// ([`ServerConfig::storage_limits`]); everything is lost on exit.
    /// A storage opened elsewhere keeps the limits it was opened with:
    /// build it with [`ServerConfig::storage_limits`].
    pub storage: Option<Storage>,
    /// Refuse the timestamp forms of authentication (relay `connect` with
    /// `timestamp`, `Authorization: Ed25519-Timestamp`): only
    /// challenge-bound proofs (docs/specs/MESHWIRE-CHALLENGE-AUTH.md) are
    /// accepted. Reference (AGT) clients cannot connect then. Off by default.
    pub require_challenge: bool,
    /// How long an issued challenge nonce stays usable. Default 60 s.
    pub challenge_ttl: Duration,
    /// Key of the HMAC that makes challenge nonces verifiable without
    /// state; instances of one deployment must share it. `None`: a random
    /// key per process.
    pub challenge_secret: Option<ChallengeSecret>,
    /// Origins (`https://mesh.example.com`) a challenge proof's audience may
    /// name, for servers behind a proxy. Empty: the audience's host and
    /// port must be the request's `Host` header. A relay audience
    /// `wss://h` matches the origin `https://h` (and `ws://` `http://`).
    pub public_origins: Vec<String>,
    /// Pre-key bundle fetches one requester (its authenticated DID, else
    /// its peer IP) may make per minute; more get 429 with `Retry-After`.
    /// Default 30. `0` disables the limit.
    pub bundle_fetches_per_minute: u32,
    /// Registrations (`POST /v1/agents`) one peer IP may make per minute;
    /// more get 429 with `Retry-After`, counted as
    /// `meshwire_rate_limited_total{limit="registration"}`. Default 20.
    /// `0` disables the limit.
    pub registrations_per_minute: u32,
    /// Discovery requests (`GET /v1/discover`) one requester (its
    /// authenticated DID, else its peer IP) may make per minute; more get
    /// 429 with `Retry-After`, counted as
    /// `meshwire_rate_limited_total{limit="discovery"}`. Default 60. `0`
    /// disables the limit.
    pub discoveries_per_minute: u32,
    /// Also apply the per-IP rate limits (registrations, bundle fetches,
    /// discovery) to loopback addresses. Off by
    /// default: local tests and interop runs put every agent behind
    /// 127.0.0.1, where one shared budget would throttle them all. (Behind
    /// a reverse proxy on the same host every request is loopback: turn
    /// this on there, or limit at the proxy.)
    pub rate_limit_loopback: bool,
    /// Requesters whose budget each rate limit tracks; past it, untracked
    /// requesters share one budget. Default 10,000.
    pub max_rate_limited_requesters: usize,
    /// Store offline mail only for DIDs the registry knows: a frame for an
    /// unregistered recipient that is not connected is refused (error
    /// frame to the sender, counted as
    /// `meshwire_limit_refusals_total{limit="unregistered_recipient"}`),
    /// so mail for made-up DIDs cannot fill the store. Live delivery to a
    /// connected recipient is unchanged. Off by default (the reference
    /// relay stores mail for any DID).
    pub route_only_registered: bool,
    /// How long the registry keeps an agent's previous signed pre-key after
    /// a rotation (AGT spec section 6.2: 14 days).
    pub signed_pre_key_retention: Duration,
    /// The wall clock.
    pub clock: Arc<dyn Clock>,
}

/// The HMAC key of challenge nonces (zeroized on drop, never printed).
#[derive(Clone)]
pub struct ChallengeSecret(pub(crate) zeroize::Zeroizing<[u8; 32]>);

impl ChallengeSecret {
    /// A secret from 32 bytes (share them between the instances of one
    /// deployment).
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(zeroize::Zeroizing::new(bytes))
    }
}

/// A challenge secret could not be read. The Display names the problem,
/// never the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeSecretError {
    /// Nothing was given (an empty file or variable).
    #[error("the challenge secret is empty (want 32 raw bytes, 64 hex characters or base64 of 32 bytes)")]
    Empty,
    /// 64 characters (the length of a hex key) that are not all hex digits.
    #[error("the challenge secret looks like hex but is not valid hex (character {position})")]
    BadHex {
        /// 0-based index of the first character that is not a hex digit.
        position: usize,
    },
    /// Text that is neither 64 hex characters nor base64 of 32 bytes, nor
    /// 32 raw bytes.
    #[error(
        "the challenge secret must be 32 raw bytes, 64 hex characters or base64 of 32 bytes \
         (got {len} bytes{decoded})",
        decoded = match .decoded { Some(n) => format!(", {n} after base64 decoding"), None => String::new() }
    )]
    WrongLength {
        /// Bytes given (after trimming surrounding whitespace).
        len: usize,
        /// Bytes the text decoded to as base64, when it is base64.
        decoded: Option<usize>,
    },
}

impl ChallengeSecret {
    /// Reads a secret as kept in a file or an environment variable:
    /// exactly 32 raw bytes, or (surrounding whitespace ignored) 64 hex
    /// characters, or base64 (standard or URL alphabet, padded or not) of
    /// 32 bytes. Generate one with `openssl rand -hex 32`.
    pub fn parse(bytes: &[u8]) -> Result<Self, ChallengeSecretError> {
        if let Ok(raw) = <[u8; 32]>::try_from(bytes) {
            // Hex and base64 of a 32-byte key are never 32 characters long.
            return Ok(Self::new(raw));
        }
        let text = bytes.trim_ascii();
        if text.is_empty() {
            return Err(ChallengeSecretError::Empty);
        }
        if text.len() == 64 {
            // 64 characters: hex (base64 of that length is 48 bytes, not a key).
            if let Some(position) = text.iter().position(|b| !b.is_ascii_hexdigit()) {
                return Err(ChallengeSecretError::BadHex { position });
            }
            let mut key = zeroize::Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(text, key.as_mut_slice()).map_err(|_| ChallengeSecretError::BadHex { position: 0 })?;
            return Ok(Self(key));
        }
        let decoded = std::str::from_utf8(text)
            .ok()
            .and_then(|t| meshwire_proto::encoding::b64_decode(t).ok())
            .map(zeroize::Zeroizing::new);
        match decoded {
            Some(bytes) if bytes.len() == 32 => {
                let mut key = zeroize::Zeroizing::new([0u8; 32]);
                key.copy_from_slice(&bytes);
                Ok(Self(key))
            }
            other => Err(ChallengeSecretError::WrongLength {
                len: text.len(),
                decoded: other.map(|b| b.len()),
            }),
        }
    }
}

impl fmt::Debug for ChallengeSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChallengeSecret(<redacted>)")
    }
}

impl ServerConfig {
    /// The same configuration reading time from `clock`.
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The storage limits this configuration implies: its mailbox quotas,
    /// message TTL and proof limits (pass them to [`Storage::sqlite`] or
    /// [`Storage::nats`]).
    pub fn storage_limits(&self) -> StorageLimits {
        let wide = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        StorageLimits {
            mailbox: MailboxLimits {
                per_recipient: wide(self.max_stored_per_recipient),
                per_sender: wide(self.max_stored_per_sender),
                total: wide(self.max_stored_total),
                total_bytes: wide(self.max_stored_bytes),
                max_ttl: self.message_ttl,
            },
            max_live_proofs: self.max_live_proofs,
            max_live_proofs_per_did: self.max_live_proofs_per_did,
            // A proof lives at most twice the window (a timestamp up to one
            // window ahead, then fresh for one window).
            max_proof_lifetime: DEFAULT_MAX_PROOF_LIFETIME.max(self.replay_window.saturating_mul(3)),
        }
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub(crate) fn window_ms(&self) -> u64 {
        duration_ms(self.replay_window)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            relay_token: None,
            allow_unauthenticated_did: false,
            legacy_registration: false,
            max_frame_bytes: 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            stale_after: Duration::from_secs(90),
            message_ttl: Duration::from_secs(72 * 3600),
            max_stored_per_recipient: 10_000,
            max_stored_per_sender: crate::storage::DEFAULT_MAX_PER_SENDER as usize,
            max_stored_total: 100_000,
            max_stored_bytes: 256 * 1024 * 1024,
            outbound_queue: 8192,
            outbound_queue_bytes: 16 * 1024 * 1024,
            cluster_route_timeout: Duration::from_millis(500),
            max_connections: 10_000,
            max_agents: 100_000,
            max_one_time_keys: 1000,
            max_body_bytes: 256 * 1024,
            heartbeat_min_interval: Duration::from_secs(10),
            agent_expiry: Duration::from_secs(30 * 24 * 3600),
            max_capabilities: 64,
            max_metadata_entries: 32,
            max_registration_string_bytes: 1024,
            replay_window: Duration::from_millis(meshwire_proto::auth::REPLAY_WINDOW_MS),
            max_live_proofs: crate::replay::DEFAULT_MAX_LIVE_PROOFS,
            max_live_proofs_per_did: crate::replay::DEFAULT_MAX_LIVE_PROOFS_PER_DID,
            proof_ledger: None,
            storage: None,
            require_challenge: false,
            challenge_ttl: Duration::from_secs(60),
            challenge_secret: None,
            public_origins: Vec::new(),
            bundle_fetches_per_minute: 30,
            registrations_per_minute: 20,
            discoveries_per_minute: 60,
            rate_limit_loopback: false,
            max_rate_limited_requesters: 10_000,
            route_only_registered: false,
            signed_pre_key_retention: Duration::from_secs(14 * 24 * 3600),
            clock: Arc::new(SystemClock),
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("relay_token", &self.relay_token.as_ref().map(|_| "<set>"))
            .field("allow_unauthenticated_did", &self.allow_unauthenticated_did)
            .field("legacy_registration", &self.legacy_registration)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("stale_after", &self.stale_after)
            .field("message_ttl", &self.message_ttl)
            .field("max_stored_per_recipient", &self.max_stored_per_recipient)
            .field("max_stored_per_sender", &self.max_stored_per_sender)
            .field("max_stored_total", &self.max_stored_total)
            .field("max_stored_bytes", &self.max_stored_bytes)
            .field("outbound_queue", &self.outbound_queue)
            .field("outbound_queue_bytes", &self.outbound_queue_bytes)
            .field("cluster_route_timeout", &self.cluster_route_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_agents", &self.max_agents)
            .field("max_one_time_keys", &self.max_one_time_keys)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("heartbeat_min_interval", &self.heartbeat_min_interval)
            .field("agent_expiry", &self.agent_expiry)
            .field("max_capabilities", &self.max_capabilities)
            .field("max_metadata_entries", &self.max_metadata_entries)
            .field("max_registration_string_bytes", &self.max_registration_string_bytes)
            .field("replay_window", &self.replay_window)
            .field("max_live_proofs", &self.max_live_proofs)
            .field("max_live_proofs_per_did", &self.max_live_proofs_per_did)
            .field("proof_ledger", &self.proof_ledger.as_ref().map(|_| "<custom>"))
            .field("storage", &self.storage.as_ref().map(Storage::backend))
            .field("require_challenge", &self.require_challenge)
            .field("challenge_ttl", &self.challenge_ttl)
            .field("challenge_secret", &self.challenge_secret)
            .field("public_origins", &self.public_origins)
            .field("bundle_fetches_per_minute", &self.bundle_fetches_per_minute)
            .field("registrations_per_minute", &self.registrations_per_minute)
            .field("discoveries_per_minute", &self.discoveries_per_minute)
            .field("rate_limit_loopback", &self.rate_limit_loopback)
            .field("max_rate_limited_requesters", &self.max_rate_limited_requesters)
            .field("route_only_registered", &self.route_only_registered)
            .field("signed_pre_key_retention", &self.signed_pre_key_retention)
            .finish_non_exhaustive()
    }
}

pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_secrets_parse_from_raw_hex_and_base64() {
        let key: [u8; 32] = std::array::from_fn(|i| u8::try_from(i * 7 % 256).unwrap_or(0));
        let same = |s: Result<ChallengeSecret, ChallengeSecretError>| s.map(|s| *s.0);
        assert_eq!(same(ChallengeSecret::parse(&key)), Ok(key));
        let hex_text = format!("{}\n", hex::encode(key));
        assert_eq!(same(ChallengeSecret::parse(hex_text.as_bytes())), Ok(key));
        let upper = hex::encode_upper(key);
        assert_eq!(same(ChallengeSecret::parse(upper.as_bytes())), Ok(key));
        let b64 = meshwire_proto::encoding::b64_url(&key);
        assert_eq!(same(ChallengeSecret::parse(format!("  {b64}\r\n").as_bytes())), Ok(key));
        assert_eq!(ChallengeSecret::parse(b" \n").err(), Some(ChallengeSecretError::Empty));
        let mut bad_hex = hex::encode(key);
        bad_hex.replace_range(10..11, "g");
        assert_eq!(
            ChallengeSecret::parse(bad_hex.as_bytes()).err(),
            Some(ChallengeSecretError::BadHex { position: 10 })
        );
        let short = ChallengeSecret::parse(b"deadbeef").err();
        assert_eq!(
            short,
            Some(ChallengeSecretError::WrongLength {
                len: 8,
                decoded: Some(6)
            })
        );
        let message = short.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("32 raw bytes") && message.contains("got 8 bytes"),
            "{message}"
        );
        assert!(!message.contains("deadbeef"), "{message}");
        // Never printed.
        let secret = ChallengeSecret::parse(hex_text.as_bytes()).map(|s| format!("{s:?}"));
        assert_eq!(secret.as_deref(), Ok("ChallengeSecret(<redacted>)"));
    }
}
