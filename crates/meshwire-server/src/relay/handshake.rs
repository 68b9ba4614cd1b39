//! The first frame of a relay connection: `connect`, with proof of
//! possession of the DID's key, claimed once in the proof ledger.

use super::close_code;
use super::frames::too_large;
use super::proof;
use super::socket::{reject_with_reason, send_close, shutting_down, Sink, Stream};
use crate::replay::ClaimError;
use crate::server::Shared;
use crate::util::{constant_time_eq, Esc};
use futures_util::StreamExt;
use meshwire_proto::time::Timestamp;
use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::Message;

enum FirstFrame {
    Text(String),
    Binary,
    Gone,
}

async fn first_frame(stream: &mut Stream) -> FirstFrame {
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => return FirstFrame::Text(text),
            Some(Ok(Message::Binary(_))) => return FirstFrame::Binary,
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Close(_)) | Err(_)) | None => return FirstFrame::Gone,
        }
    }
}

/// Reads and checks the `connect` frame; the connection's DID on success.
/// A proof is claimed in the once-only memory only once everything else
/// passed, and before the connection replaces any other: a replayed frame
/// never displaces the live socket.
pub(crate) async fn handshake(
    shared: &Shared,
    upgrade: &proof::Upgrade,
    sink: &mut Sink,
    stream: &mut Stream,
) -> Option<String> {
    let mut shutdown = shared.shutdown_receiver();
    let first = tokio::select! {
        first = tokio::time::timeout(shared.config.connect_timeout, first_frame(stream)) => first,
        () = shutting_down(&mut shutdown) => {
            send_close(sink, close_code::GOING_AWAY, "server shutting down").await;
            return None;
        }
    };
    let text = match first {
        Err(_elapsed) => {
            tracing::debug!("no connect frame in time");
            shared.metrics.auth_failure("connect_timeout");
            let detail = "Timed out waiting for 'connect' frame";
            reject_with_reason(sink, stream, close_code::CONNECT_REQUIRED, detail, "").await;
            return None;
        }
        Ok(FirstFrame::Gone) => return None,
        Ok(FirstFrame::Binary) => {
            shared.metrics.frame_in("binary");
            shared.metrics.auth_failure("connect_required");
            let detail = "First frame must be 'connect'";
            reject_with_reason(sink, stream, close_code::CONNECT_REQUIRED, detail, "").await;
            return None;
        }
        Ok(FirstFrame::Text(text)) => {
            shared.metrics.frame_in("connect");
            text
        }
    };
    let (did, proven) = match check_connect(shared, upgrade, &text, shared.config.now()) {
        Ok(accepted) => accepted,
        Err(rejection) => {
            shared.metrics.auth_failure(match rejection.code {
                close_code::MISSING_FROM => "missing_from",
                close_code::AUTH_FAILED => "token",
                close_code::PROOF_FAILED => "proof",
                _ => "connect_required",
            });
            if rejection.code == close_code::PROOF_FAILED {
                tracing::warn!(did = %Esc(&rejection.did), reason = %rejection.detail, "rejecting connect frame");
            }
            reject_with_reason(sink, stream, rejection.code, &rejection.detail, rejection.reason).await;
            return None;
        }
    };
    if let Some(proof) = proven {
        if let Err(error) = shared
            .ledger
            .claim(&did, &proof.id, proof.expires_at, shared.config.now())
        {
            tracing::warn!(did = %Esc(&did), %error, "rejecting connect frame");
            shared.metrics.auth_failure(match error {
                ClaimError::Replayed => "replayed",
                _ => "proof_memory_full",
            });
            let (detail, reason) = match error {
                ClaimError::Replayed => (
                    "DID proof failed: proof already used (replayed connect frame)".to_owned(),
                    "replayed proof",
                ),
                other => (format!("DID proof failed: {other}"), "proof memory full"),
            };
            reject_with_reason(sink, stream, close_code::PROOF_FAILED, &detail, reason).await;
            return None;
        }
    }
    Some(did)
}

/// Why a first frame was refused: the close code, the error frame's detail
/// and the close reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub(crate) code: u16,
    pub(crate) detail: String,
    pub(crate) reason: &'static str,
    /// The `from` claimed, if any (for the log line).
    pub(crate) did: String,
}

fn rejection(code: u16, detail: impl Into<String>) -> Rejection {
    Rejection {
        code,
        detail: detail.into(),
        reason: "",
        did: String::new(),
    }
}

/// Checks a first frame (pure: no I/O, nothing recorded): size, JSON,
/// `type` `connect`, `from`, the proof of possession (timestamp or
/// challenge form, unless unauthenticated DIDs are allowed) and the shared
/// token. On success the DID and the proof to claim.
pub(crate) fn check_connect(
    shared: &Shared,
    upgrade: &proof::Upgrade,
    text: &str,
    now: Timestamp,
) -> Result<(String, Option<proof::Proof>), Rejection> {
    if text.len() > shared.config.max_frame_bytes {
        let detail = too_large(text.len(), shared.config.max_frame_bytes);
        return Err(rejection(close_code::CONNECT_REQUIRED, detail));
    }
    let frame = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(frame)) => frame,
        Ok(_) => Map::new(),
        Err(_) => return Err(rejection(close_code::CONNECT_REQUIRED, "Invalid JSON")),
    };
    if frame.get("type").and_then(Value::as_str) != Some("connect") {
        return Err(rejection(close_code::CONNECT_REQUIRED, "First frame must be 'connect'"));
    }
    let Some(did) = frame.get("from").and_then(Value::as_str).filter(|d| !d.is_empty()) else {
        return Err(rejection(close_code::MISSING_FROM, "Missing 'from' field"));
    };
    let mut proven = None;
    if !shared.config.allow_unauthenticated_did {
        let checked = if frame.contains_key("auth_scheme") {
            proof::check_challenge_proof(&frame, upgrade, &shared.challenges, &shared.config, now)
        } else if shared.config.require_challenge {
            Err("challenge-bound proof required (auth_scheme meshwire-challenge-v1); timestamp proofs are disabled")
        } else {
            proof::check_connect_proof(&frame, now, shared.config.window_ms())
        };
        match checked {
            Ok(proof) => proven = Some(proof),
            Err(reason) => {
                return Err(Rejection {
                    did: did.to_owned(),
                    ..rejection(close_code::PROOF_FAILED, format!("DID proof failed: {reason}"))
                })
            }
        }
    }
    if let Some(expected) = &shared.config.relay_token {
        let presented = frame.get("token").and_then(Value::as_str).unwrap_or("");
        if presented.is_empty() || !constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            return Err(rejection(close_code::AUTH_FAILED, "Authentication failed"));
        }
    }
    Ok((did.to_owned(), proven))
}
