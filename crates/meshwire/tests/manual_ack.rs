#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `ClientConfig::manual_ack` (issue 11 §1, `meshwire listen` acks only
//! what it printed): a stored message stays with the relay until the
//! application acks it.

use meshwire::{ClientConfig, Identity, MemoryStore, MeshClient, SessionStore};
use rand_core::OsRng;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn wait_pending(server: &meshwire_server::RunningServer, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.stats().pending_messages != want {
        assert!(
            Instant::now() < deadline,
            "pending stayed {}",
            server.stats().pending_messages
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_held_message_is_acked_only_when_the_application_says_so() {
    let server = meshwire_server::start(Default::default()).await.unwrap();
    let config = |name: &str, manual: bool| {
        let mut c = ClientConfig::new(server.relay_url(), server.registry_url());
        c.display_name = Some(name.into());
        c.manual_ack = manual;
        c
    };
    let bob_identity = Identity::generate(&mut OsRng);
    let bob_did = bob_identity.did().to_string();
    // Bob registers (publishes his bundle), then goes away.
    let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::new());
    let bob = MeshClient::connect(
        Identity::from_seed(&bob_identity.seed()),
        config("bob", true),
        Some(store.clone()),
        None,
    )
    .await
    .unwrap();
    bob.close().await;
    let alice = MeshClient::connect(Identity::generate(&mut OsRng), config("alice", false), None, None)
        .await
        .unwrap();
    alice.send(&bob_did, &serde_json::json!({"n": 1})).await.unwrap();
    // KNOCK and message are stored for the absent bob.
    wait_pending(&server, 2).await;
    let bob = MeshClient::connect(bob_identity, config("bob", true), Some(store), None)
        .await
        .unwrap();
    let message = bob.recv_timeout(Duration::from_secs(10)).await.unwrap();
    assert_eq!(message.payload.as_json(), Some(&serde_json::json!({"n": 1})));
    // The message stays stored until we ack it (the KNOCK is the state
    // machine's business).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.stats().pending_messages;
    assert!(before >= 1, "{before}");
    assert!(bob.ack(&message));
    assert!(!bob.ack(&message), "acked twice");
    wait_pending(&server, before - 1).await;
    alice.close().await;
    bob.close().await;
}
