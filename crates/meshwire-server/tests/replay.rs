//! Attacks on proofs of possession and on the registry's pre-keys (issue 8):
//! each test performs the attack and shows it failing, with the state left
//! as it was.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{
    expect_error, fresh_auth, fresh_connect, fresh_ts, identity, iso_at, message, prekey_upload, recv_close, recv_json,
    recv_text, send, TestServer,
};
use meshwire_proto::auth::ed25519_timestamp_header;
use meshwire_proto::encoding::{b64_decode, b64_std, b64_url};
use meshwire_proto::{Identity, PreKeyBundle};
use meshwire_server::{close_code, ServerConfig};
use serde_json::{json, Value};
use std::time::Duration;

async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn detail(text: &str) -> Value {
    json!({ "detail": text })
}

async fn put_prekeys(t: &TestServer, did: &str, header: &str, body: &Value) -> (u16, Value) {
    let response = t
        .http
        .put(t.url(&format!("/v1/agents/{did}/prekeys")))
        .header("Authorization", header)
        .json(body)
        .send()
        .await
        .unwrap();
    status_and_json(response).await
}

async fn bundle_status(t: &TestServer, id: &Identity) -> u16 {
    t.get(&format!("/v1/agents/{}/prekeys", id.did()))
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_replayed_connect_frame_does_not_displace_the_live_socket() {
    let t = TestServer::start().await;
    let alice = identity(1);
    let bob = identity(2);
    let mut bob_ws = t.connect(&bob).await;

    let frame = fresh_connect(&alice);
    let mut live = t.ws().await;
    send(&mut live, &frame).await;
    t.wait_connected(&alice).await;

    // The attacker replays the byte-identical frame on a new socket.
    let mut replay = t.ws().await;
    send(&mut replay, &frame).await;
    expect_error(
        &mut replay,
        "DID proof failed: proof already used (replayed connect frame)",
    )
    .await;
    assert_eq!(
        recv_close(&mut replay).await,
        (close_code::PROOF_FAILED, "replayed proof".to_owned())
    );

    // Alice's socket is still the live one and still gets her mail.
    let text = message(&bob, &alice, "still-mine");
    send(&mut bob_ws, &text).await;
    assert_eq!(recv_text(&mut live).await, text);
    assert_eq!(t.server.stats().connected_agents, 2);
    assert_eq!(t.server.stats().replayed_proofs_refused, 1);

    // Re-encoding the signature in the other base64 alphabet is the same proof.
    let mut variant: Value = serde_json::from_str(&frame).unwrap();
    let sig = b64_decode(variant["signature"].as_str().unwrap()).unwrap();
    variant["signature"] = json!(b64_url(&sig));
    let mut replay = t.ws().await;
    send(&mut replay, &variant.to_string()).await;
    let error = recv_json(&mut replay).await;
    assert_eq!(
        error["detail"],
        "DID proof failed: proof already used (replayed connect frame)"
    );

    // Only a proof never seen before takes over (4006).
    let mut second = t.ws().await;
    send(&mut second, &fresh_connect(&alice)).await;
    assert_eq!(
        recv_close(&mut live).await,
        (close_code::SESSION_REPLACED, "session_replaced".to_owned())
    );
}

#[tokio::test]
async fn a_connect_signature_is_no_registry_header() {
    let t = TestServer::start().await;
    let alice = identity(1);
    assert_eq!(t.register(&alice, &[]).await.status(), 201);
    let ts = fresh_ts();
    let frame: Value = serde_json::to_value(meshwire_proto::frames::ConnectFrame::new(&alice, &ts)).unwrap();
    let mut ws = t.ws().await;
    send(&mut ws, &frame.to_string()).await;
    t.wait_connected(&alice).await;

    // The relay-observed (timestamp, signature), rebuilt as a header, in both
    // alphabets: refused, and the pre-keys stay absent.
    let sig = b64_decode(frame["signature"].as_str().unwrap()).unwrap();
    let (body, _) = prekey_upload(&alice, 1);
    for encoded in [b64_url(&sig), b64_std(&sig)] {
        let header = format!("Ed25519-Timestamp {} {ts} {encoded}", alice.did());
        assert_eq!(
            put_prekeys(&t, alice.did().as_str(), &header, &body).await,
            (401, detail("Proof already used: replayed Ed25519-Timestamp signature"))
        );
    }
    assert_eq!(bundle_status(&t, &alice).await, 404);

    // The other way round: a registry header rebuilt as a connect frame.
    let header_ts = fresh_ts();
    let header = ed25519_timestamp_header(&alice, &header_ts);
    assert_eq!(put_prekeys(&t, alice.did().as_str(), &header, &body).await.0, 200);
    let mut ws2 = t.ws().await;
    send(
        &mut ws2,
        &meshwire_proto::frames::to_text(&meshwire_proto::frames::ConnectFrame::new(&alice, &header_ts)),
    )
    .await;
    let error = recv_json(&mut ws2).await;
    assert_eq!(
        error["detail"],
        "DID proof failed: proof already used (replayed connect frame)"
    );
    // The live connection was not displaced.
    assert_eq!(t.server.server().connected_dids(), [alice.did().to_string()]);
}

#[tokio::test]
async fn a_registry_header_works_once() {
    let t = TestServer::start().await;
    let alice = identity(1);
    t.register(&alice, &[]).await;
    let header = fresh_auth(&alice);
    let (first, _) = prekey_upload(&alice, 2);
    assert_eq!(put_prekeys(&t, alice.did().as_str(), &header, &first).await.0, 200);
    let before = t
        .get(&format!("/v1/agents/{}", alice.did()))
        .await
        .json::<Value>()
        .await
        .unwrap();

    // The same header again (here with other, valid, keys of alice's).
    let (second, _) = prekey_upload(&alice, 5);
    assert_eq!(
        put_prekeys(&t, alice.did().as_str(), &header, &second).await,
        (401, detail("Proof already used: replayed Ed25519-Timestamp signature"))
    );
    let after = t
        .get(&format!("/v1/agents/{}", alice.did()))
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(after["otk_count"], 2);
    assert_eq!(before, after);

    // Same for any authenticated endpoint: a heartbeat header twice.
    let beat = |header: String| {
        t.http
            .post(t.url(&format!("/v1/agents/{}/heartbeat", alice.did())))
            .header("Authorization", header)
            .send()
    };
    let header = fresh_auth(&alice);
    assert_eq!(beat(header.clone()).await.unwrap().status(), 200);
    t.clock.advance(Duration::from_secs(11));
    let (status, got) = status_and_json(beat(header).await.unwrap()).await;
    assert_eq!(
        (status, got),
        (401, detail("Proof already used: replayed Ed25519-Timestamp signature"))
    );
    assert_eq!(t.server.stats().replayed_proofs_refused, 2);
}

#[tokio::test]
async fn proofs_are_forgotten_only_once_stale_and_the_window_is_configurable() {
    let t = TestServer::with_config(ServerConfig {
        replay_window: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let alice = identity(1);
    t.register(&alice, &[]).await;
    let (body, _) = prekey_upload(&alice, 0);
    // 3 s old: outside a 2 s window.
    let old = ed25519_timestamp_header(&alice, &iso_at(-3_000));
    assert_eq!(
        put_prekeys(&t, alice.did().as_str(), &old, &body).await,
        (401, detail("Timestamp outside replay window"))
    );
    let header = ed25519_timestamp_header(&alice, &iso_at(1_000));
    assert_eq!(put_prekeys(&t, alice.did().as_str(), &header, &body).await.0, 200);
    let live = t.server.stats().live_proofs;
    assert!(live >= 2, "registration and header remembered ({live})");
    // Still inside its window: still refused.
    t.clock.advance(Duration::from_millis(2_900));
    assert_eq!(put_prekeys(&t, alice.did().as_str(), &header, &body).await.0, 401);
    // Once out of the window it is stale anyway, and forgotten.
    t.clock.advance(Duration::from_millis(200));
    assert_eq!(
        put_prekeys(&t, alice.did().as_str(), &header, &body).await,
        (401, detail("Timestamp outside replay window"))
    );
    let fresh = ed25519_timestamp_header(&alice, &iso_at(3_100));
    assert_eq!(put_prekeys(&t, alice.did().as_str(), &fresh, &body).await.0, 200);
    assert_eq!(t.server.stats().live_proofs, 1, "expired proofs were pruned");
}

#[tokio::test]
async fn a_full_proof_memory_refuses_new_proofs_and_evicts_nothing() {
    let t = TestServer::with_config(ServerConfig {
        max_live_proofs: 2,
        ..Default::default()
    })
    .await;
    let alice = identity(1);
    let bob = identity(2);
    let carol = identity(3);
    let frame = fresh_connect(&alice);
    let mut a = t.ws().await;
    send(&mut a, &frame).await;
    t.wait_connected(&alice).await;
    let _b = t.connect(&bob).await;

    let mut c = t.ws().await;
    send(&mut c, &fresh_connect(&carol)).await;
    let error = recv_json(&mut c).await;
    assert_eq!(
        error["detail"],
        "DID proof failed: too many live proofs (2); retry later"
    );
    assert_eq!(
        recv_close(&mut c).await,
        (close_code::PROOF_FAILED, "proof memory full".to_owned())
    );
    // Registration is a proof too: 503 while full.
    let (status, got) = status_and_json(t.register(&carol, &[]).await).await;
    assert_eq!(
        (status, got),
        (
            503,
            detail("Cannot accept new proofs now (too many live proofs (2); retry later)")
        )
    );
    // Nothing was evicted: alice's frame is still a replay.
    let mut replay = t.ws().await;
    send(&mut replay, &frame).await;
    let error = recv_json(&mut replay).await;
    assert_eq!(
        error["detail"],
        "DID proof failed: proof already used (replayed connect frame)"
    );
    let stats = t.server.stats();
    assert_eq!(
        (
            stats.live_proofs,
            stats.proofs_refused_full,
            stats.replayed_proofs_refused
        ),
        (2, 2, 1)
    );
}

#[tokio::test]
async fn one_agent_cannot_fill_the_memory_for_everyone() {
    let t = TestServer::with_config(ServerConfig {
        max_live_proofs_per_did: 2,
        ..Default::default()
    })
    .await;
    let alice = identity(1);
    let bob = identity(2);
    t.register(&alice, &[]).await; // one proof
    let beat = |header: String| {
        t.http
            .get(t.url(&format!("/v1/agents/{}/prekeys", alice.did())))
            .header("Authorization", header)
            .send()
    };
    let _ = beat(fresh_auth(&alice)).await.unwrap(); // two
    let response = t
        .http
        .delete(t.url(&format!("/v1/agents/{}", alice.did())))
        .header("Authorization", fresh_auth(&alice))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    // Others are not affected.
    assert_eq!(t.register(&bob, &[]).await.status(), 201);
}

// ── Pre-key uploads must be the registered agent's keys ─────────────

#[tokio::test]
async fn uploads_of_another_identitys_keys_are_refused() {
    let t = TestServer::start().await;
    let alice = identity(1);
    let mallory = identity(66);
    t.register(&alice, &[]).await;
    t.register(&mallory, &[]).await;
    let (genuine, _) = prekey_upload(&alice, 1);
    let (forged, _) = prekey_upload(&mallory, 1);
    let a = alice.did().as_str();

    // All of mallory's keys under alice's DID (uploaded with a valid header
    // of alice's, e.g. one obtained from a compromised registry client).
    assert_eq!(
        put_prekeys(&t, a, &fresh_auth(&alice), &forged).await,
        (
            403,
            detail(
                "Invalid pre-key bundle: identity_key_ed is not the registered identity key of this agent \
                 (the identity key does not derive the DID (sha256 mismatch))"
            )
        )
    );
    // Alice's Ed25519 key but mallory's X25519 identity key.
    let mut body = genuine.clone();
    body["identity_key"] = forged["identity_key"].clone();
    assert_eq!(
        put_prekeys(&t, a, &fresh_auth(&alice), &body).await,
        (
            403,
            detail(
                "Invalid pre-key bundle: identity_key is not the registered identity key of this agent \
                 (the X25519 identity key is not the Ed25519 key's Montgomery image)"
            )
        )
    );
    // Without identity_key_ed, the X25519 key is still checked.
    body.as_object_mut().unwrap().remove("identity_key_ed");
    assert_eq!(put_prekeys(&t, a, &fresh_auth(&alice), &body).await.0, 403);
    // Alice's identity keys with mallory's signed pre-key.
    let mut body = genuine.clone();
    body["signed_pre_key"] = forged["signed_pre_key"].clone();
    assert_eq!(
        put_prekeys(&t, a, &fresh_auth(&alice), &body).await,
        (
            400,
            detail("Invalid pre-key bundle: signed_pre_key.signature does not verify under the agent's identity key")
        )
    );
    // Nothing was stored by any of them.
    assert_eq!(bundle_status(&t, &alice).await, 404);
    assert_eq!(put_prekeys(&t, a, &fresh_auth(&alice), &genuine).await.0, 200);
    let text = t.get(&format!("/v1/agents/{a}/prekeys")).await.text().await.unwrap();
    PreKeyBundle::from_json(&text).unwrap().verify_for(alice.did()).unwrap();
}

#[tokio::test]
async fn uploads_carry_only_the_protocol_fields_within_limits() {
    let t = TestServer::start().await;
    let alice = identity(1);
    t.register(&alice, &[]).await;
    let a = alice.did().as_str();
    let (good, _) = prekey_upload(&alice, 1);
    let cases = [
        (
            "/one_time_pre_keys/0",
            "blob",
            json!("x".repeat(10_000)),
            "Invalid pre-key bundle: one_time_pre_keys[0] has unknown field 'blob' (allowed: key_id, public_key)",
        ),
        (
            "/signed_pre_key",
            "note",
            json!(1),
            "Invalid pre-key bundle: signed_pre_key has unknown field 'note' (allowed: key_id, public_key, signature)",
        ),
        (
            "/one_time_pre_keys/0",
            "key_id",
            json!(1u64 << 40),
            "Invalid pre-key bundle: one_time_pre_keys[0].key_id must be between 0 and 4294967295",
        ),
        (
            "/signed_pre_key",
            "key_id",
            json!(-1),
            "Invalid pre-key bundle: signed_pre_key.key_id must be between 0 and 4294967295",
        ),
    ];
    for (pointer, field, value, message) in cases {
        let mut body = good.clone();
        body.pointer_mut(pointer).unwrap()[field] = value;
        assert_eq!(
            put_prekeys(&t, a, &fresh_auth(&alice), &body).await,
            (400, detail(message)),
            "{pointer}/{field}"
        );
    }
    assert_eq!(bundle_status(&t, &alice).await, 404);
    // Bundles serve one-time keys with exactly the protocol's fields.
    assert_eq!(put_prekeys(&t, a, &fresh_auth(&alice), &good).await.0, 200);
    let bundle: Value = t.get(&format!("/v1/agents/{a}/prekeys")).await.json().await.unwrap();
    let otk = bundle["one_time_pre_key"].as_object().unwrap();
    assert_eq!(otk.keys().collect::<Vec<_>>(), ["key_id", "public_key"]);
}

// ── Signed pre-key rotation, one-time key count, fetch rate limit ────

#[tokio::test]
async fn a_rotated_signed_pre_key_is_served_and_the_previous_one_retained_14_days() {
    let t = TestServer::start().await;
    let alice = identity(1);
    t.register(&alice, &[]).await;
    let a = alice.did().as_str();
    let mut keys = meshwire_proto::PreKeys::generate(&mut rand_core::OsRng, &alice);
    let upload = |keys: &meshwire_proto::PreKeys| {
        let bundle = keys.bundle(&alice, None);
        json!({
            "identity_key": b64_url(bundle.identity_key.as_bytes()),
            "identity_key_ed": b64_url(bundle.identity_key_ed.as_bytes()),
            "signed_pre_key": {
                "key_id": bundle.signed_pre_key_id,
                "public_key": b64_url(bundle.signed_pre_key.as_bytes()),
                "signature": b64_url(&bundle.signed_pre_key_signature),
            },
            "one_time_pre_keys": [],
        })
    };
    assert_eq!(put_prekeys(&t, a, &fresh_auth(&alice), &upload(&keys)).await.0, 200);
    let new_id = keys.rotate_signed_pre_key(&mut rand_core::OsRng, &alice, 0);
    assert_eq!(new_id, 1);
    assert_eq!(put_prekeys(&t, a, &fresh_auth(&alice), &upload(&keys)).await.0, 200);

    let text = t.get(&format!("/v1/agents/{a}/prekeys")).await.text().await.unwrap();
    let served = PreKeyBundle::from_json(&text).unwrap();
    assert_eq!(served.signed_pre_key_id, 1);
    assert_eq!(served, keys.bundle(&alice, None));
    let agent: Value = t.get(&format!("/v1/agents/{a}")).await.json().await.unwrap();
    assert_eq!(
        (
            agent["signed_pre_key_id"].clone(),
            agent["previous_signed_pre_key_id"].clone()
        ),
        (json!(1), json!(0))
    );

    // Re-uploading the same id is no rotation.
    assert_eq!(put_prekeys(&t, a, &fresh_auth(&alice), &upload(&keys)).await.0, 200);
    let agent: Value = t.get(&format!("/v1/agents/{a}")).await.json().await.unwrap();
    assert_eq!(agent["previous_signed_pre_key_id"], 0);
    // The previous key is dropped after 14 days.
    t.clock.advance(Duration::from_secs(14 * 24 * 3600 + 1));
    let agent: Value = t.get(&format!("/v1/agents/{a}")).await.json().await.unwrap();
    assert_eq!(agent["previous_signed_pre_key_id"], Value::Null);
    assert_eq!(agent["signed_pre_key_id"], 1);
}

#[tokio::test]
async fn the_registry_reports_how_many_one_time_keys_it_holds() {
    let t = TestServer::start().await;
    let alice = identity(1);
    t.register(&alice, &[]).await;
    let a = alice.did().as_str();
    let agent: Value = t.get(&format!("/v1/agents/{a}")).await.json().await.unwrap();
    assert_eq!(
        (agent["otk_count"].clone(), agent["signed_pre_key_id"].clone()),
        (json!(0), Value::Null)
    );
    t.upload_prekeys(&alice, 3).await;
    let _ = t.get(&format!("/v1/agents/{a}/prekeys")).await;
    let agent: Value = t.get(&format!("/v1/agents/{a}")).await.json().await.unwrap();
    assert_eq!(agent["otk_count"], 2);
}

#[tokio::test]
async fn bundle_fetches_are_rate_limited_per_requester() {
    let t = TestServer::with_config(ServerConfig {
        bundle_fetches_per_minute: 3,
        // The test's requests come from 127.0.0.1.
        rate_limit_loopback: true,
        ..Default::default()
    })
    .await;
    let alice = identity(1);
    let bob = identity(2);
    t.register(&alice, &[]).await;
    t.register(&bob, &[]).await;
    t.upload_prekeys(&alice, 10).await;
    let path = format!("/v1/agents/{}/prekeys", alice.did());
    for _ in 0..3 {
        assert_eq!(t.get(&path).await.status(), 200);
    }
    // The fourth drain attempt from this IP gets 429 and no key.
    let response = t.get(&path).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "20");
    assert_eq!(
        status_and_json(response).await.1,
        detail("Too many pre-key bundle fetches; retry after 20 s")
    );
    assert_eq!(t.server.stats().bundle_fetches_limited, 1);
    let agent: Value = t
        .get(&format!("/v1/agents/{}", alice.did()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(agent["otk_count"], 7);
    // An authenticated requester has its own budget.
    let response = t
        .http
        .get(t.url(&path))
        .header("Authorization", fresh_auth(&bob))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The IP's budget refills: one fetch per 20 s.
    t.clock.advance(Duration::from_secs(20));
    assert_eq!(t.get(&path).await.status(), 200);
    assert_eq!(t.get(&path).await.status(), 429);
}

#[tokio::test]
async fn loopback_fetches_are_not_limited_by_default() {
    let t = TestServer::with_config(ServerConfig {
        bundle_fetches_per_minute: 1,
        ..Default::default()
    })
    .await;
    let alice = identity(1);
    t.register(&alice, &[]).await;
    t.upload_prekeys(&alice, 0).await;
    for _ in 0..5 {
        assert_eq!(
            t.get(&format!("/v1/agents/{}/prekeys", alice.did())).await.status(),
            200
        );
    }
    assert_eq!(t.server.stats().bundle_fetches_limited, 0);
}
