#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The delivery contract of issue 9 (see the `meshwire::client` docs):
//! write-ahead commits, the durable inbox held until the application
//! acknowledges, the durable outbox, and registering again when the
//! registry forgot the agent. A "crash" here drops a client without
//! `close()` after cutting its connection, and starts a new one on the
//! same store, as a restarted process would find it (the SIGKILL version,
//! with separate processes and SQLite, is `crash_harness`).

use meshwire::{ClientConfig, ClientError, ClientEvent, Identity, MemoryPersistence, MeshClient, Persistence};
use meshwire_server::RunningServer;
use rand_core::OsRng;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

fn config(server: &RunningServer, name: &str, manual_ack: bool) -> ClientConfig {
    let mut c = ClientConfig::new(server.relay_url(), server.registry_url());
    c.display_name = Some(name.into());
    c.manual_ack = manual_ack;
    c.reconnect_base = Duration::from_millis(100);
    c.reconnect_max = Duration::from_millis(500);
    c.registry_heartbeat = Duration::from_millis(500);
    // Frames a relay loses (the AGT relay: one written to a socket that
    // dies; any relay: its own restart with memory storage) are resent by
    // their sender (receipts) after this.
    c.retransmit_after = Duration::from_secs(1);
    c
}

/// Binds `addr` again once the stopped server let go of it.
async fn rebind(addr: std::net::SocketAddr) -> tokio::net::TcpListener {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{addr}: {e}"),
        }
    }
}

async fn agent(
    server: &RunningServer,
    identity: &Identity,
    name: &str,
    store: &Arc<dyn Persistence>,
    manual_ack: bool,
) -> MeshClient {
    MeshClient::connect(
        Identity::from_seed(&identity.seed()),
        config(server, name, manual_ack),
        Some(store.clone()),
        None,
    )
    .await
    .unwrap()
}

/// An agent with a fresh identity and no store: the other side of a test.
async fn stateless(server: &RunningServer, name: &str) -> MeshClient {
    MeshClient::connect(Identity::generate(&mut OsRng), config(server, name, false), None, None)
        .await
        .unwrap()
}

/// The process dies: no `disconnect`, no final acknowledgement.
fn crash(client: MeshClient) {
    client.abort_connection();
    drop(client);
}

fn text(m: &meshwire::Message) -> String {
    m.payload.as_json().unwrap()["k"].as_str().unwrap().to_owned()
}

