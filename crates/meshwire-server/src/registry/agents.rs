//! Agent records over HTTP: registration (with proof of possession, or the
//! legacy npm 4.0.0 body), reading a record, deregistration.

use super::auth::{authenticate, authorization, claim_error};
use super::store::{forget_expired_signed_pre_key, unavailable};
use super::{missing_header, path_did, rate_limited, requester, Ctx, RequestCtx};
use crate::config::duration_ms;
use crate::http::{clip, json_object, ApiError, Fields, RawObject};
use crate::server::Shared;
use crate::storage::{AgentRecord, Created};
use crate::util::{parse_iso, python_isoformat, Esc};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, OriginalUri, Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use indexmap::IndexMap;
use meshwire_proto::auth::{verify_registration_proof_within, AuthError};
use meshwire_proto::encoding::b64_decode;
use meshwire_proto::Did;
use serde::Serialize;
use serde_json::Number;
use std::net::SocketAddr;

#[derive(Serialize)]
struct Registered {
    did: String,
    status: &'static str,
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

fn max_agents(shared: &Shared) -> u64 {
    u64::try_from(shared.config.max_agents).unwrap_or(u64::MAX)
}

/// Stores a new record: 409 if the DID exists, 503 when full.
async fn create(shared: &Shared, record: AgentRecord) -> Result<(), ApiError> {
    let created = shared
        .registry
        .store()
        .create_agent(record, max_agents(shared))
        .await
        .map_err(unavailable)?;
    shared.registry.refresh().await;
    match created {
        Created::Created => Ok(()),
        Created::Exists => Err(ApiError::new(StatusCode::CONFLICT, "Agent already registered")),
        Created::Full => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Registry is full")),
    }
}

/// 503 when the registry already holds `max_agents` (checked before a
/// proof is claimed, so a full registry does not use proofs up).
async fn check_room(shared: &Shared) -> Result<(), ApiError> {
    let count = shared.registry.store().agent_count().await.map_err(unavailable)?;
    if count >= max_agents(shared) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Registry is full"));
    }
    Ok(())
}

/// The fields a registration body may carry: AGT's `RegisterAgentRequest`,
/// plus `did` (npm 4.0.0 sends it; ignored when a proof is present).
const REGISTRATION_FIELDS: &[&str] = &[
    "public_key",
    "proof",
    "proof_timestamp",
    "capabilities",
    "metadata",
    "did",
];

/// Refuses (400) a registration with a field outside the protocol's, or
/// capabilities or metadata over the configured limits; counted as
/// `meshwire_limit_refusals_total{limit="registration"}`.
fn check_registration(
    shared: &Shared,
    object: &RawObject,
    capabilities: &[String],
    metadata: &IndexMap<String, String>,
) -> Result<(), ApiError> {
    let config = &shared.config;
    let max = config.max_registration_string_bytes;
    let problem = if let Some(unknown) = object.keys().find(|k| !REGISTRATION_FIELDS.contains(&k.as_str())) {
        Some(format!(
            "unknown field '{}' (allowed: {})",
            Esc(&clip(unknown, 64)),
            REGISTRATION_FIELDS.join(", ")
        ))
    } else if capabilities.len() > config.max_capabilities {
        Some(format!(
            "too many capabilities ({}, at most {})",
            capabilities.len(),
            config.max_capabilities
        ))
    } else if metadata.len() > config.max_metadata_entries {
        Some(format!(
            "too many metadata entries ({}, at most {})",
            metadata.len(),
            config.max_metadata_entries
        ))
    } else if capabilities.iter().any(|c| c.len() > max) {
        Some(format!("a capability is longer than {max} bytes"))
    } else if metadata.iter().any(|(k, v)| k.len() > max || v.len() > max) {
        Some(format!("a metadata key or value is longer than {max} bytes"))
    } else {
        None
    };
    match problem {
        Some(problem) => {
            shared.metrics.limit_refused("registration");
            Err(ApiError::bad_request(format!("Invalid registration: {problem}")))
        }
        None => Ok(()),
    }
}

/// `POST /v1/agents`. Rate-limited per peer IP
/// ([`ServerConfig::registrations_per_minute`](crate::ServerConfig::registrations_per_minute)),
/// before anything else is done with the request.
pub(crate) async fn register(
    State(shared): Ctx,
    peer: Option<ConnectInfo<SocketAddr>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // A registrant has no identity yet: registrations count against the IP.
    let who = requester(&shared, None, peer.map(|ConnectInfo(addr)| addr)).await;
    if let Some(refused) = rate_limited(&shared, &shared.registration_limiter, who.as_deref(), "registrations") {
        return Ok(refused);
    }
    let object = json_object(body)?;
    if shared.config.legacy_registration && object.contains_key("did") && !object.contains_key("proof") {
        return legacy_register(&shared, &object).await;
    }
    let mut fields = Fields::new(&object);
    let public_key_b64 = fields.string("public_key");
    let proof_b64 = fields.string("proof");
    let proof_timestamp = fields.string("proof_timestamp");
    let capabilities = fields.string_list("capabilities");
    let metadata = fields.string_map("metadata");
    fields.finish()?;
    check_registration(&shared, &object, &capabilities, &metadata)?;

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

    match shared.registry.get(&did).await? {
        // Proof of possession outranks a legacy claim on the same DID.
        Some(existing) if existing.signing_key.is_none() => {
            tracing::warn!(did = %Esc(&did), "proof-carrying registration replaces a legacy registration");
            shared.registry.store().delete_agent(&did).await.map_err(unavailable)?;
        }
        Some(_) => return Err(ApiError::new(StatusCode::CONFLICT, "Agent already registered")),
        None => {}
    }
    check_room(&shared).await?;
    // A registration proof registers once: replayed after a deregistration
    // it would bring the agent back.
    shared
        .ledger
        .claim(&did, &proof, ts.plus_ms(window), now)
        .map_err(|e| claim_error(e, "registration proof"))?;
    let record = AgentRecord::new(did.clone(), Some(*key.as_bytes()), capabilities, metadata, now);
    create(&shared, record).await?;
    tracing::info!(did = %Esc(&did), "registered agent");
    Ok(registered(did))
}

