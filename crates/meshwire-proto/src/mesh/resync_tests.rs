//! Desynchronized sessions between receipt-capable peers: detection on the
//! receiving and on the sending side, healing by a new session, crossing
//! resyncs, and what a forged frame can and cannot do. Two meshes, frames
//! passed by hand, the clock passed in.

use super::*;
use rand_core::OsRng;
use std::collections::VecDeque;

use super::tests::{bundle, did, kind, Counter, T0};

/// An agent with 8 one-time keys.
fn agent(name: &str) -> Mesh {
    super::tests::agent(name, 8)
}

fn id_of(text: &str) -> String {
    serde_json::from_str::<Value>(text).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Frames to send on, acks left out.
fn frames(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Transmit(t) if kind(t) != "ack" => Some(t.clone()),
            _ => None,
        })
        .collect()
}

/// The ids acknowledged to the relay.
fn acks(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Transmit(t) if kind(t) == "ack" => Some(id_of(t)),
            _ => None,
        })
        .collect()
}

fn messages(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(String::from_utf8(m.payload.clone()).unwrap()),
            _ => None,
        })
        .collect()
}

fn errors(events: &[Event]) -> Vec<(ErrorKind, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Error(m) => Some((m.kind, m.detail.clone())),
            _ => None,
        })
        .collect()
}

fn asks_resync(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::ResyncNeeded { .. }))
}

/// Hands `text` to `to` at `now`, accepting any KNOCK (or refusing all).
fn deliver_at(to: &mut Mesh, now: Timestamp, text: &str, accept: bool) -> Vec<Event> {
    let mut events = to.handle_text(&mut OsRng, now, text);
    let knocks: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match e {
            Event::KnockRequest { from, knock_id, .. } => Some((from.clone(), knock_id.clone())),
            _ => None,
        })
        .collect();
    for (from, knock_id) in knocks {
        events.extend(to.decide_knock(&mut OsRng, now, &from, &knock_id, accept));
    }
    events
}

fn deliver(to: &mut Mesh, text: &str) -> Vec<Event> {
    deliver_at(to, T0, text, true)
}

const RECEIPTS: PeerInfo = PeerInfo {
    dialect: None,
    receipts: true,
};

/// Alice and Bob with receipts both ways and a session used once: Bob has
/// Alice's first message, Alice has Bob's receipt for it (both verified the
/// session).
fn pair() -> (Mesh, Mesh) {
    let (mut alice, mut bob) = (agent("a"), agent("b"));
    alice.set_peer_info(&did(&bob), RECEIPTS);
    bob.set_peer_info(&did(&alice), RECEIPTS);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    deliver(&mut bob, &knock);
    let (_, m1) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"m1\"").unwrap();
    assert_eq!(messages(&deliver(&mut bob, &m1)), ["\"m1\""]);
    for r in frames(&bob.flush_receipts(&mut OsRng, T0)) {
        deliver(&mut alice, &r);
    }
    assert_eq!(alice.unconfirmed_count(&did(&bob)), 0);
    (alice, bob)
}

fn restore(m: &Mesh, backup: &str, name: &str) -> Mesh {
    Mesh::import_state(
        Identity::from_seed(&m.identity().seed()),
        backup,
        MeshConfig::default(),
        Box::new(Counter(name.into(), 0)),
    )
    .unwrap()
}

/// Two meshes and the relay between them, in order, at most once; the
/// driver's part (receipts, retransmission every second, resync on
/// request) done by hand.
struct Net {
    m: [Mesh; 2],
    inbox: [VecDeque<String>; 2],
    now: Timestamp,
    /// Payloads each side's application got, in order.
    got: [Vec<String>; 2],
    /// Every event each side produced.
    log: [Vec<Event>; 2],
    /// Resyncs asked for and not yet done (when `auto_resync` is off).
    asked: [bool; 2],
    /// Resyncs done.
    resyncs: [u32; 2],
    /// The resync KNOCKs sent, with the side they went to.
    knocks: Vec<(usize, String)>,
    auto_resync: bool,
}

impl Net {
    fn new(a: Mesh, b: Mesh, now: Timestamp) -> Self {
        Self {
            m: [a, b],
            inbox: [VecDeque::new(), VecDeque::new()],
            now,
            got: [Vec::new(), Vec::new()],
            log: [Vec::new(), Vec::new()],
            asked: [false; 2],
            resyncs: [0; 2],
            knocks: Vec::new(),
            auto_resync: true,
        }
    }

