#!/usr/bin/env python3
"""Finds an echo agent by display name and pings it: sends
{"ping": n, "sent_at_ms": <time>} COUNT times, checks every answer is
{"echo": <what was sent>} and prints the round-trip times.

    python examples/python/ping.py --name py-echo --count 5

Works against the Python echo agent (echo_agent.py) and the Rust one
(`cargo run -p meshwire --example echo -- --name NAME ...`). Exits non-zero
if the agent cannot be found or an answer is missing or wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import meshwire


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relay", default=os.environ.get("MESHWIRE_RELAY", "ws://127.0.0.1:8765"))
    parser.add_argument("--registry", default=os.environ.get("MESHWIRE_REGISTRY", "http://127.0.0.1:8765"))
    parser.add_argument("--name", default=os.environ.get("MESHWIRE_NAME", "py-echo"), help="the echo agent's name")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer")
    return parser.parse_args()


async def main() -> int:
    o = options()
    async with meshwire.MeshClient(
        meshwire.Identity.generate(), relay_url=o.relay, registry_url=o.registry, display_name="ping"
    ) as client:
        peer = await client.find(o.name)
        if peer is None:
            print(f"no agent named {o.name!r} in the registry at {o.registry}", file=sys.stderr)
            return 1
        print(f"{o.name} is {peer}")
        for n in range(1, o.count + 1):
            ping = {"ping": n, "sent_at_ms": time.time_ns() // 1_000_000}
            started = time.perf_counter()
            await client.send(peer, ping)
            try:
                answer = await client.recv_from_any([peer], timeout=o.timeout)
            except meshwire.MeshTimeoutError:
                print(f"ping {n}: no answer within {o.timeout} s", file=sys.stderr)
                return 1
            elapsed = (time.perf_counter() - started) * 1000
            if answer.payload != {"echo": ping}:
                print(f"ping {n}: unexpected answer {answer.payload!r}", file=sys.stderr)
                return 1
            print(f"ping {n}: echo in {elapsed:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
