//! Registry client: registration, pre-key distribution, lookup, discovery
//! and presence against an AgentMesh registry (`/v1/agents`, `/v1/discover`).
//!
//! Requests are described by pure builders ([`register_request`],
//! [`upload_prekeys_request`], ...) that return a [`RequestSpec`] holding the
//! exact method, path, headers and body text; [`RegistryClient`] sends them.
//! Bodies are compact JSON with base64url (unpadded) keys, byte-identical to
//! the TypeScript client's for the same inputs. Authenticated calls carry
//! `Authorization: Ed25519-Timestamp <did> <iso ts> <sig>`, signed with a
//! timestamp read from the clock when each attempt is sent.
//!
//! Retries (exponential backoff with jitter) happen only on 5xx answers and
//! on network errors or timeouts, never on 4xx. Note that a retried
//! `fetch_bundle` may consume a second one-time key on the registry if the
//! first attempt reached it.
//!
//! **Failover.** A client made with [`RegistryClient::with_fallbacks`]
//! knows several base URLs of one registry cluster (instances sharing a
//! store, as `meshwire serve --nats`). A retry moves to the next URL, at
//! once while some URL has not been tried for the call, with the backoff
//! after that; the client then stays on the URL that answered. A call
//! fails only after every URL was tried (and at least
//! [`RegistryOptions::max_retries`] retries were made).

use meshwire_proto::auth::{
    challenge_header, ed25519_timestamp_header, normalize_origin, ChallengeRequest, CHALLENGE_HEADER, CHALLENGE_PATH,
    CHALLENGE_SCHEME,
};
use meshwire_proto::registry_wire;
use meshwire_proto::time::Timestamp;
use meshwire_proto::{Did, Identity, OneTimeKeyId, PreKeyBundle, PreKeyError, PreKeys};
use rand_core::{OsRng, RngCore};
use reqwest::Method;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Largest response body the client reads.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// A registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// 404: the agent (or its pre-key bundle) is not registered.
    #[error("not found (404): {body}")]
    NotFound {
        /// The answer's body (bounded).
        body: String,
    },
    /// 409 where it is an error (registering again is not).
    #[error("conflict (409): {body}")]
    Conflict {
        /// The answer's body (bounded).
        body: String,
    },
    /// 429: the registry rate-limited the call (heartbeats: at most one per
    /// 10 s). Not retried.
    #[error("throttled (429): {body}")]
    Throttled {
        /// The answer's body (bounded).
        body: String,
    },
    /// Any other non-success status, after retries for 5xx.
    #[error("registry answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The answer's body (bounded).
        body: String,
    },
    /// No answer within the configured timeout, after retries.
    #[error("registry request timed out")]
    Timeout,
    /// Connection or protocol failure, after retries.
    #[error("transport error: {0}")]
    Transport(String),
    /// A success answer whose body is not what the operation returns
    /// (malformed JSON, wrong types, bad base64, oversized).
    #[error("invalid registry response: {0}")]
    InvalidResponse(String),
    /// The request could not be built (bad base URL, TLS setup, encoding).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A one-time key id to upload is not held by the `PreKeys`.
    #[error(transparent)]
    PreKey(#[from] PreKeyError),
}

impl RegistryError {
    /// The HTTP status the registry answered, when the error is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::NotFound { .. } => Some(404),
            Self::Conflict { .. } => Some(409),
            Self::Throttled { .. } => Some(429),
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The response body text of a status error.
    pub fn body(&self) -> Option<&str> {
        match self {
            Self::NotFound { body }
            | Self::Conflict { body }
            | Self::Throttled { body }
            | Self::Status { body, .. } => Some(body),
            _ => None,
        }
    }

    /// FastAPI's `{"detail": "..."}` message of a status error, if the body
    /// has one that is a string.
    pub fn detail(&self) -> Option<String> {
        let value: serde_json::Value = serde_json::from_str(self.body()?).ok()?;
        value.get("detail")?.as_str().map(str::to_owned)
    }

    fn from_status(status: u16, body: &[u8]) -> Self {
        let body = String::from_utf8_lossy(body).into_owned();
        match status {
            404 => Self::NotFound { body },
            409 => Self::Conflict { body },
            429 => Self::Throttled { body },
            status => Self::Status { status, body },
        }
    }
}