    fn did(&self, i: usize) -> String {
        did(&self.m[i])
    }

    fn resync(&mut self, i: usize) {
        let bundle = bundle(&self.m[1 - i]);
        let peer = self.did(1 - i);
        let frames = self.m[i].resync(&mut OsRng, self.now, &peer, &bundle).unwrap();
        self.asked[i] = false;
        if let Some(knock) = frames.first() {
            self.resyncs[i] += 1;
            self.knocks.push((1 - i, knock.clone()));
        }
        self.inbox[1 - i].extend(frames);
    }

    fn route(&mut self, i: usize, events: Vec<Event>) {
        for e in &events {
            match e {
                Event::Transmit(t) if kind(t) != "ack" => self.inbox[1 - i].push_back(t.clone()),
                Event::Message(m) => self.got[i].push(String::from_utf8(m.payload.clone()).unwrap()),
                Event::ResyncNeeded { .. } => self.asked[i] = true,
                _ => {}
            }
        }
        self.log[i].extend(events);
        if self.auto_resync && self.asked[i] {
            self.resync(i);
        }
    }

    /// Delivers the next frame queued for side `i`.
    fn step(&mut self, i: usize) -> bool {
        let Some(text) = self.inbox[i].pop_front() else {
            return false;
        };
        let events = deliver_at(&mut self.m[i], self.now, &text, true);
        self.route(i, events);
        true
    }

    /// Delivers until nothing is queued, side A first.
    fn pump(&mut self) {
        while self.step(0) || self.step(1) {}
    }

    /// One second later: receipts, retransmissions, delivery.
    fn tick(&mut self) {
        self.now = self.now.plus_ms(1_000);
        for i in 0..2 {
            let events = self.m[i].flush_receipts(&mut OsRng, self.now);
            self.route(i, events);
            let events = self.m[i].retransmit(&mut OsRng, self.now, 1_000);
            self.route(i, events);
        }
        self.pump();
    }

    fn unconfirmed(&self) -> [usize; 2] {
        [
            self.m[0].unconfirmed_count(&self.did(1)),
            self.m[1].unconfirmed_count(&self.did(0)),
        ]
    }

    /// Ticks until nothing is unconfirmed and nothing queued (at most
    /// `limit` seconds); the seconds it took.
    fn settle(&mut self, limit: u32) -> u32 {
        for s in 0..limit {
            if self.unconfirmed() == [0, 0] && self.inbox.iter().all(VecDeque::is_empty) {
                return s;
            }
            self.tick();
        }
        panic!(
            "not settled after {limit} s: unconfirmed {:?}, resyncs {:?}, errors A {:?}, errors B {:?}",
            self.unconfirmed(),
            self.resyncs,
            errors(&self.log[0]).into_iter().rev().take(4).collect::<Vec<_>>(),
            errors(&self.log[1]).into_iter().rev().take(4).collect::<Vec<_>>(),
        );
    }

    /// A new message each way arrives, on the first try.
    fn both_ways_work(&mut self, tag: &str) {
        for i in 0..2 {
            let peer = self.did(1 - i);
            let text = format!("\"{tag} from {i}\"");
            let (_, frame) = self.m[i].encrypt(&mut OsRng, self.now, &peer, text.as_bytes()).unwrap();
            let events = deliver_at(&mut self.m[1 - i], self.now, &frame, true);
            assert_eq!(
                messages(&events),
                [text],
                "side {i} -> {}: {:?}",
                1 - i,
                errors(&events)
            );
        }
    }
}

