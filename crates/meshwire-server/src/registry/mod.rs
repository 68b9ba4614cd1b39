//! The registry: agent registration with proof of possession, pre-key
//! bundles with one-time key consumption, presence, reputation and
//! capability discovery (`agentmesh.registry` of AGT 5.0.0), over the
//! storage's [`Registry`](crate::storage::Registry).

mod agents;
mod auth;
mod discover;
mod prekeys;
mod presence;
pub(crate) mod recipients;
mod reputation;
pub(crate) mod store;
mod verify;

use crate::http::{ApiError, Issue};
use crate::ratelimit::{too_many, RateLimiter};
use crate::server::Shared;
use crate::util::Esc;
use axum::extract::rejection::PathRejection;
use axum::extract::{OriginalUri, Path, State};
use axum::http::header::HOST;
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use meshwire_proto::auth::CHALLENGE_PATH;
use serde::Serialize;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;

pub(crate) use auth::advertise_challenge;

type Ctx = State<Arc<Shared>>;

/// The registry routes (without `/health`).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/agents", post(agents::register))
        .route("/v1/agents/:did", get(agents::get_agent).delete(agents::deregister))
        .route(
            "/v1/agents/:did/prekeys",
            put(prekeys::upload_prekeys).get(prekeys::fetch_prekeys),
        )
        .route("/v1/agents/:did/presence", get(presence::presence))
        .route("/v1/agents/:did/heartbeat", post(presence::heartbeat))
        .route("/v1/agents/:did/reputation", post(reputation::submit_reputation))
        .route(
            "/v1/registry/reputation/session",
            post(reputation::submit_session_reputation),
        )
        .route("/v1/registry/verify", post(verify::verify_identity))
        .route("/v1/discover", get(discover::discover))
        .route(CHALLENGE_PATH, get(auth::issue_challenge))
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

fn path_did(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(did)| did)
        .map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))
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

/// Who a rate-limited request counts against: the DID of a valid
/// `Authorization` header when `headers` is given and carries one (its
/// proof is then used up), else the peer IP. `None` when neither is known
/// (a router served without connect info) or the peer is loopback and
/// [`ServerConfig::rate_limit_loopback`](crate::ServerConfig::rate_limit_loopback)
/// is off: such requests are not limited.
pub(crate) async fn requester(
    shared: &Shared,
    authenticated: Option<(&HeaderMap, &RequestCtx<'_>)>,
    peer: Option<SocketAddr>,
) -> Option<String> {
    if let Some((headers, ctx)) = authenticated {
        if let Some(header) = auth::authorization(headers) {
            if let Ok(did) = auth::authenticate(shared, Some(&header), ctx).await {
                return Some(format!("did {did}"));
            }
        }
    }
    peer.filter(|addr| shared.config.rate_limit_loopback || !addr.ip().is_loopback())
        .map(|addr| format!("ip {}", addr.ip()))
}

/// Takes a token of `limiter` for `who`; when there is none, the 429
/// answer (with `Retry-After`) naming `what` was limited. The refusal is
/// counted by the limiter (`meshwire_rate_limited_total{limit}`).
pub(crate) fn rate_limited(shared: &Shared, limiter: &RateLimiter, who: Option<&str>, what: &str) -> Option<Response> {
    let who = who?;
    let retry_after = limiter.take(who, shared.config.now()).err()?;
    tracing::info!(requester = %Esc(who), retry_after, "{what} rate-limited");
    Some(too_many(what, retry_after))
}
