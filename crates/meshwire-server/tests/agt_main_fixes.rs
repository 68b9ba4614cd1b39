//! Issue 10 section 4: what AGT's relay fixed on main after 5.0.0, proven
//! against a started server: (a) the relay stamps `from` itself, (b) only
//! the recipient may acknowledge a message, (c) message ids are
//! deduplicated per recipient, not globally.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{ack, identity, message, recv_text, send, TestServer};
use meshwire_proto::frames::{self, FetchPendingFrame};
use meshwire_proto::Identity;
use std::time::Duration;

async fn wait_stored(t: &TestServer, n: u64) {
    for _ in 0..1000 {
        if t.server.stats().messages_stored >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{n} messages never stored: {:?}", t.server.stats());
}

/// A frame only `to` can receive, to prove nothing else was queued before it.
async fn marker(t: &TestServer, from: &Identity, to: &mut common::Ws, to_id: &Identity) {
    let mut ws = t.connect(from).await;
    let text = message(from, to_id, "marker");
    send(&mut ws, &text).await;
    assert_eq!(recv_text(to).await, text, "nothing else was queued before the marker");
}

#[tokio::test]
async fn a_relay_stamps_from_live_and_stored() {
    let t = TestServer::start().await;
    let (alice, bob, mallory) = (identity(1), identity(2), identity(3));
    let mut a = t.connect(&alice).await;
    // Stored: Bob is offline.
    send(&mut a, &message(&mallory, &bob, "stored-spoof")).await;
    wait_stored(&t, 1).await;
    let mut b = t.connect(&bob).await;
    assert_eq!(recv_text(&mut b).await, message(&alice, &bob, "stored-spoof"));
    // Live: Bob is connected.
    send(&mut a, &message(&bob, &bob, "live-spoof")).await;
    assert_eq!(recv_text(&mut b).await, message(&alice, &bob, "live-spoof"));
}

#[tokio::test]
async fn b_only_the_recipient_can_ack() {
    let t = TestServer::start().await;
    let (alice, bob, mallory) = (identity(1), identity(2), identity(3));
    let mut a = t.connect(&alice).await;
    let text = message(&alice, &bob, "for-bob");
    send(&mut a, &text).await;
    wait_stored(&t, 1).await;
    // Neither a third agent nor the sender can delete Bob's mail.
    let mut m = t.connect(&mallory).await;
    send(&mut m, &ack("for-bob")).await;
    send(&mut a, &ack("for-bob")).await;
    // Round trips on both connections: their acks were processed.
    marker(&t, &identity(4), &mut m, &mallory).await;
    let own = message(&alice, &alice, "self");
    send(&mut a, &own).await;
    assert_eq!(recv_text(&mut a).await, own);
    assert_eq!(t.server.stats().pending_messages, 1, "foreign acks deleted nothing");
    // Bob still gets it, and his ack deletes it.
    let mut b = t.connect(&bob).await;
    assert_eq!(recv_text(&mut b).await, text);
    send(&mut b, &ack("for-bob")).await;
    send(&mut b, &frames::to_text(&FetchPendingFrame::new(&bob))).await;
    marker(&t, &identity(5), &mut b, &bob).await;
    assert_eq!(t.server.stats().pending_messages, 0);
}

#[tokio::test]
async fn c_ids_are_deduplicated_per_recipient() {
    let t = TestServer::start().await;
    let (alice, bob, carol) = (identity(1), identity(2), identity(3));
    let mut a = t.connect(&alice).await;
    let to_bob = message(&alice, &bob, "same-id");
    let to_carol = message(&alice, &carol, "same-id");
    send(&mut a, &to_bob).await;
    send(&mut a, &to_carol).await;
    send(&mut a, &to_bob).await;
    send(&mut a, &to_carol).await;
    let own = message(&alice, &alice, "flush");
    send(&mut a, &own).await;
    assert_eq!(recv_text(&mut a).await, own);
    let stats = t.server.stats();
    assert_eq!(stats.messages_stored, 2, "one per recipient: {stats:?}");
    assert_eq!(stats.pending_messages, 2);
    let mut b = t.connect(&bob).await;
    assert_eq!(recv_text(&mut b).await, to_bob);
    marker(&t, &carol, &mut b, &bob).await;
    let mut c = t.connect(&carol).await;
    assert_eq!(
        recv_text(&mut c).await,
        to_carol,
        "the same id reached another recipient"
    );
    marker(&t, &bob, &mut c, &carol).await;
}
