"""Bad input raises the documented exception and never crashes the
interpreter; failed operations leave state unchanged."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import meshwire
import pytest

from conftest import REPO, free_port, unique

ERRORS = [
    meshwire.DecryptError,
    meshwire.RegistryError,
    meshwire.RelayError,
    meshwire.ProtocolError,
    meshwire.StateError,
    meshwire.ClosedError,
    meshwire.MeshTimeoutError,
    meshwire.StoreError,
]


def test_hierarchy():
    for error in ERRORS:
        assert issubclass(error, meshwire.MeshError)
        assert error.__module__ == "meshwire"
    assert issubclass(meshwire.MeshError, Exception)
    assert issubclass(meshwire.ProtocolError, ValueError)
    assert issubclass(meshwire.MeshTimeoutError, TimeoutError)
    assert issubclass(meshwire.StoreError, OSError)
    assert not issubclass(meshwire.DecryptError, ValueError)


@pytest.fixture
def pair():
    alice, bob = meshwire.Identity.generate(), meshwire.Identity.generate()
    keys = meshwire.PreKeys.generate(bob)
    [otk] = keys.generate_one_time_keys(1)
    bundle = keys.bundle(bob, otk)
    a, est = meshwire.SecureChannel.initiate(alice, bob.did, bundle)
    first = a.encrypt(b"first")
    b, text = meshwire.SecureChannel.accept(bob, keys, alice.did, est, first)
    assert text == b"first"
    return alice, bob, keys, bundle, a, b


def test_identity_input():
    with pytest.raises(meshwire.ProtocolError, match="32 bytes"):
        meshwire.Identity.from_seed(b"short")
    with pytest.raises(meshwire.ProtocolError):
        meshwire.Identity.from_seed(bytes(33))
    for bad in ("a" * 32, None, 32, [0] * 32):
        with pytest.raises(TypeError):
            meshwire.Identity.from_seed(bad)
    seed = bytes(range(32))
    assert meshwire.Identity.from_seed(seed) == meshwire.Identity.from_seed(seed)
    assert meshwire.Identity.from_seed(seed).did.startswith("did:mesh:")
    assert len(meshwire.Identity.from_seed(seed).sign(b"m")) == 64


def test_identity_files(tmp_path):
    identity = meshwire.Identity.generate()
    path = tmp_path / "id.json"
    identity.save(path)
    assert meshwire.Identity.load(path).did == identity.did
    os.chmod(path, 0o644)
    with pytest.raises(meshwire.StoreError, match="chmod 600"):
        meshwire.Identity.load(path)
    os.chmod(path, 0o600)
    path.write_text("{}")
    with pytest.raises(meshwire.StoreError, match="not a meshwire identity file"):
        meshwire.Identity.load(path)
    with pytest.raises(meshwire.StoreError) as missing:
        meshwire.Identity.load(tmp_path / "missing.json")
    assert isinstance(missing.value, OSError)
    with pytest.raises(TypeError):
        meshwire.Identity.load(42)


def test_bundle_input(pair):
    alice, bob, keys, bundle, _, _ = pair
    fields = dict(
        identity_key=bundle.identity_key,
        identity_key_ed=bundle.identity_key_ed,
        signed_pre_key_id=bundle.signed_pre_key_id,
        signed_pre_key=bundle.signed_pre_key,
        signed_pre_key_signature=bundle.signed_pre_key_signature,
    )
    assert meshwire.PreKeyBundle(**fields).one_time_pre_key is None
    with pytest.raises(meshwire.ProtocolError, match="identity_key must be 32 bytes, got 31"):
        meshwire.PreKeyBundle(**{**fields, "identity_key": bytes(31)})
    with pytest.raises(meshwire.ProtocolError, match="signed_pre_key_signature"):
        meshwire.PreKeyBundle(**{**fields, "signed_pre_key_signature": bytes(63)})
    with pytest.raises(meshwire.ProtocolError, match="go together"):
        meshwire.PreKeyBundle(**fields, one_time_pre_key_id=3)
    with pytest.raises(TypeError):
        meshwire.PreKeyBundle(**{**fields, "identity_key": "not bytes"})
    with pytest.raises(OverflowError):
        meshwire.PreKeyBundle(**{**fields, "signed_pre_key_id": -1})

    forged_sig = bytearray(bundle.signed_pre_key_signature)
    forged_sig[0] ^= 1
    forged = meshwire.PreKeyBundle(**{**fields, "signed_pre_key_signature": bytes(forged_sig)})
    with pytest.raises(meshwire.ProtocolError, match="signature"):
        forged.verify()
    with pytest.raises(meshwire.ProtocolError, match="signature"):
        meshwire.SecureChannel.initiate(alice, bob.did, forged)

    assert meshwire.PreKeyBundle.from_json(bundle.to_json()) == bundle
    for text in ("garbage", "{}", "[]", bundle.to_json().replace('"identity_key":"', '"identity_key":"AA', 1)):
        with pytest.raises(meshwire.ProtocolError):
            meshwire.PreKeyBundle.from_json(text)
    with pytest.raises(TypeError):
        meshwire.PreKeyBundle.from_json(b"{}")


def test_prekeys_input(pair):
    _, bob, keys, _, _, _ = pair
    with pytest.raises(meshwire.StateError):
        keys.bundle(bob, 999)
    with pytest.raises(meshwire.StateError):
        keys.remove_one_time_key(999)
    with pytest.raises(OverflowError):
        keys.generate_one_time_keys(-1)
    with pytest.raises(meshwire.StateError):
        meshwire.PreKeys.import_json(meshwire.Identity.generate(), keys.export_json())
    assert meshwire.PreKeys.import_json(bob, keys.export_json()).one_time_key_ids == keys.one_time_key_ids


def test_channel_input(pair):
    alice, bob, keys, bundle, a, b = pair
    with pytest.raises(meshwire.ProtocolError, match="KDF dialect"):
        meshwire.SecureChannel.initiate(alice, bob.did, bundle, kdf="bogus")
    with pytest.raises(meshwire.ProtocolError, match="invalid DID"):
        meshwire.SecureChannel.initiate(alice, "did:web:nope", bundle)
    with pytest.raises(TypeError):
        meshwire.SecureChannel.initiate(alice, bob.did, bundle.to_json())
    with pytest.raises(TypeError):
        a.encrypt("text is not bytes")
    with pytest.raises(TypeError):
        a.decrypt(b"raw bytes are not a message")

    # A responder cannot send before it received.
    keys2 = meshwire.PreKeys.generate(bob)
    _, est = meshwire.SecureChannel.initiate(alice, bob.did, keys2.bundle(bob))
    silent = meshwire.SecureChannel.respond(bob, keys2, alice.did, est)
    with pytest.raises(meshwire.StateError, match="sending chain"):
        silent.encrypt(b"too early")

    # Reusing a consumed one-time key fails as a protocol error.
    with pytest.raises(meshwire.ProtocolError, match="one-time pre-key"):
        meshwire.SecureChannel.respond(
            bob, keys, alice.did, meshwire.Establishment(alice.x25519_public_key, alice.x25519_public_key, 0)
        )


def test_garbage_ciphertext_leaves_channel_unchanged(pair):
    _, _, _, _, a, b = pair
    good = a.encrypt(b"good")
    state = b.export_state()
    tampered = bytearray(good.ciphertext)
    tampered[-1] ^= 1
    cases = [
        meshwire.EncryptedMessage(good.dh, good.pn, good.n, bytes(tampered)),
        meshwire.EncryptedMessage(good.dh, good.pn, good.n, b""),
        meshwire.EncryptedMessage(good.dh, good.pn, good.n, os.urandom(200)),
        meshwire.EncryptedMessage(good.dh, good.pn, good.n + 1000, good.ciphertext),
        meshwire.EncryptedMessage(bytes(32), 0, 0, good.ciphertext),
        meshwire.EncryptedMessage(os.urandom(32), 0, 0, good.ciphertext),
    ]
    for bad in cases:
        with pytest.raises(meshwire.DecryptError):
            b.decrypt(bad)
        assert b.export_state() == state
    assert b.decrypt(good) == b"good"
    with pytest.raises(meshwire.DecryptError, match="already decrypted"):
        b.decrypt(good)


def test_message_input():
    with pytest.raises(meshwire.ProtocolError, match="dh must be 32 bytes"):
        meshwire.EncryptedMessage(bytes(31), 0, 0, b"")
    with pytest.raises(OverflowError):
        meshwire.EncryptedMessage(bytes(32), -1, 0, b"")
    with pytest.raises(OverflowError):
        meshwire.EncryptedMessage(bytes(32), 0, 2**32, b"")
    with pytest.raises(meshwire.ProtocolError):
        meshwire.EncryptedMessage.from_header(bytes(39), b"")
    for data in (b"", b"\x00", b"\x00\x00\x00\x28" + bytes(10), b"\x00\x00\x00\x05" + bytes(60)):
        with pytest.raises(meshwire.ProtocolError):
            meshwire.EncryptedMessage.deserialize(data)
    with pytest.raises(meshwire.ProtocolError):
        meshwire.Establishment(bytes(32), bytes(16))


def test_state_input(pair):
    _, _, _, _, a, _ = pair
    for text in ("not json", "{}", "[]", '{"root_key": 1}'):
        with pytest.raises(meshwire.StateError):
            meshwire.SecureChannel.import_state(text)
    state = a.ratchet_state()
    ad, lk, rk = a.associated_data, a.local_identity_key, a.remote_identity_key
    with pytest.raises(meshwire.StateError):
        meshwire.SecureChannel.from_ratchet_state({}, ad, lk, rk)
    with pytest.raises(meshwire.StateError, match="root_key"):
        meshwire.SecureChannel.from_ratchet_state({**state, "root_key": "00"}, ad, lk, rk)
    with pytest.raises(meshwire.StateError):
        meshwire.SecureChannel.from_ratchet_state([1, 2], ad, lk, rk)
    with pytest.raises(meshwire.ProtocolError):
        meshwire.SecureChannel.from_ratchet_state(state, ad, lk[:5], rk)
    with pytest.raises(TypeError):
        meshwire.SecureChannel.from_ratchet_state({"x": object()}, ad, lk, rk)
    assert meshwire.SecureChannel.from_ratchet_state(state, ad, lk, rk).ratchet_state() == state


def test_client_input_and_closed_client(meshwire_server):
    identity = meshwire.Identity.generate()
    urls = dict(relay_url=meshwire_server.relay_url, registry_url=meshwire_server.registry_url)
    with pytest.raises(TypeError):
        meshwire.MeshClient("not an identity", **urls)
    with pytest.raises(TypeError):
        meshwire.MeshClient(identity, **urls, knock_policy=5)
    with pytest.raises(TypeError):
        meshwire.MeshClient(identity, **urls, capabilities="not-a-list")
    with pytest.raises(TypeError):
        meshwire.MeshClient(identity, meshwire_server.relay_url, meshwire_server.registry_url)

    async def main():
        client = meshwire.MeshClient(identity, **urls, display_name=unique("closed"))
        with pytest.raises(meshwire.ClosedError, match="not connected"):
            await client.send(identity.did, {})
        with pytest.raises(meshwire.ClosedError):
            await client.recv()
        with pytest.raises(meshwire.ClosedError):
            client.messages()

        await client.connect()
        with pytest.raises(meshwire.StateError, match="already"):
            await client.connect()
        with pytest.raises(TypeError):
            await client.send(42, {})
        with pytest.raises(TypeError):
            await client.send(identity.did, object())
        with pytest.raises(ValueError):
            await client.send(identity.did, float("nan"))
        with pytest.raises(meshwire.ProtocolError, match="DID"):
            await client.send("not a did", {})
        with pytest.raises(ValueError):
            await client.recv(timeout=-1)
        with pytest.raises(TypeError):
            await client.recv(timeout="soon")
        with pytest.raises(TypeError):
            await client.recv_from_any("did:mesh:x", 1)
        with pytest.raises(meshwire.MeshTimeoutError) as timeout:
            await client.recv(timeout=0.1)
        assert isinstance(timeout.value, TimeoutError)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.recv(), 0.1)  # cancelled awaitable
        event = await client.next_event(timeout=5)
        assert event is not None and event.kind == "connected" and event.peer is None
        assert client.connected

        # A message from a peer arrives while nobody reads...
        async with meshwire.MeshClient(meshwire.Identity.generate(), **urls) as peer:
            await peer.send(identity.did, {"to": "closed"})
            # Receipts: the peer's count drops once we hold the message.
            for _ in range(200):
                if peer.unconfirmed(identity.did) == 0:
                    break
                await asyncio.sleep(0.05)
            assert peer.unconfirmed(identity.did) == 0
        await client.close()
        await client.close()  # idempotent
        assert client.closed and not client.connected
        with pytest.raises(meshwire.ClosedError, match="closed"):
            await client.send(identity.did, {})
        with pytest.raises(meshwire.ClosedError):
            await client.find("x")
        with pytest.raises(meshwire.ClosedError):
            await client.connect()
        # ...and can still be read after close; then the stream ends.
        rest = [m.payload async for m in client.messages()]
        assert rest == [{"to": "closed"}]
        with pytest.raises(meshwire.ClosedError):
            await client.recv(timeout=1)
        kinds = [e.kind async for e in client.events()]
        assert "knock" in kinds, kinds
        with pytest.raises(meshwire.ClosedError):
            await client.next_event()

    asyncio.run(main())


def test_huge_timeouts_saturate(meshwire_server):
    """`gather(..., 1e18)` used to panic in Rust (`Instant + Duration`
    overflow); huge finite timeouts now saturate and still work."""
    urls = dict(relay_url=meshwire_server.relay_url, registry_url=meshwire_server.registry_url)

    async def main():
        async with meshwire.MeshClient(meshwire.Identity.generate(), **urls) as client:
            assert await client.gather([], 1e18) == []
            async with meshwire.MeshClient(meshwire.Identity.generate(), **urls) as peer:
                await peer.send(client.did, {"k": 1})
                got = await client.gather([peer.did], 1e18)
                assert [m.payload for m in got] == [{"k": 1}]
                await peer.send(client.did, {"k": 2})
                message = await client.recv_from_any([peer.did], 1e300)
                assert message.payload == {"k": 2}
                await peer.send(client.did, {"k": 3})
                assert (await client.recv(timeout=1.7e308)).payload == {"k": 3}
            assert await client.next_event(timeout=1e18) is not None
            for bad in (float("inf"), float("nan"), -1.0):
                with pytest.raises(ValueError):
                    await client.recv(timeout=bad)

    asyncio.run(main())


def test_unreachable_services():
    async def main():
        port = free_port()
        client = meshwire.MeshClient(
            meshwire.Identity.generate(),
            relay_url=f"ws://127.0.0.1:{port}",
            registry_url=f"http://127.0.0.1:{port}",
        )
        started = time.monotonic()
        with pytest.raises(meshwire.RegistryError) as info:
            await client.connect()
        assert info.value.status is None
        assert time.monotonic() - started < 30
        # A failed connect can be retried (it fails the same way).
        with pytest.raises(meshwire.RegistryError):
            await client.connect()

    asyncio.run(main())


def test_relay_refusal(meshwire_server):
    async def main():
        client = meshwire.MeshClient(
            meshwire.Identity.generate(),
            relay_url=f"ws://127.0.0.1:{free_port()}",
            registry_url=meshwire_server.registry_url,
            connect_timeout=1.0,
        )
        # The cause is named, at once (no retry until the timeout).
        started = time.monotonic()
        with pytest.raises(meshwire.RelayError, match="cannot join the relay at .*: connection refused"):
            await client.connect()
        assert time.monotonic() - started < 2.0

    asyncio.run(main())


def test_ctrl_c_in_async_for_exits_promptly(meshwire_server):
    script = textwrap.dedent(
        f"""
        import asyncio, sys, meshwire

        async def main():
            async with meshwire.MeshClient(
                meshwire.Identity.generate(),
                relay_url={meshwire_server.relay_url!r},
                registry_url={meshwire_server.registry_url!r},
            ) as client:
                print("ready", flush=True)
                async for message in client.messages():
                    print(message.payload, flush=True)

        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(42)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"ready\n", proc.stderr.read() if proc.stderr else line
        time.sleep(0.3)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read() if proc.stdout else b""
    err = proc.stderr.read() if proc.stderr else b""
    assert code == 42, (code, out, err)
    assert out == b"interrupted\n"
    assert elapsed < 5, elapsed
    assert b"panicked" not in err and b"Fatal" not in err, err