/// Alice restored from a copy older than a DH ratchet step on both sides
/// (both had verified the session): her messages fail at Bob and Bob's at
/// her with "authentication tag does not verify", not as a reused number.
/// Returns the pair, Alice's m4 and Bob's r2 (sent after the restore, both
/// undecryptable).
fn rolled_back_across_a_ratchet_step() -> (Mesh, Mesh, String, String) {
    let (mut alice, mut bob) = pair();
    let backup = alice.export_state();
    // A full round after the copy: Bob and Alice both take DH steps.
    let (_, m2) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"m2\"").unwrap();
    assert_eq!(messages(&deliver(&mut bob, &m2)), ["\"m2\""]);
    let (_, r1) = bob.encrypt(&mut OsRng, T0, &did(&alice), b"\"r1\"").unwrap();
    assert_eq!(messages(&deliver(&mut alice, &r1)), ["\"r1\""]);
    let (_, m3) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"m3\"").unwrap();
    assert_eq!(messages(&deliver(&mut bob, &m3)), ["\"m3\""]);
    let alice = restore(&alice, &backup, "a-restored");
    let mut alice = alice;
    let (_, m4) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"m4\"").unwrap();
    let (_, r2) = bob.encrypt(&mut OsRng, T0, &did(&alice), b"\"r2\"").unwrap();
    (alice, bob, m4, r2)
}

#[test]
fn a_rollback_across_a_ratchet_step_is_detected_by_both_and_healed() {
    let (mut alice, mut bob, m4, r2) = rolled_back_across_a_ratchet_step();
    let at_bob = bob.handle_text(&mut OsRng, T0, &m4);
    let at_alice = alice.handle_text(&mut OsRng, T0, &r2);
    for (events, who, msg) in [(&at_bob, "Bob", &m4), (&at_alice, "Alice", &r2)] {
        assert!(asks_resync(events), "{who}: {:?}", errors(events));
        let errs = errors(events);
        assert_eq!(errs.len(), 1, "{who}: {errs:?}");
        assert_eq!(errs[0].0, ErrorKind::Rollback);
        assert!(
            errs[0].1.contains("authentication tag does not verify") && errs[0].1.contains("desynchronized"),
            "{who}: {}",
            errs[0].1
        );
        assert_eq!(acks(events), [id_of(msg)], "{who} lets the relay drop it");
        assert!(messages(events).is_empty());
    }
    assert_eq!(bob.stats().resyncs_requested, 1);
    assert_eq!(alice.stats().resyncs_requested, 1);
    assert_eq!(bob.stats().rollbacks_detected, 1);

    // Both resync at once: the KNOCKs cross. One session survives, both
    // ways, and m4 and r2 arrive (once each).
    let mut net = Net::new(alice, bob, T0);
    net.auto_resync = false;
    net.resync(0);
    net.resync(1);
    net.pump();
    let took = net.settle(20);
    assert!(took <= 3, "settled in {took} s");
    assert_eq!(net.got[1], ["\"m4\""]);
    // Bob never had a receipt for r1, which the restored Alice forgot:
    // it comes again (duplicates are expected after a rollback).
    assert_eq!(net.got[0], ["\"r1\"", "\"r2\""]);
    assert_eq!(net.resyncs, [1, 1], "no further resync");
    assert!(!net.asked.contains(&true));
    // The smaller DID's session won: the other side's KNOCK was ignored.
    let smaller = usize::from(net.did(1) < net.did(0));
    assert!(errors(&net.log[smaller])
        .iter()
        .any(|(k, d)| *k == ErrorKind::Knock && d.contains("crosses our resync KNOCK")));
    assert!(net.log[1 - smaller]
        .iter()
        .any(|e| matches!(e, Event::SessionReplaced { .. })));
    assert!(!net.log[smaller]
        .iter()
        .any(|e| matches!(e, Event::SessionReplaced { .. })));
    net.both_ways_work("after");
}

/// Both sides found the session rolled back across a ratchet step and
/// asked for a resync; nothing resynced yet.
fn both_asked() -> Net {
    let (alice, bob, m4, r2) = rolled_back_across_a_ratchet_step();
    let mut net = Net::new(alice, bob, T0);
    net.auto_resync = false;
    net.inbox[1].push_back(m4);
    net.inbox[0].push_back(r2);
    net.step(0);
    net.step(1);
    assert_eq!(net.asked, [true, true]);
    net
}

