use super::*;
use rand_core::OsRng;

pub(super) const T0: Timestamp = Timestamp(1_795_262_400_000);

pub(super) struct Counter(pub(super) String, pub(super) u32);

impl IdSource for Counter {
    fn next_id(&mut self) -> String {
        self.1 += 1;
        format!("{}-{}", self.0, self.1)
    }
}

pub(super) fn agent(name: &str, otks: usize) -> Mesh {
    let identity = Identity::generate(&mut OsRng);
    let mut prekeys = PreKeys::generate(&mut OsRng, &identity);
    prekeys.generate_one_time_keys(&mut OsRng, otks).unwrap();
    Mesh::new(
        identity,
        prekeys,
        MeshConfig::default(),
        Box::new(Counter(name.into(), 0)),
    )
}

pub(super) fn did(m: &Mesh) -> String {
    m.identity().did().to_string()
}

pub(super) fn bundle(m: &Mesh) -> PreKeyBundle {
    let otk = m.prekeys().one_time_key_ids().next();
    m.prekeys().bundle(m.identity(), otk)
}

fn transmits(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| {
            if let Event::Transmit(t) = e {
                Some(t.clone())
            } else {
                None
            }
        })
        .collect()
}

fn messages(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| {
            if let Event::Message(m) = e {
                Some(String::from_utf8(m.payload.clone()).unwrap())
            } else {
                None
            }
        })
        .collect()
}

fn errors(events: &[Event]) -> Vec<ErrorKind> {
    events
        .iter()
        .filter_map(|e| if let Event::Error(m) = e { Some(m.kind) } else { None })
        .collect()
}

pub(super) fn kind(text: &str) -> String {
    serde_json::from_str::<Value>(text).unwrap()["type"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Delivers `text` to `to`, accepting any KNOCK; returns the events.
fn deliver(to: &mut Mesh, text: &str) -> Vec<Event> {
    let mut events = to.handle_text(&mut OsRng, T0, text);
    let knocks: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| {
            if let Event::KnockRequest { from, knock_id, .. } = e {
                Some((from.clone(), knock_id.clone()))
            } else {
                None
            }
        })
        .collect();
    for (from, knock_id) in knocks {
        events.extend(to.decide_knock(&mut OsRng, T0, &from, &knock_id, true));
    }
    events
}

#[test]
fn knock_then_messages_both_ways() {
    let mut alice = agent("a", 2);
    let mut bob = agent("b", 3);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (_, m1) = alice
        .encrypt(&mut OsRng, T0, &did(&bob), br#"{"text":"hello"}"#)
        .unwrap();
    let events = deliver(&mut bob, &knock);
    assert_eq!(
        transmits(&events).iter().map(|t| kind(t)).collect::<Vec<_>>(),
        ["knock_accept"]
    );
    assert_eq!(
        bob.prekeys().one_time_key_ids().count(),
        3,
        "OTK kept until the first message decrypts"
    );
    let events = deliver(&mut bob, &m1);
    assert_eq!(messages(&events), [r#"{"text":"hello"}"#]);
    assert!(events.contains(&Event::OneTimeKeyConsumed { id: 0 }));
    assert!(events.contains(&Event::SessionEstablished { peer: did(&alice) }));
    assert_eq!(bob.prekeys().one_time_key_ids().collect::<Vec<_>>(), [1, 2]);
    let (_, reply) = bob.encrypt(&mut OsRng, T0, &did(&alice), b"[1]").unwrap();
    assert_eq!(messages(&deliver(&mut alice, &reply)), ["[1]"]);
}

#[test]
fn messages_before_their_knock_are_buffered_then_delivered() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 1);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let sent: Vec<String> = (0..3)
        .map(|i| {
            alice
                .encrypt(&mut OsRng, T0, &did(&bob), format!("{i}").as_bytes())
                .unwrap()
                .1
        })
        .collect();
    for m in sent.iter().rev() {
        assert!(bob.handle_text(&mut OsRng, T0, m).is_empty());
    }
    assert_eq!(bob.next_timeout(), Some(T0.plus_ms(3000)));
    let events = deliver(&mut bob, &knock);
    let mut got = messages(&events);
    got.sort();
    assert_eq!(got, ["0", "1", "2"]);
}

#[test]
fn pre_knock_buffer_is_bounded_and_expires() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 0);
    let _knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let mut events = Vec::new();
    for i in 0..7 {
        let (_, m) = alice
            .encrypt(&mut OsRng, T0, &did(&bob), format!("{i}").as_bytes())
            .unwrap();
        events.extend(bob.handle_text(&mut OsRng, T0, &m));
    }
    assert_eq!(
        errors(&events),
        [ErrorKind::NoSession, ErrorKind::NoSession],
        "two oldest evicted"
    );
    assert!(bob.handle_timeout(&mut OsRng, T0.plus_ms(2999)).is_empty());
    assert_eq!(
        errors(&bob.handle_timeout(&mut OsRng, T0.plus_ms(3000))),
        vec![ErrorKind::NoSession; 5]
    );
    assert_eq!(bob.next_timeout(), None);
}

