//! `GET /v1/discover?capability=C&limit=N`: agents with a capability, in
//! registration order, through the store's capability index (a walk of at
//! most `limit` ≤ 200 entries of one capability, never a scan of the
//! registry), rate-limited per requester.

use super::store::unavailable;
use super::{rate_limited, requester, Ctx, RequestCtx};
use crate::http::{ApiError, Issue};
use crate::util::python_isoformat;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, OriginalUri, Query, State};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use axum::Json;
use indexmap::IndexMap;
use meshwire_proto::time::Timestamp;
use serde::Serialize;
use serde_json::Value;
use std::net::SocketAddr;

const DISCOVER_DEFAULT_LIMIT: i64 = 50;
const DISCOVER_MAX_LIMIT: i64 = 200;

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
pub(crate) struct DiscoverView {
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

/// The `limit` parameter (FastAPI's checks and messages).
fn parse_limit(text: Option<&str>, issues: &mut Vec<Issue>) -> i64 {
    let Some(text) = text else {
        return DISCOVER_DEFAULT_LIMIT;
    };
    match text.trim().parse::<i64>() {
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
    }
}

/// `GET /v1/discover`. Rate-limited per requester (authenticated DID, else
/// peer IP): [`ServerConfig::discoveries_per_minute`](crate::ServerConfig::discoveries_per_minute).
pub(crate) async fn discover(
    State(shared): Ctx,
    method: Method,
    uri: OriginalUri,
    peer: Option<ConnectInfo<SocketAddr>>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let ctx = RequestCtx::new(&method, &uri, &headers, b"");
    let who = requester(&shared, Some((&headers, &ctx)), peer.map(|ConnectInfo(addr)| addr)).await;
    if let Some(refused) = rate_limited(&shared, &shared.discovery_limiter, who.as_deref(), "discovery requests") {
        return Ok(refused);
    }
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
    let limit = parse_limit(lookup("limit"), &mut issues);
    let (Some(capability), true) = (capability, issues.is_empty()) else {
        return Err(ApiError::unprocessable(issues));
    };
    let limit = usize::try_from(limit).unwrap_or(0);
    let agents = shared
        .registry
        .store()
        .discover(capability, limit)
        .await
        .map_err(unavailable)?;
    let results: Vec<DiscoverResult> = agents
        .into_iter()
        .map(|a| DiscoverResult {
            did: a.did,
            capabilities: a.capabilities,
            reputation_score: a.reputation.score,
            last_seen: python_isoformat(Timestamp(a.last_seen)),
            metadata: a.metadata,
        })
        .collect();
    let total = results.len();
    Ok(Json(DiscoverView { results, total }).into_response())
}
