#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Replays every committed corpus file of the `relay_connect` and
//! `registry_request` fuzz targets (`fuzz/corpus/<target>/`) through the very
//! entry points the targets call (`meshwire_server::fuzzing`), on the stable
//! toolchain. A missing or empty corpus directory fails.
//!
//! `write_server_seed_corpora` (ignored) regenerates the hand-made seeds and
//! checks that they reach the paths they are meant for.

#[path = "../../../fuzz/corpus_walk.rs"]
mod corpus_walk;

use corpus_walk::{corpus_dir, replay};
use meshwire_proto::auth::{challenge_header, ed25519_timestamp_header, registration_proof, ChallengeRequest};
use meshwire_proto::encoding::b64_url;
use meshwire_proto::frames::{self, ConnectFrame};
use meshwire_server::fuzzing::{identity, registry_request, relay_frames, relay_nonce, NOW, RELAY_HOST};
use serde_json::json;

#[test]
fn relay_connect_corpus() {
    assert!(
        replay("relay_connect", |data| {
            relay_frames(data);
        }) > 0
    );
}

#[test]
fn registry_request_corpus() {
    assert!(
        replay("registry_request", |data| {
            registry_request(data);
        }) > 0
    );
}

fn with_flags(flags: u8, text: &str) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(text.as_bytes());
    out
}

fn request(flags: u8, head: &str, headers: &[(&str, String)], body: &str) -> Vec<u8> {
    let mut text = head.to_owned();
    for (name, value) in headers {
        text.push_str(&format!("\n{name}: {value}"));
    }
    text.push_str("\n\n");
    text.push_str(body);
    with_flags(flags, &text)
}

/// A pre-key upload body made entirely of `id`'s keys.
fn upload_body(id: &meshwire_proto::Identity) -> String {
    let mut keys =
        meshwire_proto::PreKeys::with_signed_pre_key(id, 3, meshwire_proto::X25519Secret::from_bytes([0x33; 32]));
    let ids = keys.generate_one_time_keys(&mut FixedRng(1), 2).unwrap();
    let bundle = keys.bundle(id, None);
    json!({
        "identity_key": b64_url(id.x25519_public().as_bytes()),
        "identity_key_ed": b64_url(id.ed25519_public().as_bytes()),
        "signed_pre_key": {
            "key_id": 3,
            "public_key": b64_url(bundle.signed_pre_key.as_bytes()),
            "signature": b64_url(&bundle.signed_pre_key_signature),
        },
        "one_time_pre_keys": ids.iter().map(|i| json!({
            "key_id": i,
            "public_key": b64_url(keys.one_time_key(*i).unwrap().public().as_bytes()),
        })).collect::<Vec<_>>(),
    })
    .to_string()
}

/// A deterministic RNG for seed keys.
struct FixedRng(u64);

impl rand_core::RngCore for FixedRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl rand_core::CryptoRng for FixedRng {}

fn write(target: &str, seeds: &[(&str, Vec<u8>)]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).unwrap();
    }
}

