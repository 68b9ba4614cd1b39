#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! MeshClient end to end, each scenario against the embedded server and
//! against the real AGT 5.0.0 relay and registry. The AGT ones need PyPI:
//! they are `#[ignore]`d, named `online_agt::*`, and CI runs them with
//! `cargo test --workspace -- --ignored online_`.

mod support;

use meshwire::{knock_policy, ClientEvent, Identity, MemoryPersistence, MeshClient, Payload, Persistence};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use support::{expect_event, Backend};

const WAIT: Duration = Duration::from_secs(20);

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::embedded().await).await;
                }
            )*
        }
        mod online_agt {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs PyPI (agent-governance-toolkit-core 5.0.0 into target/agt-venv); run with `-- --ignored online_`, as CI does"]
                async fn $name() {
                    super::$name(super::Backend::agt().await).await;
                }
            )*
        }
    };
}

on_both_backends!(
    two_hundred_messages_each_way_in_order,
    offline_delivery,
    relay_restart_loses_nothing_between_meshwire_peers,
    takeover_closes_the_older_connection,
    knock_rejected_by_policy,
    restart_with_persisted_state_needs_no_new_knock,
    restart_without_state_replaces_the_session,
);

fn text_of(payload: &Payload) -> String {
    payload
        .as_json()
        .and_then(|v| v["k"].as_str())
        .map(str::to_owned)
        .unwrap_or_default()
}

async fn receive_n(client: &MeshClient, from: &str, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        match client.recv_from_any(&[from], WAIT).await {
            Ok(m) => got.push(text_of(&m.payload)),
            Err(e) => panic!("after {} of {n} messages: {e}", got.len()),
        }
    }
    got
}

async fn two_hundred_messages_each_way_in_order(backend: Backend) {
    let alice = backend.agent("alice").await;
    let bob = backend.agent("bob").await;
    let bob_did = alice.find("bob").await.unwrap().expect("bob is discoverable by name");
    assert_eq!(bob_did, bob.did());
    let expected: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    for k in &expected {
        alice
            .send(&bob_did, &json!({"k": k, "unicode": "✓ 🚀 \u{2028}"}))
            .await
            .unwrap();
    }
    assert_eq!(receive_n(&bob, alice.did(), 200).await, expected, "{}", backend.name);
    for k in &expected {
        bob.send(alice.did(), &json!({ "k": k })).await.unwrap();
    }
    assert_eq!(receive_n(&alice, bob.did(), 200).await, expected, "{}", backend.name);
    let counters = alice.counters();
    assert_eq!(counters.sent.get("knock"), Some(&1));
    assert!(counters.sent.get("message").copied().unwrap_or(0) >= 200);
    assert!(bob.counters().sent.get("ack").copied().unwrap_or(0) >= 200);
    alice.close().await;
    bob.close().await;
}

