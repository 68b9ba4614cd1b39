//! The registry over HTTP, against a started server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{identity, iso_at, prekey_upload, TestServer, NOW};
use meshwire_proto::auth::{ed25519_timestamp_header, registration_proof};
use meshwire_proto::PreKeyBundle;
use meshwire_server::ServerConfig;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;

async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"))
    };
    (status, value)
}

fn detail(text: &str) -> Value {
    json!({ "detail": text })
}

#[tokio::test]
async fn registration_with_proof() {
    let t = TestServer::start().await;
    let alice = identity(1);
    let (status, body) = status_and_json(t.register(&alice, &["chat"]).await).await;
    assert_eq!(status, 201);
    assert_eq!(body, json!({"did": alice.did().as_str(), "status": "registered"}));

    let (status, body) = status_and_json(t.get(&format!("/v1/agents/{}", alice.did())).await).await;
    assert_eq!(status, 200);
    assert_eq!(body["did"], alice.did().as_str());
    assert_eq!(body["capabilities"], json!(["chat"]));
    assert_eq!(body["registered_at"], "2026-11-21T12:00:00+00:00");
    assert_eq!(body["reputation_score"], 0.5);
    assert_eq!(body["tier"], "anonymous");
    assert_eq!(body["completion_rate"], Value::Null);
    // Metadata keeps the order it was sent in, like a Python dict.
    let text = t
        .get(&format!("/v1/agents/{}", alice.did()))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(r#""metadata":{"name":"test","zeta":"1","alpha":"2"}"#),
        "{text}"
    );

    let (status, body) = status_and_json(t.register(&alice, &["chat"]).await).await;
    assert_eq!((status, body), (409, detail("Agent already registered")));

    let (status, body) = status_and_json(t.get("/v1/agents/did:mesh:nobody").await).await;
    assert_eq!((status, body), (404, detail("Agent not found")));
}

#[tokio::test]
async fn registration_failures() {
    let t = TestServer::start().await;
    let alice = identity(1);
    let mallory = identity(2);

    // Proof signed by another key.
    let mut body = TestServer::registration_body(&alice, NOW, &[]);
    body["proof"] = json!(registration_proof(&mallory, NOW).1);
    let (status, got) = status_and_json(t.post_json("/v1/agents", &body).await).await;
    assert_eq!((status, got), (401, detail("Invalid proof-of-possession")));

    // Proof over a different timestamp than the one sent.
    let mut body = TestServer::registration_body(&alice, NOW, &[]);
    body["proof_timestamp"] = json!(iso_at(1000));
    let (status, got) = status_and_json(t.post_json("/v1/agents", &body).await).await;
    assert_eq!((status, got), (401, detail("Invalid proof-of-possession")));

    // Stale and future proofs: ±5 minutes.
    for offset in [-300_001, 300_001] {
        let body = TestServer::registration_body(&alice, &iso_at(offset), &[]);
        let (status, got) = status_and_json(t.post_json("/v1/agents", &body).await).await;
        assert_eq!((status, got), (401, detail("Proof timestamp outside replay window")));
    }
    let body = TestServer::registration_body(&alice, &iso_at(-300_000), &[]);
    assert_eq!(
        t.post_json("/v1/agents", &body).await.status(),
        201,
        "edge of the window"
    );

    let mut body = TestServer::registration_body(&mallory, NOW, &[]);
    body["public_key"] = json!("AAAA");
    let (status, got) = status_and_json(t.post_json("/v1/agents", &body).await).await;
    assert_eq!((status, got), (400, detail("public_key must be 32 bytes")));
    body["public_key"] = json!("!!!");
    let (status, got) = status_and_json(t.post_json("/v1/agents", &body).await).await;
    assert_eq!((status, got), (400, detail("Invalid public_key encoding")));

    let mut body = TestServer::registration_body(&mallory, NOW, &[]);
    body["proof"] = json!("AAAA");
    let (status, got) = status_and_json(t.post_json("/v1/agents", &body).await).await;
    assert_eq!((status, got), (400, detail("Malformed proof")));

    let mut body = TestServer::registration_body(&mallory, NOW, &[]);
    body["proof_timestamp"] = json!("not a time");
    let (status, got) = status_and_json(t.post_json("/v1/agents", &body).await).await;
    assert_eq!((status, got), (400, detail("Invalid proof_timestamp")));

    // Schema errors are FastAPI's 422 with a list of issues.
    let (status, got) = status_and_json(t.post_json("/v1/agents", &json!({"public_key": 5})).await).await;
    assert_eq!(status, 422);
    let issues = got["detail"].as_array().unwrap();
    let locs: Vec<&Value> = issues.iter().map(|i| &i["loc"]).collect();
    assert!(locs.contains(&&json!(["body", "public_key"])));
    assert!(locs.contains(&&json!(["body", "proof"])));
    assert!(locs.contains(&&json!(["body", "proof_timestamp"])));
    let response = t.http.post(t.url("/v1/agents")).body("{not json").send().await.unwrap();
    let (status, got) = status_and_json(response).await;
    assert_eq!(status, 422);
    assert_eq!(got["detail"][0]["type"], "json_invalid");

    // The legacy 4.0.0 body is not accepted unless configured.
    let legacy = json!({"did": mallory.did().as_str(), "public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"});
    assert_eq!(t.post_json("/v1/agents", &legacy).await.status(), 422);
}

