#!/usr/bin/env python3
"""The meshwire wheel against the pure-Python `agentmesh` package
(agent-governance-toolkit-core 5.0.0), in one process, one run.

  msg_1KiB   one Alice encrypt + one Bob decrypt of a 1 KiB message on an
             established channel (same direction), Python call overhead
             included: wheel `SecureChannel.encrypt/decrypt` versus the
             package's `SecureChannel.send/receive`.
  handshake  a channel handshake with a fresh one-time pre-key each:
             initiator (bundle signature verification, X3DH, first ratchet
             key) + responder (X3DH, ratchet), the one-time key consumed.
             Wheel `SecureChannel.initiate` + `SecureChannel.respond` (+
             `PreKeys.remove_one_time_key`) versus the package's
             `SecureChannel.create_sender` + `create_receiver`
             (`X3DHKeyManager.initiate/respond` inside).

One-time keys and bundles are generated outside the timed regions. The
measurements alternate between the two implementations in --rounds rounds
and the best round of each is reported (the median too, in the JSON), so
that load from other processes affects both alike. Prints a table and one
JSON line (also written to --json PATH).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import warnings
from time import perf_counter

warnings.filterwarnings("ignore", category=DeprecationWarning)
logging.getLogger("agentmesh").setLevel(logging.ERROR)

import meshwire  # noqa: E402
from agentmesh.encryption.channel import SecureChannel as PyChannel  # noqa: E402
from agentmesh.encryption.x3dh import X3DHKeyManager  # noqa: E402
from nacl.bindings import crypto_sign_seed_keypair  # noqa: E402

BATCH = 64
SIZE = 1024


def rate(seconds, op, prepare=lambda n: range(n)):
    """Operations per second of `op(item)`, timing only the calls; `prepare`
    builds each batch of items outside the timed region."""
    done, spent = 0, 0.0
    while spent < seconds:
        items = prepare(BATCH)
        t0 = perf_counter()
        for item in items:
            op(item)
        spent += perf_counter() - t0
        done += len(items)
    return done / spent


def manager(seed):
    public, secret = crypto_sign_seed_keypair(seed)
    return X3DHKeyManager.from_ed25519_keys(secret, public)


def ad(a, b):
    return f"{a}|{b}".encode()


class Wheel:
    name = "meshwire wheel"

    def __init__(self):
        self.alice, self.bob = meshwire.Identity.generate(), meshwire.Identity.generate()
        self.keys = meshwire.PreKeys.generate(self.bob)

    def channels(self):
        [otk] = self.keys.generate_one_time_keys(1)
        a, est = meshwire.SecureChannel.initiate(self.alice, self.bob.did, self.keys.bundle(self.bob, otk))
        b, first = meshwire.SecureChannel.accept(self.bob, self.keys, self.alice.did, est, a.encrypt(b"hi"))
        assert first == b"hi"
        return a, b

    def message_op(self):
        a, b = self.channels()
        payload = os.urandom(SIZE)
        assert b.decrypt(a.encrypt(payload)) == payload

        def op(_):
            b.decrypt(a.encrypt(payload))

        return op

    def handshake(self):
        alice, bob, keys = self.alice, self.bob, self.keys
        initiate, respond = meshwire.SecureChannel.initiate, meshwire.SecureChannel.respond
        alice_did, bob_did = alice.did, bob.did

        def prepare(n):
            return [keys.bundle(bob, otk) for otk in keys.generate_one_time_keys(n)]

        def op(bundle):
            a, est = initiate(alice, bob_did, bundle)
            respond(bob, keys, alice_did, est)
            keys.remove_one_time_key(est.one_time_key_id)

        # Both sides agree (checked once, untimed).
        [bundle] = prepare(1)
        a, est = initiate(alice, bob_did, bundle)
        b = respond(bob, keys, alice_did, est)
        assert b.decrypt(a.encrypt(b"check")) == b"check"
        return op, prepare


class Package:
    name = "agentmesh 5.0.0"

    def __init__(self):
        self.alice, self.bob = manager(os.urandom(32)), manager(os.urandom(32))
        self.bob.generate_signed_pre_key()
        self.ad = ad("did:mesh:alice", "did:mesh:bob")

    def channels(self):
        [otk] = self.bob.generate_one_time_pre_keys(1)
        a, est = PyChannel.create_sender(self.alice, self.bob.get_public_bundle(otk.key_id), self.ad)
        b = PyChannel.create_receiver(self.bob, est, self.ad)
        return a, b

    def message_op(self):
        a, b = self.channels()
        payload = os.urandom(SIZE)
        assert b.receive(a.send(payload)) == payload

        def op(_):
            b.receive(a.send(payload))

        return op

    def handshake(self):
        alice, bob, data = self.alice, self.bob, self.ad

        def prepare(n):
            return [bob.get_public_bundle(otk.key_id) for otk in bob.generate_one_time_pre_keys(n)]

        def op(bundle):
            _, est = PyChannel.create_sender(alice, bundle, data)
            PyChannel.create_receiver(bob, est, data)

        [bundle] = prepare(1)
        a, est = PyChannel.create_sender(alice, bundle, data)
        b = PyChannel.create_receiver(bob, est, data)
        assert b.receive(a.send(b"check")) == b"check"
        return op, prepare


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement and implementation")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (best of them is reported)")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--json", help="also write the JSON result here")
    parser.add_argument("--min-ratio", type=float, default=0.0, help="exit 1 if msg_1KiB wheel/package is lower")
    o = parser.parse_args()

    # Interleaved rounds, best of each: the machine may be shared, and
    # alternating keeps both implementations under the same conditions.
    impls = (Wheel(), Package())
    ops = {}
    for impl in impls:
        op = impl.message_op()
        hs_op, prepare = impl.handshake()
        rate(o.warmup, op)
        rate(o.warmup, hs_op, prepare)
        ops[impl.name] = (op, hs_op, prepare)
    samples = {impl.name: {"msg_1KiB_per_s": [], "handshakes_per_s": []} for impl in impls}
    share = o.seconds / o.rounds
    for _ in range(o.rounds):
        for impl in impls:
            op, hs_op, prepare = ops[impl.name]
            samples[impl.name]["msg_1KiB_per_s"].append(rate(share, op))
            samples[impl.name]["handshakes_per_s"].append(rate(share, hs_op, prepare))
    results = {name: {k: max(v) for k, v in s.items()} for name, s in samples.items()}
    medians = {name: {k: sorted(v)[len(v) // 2] for k, v in s.items()} for name, s in samples.items()}

    wheel, package = results[Wheel.name], results[Package.name]
    ratios = {k: wheel[k] / package[k] for k in wheel}
    print(f"{'operation':<34}{'meshwire wheel':>16}{'agentmesh 5.0.0':>17}{'ratio':>9}")
    rows = [
        ("1 KiB encrypt+decrypt (msg/s)", "msg_1KiB_per_s"),
        ("X3DH channel handshake (/s)", "handshakes_per_s"),
    ]
    for label, key in rows:
        print(f"{label:<34}{wheel[key]:>16,.0f}{package[key]:>17,.0f}{ratios[key]:>8.1f}x")
    report = {
        "benchmark": "meshwire-wheel-vs-agentmesh",
        "python": platform.python_version(),
        "meshwire": meshwire.__version__,
        "seconds": o.seconds,
        "rounds": o.rounds,
        "statistic": "best of rounds",
        "message_bytes": SIZE,
        "wheel": wheel,
        "agentmesh": package,
        "ratio": ratios,
        "median": {"wheel": medians[Wheel.name], "agentmesh": medians[Package.name]},
        "goal_msg_ratio": 5.0,
        "goal_met": ratios["msg_1KiB_per_s"] >= 5.0,
    }
    line = json.dumps(report, sort_keys=True)
    print(line)
    if o.json:
        with open(o.json, "w") as f:
            f.write(line + "\n")
    return 1 if ratios["msg_1KiB_per_s"] < o.min_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
