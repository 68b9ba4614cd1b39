//! The storage conformance suite on NATS JetStream (two handles = two
//! connections in one namespace, like two server instances), durability
//! across a nats-server restart, and the live-routing primitive. Each test
//! starts its own `nats-server -js` on 127.0.0.1 with a free port and a
//! temporary store, stopped by PID when the test ends; without a
//! nats-server binary the tests print why and skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod storage_support;

use bytes::Bytes;
use meshwire_proto::time::Timestamp;
use meshwire_server::storage::nats::NatsOptions;
use meshwire_server::storage::nats_server::NatsServer;
use meshwire_server::storage::{Appended, Storage, StorageLimits};
use meshwire_server::ClaimError;
use std::time::Duration;
use storage_support::{agent, msg, otk, Pair, NOW};

struct Guard {
    _server: NatsServer,
    _dir: tempfile::TempDir,
}

fn start_server() -> Option<(NatsServer, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    match NatsServer::start(&dir.path().join("js")) {
        Ok(server) => Some((server, dir)),
        Err(reason) => {
            // Only a missing binary skips; a binary that fails is a failure.
            if meshwire_server::storage::nats_server::find_binary().is_err() {
                eprintln!("SKIPPED: {reason}");
                None
            } else {
                panic!("nats-server failed to start: {reason}");
            }
        }
    }
}

async fn open(limits: StorageLimits) -> Option<Pair> {
    let (server, dir) = start_server()?;
    let a = Storage::nats(NatsOptions::new(server.url()), limits).await.unwrap();
    let b = Storage::nats(NatsOptions::new(server.url()), limits).await.unwrap();
    Some(Pair {
        a,
        b,
        guard: Box::new(Guard {
            _server: server,
            _dir: dir,
        }),
        sweeps: false,
    })
}

conformance!(open);

/// Queued messages, registrations, one-time keys and proofs survive a
/// restart of the nats-server (file store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_across_server_restart() {
    let Some((mut server, _dir)) = start_server() else {
        return;
    };
    {
        let store = Storage::nats(NatsOptions::new(server.url()), StorageLimits::default())
            .await
            .unwrap();
        for i in 0..50 {
            let out = store
                .mailboxes
                .append(
                    msg("did:s", "did:r", &format!("m{i}"), Timestamp(NOW.0 + 3_600_000)),
                    NOW,
                )
                .await
                .unwrap();
            assert!(matches!(out, Appended::Stored { .. }));
        }
        assert!(store.mailboxes.ack("did:r", "m0").await.unwrap());
        store
            .registry
            .create_agent(agent("did:mesh:x", &["c"], NOW.0), 10)
            .await
            .unwrap();
        store
            .registry
            .set_one_time_keys("did:mesh:x", vec![otk(1), otk(2)])
            .await
            .unwrap();
        store.registry.consume_one_time_key("did:mesh:x").await.unwrap();
        store
            .proofs
            .claim("did:mesh:x", &[1; 64], Timestamp(NOW.0 + 60_000), NOW)
            .unwrap();
    }
    server.restart().unwrap();
    let store = Storage::nats(NatsOptions::new(server.url()), StorageLimits::default())
        .await
        .unwrap();
    let fetched = store.mailboxes.fetch("did:r", 0, 100, NOW).await.unwrap();
    let ids: Vec<String> = fetched.iter().map(|m| m.id.clone()).collect();
    let expected: Vec<String> = (1..50).map(|i| format!("m{i}")).collect();
    assert_eq!(ids, expected);
    assert_eq!(
        store
            .mailboxes
            .append(msg("did:s", "did:r", "m5", Timestamp(NOW.0 + 1000)), NOW)
            .await
            .unwrap(),
        Appended::Duplicate,
        "the dedupe index survived"
    );
    assert_eq!(
        store
            .registry
            .get_agent("did:mesh:x")
            .await
            .unwrap()
            .unwrap()
            .capabilities,
        ["c"]
    );
    assert_eq!(
        store.registry.consume_one_time_key("did:mesh:x").await.unwrap(),
        Some(otk(2))
    );
    assert_eq!(store.registry.discover("c", 5).await.unwrap().len(), 1);
    assert_eq!(
        store
            .proofs
            .claim("did:mesh:x", &[1; 64], Timestamp(NOW.0 + 60_000), NOW),
        Err(ClaimError::Replayed)
    );
    assert!(store.ready().await.is_ok());
}

/// A frame published for a DID reaches the instance subscribed for it;
/// with nobody subscribed a request fails, so the relay knows to store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_routing_between_instances() {
    let Some((server, _dir)) = start_server() else { return };
    let one = Storage::nats(NatsOptions::new(server.url()), StorageLimits::default())
        .await
        .unwrap();
    let three = Storage::nats(NatsOptions::new(server.url()), StorageLimits::default())
        .await
        .unwrap();
    let (router1, router3) = (one.live.clone().unwrap(), three.live.clone().unwrap());

    assert!(
        router1
            .request_did("did:mesh:bob", Bytes::from_static(b"x"))
            .await
            .is_err(),
        "nobody holds bob"
    );

    let mut bob = router3.subscribe_did("did:mesh:bob").await.unwrap();
    router3.sync().await.unwrap();
    router1
        .publish_to_did("did:mesh:bob", Bytes::from_static(b"frame 1"))
        .await
        .unwrap();
    router1.flush().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), bob.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.payload, Bytes::from_static(b"frame 1"));

    // Request/reply: instance 3 confirms delivery.
    let answer = tokio::spawn(async move {
        let message = bob.next().await.unwrap();
        assert_eq!(message.payload, Bytes::from_static(b"frame 2"));
        router3.reply(&message, Bytes::from_static(b"delivered")).await.unwrap()
    });
    let reply = router1
        .request_did("did:mesh:bob", Bytes::from_static(b"frame 2"))
        .await
        .unwrap();
    assert_eq!(reply, Bytes::from_static(b"delivered"));
    assert!(answer.await.unwrap());

    // Instance control subjects are separate.
    let mut control = one
        .live
        .clone()
        .unwrap()
        .subscribe_instance("instance-1")
        .await
        .unwrap();
    one.live.as_ref().unwrap().sync().await.unwrap();
    three
        .live
        .as_ref()
        .unwrap()
        .publish_to_instance("instance-1", Bytes::from_static(b"takeover did:mesh:bob"))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), control.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.payload, Bytes::from_static(b"takeover did:mesh:bob"));
}

/// The ledger refuses (fails closed) a proof it could not remember until
/// its expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof_lifetime_beyond_bucket_age_is_refused() {
    let Some((server, _dir)) = start_server() else { return };
    let store = Storage::nats(NatsOptions::new(server.url()), StorageLimits::default())
        .await
        .unwrap();
    let too_far = Timestamp(NOW.0 + 16 * 60_000);
    assert!(matches!(
        store.proofs.claim("did:mesh:a", &[2; 64], too_far, NOW),
        Err(ClaimError::Unavailable(_))
    ));
}