#[tokio::test]
async fn prekeys_upload_and_fetch() {
    let t = TestServer::start().await;
    let bob = identity(3);
    t.register(&bob, &[]).await;

    let (status, body) = status_and_json(t.get(&format!("/v1/agents/{}/prekeys", bob.did())).await).await;
    assert_eq!((status, body), (404, detail("Pre-key bundle not found")));

    let (response, keys) = t.upload_prekeys(&bob, 2).await;
    let (status, body) = status_and_json(response).await;
    assert_eq!(
        (status, body),
        (200, json!({"did": bob.did().as_str(), "otk_count": 2}))
    );

    let mut seen = Vec::new();
    for _ in 0..2 {
        let text = t
            .get(&format!("/v1/agents/{}/prekeys", bob.did()))
            .await
            .text()
            .await
            .unwrap();
        // Python's field order and unpadded base64url.
        assert!(text.starts_with(r#"{"identity_key":""#), "{text}");
        assert!(!text.contains('='), "{text}");
        let bundle = PreKeyBundle::from_json(&text).unwrap();
        bundle.verify().unwrap();
        assert_eq!(bundle, keys.bundle(&bob, bundle.one_time_pre_key.map(|(id, _)| id)));
        seen.push(bundle.one_time_pre_key.unwrap().0);
    }
    assert_eq!(seen, [0, 1], "one-time keys are served first in, first out");
    let (_, body) = status_and_json(t.get(&format!("/v1/agents/{}/prekeys", bob.did())).await).await;
    assert_eq!(body["one_time_pre_key"], Value::Null);
    assert!(body.as_object().unwrap().contains_key("one_time_pre_key"));
}

#[tokio::test]
async fn concurrent_fetches_get_distinct_one_time_keys() {
    let t = TestServer::with_config(meshwire_server::ServerConfig {
        bundle_fetches_per_minute: 0,
        ..Default::default()
    })
    .await;
    let bob = identity(3);
    t.register(&bob, &[]).await;
    let (response, _) = t.upload_prekeys(&bob, 40).await;
    assert_eq!(response.status(), 200);

    let url = t.url(&format!("/v1/agents/{}/prekeys", bob.did()));
    let fetches = (0..60).map(|_| {
        let http = t.http.clone();
        let url = url.clone();
        tokio::spawn(async move { http.get(url).send().await.unwrap().json::<Value>().await.unwrap() })
    });
    let mut ids = Vec::new();
    let mut empty = 0;
    for fetch in fetches.collect::<Vec<_>>() {
        let body = fetch.await.unwrap();
        match &body["one_time_pre_key"] {
            Value::Null => empty += 1,
            otk => ids.push(otk["key_id"].as_u64().unwrap()),
        }
    }
    let distinct: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 40);
    assert_eq!(distinct.len(), 40, "every one-time key went to exactly one caller");
    assert_eq!(empty, 20);
}

#[tokio::test]
async fn prekey_bundles_with_wrong_lengths_are_400() {
    let t = TestServer::start().await;
    let bob = identity(3);
    t.register(&bob, &[]).await;
    let put = |body: Value| {
        t.http
            .put(t.url(&format!("/v1/agents/{}/prekeys", bob.did())))
            .header("Authorization", common::fresh_auth(&bob))
            .json(&body)
            .send()
    };
    let (good, _) = prekey_upload(&bob, 1);
    let short = "AAAA";

    let mut body = good.clone();
    body["identity_key_ed"] = json!(short);
    let (status, got) = status_and_json(put(body).await.unwrap()).await;
    assert_eq!(
        (status, got),
        (
            400,
            detail("Invalid pre-key bundle: 400: identity_key_ed must be exactly 32 bytes (Ed25519 public key)")
        )
    );
    for (pointer, message) in [
        ("/identity_key", "Invalid pre-key bundle: identity_key must be 32 bytes"),
        (
            "/signed_pre_key/public_key",
            "Invalid pre-key bundle: signed_pre_key.public_key must be 32 bytes",
        ),
        (
            "/signed_pre_key/signature",
            "Invalid pre-key bundle: signed_pre_key.signature must be 64 bytes",
        ),
        (
            "/one_time_pre_keys/0/public_key",
            "Invalid pre-key bundle: one_time_pre_keys[0].public_key must be 32 bytes",
        ),
    ] {
        let mut body = good.clone();
        *body.pointer_mut(pointer).unwrap() = json!(short);
        let (status, got) = status_and_json(put(body).await.unwrap()).await;
        assert_eq!((status, got), (400, detail(message)), "{pointer}");
    }
    let mut body = good.clone();
    body["signed_pre_key"].as_object_mut().unwrap().remove("key_id");
    let (status, got) = status_and_json(put(body).await.unwrap()).await;
    assert_eq!((status, got), (400, detail("Invalid pre-key bundle: 'key_id'")));

    // Nothing of the rejected uploads was stored.
    let (status, _) = status_and_json(t.get(&format!("/v1/agents/{}/prekeys", bob.did())).await).await;
    assert_eq!(status, 404);
    assert_eq!(put(good).await.unwrap().status(), 200);
}

#[tokio::test]
async fn authentication_failures() {
    let t = TestServer::start().await;
    let alice = identity(1);
    let bob = identity(2);
    let carol = identity(9); // never registered
    t.register(&alice, &[]).await;
    t.register(&bob, &[]).await;
    let heartbeat = |did: String, header: Option<String>| {
        let mut request = t.http.post(t.url(&format!("/v1/agents/{did}/heartbeat")));
        if let Some(header) = header {
            request = request.header("Authorization", header);
        }
        request.send()
    };
    let a = alice.did().to_string();

    let cases = [
        (None, 401, "Missing or invalid Authorization header"),
        (
            Some("Bearer abc".to_owned()),
            401,
            "Missing or invalid Authorization header",
        ),
        (
            Some("Ed25519-Timestamp x y".to_owned()),
            401,
            "Malformed Ed25519-Timestamp header",
        ),
        (
            Some(format!("Ed25519-Timestamp {a} yesterday sig")),
            401,
            "Invalid timestamp format",
        ),
        (
            Some(format!("Ed25519-Timestamp {a} 2026-11-21T12:00:00 sig")),
            401,
            "Timestamp must include timezone offset",
        ),
        (
            Some(ed25519_timestamp_header(&alice, &iso_at(-300_001))),
            401,
            "Timestamp outside replay window",
        ),
        (Some(common::fresh_auth(&carol)), 401, "Agent not registered"),
        (
            Some(common::fresh_auth(&alice).replace(&a, bob.did().as_str())),
            401,
            "Invalid signature",
        ),
        (
            Some(common::fresh_auth(&bob)),
            403,
            "Authenticated DID does not match heartbeat target",
        ),
    ];
    for (header, status, message) in cases {
        let (got_status, got) = status_and_json(heartbeat(a.clone(), header.clone()).await.unwrap()).await;
        assert_eq!((got_status, got), (status, detail(message)), "{header:?}");
    }

    // Pre-key upload for someone else's DID.
    let (body, _) = prekey_upload(&alice, 1);
    let response = t
        .http
        .put(t.url(&format!("/v1/agents/{a}/prekeys")))
        .header("Authorization", common::fresh_auth(&bob))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(status_and_json(response).await, (403, detail("DID mismatch")));
    // Without the header at all: FastAPI's 422 for a required header.
    let response = t
        .http
        .put(t.url(&format!("/v1/agents/{a}/prekeys")))
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, got) = status_and_json(response).await;
    assert_eq!(status, 422);
    assert_eq!(got["detail"][0]["loc"], json!(["header", "Authorization"]));

    // Deregistration: someone else's → 403; stale → 401; own → 204.
    let delete = |header: String| {
        t.http
            .delete(t.url(&format!("/v1/agents/{a}")))
            .header("Authorization", header)
            .send()
    };
    let (status, got) = status_and_json(delete(common::fresh_auth(&bob)).await.unwrap()).await;
    assert_eq!((status, got), (403, detail("DID mismatch")));
    let (status, got) = status_and_json(
        delete(ed25519_timestamp_header(&alice, &iso_at(400_000)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, got), (401, detail("Timestamp outside replay window")));
    let response = t.http.delete(t.url(&format!("/v1/agents/{a}"))).send().await.unwrap();
    assert_eq!(response.status(), 422);
    let response = delete(common::fresh_auth(&alice)).await.unwrap();
    assert_eq!(response.status(), 204);
    assert!(response.text().await.unwrap().is_empty());
    assert_eq!(t.get(&format!("/v1/agents/{a}")).await.status(), 404);
    // Replaying the first registration does not bring the agent back (its
    // proof was used); a fresh registration after deregistration works.
    let (status, got) = status_and_json(t.register(&alice, &[]).await).await;
    assert_eq!(
        (status, got),
        (401, detail("Proof already used: replayed registration proof"))
    );
    let fresh = TestServer::registration_body(&alice, &common::fresh_ts(), &[]);
    assert_eq!(t.post_json("/v1/agents", &fresh).await.status(), 201);
}

#[tokio::test]
async fn heartbeat_throttle_and_presence() {
    let t = TestServer::start().await;
    let alice = identity(1);
    t.register(&alice, &[]).await;
    let beat = || {
        t.http
            .post(t.url(&format!("/v1/agents/{}/heartbeat", alice.did())))
            .header("Authorization", common::fresh_auth(&alice))
            .send()
    };
    let presence = format!("/v1/agents/{}/presence", alice.did());

    t.clock.advance(Duration::from_secs(120));
    let (_, body) = status_and_json(t.get(&presence).await).await;
    assert_eq!(
        body,
        json!({"did": alice.did().as_str(), "last_seen": "2026-11-21T12:00:00+00:00", "online": false})
    );

    let (status, body) = status_and_json(beat().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"did": alice.did().as_str(), "last_seen": "2026-11-21T12:02:00+00:00"})
    );
    assert_eq!(status_and_json(t.get(&presence).await).await.1["online"], true);

    t.clock.advance(Duration::from_millis(9_999));
    let (status, body) = status_and_json(beat().await.unwrap()).await;
    assert_eq!((status, body), (429, detail("Heartbeat throttled; retry after 10s")));
    t.clock.advance(Duration::from_millis(1));
    assert_eq!(beat().await.unwrap().status(), 200);
}

