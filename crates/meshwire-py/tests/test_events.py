"""Client events: connection lost and regained, taken over by another
connection, a peer's session replaced after it restarted."""

from __future__ import annotations

import asyncio
from typing import List

import meshwire

from conftest import MESHWIRE_BIN, Process, _require, free_port, unique, wait_healthy

WAIT = 20.0


async def wait_for_kind(client: meshwire.MeshClient, kind: str, seen: List[str], timeout: float = WAIT):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        left = deadline - loop.time()
        assert left > 0, f"no {kind!r} event; saw {seen}"
        event = await client.next_event(timeout=left)
        if event is None:
            continue
        seen.append(event.kind)
        if event.kind == kind:
            return event


def serve(port: int) -> Process:
    process = Process("meshwire-serve-events", [str(MESHWIRE_BIN), "serve", "--memory", "--listen", f"127.0.0.1:{port}"])
    wait_healthy(process, f"http://127.0.0.1:{port}")
    return process


def test_taken_over(meshwire_server):
    async def main():
        identity = meshwire.Identity.generate()
        urls = dict(relay_url=meshwire_server.relay_url, registry_url=meshwire_server.registry_url)
        first = meshwire.MeshClient(identity, **urls)
        await first.connect()
        seen: List[str] = []
        assert (await wait_for_kind(first, "connected", seen)).kind == "connected"
        second = meshwire.MeshClient(identity, **urls)
        await second.connect()
        # Taken over: the first client is displaced (it takes the DID back
        # after a backoff; `taken_over` is the terminal event once another
        # live instance keeps winning).
        event = await wait_for_kind(first, "displaced", seen)
        assert event.peer is None and isinstance(event.reason, str)
        await first.close()
        await second.close()

    asyncio.run(main())


def test_disconnected_and_reconnected():
    _require(MESHWIRE_BIN, "the meshwire CLI", "MESHWIRE_BIN")
    port = free_port()
    server = serve(port)
    urls = dict(relay_url=f"ws://127.0.0.1:{port}", registry_url=f"http://127.0.0.1:{port}")

    async def main():
        nonlocal server
        async with meshwire.MeshClient(meshwire.Identity.generate(), **urls) as a, meshwire.MeshClient(
            meshwire.Identity.generate(), **urls
        ) as b:
            await b.send(a.did, {"before": "restart"})
            assert (await a.recv(timeout=WAIT)).payload == {"before": "restart"}
            seen: List[str] = []
            server.stop()
            event = await wait_for_kind(a, "disconnected", seen)
            assert event.reason is not None
            assert not a.connected
            server = serve(port)  # the embedded server keeps nothing: sessions live in the clients
            await wait_for_kind(a, "reconnected", seen)
            await wait_for_kind(b, "reconnected", [])
            assert a.connected
            await b.send(a.did, {"after": "restart"})
            assert (await a.recv(timeout=WAIT)).payload == {"after": "restart"}

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_session_replaced_when_peer_restarts(meshwire_server):
    async def main():
        urls = dict(relay_url=meshwire_server.relay_url, registry_url=meshwire_server.registry_url)
        bob_seed = bytes(range(100, 132))
        async with meshwire.MeshClient(meshwire.Identity.generate(), **urls, display_name=unique("alice")) as alice:
            async with meshwire.MeshClient(meshwire.Identity.from_seed(bob_seed), **urls) as bob:
                await alice.send(bob.did, {"n": 1})
                assert (await bob.recv(timeout=WAIT)).payload == {"n": 1}
                await bob.send(alice.did, {"n": 2})
                assert (await alice.recv(timeout=WAIT)).payload == {"n": 2}
            # Bob restarts without a store: a new session from him replaces the old.
            async with meshwire.MeshClient(meshwire.Identity.from_seed(bob_seed), **urls) as bob:
                await bob.send(alice.did, {"n": 3})
                message = await alice.recv(timeout=WAIT)
                assert (message.sender, message.payload) == (bob.did, {"n": 3})
                event = await wait_for_kind(alice, "session_replaced", [])
                assert event.peer == bob.did
                await alice.send(bob.did, {"n": 4})
                assert (await bob.recv(timeout=WAIT)).payload == {"n": 4}

    asyncio.run(main())
