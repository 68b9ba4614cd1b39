"""The wheel's low-level API against the pure-Python `agentmesh` package
(agent-governance-toolkit-core 5.0.0), in process: both handshake
directions, both message directions, and ratchet states moving between the
two implementations mid-conversation."""

from __future__ import annotations

import json
import os

import meshwire
import pytest

from conftest import AGENTMESH_MISSING

# Without the reference package the whole module is skipped with the
# reason, instead of failing at collection.
pytest.importorskip("agentmesh", reason=AGENTMESH_MISSING)

from agentmesh.encryption.channel import ChannelEstablishment
from agentmesh.encryption.channel import SecureChannel as PySecureChannel
from agentmesh.encryption.ratchet import DoubleRatchet as PyDoubleRatchet
from agentmesh.encryption.ratchet import EncryptedMessage as PyEncryptedMessage
from agentmesh.encryption.ratchet import MessageHeader as PyMessageHeader
from agentmesh.encryption.ratchet import RatchetState as PyRatchetState
from agentmesh.encryption.x3dh import PreKeyBundle as PyPreKeyBundle
from agentmesh.encryption.x3dh import X3DHKeyManager
from nacl.bindings import crypto_sign_seed_keypair  # noqa: E402  (after the skip)


def manager(seed: bytes) -> X3DHKeyManager:
    public, secret = crypto_sign_seed_keypair(seed)
    return X3DHKeyManager.from_ed25519_keys(secret, public)


def ad(initiator: str, responder: str) -> bytes:
    """What agentmesh's create_sender/create_receiver take: the package
    appends IK_initiator || IK_responder itself."""
    return f"{initiator}|{responder}".encode()


def to_py(message: meshwire.EncryptedMessage) -> PyEncryptedMessage:
    return PyEncryptedMessage.deserialize(message.serialize())


def to_wheel(message: PyEncryptedMessage) -> meshwire.EncryptedMessage:
    # Through the fields this time (deserialize is covered elsewhere).
    header = message.header
    return meshwire.EncryptedMessage(
        header.dh_public_key, header.previous_chain_length, header.message_number, message.ciphertext
    )


@pytest.fixture
def seeds():
    return os.urandom(32), os.urandom(32)


def test_same_seed_same_keys(seeds):
    for seed in seeds:
        wheel, package = meshwire.Identity.from_seed(seed), manager(seed)
        assert wheel.public_key == package.ed25519_public
        assert wheel.x25519_public_key == package.identity_key.public_key


def wheel_initiates(seeds):
    """Wheel Alice -> agentmesh Bob; returns both channels after one round."""
    alice = meshwire.Identity.from_seed(seeds[0])
    bob_did = meshwire.Identity.from_seed(seeds[1]).did
    bob = manager(seeds[1])
    bob.generate_signed_pre_key()
    otks = bob.generate_one_time_pre_keys(3)
    pb = bob.get_public_bundle(otks[1].key_id)
    bundle = meshwire.PreKeyBundle(
        pb.identity_key,
        pb.identity_key_ed,
        pb.signed_pre_key_id,
        pb.signed_pre_key,
        pb.signed_pre_key_signature,
        pb.one_time_pre_key_id,
        pb.one_time_pre_key,
    )
    bundle.verify()
    alice_ch, est = meshwire.SecureChannel.initiate(alice, bob_did, bundle)
    assert est.identity_key == alice.x25519_public_key and est.one_time_key_id == otks[1].key_id
    first = alice_ch.encrypt(b"hello from the wheel")

    bob_ch = PySecureChannel.create_receiver(
        bob,
        ChannelEstablishment(est.identity_key, est.ephemeral_key, est.one_time_key_id),
        ad(alice.did, bob_did),
    )
    assert bob_ch.receive(to_py(first)) == b"hello from the wheel"
    assert otks[1].key_id not in bob.one_time_pre_keys
    assert bob_ch._associated_data == alice_ch.associated_data
    return alice_ch, bob_ch


def package_initiates(seeds):
    """agentmesh Alice -> wheel Bob; returns both channels after one round."""
    alice = manager(seeds[0])
    alice_did = meshwire.Identity.from_seed(seeds[0]).did
    bob = meshwire.Identity.from_seed(seeds[1])
    keys = meshwire.PreKeys.generate(bob)
    ids = keys.generate_one_time_keys(2)
    wb = keys.bundle(bob, ids[0])
    bundle = PyPreKeyBundle(
        identity_key=wb.identity_key,
        identity_key_ed=wb.identity_key_ed,
        signed_pre_key=wb.signed_pre_key,
        signed_pre_key_signature=wb.signed_pre_key_signature,
        signed_pre_key_id=wb.signed_pre_key_id,
        one_time_pre_key=wb.one_time_pre_key,
        one_time_pre_key_id=wb.one_time_pre_key_id,
    )
    alice_ch, pest = PySecureChannel.create_sender(alice, bundle, ad(alice_did, bob.did))
    first = alice_ch.send(b"hello from agentmesh")
    est = meshwire.Establishment(pest.initiator_identity_key, pest.ephemeral_public_key, pest.used_one_time_key_id)

    # The wrong dialect does not authenticate and keeps the one-time key.
    with pytest.raises(meshwire.DecryptError):
        meshwire.SecureChannel.accept(bob, keys, alice_did, est, to_wheel(first), kdf="legacy-ff-salt")
    assert keys.one_time_key_ids == ids

    bob_ch, plaintext = meshwire.SecureChannel.accept(bob, keys, alice_did, est, to_wheel(first))
    assert plaintext == b"hello from agentmesh"
    assert keys.one_time_key_ids == ids[1:]
    assert bob_ch.associated_data == alice_ch._associated_data
    assert bob_ch.remote_identity_key == alice.identity_key.public_key
    return alice_ch, bob_ch


