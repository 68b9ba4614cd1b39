//! meshwire's own vectors: the shared scenarios plus cases the reference
//! vectors do not cover. Every input is `sha256(utf8(label))` with labels
//! `agentmesh-golden/<case>/<role>`, as in the shared files.

use crate::rng::{label_bytes, LabelRng, ScriptedRng};
use crate::schema::{
    Document, Event, HeaderJson, IdentityCase, PartyStates, RatchetCase, RelayConnect, X3dhCase, SCHEMA,
};
use crate::verify::{error_kind, snapshot};
use meshwire_proto::channel::mesh_associated_data;
use meshwire_proto::frames::{self, ConnectFrame, FetchPendingFrame};
use meshwire_proto::ratchet::message_key_of;
use meshwire_proto::{
    auth, x3dh, DoubleRatchet, EncryptedMessage, Identity, KdfDialect, KeyPair, PreKeys, SharedSecret, X25519Secret,
};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Fixed clock of the identity cases, as in the shared files.
pub const IDENTITY_TIMESTAMP: &str = "2026-11-21T12:00:00.000Z";

fn label(case: &str, role: &str) -> [u8; 32] {
    label_bytes(&format!("agentmesh-golden/{case}/{role}"))
}

fn producer() -> String {
    // Both crypto providers write identical files, so the provider is not named.
    format!("meshwire {}", env!("CARGO_PKG_VERSION"))
}

fn document(kind: &str, dialect: Option<KdfDialect>, cases: Vec<serde_json::Value>) -> Document {
    Document {
        schema: SCHEMA.to_owned(),
        kind: kind.to_owned(),
        producer: Some(producer()),
        kdf: dialect.map(|d| d.as_str().to_owned()),
        cases,
    }
}

fn to_values<T: serde::Serialize>(cases: &[T]) -> Result<Vec<serde_json::Value>, String> {
    cases
        .iter()
        .map(|c| serde_json::to_value(c).map_err(|e| e.to_string()))
        .collect()
}

