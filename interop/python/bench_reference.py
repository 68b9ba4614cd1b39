#!/usr/bin/env python3
"""Benchmark the reference agentmesh 5.0.0 package in-process; print one JSON object.

  handshakes_per_s  alice.initiate(bundle) (includes SPK signature verification)
                    + bob.respond(...); each handshake uses a fresh, pre-generated OTK
  msg_<size>_per_s  one Alice send + one Bob receive of <size> bytes, established channel
  pingpong_per_s    messages/s alternating direction every message (64-byte payload),
                    so every message forces a DH ratchet step
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from time import perf_counter

warnings.filterwarnings("ignore", category=DeprecationWarning)
logging.getLogger("agentmesh").setLevel(logging.ERROR)

from nacl.bindings import crypto_sign_keypair  # noqa: E402

import agentmesh  # noqa: E402
from agentmesh.encryption.channel import SecureChannel  # noqa: E402
from agentmesh.encryption.x3dh import X3DHKeyManager  # noqa: E402

BATCH = 64


def new_manager() -> X3DHKeyManager:
    public, secret = crypto_sign_keypair()
    return X3DHKeyManager.from_ed25519_keys(secret, public)


def rate(seconds, op, prepare=lambda n: range(n), per_op=1):
    """Operations per second of `op(item)`, timing only the op calls; `prepare`
    builds each batch of items outside the timed region."""
    done, spent = 0, 0.0
    while spent < seconds:
        items = prepare(BATCH)
        t0 = perf_counter()
        for item in items:
            op(item)
        spent += perf_counter() - t0
        done += len(items) * per_op
    return done / spent


def bench_handshakes(seconds, warmup):
    alice, bob = new_manager(), new_manager()
    bob.generate_signed_pre_key()
    alice_ik = alice.identity_key.public_key

    def prepare(n):  # fresh one-time pre-keys and their bundles, untimed
        return [bob.get_public_bundle(otk.key_id) for otk in bob.generate_one_time_pre_keys(n)]

    def handshake(bundle):
        res = alice.initiate(bundle)
        bob.respond(alice_ik, res.ephemeral_public_key, res.used_one_time_key_id)

    rate(warmup, handshake, prepare)
    return rate(seconds, handshake, prepare)


def new_channels():
    alice, bob = new_manager(), new_manager()
    bob.generate_signed_pre_key()
    [otk] = bob.generate_one_time_pre_keys(1)
    ad = b"did:mesh:alice|did:mesh:bob"
    a, establishment = SecureChannel.create_sender(alice, bob.get_public_bundle(otk.key_id), ad)
    b = SecureChannel.create_receiver(bob, establishment, ad)
    return a, b


def bench_messages(size, seconds, warmup):
    a, b = new_channels()
    payload = os.urandom(size)

    def message(_):
        b.receive(a.send(payload))

    rate(warmup, message)
    return rate(seconds, message)


def bench_pingpong(seconds, warmup):
    a, b = new_channels()
    payload = os.urandom(64)

    def round_trip(_):  # two messages, one per direction
        b.receive(a.send(payload))
        a.receive(b.send(payload))

    rate(warmup, round_trip, per_op=2)
    return rate(seconds, round_trip, per_op=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="timed duration per benchmark")
    args = ap.parse_args()
    s, w = args.seconds, min(0.3, args.seconds / 5)
    result = {"producer": f"agentmesh {agentmesh.__version__}",
              "handshakes_per_s": bench_handshakes(s, w),
              "msg_64_per_s": bench_messages(64, s, w),
              "msg_1k_per_s": bench_messages(1024, s, w),
              "msg_64k_per_s": bench_messages(65536, s, w)}
    result["msg_64k_bytes_per_s"] = result["msg_64k_per_s"] * 65536
    result["pingpong_per_s"] = bench_pingpong(s, w)
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
