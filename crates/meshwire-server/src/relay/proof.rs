//! Proof of possession on `connect` frames: AGT's timestamp form and
//! meshwire's challenge-bound form.

use crate::challenge::{audience_ok, Challenges, Service};
use crate::config::ServerConfig;
use crate::util::{parse_iso, IsoError};
#[cfg(test)]
use meshwire_proto::auth::REPLAY_WINDOW_MS;
use meshwire_proto::auth::{
    verify_challenge, verify_connect_proof_within, AuthError, ChallengeRequest, CHALLENGE_AUTH_SCHEME,
};
use meshwire_proto::encoding::b64_decode;
use meshwire_proto::keys::Ed25519PublicKey;
use meshwire_proto::time::Timestamp;
use meshwire_proto::Did;
use serde_json::{Map, Value};

/// A proof that verified, to be claimed in the once-only memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Proof {
    /// What is claimed: the decoded signature (timestamp form) or the
    /// decoded nonce (challenge form).
    pub(crate) id: Vec<u8>,
    /// Until when the proof could pass the checks again.
    pub(crate) expires_at: Timestamp,
}

/// Checks `from`, `public_key` (standard base64), `timestamp` and
/// `signature` (over utf8(timestamp)): the DID must derive from the key and
/// the timestamp must be within `window_ms` of `now`. The error is the
/// reference's reason text (sent as `DID proof failed: <reason>`).
pub(crate) fn check_connect_proof(
    frame: &Map<String, Value>,
    now: Timestamp,
    window_ms: u64,
) -> Result<Proof, &'static str> {
    let field = |name: &str| frame.get(name).and_then(Value::as_str);
    let (Some(did), Some(public_key), Some(timestamp), Some(signature)) = (
        field("from"),
        field("public_key"),
        field("timestamp"),
        field("signature"),
    ) else {
        return Err("connect frame missing did/public_key/timestamp/signature");
    };
    let key = b64_decode(public_key).map_err(|_| "invalid public_key encoding")?;
    let key = Ed25519PublicKey::from_slice(&key).map_err(|_| "public_key must be 32 bytes")?;
    if Did::from_public_key(&key).as_str() != did {
        return Err("DID does not match public_key (sha256 mismatch)");
    }
    let ts = parse_iso(timestamp).map_err(|e| match e {
        IsoError::Invalid => "invalid timestamp format",
        IsoError::Naive => "timestamp must include timezone offset",
    })?;
    if ts.abs_diff(now) > window_ms {
        return Err("timestamp outside replay window");
    }
    let id = match b64_decode(signature) {
        Ok(bytes) if bytes.len() == 64 => bytes,
        _ => return Err("signature verification failed"),
    };
    verify_connect_proof_within(did, public_key, timestamp, signature, now, window_ms).map_err(|e| match e {
        AuthError::BadSignature => "invalid signature",
        AuthError::Stale => "timestamp outside replay window",
        AuthError::PublicKey | AuthError::Did(_) => "DID does not match public_key (sha256 mismatch)",
        _ => "signature verification failed",
    })?;
    Ok(Proof {
        id,
        expires_at: ts.plus_ms(window_ms),
    })
}

/// What the relay knows of the WebSocket upgrade a `connect` frame came on.
#[derive(Debug, Clone)]
pub(crate) struct Upgrade {
    /// The nonce sent in the 101's `x-meshwire-challenge` header.
    pub(crate) nonce: String,
    /// The request's `Host` header.
    pub(crate) host: Option<String>,
    /// The upgrade request's path and query, as received.
    pub(crate) target: String,
}

