//! Pre-key bundles: upload (checked against the agent's registered key)
//! and fetch (rate-limited; each one-time key handed out once, atomically
//! in the store, across instances).

use super::auth::{authenticate, authorization};
use super::store::{install_signed_pre_key, unavailable};
use super::{missing_header, path_did, rate_limited, requester, Ctx, RequestCtx};
use crate::config::duration_ms;
use crate::http::{as_integer, json_object, ApiError, Fields};
use crate::server::Shared;
use crate::storage::{OneTimeKey, SignedPreKey};
use crate::util::Esc;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, OriginalUri, Path, State};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use axum::Json;
use indexmap::IndexMap;
use meshwire_proto::binding::check_identity_keys;
use meshwire_proto::encoding::{b64_decode, b64_url};
use meshwire_proto::identity::verify_signature;
use meshwire_proto::keys::{Ed25519PublicKey, X25519PublicKey};
use meshwire_proto::Did;
use serde::Serialize;
use serde_json::{Number, Value};
use std::net::SocketAddr;

#[derive(Serialize)]
pub(crate) struct PreKeysUploaded {
    did: String,
    otk_count: usize,
}

/// Longest `key_id` accepted (digits of the JSON number), so ids cannot
/// carry bulk data.
const MAX_KEY_ID: u64 = u32::MAX as u64;

/// The fields of a pre-key upload body.
const UPLOAD_FIELDS: &[&str] = &["identity_key", "identity_key_ed", "signed_pre_key", "one_time_pre_keys"];

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
    signed_pre_key: SignedPreKey,
    one_time_pre_keys: Vec<OneTimeKey>,
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
    let signed_pre_key = SignedPreKey {
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
    let mut one_time_pre_keys = Vec::with_capacity(otks.len());
    for (i, otk) in otks.iter().enumerate() {
        only_fields(otk, &["key_id", "public_key"], &format!("one_time_pre_keys[{i}]"))?;
        let key_id = key_id(&format!("one_time_pre_keys[{i}].key_id"), otk.get("key_id"))?;
        let Some(Value::String(public_key)) = otk.get("public_key") else {
            return Err(bundle_error(format!(
                "one_time_pre_keys[{i}].public_key must be a string"
            )));
        };
        let public_key = decode_exact::<32>(&format!("one_time_pre_keys[{i}].public_key"), public_key)?;
        one_time_pre_keys.push(OneTimeKey { key_id, public_key });
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

/// `PUT /v1/agents/{did}/prekeys`: replaces the bundle and the one-time
/// keys.
pub(crate) async fn upload_prekeys(
    State(shared): Ctx,
    method: Method,
    uri: OriginalUri,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PreKeysUploaded>, ApiError> {
    let did = path_did(path)?;
    let header = authorization(&headers);
    let raw = body.as_ref().map(Bytes::clone).unwrap_or_default();
    // Request validation first (FastAPI validates body and headers before
    // the handler runs); collect body and header problems together.
    let object = json_object(body)?;
    let record = shared.registry.get(&did).await?;
    let legacy_unauthenticated =
        shared.config.legacy_registration && record.as_ref().is_some_and(|r| r.signing_key.is_none());
    let mut fields = Fields::new(&object);
    let identity_key = fields.string("identity_key");
    let identity_key_ed = fields.optional_string("identity_key_ed");
    let spk = fields.object("signed_pre_key");
    let otks = fields.object_list("one_time_pre_keys");
    // Only the protocol's fields (AGT's `PreKeyBundleRequest`).
    if let Some(unknown) = object.keys().find(|k| !UPLOAD_FIELDS.contains(&k.as_str())) {
        shared.metrics.limit_refused("prekey_upload");
        return Err(bundle_error(format!(
            "unknown field '{}' (allowed: {})",
            Esc(&crate::http::clip(unknown, 64)),
            UPLOAD_FIELDS.join(", ")
        ))
        .into());
    }
    if header.is_none() && !legacy_unauthenticated {
        fields.issues.push(missing_header());
    }
    fields.finish()?;

    let registered = record
        .ok_or_else(|| ApiError::not_found("Agent not found"))?
        .signing_key
        .map(Ed25519PublicKey::from_bytes);
    if !legacy_unauthenticated {
        let ctx = RequestCtx::new(&method, &uri, &headers, &raw);
        let authed = authenticate(&shared, header.as_deref(), &ctx).await?;
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
    .inspect_err(|e| {
        if matches!(e, UploadError::Invalid(_)) {
            shared.metrics.limit_refused("prekey_upload");
        }
        tracing::warn!(did = %Esc(&did), error = %e, "pre-key upload refused");
    })?;

    store_upload(&shared, &did, checked).await
}

/// Writes a checked upload: the record (one atomic update), then the
/// one-time keys.
async fn store_upload(shared: &Shared, did: &str, checked: CheckedUpload) -> Result<Json<PreKeysUploaded>, ApiError> {
    let now = shared.config.now();
    let retention = duration_ms(shared.config.signed_pre_key_retention);
    let CheckedUpload {
        identity_key,
        identity_key_ed,
        signed_pre_key,
        one_time_pre_keys,
    } = checked;
    let change = move |record: &mut crate::storage::AgentRecord| {
        record.identity_key = Some(identity_key);
        if identity_key_ed.is_some() {
            record.identity_key_ed = identity_key_ed;
        }
        install_signed_pre_key(record, signed_pre_key.clone(), now, retention);
        true
    };
    let store = shared.registry.store();
    if store.update_agent(did, &change).await.map_err(unavailable)?.is_none() {
        return Err(ApiError::not_found("Agent not found"));
    }
    let otk_count = one_time_pre_keys.len();
    if !store
        .set_one_time_keys(did, one_time_pre_keys)
        .await
        .map_err(unavailable)?
    {
        return Err(ApiError::not_found("Agent not found"));
    }
    Ok(Json(PreKeysUploaded {
        did: did.to_owned(),
        otk_count,
    }))
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

/// `GET /v1/agents/{did}/prekeys`: serves the bundle and consumes one
/// one-time key, atomically in the store: each uploaded one-time key goes
/// to exactly one caller, whichever instance serves it. Rate-limited per
/// requester ([`ServerConfig::bundle_fetches_per_minute`](crate::ServerConfig::bundle_fetches_per_minute)).
pub(crate) async fn fetch_prekeys(
    State(shared): Ctx,
    method: Method,
    uri: OriginalUri,
    peer: Option<ConnectInfo<SocketAddr>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let did = path_did(path)?;
    let ctx = RequestCtx::new(&method, &uri, &headers, b"");
    let who = requester(&shared, Some((&headers, &ctx)), peer.map(|ConnectInfo(addr)| addr)).await;
    if let Some(refused) = rate_limited(
        &shared,
        &shared.bundle_limiter,
        who.as_deref(),
        "pre-key bundle fetches",
    ) {
        return Ok(refused);
    }
    let not_found = || ApiError::not_found("Pre-key bundle not found");
    let agent = shared.registry.get(&did).await?.ok_or_else(not_found)?;
    let spk = agent.signed_pre_key.clone().ok_or_else(not_found)?;
    let one_time_pre_key = shared
        .registry
        .store()
        .consume_one_time_key(&did)
        .await
        .map_err(unavailable)?;
    if one_time_pre_key.is_none() {
        tracing::info!(did = %Esc(&did), "bundle served without a one-time key (none left)");
    }
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
    tracing::debug!(did = %Esc(&did), "bundle served");
    Ok(Json(view).into_response())
}
