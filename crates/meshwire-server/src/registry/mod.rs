//! The registry: agent registration with proof of possession, pre-key
//! bundles with one-time key consumption, presence, reputation and
//! capability discovery (`agentmesh.registry` of AGT 5.0.0).

pub(crate) mod store;

use crate::challenge::{audience_ok, Service};
use crate::config::duration_ms;
use crate::http::{as_integer, json_object, ApiError, Fields, Issue};
use crate::replay::ClaimError;
use crate::server::Shared;
use crate::util::Esc;
use crate::util::{parse_iso, python_isoformat, IsoError};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::ConnectInfo;
use axum::extract::OriginalUri;
use axum::extract::{Path, Query, State};
use axum::http::header::AUTHORIZATION;
use axum::http::header::{CACHE_CONTROL, HOST, RETRY_AFTER};
use axum::http::HeaderValue;
use axum::http::Method;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use indexmap::IndexMap;
use meshwire_proto::auth::{
    verify_challenge, verify_registration_proof_within, AuthError, AuthHeader, ChallengeHeader, ChallengeRequest,
    CHALLENGE_HEADER, CHALLENGE_PATH, CHALLENGE_SCHEME,
};
use meshwire_proto::binding::check_identity_keys;
use meshwire_proto::encoding::{b64_decode, b64_url};
use meshwire_proto::identity::verify_signature;
use meshwire_proto::keys::Ed25519PublicKey;
use meshwire_proto::keys::X25519PublicKey;
use meshwire_proto::Did;
use serde::Serialize;
use serde_json::{Number, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use store::{AgentRecord, Outcome, StoredOneTimeKey, StoredSignedPreKey};

const SCHEME: &str = "Ed25519-Timestamp ";
/// `GET .../presence` reports an agent online when seen this recently.
const PRESENCE_ONLINE_MS: u64 = 90_000;
const DISCOVER_DEFAULT_LIMIT: i64 = 50;
const DISCOVER_MAX_LIMIT: i64 = 200;
const MAX_VERIFICATION_TOKEN: usize = 8192;

type Ctx = State<Arc<Shared>>;
type ApiResult<T> = Result<T, ApiError>;

/// The registry routes (without `/health`).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/agents", post(register))
        .route("/v1/agents/:did", get(get_agent).delete(deregister))
        .route("/v1/agents/:did/prekeys", put(upload_prekeys).get(fetch_prekeys))
        .route("/v1/agents/:did/presence", get(presence))
        .route("/v1/agents/:did/heartbeat", post(heartbeat))
        .route("/v1/agents/:did/reputation", post(submit_reputation))
        .route("/v1/registry/reputation/session", post(submit_session_reputation))
        .route("/v1/registry/verify", post(verify_identity))
        .route("/v1/discover", get(discover))
        .route(CHALLENGE_PATH, get(issue_challenge))
}

#[derive(Serialize)]
pub(crate) struct RegistryHealth {
    status: &'static str,
    service: &'static str,
    entra_verify_enabled: bool,
}

pub(crate) async fn health() -> Json<RegistryHealth> {
    Json(RegistryHealth {
        status: "healthy",
        service: "agentmesh-registry",
        entra_verify_enabled: false,
    })
}

fn path_did(path: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    path.map(|Path(did)| did)
        .map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))
}

fn authorization(headers: &HeaderMap) -> Option<String> {
    headers
        .get(AUTHORIZATION)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
}

fn missing_header() -> Issue {
    Issue::missing(vec![Value::from("header"), Value::from("Authorization")])
}

/// What of a request a challenge-bound proof covers.
pub(crate) struct RequestCtx<'a> {
    pub(crate) method: &'a str,
    /// Path and query exactly as received.
    pub(crate) target: &'a str,
    pub(crate) host: Option<&'a str>,
    pub(crate) body: &'a [u8],
}

impl<'a> RequestCtx<'a> {
    fn new(method: &'a Method, uri: &'a OriginalUri, headers: &'a HeaderMap, body: &'a [u8]) -> Self {
        Self {
            method: method.as_str(),
            target: uri.0.path_and_query().map_or("/", |pq| pq.as_str()),
            host: headers.get(HOST).and_then(|h| h.to_str().ok()),
            body,
        }
    }
}

fn claim_error(error: ClaimError, what: &str) -> ApiError {
    match error {
        ClaimError::Replayed => ApiError::unauthorized(format!("Proof already used: replayed {what}")),
        ClaimError::Full { .. } | ClaimError::Unavailable(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Cannot accept new proofs now ({error})"),
        ),
    }
}

/// The registered Ed25519 key of `did` (401 when unknown or legacy).
fn registered_key(shared: &Shared, did: &str) -> ApiResult<Ed25519PublicKey> {
    let agents = shared.registry.lock();
    let agent = agents
        .by_did
        .get(did)
        .ok_or_else(|| ApiError::unauthorized("Agent not registered"))?;
    // A legacy (npm 4.0.0) registration has no Ed25519 key to check against.
    agent
        .signing_key
        .ok_or_else(|| ApiError::unauthorized("Invalid signature"))
}

