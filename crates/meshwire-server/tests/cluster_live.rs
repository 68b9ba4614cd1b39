//! Live routing between relay instances on one NATS JetStream (issue 10
//! section 1, "Live routing" and "Takeover"): two or three in-process
//! servers share a `nats-server -js` that each test starts on 127.0.0.1
//! with a free port (stopped by PID when the test ends); without a
//! nats-server binary the tests print why and skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{ack, handled, identity, message, recv_close, recv_json, send, TestServer, Ws};
use meshwire_proto::Identity;
use meshwire_server::close_code;
use meshwire_server::storage::nats::NatsOptions;
use meshwire_server::storage::nats_server::{find_binary, NatsServer};
use meshwire_server::storage::Storage;
use meshwire_server::ServerConfig;
use std::time::Duration;

struct Cluster {
    nats: NatsServer,
    _dir: tempfile::TempDir,
}

fn start_nats() -> Option<Cluster> {
    let dir = tempfile::tempdir().unwrap();
    match NatsServer::start(&dir.path().join("js")) {
        Ok(nats) => Some(Cluster { nats, _dir: dir }),
        Err(reason) => {
            // Only a missing binary skips; a binary that fails is a failure.
            if find_binary().is_err() {
                eprintln!("SKIPPED: {reason}");
                None
            } else {
                panic!("nats-server failed to start: {reason}");
            }
        }
    }
}

impl Cluster {
    fn config(&self) -> ServerConfig {
        ServerConfig {
            cluster_route_timeout: Duration::from_millis(300),
            ..ServerConfig::default()
        }
    }

    async fn instance_with(&self, mut config: ServerConfig) -> TestServer {
        let storage = Storage::nats(NatsOptions::new(self.nats.url()), config.storage_limits())
            .await
            .unwrap();
        config.storage = Some(storage);
        TestServer::with_config(config).await
    }

    async fn instance(&self) -> TestServer {
        self.instance_with(self.config()).await
    }

    /// `N` instances with the default test configuration.
    async fn instances<const N: usize>(&self) -> [TestServer; N] {
        let mut started = Vec::with_capacity(N);
        for _ in 0..N {
            started.push(self.instance().await);
        }
        match started.try_into() {
            Ok(instances) => instances,
            Err(_) => unreachable!("N instances were started"),
        }
    }
}

