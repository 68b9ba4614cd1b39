#!/usr/bin/env python3
"""Cross-check `agentmesh-golden/1` vector files against the reference Python
package `agentmesh` (PyPI agent-governance-toolkit-core 5.0.0).

Usage: crosscheck_vectors.py PATH...   (files, or directories searched for *.json)

Recorded randomness is fed to the package by replacing `secrets.token_bytes`.
Files with kdf "legacy-ff-salt" are run with the legacy X3DH KDF patched into
`agentmesh.encryption.x3dh._kdf` (5.0.0 only implements the spec KDF).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import sys
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

warnings.filterwarnings("ignore", category=DeprecationWarning)
logging.getLogger("agentmesh").setLevel(logging.ERROR)

from cryptography.exceptions import InvalidTag  # noqa: E402
from cryptography.hazmat.primitives.hashes import SHA256  # noqa: E402
from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: E402
from nacl.bindings import crypto_scalarmult, crypto_sign_seed_keypair  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

import agentmesh.encryption.x3dh as x3dh_mod  # noqa: E402
from agentmesh.encryption.channel import SecureChannel  # noqa: E402
from agentmesh.encryption.x3dh import X25519KeyPair, X3DHKeyManager  # noqa: E402

SCHEMA = "agentmesh-golden/1"
STATE_FIELDS = ("root_key", "chain_key_send", "chain_key_recv", "dh_self_public",
                "dh_remote_public", "n_send", "n_recv", "pn", "skipped")
# How the package signals each error kind our own vectors may expect.
# Kinds not listed accept any exception.
ERROR_KINDS = {
    "too-many-skipped": lambda e: isinstance(e, RuntimeError) and "Too many skipped" in str(e),
    "bad-tag": lambda e: isinstance(e, InvalidTag),
}


class Mismatch(Exception):
    """A recorded value the reference package does not reproduce."""


def show(v):
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    return json.dumps(v) if isinstance(v, (str, list, dict)) or v is None else repr(v)


def check(field, expected, got):
    if expected == got:
        return
    if isinstance(expected, bytes) and isinstance(got, bytes) and max(len(expected), len(got)) > 64:
        at = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b),
                  min(len(expected), len(got)))
        lo = max(0, at - 8)
        raise Mismatch(f"{field}: first difference at byte {at} "
                       f"(lengths {len(expected)} vs {len(got)}): expected "
                       f"...{expected[lo:at + 8].hex()}..., got ...{got[lo:at + 8].hex()}...")
    raise Mismatch(f"{field}: expected {show(expected)}, got {show(got)}")


def unhex(v, field="value"):
    if not isinstance(v, str):
        raise Mismatch(f"malformed {field}: expected a hex string, got {show(v)}")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise Mismatch(f"malformed {field}: not hex: {v!r}") from None


def hx(b):
    return None if b is None else b.hex()


class RecordedRandomness:
    """Replaces secrets.token_bytes with a queue of recorded values."""

    def __init__(self):
        self.queue = []
        self.stage = "setup"  # named in error messages

    def push(self, *values):
        self.queue.extend(values)

    def draw(self, n=None):
        if not self.queue:
            raise Mismatch(f"{self.stage}: package drew {n} random bytes, "
                           "no recorded value is left")
        value = self.queue.pop(0)
        if len(value) != n:
            raise Mismatch(f"{self.stage}: package drew {n} random bytes, "
                           f"the next recorded value has {len(value)}")
        return value

    def drained(self, where):
        self.stage = where
        if self.queue:
            left = ", ".join(v.hex() for v in self.queue)
            self.queue.clear()
            raise Mismatch(f"{where}: recorded randomness not consumed by the package: {left}")

    def __enter__(self):
        self._saved = secrets.token_bytes
        secrets.token_bytes = self.draw
        return self

    def __exit__(self, *exc):
        secrets.token_bytes = self._saved


def legacy_kdf(ikm: bytes) -> bytes:
    """X3DH KDF of TypeScript SDK 4.0.0 / older Python: salt 0xFF*32, IKM = DH concat."""
    return HKDF(algorithm=SHA256(), length=32, salt=b"\xff" * 32,
                info=b"AgentMesh_X3DH_v1").derive(ikm)


@contextmanager
def kdf_mode(kdf):
    if kdf == "spec":
        yield
        return
    if kdf != "legacy-ff-salt":
        raise Mismatch(f"unknown kdf {kdf!r}")
    saved = x3dh_mod._kdf
    x3dh_mod._kdf = legacy_kdf
    try:
        yield
    finally:
        x3dh_mod._kdf = saved


def key_manager(seed_hex, field):
    seed = unhex(seed_hex, field)
    public, secret = crypto_sign_seed_keypair(seed)  # secret = seed || public
    return X3DHKeyManager.from_ed25519_keys(secret, public)


def x3dh_setup(c, rng):
    """Alice's and Bob's key managers and Bob's bundle, from an x3dh case."""
    alice = key_manager(c["alice_ed25519_seed"], "alice_ed25519_seed")
    bob = key_manager(c["bob_ed25519_seed"], "bob_ed25519_seed")
    bob._next_spk_id = c["bob_spk_id"]
    rng.stage = "signed pre-key generation"
    rng.push(unhex(c["bob_spk_private"], "bob_spk_private"))
    spk = bob.generate_signed_pre_key()
    rng.drained("signed pre-key generation")
    otk = None
    otk_id = c["bob_otk_id"]
    if otk_id is not None:
        bob._next_otk_id = otk_id
        rng.stage = "one-time pre-key generation"
        rng.push(unhex(c["bob_otk_private"], "bob_otk_private"))
        [otk] = bob.generate_one_time_pre_keys(1)
        rng.drained("one-time pre-key generation")
    bundle = bob.get_public_bundle(otk_id)
    check("bundle one_time_pre_key_id", otk_id, bundle.one_time_pre_key_id)
    return alice, bob, spk, otk, bundle