#[test]
fn rejected_knock_sends_reject_and_drops_buffer() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 0);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (_, m) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"1").unwrap();
    let events = bob.handle_text(&mut OsRng, T0, &knock);
    assert!(matches!(&events[..], [Event::KnockRequest { .. }]));
    assert!(
        bob.handle_text(&mut OsRng, T0, &m).is_empty(),
        "buffered while the verdict is pending"
    );
    let knock_id = bob.pending_knock(&did(&alice)).unwrap().to_owned();
    let events = bob.decide_knock(&mut OsRng, T0, &did(&alice), &knock_id, false);
    let frames = transmits(&events);
    assert_eq!(kind(&frames[0]), "knock_reject");
    assert!(frames[0].contains(r#""reason":"policy_denied""#));
    assert!(messages(&events).is_empty());
    let events = alice.handle_text(&mut OsRng, T0, &frames[0]);
    assert_eq!(
        events,
        [Event::KnockRejected {
            from: did(&bob),
            reason: Some("policy_denied".into())
        }]
    );
    assert!(!alice.has_session(&did(&bob)));
}

#[test]
fn forged_and_replayed_frames_do_not_hurt_the_session() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 1);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (_, m1) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"1").unwrap();
    let (_, m2) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"2").unwrap();
    deliver(&mut bob, &knock);
    // A forged first message: the OTK survives, the real one still works.
    let mut forged: Value = serde_json::from_str(&m1).unwrap();
    forged["id"] = "forged".into();
    forged["ciphertext"] = crate::encoding::b64_std(&[7u8; 40]).into();
    let events = bob.handle_text(&mut OsRng, T0, &forged.to_string());
    assert_eq!(errors(&events), [ErrorKind::Decrypt]);
    assert_eq!(bob.prekeys().one_time_key_ids().count(), 1);
    assert_eq!(messages(&deliver(&mut bob, &m1)), ["1"]);
    // Duplicate by id: acked again, not delivered again.
    let events = deliver(&mut bob, &m1);
    assert!(messages(&events).is_empty());
    assert_eq!(transmits(&events).iter().map(|t| kind(t)).collect::<Vec<_>>(), ["ack"]);
    // A redelivered KNOCK is not put to the policy again, nor answered.
    assert!(bob.handle_text(&mut OsRng, T0, &knock).is_empty());
    // Garbage, then the genuine next message.
    assert_eq!(
        errors(&bob.handle_text(&mut OsRng, T0, "{not json")),
        [ErrorKind::Frame]
    );
    assert_eq!(
        errors(&bob.handle_text(&mut OsRng, T0, r#"{"v":1,"type":"teleport"}"#)),
        [ErrorKind::UnknownFrame]
    );
    assert_eq!(messages(&deliver(&mut bob, &m2)), ["2"]);
}

#[test]
fn restarted_peer_reknocks_and_replaces_the_session() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 2);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (_, m1) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"before").unwrap();
    deliver(&mut bob, &knock);
    deliver(&mut bob, &m1);
    // Alice restarts with the same identity but no state.
    let identity = Identity::from_seed(&alice.identity().seed());
    let prekeys = PreKeys::generate(&mut OsRng, &identity);
    let mut alice2 = Mesh::new(
        identity,
        prekeys,
        MeshConfig::default(),
        Box::new(Counter("a2".into(), 0)),
    );
    let knock2 = alice2.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (_, m2) = alice2.encrypt(&mut OsRng, T0, &did(&bob), b"after").unwrap();
    let events = deliver(&mut bob, &knock2);
    assert!(events.iter().any(|e| matches!(e, Event::KnockRequest { .. })));
    let events = deliver(&mut bob, &m2);
    assert_eq!(messages(&events), ["after"]);
    assert!(events.contains(&Event::SessionReplaced { peer: did(&alice) }));
    // The relay redelivers the first, stored KNOCK: ignored, no reject sent.
    assert!(bob.handle_text(&mut OsRng, T0, &knock).is_empty());
    // The relay redelivers the first, stored KNOCK: ignored, no reject sent.
    assert!(bob.handle_text(&mut OsRng, T0, &knock).is_empty());
    let (_, reply) = bob.encrypt(&mut OsRng, T0, &did(&alice), b"welcome back").unwrap();
    assert_eq!(messages(&deliver(&mut alice2, &reply)), ["welcome back"]);
}

#[test]
fn forged_reknock_does_not_replace_a_working_session() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 2);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (_, m1) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"1").unwrap();
    deliver(&mut bob, &knock);
    deliver(&mut bob, &m1);
    // Mallory knocks as Alice with her own keys.
    let mallory = agent("m", 0);
    let mut fake: Value = serde_json::from_str(&{
        let mut m = mallory;
        m.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap()
    })
    .unwrap();
    fake["from"] = did(&alice).into();
    deliver(&mut bob, &fake.to_string());
    let (_, m2) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"2").unwrap();
    let events = deliver(&mut bob, &m2);
    assert_eq!(messages(&events), ["2"]);
    assert!(!events.iter().any(|e| matches!(e, Event::SessionReplaced { .. })));
}

#[test]
fn legacy_dialect_is_detected_by_the_responder() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 1);
    alice.set_peer_dialect(&did(&bob), KdfDialect::LegacyFfSalt);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (_, m1) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"old sdk").unwrap();
    deliver(&mut bob, &knock);
    assert_eq!(messages(&deliver(&mut bob, &m1)), ["old sdk"]);
    assert_eq!(bob.peer_dialect(&did(&alice)), Some(KdfDialect::LegacyFfSalt));
}

#[test]
fn plaintext_only_from_allow_listed_peers_and_never_after_encryption() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 1);
    let plain = |from: &Mesh, to: &Mesh, id: &str| {
        Frame::Message(MessageFrame {
            from: did(from),
            to: did(to),
            id: id.into(),
            ts: "t".into(),
            body: MessageBody::Plaintext(br#"{"p":1}"#.to_vec()),
        })
        .to_text()
    };
    assert_eq!(
        errors(&{
            let t = plain(&alice, &bob, "p1");
            deliver(&mut bob, &t)
        }),
        [ErrorKind::Plaintext]
    );
    bob.config_mut().plaintext_peers.insert(did(&alice));
    let events = {
        let t = plain(&alice, &bob, "p2");
        deliver(&mut bob, &t)
    };
    assert!(matches!(
        &events[..],
        [Event::Message(InboundMessage { plaintext: true, .. })]
    ));
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (_, m1) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"1").unwrap();
    deliver(&mut bob, &knock);
    deliver(&mut bob, &m1);
    assert_eq!(
        errors(&{
            let t = plain(&alice, &bob, "p3");
            deliver(&mut bob, &t)
        }),
        [ErrorKind::Plaintext]
    );
}

#[test]
fn receipts_confirm_and_retransmission_is_deduplicated() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 1);
    alice.set_peer_info(
        &did(&bob),
        PeerInfo {
            dialect: None,
            receipts: true,
        },
    );
    bob.set_peer_info(
        &did(&alice),
        PeerInfo {
            dialect: None,
            receipts: true,
        },
    );
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (id1, m1) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"1").unwrap();
    let (_, _lost) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"2").unwrap();
    assert_eq!(alice.unconfirmed_count(&did(&bob)), 2);
    deliver(&mut bob, &knock);
    assert_eq!(messages(&deliver(&mut bob, &m1)), ["1"]);
    let receipts = transmits(&bob.flush_receipts(&mut OsRng, T0));
    assert_eq!(receipts.len(), 1);
    let events = deliver(&mut alice, &receipts[0]);
    assert_eq!(
        events.iter().filter(|e| matches!(e, Event::Message(_))).count(),
        0,
        "receipts are invisible"
    );
    assert!(events.contains(&Event::Delivered {
        peer: did(&bob),
        ids: vec![id1.clone()]
    }));
    assert_eq!(alice.unconfirmed_count(&did(&bob)), 1);
    // The relay lost message 2: nothing younger than 5 s is resent, then it is.
    assert!(alice.retransmit(&mut OsRng, T0.plus_ms(1000), 5000).is_empty());
    let resent = transmits(&alice.retransmit(&mut OsRng, T0.plus_ms(6000), 5000));
    assert_eq!(resent.len(), 1);
    assert_eq!(messages(&deliver(&mut bob, &resent[0])), ["2"]);
    // Delivered twice (relay kept a copy after all): the second is dropped.
    assert!(messages(&deliver(&mut bob, &resent[0])).is_empty());
}

