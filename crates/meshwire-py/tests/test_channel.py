"""Low-level channel properties: threads, fork safety of the randomness,
bundle JSON and state round trips."""

from __future__ import annotations

import os
import threading

import meshwire
import pytest


def channels():
    alice, bob = meshwire.Identity.generate(), meshwire.Identity.generate()
    keys = meshwire.PreKeys.generate(bob)
    ids = keys.generate_one_time_keys(2)
    bundle = keys.bundle(bob, ids[1])
    assert (bundle.one_time_pre_key_id, keys.one_time_key_ids) == (ids[1], ids)
    a, est = meshwire.SecureChannel.initiate(alice, bob.did, bundle)
    b, first = meshwire.SecureChannel.accept(bob, keys, alice.did, est, a.encrypt(b"first"))
    assert first == b"first" and keys.one_time_key_ids == ids[:1]
    return alice, bob, a, b


def test_associated_data_binds_both_dids():
    alice, bob, a, b = channels()
    prefix = f"{alice.did}|{bob.did}".encode()
    assert a.associated_data == b.associated_data
    assert a.associated_data == prefix + alice.x25519_public_key + bob.x25519_public_key
    assert (a.kdf, b.kdf) == ("spec", "spec")


def test_threads_share_a_channel():
    _, _, a, b = channels()
    sent = []
    lock = threading.Lock()

    def work(t):
        for i in range(200):
            m = a.encrypt(b"%d-%d" % (t, i))
            with lock:
                sent.append(m)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(m.n for m in sent) == list(range(1, 801))
    got = [b.decrypt(m) for m in sorted(sent, key=lambda m: m.n)]
    assert sorted(got) == sorted(b"%d-%d" % (t, i) for t in range(4) for i in range(200))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_draws_fresh_randomness():
    """After fork() the child must not reuse the parent's buffered random
    bytes: the same ratchet state encrypting the same plaintext must give
    different nonces in parent and child."""
    _, _, a, _ = channels()
    a.encrypt(b"fill the buffer")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, a.encrypt(b"same").ciphertext[:12])
        finally:
            os._exit(0)
    os.close(write)
    child_nonce = os.read(read, 12)
    os.close(read)
    os.waitpid(pid, 0)
    parent_nonce = a.encrypt(b"same").ciphertext[:12]
    assert len(child_nonce) == 12
    assert child_nonce != parent_nonce


def test_bundle_json_and_state_round_trips():
    alice, bob, a, b = channels()
    keys = meshwire.PreKeys.generate(bob)
    [otk] = keys.generate_one_time_keys(1)
    bundle = keys.bundle(bob, otk)
    assert meshwire.PreKeyBundle.from_json(bundle.to_json()) == bundle
    assert bundle.identity_key == bob.x25519_public_key and bundle.identity_key_ed == bob.public_key
    assert bundle.signed_pre_key == keys.signed_pre_key and len(bundle.signed_pre_key_signature) == 64

    restored = meshwire.SecureChannel.import_state(a.export_state())
    assert restored.export_state() == a.export_state()
    m = restored.encrypt(b"from the restored channel")
    assert b.decrypt(m) == b"from the restored channel"
    assert meshwire.EncryptedMessage.deserialize(m.serialize()) == m
    again = meshwire.PreKeys.import_json(bob, keys.export_json())
    assert again.one_time_key_ids == keys.one_time_key_ids
    assert again.bundle(bob, otk) == bundle
