//! Fan-out / fan-in: a coordinator hands a task to each of three workers and
//! waits (with a timeout) for all their answers, as agent runtimes do.
//!
//! Run with `cargo run --example fanout`.

use meshwire::{Identity, MeshClient};
use serde_json::json;
use std::error::Error;
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let server = meshwire_server::start(Default::default()).await?;
    let join = |name: String, capability: &'static str| {
        MeshClient::builder(
            Identity::generate(&mut rand_core::OsRng),
            server.relay_url(),
            server.registry_url(),
        )
        .display_name(name)
        .capabilities([capability])
        .connect()
    };

    // Three workers: each answers every task with the word count of its text.
    let mut workers = Vec::new();
    for i in 1..=3 {
        let worker = join(format!("worker-{i}"), "summarize").await?;
        let w = worker.clone();
        tokio::spawn(async move {
            while let Some(task) = w.recv().await {
                let text = task
                    .payload
                    .as_json()
                    .and_then(|p| p["text"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                tokio::time::sleep(Duration::from_millis(50 * i)).await;
                let reply = json!({"worker": i, "words": text.split_whitespace().count(), "task": task.id});
                let _ = w.send(&task.from, &reply).await;
            }
        });
        workers.push(worker);
    }

    let coordinator = join("coordinator".into(), "coordinate").await?;
    let found = coordinator.discover("summarize").await?;
    let dids: Vec<String> = found.iter().map(|r| r.did.to_string()).collect();
    println!(
        "coordinator {} found {} workers by capability \"summarize\"",
        coordinator.did(),
        dids.len()
    );

    let texts = ["the quick brown fox", "jumps over the lazy dog today", "hello mesh"];
    for (did, text) in dids.iter().zip(texts) {
        coordinator.send(did, &json!({"text": text})).await?;
        println!("  task -> {did}: {text:?}");
    }

    let senders: Vec<&str> = dids.iter().map(String::as_str).collect();
    let replies = coordinator.gather(&senders, Duration::from_secs(10)).await;
    println!("{} of {} replies within the timeout:", replies.len(), senders.len());
    for reply in &replies {
        println!(
            "  {} <- {}",
            serde_json::to_string(&reply.payload.as_json())?,
            reply.from
        );
    }

    for w in &workers {
        w.close().await;
    }
    coordinator.close().await;
    server.shutdown().await;
    if replies.len() == senders.len() {
        Ok(())
    } else {
        Err("some workers did not answer".into())
    }
}
