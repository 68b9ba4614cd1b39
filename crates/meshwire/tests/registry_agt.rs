#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The registry client: request bytes against the TypeScript client's
//! vectors, behaviour against the real AGT 5.0.0 registry (Python), and
//! retry/timeout/error handling against a scripted local HTTP server.

use meshwire::registry::{
    fetch_bundle_request, register_request, system_clock, upload_prekeys_request, Registration, RegistryClient,
    RegistryError, RegistryOptions,
};
use meshwire_proto::auth::AuthHeader;
use meshwire_proto::time::Timestamp;
use meshwire_proto::{Did, Identity, PreKeyError, PreKeys, X25519Secret};
use rand_core::OsRng;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod support;
use support::shared_vectors;

const FIXED_TS: &str = "2026-11-21T12:00:00.000Z";

// ── TypeScript request vectors ─────────────────────────────────────────

fn hex32(value: &Value) -> [u8; 32] {
    hex::decode(value.as_str().unwrap()).unwrap().try_into().unwrap()
}

/// The identity and pre-keys (signed pre-key and every one-time key) of a
/// vector party, with the one-time ids in vector order.
fn party(case: &Value, name: &str) -> (Identity, PreKeys, Vec<u32>) {
    let p = &case[name];
    let identity = Identity::from_seed(&hex32(&p["ed25519_seed"]));
    assert_eq!(identity.did().as_str(), p["did"].as_str().unwrap());
    let spk_id = u32::try_from(p["spk_id"].as_u64().unwrap()).unwrap();
    let mut keys = PreKeys::with_signed_pre_key(&identity, spk_id, X25519Secret::from_bytes(hex32(&p["spk_private"])));
    let mut ids = Vec::new();
    for otk in p["otks"].as_array().unwrap() {
        let id = u32::try_from(otk["key_id"].as_u64().unwrap()).unwrap();
        keys.add_one_time_key(id, X25519Secret::from_bytes(hex32(&otk["private"])))
            .unwrap();
        assert_eq!(
            hex::encode(keys.one_time_key(id).unwrap().public().as_bytes()),
            otk["public"].as_str().unwrap()
        );
        ids.push(id);
    }
    (identity, keys, ids)
}

#[test]
fn request_bytes_match_ts_vector() {
    let Some(dir) = shared_vectors() else { return };
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ts-main/mesh-session.json")).unwrap()).unwrap();
    let mut checked = 0;
    for case in file["cases"].as_array().unwrap() {
        let Some(requests) = case["http_requests"].as_array() else {
            continue;
        };
        let base = case["registry_url"].as_str().unwrap();
        let alice = party(case, "alice");
        let bob = party(case, "bob");
        for request in requests {
            let ((me, my_keys, my_ids), peer) = match request["client"].as_str().unwrap() {
                "alice" => (&alice, &bob.0),
                "bob" => (&bob, &alice.0),
                other => panic!("unknown client {other}"),
            };
            let method = request["method"].as_str().unwrap();
            let url = request["url"].as_str().unwrap();
            let spec = match (method, url.ends_with("/prekeys")) {
                ("POST", false) => {
                    let body: Value = serde_json::from_str(request["body_json"].as_str().unwrap()).unwrap();
                    let caps: Vec<String> = serde_json::from_value(body["capabilities"].clone()).unwrap();
                    let meta: BTreeMap<String, String> = serde_json::from_value(body["metadata"].clone()).unwrap();
                    register_request(me, &caps, &meta, FIXED_TS).unwrap()
                }
                ("PUT", true) => upload_prekeys_request(me, my_keys, my_ids, FIXED_TS).unwrap(),
                ("GET", true) => {
                    // Cross-check the served bundle parses to what the peer holds.
                    let served =
                        meshwire_proto::PreKeyBundle::from_json(request["response_body_json"].as_str().unwrap())
                            .unwrap();
                    let (_, peer_keys, _) = if peer.did() == bob.0.did() { &bob } else { &alice };
                    let otk = case["served_otk_id"].as_u64().map(|id| u32::try_from(id).unwrap());
                    assert_eq!(served, peer_keys.bundle(peer, otk));
                    served.verify().unwrap();
                    fetch_bundle_request(peer.did())
                }
                other => panic!("unexpected request {other:?} {url}"),
            };
            assert_eq!(spec.method.as_str(), method, "{url}");
            assert_eq!(spec.url(base), url);
            let mut expected_headers: BTreeMap<String, String> =
                serde_json::from_value(request["headers"].clone()).unwrap();
            if method == "GET" {
                // The one deliberate difference from the TypeScript client:
                // no Authorization header where no registry checks one.
                assert!(expected_headers.remove("authorization").is_some(), "{url}");
            }
            let headers: BTreeMap<String, String> =
                spec.headers.iter().map(|(n, v)| ((*n).to_owned(), v.clone())).collect();
            assert_eq!(headers, expected_headers, "{method} {url}");
            assert_eq!(spec.body.as_deref(), request["body_json"].as_str(), "{method} {url}");
            checked += 1;
        }
    }
    assert_eq!(checked, 5, "register + upload for both, one fetch");
}

