#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! meshwire's client against meshwire-server with challenge-bound proofs
//! required (docs/specs/MESHWIRE-CHALLENGE-AUTH.md): registry and relay both
//! use the challenge form, two agents talk; against a registry without the
//! extension the client keeps the timestamp form; proof timestamps never
//! repeat.

use meshwire::registry::{RegistryClient, RegistryOptions};
use meshwire::{ClientConfig, Identity, MeshClient};
use meshwire_proto::time::Timestamp;
use meshwire_server::ServerConfig;
use rand_core::OsRng;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn clients_talk_through_a_server_that_requires_challenges() {
    let server = meshwire_server::start(ServerConfig {
        require_challenge: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let config = |name: &str| {
        let mut c = ClientConfig::new(server.relay_url(), server.registry_url());
        c.display_name = Some(name.to_owned());
        c
    };
    let alice = MeshClient::connect(Identity::generate(&mut OsRng), config("alice"), None, None)
        .await
        .unwrap();
    let bob = MeshClient::connect(Identity::generate(&mut OsRng), config("bob"), None, None)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.stats().connected_agents < 2 {
        assert!(tokio::time::Instant::now() < deadline, "agents never joined the relay");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    alice.send(bob.did(), &json!({"hello": "bob"})).await.unwrap();
    let message = bob
        .recv_from_any(&[alice.did()], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(message.from, alice.did());
    // Timestamp proofs are refused by this server, so every accepted proof
    // was challenge-bound; none was a replay.
    assert_eq!(server.stats().replayed_proofs_refused, 0);
    alice.close().await;
    bob.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn the_registry_client_uses_the_challenge_form_where_offered() {
    let server = meshwire_server::start(ServerConfig {
        require_challenge: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = RegistryClient::new(&server.registry_url(), RegistryOptions::default()).unwrap();
    let me = Identity::generate(&mut OsRng);
    assert!(!client.challenge_offered());
    client.register(&me, &[], &Default::default()).await.unwrap();
    assert!(client.challenge_offered(), "the registration answer carried a nonce");
    // Timestamp headers are refused here: these pass only in the challenge
    // form, each with its own nonce.
    client.heartbeat(&me).await.unwrap();
    // A client that never saw an answer signs a timestamp first; the 401
    // carries a nonce, and it repeats the request in the challenge form.
    let fresh = RegistryClient::new(&server.registry_url(), RegistryOptions::default()).unwrap();
    assert!(!fresh.challenge_offered());
    fresh.delete_agent(&me).await.unwrap();
    assert!(fresh.challenge_offered());
    assert_eq!(server.stats().registered_agents, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn proof_timestamps_never_repeat_even_on_a_frozen_clock() {
    let frozen = Timestamp(1_795_262_400_000);
    let options = RegistryOptions {
        clock: Arc::new(move || frozen),
        ..Default::default()
    };
    let client = RegistryClient::new("http://127.0.0.1:9", options).unwrap();
    let clone = client.clone();
    let stamps: Vec<u64> = (0..5)
        .map(|i| {
            if i % 2 == 0 {
                client.next_proof_timestamp().0
            } else {
                clone.next_proof_timestamp().0
            }
        })
        .collect();
    assert_eq!(stamps, (0..5).map(|i| frozen.0 + i).collect::<Vec<_>>());
}
