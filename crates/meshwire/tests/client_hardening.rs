#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Attacks on the client (issue 8), each performed and shown failing:
//! a bundle fetch that would leak a replayable signature, huge timeouts,
//! forged log lines, floods of frames, events and messages, oversized
//! relay messages, takeovers of the DID, and pre-key exhaustion.
//! Everything runs on 127.0.0.1, bounded in count and time.

mod support;

use futures_util::{SinkExt, StreamExt};
use meshwire::client::{deadline_after, saturating_period, ClientStats, MAX_WAIT};
use meshwire::persist::{open_state_dir, state_file, SqliteStore};
use meshwire::proto::encoding::b64_std;
use meshwire::proto::frames::{self, ConnectFrame};
use meshwire::proto::time::Timestamp;
use meshwire::proto::PreKeys;
use meshwire::{ClientConfig, ClientError, ClientEvent, Identity, MemoryPersistence, MeshClient, Persistence};
use meshwire_server::{RunningServer, ServerConfig};
use rand_core::OsRng;
use serde_json::json;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::expect_event;
use support::fake_relay::{client_on_fake_relay, plaintext_frame, FakeRelay};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(20);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn config(relay_url: &str, registry_url: &str, name: &str) -> ClientConfig {
    let mut config = ClientConfig::new(relay_url, registry_url);
    config.display_name = Some(name.to_owned());
    config.reconnect_base = Duration::from_millis(100);
    config.reconnect_max = Duration::from_millis(500);
    config.retransmit_after = Duration::from_millis(1500);
    config.takeover_backoff = Duration::from_millis(400);
    config
}

async fn server() -> RunningServer {
    meshwire_server::start(ServerConfig::default()).await.unwrap()
}

async fn agent(server: &RunningServer, name: &str, f: impl FnOnce(&mut ClientConfig)) -> MeshClient {
    let mut c = config(&server.relay_url(), &server.registry_url(), name);
    f(&mut c);
    MeshClient::connect(Identity::generate(&mut OsRng), c, None, None)
        .await
        .unwrap()
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ── 1. No Authorization header where no registry checks one ─────────────

/// A bundle fetch used to carry a fresh `Ed25519-Timestamp` signature that
/// anyone reading the request could replay as a registry header (or, on
/// AGT, as a connect proof). The request must carry none.
#[tokio::test]
async fn bundle_fetch_carries_no_authorization_header() {
    let bob = Identity::generate(&mut OsRng);
    let mut keys = PreKeys::generate(&mut OsRng, &bob);
    let otk = keys.generate_one_time_keys(&mut OsRng, 1).unwrap()[0];
    let body = keys.bundle(&bob, Some(otk)).to_json();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "request cut short");
            request.extend_from_slice(&buf[..n]);
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(answer.as_bytes()).unwrap();
        String::from_utf8(request).unwrap()
    });
    let registry = meshwire::RegistryClient::new(&format!("http://{addr}"), Default::default()).unwrap();
    let bundle = registry.fetch_bundle(bob.did()).await.unwrap();
    assert_eq!(bundle.one_time_pre_key.map(|(id, _)| id), Some(otk));
    let request = seen.join().unwrap();
    assert!(request.starts_with("GET /v1/agents/"), "{request}");
    assert!(
        !request.to_ascii_lowercase().contains("authorization"),
        "a bundle fetch must not carry a signature:\n{request}"
    );
    assert!(!request.contains("Ed25519-Timestamp"), "{request}");
}

// ── 6. Huge timeouts saturate ───────────────────────────────────────────