/// The published 4.0.0 SDK sends the same pre-key upload bytes (its
/// registration body is a different, legacy shape, and it sends no auth).
#[test]
fn prekey_upload_bytes_match_ts_sdk_4_vector() {
    let Some(dir) = shared_vectors() else { return };
    let path = dir.join("ts-sdk-4.0.0/mesh-session.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        support::skipped(&format!("{} is absent", path.display()));
        return;
    };
    let file: Value = serde_json::from_str(&text).unwrap();
    let case = &file["cases"][0];
    let base = case["registry_url"].as_str().unwrap();
    let mut checked = 0;
    for request in case["http_requests"].as_array().unwrap() {
        if request["method"] != "PUT" {
            continue;
        }
        let (me, keys, ids) = party(case, request["client"].as_str().unwrap());
        let spec = upload_prekeys_request(&me, &keys, &ids, FIXED_TS).unwrap();
        assert_eq!(spec.url(base), request["url"].as_str().unwrap());
        assert_eq!(spec.body.as_deref(), request["body_json"].as_str());
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn builders_percent_encode_and_reject_unknown_otk_ids() {
    let id = Identity::from_seed(&[3; 32]);
    let keys = PreKeys::with_signed_pre_key(&id, 0, X25519Secret::from_bytes([4; 32]));
    assert!(matches!(
        upload_prekeys_request(&id, &keys, &[5], FIXED_TS),
        Err(RegistryError::PreKey(PreKeyError::Unknown(5)))
    ));
    let spec = meshwire::registry::discover_request("a b/c&d:é", Some(7));
    assert_eq!(spec.path, "/v1/discover?capability=a%20b%2Fc%26d%3A%C3%A9&limit=7");
    let spec = meshwire::registry::get_agent_request(&Did::parse("did:mesh:x.y_z-1").unwrap());
    assert_eq!(spec.path, "/v1/agents/did%3Amesh%3Ax.y_z-1");
    assert!(spec.headers.is_empty());
    assert_eq!(
        spec.url("http://h:1/prefix/"),
        "http://h:1/prefix/v1/agents/did%3Amesh%3Ax.y_z-1"
    );
}

// ── The real AGT registry ──────────────────────────────────────────────

/// A running `python -m agentmesh.registry`, killed on drop.
struct AgtRegistry {
    /// Kept for its drop, which stops the process.
    _process: support::AgtProcess,
    url: String,
}

impl AgtRegistry {
    async fn start() -> Self {
        let python = support::agt_python();
        let process = support::AgtProcess::start(&python, "registry", support::free_port(), &[]).await;
        let url = format!("http://127.0.0.1:{}", process.port);
        Self { _process: process, url }
    }

    fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.url, fast_options()).unwrap()
    }
}

