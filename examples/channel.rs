//! Two in-process agents open an end-to-end encrypted channel and talk,
//! printing everything that would cross the wire.
//!
//! Run with `cargo run --example channel`.

use meshwire_proto::encoding::b64_std;
use meshwire_proto::{EncryptedMessage, Identity, KdfDialect, PreKeys, SecureChannel};
use rand_core::OsRng;
use std::error::Error;

fn show(direction: &str, message: &EncryptedMessage) {
    println!(
        "  {direction} header {{dh: {}, pn: {}, n: {}}} ciphertext ({} bytes) {}",
        b64_std(message.header.dh.as_bytes()),
        message.header.pn,
        message.header.n,
        message.ciphertext.len(),
        b64_std(&message.ciphertext),
    );
}

fn main() -> Result<(), Box<dyn Error>> {
    let alice = Identity::generate(&mut OsRng);
    let bob = Identity::generate(&mut OsRng);
    println!("alice is {}\nbob   is {}\n", alice.did(), bob.did());

    // Bob publishes a signed pre-key and one-time pre-keys.
    let mut bob_keys = PreKeys::generate(&mut OsRng, &bob);
    let otk_ids = bob_keys.generate_one_time_keys(&mut OsRng, 5)?;
    let bundle = bob_keys.bundle(&bob, otk_ids.first().copied());
    println!(
        "bob's pre-key bundle, as the registry serves it:\n  {}\n",
        bundle.to_json()
    );

    // Alice verifies it, runs X3DH and encrypts her first message.
    let (mut alice_channel, establishment) =
        SecureChannel::initiate(&mut OsRng, &alice, bob.did(), &bundle, KdfDialect::Spec)?;
    println!(
        "alice's KNOCK establishment: ik {} ek {} otk {:?}",
        b64_std(establishment.identity_key.as_bytes()),
        b64_std(establishment.ephemeral_key.as_bytes()),
        establishment.one_time_key_id
    );
    let first = alice_channel.encrypt(&mut OsRng, b"hello bob, this is alice")?;
    show("alice -> bob", &first);

    // Bob accepts: his one-time key is spent only now that the message decrypted.
    let (mut bob_channel, text) = SecureChannel::accept(
        &mut OsRng,
        &bob,
        &mut bob_keys,
        alice.did(),
        &establishment,
        &first,
        KdfDialect::Spec,
    )?;
    println!(
        "  bob reads: {:?}  (one-time keys left: {:?})\n",
        String::from_utf8_lossy(&text),
        bob_keys.one_time_key_ids().collect::<Vec<_>>()
    );

    for (round, (from_alice, from_bob)) in [("how are you?", "fine, and you?"), ("great. bye!", "bye alice")]
        .into_iter()
        .enumerate()
    {
        println!("round {}:", round + 1);
        let reply = bob_channel.encrypt(&mut OsRng, from_bob.as_bytes())?;
        show("bob -> alice", &reply);
        println!(
            "  alice reads: {:?}",
            String::from_utf8_lossy(&alice_channel.decrypt(&mut OsRng, &reply)?)
        );
        let message = alice_channel.encrypt(&mut OsRng, from_alice.as_bytes())?;
        show("alice -> bob", &message);
        println!(
            "  bob reads: {:?}",
            String::from_utf8_lossy(&bob_channel.decrypt(&mut OsRng, &message)?)
        );
    }

    // A tampered message is rejected and changes nothing.
    let mut forged = alice_channel.encrypt(&mut OsRng, b"transfer everything")?;
    let genuine = alice_channel.encrypt(&mut OsRng, b"the real one")?;
    if let Some(byte) = forged.ciphertext.last_mut() {
        *byte ^= 1;
    }
    println!(
        "\nforged message: {}",
        bob_channel
            .decrypt(&mut OsRng, &forged)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    println!(
        "genuine message after it: {:?}",
        String::from_utf8_lossy(&bob_channel.decrypt(&mut OsRng, &genuine)?)
    );
    println!(
        "\nbob's session state ({} bytes of JSON) can be exported and moved between runtimes.",
        bob_channel.export_state().len()
    );
    Ok(())
}