#[tokio::test]
async fn huge_timeouts_saturate_instead_of_panicking() {
    // `Instant::now() + Duration::MAX` panics; the helpers do not.
    let far = deadline_after(Duration::MAX);
    assert!(far > tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600));
    assert_eq!(saturating_period(Duration::MAX), MAX_WAIT);
    assert_eq!(saturating_period(Duration::ZERO), Duration::from_millis(1));

    let server = server().await;
    let alice = agent(&server, "alice", |_| {}).await;
    let bob = agent(&server, "bob", |c| {
        // Configured periods are saturated too.
        c.heartbeat_interval = Duration::MAX;
        c.retransmit_after = Duration::MAX;
        c.reconnect_max = Duration::MAX;
    })
    .await;
    // Nothing to wait for: returns at once (the deadline used to panic first).
    assert!(alice.gather(&[], Duration::MAX).await.is_empty());
    alice.send(bob.did(), &json!({"k": "one"})).await.unwrap();
    let got = bob.gather(&[alice.did()], Duration::MAX).await;
    assert_eq!(got.len(), 1);
    bob.send(alice.did(), &json!({"k": "two"})).await.unwrap();
    let m = alice.recv_from_any(&[bob.did()], Duration::MAX).await.unwrap();
    assert_eq!(m.payload.as_json().unwrap()["k"], "two");
    assert!(alice.next_event_timeout(Duration::MAX).await.is_some());
    alice.close().await;
    bob.close().await;
}

// ── 3. Bounded client state ─────────────────────────────────────────────

/// Tungstenite buffers up to 64 MiB by default before the state machine
/// sees a frame; the socket now refuses anything past the mesh's limit
/// plus the envelope slack, and the client reconnects.
#[tokio::test]
async fn oversized_relay_message_is_refused_before_it_is_buffered() {
    let registry = server().await;
    let mut relay = FakeRelay::start().await;
    let (client, mut ws) = tokio::join!(
        client_on_fake_relay(relay.url.clone(), &registry, |_| {}),
        relay.accept()
    );
    let (client, _) = client;
    let limit = ClientConfig::new("", "").max_relay_message_bytes();
    assert_eq!(limit, (1 << 20) + meshwire::client::RELAY_ENVELOPE_SLACK);
    let huge = format!("{{\"type\":\"error\",\"detail\":\"{}\"}}", "x".repeat(limit + 1));
    let _ = ws.send(WsMessage::Text(huge)).await;
    let event = expect_event(&client, WAIT, |e| matches!(e, ClientEvent::Disconnected { .. })).await;
    let ClientEvent::Disconnected { reason, .. } = event else {
        unreachable!()
    };
    assert!(reason.to_lowercase().contains("too long"), "{reason}");
    // It comes back.
    let _ws = relay.accept().await;
    expect_event(&client, WAIT, |e| {
        matches!(e, ClientEvent::Connected { reconnect: true })
    })
    .await;
    client.close().await;
}

/// A flood of events nobody reads: the queue keeps the newest
/// `event_capacity` and counts what it dropped.
#[tokio::test]
async fn event_queue_is_bounded_and_counts_drops() {
    const FLOOD: usize = 3000;
    let registry = server().await;
    let mut relay = FakeRelay::start().await;
    let (client, mut ws) = tokio::join!(
        client_on_fake_relay(relay.url.clone(), &registry, |c| c.event_capacity = 100),
        relay.accept()
    );
    let (client, _) = client;
    for i in 0..FLOOD {
        ws.feed(WsMessage::Text(
            json!({"type": "error", "detail": format!("e{i}")}).to_string(),
        ))
        .await
        .unwrap();
    }
    ws.flush().await.unwrap();
    wait_until("the flood to be read", || {
        client.counters().received.get("error").copied().unwrap_or(0) >= FLOOD as u64
    })
    .await;
    let stats: ClientStats = client.stats();
    let events = client.try_events();
    assert!(events.len() <= 100, "{}", events.len());
    assert!(stats.events_dropped >= (FLOOD - 100) as u64, "{stats:?}");
    // The newest survived.
    assert!(events
        .iter()
        .any(|e| matches!(e, ClientEvent::Error { detail, .. } if detail.contains(&format!("e{}", FLOOD - 1)))));
    client.close().await;
}

