#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `meshwire serve` on durable and shared storage (issue 10 section 1),
//! with real processes on 127.0.0.1, bounded in time:
//!
//! - `--data-dir`: killed with SIGKILL after a message was queued for an
//!   offline agent and an agent registered with pre-keys; after a restart
//!   the message is delivered, the registration and the remaining one-time
//!   keys are intact, and a connect proof used before the kill is refused.
//! - `--nats`: two instances on one nats-server (started here; the test is
//!   skipped, saying why, only when no nats-server binary exists): a
//!   message queued through one is fetched through the other, concurrent
//!   bundle fetches through both never hand out a one-time key twice, and
//!   a connect proof used on one is refused on the other.

mod support;

use serde_json::json;
use support::*;

#[tokio::test]
async fn sqlite_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--data-dir", data.to_str().unwrap()];
    let http = reqwest::Client::new();
    let (alice, bob) = (identity(1), identity(2));

    let first = Serve::start(&args);
    register(&http, &first, &bob).await;
    let otks = upload_prekeys(&http, &first, &bob, 5).await;
    let served = fetch_bundle(&http, &first, &bob).await.expect("a one-time key");
    assert_eq!(served, otks[0]);
    let alice_connect = connect_frame(&alice);
    let mut a = connect_with(&first, &alice, &alice_connect).await;
    let queued = message(&alice, &bob, "queued-before-kill");
    send(&mut a, &queued).await;
    // The relay handles a connection's frames in order: once this comes
    // back, the message above was committed.
    let flush = message(&alice, &alice, "flush");
    send(&mut a, &flush).await;
    assert_eq!(recv_text(&mut a).await, flush);
    first.kill();
    assert!(data.join("meshwire.sqlite3").is_file());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the data directory is private");
    }

    let second = Serve::start(&args);
    // The proof used before the kill is still remembered.
    expect_replay_refused(&second, &alice_connect).await;
    let view = agent_record(&http, &second, &bob).await;
    assert_eq!(view["capabilities"], json!(["storage-test"]));
    assert_eq!(view["otk_count"], 4, "{view}");
    let mut b = second.ws().await;
    send(&mut b, &connect_frame(&bob)).await;
    assert_eq!(recv_text(&mut b).await, queued, "the queued message survived the kill");
    let mut rest = Vec::new();
    for _ in 0..5 {
        rest.push(fetch_bundle(&http, &second, &bob).await);
    }
    let expected: Vec<Option<u64>> = otks[1..].iter().copied().map(Some).chain([None]).collect();
    assert_eq!(rest, expected, "the remaining one-time keys, each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_nats() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = start_nats(dir.path(), "two_instances_share_nats") else {
        return;
    };
    let url = nats.url();
    let args = ["--nats", url.as_str()];
    let one = Serve::start(&args);
    let two = Serve::start(&args);
    let http = reqwest::Client::new();
    let (alice, bob) = (identity(1), identity(2));

    // Queued through instance 1, fetched through instance 2.
    let alice_connect = connect_frame(&alice);
    let mut a = connect_with(&one, &alice, &alice_connect).await;
    let queued = message(&alice, &bob, "via-one");
    send(&mut a, &queued).await;
    let flush = message(&alice, &alice, "flush");
    send(&mut a, &flush).await;
    assert_eq!(recv_text(&mut a).await, flush);
    let mut b = two.ws().await;
    send(&mut b, &connect_frame(&bob)).await;
    assert_eq!(recv_text(&mut b).await, queued);

    // A proof used on instance 1 is refused on instance 2 (tests/cluster.rs
    // checks three instances).
    expect_replay_refused(&two, &alice_connect).await;

    // Concurrent bundle fetches through both instances: each key once.
    let instances = [std::sync::Arc::new(one), std::sync::Arc::new(two)];
    one_time_keys_served_once(&http, &instances, &bob, 40).await;
    drop(nats);
}