#[test]
fn state_export_import_continues_the_conversation() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 3);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (_, m1) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"1").unwrap();
    deliver(&mut bob, &knock);
    deliver(&mut bob, &m1);
    let saved = bob.export_state();
    let identity = Identity::from_seed(&bob.identity().seed());
    let mut bob2 = Mesh::import_state(identity, &saved, MeshConfig::default(), Box::new(RandomUuids)).unwrap();
    assert_eq!(*bob2.export_state(), *saved);
    assert!(
        messages(&deliver(&mut bob2, &m1)).is_empty(),
        "seen ids survive the restart"
    );
    let (_, m2) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"2").unwrap();
    assert_eq!(messages(&deliver(&mut bob2, &m2)), ["2"]);
    let (_, reply) = bob2.encrypt(&mut OsRng, T0, &did(&alice), b"r").unwrap();
    assert_eq!(messages(&deliver(&mut alice, &reply)), ["r"]);
    assert_eq!(bob2.prekeys().one_time_key_ids().collect::<Vec<_>>(), [1, 2]);
    let other = Identity::generate(&mut OsRng);
    assert!(Mesh::import_state(other, &saved, MeshConfig::default(), Box::new(RandomUuids)).is_err());
}

#[test]
fn random_uuids_are_v4() {
    let id = RandomUuids.next_id();
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "4");
    assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
}

#[test]
fn messages_wait_for_a_slow_verdict_and_a_missing_verdict_rejects() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 1);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let sent: Vec<String> = (0..50)
        .map(|i| {
            alice
                .encrypt(&mut OsRng, T0, &did(&bob), format!("{i}").as_bytes())
                .unwrap()
                .1
        })
        .collect();
    assert!(matches!(
        &bob.handle_text(&mut OsRng, T0, &knock)[..],
        [Event::KnockRequest { .. }]
    ));
    for m in &sent {
        assert!(
            bob.handle_text(&mut OsRng, T0, m).is_empty(),
            "held while the verdict is pending"
        );
    }
    // Past the 3 s pre-KNOCK TTL, nothing is dropped: the KNOCK is known.
    assert!(bob.handle_timeout(&mut OsRng, T0.plus_ms(5_000)).is_empty());
    let knock_id = bob.pending_knock(&did(&alice)).unwrap().to_owned();
    let events = bob.decide_knock(&mut OsRng, T0.plus_ms(5_000), &did(&alice), &knock_id, true);
    assert_eq!(
        messages(&events),
        (0..50).map(|i| i.to_string()).collect::<Vec<_>>(),
        "all, in order"
    );

    let mut carol = agent("c", 0);
    let knock = carol.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    bob.handle_text(&mut OsRng, T0, &knock);
    assert_eq!(bob.next_timeout(), Some(T0.plus_ms(10_000)));
    let events = bob.handle_timeout(&mut OsRng, T0.plus_ms(10_000));
    assert_eq!(errors(&events), [ErrorKind::Knock]);
    assert!(transmits(&events).iter().any(|t| kind(t) == "knock_reject"));
}

fn knock_requests(events: &[Event]) -> Vec<(String, String, Value)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::KnockRequest { from, knock_id, intent } => Some((from.clone(), knock_id.clone(), intent.clone())),
            _ => None,
        })
        .collect()
}

fn with_intent(knock: &str, action: &str) -> String {
    let mut v: Value = serde_json::from_str(knock).unwrap();
    v["intent"] = serde_json::json!({ "action": action });
    v.to_string()
}

#[test]
fn a_knock_with_another_identitys_key_is_refused_unasked() {
    // Mallory sends a KNOCK under Alice's DID with her own identity key.
    let alice = agent("a", 0);
    let mut mallory = agent("m", 0);
    let mut bob = agent("b", 1);
    let knock = mallory.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (_, first) = mallory.encrypt(&mut OsRng, T0, &did(&bob), b"\"hi\"").unwrap();
    let forged = knock.replace(&did(&mallory), &did(&alice));
    let forged_first = first.replace(&did(&mallory), &did(&alice));
    let events = bob.handle_text(&mut OsRng, T0, &forged);
    assert!(knock_requests(&events).is_empty(), "the policy is never asked");
    assert_eq!(errors(&events), [ErrorKind::Knock]);
    assert!(format!("{events:?}").contains("does not derive the DID"));
    assert_eq!(bob.stats().knocks_refused, 1);
    let events = bob.handle_text(&mut OsRng, T0, &forged_first);
    assert!(messages(&events).is_empty());
    assert!(!bob.has_session(&did(&alice)));
    assert_eq!(bob.prekeys().one_time_key_ids().count(), 1, "no one-time key burnt");
    // The same KNOCK under Mallory's own DID is asked about as usual.
    let events = deliver(&mut bob, &knock);
    assert_eq!(knock_requests(&events).len(), 1);
    assert_eq!(messages(&deliver(&mut bob, &first)), ["\"hi\""]);
}

