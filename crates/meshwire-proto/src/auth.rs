//! Authentication, both sides: the `Authorization: Ed25519-Timestamp` header,
//! the registration and relay `connect` proofs of possession (AGT's
//! timestamp forms), and meshwire's challenge-bound proofs (the signed bytes,
//! their parser and the `Meshwire-Challenge` header; specified in
//! `docs/specs/MESHWIRE-CHALLENGE-AUTH.md`). Pure: no I/O, no clock.

use crate::encoding::{b64_decode, b64_url};
use crate::identity::{verify_signature, Did, Identity};
use crate::keys::Ed25519PublicKey;
use crate::time::Timestamp;

/// How far a signed timestamp may be from the verifier's clock.
pub const REPLAY_WINDOW_MS: u64 = 5 * 60 * 1000;

const SCHEME: &str = "Ed25519-Timestamp ";

/// An authentication header or proof was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No header, or not the `Ed25519-Timestamp` scheme.
    #[error("missing or invalid Authorization header")]
    Missing,
    /// Not `<did> <timestamp> <signature>`.
    #[error("malformed Ed25519-Timestamp header")]
    Malformed,
    /// The DID is not a valid `did:mesh` DID.
    #[error("invalid DID: {0}")]
    Did(#[from] crate::identity::DidError),
    /// The timestamp is not ISO-8601 with an offset.
    #[error("invalid timestamp format")]
    Timestamp,
    /// The timestamp is further from the verifier's clock than the window.
    #[error("timestamp outside the replay window")]
    Stale,
    /// The signature is not base64.
    #[error("invalid signature encoding")]
    Encoding,
    /// The public key is not 32 bytes of base64, or does not derive the DID.
    #[error("invalid public key")]
    PublicKey,
    /// The signature does not verify under the key.
    #[error("signature does not verify")]
    BadSignature,
}

/// The header value: the DID, the ISO-8601 timestamp and the base64url
/// (unpadded) Ed25519 signature over utf8(timestamp).
pub fn ed25519_timestamp_header(identity: &Identity, timestamp: &str) -> String {
    format!(
        "{SCHEME}{} {} {}",
        identity.did(),
        timestamp,
        b64_url(&identity.sign(timestamp.as_bytes()))
    )
}

/// A parsed, not yet verified, `Ed25519-Timestamp` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthHeader {
    /// The DID the request claims.
    pub did: Did,
    /// The signed timestamp, as sent.
    pub timestamp: String,
    /// The decoded signature (either base64 alphabet accepted).
    pub signature: Vec<u8>,
}

impl AuthHeader {
    /// Parses `Ed25519-Timestamp <did> <timestamp> <signature>`.
    pub fn parse(value: &str) -> Result<Self, AuthError> {
        let rest = value.strip_prefix(SCHEME).ok_or(AuthError::Missing)?;
        let mut parts = rest.splitn(3, ' ');
        let (Some(did), Some(timestamp), Some(signature)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(AuthError::Malformed);
        };
        Ok(Self {
            did: Did::parse(did)?,
            timestamp: timestamp.to_owned(),
            signature: b64_decode(signature).map_err(|_| AuthError::Encoding)?,
        })
    }

    /// Checks the timestamp against `now` and the signature against `key`
    /// (the key the registry holds for `self.did`).
    pub fn verify(&self, key: &Ed25519PublicKey, now: Timestamp) -> Result<(), AuthError> {
        self.verify_within(key, now, REPLAY_WINDOW_MS)
    }

    /// [`AuthHeader::verify`] with a replay window of `window_ms`.
    pub fn verify_within(&self, key: &Ed25519PublicKey, now: Timestamp, window_ms: u64) -> Result<(), AuthError> {
        check_fresh(&self.timestamp, now, window_ms)?;
        verify_signature(key, self.timestamp.as_bytes(), &self.signature).map_err(|_| AuthError::BadSignature)
    }
}