/// Crossing resyncs, whichever side's frames the relay delivers first and
/// whatever the DID order: one working session.
#[test]
fn crossing_resyncs_converge_in_every_order() {
    for order in 0..4 {
        let mut net = both_asked();
        net.resync(0);
        net.resync(1);
        // Deliver side by side in varying order: first all of one side.
        match order {
            0 => while net.step(0) || net.step(1) {},
            1 => while net.step(1) || net.step(0) {},
            2 => {
                while net.step(0) {}
                while net.step(1) {}
            }
            _ => {
                while net.step(1) {}
                while net.step(0) {}
            }
        }
        net.pump();
        net.settle(20);
        assert_eq!(net.got[1], ["\"m4\""], "order {order}");
        assert_eq!(net.got[0], ["\"r1\"", "\"r2\""], "order {order}");
        assert_eq!(net.resyncs, [1, 1], "order {order}");
        net.both_ways_work("after");
        // Later, the relay redelivers both KNOCKs (stored): nothing changes.
        let knocks = std::mem::take(&mut net.knocks);
        assert_eq!(knocks.len(), 2);
        for (i, k) in knocks {
            assert!(
                net.m[i].handle_text(&mut OsRng, net.now, &k).is_empty(),
                "order {order}"
            );
        }
        net.both_ways_work("still");
    }
}

#[test]
fn a_rollback_seen_by_one_side_only_is_healed_with_nothing_lost() {
    // As the crash harness's finding: Alice's copy predates anything she
    // received, so only Bob can tell (Alice never verified the session).
    let (mut alice, mut bob) = (agent("a"), agent("b"));
    alice.set_peer_info(&did(&bob), RECEIPTS);
    bob.set_peer_info(&did(&alice), RECEIPTS);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    deliver(&mut bob, &knock);
    let (_, m1) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"m1\"").unwrap();
    assert_eq!(messages(&deliver(&mut bob, &m1)), ["\"m1\""]);
    let backup = alice.export_state();
    let (_, r1) = bob.encrypt(&mut OsRng, T0, &did(&alice), b"\"r1\"").unwrap();
    assert_eq!(messages(&deliver(&mut alice, &r1)), ["\"r1\""]);
    let (_, m2) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"m2\"").unwrap();
    assert_eq!(messages(&deliver(&mut bob, &m2)), ["\"m2\""]);
    let mut alice = restore(&alice, &backup, "a-restored");
    let (_, m3) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"m3\"").unwrap();
    let (_, r2) = bob.encrypt(&mut OsRng, T0, &did(&alice), b"\"r2\"").unwrap();
    // Alice cannot tell (unverified): a plain decrypt error, kept at the relay.
    let at_alice = alice.handle_text(&mut OsRng, T0, &r2);
    assert!(!asks_resync(&at_alice));
    assert_eq!(
        errors(&at_alice).iter().map(|e| e.0).collect::<Vec<_>>(),
        [ErrorKind::Decrypt]
    );
    assert!(acks(&at_alice).is_empty());
    let mut net = Net::new(alice, bob, T0);
    net.inbox[1].push_back(m3);
    net.pump();
    assert_eq!(net.resyncs, [0, 1], "Bob resyncs");
    net.settle(10);
    assert_eq!(net.got[1], ["\"m3\""]);
    // r2 went out again on the new session; r1 too (Bob never had its
    // receipt, and the restored Alice forgot it).
    assert_eq!(net.got[0], ["\"r1\"", "\"r2\""]);
    assert_eq!(net.resyncs, [0, 1]);
    net.both_ways_work("after");
}

#[test]
fn more_than_max_skip_frames_lost_is_healed_with_nothing_lost() {
    let (mut alice, bob) = pair();
    let lost: Vec<String> = (0..101).map(|n| format!("\"lost {n}\"")).collect();
    for text in &lost {
        alice.encrypt(&mut OsRng, T0, &did(&bob), text.as_bytes()).unwrap();
    }
    let (_, last) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"last\"").unwrap();
    let mut net = Net::new(alice, bob, T0);
    net.auto_resync = false;
    net.inbox[1].push_back(last.clone());
    net.pump();
    let errs = errors(&net.log[1]);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].0, ErrorKind::Rollback);
    assert!(errs[0].1.contains("would skip 101 keys"), "{}", errs[0].1);
    assert_eq!(acks(&net.log[1]), [id_of(&last)]);
    assert!(net.asked[1]);
    // Until Bob's driver has the bundle, Alice's retransmissions fail too:
    // acknowledged (a resync is under way), no second resync.
    net.tick();
    let errs = errors(&net.log[1]);
    assert!(errs.len() > 100);
    assert!(errs[1..]
        .iter()
        .all(|(k, d)| *k == ErrorKind::Decrypt && d.contains("a new session is under way")));
    assert_eq!(net.m[1].stats().resyncs_requested, 1);
    assert!(net.got[1].is_empty());
    // Bob resyncs: everything arrives, once, in order.
    net.auto_resync = true;
    net.resync(1);
    net.pump();
    net.settle(10);
    for i in 0..2 {
        eprintln!(
            "side {i}: {:?}",
            net.log[i]
                .iter()
                .filter(|e| !matches!(e, Event::Transmit(_) | Event::Message(_)))
                .map(|e| format!("{e:?}").chars().take(150).collect::<String>())
                .collect::<Vec<_>>()
                .iter()
                .rev()
                .take(12)
                .collect::<Vec<_>>()
        );
    }
    let mut expected = lost.clone();
    expected.push("\"last\"".into());
    assert_eq!(net.got[1], expected);
    assert_eq!(net.resyncs, [0, 1]);
    net.both_ways_work("after");
}

