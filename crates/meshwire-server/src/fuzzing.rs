//! Entry points of the fuzz targets (`fuzz/fuzz_targets/relay_connect.rs`,
//! `registry_request.rs`) and of their stable corpus replay test
//! (`tests/fuzz_corpus_replay.rs`). Not a stable API. Each function panics
//! when an invariant breaks; anything else it is given must be handled.
//!
//! Both run against a server at the fixed time [`NOW`], with fixed
//! identities ([`identity`] 1 = alice, registered; 2 = bob, registered with
//! a pre-key bundle) and a fixed challenge secret and nonce ([`NONCE_RANDOM`]),
//! so that seed inputs can carry valid proofs.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use crate::challenge::NONCE_LEN;
use crate::config::{ChallengeSecret, ManualClock, ServerConfig};
use crate::registry::store::install_signed_pre_key;
use crate::relay::{check_connect, classify, close_code, proof, Incoming};
use crate::server::Server;
use crate::storage::{AgentRecord, OneTimeKey, SignedPreKey};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use meshwire_proto::binding::check_identity_keys;
use meshwire_proto::encoding::b64_decode;
use meshwire_proto::identity::verify_signature;
use meshwire_proto::keys::{Ed25519PublicKey, X25519PublicKey};
use meshwire_proto::time::Timestamp;
use meshwire_proto::{Did, Identity, PreKeys, X25519Secret};
use serde_json::Value;
use tower::ServiceExt;

/// The server clock of every fuzz run.
pub const NOW: &str = "2026-11-21T12:00:00.000Z";
/// The random part of the relay nonce of every fuzz run.
pub const NONCE_RANDOM: [u8; 16] = [0x5a; 16];
/// The challenge secret of every fuzz run.
pub const SECRET: [u8; 32] = [0x42; 32];
/// The relay's public origin in the challenge form (also the `Host`).
pub const RELAY_HOST: &str = "relay.test:8765";

/// Fixed identity `n` (1: alice, 2: bob).
pub fn identity(n: u8) -> Identity {
    Identity::from_seed(&[n; 32])
}

fn now() -> Timestamp {
    Timestamp::parse_iso(NOW).unwrap_or_default()
}

fn config(flags: u8) -> ServerConfig {
    ServerConfig {
        require_challenge: flags & 1 != 0,
        allow_unauthenticated_did: flags & 2 != 0,
        relay_token: (flags & 4 != 0).then(|| "token".to_owned()),
        challenge_secret: Some(ChallengeSecret::new(SECRET)),
        max_one_time_keys: 8,
        ..ServerConfig::default()
    }
    .with_clock(ManualClock::new(now()))
}

/// The nonce the relay sends in the upgrade answer of a fuzz run.
pub fn relay_nonce() -> String {
    let server = Server::new(config(0));
    server.shared().challenges.issue_with(now(), NONCE_RANDOM).0
}

/// Relay first frame and frames after it. Byte 0 picks the configuration
/// (bit 0 `require_challenge`, bit 1 `allow_unauthenticated_did`, bit 2 a
/// relay token `token`); the rest is the frame text (UTF-8, lossy).
///
/// Invariants: an accepted frame's `from` derives from its `public_key`
/// (unless unauthenticated DIDs are allowed), in the challenge form carries
/// the connection's nonce, and was a timestamp form only if allowed;
/// rejections use the connect close codes; a routed frame's `from` is the
/// connection's DID and its `to`/`id` are non-empty.
///
/// Returns the accepted DID or the close code (`None` for empty input).
pub fn relay_frames(data: &[u8]) -> Option<Result<String, u16>> {
    let (&flags, rest) = data.split_first()?;
    let text = String::from_utf8_lossy(rest);
    let server = Server::new(config(flags));
    let shared = server.shared();
    let nonce = shared.challenges.issue_with(now(), NONCE_RANDOM).0;
    let upgrade = proof::Upgrade {
        nonce: nonce.clone(),
        host: Some(RELAY_HOST.to_owned()),
        target: "/ws".to_owned(),
    };
    let outcome = check_connect(shared, &upgrade, &text, now());
    match &outcome {
        Ok((did, proven)) => {
            let frame: Value = serde_json::from_str(&text).expect("accepted frames are JSON");
            assert_eq!(frame["from"].as_str(), Some(did.as_str()));
            if shared.config.allow_unauthenticated_did {
                assert!(proven.is_none());
            } else {
                let proven = proven.as_ref().expect("an authenticated connect has a proof");
                let key = b64_decode(frame["public_key"].as_str().expect("public_key")).expect("base64 key");
                let key = Ed25519PublicKey::from_slice(&key).expect("32-byte key");
                assert!(
                    Did::parse(did).expect("valid DID").is_derived_from(&key),
                    "DID not bound to key"
                );
                if frame.get("auth_scheme").is_some() {
                    assert_eq!(frame["nonce"].as_str(), Some(nonce.as_str()));
                    assert_eq!(proven.id.len(), NONCE_LEN);
                } else {
                    assert!(
                        !shared.config.require_challenge,
                        "timestamp form accepted under require_challenge"
                    );
                    assert_eq!(proven.id.len(), 64);
                }
            }
            if flags & 4 != 0 {
                assert_eq!(frame["token"].as_str(), Some("token"));
            }
        }
        Err(rejection) => {
            assert!(
                [
                    close_code::CONNECT_REQUIRED,
                    close_code::MISSING_FROM,
                    close_code::AUTH_FAILED,
                    close_code::PROOF_FAILED
                ]
                .contains(&rejection.code),
                "unexpected close code {}",
                rejection.code
            );
            assert!(!rejection.detail.is_empty());
        }
    }
    let sender = identity(1).did().to_string();
    match classify(&sender, &text, shared.config.max_frame_bytes) {
        Incoming::Route { to, id, stamped, .. } => {
            assert!(!to.is_empty() && !id.is_empty());
            let forwarded = stamped.as_deref().unwrap_or(&text);
            let frame: Value = serde_json::from_str(forwarded).expect("routed frames are JSON");
            assert_eq!(frame["from"].as_str(), Some(sender.as_str()));
            assert_eq!(frame["to"].as_str(), Some(to.as_str()));
            assert_eq!(frame["id"].as_str(), Some(id.as_str()));
        }
        Incoming::Error(detail) => assert!(!detail.is_empty()),
        _ => {}
    }
    Some(outcome.map(|(did, _)| did).map_err(|r| r.code))
}

