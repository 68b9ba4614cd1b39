//! The checks behind the fuzz targets `header`, `decrypt`, `state_import`
//! and `bundle`, shared by the targets (through `fuzz/src/lib.rs`) and by the
//! stable replay test `crates/meshwire-proto/tests/fuzz_corpus_replay.rs`,
//! which includes this file with `#[path]`. It may therefore use only std,
//! `meshwire_proto` and `rand_core`. (`vector_file` needs `meshwire_vectors`:
//! its check is in `vector_checks.rs`.)
//!
//! Each `check_*` takes the raw fuzz input, returns normally when the library
//! behaved, and panics (an `assert!`) on a defect: a panic inside the
//! library, a round trip that does not hold, a failed decrypt that changed
//! the ratchet, or a forged message that broke the session.

use meshwire_proto::ratchet::HEADER_LEN;
use meshwire_proto::{
    Did, DoubleRatchet, EncryptedMessage, Header, Identity, KdfDialect, KeyPair, PreKeyBundle, SecureChannel,
    SharedSecret, X25519PublicKey, X25519Secret, MAX_SKIP,
};
use rand_core::{CryptoRng, RngCore};
use std::sync::OnceLock;

/// Deterministic "randomness" (SplitMix64 from a fixed seed), so that every
/// run builds the same session and replays the same way. Not random at all:
/// for fuzzing only.
#[derive(Debug, Clone)]
pub struct FixedRng(u64);

impl FixedRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
}

impl RngCore for FixedRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            for (d, s) in chunk.iter_mut().zip(self.next_u64().to_le_bytes()) {
                *d = s;
            }
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for FixedRng {}

/// Associated data of every message of the fuzz session.
pub const AD: &[u8] = b"did:mesh:alice|did:mesh:bob (meshwire fuzz)";

// ---------------------------------------------------------------- header

/// `Header::from_bytes`: Ok exactly for 40 bytes, and then re-encodes to the input.
pub fn check_header(data: &[u8]) {
    match Header::from_bytes(data) {
        Ok(header) => assert_eq!(
            header.to_bytes().as_slice(),
            data,
            "header does not re-encode to its input"
        ),
        Err(e) => {
            assert_ne!(data.len(), HEADER_LEN, "a {HEADER_LEN}-byte header was refused");
            assert_eq!(e.0, data.len(), "HeaderError reports the wrong length");
        }
    }
}

// ---------------------------------------------------------------- decrypt

/// One message sent while building the session.
#[derive(Debug, Clone)]
pub struct Sent {
    pub to_bob: bool,
    pub delivered: bool,
    pub message: EncryptedMessage,
    pub plaintext: Vec<u8>,
}

/// A live session between Alice (initiator) and Bob, the same on every run.
///
/// Alice sends a0..a4 (her ratchet key A1); Bob reads a2 and a3 (a0, a1
/// skipped) and sends b0..b2 (B1); Alice reads b1 (b0 skipped) and sends
/// a5..a7 (A2, pn 5); Bob reads a6 (a4 and a5 skipped) and sends b3 (B2).
/// So Bob holds skipped keys for two chains and has a0, a1, a4, a5 (cached
/// keys) and a7 (current chain) pending; Alice has b0 (cached key), b2
/// (current chain) and b3 (a new ratchet key: a DH step) pending.
#[derive(Debug)]
pub struct Session {
    pub alice: DoubleRatchet,
    pub bob: DoubleRatchet,
    /// Every message in the order sent; `decrypt` inputs index into it.
    pub sent: Vec<Sent>,
    /// Every ratchet public key of the session, then a key from outside it
    /// and two low-order points; `decrypt` inputs index into it.
    pub keys: Vec<X25519PublicKey>,
}

/// The session, built once.
pub fn session() -> &'static Session {
    static SESSION: OnceLock<Session> = OnceLock::new();
    SESSION.get_or_init(build_session)
}

