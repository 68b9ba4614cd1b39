#!/usr/bin/env python3
"""Interop matrix: every peer runtime against every other, on real relays.

Starts the services (the AGT 5.0.0 relay and registry from the project's
venv, and meshwire's embedded server), then for every sender x receiver x
relay runs: KNOCK + 20 messages each way with payloads that stress encoding,
offline delivery, and a relay restart in the middle. Prints a table (rows:
pairs, columns: relays), writes it as JSON, and ends with `N passed, M failed`.
With --figures it also measures messages/s and one-way latency p50/p99 per
pair and relay (256-byte payloads).

Peers speak interop/PROTOCOL.md over stdin/stdout. Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MESHWIRE_RUNTIMES = {"rust", "wheel"}

STRESS_PAYLOADS = [
    {"text": "hello"},
    {"unicode": "✓ 🚀 naïve Ωμέγα 日本語", "emoji": "👩‍💻"},
    {"separators": "line\u2028para\u2029end", "controls": "tab\tnl\nquote\"back\\"},
    {"big": 9007199254740991, "neg": -9007199254740991, "float": 1.5e300, "tiny": 5e-324, "zero": 0},
    {"beyond_double": 12345678901234567890},
    {"nested": {"a": [1, {"b": [2, {"c": [3, None, True, False]}]}], "empty": {}, "list": []}},
    {"long": "y" * 65536},
    [1, "two", 3.0, None],
    "a bare string",
    12345,
]


def payload(i: int):
    base = STRESS_PAYLOADS[i % len(STRESS_PAYLOADS)]
    return {"i": i, "body": base}


def same_json(a, b) -> bool:
    """Equality after JSON decoding; numbers beyond 2^53 compared as doubles
    (JavaScript peers parse them as such)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, int) and isinstance(b, int) and abs(a) <= 2**53 and abs(b) <= 2**53:
            return a == b
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return a == b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) process `pid` has used so far (Linux)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def log(*args):
    print(*args, file=sys.stderr, flush=True)


async def wait_http(port: int, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
            await writer.drain()
            data = await reader.read(200)
            writer.close()
            if b" 200 " in data:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"service on port {port} did not start")


