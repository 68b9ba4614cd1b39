//! Criterion benchmarks of the protocol operations and of the primitives they
//! are built from, for the crypto provider compiled into this build.
//!
//! Every benchmark id carries the provider name (`handshake/rustcrypto`,
//! `message/aws-lc-rs/1024`, `primitive/rustcrypto/x25519`, ...) so that the
//! results of a default build and of a `--features aws-lc-rs` build sit side
//! by side under `target/criterion`. `benches/compare.sh` runs both builds
//! and the Python reference and tabulates everything.
//!
//! - `handshake/P`: `x3dh::initiate` (bundle signature check, ephemeral key,
//!   4 DH, HKDF) + `x3dh::respond` (OTK lookup, 4 DH, HKDF), cycling through
//!   a pool of pre-generated one-time pre-keys.
//! - `message/P/N`: one `SecureChannel::encrypt` by Alice and one `decrypt`
//!   by Bob of N bytes on an established channel (no DH step).
//! - `pingpong/P`: one 64-byte message per iteration, direction alternating,
//!   so every decrypt performs a DH ratchet step.
//! - `primitive/P/*`: the `CryptoProvider` primitives, Ed25519 verification
//!   and the OS RNG, for the "sum of primitive costs" comparison.
//!
//! The protocol operations draw their randomness from `rand::thread_rng()`
//! (a ChaCha CSPRNG seeded and reseeded from the OS), as `MeshClient` does;
//! set-up outside the timed loops uses the OS RNG.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meshwire_proto::crypto::{active_provider_name, Active, CryptoProvider};
use meshwire_proto::identity::verify_signature;
use meshwire_proto::{x3dh, Identity, KdfDialect, PreKeyBundle, PreKeys, SecureChannel};
use rand_core::{OsRng, RngCore};
use std::hint::black_box;

/// One-time pre-keys cycled through by the handshake benchmark.
const OTK_POOL: usize = 4096;
const MESSAGE_SIZES: [usize; 3] = [64, 1024, 65536];
const PINGPONG_SIZE: usize = 64;
/// The ratchet's HKDF info string (`kdf_root`).
const RATCHET_INFO: &[u8] = b"AgentMesh_Ratchet_v1";
const X3DH_INFO: &[u8] = b"AgentMesh_X3DH_v1";

fn provider() -> &'static str {
    active_provider_name()
}

/// Alice's channel to Bob and Bob's channel to Alice, after Alice's first
/// message was accepted (so Bob can send and Alice's next message needs no
/// DH step on Bob's side).
fn established() -> (SecureChannel, SecureChannel) {
    let alice = Identity::generate(&mut OsRng);
    let bob = Identity::generate(&mut OsRng);
    let mut bob_keys = PreKeys::generate(&mut OsRng, &bob);
    let otks = bob_keys.generate_one_time_keys(&mut OsRng, 1).unwrap();
    let bundle = bob_keys.bundle(&bob, Some(otks[0]));
    let (mut to_bob, establishment) =
        SecureChannel::initiate(&mut OsRng, &alice, bob.did(), &bundle, KdfDialect::Spec).unwrap();
    let first = to_bob.encrypt(&mut OsRng, b"hello").unwrap();
    let (to_alice, text) = SecureChannel::accept(
        &mut OsRng,
        &bob,
        &mut bob_keys,
        alice.did(),
        &establishment,
        &first,
        KdfDialect::Spec,
    )
    .unwrap();
    assert_eq!(text, b"hello");
    (to_bob, to_alice)
}

fn payload(size: usize) -> Vec<u8> {
    let mut p = vec![0u8; size];
    OsRng.fill_bytes(&mut p);
    p
}

fn bench_handshake(c: &mut Criterion) {
    let alice = Identity::generate(&mut OsRng);
    let bob = Identity::generate(&mut OsRng);
    let mut bob_keys = PreKeys::generate(&mut OsRng, &bob);
    let ids = bob_keys.generate_one_time_keys(&mut OsRng, OTK_POOL).unwrap();
    let bundles: Vec<PreKeyBundle> = ids.iter().map(|&id| bob_keys.bundle(&bob, Some(id))).collect();

    // Both sides agree, with the one-time key in play.
    let (a, init) = x3dh::initiate(&mut OsRng, &alice, &bundles[0], KdfDialect::Spec).unwrap();
    let b = x3dh::respond(&bob, &bob_keys, &init, KdfDialect::Spec).unwrap();
    assert_eq!(a.shared_secret, b.shared_secret);
    assert_eq!(a.dh_outputs.len(), 4);

    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    let mut next = 0usize;
    group.bench_function(BenchmarkId::from_parameter(provider()), |bench| {
        bench.iter(|| {
            let bundle = &bundles[next % OTK_POOL];
            next = next.wrapping_add(1);
            let (initiator, initiation) =
                x3dh::initiate(&mut rand::thread_rng(), &alice, bundle, KdfDialect::Spec).unwrap();
            let responder = x3dh::respond(&bob, &bob_keys, &initiation, KdfDialect::Spec).unwrap();
            black_box((initiator, responder))
        });
    });
    group.finish();
}

