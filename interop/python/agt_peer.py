#!/usr/bin/env python3
"""AGT Python interop peer: a thin mesh client on top of `agentmesh` 5.0.0.

The reference package (PyPI agent-governance-toolkit-core==5.0.0) ships the
crypto (X3DHKeyManager, SecureChannel, DoubleRatchet) but no mesh client.
This file is meshwire's own client around it: registry calls over HTTP,
relay frames over `websockets`, with the frame texts of the TypeScript
client (see /work/shared/vectors/SCHEMA.md, kind mesh-session). All X3DH and
Double Ratchet work is done by the package.

It is driven by the line protocol of interop/PROTOCOL.md: one JSON request
per line on stdin, one JSON response per line on stdout. Logs go to stderr.

Run with the venv python of interop/python/setup_venv.sh:

    $(interop/python/setup_venv.sh)/bin/python interop/python/agt_peer.py

Environment: AGT_PEER_LOG=debug|info|warning (default info).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import copy
import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from datetime import datetime, timezone
from typing import Any

from nacl.signing import SigningKey

# Importing agentmesh 5.0.0 pulls in its sibling packages, which warn that
# they ("agentmesh-platform", "agent-hypervisor", ...) are deprecated in
# favour of agent-governance-toolkit-core, the distribution they come from.
warnings.filterwarnings("ignore", message=r".* is deprecated", category=DeprecationWarning)

from agentmesh.encryption.channel import ChannelEstablishment, SecureChannel
from agentmesh.encryption.ratchet import EncryptedMessage, MessageHeader
from agentmesh.encryption.x3dh import PreKeyBundle, X3DHKeyManager

try:  # websockets >= 13
    from websockets.asyncio.client import connect as ws_connect
except ImportError:  # pragma: no cover - older websockets
    from websockets import connect as ws_connect  # type: ignore[no-redef]
from websockets.exceptions import ConnectionClosed

RUNTIME = "agentmesh-python 5.0.0 (meshwire interop peer)"
FRAME_VERSION = 1
# Back-to-back sends yield to the writer after this many messages (set by
# AGT_PEER_SEND_YIELD_EVERY; the figures use the fastest, see interop/README.md).
_SEND_YIELD_RAW = os.environ.get("AGT_PEER_SEND_YIELD_EVERY", "16")
if not _SEND_YIELD_RAW.isdigit() or int(_SEND_YIELD_RAW) < 1:
    sys.exit(f"AGT_PEER_SEND_YIELD_EVERY must be a positive integer, not {_SEND_YIELD_RAW[:40]!r}")
SEND_YIELD_EVERY = int(_SEND_YIELD_RAW)
ONE_TIME_KEYS = 20
HEARTBEAT_S = 25.0
RECONNECT_BASE_S = 1.0
RECONNECT_MAX_S = 10.0
JOIN_TIMEOUT_S = 10.0
JOIN_GRACE_S = 0.3  # wait this long for the relay's first answer after connect
HTTP_TIMEOUT_S = 10.0
PRE_KNOCK_PER_PEER = 5  # TypeScript: 5 messages per peer ...
PRE_KNOCK_TTL_S = 3.0  # ... kept for 3 s while the KNOCK is outstanding
PRE_KNOCK_MAX_PEERS = 100
OLD_SESSIONS_KEPT = 3  # replaced sessions still tried for decryption
SEEN_IDS_KEPT = 65536
MAX_FRAME_BYTES = 16 * 1024 * 1024
# Ack consumed knock / knock_accept / knock_reject frames by id (TypeScript
# does not): relays that store them for offline agents (the AGT relay keeps a
# frame until its id is acked) would otherwise redeliver them on every connect.
ACK_KNOCK_FRAMES = os.environ.get("AGT_PEER_ACK_KNOCKS", "1") != "0"

log = logging.getLogger("agt_peer")


# ---------------------------------------------------------------------------
# Encodings


def b64std(data: bytes) -> str:
    """Standard base64 with padding (relay frames)."""
    return base64.b64encode(data).decode("ascii")


def b64url(data: bytes) -> str:
    """base64url without padding (registry bodies, Authorization)."""
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def b64any(text: Any) -> bytes:
    """Decode standard or URL-safe base64, padding optional."""
    if not isinstance(text, str):
        raise ValueError(f"expected a base64 string, got {type(text).__name__}")
    s = "".join(text.split()).rstrip("=").replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except binascii.Error as e:
        raise ValueError(f"invalid base64: {e}") from None


def iso_now() -> str:
    """`new Date().toISOString()`: UTC, milliseconds, `Z`."""
    ms = time.time_ns() // 1_000_000
    dt = datetime.fromtimestamp(ms // 1000, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + ".%03dZ" % (ms % 1000)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_ARRAY_INDEX = re.compile(r"^(?:0|[1-9][0-9]*)$")


def _js_string(s: str) -> str:
    # With ensure_ascii=False, json.dumps escapes exactly what JSON.stringify
    # escapes (", \\, control characters, lowercase \u00xx) except lone
    # surrogates, which it leaves raw and JSON.stringify writes as \udxxx.
    text = json.dumps(s, ensure_ascii=False)
    return _LONE_SURROGATE.sub(lambda m: "\\u%04x" % ord(m.group()), text)


def _js_number(x: Any) -> str:
    """Number formatting of JSON.stringify (ECMAScript Number::toString)."""
    if isinstance(x, int):
        return str(x)  # exact, also beyond 2^53 (Python keeps the sender's integer)
    if not math.isfinite(x):
        return "null"
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    r = repr(abs(x))  # shortest round-trip digits, like ECMAScript
    mant, _, exp = r.partition("e")
    ip, _, fp = mant.partition(".")
    if fp == "0":
        fp = ""
    s = ip + fp
    zeros = len(s) - len(s.lstrip("0"))
    digits = s[zeros:].rstrip("0")
    n = len(ip) + (int(exp) if exp else 0) - zeros  # value = 0.digits * 10^n
    k = len(digits)
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        out = digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("+" if e >= 0 else "-") + str(abs(e))
    return sign + out


def _js_keys(d: dict) -> list:
    # JavaScript objects list array-index keys first, ascending, then the
    # other keys in insertion order.
    idx = [k for k in d if isinstance(k, str) and _ARRAY_INDEX.match(k) and int(k) < 4294967295]
    if not idx:
        return list(d)
    idx_set = set(idx)
    return sorted(idx, key=int) + [k for k in d if k not in idx_set]


def js_json(value: Any) -> str:
    """Compact JSON text as `JSON.stringify` writes it (raw non-ASCII)."""
    parts: list[str] = []

    def emit(v: Any) -> None:
        if v is None:
            parts.append("null")
        elif v is True:
            parts.append("true")
        elif v is False:
            parts.append("false")
        elif isinstance(v, (int, float)):
            parts.append(_js_number(v))
        elif isinstance(v, str):
            parts.append(_js_string(v))
        elif isinstance(v, (list, tuple)):
            parts.append("[")
            for i, item in enumerate(v):
                if i:
                    parts.append(",")
                emit(item)
            parts.append("]")
        elif isinstance(v, dict):
            parts.append("{")
            for i, key in enumerate(_js_keys(v)):
                if i:
                    parts.append(",")
                parts.append(_js_string(str(key)))
                parts.append(":")
                emit(v[key])
            parts.append("}")
        else:
            raise TypeError(f"cannot serialize {type(v).__name__}")

    emit(value)
    return "".join(parts)


def frame_text(**fields: Any) -> str:
    """A frame, fields in the given order (the TypeScript order)."""
    return js_json(fields)


# ---------------------------------------------------------------------------
# Identity and registry


class Identity:
    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("seed must be 32 bytes (64 hex characters)")
        self.signing_key = SigningKey(seed)
        self.public = bytes(self.signing_key.verify_key)
        self.did = "did:mesh:" + hashlib.sha256(self.public).hexdigest()[:32]
        self.km = X3DHKeyManager.from_ed25519_keys(seed + self.public, self.public)

    def sign(self, data: bytes) -> bytes:
        return self.signing_key.sign(data).signature

    def authorization(self) -> str:
        ts = iso_now()
        return f"Ed25519-Timestamp {self.did} {ts} {b64url(self.sign(ts.encode()))}"


class HttpError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


def http(method: str, url: str, body: str | None, headers: dict[str, str]) -> tuple[int, str]:
    """Blocking HTTP request (run in a thread). Raises HttpError on >= 400."""
    data = body.encode("utf-8") if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        raise HttpError(e.code, e.read().decode("utf-8", "replace")) from None


def agent_url(registry: str, did: str, suffix: str = "") -> str:
    return f"{registry}/v1/agents/{urllib.parse.quote(did, safe='')}{suffix}"


# ---------------------------------------------------------------------------
# Sessions


class PeerSessions:
    """The channel used with one peer, plus replaced ones kept for decryption."""

    def __init__(self, channel: SecureChannel) -> None:
        self.current = channel
        self.old: list[SecureChannel] = []

    def install(self, channel: SecureChannel) -> None:
        self.old.insert(0, self.current)
        del self.old[OLD_SESSIONS_KEPT:]
        self.current = channel

    def decrypt(self, message: EncryptedMessage) -> bytes:
        """Decrypt with the current channel, then the replaced ones.

        The package's ratchet advances its state before the AEAD check, so
        each attempt runs on a copy that replaces the original only on success.
        """
        errors = []
        for i, channel in enumerate([self.current, *self.old]):
            trial = copy.deepcopy(channel)
            try:
                plaintext = trial.receive(message)
            except Exception as e:  # noqa: BLE001 - any failure: try the next one
                errors.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                continue
            if i == 0:
                self.current = trial
            else:
                self.old[i - 1] = trial
            return plaintext
        raise ValueError("; ".join(errors))


# ---------------------------------------------------------------------------
# The peer


class Peer:
    def __init__(self) -> None:
        self.me: Identity | None = None
        self.relay = ""
        self.registry = ""
        self.name = ""
        self.sessions: dict[str, PeerSessions] = {}
        self.seen: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self.knocks_seen: set[str] = set()
        # peer -> [(monotonic time, t_us, frame)] waiting for a KNOCK
        self.pre_knock: dict[str, list[tuple[float, int, dict]]] = {}
        self.inbox: list[dict] = []
        self.inbox_changed = asyncio.Event()
        self.outbox: collections.deque[str] = collections.deque()
        self.outbox_changed = asyncio.Event()
        self.ws = None
        self.want_connected = False
        self.conn_task: asyncio.Task | None = None
        self.join_waiter: asyncio.Future | None = None
        self._last_error: str | None = None  # detail of the last relay error frame
        self.sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    # -- helpers --------------------------------------------------------

    def _require(self) -> Identity:
        if self.me is None:
            raise RuntimeError("not connected: send connect first")
        return self.me

    def transmit(self, text: str) -> None:
        """Queue a frame for the relay; sent now or after the next (re)connect."""
        self.outbox.append(text)
        self.outbox_changed.set()

    def _ack(self, frame_id: str) -> None:
        self.transmit(frame_text(v=FRAME_VERSION, type="ack", id=frame_id))

    # -- commands -------------------------------------------------------

    async def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "hello":
            return {"runtime": RUNTIME, "features": []}
        if cmd == "connect":
            return await self.cmd_connect(req)
        if cmd == "send":
            return await self.cmd_send(req)
        if cmd == "send_many":
            return await self.cmd_send_many(req)
        if cmd == "recv":
            return await self.cmd_recv(req)
        if cmd == "drain":
            messages, self.inbox = self.inbox, []
            return {"messages": messages}
        if cmd == "disconnect":
            self._require()
            await self.leave()
            return {}
        if cmd == "reconnect":
            self._require()
            await self.join()
            return {}
        if cmd == "close":
            await self.leave()
            return {}
        raise ValueError(f"unknown cmd {cmd!r}")

    async def cmd_connect(self, req: dict) -> dict:
        if self.me is not None:
            raise RuntimeError("already connected (one identity per process)")
        for field in ("relay", "registry", "name", "seed"):
            if not isinstance(req.get(field), str):
                raise ValueError(f"missing string field {field!r}")
        me = Identity(bytes.fromhex(req["seed"]))
        self.relay = req["relay"].rstrip("/")
        self.registry = req["registry"].rstrip("/")
        self.name = req["name"]
        if req.get("state_dir"):
            log.info("state_dir given: this peer keeps state in memory only")
        await asyncio.to_thread(self._register, me)
        me.km.generate_signed_pre_key()
        me.km.generate_one_time_pre_keys(ONE_TIME_KEYS)
        await asyncio.to_thread(self._upload_prekeys, me)
        self.me = me
        try:
            await self.join()
        except Exception:
            self.me = None
            raise
        return {"did": me.did}

    def _register(self, me: Identity) -> None:
        ts = iso_now()
        public_key = b64url(me.public)
        body = js_json(
            {
                "public_key": public_key,
                "proof": b64url(me.sign((public_key + ts).encode("utf-8"))),
                "proof_timestamp": ts,
                "capabilities": [self.name],
                "metadata": {"display_name": self.name, "agentmesh_kdf": "spec"},
            }
        )
        headers = {"content-type": "application/json", "authorization": me.authorization()}
        try:
            status, _ = http("POST", f"{self.registry}/v1/agents", body, headers)
            log.info("registered %s (HTTP %d)", me.did, status)
        except HttpError as e:
            if e.status != 409:
                raise RuntimeError(f"registration failed: {e}") from None
            log.info("%s already registered (HTTP 409)", me.did)

    def _upload_prekeys(self, me: Identity) -> None:
        km = me.km
        spk = km.signed_pre_key
        assert spk is not None
        body = js_json(
            {
                "identity_key": b64url(km.identity_key.public_key),
                "identity_key_ed": b64url(me.public),
                "signed_pre_key": {
                    "key_id": spk.key_id,
                    "public_key": b64url(spk.key_pair.public_key),
                    "signature": b64url(spk.signature),
                },
                "one_time_pre_keys": [
                    {"key_id": k.key_id, "public_key": b64url(k.key_pair.public_key)}
                    for k in km.one_time_pre_keys.values()
                ],
            }
        )
        headers = {"content-type": "application/json", "authorization": me.authorization()}
        try:
            http("PUT", agent_url(self.registry, me.did, "/prekeys"), body, headers)
        except HttpError as e:
            raise RuntimeError(f"pre-key upload failed: {e}") from None
        log.info("uploaded signed pre-key %d and %d one-time pre-keys", spk.key_id, len(km.one_time_pre_keys))

    def _fetch_bundle(self, me: Identity, peer: str) -> PreKeyBundle:
        try:
            _, text = http("GET", agent_url(self.registry, peer, "/prekeys"), None, {"authorization": me.authorization()})
        except HttpError as e:
            raise RuntimeError(f"pre-key bundle of {peer}: {e}") from None
        b = json.loads(text)
        spk = b["signed_pre_key"]
        otk = b.get("one_time_pre_key")
        ed = b.get("identity_key_ed")
        return PreKeyBundle(
            identity_key=b64any(b["identity_key"]),
            identity_key_ed=b64any(ed) if ed else b"",
            signed_pre_key=b64any(spk["public_key"]),
            signed_pre_key_signature=b64any(spk["signature"]),
            signed_pre_key_id=int(spk["key_id"]),
            one_time_pre_key=b64any(otk["public_key"]) if otk else None,
            one_time_pre_key_id=int(otk["key_id"]) if otk else None,
        )

    async def cmd_send(self, req: dict) -> dict:
        to = req.get("to")
        if not isinstance(to, str) or not to:
            raise ValueError("missing string field 'to'")
        if "payload" not in req:
            raise ValueError("missing field 'payload'")
        return {"id": await self.send_payload(to, req["payload"])}

    async def cmd_send_many(self, req: dict) -> dict:
        to, count = req.get("to"), req.get("count")
        size, interval_ms = req.get("payload_bytes", 0), req.get("interval_ms", 0)
        if not isinstance(to, str) or not to:
            raise ValueError("missing string field 'to'")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError("count must be a non-negative integer")
        if not isinstance(size, int) or not isinstance(interval_ms, (int, float)) or interval_ms < 0:
            raise ValueError("payload_bytes must be an integer, interval_ms a non-negative number")
        for i in range(count):
            if i and interval_ms:
                await asyncio.sleep(interval_ms / 1000.0)
            payload = {"seq": i, "t_us": time.time_ns() // 1000, "pad": ""}
            payload["pad"] = "x" * max(0, size - len(js_json(payload).encode("utf-8")))
            await self.send_payload(to, payload)
            if not interval_ms and (i + 1) % SEND_YIELD_EVERY == 0:
                # Back to back: let the writer put these on the wire while
                # the next ones are encrypted (without it, every message
                # was encrypted before the first one left).
                await asyncio.sleep(0)
        return {"sent": count}

    async def send_payload(self, to: str, payload: Any) -> str:
        """Encrypt and queue one message (opening a session if needed); its id."""
        me = self._require()
        plaintext = js_json(payload).encode("utf-8")

        message = None
        sessions = self.sessions.get(to)
        if sessions is not None:
            try:
                message = sessions.current.send(plaintext)
            except RuntimeError as e:
                # An inbound session has no sending chain until the peer's
                # first message arrives: open a session of our own.
                log.info("session with %s cannot send yet (%s): opening a new one", to, e)
        if message is None:
            bundle = await asyncio.to_thread(self._fetch_bundle, me, to)
            channel, est = SecureChannel.create_sender(me.km, bundle, f"{me.did}|{to}".encode("utf-8"))
            self._install(to, channel)
            establishment: dict[str, Any] = {
                "ik": b64std(est.initiator_identity_key),
                "ek": b64std(est.ephemeral_public_key),
            }
            if est.used_one_time_key_id is not None:
                establishment["otk"] = est.used_one_time_key_id
            knock_id = str(uuid.uuid4())
            self.transmit(
                frame_text(
                    v=FRAME_VERSION,
                    type="knock",
                    **{"from": me.did},
                    to=to,
                    id=knock_id,
                    ts=iso_now(),
                    intent={"action": "establish_session"},
                    establishment=establishment,
                )
            )
            log.info("knock %s -> %s (one-time key %s)", knock_id, to, est.used_one_time_key_id)
            message = channel.send(plaintext)

        msg_id = str(uuid.uuid4())
        h = message.header
        self.transmit(
            frame_text(
                v=FRAME_VERSION,
                type="message",
                **{"from": me.did},
                to=to,
                id=msg_id,
                ts=iso_now(),
                header={"dh": b64std(h.dh_public_key), "pn": h.previous_chain_length, "n": h.message_number},
                ciphertext=b64std(message.ciphertext),
            )
        )
        return msg_id

    async def cmd_recv(self, req: dict) -> dict:
        count = req.get("count", 1)
        timeout_ms = req.get("timeout_ms", 10_000)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError("count must be a non-negative integer")
        if not isinstance(timeout_ms, (int, float)) or timeout_ms < 0:
            raise ValueError("timeout_ms must be a non-negative number")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000.0
        while len(self.inbox) < count:
            left = deadline - loop.time()
            if left <= 0:
                break
            self.inbox_changed.clear()
            try:
                await asyncio.wait_for(self.inbox_changed.wait(), left)
            except asyncio.TimeoutError:
                break
        messages, self.inbox = self.inbox[:count], self.inbox[count:]
        return {"messages": messages}

    def _install(self, peer: str, channel: SecureChannel) -> None:
        sessions = self.sessions.get(peer)
        if sessions is None:
            self.sessions[peer] = PeerSessions(channel)
        else:
            sessions.install(channel)

    # -- relay connection -------------------------------------------------

    async def join(self) -> None:
        """Join the relay; returns once the socket is up (or raises)."""
        if self.conn_task is not None and not self.conn_task.done():
            if self.ws is not None:
                return
            await self._stop_connection()
        self.want_connected = True
        waiter = asyncio.get_running_loop().create_future()
        self.join_waiter = waiter
        self.conn_task = asyncio.get_running_loop().create_task(self._connection_loop())
        try:
            await asyncio.wait_for(asyncio.shield(waiter), JOIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self._stop_connection()
            raise RuntimeError(f"could not join the relay {self.relay}/ws within {JOIN_TIMEOUT_S:.0f} s") from None
        except Exception:
            await self._stop_connection()
            raise
        finally:
            self.join_waiter = None

    async def leave(self) -> None:
        """Flush what is queued, send `disconnect`, close; state stays."""
        ws = self.ws
        if ws is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 2.0
            while self.outbox and self.ws is ws and loop.time() < deadline:
                await asyncio.sleep(0.01)
        self.want_connected = False
        if ws is not None and self.me is not None:
            try:
                await ws.send(frame_text(v=FRAME_VERSION, type="disconnect", **{"from": self.me.did}))
            except Exception as e:  # noqa: BLE001
                log.debug("disconnect frame not sent: %s", e)
        await self._stop_connection()

    async def _stop_connection(self) -> None:
        self.want_connected = False
        ws, task = self.ws, self.conn_task
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), 3.0)
            except Exception:  # noqa: BLE001
                pass
        if task is not None and not task.done():
            if ws is None:
                task.cancel()  # connecting or waiting to retry: nothing to wind down
            try:
                await asyncio.wait_for(task, 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()
        self.ws = None
        self.conn_task = None

    def _join_done(self, error: str | None) -> None:
        waiter = self.join_waiter
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(RuntimeError(error))

    async def _connection_loop(self) -> None:
        me = self._require()
        url = f"{self.relay}/ws"
        delay = RECONNECT_BASE_S
        refused = False
        while self.want_connected and not refused:
            try:
                ws = await ws_connect(url, max_size=MAX_FRAME_BYTES, open_timeout=10)
            except Exception as e:  # noqa: BLE001
                log.warning("relay %s: cannot connect (%s); retrying in %.0f s", url, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            ts = iso_now()
            connect = frame_text(
                v=FRAME_VERSION,
                type="connect",
                **{"from": me.did},
                public_key=b64std(me.public),
                timestamp=ts,
                signature=b64std(me.sign(ts.encode("utf-8"))),
            )
            first = asyncio.Event()
            state = {"error": None}
            reader = asyncio.create_task(self._reader(ws, first, state))
            writer = heartbeat = None
            try:
                await ws.send(connect)
                await ws.send(frame_text(v=FRAME_VERSION, type="fetch_pending", **{"from": me.did}))
                # The relay says nothing when it accepts a connect; give it a
                # moment to answer (the AGT relay answers fetch_pending with an
                # error frame, after the connection is registered) or to refuse.
                try:
                    await asyncio.wait_for(first.wait(), JOIN_GRACE_S)
                except asyncio.TimeoutError:
                    pass
                if state["error"] is not None:
                    await asyncio.wait({reader}, timeout=JOIN_GRACE_S)
                if reader.done():
                    raise ConnectionError(state["error"] or "closed by the relay")
                self.ws = ws
                delay = RECONNECT_BASE_S
                log.info("joined relay %s as %s", url, me.did)
                self._join_done(None)
                writer = asyncio.create_task(self._writer(ws))
                heartbeat = asyncio.create_task(self._heartbeat(me))
                await reader
            except Exception as e:  # noqa: BLE001
                code, reason = ws.close_code, ws.close_reason
                log.warning("relay %s: connection failed: %s (close %s %r)", url, e, code, reason)
                if code is not None and 4000 <= code < 5000:
                    # A policy refusal (bad proof, auth): not worth retrying blindly.
                    if self.join_waiter is not None and not self.join_waiter.done():
                        self._join_done(f"relay refused the connection: {e} (close {code})")
                        refused = True
            finally:
                for task in (writer, heartbeat):
                    if task is not None:
                        task.cancel()
                if not reader.done():
                    reader.cancel()
                if self.ws is ws:
                    self.ws = None
                try:
                    await ws.close()
                except Exception:  # noqa: BLE001
                    pass
            code, reason = ws.close_code, ws.close_reason
            if not self.want_connected:
                break
            if refused:
                break  # the join failed for good
            if reason == "session_replaced":
                log.warning("relay closed this connection: session_replaced (another client took our DID); not reconnecting")
                self.want_connected = False
                break
            log.info("relay connection lost (close %s %r); reconnecting in %.0f s", code, reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _reader(self, ws, first: asyncio.Event, state: dict) -> None:
        try:
            async for raw in ws:
                t_us = time.time_ns() // 1000
                if isinstance(raw, bytes):
                    raw = raw.decode("utf-8", "replace")
                try:
                    kind = self.on_text(raw, t_us)
                except Exception:  # noqa: BLE001 - a bad frame must not kill the connection
                    log.exception("error handling a relay frame")
                    kind = None
                if kind == "error-fatal":
                    state["error"] = self._last_error
                first.set()
        except ConnectionClosed:
            pass

    async def _writer(self, ws) -> None:
        try:
            while True:
                while self.outbox:
                    text = self.outbox[0]
                    await ws.send(text)  # on failure the frame stays queued
                    if self.outbox and self.outbox[0] is text:
                        self.outbox.popleft()
                self.outbox_changed.clear()
                await self.outbox_changed.wait()
        except ConnectionClosed:
            pass

    async def _heartbeat(self, me: Identity) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self.transmit(frame_text(v=FRAME_VERSION, type="heartbeat", **{"from": me.did}, ts=iso_now()))

    # -- inbound frames -------------------------------------------------

    def on_text(self, raw: str, t_us: int) -> str | None:
        try:
            frame = json.loads(raw)
        except ValueError:
            log.warning("relay sent a frame that is not JSON: %.200r", raw)
            return None
        if not isinstance(frame, dict):
            log.warning("relay sent a frame that is not an object: %.200r", raw)
            return None
        kind = frame.get("type")
        me = self._require()
        if kind in ("message", "knock", "knock_accept", "knock_reject"):
            to = frame.get("to")
            if to is not None and to != me.did:
                log.warning("%s frame addressed to %r, not us: ignored", kind, to)
                return kind
        if kind == "message":
            self.on_message(frame, t_us, time.monotonic())
        elif kind == "knock":
            self.on_knock(frame)
        elif kind == "knock_accept":
            log.info("knock %s accepted by %s", frame.get("knock_id"), frame.get("from"))
            if ACK_KNOCK_FRAMES and isinstance(frame.get("id"), str):
                self._ack(frame["id"])
        elif kind == "knock_reject":
            peer = frame.get("from")
            log.warning("knock %s rejected by %s: %s", frame.get("knock_id"), peer, frame.get("reason"))
            if ACK_KNOCK_FRAMES and isinstance(frame.get("id"), str):
                self._ack(frame["id"])
        elif kind == "error":
            detail = frame.get("detail", frame.get("message"))
            if isinstance(detail, str) and "fetch_pending" in detail:
                log.debug("relay: %s (this relay has no fetch_pending; it delivers stored frames on connect)", detail)
                return kind
            log.warning("relay error frame: %s", detail)
            self._last_error = str(detail)
            return "error-fatal"
        else:
            log.debug("ignored frame of type %r", kind)
        return kind

    def on_knock(self, frame: dict) -> None:
        me = self._require()
        peer, knock_id = frame.get("from"), frame.get("id")
        if not isinstance(peer, str) or not isinstance(knock_id, str):
            log.warning("knock without from/id: ignored")
            return
        if knock_id in self.knocks_seen:
            log.info("knock %s from %s seen before (redelivered): ignored", knock_id, peer)
            if ACK_KNOCK_FRAMES:
                self._ack(knock_id)
            return
        est = frame.get("establishment")
        reject_reason = None
        if isinstance(est, dict):
            try:
                otk = est.get("otk")
                establishment = ChannelEstablishment(
                    initiator_identity_key=b64any(est.get("ik")),
                    ephemeral_public_key=b64any(est.get("ek")),
                    used_one_time_key_id=None if otk is None else int(otk),
                )
                channel = SecureChannel.create_receiver(me.km, establishment, f"{peer}|{me.did}".encode("utf-8"))
            except Exception as e:  # noqa: BLE001
                log.warning("knock %s from %s: cannot establish: %s", knock_id, peer, e)
                reject_reason = "establishment_failed"
            else:
                replaced = peer in self.sessions
                self._install(peer, channel)
                log.info(
                    "knock %s from %s: session %s (one-time key %s, %d left)",
                    knock_id, peer, "replaced" if replaced else "established", otk, len(me.km.one_time_pre_keys),
                )
        else:
            log.info("knock %s from %s without establishment: accepted, no session", knock_id, peer)
        self.knocks_seen.add(knock_id)
        base = {"v": FRAME_VERSION, "type": "knock_reject" if reject_reason else "knock_accept", "from": me.did,
                "to": peer, "id": str(uuid.uuid4()), "knock_id": knock_id}
        if reject_reason:
            base["reason"] = reject_reason
        base["ts"] = iso_now()
        self.transmit(js_json(base))
        if ACK_KNOCK_FRAMES:
            self._ack(knock_id)
        for queued_at, t_us, m in self.pre_knock.pop(peer, []):
            self.on_message(m, t_us, queued_at, replay=True)

    def on_message(self, frame: dict, t_us: int, queued_at: float, replay: bool = False) -> None:
        peer, msg_id = frame.get("from"), frame.get("id")
        if not isinstance(peer, str) or not isinstance(msg_id, str):
            log.warning("message without from/id: ignored")
            return
        key = (peer, msg_id)
        if key in self.seen:
            log.debug("duplicate message %s from %s: acked, dropped", msg_id, peer)
            self._ack(msg_id)
            return
        header, ciphertext = frame.get("header"), frame.get("ciphertext")
        if not isinstance(header, dict) or ciphertext is None or frame.get("plaintext") is True:
            log.warning("message %s from %s is not an encrypted message: dropped", msg_id, peer)
            return
        try:
            message = EncryptedMessage(
                header=MessageHeader(
                    dh_public_key=b64any(header.get("dh")),
                    previous_chain_length=int(header.get("pn", 0)),
                    message_number=int(header.get("n", 0)),
                ),
                ciphertext=b64any(ciphertext),
            )
        except (ValueError, TypeError) as e:
            log.warning("message %s from %s is malformed: %s", msg_id, peer, e)
            return
        sessions = self.sessions.get(peer)
        if sessions is None:
            self._buffer(peer, frame, t_us, queued_at, "no session yet")
            return
        try:
            plaintext = sessions.decrypt(message)
        except ValueError as e:
            # Perhaps a KNOCK replacing the session is still on its way.
            self._buffer(peer, frame, t_us, queued_at, f"decrypt failed: {e}")
            return
        text = plaintext.decode("utf-8", "replace")
        try:
            payload = json.loads(text)
        except ValueError:
            log.warning("message %s from %s is not JSON: delivered as a string", msg_id, peer)
            payload = text
        self.seen[key] = None
        while len(self.seen) > SEEN_IDS_KEPT:
            self.seen.popitem(last=False)
        # `t_us`: when the plaintext reaches the application, as every other
        # interop peer stamps it (after decryption); `t_frame_us`: when the
        # frame came off the socket, before parsing and decryption.
        self.inbox.append({"from": peer, "id": msg_id, "payload": payload,
                           "t_us": time.time_ns() // 1000, "t_frame_us": t_us})
        self.inbox_changed.set()
        self._ack(msg_id)
        if replay:
            log.info("buffered message %s from %s delivered", msg_id, peer)

    def _buffer(self, peer: str, frame: dict, t_us: int, queued_at: float, why: str) -> None:
        if time.monotonic() - queued_at >= PRE_KNOCK_TTL_S:
            log.warning("message %s from %s dropped: %s", frame.get("id"), peer, why)
            return
        queue = self.pre_knock.get(peer)
        if queue is None:
            if len(self.pre_knock) >= PRE_KNOCK_MAX_PEERS:
                log.warning("message %s from %s dropped (%s; too many peers buffered)", frame.get("id"), peer, why)
                return
            queue = self.pre_knock[peer] = []
        if any(m.get("id") == frame.get("id") for _, _, m in queue):
            return
        while len(queue) >= PRE_KNOCK_PER_PEER:
            _, _, old = queue.pop(0)
            log.warning("message %s from %s evicted from the pre-KNOCK buffer", old.get("id"), peer)
        queue.append((queued_at, t_us, frame))
        log.info("message %s from %s buffered (%s)", frame.get("id"), peer, why)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for peer in list(self.pre_knock):
                queue = self.pre_knock[peer]
                while queue and now - queue[0][0] >= PRE_KNOCK_TTL_S:
                    _, _, m = queue.pop(0)
                    log.warning("message %s from %s dropped: no usable session within %.0f s", m.get("id"), peer, PRE_KNOCK_TTL_S)
                if not queue:
                    del self.pre_knock[peer]


# ---------------------------------------------------------------------------
# Line protocol


_PROTO_OUT = None


def write_line(obj: dict) -> None:
    text = js_json(obj)
    # U+2028/U+2029 are valid raw in JSON, but some line readers split on them.
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    _PROTO_OUT.write(text.encode("utf-8") + b"\n")


def claim_stdout() -> None:
    """Keep the real stdout for protocol lines and point fd 1 at stderr, so
    that nothing else (a stray print in a dependency) can ever reach it."""
    global _PROTO_OUT
    sys.stdout.flush()
    _PROTO_OUT = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr


async def main() -> int:
    level = os.environ.get("AGT_PEER_LOG", "info").upper()
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s agt_peer[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()

    def read_stdin() -> None:
        # A thread with readline: no line-length limit (payloads can be large).
        stdin = sys.stdin.buffer
        while True:
            line = stdin.readline()
            loop.call_soon_threadsafe(lines.put_nowait, line if line else None)
            if not line:
                return

    threading.Thread(target=read_stdin, name="stdin", daemon=True).start()
    peer = Peer()
    while True:
        line = await lines.get()
        if line is None:
            break
        if not line.strip():
            continue
        try:
            req = json.loads(line.decode("utf-8", "surrogateescape"))
            if not isinstance(req, dict):
                raise ValueError("request must be a JSON object")
        except ValueError as e:
            write_line({"ok": False, "error": f"bad request: {e}"})
            continue
        try:
            body = await peer.handle(req)
            response = {"ok": True, **body}
        except Exception as e:  # noqa: BLE001 - every failure becomes ok:false
            log.debug("command %r failed", req.get("cmd"), exc_info=True)
            response = {"ok": False, "error": str(e) or type(e).__name__}
        write_line(response)
    log.info("stdin closed: leaving")
    try:
        await asyncio.wait_for(peer.leave(), 5.0)
    except Exception:  # noqa: BLE001
        pass
    return 0


if __name__ == "__main__":
    claim_stdout()
    sys.exit(asyncio.run(main()))