fn check_fresh(timestamp: &str, now: Timestamp, window_ms: u64) -> Result<(), AuthError> {
    let ts = Timestamp::parse_iso(timestamp).map_err(|_| AuthError::Timestamp)?;
    if ts.abs_diff(now) > window_ms {
        return Err(AuthError::Stale);
    }
    Ok(())
}

/// Registration proof of possession: `(public_key, proof)` for
/// `POST /v1/agents`, base64url unpadded, proof = Ed25519 over
/// utf8(public_key_b64 + timestamp).
pub fn registration_proof(identity: &Identity, timestamp: &str) -> (String, String) {
    let public_key = b64_url(identity.ed25519_public().as_bytes());
    let proof = b64_url(&identity.sign(format!("{public_key}{timestamp}").as_bytes()));
    (public_key, proof)
}

/// Verifies a registration proof; returns the key and the DID it derives.
pub fn verify_registration_proof(
    public_key_b64: &str,
    proof_b64: &str,
    timestamp: &str,
    now: Timestamp,
) -> Result<(Ed25519PublicKey, Did), AuthError> {
    verify_registration_proof_within(public_key_b64, proof_b64, timestamp, now, REPLAY_WINDOW_MS)
}

/// [`verify_registration_proof`] with a replay window of `window_ms`.
pub fn verify_registration_proof_within(
    public_key_b64: &str,
    proof_b64: &str,
    timestamp: &str,
    now: Timestamp,
    window_ms: u64,
) -> Result<(Ed25519PublicKey, Did), AuthError> {
    let key = b64_decode(public_key_b64).map_err(|_| AuthError::PublicKey)?;
    let key = Ed25519PublicKey::from_slice(&key).map_err(|_| AuthError::PublicKey)?;
    check_fresh(timestamp, now, window_ms)?;
    let proof = b64_decode(proof_b64).map_err(|_| AuthError::Encoding)?;
    verify_signature(&key, format!("{public_key_b64}{timestamp}").as_bytes(), &proof)
        .map_err(|_| AuthError::BadSignature)?;
    Ok((key, Did::from_public_key(&key)))
}

/// Verifies a relay `connect` proof: standard base64 key and signature over
/// utf8(timestamp), and `did` derived from the key.
pub fn verify_connect_proof(
    did: &str,
    public_key_b64: &str,
    timestamp: &str,
    signature_b64: &str,
    now: Timestamp,
) -> Result<Did, AuthError> {
    verify_connect_proof_within(did, public_key_b64, timestamp, signature_b64, now, REPLAY_WINDOW_MS)
}

/// [`verify_connect_proof`] with a replay window of `window_ms`.
pub fn verify_connect_proof_within(
    did: &str,
    public_key_b64: &str,
    timestamp: &str,
    signature_b64: &str,
    now: Timestamp,
    window_ms: u64,
) -> Result<Did, AuthError> {
    let key = b64_decode(public_key_b64).map_err(|_| AuthError::PublicKey)?;
    let key = Ed25519PublicKey::from_slice(&key).map_err(|_| AuthError::PublicKey)?;
    let did = Did::parse(did)?;
    if !did.is_derived_from(&key) {
        return Err(AuthError::PublicKey);
    }
    check_fresh(timestamp, now, window_ms)?;
    let signature = b64_decode(signature_b64).map_err(|_| AuthError::Encoding)?;
    verify_signature(&key, timestamp.as_bytes(), &signature).map_err(|_| AuthError::BadSignature)?;
    Ok(did)
}

// ── Challenge-bound proofs (meshwire extension) ──────────────────────

/// Scheme of the `Authorization` header carrying a challenge-bound proof:
/// `Meshwire-Challenge <did> <nonce> <audience> <base64url signature>`.
pub const CHALLENGE_SCHEME: &str = "Meshwire-Challenge";
/// Value of a challenge-bound `connect` frame's `auth_scheme` field.
pub const CHALLENGE_AUTH_SCHEME: &str = "meshwire-challenge-v1";
/// First line of the signed bytes (domain separation from every other
/// signature an agent's key makes).
pub const CHALLENGE_DOMAIN: &str = "meshwire-auth-v1";
/// Response header of the relay's WebSocket upgrade (101) carrying a fresh
/// nonce; its presence is how a relay advertises the extension.
pub const CHALLENGE_HEADER: &str = "x-meshwire-challenge";
/// Registry endpoint issuing nonces (`GET`); a 404 means a registry without
/// the extension.
pub const CHALLENGE_PATH: &str = "/v1/auth/challenge";
/// Longest audience, path or nonce accepted in the signed bytes.
pub const MAX_CHALLENGE_FIELD: usize = 2048;
/// Longest HTTP method accepted in the signed bytes.
const MAX_METHOD: usize = 16;

