//! The check behind the fuzz target `knock`: KNOCK / establishment
//! acceptance by the responder's [`Mesh`], shared (like `checks.rs`) by the
//! target and the stable replay test in
//! `crates/meshwire-proto/tests/fuzz_corpus_replay.rs`. Uses only std,
//! `meshwire_proto`, `serde_json` (through `meshwire_proto`'s re-exports are
//! not enough, so the replay test's crate must have it) and `crate::checks`.
//!
//! Bob's mesh is fixed. Input byte 0 picks the form:
//!
//! * even: the rest is a frame text Bob receives (anything at all);
//! * odd: a genuine KNOCK from Alice, then her genuine first message, with
//!   mutations: byte 1 bit 0 claims Mallory's DID instead of Alice's, bit 1
//!   swaps in Mallory's identity key, bit 2 drops the one-time key id, bit 3
//!   names another one; bytes 2..34, when present, replace the ephemeral key
//!   and bytes 34..66 the identity key; the KNOCK's intent action is the
//!   rest as lossy UTF-8.
//!
//! Either way Bob decides every KNOCK put to him with "accept", and then:
//! no panic; a KNOCK whose identity key is not its sender's never reaches
//! the policy; a one-time key is gone only if a session with its user was
//! established; the state exports and imports; and afterwards a genuine
//! KNOCK from Alice still establishes a session whose first message and a
//! reply decrypt (junk cannot break Bob).

use meshwire_proto::binding::check_x25519_identity;
use meshwire_proto::mesh::{Event, IdSource, Mesh, MeshConfig};
use meshwire_proto::time::Timestamp;
use meshwire_proto::{Did, Identity, PreKeys, X25519PublicKey, X25519Secret};
use std::sync::OnceLock;

const NOW: Timestamp = Timestamp(1_795_262_400_000);

struct Counter(&'static str, u64);

impl IdSource for Counter {
    fn next_id(&mut self) -> String {
        self.1 += 1;
        format!("{}-{}", self.0, self.1)
    }
}

fn identities() -> &'static (Identity, Identity, Identity) {
    static IDS: OnceLock<(Identity, Identity, Identity)> = OnceLock::new();
    IDS.get_or_init(|| {
        (
            Identity::from_seed(&[0xa1; 32]),
            Identity::from_seed(&[0xb0; 32]),
            Identity::from_seed(&[0x6d; 32]),
        )
    })
}

fn mesh(identity: &Identity, name: &'static str, one_time_keys: u32) -> Mesh {
    let identity = Identity::from_seed(&identity.seed());
    let mut prekeys = PreKeys::with_signed_pre_key(&identity, 0, X25519Secret::from_bytes([0x5b; 32]));
    for id in 0..one_time_keys {
        // Distinct fixed secrets; ids 0..n.
        let _ = prekeys.add_one_time_key(id, X25519Secret::from_bytes([0x40 + id as u8; 32]));
    }
    Mesh::new(identity, prekeys, MeshConfig::default(), Box::new(Counter(name, 0)))
}

/// Delivers `text` to Bob, accepting every KNOCK; returns all events.
fn deliver(bob: &mut Mesh, rng: &mut crate::checks::FixedRng, text: &str) -> Vec<Event> {
    let mut events = bob.handle_text(rng, NOW, text);
    let asked: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match e {
            Event::KnockRequest { from, knock_id, .. } => Some((from.clone(), knock_id.clone())),
            _ => None,
        })
        .collect();
    for (from, knock_id) in asked {
        events.extend(bob.decide_knock(rng, NOW, &from, &knock_id, true));
    }
    events
}

fn mutated_knock(data: &[u8]) -> (String, String) {
    let (alice, bob, mallory) = identities();
    let mut rng = crate::checks::FixedRng::new(0xa11ce);
    let mut sender = mesh(alice, "a", 0);
    let bob_keys = mesh(bob, "b", 3);
    let otk = if data.get(1).is_some_and(|b| b & 4 != 0) {
        None
    } else {
        Some(1)
    };
    let bundle = bob_keys.prekeys().bundle(bob, otk);
    let Ok(knock) = sender.open_session(&mut rng, NOW, bob.did().as_str(), &bundle) else {
        return (String::new(), String::new());
    };
    let first = match sender.encrypt(&mut rng, NOW, bob.did().as_str(), b"\"first\"") {
        Ok((_, text)) => text,
        Err(_) => String::new(),
    };
    let flags = data.get(1).copied().unwrap_or(0);
    let Ok(mut value) = serde_json::from_str::<serde_json::Value>(&knock) else {
        return (knock, first);
    };
    let mut first = first;
    if flags & 1 != 0 {
        value["from"] = mallory.did().as_str().into();
        first = first.replace(alice.did().as_str(), mallory.did().as_str());
    }
    let b64 = |bytes: &[u8]| meshwire_proto::encoding::b64_std(bytes);
    if flags & 2 != 0 {
        value["establishment"]["ik"] = b64(mallory.x25519_public().as_bytes()).into();
    }
    if flags & 8 != 0 {
        value["establishment"]["otk"] = 2.into();
    }
    if let Some(ek) = data.get(2..34) {
        value["establishment"]["ek"] = b64(ek).into();
    }
    if let Some(ik) = data.get(34..66) {
        value["establishment"]["ik"] = b64(ik).into();
    }
    if let Some(rest) = data.get(66..) {
        value["intent"]["action"] = String::from_utf8_lossy(rest).into_owned().into();
    }
    (value.to_string(), first)
}