fn fast_options() -> RegistryOptions {
    RegistryOptions {
        timeout: Duration::from_secs(10),
        max_retries: 2,
        base_backoff: Duration::from_millis(20),
        ..RegistryOptions::default()
    }
}

fn assert_recent(ts: Option<Timestamp>) {
    let ts = ts.expect("timestamp");
    assert!(ts.abs_diff(system_clock()) < 60_000, "{ts} is not recent");
}

#[tokio::test]
#[ignore = "needs PyPI (agent-governance-toolkit-core 5.0.0 into target/agt-venv); run with `-- --ignored online_`, as CI does"]
async fn online_agt_registry_round_trip() {
    let server = AgtRegistry::start().await;
    let client = server.client();
    let alice = Identity::generate(&mut OsRng);
    let bob = Identity::generate(&mut OsRng);
    let unique = format!("cap-{}", &alice.did().as_str()[9..17]);
    let alice_caps = vec!["chat".to_owned(), unique.clone()];
    let alice_meta = BTreeMap::from([
        ("name".to_owned(), "Alice ✓ \"quoted\"".to_owned()),
        ("role".to_owned(), "tester".to_owned()),
    ]);

    // Register: 201 then 409, both answering the same DID.
    assert_eq!(
        client
            .register_detailed(&alice, &alice_caps, &alice_meta)
            .await
            .unwrap(),
        Registration::Created(alice.did().clone())
    );
    assert_eq!(
        client
            .register_detailed(&alice, &alice_caps, &alice_meta)
            .await
            .unwrap(),
        Registration::AlreadyRegistered(alice.did().clone())
    );
    assert_eq!(
        &client.register(&alice, &[], &BTreeMap::new()).await.unwrap(),
        alice.did()
    );
    assert_eq!(
        &client
            .register(&bob, &["chat".to_owned()], &BTreeMap::new())
            .await
            .unwrap(),
        bob.did()
    );

    // Get: the first registration's capabilities and metadata.
    let record = client.get_agent(alice.did()).await.unwrap();
    assert_eq!(&record.did, alice.did());
    assert_eq!(record.capabilities, alice_caps);
    assert_eq!(record.metadata, alice_meta);
    assert_recent(record.registered_at);
    assert_recent(record.last_seen);
    assert_eq!(record.reputation_score, Some(0.5));
    assert_eq!(record.tier.as_deref(), Some("anonymous"));
    assert_eq!(record.extra["total_sessions"], 0);

    // Upload bob's pre-keys, three one-time keys.
    let mut bob_keys = PreKeys::generate(&mut OsRng, &bob);
    let ids = bob_keys.generate_one_time_keys(&mut OsRng, 3).unwrap();
    assert_eq!(
        client.upload_prekeys(&bob, &bob_keys, &ids).await.unwrap().otk_count,
        Some(3)
    );

    // Each fetch consumes a different one-time key, then none are left.
    let mut served = Vec::new();
    for _ in 0..3 {
        let bundle = client.fetch_bundle(bob.did()).await.unwrap();
        bundle.verify().unwrap();
        let (id, _) = bundle.one_time_pre_key.unwrap();
        assert_eq!(bundle, bob_keys.bundle(&bob, Some(id)));
        served.push(id);
    }
    assert_eq!(served, ids, "AGT hands one-time keys out first in, first out");
    for _ in 0..2 {
        let bundle = client.fetch_bundle(bob.did()).await.unwrap();
        assert_eq!(bundle.one_time_pre_key, None);
        bundle.verify().unwrap();
        assert_eq!(bundle, bob_keys.bundle(&bob, None));
    }

    // A new upload replaces the list.
    let more = bob_keys.generate_one_time_keys(&mut OsRng, 2).unwrap();
    assert_eq!(
        client
            .upload_prekeys(&bob, &bob_keys, &more[1..])
            .await
            .unwrap()
            .otk_count,
        Some(1)
    );
    let bundle = client.fetch_bundle(bob.did()).await.unwrap();
    assert_eq!(bundle.one_time_pre_key.map(|(id, _)| id), Some(more[1]));
    assert!(matches!(
        client.upload_prekeys(&bob, &bob_keys, &[99]).await,
        Err(RegistryError::PreKey(PreKeyError::Unknown(99)))
    ));

    // Discover.
    let chat = client.discover("chat", Some(200)).await.unwrap();
    for did in [alice.did(), bob.did()] {
        let hit = chat.iter().find(|r| &r.did == did).expect("discovered");
        assert_recent(hit.last_seen);
        assert_eq!(hit.reputation_score, Some(0.5));
        assert_eq!(hit.metadata, None, "AGT 5.0.0 sends no metadata in discovery");
    }
    let only = client.discover(&unique, None).await.unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(&only[0].did, alice.did());
    assert_eq!(only[0].capabilities, alice_caps);
    assert!(client.discover("no-such-capability", Some(1)).await.unwrap().is_empty());

    // Heartbeat: accepted, then throttled (429 -> Throttled, one attempt).
    let before = client.get_agent(alice.did()).await.unwrap().last_seen.unwrap();
    let seen = client.heartbeat(&alice).await.unwrap().unwrap();
    assert!(seen >= before);
    assert_eq!(client.get_agent(alice.did()).await.unwrap().last_seen, Some(seen));
    let err = client.heartbeat(&alice).await.unwrap_err();
    assert!(matches!(err, RegistryError::Throttled { .. }), "{err:?}");
    assert!(err.detail().unwrap().contains("throttled"), "{err:?}");

    // Delete.
    client.delete_agent(&bob).await.unwrap();
    assert!(matches!(
        client.get_agent(bob.did()).await,
        Err(RegistryError::NotFound { .. })
    ));
    assert!(matches!(
        client.fetch_bundle(bob.did()).await,
        Err(RegistryError::NotFound { .. })
    ));
    // Deleting again fails authentication: the key is gone with the record.
    let err = client.delete_agent(&bob).await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err:?}");
    // And bob can register anew.
    assert_eq!(
        client.register_detailed(&bob, &[], &BTreeMap::new()).await.unwrap(),
        Registration::Created(bob.did().clone())
    );
}