def converse(wheel_ch, package_ch, rounds=6):
    """Messages both ways, with turns of several messages (DH ratchet steps)
    and one delivered out of order."""
    for r in range(rounds):
        burst = [f"wheel {r}.{i} ✓".encode() for i in range(r % 3 + 1)]
        sent = [wheel_ch.encrypt(m) for m in burst]
        if len(sent) > 1:
            sent.reverse()
            burst.reverse()
        assert [package_ch.receive(to_py(m)) for m in sent] == burst
        burst = [os.urandom(17 + i) for i in range(r % 2 + 1)]
        assert [wheel_ch.decrypt(to_wheel(package_ch.send(m))) for m in burst] == burst


def test_wheel_initiator_package_responder(seeds):
    alice_ch, bob_ch = wheel_initiates(seeds)
    reply = bob_ch.send(b"hi wheel")
    assert alice_ch.decrypt(to_wheel(reply)) == b"hi wheel"
    converse(alice_ch, bob_ch)


def test_package_initiator_wheel_responder(seeds):
    alice_ch, bob_ch = package_initiates(seeds)
    reply = bob_ch.encrypt(b"hi agentmesh")
    assert alice_ch.receive(to_py(reply)) == b"hi agentmesh"
    converse(bob_ch, alice_ch)


def test_encrypted_message_layout_matches_package(seeds):
    alice_ch, bob_ch = wheel_initiates(seeds)
    message = alice_ch.encrypt(b"layout")
    py = to_py(message)
    assert py.header.serialize() == message.header_bytes
    assert (py.header.dh_public_key, py.header.previous_chain_length, py.header.message_number) == (
        message.dh,
        message.pn,
        message.n,
    )
    assert py.serialize() == message.serialize()
    assert meshwire.EncryptedMessage.from_header(message.header_bytes, message.ciphertext) == message
    assert bob_ch.receive(py) == b"layout"


def package_state(channel: PySecureChannel) -> dict:
    return channel._ratchet.state.to_dict()


def test_wheel_state_continues_in_package(seeds):
    """Alice (wheel) talks to Bob (agentmesh), then Alice's ratchet moves into
    an agentmesh channel that carries on the conversation with Bob."""
    alice_ch, bob_ch = wheel_initiates(seeds)
    converse(alice_ch, bob_ch, rounds=3)
    held_back = alice_ch.encrypt(b"sent before the move, delivered after")
    state = alice_ch.ratchet_state()
    assert set(state) == set(package_state(bob_ch))
    # The dict is exactly what the package itself writes for that state.
    assert PyRatchetState.from_dict(state).to_dict() == state
    assert json.loads(json.dumps(state)) == state

    moved = PySecureChannel(
        PyDoubleRatchet(PyRatchetState.from_dict(state)),
        alice_ch.associated_data,
        alice_ch.local_identity_key,
        alice_ch.remote_identity_key,
    )
    assert bob_ch.receive(moved.send(b"from the moved channel")) == b"from the moved channel"
    assert moved.receive(bob_ch.send(b"answer to the moved channel")) == b"answer to the moved channel"
    assert bob_ch.receive(to_py(held_back)) == b"sent before the move, delivered after"
    for i in range(3):
        assert bob_ch.receive(moved.send(b"m%d" % i)) == b"m%d" % i
        assert moved.receive(bob_ch.send(b"r%d" % i)) == b"r%d" % i


def test_package_state_continues_in_wheel(seeds):
    """Alice (agentmesh) talks to Bob (wheel), then Alice's agentmesh ratchet
    moves into a wheel channel that carries on with Bob; and Bob's wheel
    state round-trips through the package's RatchetState."""
    alice_ch, bob_ch = package_initiates(seeds)
    converse(bob_ch, alice_ch, rounds=3)
    skipped = alice_ch.send(b"skipped for now")
    after = alice_ch.send(b"after the skipped one")
    assert bob_ch.decrypt(to_wheel(after)) == b"after the skipped one"

    moved = meshwire.SecureChannel.from_ratchet_state(
        package_state(alice_ch),
        alice_ch._associated_data,
        alice_ch.local_identity_key,
        alice_ch.remote_identity_key,
    )
    assert moved.ratchet_state() == package_state(alice_ch)
    assert bob_ch.decrypt(moved.encrypt(b"from the moved wheel channel")) == b"from the moved wheel channel"
    assert moved.decrypt(bob_ch.encrypt(b"answer")) == b"answer"

    # Bob's state (with a skipped key pending) into the package and back.
    bob_state = bob_ch.ratchet_state()
    assert len(bob_state["skipped_keys"]) == 1
    assert PyRatchetState.from_dict(bob_state).to_dict() == bob_state
    bob_again = meshwire.SecureChannel.from_ratchet_state(
        json.dumps(bob_state), bob_ch.associated_data, bob_ch.local_identity_key, bob_ch.remote_identity_key
    )
    assert bob_again.decrypt(to_wheel(skipped)) == b"skipped for now"
    assert bob_again.decrypt(moved.encrypt(b"last")) == b"last"

    # The full channel export round-trips too.
    restored = meshwire.SecureChannel.import_state(bob_again.export_state())
    assert restored.export_state() == bob_again.export_state()
    assert restored.decrypt(moved.encrypt(b"after import")) == b"after import"