#[test]
fn a_verdict_applies_only_to_the_knock_it_names() {
    // The attack: "read_docs" is put to the policy, then superseded by
    // "delete_everything" before the verdict; approving the first must not
    // accept the second.
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 0);
    let first = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let second = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (_, msg) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"go\"").unwrap();
    let events = bob.handle_text(&mut OsRng, T0, &with_intent(&first, "read_docs"));
    let [(_, read_docs_id, intent)] = &knock_requests(&events)[..] else {
        panic!("{events:?}")
    };
    assert_eq!(intent["action"], "read_docs");
    let events = bob.handle_text(&mut OsRng, T0, &with_intent(&second, "delete_everything"));
    assert_eq!(errors(&events), [ErrorKind::Knock], "superseded is reported");
    let [(_, delete_id, intent)] = &knock_requests(&events)[..] else {
        panic!("{events:?}")
    };
    assert_eq!(intent["action"], "delete_everything");
    assert_ne!(read_docs_id, delete_id);
    assert_eq!(bob.pending_knock(&did(&alice)), Some(delete_id.as_str()));
    assert!(bob.handle_text(&mut OsRng, T0, &msg).is_empty(), "held for the verdict");

    let events = bob.decide_knock(&mut OsRng, T0, &did(&alice), read_docs_id, true);
    assert!(
        transmits(&events).is_empty(),
        "approving read_docs sends nothing: {events:?}"
    );
    assert!(messages(&events).is_empty());
    assert_eq!(errors(&events), [ErrorKind::Knock]);
    assert_eq!(bob.stats().stale_verdicts, 1);
    assert_eq!(bob.stats().knocks_superseded, 1);
    assert_eq!(
        bob.pending_knock(&did(&alice)),
        Some(delete_id.as_str()),
        "still awaiting"
    );

    let events = bob.decide_knock(&mut OsRng, T0, &did(&alice), delete_id, false);
    let frames = transmits(&events);
    assert_eq!(frames.len(), 1);
    let reject: Value = serde_json::from_str(&frames[0]).unwrap();
    assert_eq!(reject["type"], "knock_reject");
    assert_eq!(reject["knock_id"], delete_id.as_str());
    assert!(messages(&events).is_empty());
    // A second verdict on the decided KNOCK applies to nothing either.
    assert!(transmits(&bob.decide_knock(&mut OsRng, T0, &did(&alice), delete_id, true)).is_empty());
}

#[test]
fn a_knock_reject_for_an_older_knock_keeps_the_session() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 0);
    let first = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let first_id = serde_json::from_str::<Value>(&first).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let events = bob.handle_text(&mut OsRng, T0, &second);
    let knock_id = knock_requests(&events)[0].1.clone();
    let reject = transmits(&bob.decide_knock(&mut OsRng, T0, &did(&alice), &knock_id, false)).remove(0);
    let stale = reject.replace(&knock_id, &first_id);
    let events = alice.handle_text(&mut OsRng, T0, &stale);
    assert_eq!(errors(&events), [ErrorKind::Knock]);
    assert!(alice.has_session(&did(&bob)), "a reject of an older KNOCK ends nothing");
    let events = alice.handle_text(&mut OsRng, T0, &reject);
    assert!(matches!(&events[..], [Event::KnockRejected { .. }]));
    assert!(!alice.has_session(&did(&bob)));
}

#[test]
fn junk_frames_do_not_grow_the_state() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 0);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (_, m) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"1").unwrap();
    deliver(&mut bob, &knock);
    deliver(&mut bob, &m);
    let baseline = bob.export_state().len();
    let me = did(&bob);
    for i in 0..20_000u32 {
        let from = format!("did:mesh:junk{i:08}");
        let text = match i % 4 {
            // Encrypted-looking message with no session: buffered briefly.
            0 => m.replace(&did(&alice), &from),
            // A KNOCK whose identity key is not the sender's.
            1 => knock.replace(&did(&alice), &from),
            // knock_reject and knock_accept from strangers.
            2 => format!(
                r#"{{"v":1,"type":"knock_reject","from":"{from}","to":"{me}","id":"x{i}","knock_id":"k","ts":"2026-11-21T12:00:00.000Z"}}"#
            ),
            _ => format!("{{\"v\":1,\"type\":\"message\",\"from\":\"{from}\",\"to\":\"{me}\",\"id\":\"{i}\"}}"),
        };
        bob.handle_text(&mut OsRng, T0, &text);
    }
    assert!(
        bob.peer_count() <= 1 + bob.config.pre_knock_max_peers,
        "peers: {}",
        bob.peer_count()
    );
    assert_eq!(bob.stats().knocks_refused, 5_000);
    assert!(bob.stats().frames_rejected >= 5_000);
    assert!(bob.stats().buffered_dropped > 0);
    // Buffered junk expires; afterwards only the real peer is left, and the
    // state is what it was.
    bob.handle_timeout(&mut OsRng, T0.plus_ms(60_000));
    assert_eq!(bob.peer_count(), 1);
    assert_eq!(bob.export_state().len(), baseline);
}

#[test]
fn unconfirmed_messages_are_bounded() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 0);
    alice.set_peer_info(
        &did(&bob),
        PeerInfo {
            dialect: None,
            receipts: true,
        },
    );
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    deliver(&mut bob, &knock);
    let limit = alice.config.max_unconfirmed_per_peer;
    let mut refused = 0;
    for i in 0..20_000 {
        match alice.encrypt(&mut OsRng, T0, &did(&bob), format!("{i}").as_bytes()) {
            Ok(_) => {}
            Err(SendError::TooManyUnconfirmed { count, .. }) => {
                assert_eq!(count, limit);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(refused, 20_000 - limit);
    assert_eq!(alice.unconfirmed_count(&did(&bob)), limit);
    assert_eq!(alice.stats().unconfirmed_refused, (20_000 - limit) as u64);
    // One retransmit tick resends at most the limit.
    let resent = alice.retransmit(&mut OsRng, T0.plus_ms(60_000), 1_000);
    assert_eq!(transmits(&resent).len(), limit);
    // The byte budget holds too.
    alice.config_mut().max_unconfirmed_per_peer = usize::MAX;
    alice.config_mut().max_unconfirmed_bytes = 4096;
    let big = vec![b'x'; 4096];
    assert!(matches!(
        alice.encrypt(&mut OsRng, T0, &did(&bob), &big),
        Err(SendError::TooManyUnconfirmed { .. })
    ));
}

#[test]
fn knocks_awaiting_a_verdict_and_sessions_are_bounded() {
    let mut bob = agent("b", 0);
    bob.config_mut().max_pending_knocks = 3;
    bob.config_mut().max_sessions = 4;
    let mut knockers: Vec<Mesh> = (0..5).map(|i| agent(&format!("k{i}"), 0)).collect();
    let mut asked = Vec::new();
    for k in &mut knockers {
        let knock = k.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
        asked.extend(knock_requests(&bob.handle_text(&mut OsRng, T0, &knock)));
    }
    assert_eq!(asked.len(), 3);
    assert_eq!(bob.stats().knocks_refused, 2);
    for (from, id, _) in &asked {
        bob.decide_knock(&mut OsRng, T0, from, id, true);
    }
    // Establish the three sessions, then one more; the fifth peer is refused.
    for k in knockers.iter_mut().take(3) {
        let (_, m) = k.encrypt(&mut OsRng, T0, &did(&bob), b"1").unwrap();
        assert_eq!(messages(&bob.handle_text(&mut OsRng, T0, &m)), ["1"]);
    }
    let knock = knockers[3]
        .open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob))
        .unwrap();
    let events = deliver(&mut bob, &knock);
    let (_, m) = knockers[3].encrypt(&mut OsRng, T0, &did(&bob), b"2").unwrap();
    assert_eq!(transmits(&events).len(), 1);
    assert_eq!(messages(&bob.handle_text(&mut OsRng, T0, &m)), ["2"]);
    let knock = knockers[4]
        .open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob))
        .unwrap();
    let events = bob.handle_text(&mut OsRng, T0, &knock);
    assert!(knock_requests(&events).is_empty());
    let reply: Value = serde_json::from_str(&transmits(&events)[0]).unwrap();
    assert_eq!(reply["type"], "knock_reject");
    assert_eq!(reply["reason"], "capacity");
}

