//! Registry authentication: the `Authorization: Ed25519-Timestamp` header and
//! the registration proof of possession, both sides.

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
    #[error("missing or invalid Authorization header")]
    Missing,
    #[error("malformed Ed25519-Timestamp header")]
    Malformed,
    #[error("invalid DID: {0}")]
    Did(#[from] crate::identity::DidError),
    #[error("invalid timestamp format")]
    Timestamp,
    #[error("timestamp outside the replay window")]
    Stale,
    #[error("invalid signature encoding")]
    Encoding,
    #[error("invalid public key")]
    PublicKey,
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
    pub did: Did,
    pub timestamp: String,
    pub signature: Vec<u8>,
}

impl AuthHeader {
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
        check_fresh(&self.timestamp, now)?;
        verify_signature(key, self.timestamp.as_bytes(), &self.signature).map_err(|_| AuthError::BadSignature)
    }
}

fn check_fresh(timestamp: &str, now: Timestamp) -> Result<(), AuthError> {
    let ts = Timestamp::parse_iso(timestamp).map_err(|_| AuthError::Timestamp)?;
    if ts.abs_diff(now) > REPLAY_WINDOW_MS {
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
    let key = b64_decode(public_key_b64).map_err(|_| AuthError::PublicKey)?;
    let key = Ed25519PublicKey::from_slice(&key).map_err(|_| AuthError::PublicKey)?;
    check_fresh(timestamp, now)?;
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
    let key = b64_decode(public_key_b64).map_err(|_| AuthError::PublicKey)?;
    let key = Ed25519PublicKey::from_slice(&key).map_err(|_| AuthError::PublicKey)?;
    let did = Did::parse(did)?;
    if !did.is_derived_from(&key) {
        return Err(AuthError::PublicKey);
    }
    check_fresh(timestamp, now)?;
    let signature = b64_decode(signature_b64).map_err(|_| AuthError::Encoding)?;
    verify_signature(&key, timestamp.as_bytes(), &signature).map_err(|_| AuthError::BadSignature)?;
    Ok(did)
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
}