fn registry_server(flags: u8) -> Server {
    let server = Server::new(config(flags & 1));
    let store = std::sync::Arc::clone(&server.storage().registry);
    let alice = identity(1);
    let bob = identity(2);
    let keys = PreKeys::with_signed_pre_key(&bob, 7, X25519Secret::from_bytes([9; 32]));
    let bundle = keys.bundle(&bob, None);
    runtime().block_on(async move {
        for id in [&alice, &bob] {
            let mut record = AgentRecord::new(
                id.did().to_string(),
                Some(*id.ed25519_public().as_bytes()),
                vec!["fuzz".to_owned()],
                Default::default(),
                now(),
            );
            if id.did() == bob.did() {
                record.identity_key = Some(*bundle.identity_key.as_bytes());
                record.identity_key_ed = Some(*bundle.identity_key_ed.as_bytes());
                let spk = SignedPreKey {
                    key_id: 7.into(),
                    public_key: *bundle.signed_pre_key.as_bytes(),
                    signature: bundle.signed_pre_key_signature,
                };
                install_signed_pre_key(&mut record, spk, now(), 0);
            }
            store.create_agent(record, u64::MAX).await.expect("memory store");
        }
        let otk = OneTimeKey {
            key_id: 1.into(),
            public_key: [3; 32],
        };
        store
            .set_one_time_keys(bob.did().as_str(), vec![otk])
            .await
            .expect("memory store");
    });
    server
}

/// Parses `METHOD TARGET\nName: value\n...\n\nbody` (lossy UTF-8 in the
/// head; the body is raw bytes).
fn parse_request(data: &[u8]) -> Option<Request<Body>> {
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (head, body) = match split {
        Some(at) => (data.get(..at)?, data.get(at + 2..)?),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split('\n');
    let (method, target) = lines.next()?.split_once(' ')?;
    let mut builder = Request::builder().method(method).uri(target);
    for line in lines {
        if let Some((name, value)) = line.split_once(": ") {
            builder = builder.header(name, value);
        }
    }
    builder.body(Body::from(body.to_vec())).ok()
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

/// One registry request, through the real router. Byte 0: bit 0
/// `require_challenge`; the rest is `METHOD TARGET`, header lines and a
/// blank line before the body (see `parse_request`).
///
/// Invariants: the answer is never a 5xx other than 503, its body is JSON
/// (or empty for 204); and whatever was accepted, every stored bundle is
/// the registered agent's: its identity keys derive the agent's DID and
/// its signed pre-key verifies under them.
///
/// Returns the status (`None` when the input is no request).
pub fn registry_request(data: &[u8]) -> Option<u16> {
    let (&flags, rest) = data.split_first()?;
    let request = parse_request(rest)?;
    let server = registry_server(flags);
    let router = server.router();
    let (status, body) = runtime().block_on(async move {
        let response = router.oneshot(request).await.expect("infallible router");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("bounded body");
        (status, body)
    });
    assert!(
        !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
        "server error {status}: {}",
        String::from_utf8_lossy(&body)
    );
    if status != StatusCode::NO_CONTENT && status != StatusCode::SWITCHING_PROTOCOLS {
        assert!(
            serde_json::from_slice::<Value>(&body).is_ok(),
            "{status} body is not JSON: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let store = std::sync::Arc::clone(&server.storage().registry);
    let agents = runtime().block_on(async move {
        let mut agents = Vec::new();
        for id in [identity(1), identity(2)] {
            if let Some(agent) = store.get_agent(id.did().as_str()).await.expect("memory store") {
                agents.push(agent);
            }
        }
        agents
    });
    for agent in &agents {
        let (Some(signing), Some(spk)) = (agent.signing_key, &agent.signed_pre_key) else {
            continue;
        };
        let signing = Ed25519PublicKey::from_bytes(signing);
        let did = Did::parse(&agent.did).expect("registered DIDs are valid");
        let x = X25519PublicKey::from_bytes(agent.identity_key.expect("identity key stored with the bundle"));
        check_identity_keys(&did, &signing, &x).expect("stored identity keys are the agent's");
        if let Some(ed) = agent.identity_key_ed {
            assert_eq!(ed, *signing.as_bytes(), "stored Ed25519 key is the agent's");
        }
        verify_signature(&signing, &spk.public_key, &spk.signature).expect("stored signed pre-key verifies");
    }
    Some(status.as_u16())
}