/// A challenge-bound proof or one of its parts is malformed or does not
/// verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    /// A field of the signed bytes is empty, too long or contains a byte it
    /// may not (names the field and why).
    #[error("challenge field {field}: {reason}")]
    Field {
        /// The field (`audience`, `method`, `path`, `nonce`, `did`, `body`).
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The URL or origin is not `http(s)://` / `ws(s)://` `host[:port]`.
    #[error("invalid origin: {0}")]
    Origin(&'static str),
    /// The signed bytes do not have the expected lines.
    #[error("malformed challenge message: {0}")]
    Message(&'static str),
    /// The header is not `Meshwire-Challenge <did> <nonce> <signature>`.
    #[error("malformed Meshwire-Challenge header")]
    Header,
    /// The DID is not a valid `did:mesh` DID.
    #[error("invalid DID: {0}")]
    Did(#[from] crate::identity::DidError),
    /// The signature is not base64 of 64 bytes.
    #[error("invalid signature encoding")]
    Encoding,
    /// The signature does not verify under the key.
    #[error("challenge signature does not verify")]
    BadSignature,
}

fn field_err(field: &'static str, reason: &'static str) -> ChallengeError {
    ChallengeError::Field { field, reason }
}

/// What a challenge-bound proof signs. `audience` must already be a
/// normalized origin ([`normalize_origin`]); `path` is the request target
/// exactly as sent (path and query, percent-encoding untouched); `body` is
/// the request body (empty for none, and for the relay `connect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChallengeRequest<'a> {
    /// The server's origin as the client addressed it (`https://host[:port]`,
    /// `wss://...` for a relay), normalized.
    pub audience: &'a str,
    /// The HTTP method in uppercase (`GET` for the relay upgrade).
    pub method: &'a str,
    /// The request target: path and query as sent.
    pub path: &'a str,
    /// The server-issued nonce.
    pub nonce: &'a str,
    /// The signer's DID.
    pub did: &'a str,
    /// The request body (empty for none).
    pub body: &'a [u8],
}

/// The fields of signed bytes, as [`parse_challenge_message`] reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeFields {
    /// The normalized origin.
    pub audience: String,
    /// The HTTP method.
    pub method: String,
    /// The request target.
    pub path: String,
    /// The nonce.
    pub nonce: String,
    /// The signer's DID.
    pub did: Did,
    /// Lowercase hex sha256 of the body.
    pub body_sha256: String,
}

fn check_method(method: &str) -> Result<(), ChallengeError> {
    if method.is_empty() || method.len() > MAX_METHOD {
        return Err(field_err("method", "must be 1 to 16 characters"));
    }
    if !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(field_err("method", "must be uppercase ASCII letters"));
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), ChallengeError> {
    if !path.starts_with('/') {
        return Err(field_err("path", "must start with '/'"));
    }
    if path.len() > MAX_CHALLENGE_FIELD {
        return Err(field_err("path", "too long"));
    }
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(field_err("path", "must be visible ASCII (percent-encode the rest)"));
    }
    Ok(())
}

fn check_nonce(nonce: &str) -> Result<(), ChallengeError> {
    if nonce.is_empty() || nonce.len() > MAX_CHALLENGE_FIELD {
        return Err(field_err("nonce", "must be 1 to 2048 characters"));
    }
    if !nonce
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(field_err("nonce", "must be base64url without padding"));
    }
    Ok(())
}