#[tokio::test]
#[ignore = "needs PyPI (agent-governance-toolkit-core 5.0.0 into target/agt-venv); run with `-- --ignored online_`, as CI does"]
async fn online_agt_registry_error_mapping() {
    let server = AgtRegistry::start().await;
    let client = server.client();
    let alice = Identity::generate(&mut OsRng);
    let stranger = Identity::generate(&mut OsRng);
    client.register(&alice, &[], &BTreeMap::new()).await.unwrap();

    // Authenticating as an unregistered identity: 401 with FastAPI's detail.
    for result in [
        client.heartbeat(&stranger).await.map(drop),
        client.delete_agent(&stranger).await,
    ] {
        match result {
            Err(RegistryError::Status { status: 401, ref body }) => {
                assert!(body.contains("Agent not registered"), "{body}");
            }
            other => panic!("expected 401, got {other:?}"),
        }
    }
    // Uploading for an unregistered DID is a 404 (checked before auth).
    let keys = PreKeys::generate(&mut OsRng, &stranger);
    assert!(matches!(
        client.upload_prekeys(&stranger, &keys, &[]).await,
        Err(RegistryError::NotFound { .. })
    ));

    // Unknown DID, and a registered agent without pre-keys: NotFound.
    for did in [stranger.did(), alice.did()] {
        match client.fetch_bundle(did).await {
            Err(e @ RegistryError::NotFound { .. }) => {
                assert_eq!(e.detail().as_deref(), Some("Pre-key bundle not found"));
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
    }
    assert!(matches!(
        client.get_agent(stranger.did()).await,
        Err(RegistryError::NotFound { .. })
    ));

    // AGT does not check the Authorization header on bundle fetches.
    let alice_keys = PreKeys::generate(&mut OsRng, &alice);
    client.upload_prekeys(&alice, &alice_keys, &[]).await.unwrap();
    client.fetch_bundle(alice.did()).await.unwrap().verify().unwrap();

    // Validation errors are 422, not retried.
    for limit in [0, 201] {
        let err = client.discover("chat", Some(limit)).await.unwrap_err();
        assert_eq!(err.status(), Some(422), "{err:?}");
    }

    // A clock outside the 5-minute replay window.
    let stale = RegistryClient::new(
        &server.url,
        RegistryOptions {
            clock: Arc::new(|| Timestamp(system_clock().0 - 10 * 60 * 1000)),
            ..fast_options()
        },
    )
    .unwrap();
    let err = stale.register(&stranger, &[], &BTreeMap::new()).await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert_eq!(err.detail().as_deref(), Some("Proof timestamp outside replay window"));
    let err = stale.heartbeat(&alice).await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert_eq!(err.detail().as_deref(), Some("Timestamp outside replay window"));
}

// ── Retries, timeouts and malformed answers (scripted server) ──────────

#[derive(Clone)]
enum Reply {
    Status(u16, String),
    Hang,
}

/// An HTTP/1.1 server answering the n-th request with `script[n]` (the last
/// entry repeats), one request per connection, recording request texts.
struct Scripted {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    async fn start(script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let recorded = recorded.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let Some(text) = read_request(&mut socket).await else {
                        return;
                    };
                    let reply = {
                        let mut all = recorded.lock().unwrap();
                        all.push(text);
                        script[(all.len() - 1).min(script.len() - 1)].clone()
                    };
                    match reply {
                        Reply::Hang => tokio::time::sleep(Duration::from_secs(60)).await,
                        Reply::Status(status, body) => {
                            let response = format!(
                                "HTTP/1.1 {status} Scripted\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = socket.write_all(response.as_bytes()).await;
                            let _ = socket.shutdown().await;
                        }
                    }
                });
            }
        });
        Self { addr, requests }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn client(&self, options: RegistryOptions) -> RegistryClient {
        RegistryClient::new(&self.url(), options).unwrap()
    }
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<String> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            while data.len() < end + 4 + length {
                let n = socket.read(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                data.extend_from_slice(&buf[..n]);
            }
            return Some(String::from_utf8_lossy(&data).into_owned());
        }
    }
}