#[test]
fn dirty_rows_rebuild_the_same_state() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 2);
    assert!(bob.take_dirty().is_empty());
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    assert_eq!(alice.take_dirty().peers, [did(&bob)]);
    let (_, m) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"1").unwrap();
    assert_eq!(alice.take_dirty().peers, [did(&bob)], "a ratchet step is a change");
    deliver(&mut bob, &knock);
    assert!(bob.take_dirty().is_empty(), "an accepted KNOCK alone persists nothing");
    deliver(&mut bob, &m);
    let dirty = bob.take_dirty();
    assert!(dirty.prekeys);
    assert_eq!(dirty.peers, vec![did(&alice)]);
    assert!(dirty.seen.is_empty() && dirty.unconfirmed.is_empty(), "not tracked");
    // Junk changes nothing persisted.
    bob.handle_text(&mut OsRng, T0, &m.replace(&did(&alice), "did:mesh:junk"));
    bob.handle_text(&mut OsRng, T0, &m);
    assert!(bob.take_dirty().is_empty(), "a duplicate and junk write nothing");

    // The rows rebuild the mesh exactly.
    let rows: Vec<(String, zeroize::Zeroizing<String>)> = bob
        .session_peers()
        .into_iter()
        .map(|d| {
            let row = bob.export_peer(&d).unwrap();
            (d, row)
        })
        .collect();
    let rebuilt = Mesh::import_parts(
        Identity::from_seed(&bob.identity().seed()),
        &bob.export_prekeys(),
        rows,
        &SideRows::<String>::default(),
        MeshConfig::default(),
        Box::new(Counter("b2".into(), 0)),
    )
    .unwrap();
    assert_eq!(*rebuilt.export_state(), *bob.export_state());
    assert!(bob.export_peer("did:mesh:junk").is_none());

    // A rejected session's row is written as deleted.
    let second = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    alice.take_dirty();
    let events = bob.handle_text(&mut OsRng, T0, &second);
    let id = knock_requests(&events)[0].1.clone();
    let reject = transmits(&bob.decide_knock(&mut OsRng, T0, &did(&alice), &id, false)).remove(0);
    alice.handle_text(&mut OsRng, T0, &reject);
    assert_eq!(alice.take_dirty().peers, [did(&bob)]);
    assert!(
        alice.export_peer(&did(&bob)).is_none(),
        "nothing left: the row is deleted"
    );
}

/// Delivers every transmitted frame of `events` to `to` (accepting KNOCKs),
/// returning the events of those deliveries.
fn relay_all(events: &[Event], to: &mut Mesh) -> Vec<Event> {
    let mut out = Vec::new();
    for t in transmits(events) {
        if kind(&t) != "ack" {
            out.extend(deliver(to, &t));
        }
    }
    out
}

#[test]
fn a_peer_restored_from_an_older_copy_is_healed_between_meshwire_peers() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 2);
    alice.set_peer_info(
        &did(&bob),
        PeerInfo {
            dialect: None,
            receipts: true,
        },
    );
    bob.set_peer_info(
        &did(&alice),
        PeerInfo {
            dialect: None,
            receipts: true,
        },
    );
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    deliver(&mut bob, &knock);
    let (_, m1) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"m1\"").unwrap();
    assert_eq!(messages(&deliver(&mut bob, &m1)), ["\"m1\""]);
    relay_all(&bob.flush_receipts(&mut OsRng, T0), &mut alice);
    assert_eq!(alice.unconfirmed_count(&did(&bob)), 0);
    // A backup of Alice's state, then two more messages, confirmed.
    let backup = alice.export_state();
    for text in ["\"m2\"", "\"m3\""] {
        let (_, m) = alice.encrypt(&mut OsRng, T0, &did(&bob), text.as_bytes()).unwrap();
        assert_eq!(messages(&deliver(&mut bob, &m)), [text]);
    }
    relay_all(&bob.flush_receipts(&mut OsRng, T0), &mut alice);
    // Alice is restored from the backup: her next message reuses m2's number.
    let mut alice = Mesh::import_state(
        Identity::from_seed(&alice.identity().seed()),
        &backup,
        MeshConfig::default(),
        Box::new(Counter("a-restored".into(), 0)),
    )
    .unwrap();
    let (_, m4) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"m4\"").unwrap();
    let events = deliver(&mut bob, &m4);
    assert!(messages(&events).is_empty(), "it cannot be decrypted");
    assert_eq!(errors(&events), [ErrorKind::Rollback]);
    assert!(events.contains(&Event::ResyncNeeded { peer: did(&alice) }));
    assert_eq!(transmits(&events).iter().map(|t| kind(t)).collect::<Vec<_>>(), ["ack"]);
    assert_eq!(bob.stats().rollbacks_detected, 1);
    // The same symptom again within 30 s: reported, but no second resync.
    let (_, m5) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"m5\"").unwrap();
    let events = deliver(&mut bob, &m5);
    assert!(!events.iter().any(|e| matches!(e, Event::ResyncNeeded { .. })));

    // Bob heals: a new session whose first message asks Alice to resend.
    let frames = bob.resync(&mut OsRng, T0, &did(&alice), &bundle(&alice)).unwrap();
    assert_eq!(frames.len(), 2);
    assert_eq!(kind(&frames[0]), "knock");
    let mut events = deliver(&mut alice, &frames[0]);
    events.extend(deliver(&mut alice, &frames[1]));
    assert!(events.contains(&Event::SessionReplaced { peer: did(&bob) }));
    assert!(
        messages(&events).is_empty(),
        "the control message is not the application's"
    );
    let resent = alice.retransmit(&mut OsRng, T0.plus_ms(1), 60_000);
    assert_eq!(transmits(&resent).len(), 2, "m4 and m5 go out again at once");
    let delivered = relay_all(&resent, &mut bob);
    assert_eq!(messages(&delivered), ["\"m4\"", "\"m5\""], "nothing lost, in order");
    relay_all(&bob.flush_receipts(&mut OsRng, T0), &mut alice);
    assert_eq!(alice.unconfirmed_count(&did(&bob)), 0);
    // Both ways work.
    let (_, m6) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"\"m6\"").unwrap();
    assert_eq!(messages(&deliver(&mut bob, &m6)), ["\"m6\""]);
    let (_, r) = bob.encrypt(&mut OsRng, T0, &did(&alice), b"\"r\"").unwrap();
    assert_eq!(messages(&deliver(&mut alice, &r)), ["\"r\""]);
    // Copies of m4 and m5 on the new session are dropped by id.
    let again = alice.retransmit(&mut OsRng, T0.plus_ms(120_000), 1);
    assert!(messages(&relay_all(&again, &mut bob)).is_empty());
}

