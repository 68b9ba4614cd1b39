"""The wheel against the Rust echo agent over `meshwire serve`, both ways:
Python opens the session and Rust answers, and Rust opens the session
(`--greet`) and Python answers."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import meshwire
import pytest

from conftest import unique

WAIT = 15.0


def js(value) -> bytes:
    """What `JSON.stringify` (and serde_json) produce for `value`."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def client(backend, name=None, **kwargs) -> meshwire.MeshClient:
    return meshwire.MeshClient(
        meshwire.Identity.generate(),
        relay_url=backend.relay_url,
        registry_url=backend.registry_url,
        display_name=name or unique("py"),
        **kwargs,
    )


PAYLOADS = [
    {"text": "hello rust", "n": 1},
    {"unicode": "héllo ✓ 日本 🚀", "nested": {"list": [1, -2, True, False, None], "empty": {}}},
    ["a", 2, {"b": [3]}],
    "just a string",
    12345678901234,
    None,
]


def test_python_initiates_and_rust_echoes(meshwire_server, echo_agent):
    echo = echo_agent()

    async def main():
        async with client(meshwire_server) as alice:
            found = await alice.find(echo.name)
            assert found == echo.did
            hits = await alice.discover("echo")
            assert echo.did in [hit["did"] for hit in hits]
            for payload in PAYLOADS:
                message_id = await alice.send(echo.did, payload)
                assert isinstance(message_id, str) and message_id
                reply = await alice.recv(timeout=WAIT)
                assert reply.sender == echo.did
                assert reply.payload == {"echo": payload}
                assert reply.raw == js({"echo": payload})
                assert not reply.is_bytes

            blob = bytes(range(256)) + b"\x00\xff"
            await alice.send(echo.did, blob)
            reply = await alice.recv(timeout=WAIT)
            assert reply.is_bytes
            assert reply.payload == blob
            await alice.send(echo.did, bytearray(b"bytearray"))
            assert (await alice.recv(timeout=WAIT)).payload == b"bytearray"
            await alice.send(echo.did, memoryview(b"view"))
            assert (await alice.recv(timeout=WAIT)).payload == b"view"

            # A burst, read with `async for`, in order.
            for i in range(20):
                await alice.send(echo.did, {"i": i})
            got = []

            async def read():
                async for message in alice.messages():
                    got.append(message.payload["echo"]["i"])
                    if len(got) == 20:
                        return

            await asyncio.wait_for(read(), WAIT)
            assert got == list(range(20))

    asyncio.run(main())


def test_rust_initiates_and_python_answers(meshwire_server, echo_agent):
    async def main():
        knocks = []

        async def policy(from_did, intent, metadata):
            await asyncio.sleep(0)  # a real coroutine, awaited on this loop
            knocks.append((from_did, asyncio.get_running_loop()))
            return True

        async with client(meshwire_server, knock_policy=policy) as bob:
            echo = echo_agent(None, "--greet", bob.did)
            greeting = await bob.recv(timeout=WAIT)
            assert greeting.sender == echo.did
            assert greeting.payload == {"greeting": "hello from rust", "from": echo.did}
            assert greeting.raw == js({"greeting": "hello from rust", "from": echo.did})
            assert [k[0] for k in knocks] == [echo.did]
            assert knocks[0][1] is asyncio.get_running_loop()

            # The session Rust opened carries Python's messages too.
            await bob.send(echo.did, {"reply": "hi rust ✓"})
            reply = await bob.recv(timeout=WAIT)
            assert reply.payload == {"echo": {"reply": "hi rust ✓"}}

            kinds = []
            while True:
                event = await bob.next_event(timeout=0.5)
                if event is None:
                    break
                kinds.append(event.kind)
                if event.kind == "knock":
                    assert event.peer == echo.did and event.accepted is True
            assert "knock" in kinds

    asyncio.run(main())


def test_sync_policy_rejects_knock(meshwire_server, echo_agent):
    async def main():
        seen = []

        def policy(from_did, intent, metadata):
            seen.append(from_did)
            return False

        async with client(meshwire_server, knock_policy=policy) as carol:
            echo = echo_agent(None, "--greet", carol.did)
            with pytest.raises(meshwire.MeshTimeoutError):
                await carol.recv(timeout=2.0)
            assert seen == [echo.did]
            event = await carol.next_event(timeout=WAIT)
            while event is not None and event.kind != "knock":
                event = await carol.next_event(timeout=WAIT)
            assert event is not None and event.accepted is False and event.peer == echo.did

    asyncio.run(main())


def test_identity_file_is_shared_with_rust(meshwire_server, echo_agent, tmp_path):
    identity = meshwire.Identity.generate()
    path = tmp_path / "agent.json"
    identity.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert meshwire.Identity.load(str(path)).did == identity.did
    echo = echo_agent(None, "--identity", str(path))
    assert echo.did == identity.did