fn build_session() -> Session {
    let mut rng = FixedRng::new(0x6d65_7368_7769_7265);
    let shared = SharedSecret::from_bytes([0x5a; 32]);
    let spk = KeyPair::from_secret(X25519Secret::from_bytes([0x42; 32]));
    let mut alice = DoubleRatchet::init_sender(&mut rng, &shared, spk.public()).expect("init_sender");
    let mut bob = DoubleRatchet::init_receiver(&shared, spk.clone());
    let mut sent: Vec<Sent> = Vec::new();

    let send = |party: &mut DoubleRatchet, to_bob: bool, rng: &mut FixedRng, sent: &mut Vec<Sent>| {
        let plaintext = format!(
            "{} #{}",
            if to_bob { "alice to bob" } else { "bob to alice" },
            sent.len()
        )
        .into_bytes();
        let message = party.encrypt(rng, &plaintext, AD).expect("encrypt");
        sent.push(Sent {
            to_bob,
            delivered: false,
            message,
            plaintext,
        });
    };
    let deliver = |party: &mut DoubleRatchet, index: usize, rng: &mut FixedRng, sent: &mut [Sent]| {
        let s = sent.get_mut(index).expect("sent index");
        assert_eq!(
            party.decrypt(rng, &s.message, AD).expect("genuine message"),
            s.plaintext
        );
        s.delivered = true;
    };

    for _ in 0..5 {
        send(&mut alice, true, &mut rng, &mut sent); // a0..a4: indexes 0..=4
    }
    deliver(&mut bob, 2, &mut rng, &mut sent);
    deliver(&mut bob, 3, &mut rng, &mut sent);
    for _ in 0..3 {
        send(&mut bob, false, &mut rng, &mut sent); // b0..b2: indexes 5..=7
    }
    deliver(&mut alice, 6, &mut rng, &mut sent);
    for _ in 0..3 {
        send(&mut alice, true, &mut rng, &mut sent); // a5..a7: indexes 8..=10
    }
    deliver(&mut bob, 9, &mut rng, &mut sent);
    send(&mut bob, false, &mut rng, &mut sent); // b3: index 11

    assert_eq!(bob.skipped_key_ids().count(), 4, "a0, a1, a4, a5");
    assert_eq!(alice.skipped_key_ids().count(), 1, "b0");

    let mut keys = vec![*spk.public()];
    for s in &sent {
        if !keys.contains(&s.message.header.dh) {
            keys.push(s.message.header.dh);
        }
    }
    let mut one = [0u8; 32];
    one[0] = 1;
    keys.push(*KeyPair::from_secret(X25519Secret::from_bytes([0x77; 32])).public());
    keys.push(X25519PublicKey::from_bytes([0; 32]));
    keys.push(X25519PublicKey::from_bytes(one));
    Session { alice, bob, sent, keys }
}

/// Builds the message a `decrypt` input stands for. Byte 0 picks the form:
///
/// * even: raw. Bytes 1..41 are the header, the rest the ciphertext.
/// * odd: a mutated genuine message (missing bytes read as 0 = unchanged):
///   byte 1 picks the message (index into [`Session::sent`], mod its
///   length); byte 2, if non-zero, replaces the header's ratchet key with
///   [`Session::keys`]`[(b - 1) mod len]`; bytes 3..7 and 7..11 are added
///   (u32 big-endian, wrapping) to `pn` and `n`; byte 11, if non-zero,
///   truncates the ciphertext to `b - 1` bytes; bytes 12.. are XORed onto
///   the ciphertext from its start, extending it where longer.
pub fn decrypt_input(session: &Session, data: &[u8]) -> Option<EncryptedMessage> {
    let (&form, rest) = data.split_first()?;
    if form & 1 == 0 {
        let header = Header::from_bytes(rest.get(..HEADER_LEN)?).ok()?;
        let ciphertext = rest.get(HEADER_LEN..).unwrap_or_default().to_vec();
        return Some(EncryptedMessage { header, ciphertext });
    }
    let byte = |i: usize| rest.get(i).copied().unwrap_or(0);
    let word = |i: usize| u32::from_be_bytes([byte(i), byte(i + 1), byte(i + 2), byte(i + 3)]);
    let base = session.sent.get(usize::from(byte(0)) % session.sent.len())?;
    let mut message = base.message.clone();
    if let Some(k) = usize::from(byte(1)).checked_sub(1) {
        message.header.dh = *session.keys.get(k % session.keys.len())?;
    }
    message.header.pn = message.header.pn.wrapping_add(word(2));
    message.header.n = message.header.n.wrapping_add(word(6));
    if let Some(len) = usize::from(byte(10)).checked_sub(1) {
        message.ciphertext.truncate(len);
    }
    for (i, b) in rest.get(11..).unwrap_or_default().iter().enumerate() {
        match message.ciphertext.get_mut(i) {
            Some(c) => *c ^= b,
            None => message.ciphertext.push(*b),
        }
    }
    Some(message)
}