fn bench_messages(c: &mut Criterion) {
    let mut group = c.benchmark_group("message");
    for size in MESSAGE_SIZES {
        let (mut to_bob, mut to_alice) = established();
        let data = payload(size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new(provider(), size), |bench| {
            bench.iter(|| {
                let message = to_bob.encrypt(&mut rand::thread_rng(), black_box(&data)).unwrap();
                to_alice.decrypt(&mut rand::thread_rng(), &message).unwrap()
            });
        });
        // Still in step: no skipped keys piled up, no DH step happened.
        assert!(to_alice.ratchet().skipped_key_ids().next().is_none());
        assert_eq!(to_alice.ratchet().recv_count(), to_bob.ratchet().send_count());
    }
    group.finish();
}

fn bench_pingpong(c: &mut Criterion) {
    let (mut to_bob, mut to_alice) = established();
    let data = payload(PINGPONG_SIZE);
    let mut group = c.benchmark_group("pingpong");
    group.throughput(Throughput::Elements(1));
    // Alice sent last (the first message), so Bob starts.
    let mut bobs_turn = true;
    group.bench_function(BenchmarkId::from_parameter(provider()), |bench| {
        bench.iter(|| {
            let (sender, receiver) = if bobs_turn {
                (&mut to_alice, &mut to_bob)
            } else {
                (&mut to_bob, &mut to_alice)
            };
            bobs_turn = !bobs_turn;
            let message = sender.encrypt(&mut rand::thread_rng(), black_box(&data)).unwrap();
            receiver.decrypt(&mut rand::thread_rng(), &message).unwrap()
        });
    });
    group.finish();
    // Every message was the first of a new sending chain.
    assert!(to_bob.ratchet().send_count() <= 1 && to_alice.ratchet().send_count() <= 1);
}

fn bench_primitives(c: &mut Criterion) {
    let p = provider();
    let mut group = c.benchmark_group("primitive");

    let secret = {
        let mut s = [0u8; 32];
        OsRng.fill_bytes(&mut s);
        s
    };
    let peer = {
        let mut s = [0u8; 32];
        OsRng.fill_bytes(&mut s);
        Active::x25519_base(&s)
    };
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new(p, "x25519"), |b| {
        b.iter(|| Active::x25519(black_box(&secret), black_box(&peer)));
    });
    group.bench_function(BenchmarkId::new(p, "x25519_base"), |b| {
        b.iter(|| Active::x25519_base(black_box(&secret)));
    });

    let chain_key = [0x5au8; 32];
    group.bench_function(BenchmarkId::new(p, "chain_step"), |b| {
        b.iter(|| Active::chain_step(black_box(&chain_key)));
    });
    // kdf_root: salt = root key, ikm = DH output, 64 bytes out.
    group.bench_function(BenchmarkId::new(p, "hkdf/64"), |b| {
        let mut out = [0u8; 64];
        b.iter(|| {
            Active::hkdf_sha256(black_box(&chain_key), black_box(&secret), RATCHET_INFO, &mut out);
            out
        });
    });
    // X3DH derive: 0xFF*32 || DH1..DH4 in, 32 bytes out.
    group.bench_function(BenchmarkId::new(p, "hkdf/x3dh"), |b| {
        let ikm = [0x33u8; 160];
        let mut out = [0u8; 32];
        b.iter(|| {
            Active::hkdf_sha256(black_box(&[0u8; 32]), black_box(&ikm), X3DH_INFO, &mut out);
            out
        });
    });

    let signer = Identity::generate(&mut OsRng);
    let signed = peer;
    let signature = signer.sign(&signed);
    let ed_public = signer.ed25519_public();
    group.bench_function(BenchmarkId::new(p, "ed25519_verify"), |b| {
        b.iter(|| verify_signature(black_box(&ed_public), black_box(&signed), black_box(&signature)).unwrap());
    });

    group.bench_function(BenchmarkId::new(p, "osrng/12"), |b| {
        let mut nonce = [0u8; 12];
        b.iter(|| {
            OsRng.fill_bytes(&mut nonce);
            nonce
        });
    });
    group.bench_function(BenchmarkId::new(p, "osrng/32"), |b| {
        let mut key = [0u8; 32];
        b.iter(|| {
            OsRng.fill_bytes(&mut key);
            key
        });
    });

    // AEAD with the associated data length a real channel authenticates
    // (mesh AD + 40-byte header).
    let (to_bob, _) = established();
    let aad = payload(to_bob.associated_data().len() + 40);
    let key = [0x42u8; 32];
    let nonce = [0x24u8; 12];
    for size in MESSAGE_SIZES {
        let plaintext = payload(size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new(p, format!("seal/{size}")), |b| {
            let mut out = Vec::with_capacity(size + 16);
            b.iter(|| {
                out.clear();
                Active::seal(
                    black_box(&key),
                    &nonce,
                    black_box(&aad),
                    black_box(&plaintext),
                    &mut out,
                );
                out.len()
            });
        });
        let mut sealed = Vec::new();
        Active::seal(&key, &nonce, &aad, &plaintext, &mut sealed);
        assert_eq!(Active::open(&key, &nonce, &aad, &sealed).unwrap(), plaintext);
        group.bench_function(BenchmarkId::new(p, format!("open/{size}")), |b| {
            b.iter(|| Active::open(black_box(&key), &nonce, black_box(&aad), black_box(&sealed)).unwrap());
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_handshake,
    bench_messages,
    bench_pingpong,
    bench_primitives
);
criterion_main!(benches);