fn header_value(request: &str, name: &str) -> String {
    request
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
        .unwrap()
}

/// A clock that advances one second per reading.
fn ticking_clock() -> Arc<dyn Fn() -> Timestamp + Send + Sync> {
    let start = Timestamp::parse_iso(FIXED_TS).unwrap().0;
    let ticks = AtomicU64::new(0);
    Arc::new(move || Timestamp(start + 1000 * ticks.fetch_add(1, Ordering::SeqCst)))
}

fn scripted_options(max_retries: u32) -> RegistryOptions {
    RegistryOptions {
        timeout: Duration::from_millis(500),
        max_retries,
        base_backoff: Duration::from_millis(10),
        clock: ticking_clock(),
        ..RegistryOptions::default()
    }
}

#[tokio::test]
async fn retries_5xx_with_fresh_timestamps_then_succeeds() {
    let alice = Identity::from_seed(&[9; 32]);
    let mut keys = PreKeys::generate(&mut OsRng, &alice);
    let ids = keys.generate_one_time_keys(&mut OsRng, 1).unwrap();
    let server = Scripted::start(vec![
        Reply::Status(503, "{\"detail\":\"busy\"}".into()),
        Reply::Status(503, "{\"detail\":\"busy\"}".into()),
        Reply::Status(200, "{\"otk_count\": 1}".into()),
    ])
    .await;
    let client = server.client(scripted_options(3));
    assert_eq!(
        client.upload_prekeys(&alice, &keys, &ids).await.unwrap().otk_count,
        Some(1)
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    let mut stamps = Vec::new();
    for request in &requests {
        assert!(request.starts_with(&format!(
            "PUT /v1/agents/{}/prekeys HTTP/1.1\r\n",
            alice.did().as_str().replace(':', "%3A")
        )));
        let header = AuthHeader::parse(&header_value(request, "authorization")).unwrap();
        let ts = Timestamp::parse_iso(&header.timestamp).unwrap();
        header.verify(&alice.ed25519_public(), ts).unwrap();
        stamps.push(header.timestamp);
    }
    stamps.dedup();
    assert_eq!(stamps.len(), 3, "each attempt signs a fresh timestamp: {stamps:?}");

    // A bundle fetch is retried the same way, and no attempt carries a
    // signature (no registry checks one there).
    let bob = Identity::from_seed(&[8; 32]);
    let bob_keys = PreKeys::generate(&mut OsRng, &bob);
    let bundle = bob_keys.bundle(&bob, None);
    let server = Scripted::start(vec![
        Reply::Status(503, "{\"detail\":\"busy\"}".into()),
        Reply::Status(200, bundle.to_json()),
    ])
    .await;
    let client = server.client(scripted_options(3));
    assert_eq!(client.fetch_bundle(bob.did()).await.unwrap(), bundle);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert!(request.starts_with("GET /v1/agents/"), "{request}");
        assert!(
            !request.to_ascii_lowercase().contains("\r\nauthorization:"),
            "{request}"
        );
    }
}