/// Hand-made seeds of both targets; each is checked to take the path it
/// is named for.
#[test]
#[ignore = "writes fuzz/corpus/{relay_connect,registry_request}; run by hand to regenerate the seeds"]
fn write_server_seed_corpora() {
    let alice = identity(1);
    let bob = identity(2);
    let mallory = identity(66);
    let a = alice.did().to_string();
    let nonce = relay_nonce();
    let connect = frames::to_text(&ConnectFrame::new(&alice, NOW));
    let challenge =
        frames::to_text(&ConnectFrame::challenge(&alice, &format!("ws://{RELAY_HOST}"), "/ws", &nonce).unwrap());
    let mut with_token: serde_json::Value = serde_json::from_str(&connect).unwrap();
    with_token["token"] = json!("token");
    let relay: Vec<(&str, Vec<u8>, Result<String, u16>)> = vec![
        ("connect-timestamp", with_flags(0, &connect), Ok(a.clone())),
        ("connect-challenge", with_flags(0, &challenge), Ok(a.clone())),
        ("connect-challenge-required", with_flags(1, &challenge), Ok(a.clone())),
        ("connect-timestamp-refused", with_flags(1, &connect), Err(4005)),
        (
            "connect-legacy",
            with_flags(2, &frames::to_text(&ConnectFrame::legacy(alice.did()))),
            Ok(a.clone()),
        ),
        ("connect-token", with_flags(4, &with_token.to_string()), Ok(a.clone())),
        ("connect-no-token", with_flags(4, &connect), Err(4003)),
        (
            "message",
            with_flags(
                0,
                &format!(
                    r#"{{"v":1,"type":"message","from":"{a}","to":"{}","id":"m1","ciphertext":"AA"}}"#,
                    bob.did()
                ),
            ),
            Err(4001),
        ),
        ("ack", with_flags(0, r#"{"type":"ack","id":"m1"}"#), Err(4001)),
        ("no-from", with_flags(0, r#"{"type":"connect"}"#), Err(4002)),
        ("junk", with_flags(0, "{\"type\":"), Err(4001)),
    ];
    for (name, data, expected) in &relay {
        assert_eq!(relay_frames(data), Some(expected.clone()), "{name}");
    }
    write(
        "relay_connect",
        &relay.iter().map(|(n, d, _)| (*n, d.clone())).collect::<Vec<_>>(),
    );

    let prekeys = format!("/v1/agents/{}/prekeys", alice.did());
    let auth = ed25519_timestamp_header(&alice, NOW);
    let json_type = ("Content-Type", "application/json".to_owned());
    let good = upload_body(&alice);
    let challenge_auth = |method: &str, path: &str, body: &str| {
        challenge_header(
            &alice,
            &ChallengeRequest {
                audience: "http://registry.test",
                method,
                path,
                nonce: &nonce,
                did: &a,
                body: body.as_bytes(),
            },
        )
        .unwrap()
    };
    let (public_key, proof) = registration_proof(&mallory, NOW);
    let registration = json!({"public_key": public_key, "proof": proof, "proof_timestamp": NOW, "capabilities": ["x"]});
    let registry: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "upload-timestamp",
            request(
                0,
                &format!("PUT {prekeys}"),
                &[("Authorization", auth.clone()), json_type.clone()],
                &good,
            ),
            200,
        ),
        (
            "upload-challenge",
            request(
                1,
                &format!("PUT {prekeys}"),
                &[
                    ("Authorization", challenge_auth("PUT", &prekeys, &good)),
                    ("Host", "registry.test".to_owned()),
                    json_type.clone(),
                ],
                &good,
            ),
            200,
        ),
        (
            "upload-other-identity",
            request(
                0,
                &format!("PUT {prekeys}"),
                &[("Authorization", auth.clone()), json_type.clone()],
                &upload_body(&mallory),
            ),
            403,
        ),
        (
            "upload-timestamp-required-challenge",
            request(
                1,
                &format!("PUT {prekeys}"),
                &[("Authorization", auth.clone()), json_type.clone()],
                &good,
            ),
            401,
        ),
        (
            "fetch-bundle",
            request(0, &format!("GET /v1/agents/{}/prekeys", bob.did()), &[], ""),
            200,
        ),
        (
            "get-agent",
            request(0, &format!("GET /v1/agents/{}", bob.did()), &[], ""),
            200,
        ),
        ("challenge", request(0, "GET /v1/auth/challenge", &[], ""), 200),
        (
            "heartbeat",
            request(
                0,
                &format!("POST /v1/agents/{}/heartbeat", alice.did()),
                &[("Authorization", auth.clone())],
                "",
            ),
            200,
        ),
        (
            "register",
            request(
                0,
                "POST /v1/agents",
                std::slice::from_ref(&json_type),
                &registration.to_string(),
            ),
            201,
        ),
        (
            "delete",
            request(
                0,
                &format!("DELETE /v1/agents/{}", alice.did()),
                &[("Authorization", auth.clone())],
                "",
            ),
            204,
        ),
        (
            "discover",
            request(0, "GET /v1/discover?capability=fuzz&limit=5", &[], ""),
            200,
        ),
        (
            "reputation",
            request(
                0,
                &format!("POST /v1/agents/{}/reputation", bob.did()),
                &[("Authorization", auth.clone()), json_type.clone()],
                r#"{"score":0.9}"#,
            ),
            200,
        ),
    ];
    for (name, data, expected) in &registry {
        assert_eq!(registry_request(data), Some(*expected), "{name}");
    }
    write(
        "registry_request",
        &registry.iter().map(|(n, d, _)| (*n, d.clone())).collect::<Vec<_>>(),
    );
}
