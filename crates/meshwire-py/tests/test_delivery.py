"""The delivery contract from Python (issue 9): a message handed to the
application stays in the durable store until it is acknowledged, comes
back after a crash (flagged `redelivered`), and never after its
acknowledgement. The crash is a real one: the agent process ends with
`os._exit` in the middle of handling a message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import meshwire
from meshwire.sync import MeshClient

from conftest import unique

WAIT = 20.0

#: One agent run: receives with the iterator (or explicit acks), prints each
#: message as a JSON line, and with "crash" dies while handling the first.
AGENT = r"""
import json, os, sys
import meshwire
from meshwire.sync import MeshClient
seed, relay, registry, store, name, mode = sys.argv[1:7]
identity = meshwire.Identity.from_seed(bytes.fromhex(seed))
client = MeshClient(identity, relay_url=relay, registry_url=registry, display_name=name,
                    store_dir=store, manual_ack=(mode == "manual"))
client.connect()
print(json.dumps({"ready": client.did}), flush=True)
for message in client.messages(timeout=float(os.environ.get("IDLE", "3"))):
    print(json.dumps({"id": message.id, "k": message.payload["k"], "redelivered": message.redelivered}), flush=True)
    if mode == "crash":
        os._exit(3)
    if mode == "manual":
        assert client.ack(message) is True
        assert client.ack(message) is False
client.close()
"""


def run_agent(seed: bytes, backend, store, name: str, mode: str, sender=None, payloads=()):
    """Starts the agent, lets `sender` send `payloads` once it is ready, and
    returns the JSON lines it printed and its exit code."""
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT, seed.hex(), backend.relay_url, backend.registry_url, str(store), name, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    assert proc.stdout is not None
    ready = json.loads(proc.stdout.readline() or "null")
    assert ready and "ready" in ready, proc.stderr.read() if proc.stderr else ""
    for payload in payloads:
        sender.send(ready["ready"], payload)
    for line in proc.stdout:
        lines.append(json.loads(line))
    code = proc.wait(timeout=WAIT)
    return lines, code


def test_a_message_being_handled_when_the_process_dies_comes_back_once(meshwire_server, tmp_path):
    seed = os.urandom(32)
    name = unique("bob")
    store = tmp_path / "bob"
    with MeshClient(meshwire.Identity.generate(), display_name=unique("alice"),
                    relay_url=meshwire_server.relay_url, registry_url=meshwire_server.registry_url) as alice:
        # The first run dies while handling m1 (after printing it).
        lines, code = run_agent(seed, meshwire_server, store, name, "crash", alice, [{"k": "m1"}, {"k": "m2"}])
        assert code == 3
        assert [(l["k"], l["redelivered"]) for l in lines] == [("m1", False)]
        assert any(p.suffix == ".db" for p in store.iterdir()), "the SQLite store"
        # The second run gets m1 again, flagged, then m2; the iterator
        # acknowledges each when it asks for the next one, and close() the last.
        lines, code = run_agent(seed, meshwire_server, store, name, "loop")
        assert code == 0
        assert [(l["k"], l["redelivered"]) for l in lines[:1]] == [("m1", True)]
        assert [l["k"] for l in lines] == ["m1", "m2"]
        # Acknowledged: never again.
        lines, code = run_agent(seed, meshwire_server, store, name, "loop")
        assert (lines, code) == ([], 0)
        # Explicit acks (manual_ack=True), and the session still works.
        lines, code = run_agent(seed, meshwire_server, store, name, "manual", alice, [{"k": "m3"}])
        assert code == 0
        assert [(l["k"], l["redelivered"]) for l in lines] == [("m3", False)]
        lines, code = run_agent(seed, meshwire_server, store, name, "loop")
        assert (lines, code) == ([], 0)