async fn wait_pending(server: &RunningServer, want: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        server.server().refresh_stats().await;
        let pending = server.stats().pending_messages;
        if pending == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "pending stayed {pending}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_message_comes_back_after_a_crash_and_never_after_its_ack() {
    let server = meshwire_server::start(Default::default()).await.unwrap();
    let bob_identity = Identity::generate(&mut OsRng);
    let store: Arc<dyn Persistence> = Arc::new(MemoryPersistence::new());
    let bob = agent(&server, &bob_identity, "bob", &store, true).await;
    let alice = stateless(&server, "alice").await;
    alice.send(bob.did(), &json!({"k": "m1"})).await.unwrap();
    let m1 = bob.recv_timeout(WAIT).await.unwrap();
    assert_eq!((text(&m1), m1.redelivered), ("m1".to_owned(), false));
    // The relay was acked once the message was committed: it holds nothing.
    wait_pending(&server, 0).await;
    assert_eq!(store.load().unwrap().inbox.len(), 1, "held until the application acks");

    crash(bob);
    let bob = agent(&server, &bob_identity, "bob", &store, true).await;
    let again = bob.recv_timeout(WAIT).await.unwrap();
    assert_eq!(
        (text(&again), again.id.clone(), again.redelivered),
        ("m1".to_owned(), m1.id.clone(), true)
    );
    assert_eq!(bob.stats().redelivered, 1);
    assert!(bob.ack(&again).unwrap());
    assert!(!bob.ack(&again).unwrap(), "acknowledged twice");
    assert!(store.load().unwrap().inbox.is_empty());

    crash(bob);
    let bob = agent(&server, &bob_identity, "bob", &store, true).await;
    assert!(matches!(
        bob.recv_timeout(Duration::from_millis(700)).await,
        Err(ClientError::Timeout)
    ));
    // The session survived both crashes, both ways.
    alice.send(bob.did(), &json!({"k": "m2"})).await.unwrap();
    let m2 = bob.recv_timeout(WAIT).await.unwrap();
    assert_eq!(text(&m2), "m2");
    bob.ack(&m2).unwrap();
    bob.send(alice.did(), &json!({"k": "reply"})).await.unwrap();
    assert_eq!(text(&alice.recv_timeout(WAIT).await.unwrap()), "reply");
    assert_eq!(alice.counters().sent.get("knock"), Some(&1), "no new KNOCK");
    alice.close().await;
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_receive_call_acknowledges_what_the_previous_ones_handed_over() {
    let server = meshwire_server::start(Default::default()).await.unwrap();
    let bob_identity = Identity::generate(&mut OsRng);
    let store: Arc<dyn Persistence> = Arc::new(MemoryPersistence::new());
    let bob = agent(&server, &bob_identity, "bob", &store, false).await;
    let alice = stateless(&server, "alice").await;
    alice.send(bob.did(), &json!({"k": "m1"})).await.unwrap();
    alice.send(bob.did(), &json!({"k": "m2"})).await.unwrap();
    assert_eq!(text(&bob.recv_timeout(WAIT).await.unwrap()), "m1");
    // Crash while "handling" m1: it comes back.
    crash(bob);
    let bob = agent(&server, &bob_identity, "bob", &store, false).await;
    let m1 = bob.recv_timeout(WAIT).await.unwrap();
    assert_eq!((text(&m1), m1.redelivered), ("m1".to_owned(), true));
    // Asking for the next one acknowledges m1.
    let m2 = bob.recv_timeout(WAIT).await.unwrap();
    assert_eq!(text(&m2), "m2");
    crash(bob);
    let bob = agent(&server, &bob_identity, "bob", &store, false).await;
    let m2 = bob.recv_timeout(WAIT).await.unwrap();
    assert_eq!(
        (text(&m2), m2.redelivered),
        ("m2".to_owned(), true),
        "m1 is not handed over again"
    );
    // A graceful close acknowledges what was handed over.
    bob.close().await;
    let bob = agent(&server, &bob_identity, "bob", &store, false).await;
    assert!(matches!(
        bob.recv_timeout(Duration::from_millis(700)).await,
        Err(ClientError::Timeout)
    ));
    assert!(store.load().unwrap().inbox.is_empty());
    alice.close().await;
    bob.close().await;
}

/// `recv_batch` hands over what waits (at most `max`), and the next call
/// acknowledges the whole previous batch in one commit: after a crash
/// before it, exactly that batch comes back, and nothing acknowledged does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_acknowledged_whole_by_the_next_call_and_comes_back_whole_after_a_crash() {
    let server = meshwire_server::start(Default::default()).await.unwrap();
    let bob_identity = Identity::generate(&mut OsRng);
    let store: Arc<dyn Persistence> = Arc::new(MemoryPersistence::new());
    let bob = agent(&server, &bob_identity, "bob", &store, false).await;
    let alice = stateless(&server, "alice").await;
    let rows: Vec<_> = (1..=5).map(|i| json!({"k": format!("m{i}")})).collect();
    alice.send_batch(bob.did(), &rows).await.unwrap();
    // All five committed to bob's inbox before any is taken.
    let deadline = tokio::time::Instant::now() + WAIT;
    while store.load().unwrap().inbox.len() < 5 {
        assert!(tokio::time::Instant::now() < deadline, "the five never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first: Vec<String> = bob.recv_batch(3).await.iter().map(text).collect();
    assert_eq!(first, ["m1", "m2", "m3"]);
    assert_eq!(store.load().unwrap().inbox.len(), 5, "handed over, not acknowledged");
    let second: Vec<String> = bob.recv_batch(10).await.iter().map(text).collect();
    assert_eq!(second, ["m4", "m5"]);
    let left: Vec<String> = store.load().unwrap().inbox.iter().map(|e| e.id.clone()).collect();
    assert_eq!(left.len(), 2, "m1..m3 acknowledged: {left:?}");

    crash(bob);
    let bob = agent(&server, &bob_identity, "bob", &store, false).await;
    let again = bob.recv_batch(10).await;
    assert_eq!(again.iter().map(text).collect::<Vec<_>>(), ["m4", "m5"]);
    assert!(again.iter().all(|m| m.redelivered));
    // Closed: an empty batch, and the graceful close acknowledged m4, m5.
    bob.close().await;
    assert!(bob.recv_batch(10).await.is_empty());
    assert!(store.load().unwrap().inbox.is_empty());
    alice.close().await;
}

/// The sender dies right after `send` returned: the restored state has
/// every ratchet step that was sent, the unsent frames go out after the
/// restart, and the conversation goes on (it used to be dead: the restored
/// state reused message numbers the peer had consumed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_killed_mid_stream_loses_nothing_and_keeps_its_session() {
    const BURST: usize = 30;
    let server = meshwire_server::start(Default::default()).await.unwrap();
    let alice_identity = Identity::generate(&mut OsRng);
    let store: Arc<dyn Persistence> = Arc::new(MemoryPersistence::new());
    let bob = MeshClient::connect(
        Identity::generate(&mut OsRng),
        config(&server, "bob", false),
        None,
        None,
    )
    .await
    .unwrap();
    let bob_did = bob.did().to_owned();
    for round in 0..3 {
        let alice = agent(&server, &alice_identity, "alice", &store, false).await;
        for i in 0..BURST {
            alice
                .send(&bob_did, &json!({"k": format!("r{round} m{i}")}))
                .await
                .unwrap();
        }
        crash(alice);
    }
    let alice = agent(&server, &alice_identity, "alice", &store, false).await;
    let mut got = Vec::new();
    while got.len() < 3 * BURST {
        got.push(text(&bob.recv_timeout(WAIT).await.unwrap()));
    }
    let want: Vec<String> = (0..3)
        .flat_map(|r| (0..BURST).map(move |i| format!("r{r} m{i}")))
        .collect();
    assert_eq!(got, want, "every message once, in order");
    assert!(matches!(
        bob.recv_timeout(Duration::from_millis(700)).await,
        Err(ClientError::Timeout)
    ));
    assert_eq!(
        alice.counters().sent.get("knock"),
        None,
        "the restored session carries on"
    );
    bob.send(alice.did(), &json!({"k": "still here"})).await.unwrap();
    assert_eq!(text(&alice.recv_timeout(WAIT).await.unwrap()), "still here");
    alice.close().await;
    bob.close().await;
}

/// Sends accepted while the relay is down survive a crash and go out
/// after the restart; an agent the restarted registry forgot registers
/// again by itself (heartbeat 404) and stays reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_made_while_the_server_is_down_survive_a_crash_and_agents_register_again() {
    let server = meshwire_server::start(Default::default()).await.unwrap();
    let (relay_addr, registry_addr) = (server.relay_addr(), server.registry_addr());
    let alice_identity = Identity::generate(&mut OsRng);
    let store: Arc<dyn Persistence> = Arc::new(MemoryPersistence::new());
    let alice = agent(&server, &alice_identity, "alice", &store, false).await;
    let bob = MeshClient::connect(
        Identity::generate(&mut OsRng),
        config(&server, "bob", false),
        None,
        None,
    )
    .await
    .unwrap();
    alice.send(bob.did(), &json!({"k": "before"})).await.unwrap();
    assert_eq!(text(&bob.recv_timeout(WAIT).await.unwrap()), "before");
    // The relay answered the ping written after those frames: their
    // outbox rows are gone.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !store.load().unwrap().outbox.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox kept {:?}",
            store.load().unwrap().outbox
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The server goes away with everything it knew (in memory).
    server.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        alice
            .send(bob.did(), &json!({"k": format!("offline {i}")}))
            .await
            .unwrap();
    }
    assert_eq!(store.load().unwrap().outbox.len(), 3, "in the durable outbox");
    crash(alice);

    assert_eq!(relay_addr, registry_addr, "`start` serves both on one port");
    let server = RunningServer::spawn(Default::default(), rebind(relay_addr).await, None).unwrap();
    // Bob reconnects; the new registry does not know him: he registers
    // again, and is reachable (alice's restart fetches nothing, but a new
    // agent could open a session to him).
    let reregistered = tokio::time::timeout(WAIT, async {
        loop {
            match bob.next_event().await {
                Some(ClientEvent::Reregistered { reason }) => return reason,
                Some(_) => {}
                None => panic!("closed"),
            }
        }
    })
    .await
    .expect("bob registers again");
    assert!(
        reregistered.contains("404") || reregistered.contains("not registered"),
        "{reregistered}"
    );
    let alice = agent(&server, &alice_identity, "alice", &store, false).await;
    for i in 0..3 {
        assert_eq!(text(&bob.recv_timeout(WAIT).await.unwrap()), format!("offline {i}"));
    }
    let registry = meshwire::RegistryClient::new(&server.registry_url(), Default::default()).unwrap();
    let bob_did = meshwire::Did::parse(bob.did()).unwrap();
    assert!(
        registry.fetch_bundle(&bob_did).await.is_ok(),
        "bob's pre-keys are published again"
    );
    let carol = MeshClient::connect(
        Identity::generate(&mut OsRng),
        config(&server, "carol", false),
        None,
        None,
    )
    .await
    .unwrap();
    carol.send(bob.did(), &json!({"k": "hi from carol"})).await.unwrap();
    assert_eq!(text(&bob.recv_timeout(WAIT).await.unwrap()), "hi from carol");
    // The outbox empties once the relay has the frames.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !store.load().unwrap().outbox.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the outbox kept its rows");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        bob.recv_timeout(Duration::from_millis(700)).await,
        Err(ClientError::Timeout)
    ));
    alice.close().await;
    bob.close().await;
    carol.close().await;
}