#[tokio::test]
async fn discovery() {
    let t = TestServer::start().await;
    let (a, b, c) = (identity(1), identity(2), identity(3));
    t.register(&a, &["chat", "search"]).await;
    t.register(&b, &["search"]).await;
    t.register(&c, &["chat"]).await;

    let (status, body) = status_and_json(t.get("/v1/discover?capability=chat").await).await;
    assert_eq!(status, 200);
    assert_eq!(body["total"], 2);
    let results = body["results"].as_array().unwrap();
    assert_eq!(results[0]["did"], a.did().as_str(), "registration order");
    assert_eq!(results[1]["did"], c.did().as_str());
    assert_eq!(
        results[0],
        json!({
            "did": a.did().as_str(),
            "capabilities": ["chat", "search"],
            "reputation_score": 0.5,
            "last_seen": "2026-11-21T12:00:00+00:00",
            "metadata": {"name": "test", "zeta": "1", "alpha": "2"},
        })
    );

    let (_, body) = status_and_json(t.get("/v1/discover?capability=search&limit=1").await).await;
    assert_eq!(body["total"], 1);
    assert_eq!(body["results"][0]["did"], a.did().as_str());
    let (_, body) = status_and_json(t.get("/v1/discover?capability=none").await).await;
    assert_eq!(body, json!({"results": [], "total": 0}));

    for query in [
        "",
        "?limit=5",
        "?capability=chat&limit=0",
        "?capability=chat&limit=201",
        "?capability=chat&limit=x",
    ] {
        let (status, body) = status_and_json(t.get(&format!("/v1/discover{query}")).await).await;
        assert_eq!(status, 422, "{query}");
        assert!(body["detail"].is_array(), "{query}");
    }
}

