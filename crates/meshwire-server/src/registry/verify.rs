//! `POST /v1/registry/verify`: Entra identity verification, which meshwire
//! does not support; like a reference registry deployed without the Entra
//! settings, known agents get 503 and unknown ones 404.

use super::Ctx;
use crate::http::{json_object, ApiError, Fields, Issue};
use crate::server::Shared;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use curve25519_dalek::montgomery::MontgomeryPoint;
use meshwire_proto::encoding::b64_decode;
use meshwire_proto::keys::Ed25519PublicKey;
use meshwire_proto::Did;
use serde_json::Value;

const MAX_VERIFICATION_TOKEN: usize = 8192;

/// Whether `amid` names a registered agent: its DID, or (base64) its
/// Ed25519 or X25519 identity key. A key is looked up through the DID it
/// derives (an X25519 key through its two Edwards preimages), so no scan
/// of the registry is needed; agents registered with the legacy body have
/// no such DID and are found by DID only.
async fn known(shared: &Shared, amid: &str) -> Result<bool, ApiError> {
    if amid.starts_with("did:") {
        return Ok(shared.registry.get(amid).await?.is_some());
    }
    let Some(key) = b64_decode(amid)
        .ok()
        .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
    else {
        return Ok(false);
    };
    let mut candidates = vec![key];
    if let Some(edwards) = MontgomeryPoint(key).to_edwards(0) {
        let mut encoding = edwards.compress().to_bytes();
        candidates.push(encoding);
        encoding[31] ^= 0x80;
        candidates.push(encoding);
    }
    for candidate in candidates {
        let did = Did::from_public_key(&Ed25519PublicKey::from_bytes(candidate));
        if let Some(agent) = shared.registry.get(did.as_str()).await? {
            if agent.identity_key == Some(key) || agent.identity_key_ed == Some(key) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// `POST /v1/registry/verify`.
pub(crate) async fn verify_identity(
    State(shared): Ctx,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
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
    if !known(&shared, &amid).await? {
        return Err(ApiError::not_found("Agent not registered"));
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Entra verification not configured on this registry",
    ))
}