/// An X3DH case with the keys of its labels; `otk_id` None means 3-DH.
pub fn x3dh_case(name: &str, dialect: KdfDialect, otk_id: Option<u32>) -> Result<X3dhCase, String> {
    let alice = Identity::from_seed(&label(name, "alice/ed25519-seed"));
    let bob = Identity::from_seed(&label(name, "bob/ed25519-seed"));
    let spk_private = label(name, "bob/spk");
    let mut prekeys = PreKeys::with_signed_pre_key(&bob, 0, X25519Secret::from_bytes(spk_private));
    let otk_private = label(name, "bob/otk");
    if let Some(id) = otk_id {
        prekeys
            .add_one_time_key(id, X25519Secret::from_bytes(otk_private))
            .map_err(|e| e.to_string())?;
    }
    let bundle = prekeys.bundle(&bob, otk_id);
    let ek = label(name, "alice/ek");
    let mut rng = ScriptedRng::new([ek.to_vec()]);
    let (out, initiation) = x3dh::initiate(&mut rng, &alice, &bundle, dialect).map_err(|e| e.to_string())?;
    rng.finish()?;
    let dh = |i: usize| out.dh_outputs.get(i).map(|d| hex::encode(d.as_bytes()));
    Ok(X3dhCase {
        name: name.to_owned(),
        alice_ed25519_seed: hex::encode(label(name, "alice/ed25519-seed")),
        alice_ed25519_public: alice.ed25519_public().to_hex(),
        alice_x25519_private: hex::encode(alice.x25519_secret().as_bytes()),
        alice_x25519_public: alice.x25519_public().to_hex(),
        bob_ed25519_seed: hex::encode(label(name, "bob/ed25519-seed")),
        bob_ed25519_public: bob.ed25519_public().to_hex(),
        bob_x25519_private: hex::encode(bob.x25519_secret().as_bytes()),
        bob_x25519_public: bob.x25519_public().to_hex(),
        bob_spk_id: 0,
        bob_spk_private: hex::encode(spk_private),
        bob_spk_public: prekeys.signed_pre_key().pair.public().to_hex(),
        bob_spk_signature: hex::encode(prekeys.signed_pre_key().signature),
        bob_otk_id: otk_id,
        bob_otk_private: otk_id.map(|_| hex::encode(otk_private)),
        bob_otk_public: bundle.one_time_pre_key.map(|(_, k)| k.to_hex()),
        alice_ephemeral_private: hex::encode(ek),
        alice_ephemeral_public: initiation.ephemeral_key.to_hex(),
        dh1: dh(0).unwrap_or_default(),
        dh2: dh(1).unwrap_or_default(),
        dh3: dh(2).unwrap_or_default(),
        dh4: dh(3),
        shared_secret: hex::encode(out.shared_secret.as_bytes()),
        associated_data: hex::encode(out.associated_data),
        notes: Some(format!(
            "meshwire; kdf {dialect}; SPK id 0{}",
            otk_id
                .map(|id| format!(", OTK id {id} from label bob/otk"))
                .unwrap_or_else(|| ", no OTK".into())
        )),
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Party {
    Alice,
    Bob,
}

impl Party {
    fn name(self) -> &'static str {
        match self {
            Party::Alice => "alice",
            Party::Bob => "bob",
        }
    }
}

struct Sent {
    event: usize,
    from: Party,
    message: EncryptedMessage,
    plaintext: Vec<u8>,
}

/// A conversation being recorded as ratchet events.
struct Conversation {
    alice: DoubleRatchet,
    bob: DoubleRatchet,
    alice_rng: LabelRng,
    bob_rng: LabelRng,
    ad: Vec<u8>,
    events: Vec<Event>,
    sent: Vec<Sent>,
    case: RatchetCase,
}

impl Conversation {
    fn new(name: &str, x3dh_case: &X3dhCase) -> Result<Self, String> {
        let unhex32 = |t: &str| -> Result<[u8; 32], String> {
            hex::decode(t)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| "bad hex".to_owned())
        };
        let shared = SharedSecret::from_bytes(unhex32(&x3dh_case.shared_secret)?);
        let spk = KeyPair::from_secret(X25519Secret::from_bytes(unhex32(&x3dh_case.bob_spk_private)?));
        let alice_id = Identity::from_seed(&unhex32(&x3dh_case.alice_ed25519_seed)?);
        let bob_id = Identity::from_seed(&unhex32(&x3dh_case.bob_ed25519_seed)?);
        let x3dh_ad: [u8; 64] = hex::decode(&x3dh_case.associated_data)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or("bad x3dh AD")?;
        let ad = mesh_associated_data(alice_id.did(), bob_id.did(), &x3dh_ad);

        let mut alice_rng = LabelRng::new(format!("agentmesh-golden/{name}/alice"));
        let bob_rng = LabelRng::new(format!("agentmesh-golden/{name}/bob"));
        let alice = DoubleRatchet::init_sender(&mut alice_rng, &shared, spk.public()).map_err(|e| e.to_string())?;
        let ratchet_0 = alice_rng
            .take_ratchet_draws()
            .into_iter()
            .next()
            .ok_or("no ratchet-0 draw")?;
        let bob = DoubleRatchet::init_receiver(&shared, spk.clone());
        let case = RatchetCase {
            name: name.to_owned(),
            from_x3dh: Some(x3dh_case.name.clone()),
            shared_secret: x3dh_case.shared_secret.clone(),
            bob_spk_private: x3dh_case.bob_spk_private.clone(),
            bob_spk_public: spk.public().to_hex(),
            alice_did: Some(alice_id.did().to_string()),
            bob_did: Some(bob_id.did().to_string()),
            alice_ratchet_0_private: hex::encode(ratchet_0),
            alice_ratchet_0_public: Some(alice.dh_self_public().to_hex()),
            associated_data: hex::encode(&ad),
            initial_state: Some(PartyStates {
                alice: snapshot(&alice),
                bob: snapshot(&bob),
            }),
            notes: None,
            events: Vec::new(),
        };
        Ok(Self {
            alice,
            bob,
            alice_rng,
            bob_rng,
            ad,
            events: Vec::new(),
            sent: Vec::new(),
            case,
        })
    }

    fn party(&mut self, p: Party) -> (&mut DoubleRatchet, &mut LabelRng) {
        match p {
            Party::Alice => (&mut self.alice, &mut self.alice_rng),
            Party::Bob => (&mut self.bob, &mut self.bob_rng),
        }
    }

    fn can_send(&self, p: Party) -> bool {
        match p {
            Party::Alice => self.alice.sending_chain_key().is_some(),
            Party::Bob => self.bob.sending_chain_key().is_some(),
        }
    }

    fn send_count(&self, p: Party) -> u32 {
        match p {
            Party::Alice => self.alice.send_count(),
            Party::Bob => self.bob.send_count(),
        }
    }

    /// Records an encrypt by `from`; returns the message's send index.
    fn send(&mut self, from: Party, plaintext: Vec<u8>) -> Result<usize, String> {
        let i = self.events.len();
        let ad = self.ad.clone();
        let (ratchet, rng) = self.party(from);
        let message_key = ratchet
            .sending_chain_key()
            .map(message_key_of)
            .ok_or("no sending chain")?;
        let message = ratchet.encrypt(rng, &plaintext, &ad).map_err(|e| e.to_string())?;
        let nonce = rng.take_nonce().ok_or("no nonce drawn")?;
        let generated = rng.take_ratchet_draws();
        let state_after = snapshot(ratchet);
        self.events.push(Event {
            i,
            op: "encrypt".into(),
            party: from.name().into(),
            plaintext: Some(hex::encode(&plaintext)),
            nonce: Some(hex::encode(nonce)),
            message_key: Some(hex::encode(message_key.as_bytes())),
            header: Some(HeaderJson {
                dh: message.header.dh.to_hex(),
                pn: message.header.pn,
                n: message.header.n,
            }),
            header_bytes: Some(hex::encode(message.header.to_bytes())),
            ciphertext: Some(hex::encode(&message.ciphertext)),
            message: None,
            expect_error: None,
            generated_ratchet_private: generated.iter().map(hex::encode).collect(),
            state_after: Some(state_after),
        });
        self.sent.push(Sent {
            event: i,
            from,
            message,
            plaintext,
        });
        Ok(self.sent.len() - 1)
    }

    /// Records the delivery of send `k` to the other party.
    fn deliver(&mut self, k: usize, expect_error: Option<&str>) -> Result<(), String> {
        let sent = self.sent.get(k).ok_or("no such message")?;
        let (to, event, message, plaintext) = (
            if sent.from == Party::Alice {
                Party::Bob
            } else {
                Party::Alice
            },
            sent.event,
            sent.message.clone(),
            sent.plaintext.clone(),
        );
        let i = self.events.len();
        let ad = self.ad.clone();
        let (ratchet, rng) = self.party(to);
        let result = ratchet.decrypt(rng, &message, &ad);
        match (&result, expect_error) {
            (Ok(got), None) if *got == plaintext => {}
            (Err(e), Some(kind)) if error_kind(e) == kind => {}
            _ => return Err(format!("delivery of message {k} to {}: {result:?}", to.name())),
        }
        let generated = rng.take_ratchet_draws();
        let state_after = snapshot(ratchet);
        self.events.push(Event {
            i,
            op: "decrypt".into(),
            party: to.name().into(),
            plaintext: expect_error.is_none().then(|| hex::encode(&plaintext)),
            nonce: None,
            message_key: None,
            header: None,
            header_bytes: None,
            ciphertext: None,
            message: Some(event),
            expect_error: expect_error.map(str::to_owned),
            generated_ratchet_private: generated.iter().map(hex::encode).collect(),
            state_after: Some(state_after),
        });
        Ok(())
    }

    fn finish(mut self, notes: &str) -> Result<RatchetCase, String> {
        for rng in [&self.alice_rng, &self.bob_rng] {
            if let Some(e) = rng.error() {
                return Err(e.to_owned());
            }
        }
        self.case.notes = Some(notes.to_owned());
        self.case.events = self.events;
        Ok(self.case)
    }
}

fn text(k: usize) -> Vec<u8> {
    format!("message {k}").into_bytes()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|j| (j % 251) as u8).collect()
}

