//! Operations endpoints: `GET /metrics` (Prometheus), `GET /healthz`
//! (the process is alive) and `GET /readyz` (the store answers and the
//! server is not draining). The AGT-compatible `/health` stays as it was.

use crate::metrics::gauge_value;
use crate::server::Shared;
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long `/readyz` waits for the store.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Serializes scrapes (counters mirrored from the server's own atomics are
/// brought up to date under it).
static SCRAPE: Mutex<()> = Mutex::new(());

/// Raises `counter` to `value` (counters only go up).
fn sync(counter: &Counter, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}

/// `GET /metrics`: OpenMetrics text.
pub(crate) async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    shared.registry.refresh().await;
    let totals = shared.relay.mail.totals().await;
    let m = &shared.metrics;
    let text = {
        let _guard = SCRAPE.lock().unwrap_or_else(|p| p.into_inner());
        m.connections
            .set(i64::try_from(shared.relay.connected()).unwrap_or(i64::MAX));
        m.sockets
            .set(i64::try_from(shared.sockets.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        if let Some(totals) = totals {
            m.mailbox_messages.set(gauge_value(totals.messages));
            m.mailbox_bytes.set(gauge_value(totals.bytes));
        }
        m.agents.set(gauge_value(shared.registry.count()));
        m.live_proofs
            .set(i64::try_from(shared.ledger.live()).unwrap_or(i64::MAX));
        sync(&m.routed, shared.relay.routed.load(Ordering::Relaxed));
        sync(&m.stored, shared.relay.mail.stored.load(Ordering::Relaxed));
        sync(&m.delivered, shared.relay.mail.delivered.load(Ordering::Relaxed));
        sync(
            &m.rate_limited_counter("bundle_fetch"),
            shared.bundle_limiter.refused.load(Ordering::Relaxed),
        );
        sync(
            &m.limit_counter("mailbox_quota"),
            shared.relay.mail.refused.load(Ordering::Relaxed),
        );
        sync(
            &m.limit_counter("proof_memory_full"),
            shared.ledger.full_refused.load(Ordering::Relaxed),
        );
        m.encode()
    };
    (
        [
            (
                CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            (CACHE_CONTROL, "no-store"),
        ],
        text,
    )
        .into_response()
}

#[derive(Serialize)]
pub(crate) struct Probe {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

/// `GET /healthz`: 200 while the process serves HTTP.
pub(crate) async fn healthz() -> Json<Probe> {
    Json(Probe {
        status: "ok",
        detail: None,
    })
}

/// `GET /readyz`: 200 when the store answers (within 2 s) and the server
/// is not shutting down; 503 otherwise, with the reason.
pub(crate) async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let unavailable = |detail: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Probe {
                status: "unavailable",
                detail: Some(detail),
            }),
        )
            .into_response()
    };
    if *shared.shutdown_receiver().borrow() {
        return unavailable("shutting down".to_owned());
    }
    match tokio::time::timeout(READY_TIMEOUT, shared.storage.ready()).await {
        Ok(Ok(())) => Json(Probe {
            status: "ready",
            detail: None,
        })
        .into_response(),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness check failed");
            unavailable(error.to_string())
        }
        Err(_) => unavailable(format!("the store did not answer within {} s", READY_TIMEOUT.as_secs())),
    }
}