def check_x3dh(c, rng):
    alice, bob, spk, otk, bundle = x3dh_setup(c, rng)
    for who, mgr in (("alice", alice), ("bob", bob)):
        check(f"{who}_ed25519_public", unhex(c[f"{who}_ed25519_public"]), mgr.ed25519_public)
        check(f"{who}_x25519_private", unhex(c[f"{who}_x25519_private"]), mgr.identity_key.private_key)
        check(f"{who}_x25519_public", unhex(c[f"{who}_x25519_public"]), mgr.identity_key.public_key)
    check("bob_spk_id", c["bob_spk_id"], spk.key_id)
    check("bob_spk_public", unhex(c["bob_spk_public"]), spk.key_pair.public_key)
    check("bob_spk_signature", unhex(c["bob_spk_signature"]), spk.signature)
    if otk is None:
        check("bob_otk_public", None, c["bob_otk_public"])
    else:
        check("bob_otk_id", c["bob_otk_id"], otk.key_id)
        check("bob_otk_public", unhex(c["bob_otk_public"]), otk.key_pair.public_key)

    eph = unhex(c["alice_ephemeral_private"], "alice_ephemeral_private")
    rng.stage = "initiate"
    rng.push(eph)
    ra = alice.initiate(bundle)
    rng.drained("initiate")
    rb = bob.respond(alice.identity_key.public_key, ra.ephemeral_public_key, ra.used_one_time_key_id)
    check("used one-time key id", c["bob_otk_id"], ra.used_one_time_key_id)
    check("alice_ephemeral_public", unhex(c["alice_ephemeral_public"]), ra.ephemeral_public_key)
    check("shared_secret (initiator)", unhex(c["shared_secret"]), ra.shared_secret)
    check("shared_secret (responder)", unhex(c["shared_secret"]), rb.shared_secret)
    check("associated_data (initiator)", unhex(c["associated_data"]), ra.associated_data)
    check("associated_data (responder)", unhex(c["associated_data"]), rb.associated_data)

    spk_pub = spk.key_pair.public_key
    dhs = {
        "dh1": crypto_scalarmult(alice.identity_key.private_key, spk_pub),
        "dh2": crypto_scalarmult(eph, bob.identity_key.public_key),
        "dh3": crypto_scalarmult(eph, spk_pub),
        "dh4": crypto_scalarmult(eph, otk.key_pair.public_key) if otk else None,
    }
    for name, got in dhs.items():
        check(name, None if c[name] is None else unhex(c[name], name), got)