/// Decrypts `message` on `ratchet`; on an error asserts the ratchet is
/// unchanged (by `==` and by its exported JSON, which also sees the order
/// of the skipped keys). Returns the plaintext on success.
pub fn decrypt_transactional(ratchet: &mut DoubleRatchet, message: &EncryptedMessage, ad: &[u8]) -> Option<Vec<u8>> {
    let before = ratchet.clone();
    match ratchet.decrypt(&mut FixedRng::new(0xdec), message, ad) {
        Ok(plaintext) => Some(plaintext),
        Err(e) => {
            assert!(
                *ratchet == before,
                "ratchet changed after a failed decrypt ({e:?}): {message:?}"
            );
            assert_eq!(
                *ratchet.export_state(),
                *before.export_state(),
                "exported state changed after a failed decrypt ({e:?})"
            );
            None
        }
    }
}

/// The `decrypt` target: the input's message goes to Bob's and to Alice's
/// ratchet. A failure must leave the ratchet as it was; a success must be a
/// genuine message still pending for that party, with its plaintext. Then
/// pending genuine messages must still decrypt: after a success every other
/// pending one; after a failure (the ratchet was just asserted unchanged)
/// those on the current receiving chain, which need no DH step and so keep
/// the target fast.
pub fn check_decrypt(data: &[u8]) {
    let session = session();
    let Some(message) = decrypt_input(session, data) else {
        return;
    };
    for to_bob in [true, false] {
        let mut ratchet = if to_bob {
            session.bob.clone()
        } else {
            session.alice.clone()
        };
        let mut pending: Vec<&Sent> = session
            .sent
            .iter()
            .filter(|s| s.to_bob == to_bob && !s.delivered)
            .collect();
        let delivered = decrypt_transactional(&mut ratchet, &message, AD);
        if let Some(plaintext) = delivered.as_ref() {
            let index = pending
                .iter()
                .position(|s| s.message == message)
                .unwrap_or_else(|| panic!("a message that was never sent decrypted (to_bob {to_bob}): {message:?}"));
            let genuine = pending.remove(index);
            assert_eq!(
                *plaintext, genuine.plaintext,
                "a genuine message decrypted to the wrong plaintext"
            );
        } else {
            let current = ratchet.dh_remote_public().copied();
            pending.retain(|s| Some(s.message.header.dh) == current);
            assert!(
                !pending.is_empty(),
                "the session has a pending message on each current chain"
            );
        }
        for genuine in pending {
            let plaintext = ratchet
                .decrypt(&mut FixedRng::new(0x9e4), &genuine.message, AD)
                .unwrap_or_else(|e| panic!("pending genuine message no longer decrypts ({e:?}) after {message:?}"));
            assert_eq!(plaintext, genuine.plaintext);
        }
    }
}

// ---------------------------------------------------------------- state_import

