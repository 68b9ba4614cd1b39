//! Challenge nonces (docs/specs/MESHWIRE-CHALLENGE-AUTH.md): stateless,
//! verifiable by any instance that shares the secret, single use through
//! the once-only memory.
//!
//! A nonce is base64url (no padding) of 40 bytes:
//! `expiry_ms (u64 big-endian) || 16 random bytes || tag`, where `tag` is
//! the first 16 bytes of HMAC-SHA256(secret, "meshwire-nonce-v1" || expiry
//! || random). Issuing one stores nothing, so unauthenticated callers
//! cannot grow server state by asking for nonces.

use crate::config::{duration_ms, ChallengeSecret, ServerConfig};
use hmac::{Hmac, Mac};
use meshwire_proto::auth::{normalize_origin, origin_parts};
use meshwire_proto::encoding::{b64_decode, b64_url};
use meshwire_proto::time::Timestamp;
use rand_core::{OsRng, RngCore};
use sha2::Sha256;

const NONCE_DOMAIN: &[u8] = b"meshwire-nonce-v1";
const RANDOM_LEN: usize = 16;
const TAG_LEN: usize = 16;
/// Length of a decoded nonce.
pub(crate) const NONCE_LEN: usize = 8 + RANDOM_LEN + TAG_LEN;

/// A nonce was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NonceError {
    #[error("nonce is malformed")]
    Malformed,
    #[error("nonce was not issued by this server")]
    Forged,
    #[error("nonce expired")]
    Expired,
}

/// Issues and checks nonces.
pub(crate) struct Challenges {
    secret: ChallengeSecret,
    ttl_ms: u64,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("ttl_ms", &self.ttl_ms)
            .finish_non_exhaustive()
    }
}

/// A nonce checked valid: its expiry and decoded bytes (the key under
/// which its single use is recorded).
#[derive(Debug, Clone)]
pub(crate) struct ValidNonce {
    pub(crate) expires_at: Timestamp,
    pub(crate) bytes: Vec<u8>,
}

impl Challenges {
    pub(crate) fn new(config: &ServerConfig) -> Self {
        let secret = config.challenge_secret.clone().unwrap_or_else(|| {
            let mut bytes = [0u8; 32];
            OsRng.fill_bytes(&mut bytes);
            ChallengeSecret::new(bytes)
        });
        Self {
            secret,
            ttl_ms: duration_ms(config.challenge_ttl).max(1),
        }
    }

    fn tag(&self, head: &[u8]) -> [u8; TAG_LEN] {
        let mut tag = [0u8; TAG_LEN];
        // HMAC accepts keys of any length: new_from_slice cannot fail here.
        if let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(self.secret.0.as_ref()) {
            mac.update(NONCE_DOMAIN);
            mac.update(head);
            let full = mac.finalize().into_bytes();
            for (out, byte) in tag.iter_mut().zip(full.iter()) {
                *out = *byte;
            }
        }
        tag
    }

    /// A fresh nonce and its expiry.
    pub(crate) fn issue(&self, now: Timestamp) -> (String, Timestamp) {
        let mut random = [0u8; RANDOM_LEN];
        OsRng.fill_bytes(&mut random);
        self.issue_with(now, random)
    }

    /// The nonce with these random bytes (fixed in tests and fuzzing).
    pub(crate) fn issue_with(&self, now: Timestamp, random: [u8; RANDOM_LEN]) -> (String, Timestamp) {
        let expires_at = now.plus_ms(self.ttl_ms);
        let mut bytes = Vec::with_capacity(NONCE_LEN);
        bytes.extend_from_slice(&expires_at.0.to_be_bytes());
        bytes.extend_from_slice(&random);
        let tag = self.tag(&bytes);
        bytes.extend_from_slice(&tag);
        (b64_url(&bytes), expires_at)
    }

    /// Checks a nonce's format, tag and expiry.
    pub(crate) fn check(&self, nonce: &str, now: Timestamp) -> Result<ValidNonce, NonceError> {
        if nonce.len() > 64 {
            return Err(NonceError::Malformed);
        }
        let bytes = b64_decode(nonce).map_err(|_| NonceError::Malformed)?;
        if bytes.len() != NONCE_LEN {
            return Err(NonceError::Malformed);
        }
        let (head, tag) = bytes.split_at(8 + RANDOM_LEN);
        if !crate::util::constant_time_eq(&self.tag(head), tag) {
            return Err(NonceError::Forged);
        }
        let mut expiry = [0u8; 8];
        for (out, byte) in expiry.iter_mut().zip(head.iter()) {
            *out = *byte;
        }
        let expires_at = Timestamp(u64::from_be_bytes(expiry));
        if now.0 > expires_at.0 {
            return Err(NonceError::Expired);
        }
        Ok(ValidNonce { expires_at, bytes })
    }
}