#[test]
fn a_restored_reference_peer_is_reported_not_silently_swallowed() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 0);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    deliver(&mut bob, &knock);
    let backup = alice.export_state();
    let (_, m1) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"1").unwrap();
    assert_eq!(messages(&deliver(&mut bob, &m1)), ["1"]);
    let mut alice = Mesh::import_state(
        Identity::from_seed(&alice.identity().seed()),
        &backup,
        MeshConfig::default(),
        Box::new(Counter("a-restored".into(), 0)),
    )
    .unwrap();
    let (_, m2) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"2").unwrap();
    let events = deliver(&mut bob, &m2);
    assert_eq!(errors(&events), [ErrorKind::Rollback]);
    assert!(format!("{events:?}").contains("this message is lost"));
    assert!(!events.iter().any(|e| matches!(e, Event::ResyncNeeded { .. })));
}

#[test]
fn disconnect_is_a_frame_then_a_close() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 0);
    // A message buffered before its KNOCK is dropped, and said so.
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    let (_, m) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"1").unwrap();
    assert!(bob.handle_text(&mut OsRng, T0, &m).is_empty());
    let events = bob.disconnect();
    assert_eq!(errors(&events), [ErrorKind::NoSession]);
    let frames = transmits(&events);
    assert_eq!(
        frames,
        [format!(r#"{{"v":1,"type":"disconnect","from":"{}"}}"#, did(&bob))]
    );
    assert_eq!(
        events.last(),
        Some(&Event::Close {
            code: 1000,
            reason: "client disconnect".into()
        })
    );
    // Nothing is left buffered: the KNOCK alone establishes nothing to read.
    assert!(messages(&deliver(&mut bob, &knock)).is_empty());
}

#[test]
fn registry_lookups_do_not_grow_the_state_but_are_used() {
    let mut alice = agent("a", 0);
    let bob = agent("b", 0);
    let before = alice.export_state().len();
    for i in 0..5_000 {
        alice.set_peer_info(
            &format!("did:mesh:stranger{i}"),
            PeerInfo {
                dialect: Some(KdfDialect::LegacyFfSalt),
                receipts: true,
            },
        );
    }
    assert_eq!(alice.peer_count(), 0);
    assert_eq!(alice.export_state().len(), before);
    assert!(alice.take_dirty().is_empty());
    assert_eq!(
        alice.peer_dialect("did:mesh:stranger0"),
        None,
        "the oldest were forgotten"
    );
    assert_eq!(
        alice.peer_dialect("did:mesh:stranger4999"),
        Some(KdfDialect::LegacyFfSalt)
    );
    // What the registry said is used once a session begins.
    alice.set_peer_info(
        &did(&bob),
        PeerInfo {
            dialect: Some(KdfDialect::LegacyFfSalt),
            receipts: true,
        },
    );
    alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    assert_eq!(alice.peer_dialect(&did(&bob)), Some(KdfDialect::LegacyFfSalt));
    let (_, _) = alice.encrypt(&mut OsRng, T0, &did(&bob), b"1").unwrap();
    assert_eq!(alice.unconfirmed_count(&did(&bob)), 1, "receipts were learnt");
}

#[test]
fn only_receipts_and_resyncs_are_control_messages() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 0);
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    deliver(&mut bob, &knock);
    // The client's encoding of raw bytes uses the reserved key too: it is the
    // application's message.
    let bytes = br#"{"$meshwire":"bytes","b64":"AAEC"}"#;
    let (_, m) = alice.encrypt(&mut OsRng, T0, &did(&bob), bytes).unwrap();
    assert_eq!(
        messages(&deliver(&mut bob, &m)),
        [String::from_utf8_lossy(bytes).into_owned()]
    );
    let (_, m) = alice
        .encrypt(&mut OsRng, T0, &did(&bob), br#"{"$meshwire":"resync"}"#)
        .unwrap();
    assert!(messages(&deliver(&mut bob, &m)).is_empty());
}