#[test]
fn a_peer_that_keeps_sending_but_never_confirms_is_resynced() {
    let (alice, bob) = pair();
    let mut net = Net::new(alice, bob, T0);
    net.auto_resync = false;
    let bob_did = net.did(1);
    let (_, _lost) = net.m[0].encrypt(&mut OsRng, T0, &bob_did, b"\"lost\"").unwrap();
    // Offline, or silent: retransmissions alone never resync.
    for _ in 0..10 {
        net.now = net.now.plus_ms(1_000);
        let events = net.m[0].retransmit(&mut OsRng, net.now, 1_000);
        assert_eq!(frames(&events).len(), 1);
        assert!(!asks_resync(&events));
    }
    // Bob keeps sending (his messages arrive) but confirms nothing of
    // Alice's (her frames to him are lost, e.g. his receiving side is
    // stuck and rate-limited): after three such rounds, Alice resyncs.
    let alice_did = net.did(0);
    let mut asked_at = None;
    for round in 1..=5 {
        net.now = net.now.plus_ms(500);
        let (_, r) = net.m[1]
            .encrypt(&mut OsRng, net.now, &alice_did, format!("\"r{round}\"").as_bytes())
            .unwrap();
        let events = deliver_at(&mut net.m[0], net.now, &r, true);
        assert_eq!(messages(&events).len(), 1);
        net.now = net.now.plus_ms(500);
        let events = net.m[0].retransmit(&mut OsRng, net.now, 1_000);
        if asks_resync(&events) {
            let errs = errors(&events);
            assert_eq!(errs.len(), 1);
            assert_eq!(errs[0].0, ErrorKind::Rollback);
            assert!(
                errs[0].1.contains("unconfirmed after 3 retransmissions"),
                "{}",
                errs[0].1
            );
            asked_at.get_or_insert(round);
        }
    }
    assert_eq!(asked_at, Some(3));
    assert_eq!(net.m[0].stats().resyncs_requested, 1, "once per interval");
    // The resync delivers the message.
    net.inbox[1].clear();
    net.resync(0);
    net.pump();
    net.settle(10);
    assert_eq!(net.got[1], ["\"lost\""]);
    net.both_ways_work("after");
}