#[tokio::test]
async fn gives_up_on_persistent_5xx() {
    let server = Scripted::start(vec![Reply::Status(502, "bad gateway".into())]).await;
    let client = server.client(scripted_options(2));
    let err = client
        .get_agent(&Did::parse("did:mesh:abc").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Status { status: 502, ref body } if body == "bad gateway"),
        "{err:?}"
    );
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn never_retries_4xx() {
    let alice = Identity::from_seed(&[10; 32]);
    for (status, body) in [
        (400, "{\"detail\":\"Malformed proof\"}"),
        (404, "{\"detail\":\"Agent not found\"}"),
        (409, "{\"detail\":\"conflict\"}"),
        (429, "{\"detail\":\"Heartbeat throttled; retry after 10s\"}"),
    ] {
        let server = Scripted::start(vec![
            Reply::Status(status, body.into()),
            Reply::Status(200, "{}".into()),
        ])
        .await;
        let client = server.client(scripted_options(3));
        let err = client.delete_agent(&alice).await.unwrap_err();
        assert_eq!(err.status(), Some(status));
        assert_eq!(err.body(), Some(body));
        let expected_variant = match status {
            404 => matches!(err, RegistryError::NotFound { .. }),
            409 => matches!(err, RegistryError::Conflict { .. }),
            429 => matches!(err, RegistryError::Throttled { .. }),
            _ => matches!(err, RegistryError::Status { .. }),
        };
        assert!(expected_variant, "{err:?}");
        assert_eq!(server.requests().len(), 1, "{status} must not be retried");
    }
}

#[tokio::test]
async fn timeouts_are_retried_then_reported() {
    let server = Scripted::start(vec![Reply::Hang]).await;
    let alice = Identity::from_seed(&[11; 32]);
    let mut options = scripted_options(1);
    options.timeout = Duration::from_millis(200);
    let client = server.client(options);
    let started = Instant::now();
    let err = client.heartbeat(&alice).await.unwrap_err();
    assert!(matches!(err, RegistryError::Timeout), "{err:?}");
    assert_eq!(server.requests().len(), 2);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn connection_refused_is_transport_after_retries() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = RegistryClient::new(&format!("http://127.0.0.1:{port}"), scripted_options(1)).unwrap();
    let err = client.discover("chat", None).await.unwrap_err();
    assert!(matches!(err, RegistryError::Transport(_)), "{err:?}");
}