/// npm SDK 4.0.0: `{did, public_key (X25519), capabilities, metadata}`,
/// no proof. Only with `ServerConfig::legacy_registration`.
async fn legacy_register(shared: &Shared, object: &RawObject) -> Result<Response, ApiError> {
    let mut fields = Fields::new(object);
    let did = fields.string("did");
    let public_key_b64 = fields.string("public_key");
    let capabilities = fields.string_list("capabilities");
    let metadata = fields.string_map("metadata");
    fields.finish()?;
    check_registration(shared, object, &capabilities, &metadata)?;
    let did = Did::parse(&did).map_err(|e| ApiError::bad_request(format!("Invalid did: {e}")))?;
    let key = b64_decode(&public_key_b64).map_err(|_| ApiError::bad_request("Invalid public_key encoding"))?;
    if key.len() != 32 {
        return Err(ApiError::bad_request("public_key must be 32 bytes"));
    }
    let did = did.to_string();
    let now = shared.config.now();
    let record = AgentRecord::new(did.clone(), None, capabilities, metadata, now);
    create(shared, record).await?;
    tracing::warn!(did = %Esc(&did), "registered agent WITHOUT proof of possession (legacy compat mode)");
    Ok(registered(did))
}

#[derive(Serialize)]
pub(crate) struct AgentView {
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
    otk_count: u64,
    /// meshwire extension: the id of the signed pre-key served in bundles,
    /// `null` before the first upload.
    signed_pre_key_id: Option<Number>,
    /// meshwire extension: the id of the signed pre-key a rotation replaced,
    /// while the registry retains it (14 days, AGT spec 6.2).
    previous_signed_pre_key_id: Option<Number>,
}

/// `GET /v1/agents/{did}`.
pub(crate) async fn get_agent(
    State(shared): Ctx,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<AgentView>, ApiError> {
    let did = path_did(path)?;
    let now = shared.config.now();
    let mut a = shared
        .registry
        .get(&did)
        .await?
        .ok_or_else(|| ApiError::not_found("Agent not found"))?;
    // Shown as forgotten once its retention passed (dropped from the
    // store at the next upload).
    forget_expired_signed_pre_key(&mut a, now, duration_ms(shared.config.signed_pre_key_retention));
    let otk_count = shared
        .registry
        .store()
        .one_time_key_count(&did)
        .await
        .map_err(unavailable)?;
    let r = &a.reputation;
    Ok(Json(AgentView {
        did: a.did.clone(),
        capabilities: a.capabilities.clone(),
        metadata: a.metadata.clone(),
        registered_at: python_isoformat(meshwire_proto::time::Timestamp(a.registered_at)),
        last_seen: python_isoformat(meshwire_proto::time::Timestamp(a.last_seen)),
        reputation_score: r.score,
        total_sessions: r.total_sessions,
        successful_sessions: r.successful_sessions,
        failed_sessions: r.failed_sessions,
        timeout_sessions: r.timeout_sessions,
        last_session_at: r
            .last_session_at
            .map(|t| python_isoformat(meshwire_proto::time::Timestamp(t))),
        completion_rate: (r.total_sessions > 0).then(|| r.successful_sessions as f64 / r.total_sessions as f64),
        tier: "anonymous",
        verified_app_id: None,
        verified_tenant_id: None,
        verified_at: None,
        otk_count,
        signed_pre_key_id: a.signed_pre_key.as_ref().map(|k| k.key_id.clone()),
        previous_signed_pre_key_id: a.previous_signed_pre_key.as_ref().map(|p| p.key.key_id.clone()),
    }))
}

/// `DELETE /v1/agents/{did}`.
pub(crate) async fn deregister(
    State(shared): Ctx,
    method: Method,
    uri: OriginalUri,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let did = path_did(path)?;
    let header = authorization(&headers).ok_or_else(|| ApiError::unprocessable(vec![missing_header()]))?;
    let authed = authenticate(&shared, Some(&header), &RequestCtx::new(&method, &uri, &headers, b"")).await?;
    if authed != did {
        return Err(ApiError::forbidden("DID mismatch"));
    }
    let removed = shared.registry.store().delete_agent(&did).await.map_err(unavailable)?;
    shared.registry.refresh().await;
    if !removed {
        return Err(ApiError::not_found("Agent not found"));
    }
    tracing::info!(did = %Esc(&did), "deregistered agent");
    Ok(StatusCode::NO_CONTENT)
}