/// A client that opened its store itself (`state_dir`) releases it on
/// `close()`: the next client of this process opens the same folder (it
/// used to fail with "database is locked") and carries on the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_releases_a_state_dir_for_the_next_client() {
    let server = meshwire_server::start(Default::default()).await.unwrap();
    let dir = std::env::temp_dir().join(format!(
        "meshwire-reopen-{}-{}",
        std::process::id(),
        rand_core::RngCore::next_u64(&mut OsRng)
    ));
    let bob_identity = Identity::generate(&mut OsRng);
    let bob = || {
        MeshClient::builder(
            Identity::from_seed(&bob_identity.seed()),
            server.relay_url(),
            server.registry_url(),
        )
        .display_name("bob")
        .state_dir(&dir)
        .connect()
    };
    let alice = stateless(&server, "alice").await;
    let first = bob().await.unwrap();
    alice.send(first.did(), &json!({"k": "one"})).await.unwrap();
    assert_eq!(text(&first.recv_timeout(WAIT).await.unwrap()), "one");
    first.close().await;
    let second = bob().await.unwrap();
    alice.send(second.did(), &json!({"k": "two"})).await.unwrap();
    assert_eq!(text(&second.recv_timeout(WAIT).await.unwrap()), "two");
    assert_eq!(alice.counters().sent.get("knock"), Some(&1), "the session carried on");
    second.close().await;
    alice.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