/// Which service an audience is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    Relay,
    Registry,
}

/// Whether `audience` (as signed) names this server: one of the configured
/// public origins (a relay audience `ws(s)://h` also matches `http(s)://h`),
/// or, without configured origins, an origin of the service's schemes
/// whose `host[:port]` is the request's `Host` header.
pub(crate) fn audience_ok(config: &ServerConfig, service: Service, audience: &str, host: Option<&str>) -> bool {
    let Ok(normal) = normalize_origin(audience) else {
        return false;
    };
    if normal != audience {
        return false;
    }
    let Some((scheme, authority)) = origin_parts(&normal) else {
        return false;
    };
    let (plain, secure) = match service {
        Service::Relay => ("ws", "wss"),
        Service::Registry => ("http", "https"),
    };
    if scheme != plain && scheme != secure {
        return false;
    }
    if !config.public_origins.is_empty() {
        let as_http = match scheme {
            "ws" => "http",
            "wss" => "https",
            other => other,
        };
        return config.public_origins.iter().any(|origin| {
            normalize_origin(origin).is_ok_and(|o| o == normal || o == format!("{as_http}://{authority}"))
        });
    }
    let Some(host) = host else {
        return false;
    };
    // The Host header with the scheme's default port dropped, as the
    // audience is normalized.
    normalize_origin(&format!("{scheme}://{host}"))
        .ok()
        .and_then(|o| origin_parts(&o).map(|(_, a)| a == authority))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_verify_expire_and_resist_forgery() {
        let config = ServerConfig::default();
        let challenges = Challenges::new(&config);
        let now = Timestamp(1_000_000);
        let (nonce, expires) = challenges.issue(now);
        assert_eq!(expires, now.plus_ms(60_000));
        let valid = challenges.check(&nonce, now).unwrap();
        assert_eq!(valid.expires_at, expires);
        assert_eq!(
            challenges.check(&nonce, expires.plus_ms(1)).err(),
            Some(NonceError::Expired)
        );
        // Another instance with another secret does not accept it.
        let other = Challenges::new(&config);
        assert_eq!(other.check(&nonce, now).err(), Some(NonceError::Forged));
        // Extending the expiry breaks the tag.
        let mut bytes = b64_decode(&nonce).unwrap();
        bytes[0] ^= 1;
        assert_eq!(challenges.check(&b64_url(&bytes), now).err(), Some(NonceError::Forged));
        assert_eq!(challenges.check("abc", now).err(), Some(NonceError::Malformed));
        // A shared secret makes nonces portable between instances.
        let shared = ServerConfig {
            challenge_secret: Some(ChallengeSecret::new([7; 32])),
            ..ServerConfig::default()
        };
        let (nonce, _) = Challenges::new(&shared).issue(now);
        assert!(Challenges::new(&shared).check(&nonce, now).is_ok());
    }

    #[test]
    fn audiences() {
        let config = ServerConfig::default();
        let ok = |service, audience, host| audience_ok(&config, service, audience, host);
        assert!(ok(Service::Relay, "ws://127.0.0.1:9000", Some("127.0.0.1:9000")));
        assert!(ok(Service::Relay, "wss://relay.example", Some("relay.example:443")));
        assert!(ok(Service::Registry, "http://reg.example", Some("reg.example")));
        assert!(!ok(Service::Registry, "ws://reg.example", Some("reg.example")));
        assert!(!ok(Service::Relay, "ws://127.0.0.1:9001", Some("127.0.0.1:9000")));
        assert!(!ok(Service::Relay, "ws://127.0.0.1:9000", None));
        assert!(!ok(Service::Relay, "WS://127.0.0.1:9000", Some("127.0.0.1:9000")));
        let proxied = ServerConfig {
            public_origins: vec!["https://mesh.example.com".into()],
            ..ServerConfig::default()
        };
        assert!(audience_ok(
            &proxied,
            Service::Relay,
            "wss://mesh.example.com",
            Some("10.0.0.1:80")
        ));
        assert!(audience_ok(
            &proxied,
            Service::Registry,
            "https://mesh.example.com",
            None
        ));
        assert!(!audience_ok(
            &proxied,
            Service::Registry,
            "http://10.0.0.1",
            Some("10.0.0.1")
        ));
    }
}
