#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Relay and registry failover (issue 10 §2): a client given several URLs
//! skips the ones that are down, moves on when its relay goes away, names
//! a bad URL before connecting, and reports the home relay's failure when
//! none answers. Everything on 127.0.0.1, with in-process servers
//! (`tests/cluster.rs` of meshwire-cli runs three `meshwire serve --nats`
//! instances).

mod support;

use meshwire::relay_connect::ConnectFailure;
use meshwire::{ClientConfig, ClientError, ClientEvent, Identity, MeshClient, RegistryClient, RegistryError};
use meshwire_server::{RunningServer, ServerConfig};
use rand_core::OsRng;
use std::time::{Duration, Instant};
use support::{expect_event, free_port};

/// How fast a dead URL of the list must be skipped (no backoff while a
/// URL of the list was not tried yet).
const PROMPT: Duration = Duration::from_secs(2);

async fn server() -> RunningServer {
    meshwire_server::start(ServerConfig::default()).await.unwrap()
}

fn config(name: &str, relays: &[String], registries: &[String]) -> ClientConfig {
    let mut config = ClientConfig::new("", "");
    config.set_relay_urls(relays);
    config.set_registry_urls(registries);
    config.display_name = Some(name.to_owned());
    config.reconnect_base = Duration::from_millis(100);
    config.reconnect_max = Duration::from_millis(500);
    config
}

async fn join(config: ClientConfig) -> Result<MeshClient, ClientError> {
    MeshClient::connect(Identity::generate(&mut OsRng), config, None, None).await
}

/// A URL where nothing listens.
fn dead(scheme: &str) -> String {
    format!("{scheme}://127.0.0.1:{}", free_port())
}

#[tokio::test]
async fn dead_home_relay_and_registry_are_skipped() {
    let registry = server().await;
    let relay = server().await;
    let registries = [dead("http"), registry.registry_url()];
    let started = Instant::now();
    let alice = join(config("alice", &[dead("ws"), relay.relay_url()], &registries))
        .await
        .unwrap();
    assert!(started.elapsed() < PROMPT, "joined in {:?}", started.elapsed());
    let moved = expect_event(&alice, PROMPT, |e| matches!(e, ClientEvent::RelayChanged { .. })).await;
    assert_eq!(
        moved,
        ClientEvent::RelayChanged {
            url: relay.relay_url(),
            previous: None
        }
    );
    // Registered through the second registry; messages flow.
    let bob = join(config("bob", &[relay.relay_url()], &[registry.registry_url()]))
        .await
        .unwrap();
    alice.send(bob.did(), &"over the fallbacks").await.unwrap();
    let m = bob.recv_timeout(Duration::from_secs(10)).await.unwrap();
    assert_eq!(m.payload.as_json().unwrap(), "over the fallbacks");
    assert!(
        bob.try_events()
            .iter()
            .all(|e| !matches!(e, ClientEvent::RelayChanged { .. })),
        "bob is home"
    );
    alice.close().await;
    bob.close().await;
}

#[tokio::test]
async fn registry_calls_move_to_the_next_url_and_stay_there() {
    let registry = server().await;
    let first = dead("http");
    let client = RegistryClient::with_fallbacks(&[first.clone(), registry.registry_url()], Default::default()).unwrap();
    assert_eq!(client.base_url(), first);
    let started = Instant::now();
    assert!(client.discover("nobody", None).await.unwrap().is_empty());
    assert!(started.elapsed() < PROMPT, "failed over in {:?}", started.elapsed());
    assert_eq!(
        client.base_url(),
        registry.registry_url(),
        "stays where it was answered"
    );
    assert_eq!(
        client.base_urls().collect::<Vec<_>>(),
        [first.as_str(), registry.registry_url().as_str()]
    );
    // Every URL down: the last failure, after trying each.
    let down = RegistryClient::with_fallbacks(
        &[dead("http"), dead("http")],
        meshwire::RegistryOptions {
            max_retries: 0,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(
        down.discover("x", None).await,
        Err(RegistryError::Transport(_))
    ));
}

#[tokio::test]
async fn a_relay_going_away_moves_the_client_to_the_next() {
    let registry = server().await;
    let home = server().await;
    let spare = server().await;
    let relays = [home.relay_url(), spare.relay_url()];
    let registries = [registry.registry_url()];
    let alice = join(config("alice", &relays, &registries)).await.unwrap();
    let bob = join(config("bob", &relays, &registries)).await.unwrap();
    let _ = alice.try_events();
    let _ = bob.try_events();

    // The home relay shuts down (close 1001): both move to the spare.
    let stopped = Instant::now();
    home.shutdown().await;
    // Sent while alice may still be moving: it waits in the outbox.
    alice.send(bob.did(), &"after the move").await.unwrap();
    for client in [&alice, &bob] {
        let moved = expect_event(client, Duration::from_secs(5), |e| {
            matches!(e, ClientEvent::RelayChanged { .. })
        })
        .await;
        assert_eq!(
            moved,
            ClientEvent::RelayChanged {
                url: spare.relay_url(),
                previous: Some(relays[0].clone())
            }
        );
    }
    println!(
        "failover after a graceful shutdown: {} ms",
        stopped.elapsed().as_millis()
    );
    let m = bob.recv_timeout(Duration::from_secs(10)).await.unwrap();
    assert_eq!(m.payload.as_json().unwrap(), "after the move");
    alice.flush(Duration::from_secs(5)).await.unwrap();
    alice.close().await;
    bob.close().await;
}

#[tokio::test]
async fn every_url_is_checked_and_a_bad_one_named() {
    let relay = dead("ws");
    let registry = dead("http");
    let bad_relay = "ftp://127.0.0.1:1";
    match join(config(
        "x",
        &[relay.clone(), bad_relay.into()],
        std::slice::from_ref(&registry),
    ))
    .await
    {
        Err(ClientError::RelayConnect(ConnectFailure::Url(e))) => {
            assert!(e.to_string().contains(bad_relay), "{e}")
        }
        other => panic!("expected the bad relay URL named, got {other:?}"),
    }
    let bad_registry = "http://127.0.0.1:1/?q=1";
    match join(config("x", &[relay], &[registry, bad_registry.into()])).await {
        Err(ClientError::Registry(RegistryError::InvalidRequest(e))) => {
            assert!(e.contains(bad_registry), "{e}")
        }
        other => panic!("expected the bad registry URL named, got {other:?}"),
    }
}

#[tokio::test]
async fn every_relay_down_reports_the_home_relay() {
    let registry = server().await;
    let home = dead("ws");
    let started = Instant::now();
    let result = join(config(
        "x",
        &[home.clone(), dead("ws"), dead("ws")],
        &[registry.registry_url()],
    ))
    .await;
    assert!(started.elapsed() < PROMPT, "reported in {:?}", started.elapsed());
    match result {
        Err(ClientError::RelayConnect(ConnectFailure::Refused { url, .. })) => {
            assert_eq!(url, format!("{home}/ws"))
        }
        other => panic!("expected the home relay's refusal, got {other:?}"),
    }
}
