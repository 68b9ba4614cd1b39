#!/usr/bin/env python3
"""A Python echo agent on the mesh: answers every message with
{"echo": <payload>} (bytes come back as the same bytes).

Start a relay and registry, then the agent, then ping it:

    cargo run -p meshwire-cli -- serve --listen 127.0.0.1:8765
    python examples/python/echo_agent.py --name py-echo
    python examples/python/ping.py --name py-echo

--relay / --registry default to the `meshwire serve` above (or
MESHWIRE_RELAY / MESHWIRE_REGISTRY). With --identity FILE the agent keeps
its DID across runs (the file is created mode 0600 if missing).
Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import meshwire


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relay", default=os.environ.get("MESHWIRE_RELAY", "ws://127.0.0.1:8765"))
    parser.add_argument("--registry", default=os.environ.get("MESHWIRE_REGISTRY", "http://127.0.0.1:8765"))
    parser.add_argument("--name", default=os.environ.get("MESHWIRE_NAME", "py-echo"))
    parser.add_argument("--identity", help="identity file (created if missing)")
    parser.add_argument("--store", help="directory keeping sessions across restarts")
    return parser.parse_args()


def identity(path: str | None) -> meshwire.Identity:
    if path is None:
        return meshwire.Identity.generate()
    if os.path.exists(path):
        return meshwire.Identity.load(path)
    me = meshwire.Identity.generate()
    me.save(path)
    return me


async def log_events(client: meshwire.MeshClient) -> None:
    async for event in client.events():
        if event.kind in ("knock", "session_replaced", "disconnected", "reconnected", "error"):
            print(f"event: {event!r}", file=sys.stderr, flush=True)


async def main() -> None:
    o = options()
    client = meshwire.MeshClient(
        identity(o.identity),
        relay_url=o.relay,
        registry_url=o.registry,
        display_name=o.name,
        capabilities=["echo"],
        store_dir=o.store,
    )
    async with client:
        print(client.did, flush=True)
        print(f"echo agent {o.name!r} is listening as {client.did}", file=sys.stderr, flush=True)
        events = asyncio.ensure_future(log_events(client))
        try:
            async for message in client.messages():
                answer = message.payload if message.is_bytes else {"echo": message.payload}
                try:
                    await client.send(message.sender, answer)
                except meshwire.MeshError as e:
                    print(f"could not answer {message.sender}: {e}", file=sys.stderr, flush=True)
        finally:
            events.cancel()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