fn check_audience(audience: &str) -> Result<(), ChallengeError> {
    if audience.len() > MAX_CHALLENGE_FIELD {
        return Err(field_err("audience", "too long"));
    }
    match normalize_origin(audience) {
        Ok(normal) if normal == audience => Ok(()),
        Ok(_) => Err(field_err("audience", "must be a normalized origin")),
        Err(e) => Err(e),
    }
}

fn sha256_hex(body: &[u8]) -> String {
    use sha2::Digest;
    crate::encoding::hex_encode(&sha2::Sha256::digest(body))
}

/// The exact bytes a challenge-bound proof signs:
///
/// ```text
/// meshwire-auth-v1\n<audience>\n<METHOD>\n<path>\n<nonce>\n<did>\n<hex sha256(body)>
/// ```
///
/// (no trailing newline). Every field is checked first, so no field can
/// contain a line break and the lines cannot be shifted.
pub fn challenge_message(request: &ChallengeRequest<'_>) -> Result<String, ChallengeError> {
    check_audience(request.audience)?;
    check_method(request.method)?;
    check_path(request.path)?;
    check_nonce(request.nonce)?;
    let did = Did::parse(request.did)?;
    Ok(format!(
        "{CHALLENGE_DOMAIN}\n{}\n{}\n{}\n{}\n{}\n{}",
        request.audience,
        request.method,
        request.path,
        request.nonce,
        did,
        sha256_hex(request.body)
    ))
}

/// Reads signed bytes back into their fields (the inverse of
/// [`challenge_message`], for other runtimes' tests and for debugging).
pub fn parse_challenge_message(bytes: &[u8]) -> Result<ChallengeFields, ChallengeError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ChallengeError::Message("not UTF-8"))?;
    let lines: Vec<&str> = text.split('\n').collect();
    let [domain, audience, method, path, nonce, did, body] = lines.as_slice() else {
        return Err(ChallengeError::Message("expected exactly 7 lines"));
    };
    if *domain != CHALLENGE_DOMAIN {
        return Err(ChallengeError::Message("unknown domain line"));
    }
    check_audience(audience)?;
    check_method(method)?;
    check_path(path)?;
    check_nonce(nonce)?;
    let did = Did::parse(did)?;
    if body.len() != 64 || !body.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(field_err("body", "must be 64 lowercase hex characters"));
    }
    Ok(ChallengeFields {
        audience: (*audience).to_owned(),
        method: (*method).to_owned(),
        path: (*path).to_owned(),
        nonce: (*nonce).to_owned(),
        did,
        body_sha256: (*body).to_owned(),
    })
}

/// Signs `request` with `identity` (whose DID must be `request.did`).
pub fn sign_challenge(identity: &Identity, request: &ChallengeRequest<'_>) -> Result<[u8; 64], ChallengeError> {
    if request.did != identity.did().as_str() {
        return Err(field_err("did", "is not the signing identity's DID"));
    }
    Ok(identity.sign(challenge_message(request)?.as_bytes()))
}

/// Verifies a challenge-bound signature under `key`. The caller checks
/// that `request.did` derives from `key`, that the nonce is one it issued
/// and still valid, and that the audience is its own.
pub fn verify_challenge(
    key: &Ed25519PublicKey,
    request: &ChallengeRequest<'_>,
    signature: &[u8],
) -> Result<(), ChallengeError> {
    let message = challenge_message(request)?;
    verify_signature(key, message.as_bytes(), signature).map_err(|_| ChallengeError::BadSignature)
}

/// `Meshwire-Challenge <did> <nonce> <audience> <base64url signature>` for
/// `request`.
pub fn challenge_header(identity: &Identity, request: &ChallengeRequest<'_>) -> Result<String, ChallengeError> {
    let signature = sign_challenge(identity, request)?;
    Ok(format!(
        "{CHALLENGE_SCHEME} {} {} {} {}",
        identity.did(),
        request.nonce,
        request.audience,
        b64_url(&signature)
    ))
}

