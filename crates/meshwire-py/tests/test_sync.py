"""`meshwire.sync.MeshClient`: the synchronous, thread-safe client, called
from several threads at once; relay tokens and connect failures that name
their cause."""

from __future__ import annotations

import json
import threading
import time
from typing import List

import meshwire
import pytest
from meshwire.sync import MeshClient

from conftest import MESHWIRE_BIN, Process, _require, free_port, unique, wait_healthy

WAIT = 20.0


def urls(backend) -> dict:
    return dict(relay_url=backend.relay_url, registry_url=backend.registry_url)


def test_many_threads_share_one_client(meshwire_server):
    threads, per_thread = 8, 10
    bob_name = unique("bob")
    with MeshClient(meshwire.Identity.generate(), display_name=unique("alice"), **urls(meshwire_server)) as alice, \
            MeshClient(meshwire.Identity.generate(), display_name=bob_name, **urls(meshwire_server)) as bob:
        assert alice.connected and bob.connected
        errors: List[BaseException] = []
        sent_ids: List[str] = []
        lock = threading.Lock()
        start = threading.Barrier(threads)

        def sender(t: int) -> None:
            try:
                start.wait(timeout=WAIT)
                for i in range(per_thread):
                    message_id = alice.send(bob.did, {"t": t, "i": i})
                    with lock:
                        sent_ids.append(message_id)
                # A registry call from every thread at once, too.
                assert alice.find(bob_name) == bob.did
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        received = []
        deadline = time.monotonic() + WAIT
        while len(received) < threads * per_thread and time.monotonic() < deadline:
            try:
                message = bob.recv(timeout=1.0)
            except meshwire.MeshTimeoutError:
                continue
            assert message.sender == alice.did
            received.append(json.loads(message.raw))
        for worker in workers:
            worker.join(WAIT)
        assert errors == []
        assert len(sent_ids) == len(set(sent_ids)) == threads * per_thread
        assert sorted((m["t"], m["i"]) for m in received) == [
            (t, i) for t in range(threads) for i in range(per_thread)
        ]
        # Per sender thread, messages arrive in the order it sent them.
        for t in range(threads):
            assert [m["i"] for m in received if m["t"] == t] == list(range(per_thread))


def test_concurrent_receivers_and_registry_calls(meshwire_server):
    name = unique("sync-bob")
    with MeshClient(meshwire.Identity.generate(), **urls(meshwire_server)) as alice, \
            MeshClient(meshwire.Identity.generate(), display_name=name, capabilities=["sync-test"],
                       **urls(meshwire_server)) as bob:
        found: List[object] = []
        got: List[int] = []
        lock = threading.Lock()

        def finder() -> None:
            for _ in range(5):
                found.append(alice.find(name))
                found.append([h["did"] for h in alice.discover("sync-test")])

        def receiver() -> None:
            while True:
                try:
                    message = bob.recv(timeout=3.0)
                except meshwire.MeshTimeoutError:
                    return
                with lock:
                    got.append(message.payload["n"])

        pool = [threading.Thread(target=finder) for _ in range(3)] + [
            threading.Thread(target=receiver) for _ in range(3)
        ]
        for thread in pool:
            thread.start()
        for n in range(30):
            alice.send(bob.did, {"n": n})
        for thread in pool:
            thread.join(WAIT)
        assert sorted(got) == list(range(30)), "every message taken exactly once across receivers"
        assert all(f == bob.did or f == [bob.did] for f in found), found
        # Events are there too, synchronously.
        kinds = [event.kind for event in bob.events(timeout=0.5)]
        assert "connected" in kinds, kinds


def test_close_is_idempotent_and_final(meshwire_server):
    client = MeshClient(meshwire.Identity.generate(), **urls(meshwire_server))
    client.connect()
    client.close()
    client.close()
    assert client.closed
    with pytest.raises(meshwire.ClosedError):
        client.send("did:mesh:" + "0" * 32, {"x": 1})
    assert client.drain() == []


def test_connect_failures_name_their_cause(meshwire_server):
    port = free_port()
    started = time.monotonic()
    client = MeshClient(meshwire.Identity.generate(), relay_url=f"ws://127.0.0.1:{port}",
                        registry_url=meshwire_server.registry_url)
    with pytest.raises(meshwire.RelayError, match="connection refused"):
        client.connect()
    assert time.monotonic() - started < 5
    client.close()


def test_relay_token():
    _require(MESHWIRE_BIN, "the meshwire CLI", "MESHWIRE_BIN")
    port = free_port()
    server = Process("meshwire-serve-token", [str(MESHWIRE_BIN), "serve", "--memory", "--listen", f"127.0.0.1:{port}",
                                              "--relay-token", "py-s3cret"])
    try:
        wait_healthy(server, f"http://127.0.0.1:{port}")
        backend = dict(relay_url=f"http://127.0.0.1:{port}", registry_url=f"http://127.0.0.1:{port}")
        without = MeshClient(meshwire.Identity.generate(), **backend)
        with pytest.raises(meshwire.RelayError, match="4003"):
            without.connect()
        without.close()
        with MeshClient(meshwire.Identity.generate(), relay_token="py-s3cret", **backend) as client:
            assert client.connected
            assert "py-s3cret" not in repr(client)
    finally:
        server.stop()
