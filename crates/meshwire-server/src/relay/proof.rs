//! Proof of possession on `connect` frames.

use crate::util::{parse_iso, IsoError};
use meshwire_proto::auth::{verify_connect_proof, AuthError, REPLAY_WINDOW_MS};
use meshwire_proto::encoding::b64_decode;
use meshwire_proto::keys::Ed25519PublicKey;
use meshwire_proto::time::Timestamp;
use meshwire_proto::Did;
use serde_json::{Map, Value};

/// Checks `from`, `public_key` (standard base64), `timestamp` and
/// `signature` (over utf8(timestamp)): the DID must derive from the key and
/// the timestamp must be within the replay window of `now`. The error is the
/// reference's reason text (sent as `DID proof failed: <reason>`).
pub(crate) fn check_connect_proof(frame: &Map<String, Value>, now: Timestamp) -> Result<(), &'static str> {
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
    if ts.abs_diff(now) > REPLAY_WINDOW_MS {
        return Err("timestamp outside replay window");
    }
    match b64_decode(signature) {
        Ok(bytes) if bytes.len() == 64 => {}
        _ => return Err("signature verification failed"),
    }
    verify_connect_proof(did, public_key, timestamp, signature, now).map_err(|e| match e {
        AuthError::BadSignature => "invalid signature",
        AuthError::Stale => "timestamp outside replay window",
        AuthError::PublicKey | AuthError::Did(_) => "DID does not match public_key (sha256 mismatch)",
        _ => "signature verification failed",
    })?;
    Ok(())
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
        assert_eq!(check_connect_proof(&frame(&id, TS), now), Ok(()));
        assert_eq!(
            check_connect_proof(&frame(&id, TS), now.plus_ms(REPLAY_WINDOW_MS + 1)),
            Err("timestamp outside replay window")
        );
        let mut f = frame(&id, TS);
        f.insert("from".into(), Value::from("did:mesh:0000"));
        assert_eq!(
            check_connect_proof(&f, now),
            Err("DID does not match public_key (sha256 mismatch)")
        );
        let mut f = frame(&id, TS);
        f.insert("timestamp".into(), Value::from("2026-11-21T12:00:01.000Z"));
        assert_eq!(check_connect_proof(&f, now), Err("invalid signature"));
        let mut f = frame(&id, TS);
        f.insert("timestamp".into(), Value::from("2026-11-21T12:00:00"));
        assert_eq!(
            check_connect_proof(&f, now),
            Err("timestamp must include timezone offset")
        );
        let mut f = frame(&id, TS);
        f.remove("signature");
        assert_eq!(
            check_connect_proof(&f, now),
            Err("connect frame missing did/public_key/timestamp/signature")
        );
        let mut f = frame(&id, TS);
        f.insert("public_key".into(), Value::from("AAAA"));
        assert_eq!(check_connect_proof(&f, now), Err("public_key must be 32 bytes"));
    }
}