/// Messages the application does not take: once the inbox is full the
/// client stops reading (and acknowledging), so nothing is dropped and the
/// relay keeps what it cannot deliver; reading resumes with a
/// `fetch_pending` once there is room.
#[tokio::test]
async fn full_inbox_stops_reading_and_loses_nothing() {
    const SENT: usize = 60;
    const CAPACITY: usize = 10;
    let registry = server().await;
    let mut relay = FakeRelay::start().await;
    let (client, ws) = tokio::join!(
        client_on_fake_relay(relay.url.clone(), &registry, |c| c.inbox_capacity = CAPACITY),
        relay.accept()
    );
    let (client, _) = client;
    let peer = Identity::generate(&mut OsRng).did().to_string();
    client.allow_plaintext_peer(&peer);
    let me = client.did().to_owned();
    // Fed from a task: the client stops reading, so the sends may block.
    let feeder = {
        let peer = peer.clone();
        let me = me.clone();
        let (mut sink, mut stream) = ws.split();
        let acks = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = acks.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                if let WsMessage::Text(t) = frame {
                    seen.lock().unwrap().push(t);
                }
            }
        });
        let writer = tokio::spawn(async move {
            for i in 0..SENT {
                let frame = plaintext_frame(&peer, &me, &format!("m{i}"), &json!({"i": i, "pad": "p".repeat(200)}));
                sink.send(WsMessage::Text(frame)).await.unwrap();
            }
            sink
        });
        (acks, reader, writer)
    };
    let (frames_out, reader, writer) = feeder;
    wait_until("a full inbox", || client.stats().inbox_len >= CAPACITY).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = client.stats();
    assert_eq!(stats.inbox_len, CAPACITY, "{stats:?}");
    assert!(stats.inbox_full_pauses >= 1, "{stats:?}");
    let acks = |frames: &[String]| frames.iter().filter(|t| t.contains("\"ack\"")).count();
    let so_far = frames_out.lock().unwrap().clone();
    assert_eq!(
        acks(&so_far),
        CAPACITY,
        "only what the inbox holds is acknowledged: {so_far:?}"
    );

    let mut got = Vec::new();
    while got.len() < SENT {
        let m = client.recv_timeout(WAIT).await.unwrap();
        assert!(client.stats().inbox_len <= CAPACITY);
        got.push(m.payload.as_json().unwrap()["i"].as_u64().unwrap() as usize);
    }
    assert_eq!(got, (0..SENT).collect::<Vec<_>>(), "every message, in order");
    wait_until("every ack", || acks(&frames_out.lock().unwrap()) == SENT).await;
    assert!(
        frames_out
            .lock()
            .unwrap()
            .iter()
            .any(|t| t.contains("\"fetch_pending\"")),
        "asks the relay for what it stored meanwhile"
    );
    let _sink = writer.await.unwrap();
    client.close().await;
    reader.abort();
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The two floods of the issue: 20,000 junk frames with random `from`
/// values (from a malicious relay: a real one checks `from`), then 20,000
/// sends to a receipt-capable peer that never confirms. The state file,
/// the exported state and the process memory stay within what the
/// documented limits allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_frames_and_unconfirmed_sends_do_not_grow_state() {
    const JUNK: usize = 20_000;
    const SENDS: usize = 20_000;
    let server = server().await;
    let dir = std::env::temp_dir().join(format!("meshwire-flood-{}-{}", std::process::id(), now_ms()));
    let identity = Identity::generate(&mut OsRng);
    let store = Arc::new(open_state_dir(&dir, identity.did().as_str(), Default::default()).unwrap());
    let mesh_limits = meshwire::proto::mesh::MeshConfig::default();

    // Phase 1: the junk, through a malicious relay.
    let mut relay = FakeRelay::start().await;
    let mut c = config(&relay.url, &server.registry_url(), "flooded");
    c.event_capacity = 256;
    let connecting = MeshClient::connect(
        Identity::from_seed(&identity.seed()),
        c,
        Some(store.clone() as Arc<dyn Persistence>),
        None,
    );
    let (client, ws) = tokio::join!(connecting, relay.accept());
    let client = client.unwrap();
    // Read what the client answers (knock_accept, acks), or it blocks.
    let (mut ws, mut answers) = ws.split();
    let drain = tokio::spawn(async move { while answers.next().await.is_some() {} });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = client.export_state().len();
    let rss_before = rss_bytes();
    let me = client.did().to_owned();
    let mut longest = 0;
    for i in 0..JUNK {
        let from = format!("did:mesh:{:016x}{:016x}", random_u64(), i);
        let frame = match i % 3 {
            0 => plaintext_frame(&from, &me, &format!("j{i}"), &json!({"junk": i})),
            1 => json!({"v": 1, "type": "knock", "from": from, "to": me, "id": format!("k{i}"),
                        "ts": "2026-01-01T00:00:00.000Z", "intent": {"action": "junk"}})
            .to_string(),
            _ => json!({"v": 1, "type": "message", "from": from, "to": me, "id": format!("m{i}"),
                        "ts": "2026-01-01T00:00:00.000Z",
                        "header": {"dh": b64_std(&[7u8; 32]), "pn": 0, "n": i},
                        "ciphertext": b64_std(&[0u8; 48])})
            .to_string(),
        };
        longest = longest.max(frame.len());
        ws.feed(WsMessage::Text(frame)).await.unwrap();
    }
    ws.flush().await.unwrap();
    wait_until("the junk to be read", || {
        let r = client.counters().received;
        r.values().sum::<u64>() >= JUNK as u64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Peers an unauthenticated frame can make the state hold: those with
    // buffered messages and those awaiting a verdict; each costs at most
    // its frames plus bookkeeping.
    let per_peer = longest * mesh_limits.pre_knock_buffer_per_peer + 1024;
    let junk_bound = (mesh_limits.pre_knock_max_peers + mesh_limits.max_pending_knocks) * per_peer;
    let after_junk = client.export_state().len();
    assert!(
        after_junk <= baseline + junk_bound,
        "state grew from {baseline} to {after_junk} bytes (bound {junk_bound}); stats {:?}",
        client.stats()
    );
    client.close().await;
    drain.abort();
    let file = state_file(&dir, &me);
    let on_disk = std::fs::metadata(&file).unwrap().len() as usize;
    assert!(on_disk <= baseline + junk_bound, "{on_disk}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // Phase 2: unconfirmed sends, on the real relay, same state.
    let peer = agent(&server, "silent", |_| {}).await;
    let peer_did = peer.did().to_owned();
    peer.close().await; // receipt-capable, never confirms
    let client = MeshClient::connect(
        Identity::from_seed(&identity.seed()),
        config(&server.relay_url(), &server.registry_url(), "flooded"),
        Some(store.clone() as Arc<dyn Persistence>),
        None,
    )
    .await
    .unwrap();
    let payload = json!({"pad": "u".repeat(100)});
    let (mut sent, mut refused) = (0usize, 0usize);
    for _ in 0..SENDS {
        match client.send(&peer_did, &payload).await {
            Ok(_) => sent += 1,
            Err(ClientError::Session(meshwire::proto::mesh::SendError::TooManyUnconfirmed { .. })) => refused += 1,
            Err(e) => panic!("after {sent} sends: {e}"),
        }
    }
    assert_eq!(sent, mesh_limits.max_unconfirmed_per_peer, "refused: {refused}");
    assert_eq!(refused, SENDS - sent);
    assert!(client.stats().mesh.unconfirmed_refused >= refused as u64);
    let per_message = payload.to_string().len() * 2 + 256;
    let unconfirmed_bound = mesh_limits.max_unconfirmed_per_peer * per_message;
    let after_sends = client.export_state().len();
    assert!(
        after_sends <= baseline + junk_bound + unconfirmed_bound,
        "state {after_sends} bytes, bound {}",
        baseline + junk_bound + unconfirmed_bound
    );
    client.close().await;
    let on_disk = std::fs::metadata(&file).unwrap().len() as usize;
    eprintln!(
        "state: baseline {baseline} B, after junk {after_junk} B (bound +{junk_bound}), \
         after sends {after_sends} B / file {on_disk} B (bound +{unconfirmed_bound})"
    );
    assert!(on_disk <= baseline + junk_bound + unconfirmed_bound, "{on_disk}");
    if let (Some(before), Some(after)) = (rss_before, rss_bytes()) {
        // The state machine's byte limit on unconfirmed payloads, the
        // relay's store for the silent peer and allocator slack.
        let bound = mesh_limits.max_unconfirmed_bytes as u64 + 96 * 1024 * 1024;
        eprintln!("RSS: {before} -> {after} B (bound +{bound})");
        assert!(
            after.saturating_sub(before) <= bound,
            "RSS grew {} bytes",
            after - before
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ── 2. Takeovers (4006) ─────────────────────────────────────────────────

/// Someone holding a fresh proof for the DID (a key thief; with the AGT
/// relay, a replayer) takes the socket over. The client reports it, takes
/// the DID back with a fresh proof, and receives the mail sent meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_recovers_from_a_takeover_it_did_not_cause() {
    let server = server().await;
    let identity = Identity::generate(&mut OsRng);
    let mut c = config(&server.relay_url(), &server.registry_url(), "alice");
    c.takeover_backoff = Duration::from_millis(700);
    let alice = MeshClient::connect(
        Identity::from_seed(&identity.seed()),
        c,
        Some(Arc::new(MemoryPersistence::new())),
        None,
    )
    .await
    .unwrap();
    let bob = agent(&server, "bob", |_| {}).await;
    bob.send(alice.did(), &json!({"k": "m0"})).await.unwrap();
    let m0 = alice.recv_from_any(&[bob.did()], WAIT).await.unwrap();
    assert_eq!(m0.payload.as_json().unwrap()["k"], "m0");

    let (mut attacker, _) = tokio_tungstenite::connect_async(format!("{}/ws", server.relay_url()))
        .await
        .unwrap();
    let ts = Timestamp(now_ms() + 1500).to_iso();
    attacker
        .send(WsMessage::Text(frames::to_text(&ConnectFrame::new(&identity, &ts))))
        .await
        .unwrap();
    let event = expect_event(&alice, WAIT, |e| matches!(e, ClientEvent::Displaced { .. })).await;
    assert!(matches!(event, ClientEvent::Displaced { attempt: 1, .. }), "{event:?}");
    // Mail sent while the attacker holds the DID.
    for k in ["m1", "m2", "m3"] {
        bob.send(alice.did(), &json!({ "k": k })).await.unwrap();
    }
    expect_event(&alice, WAIT, |e| {
        matches!(e, ClientEvent::Connected { reconnect: true })
    })
    .await;
    // The attacker was displaced in turn.
    let closed = tokio::time::timeout(WAIT, async {
        while let Some(frame) = attacker.next().await {
            if let Ok(WsMessage::Close(Some(close))) = frame {
                return Some(u16::from(close.code));
            }
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(closed, Some(4006));
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = alice.recv_from_any(&[bob.did()], WAIT).await.unwrap();
        got.push(m.payload.as_json().unwrap()["k"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, ["m1", "m2", "m3"]);
    assert_eq!(alice.stats().takeovers, 1);
    assert!(alice.is_connected());
    alice.close().await;
    bob.close().await;
}

/// Two live instances of one agent: they take the DID from each other a
/// bounded number of times, then one gives up with a terminal `TakenOver`
/// and the other keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_instances_settle_on_one() {
    let server = server().await;
    let identity = Identity::generate(&mut OsRng);
    let start = |identity: Identity| {
        let c = config(&server.relay_url(), &server.registry_url(), "twin");
        MeshClient::connect(identity, c, None, None)
    };
    let first = start(Identity::from_seed(&identity.seed())).await.unwrap();
    let second = start(Identity::from_seed(&identity.seed())).await.unwrap();
    let limit = ClientConfig::new("", "").takeover_limit;
    let gave_up = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            for (name, c) in [("first", &first), ("second", &second)] {
                for e in c.try_events() {
                    if let ClientEvent::Displaced { attempt, .. } = &e {
                        assert!(*attempt <= limit, "{name}: {e:?}");
                    }
                    if matches!(e, ClientEvent::TakenOver { .. }) {
                        return name;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the twins settle within 30 s");
    let (loser, winner) = if gave_up == "first" {
        (&first, &second)
    } else {
        (&second, &first)
    };
    assert_eq!(loser.stats().takeovers, u64::from(limit) + 1);
    // Settled: no more flapping.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(winner.is_connected());
    assert!(!loser.is_connected());
    let takeovers = winner.stats().takeovers;
    assert!(takeovers <= u64::from(limit), "{takeovers}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(winner.stats().takeovers, takeovers, "the winner is left alone");
    let did = identity.did().to_string();
    assert_eq!(
        server.server().connected_dids().iter().filter(|d| **d == did).count(),
        1
    );
    // And it is reachable.
    let bob = agent(&server, "bob", |_| {}).await;
    bob.send(&did, &json!({"k": "hi"})).await.unwrap();
    assert!(winner.recv_from_any(&[bob.did()], WAIT).await.is_ok());
    first.close().await;
    second.close().await;
    bob.close().await;
}

// ── 5. Pre-keys ─────────────────────────────────────────────────────────

/// The signed pre-key used to be id 0 forever; it rotates on schedule,
/// is uploaded (new bundles carry it) and persisted, and sessions opened
/// from the new bundle work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_pre_key_rotates_on_schedule() {
    let server = server().await;
    let store = Arc::new(MemoryPersistence::new());
    let identity = Identity::generate(&mut OsRng);
    let mut c = config(&server.relay_url(), &server.registry_url(), "rotating");
    c.signed_pre_key_rotation = Duration::from_millis(800);
    let bob = MeshClient::connect(
        Identity::from_seed(&identity.seed()),
        c,
        Some(store.clone() as Arc<dyn Persistence>),
        None,
    )
    .await
    .unwrap();
    let registry = meshwire::RegistryClient::new(&server.registry_url(), Default::default()).unwrap();
    let first = registry.fetch_bundle(identity.did()).await.unwrap().signed_pre_key_id;
    wait_until("a rotation", || bob.stats().signed_pre_key_rotations >= 1).await;
    let mut rotated = first;
    for _ in 0..100 {
        rotated = registry.fetch_bundle(identity.did()).await.unwrap().signed_pre_key_id;
        if rotated != first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(rotated, first, "the registry serves the new signed pre-key");
    let alice = agent(&server, "alice", |_| {}).await;
    alice.send(bob.did(), &json!({"k": "after rotation"})).await.unwrap();
    let m = bob.recv_from_any(&[alice.did()], WAIT).await.unwrap();
    assert_eq!(m.payload.as_json().unwrap()["k"], "after rotation");
    bob.close().await;
    let restored = store
        .load()
        .unwrap()
        .restore_mesh(
            Identity::from_seed(&identity.seed()),
            Default::default(),
            Box::new(meshwire::proto::mesh::RandomUuids),
        )
        .unwrap()
        .unwrap();
    assert!(
        restored.prekeys().signed_pre_key().id >= rotated,
        "the rotated key is persisted"
    );
    alice.close().await;
}

/// Anyone can drain one-time keys with unauthenticated bundle fetches; the
/// client refills from the registry's count, and counts sessions opened
/// without a one-time key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_one_time_keys_are_refilled_and_sessions_without_one_are_counted() {
    let server = server().await;
    let bob = agent(&server, "bob", |c| {
        c.one_time_keys = 8;
        c.one_time_key_check = Duration::from_secs(3600);
    })
    .await;
    let registry = meshwire::RegistryClient::new(&server.registry_url(), Default::default()).unwrap();
    let bob_did = meshwire::Did::parse(bob.did()).unwrap();
    // Drain: eight anonymous fetches.
    for _ in 0..8 {
        assert!(registry
            .fetch_bundle(&bob_did)
            .await
            .unwrap()
            .one_time_pre_key
            .is_some());
    }
    assert!(registry
        .fetch_bundle(&bob_did)
        .await
        .unwrap()
        .one_time_pre_key
        .is_none());
    let alice = agent(&server, "alice", |_| {}).await;
    alice.send(bob.did(), &json!({"k": "no otk"})).await.unwrap();
    assert_eq!(alice.stats().sessions_without_one_time_key, 1);
    bob.recv_from_any(&[alice.did()], WAIT).await.unwrap();
    bob.close().await;

    // A client that checks the registry's count refills without waiting
    // for a KNOCK to consume a key.
    let carol = agent(&server, "carol", |c| {
        c.one_time_keys = 8;
        c.one_time_key_check = Duration::from_millis(200);
    })
    .await;
    let carol_did = meshwire::Did::parse(carol.did()).unwrap();
    for _ in 0..8 {
        registry.fetch_bundle(&carol_did).await.unwrap();
    }
    wait_until("a refill", || carol.stats().one_time_key_refills >= 1).await;
    assert!(registry
        .fetch_bundle(&carol_did)
        .await
        .unwrap()
        .one_time_pre_key
        .is_some());
    carol.close().await;
    alice.close().await;
}

// ── 4. Corrupt state: typed error and recovery ──────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_names_the_file_and_can_be_reset() {
    let server = server().await;
    let dir = std::env::temp_dir().join(format!("meshwire-corrupt-{}-{}", std::process::id(), now_ms()));
    let identity = Identity::generate(&mut OsRng);
    let did = identity.did().to_string();
    let store: Arc<SqliteStore> = Arc::new(open_state_dir(&dir, &did, Default::default()).unwrap());
    let connect = |reset: bool| {
        let mut c = config(&server.relay_url(), &server.registry_url(), "corrupt");
        c.reset_corrupt_state = reset;
        MeshClient::connect(
            Identity::from_seed(&identity.seed()),
            c,
            Some(store.clone() as Arc<dyn Persistence>),
            None,
        )
    };
    connect(false).await.unwrap().close().await;
    // A peer row that does not import (truncated, edited, from elsewhere).
    let corrupt = || {
        let mut commit = meshwire::persist::Commit::new();
        commit.put_peer(
            "did:mesh:00000000000000000000000000000000",
            Some(zeroize::Zeroizing::new("{\"truncated\": ".to_owned())),
        );
        store.commit(&commit).unwrap();
    };
    corrupt();
    let err = connect(false).await.unwrap_err();
    let ClientError::CorruptState { location, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(location, &store.location());
    assert!(
        location.contains(&state_file(&dir, &did).display().to_string()),
        "{location}"
    );
    let message = err.to_string();
    assert!(message.contains(location.as_str()), "{message}");
    assert!(message.contains("meshwire state reset"), "{message}");
    let rows = store.load().unwrap().peers;
    assert!(
        rows.iter().any(|(_, row)| row.as_str() == "{\"truncated\": "),
        "left as it was"
    );

    // The builder option starts over with the same identity.
    let client = connect(true).await.unwrap();
    assert_eq!(client.did(), did);
    client.close().await;
    assert!(store.load().unwrap().peers.is_empty());
    connect(false).await.unwrap().close().await;

    // And the API way.
    corrupt();
    assert!(matches!(connect(false).await, Err(ClientError::CorruptState { .. })));
    store.reset_mesh().unwrap();
    let client = connect(false).await.unwrap();
    client.close().await;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

fn random_u64() -> u64 {
    rand_core::RngCore::next_u64(&mut OsRng)
}