/// A forged frame (the relay can forge `from`) costs at most one resync
/// per interval; the session keeps working until the new one decrypts,
/// and a refused resync leaves it in place.
#[test]
fn a_forged_frame_costs_one_resync_per_interval_and_no_session() {
    let (mut alice, mut bob) = pair();
    let (_, genuine) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"g\"").unwrap();
    let forge = |i: u32| {
        let mut v: Value = serde_json::from_str(&genuine).unwrap();
        v["id"] = format!("forged-{i}").into();
        v["ciphertext"] = crate::encoding::b64_std(&[i as u8; 48]).into();
        v.to_string()
    };
    let events = bob.handle_text(&mut OsRng, T0, &forge(1));
    assert!(asks_resync(&events));
    let events = bob.handle_text(&mut OsRng, T0.plus_ms(29_999), &forge(2));
    assert!(!asks_resync(&events), "rate-limited");
    assert_eq!(bob.stats().resyncs_requested, 1);
    // Nothing was replaced: the genuine message still decrypts, replies too.
    assert_eq!(messages(&deliver(&mut bob, &genuine)), ["\"g\""]);
    let (_, r) = bob.encrypt(&mut OsRng, T0, &did(&alice), b"\"r\"").unwrap();
    assert_eq!(messages(&deliver(&mut alice, &r)), ["\"r\""]);
    // One more after the interval.
    let later = T0.plus_ms(RESYNC_INTERVAL_MS);
    assert!(asks_resync(&bob.handle_text(&mut OsRng, later, &forge(3))));
    assert_eq!(bob.stats().resyncs_requested, 2);

    // Bob's driver resyncs; Alice's message sent before the KNOCK reached
    // her still decrypts at Bob (the replaced session is kept for it).
    let (_, in_flight) = alice.encrypt(&mut OsRng, later, &did(&bob), b"\"in flight\"").unwrap();
    let [knock, control]: [String; 2] = bob
        .resync(&mut OsRng, later, &did(&alice), &bundle(&alice))
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(messages(&deliver(&mut bob, &in_flight)), ["\"in flight\""]);
    // Alice's policy refuses the new session: Bob keeps the old one.
    let mut refusal = deliver_at(&mut alice, later, &knock, false);
    refusal.extend(deliver_at(&mut alice, later, &control, false));
    assert!(!refusal.iter().any(|e| matches!(e, Event::SessionReplaced { .. })));
    let reject = frames(&refusal)
        .into_iter()
        .find(|t| kind(t) == "knock_reject")
        .unwrap();
    let events = bob.handle_text(&mut OsRng, later, &reject);
    assert!(events.iter().any(|e| matches!(e, Event::KnockRejected { .. })));
    assert!(bob.has_session(&did(&alice)));
    let (_, m) = alice.encrypt(&mut OsRng, later, &did(&bob), b"\"m\"").unwrap();
    assert_eq!(messages(&deliver(&mut bob, &m)), ["\"m\""]);
    let (_, r) = bob.encrypt(&mut OsRng, later, &did(&alice), b"\"r2\"").unwrap();
    assert_eq!(messages(&deliver(&mut alice, &r)), ["\"r2\""]);
}

/// A forged KNOCK in Alice's name while Bob's resync is outstanding, and a
/// forged first message for it, replace nothing.
#[test]
fn a_forged_knock_during_a_resync_replaces_nothing() {
    let (mut alice, mut bob) = pair();
    let [knock, control]: [String; 2] = bob
        .resync(&mut OsRng, T0, &did(&alice), &bundle(&alice))
        .unwrap()
        .try_into()
        .unwrap();
    // Mallory knocks at Bob as Alice, with her own keys: refused unasked
    // (the establishment's identity key is not Alice's).
    let mut mallory = agent("m");
    let mut fake: Value =
        serde_json::from_str(&mallory.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap()).unwrap();
    fake["from"] = did(&alice).into();
    let events = deliver(&mut bob, &fake.to_string());
    assert!(!events.iter().any(|e| matches!(e, Event::KnockRequest { .. })));
    // Alice takes Bob's new session; both ways work on it.
    deliver(&mut alice, &knock);
    let events = deliver(&mut alice, &control);
    assert!(events.contains(&Event::SessionReplaced { peer: did(&bob) }));
    let (_, m) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"m\"").unwrap();
    assert_eq!(messages(&deliver(&mut bob, &m)), ["\"m\""]);
    let (_, r) = bob.encrypt(&mut OsRng, T0, &did(&alice), b"\"r\"").unwrap();
    assert_eq!(messages(&deliver(&mut alice, &r)), ["\"r\""]);
}

/// Peers without receipts cannot resend: a message that does not decrypt
/// is reported, kept at the relay, and no resync is asked for.
#[test]
fn peers_without_receipts_are_never_resynced() {
    let (mut alice, mut bob) = (agent("a"), agent("b"));
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    deliver(&mut bob, &knock);
    let (_, m1) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"1").unwrap();
    deliver(&mut bob, &m1);
    for _ in 0..101 {
        alice.encrypt(&mut OsRng, T0, &did(&bob), b"x").unwrap();
    }
    let (_, far) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"far").unwrap();
    let events = bob.handle_text(&mut OsRng, T0, &far);
    assert!(!asks_resync(&events));
    assert_eq!(
        errors(&events).iter().map(|e| e.0).collect::<Vec<_>>(),
        [ErrorKind::Decrypt]
    );
    assert!(acks(&events).is_empty());
    assert_eq!(bob.stats().resyncs_requested, 0);
}