/// With side rows, a message costs its ids and unconfirmed entries, not a
/// rewrite of the lists: the peer row stays small, and the rows plus the
/// side rows rebuild the same state.
#[test]
fn side_rows_keep_peer_rows_small_and_rebuild_the_same_state() {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 2);
    alice.set_peer_info(
        &did(&bob),
        PeerInfo {
            dialect: None,
            receipts: true,
        },
    );
    bob.set_peer_info(
        &did(&alice),
        PeerInfo {
            dialect: None,
            receipts: true,
        },
    );
    alice.track_side_rows();
    bob.track_side_rows();
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    deliver(&mut bob, &knock);
    let mut side = SideRows::<zeroize::Zeroizing<String>>::default();
    let mut bob_seen = SideRows::<String>::default();
    let mut alice_rows = std::collections::BTreeMap::new();
    for i in 0..50 {
        let (_, m) = alice
            .encrypt(&mut OsRng, T0, &did(&bob), format!("{{\"n\":{i}}}").as_bytes())
            .unwrap();
        let dirty = alice.take_dirty();
        for (peer, id, row) in dirty.unconfirmed {
            let list = side.unconfirmed.entry(peer).or_default();
            assert!(row.is_some(), "new unconfirmed message {id}");
            list.extend(row);
        }
        for peer in dirty.peers {
            alice_rows.insert(peer.clone(), alice.export_peer(&peer).unwrap());
        }
        deliver(&mut bob, &m);
        let dirty = bob.take_dirty();
        assert_eq!(dirty.seen.len(), 1, "one new id per message");
        for (peer, id) in dirty.seen {
            bob_seen.seen.entry(peer).or_default().push(id);
        }
    }
    let row = bob.export_peer(&did(&alice)).unwrap();
    assert!(!row.contains("\"seen\":[\""), "ids are side rows: {}", row.len());
    assert!(alice_rows[&did(&bob)].len() < 4096, "{}", alice_rows[&did(&bob)].len());
    assert_eq!(alice.unconfirmed_count(&did(&bob)), 50);
    let rebuilt_alice = Mesh::import_parts(
        Identity::from_seed(&alice.identity().seed()),
        &alice.export_prekeys(),
        alice_rows.clone(),
        &side,
        MeshConfig::default(),
        Box::new(Counter("a2".into(), 0)),
    )
    .unwrap();
    assert_eq!(*rebuilt_alice.export_state(), *alice.export_state());
    let rebuilt_bob = Mesh::import_parts(
        Identity::from_seed(&bob.identity().seed()),
        &bob.export_prekeys(),
        vec![(did(&alice), bob.export_peer(&did(&alice)).unwrap())],
        &bob_seen,
        MeshConfig::default(),
        Box::new(Counter("b2".into(), 0)),
    )
    .unwrap();
    assert_eq!(*rebuilt_bob.export_state(), *bob.export_state());
    // A confirmation deletes the side rows it confirms.
    let receipts = bob.flush_receipts(&mut OsRng, T0);
    for t in transmits(&receipts) {
        alice.handle_text(&mut OsRng, T0, &t);
    }
    let dirty = alice.take_dirty();
    assert_eq!(dirty.unconfirmed.iter().filter(|(_, _, row)| row.is_none()).count(), 50);
    assert_eq!(alice.unconfirmed_count(&did(&bob)), 0);
}

/// The unconfirmed side rows follow every kind of change, whichever path
/// `take_dirty` takes (appends only, or a whole comparison after a
/// receipt, a retransmission or a resync), and after a reload from them:
/// applied to a store image after every step, they rebuild the sender's
/// exact state.
#[test]
fn unconfirmed_side_rows_follow_sends_receipts_retransmissions_and_reloads() {
    use std::collections::BTreeMap;
    let (mut alice, mut bob, bob_did) = receipt_pair();
    alice.track_side_rows();
    let alice_seed = alice.identity().seed();
    let alice_prekeys = alice.export_prekeys();
    // The store's image of alice: peer rows and unconfirmed rows by id.
    let mut rows: BTreeMap<String, zeroize::Zeroizing<String>> = BTreeMap::new();
    // In insertion order, as a store keeps them (an update keeps its place).
    let mut unconfirmed: Vec<((String, String), zeroize::Zeroizing<String>)> = Vec::new();
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut commit = |alice: &mut Mesh| {
        let dirty = alice.take_dirty();
        for (peer, id) in dirty.seen {
            seen.entry(peer).or_default().push(id);
        }
        for (peer, id, row) in dirty.unconfirmed {
            let key = (peer, id);
            let at = unconfirmed.iter().position(|(k, _)| *k == key);
            match (row, at) {
                (Some(row), Some(at)) => unconfirmed[at].1 = row,
                (Some(row), None) => unconfirmed.push((key, row)),
                (None, Some(at)) => {
                    unconfirmed.remove(at);
                }
                (None, None) => panic!("removing {key:?}, which the store does not have"),
            }
        }
        for peer in dirty.peers {
            if let Some(row) = alice.export_peer(&peer) {
                rows.insert(peer, row);
            }
        }
        let mut side = SideRows::<zeroize::Zeroizing<String>> {
            seen: seen.clone(),
            ..Default::default()
        };
        for ((peer, _), row) in &unconfirmed {
            side.unconfirmed.entry(peer.clone()).or_default().push(row.clone());
        }
        (rows.clone(), side)
    };
    let reload = |rows: BTreeMap<String, zeroize::Zeroizing<String>>, side: &SideRows<zeroize::Zeroizing<String>>| {
        Mesh::import_parts(
            Identity::from_seed(&alice_seed),
            &alice_prekeys,
            rows,
            side,
            MeshConfig::default(),
            Box::new(Counter("r".into(), 1_000)),
        )
        .expect("the store image loads")
    };
    let mut now = T0;
    let mut in_flight = Vec::new();
    for round in 0..6 {
        for i in 0..7 {
            let (_, m) = alice
                .encrypt(
                    &mut OsRng,
                    now,
                    &bob_did,
                    format!("{{\"r\":{round},\"i\":{i}}}").as_bytes(),
                )
                .expect("send");
            in_flight.push(m);
            let (rows, side) = commit(&mut alice);
            if i == 3 {
                assert_eq!(
                    *reload(rows, &side).export_state(),
                    *alice.export_state(),
                    "after a send"
                );
            }
        }
        match round % 3 {
            // Bob gets some of them and confirms those.
            0 => {
                for m in in_flight.drain(..4) {
                    deliver(&mut bob, &m);
                }
                for t in transmits(&bob.flush_receipts(&mut OsRng, now)) {
                    alice.handle_text(&mut OsRng, now, &t);
                }
                // More sent than confirmed before the store looks: the
                // same count, other messages.
                for i in 0..5 {
                    let (_, m) = alice
                        .encrypt(&mut OsRng, now, &bob_did, format!("{{\"after\":{i}}}").as_bytes())
                        .expect("send");
                    in_flight.push(m);
                }
            }
            // Nothing confirmed for a while: they go out again.
            1 => {
                now = Timestamp(now.0 + 60_000);
                assert!(!transmits(&alice.retransmit(&mut OsRng, now, 10_000)).is_empty());
            }
            // A reload in the middle, then sends go on from it.
            _ => {
                let (rows, side) = commit(&mut alice);
                alice = reload(rows, &side);
            }
        }
        let (rows, side) = commit(&mut alice);
        assert_eq!(
            *reload(rows, &side).export_state(),
            *alice.export_state(),
            "after round {round}"
        );
    }
    assert!(alice.unconfirmed_count(&bob_did) > 0);
}