/// Verifies the request's `Authorization` and claims its proof in the
/// once-only memory; returns the authenticated DID. Two forms:
///
/// - `Ed25519-Timestamp <did> <iso8601> <base64url signature over
///   utf8(iso8601)>` (AGT), checks and messages in the reference's order,
///   unless [`ServerConfig::require_challenge`](crate::ServerConfig::require_challenge);
/// - `Meshwire-Challenge <did> <nonce> <audience> <signature>` (meshwire
///   extension, docs/specs/MESHWIRE-CHALLENGE-AUTH.md).
fn authenticate(shared: &Shared, header: Option<&str>, ctx: &RequestCtx<'_>) -> ApiResult<String> {
    let value = header.ok_or_else(|| ApiError::unauthorized("Missing or invalid Authorization header"))?;
    if ChallengeHeader::is_challenge(value) {
        return authenticate_challenge(shared, value, ctx);
    }
    let rest = value
        .strip_prefix(SCHEME)
        .ok_or_else(|| ApiError::unauthorized("Missing or invalid Authorization header"))?;
    if shared.config.require_challenge {
        return Err(ApiError::unauthorized(
            "Meshwire-Challenge authorization required: timestamp proofs are disabled on this registry",
        ));
    }
    let mut parts = rest.splitn(3, ' ');
    let (Some(did), Some(timestamp), Some(_signature)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(ApiError::unauthorized("Malformed Ed25519-Timestamp header"));
    };
    let ts = parse_iso(timestamp).map_err(|e| match e {
        IsoError::Invalid => ApiError::unauthorized("Invalid timestamp format"),
        IsoError::Naive => ApiError::unauthorized("Timestamp must include timezone offset"),
    })?;
    let now = shared.config.now();
    let window = shared.config.window_ms();
    if ts.abs_diff(now) > window {
        return Err(ApiError::unauthorized("Timestamp outside replay window"));
    }
    let key = registered_key(shared, did)?;
    let parsed = AuthHeader::parse(value).map_err(|_| ApiError::unauthorized("Invalid signature"))?;
    parsed
        .verify_within(&key, now, window)
        .map_err(|_| ApiError::unauthorized("Invalid signature"))?;
    shared
        .ledger
        .claim(did, &parsed.signature, ts.plus_ms(window), now)
        .map_err(|e| claim_error(e, "Ed25519-Timestamp signature"))?;
    Ok(did.to_owned())
}

fn authenticate_challenge(shared: &Shared, value: &str, ctx: &RequestCtx<'_>) -> ApiResult<String> {
    let parsed = ChallengeHeader::parse(value)
        .map_err(|e| ApiError::unauthorized(format!("Malformed Meshwire-Challenge header: {e}")))?;
    let now = shared.config.now();
    let nonce = shared
        .challenges
        .check(&parsed.nonce, now)
        .map_err(|e| ApiError::unauthorized(format!("Challenge refused: {e}")))?;
    if !audience_ok(&shared.config, Service::Registry, &parsed.audience, ctx.host) {
        return Err(ApiError::unauthorized(format!(
            "Challenge refused: audience {} is not this registry",
            Esc(&parsed.audience)
        )));
    }
    let did = parsed.did.to_string();
    let key = registered_key(shared, &did)?;
    let request = ChallengeRequest {
        audience: &parsed.audience,
        method: ctx.method,
        path: ctx.target,
        nonce: &parsed.nonce,
        did: &did,
        body: ctx.body,
    };
    verify_challenge(&key, &request, &parsed.signature)
        .map_err(|e| ApiError::unauthorized(format!("Invalid signature: {e}")))?;
    shared
        .ledger
        .claim(&did, &nonce.bytes, nonce.expires_at, now)
        .map_err(|e| claim_error(e, "challenge nonce"))?;
    Ok(did)
}

/// Adds a fresh nonce to every registry answer (`x-meshwire-challenge`):
/// a client learns from any answer that challenge-bound proofs are offered
/// and has a nonce for its next authenticated request without asking.
pub(crate) async fn advertise_challenge(
    State(shared): Ctx,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    let (nonce, _) = shared.challenges.issue(shared.config.now());
    if let Ok(value) = HeaderValue::from_str(&nonce) {
        response.headers_mut().insert(CHALLENGE_HEADER, value);
    }
    response
}

#[derive(Serialize)]
struct ChallengeView {
    scheme: &'static str,
    version: u8,
    nonce: String,
    expires_at: String,
}

/// `GET /v1/auth/challenge` (meshwire extension): a fresh nonce. Stores
/// nothing.
async fn issue_challenge(State(shared): Ctx) -> Response {
    let (nonce, expires_at) = shared.challenges.issue(shared.config.now());
    (
        [(CACHE_CONTROL, "no-store")],
        Json(ChallengeView {
            scheme: CHALLENGE_SCHEME,
            version: 1,
            nonce,
            expires_at: expires_at.to_iso(),
        }),
    )
        .into_response()
}

// ── Registration ─────────────────────────────────────────────────────

#[derive(Serialize)]
struct Registered {
    did: String,
    status: &'static str,
}