#[tokio::test]
async fn malformed_answers_are_invalid_response() {
    let alice = Identity::from_seed(&[12; 32]);
    let did = alice.did().clone();
    let good_record = format!("{{\"did\":\"{did}\",\"last_seen\":\"2026-11-21T12:00:00.123456+00:00\"}}");
    let cases: Vec<(&str, String)> = vec![
        ("get", "{".into()),
        ("get", "[]".into()),
        ("get", "{\"did\":5}".into()),
        ("get", "{\"did\":\"not-a-did\"}".into()),
        ("get", format!("{{\"did\":\"{did}\",\"capabilities\":\"chat\"}}")),
        ("get", format!("{{\"did\":\"{did}\",\"metadata\":{{\"k\":1}}}}")),
        ("get", format!("{{\"did\":\"{did}\",\"last_seen\":\"yesterday\"}}")),
        (
            "get",
            format!("{{\"did\":\"{did}\",\"last_seen\":\"2026-11-21T12:00:00\"}}"),
        ),
        ("bundle", "{\"identity_key\":\"!!\"}".into()),
        ("bundle", "not json".into()),
        ("bundle", "\u{feff}".into()),
        ("discover", "{\"results\":{}}".into()),
        (
            "discover",
            "{\"results\":[{\"did\":\"did:mesh:a\",\"last_seen\":7}]}".into(),
        ),
        ("heartbeat", "{\"last_seen\":\"2026-13-01T00:00:00Z\"}".into()),
        ("register", "{\"did\":\"did:web:x\"}".into()),
        ("register", "".into()),
    ];
    for (op, body) in cases {
        let server = Scripted::start(vec![Reply::Status(200, body.clone())]).await;
        let client = server.client(scripted_options(3));
        let result = match op {
            "get" => client.get_agent(&did).await.map(drop),
            "bundle" => client.fetch_bundle(&did).await.map(drop),
            "discover" => client.discover("chat", None).await.map(drop),
            "heartbeat" => client.heartbeat(&alice).await.map(drop),
            "register" => client.register(&alice, &[], &BTreeMap::new()).await.map(drop),
            _ => unreachable!(),
        };
        assert!(
            matches!(result, Err(RegistryError::InvalidResponse(_))),
            "{op} {body:?}: {result:?}"
        );
        assert_eq!(server.requests().len(), 1, "malformed answers are not retried");
    }

    // A well-formed Python isoformat timestamp (microseconds, +00:00).
    let server = Scripted::start(vec![Reply::Status(200, good_record)]).await;
    let record = server.client(scripted_options(0)).get_agent(&did).await.unwrap();
    assert_eq!(
        record.last_seen,
        Some(Timestamp(Timestamp::parse_iso(FIXED_TS).unwrap().0 + 123))
    );
    assert!(record.capabilities.is_empty() && record.metadata.is_empty());

    // Oversized bodies are refused.
    let huge = format!(
        "{{\"did\":\"{did}\",\"x\":\"{}\"}}",
        "a".repeat(meshwire::registry::MAX_RESPONSE_BYTES)
    );
    let server = Scripted::start(vec![Reply::Status(200, huge)]).await;
    let err = server.client(scripted_options(0)).get_agent(&did).await.unwrap_err();
    assert!(matches!(err, RegistryError::InvalidResponse(_)), "{err:?}");
}

#[test]
fn rejects_bad_base_urls() {
    for url in ["not a url", "ftp://x", "http://x/?q=1"] {
        assert!(matches!(
            RegistryClient::new(url, RegistryOptions::default()),
            Err(RegistryError::InvalidRequest(_))
        ));
    }
    let client = RegistryClient::new("http://x:1/prefix/", RegistryOptions::default()).unwrap();
    assert_eq!(client.base_url(), "http://x:1/prefix");
    let defaults = RegistryOptions::default();
    assert_eq!(defaults.timeout, Duration::from_secs(10));
    assert_eq!(defaults.max_retries, 3);
    assert_eq!(defaults.base_backoff, Duration::from_millis(200));
}