def state_view(channel):
    s = channel._ratchet.state
    return {
        "root_key": hx(s.root_key),
        "chain_key_send": hx(s.chain_key_send),
        "chain_key_recv": hx(s.chain_key_recv),
        "dh_self_public": hx(s.dh_self_public),
        "dh_remote_public": hx(s.dh_remote_public),
        "n_send": s.send_message_number,
        "n_recv": s.recv_message_number,
        "pn": s.previous_send_chain_length,
        "skipped": [f"{dh.hex()}:{n}" for (dh, n) in s.skipped_keys],
    }


def check_state(where, expected, channel):
    got = state_view(channel)
    if not isinstance(expected, dict) or set(expected) != set(STATE_FIELDS):
        keys = sorted(expected) if isinstance(expected, dict) else expected
        raise Mismatch(f"{where}: malformed state, fields {show(keys)}")
    for k in STATE_FIELDS:
        check(f"{where}.{k}", expected[k], got[k])


def check_ratchet(c, x, rng):
    """Replay a ratchet conversation; x is the x3dh case named by from_x3dh."""
    for k in ("shared_secret", "bob_spk_private", "bob_spk_public"):
        check(f"{k} (vs from_x3dh case {x['name']!r})", c[k], x[k])
    alice, bob, _, _, bundle = x3dh_setup(x, rng)
    ad = f"{c['alice_did']}|{c['bob_did']}".encode()
    rng.stage = "create_sender"
    rng.push(unhex(x["alice_ephemeral_private"]), unhex(c["alice_ratchet_0_private"]))
    a_ch, establishment = SecureChannel.create_sender(alice, bundle, ad)
    rng.drained("create_sender")
    b_ch = SecureChannel.create_receiver(bob, establishment, ad)
    rng.drained("create_receiver")
    channels = {"alice": a_ch, "bob": b_ch}
    for who, ch in channels.items():
        check(f"associated_data ({who})", unhex(c["associated_data"]), ch._associated_data)
        check_state(f"initial_state.{who}", c["initial_state"][who], ch)
    check("alice_ratchet_0_public", c["alice_ratchet_0_public"],
          hx(a_ch._ratchet.state.dh_self_public))

    sent = {}
    for ev in c["events"]:
        where = rng.stage = f"event {ev['i']}"

        def field(name, ev=ev, where=where):
            return unhex(ev[name], f"{where} {name}")

        ch = channels[ev["party"]]
        generated = [unhex(k, f"{where} generated_ratchet_private")
                     for k in ev["generated_ratchet_private"]]
        if ev["op"] == "encrypt":
            chain_before = ch._ratchet.state.chain_key_send
            rng.push(*generated, field("nonce"))
            msg = ch.send(field("plaintext"))
            rng.drained(where)
            hdr = ev["header"]
            check(f"{where} header.dh", hdr["dh"], msg.header.dh_public_key.hex())
            check(f"{where} header.pn", hdr["pn"], msg.header.previous_chain_length)
            check(f"{where} header.n", hdr["n"], msg.header.message_number)
            check(f"{where} header_bytes", field("header_bytes"), msg.header.serialize())
            check(f"{where} ciphertext", field("ciphertext"), msg.ciphertext)
            mk = hmac.new(chain_before, b"\x01", hashlib.sha256).digest()
            check(f"{where} message_key", field("message_key"), mk)
            sent[ev["i"]] = msg
        elif ev["op"] == "decrypt":
            if ev["message"] not in sent:
                raise Mismatch(f"{where}: message {show(ev['message'])} "
                               "is not an earlier encrypt event")
            msg = sent[ev["message"]]
            rng.push(*generated)
            if "expect_error" in ev:
                kind = ev["expect_error"]
                before = dataclasses.asdict(ch._ratchet.state)
                try:
                    ch.receive(msg)
                except Mismatch:
                    raise
                except Exception as e:  # the package's own failure
                    err = e
                else:
                    raise Mismatch(f"{where}: expected error {kind!r}, but receive succeeded")
                desc = f"{type(err).__name__}: {err}"
                if dataclasses.asdict(ch._ratchet.state) != before:
                    raise Mismatch(f"{where}: reference advanced state on error ({kind!r}, {desc})")
                if not ERROR_KINDS.get(kind, lambda e: True)(err):
                    raise Mismatch(f"{where}: expected error {kind!r}, package raised {desc}")
                rng.drained(where)
            else:
                plaintext = ch.receive(msg)
                rng.drained(where)
                check(f"{where} plaintext", field("plaintext"), plaintext)
        else:
            raise Mismatch(f"{where}: unknown op {show(ev['op'])}")
        check_state(f"{where} state_after ({ev['party']})", ev["state_after"], ch)