async fn register(State(shared): Ctx, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let object = json_object(body)?;
    if shared.config.legacy_registration && object.contains_key("did") && !object.contains_key("proof") {
        return legacy_register(&shared, &object);
    }
    let mut fields = Fields::new(&object);
    let public_key_b64 = fields.string("public_key");
    let proof_b64 = fields.string("proof");
    let proof_timestamp = fields.string("proof_timestamp");
    let capabilities = fields.string_list("capabilities");
    let metadata = fields.string_map("metadata");
    fields.finish()?;

    let key_bytes = b64_decode(&public_key_b64).map_err(|_| ApiError::bad_request("Invalid public_key encoding"))?;
    if key_bytes.len() != 32 {
        return Err(ApiError::bad_request("public_key must be 32 bytes"));
    }
    // The reference answers a timestamp without offset with a 500; 400 here.
    let ts = parse_iso(&proof_timestamp).map_err(|_| ApiError::bad_request("Invalid proof_timestamp"))?;
    let now = shared.config.now();
    let window = shared.config.window_ms();
    if ts.abs_diff(now) > window {
        return Err(ApiError::unauthorized("Proof timestamp outside replay window"));
    }
    let proof = b64_decode(&proof_b64).map_err(|_| ApiError::bad_request("Malformed proof"))?;
    if proof.len() != 64 {
        return Err(ApiError::bad_request("Malformed proof"));
    }
    // Signature over utf8(public_key_b64 + proof_timestamp), as sent.
    let (key, did) = verify_registration_proof_within(&public_key_b64, &proof_b64, &proof_timestamp, now, window)
        .map_err(|e| match e {
            AuthError::BadSignature => ApiError::unauthorized("Invalid proof-of-possession"),
            AuthError::Stale => ApiError::unauthorized("Proof timestamp outside replay window"),
            _ => ApiError::bad_request("Malformed proof"),
        })?;
    let did = did.to_string();

    let mut agents = shared.registry.lock();
    match agents.by_did.get(&did) {
        // Proof of possession outranks a legacy claim on the same DID.
        Some(existing) if existing.is_legacy() => {
            tracing::warn!(did = %Esc(&did), "proof-carrying registration replaces a legacy registration");
            agents.by_did.shift_remove(&did);
        }
        Some(_) => return Err(ApiError::new(StatusCode::CONFLICT, "Agent already registered")),
        None => {}
    }
    if agents.by_did.len() >= shared.config.max_agents {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Registry is full"));
    }
    // A registration proof registers once: replayed after a deregistration
    // it would bring the agent back.
    shared
        .ledger
        .claim(&did, &proof, ts.plus_ms(window), now)
        .map_err(|e| claim_error(e, "registration proof"))?;
    agents.by_did.insert(
        did.clone(),
        AgentRecord::new(did.clone(), Some(key), capabilities, metadata, now),
    );
    drop(agents);
    tracing::info!(did = %Esc(&did), "registered agent");
    Ok(registered(did))
}

/// `201 {"did", "status": "registered"}`.
fn registered(did: String) -> Response {
    (
        StatusCode::CREATED,
        Json(Registered {
            did,
            status: "registered",
        }),
    )
        .into_response()
}

/// npm SDK 4.0.0: `{did, public_key (X25519), capabilities, metadata}`,
/// no proof. Only with `ServerConfig::legacy_registration`.
fn legacy_register(shared: &Shared, object: &crate::http::RawObject) -> ApiResult<Response> {
    let mut fields = Fields::new(object);
    let did = fields.string("did");
    let public_key_b64 = fields.string("public_key");
    let capabilities = fields.string_list("capabilities");
    let metadata = fields.string_map("metadata");
    fields.finish()?;
    let did = Did::parse(&did).map_err(|e| ApiError::bad_request(format!("Invalid did: {e}")))?;
    let key = b64_decode(&public_key_b64).map_err(|_| ApiError::bad_request("Invalid public_key encoding"))?;
    if key.len() != 32 {
        return Err(ApiError::bad_request("public_key must be 32 bytes"));
    }
    let did = did.to_string();
    let now = shared.config.now();
    let mut agents = shared.registry.lock();
    if agents.by_did.contains_key(&did) {
        return Err(ApiError::new(StatusCode::CONFLICT, "Agent already registered"));
    }
    if agents.by_did.len() >= shared.config.max_agents {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Registry is full"));
    }
    agents.by_did.insert(
        did.clone(),
        AgentRecord::new(did.clone(), None, capabilities, metadata, now),
    );
    drop(agents);
    tracing::warn!(did = %Esc(&did), "registered agent WITHOUT proof of possession (legacy compat mode)");
    Ok(registered(did))
}

#[derive(Serialize)]
struct AgentView {
    did: String,
    capabilities: Vec<String>,
    metadata: IndexMap<String, String>,
    registered_at: String,
    last_seen: String,
    reputation_score: f64,
    total_sessions: u64,
    successful_sessions: u64,
    failed_sessions: u64,
    timeout_sessions: u64,
    last_session_at: Option<String>,
    completion_rate: Option<f64>,
    tier: &'static str,
    verified_app_id: Option<String>,
    verified_tenant_id: Option<String>,
    verified_at: Option<String>,
    /// meshwire extension: one-time pre-keys the registry holds for the
    /// agent (AGT 5.0.0 reports it only in the upload answer), so the agent
    /// can refill before they run out.
    otk_count: usize,
    /// meshwire extension: the id of the signed pre-key served in bundles,
    /// `null` before the first upload.
    signed_pre_key_id: Option<Number>,
    /// meshwire extension: the id of the signed pre-key a rotation replaced,
    /// while the registry retains it (14 days, AGT spec 6.2).
    previous_signed_pre_key_id: Option<Number>,
}