/// SCHEMA.md's conversation.
fn schema_conversation(name: &str, x3dh: &X3dhCase) -> Result<RatchetCase, String> {
    use Party::*;
    let mut c = Conversation::new(name, x3dh)?;
    for k in 0..3 {
        c.send(Alice, text(k))?;
    }
    c.deliver(0, None)?;
    c.deliver(2, None)?;
    c.send(Bob, Vec::new())?;
    c.send(Bob, text(4))?;
    c.deliver(3, None)?;
    c.send(Alice, pattern(1000))?;
    c.deliver(1, None)?;
    c.deliver(5, None)?;
    c.deliver(4, None)?;
    c.send(Bob, text(6))?;
    c.deliver(6, None)?;
    c.finish("SCHEMA.md conversation: m_k = utf8('message k'), m3 empty, m5 = 1000 bytes (byte j = j mod 251)")
}

fn skip_exactly_100(x3dh: &X3dhCase) -> Result<RatchetCase, String> {
    let mut c = Conversation::new("skip-100", x3dh)?;
    for k in 0..=100 {
        c.send(Party::Alice, text(k))?;
    }
    c.deliver(100, None)?;
    for k in 0..100 {
        c.deliver(k, None)?;
    }
    let reply = c.send(Party::Bob, text(101))?;
    c.deliver(reply, None)?;
    c.finish("Alice sends m0..m100; Bob decrypts m100 first (skips exactly 100 keys, the limit), then m0..m99 from the skipped-key cache; Bob replies")
}

