#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/`) of the
//! `header`, `decrypt`, `state_import` and `bundle` targets through the very
//! checks the fuzz targets run (`fuzz/checks.rs`), on the stable toolchain.
//! A missing or empty corpus directory fails. (`vector_file` is replayed by
//! `crates/meshwire-vectors/tests/fuzz_corpus_replay.rs`.)
//!
//! `write_seed_corpora` (ignored) regenerates the hand-made seeds; see
//! `fuzz/README.md`.

#[path = "../../../fuzz/checks.rs"]
mod checks;
#[path = "../../../fuzz/corpus_walk.rs"]
mod corpus_walk;
#[path = "../../../fuzz/knock_checks.rs"]
mod knock_checks;

use corpus_walk::{corpus_dir, replay};
use meshwire_proto::encoding::b64_std;
use meshwire_proto::{
    DoubleRatchet, Header, Identity, KdfDialect, KeyPair, PreKeys, SecureChannel, SharedSecret, X25519Secret,
};

#[test]
fn header_corpus() {
    assert!(replay("header", checks::check_header) > 0);
}

#[test]
fn decrypt_corpus() {
    assert!(replay("decrypt", checks::check_decrypt) > 0);
}

#[test]
fn state_import_corpus() {
    assert!(replay("state_import", checks::check_state_import) > 0);
}

#[test]
fn bundle_corpus() {
    assert!(replay("bundle", checks::check_bundle) > 0);
}

#[test]
fn knock_corpus() {
    assert!(replay("knock", knock_checks::check_knock) > 0);
}

