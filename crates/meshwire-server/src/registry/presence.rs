//! Presence: `GET .../presence` and the authenticated, throttled
//! `POST .../heartbeat`.

use super::auth::{authenticate, authorization};
use super::store::unavailable;
use super::{path_did, Ctx, RequestCtx};
use crate::config::duration_ms;
use crate::http::ApiError;
use crate::storage::AgentRecord;
use crate::util::python_isoformat;
use axum::extract::rejection::PathRejection;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::Json;
use meshwire_proto::time::Timestamp;
use serde::Serialize;

/// `GET .../presence` reports an agent online when seen this recently.
const PRESENCE_ONLINE_MS: u64 = 90_000;

#[derive(Serialize)]
pub(crate) struct PresenceView {
    did: String,
    last_seen: String,
    online: bool,
}

/// `GET /v1/agents/{did}/presence`.
pub(crate) async fn presence(
    State(shared): Ctx,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<PresenceView>, ApiError> {
    let did = path_did(path)?;
    let now = shared.config.now();
    let agent = shared
        .registry
        .get(&did)
        .await?
        .ok_or_else(|| ApiError::not_found("Agent not found"))?;
    Ok(Json(PresenceView {
        did: agent.did,
        last_seen: python_isoformat(Timestamp(agent.last_seen)),
        // Python: (now - last_seen) < 90 s; a last_seen in the future counts as online.
        online: now.0 < agent.last_seen.saturating_add(PRESENCE_ONLINE_MS),
    }))
}

#[derive(Serialize)]
pub(crate) struct HeartbeatView {
    did: String,
    last_seen: Option<String>,
}

/// `POST /v1/agents/{did}/heartbeat`: at most one per
/// [`ServerConfig::heartbeat_min_interval`](crate::ServerConfig::heartbeat_min_interval).
pub(crate) async fn heartbeat(
    State(shared): Ctx,
    method: Method,
    uri: OriginalUri,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<HeartbeatView>, ApiError> {
    let did = path_did(path)?;
    let ctx = RequestCtx::new(&method, &uri, &headers, b"");
    let authed = authenticate(&shared, authorization(&headers).as_deref(), &ctx).await?;
    if authed != did {
        return Err(ApiError::forbidden("Authenticated DID does not match heartbeat target"));
    }
    let now = shared.config.now();
    let min_interval = duration_ms(shared.config.heartbeat_min_interval);
    let change = |agent: &mut AgentRecord| {
        // Python: elapsed < min_interval (a clock that went back throttles too).
        if agent
            .last_heartbeat
            .is_some_and(|last| now.0 < last.saturating_add(min_interval))
        {
            return false;
        }
        agent.last_seen = now.0;
        agent.last_heartbeat = Some(now.0);
        true
    };
    match shared
        .registry
        .store()
        .update_agent(&did, &change)
        .await
        .map_err(unavailable)?
    {
        None => Err(ApiError::not_found("Agent not found")),
        Some((_, false)) => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Heartbeat throttled; retry after 10s",
        )),
        Some((_, true)) => Ok(Json(HeartbeatView {
            did,
            last_seen: Some(python_isoformat(now)),
        })),
    }
}