fn skip_101_rejected(x3dh: &X3dhCase) -> Result<RatchetCase, String> {
    let mut c = Conversation::new("skip-101-rejected", x3dh)?;
    for k in 0..=102 {
        c.send(Party::Alice, text(k))?;
    }
    c.deliver(0, None)?;
    c.deliver(102, Some("too-many-skipped"))?;
    c.deliver(101, None)?;
    c.deliver(102, None)?;
    for k in 1..=100 {
        c.deliver(k, None)?;
    }
    c.finish("Alice sends m0..m102; Bob decrypts m0, then m102 would skip 101 keys and is rejected with the state unchanged (expect_error); m101 (a skip of 100) and m102 then decrypt, then m1..m100 from the cache")
}

fn large_message(x3dh: &X3dhCase) -> Result<RatchetCase, String> {
    let mut c = Conversation::new("large-message", x3dh)?;
    c.send(Party::Alice, pattern(1 << 20))?;
    c.deliver(0, None)?;
    c.send(Party::Bob, text(1))?;
    c.deliver(1, None)?;
    c.finish("a 1 MiB message (byte j = j mod 251), then a reply")
}

/// Deterministic stream for shuffling: sha256(label || counter).
struct Stream {
    label: String,
    counter: u64,
}

impl Stream {
    fn below(&mut self, n: usize) -> usize {
        let digest = Sha256::digest(format!("{}/{}", self.label, self.counter).as_bytes());
        self.counter += 1;
        let mut word = [0u8; 8];
        word.copy_from_slice(digest.get(..8).unwrap_or(&[0u8; 8]));
        (u64::from_be_bytes(word) % n.max(1) as u64) as usize
    }
}

fn random_order(x3dh: &X3dhCase, total: usize) -> Result<RatchetCase, String> {
    let name = "random-order-200";
    let mut c = Conversation::new(name, x3dh)?;
    let mut stream = Stream {
        label: format!("agentmesh-golden/{name}/schedule"),
        counter: 0,
    };
    let mut pending: Vec<usize> = Vec::new();
    let mut sent = 0;
    while sent < total || !pending.is_empty() {
        // Actions: 0 = Alice sends, 1 = Bob sends, 2 = deliver a pending message.
        let mut actions = Vec::new();
        for (action, party) in [(0, Party::Alice), (1, Party::Bob)] {
            if sent < total && c.can_send(party) && c.send_count(party) < 40 {
                actions.push(action);
            }
        }
        if !pending.is_empty() {
            actions.push(2);
            actions.push(2);
        }
        match actions.get(stream.below(actions.len())).copied() {
            Some(0) => {
                pending.push(c.send(Party::Alice, text(sent))?);
                sent += 1;
            }
            Some(1) => {
                pending.push(c.send(Party::Bob, text(sent))?);
                sent += 1;
            }
            Some(_) => {
                let k = pending.swap_remove(stream.below(pending.len()));
                c.deliver(k, None)?;
            }
            None => return Err("schedule stalled".into()),
        }
    }
    c.finish("200 messages in both directions, sends and deliveries interleaved in a pseudo-random order (sha256 of agentmesh-golden/random-order-200/schedule/<counter>), at most 40 per sending chain; every message is delivered exactly once")
}