/// Two receipt-capable agents with a session from `alice` to `bob`.
fn receipt_pair() -> (Mesh, Mesh, String) {
    let mut alice = agent("a", 0);
    let mut bob = agent("b", 1);
    let (alice_did, bob_did) = (did(&alice), did(&bob));
    for (me, other) in [(&mut alice, bob_did), (&mut bob, alice_did)] {
        me.set_peer_info(
            &other,
            PeerInfo {
                dialect: None,
                receipts: true,
            },
        );
    }
    let knock = alice.open_session(&mut OsRng, T0, &did(&bob), &bundle(&bob)).unwrap();
    deliver(&mut bob, &knock);
    let peer = did(&bob);
    (alice, bob, peer)
}

#[test]
fn leaving_sends_the_receipts_still_owed_before_the_disconnect_frame() {
    let (mut alice, mut bob, bob_did) = receipt_pair();
    let (id, m) = alice.encrypt(&mut OsRng, T0, &bob_did, b"last words").unwrap();
    assert_eq!(messages(&deliver(&mut bob, &m)), ["last words"]);
    let events = bob.leave(&mut OsRng, T0);
    let frames = transmits(&events);
    assert_eq!(frames.len(), 2, "the receipt, then the disconnect frame");
    assert!(frames[1].contains("\"type\":\"disconnect\""), "{}", frames[1]);
    assert!(matches!(events.last(), Some(Event::Close { code: CLOSE_NORMAL, .. })));
    assert!(deliver(&mut alice, &frames[0]).contains(&Event::Delivered {
        peer: bob_did.clone(),
        ids: vec![id]
    }));
    assert_eq!(alice.unconfirmed_count(&bob_did), 0);
    // Nothing owed: leaving is the disconnect frame alone.
    assert_eq!(transmits(&bob.leave(&mut OsRng, T0)).len(), 1);
}

#[test]
fn receipts_go_out_early_once_a_burst_owes_enough_of_them() {
    let (mut alice, mut bob, bob_did) = receipt_pair();
    let mut ids = Vec::new();
    for n in 0..EAGER_RECEIPTS {
        let (id, m) = alice
            .encrypt(&mut OsRng, T0, &bob_did, n.to_string().as_bytes())
            .unwrap();
        ids.push(id);
        deliver(&mut bob, &m);
        if n + 1 < EAGER_RECEIPTS {
            assert!(
                bob.flush_receipts_due(&mut OsRng, T0).is_empty(),
                "{} owed: not yet",
                n + 1
            );
        }
    }
    let receipts = transmits(&bob.flush_receipts_due(&mut OsRng, T0));
    assert_eq!(receipts.len(), 1, "one receipt message for the burst");
    assert!(deliver(&mut alice, &receipts[0]).contains(&Event::Delivered {
        peer: bob_did.clone(),
        ids
    }));
    assert_eq!(alice.unconfirmed_count(&bob_did), 0);
    assert!(
        bob.flush_receipts(&mut OsRng, T0).is_empty(),
        "nothing left for the periodic flush"
    );
}

/// Settled receipts: a lone message is confirmed once the sender has been
/// quiet for `RECEIPT_QUIET_MS`; a steady stream (one message every 20 ms)
/// gets one receipt message per `RECEIPT_MAX_DELAY_MS`, not one per timer
/// tick, and every id is confirmed exactly once.
#[test]
fn receipts_wait_for_a_quiet_sender_or_the_longest_delay() {
    let (mut alice, mut bob, bob_did) = receipt_pair();
    let at = |ms: u64| Timestamp(T0.0 + ms);
    let (lone, m) = alice.encrypt(&mut OsRng, T0, &bob_did, b"lone").unwrap();
    bob.handle_text(&mut OsRng, T0, &m);
    assert!(bob
        .flush_receipts_settled(&mut OsRng, at(RECEIPT_QUIET_MS - 1))
        .is_empty());
    let receipts = transmits(&bob.flush_receipts_settled(&mut OsRng, at(RECEIPT_QUIET_MS)));
    assert_eq!(receipts.len(), 1, "quiet for RECEIPT_QUIET_MS: confirmed");
    assert!(deliver(&mut alice, &receipts[0]).contains(&Event::Delivered {
        peer: bob_did.clone(),
        ids: vec![lone]
    }));

    // A stream from t = 1 s: a message every 20 ms for 2.5 s, the timer
    // every 100 ms.
    let start = 1_000;
    let mut sent = Vec::new();
    let mut confirmed = Vec::new();
    let mut flushed_at = Vec::new();
    for step in 0..125u64 {
        let t = at(start + step * 20);
        let (id, m) = alice.encrypt(&mut OsRng, t, &bob_did, b"tick").unwrap();
        sent.push(id);
        bob.handle_text(&mut OsRng, t, &m);
        if step % 5 == 4 {
            for r in transmits(&bob.flush_receipts_settled(&mut OsRng, t)) {
                flushed_at.push(t.0 - T0.0 - start);
                for e in alice.handle_text(&mut OsRng, t, &r) {
                    if let Event::Delivered { ids, .. } = e {
                        confirmed.extend(ids);
                    }
                }
            }
        }
    }
    // The first tick at or past RECEIPT_MAX_DELAY_MS after the oldest
    // owed: 1,080 ms (owed since 0), then 2,180 ms (owed since 1,100).
    assert_eq!(flushed_at, [1_080, 2_180]);
    assert_eq!(RECEIPT_MAX_DELAY_MS, 1_000);
    // The tail is confirmed once the stream stops.
    let end = at(start + 125 * 20 + RECEIPT_QUIET_MS);
    for r in transmits(&bob.flush_receipts_settled(&mut OsRng, end)) {
        for e in alice.handle_text(&mut OsRng, end, &r) {
            if let Event::Delivered { ids, .. } = e {
                confirmed.extend(ids);
            }
        }
    }
    assert_eq!(confirmed, sent, "every id confirmed once, in order");
    assert_eq!(alice.unconfirmed_count(&bob_did), 0);
}