/// Checks a challenge-bound `connect` (`auth_scheme`
/// `meshwire-challenge-v1`): the nonce must be the one this connection's
/// upgrade carried (and still valid), the audience this relay, the DID
/// derived from `public_key`, and `signature` (base64, either alphabet)
/// over the challenge message of (audience, `GET`, upgrade target, nonce,
/// DID, empty body).
pub(crate) fn check_challenge_proof(
    frame: &Map<String, Value>,
    upgrade: &Upgrade,
    challenges: &Challenges,
    config: &ServerConfig,
    now: Timestamp,
) -> Result<Proof, &'static str> {
    let field = |name: &str| frame.get(name).and_then(Value::as_str);
    if field("auth_scheme") != Some(CHALLENGE_AUTH_SCHEME) {
        return Err("unsupported auth_scheme");
    }
    let (Some(did), Some(public_key), Some(nonce), Some(audience), Some(signature)) = (
        field("from"),
        field("public_key"),
        field("nonce"),
        field("audience"),
        field("signature"),
    ) else {
        return Err("challenge connect frame missing from/public_key/nonce/audience/signature");
    };
    if !crate::util::constant_time_eq(nonce.as_bytes(), upgrade.nonce.as_bytes()) {
        return Err("nonce is not the one issued for this connection");
    }
    let valid = challenges
        .check(nonce, now)
        .map_err(|_| "challenge nonce expired or invalid")?;
    if !audience_ok(config, Service::Relay, audience, upgrade.host.as_deref()) {
        return Err("audience is not this relay");
    }
    let key = b64_decode(public_key).map_err(|_| "invalid public_key encoding")?;
    let key = Ed25519PublicKey::from_slice(&key).map_err(|_| "public_key must be 32 bytes")?;
    if Did::from_public_key(&key).as_str() != did {
        return Err("DID does not match public_key (sha256 mismatch)");
    }
    let signature = match b64_decode(signature) {
        Ok(bytes) if bytes.len() == 64 => bytes,
        _ => return Err("signature verification failed"),
    };
    let request = ChallengeRequest {
        audience,
        method: "GET",
        path: &upgrade.target,
        nonce,
        did,
        body: b"",
    };
    verify_challenge(&key, &request, &signature).map_err(|_| "invalid challenge signature")?;
    Ok(Proof {
        id: valid.bytes,
        expires_at: valid.expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwire_proto::frames::ConnectFrame;
    use meshwire_proto::Identity;

    const TS: &str = "2026-11-21T12:00:00.000Z";

    fn frame(identity: &Identity, ts: &str) -> Map<String, Value> {
        match serde_json::to_value(ConnectFrame::new(identity, ts)) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        }
    }

    #[test]
    fn reasons() {
        let id = Identity::from_seed(&[3; 32]);
        let now = Timestamp::parse_iso(TS).unwrap_or_default();
        let check = |f: &Map<String, Value>, now: Timestamp| check_connect_proof(f, now, REPLAY_WINDOW_MS).map(drop);
        let proof = check_connect_proof(&frame(&id, TS), now, REPLAY_WINDOW_MS).unwrap();
        assert_eq!(proof.id, id.sign(TS.as_bytes()));
        assert_eq!(proof.expires_at, now.plus_ms(REPLAY_WINDOW_MS));
        assert_eq!(
            check(&frame(&id, TS), now.plus_ms(REPLAY_WINDOW_MS + 1)),
            Err("timestamp outside replay window")
        );
        let mut f = frame(&id, TS);
        f.insert("from".into(), Value::from("did:mesh:0000"));
        assert_eq!(check(&f, now), Err("DID does not match public_key (sha256 mismatch)"));
        let mut f = frame(&id, TS);
        f.insert("timestamp".into(), Value::from("2026-11-21T12:00:01.000Z"));
        assert_eq!(check(&f, now), Err("invalid signature"));
        let mut f = frame(&id, TS);
        f.insert("timestamp".into(), Value::from("2026-11-21T12:00:00"));
        assert_eq!(check(&f, now), Err("timestamp must include timezone offset"));
        let mut f = frame(&id, TS);
        f.remove("signature");
        assert_eq!(
            check(&f, now),
            Err("connect frame missing did/public_key/timestamp/signature")
        );
        let mut f = frame(&id, TS);
        f.insert("public_key".into(), Value::from("AAAA"));
        assert_eq!(check(&f, now), Err("public_key must be 32 bytes"));
    }
}