/// A parsed, not yet verified, `Meshwire-Challenge` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeHeader {
    /// The DID the request claims.
    pub did: Did,
    /// The nonce the proof is bound to.
    pub nonce: String,
    /// The origin the client signed for (checked by the server against its
    /// own).
    pub audience: String,
    /// The decoded signature (64 bytes).
    pub signature: Vec<u8>,
}

impl ChallengeHeader {
    /// Whether an `Authorization` value uses the challenge scheme.
    pub fn is_challenge(value: &str) -> bool {
        value
            .strip_prefix(CHALLENGE_SCHEME)
            .is_some_and(|rest| rest.starts_with(' '))
    }

    /// Parses `Meshwire-Challenge <did> <nonce> <audience> <signature>`
    /// (single spaces; the signature base64, either alphabet).
    pub fn parse(value: &str) -> Result<Self, ChallengeError> {
        let rest = value
            .strip_prefix(CHALLENGE_SCHEME)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or(ChallengeError::Header)?;
        let parts: Vec<&str> = rest.split(' ').collect();
        let [did, nonce, audience, signature] = parts.as_slice() else {
            return Err(ChallengeError::Header);
        };
        check_nonce(nonce)?;
        check_audience(audience)?;
        let signature = b64_decode(signature).map_err(|_| ChallengeError::Encoding)?;
        if signature.len() != 64 {
            return Err(ChallengeError::Encoding);
        }
        Ok(Self {
            did: Did::parse(did)?,
            nonce: (*nonce).to_owned(),
            audience: (*audience).to_owned(),
            signature,
        })
    }
}

/// The origin of a URL, normalized: lowercase `scheme://host[:port]` with
/// the scheme's default port (80 for `http`/`ws`, 443 for `https`/`wss`)
/// dropped and path, query and fragment removed. Only `http`, `https`,
/// `ws` and `wss` are origins here; user info is refused.
pub fn normalize_origin(url: &str) -> Result<String, ChallengeError> {
    let (scheme, rest) = url.split_once("://").ok_or(ChallengeError::Origin("missing scheme"))?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" | "ws" => "80",
        "https" | "wss" => "443",
        _ => return Err(ChallengeError::Origin("scheme must be http, https, ws or wss")),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = rest.get(..end).unwrap_or(rest).to_ascii_lowercase();
    if authority.contains('@') {
        return Err(ChallengeError::Origin("user info is not allowed"));
    }
    let (host, port) = split_authority(&authority)?;
    match port {
        Some(port) if port != default_port => Ok(format!("{scheme}://{host}:{port}")),
        _ => Ok(format!("{scheme}://{host}")),
    }
}

/// Splits `host[:port]` (IPv6 hosts in brackets); the port, if any, is
/// decimal without leading zeros.
fn split_authority(authority: &str) -> Result<(&str, Option<&str>), ChallengeError> {
    let (host, port) = if authority.starts_with('[') {
        let close = authority
            .find(']')
            .ok_or(ChallengeError::Origin("unclosed IPv6 bracket"))?;
        let (host, after) = authority.split_at(close + 1);
        match after {
            "" => (host, None),
            _ => (
                host,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or(ChallengeError::Origin("junk after IPv6 host"))?,
                ),
            ),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(ChallengeError::Origin("empty host"));
    }
    let valid_host = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':');
    if !host.bytes().all(valid_host) {
        return Err(ChallengeError::Origin("invalid host character"));
    }
    if let Some(port) = port {
        let digits = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
        if !digits || port.parse::<u16>().is_err() || (port.len() > 1 && port.starts_with('0')) {
            return Err(ChallengeError::Origin("invalid port"));
        }
    }
    Ok((host, port))
}