/// Identity case `name`, as the shared identity files record it.
pub fn identity_case(name: &str) -> IdentityCase {
    let seed = label(name, "ed25519-seed");
    let identity = Identity::from_seed(&seed);
    let connect = ConnectFrame::new(&identity, IDENTITY_TIMESTAMP);
    IdentityCase {
        name: name.to_owned(),
        ed25519_seed: hex::encode(seed),
        ed25519_public: identity.ed25519_public().to_hex(),
        x25519_private: hex::encode(identity.x25519_secret().as_bytes()),
        x25519_public: identity.x25519_public().to_hex(),
        did: identity.did().to_string(),
        timestamp: IDENTITY_TIMESTAMP.to_owned(),
        timestamp_signature: hex::encode(identity.sign(IDENTITY_TIMESTAMP.as_bytes())),
        authorization: auth::ed25519_timestamp_header(&identity, IDENTITY_TIMESTAMP),
        relay_connect: RelayConnect {
            kind: connect.kind.to_owned(),
            from: connect.from.clone(),
            public_key: connect.public_key.clone().unwrap_or_default(),
            timestamp: connect.timestamp.clone().unwrap_or_default(),
            signature: connect.signature.clone().unwrap_or_default(),
        },
        connect_frame_json: Some(frames::to_text(&connect)),
        fetch_pending_frame_json: Some(frames::to_text(&FetchPendingFrame::new(&identity))),
        notes: Some("meshwire; seed from label ed25519-seed; clock fixed at the timestamp".into()),
    }
}

/// Every file `generate` writes, as (file name, document).
pub fn documents() -> Result<Vec<(String, Document)>, String> {
    let mut docs = Vec::new();
    for dialect in [KdfDialect::Spec, KdfDialect::LegacyFfSalt] {
        let with_otk = x3dh_case("x3dh-otk", dialect, Some(7))?;
        let without_otk = x3dh_case("x3dh-no-otk", dialect, None)?;
        let mut ratchets = vec![
            schema_conversation("conversation", &with_otk)?,
            schema_conversation("conversation-no-otk", &without_otk)?,
        ];
        ratchets.push(skip_exactly_100(&with_otk)?);
        ratchets.push(skip_101_rejected(&with_otk)?);
        ratchets.push(random_order(&with_otk, 200)?);
        if dialect == KdfDialect::Spec {
            // Kept apart: the 1 MiB message makes this file 6 MB of hex.
            let large = vec![large_message(&without_otk)?];
            docs.push((
                format!("ratchet-large-{dialect}.json"),
                document("ratchet", Some(dialect), to_values(&large)?),
            ));
        }
        docs.push((
            format!("x3dh-{dialect}.json"),
            document("x3dh", Some(dialect), to_values(&[with_otk, without_otk])?),
        ));
        docs.push((
            format!("ratchet-{dialect}.json"),
            document("ratchet", Some(dialect), to_values(&ratchets)?),
        ));
        docs.push((
            format!("mesh-session-{dialect}.json"),
            document("mesh-session", Some(dialect), crate::mesh_generate::cases(dialect)?),
        ));
    }
    let identities: Vec<IdentityCase> = (0..3).map(|i| identity_case(&format!("identity-{i}"))).collect();
    docs.push((
        "identity.json".into(),
        document("identity", None, to_values(&identities)?),
    ));
    Ok(docs)
}

/// Writes [`documents`] into `dir`.
pub fn write_all(dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut written = Vec::new();
    for (name, doc) in documents()? {
        let path = dir.join(name);
        let mut text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        text.push('\n');
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}