/// The clock authenticated requests read their timestamp from.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// The system clock as a [`Timestamp`].
pub fn system_clock() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Timestamp(ms)
}

/// Timeouts, retries and clock of a [`RegistryClient`].
#[derive(Clone)]
pub struct RegistryOptions {
    /// Per attempt, from connecting until the body is read.
    pub timeout: Duration,
    /// Extra attempts after the first, on 5xx and network errors only.
    pub max_retries: u32,
    /// Delay before the first retry; doubles per retry, with jitter.
    pub base_backoff: Duration,
    /// Cap on a single retry delay.
    pub max_backoff: Duration,
    /// Source of the `Ed25519-Timestamp` and registration proof timestamps.
    pub clock: Clock,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_retries: 3,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            clock: Arc::new(system_clock),
        }
    }
}

impl fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryOptions")
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("base_backoff", &self.base_backoff)
            .field("max_backoff", &self.max_backoff)
            .finish_non_exhaustive()
    }
}

/// One HTTP request, exactly as it goes on the wire (minus the base URL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSpec {
    /// The HTTP method.
    pub method: Method,
    /// Path and query, e.g. `/v1/agents/did%3Amesh%3A.../prekeys`.
    pub path: String,
    /// Lowercase header names, in the order the TypeScript client sets them.
    pub headers: Vec<(&'static str, String)>,
    /// Exact body text, if any.
    pub body: Option<String>,
}

impl RequestSpec {
    /// The full URL under `base` (a trailing `/` of `base` is ignored).
    pub fn url(&self, base: &str) -> String {
        format!("{}{}", base.trim_end_matches('/'), self.path)
    }

    /// The value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }
}

/// `did` percent-encoded as by `encodeURIComponent` (`did%3Amesh%3A...`).
pub fn encode_path_segment(text: &str) -> String {
    registry_wire::encode_component(text)
}

fn agent_path(did: &Did, suffix: &str) -> String {
    format!("/v1/agents/{}{suffix}", encode_path_segment(did.as_str()))
}

fn auth_header(identity: &Identity, timestamp: &str) -> (&'static str, String) {
    ("authorization", ed25519_timestamp_header(identity, timestamp))
}

fn json_request(method: Method, path: String, identity: &Identity, timestamp: &str, body: String) -> RequestSpec {
    RequestSpec {
        method,
        path,
        headers: vec![
            ("content-type", "application/json".to_owned()),
            auth_header(identity, timestamp),
        ],
        body: Some(body),
    }
}

fn authed_request(method: Method, path: String, identity: &Identity, timestamp: &str) -> RequestSpec {
    RequestSpec {
        method,
        path,
        headers: vec![auth_header(identity, timestamp)],
        body: None,
    }
}

/// `POST /v1/agents` with the registration proof of possession over
/// `timestamp` (also used for the Authorization header, as the TypeScript
/// client sends one).
pub fn register_request(
    identity: &Identity,
    capabilities: &[String],
    metadata: &BTreeMap<String, String>,
    timestamp: &str,
) -> Result<RequestSpec, RegistryError> {
    let body = registry_wire::register_body(identity, timestamp, capabilities, metadata);
    Ok(json_request(
        Method::POST,
        "/v1/agents".to_owned(),
        identity,
        timestamp,
        body,
    ))
}

/// `PUT /v1/agents/{did}/prekeys`: the identity keys, the signed pre-key and
/// the public halves of the one-time keys `one_time_ids`, in that order.
/// An id the `PreKeys` does not hold is an error.
pub fn upload_prekeys_request(
    identity: &Identity,
    prekeys: &PreKeys,
    one_time_ids: &[OneTimeKeyId],
    timestamp: &str,
) -> Result<RequestSpec, RegistryError> {
    if let Some(&unknown) = one_time_ids.iter().find(|&&id| prekeys.one_time_key(id).is_none()) {
        return Err(PreKeyError::Unknown(unknown).into());
    }
    let body = registry_wire::prekeys_body(identity, prekeys, one_time_ids);
    Ok(json_request(
        Method::PUT,
        agent_path(identity.did(), "/prekeys"),
        identity,
        timestamp,
        body,
    ))
}