/// Splits a normalized origin into its scheme and `host[:port]`.
pub fn origin_parts(origin: &str) -> Option<(&str, &str)> {
    origin.split_once("://")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::b64_std;

    const TS: &str = "2026-11-21T12:00:00.000Z";

    fn now() -> Timestamp {
        Timestamp::parse_iso(TS).unwrap()
    }

    #[test]
    fn header_round_trip_and_failures() {
        let id = Identity::from_seed(&[4; 32]);
        let header = AuthHeader::parse(&ed25519_timestamp_header(&id, TS)).unwrap();
        assert_eq!(&header.did, id.did());
        header.verify(&id.ed25519_public(), now()).unwrap();
        assert_eq!(
            header.verify(&id.ed25519_public(), now().plus_ms(REPLAY_WINDOW_MS + 1)),
            Err(AuthError::Stale)
        );
        let other = Identity::from_seed(&[5; 32]);
        assert_eq!(
            header.verify(&other.ed25519_public(), now()),
            Err(AuthError::BadSignature)
        );
        assert_eq!(AuthHeader::parse("Bearer x"), Err(AuthError::Missing));
        assert_eq!(
            AuthHeader::parse("Ed25519-Timestamp did:mesh:a"),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            AuthHeader::parse("Ed25519-Timestamp did:mesh:a ts !!"),
            Err(AuthError::Encoding)
        );
        let bad_ts = AuthHeader {
            timestamp: "yesterday".into(),
            ..header
        };
        assert_eq!(bad_ts.verify(&id.ed25519_public(), now()), Err(AuthError::Timestamp));
    }

    #[test]
    fn registration_and_connect_proofs() {
        let id = Identity::from_seed(&[6; 32]);
        let (key, proof) = registration_proof(&id, TS);
        let (_, did) = verify_registration_proof(&key, &proof, TS, now()).unwrap();
        assert_eq!(&did, id.did());
        assert_eq!(
            verify_registration_proof(&key, &proof, "2026-11-21T12:00:00.001Z", now()),
            Err(AuthError::BadSignature)
        );
        let sig = b64_std(&id.sign(TS.as_bytes()));
        let key_std = b64_std(id.ed25519_public().as_bytes());
        assert_eq!(
            &verify_connect_proof(id.did().as_str(), &key_std, TS, &sig, now()).unwrap(),
            id.did()
        );
        let other = Identity::from_seed(&[7; 32]);
        assert_eq!(
            verify_connect_proof(other.did().as_str(), &key_std, TS, &sig, now()),
            Err(AuthError::PublicKey)
        );
        assert_eq!(
            verify_connect_proof(id.did().as_str(), &key_std, TS, &sig, now().plus_ms(400_000)),
            Err(AuthError::Stale)
        );
    }

    fn request<'a>(did: &'a str, nonce: &'a str) -> ChallengeRequest<'a> {
        ChallengeRequest {
            audience: "https://reg.example",
            method: "PUT",
            path: "/v1/agents/x/prekeys?a=1",
            nonce,
            did,
            body: b"{}",
        }
    }

    #[test]
    fn challenge_message_round_trip_and_verification() {
        let id = Identity::from_seed(&[8; 32]);
        let did = id.did().to_string();
        let req = request(&did, "bm9uY2U");
        let message = challenge_message(&req).unwrap();
        assert_eq!(message.lines().count(), 7);
        assert!(message.starts_with("meshwire-auth-v1\nhttps://reg.example\nPUT\n/v1/agents/x/prekeys?a=1\nbm9uY2U\n"));
        let fields = parse_challenge_message(message.as_bytes()).unwrap();
        assert_eq!((fields.method.as_str(), fields.did.as_str()), ("PUT", did.as_str()));
        let sig = sign_challenge(&id, &req).unwrap();
        verify_challenge(&id.ed25519_public(), &req, &sig).unwrap();
        // Every bound field changes the bytes.
        for other in [
            ChallengeRequest {
                audience: "https://other.example",
                ..req
            },
            ChallengeRequest { method: "POST", ..req },
            ChallengeRequest {
                path: "/v1/agents/y/prekeys?a=1",
                ..req
            },
            ChallengeRequest {
                nonce: "bm9uY2V",
                ..req
            },
            ChallengeRequest { body: b"{ }", ..req },
        ] {
            assert_eq!(
                verify_challenge(&id.ed25519_public(), &other, &sig),
                Err(ChallengeError::BadSignature)
            );
        }
        let header = ChallengeHeader::parse(&challenge_header(&id, &req).unwrap()).unwrap();
        assert_eq!(header.signature, sig.to_vec());
        assert_eq!(header.audience, "https://reg.example");
        assert!(ChallengeHeader::is_challenge("Meshwire-Challenge x"));
        assert!(!ChallengeHeader::is_challenge("Meshwire-ChallengeX x"));
        // Signing for another DID is refused.
        let other = Identity::from_seed(&[9; 32]).did().to_string();
        assert!(sign_challenge(&id, &request(&other, "bm9uY2U")).is_err());
    }

    #[test]
    fn no_field_can_shift_the_lines() {
        let id = Identity::from_seed(&[8; 32]);
        let did = id.did().to_string();
        let req = request(&did, "bm9uY2U");
        for bad in [
            ChallengeRequest {
                audience: "https://reg.example\nPUT",
                ..req
            },
            ChallengeRequest {
                method: "PUT\n/x",
                ..req
            },
            ChallengeRequest { method: "put", ..req },
            ChallengeRequest { path: "/a\nb", ..req },
            ChallengeRequest { path: "/a b", ..req },
            ChallengeRequest { path: "a", ..req },
            ChallengeRequest { nonce: "a\nb", ..req },
            ChallengeRequest { nonce: "", ..req },
            ChallengeRequest {
                did: "did:mesh:x\ny",
                ..req
            },
            ChallengeRequest {
                audience: "https://Reg.example",
                ..req
            },
        ] {
            assert!(challenge_message(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_challenge_message(b"meshwire-auth-v1\na"),
            Err(ChallengeError::Message("expected exactly 7 lines"))
        );
        assert!(ChallengeHeader::parse("Meshwire-Challenge a b").is_err());
    }

    #[test]
    fn origins_normalize() {
        for (input, expected) in [
            ("WSS://Relay.Example.com:443/ws?x", "wss://relay.example.com"),
            ("http://127.0.0.1:8765", "http://127.0.0.1:8765"),
            ("http://h:80/", "http://h"),
            ("https://[::1]:8443/p", "https://[::1]:8443"),
            ("ws://h#frag", "ws://h"),
        ] {
            assert_eq!(normalize_origin(input).unwrap(), expected, "{input}");
        }
        for bad in [
            "ftp://h",
            "h",
            "http://",
            "http://u@h",
            "http://h:99999",
            "http://h:0080",
            "http://h:x",
            "http://[::1",
        ] {
            assert!(normalize_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn challenge_connect_frames_sign_the_upgrade_target() {
        let id = Identity::from_seed(&[8; 32]);
        let did = id.did().to_string();
        let frame =
            crate::frames::ConnectFrame::challenge_for_url(&id, "WSS://Relay.Example:443/ws?v=1#f", "bm9uY2U").unwrap();
        assert_eq!(frame.audience.as_deref(), Some("wss://relay.example"));
        assert_eq!(frame.auth_scheme.as_deref(), Some(CHALLENGE_AUTH_SCHEME));
        assert_eq!(frame.timestamp, None);
        let signature = b64_decode(frame.signature.as_deref().unwrap()).unwrap();
        let request = ChallengeRequest {
            audience: "wss://relay.example",
            method: "GET",
            path: "/ws?v=1",
            nonce: "bm9uY2U",
            did: &did,
            body: b"",
        };
        verify_challenge(&id.ed25519_public(), &request, &signature).unwrap();
        // The optional fields survive the frame parser.
        let text = crate::frames::to_text(&frame);
        match crate::frames::Frame::parse(&text, 1 << 20).unwrap() {
            crate::frames::Frame::Connect(parsed) => assert_eq!(parsed, frame),
            other => panic!("{other:?}"),
        }
        let bare = crate::frames::ConnectFrame::challenge_for_url(&id, "ws://h:8080", "bm9uY2U").unwrap();
        let signature = b64_decode(bare.signature.as_deref().unwrap()).unwrap();
        let request = ChallengeRequest {
            audience: "ws://h:8080",
            path: "/",
            ..request
        };
        verify_challenge(&id.ed25519_public(), &request, &signature).unwrap();
    }
}