/// The `knock` target.
pub fn check_knock(data: &[u8]) {
    let (alice, bob_id, _) = identities();
    let mut rng = crate::checks::FixedRng::new(0xb0b);
    let mut bob = mesh(bob_id, "b", 3);
    let otks_before: Vec<u32> = bob.prekeys().one_time_key_ids().collect();
    let mut events = Vec::new();
    let mut claimed: Vec<(String, Option<X25519PublicKey>)> = Vec::new();
    match data.first() {
        Some(b) if b % 2 == 1 => {
            let (knock, first) = mutated_knock(data);
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&knock) {
                let ik = v["establishment"]["ik"]
                    .as_str()
                    .and_then(|t| meshwire_proto::encoding::b64_decode(t).ok())
                    .and_then(|k| X25519PublicKey::from_slice(&k).ok());
                claimed.push((v["from"].as_str().unwrap_or_default().to_owned(), ik));
            }
            events.extend(deliver(&mut bob, &mut rng, &knock));
            events.extend(deliver(&mut bob, &mut rng, &first));
        }
        _ => {
            let text = String::from_utf8_lossy(data.get(1..).unwrap_or_default()).into_owned();
            events.extend(deliver(&mut bob, &mut rng, &text));
        }
    }
    // A KNOCK reached the policy only if its identity key is its sender's.
    for event in &events {
        if let Event::KnockRequest { from, .. } = event {
            for (claimed_from, ik) in &claimed {
                if claimed_from == from {
                    let ik = ik.as_ref().expect("a KNOCK without an identity key reached the policy");
                    let did = Did::parse(from).expect("a KNOCK from a non-DID reached the policy");
                    assert!(
                        check_x25519_identity(&did, ik).is_ok(),
                        "KNOCK with another identity's key reached the policy"
                    );
                }
            }
        }
    }
    // One-time keys go only with an established session.
    let established = events
        .iter()
        .filter(|e| matches!(e, Event::SessionEstablished { .. } | Event::SessionReplaced { .. }))
        .count();
    let consumed: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::OneTimeKeyConsumed { id } => Some(*id),
            _ => None,
        })
        .collect();
    assert!(consumed.len() <= established, "a one-time key burnt without a session");
    let left: Vec<u32> = bob.prekeys().one_time_key_ids().collect();
    let expected: Vec<u32> = otks_before
        .iter()
        .copied()
        .filter(|id| !consumed.contains(id))
        .collect();
    assert_eq!(left, expected, "one-time keys changed without an event");

    // The state round-trips.
    let exported = bob.export_state();
    let restored = Mesh::import_state(
        Identity::from_seed(&bob_id.seed()),
        &exported,
        MeshConfig::default(),
        Box::new(Counter("b2", 0)),
    )
    .expect("exported state imports");
    assert_eq!(*restored.export_state(), *exported, "state round trip");

    // Bob still works: a genuine KNOCK from Alice (without a one-time key,
    // which the junk may legitimately have used) establishes a session.
    let mut alice_mesh = mesh(alice, "a2", 0);
    let mut arng = crate::checks::FixedRng::new(0xc0ffee);
    let bundle = bob.prekeys().bundle(bob.identity(), None);
    let knock = alice_mesh
        .open_session(&mut arng, NOW, bob.identity().did().as_str(), &bundle)
        .expect("genuine bundle");
    let (_, first) = alice_mesh
        .encrypt(&mut arng, NOW, bob.identity().did().as_str(), b"\"after\"")
        .expect("encrypt");
    deliver(&mut bob, &mut rng, &knock);
    let events = deliver(&mut bob, &mut rng, &first);
    let delivered = events
        .iter()
        .any(|e| matches!(e, Event::Message(m) if m.payload == b"\"after\""));
    assert!(delivered, "a genuine session after the input: {events:?}");
    let (_, reply) = bob
        .encrypt(&mut rng, NOW, alice.did().as_str(), b"\"reply\"")
        .expect("reply");
    let events = alice_mesh.handle_text(&mut arng, NOW, &reply);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Message(m) if m.payload == b"\"reply\"")),
        "the reply decrypts"
    );
}