/// `GET /v1/agents/{peer}/prekeys`, without an Authorization header: no
/// registry checks one on bundle fetches (AGT 5.0.0 and meshwire-server
/// serve bundles to anyone), so a signature sent there would only hand a
/// fresh, replayable proof to whoever reads the request. The TypeScript
/// client sends one; this is the one header where meshwire differs.
pub fn fetch_bundle_request(peer: &Did) -> RequestSpec {
    RequestSpec {
        method: Method::GET,
        path: agent_path(peer, "/prekeys"),
        headers: Vec::new(),
        body: None,
    }
}

/// `GET /v1/agents/{did}` (unauthenticated).
pub fn get_agent_request(did: &Did) -> RequestSpec {
    RequestSpec {
        method: Method::GET,
        path: agent_path(did, ""),
        headers: Vec::new(),
        body: None,
    }
}

/// `DELETE /v1/agents/{did}` for the identity's own DID.
pub fn delete_agent_request(identity: &Identity, timestamp: &str) -> RequestSpec {
    authed_request(Method::DELETE, agent_path(identity.did(), ""), identity, timestamp)
}

/// `POST /v1/agents/{did}/heartbeat` for the identity's own DID (no body).
pub fn heartbeat_request(identity: &Identity, timestamp: &str) -> RequestSpec {
    authed_request(
        Method::POST,
        agent_path(identity.did(), "/heartbeat"),
        identity,
        timestamp,
    )
}

/// `GET /v1/discover?capability=...[&limit=...]` (unauthenticated).
pub fn discover_request(capability: &str, limit: Option<u32>) -> RequestSpec {
    let mut path = format!("/v1/discover?capability={}", encode_path_segment(capability));
    if let Some(limit) = limit {
        path.push_str(&format!("&limit={limit}"));
    }
    RequestSpec {
        method: Method::GET,
        path,
        headers: Vec::new(),
        body: None,
    }
}

/// How a registration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// 201: newly registered; the DID the registry assigned.
    Created(Did),
    /// 409: already registered; the DID derived locally from the key.
    AlreadyRegistered(Did),
}

impl Registration {
    /// The registered DID.
    pub fn did(&self) -> &Did {
        match self {
            Self::Created(did) | Self::AlreadyRegistered(did) => did,
        }
    }

    /// The registered DID, by value.
    pub fn into_did(self) -> Did {
        match self {
            Self::Created(did) | Self::AlreadyRegistered(did) => did,
        }
    }
}

/// The registry's answer to a pre-key upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UploadReceipt {
    /// One-time keys the registry now holds, if it said (AGT does).
    pub otk_count: Option<u64>,
}

/// `GET /v1/agents/{did}`.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRecord {
    /// The agent's DID.
    pub did: Did,
    /// Its published capabilities.
    pub capabilities: Vec<String>,
    /// Its registry metadata (unauthenticated: see `docs/SECURITY.md`).
    pub metadata: BTreeMap<String, String>,
    /// When it registered, if the registry said.
    pub registered_at: Option<Timestamp>,
    /// Its last heartbeat, if the registry said.
    pub last_seen: Option<Timestamp>,
    /// The registry's reputation score, if any.
    pub reputation_score: Option<f64>,
    /// AGT's verification tier (`"anonymous"`, `"verified"`).
    pub tier: Option<String>,
    /// Every other field of the answer, as sent.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// One `GET /v1/discover` hit.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoverResult {
    /// The agent's DID.
    pub did: Did,
    /// Its published capabilities.
    pub capabilities: Vec<String>,
    /// Its last heartbeat, if the registry said.
    pub last_seen: Option<Timestamp>,
    /// The registry's reputation score, if any.
    pub reputation_score: Option<f64>,
    /// Present only if the registry sends it (AGT 5.0.0 does not).
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct WireRegistered {
    did: String,
}

#[derive(Deserialize)]
struct WireUpload {
    #[serde(default)]
    otk_count: Option<u64>,
}

