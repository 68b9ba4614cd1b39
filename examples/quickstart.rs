//! Two agents on an in-process relay and registry: they find each other by
//! display name, open an encrypted session (X3DH + KNOCK), talk both ways,
//! and one of them goes offline and gets what was sent meanwhile when it
//! comes back.
//!
//! Run with `cargo run --example quickstart`.

use meshwire::{ClientEvent, Identity, MemoryPersistence, MeshClient, Persistence};
use serde_json::json;
use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn short(did: &str) -> &str {
    did.get(..21).unwrap_or(did)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let server = meshwire_server::start(Default::default()).await?;
    println!(
        "embedded relay {}/ws and registry {}\n",
        server.relay_url(),
        server.registry_url()
    );
    let connect = |identity: Identity, name: &'static str, store: Option<Arc<dyn Persistence>>| {
        MeshClient::builder(identity, server.relay_url(), server.registry_url())
            .display_name(name)
            .persistence_opt(store)
            .connect()
    };

    let alice = connect(Identity::generate(&mut rand_core::OsRng), "alice", None).await?;
    let bob_identity = Identity::generate(&mut rand_core::OsRng);
    let bob_store: Arc<dyn Persistence> = Arc::new(MemoryPersistence::new());
    let bob = connect(
        Identity::from_seed(&bob_identity.seed()),
        "bob",
        Some(bob_store.clone()),
    )
    .await?;
    println!("alice registered as {}", alice.did());
    println!("bob   registered as {}", bob.did());

    let bob_did = alice.find("bob").await?.ok_or("bob is not in the registry")?;
    println!("alice looks up \"bob\" in the registry: {}\n", short(&bob_did));

    alice.send(&bob_did, &json!({"text": "hello bob", "n": 1})).await?;
    println!("alice -> bob   KNOCK (X3DH establishment) + encrypted {{\"text\":\"hello bob\",\"n\":1}}");
    let m = bob.recv_timeout(WAIT).await?;
    println!(
        "bob reads      {} from {}",
        serde_json::to_string(&m.payload.as_json())?,
        short(&m.from)
    );
    for event in bob.try_events() {
        if let ClientEvent::Knock { from, accepted } = event {
            println!(
                "               (bob's KNOCK policy saw {} and accepted: {accepted})",
                short(&from)
            );
        }
    }

    bob.send(alice.did(), &json!({"text": "hi alice ✓"})).await?;
    let m = alice.recv_timeout(WAIT).await?;
    println!(
        "alice reads    {} from {}\n",
        serde_json::to_string(&m.payload.as_json())?,
        short(&m.from)
    );

    println!("bob goes offline.");
    bob.close().await;
    for i in 1..=3 {
        alice
            .send(&bob_did, &json!({"text": format!("while you were away #{i}")}))
            .await?;
        println!("alice -> bob   {{\"text\":\"while you were away #{i}\"}}  (the relay stores it)");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    println!("bob comes back (same identity, saved sessions).");
    let bob = connect(bob_identity, "bob", Some(bob_store)).await?;
    for _ in 1..=3 {
        let m = bob.recv_timeout(WAIT).await?;
        println!("bob reads      {}", serde_json::to_string(&m.payload.as_json())?);
    }
    let counters = alice.counters();
    println!(
        "\nalice sent {} frames: {:?}",
        counters.application_sent(),
        counters.sent
    );

    alice.close().await;
    bob.close().await;
    server.shutdown().await;
    Ok(())
}