async fn get_agent(State(shared): Ctx, path: Result<Path<String>, PathRejection>) -> ApiResult<Json<AgentView>> {
    let did = path_did(path)?;
    let now = shared.config.now();
    let mut agents = shared.registry.lock();
    let a = agents
        .by_did
        .get_mut(&did)
        .ok_or_else(|| ApiError::not_found("Agent not found"))?;
    a.forget_expired_signed_pre_key(now);
    Ok(Json(AgentView {
        did: a.did.clone(),
        capabilities: a.capabilities.clone(),
        metadata: a.metadata.clone(),
        registered_at: python_isoformat(a.registered_at),
        last_seen: python_isoformat(a.last_seen),
        reputation_score: a.reputation_score,
        total_sessions: a.total_sessions,
        successful_sessions: a.successful_sessions,
        failed_sessions: a.failed_sessions,
        timeout_sessions: a.timeout_sessions,
        last_session_at: a.last_session_at.map(python_isoformat),
        completion_rate: (a.total_sessions > 0).then(|| a.successful_sessions as f64 / a.total_sessions as f64),
        tier: "anonymous",
        verified_app_id: None,
        verified_tenant_id: None,
        verified_at: None,
        otk_count: a.one_time_pre_keys.len(),
        signed_pre_key_id: a.signed_pre_key.as_ref().map(|k| k.key_id.clone()),
        previous_signed_pre_key_id: a.previous_signed_pre_key.as_ref().map(|(k, _)| k.key_id.clone()),
    }))
}

async fn deregister(
    State(shared): Ctx,
    method: Method,
    uri: OriginalUri,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let did = path_did(path)?;
    let header = authorization(&headers).ok_or_else(|| ApiError::unprocessable(vec![missing_header()]))?;
    let authed = authenticate(&shared, Some(&header), &RequestCtx::new(&method, &uri, &headers, b""))?;
    if authed != did {
        return Err(ApiError::forbidden("DID mismatch"));
    }
    if shared.registry.lock().by_did.shift_remove(&did).is_none() {
        return Err(ApiError::not_found("Agent not found"));
    }
    tracing::info!(did = %Esc(&did), "deregistered agent");
    Ok(StatusCode::NO_CONTENT)
}

// ── Pre-keys ─────────────────────────────────────────────────────────

#[derive(Serialize)]
struct PreKeysUploaded {
    did: String,
    otk_count: usize,
}

/// Longest `key_id` accepted (digits of the JSON number), so ids cannot
/// carry bulk data.
const MAX_KEY_ID: u64 = u32::MAX as u64;

/// A pre-key upload was refused. Its Display is the response's detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UploadError {
    /// A field is malformed (400).
    #[error("Invalid pre-key bundle: {0}")]
    Invalid(String),
    /// The identity keys are not the registered agent's (403).
    #[error("Invalid pre-key bundle: {field} is not the registered identity key of this agent ({reason})")]
    NotTheAgentsKey {
        field: &'static str,
        reason: meshwire_proto::BindingError,
    },
    /// The signed pre-key's signature does not verify under the agent's
    /// registered key (400).
    #[error("Invalid pre-key bundle: signed_pre_key.signature does not verify under the agent's identity key")]
    BadSignedPreKeySignature,
}

impl From<UploadError> for ApiError {
    fn from(error: UploadError) -> Self {
        match error {
            UploadError::NotTheAgentsKey { .. } => ApiError::forbidden(error.to_string()),
            _ => ApiError::bad_request(error.to_string()),
        }
    }
}

fn bundle_error(detail: impl std::fmt::Display) -> UploadError {
    UploadError::Invalid(detail.to_string())
}

fn decode_exact<const N: usize>(field: &str, text: &str) -> Result<[u8; N], UploadError> {
    let bytes = b64_decode(text).map_err(|_| bundle_error(format!("{field} is not valid base64")))?;
    <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| bundle_error(format!("{field} must be {N} bytes")))
}

fn key_id(field: &str, value: Option<&Value>) -> Result<Number, UploadError> {
    let value = value.ok_or_else(|| bundle_error(format!("'{}'", field.rsplit('.').next().unwrap_or(field))))?;
    let id = as_integer(value).ok_or_else(|| bundle_error(format!("{field} must be an integer")))?;
    match id.as_u64() {
        Some(n) if n <= MAX_KEY_ID => Ok(id),
        _ => Err(bundle_error(format!("{field} must be between 0 and {MAX_KEY_ID}"))),
    }
}