class FakeRegistryStore:
    def __init__(self, did, public_key):
        self.agent = (did, SimpleNamespace(public_key=public_key))

    def get_agent(self, did):
        return self.agent[1] if did == self.agent[0] else None


def check_identity(c):
    seed = unhex(c["ed25519_seed"], "ed25519_seed")
    public, secret = crypto_sign_seed_keypair(seed)
    check("ed25519_public", unhex(c["ed25519_public"]), public)
    xkp = X25519KeyPair.from_ed25519(secret, public)
    check("x25519_private", unhex(c["x25519_private"]), xkp.private_key)
    check("x25519_public", unhex(c["x25519_public"]), xkp.public_key)
    did = "did:mesh:" + hashlib.sha256(public).hexdigest()[:32]
    check("did", c["did"], did)
    ts = c["timestamp"]
    sig = SigningKey(seed).sign(ts.encode()).signature
    check("timestamp_signature", unhex(c["timestamp_signature"]), sig)
    sig_url = base64.urlsafe_b64encode(sig).decode().rstrip("=")
    check("authorization", c["authorization"], f"Ed25519-Timestamp {did} {ts} {sig_url}")
    expected_connect = {"type": "connect", "from": did,
                        "public_key": base64.b64encode(public).decode(),
                        "timestamp": ts, "signature": base64.b64encode(sig).decode()}
    got_connect = c["relay_connect"]
    check("relay_connect fields", sorted(expected_connect), sorted(got_connect))
    for k, v in expected_connect.items():
        check(f"relay_connect.{k}", got_connect[k], v)

    # The reference's own verifiers, with their clocks frozen at the timestamp.
    try:
        import agentmesh.registry.app as registry_app
        import agentmesh.relay.app as relay_app
    except ImportError as e:
        return f"(reference relay/registry verifiers not importable: {e})"
    now = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    saved = relay_app._utcnow, registry_app._utcnow
    relay_app._utcnow = registry_app._utcnow = lambda: now
    try:
        ok, reason = relay_app._verify_connect_pop(got_connect)
        if not ok:
            raise Mismatch(f"relay _verify_connect_pop rejected relay_connect: {reason}")
        try:
            authed = registry_app.verify_ed25519_timestamp_auth(
                c["authorization"], FakeRegistryStore(did, public))
        except Exception as e:
            raise Mismatch(f"registry rejected authorization: {getattr(e, 'detail', e)}") from None
        check("DID accepted by registry", did, authed)
    finally:
        relay_app._utcnow, registry_app._utcnow = saved
    return ""


