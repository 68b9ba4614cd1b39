#!/usr/bin/env python3
"""Interop peer on the meshwire wheel: interop/PROTOCOL.md on stdin/stdout."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time

import meshwire


def now_us() -> int:
    return time.time_ns() // 1000


def padded(seq: int, size: int) -> dict:
    value = {"seq": seq, "t_us": now_us(), "pad": ""}
    length = len(json.dumps(value, separators=(",", ":")))
    value["pad"] = "x" * max(0, size - length)
    return value


class Peer:
    def __init__(self) -> None:
        self.client: meshwire.MeshClient | None = None
        self.settings: dict | None = None
        # Messages as they arrived, stamped on arrival by a background task.
        self.received: list[dict] = []
        self.arrived = asyncio.Event()
        self.collector: asyncio.Task | None = None
        self.store_dir = tempfile.mkdtemp(prefix="meshwire-wheel-peer-")

    def message(self, m) -> dict:
        return {"from": m.sender, "id": m.id, "payload": m.payload, "t_us": now_us()}

    async def join(self) -> str:
        if not self.settings:
            raise RuntimeError("connect first")
        s = self.settings
        self.client = meshwire.MeshClient(
            meshwire.Identity.from_seed(bytes.fromhex(s["seed"])),
            relay_url=s["relay"],
            registry_url=s["registry"],
            display_name=s["name"],
            store_dir=s.get("state_dir") or self.store_dir,
        )
        await self.client.connect()
        self.collector = asyncio.create_task(self.collect(self.client))
        return self.client.did

    async def collect(self, client) -> None:
        try:
            while True:
                message = await client.recv()
                self.received.append(self.message(message))
                self.arrived.set()
        except (meshwire.ClosedError, asyncio.CancelledError):
            pass

    def need(self) -> meshwire.MeshClient:
        if self.client is None:
            raise RuntimeError("not connected")
        return self.client

    async def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "hello":
            return {"runtime": f"meshwire-wheel {getattr(meshwire, '__version__', '?')}", "features": ["receipts", "persist"]}
        if cmd == "connect":
            self.settings = req
            return {"did": await self.join()}
        if cmd == "send":
            return {"id": await self.need().send(req["to"], req["payload"])}
        if cmd == "send_many":
            interval = req.get("interval_ms", 0) / 1000.0
            client = self.need()
            for seq in range(req.get("count", 1)):
                if interval:
                    await asyncio.sleep(interval)
                await client.send(req["to"], padded(seq, req.get("payload_bytes", 256)))
            return {"sent": req.get("count", 1)}
        if cmd == "recv":
            count, deadline = req.get("count", 1), time.monotonic() + req.get("timeout_ms", 10000) / 1000
            self.need()
            while len(self.received) < count and time.monotonic() < deadline:
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
            messages, self.received = self.received[:count], self.received[count:]
            return {"messages": messages}
        if cmd == "drain":
            messages, self.received = self.received, []
            return {"messages": messages}
        if cmd in ("disconnect", "close"):
            if self.client:
                await self.client.close()
                self.client = None
            if self.collector:
                self.collector.cancel()
                self.collector = None
            return {}
        if cmd == "reconnect":
            await self.join()
            return {}
        raise RuntimeError(f"unknown cmd {cmd!r}")


async def main() -> None:
    peer = Peer()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if not line.strip():
            continue
        try:
            response = {"ok": True, **(await peer.handle(json.loads(line)))}
        except Exception as e:  # noqa: BLE001 - every error is answered on the protocol
            response = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(response, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    if peer.client:
        await peer.client.close()


if __name__ == "__main__":
    asyncio.run(main())