fn only_fields(object: &IndexMap<String, Value>, allowed: &[&str], what: &str) -> Result<(), UploadError> {
    match object.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(bundle_error(format!(
            "{what} has unknown field '{}' (allowed: {})",
            Esc(unknown),
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

fn spk_string<'a>(spk: &'a IndexMap<String, Value>, name: &str) -> Result<&'a str, UploadError> {
    match spk.get(name) {
        None => Err(bundle_error(format!("'{name}'"))),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(bundle_error(format!("signed_pre_key.{name} must be a string"))),
    }
}

/// A checked upload, ready to store.
struct CheckedUpload {
    identity_key: [u8; 32],
    identity_key_ed: Option<[u8; 32]>,
    signed_pre_key: StoredSignedPreKey,
    one_time_pre_keys: VecDeque<StoredOneTimeKey>,
}

/// Parses and checks an upload against the agent's registered key
/// (`None` for a legacy registration, which has none). Pure.
fn check_upload(
    did: &str,
    registered: Option<&Ed25519PublicKey>,
    identity_key: &str,
    identity_key_ed: Option<&str>,
    spk: &IndexMap<String, Value>,
    otks: &[IndexMap<String, Value>],
    max_one_time_keys: usize,
) -> Result<CheckedUpload, UploadError> {
    let identity_key = decode_exact::<32>("identity_key", identity_key)?;
    let identity_key_ed = match identity_key_ed {
        None | Some("") => None,
        Some(text) => Some(
            b64_decode(text)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .ok_or_else(|| bundle_error("400: identity_key_ed must be exactly 32 bytes (Ed25519 public key)"))?,
        ),
    };
    only_fields(spk, &["key_id", "public_key", "signature"], "signed_pre_key")?;
    let spk_public = spk_string(spk, "public_key")?;
    let spk_signature = spk_string(spk, "signature")?;
    let signed_pre_key = StoredSignedPreKey {
        key_id: key_id("signed_pre_key.key_id", spk.get("key_id"))?,
        public_key: decode_exact::<32>("signed_pre_key.public_key", spk_public)?,
        signature: decode_exact::<64>("signed_pre_key.signature", spk_signature)?,
    };
    if otks.len() > max_one_time_keys {
        return Err(bundle_error(format!(
            "too many one_time_pre_keys ({}, at most {max_one_time_keys})",
            otks.len()
        )));
    }
    let mut one_time_pre_keys = VecDeque::with_capacity(otks.len());
    for (i, otk) in otks.iter().enumerate() {
        only_fields(otk, &["key_id", "public_key"], &format!("one_time_pre_keys[{i}]"))?;
        let key_id = key_id(&format!("one_time_pre_keys[{i}].key_id"), otk.get("key_id"))?;
        let Some(Value::String(public_key)) = otk.get("public_key") else {
            return Err(bundle_error(format!(
                "one_time_pre_keys[{i}].public_key must be a string"
            )));
        };
        let public_key = decode_exact::<32>(&format!("one_time_pre_keys[{i}].public_key"), public_key)?;
        one_time_pre_keys.push_back(StoredOneTimeKey { key_id, public_key });
    }

    // The keys must be the registered agent's: its Ed25519 key, whose
    // Montgomery image is the X25519 identity key, and a signed pre-key
    // signed by it. (A legacy registration has no key to compare with.)
    if let Some(registered) = registered {
        let did = Did::parse(did).map_err(|e| bundle_error(format!("agent DID: {e}")))?;
        if let Some(ed) = identity_key_ed {
            let ed = Ed25519PublicKey::from_bytes(ed);
            if ed != *registered {
                return Err(UploadError::NotTheAgentsKey {
                    field: "identity_key_ed",
                    reason: meshwire_proto::BindingError::DidMismatch,
                });
            }
        }
        let x = X25519PublicKey::from_bytes(identity_key);
        check_identity_keys(&did, registered, &x).map_err(|reason| UploadError::NotTheAgentsKey {
            field: "identity_key",
            reason,
        })?;
        verify_signature(registered, &signed_pre_key.public_key, &signed_pre_key.signature)
            .map_err(|_| UploadError::BadSignedPreKeySignature)?;
    }
    Ok(CheckedUpload {
        identity_key,
        identity_key_ed,
        signed_pre_key,
        one_time_pre_keys,
    })
}

async fn upload_prekeys(
    State(shared): Ctx,
    method: Method,
    uri: OriginalUri,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<PreKeysUploaded>> {
    let did = path_did(path)?;
    let header = authorization(&headers);
    let raw = body.as_ref().map(Bytes::clone).unwrap_or_default();
    // Request validation first (FastAPI validates body and headers before
    // the handler runs); collect body and header problems together.
    let object = json_object(body)?;
    let legacy_unauthenticated = shared.config.legacy_registration
        && shared
            .registry
            .lock()
            .by_did
            .get(&did)
            .is_some_and(AgentRecord::is_legacy);
    let mut fields = Fields::new(&object);
    let identity_key = fields.string("identity_key");
    let identity_key_ed = fields.optional_string("identity_key_ed");
    let spk = fields.object("signed_pre_key");
    let otks = fields.object_list("one_time_pre_keys");
    if header.is_none() && !legacy_unauthenticated {
        fields.issues.push(missing_header());
    }
    fields.finish()?;

    let registered = {
        let agents = shared.registry.lock();
        let agent = agents
            .by_did
            .get(&did)
            .ok_or_else(|| ApiError::not_found("Agent not found"))?;
        agent.signing_key
    };
    if !legacy_unauthenticated {
        let ctx = RequestCtx::new(&method, &uri, &headers, &raw);
        let authed = authenticate(&shared, header.as_deref(), &ctx)?;
        if authed != did {
            return Err(ApiError::forbidden("DID mismatch"));
        }
    }

    // Validate everything before touching the record (the reference
    // assigns field by field and can leave a half-updated bundle).
    let checked = check_upload(
        &did,
        registered.as_ref(),
        &identity_key,
        identity_key_ed.as_deref(),
        &spk,
        &otks,
        shared.config.max_one_time_keys,
    )
    .inspect_err(|e| tracing::warn!(did = %Esc(&did), error = %e, "pre-key upload refused"))?;

    let now = shared.config.now();
    let retention = duration_ms(shared.config.signed_pre_key_retention);
    let mut agents = shared.registry.lock();
    let agent = agents
        .by_did
        .get_mut(&did)
        .ok_or_else(|| ApiError::not_found("Agent not found"))?;
    agent.identity_key = Some(checked.identity_key);
    if checked.identity_key_ed.is_some() {
        agent.identity_key_ed = checked.identity_key_ed;
    }
    agent.install_signed_pre_key(checked.signed_pre_key, now, retention);
    agent.one_time_pre_keys = checked.one_time_pre_keys;
    let otk_count = agent.one_time_pre_keys.len();
    drop(agents);
    Ok(Json(PreKeysUploaded { did, otk_count }))
}

#[derive(Serialize)]
struct SignedPreKeyView {
    key_id: Number,
    public_key: String,
    signature: String,
}

#[derive(Serialize)]
struct OneTimeKeyView {
    key_id: Number,
    public_key: String,
}

#[derive(Serialize)]
struct BundleView {
    identity_key: String,
    identity_key_ed: Option<String>,
    signed_pre_key: SignedPreKeyView,
    one_time_pre_key: Option<OneTimeKeyView>,
}

/// Who a bundle fetch counts against: the DID of a valid `Authorization`
/// header (whose proof is then used up), else the peer IP; `None` when
/// neither is known (a router served without connect info) or the peer is
/// loopback and [`ServerConfig::rate_limit_loopback`](crate::ServerConfig::rate_limit_loopback)
/// is off, which is not limited.
fn requester(shared: &Shared, headers: &HeaderMap, ctx: &RequestCtx<'_>, peer: Option<SocketAddr>) -> Option<String> {
    if let Some(header) = authorization(headers) {
        if let Ok(did) = authenticate(shared, Some(&header), ctx) {
            return Some(format!("did {did}"));
        }
    }
    peer.filter(|addr| shared.config.rate_limit_loopback || !addr.ip().is_loopback())
        .map(|addr| format!("ip {}", addr.ip()))
}

/// Serves the bundle and consumes one one-time key, both under one lock:
/// each uploaded one-time key goes to exactly one caller. Rate-limited per
/// requester ([`ServerConfig::bundle_fetches_per_minute`](crate::ServerConfig::bundle_fetches_per_minute)).
async fn fetch_prekeys(
    State(shared): Ctx,
    method: Method,
    uri: OriginalUri,
    peer: Option<ConnectInfo<SocketAddr>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let did = path_did(path)?;
    let ctx = RequestCtx::new(&method, &uri, &headers, b"");
    let who = requester(&shared, &headers, &ctx, peer.map(|ConnectInfo(addr)| addr));
    let now = shared.config.now();
    if let Err(retry_after) = who
        .as_deref()
        .map_or(Ok(()), |who| shared.bundle_limiter.take(who, now))
    {
        tracing::info!(requester = %Esc(who.as_deref().unwrap_or("")), "bundle fetch rate-limited");
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("Too many pre-key bundle fetches; retry after {retry_after} s"),
        )
        .into_response();
        if let Ok(value) = HeaderValue::from_str(&retry_after.to_string()) {
            response.headers_mut().insert(RETRY_AFTER, value);
        }
        return Ok(response);
    }
    let mut agents = shared.registry.lock();
    let not_found = || ApiError::not_found("Pre-key bundle not found");
    let agent = agents.by_did.get_mut(&did).ok_or_else(not_found)?;
    agent.forget_expired_signed_pre_key(now);
    let spk = agent.signed_pre_key.clone().ok_or_else(not_found)?;
    let one_time_pre_key = agent.one_time_pre_keys.pop_front();
    let view = BundleView {
        identity_key: agent.identity_key.map(|k| b64_url(&k)).unwrap_or_default(),
        identity_key_ed: agent.identity_key_ed.map(|k| b64_url(&k)),
        signed_pre_key: SignedPreKeyView {
            key_id: spk.key_id,
            public_key: b64_url(&spk.public_key),
            signature: b64_url(&spk.signature),
        },
        one_time_pre_key: one_time_pre_key.map(|k| OneTimeKeyView {
            key_id: k.key_id,
            public_key: b64_url(&k.public_key),
        }),
    };
    let remaining = agent.one_time_pre_keys.len();
    drop(agents);
    if view.one_time_pre_key.is_none() {
        tracing::info!(did = %Esc(&did), "bundle served without a one-time key (none left)");
    }
    tracing::debug!(did = %Esc(&did), remaining, "bundle served");
    Ok(Json(view).into_response())
}

// ── Presence ─────────────────────────────────────────────────────────

#[derive(Serialize)]
struct PresenceView {
    did: String,
    last_seen: String,
    online: bool,
}

async fn presence(State(shared): Ctx, path: Result<Path<String>, PathRejection>) -> ApiResult<Json<PresenceView>> {
    let did = path_did(path)?;
    let now = shared.config.now();
    let agents = shared.registry.lock();
    let agent = agents
        .by_did
        .get(&did)
        .ok_or_else(|| ApiError::not_found("Agent not found"))?;
    Ok(Json(PresenceView {
        did: agent.did.clone(),
        last_seen: python_isoformat(agent.last_seen),
        // Python: (now - last_seen) < 90 s; a last_seen in the future counts as online.
        online: now.0 < agent.last_seen.0.saturating_add(PRESENCE_ONLINE_MS),
    }))
}

#[derive(Serialize)]
struct HeartbeatView {
    did: String,
    last_seen: Option<String>,
}

async fn heartbeat(
    State(shared): Ctx,
    method: Method,
    uri: OriginalUri,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Json<HeartbeatView>> {
    let did = path_did(path)?;
    let ctx = RequestCtx::new(&method, &uri, &headers, b"");
    let authed = authenticate(&shared, authorization(&headers).as_deref(), &ctx)?;
    if authed != did {
        return Err(ApiError::forbidden("Authenticated DID does not match heartbeat target"));
    }
    let now = shared.config.now();
    let min_interval = duration_ms(shared.config.heartbeat_min_interval);
    let mut agents = shared.registry.lock();
    let agent = agents
        .by_did
        .get_mut(&did)
        .ok_or_else(|| ApiError::not_found("Agent not found"))?;
    if let Some(last) = agent.last_heartbeat {
        // Python: elapsed < min_interval (a clock that went back throttles too).
        if now.0 < last.0.saturating_add(min_interval) {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "Heartbeat throttled; retry after 10s",
            ));
        }
    }
    agent.last_seen = now;
    agent.last_heartbeat = Some(now);
    Ok(Json(HeartbeatView {
        did,
        last_seen: Some(python_isoformat(now)),
    }))
}

// ── Reputation ───────────────────────────────────────────────────────

#[derive(Serialize)]
struct ReputationView {
    did: String,
    reputation_score: f64,
}

async fn submit_reputation(
    State(shared): Ctx,
    method: Method,
    uri: OriginalUri,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ReputationView>> {
    let did = path_did(path)?;
    let raw = body.as_ref().map(Bytes::clone).unwrap_or_default();
    let object = json_object(body)?;
    let mut fields = Fields::new(&object);
    let score = fields.float("score");
    let _reason = fields.string_or("reason", "");
    if fields.issues.is_empty() {
        if score < 0.0 {
            fields.issues.push(
                Issue::new(
                    "greater_than_equal",
                    vec![Value::from("body"), Value::from("score")],
                    "Input should be greater than or equal to 0",
                    fields.raw("score"),
                )
                .with_ctx(serde_json::json!({"ge": 0.0})),
            );
        } else if score > 1.0 {
            fields.issues.push(
                Issue::new(
                    "less_than_equal",
                    vec![Value::from("body"), Value::from("score")],
                    "Input should be less than or equal to 1",
                    fields.raw("score"),
                )
                .with_ctx(serde_json::json!({"le": 1.0})),
            );
        }
    }
    fields.finish()?;
    let ctx = RequestCtx::new(&method, &uri, &headers, &raw);
    let authed = authenticate(&shared, authorization(&headers).as_deref(), &ctx)?;
    if authed == did {
        return Err(ApiError::forbidden("Agents may not submit reputation about themselves"));
    }
    let bucket = if score >= 0.7 {
        Outcome::Success
    } else if score < 0.3 {
        Outcome::Failed
    } else {
        Outcome::Timeout
    };
    let now = shared.config.now();
    let new_score = shared
        .registry
        .lock()
        .apply_reputation(&did, score, 0.3, Some(bucket), now)
        .ok_or_else(|| ApiError::not_found("Agent not found"))?;
    Ok(Json(ReputationView {
        did,
        reputation_score: new_score,
    }))
}

#[derive(Serialize)]
struct SessionReputationView {
    session_id: String,
    outcome: String,
    reputation: IndexMap<String, f64>,
}

async fn submit_session_reputation(
    State(shared): Ctx,
    method: Method,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<SessionReputationView>> {
    let raw = body.as_ref().map(Bytes::clone).unwrap_or_default();
    let object = json_object(body)?;
    let mut fields = Fields::new(&object);
    let session_id = fields.string("session_id");
    let initiator = fields.string("initiator_amid");
    let receiver = fields.string("receiver_amid");
    let _intent = fields.string_or("intent", "");
    let raw_outcome = fields.string("outcome");
    let _started_at = fields.string_or("started_at", "");
    let reporter = fields.string("reporter_amid");
    let _timestamp = fields.string_or("timestamp", "");
    let _signature = fields.string_or("signature", "");
    fields.finish()?;

    let ctx = RequestCtx::new(&method, &uri, &headers, &raw);
    let authed = authenticate(&shared, authorization(&headers).as_deref(), &ctx)?;
    if authed != reporter {
        return Err(ApiError::forbidden("reporter_amid does not match authenticated DID"));
    }
    if reporter != initiator && reporter != receiver {
        return Err(ApiError::forbidden("reporter_amid must be a session participant"));
    }
    let now = shared.config.now();
    let mut agents = shared.registry.lock();
    if !agents.by_did.contains_key(&reporter) {
        return Err(ApiError::forbidden("reporter_amid is not a registered agent"));
    }
    let outcome = raw_outcome.to_lowercase();
    let (bucket, targets): (Outcome, Vec<(&str, f64)>) = match outcome.as_str() {
        "success" => (Outcome::Success, vec![(&receiver, 1.0), (&initiator, 1.0)]),
        "failed" => (Outcome::Failed, vec![(&receiver, 0.0)]),
        "timeout" => (Outcome::Timeout, vec![(&receiver, 0.2)]),
        _ => {
            return Err(ApiError::bad_request(format!(
                "Invalid outcome '{raw_outcome}' (expected success|failed|timeout)"
            )))
        }
    };
    let mut reputation = IndexMap::new();
    for (did, target) in targets {
        if let Some(score) = agents.apply_reputation(did, target, 0.2, Some(bucket), now) {
            reputation.insert(did.to_owned(), score);
        }
    }
    drop(agents);
    Ok(Json(SessionReputationView {
        session_id,
        outcome,
        reputation,
    }))
}

/// Entra identity verification is not supported: like a reference registry
/// deployed without the Entra settings, known agents get 503.
async fn verify_identity(State(shared): Ctx, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let object = json_object(body)?;
    let mut fields = Fields::new(&object);
    let amid = fields.string("amid");
    let token = fields.string("verification_token");
    if token.chars().count() > MAX_VERIFICATION_TOKEN {
        fields.issues.push(
            Issue::new(
                "string_too_long",
                vec![Value::from("body"), Value::from("verification_token")],
                format!("String should have at most {MAX_VERIFICATION_TOKEN} characters"),
                Value::from(token),
            )
            .with_ctx(serde_json::json!({"max_length": MAX_VERIFICATION_TOKEN})),
        );
    }
    fields.finish()?;
    let agents = shared.registry.lock();
    let known = agents.by_did.contains_key(&amid)
        || (!amid.starts_with("did:")
            && b64_decode(&amid).is_ok_and(|key| {
                agents.by_did.values().any(|a| {
                    a.identity_key.is_some_and(|k| k[..] == key[..])
                        || a.identity_key_ed.is_some_and(|k| k[..] == key[..])
                })
            }));
    drop(agents);
    if !known {
        return Err(ApiError::not_found("Agent not registered"));
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Entra verification not configured on this registry",
    ))
}

// ── Discovery ────────────────────────────────────────────────────────

#[derive(Serialize)]
struct DiscoverResult {
    did: String,
    capabilities: Vec<String>,
    reputation_score: f64,
    last_seen: String,
    /// Not in the reference's results; an extension clients may use.
    metadata: IndexMap<String, String>,
}

#[derive(Serialize)]
struct DiscoverView {
    results: Vec<DiscoverResult>,
    total: usize,
}

fn query_issue(kind: &'static str, msg: impl Into<String>, input: &str) -> Issue {
    Issue::new(
        kind,
        vec![Value::from("query"), Value::from("limit")],
        msg,
        Value::from(input),
    )
}

async fn discover(
    State(shared): Ctx,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<DiscoverView>> {
    let Query(pairs) = query.map_err(|rejection| {
        ApiError::unprocessable(vec![Issue::new(
            "query_invalid",
            vec![Value::from("query")],
            rejection.body_text(),
            Value::Null,
        )])
    })?;
    // FastAPI takes the last value of a repeated scalar parameter.
    let lookup = |name: &str| pairs.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let mut issues = Vec::new();
    let capability = lookup("capability");
    if capability.is_none() {
        issues.push(Issue::missing(vec![Value::from("query"), Value::from("capability")]));
    }
    let limit = match lookup("limit") {
        None => DISCOVER_DEFAULT_LIMIT,
        Some(text) => match text.trim().parse::<i64>() {
            Err(_) => {
                issues.push(query_issue(
                    "int_parsing",
                    "Input should be a valid integer, unable to parse string as an integer",
                    text,
                ));
                DISCOVER_DEFAULT_LIMIT
            }
            Ok(n) if n < 1 => {
                issues.push(
                    query_issue("greater_than_equal", "Input should be greater than or equal to 1", text)
                        .with_ctx(serde_json::json!({"ge": 1})),
                );
                DISCOVER_DEFAULT_LIMIT
            }
            Ok(n) if n > DISCOVER_MAX_LIMIT => {
                issues.push(
                    query_issue("less_than_equal", "Input should be less than or equal to 200", text)
                        .with_ctx(serde_json::json!({"le": DISCOVER_MAX_LIMIT})),
                );
                DISCOVER_DEFAULT_LIMIT
            }
            Ok(n) => n,
        },
    };
    let (Some(capability), true) = (capability, issues.is_empty()) else {
        return Err(ApiError::unprocessable(issues));
    };
    let limit = usize::try_from(limit).unwrap_or(0);
    let agents = shared.registry.lock();
    let results: Vec<DiscoverResult> = agents
        .by_did
        .values()
        .filter(|a| a.capabilities.iter().any(|c| c == capability))
        .take(limit)
        .map(|a| DiscoverResult {
            did: a.did.clone(),
            capabilities: a.capabilities.clone(),
            reputation_score: a.reputation_score,
            last_seen: python_isoformat(a.last_seen),
            metadata: a.metadata.clone(),
        })
        .collect();
    drop(agents);
    let total = results.len();
    Ok(Json(DiscoverView { results, total }))
}