/// Probes an imported ratchet: messages down each decrypt path (current
/// chain, far ahead, a cached skipped key, a new ratchet key), all with a
/// tag that cannot verify, must fail without changing it; an encryption
/// that fails must not change it either.
fn exercise_ratchet(mut ratchet: DoubleRatchet, ad: &[u8]) {
    let n_recv = ratchet.recv_count();
    let mut headers = Vec::new();
    if let Some(remote) = ratchet.dh_remote_public() {
        headers.push(Header {
            dh: *remote,
            pn: 0,
            n: n_recv,
        });
        headers.push(Header {
            dh: *remote,
            pn: 0,
            n: n_recv.wrapping_add(MAX_SKIP + 1),
        });
    }
    if let Some((dh, n)) = ratchet.skipped_key_ids().next() {
        headers.push(Header { dh: *dh, pn: 0, n });
    }
    let mut nine = [0u8; 32];
    nine[0] = 9;
    headers.push(Header {
        dh: X25519PublicKey::from_bytes(nine),
        pn: n_recv.wrapping_add(2),
        n: 1,
    });
    for header in headers {
        let forged = EncryptedMessage {
            header,
            ciphertext: vec![0; 40],
        };
        assert!(
            decrypt_transactional(&mut ratchet, &forged, ad).is_none(),
            "an all-zero tag verified"
        );
    }
    let before = ratchet.clone();
    if let Err(e) = ratchet.encrypt(&mut FixedRng::new(0xe4c), b"probe", ad) {
        assert!(ratchet == before, "ratchet changed after a failed encrypt ({e:?})");
    }
}

/// The `state_import` target: any text into both `import_state`s. On
/// success, export and import again must give an equal value and the same
/// text; then the imported ratchet is exercised.
pub fn check_state_import(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ratchet) = DoubleRatchet::import_state(text) {
        let exported = ratchet.export_state();
        let again = DoubleRatchet::import_state(&exported).expect("a ratchet's own export imports");
        assert!(again == ratchet, "ratchet export/import round trip changed the state");
        assert_eq!(*again.export_state(), *exported, "ratchet export is not stable");
        exercise_ratchet(ratchet, AD);
    }
    if let Ok(channel) = SecureChannel::import_state(text) {
        let exported = channel.export_state();
        let again = SecureChannel::import_state(&exported).expect("a channel's own export imports");
        assert!(again == channel, "channel export/import round trip changed the state");
        assert_eq!(*again.export_state(), *exported, "channel export is not stable");
        exercise_ratchet(channel.ratchet().clone(), channel.associated_data());
    }
}

// ---------------------------------------------------------------- bundle

/// The initiator the `bundle` target runs X3DH as.
pub fn initiator() -> &'static Identity {
    static ALICE: OnceLock<Identity> = OnceLock::new();
    ALICE.get_or_init(|| Identity::from_seed(&[0xa1; 32]))
}

/// The `bundle` target: `from_json`, and on success the JSON round trip,
/// `verify`, and for a verified bundle X3DH with it (its identity and
/// one-time keys are not signed, so they may be anything: errors must be
/// typed).
pub fn check_bundle(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(bundle) = PreKeyBundle::from_json(text) else {
        return;
    };
    assert_eq!(
        PreKeyBundle::from_json(&bundle.to_json()),
        Ok(bundle.clone()),
        "bundle JSON round trip"
    );
    if bundle.verify().is_ok() {
        let responder = Did::from_public_key(&bundle.identity_key_ed);
        for dialect in [KdfDialect::Spec, KdfDialect::LegacyFfSalt] {
            let mut rng = FixedRng::new(0xb0b);
            if let Ok((_, establishment)) = SecureChannel::initiate(&mut rng, initiator(), &responder, &bundle, dialect)
            {
                assert_eq!(establishment.one_time_key_id, bundle.one_time_pre_key.map(|(id, _)| id));
            }
        }
    }
}