#[derive(Deserialize)]
struct WireAgent {
    did: String,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    registered_at: Option<String>,
    #[serde(default)]
    last_seen: Option<String>,
    #[serde(default)]
    reputation_score: Option<f64>,
    #[serde(default)]
    tier: Option<String>,
    #[serde(flatten)]
    extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct WireDiscover {
    results: Vec<WireDiscoverResult>,
}

#[derive(Deserialize)]
struct WireDiscoverResult {
    did: String,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    last_seen: Option<String>,
    #[serde(default)]
    reputation_score: Option<f64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct WireChallenge {
    scheme: String,
    nonce: String,
}

#[derive(Deserialize)]
struct WireHeartbeat {
    #[serde(default)]
    last_seen: Option<String>,
}

fn invalid(what: &str, err: impl fmt::Display) -> RegistryError {
    RegistryError::InvalidResponse(format!("{what}: {err}"))
}

fn parse_json<'a, T: Deserialize<'a>>(what: &str, body: &'a [u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(body).map_err(|e| invalid(what, e))
}

fn parse_did(what: &str, text: &str) -> Result<Did, RegistryError> {
    Did::parse(text).map_err(|e| invalid(what, e))
}

fn parse_timestamp(what: &str, text: Option<String>) -> Result<Option<Timestamp>, RegistryError> {
    text.map(|t| Timestamp::parse_iso(&t).map_err(|e| invalid(what, e)))
        .transpose()
}

/// A response as received: status and raw body.
struct RawResponse {
    status: u16,
    body: Vec<u8>,
    /// The `x-meshwire-challenge` nonce of the answer, if any (meshwire
    /// registries advertise challenge-bound proofs with it).
    challenge: Option<String>,
}

impl RawResponse {
    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn into_error(self) -> RegistryError {
        RegistryError::from_status(self.status, &self.body)
    }