class Runner:
    def __init__(self):
        self.passed = self.failed = self.skipped = 0
        self._docs = {}

    def load(self, path):
        path = path.resolve()
        if path not in self._docs:
            with open(path, encoding="utf-8") as f:
                self._docs[path] = json.load(f)
        return self._docs[path]

    def report(self, status, label, detail=""):
        print(f"{status} {label}{detail}", flush=True)
        if status == "PASS":
            self.passed += 1
        elif status == "FAIL":
            self.failed += 1
        else:
            self.skipped += 1

    def find_x3dh_case(self, path, kdf, name):
        """The x3dh case `name` in an x3dh file of the same directory and kdf."""
        for p in sorted(path.parent.glob("*.json")):
            try:
                doc = self.load(p)
            except (OSError, ValueError):
                continue
            if (isinstance(doc, dict) and doc.get("schema") == SCHEMA
                    and doc.get("kind") == "x3dh" and doc.get("kdf") == kdf):
                for case in doc.get("cases") or []:
                    if isinstance(case, dict) and case.get("name") == name:
                        return case
        raise Mismatch(f"from_x3dh {name!r}: no such case in an x3dh file with kdf {kdf!r} "
                       f"in {path.parent}")

    def run_file(self, path):
        label = f"{path.parent.name}/{path.name}"
        try:
            doc = self.load(path)
        except (OSError, ValueError) as e:
            self.report("FAIL", label, f": unreadable: {e}")
            return
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            return
        kind, kdf, cases = doc.get("kind"), doc.get("kdf"), doc.get("cases")
        if not isinstance(cases, list):
            self.report("FAIL", label, ": malformed: 'cases' is not a list")
            return
        if kind not in ("x3dh", "ratchet", "identity", "mesh-session"):
            self.report("FAIL", label, f": unknown kind {kind!r}")
            return
        for n, case in enumerate(cases):
            name = case.get("name", f"#{n}") if isinstance(case, dict) else f"#{n}"
            case_label = f"{label} {name}"
            if kind == "mesh-session":
                self.report("SKIP", case_label, ": mesh-session is not applicable to the Python package")
                continue
            note = " (legacy KDF patched in)" if kdf == "legacy-ff-salt" else ""
            try:
                if not isinstance(case, dict):
                    raise Mismatch("malformed case: not an object")
                if kind == "identity":  # no X3DH involved: the file's kdf is irrelevant
                    extra = check_identity(case)
                    note = f" {extra}" if extra else ""
                else:
                    with kdf_mode(kdf), RecordedRandomness() as rng:
                        if kind == "x3dh":
                            check_x3dh(case, rng)
                        else:
                            x = self.find_x3dh_case(path, kdf, case["from_x3dh"])
                            check_ratchet(case, x, rng)
            except Mismatch as e:
                self.report("FAIL", case_label, f"{note}: {e}")
            except KeyError as e:
                self.report("FAIL", case_label, f"{note}: malformed vector: missing field {e}")
            except Exception as e:  # malformed vector or package error
                self.report("FAIL", case_label, f"{note}: {type(e).__name__}: {e}")
            else:
                self.report("PASS", case_label, note)


def main(argv):
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    runner = Runner()
    for arg in argv:
        p = Path(arg)
        if p.is_dir():
            files = sorted(q for q in p.rglob("*.json") if q.is_file())
        elif p.is_file():
            files = [p]
        else:
            runner.report("FAIL", arg, ": no such file or directory")
            continue
        for f in files:
            runner.run_file(f)
    summary = f"{runner.passed} passed, {runner.failed} failed"
    if runner.skipped:
        summary += f", {runner.skipped} skipped"
    print(summary)
    if runner.passed + runner.failed + runner.skipped == 0:
        print("no agentmesh-golden/1 vector files found", file=sys.stderr)
        return 1
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