/// Hand-made seeds of the `knock` target (fuzz/knock_checks.rs): each
/// mutation flag alone and the genuine KNOCK, plus junk frames.
#[test]
#[ignore = "writes fuzz/corpus/knock; run by hand to regenerate the seeds"]
fn write_knock_seeds() {
    let bob = Identity::from_seed(&[0xb0; 32]).did().to_string();
    let ik = b64_std(Identity::from_seed(&[0x6d; 32]).x25519_public().as_bytes());
    let seeds: [(&str, Vec<u8>); 8] = [
        ("genuine", vec![1, 0]),
        ("claims-mallory", vec![1, 1]),
        ("mallory-key", vec![1, 2]),
        ("no-otk", vec![1, 4]),
        ("other-otk", vec![1, 8]),
        ("zero-ek", [vec![1, 0], vec![0; 32]].concat()),
        ("raw-knock-junk", [b"\0".to_vec(), format!(r#"{{"v":1,"type":"knock","from":"did:mesh:x","to":"{bob}","id":"1","ts":"t","intent":{{}},"establishment":{{"ik":"{ik}","ek":"{ik}","otk":0}}}}"#).into_bytes()].concat()),
        ("raw-pending", [b"\0".to_vec(), format!(r#"{{"type":"pending_messages","messages":[{{"type":"knock","to":"{bob}"}},{{"type":"message","from":"did:mesh:x","to":"{bob}"}}]}}"#).into_bytes()].concat()),
    ];
    for (name, data) in seeds {
        knock_checks::check_knock(&data);
        write("knock", name, &data);
    }
}

/// The decrypt session is what `fuzz/checks.rs` says, and every pending
/// genuine message decrypts as itself (the `[1, index]` input form).
#[test]
fn decrypt_session_holds_pending_genuine_messages() {
    let session = checks::session();
    assert_eq!(session.sent.len(), 12);
    let pending: Vec<usize> = (0..session.sent.len())
        .filter(|&i| !session.sent[i].delivered)
        .collect();
    assert_eq!(pending, vec![0, 1, 4, 5, 7, 8, 10, 11]);
    for index in 0..session.sent.len() {
        checks::check_decrypt(&[1, index as u8]);
    }
}

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

/// Writes the hand-made seeds of the four targets (`vector_file`'s seeds
/// are cut from `vectors/`, see fuzz/README.md). Run by hand:
/// `cargo test -p meshwire-proto --test fuzz_corpus_replay -- --ignored write_seed_corpora`.
#[test]
#[ignore = "writes seed files into fuzz/corpus; run by hand"]
fn write_seed_corpora() {
    let session = checks::session();
    let sent = &session.sent;

    // header: genuine headers, extreme counters, wrong lengths.
    for (name, index) in [("genuine-a0", 0), ("genuine-a5-pn5", 8), ("genuine-b3-pn3", 11)] {
        write("header", &format!("{name}.bin"), &sent[index].message.header.to_bytes());
    }
    let max = Header {
        dh: meshwire_proto::X25519PublicKey::from_bytes([0xff; 32]),
        pn: u32::MAX,
        n: u32::MAX,
    };
    write("header", "max-counters.bin", &max.to_bytes());
    write("header", "short-39.bin", &sent[0].message.header.to_bytes()[..39]);
    write(
        "header",
        "long-41.bin",
        &[sent[0].message.header.to_bytes().as_slice(), &[0]].concat(),
    );

    // decrypt: every sent message as is (input form [1, index]), raw copies,
    // and forgeries down each decrypt path.
    for (index, s) in sent.iter().enumerate() {
        let name = format!(
            "genuine-{index:02}-{}-{}",
            if s.to_bob { "to-bob" } else { "to-alice" },
            if s.delivered { "replay" } else { "pending" }
        );
        write("decrypt", &format!("{name}.bin"), &[1, index as u8]);
    }
    for (name, index) in [
        ("raw-a0-skipped", 0),
        ("raw-a7-current-chain", 10),
        ("raw-b3-new-ratchet-key", 11),
    ] {
        let m = &sent[index].message;
        write(
            "decrypt",
            &format!("{name}.bin"),
            &[&[0u8][..], &m.header.to_bytes(), &m.ciphertext].concat(),
        );
    }
    let key =
        |wanted: &meshwire_proto::X25519PublicKey| session.keys.iter().position(|k| k == wanted).unwrap() as u8 + 1;
    let keys = session.keys.len() as u8;
    let mut flip = vec![1, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    flip.extend([0; 12]);
    flip.push(0x80);
    write("decrypt", "forged-a7-body-bit.bin", &flip);
    write(
        "decrypt",
        "forged-a7-skip-101.bin",
        &[1, 10, 0, 0, 0, 0, 0, 0, 0, 0, 101],
    );
    write(
        "decrypt",
        "forged-a7-n-max.bin",
        &[1, 10, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xfd],
    );
    write(
        "decrypt",
        "forged-a7-truncated-27.bin",
        &[1, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 28],
    );
    write("decrypt", "forged-a7-zero-key.bin", &[1, 10, keys - 1]);
    write("decrypt", "forged-a7-one-key.bin", &[1, 10, keys]);
    write("decrypt", "forged-a7-outsider-key.bin", &[1, 10, keys - 2]);
    write(
        "decrypt",
        "forged-a5-old-ratchet-key.bin",
        &[1, 8, key(&sent[0].message.header.dh)],
    );
    write("decrypt", "forged-b3-pn-far.bin", &[1, 11, 0, 0, 0, 0, 200]);
    write(
        "decrypt",
        "forged-a0-skipped-n-plus-1.bin",
        &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    );

    // state_import: both ratchets of the session, a fresh responder, channels
    // of both dialects, a Python-style non-canonical spelling.
    write(
        "state_import",
        "ratchet-alice.json",
        session.alice.export_state().as_bytes(),
    );
    write(
        "state_import",
        "ratchet-bob-skipped.json",
        session.bob.export_state().as_bytes(),
    );
    let fresh = DoubleRatchet::init_receiver(
        &SharedSecret::from_bytes([1; 32]),
        KeyPair::from_secret(X25519Secret::from_bytes([2; 32])),
    );
    write(
        "state_import",
        "ratchet-fresh-receiver.json",
        fresh.export_state().as_bytes(),
    );
    let mut value: serde_json::Value = serde_json::from_str(&session.bob.export_state()).unwrap();
    let upper = |v: &serde_json::Value| serde_json::Value::String(v.as_str().unwrap().to_uppercase());
    value["root_key"] = upper(&value["root_key"]);
    let skipped: serde_json::Map<String, serde_json::Value> = value["skipped_keys"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, key)| (id.replace(':', ":00"), upper(key)))
        .collect();
    value["skipped_keys"] = skipped.into();
    write(
        "state_import",
        "ratchet-bob-noncanonical.json",
        value.to_string().as_bytes(),
    );

    let mut rng = checks::FixedRng::new(0x5eed);
    let alice = Identity::from_seed(&[0xa1; 32]);
    let bob = Identity::from_seed(&[0xb0; 32]);
    let mut bob_keys = PreKeys::with_signed_pre_key(&bob, 3, X25519Secret::from_bytes([0x33; 32]));
    bob_keys
        .add_one_time_key(7, X25519Secret::from_bytes([0x77; 32]))
        .unwrap();
    for (dialect, otk) in [(KdfDialect::Spec, Some(7)), (KdfDialect::LegacyFfSalt, None)] {
        let bundle = bob_keys.bundle(&bob, otk);
        let (mut to_bob, est) = SecureChannel::initiate(&mut rng, &alice, bob.did(), &bundle, dialect).unwrap();
        let first = to_bob.encrypt(&mut rng, b"hello").unwrap();
        let (mut to_alice, _) = SecureChannel::accept(
            &mut rng,
            &bob,
            &mut bob_keys.clone(),
            alice.did(),
            &est,
            &first,
            dialect,
        )
        .unwrap();
        to_alice.encrypt(&mut rng, b"hi").unwrap();
        write(
            "state_import",
            &format!("channel-alice-{dialect}.json"),
            to_bob.export_state().as_bytes(),
        );
        write(
            "state_import",
            &format!("channel-bob-{dialect}.json"),
            to_alice.export_state().as_bytes(),
        );
    }

    // bundle: with and without a one-time key, other spellings, and bundles
    // that fail (bad signature, no Ed25519 key) or verify with a low-order
    // (unsigned) identity key.
    let with_otk = bob_keys.bundle(&bob, Some(7));
    write("bundle", "bundle-otk.json", with_otk.to_json().as_bytes());
    write(
        "bundle",
        "bundle-no-otk-null.json",
        bob_keys.bundle(&bob, None).to_json().as_bytes(),
    );
    let json = |b: &meshwire_proto::PreKeyBundle| serde_json::from_str::<serde_json::Value>(&b.to_json()).unwrap();
    let mut v = json(&bob_keys.bundle(&bob, None));
    v.as_object_mut().unwrap().remove("one_time_pre_key");
    write("bundle", "bundle-no-otk-absent.json", v.to_string().as_bytes());
    let mut v = json(&with_otk);
    v["identity_key"] = b64_std(with_otk.identity_key.as_bytes()).into();
    v["identity_key_ed"] = b64_std(with_otk.identity_key_ed.as_bytes()).into();
    v["signed_pre_key"]["public_key"] = b64_std(with_otk.signed_pre_key.as_bytes()).into();
    v["signed_pre_key"]["signature"] = b64_std(&with_otk.signed_pre_key_signature).into();
    write("bundle", "bundle-standard-base64.json", v.to_string().as_bytes());
    let mut forged = with_otk.clone();
    forged.signed_pre_key_signature[5] ^= 1;
    write("bundle", "bundle-bad-signature.json", forged.to_json().as_bytes());
    let mut low = with_otk.clone();
    low.identity_key = meshwire_proto::X25519PublicKey::from_bytes([0; 32]);
    write("bundle", "bundle-low-order-identity-key.json", low.to_json().as_bytes());
    let mut v = json(&with_otk);
    v["identity_key_ed"] = serde_json::Value::Null;
    write("bundle", "bundle-no-ed25519-key.json", v.to_string().as_bytes());
}