/// Polls `done` every 10 ms for at most 3 s (the caller asserts the state
/// it waited for).
async fn wait_until(done: impl Fn() -> bool) {
    for _ in 0..300 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Receives `n` `message` frames and returns their ids, in arrival order.
async fn recv_ids(ws: &mut Ws, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let frame = recv_json(ws).await;
        assert_eq!(frame["type"], "message", "{frame}");
        ids.push(frame["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// Like [`recv_ids`] on the receiving half of a split socket.
async fn recv_split(rx: &mut futures_util::stream::SplitStream<Ws>, n: usize) -> Vec<String> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(10), rx.next()).await.unwrap();
        match next {
            Some(Ok(Message::Text(text))) => {
                let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(frame["type"], "message", "{frame}");
                got.push(frame["id"].as_str().unwrap().to_owned());
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    got
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i:04}")).collect()
}

async fn send_all(ws: &mut Ws, from: &Identity, to: &Identity, ids: &[String]) {
    for id in ids {
        send(ws, &message(from, to, id)).await;
    }
}

/// `from` sends the frames `ids(prefix, 0..n)` to `to`, and they arrive
/// on `to_ws`, in order; `to` acknowledges them, as a client does (the
/// relay holds a live frame until then, and stores it if the connection
/// ends first).
async fn relay_in_order(from_ws: &mut Ws, from: &Identity, to: &Identity, to_ws: &mut Ws, prefix: &str, n: usize) {
    let sent = ids(prefix, 0..n);
    send_all(from_ws, from, to, &sent).await;
    assert_eq!(recv_ids(to_ws, n).await, sent, "{prefix}");
    ack_all(to_ws, &sent).await;
}

/// Acknowledges `ids` on `ws` and returns once the relay has handled the
/// acks; nothing else may arrive meanwhile.
async fn ack_all(ws: &mut Ws, ids: &[String]) {
    for id in ids {
        send(ws, &ack(id)).await;
    }
    let others = handled(ws).await;
    assert!(others.is_empty(), "while acknowledging: {others:?}");
}

/// Nothing more arrives on `ws` within a short while.
async fn assert_quiet(ws: &mut Ws) {
    use futures_util::StreamExt;
    if let Ok(Some(Ok(frame))) = tokio::time::timeout(Duration::from_millis(300), ws.next()).await {
        panic!("unexpected frame {frame:?}");
    }
}

/// (a) 500 frames each way between agents on two instances arrive live
/// (no reconnect, no fetch_pending), in order, once each; nothing is
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frames_cross_instances_live_in_order_both_ways() {
    let Some(cluster) = start_nats() else {
        return;
    };
    let [a, b] = cluster.instances().await;
    let (alice, bob) = (identity(1), identity(2));
    let mut on_a = a.connect(&alice).await;
    let mut on_b = b.connect(&bob).await;
    let to_alice = ids("b2a", 0..500);
    let to_bob = ids("a2b", 0..500);
    let (mut tx_a, mut rx_a) = futures_util::StreamExt::split(on_a);
    let (mut tx_b, mut rx_b) = futures_util::StreamExt::split(on_b);
    let sending = async {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        for (x, y) in to_alice.iter().zip(&to_bob) {
            tx_b.send(Message::Text(message(&bob, &alice, x))).await.unwrap();
            tx_a.send(Message::Text(message(&alice, &bob, y))).await.unwrap();
        }
    };
    let ((), got_a, got_b) = tokio::join!(sending, recv_split(&mut rx_a, 500), recv_split(&mut rx_b, 500));
    assert_eq!(got_a, to_alice);
    assert_eq!(got_b, to_bob);
    on_a = rx_a.reunite(tx_a).unwrap();
    on_b = rx_b.reunite(tx_b).unwrap();
    assert_quiet(&mut on_a).await;
    assert_quiet(&mut on_b).await;
    for (name, server) in [("a", &a), ("b", &b)] {
        let stats = server.server.stats();
        assert_eq!(stats.cluster_routed_out, 500, "{name}: {stats:?}");
        assert_eq!(stats.cluster_routed_in, 500, "{name}: {stats:?}");
        assert_eq!(stats.cluster_fallbacks, 0, "{name}: {stats:?}");
        assert_eq!(stats.messages_stored, 0, "{name}: {stats:?}");
    }
    let metrics = a.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("meshwire_cluster_routed_in_total 500"), "{metrics}");
    assert!(metrics.contains("meshwire_cluster_routed_out_total 500"), "{metrics}");
}

/// (b) Frames for a DID connected nowhere are stored and delivered, in
/// order, when it connects to any instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frames_for_an_agent_connected_nowhere_wait_in_the_shared_mailbox() {
    let Some(cluster) = start_nats() else {
        return;
    };
    let [a, b] = cluster.instances().await;
    let (bob, carol) = (identity(2), identity(3));
    let mut on_b = b.connect(&bob).await;
    let sent = ids("m", 0..20);
    send_all(&mut on_b, &bob, &carol, &sent).await;
    // Stored once each: the fallbacks count them as the sender routes them.
    wait_until(|| b.server.stats().messages_stored == 20).await;
    let stats = b.server.stats();
    assert_eq!(stats.messages_stored, 20, "{stats:?}");
    assert_eq!(stats.cluster_fallbacks, 20, "{stats:?}");
    assert_eq!(stats.cluster_routed_out, 0, "{stats:?}");
    let mut carol_ws = a.connect(&carol).await;
    assert_eq!(recv_ids(&mut carol_ws, 20).await, sent);
    assert_quiet(&mut carol_ws).await;
    // Now live: the next frames cross without the store.
    relay_in_order(&mut on_b, &bob, &carol, &mut carol_ws, "n", 5).await;
    assert_eq!(b.server.stats().messages_stored, 20);
    assert_eq!(b.server.stats().cluster_routed_out, 5);
}

/// (c) A second connection of a DID on another instance closes the first
/// with 4006; the new one gets what the first held unacknowledged, then
/// the next frames; the old instance forgets the DID.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takeover_across_instances_closes_the_old_socket_with_4006() {
    let Some(cluster) = start_nats() else {
        return;
    };
    let [a, b, c] = cluster.instances().await;
    let (alice, bob) = (identity(1), identity(2));
    let mut bob_ws = c.connect(&bob).await;
    let mut old = a.connect(&alice).await;
    relay_in_order(&mut bob_ws, &bob, &alice, &mut old, "before", 3).await;
    let mut new = b.connect(&alice).await;
    assert_eq!(recv_close(&mut old).await.0, close_code::SESSION_REPLACED);
    a.wait_disconnected(&alice).await;
    relay_in_order(&mut bob_ws, &bob, &alice, &mut new, "after", 10).await;
    assert_quiet(&mut new).await;
    // Two frames the second connection reads and does not acknowledge.
    let held = ids("held", 0..2);
    send_all(&mut bob_ws, &bob, &alice, &held).await;
    assert_eq!(recv_ids(&mut new, 2).await, held);
    // And back to the first instance: the second connection is displaced,
    // and what it held unacknowledged reaches the third first.
    let mut third = a.connect(&alice).await;
    assert_eq!(recv_close(&mut new).await.0, close_code::SESSION_REPLACED);
    b.wait_disconnected(&alice).await;
    assert_eq!(recv_ids(&mut third, 2).await, held);
    ack_all(&mut third, &held).await;
    relay_in_order(&mut bob_ws, &bob, &alice, &mut third, "third", 10).await;
    assert_quiet(&mut third).await;
    assert_eq!(c.server.stats().messages_stored, 0);
    assert_eq!(
        b.server.stats().messages_stored,
        2,
        "stored by the displaced connection"
    );
    assert_eq!(c.server.stats().cluster_routed_out, 25);
}