#[tokio::test]
async fn reputation_and_unknown_routes() {
    let t = TestServer::start().await;
    let (a, b) = (identity(1), identity(2));
    t.register(&a, &[]).await;
    t.register(&b, &[]).await;
    let rate = |target: &str, score: Value, who: &meshwire_proto::Identity| {
        t.http
            .post(t.url(&format!("/v1/agents/{target}/reputation")))
            .header("Authorization", common::fresh_auth(who))
            .json(&json!({"score": score}))
            .send()
    };
    let (status, body) = status_and_json(rate(b.did().as_str(), json!(1.0), &a).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"did": b.did().as_str(), "reputation_score": 0.65}));
    let (status, body) = status_and_json(rate(a.did().as_str(), json!(1.0), &a).await.unwrap()).await;
    assert_eq!(
        (status, body),
        (403, detail("Agents may not submit reputation about themselves"))
    );
    assert_eq!(rate(b.did().as_str(), json!(1.5), &a).await.unwrap().status(), 422);
    let (_, agent) = status_and_json(t.get(&format!("/v1/agents/{}", b.did())).await).await;
    assert_eq!(agent["total_sessions"], 1);
    assert_eq!(agent["successful_sessions"], 1);
    assert_eq!(agent["completion_rate"], 1.0);

    let (status, body) = status_and_json(t.get("/v1/nothing").await).await;
    assert_eq!((status, body), (404, detail("Not Found")));
    let response = t.http.patch(t.url("/v1/agents")).send().await.unwrap();
    assert_eq!(status_and_json(response).await, (405, detail("Method Not Allowed")));
    let response = t
        .http
        .post(t.url("/v1/agents"))
        .header("Content-Type", "application/json")
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(status_and_json(response).await, (413, detail("Request body too large")));
    let (status, body) = status_and_json(t.get("/health").await).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "healthy");
}

