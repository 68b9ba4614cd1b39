use super::*;
use rand_core::OsRng;

const T0: Timestamp = Timestamp(1_795_262_400_000);

struct Counter(String, u32);

impl IdSource for Counter {
    fn next_id(&mut self) -> String {
        self.1 += 1;
        format!("{}-{}", self.0, self.1)
    }
}

fn agent(name: &str, otks: usize) -> Mesh {
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

fn did(m: &Mesh) -> String {
    m.identity().did().to_string()
}

fn bundle(m: &Mesh) -> PreKeyBundle {
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

fn kind(text: &str) -> String {
    serde_json::from_str::<Value>(text).unwrap()["type"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Delivers `text` to `to`, accepting any KNOCK; returns the events.
fn deliver(to: &mut Mesh, text: &str) -> Vec<Event> {
    let mut events = to.handle_text(&mut OsRng, T0, text);
    let knocks: Vec<String> = events
        .iter()
        .filter_map(|e| {
            if let Event::KnockRequest { from, .. } = e {
                Some(from.clone())
            } else {
                None
            }
        })
        .collect();
    for from in knocks {
        events.extend(to.decide_knock(&mut OsRng, T0, &from, true));
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
    let events = bob.decide_knock(&mut OsRng, T0, &did(&alice), false);
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
    let events = bob.decide_knock(&mut OsRng, T0.plus_ms(5_000), &did(&alice), true);
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