async fn offline_delivery(backend: Backend) {
    let alice = backend.agent("alice").await;
    let bob_identity = Identity::generate(&mut rand_core::OsRng);
    let bob_store: Arc<dyn Persistence> = Arc::new(MemoryPersistence::new());
    let bob = backend
        .agent_with(
            Identity::from_seed(&bob_identity.seed()),
            "bob",
            Some(bob_store.clone()),
        )
        .await;
    let bob_did = bob.did().to_owned();
    bob.close().await;
    for i in 0..5 {
        alice
            .send(&bob_did, &json!({ "k": format!("offline {i}") }))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bob = backend.agent_with(bob_identity, "bob", Some(bob_store)).await;
    let expected: Vec<String> = (0..5).map(|i| format!("offline {i}")).collect();
    assert_eq!(receive_n(&bob, alice.did(), 5).await, expected);
    alice.close().await;
    bob.close().await;
}

async fn relay_restart_loses_nothing_between_meshwire_peers(mut backend: Backend) {
    let alice = backend.agent("alice").await;
    let bob_identity = Identity::generate(&mut rand_core::OsRng);
    let bob_store: Arc<dyn Persistence> = Arc::new(MemoryPersistence::new());
    let bob = backend
        .agent_with(
            Identity::from_seed(&bob_identity.seed()),
            "bob",
            Some(bob_store.clone()),
        )
        .await;
    let bob_did = bob.did().to_owned();
    alice.send(&bob_did, &json!({"k": "live 0"})).await.unwrap();
    assert_eq!(receive_n(&bob, alice.did(), 1).await, ["live 0"]);
    // Bob goes offline: the relay holds the next messages in memory...
    bob.close().await;
    for i in 1..=10 {
        alice
            .send(&bob_did, &json!({ "k": format!("held {i}") }))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...and loses them when it restarts.
    backend.stop_relay().await;
    for i in 11..=15 {
        alice
            .send(&bob_did, &json!({ "k": format!("while down {i}") }))
            .await
            .unwrap();
    }
    assert!(alice.queued() > 0, "sends while the relay is down are queued");
    backend.start_relay().await;
    expect_event(&alice, WAIT, |e| {
        matches!(e, ClientEvent::Connected { reconnect: true })
    })
    .await;
    let bob = backend.agent_with(bob_identity, "bob", Some(bob_store)).await;
    let mut got = receive_n(&bob, alice.did(), 15).await;
    got.sort();
    let mut expected: Vec<String> = (1..=10)
        .map(|i| format!("held {i}"))
        .chain((11..=15).map(|i| format!("while down {i}")))
        .collect();
    expected.sort();
    assert_eq!(got, expected, "{}: every message arrives exactly once", backend.name);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(bob.drain().is_empty(), "no duplicates after retransmission");
    let deadline = tokio::time::Instant::now() + WAIT;
    while alice.unconfirmed(&bob_did) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(alice.unconfirmed(&bob_did), 0, "every message confirmed by receipt");
    alice.close().await;
    bob.close().await;
}

async fn takeover_closes_the_older_connection(backend: Backend) {
    let identity = Identity::generate(&mut rand_core::OsRng);
    let first = backend
        .agent_with(Identity::from_seed(&identity.seed()), "twin", None)
        .await;
    let second = backend.agent_with(identity, "twin", None).await;
    let event = expect_event(&first, WAIT, |e| matches!(e, ClientEvent::Displaced { .. })).await;
    assert!(matches!(event, ClientEvent::Displaced { attempt: 1, .. }), "{event:?}");
    // Two live instances take the DID back from each other a bounded
    // number of times, then one gives up for good.
    let mut terminal = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while terminal.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: the twins did not settle",
            backend.name
        );
        for (i, client) in [&first, &second].into_iter().enumerate() {
            if client
                .try_events()
                .iter()
                .any(|e| matches!(e, ClientEvent::TakenOver { .. }))
            {
                terminal = Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (loser, winner) = if terminal == Some(0) {
        (&first, &second)
    } else {
        (&second, &first)
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !loser.is_connected(),
        "{}: no reconnection after giving up",
        backend.name
    );
    assert!(
        winner.is_connected(),
        "{}: the other instance keeps the DID",
        backend.name
    );
}

async fn knock_rejected_by_policy(backend: Backend) {
    let alice = backend.agent("alice").await;
    let bob = backend.agent("bob").await;
    bob.set_knock_policy(Some(knock_policy(|_| false)));
    alice.send(bob.did(), &json!({"k": "let me in"})).await.unwrap();
    let event = expect_event(&alice, WAIT, |e| matches!(e, ClientEvent::KnockRejected { .. })).await;
    assert_eq!(
        event,
        ClientEvent::KnockRejected {
            from: bob.did().to_owned(),
            reason: Some("policy_denied".into())
        }
    );
    expect_event(&bob, WAIT, |e| matches!(e, ClientEvent::Knock { accepted: false, .. })).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        bob.drain().is_empty(),
        "nothing from a rejected peer reaches the application"
    );
    alice.close().await;
    bob.close().await;
}

async fn restart_with_persisted_state_needs_no_new_knock(backend: Backend) {
    let alice = backend.agent("alice").await;
    let bob_identity = Identity::generate(&mut rand_core::OsRng);
    let dir = std::env::temp_dir().join(format!(
        "meshwire-restart-{}",
        bob_identity.did().as_str().replace(':', "_")
    ));
    let store: Arc<dyn Persistence> =
        Arc::new(meshwire::persist::open_state_dir(&dir, bob_identity.did().as_str(), Default::default()).unwrap());
    let bob = backend
        .agent_with(Identity::from_seed(&bob_identity.seed()), "bob", Some(store.clone()))
        .await;
    alice.send(bob.did(), &json!({"k": "before"})).await.unwrap();
    assert_eq!(receive_n(&bob, alice.did(), 1).await, ["before"]);
    bob.send(alice.did(), &json!({"k": "reply"})).await.unwrap();
    assert_eq!(receive_n(&alice, bob.did(), 1).await, ["reply"]);
    bob.close().await;
    let bob = backend.agent_with(bob_identity, "bob", Some(store)).await;
    alice.send(bob.did(), &json!({"k": "after"})).await.unwrap();
    bob.send(alice.did(), &json!({"k": "still here"})).await.unwrap();
    assert_eq!(receive_n(&bob, alice.did(), 1).await, ["after"]);
    assert_eq!(receive_n(&alice, bob.did(), 1).await, ["still here"]);
    assert_eq!(alice.counters().sent.get("knock"), Some(&1), "no new KNOCK from alice");
    assert_eq!(
        bob.counters().sent.get("knock"),
        None,
        "no KNOCK from the restarted bob"
    );
    let _ = std::fs::remove_dir_all(&dir);
    alice.close().await;
    bob.close().await;
}

async fn restart_without_state_replaces_the_session(backend: Backend) {
    let alice = backend.agent("alice").await;
    let bob_identity = Identity::generate(&mut rand_core::OsRng);
    let bob = backend
        .agent_with(Identity::from_seed(&bob_identity.seed()), "bob", None)
        .await;
    alice.send(bob.did(), &json!({"k": "hello"})).await.unwrap();
    assert_eq!(receive_n(&bob, alice.did(), 1).await, ["hello"]);
    bob.close().await;
    // Bob comes back with the same identity and nothing else.
    let bob = backend.agent_with(bob_identity, "bob", None).await;
    bob.send(alice.did(), &json!({"k": "i restarted"})).await.unwrap();
    assert_eq!(receive_n(&alice, bob.did(), 1).await, ["i restarted"]);
    expect_event(&alice, WAIT, |e| matches!(e, ClientEvent::SessionReplaced { .. })).await;
    alice.send(bob.did(), &json!({"k": "welcome back"})).await.unwrap();
    assert_eq!(receive_n(&bob, alice.did(), 1).await, ["welcome back"]);
    alice.close().await;
    bob.close().await;
}