#[tokio::test]
async fn legacy_registration_compat_mode() {
    let t = TestServer::with_config(ServerConfig {
        legacy_registration: true,
        ..ServerConfig::default()
    })
    .await;
    let legacy = identity(5);
    let x25519 = meshwire_proto::encoding::b64_std(legacy.x25519_public().as_bytes());
    let body = json!({"did": legacy.did().as_str(), "public_key": x25519, "capabilities": ["chat"], "metadata": {}});
    let (status, got) = status_and_json(t.post_json("/v1/agents", &body).await).await;
    assert_eq!(
        (status, got),
        (201, json!({"did": legacy.did().as_str(), "status": "registered"}))
    );
    assert_eq!(t.post_json("/v1/agents", &body).await.status(), 409);

    // 4.0.0 uploads pre-keys without an Authorization header.
    let (upload, _) = prekey_upload(&legacy, 1);
    let response = t
        .http
        .put(t.url(&format!("/v1/agents/{}/prekeys", legacy.did())))
        .json(&upload)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let bundle = t
        .get(&format!("/v1/agents/{}/prekeys", legacy.did()))
        .await
        .text()
        .await
        .unwrap();
    PreKeyBundle::from_json(&bundle).unwrap().verify().unwrap();

    // Agents registered with proof still need authentication.
    let proper = identity(6);
    t.register(&proper, &[]).await;
    let (upload, _) = prekey_upload(&proper, 1);
    let response = t
        .http
        .put(t.url(&format!("/v1/agents/{}/prekeys", proper.did())))
        .json(&upload)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);

    // The holder of the key behind a legacy-claimed DID can reclaim it.
    assert_eq!(t.register(&legacy, &["real"]).await.status(), 201);
    let (_, agent) = status_and_json(t.get(&format!("/v1/agents/{}", legacy.did())).await).await;
    assert_eq!(agent["capabilities"], json!(["real"]));
}

#[tokio::test]
async fn split_listeners() {
    let clock = meshwire_server::ManualClock::new(common::now());
    let server = meshwire_server::start_split(ServerConfig::default().with_clock(clock))
        .await
        .unwrap();
    assert_ne!(server.relay_addr(), server.registry_addr());
    let http = reqwest::Client::new();
    let registry: Value = http
        .get(format!("{}/health", server.registry_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        registry,
        json!({"status": "healthy", "service": "agentmesh-registry", "entra_verify_enabled": false})
    );
    let relay_health = format!("{}/health", server.relay_url().replacen("ws://", "http://", 1));
    let relay: Value = http.get(relay_health).send().await.unwrap().json().await.unwrap();
    assert_eq!(relay["service"], "agentmesh-relay");
    assert_eq!(relay["stats"]["messages_routed"], 0);
    let agents = format!(
        "{}/v1/discover?capability=x",
        server.relay_url().replacen("ws://", "http://", 1)
    );
    assert_eq!(
        http.get(agents).send().await.unwrap().status(),
        404,
        "no registry on the relay port"
    );
    server.shutdown().await;
}
