//! Authentication of registry requests: `Ed25519-Timestamp` (AGT) and
//! `Meshwire-Challenge` (meshwire) headers, each proof claimed once in the
//! proof ledger, and the challenge nonces the registry hands out.

use super::RequestCtx;
use crate::challenge::{audience_ok, Service};
use crate::http::ApiError;
use crate::replay::ClaimError;
use crate::server::Shared;
use crate::util::{parse_iso, Esc, IsoError};
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use meshwire_proto::auth::{
    verify_challenge, AuthHeader, ChallengeHeader, ChallengeRequest, CHALLENGE_HEADER, CHALLENGE_SCHEME,
};
use meshwire_proto::keys::Ed25519PublicKey;
use serde::Serialize;
use std::sync::Arc;

const SCHEME: &str = "Ed25519-Timestamp ";

/// The `Authorization` header, lossily decoded.
pub(crate) fn authorization(headers: &HeaderMap) -> Option<String> {
    headers
        .get(AUTHORIZATION)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
}

/// A refused claim as the HTTP answer.
pub(crate) fn claim_error(error: ClaimError, what: &str) -> ApiError {
    match error {
        ClaimError::Replayed => ApiError::unauthorized(format!("Proof already used: replayed {what}")),
        ClaimError::Full { .. } | ClaimError::Unavailable(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Cannot accept new proofs now ({error})"),
        ),
    }
}

/// The registered Ed25519 key of `did` (401 when unknown or legacy).
async fn registered_key(shared: &Shared, did: &str) -> Result<Ed25519PublicKey, ApiError> {
    let agent = shared
        .registry
        .get(did)
        .await?
        .ok_or_else(|| ApiError::unauthorized("Agent not registered"))?;
    // A legacy (npm 4.0.0) registration has no Ed25519 key to check against.
    agent
        .signing_key
        .map(Ed25519PublicKey::from_bytes)
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
pub(crate) async fn authenticate(
    shared: &Shared,
    header: Option<&str>,
    ctx: &RequestCtx<'_>,
) -> Result<String, ApiError> {
    let result = check_authorization(shared, header, ctx).await;
    if let Err(error) = &result {
        if error.status_code() == StatusCode::UNAUTHORIZED {
            shared.metrics.auth_failure(failure_reason(error.text().unwrap_or("")));
        }
    }
    result
}

/// The `reason` label of a refused registry authentication (from the
/// detail, which names the cause).
fn failure_reason(detail: &str) -> &'static str {
    if detail.contains("replayed") {
        "registry_replayed"
    } else if detail.contains("not registered") {
        "registry_unknown_agent"
    } else if detail.starts_with("Invalid signature") {
        "registry_signature"
    } else if detail.contains("imestamp") && !detail.starts_with("Malformed") {
        "registry_timestamp"
    } else if detail.starts_with("Challenge") || detail.contains("Meshwire-Challenge authorization required") {
        "registry_challenge"
    } else {
        "registry_malformed"
    }
}

async fn check_authorization(shared: &Shared, header: Option<&str>, ctx: &RequestCtx<'_>) -> Result<String, ApiError> {
    let value = header.ok_or_else(|| ApiError::unauthorized("Missing or invalid Authorization header"))?;
    if ChallengeHeader::is_challenge(value) {
        return authenticate_challenge(shared, value, ctx).await;
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
    let key = registered_key(shared, did).await?;
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

async fn authenticate_challenge(shared: &Shared, value: &str, ctx: &RequestCtx<'_>) -> Result<String, ApiError> {
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
    let key = registered_key(shared, &did).await?;
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
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    shared.sweep_agents_if_due().await;
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
pub(crate) async fn issue_challenge(State(shared): State<Arc<Shared>>) -> Response {
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