/// Two connections of one DID opened at the same moment on two instances:
/// exactly one survives (the other is closed with 4006), and it gets the
/// next frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_connections_on_two_instances_leave_one() {
    let Some(cluster) = start_nats() else {
        return;
    };
    let [a, b, c] = cluster.instances().await;
    let (alice, bob) = (identity(1), identity(2));
    let mut bob_ws = c.connect(&bob).await;
    for round in 0..5 {
        let (mut on_a, mut on_b) = tokio::join!(a.ws(), b.ws());
        let (hello_a, hello_b) = (common::fresh_connect(&alice), common::fresh_connect(&alice));
        tokio::join!(send(&mut on_a, &hello_a), send(&mut on_b, &hello_b));
        // Settled when exactly one instance holds alice for a while.
        let mut settled = 0;
        for _ in 0..400 {
            let here_a = a.server.server().connected_dids().contains(&alice.did().to_string());
            let here_b = b.server.server().connected_dids().contains(&alice.did().to_string());
            settled = if here_a != here_b { settled + 1 } else { 0 };
            if settled >= 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(settled >= 20, "round {round}: not exactly one holder");
        let (mut winner, mut loser) = if a.server.server().connected_dids().contains(&alice.did().to_string()) {
            (on_a, on_b)
        } else {
            (on_b, on_a)
        };
        assert_eq!(
            recv_close(&mut loser).await.0,
            close_code::SESSION_REPLACED,
            "round {round}"
        );
        relay_in_order(&mut bob_ws, &bob, &alice, &mut winner, &format!("r{round}"), 5).await;
        send(&mut winner, r#"{"type":"disconnect"}"#).await;
        a.wait_disconnected(&alice).await;
        b.wait_disconnected(&alice).await;
    }
}

/// (d) The recipient's instance goes away: frames sent meanwhile are
/// stored (none lost) and delivered, in order, on reconnecting elsewhere.
/// Then an instance that holds the subject but never answers (hung): the
/// sender stores after the route timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vanished_or_hung_instance_loses_nothing() {
    let Some(cluster) = start_nats() else {
        return;
    };
    let [a, b, c] = cluster.instances().await;
    let (alice, bob) = (identity(1), identity(2));
    let mut bob_ws = b.connect(&bob).await;
    let mut on_a = a.connect(&alice).await;
    relay_in_order(&mut bob_ws, &bob, &alice, &mut on_a, "live", 5).await;
    // Instance A vanishes; its socket ends.
    a.server.shutdown().await;
    drop(on_a);
    let gone = ids("gone", 0..30);
    send_all(&mut bob_ws, &bob, &alice, &gone).await;
    let mut on_c = c.connect(&alice).await;
    assert_eq!(recv_ids(&mut on_c, 30).await, gone);
    assert_quiet(&mut on_c).await;
    ack_all(&mut on_c, &gone).await;
    // Live again, through C.
    relay_in_order(&mut bob_ws, &bob, &alice, &mut on_c, "back", 5).await;
    send(&mut on_c, r#"{"type":"disconnect"}"#).await;
    c.wait_disconnected(&alice).await;

    // A hung instance: subscribed to alice's subject, never answering.
    let router = c.server.server().storage().live.clone().unwrap();
    let hung = router.subscribe_did(&alice.did().to_string()).await.unwrap();
    router.sync().await.unwrap();
    let fallbacks = b.server.stats().cluster_fallbacks;
    let hung_ids = ids("hung", 0..3);
    send_all(&mut bob_ws, &bob, &alice, &hung_ids).await;
    wait_until(|| b.server.stats().cluster_fallbacks == fallbacks + 3).await;
    assert_eq!(b.server.stats().cluster_fallbacks, fallbacks + 3);
    drop(hung);
    let mut on_b = b.connect(&alice).await;
    assert_eq!(recv_ids(&mut on_b, 3).await, hung_ids);
    assert_quiet(&mut on_b).await;
}

/// A frame stored while the recipient was connected but stale is not
/// overtaken by the sender's later live frames: the recipient's instance
/// sends the stored ones first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_frame_never_overtakes_a_stored_one() {
    let Some(cluster) = start_nats() else {
        return;
    };
    let [a, b] = cluster.instances().await;
    let (alice, bob) = (identity(1), identity(2));
    let mut on_a = a.connect(&alice).await;
    let mut bob_ws = b.connect(&bob).await;
    // Alice goes stale on A: A refuses frames for her, B stores them.
    a.clock.advance(Duration::from_secs(120));
    let first = ids("m", 0..5);
    send_all(&mut bob_ws, &bob, &alice, &first).await;
    wait_until(|| b.server.stats().messages_stored == 5).await;
    assert_eq!(b.server.stats().messages_stored, 5);
    assert_quiet(&mut on_a).await;
    // Alice is active again; bob's next frames go live, after the stored.
    send(&mut on_a, r#"{"type":"heartbeat"}"#).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = ids("m", 5..10);
    send_all(&mut bob_ws, &bob, &alice, &second).await;
    assert_eq!(recv_ids(&mut on_a, 10).await, ids("m", 0..10));
    assert_quiet(&mut on_a).await;
    assert_eq!(b.server.stats().cluster_routed_out, 5);
}
