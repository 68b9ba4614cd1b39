//! Reputation: reports about another agent and session outcome reports.

use super::auth::{authenticate, authorization};
use super::store::{apply_reputation, rounded, unavailable, Outcome};
use super::{path_did, Ctx, RequestCtx};
use crate::http::{json_object, ApiError, Fields, Issue};
use crate::server::Shared;
use crate::storage::AgentRecord;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, Method};
use axum::Json;
use indexmap::IndexMap;
use meshwire_proto::time::Timestamp;
use serde::Serialize;
use serde_json::Value;

#[derive(Serialize)]
pub(crate) struct ReputationView {
    did: String,
    reputation_score: f64,
}

/// Applies one report to `did`; its new score (rounded), `None` for an
/// unknown DID.
async fn report(
    shared: &Shared,
    did: &str,
    target: f64,
    alpha: f64,
    outcome: Outcome,
    now: Timestamp,
) -> Result<Option<f64>, ApiError> {
    let change = |agent: &mut AgentRecord| {
        apply_reputation(agent, target, alpha, Some(outcome), now);
        true
    };
    let updated = shared
        .registry
        .store()
        .update_agent(did, &change)
        .await
        .map_err(unavailable)?;
    Ok(updated.map(|(agent, _)| rounded(agent.reputation.score)))
}

/// `POST /v1/agents/{did}/reputation`.
pub(crate) async fn submit_reputation(
    State(shared): Ctx,
    method: Method,
    uri: OriginalUri,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReputationView>, ApiError> {
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
    let authed = authenticate(&shared, authorization(&headers).as_deref(), &ctx).await?;
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
    let new_score = report(&shared, &did, score, 0.3, bucket, now)
        .await?
        .ok_or_else(|| ApiError::not_found("Agent not found"))?;
    Ok(Json(ReputationView {
        did,
        reputation_score: new_score,
    }))
}

#[derive(Serialize)]
pub(crate) struct SessionReputationView {
    session_id: String,
    outcome: String,
    reputation: IndexMap<String, f64>,
}

/// `POST /v1/registry/reputation/session`.
pub(crate) async fn submit_session_reputation(
    State(shared): Ctx,
    method: Method,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SessionReputationView>, ApiError> {
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
    let authed = authenticate(&shared, authorization(&headers).as_deref(), &ctx).await?;
    if authed != reporter {
        return Err(ApiError::forbidden("reporter_amid does not match authenticated DID"));
    }
    if reporter != initiator && reporter != receiver {
        return Err(ApiError::forbidden("reporter_amid must be a session participant"));
    }
    let now = shared.config.now();
    if shared.registry.get(&reporter).await?.is_none() {
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
        if let Some(score) = report(&shared, did, target, 0.2, bucket, now).await? {
            reputation.insert(did.to_owned(), score);
        }
    }
    Ok(Json(SessionReputationView {
        session_id,
        outcome,
        reputation,
    }))
}