    fn success(self) -> Result<Vec<u8>, RegistryError> {
        if self.is_success() {
            Ok(self.body)
        } else {
            Err(self.into_error())
        }
    }
}

/// Outcome of one attempt that did not produce a response.
enum AttemptError {
    /// Worth retrying: network error or timeout.
    Transient(RegistryError),
    /// Not worth retrying.
    Fatal(RegistryError),
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn classify(err: &reqwest::Error) -> AttemptError {
    if err.is_timeout() {
        AttemptError::Transient(RegistryError::Timeout)
    } else if err.is_builder() || err.is_redirect() {
        AttemptError::Fatal(RegistryError::InvalidRequest(error_chain(err)))
    } else {
        AttemptError::Transient(RegistryError::Transport(error_chain(err)))
    }
}

/// Checks a registry base URL (`http(s)://host[:port][/prefix]`, no
/// query); the error names it.
pub fn validate_base_url(base_url: &str) -> Result<(), RegistryError> {
    let url = reqwest::Url::parse(base_url)
        .map_err(|e| RegistryError::InvalidRequest(format!("base URL {base_url:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.query().is_some() {
        return Err(RegistryError::InvalidRequest(format!(
            "base URL {base_url:?} must be http(s) without a query"
        )));
    }
    Ok(())
}

/// Async client of one AgentMesh registry (possibly reached through
/// several base URLs: see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    /// The base URLs, in the order they are tried (never empty).
    bases: Arc<[Arc<str>]>,
    /// Index into `bases` of the URL in use, shared by clones.
    current: Arc<AtomicUsize>,
    options: RegistryOptions,
    /// The last proof timestamp used (ms), shared by clones: proofs get
    /// strictly increasing timestamps, so no two carry the same signature
    /// (servers accept each proof once).
    last_proof_ms: Arc<AtomicU64>,
    /// What the registry's answers said of challenge-bound proofs.
    challenge: Arc<Mutex<ChallengeState>>,
}

/// Challenge-bound proofs (docs/specs/MESHWIRE-CHALLENGE-AUTH.md) as this
/// client knows them: a meshwire registry puts a fresh nonce in every
/// answer (`x-meshwire-challenge`); AGT's never does, and then nothing
/// changes (no extra request, timestamp proofs).
#[derive(Debug, Default)]
struct ChallengeState {
    /// An answer carried a nonce: sign challenge-bound proofs.
    offered: bool,
    /// The nonce of the latest answer, unused yet.
    next: Option<String>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("bases", &self.bases)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// A client of the registry at `base_url` (`http(s)://host[:port][/prefix]`).
    pub fn new(base_url: &str, options: RegistryOptions) -> Result<Self, RegistryError> {
        Self::with_fallbacks(&[base_url], options)
    }

    /// A client of the registry reached at any of `base_urls`, tried in
    /// this order (module docs, "Failover"). Every URL is checked; the
    /// error names the first bad one, and an empty list is an error.
    ///
    /// ```
    /// use meshwire::{RegistryClient, RegistryOptions};
    /// let registry = RegistryClient::with_fallbacks(
    ///     &["http://10.0.0.1:8765", "http://10.0.0.2:8765"],
    ///     RegistryOptions::default(),
    /// )
    /// .unwrap();
    /// assert_eq!(registry.base_url(), "http://10.0.0.1:8765");
    /// assert!(RegistryClient::with_fallbacks(&["http://a", "ftp://b"], RegistryOptions::default())
    ///     .unwrap_err()
    ///     .to_string()
    ///     .contains("ftp://b"));
    /// ```
    pub fn with_fallbacks(base_urls: &[impl AsRef<str>], options: RegistryOptions) -> Result<Self, RegistryError> {
        let http = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout)
            .user_agent(concat!("meshwire/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RegistryError::InvalidRequest(error_chain(&e)))?;
        Self::build(base_urls, options, http)
    }

    /// Like [`RegistryClient::new`] with a caller-configured HTTP client
    /// (whose own timeout, if any, also applies).
    pub fn with_http_client(
        base_url: &str,
        options: RegistryOptions,
        http: reqwest::Client,
    ) -> Result<Self, RegistryError> {
        Self::build(&[base_url], options, http)
    }

    fn build(
        base_urls: &[impl AsRef<str>],
        options: RegistryOptions,
        http: reqwest::Client,
    ) -> Result<Self, RegistryError> {
        if base_urls.is_empty() {
            return Err(RegistryError::InvalidRequest("no registry base URL given".into()));
        }
        let mut bases = Vec::with_capacity(base_urls.len());
        for base_url in base_urls {
            let base_url = base_url.as_ref();
            validate_base_url(base_url)?;
            bases.push(Arc::from(base_url.trim_end_matches('/')));
        }
        Ok(Self {
            http,
            bases: bases.into(),
            current: Arc::new(AtomicUsize::new(0)),
            options,
            last_proof_ms: Arc::new(AtomicU64::new(0)),
            challenge: Arc::new(Mutex::new(ChallengeState::default())),
        })
    }

    /// The timestamp for the next proof of possession: the clock, or one
    /// millisecond after the previous proof if the clock has not moved past
    /// it. Use it for every timestamp proof signed with this client's
    /// identity (registry headers and relay `connect` frames): each
    /// signature is then distinct, and servers that accept a proof once
    /// accept them all.
    pub fn next_proof_timestamp(&self) -> Timestamp {
        let now = (self.options.clock)().0;
        let mut previous = self.last_proof_ms.load(Ordering::SeqCst);
        loop {
            let next = now.max(previous.saturating_add(1));
            match self
                .last_proof_ms
                .compare_exchange(previous, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Timestamp(next),
                Err(actual) => previous = actual,
            }
        }
    }

    /// The index into `bases` in use and its URL.
    fn current_base(&self) -> (usize, Arc<str>) {
        let index = self.current.load(Ordering::SeqCst) % self.bases.len();
        (index, self.bases[index].clone())
    }

    /// Moves on from base `from` (which just failed) to the next one,
    /// unless another call did already. A nonce the old URL issued is
    /// dropped (the next answer brings one).
    fn fail_over(&self, from: usize) {
        if self.bases.len() < 2 {
            return;
        }
        let next = (from + 1) % self.bases.len();
        if self
            .current
            .compare_exchange(from, next, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.challenge_state().next = None;
            tracing::info!(
                from = %self.bases[from],
                to = %self.bases[next],
                "registry unreachable or failing; trying the next registry URL"
            );
        }
    }

    /// Whether the registry offers challenge-bound proofs: `true` once one
    /// of its answers carried a nonce.
    pub fn challenge_offered(&self) -> bool {
        self.challenge_state().offered
    }

    fn challenge_state(&self) -> std::sync::MutexGuard<'_, ChallengeState> {
        self.challenge.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers the nonce an answer carried.
    fn learn(&self, response: &RawResponse) {
        if let Some(nonce) = &response.challenge {
            let mut state = self.challenge_state();
            state.offered = true;
            state.next = Some(nonce.clone());
        }
    }

    /// A nonce for the next challenge-bound proof: the latest answer's, or a
    /// fresh one from `GET /v1/auth/challenge`. `None` when the registry
    /// does not offer challenges (or the nonce request failed: the
    /// timestamp form is used then).
    async fn challenge_nonce(&self, base: &str) -> Option<String> {
        {
            let mut state = self.challenge_state();
            if !state.offered {
                return None;
            }
            if let Some(nonce) = state.next.take() {
                return Some(nonce);
            }
        }
        let spec = RequestSpec {
            method: Method::GET,
            path: CHALLENGE_PATH.to_owned(),
            headers: Vec::new(),
            body: None,
        };
        let answer = match self.send_once(base, &spec).await {
            Ok(answer) => answer,
            Err(AttemptError::Transient(e) | AttemptError::Fatal(e)) => {
                tracing::debug!(error = %e, "challenge nonce request failed; signing a timestamp");
                return None;
            }
        };
        answer
            .is_success()
            .then(|| serde_json::from_slice::<WireChallenge>(&answer.body).ok())
            .flatten()
            .filter(|c| c.scheme == CHALLENGE_SCHEME)
            .map(|c| c.nonce)
    }

    /// Replaces the `Ed25519-Timestamp` header of `spec` by a
    /// `Meshwire-Challenge` one when the registry offers challenges (the
    /// registration request, which no registry authenticates by header,
    /// then carries none). Whether it did.
    async fn bind_to_challenge(
        &self,
        base: &str,
        identity: &Identity,
        spec: &mut RequestSpec,
    ) -> Result<bool, RegistryError> {
        if spec.header("authorization").is_none() {
            return Ok(false);
        }
        if spec.method == Method::POST && spec.path == "/v1/agents" {
            if self.challenge_offered() {
                spec.headers.retain(|(name, _)| *name != "authorization");
            }
            return Ok(false);
        }
        let Some(nonce) = self.challenge_nonce(base).await else {
            return Ok(false);
        };
        let url = reqwest::Url::parse(&spec.url(base))
            .map_err(|e| RegistryError::InvalidRequest(format!("request URL: {e}")))?;
        let target = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        let audience =
            normalize_origin(base).map_err(|e| RegistryError::InvalidRequest(format!("registry origin: {e}")))?;
        let did = identity.did().to_string();
        let header = challenge_header(
            identity,
            &ChallengeRequest {
                audience: &audience,
                method: spec.method.as_str(),
                path: &target,
                nonce: &nonce,
                did: &did,
                body: spec.body.as_deref().unwrap_or("").as_bytes(),
            },
        )
        .map_err(|e| RegistryError::InvalidRequest(format!("challenge proof: {e}")))?;
        for (name, value) in &mut spec.headers {
            if *name == "authorization" {
                *value = header.clone();
            }
        }
        Ok(true)
    }

    /// The registry's base URL in use (the first one given until a call
    /// failed over to another).
    pub fn base_url(&self) -> &str {
        &self.bases[self.current.load(Ordering::SeqCst) % self.bases.len()]
    }

    /// Every base URL, in the order they are tried.
    pub fn base_urls(&self) -> impl Iterator<Item = &str> {
        self.bases.iter().map(|b| &**b)
    }

    /// The options this client was made with.
    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// Registers `identity`; returns the registry's DID on 201 and the
    /// locally derived DID on 409 (already registered).
    pub async fn register(
        &self,
        identity: &Identity,
        capabilities: &[String],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Did, RegistryError> {
        self.register_detailed(identity, capabilities, metadata)
            .await
            .map(Registration::into_did)
    }

    /// [`RegistryClient::register`], telling a new registration from an
    /// existing one.
    pub async fn register_detailed(
        &self,
        identity: &Identity,
        capabilities: &[String],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Registration, RegistryError> {
        let response = self
            .execute_as(Some(identity), |ts| {
                register_request(identity, capabilities, metadata, ts)
            })
            .await?;
        if response.status == 409 {
            return Ok(Registration::AlreadyRegistered(identity.did().clone()));
        }
        let body = response.success()?;
        let wire: WireRegistered = parse_json("registration answer", &body)?;
        let did = parse_did("registered DID", &wire.did)?;
        if &did != identity.did() {
            tracing::warn!(assigned = %did, derived = %identity.did(), "registry assigned a DID other than the derived one");
        }
        Ok(Registration::Created(did))
    }

    /// Uploads the signed pre-key and the one-time keys `one_time_ids`
    /// (the registry replaces whatever it held before).
    pub async fn upload_prekeys(
        &self,
        identity: &Identity,
        prekeys: &PreKeys,
        one_time_ids: &[OneTimeKeyId],
    ) -> Result<UploadReceipt, RegistryError> {
        let body = self
            .execute_as(Some(identity), |ts| {
                upload_prekeys_request(identity, prekeys, one_time_ids, ts)
            })
            .await?
            .success()?;
        // The answer is informational: AGT sends {"did", "otk_count"},
        // others {"status": "ok"} or nothing.
        let otk_count = serde_json::from_slice::<WireUpload>(&body)
            .ok()
            .and_then(|w| w.otk_count);
        Ok(UploadReceipt { otk_count })
    }

    /// Fetches `peer`'s pre-key bundle (the registry hands out, and deletes,
    /// one one-time key per fetch). The bundle is parsed, not verified:
    /// call [`PreKeyBundle::verify`].
    pub async fn fetch_bundle(&self, peer: &Did) -> Result<PreKeyBundle, RegistryError> {
        let body = self.execute(|_| Ok(fetch_bundle_request(peer))).await?.success()?;
        let text = std::str::from_utf8(&body).map_err(|e| invalid("pre-key bundle", e))?;
        PreKeyBundle::from_json(text).map_err(|e| invalid("pre-key bundle", e))
    }

    /// Looks up an agent's record.
    pub async fn get_agent(&self, did: &Did) -> Result<AgentRecord, RegistryError> {
        let body = self.execute(|_| Ok(get_agent_request(did))).await?.success()?;
        let wire: WireAgent = parse_json("agent record", &body)?;
        Ok(AgentRecord {
            did: parse_did("agent DID", &wire.did)?,
            capabilities: wire.capabilities.unwrap_or_default(),
            metadata: wire.metadata.unwrap_or_default(),
            registered_at: parse_timestamp("registered_at", wire.registered_at)?,
            last_seen: parse_timestamp("last_seen", wire.last_seen)?,
            reputation_score: wire.reputation_score,
            tier: wire.tier,
            extra: wire.extra,
        })
    }

    /// Deregisters `identity`.
    pub async fn delete_agent(&self, identity: &Identity) -> Result<(), RegistryError> {
        self.execute_as(Some(identity), |ts| Ok(delete_agent_request(identity, ts)))
            .await?
            .success()
            .map(drop)
    }

    /// Agents with `capability`, at most `limit` (AGT: 1 to 200, default 50).
    pub async fn discover(&self, capability: &str, limit: Option<u32>) -> Result<Vec<DiscoverResult>, RegistryError> {
        let body = self
            .execute(|_| Ok(discover_request(capability, limit)))
            .await?
            .success()?;
        let wire: WireDiscover = parse_json("discovery answer", &body)?;
        wire.results
            .into_iter()
            .map(|r| {
                Ok(DiscoverResult {
                    did: parse_did("discovered DID", &r.did)?,
                    capabilities: r.capabilities.unwrap_or_default(),
                    last_seen: parse_timestamp("last_seen", r.last_seen)?,
                    reputation_score: r.reputation_score,
                    metadata: r.metadata,
                })
            })
            .collect()
    }

    /// Marks `identity` as seen now; returns the registry's new `last_seen`.
    /// [`RegistryError::Throttled`] if called again within the registry's
    /// interval (AGT: 10 s).
    pub async fn heartbeat(&self, identity: &Identity) -> Result<Option<Timestamp>, RegistryError> {
        let body = self
            .execute_as(Some(identity), |ts| Ok(heartbeat_request(identity, ts)))
            .await?
            .success()?;
        let wire: WireHeartbeat = parse_json("heartbeat answer", &body)?;
        parse_timestamp("last_seen", wire.last_seen)
    }

    /// Sends the request `build` makes for the current clock reading,
    /// retrying 5xx answers and transient failures with backoff. Returns
    /// the last response (whatever its status) or the last failure.
    async fn execute<F>(&self, build: F) -> Result<RawResponse, RegistryError>
    where
        F: FnMut(&str) -> Result<RequestSpec, RegistryError>,
    {
        self.execute_as(None, build).await
    }

    /// [`RegistryClient::execute`] for requests signed by `identity`: each
    /// attempt gets a fresh proof (a new timestamp, or a new challenge
    /// nonce where the registry offers them).
    async fn execute_as<F>(&self, identity: Option<&Identity>, mut build: F) -> Result<RawResponse, RegistryError>
    where
        F: FnMut(&str) -> Result<RequestSpec, RegistryError>,
    {
        let mut attempt: u32 = 0;
        // With several URLs, each is tried at least once.
        let others = u32::try_from(self.bases.len().saturating_sub(1)).unwrap_or(u32::MAX);
        let max_retries = self.options.max_retries.max(others);
        loop {
            let (index, base) = self.current_base();
            let timestamp = self.next_proof_timestamp().to_iso();
            let mut spec = build(&timestamp)?;
            if let Some(identity) = identity {
                self.bind_to_challenge(&base, identity, &mut spec).await?;
            }
            let mut outcome = self.send_once(&base, &spec).await;
            if let Ok(response) = &outcome {
                self.learn(response);
            }
            // A registry that requires challenges refuses a timestamp proof
            // with 401 and a nonce, and a registry that restarted refuses a
            // nonce it did not issue the same way: answer once with a proof
            // bound to the fresh nonce.
            let refused_proof = spec.header("authorization").is_some()
                && matches!(&outcome, Ok(r) if r.status == 401 && r.challenge.is_some());
            if let (true, Some(identity)) = (refused_proof, identity) {
                let mut again = build(&self.next_proof_timestamp().to_iso())?;
                if self.bind_to_challenge(&base, identity, &mut again).await? {
                    outcome = self.send_once(&base, &again).await;
                    if let Ok(response) = &outcome {
                        self.learn(response);
                    }
                }
            }
            let retry = match &outcome {
                Ok(response) => response.status >= 500,
                Err(AttemptError::Transient(_)) => true,
                Err(AttemptError::Fatal(_)) => false,
            };
            if retry {
                self.fail_over(index);
            }
            if !retry || attempt >= max_retries {
                return outcome.map_err(|e| match e {
                    AttemptError::Transient(e) | AttemptError::Fatal(e) => e,
                });
            }
            // A URL not tried yet for this call goes at once; past that,
            // the backoff as with one URL.
            let delay = match attempt.checked_sub(others) {
                Some(n) => self.backoff(n),
                None => Duration::ZERO,
            };
            tracing::debug!(
                method = %spec.method,
                path = %spec.path,
                base = %base,
                attempt,
                ?delay,
                "registry request failed, retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// `base * 2^attempt`, capped, with "equal jitter": half fixed, half
    /// uniformly random.
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        let delay = self
            .options
            .base_backoff
            .saturating_mul(factor)
            .min(self.options.max_backoff);
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        let half = nanos / 2;
        let mut random = [0u8; 8];
        // Without randomness, fall back to the midpoint rather than fail.
        let random = match OsRng.try_fill_bytes(&mut random) {
            Ok(()) => u64::from_le_bytes(random),
            Err(_) => half / 2,
        };
        let jitter = random % half.saturating_add(1);
        Duration::from_nanos(half.saturating_add(jitter))
    }

    async fn send_once(&self, base: &str, spec: &RequestSpec) -> Result<RawResponse, AttemptError> {
        let mut request = self.http.request(spec.method.clone(), spec.url(base));
        for (name, value) in &spec.headers {
            request = request.header(*name, value.as_str());
        }
        if let Some(body) = &spec.body {
            request = request.body(body.clone());
        }
        let mut response = request.send().await.map_err(|e| classify(&e))?;
        let status = response.status().as_u16();
        let challenge = response
            .headers()
            .get(CHALLENGE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| classify(&e))? {
            if body.len().saturating_add(chunk.len()) > MAX_RESPONSE_BYTES {
                return Err(AttemptError::Fatal(RegistryError::InvalidResponse(format!(
                    "response body exceeds {MAX_RESPONSE_BYTES} bytes"
                ))));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(RawResponse {
            status,
            body,
            challenge,
        })
    }
}