class Service:
    """A server process that can be restarted on the same port."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict | None = None):
        self.name, self.argv, self.port, self.env = name, argv, port, env
        self.proc: subprocess.Popen | None = None
        self.logfile = REPO / "target" / "interop" / f"{name}-{port}.log"

    async def start(self):
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **(self.env or {}))
        with open(self.logfile, "ab") as log_out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log_out, stderr=log_out, env=env)
        await wait_http(self.port)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    async def restart(self):
        self.stop()
        await self.start()


@dataclass
class Relay:
    name: str
    relay: Service
    registry_url: str
    allows_unauthenticated: bool

    @property
    def relay_url(self) -> str:
        return f"ws://127.0.0.1:{self.relay.port}"


@dataclass
class PeerKind:
    name: str
    argv: list[str]
    needs_unauthenticated_relay: bool = False
    # X3DH KDF dialects the runtime can speak.
    dialects: tuple[str, ...] = ("spec", "legacy-ff-salt")


class Peer:
    def __init__(self, kind: PeerKind, label: str):
        self.kind, self.label = kind, label
        self.proc: asyncio.subprocess.Process | None = None
        self.did = ""
        self.errlog = REPO / "target" / "interop" / f"peer-{label}.log"

    async def start(self):
        self.errlog.parent.mkdir(parents=True, exist_ok=True)
        self.err = open(self.errlog, "wb")
        self.proc = await asyncio.create_subprocess_exec(
            *self.kind.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=self.err,
            limit=64 * 1024 * 1024,
        )

    async def call(self, timeout: float = 60.0, **request):
        assert self.proc and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"{self.label} exited (see {self.errlog})")
        response = json.loads(line)
        if not response.get("ok"):
            raise RuntimeError(f"{self.label} {request.get('cmd')}: {response.get('error')}")
        return response

    async def stop(self):
        if self.proc:
            try:
                if self.proc.returncode is None:
                    await asyncio.wait_for(self.call(cmd="close"), 10)
            except Exception:
                pass
            try:
                self.proc.stdin.close()
                await asyncio.wait_for(self.proc.wait(), 10)
            except Exception:
                self.proc.kill()
                await self.proc.wait()
        if hasattr(self, "err"):
            self.err.close()


@dataclass
class Cell:
    sender: str
    receiver: str
    relay: str
    status: str = "pass"  # pass | fail | n/a
    delivered: int = 0
    expected: int = 0
    notes: list[str] = field(default_factory=list)
    known_loss: int = 0
    seconds: float = 0.0

    def text(self) -> str:
        if self.status == "n/a":
            return "n/a"
        extra = f" (-{self.known_loss} known)" if self.known_loss else ""
        return f"{self.status} {self.delivered}/{self.expected}{extra}"


async def exchange(sender: Peer, receiver: Peer, n: int, cell: Cell, what: str):
    sent = []
    for i in range(n):
        p = payload(i)
        await sender.call(cmd="send", to=receiver.did, payload=p)
        sent.append(p)
    got = (await receiver.call(cmd="recv", count=n, timeout_ms=30000, timeout=60))["messages"]
    cell.expected += n
    cell.delivered += len(got)
    received = [m["payload"] for m in got]
    if len(received) != n:
        raise AssertionError(f"{what}: {len(received)}/{n} delivered")
    for i, (want, have) in enumerate(zip(sent, received)):
        if not same_json(want, have):
            raise AssertionError(f"{what}: message {i} differs or out of order: sent {str(want)[:120]} got {str(have)[:120]}")
    if any(m["from"] != sender.did for m in got):
        raise AssertionError(f"{what}: wrong sender DID")


async def run_cell(cell: Cell, kinds: dict[str, PeerKind], relay: Relay, seq: int) -> Cell:
    started = time.monotonic()
    s_kind, r_kind = kinds[cell.sender], kinds[cell.receiver]
    sender = Peer(s_kind, f"{seq}-{cell.sender}-send-{relay.name}")
    receiver = Peer(r_kind, f"{seq}-{cell.receiver}-recv-{relay.name}")
    try:
        await sender.start()
        await receiver.start()
        for peer, role in ((sender, "s"), (receiver, "r")):
            seed = hashlib.sha256(f"interop/{seq}/{role}/{time.time_ns()}".encode()).hexdigest()
            resp = await peer.call(cmd="connect", relay=relay.relay_url, registry=relay.registry_url,
                                   name=f"interop-{seq}-{role}", seed=seed)
            peer.did = resp["did"]
        # KNOCK + 20 messages each way.
        await exchange(sender, receiver, 20, cell, "sender->receiver")
        await exchange(receiver, sender, 20, cell, "receiver->sender")
        # Offline delivery: the receiver is away while messages are sent.
        await receiver.call(cmd="disconnect")
        offline = [{"offline": i} for i in range(5)]
        for p in offline:
            await sender.call(cmd="send", to=receiver.did, payload=p)
        await asyncio.sleep(0.5)
        await receiver.call(cmd="reconnect")
        got = (await receiver.call(cmd="recv", count=5, timeout_ms=20000, timeout=40))["messages"]
        cell.expected += 5
        cell.delivered += len(got)
        if [m["payload"] for m in got] != offline:
            raise AssertionError(f"offline delivery: got {[m['payload'] for m in got]}")
        # Relay restart: messages held by the relay, and sent while it is down.
        await receiver.call(cmd="disconnect")
        held = [{"held": i} for i in range(5)]
        for p in held:
            await sender.call(cmd="send", to=receiver.did, payload=p)
        await asyncio.sleep(0.5)
        await relay.relay.restart()
        down = [{"after_restart": i} for i in range(5)]
        send_errors = 0
        for p in down:
            try:
                await sender.call(cmd="send", to=receiver.did, payload=p)
            except RuntimeError:
                send_errors += 1
        await asyncio.sleep(1.0)
        await receiver.call(cmd="reconnect")
        expected = held + down
        both_meshwire = cell.sender in MESHWIRE_RUNTIMES and cell.receiver in MESHWIRE_RUNTIMES
        wait_ms = 20000 if both_meshwire else 8000
        got = (await receiver.call(cmd="recv", count=len(expected), timeout_ms=wait_ms, timeout=60))["messages"]
        payloads = [m["payload"] for m in got]
        cell.expected += len(expected)
        delivered = [p for p in expected if p in payloads]
        cell.delivered += len(delivered)
        duplicates = len(payloads) - len({json.dumps(p, sort_keys=True) for p in payloads})
        if duplicates:
            raise AssertionError(f"relay restart: {duplicates} duplicate deliveries")
        lost = len(expected) - len(delivered)
        if lost:
            if both_meshwire:
                raise AssertionError(f"relay restart: {lost} of {len(expected)} messages lost between meshwire peers")
            cell.known_loss = lost
            who = [k for k in (cell.sender, cell.receiver) if k not in MESHWIRE_RUNTIMES]
            cell.notes.append(
                f"relay restart: {lost}/{len(expected)} lost ({', '.join(who)}: no end-to-end receipts;"
                f" the relay keeps stored messages in memory and lost them in the restart"
                f"{'; sends while the relay was down failed: ' + str(send_errors) if send_errors else ''})"
            )
    except Exception as e:  # noqa: BLE001 - every failure is reported in the table
        cell.status = "fail"
        cell.notes.append(str(e))
        log(f"  FAIL {cell.sender}->{cell.receiver} on {relay.name}: {e}")
    finally:
        await sender.stop()
        await receiver.stop()
        cell.seconds = round(time.monotonic() - started, 1)
    return cell


async def run_figures(kinds, relay: Relay, pair: tuple[str, str], count: int, paced: int, durable: bool = True) -> dict:
    s_kind, r_kind = kinds[pair[0]], kinds[pair[1]]
    sender, receiver = Peer(s_kind, f"fig-{pair[0]}-send"), Peer(r_kind, f"fig-{pair[1]}-recv")
    try:
        await sender.start()
        await receiver.start()
        for peer, role in ((sender, "s"), (receiver, "r")):
            seed = hashlib.sha256(f"figures/{role}/{time.time_ns()}".encode()).hexdigest()
            # Durable: meshwire peers commit every message to their SQLite
            # store (the reference agents keep state in memory only).
            # `durable=False`: the same meshwire peers with state in memory,
            # for the cost of durability in the same run.
            store = {"state_dir": tempfile.mkdtemp(prefix=f"meshwire-figures-{role}-")} if durable else {}
            peer.did = (await peer.call(cmd="connect", relay=relay.relay_url, registry=relay.registry_url,
                                        name=f"fig-{role}", seed=seed, **store))["did"]
        await sender.call(cmd="send", to=receiver.did, payload={"warmup": True})
        await receiver.call(cmd="recv", count=1, timeout_ms=10000)
        # CPU used during the burst, in cores (CPU seconds per second of
        # the burst): which process sets the rate.
        pids = {"relay": relay.relay.proc.pid if relay.relay.proc else None,
                "sender": sender.proc.pid if sender.proc else None,
                "receiver": receiver.proc.pid if receiver.proc else None}
        cpu_before = {k: cpu_seconds(pid) for k, pid in pids.items()}
        burst_started = time.monotonic()
        await sender.call(cmd="send_many", to=receiver.did, count=count, payload_bytes=256, interval_ms=0, timeout=300)
        got = (await receiver.call(cmd="recv", count=count, timeout_ms=120000, timeout=300))["messages"]
        burst = max(time.monotonic() - burst_started, 1e-9)
        # And per message delivered: one core's worth of a process's
        # microseconds per message is the rate it can carry at most.
        cores, us_per_msg = {}, {}
        for k, pid in pids.items():
            after = cpu_seconds(pid)
            if after is not None and cpu_before[k] is not None:
                cores[k] = round((after - cpu_before[k]) / burst, 2)
                if got:
                    us_per_msg[k] = round((after - cpu_before[k]) * 1e6 / len(got), 1)
        throughput, burst_shape = None, {}
        if got:
            first_sent = min(m["payload"]["t_us"] for m in got)
            last_recv = max(m["t_us"] for m in got)
            throughput = round(len(got) / max((last_recv - first_sent) / 1e6, 1e-9), 1)
            # Where the time went: until the first message arrived, and the
            # rate over the second half of the burst (steady state).
            arrivals = sorted(m["t_us"] for m in got)
            half = arrivals[len(arrivals) // 2:]
            burst_shape = {"first_ms": round((arrivals[0] - first_sent) / 1000, 1),
                           "second_half_msg_per_s": round(len(half) / max((half[-1] - half[0]) / 1e6, 1e-9), 1)
                           if len(half) > 1 else None}
        await sender.call(cmd="send_many", to=receiver.did, count=paced, payload_bytes=256, interval_ms=20, timeout=300)
        got_paced = (await receiver.call(cmd="recv", count=paced, timeout_ms=60000, timeout=300))["messages"]
        # One-way latency: from the payload's creation, before the send
        # call, to the plaintext's hand-over to the application. Every
        # peer stamps `t_us` there. A peer that also reports `t_frame_us`
        # (the AGT agent: the frame leaving the socket, before parsing and
        # decryption) gets that latency reported beside it.
        def percentiles(key: str) -> dict:
            lat = sorted((m[key] - m["payload"]["t_us"]) / 1000.0 for m in got_paced if key in m)
            pct = lambda p: round(lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))], 3) if lat else None
            return {"p50": pct(50), "p99": pct(99)}
        handed, frame = percentiles("t_us"), percentiles("t_frame_us")
        result = {"relay": relay.name, "sender": pair[0], "receiver": pair[1], "durable": durable, "messages": len(got), "of": count,
                  "messages_per_s": throughput, "latency_ms_p50": handed["p50"], "latency_ms_p99": handed["p99"],
                  "paced": len(got_paced), "burst_cores": cores,
                  "burst_cpu_us_per_msg": us_per_msg, "burst_shape": burst_shape}
        if frame["p99"] is not None:
            result["frame_arrival_latency_ms_p50"] = frame["p50"]
            result["frame_arrival_latency_ms_p99"] = frame["p99"]
        return result
    except Exception as e:  # noqa: BLE001
        return {"relay": relay.name, "sender": pair[0], "receiver": pair[1], "error": str(e)}
    finally:
        await sender.stop()
        await receiver.stop()


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def print_ratios(figures: list[dict]) -> None:
    """meshwire rust -> rust against the reference agents (agt-python ->
    agt-python on the AGT relay), each round against that round's
    reference; with several rounds, also the medians."""
    rounds = sorted({f.get("round", 1) for f in figures})
    rows: dict[tuple, list] = {}  # (relay, kind) -> [(ratio, p99, base p99)]
    for r in rounds:
        base = next((f for f in figures if f.get("round", 1) == r and f["relay"] == "agt"
                     and f["sender"] == f["receiver"] == "agt-python" and f.get("messages_per_s")), None)
        if not base:
            continue
        print(f"\nround {r}: against agt-python -> agt-python on the AGT relay ({base['messages_per_s']} msg/s,"
              f" p99 {base['latency_ms_p99']} ms):")
        if base.get("frame_arrival_latency_ms_p99") is not None:
            print(f"  (its latency to the frame's arrival, before decryption: p50 {base['frame_arrival_latency_ms_p50']} ms,"
                  f" p99 {base['frame_arrival_latency_ms_p99']} ms)")
        for f in figures:
            if f.get("round", 1) == r and f["sender"] == f["receiver"] == "rust" and f.get("messages_per_s"):
                kind = "durable" if f.get("durable", True) else "memory"
                ratio = f["messages_per_s"] / base["messages_per_s"]
                rows.setdefault((f["relay"], kind), []).append((ratio, f["latency_ms_p99"], base["latency_ms_p99"]))
                print(f"  rust -> rust on {f['relay']:10} {kind:8} {ratio:.2f}x msg/s,"
                      f" p99 {f['latency_ms_p99']} ms ({'at or below' if f['latency_ms_p99'] <= base['latency_ms_p99'] else 'above'})")
    if len(rounds) > 1 and rows:
        print(f"\nmedians over {len(rounds)} rounds (each ratio against its own round's reference):")
        base_p99 = median([f["latency_ms_p99"] for f in figures if f["relay"] == "agt"
                           and f["sender"] == f["receiver"] == "agt-python" and f.get("messages_per_s")])
        for (relay, kind), values in rows.items():
            p99 = median([v[1] for v in values])
            met = sum(1 for v in values if v[1] <= v[2])
            print(f"  rust -> rust on {relay:10} {kind:8} {median([v[0] for v in values]):.2f}x msg/s"
                  f" (rounds: {', '.join(f'{v[0]:.2f}' for v in values)}); p99 {p99} ms against {base_p99} ms,"
                  f" at or below in {met} of {len(values)} rounds")


def find_python(venv: Path) -> str:
    return str(venv / "bin" / "python")


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="rust,wheel,node,agt-python")
    ap.add_argument("--relays", default="agt,embedded")
    ap.add_argument("--meshwire-bin", default=os.environ.get("MESHWIRE_BIN", str(REPO / "target/debug/meshwire")))
    ap.add_argument("--agt-venv", default=os.environ.get("AGT_VENV", str(REPO / "target/agt-venv")))
    ap.add_argument("--wheel-venv", default=os.environ.get("MESHWIRE_WHEEL_VENV", str(REPO / "target/py-ci-venv")))
    ap.add_argument("--json", default=str(REPO / "target/interop/results.json"))
    ap.add_argument("--figures", action="store_true", help="also measure throughput and latency")
    ap.add_argument("--skip-matrix", action="store_true", help="with --figures: measure only")
    ap.add_argument("--figure-messages", type=int, default=2000,
                    help="back-to-back messages per pair for the throughput figures (the paced latency run "
                         "follows them: with 10,000, the write-back of the durable stores' burst slowed it)")
    ap.add_argument("--figure-paced", type=int, default=1000,
                    help="paced messages per pair for the latency figures (50 msg/s; p99 of 1,000 is the 10th worst, "
                         "steadier than of 200)")
    ap.add_argument("--figure-rounds", type=int, default=1,
                    help="with --figures: measure every pair this many times, in alternating order (odd rounds "
                         "reversed), and report the median of each figure and of each round's ratios")
    ap.add_argument("--figure-pairs", default="",
                    help="with --figures: only these sender:receiver pairs, comma-separated "
                         "(e.g. rust:rust,agt-python:agt-python); default every pair of --peers")
    ap.add_argument("--figure-memory", action="store_true",
                    help="with --figures: also measure the meshwire pairs with state in memory (the cost of durability)")
    args = ap.parse_args()

    wanted = [p for p in args.peers.split(",") if p]
    kinds = {
        "rust": PeerKind("rust", [args.meshwire_bin, "interop-peer"]),
        "wheel": PeerKind("wheel", [find_python(Path(args.wheel_venv)), str(REPO / "interop/peers/wheel_peer.py")]),
        "node": PeerKind("node", ["node", str(REPO / "interop/node/peer.mjs")], needs_unauthenticated_relay=True,
                         dialects=("legacy-ff-salt",)),
        "agt-python": PeerKind("agt-python", [find_python(Path(args.agt_venv)), str(REPO / "interop/python/agt_peer.py")],
                               dialects=("spec",)),
    }
    unknown = [p for p in wanted if p not in kinds]
    if unknown:
        log(f"unknown peers: {unknown}")
        return 2
    missing = []
    for name in wanted:
        exe = kinds[name].argv[0]
        if not (shutil.which(exe) or Path(exe).exists()):
            missing.append(f"{name} ({exe})")
    if missing:
        log("peer runtimes not available: " + ", ".join(missing))
        return 2

    agt_python = find_python(Path(args.agt_venv))
    services: list[Service] = []
    relays: list[Relay] = []
    relay_names = [r for r in args.relays.split(",") if r]
    if "agt" in relay_names:
        reg_port = free_port()
        registry = Service("agt-registry", [agt_python, "-m", "agentmesh.registry", "--host", "127.0.0.1", "--port", str(reg_port), "--log-level", "warning"], reg_port)
        services.append(registry)
        p1, p2 = free_port(), free_port()
        strict = Service("agt-relay", [agt_python, "-m", "agentmesh.relay", "--host", "127.0.0.1", "--port", str(p1), "--log-level", "warning"], p1)
        compat = Service("agt-relay-unauthed", [agt_python, "-m", "agentmesh.relay", "--host", "127.0.0.1", "--port", str(p2), "--log-level", "warning"], p2,
                         env={"AGENTMESH_RELAY_ALLOW_UNAUTHED_DID": "1"})
        services += [strict, compat]
        relays.append(Relay("agt", strict, f"http://127.0.0.1:{reg_port}", False))
        relays.append(Relay("agt-unauthed", compat, f"http://127.0.0.1:{reg_port}", True))
    if "embedded" in relay_names:
        reg_port = free_port()
        registry = Service("embedded-registry", [args.meshwire_bin, "serve", "--memory", "--listen", f"127.0.0.1:{reg_port}", "--legacy-registration"], reg_port)
        services.append(registry)
        p1, p2 = free_port(), free_port()
        strict = Service("embedded-relay", [args.meshwire_bin, "serve", "--memory", "--listen", f"127.0.0.1:{p1}"], p1)
        compat = Service("embedded-relay-compat", [args.meshwire_bin, "serve", "--memory", "--listen", f"127.0.0.1:{p2}", "--allow-unauthenticated-did"], p2)
        services += [strict, compat]
        relays.append(Relay("embedded", strict, f"http://127.0.0.1:{reg_port}", False))
        relays.append(Relay("embedded-compat", compat, f"http://127.0.0.1:{reg_port}", True))

    cells: list[Cell] = []
    figures: list[dict] = []
    try:
        for s in services:
            await s.start()
        seq = 0
        for sender in ([] if args.skip_matrix else wanted):
            for receiver in wanted:
                for relay in relays:
                    cell = Cell(sender, receiver, relay.name)
                    legacy_peer = kinds[sender].needs_unauthenticated_relay or kinds[receiver].needs_unauthenticated_relay
                    common = set(kinds[sender].dialects) & set(kinds[receiver].dialects)
                    if not common:
                        cell.status = "n/a"
                        cell.notes.append(
                            f"no common X3DH KDF: {sender} speaks {'/'.join(kinds[sender].dialects)},"
                            f" {receiver} speaks {'/'.join(kinds[receiver].dialects)}"
                        )
                    elif legacy_peer and not relay.allows_unauthenticated:
                        cell.status = "n/a"
                        cell.notes.append("npm SDK 4.0.0 connects without proof of possession; this relay requires it")
                    elif not legacy_peer and relay.allows_unauthenticated:
                        cell.status = "n/a"
                        cell.notes.append("unauthenticated-DID relay is only for pairs with the npm 4.0.0 peer; this pair runs on the strict relay")
                    else:
                        seq += 1
                        log(f"[{seq}] {sender} -> {receiver} on {relay.name}")
                        await run_cell(cell, kinds, relay, seq)
                    cells.append(cell)
        if args.figures:
            only_pairs = {tuple(p.split(":", 1)) for p in args.figure_pairs.split(",") if ":" in p}
            plan = []  # (relay, sender, receiver, durable)
            for relay in relays:
                for sender in wanted:
                    for receiver in wanted:
                        legacy_peer = kinds[sender].needs_unauthenticated_relay or kinds[receiver].needs_unauthenticated_relay
                        if legacy_peer != relay.allows_unauthenticated:
                            continue
                        if not set(kinds[sender].dialects) & set(kinds[receiver].dialects):
                            continue
                        if only_pairs and (sender, receiver) not in only_pairs:
                            continue
                        plan.append((relay, sender, receiver, True))
                        if args.figure_memory and "rust" in (sender, receiver):
                            plan.append((relay, sender, receiver, False))
            for round_ in range(max(1, args.figure_rounds)):
                # Alternating order: a pair measured first in one round is
                # measured last in the next, so neither drift of the machine
                # nor a relay's warm-up favours one pair.
                for relay, sender, receiver, durable in (plan if round_ % 2 == 0 else plan[::-1]):
                    log(f"figures: round {round_ + 1}: {sender} -> {receiver} on {relay.name}"
                        f"{'' if durable else ', state in memory'}")
                    f = await run_figures(kinds, relay, (sender, receiver), args.figure_messages, args.figure_paced,
                                          durable=durable)
                    f["round"] = round_ + 1
                    figures.append(f)
    finally:
        for s in services:
            s.stop()

    # The table: rows are pairs, columns relays.
    columns = [r.name for r in relays]
    pairs = []
    for c in cells:
        if (c.sender, c.receiver) not in pairs:
            pairs.append((c.sender, c.receiver))
    width = max((len(f"{s} -> {r}") for s, r in pairs), default=4) + 2
    if pairs:
        print("pair".ljust(width) + "".join(col.ljust(26) for col in columns))
    for s, r in pairs:
        row = f"{s} -> {r}".ljust(width)
        for col in columns:
            cell = next(c for c in cells if (c.sender, c.receiver, c.relay) == (s, r, col))
            row += cell.text().ljust(26)
        print(row)
    notes = [(c, n) for c in cells for n in c.notes if c.status != "n/a"]
    if notes:
        print("\nnotes:")
        for c, n in notes:
            print(f"  {c.sender} -> {c.receiver} on {c.relay}: {n}")
    na_reasons = sorted({n for c in cells if c.status == "n/a" for n in c.notes})
    if na_reasons:
        print("\nnot applicable:")
        for n in na_reasons:
            print(f"  - {n}")
    if figures:
        print("\nfigures (256-byte payloads; throughput back to back, latency paced at 50 msg/s):")
        print(f"{'relay':18}{'pair':46}{'msg/s':>10}{'p50 ms':>10}{'p99 ms':>10}"
              "   CPU us/msg in the burst: relay / sender / receiver")
        several_rounds = any(f.get("round", 1) > 1 for f in figures)
        for f in figures:
            pair = f['sender'] + ' -> ' + f['receiver'] + ('' if f.get('durable', True) else ' (memory)')
            if several_rounds:
                pair += f" [round {f.get('round', 1)}]"
            if "error" in f:
                print(f"{f['relay']:18}{pair:46}  error: {f['error']}")
            else:
                cpu = f.get("burst_cpu_us_per_msg", {})
                print(f"{f['relay']:18}{pair:46}{str(f['messages_per_s']):>10}"
                      f"{str(f['latency_ms_p50']):>10}{str(f['latency_ms_p99']):>10}"
                      f"   {cpu.get('relay', '-')} / {cpu.get('sender', '-')} / {cpu.get('receiver', '-')}")
        print_ratios(figures)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"columns": columns, "cells": [c.__dict__ for c in cells], "figures": figures}, indent=2))
    passed = sum(1 for c in cells if c.status == "pass")
    failed = sum(1 for c in cells if c.status == "fail")
    na = sum(1 for c in cells if c.status == "n/a")
    print(f"\ntable written to {out}; {na} cells not applicable")
    if cells:
        print(f"{passed} passed, {failed} failed")
    failed_figures = sum(1 for f in figures if "error" in f)
    return 1 if failed or failed_figures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