/// Retransmitted copies of messages already read take new message numbers:
/// they are read (and dropped) so that the chains stay in step; a burst of
/// more copies than the skip window does not break the session.
#[test]
fn a_burst_of_retransmitted_copies_keeps_the_chains_in_step() {
    let (mut alice, mut bob) = pair();
    let ids: Vec<String> = (0..60)
        .map(|n| {
            let (id, m) = alice
                .encrypt(&mut OsRng, T0, &did(&bob), format!("{n}").as_bytes())
                .unwrap();
            assert_eq!(messages(&deliver(&mut bob, &m)).len(), 1);
            id
        })
        .collect();
    // Bob's receipts are late: Alice resends all 60, twice (120 copies).
    for round in 1..=2 {
        let copies = frames(&alice.retransmit(&mut OsRng, T0.plus_ms(round * 2_000), 1_000));
        assert_eq!(copies.len(), 60);
        for c in copies {
            let events = deliver(&mut bob, &c);
            assert!(messages(&events).is_empty(), "a copy is not delivered again");
            assert!(errors(&events).is_empty());
        }
    }
    let (_, next) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"next\"").unwrap();
    assert_eq!(messages(&deliver(&mut bob, &next)), ["\"next\""]);
    for r in frames(&bob.flush_receipts(&mut OsRng, T0)) {
        deliver(&mut alice, &r);
    }
    assert_eq!(alice.unconfirmed_count(&did(&bob)), 0);
    assert_eq!(ids.len(), 60);
    assert_eq!(bob.stats().resyncs_requested, 0);
}

/// One side's driver resyncs only after the other side's resync KNOCK was
/// accepted (its bundle fetch was slow): still one working session.
#[test]
fn a_resync_after_the_peers_knock_was_accepted_converges() {
    for first in 0..2 {
        let mut net = both_asked();
        let late = 1 - first;
        net.resync(first);
        // The late side gets the KNOCK (accepted: pending), then resyncs,
        // then gets the first message of the other side's session.
        net.step(late);
        assert!(net.m[late].peers[&net.did(first)].pending.is_some());
        net.resync(late);
        net.pump();
        net.settle(20);
        assert_eq!(net.got[1], ["\"m4\""], "first {first}");
        assert_eq!(net.got[0], ["\"r1\"", "\"r2\""], "first {first}");
        assert_eq!(net.resyncs, [1, 1]);
        net.both_ways_work("after");
    }
}

/// One side's driver resyncs only after the other side's new session
/// replaced the broken one there (KNOCK and first message handled while its
/// bundle fetch was slow): the late resync is moot and sends nothing. Seen
/// in the cluster test: a SIGKILLed relay lost more than the skip window of
/// Bob's frames; Alice resynced; her first message overtook her KNOCK, so
/// Bob asked for a resync too, then accepted hers. Opening his own session
/// after that replaced the shared one with one Alice ignored (hers won the
/// crossing), and none of Bob's messages decrypted there again.
#[test]
fn a_resync_after_the_peers_session_replaced_ours_is_moot() {
    for first in 0..2 {
        let mut net = both_asked();
        let late = 1 - first;
        net.resync(first);
        // The late side takes the KNOCK and the first message on the new
        // session: it replaced the broken one.
        assert!(net.step(late) && net.step(late));
        assert!(
            net.log[late].contains(&Event::SessionReplaced { peer: net.did(first) }),
            "first {first}"
        );
        // Its driver has the bundle now: nothing to send.
        let peer = net.did(first);
        let bundle = bundle(&net.m[first]);
        let frames = net.m[late].resync(&mut OsRng, net.now, &peer, &bundle).unwrap();
        assert!(frames.is_empty(), "first {first}: {frames:?}");
        net.pump();
        net.settle(20);
        let mut resyncs = [0, 0];
        resyncs[first] = 1;
        assert_eq!(
            net.resyncs, resyncs,
            "first {first}: one session opened, by the first side"
        );
        assert_eq!(net.got[1], ["\"m4\""], "first {first}");
        assert_eq!(net.got[0], ["\"r1\"", "\"r2\""], "first {first}");
        net.both_ways_work("after");
        // A later resync (a new ask) opens a session again.
        let frames = net.m[late].resync(&mut OsRng, net.now, &peer, &bundle).unwrap();
        assert_eq!(frames.len(), 2, "first {first}");
    }
}
