"""Two wheel agents over the reference AGT 5.0.0 relay and registry."""

from __future__ import annotations

import asyncio

import meshwire

from conftest import unique

WAIT = 15.0


def agent(backend, name, **kwargs) -> meshwire.MeshClient:
    return meshwire.MeshClient(
        meshwire.Identity.generate(),
        relay_url=backend.relay_url,
        registry_url=backend.registry_url,
        display_name=name,
        **kwargs,
    )


def test_python_to_python_over_agt(agt_servers, tmp_path):
    async def main():
        alice_name, bob_name = unique("alice"), unique("bob")
        capability = unique("cap")
        async with agent(agt_servers, alice_name) as alice, agent(
            agt_servers, bob_name, capabilities=[capability], store_dir=tmp_path / "bob"
        ) as bob:
            assert alice.connected and bob.connected
            bob_did = await alice.find(bob_name)
            assert bob_did == bob.did
            hits = await alice.discover(capability)
            assert [hit["did"] for hit in hits] == [bob.did]
            assert capability in hits[0]["capabilities"]

            await alice.send(bob.did, {"text": "hello bob", "n": 1})
            first = await bob.recv(timeout=WAIT)
            assert (first.sender, first.payload) == (alice.did, {"text": "hello bob", "n": 1})
            assert first.raw == b'{"text":"hello bob","n":1}'

            await bob.send(alice.did, {"text": "hi alice ✓"})
            answer = await alice.recv(timeout=WAIT)
            assert answer.sender == bob.did and answer.payload == {"text": "hi alice ✓"}

            await alice.send(bob.did, b"\x00\x01binary\xff")
            blob = await bob.recv_from_any([alice.did], timeout=WAIT)
            assert blob.is_bytes and blob.payload == b"\x00\x01binary\xff"

            for i in range(5):
                await alice.send(bob.did, {"i": i})
            got = []
            async for message in bob.messages():
                got.append(message.payload["i"])
                if len(got) == 5:
                    break
            assert got == list(range(5))
            assert bob.drain() == []

        # Bob's store holds his state (one private file).
        assert any((tmp_path / "bob").iterdir())

    asyncio.run(main())


def test_session_survives_restart_with_store(agt_servers, tmp_path):
    async def main():
        identity = meshwire.Identity.generate()
        identity.save(tmp_path / "bob.identity")
        bob_name = unique("bob")

        def bob_client():
            return meshwire.MeshClient(
                meshwire.Identity.load(tmp_path / "bob.identity"),
                relay_url=agt_servers.relay_url,
                registry_url=agt_servers.registry_url,
                display_name=bob_name,
                store_dir=tmp_path / "store",
            )

        async with agent(agt_servers, unique("alice")) as alice:
            async with bob_client() as bob:
                await alice.send(bob.did, {"before": True})
                assert (await bob.recv(timeout=WAIT)).payload == {"before": True}
            async with bob_client() as bob:
                await alice.send(bob.did, {"after": True})
                assert (await bob.recv(timeout=WAIT)).payload == {"after": True}
                await bob.send(alice.did, {"still": "here"})
                assert (await alice.recv(timeout=WAIT)).payload == {"still": "here"}

    asyncio.run(main())
